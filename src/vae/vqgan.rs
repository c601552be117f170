//! Sber's VQGAN (ruDALL-E's image tokenizer: `rudalle/vae/model.py`'s `GumbelVQ` over
//! taming-transformers' `Encoder` / `Decoder`), rebuilt from its weights: the structure (levels,
//! widths, blocks per level, where attention is) is read off the tensors' names and shapes.
//! Images in [0, 1] → argmax codes (`encode`), codes → images in [0, 1] (`decode`), as rudalle's
//! `VQGanGumbelVAE.get_codebook_indices(…, disable_gumbel_softmax=True)` and `.decode` do.
//!
//! Weight names are the checkpoint's (`encoder.…`, `decoder.…`, `quant_conv`, `post_quant_conv`,
//! `quantize.proj`, `quantize.embed`).

use crate::{Error, Result};
use candle_core::{DType, Module, Tensor, D};
use dalle_runtimes::manifest::VqganDims;
use std::collections::BTreeMap;

/// GroupNorm's groups and epsilon in taming's `Normalize`.
const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;

fn missing(name: &str) -> Error {
    Error::Usage(format!(
        "the VQGAN's weights lack `{name}`: not a ruDALL-E VQGAN (vqgan.gumbelf8-sber) checkpoint"
    ))
}

struct Weights<'a>(&'a BTreeMap<String, Tensor>);

impl Weights<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.0.get(name).cloned().ok_or_else(|| missing(name))
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

struct Conv {
    weight: Tensor,
    bias: Tensor,
    pad: usize,
    stride: usize,
}

impl Conv {
    fn new(w: &Weights, name: &str, stride: usize) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"))?;
        let k = weight.dim(2)?;
        Ok(Conv {
            bias: w.get(&format!("{name}.bias"))?,
            weight,
            pad: if stride == 1 { k / 2 } else { 0 },
            stride,
        })
    }
    fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv2d(&self.weight, self.pad, self.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, self.bias.dim(0)?, 1, 1))?)
    }
}

struct Norm(candle_nn::GroupNorm);

impl Norm {
    fn new(w: &Weights, name: &str) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"))?;
        let c = weight.dim(0)?;
        if c % GROUPS != 0 {
            return Err(Error::Usage(format!(
                "the VQGAN's `{name}` has {c} channels, not a multiple of GroupNorm's {GROUPS} groups"
            )));
        }
        Ok(Norm(candle_nn::GroupNorm::new(
            weight,
            w.get(&format!("{name}.bias"))?,
            c,
            GROUPS,
            GN_EPS,
        )?))
    }
}

fn swish(x: &Tensor) -> candle_core::Result<Tensor> {
    x * candle_nn::ops::sigmoid(x)?
}

struct Resnet {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(w: &Weights, p: &str) -> Result<Self> {
        let shortcut = match w.has(&format!("{p}.nin_shortcut.weight")) {
            true => Some(Conv::new(w, &format!("{p}.nin_shortcut"), 1)?),
            false => None,
        };
        Ok(Resnet {
            norm1: Norm::new(w, &format!("{p}.norm1"))?,
            conv1: Conv::new(w, &format!("{p}.conv1"), 1)?,
            norm2: Norm::new(w, &format!("{p}.norm2"))?,
            conv2: Conv::new(w, &format!("{p}.conv2"), 1)?,
            shortcut,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&swish(&self.norm1.0.forward(x)?)?)?;
        let h = self.conv2.forward(&swish(&self.norm2.0.forward(&h)?)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

struct Attn {
    norm: Norm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj: Conv,
}

impl Attn {
    fn new(w: &Weights, p: &str) -> Result<Self> {
        Ok(Attn {
            norm: Norm::new(w, &format!("{p}.norm"))?,
            q: Conv::new(w, &format!("{p}.q"), 1)?,
            k: Conv::new(w, &format!("{p}.k"), 1)?,
            v: Conv::new(w, &format!("{p}.v"), 1)?,
            proj: Conv::new(w, &format!("{p}.proj_out"), 1)?,
        })
    }
    /// Single-head attention over the h·w positions, scaled by 1/√c.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.0.forward(x)?;
        let flat = |t: Tensor| t.reshape((b, c, h * w));
        let q = flat(self.q.forward(&n)?)?.transpose(1, 2)?.contiguous()?; // (b, hw, c)
        let k = flat(self.k.forward(&n)?)?.contiguous()?; // (b, c, hw)
        let v = flat(self.v.forward(&n)?)?.contiguous()?;
        let a = (q.matmul(&k)? * (c as f64).powf(-0.5))?;
        let a = candle_nn::ops::softmax_last_dim(&a)?; // (b, hw_q, hw_k)
        let y = v.matmul(&a.transpose(1, 2)?.contiguous()?)?; // (b, c, hw_q)
        x + self.proj.forward(&y.reshape((b, c, h, w))?)?
    }
}

/// One resolution of the encoder or decoder: its residual blocks, each followed by attention
/// where the level has it, and the resampling conv (all levels but one).
struct Level {
    blocks: Vec<Resnet>,
    attns: Vec<Attn>,
    resample: Option<Conv>,
}

impl Level {
    fn new(w: &Weights, p: &str, resample: &str, stride: usize) -> Result<Self> {
        // Residual blocks have `norm1`, attention blocks `norm`.
        let count = |what: &str, norm: &str| {
            (0..)
                .take_while(|j| w.has(&format!("{p}.{what}.{j}.{norm}.weight")))
                .count()
        };
        let blocks = (0..count("block", "norm1"))
            .map(|j| Resnet::new(w, &format!("{p}.block.{j}")))
            .collect::<Result<Vec<_>>>()?;
        let attns = (0..count("attn", "norm"))
            .map(|j| Attn::new(w, &format!("{p}.attn.{j}")))
            .collect::<Result<Vec<_>>>()?;
        if blocks.is_empty() || !(attns.is_empty() || attns.len() == blocks.len()) {
            return Err(Error::Usage(format!(
                "the VQGAN's `{p}` has {} residual blocks and {} attention blocks: not taming's \
                 layout",
                blocks.len(),
                attns.len()
            )));
        }
        let resample = match w.has(&format!("{p}.{resample}.conv.weight")) {
            true => Some(Conv::new(w, &format!("{p}.{resample}.conv"), stride)?),
            false => None,
        };
        Ok(Level {
            blocks,
            attns,
            resample,
        })
    }
    fn blocks(&self, mut h: Tensor) -> candle_core::Result<Tensor> {
        for (j, b) in self.blocks.iter().enumerate() {
            h = b.forward(&h)?;
            if let Some(a) = self.attns.get(j) {
                h = a.forward(&h)?;
            }
        }
        Ok(h)
    }
}

/// Middle of either half: residual, attention, residual.
struct Mid(Resnet, Attn, Resnet);

impl Mid {
    fn new(w: &Weights, p: &str) -> Result<Self> {
        Ok(Mid(
            Resnet::new(w, &format!("{p}.mid.block_1"))?,
            Attn::new(w, &format!("{p}.mid.attn_1"))?,
            Resnet::new(w, &format!("{p}.mid.block_2"))?,
        ))
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.2.forward(&self.1.forward(&self.0.forward(x)?)?)
    }
}

fn levels(w: &Weights, p: &str, resample: &str, stride: usize) -> Result<Vec<Level>> {
    let n = (0..)
        .take_while(|i| w.has(&format!("{p}.{i}.block.0.norm1.weight")))
        .count();
    (0..n)
        .map(|i| Level::new(w, &format!("{p}.{i}"), resample, stride))
        .collect()
}

/// The architecture of the VQGAN whose weights these are (the manifest's `vqgan`).
pub fn dims(weights: &BTreeMap<String, Tensor>) -> Result<VqganDims> {
    let w = Weights(weights);
    let dims = |name: &str| -> Result<Vec<usize>> { Ok(w.get(name)?.dims().to_vec()) };
    let levels = (0..)
        .take_while(|i| w.has(&format!("encoder.down.{i}.block.0.norm1.weight")))
        .count();
    if levels == 0 {
        return Err(missing("encoder.down.0.block.0.norm1.weight"));
    }
    let ch = dims("encoder.conv_in.weight")?[0];
    let ch_mult = (0..levels)
        .map(|i| Ok(dims(&format!("encoder.down.{i}.block.0.conv1.weight"))?[0] / ch))
        .collect::<Result<Vec<_>>>()?;
    let num_res_blocks = (0..)
        .take_while(|j| w.has(&format!("encoder.down.0.block.{j}.norm1.weight")))
        .count();
    let attn_levels = (0..levels)
        .filter(|i| w.has(&format!("encoder.down.{i}.attn.0.norm.weight")))
        .collect();
    Ok(VqganDims {
        ch,
        ch_mult,
        num_res_blocks,
        attn_levels,
        z_channels: dims("encoder.conv_out.weight")?[0],
        embed_dim: dims("quantize.embed.weight")?[1],
        channels: dims("encoder.conv_in.weight")?[1],
    })
}

/// The whole VQGAN: encoder to argmax codes, codebook, decoder.
pub struct Vqgan {
    enc_in: Conv,
    down: Vec<Level>,
    enc_mid: Mid,
    enc_norm: Norm,
    enc_out: Conv,
    quant_conv: Conv,
    proj: Conv,
    embed: Tensor,
    post_quant_conv: Conv,
    dec_in: Conv,
    dec_mid: Mid,
    up: Vec<Level>,
    dec_norm: Norm,
    dec_out: Conv,
}

impl Vqgan {
    /// From the checkpoint's `state_dict` tensors (f32 on the device the model runs on).
    pub fn new(weights: &BTreeMap<String, Tensor>) -> Result<Self> {
        let w = Weights(weights);
        let down = levels(&w, "encoder.down", "downsample", 2)?;
        let up = levels(&w, "decoder.up", "upsample", 1)?;
        if down.is_empty() || up.len() != down.len() {
            return Err(Error::Usage(format!(
                "the VQGAN has {} encoder and {} decoder levels: not a ruDALL-E VQGAN",
                down.len(),
                up.len()
            )));
        }
        Ok(Vqgan {
            enc_in: Conv::new(&w, "encoder.conv_in", 1)?,
            down,
            enc_mid: Mid::new(&w, "encoder")?,
            enc_norm: Norm::new(&w, "encoder.norm_out")?,
            enc_out: Conv::new(&w, "encoder.conv_out", 1)?,
            quant_conv: Conv::new(&w, "quant_conv", 1)?,
            proj: Conv::new(&w, "quantize.proj", 1)?,
            embed: w.get("quantize.embed.weight")?,
            post_quant_conv: Conv::new(&w, "post_quant_conv", 1)?,
            dec_in: Conv::new(&w, "decoder.conv_in", 1)?,
            dec_mid: Mid::new(&w, "decoder")?,
            up,
            dec_norm: Norm::new(&w, "decoder.norm_out")?,
            dec_out: Conv::new(&w, "decoder.conv_out", 1)?,
        })
    }

    /// Pixels per token side: 2^(levels − 1).
    pub fn downsample(&self) -> usize {
        1 << (self.down.len() - 1)
    }

    /// Codebook size.
    pub fn codebook(&self) -> usize {
        self.proj.out_channels()
    }

    /// Images `(b, 3, s, s)` in [0, 1] → codes `(b, (s / f)²)`, u32, raster order.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let x = ((images * 2.0)? - 1.0)?;
        let mut h = self.enc_in.forward(&x)?;
        for level in &self.down {
            h = level.blocks(h)?;
            if let Some(conv) = &level.resample {
                // taming pads right and bottom by one before the stride-2 conv.
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let h = self.enc_mid.forward(&h)?;
        let h = self
            .enc_out
            .forward(&swish(&self.enc_norm.0.forward(&h)?)?)?;
        let logits = self.proj.forward(&self.quant_conv.forward(&h)?)?; // (b, codebook, g, g)
        let b = logits.dim(0)?;
        Ok(logits.argmax(1)?.reshape((b, ()))?.to_dtype(DType::U32)?)
    }

    /// Codes `(b, g²)` → images `(b, 3, g·f, g·f)` in [0, 1].
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, n) = codes.dims2()?;
        let g = (n as f64).sqrt().round() as usize;
        if g * g != n {
            return Err(Error::Usage(format!("{n} codes do not make a square grid")));
        }
        let z = self.embed.index_select(&codes.flatten_all()?, 0)?; // (b·n, d)
        let d = z.dim(D::Minus1)?;
        let z = z
            .reshape((b, g, g, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let mut h = self.dec_in.forward(&self.post_quant_conv.forward(&z)?)?;
        h = self.dec_mid.forward(&h)?;
        for level in self.up.iter().rev() {
            h = level.blocks(h)?;
            if let Some(conv) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        let h = self
            .dec_out
            .forward(&swish(&self.dec_norm.0.forward(&h)?)?)?;
        Ok(((h.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?)
    }
}
