//! The stage-2 transformer (Ramesh et al. 2021 §2.2, appendix B.1): a decoder-only model over
//! caption tokens followed by image tokens, with the row / column / convolutional sparse
//! attention masks of `dalle_runtimes::masks`, pre-LN blocks and an untied head over the unified
//! vocabulary.
//!
//! Weight names: `embed.tokens`, `embed.text_pos`, `embed.image_row`, `embed.image_col`,
//! `layers.{i}.ln_1`, `layers.{i}.attn.qkv`, `layers.{i}.attn.proj`, `layers.{i}.ln_2`,
//! `layers.{i}.mlp.fc`, `layers.{i}.mlp.proj`, `ln_f`, `head` (each `.weight` / `.bias`).

use super::sparse::{additive_mask, SlotPlan};
use crate::config::Config;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use dalle_runtimes::{layer_kinds, AttentionKind, TokenLayout};

mod cache;
mod decode;

use crate::kernels::linear::batched_matmul;
use crate::kernels::softmax::{masked_softmax, softmax_last};
pub use cache::KvCache;
use cache::{store, LayerCache};

/// Layer normalisation from tensor ops, so that it back-propagates (candle-nn's fused
/// `LayerNorm` on contiguous input has no backward pass).
#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(d, "weight")?,
            bias: vb.get(d, "bias")?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::kernels::norm::normalize(x, 1e-5)?;
        crate::kernels::norm::scale_shift(&y, &self.weight, &self.bias)
    }
}

/// `x · Wᵀ + b` over the last axis, `weight` (d_out, d_in) as candle-nn's `Linear` stores it,
/// as one fused op (`kernels::linear::linear`) with the leading axes as rows of one matrix product:
/// candle-nn's version broadcasts the weight over the batch, so training runs one small matmul
/// per sequence and its backward pass builds a weight gradient per sequence, (b, d_in, d_out),
/// before summing them.
#[derive(Clone, Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// The weight in f16, for the decoding steps that stream it (see
    /// [`Transformer::keep_f16_weights`]).
    half: Option<HalfWeight>,
}

fn linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((d_out, d_in), "weight")?,
        bias: vb.get(d_out, "bias")?,
        half: None,
    })
}

/// One weight matrix's values in IEEE half precision: a run of a buffer shared by all of them.
#[derive(Clone, Debug)]
struct HalfWeight {
    all: std::sync::Arc<Vec<half::f16>>,
    start: usize,
    len: usize,
}

impl HalfWeight {
    fn get(&self) -> &[half::f16] {
        &self.all[self.start..self.start + self.len]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::linear::linear(x, &self.weight, &self.bias)
    }
}

#[derive(Clone, Debug)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    n_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(d: usize, n_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            proj: linear(d, d, vb.pp("proj"))?,
            n_heads,
            head_dim: d / n_heads,
        })
    }

    /// `mask`: additive (t, past + t), 0 where allowed and −∞ elsewhere. `keys`: for a single
    /// query (t = 1), the positions its mask allows; attention then reads only those keys and
    /// values instead of the whole cache (the same result: masked weights are exactly 0).
    /// `cache`: this layer's buffers, the positions before `past` filled, `capacity` long;
    /// `None` (training) keeps nothing and stays differentiable. `plan`: for a whole sequence
    /// from position 0, attention over the key slots the mask can allow only (`super::sparse`).
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        keys: Option<&Tensor>,
        plan: Option<&SlotPlan>,
        cache: Option<LayerCache<'_>>,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, t, 3, self.n_heads, self.head_dim))?;
        let qkv = qkv.permute((2, 0, 3, 1, 4))?; // (3, b, h, t, hd)
        let q = qkv.get(0)?.contiguous()?;
        let mut k = qkv.get(1)?.contiguous()?;
        let mut v = qkv.get(2)?.contiguous()?;
        if let Some((slot, pasts, capacity)) = cache {
            let (bk, bv) = store(slot, &k, &v, pasts, capacity)?;
            let past = pasts.iter().copied().max().unwrap_or(0);
            (k, v) = match keys {
                Some(_) => (bk, bv),
                None => (bk.narrow(2, 0, past + t)?, bv.narrow(2, 0, past + t)?),
            };
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = match (keys, plan) {
            (Some(idx), _) => {
                let (k, v) = (k.index_select(idx, 2)?, v.index_select(idx, 2)?); // (b, h, n, hd)
                let att = softmax_last(&(batched_matmul(&q, &k, true)? * scale)?)?;
                batched_matmul(&att, &v, false)?
            }
            (None, Some(plan)) => plan.attend(&q, &k, &v, scale)?,
            (None, None) => {
                let att = masked_softmax(&batched_matmul(&q, &k, true)?, mask, scale)?; // (b, h, t, s)
                batched_matmul(&att, &v, false)? // (b, h, t, hd)
            }
        };
        self.proj.forward(&y.transpose(1, 2)?.reshape((b, t, d))?)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    fc: Linear,
    proj: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj
            .forward(&crate::kernels::activation::gelu(&self.fc.forward(x)?)?)
    }
}

#[derive(Clone, Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
    /// CogView's sandwich norms on the attention's and the MLP's outputs before each residual
    /// addition (`attn.ln_out`, `mlp.ln_out`; `Norms::sandwich`).
    sandwich: Option<(LayerNorm, LayerNorm)>,
}

impl Block {
    fn new(d: usize, n_heads: usize, sandwich: bool, vb: VarBuilder) -> Result<Self> {
        let sandwich = match sandwich {
            true => Some((
                LayerNorm::new(d, vb.pp("attn").pp("ln_out"))?,
                LayerNorm::new(d, vb.pp("mlp").pp("ln_out"))?,
            )),
            false => None,
        };
        Ok(Block {
            ln_1: LayerNorm::new(d, vb.pp("ln_1"))?,
            attn: Attention::new(d, n_heads, vb.pp("attn"))?,
            ln_2: LayerNorm::new(d, vb.pp("ln_2"))?,
            mlp: Mlp {
                fc: linear(d, 4 * d, vb.pp("mlp").pp("fc"))?,
                proj: linear(4 * d, d, vb.pp("mlp").pp("proj"))?,
            },
            sandwich,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        keys: Option<&Tensor>,
        plan: Option<&SlotPlan>,
        cache: Option<LayerCache<'_>>,
    ) -> Result<Tensor> {
        let mut a = self
            .attn
            .forward(&self.ln_1.forward(x)?, mask, keys, plan, cache)?;
        if let Some((ln, _)) = &self.sandwich {
            a = ln.forward(&a)?;
        }
        let x = (x + a)?;
        let mut m = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        if let Some((_, ln)) = &self.sandwich {
            m = ln.forward(&m)?;
        }
        &x + m
    }
}

/// The transformer; `forward` serves training (whole sequences) and cached decoding.
#[derive(Clone, Debug)]
pub struct Transformer {
    config: Config,
    layout: TokenLayout,
    text_len: usize,
    grid: usize,
    tokens: Embedding,
    text_pos: Tensor,
    image_row: Tensor,
    image_col: Tensor,
    blocks: Vec<Block>,
    kinds: Vec<AttentionKind>,
    masks: Vec<Tensor>,
    /// Each layer's slot plan for whole sequences (`None`: dense masked attention).
    plans: Vec<Option<SlotPlan>>,
    ln_f: LayerNorm,
    /// A second final norm before the head (`Norms::head`).
    ln_head: Option<LayerNorm>,
    head: Linear,
}

impl Transformer {
    /// Keep an f16 copy of every weight matrix (the four of each layer and the head), which
    /// decoding steps of up to [`crate::kernels::linear::SMALL_ROWS`] rows on the CPU then stream instead of
    /// the f32 one: those steps are a pass over the weights, and this halves its bytes. Every
    /// weight is rounded to f16, so this is for weights that are f16 already — a model exported
    /// with `--fp16`, which the candle runtime loads widened to f32 — and changes nothing in
    /// their results. The f32 weights stay for prefill, larger batches and training.
    pub fn keep_f16_weights(&mut self) -> Result<()> {
        let mut linears: Vec<&mut Linear> = self
            .blocks
            .iter_mut()
            .flat_map(|b| {
                [
                    &mut b.attn.qkv,
                    &mut b.attn.proj,
                    &mut b.mlp.fc,
                    &mut b.mlp.proj,
                ]
            })
            .collect();
        linears.push(&mut self.head);
        let mut runs = Vec::with_capacity(linears.len());
        let total = linears.iter().map(|l| l.weight.elem_count()).sum();
        // In huge pages, as the f32 weights are (see `crate::runtime`).
        let (mut all, skip) = crate::kernels::pages::huge_page_buffer::<half::f16>(total);
        for l in &linears {
            let w = l
                .weight
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            runs.push((all.len(), w.len()));
            all.extend(w.iter().map(|&v| half::f16::from_f32(v)));
        }
        debug_assert_eq!(all.len(), skip + total);
        let all = std::sync::Arc::new(all);
        for (l, (start, len)) in linears.into_iter().zip(runs) {
            l.half = Some(HalfWeight {
                all: all.clone(),
                start,
                len,
            });
        }
        Ok(())
    }

    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let g = &cfg.geometry;
        let t = &cfg.transformer;
        let layout = TokenLayout::from(g);
        let d = t.d_model;
        let e = vb.pp("embed");
        let tokens = candle_nn::embedding(layout.vocab_size(), d, e.pp("tokens"))?;
        let text_pos = e.get((g.text_len, d), "text_pos")?;
        let image_row = e.get((g.grid, d), "image_row")?;
        let image_col = e.get((g.grid, d), "image_col")?;
        let blocks = (0..t.n_layers)
            .map(|i| Block::new(d, t.n_heads, t.norms.sandwich, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let kinds = layer_kinds(t.n_layers, t.conv_kernel);
        // One mask tensor per distinct kind, shared by the layers that use it.
        let mut by_kind: Vec<(AttentionKind, Tensor, Option<SlotPlan>)> = vec![];
        let (mut masks, mut plans) = (vec![], vec![]);
        for &kind in &kinds {
            if let Some((_, m, p)) = by_kind.iter().find(|(k, _, _)| *k == kind) {
                masks.push(m.clone());
                plans.push(p.clone());
            } else {
                let m = additive_mask(g.text_len, g.grid, kind, vb.device())?;
                let p = SlotPlan::new(g.text_len, g.grid, kind, vb.device())?;
                by_kind.push((kind, m.clone(), p.clone()));
                masks.push(m);
                plans.push(p);
            }
        }
        Ok(Transformer {
            config: cfg.clone(),
            layout,
            text_len: g.text_len,
            grid: g.grid,
            tokens,
            text_pos,
            image_row,
            image_col,
            blocks,
            kinds,
            masks,
            plans,
            ln_f: LayerNorm::new(d, vb.pp("ln_f"))?,
            ln_head: match t.norms.head {
                true => Some(LayerNorm::new(d, vb.pp("ln_head"))?),
                false => None,
            },
            head: linear(d, layout.vocab_size(), vb.pp("head"))?,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn layout(&self) -> TokenLayout {
        self.layout
    }

    pub fn kinds(&self) -> &[AttentionKind] {
        &self.kinds
    }

    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Full sequence length (text then image).
    pub fn seq_len(&self) -> usize {
        self.text_len + self.grid * self.grid
    }

    /// Position embeddings of positions `start .. start + len`: text positions, then image
    /// row + column embeddings in raster order.
    fn positions(&self, start: usize, len: usize) -> Result<Tensor> {
        let n = self.grid * self.grid;
        let dev = self.text_pos.device();
        let rows: Vec<u32> = (0..n as u32).map(|i| i / self.grid as u32).collect();
        let cols: Vec<u32> = (0..n as u32).map(|i| i % self.grid as u32).collect();
        let rows = self.image_row.embedding(&Tensor::new(rows, dev)?)?;
        let cols = self.image_col.embedding(&Tensor::new(cols, dev)?)?;
        let all = Tensor::cat(&[&self.text_pos, &(rows + cols)?], 0)?; // (seq, d)
        all.narrow(0, start, len)
    }

    /// (b, t) unified ids at positions `past .. past + t` → (b, t, vocab) logits, where `past`
    /// is what `cache` holds (0 without a cache). The cache is extended in place.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if let Some(cache) = cache {
            self.check_cache(cache, t)?;
            if self.decodes_natively(ids) {
                // On rayon's threads (see `decode_step`). Not prefill or training: there
                // candle's own elementwise thread pool then competes with rayon's spinning
                // workers for the cores (a batch-16 prefill took 1.6 s instead of 0.7 s).
                return self.decode_step(ids, cache);
            }
            return self.forward_here(ids, Some(cache));
        }
        self.forward_here(ids, None)
    }

    /// The cache fits this model and has room for `t` more positions.
    fn check_cache(&self, cache: &KvCache, t: usize) -> Result<()> {
        if cache.layers.len() != self.blocks.len() {
            candle_core::bail!(
                "KV cache has {} layers, the model {}",
                cache.layers.len(),
                self.blocks.len()
            );
        }
        if let Some(&past) = cache.pasts.iter().find(|&&p| p + t > self.seq_len()) {
            candle_core::bail!(
                "positions {past}..{} exceed the sequence length {}",
                past + t,
                self.seq_len()
            );
        }
        Ok(())
    }

    /// The key positions a query at `past` may read: one ascending list per distinct attention
    /// kind (shared by the layers of that kind), and for each layer the index of its list.
    fn allowed_keys(&self, past: usize) -> (Vec<Vec<u32>>, Vec<usize>) {
        let mut kinds: Vec<AttentionKind> = vec![];
        let mut lists = vec![];
        let of_layer = self
            .kinds
            .iter()
            .map(|&kind| {
                kinds.iter().position(|&k| k == kind).unwrap_or_else(|| {
                    kinds.push(kind);
                    lists.push(
                        (0..=past as u32)
                            .filter(|&k| {
                                dalle_runtimes::allowed(
                                    self.text_len,
                                    self.grid,
                                    kind,
                                    past,
                                    k as usize,
                                )
                            })
                            .collect(),
                    );
                    kinds.len() - 1
                })
            })
            .collect();
        (lists, of_layer)
    }

    /// The forward pass as candle tensor ops (training, prefill, other devices).
    fn forward_here(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.head.forward(&self.hidden(ids, cache)?)
    }

    /// The final normalised states the head reads, (b, t, d), as tensor ops.
    fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let mut scratch = KvCache::new(self.blocks.len());
        let cached = cache.is_some();
        let cache = cache.unwrap_or(&mut scratch);
        self.check_cache(cache, t)?;
        let Some(past) = cache.past_len() else {
            candle_core::bail!(
                "the KV cache's rows hold different numbers of positions: only single-token \
                 steps on the CPU (f32) take such rows"
            );
        };
        let b = ids.dim(0)?;
        let mut x = self
            .tokens
            .forward(ids)?
            .broadcast_add(&self.positions(past, t)?)?;
        // Single-token steps (decoding) attend over the allowed keys only.
        let (lists, list_of_layer) = self.allowed_keys(past);
        let keys: Vec<Tensor> = if t == 1 {
            lists
                .into_iter()
                .map(|l| Tensor::new(l, ids.device()))
                .collect::<Result<_>>()?
        } else {
            vec![]
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let mask = self.masks[i].narrow(0, past, t)?.narrow(1, 0, past + t)?;
            let k = keys.get(list_of_layer[i]);
            let whole = past == 0 && t == self.seq_len();
            let plan = self.plans[i].as_ref().filter(|_| whole);
            let pasts = [past];
            let slot = cached.then(|| (&mut cache.layers[i], &pasts[..], self.seq_len()));
            x = block.forward(&x, &mask, k, plan, slot)?;
        }
        cache.pasts = vec![past + t; b];
        let mut h = self.ln_f.forward(&x)?;
        if let Some(ln) = &self.ln_head {
            h = ln.forward(&h)?;
        }
        Ok(h)
    }

    /// The training losses (total, text, image) of whole sequences `ids (b, seq)`. With
    /// `image_codes_only`, each image position's cross-entropy is over the image codes alone —
    /// no text id can follow there, and sampling draws from the codes only (DALLE-pytorch masks
    /// its logits the same way) — so the head computes `codebook` of its rows there instead of
    /// the whole vocabulary (a third of them at the `shapes` preset); otherwise [`loss`] over
    /// [`Transformer::forward`].
    pub fn losses(&self, ids: &Tensor, image_codes_only: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (text, image) = self.position_nll(ids, image_codes_only)?;
        let (text, image) = (text.mean_all()?, image.mean_all()?);
        Ok((paper_total(&text, &image)?, text, image))
    }

    /// Each target's negative log-likelihood under teacher forcing: `(b, text_len − 1)` for the
    /// caption's ids 1 ‥ text_len − 1 and `(b, s − text_len)` for the image codes, each code's
    /// over the codes alone when `image_codes_only` (else over the whole vocabulary).
    pub fn position_nll(&self, ids: &Tensor, image_codes_only: bool) -> Result<(Tensor, Tensor)> {
        let (text, image, _) = self.position_nll_and_margins(ids, image_codes_only, &[])?;
        Ok((text, image))
    }

    /// [`Transformer::position_nll`] and, for each of `choices`, how many nats likelier its row's
    /// code is than the alternative at its position, `(choices,)`: the difference of the two
    /// codes' logits, the same whatever the softmax normalises over (`None` without choices).
    pub fn position_nll_and_margins(
        &self,
        ids: &Tensor,
        image_codes_only: bool,
        choices: &[CodeChoice],
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (b, s) = ids.dims2()?;
        let t = self.text_len;
        let nll = crate::kernels::loss::next_token_nll;
        let h = self.hidden(ids, None)?;
        let (offset, n) = (self.layout.image_offset(), self.layout.codebook);
        let weight = self.head.weight.narrow(0, offset, n)?;
        let bias = self.head.bias.narrow(0, offset, n)?;
        let margins = if choices.is_empty() {
            None
        } else {
            // Position t − 1 + p holds the hidden state that predicts code p.
            let rows: Vec<u32> = choices
                .iter()
                .map(|c| (c.row * s + t - 1 + c.position) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, choices.len(), ids.device())?;
            let picked = h.flatten(0, 1)?.index_select(&rows, 0)?;
            let logits = crate::kernels::linear::linear(&picked, &weight, &bias)?;
            let pick = |f: fn(&CodeChoice) -> u32| -> Result<Tensor> {
                let codes: Vec<u32> = choices.iter().map(f).collect();
                let codes = Tensor::from_vec(codes, (choices.len(), 1), ids.device())?;
                logits.gather(&codes, 1)?.squeeze(1)
            };
            Some((pick(|c| c.code)? - pick(|c| c.other)?)?)
        };
        if !image_codes_only {
            let all = nll(&self.head.forward(&h)?, ids)?; // position p predicts p + 1
            let (text, image) = (all.narrow(1, 0, t - 1)?, all.narrow(1, t - 1, s - t)?);
            return Ok((text, image, margins));
        }
        // Positions 0 ‥ t − 2 predict the caption's ids 1 ‥ t − 1.
        let text = nll(
            &self.head.forward(&h.narrow(1, 0, t)?)?,
            &ids.narrow(1, 0, t)?,
        )?;
        // Positions t − 1 ‥ s − 2 predict the codes; the codes shifted in after one dummy target
        // for the last position, whose prediction the loss skips.
        let logits =
            crate::kernels::linear::linear(&h.narrow(1, t - 1, s - t + 1)?, &weight, &bias)?;
        let codes = ids
            .narrow(1, t, s - t)?
            .to_dtype(DType::F32)?
            .affine(1.0, -(offset as f64))?
            .to_dtype(DType::U32)?;
        let dummy = Tensor::zeros((b, 1), DType::U32, ids.device())?;
        let image = nll(&logits, &Tensor::cat(&[&dummy, &codes], 1)?)?;
        Ok((text, image, margins))
    }
}

/// A choice between two image codes at one position of a training row: `code`, the row's, and
/// `other`, the one its hard negative has at the first position where the two differ — after
/// the same prefix, so both are predicted from the same state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CodeChoice {
    pub row: usize,
    /// Index of the code in the image (0 ‥ grid² − 1).
    pub position: usize,
    pub code: u32,
    pub other: u32,
}

impl CodeChoice {
    /// The choice between `codes` (in batch row `row`) and `other` at their first differing
    /// position; `None` where they are the same.
    pub fn first_difference(row: usize, codes: &[u32], other: &[u32]) -> Option<Self> {
        let position = codes.iter().zip(other).position(|(a, b)| a != b)?;
        Some(CodeChoice {
            row,
            position,
            code: codes[position],
            other: other[position],
        })
    }
}

/// The paper's loss: next-token cross-entropy, averaged separately over text targets (ids
/// 1‥text_len−1) and image targets, weighted 1/8 and 7/8. Returns (loss, text, image).
pub fn loss(logits: &Tensor, ids: &Tensor, text_len: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, s, _) = logits.dims3()?;
    let nll = crate::kernels::loss::next_token_nll(logits, ids)?; // (b, s − 1): position p predicts p + 1
    let text = nll.narrow(1, 0, text_len - 1)?.mean_all()?;
    let image = nll.narrow(1, text_len - 1, s - text_len)?.mean_all()?;
    Ok((paper_total(&text, &image)?, text, image))
}

/// The paper's weighting of the mean text and image losses: 1/8 and 7/8.
pub fn paper_total(text: &Tensor, image: &Tensor) -> Result<Tensor> {
    (text * (1.0 / 8.0))? + (image * (7.0 / 8.0))?
}

/// GPT-2's initialisation: matrices and embeddings ~ N(0, 0.02²), biases 0, layer-norm gains 1.
pub fn init_value(name: &str, dims: &[usize], rng: &mut crate::rng::Rng) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let is_ln_gain = name.ends_with(".weight")
        && name
            .split('.')
            .rev()
            .nth(1)
            .is_some_and(|p| p.starts_with("ln_"));
    if is_ln_gain {
        vec![1.0; n]
    } else if dims.len() >= 2 {
        (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
    } else {
        vec![0.0; n]
    }
}
