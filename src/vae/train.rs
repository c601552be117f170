//! Stage-1 training: the ELB with a gumbel-softmax relaxation (Ramesh et al. 2021 §2.1, A.2).

use super::io::{read_f32, save_dir, split_prefixed, Vae};
use super::loss::{
    edge_weights, foreground_weights, gaussian_nll_weighted, gumbel_softmax_scaled, harden_some,
    kl_to_uniform, laplace_nll_weighted, logit_laplace_nll_weighted, one_hot_argmax,
    straight_through, Likelihood, VaeSchedule,
};
use super::model::{map_pixels, Decoder, Encoder};
use crate::config::Config;
use crate::data::filters::Filters;
use crate::data::loader::Loader;
use crate::data::{images_to_tensor, Index};
use crate::rng::Rng;
use crate::train::optim::AdamWConfig;
use crate::train::{self, LoopOptions, Stage, Start, Summary};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything that fixes a stage-1 run; stored in `train.json` and reused on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeTrainOptions {
    #[serde(rename = "loop")]
    pub lp: LoopOptions,
    pub schedule: VaeSchedule,
    /// The trained dVAE directory the run started from instead of a fresh initialisation
    /// (`--init-from`); older run files lack it and get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

impl VaeTrainOptions {
    /// The paper's optimiser (AdamW 0.9/0.999/1e-8, weight decay 1e-4, EMA 0.999) with schedules
    /// scaled to `steps`.
    pub fn new(steps: usize, batch_size: usize, seed: u64) -> Self {
        VaeTrainOptions {
            lp: LoopOptions::new(
                steps,
                batch_size,
                seed,
                AdamWConfig {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 1e-4,
                    grad_clip: None,
                },
            ),
            schedule: VaeSchedule::scaled(steps),
            init_from: None,
        }
    }
}

/// A trained dVAE directory's config and weights, named as in a training var map (`encoder.…`,
/// `decoder.…`): what `--init-from` starts a run from. Every tensor the model has must be
/// there with its shape (checked by building the model from them).
pub fn initial_weights(dir: &Path, device: &Device) -> Result<(Config, HashMap<String, Tensor>)> {
    let vae = Vae::load(dir, device)?;
    let dir = match dir.join("encoder.safetensors").exists() {
        true => dir.to_path_buf(),
        false => dir.join("vae"),
    };
    let mut weights = HashMap::new();
    for part in ["encoder", "decoder"] {
        for (name, t) in read_f32(&dir.join(format!("{part}.safetensors")), device)? {
            weights.insert(format!("{part}.{name}"), t);
        }
    }
    Ok((vae.config, weights))
}

/// dall_e's initialisation: kernels ~ N(0, 1/fan_in), biases zero.
pub fn init_value(name: &str, dims: &[usize], rng: &mut Rng) -> Vec<f32> {
    let n: usize = dims.iter().product();
    if name.ends_with(".w") && dims.len() == 4 {
        let std = 1.0 / ((dims[1] * dims[2] * dims[3]) as f64).sqrt();
        (0..n).map(|_| (rng.normal() * std) as f32).collect()
    } else {
        vec![0.0; n]
    }
}

/// Build an encoder and decoder over a fresh var map, deterministically initialised from `seed`.
pub fn new_model(cfg: &Config, seed: u64, device: &Device) -> Result<(VarMap, Encoder, Decoder)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let encoder = Encoder::new(&cfg.vae, vb.pp("encoder"))?;
    let decoder = Decoder::new(&cfg.vae, vb.pp("decoder"))?;
    train::init_vars(&varmap, seed, init_value)?;
    Ok((varmap, encoder, decoder))
}

pub struct VaeStage {
    config: Config,
    encoder: Encoder,
    decoder: Decoder,
    loader: Loader,
    opts: VaeTrainOptions,
    device: Device,
    fixed: Vec<RgbImage>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Stage for VaeStage {
    fn loss(&mut self, step: usize) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
        let b = self.opts.lp.batch_size;
        let x = self.loader.batch_tensor(step, b, &self.device)?; // (b, 3, H, W)
        let (tau, beta) = (self.opts.schedule.tau(step), self.opts.schedule.beta(step));
        let mut logits = self.encoder.forward(&x)?; // (b, vocab, h, w)
        let finetune = self.opts.schedule.decoder_finetune(step);
        if self.opts.schedule.freeze_encoder || finetune {
            logits = logits.detach();
        }
        let z = if finetune {
            one_hot_argmax(&logits, 1)?
        } else {
            let mut rng = Rng::stream(self.opts.lp.seed, "gumbel", step as u64);
            let z =
                gumbel_softmax_scaled(&logits, tau, 1, self.opts.schedule.gumbel_scale, &mut rng)?;
            if self.opts.schedule.straight_through {
                straight_through(&z, 1)?
            } else if self.opts.schedule.hard_fraction > 0.0 {
                let fraction = self.opts.schedule.hard_fraction;
                harden_some(&z, fraction, &mut rng)?
            } else {
                z
            }
        };
        let stats = self.decoder.forward(&z)?; // (b, 6, H, W)
        let c = self.config.vae.channels;
        let mu = stats.narrow(1, 0, c)?;
        let log_b = stats.narrow(1, c, c)?;
        let (fw, ew) = (
            self.opts.schedule.foreground_weight,
            self.opts.schedule.edge_weight,
        );
        let weight = match (fw > 0.0, ew > 0.0) {
            (true, true) => Some((foreground_weights(&x, fw)? * edge_weights(&x, ew)?)?),
            (true, false) => Some(foreground_weights(&x, fw)?),
            (false, true) => Some(edge_weights(&x, ew)?),
            (false, false) => None,
        };
        let (target, w) = (map_pixels(&x)?, weight.as_ref());
        let nll = match self.opts.schedule.likelihood {
            Likelihood::LogitLaplace => logit_laplace_nll_weighted(&target, &mu, &log_b, w)?,
            Likelihood::Gaussian => gaussian_nll_weighted(&target, &mu, 0.1, w)?,
            Likelihood::Laplace => laplace_nll_weighted(&target, &mu, 0.1, w)?,
        };
        let kl = kl_to_uniform(&logits, 1)?;
        let usage = CodeUsage::of(&logits.detach())?;
        // The ELB per image dimension: recon summed over pixels plus β·KL summed over latents.
        let dims = x.elem_count() as f64;
        let loss = ((&nll + (&kl * beta)?)? / dims)?;
        let latents = (logits.elem_count() / self.config.vae.vocab_size) as f64;
        let mse = (Decoder::to_image(&stats.detach())? - &x)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        let metrics = vec![
            ("loss", scalar(&loss)?),
            ("recon", scalar(&nll)? / dims),
            ("kl", scalar(&kl)? / latents),
            ("psnr", crate::util::psnr_db(mse)),
            ("perplexity", usage.perplexity()),
            ("active_codes", usage.active() as f64),
            ("tau", tau),
            ("beta", beta),
        ];
        Ok((loss, metrics))
    }

    fn lr(&self, step: usize) -> f64 {
        self.opts.schedule.lr(step)
    }

    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
        let (enc, dec) = split_prefixed(weights);
        save_dir(out, &self.config, &enc, &dec)
    }

    fn sample(
        &self,
        weights: &HashMap<String, Tensor>,
        step: usize,
        out: &Path,
    ) -> Result<Vec<(&'static str, f64)>> {
        let vae = Vae::from_prefixed(&self.config, weights, &self.device)?;
        if !self.fixed.is_empty() {
            let recon = vae.decode(&vae.encode(&self.fixed)?)?;
            let mut tiles = self.fixed.clone();
            tiles.extend(recon);
            let dir = out.join("samples");
            std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
            crate::plot::save_png(
                &crate::plot::grid(&tiles, self.fixed.len()),
                &dir.join(format!("recon-{step:08}.png")),
            )?;
        }
        Ok(round_trip_diagnostics(&vae, DIAGNOSTIC_SCENES)?.metrics())
    }
}

/// What `dalle train-vae` was asked to do.
pub struct VaeTrainRequest {
    pub config: Config,
    pub data: PathBuf,
    pub out: PathBuf,
    pub options: VaeTrainOptions,
    pub resume: bool,
    pub stop_at: Option<usize>,
    pub device: Device,
    pub filters: Filters,
}

/// Run (or resume) stage-1 training.
pub fn train_vae(req: VaeTrainRequest) -> Result<Summary> {
    crate::util::keep_freed_memory();
    // A DALLE_BLAS that cannot be loaded is reported before any work, not at the first product.
    crate::kernels::blas::check()?;
    // The data set is read before the run directory is written, so a bad one leaves nothing.
    let index = Index::scan(&req.data, &req.filters, false)?;
    if index.skipped() > 0 {
        eprint!("{}", index.report());
    }
    crate::data::loader::require_usable(&index)?;
    // So are the weights a fresh run starts from.
    let initial = match (&req.options.init_from, req.resume) {
        (Some(dir), false) => Some(initial_weights(dir, &req.device)?.1),
        _ => None,
    };
    let (opts, start) = train::prepare(&req.out, &req.config, req.options, req.resume)?;
    let loader = Loader::new(
        index,
        req.config.geometry.image_size as u32,
        req.filters.max_pixels,
        opts.lp.seed,
    )?;
    let fixed: Vec<RgbImage> = loader.fixed(8).into_iter().map(|(_, i)| i).collect();
    let (varmap, encoder, decoder) = new_model(&req.config, opts.lp.seed, &req.device)?;
    if let Start::Resume { step, .. } = &start {
        eprintln!("resuming {} from step {step}", req.out.display());
    } else if let (Some(weights), Some(dir)) = (&initial, &opts.init_from) {
        train::load_into(&train::named_vars(&varmap), weights, dir)?;
        eprintln!("starting from the weights of {}", dir.display());
    } else if opts.schedule.kmeans_init {
        let images: Vec<RgbImage> = loader
            .fixed(KMEANS_IMAGES)
            .into_iter()
            .map(|(_, i)| i)
            .collect();
        kmeans_init(&encoder, &varmap, &images, opts.lp.seed, &req.device)?;
    }
    let lp = opts.lp.clone();
    let mut stage = VaeStage {
        config: req.config,
        encoder,
        decoder,
        loader,
        opts,
        device: req.device,
        fixed,
    };
    train::run(&mut stage, &varmap, &lp, &req.out, start, req.stop_at)
}

/// Mean PSNR (dB) of encode → argmax tokens → decode over up to `count` images of `data`,
/// centre-cropped, in batches of 32.
pub fn psnr(vae: &Vae, data: &Path, count: usize) -> Result<(f64, usize)> {
    let index = Index::scan(data, &Filters::default(), false)?;
    let loader = Loader::new(
        index,
        vae.image_size(),
        crate::data::filters::DEFAULT_MAX_PIXELS,
        0,
    )?;
    let images: Vec<RgbImage> = loader.fixed(count).into_iter().map(|(_, i)| i).collect();
    let mut total = 0.0;
    for chunk in images.chunks(32) {
        let recon = vae.decode(&vae.encode(chunk)?)?;
        let a = images_to_tensor(chunk, &vae.device)?;
        let b = images_to_tensor(&recon, &vae.device)?;
        let mse = (a - b)?.sqr()?.mean((1, 2, 3))?.to_vec1::<f32>()?;
        total += mse
            .iter()
            .map(|m| crate::util::psnr_db(*m as f64))
            .sum::<f64>();
    }
    Ok((total / images.len().max(1) as f64, images.len()))
}

/// Scenes per split of the round-trip diagnostics logged at every sample step.
pub const DIAGNOSTIC_SCENES: usize = 64;

/// Seed of the diagnostics' scenes: neither the training sets' nor `dalle eval`'s.
pub const DIAGNOSTIC_SEED: u64 = 7_331;

/// How the argmax codes of a set of latents use the codebook.
#[derive(Clone, Debug)]
pub struct CodeUsage {
    counts: Vec<usize>,
}

impl CodeUsage {
    /// Histogram of the argmax codes of `logits` (b, vocab, h, w).
    pub fn of(logits: &Tensor) -> Result<CodeUsage> {
        let k = logits.dim(1)?;
        let codes: Vec<u32> = logits.argmax(1)?.flatten_all()?.to_vec1()?;
        Ok(Self::from_codes(k, codes.iter().map(|&c| c as usize)))
    }

    pub fn from_codes(vocab: usize, codes: impl Iterator<Item = usize>) -> CodeUsage {
        let mut counts = vec![0; vocab];
        for c in codes {
            if let Some(n) = counts.get_mut(c) {
                *n += 1;
            }
        }
        CodeUsage { counts }
    }

    /// Codes used at least once.
    pub fn active(&self) -> usize {
        self.counts.iter().filter(|&&n| n > 0).count()
    }

    /// exp(entropy) of the code frequencies: the number of equally used codes with the same
    /// spread (1 when one code is used everywhere, the vocabulary size when all are equal).
    pub fn perplexity(&self) -> f64 {
        let total: usize = self.counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let h: f64 = self
            .counts
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| {
                let p = n as f64 / total as f64;
                -p * p.ln()
            })
            .sum();
        h.exp()
    }
}

/// Stage 1's ceiling on the shapes benchmark, measured during training: the judge of
/// [`crate::eval::judge`] on the argmax round trip (encode → tokens → decode) of fixed scenes.
#[derive(Clone, Debug)]
pub struct RoundTrip {
    /// Held-out scenes' mean PSNR (dB).
    pub psnr: f64,
    /// Fractions over both splits: shape right, everything right.
    pub shape: f64,
    pub correct: f64,
    pub usage: CodeUsage,
    /// Scenes fully correct / scenes, by what they hold: `"small star"` (size and shape) and
    /// `"black"` (colour) count every scene with such an object.
    pub by_kind: std::collections::BTreeMap<String, (usize, usize)>,
    /// The first scenes not fully correct (up to [`FAILURES_KEPT`]), in order.
    pub failures: Vec<Failure>,
}

/// How many failed round trips [`round_trip_diagnostics`] keeps for a look.
pub const FAILURES_KEPT: usize = 32;

/// A scene the round trip got wrong: its caption, the image, its reconstruction, and what the
/// judge saw in the reconstruction.
#[derive(Clone, Debug)]
pub struct Failure {
    pub caption: String,
    pub original: RgbImage,
    pub reconstruction: RgbImage,
    pub detected: Vec<String>,
}

impl RoundTrip {
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("rt_psnr", self.psnr),
            ("rt_shape", self.shape),
            ("rt_correct", self.correct),
            ("rt_codes", self.usage.active() as f64),
            ("rt_perplexity", self.usage.perplexity()),
        ]
    }
}

/// [`RoundTrip`] over `per_split` seen and `per_split` held-out scenes of [`DIAGNOSTIC_SEED`].
pub fn round_trip_diagnostics(vae: &Vae, per_split: usize) -> Result<RoundTrip> {
    use crate::data::shapes::{generate_one, Split};
    use crate::eval::judge::{detect, judge};
    let size = vae.image_size();
    let mut score = crate::eval::Score::default();
    let mut psnr = 0.0;
    let mut codes = vec![];
    let mut by_kind = std::collections::BTreeMap::new();
    let mut failures = vec![];
    for split in [Split::Train, Split::Heldout] {
        let samples: Vec<_> = (0..per_split as u64)
            .map(|i| generate_one(DIAGNOSTIC_SEED, split, i, size))
            .collect();
        let images: Vec<RgbImage> = samples.iter().map(|s| s.image.clone()).collect();
        for (chunk, scenes) in images.chunks(32).zip(samples.chunks(32)) {
            let tokens = vae.encode(chunk)?;
            let back = vae.decode(&tokens)?;
            for ((orig, img), s) in chunk.iter().zip(&back).zip(scenes) {
                let detected = detect(img);
                let verdict = judge(&s.scene, &detected);
                if !verdict.correct && failures.len() < FAILURES_KEPT {
                    failures.push(Failure {
                        caption: s.caption.clone(),
                        original: orig.clone(),
                        reconstruction: img.clone(),
                        detected: detected
                            .iter()
                            .map(|d| format!("{} {} {}", d.size, d.colour, d.shape))
                            .collect(),
                    });
                }
                let mut kinds: Vec<String> = s
                    .scene
                    .objects
                    .iter()
                    .flat_map(|o| [format!("{} {}", o.size, o.shape), o.colour.clone()])
                    .collect();
                kinds.sort();
                kinds.dedup();
                for k in kinds {
                    let e = by_kind.entry(k).or_insert((0, 0));
                    e.0 += verdict.correct as usize;
                    e.1 += 1;
                }
                score.add(&s.scene.kind, &verdict);
                if split == Split::Heldout {
                    psnr += image_psnr(orig, img);
                }
            }
            codes.extend(tokens.into_iter().flatten().map(|c| c as usize));
        }
    }
    let (shape_ok, shape_asked) = score.attributes.get("shape").copied().unwrap_or_default();
    Ok(RoundTrip {
        psnr: psnr / per_split.max(1) as f64,
        shape: shape_ok as f64 / shape_asked.max(1) as f64,
        correct: score.accuracy(),
        usage: CodeUsage::from_codes(vae.config.vae.vocab_size, codes.into_iter()),
        by_kind,
        failures,
    })
}

/// PSNR (dB) of `b` against `a`, pixels in [0, 255].
fn image_psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len().max(1) as f64;
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| ((x as f64 - y as f64) / 255.0).powi(2))
        .sum::<f64>()
        / n;
    crate::util::psnr_db(mse)
}

/// Images whose encoder features seed [`kmeans_init`].
pub const KMEANS_IMAGES: usize = 256;

/// Set the encoder's output conv to `w_k = c_k`, `b_k = −‖c_k‖²/2` for k-means centroids `c_k`
/// of the current encoder's features of `images`, so that the argmax code is the nearest centroid.
/// Seeding is k-means++ (Arthur & Vassilvitskii 2007), then Lloyd iterations.
pub fn kmeans_init(
    encoder: &Encoder,
    varmap: &VarMap,
    images: &[RgbImage],
    seed: u64,
    device: &Device,
) -> Result<()> {
    let mut feats = vec![];
    for chunk in images.chunks(32) {
        let f = encoder.features(&crate::data::images_to_tensor(chunk, device)?)?;
        let (b, d, h, w) = f.dims4()?;
        feats.push(f.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?);
    }
    let x = Tensor::cat(&feats, 0)?.to_device(&Device::Cpu)?; // (n, d)
    let (n, d) = x.dims2()?;
    let rows: Vec<Vec<f32>> = x.to_vec2()?;
    let dist2 =
        |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum() };
    let vars = varmap.data().lock().expect("var map lock").clone();
    let wvar = &vars["encoder.blocks.output.conv.w"];
    let bvar = &vars["encoder.blocks.output.conv.b"];
    let k = wvar.dims()[0];
    // k-means++ seeding.
    let mut rng = Rng::stream(seed, "kmeans", 0);
    let mut centres: Vec<Vec<f32>> = vec![rows[rng.below(n)].clone()];
    let mut best: Vec<f32> = rows.iter().map(|r| dist2(r, &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = best.iter().map(|&v| v as f64).sum();
        let next = if total <= 0.0 {
            rng.below(n)
        } else {
            let mut t = rng.uniform() * total;
            let mut pick = n - 1;
            for (i, &v) in best.iter().enumerate() {
                t -= v as f64;
                if t <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        let c = rows[next].clone();
        for (b, r) in best.iter_mut().zip(&rows) {
            *b = b.min(dist2(r, &c));
        }
        centres.push(c);
    }
    // Lloyd iterations; the assignment step is one matmul.
    for _ in 0..10 {
        let c = Tensor::new(centres.concat(), &Device::Cpu)?.reshape((k, d))?;
        let half_norm = (c.sqr()?.sum(1)? * 0.5)?;
        let score = x.matmul(&c.t()?)?.broadcast_sub(&half_norm)?; // (n, k)
        let assign: Vec<u32> = score.argmax(1)?.to_vec1()?;
        let mut sums = vec![vec![0f64; d]; k];
        let mut counts = vec![0usize; k];
        for (r, &a) in rows.iter().zip(&assign) {
            counts[a as usize] += 1;
            for (s, v) in sums[a as usize].iter_mut().zip(r) {
                *s += *v as f64;
            }
        }
        for ((c, s), &m) in centres.iter_mut().zip(&sums).zip(&counts) {
            if m > 0 {
                *c = s.iter().map(|v| (*v / m as f64) as f32).collect();
            }
        }
    }
    let c = Tensor::new(centres.concat(), &Device::Cpu)?.reshape((k, d))?;
    let bias = (c.sqr()?.sum(1)? * -0.5)?;
    wvar.set(&c.reshape(wvar.dims())?.to_device(device)?)?;
    bvar.set(&bias.to_device(device)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_usage_counts_and_perplexity() {
        let one = CodeUsage::from_codes(8, [3, 3, 3].into_iter());
        assert_eq!(one.active(), 1);
        assert!((one.perplexity() - 1.0).abs() < 1e-12);
        let even = CodeUsage::from_codes(8, [0, 1, 2, 3, 0, 1, 2, 3].into_iter());
        assert_eq!(even.active(), 4);
        assert!((even.perplexity() - 4.0).abs() < 1e-9);
        // Out-of-range codes are not counted; an empty set has perplexity 0.
        assert_eq!(CodeUsage::from_codes(2, [5].into_iter()).perplexity(), 0.0);
    }

    #[test]
    fn code_usage_of_logits_takes_the_argmax_per_position() -> Result<()> {
        // (b=1, vocab=3, h=1, w=2): position 0 → code 2, position 1 → code 0.
        let logits = Tensor::new(&[[[[0f32, 5.]], [[1., 0.]], [[9., 1.]]]], &Device::Cpu)?;
        let u = CodeUsage::of(&logits)?;
        assert_eq!(u.counts, vec![1, 0, 1]);
        Ok(())
    }
}
