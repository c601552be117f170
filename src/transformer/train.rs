//! Stage-2 training (Ramesh et al. 2021 §2.2, appendix B.2): images are encoded once by the dVAE
//! into a token cache; captions are BPE-encoded per step (with optional BPE dropout and caption
//! dropout for classifier-free guidance); the loss is 1/8 text + 7/8 image cross-entropy.
//!
//! Run directory (besides the shared layout of `crate::train`): `transformer.safetensors` (EMA
//! weights), `tokenizer.json`, and `vae/` (a copy of the dVAE used), so that a checkpoint
//! directory is all `dalle generate --runtime candle` needs.

use super::generate::{generate, Request};
use super::model::{init_value, paper_total, CodeChoice, Transformer};
use crate::config::Config;
use crate::data::filters::Filters;
use crate::data::loader::{EpochOrder, Loader};
use crate::data::Index;
use crate::rng::Rng;
use crate::train::optim::AdamWConfig;
use crate::train::{self, LoopOptions, Stage, Start, Summary};
use crate::vae::io::Vae;
use crate::vae::loss::cosine;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dalle_runtimes::{SamplingParams, TokenLayout};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Everything that fixes a stage-2 run; stored in `train.json` and reused on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformerTrainOptions {
    #[serde(rename = "loop")]
    pub lp: LoopOptions,
    pub lr_peak: f64,
    pub lr_end: f64,
    pub warmup_steps: usize,
    /// Probability of training on the empty caption (enables classifier-free guidance).
    pub caption_dropout: f64,
    /// BPE-dropout rate while training (paper: 0.1). Drawn by `tokenizers` from its own
    /// generator, so a resumed run is bit-identical only at 0.
    pub bpe_dropout: f32,
    /// Each image position's loss over the image codes alone instead of the whole vocabulary
    /// ([`Transformer::losses`]). Older run files lack it and get false.
    #[serde(default)]
    pub image_codes_only: bool,
    /// The `dalle train` run whose weights the run started from instead of a fresh
    /// initialisation (`--init-from`); older run files lack it and get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Weight of the hard-negative term (`--negative-weight`): for each sample that lists
    /// negatives (one drawn per update), log(1 + e^−margin) where margin is how many nats likelier
    /// the caption makes the sample's code than the negative's at the first position where they
    /// differ (the same prefix precedes both: the decision the caption must make). 0 (older
    /// runs): the paper's loss alone.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub negative_weight: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl TransformerTrainOptions {
    /// The paper's optimiser (AdamW 0.9/0.96, weight decay 4.5e-2, gradient-norm clip 4) with a
    /// linear warm-up over the first 5% of the run and a cosine decay to a tenth of the peak.
    pub fn new(steps: usize, batch_size: usize, seed: u64) -> Self {
        TransformerTrainOptions {
            lp: LoopOptions::new(
                steps,
                batch_size,
                seed,
                AdamWConfig {
                    beta1: 0.9,
                    beta2: 0.96,
                    eps: 1e-8,
                    weight_decay: 4.5e-2,
                    grad_clip: Some(4.0),
                },
            ),
            lr_peak: 4.5e-4,
            lr_end: 4.5e-5,
            warmup_steps: (steps / 20).max(1),
            caption_dropout: 0.1,
            bpe_dropout: 0.1,
            image_codes_only: true,
            init_from: None,
            negative_weight: 0.0,
        }
    }

    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            self.lr_peak * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            let len = self.lp.steps.saturating_sub(self.warmup_steps);
            cosine(self.lr_peak, self.lr_end, step - self.warmup_steps, len)
        }
    }
}

/// Captions and their images' dVAE codes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenSet {
    /// FNV-1a of the dVAE weights the codes came from.
    pub dvae: String,
    pub grid: usize,
    pub captions: Vec<String>,
    pub codes: Vec<Vec<u32>>,
    /// Per sample, the codes of its hard negatives (images its caption does not describe;
    /// `dalle data shapes --negatives`); empty unless the run asked for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negatives: Vec<Vec<Vec<u32>>>,
}

fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The image files a sample's metadata line lists as its hard negatives (`negatives`: file
/// names relative to the sample's directory); a malformed list is an error naming the sample.
fn negative_paths(sample: &crate::data::Sample, data: &Path) -> Result<Vec<PathBuf>> {
    let Some(list) = sample.extra.as_ref().and_then(|e| e.get("negatives")) else {
        return Ok(vec![]);
    };
    let crate::data::Source::File(image) = &sample.source else {
        return Ok(vec![]);
    };
    let base = image.parent().unwrap_or(data);
    let names = list.as_array().filter(|a| a.iter().all(|n| n.is_string()));
    let Some(names) = names else {
        return Err(Error::Dataset {
            path: data.to_path_buf(),
            message: format!(
                "the metadata line of {} has `negatives` {list}, not a list of file names",
                image.display()
            ),
        });
    };
    Ok(names
        .iter()
        .filter_map(|n| n.as_str())
        .map(|n| base.join(n))
        .collect())
}

/// Encode every usable image of `data` with the dVAE in `vae_dir` (and, `with_negatives`, the
/// hard negatives each sample lists), or reuse the cache in `vae_dir/token-cache/` when neither
/// the data index nor the dVAE weights changed.
pub fn token_set(
    vae: &Vae,
    vae_dir: &Path,
    data: &Path,
    filters: &Filters,
    with_negatives: bool,
) -> Result<TokenSet> {
    let index = Index::scan(data, filters, false)?;
    let mut weights_hash = FNV_START;
    for f in ["encoder.safetensors", "decoder.safetensors"] {
        let p = vae_dir.join(f);
        weights_hash = fnv(
            std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
            weights_hash,
        );
    }
    let dvae = format!("{weights_hash:016x}");
    let mut data_hash = FNV_START;
    for s in &index.samples {
        data_hash = fnv(
            format!("{:?}\u{0}{}\u{0}", s.source, s.text).into_bytes(),
            data_hash,
        );
        if with_negatives {
            for p in negative_paths(s, data)? {
                data_hash = fnv(format!("-{}\u{0}", p.display()).into_bytes(), data_hash);
            }
        }
    }
    let cache = vae_dir
        .join("token-cache")
        .join(format!("{data_hash:016x}.json"));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(set) = serde_json::from_str::<TokenSet>(&text) {
            if set.dvae == dvae && set.grid == vae.grid() {
                eprintln!("using the token cache {}", cache.display());
                return Ok(set);
            }
            eprintln!(
                "the dVAE changed since {} was written: encoding again",
                cache.display()
            );
        }
    }
    let loader = Loader::new(index, vae.image_size(), filters.max_pixels, 0)?;
    let mut set = TokenSet {
        dvae,
        grid: vae.grid(),
        captions: vec![],
        codes: vec![],
        negatives: vec![],
    };
    let usable = loader.fixed(loader.len());
    eprintln!("encoding {} images with the dVAE", usable.len());
    for chunk in usable.chunks(64) {
        let images: Vec<_> = chunk.iter().map(|(_, img)| img.clone()).collect();
        set.codes.extend(vae.encode(&images)?);
        set.captions.extend(
            chunk
                .iter()
                .map(|(i, _)| loader.index().samples[*i].text.clone()),
        );
    }
    if with_negatives {
        let mut paths = vec![];
        for (i, _) in &usable {
            paths.push(negative_paths(&loader.index().samples[*i], data)?);
        }
        let total: usize = paths.iter().map(Vec::len).sum();
        if total > 0 {
            eprintln!("encoding {total} hard negatives with the dVAE");
        }
        let flat: Vec<&PathBuf> = paths.iter().flatten().collect();
        let mut codes = vec![];
        for chunk in flat.chunks(64) {
            let images = chunk
                .iter()
                .map(|p| crate::data::load_square(p, vae.image_size()))
                .collect::<Result<Vec<_>>>()?;
            codes.extend(vae.encode(&images)?);
        }
        let mut codes = codes.into_iter();
        set.negatives = paths
            .iter()
            .map(|p| codes.by_ref().take(p.len()).collect())
            .collect();
    }
    let json = serde_json::to_string(&set).map_err(|e| Error::Usage(e.to_string()))?;
    let written = std::fs::create_dir_all(cache.parent().unwrap_or(vae_dir))
        .map_err(|e| Error::io(&cache, e))
        .and_then(|_| crate::fsutil::write_bytes_atomic(&cache, json.as_bytes()));
    if let Err(e) = written {
        eprintln!("warning: cannot write the token cache ({e}); continuing without it");
    }
    Ok(set)
}

/// Share of all training codes above which a code counts as background ([`common_codes`]),
/// and the least multiple of the uniform share (1 / codebook) it must also exceed.
const COMMON_CODE_SHARE: f64 = 0.05;
const COMMON_CODE_OVER_UNIFORM: f64 = 8.0;

/// Which codes are background: each more than [`COMMON_CODE_SHARE`] of the training images'
/// codes and more than [`COMMON_CODE_OVER_UNIFORM`] times a uniform code's share (on the shapes
/// set, the plain field's two, 58% of all). A hard negative whose first
/// difference from its sample has such a code on either side is not a choice the caption makes
/// there but whether an object starts at this row — its margin would teach positions, not
/// binding (a third of the shapes pairs; with them the term lowered the preference it trains).
fn common_codes(codes: &[Vec<u32>], codebook: usize) -> Vec<bool> {
    let mut counts = vec![0usize; codebook];
    let mut total = 0usize;
    for &c in codes.iter().flatten() {
        if let Some(n) = counts.get_mut(c as usize) {
            *n += 1;
        }
        total += 1;
    }
    let share = COMMON_CODE_SHARE.max(COMMON_CODE_OVER_UNIFORM / codebook.max(1) as f64);
    counts
        .iter()
        .map(|&n| n as f64 > share * total as f64)
        .collect()
}

/// The hard-negative term over a batch's `margins` (how many nats likelier each sample's code is
/// than its negative's at their first difference): the mean of log(1 + e^−margin), small once
/// the caption decides for the sample's code by several nats, and the share already preferred.
fn negative_loss(margins: &Tensor) -> Result<(Tensor, f64)> {
    let x = margins.neg()?;
    // log(1 + eˣ) = max(x, 0) + log(1 + e^−|x|), without overflow.
    let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let m = margins.to_vec1::<f32>()?;
    let preferred = m.iter().filter(|&&v| v > 0.0).count();
    Ok((
        softplus.mean_all()?,
        preferred as f64 / m.len().max(1) as f64,
    ))
}

struct TransformerStage {
    config: Config,
    model: Transformer,
    layout: TokenLayout,
    set: TokenSet,
    tokenizer: Tokenizer,
    train_tokenizer: Tokenizer,
    opts: TransformerTrainOptions,
    device: Device,
    vae: Vae,
    order: EpochOrder,
    /// Codes common enough to be background ([`common_codes`]), never a hard-negative choice.
    common: Vec<bool>,
    /// Held-out captions and codes whose loss is measured at every sample step.
    eval: Option<TokenSet>,
}

/// Held-out samples whose loss is measured at each sample step.
pub const EVAL_SAMPLES: usize = 256;

/// Whole-image margins (nats) within this of zero are ties, not preferences: the same codes in
/// two rows of one batch can score differently in the last bits (row-blocked matrix kernels,
/// which block rows differently on different CPUs), ~1e-6 nats for a 576-code image.
pub const MARGIN_TIE_NATS: f64 = 1e-3;

impl TransformerStage {
    /// Teacher-forced losses (total, text, image) of `model` over the first [`EVAL_SAMPLES`] of
    /// `set`, with full captions and the plain tokenizer: the held-out loss curve.
    fn eval_loss(&self, model: &Transformer, set: &TokenSet) -> Result<[f64; 3]> {
        let n = set.codes.len().min(EVAL_SAMPLES);
        let b = self.opts.lp.batch_size.max(1);
        let mut sums = [0f64; 3];
        let mut start = 0;
        while start < n {
            let rows = b.min(n - start);
            let mut ids = Vec::with_capacity(rows * model.seq_len());
            for k in start..start + rows {
                ids.extend(self.caption_ids(&self.tokenizer, &set.captions[k])?);
                ids.extend(set.codes[k].iter().map(|&c| self.layout.image(c)));
            }
            let ids = Tensor::from_vec(ids, (rows, model.seq_len()), &self.device)?;
            let (total, text, image) = model.losses(&ids, self.opts.image_codes_only)?;
            for (s, t) in sums.iter_mut().zip([total, text, image]) {
                *s += t.to_dtype(DType::F64)?.to_scalar::<f64>()? * rows as f64;
            }
            start += rows;
        }
        Ok(sums.map(|s| s / n.max(1) as f64))
    }

    /// Over the first [`EVAL_SAMPLES`] of `set` that list hard negatives: the share of (sample,
    /// negative) pairs whose sample the caption makes likelier, the mean margin in nats, and the
    /// share whose sample's code the caption prefers at the first position where the two differ
    /// (after the same prefix: where sampling commits to one of them; NaN without any). `None`
    /// when the set lists none.
    fn eval_margins(&self, model: &Transformer, set: &TokenSet) -> Result<Option<[f64; 3]>> {
        let b = self.opts.lp.batch_size.max(1);
        let (mut pairs, mut preferred, mut total) = (0usize, 0usize, 0f64);
        let (mut chosen, mut decisions) = (0usize, 0usize);
        let mut choices: Vec<CodeChoice> = vec![];
        let mut ids: Vec<u32> = vec![];
        // Per group in `ids`: its number of rows (the sample, then its negatives).
        let mut groups: Vec<usize> = vec![];
        let samples = set.negatives.iter().take(set.codes.len().min(EVAL_SAMPLES));
        let with_negatives: Vec<usize> = samples
            .enumerate()
            .filter(|(_, n)| !n.is_empty())
            .map(|(k, _)| k)
            .collect();
        for (at, &k) in with_negatives.iter().enumerate() {
            let caption = self.caption_ids(&self.tokenizer, &set.captions[k])?;
            let row: usize = groups.iter().sum();
            for codes in std::iter::once(&set.codes[k]).chain(&set.negatives[k]) {
                ids.extend(&caption);
                ids.extend(codes.iter().map(|&c| self.layout.image(c)));
            }
            choices.extend(
                set.negatives[k]
                    .iter()
                    .filter_map(|neg| CodeChoice::first_difference(row, &set.codes[k], neg)),
            );
            groups.push(1 + set.negatives[k].len());
            let rows: usize = groups.iter().sum();
            if rows < b && at + 1 < with_negatives.len() {
                continue;
            }
            let batch = Tensor::from_vec(
                std::mem::take(&mut ids),
                (rows, model.seq_len()),
                &self.device,
            )?;
            let (_, image, margins) = model.position_nll_and_margins(
                &batch,
                self.opts.image_codes_only,
                &std::mem::take(&mut choices),
            )?;
            if let Some(m) = margins {
                let m = m.to_vec1::<f32>()?;
                decisions += m.len();
                chosen += m.iter().filter(|&&v| v > 0.0).count();
            }
            let nll = image.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let mut row = 0;
            for g in groups.drain(..) {
                for neg in &nll[row + 1..row + g] {
                    let margin = neg - nll[row];
                    pairs += 1;
                    preferred += (margin > MARGIN_TIE_NATS) as usize;
                    total += margin;
                }
                row += g;
            }
        }
        Ok((pairs > 0).then(|| {
            [
                preferred as f64 / pairs as f64,
                total / pairs as f64,
                match decisions {
                    0 => f64::NAN,
                    d => chosen as f64 / d as f64,
                },
            ]
        }))
    }

    fn caption_ids(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let bpe = crate::text::encode(tokenizer, text)?;
        let (ids, _) = self.layout.caption(&bpe).map_err(|bad| {
            Error::Usage(format!(
                "tokenizer produced id {bad}, outside the text vocabulary {}",
                self.layout.text_vocab
            ))
        })?;
        Ok(ids)
    }
}

impl Stage for TransformerStage {
    fn loss(&mut self, step: usize) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
        let b = self.opts.lp.batch_size;
        let contrast = self.opts.negative_weight > 0.0;
        let mut ids = Vec::with_capacity(b * self.layout.text_len);
        let mut choices = vec![];
        for i in 0..b as u64 {
            let pos = step as u64 * b as u64 + i;
            let k = self.order.at(pos);
            let drop = Rng::stream(self.opts.lp.seed, "caption-dropout", pos).uniform()
                < self.opts.caption_dropout;
            let text = if drop {
                ""
            } else {
                self.set.captions[k].as_str()
            };
            ids.extend(self.caption_ids(&self.train_tokenizer, text)?);
            let codes = &self.set.codes[k];
            ids.extend(codes.iter().map(|&c| self.layout.image(c)));
            let negatives = self.set.negatives.get(k).map_or(&[][..], Vec::as_slice);
            if contrast && !drop && !negatives.is_empty() {
                let j = Rng::stream(self.opts.lp.seed, "negative", pos).below(negatives.len());
                let fair = |c: &CodeChoice| {
                    !self.common[c.code as usize] && !self.common[c.other as usize]
                };
                choices.extend(
                    CodeChoice::first_difference(i as usize, codes, &negatives[j]).filter(fair),
                );
            }
        }
        let ids = Tensor::from_vec(ids, (b, self.model.seq_len()), &self.device)?;
        let (text, image, margins) =
            self.model
                .position_nll_and_margins(&ids, self.opts.image_codes_only, &choices)?;
        let (text, image) = (text.mean_all()?, image.mean_all()?);
        let mut total = paper_total(&text, &image)?;
        let s = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let mut metrics = vec![("text", s(&text)?), ("image", s(&image)?)];
        if let Some(margins) = margins {
            let (loss, preferred) = negative_loss(&margins)?;
            metrics.push(("contrast", s(&loss)?));
            metrics.push(("prefer", preferred));
            total = (total + (loss * self.opts.negative_weight)?)?;
        }
        metrics.insert(0, ("loss", s(&total)?));
        Ok((total, metrics))
    }

    fn lr(&self, step: usize) -> f64 {
        self.opts.lr(step)
    }

    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
        let path = out.join("transformer.safetensors");
        crate::fsutil::write_atomic(&path, |tmp| {
            candle_core::safetensors::save(weights, tmp)
                .map_err(|e| Error::checkpoint(&path, e.to_string()))
        })
    }

    fn sample(
        &self,
        weights: &HashMap<String, Tensor>,
        step: usize,
        out: &Path,
    ) -> Result<Vec<(&'static str, f64)>> {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &self.device);
        let model = Transformer::new(&self.config, vb)?;
        let mut metrics = vec![];
        if let Some(set) = &self.eval {
            let [total, text, image] = self.eval_loss(&model, set)?;
            metrics = vec![
                ("heldout_loss", total),
                ("heldout_text", text),
                ("heldout_image", image),
            ];
            if let Some([prefer, margin, choice]) = self.eval_margins(&model, set)? {
                metrics.push(("heldout_prefer", prefer));
                metrics.push(("heldout_margin", margin));
                metrics.push(("heldout_choice", choice));
            }
        }
        let mut images = vec![];
        for (i, caption) in self.set.captions.iter().take(4).enumerate() {
            let req = Request {
                text: self.caption_ids(&self.tokenizer, caption)?,
                num_images: 4,
                params: SamplingParams {
                    temperature: 1.0,
                    top_k: None,
                    top_p: None,
                },
                seed: i as u64,
                guidance_scale: 1.0,
                rerank: 1,
                prime: vec![],
            };
            images.extend(self.vae.decode(&generate(&model, &req, &self.device)?)?);
        }
        let dir = out.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        crate::plot::save_png(
            &crate::plot::grid(&images, 4),
            &dir.join(format!("sample-{step:08}.png")),
        )?;
        Ok(metrics)
    }
}

/// What `dalle train` was asked to do.
pub struct TransformerTrainRequest {
    pub config: Config,
    pub vae: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    /// Held-out data whose loss joins the curves at every sample step.
    pub eval_data: Option<PathBuf>,
    pub options: TransformerTrainOptions,
    pub resume: bool,
    pub stop_at: Option<usize>,
    pub device: Device,
    pub filters: Filters,
}

/// A finished (or checkpointed) `dalle train` run to start from: its exported EMA weights
/// (`transformer.safetensors`), checked against the model `config` describes and against the
/// dVAE the new run trains on, whose encoder must be the one the run learnt the codes of.
fn initial_weights(
    dir: &Path,
    config: &Config,
    vae_dir: &Path,
    device: &Device,
) -> Result<InitialWeights> {
    let weights = dir.join("transformer.safetensors");
    if !weights.is_file() {
        let what = if dir.join("encoder.safetensors").is_file() {
            "is a `dalle train-vae` run (a dVAE), not a `dalle train` run"
        } else {
            "is not a `dalle train` run (no transformer.safetensors)"
        };
        return Err(Error::checkpoint(dir, what));
    }
    let stored = Config::load(&dir.join("config.json"))?;
    if stored.transformer.n_layers > config.transformer.n_layers {
        return Err(Error::checkpoint(
            dir,
            format!(
                "holds a transformer of {} layers, more than this run's {}: pass --layers {} or more",
                stored.transformer.n_layers,
                config.transformer.n_layers,
                stored.transformer.n_layers
            ),
        ));
    }
    // Depth may grow (`grown_slots`) and the convolutional window change (the same weights);
    // everything else must match.
    let mut same_depth = stored.clone();
    same_depth.transformer.n_layers = config.transformer.n_layers;
    same_depth.transformer.conv_kernel = config.transformer.conv_kernel;
    if &same_depth != config {
        return Err(Error::checkpoint(
            dir,
            format!(
                "holds a transformer of preset `{}` and geometry {}px → {}×{} × {} codes, which \
                 differs from this run's (`{}`, {}px → {}×{} × {} codes): start from a run of \
                 the same preset and dVAE",
                stored.preset,
                stored.geometry.image_size,
                stored.geometry.grid,
                stored.geometry.grid,
                stored.geometry.codebook,
                config.preset,
                config.geometry.image_size,
                config.geometry.grid,
                config.geometry.grid,
                config.geometry.codebook,
            ),
        ));
    }
    let read = |p: PathBuf| std::fs::read(&p).map_err(|e| Error::io(p, e));
    let theirs = read(dir.join("vae").join("encoder.safetensors"))?;
    if theirs != read(vae_dir.join("encoder.safetensors"))? {
        return Err(Error::checkpoint(
            dir,
            format!(
                "was trained on the codes of another dVAE encoder than {}'s: its weights would \
                 read other image tokens; pass that run's dVAE (its vae/ directory) as --vae",
                vae_dir.display()
            ),
        ));
    }
    if !dir.join("tokenizer.json").is_file() {
        return Err(Error::checkpoint(dir, "has no tokenizer.json"));
    }
    let tensors = crate::vae::io::read_f32(&weights, device)?;
    Ok(InitialWeights {
        slots: grown_slots(stored.transformer.n_layers, config.transformer.n_layers),
        tensors,
    })
}

/// The weights a run starts from (`--init-from`) and where each of their layers goes.
struct InitialWeights {
    tensors: HashMap<String, Tensor>,
    /// `slots[i]`: the layer of this run that the source's layer `i` becomes.
    slots: Vec<usize>,
}

/// Where each of a `from`-layer model's layers goes in a `to`-layer model (`to ≥ from`). The
/// attention kind of a layer depends only on its index, except that the last is the
/// convolutional one (`masks::layer_kinds`), so every layer but the last keeps its index and the
/// last stays last: a 4-layer row, column, row, conv stack becomes layers 0, 1, 2 and 7 of 8
/// (row, column, row, row, row, column, row, conv).
fn grown_slots(from: usize, to: usize) -> Vec<usize> {
    (0..from)
        .map(|i| if i + 1 == from { to - 1 } else { i })
        .collect()
}

/// The source weights renamed to their grown layers; every layer without a source keeps its fresh
/// initialisation but with zero output projections (attention's and the MLP's), so that it adds
/// nothing to the residual stream: the grown model computes what the source computed. Any other
/// tensor the source lacks stays missing, for `load_into` to report.
fn grown_weights(
    initial: InitialWeights,
    vars: &[(String, candle_core::Var)],
) -> Result<HashMap<String, Tensor>> {
    let InitialWeights { tensors, slots } = initial;
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let renamed = match name.strip_prefix("layers.").and_then(|r| r.split_once('.')) {
            Some((i, rest)) => match i.parse::<usize>().ok().and_then(|i| slots.get(i)) {
                Some(slot) => format!("layers.{slot}.{rest}"),
                None => name,
            },
            None => name,
        };
        out.insert(renamed, t);
    }
    let new_layer = |name: &str| {
        let layer = name.strip_prefix("layers.").and_then(|r| r.split_once('.'));
        layer
            .and_then(|(i, _)| i.parse::<usize>().ok())
            .is_some_and(|i| !slots.contains(&i))
    };
    for (name, var) in vars {
        if out.contains_key(name) || !new_layer(name) {
            continue;
        }
        // A copy: a variable cannot be set from its own storage.
        let fresh = var.as_tensor().copy()?;
        let output = name.contains(".attn.proj.") || name.contains(".mlp.proj.");
        out.insert(
            name.clone(),
            if output { fresh.zeros_like()? } else { fresh },
        );
    }
    Ok(out)
}

/// Copy the dVAE into the run directory so that the checkpoint is self-contained.
fn copy_vae(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for f in ["config.json", "encoder.safetensors", "decoder.safetensors"] {
        let bytes = std::fs::read(from.join(f)).map_err(|e| Error::io(from.join(f), e))?;
        crate::fsutil::write_bytes_atomic(&to.join(f), &bytes)?;
    }
    Ok(())
}

/// Run (or resume) stage-2 training.
pub fn train_transformer(mut req: TransformerTrainRequest) -> Result<Summary> {
    crate::util::keep_freed_memory();
    // A DALLE_BLAS that cannot be loaded is reported before any work, not at the first product.
    crate::kernels::blas::check()?;
    let vae = Vae::load(&req.vae, &req.device)?;
    // The dVAE defines the image tokens: a run trained with another codebook size (`train-vae
    // --codebook`), or from the same preset with another image side (`--image-size`), gives the
    // transformer its vocabulary and grid; a dVAE of another preset's image side is refused.
    let (g, v) = (&req.config.geometry, &vae.config.geometry);
    let adopt =
        (g.image_size, g.grid) == (v.image_size, v.grid) || vae.config.preset == req.config.preset;
    if adopt && (g.image_size, g.grid, g.codebook) != (v.image_size, v.grid, v.codebook) {
        let v = *v;
        req.config.geometry.image_size = v.image_size;
        req.config.geometry.grid = v.grid;
        req.config.geometry.codebook = v.codebook;
        req.config.vae = vae.config.vae.clone();
        req.config.validate()?;
    }
    let (g, v) = (&req.config.geometry, &vae.config.geometry);
    if (g.image_size, g.grid, g.codebook) != (v.image_size, v.grid, v.codebook) {
        return Err(Error::checkpoint(
            &req.vae,
            format!(
                "is a {}px → {}×{} dVAE with {} codes, but preset `{}` needs {}px → {}×{} with {}",
                v.image_size,
                v.grid,
                v.grid,
                v.codebook,
                req.config.preset,
                g.image_size,
                g.grid,
                g.grid,
                g.codebook
            ),
        ));
    }
    // Both data sets are read before the run directory is written, so a bad one leaves nothing.
    // A resumed run keeps the options it stored (`train::prepare`), its negative weight too.
    let stored = std::fs::read(req.out.join("train.json")).ok();
    let stored = stored.and_then(|b| serde_json::from_slice::<TransformerTrainOptions>(&b).ok());
    let contrast = match (&stored, req.resume) {
        (Some(o), true) => o.negative_weight > 0.0,
        _ => req.options.negative_weight > 0.0,
    };
    let set = token_set(&vae, &req.vae, &req.data, &req.filters, contrast)?;
    let eval = match &req.eval_data {
        // Its negatives, where it lists any, measure every run (`heldout_prefer`).
        Some(dir) => Some(token_set(&vae, &req.vae, dir, &req.filters, true)?),
        None => None,
    };
    if set.codes.is_empty() {
        return Err(Error::Dataset {
            path: req.data.clone(),
            message: "has no usable samples".into(),
        });
    }
    if contrast && set.negatives.iter().all(Vec::is_empty) {
        return Err(Error::Dataset {
            path: req.data.clone(),
            message: "lists no hard negatives (no metadata line has `negatives`), which \
                      --negative-weight trains on: write the set with `dalle data shapes \
                      --negatives`, or leave --negative-weight at 0"
                .into(),
        });
    }
    // So are the weights a fresh run starts from.
    let initial = match (&req.options.init_from, req.resume) {
        (Some(dir), false) => Some(initial_weights(dir, &req.config, &req.vae, &req.device)?),
        _ => None,
    };
    let (opts, start) = train::prepare(&req.out, &req.config, req.options, req.resume)?;
    let tok_path = req.out.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        crate::text::load(&tok_path)?
    } else if let (Some(dir), Some(_)) = (&opts.init_from, &initial) {
        // The caption ids the weights were trained on.
        let t = crate::text::load(&dir.join("tokenizer.json"))?;
        crate::text::save(&t, &tok_path)?;
        t
    } else {
        let t = crate::text::train(&set.captions, g.text_vocab, 2)?;
        crate::text::save(&t, &tok_path)?;
        t
    };
    if crate::text::vocab_size(&tokenizer) > g.text_vocab {
        return Err(Error::input(
            &tok_path,
            format!(
                "has more ids than the preset's text vocabulary {}",
                g.text_vocab
            ),
        ));
    }
    copy_vae(&req.vae, &req.out.join("vae"))?;
    let varmap = VarMap::new();
    let model = Transformer::new(
        &req.config,
        VarBuilder::from_varmap(&varmap, DType::F32, &req.device),
    )?;
    train::init_vars(&varmap, opts.lp.seed, init_value)?;
    if let Start::Resume { step, .. } = &start {
        eprintln!("resuming {} from step {step}", req.out.display());
    } else if let (Some(initial), Some(dir)) = (initial, &opts.init_from) {
        let vars = train::named_vars(&varmap);
        let grown = initial.slots.len() < req.config.transformer.n_layers;
        let slots = initial.slots.clone();
        train::load_into(&vars, &grown_weights(initial, &vars)?, dir)?;
        eprintln!("starting from the weights of {}", dir.display());
        if grown {
            eprintln!(
                "its {} layers are layers {slots:?} of {}; the others start as the identity",
                slots.len(),
                req.config.transformer.n_layers
            );
        }
    }
    let train_tokenizer = crate::text::with_dropout(&tokenizer, opts.bpe_dropout)?;
    let lp = opts.lp.clone();
    let order = EpochOrder::new(set.codes.len(), opts.lp.seed);
    let common = common_codes(&set.codes, g.codebook);
    let mut stage = TransformerStage {
        layout: TokenLayout::from(&req.config.geometry),
        config: req.config,
        model,
        set,
        tokenizer,
        train_tokenizer,
        opts,
        device: req.device,
        vae,
        order,
        common,
        eval,
    };
    train::run(&mut stage, &varmap, &lp, &req.out, start, req.stop_at)
}
