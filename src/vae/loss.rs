//! The dVAE's evidence lower bound (Ramesh et al. 2021 §2.1, appendix A.3) and its schedules.

use crate::kernels::softmax::{log_softmax, softmax};
use crate::rng::Rng;
use candle_core::{Result, Tensor};

/// Negative log-likelihood of `x` ∈ (0, 1) under the logit-Laplace distribution with location
/// `mu` and log-scale `log_b`, summed over every element:
/// `ln 2b + ln x + ln(1 − x) + |logit x − μ| / b` (the paper's eq. in appendix A.3).
pub fn logit_laplace_nll(x: &Tensor, mu: &Tensor, log_b: &Tensor) -> Result<Tensor> {
    logit_laplace_nll_weighted(x, mu, log_b, None)
}

/// As [`logit_laplace_nll`], each pixel's term multiplied by `weight` (b, 1, H, W) when given.
pub fn logit_laplace_nll_weighted(
    x: &Tensor,
    mu: &Tensor,
    log_b: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let ln_x = x.log()?;
    let ln_1mx = x.affine(-1.0, 1.0)?.log()?;
    let logit = (&ln_x - &ln_1mx)?;
    let dev = (logit - mu)?.abs()?;
    let per =
        ((((log_b + std::f64::consts::LN_2)? + ln_x)? + ln_1mx)? + (dev * log_b.neg()?.exp()?)?)?;
    weighted_sum(&per, weight)
}

fn weighted_sum(per: &Tensor, weight: Option<&Tensor>) -> Result<Tensor> {
    match weight {
        Some(w) => per.broadcast_mul(w)?.sum_all(),
        None => per.sum_all(),
    }
}

/// Per-pixel weights of the reconstruction term that put `extra` more weight on each image's
/// objects: 1 + extra on every pixel within one pixel of one that differs from its image's
/// background by more than [`FOREGROUND_THRESHOLD`] in some channel, 1 elsewhere, scaled to mean 1
/// over the batch (so the balance against the KL term is unchanged). The background is the
/// per-channel median of the image's border pixels. `x`: (b, c, H, W) in [0, 1]; returns
/// (b, 1, H, W) on `x`'s device.
pub fn foreground_weights(x: &Tensor, extra: f64) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let v = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0f32; b * h * w];
    for (img, o) in v.chunks(c * h * w).zip(out.chunks_mut(h * w)) {
        let mut fg = vec![false; h * w];
        for ch in img.chunks(h * w) {
            let mut border: Vec<f32> = (0..w)
                .flat_map(|x| [ch[x], ch[(h - 1) * w + x]])
                .chain((1..h.saturating_sub(1)).flat_map(|y| [ch[y * w], ch[y * w + w - 1]]))
                .collect();
            let mid = border.len() / 2;
            let bg = *border.select_nth_unstable_by(mid, f32::total_cmp).1;
            for (f, &p) in fg.iter_mut().zip(ch) {
                *f |= (p - bg).abs() > FOREGROUND_THRESHOLD;
            }
        }
        for y in 0..h {
            for x in 0..w {
                let near = (y.saturating_sub(1)..(y + 2).min(h))
                    .any(|yy| (x.saturating_sub(1)..(x + 2).min(w)).any(|xx| fg[yy * w + xx]));
                o[y * w + x] = if near { 1.0 + extra as f32 } else { 1.0 };
            }
        }
    }
    let mean = out.iter().map(|&v| v as f64).sum::<f64>() / out.len().max(1) as f64;
    out.iter_mut().for_each(|v| *v = (*v as f64 / mean) as f32);
    Tensor::from_vec(out, (b, 1, h, w), x.device())?.to_dtype(x.dtype())
}

/// Per-pixel weights of the reconstruction term that put `extra` more weight on edges: 1 + extra
/// on every pixel that differs from one of its 8 neighbours by more than
/// [`FOREGROUND_THRESHOLD`] in some channel (both sides of every boundary: a small star's
/// notches, a ring's hole), 1 elsewhere — not rescaled, so the field and the objects' insides keep
/// the weight of the unweighted likelihood. `x`: (b, c, H, W) in [0, 1]; returns (b, 1, H, W).
pub fn edge_weights(x: &Tensor, extra: f64) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let v = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![1f32; b * h * w];
    for (img, o) in v.chunks(c * h * w).zip(out.chunks_mut(h * w)) {
        for y in 0..h {
            for x in 0..w {
                let differs = |yy: usize, xx: usize| {
                    img.chunks(h * w)
                        .any(|ch| (ch[y * w + x] - ch[yy * w + xx]).abs() > FOREGROUND_THRESHOLD)
                };
                let edge = (y.saturating_sub(1)..(y + 2).min(h))
                    .any(|yy| (x.saturating_sub(1)..(x + 2).min(w)).any(|xx| differs(yy, xx)));
                if edge {
                    o[y * w + x] += extra as f32;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, 1, h, w), x.device())?.to_dtype(x.dtype())
}

/// How far (in [0, 1] pixel units, any channel) a pixel must be from the background to count as
/// part of an object in [`foreground_weights`].
pub const FOREGROUND_THRESHOLD: f32 = 1.0 / 16.0;

/// KL(q ‖ uniform) summed over every position, with q = softmax(logits) over `dim`:
/// Σ q ln q + ln K per position.
pub fn kl_to_uniform(logits: &Tensor, dim: usize) -> Result<Tensor> {
    let k = logits.dim(dim)?;
    let positions = logits.elem_count() / k;
    let neg_entropy = if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        let op = crate::kernels::softmax::NegEntropy { dim };
        logits.contiguous()?.apply_op1(op)?.sum_all()?
    } else {
        let logq = log_softmax(logits, dim)?;
        (logq.exp()? * &logq)?.sum_all()?
    };
    neg_entropy + positions as f64 * (k as f64).ln()
}

/// Gumbel-softmax relaxation (Jang et al. 2016; Maddison et al. 2016) over `dim`:
/// softmax((logits + g) / τ) with g ~ Gumbel(0, 1) drawn from `rng`.
pub fn gumbel_softmax(logits: &Tensor, tau: f64, dim: usize, rng: &mut Rng) -> Result<Tensor> {
    gumbel_softmax_scaled(logits, tau, dim, 1.0, rng)
}

/// As [`gumbel_softmax`] with the noise multiplied by `scale` (0: a plain softmax relaxation,
/// no noise; 1: the paper).
pub fn gumbel_softmax_scaled(
    logits: &Tensor,
    tau: f64,
    dim: usize,
    scale: f64,
    rng: &mut Rng,
) -> Result<Tensor> {
    // One draw from `rng` seeds a stream per chunk of noise, so the chunks fill in parallel
    // and the noise is the same on any number of cores (4M values per batch-8 step of the
    // `small` dVAE: ~50 ms on one core).
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let seed = rng.next_u64();
    let mut noise = vec![0f32; logits.elem_count()];
    noise
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut r = Rng::stream(seed, "gumbel-chunk", i as u64);
            chunk
                .iter_mut()
                .for_each(|v| *v = (r.gumbel() * scale) as f32);
        });
    let g = Tensor::from_vec(noise, logits.shape(), logits.device())?.to_dtype(logits.dtype())?;
    softmax(&((logits + g)? / tau)?, dim)
}

/// The one-hot argmax of `x` over `dim`, in `x`'s dtype (no gradient).
pub fn one_hot_argmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let k = x.dim(dim)?;
    let idx = x.argmax_keepdim(dim)?;
    let ids = Tensor::arange(0u32, k as u32, x.device())?;
    let mut shape = vec![1; x.rank()];
    shape[dim] = k;
    idx.broadcast_eq(&ids.reshape(shape)?)?.to_dtype(x.dtype())
}

/// Straight-through estimator over `dim`: the forward value is the one-hot argmax of `soft`, the
/// gradient that of `soft`.
pub fn straight_through(soft: &Tensor, dim: usize) -> Result<Tensor> {
    (one_hot_argmax(soft, dim)? - soft.detach())? + soft
}

/// `soft` (b, K, h, w) with a random `fraction` of its positions replaced by their
/// straight-through one-hot argmax (see [`VaeSchedule::hard_fraction`]); `rng` picks them.
pub fn harden_some(soft: &Tensor, fraction: f64, rng: &mut Rng) -> Result<Tensor> {
    let (b, _, h, w) = soft.dims4()?;
    let pick: Vec<f32> = (0..b * h * w)
        .map(|_| (rng.uniform() < fraction) as u8 as f32)
        .collect();
    let mask = Tensor::from_vec(pick, (b, 1, h, w), soft.device())?.to_dtype(soft.dtype())?;
    let hard = straight_through(soft, 1)?;
    // soft + mask · (hard − soft): the picked positions are hard, the rest unchanged.
    soft + (hard - soft)?.broadcast_mul(&mask)?
}

/// Half-cosine from `start` (step 0) to `end` (step `len` and after).
pub fn cosine(start: f64, end: f64, step: usize, len: usize) -> f64 {
    let t = if len == 0 {
        1.0
    } else {
        (step as f64 / len as f64).min(1.0)
    };
    end + (start - end) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// The stage-1 schedules, scaled to the run length.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeSchedule {
    /// Gumbel-softmax temperature: 1 → 1/16 over `tau_steps` (paper: 150k updates).
    pub tau_start: f64,
    pub tau_end: f64,
    pub tau_steps: usize,
    /// KL weight β: 0 until `beta_start`, then 0 → `beta_max` over `beta_steps` (paper: 6.6 over
    /// the first 5k updates). β weighs the KL summed over latents against the likelihood summed
    /// over pixels, so the per-token weight against a per-pixel loss is β · h·w / (H·W·3).
    pub beta_max: f64,
    pub beta_steps: usize,
    /// Update at which the β ramp begins (paper: 0); older run files lack it and get 0.
    #[serde(default)]
    pub beta_start: usize,
    /// Learning rate: 1e-4 → 1.25e-6 over `lr_steps` (paper: 1.2M updates).
    pub lr_start: f64,
    pub lr_end: f64,
    pub lr_steps: usize,
    /// Multiplier of the gumbel noise (paper: 1). Older run files lack it and get 1.
    #[serde(default = "one")]
    pub gumbel_scale: f64,
    /// Straight-through codes: the decoder sees the one-hot argmax of the relaxed sample and the
    /// gradient flows through the relaxation (Bengio et al. 2013), so training decodes the same
    /// hard tokens as inference. Off in the paper; older run files lack it and get off.
    #[serde(default)]
    pub straight_through: bool,
    /// Start the encoder's output conv as a nearest-centroid quantiser: k-means on the initial
    /// encoder's features of a few hundred training images (as VQ codebooks are often started),
    /// so the codes depend on content from the first step. Not in the paper; older run files lack
    /// it and get false.
    #[serde(default)]
    pub kmeans_init: bool,
    /// Keep the encoder as initialised (with `kmeans_init`: a fixed nearest-centroid quantiser of
    /// random conv features) and train the decoder alone. Not in the paper; older run files lack it
    /// and get false.
    #[serde(default)]
    pub freeze_encoder: bool,
    /// From this update on, the encoder is frozen and the decoder trains on the one-hot argmax
    /// codes — the tokens stage 2 and every runtime decode — instead of relaxed samples, closing
    /// the gap between the relaxation the decoder was trained on and the hard codes it is used
    /// with. Not in the paper; older run files lack it and get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_finetune_from: Option<usize>,
    /// Reconstruction term: the paper's logit-Laplace, or a Gaussian (squared error) on the
    /// mapped pixels for experiments. Older run files lack it and get logit-Laplace.
    #[serde(default)]
    pub likelihood: Likelihood,
    /// Extra weight of the reconstruction term on object pixels (see [`foreground_weights`]):
    /// 0 is the paper's unweighted likelihood. On scenes where a few small objects lie on a
    /// uniform field, the field dominates the unweighted sum and object detail is learnt last.
    /// Older run files lack it and get 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub foreground_weight: f64,
    /// Extra weight of the reconstruction term on edge pixels (see [`edge_weights`]); 0: the
    /// paper. Older run files lack it and get 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub edge_weight: f64,
    /// Fraction of latent positions (drawn afresh each update) whose relaxed sample the decoder
    /// sees as its one-hot argmax, with straight-through gradients; the rest stay relaxed. The
    /// decoder then learns to decode hard codes — what stage 2 and every runtime give it —
    /// while every position still passes the relaxation's gradient to the encoder. 0: the
    /// paper; 1: `straight_through` everywhere. Older run files lack it and get 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hard_fraction: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The reconstruction likelihood of stage 1.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Likelihood {
    /// Ramesh et al. 2021 appendix A.3, with a learned per-pixel scale.
    #[default]
    LogitLaplace,
    /// N(sigmoid(μ), 0.1²) on the mapped pixels; the scale channels are unused.
    Gaussian,
    /// Laplace(sigmoid(μ), 0.1) on the mapped pixels (absolute error: small errors are pushed as
    /// hard as large ones, so thin detail is not averaged away); the scale channels are unused.
    Laplace,
}

/// −ln N(x; sigmoid(μ), σ²) summed over every element, without the constant: Σ (x − σ(μ))² / 2σ².
pub fn gaussian_nll(x: &Tensor, mu: &Tensor, sigma: f64) -> Result<Tensor> {
    gaussian_nll_weighted(x, mu, sigma, None)
}

/// As [`gaussian_nll`], each pixel's term multiplied by `weight` (b, 1, H, W) when given.
pub fn gaussian_nll_weighted(
    x: &Tensor,
    mu: &Tensor,
    sigma: f64,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(mu)?;
    weighted_sum(&(x - p)?.sqr()?, weight)? * (0.5 / (sigma * sigma))
}

/// −ln Laplace(x; sigmoid(μ), b) summed over every element, without the constant:
/// Σ |x − σ(μ)| / b, each term multiplied by `weight` (b, 1, H, W) when given.
pub fn laplace_nll_weighted(
    x: &Tensor,
    mu: &Tensor,
    b: f64,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(mu)?;
    weighted_sum(&(x - p)?.abs()?, weight)? * (1.0 / b)
}

fn one() -> f64 {
    1.0
}

impl VaeSchedule {
    /// The paper's values with the three ramps scaled to a run of `steps` updates: τ anneals over
    /// the first half, β ramps over the first tenth, the learning rate decays over the whole run.
    pub fn scaled(steps: usize) -> Self {
        VaeSchedule {
            tau_start: 1.0,
            tau_end: 1.0 / 16.0,
            tau_steps: (steps / 2).max(1),
            beta_max: 6.6,
            beta_steps: (steps / 10).max(1),
            beta_start: 0,
            lr_start: 1e-4,
            lr_end: 1.25e-6,
            lr_steps: steps.max(1),
            gumbel_scale: 1.0,
            straight_through: false,
            kmeans_init: false,
            freeze_encoder: false,
            decoder_finetune_from: None,
            likelihood: Likelihood::LogitLaplace,
            foreground_weight: 0.0,
            edge_weight: 0.0,
            hard_fraction: 0.0,
        }
    }

    /// Whether update `step` trains the decoder alone on hard codes.
    pub fn decoder_finetune(&self, step: usize) -> bool {
        self.decoder_finetune_from.is_some_and(|s| step >= s)
    }

    pub fn tau(&self, step: usize) -> f64 {
        cosine(self.tau_start, self.tau_end, step, self.tau_steps)
    }

    pub fn beta(&self, step: usize) -> f64 {
        match step.checked_sub(self.beta_start) {
            Some(s) => cosine(0.0, self.beta_max, s, self.beta_steps),
            None => 0.0,
        }
    }

    pub fn lr(&self, step: usize) -> f64 {
        cosine(self.lr_start, self.lr_end, step, self.lr_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Named tolerance for f32 reductions of a handful of terms.
    const F32_TOL: f64 = 1e-5;

    #[test]
    fn laplace_and_gaussian_two_pixels_by_hand() {
        // x = (0.2, 0.7), μ = (0, ln 3): σ(μ) = (0.5, 0.75); errors 0.3 and 0.05.
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.2f32, 0.7], &dev).unwrap();
        let mu = Tensor::new(&[0.0f32, 3f32.ln()], &dev).unwrap();
        let l1 = laplace_nll_weighted(&x, &mu, 0.1, None).unwrap();
        let l1 = l1.to_scalar::<f32>().unwrap() as f64;
        assert!((l1 - 3.5).abs() < F32_TOL, "{l1}"); // (0.3 + 0.05) / 0.1
        let l2 = gaussian_nll(&x, &mu, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((l2 - 4.625).abs() < F32_TOL, "{l2}"); // (0.09 + 0.0025) · 50
    }

    #[test]
    fn logit_laplace_two_pixels_by_hand() {
        // Pixel 1: x = 0.2, μ = 0, b = 1:   ln 2 + ln .2 + ln .8 + |ln .25|       =  0.246860
        // Pixel 2: x = 0.7, μ = 1, b = 0.5: ln 1 + ln .7 + ln .3 + |ln(7/3) − 1|/.5 = −1.255243
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.2f32, 0.7], &dev).unwrap();
        let mu = Tensor::new(&[0.0f32, 1.0], &dev).unwrap();
        let log_b = Tensor::new(&[0.0f32, 0.5f32.ln()], &dev).unwrap();
        let got = logit_laplace_nll(&x, &mu, &log_b)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - (-1.008383)).abs() < F32_TOL, "got {got}");
    }

    #[test]
    fn kl_is_zero_for_uniform_and_ln_k_for_one_hot() {
        let dev = Device::Cpu;
        let flat = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let kl = kl_to_uniform(&flat, 1).unwrap().to_scalar::<f32>().unwrap();
        assert!(kl.abs() < 1e-5, "{kl}");
        let peaked = Tensor::new(&[[100f32, 0., 0., 0.]], &dev).unwrap();
        let kl = kl_to_uniform(&peaked, 1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((kl - 4f64.ln()).abs() < 1e-4, "{kl}");
    }

    #[test]
    fn schedules_at_start_middle_end() {
        let s = VaeSchedule {
            tau_steps: 100,
            beta_steps: 10,
            lr_steps: 1000,
            ..VaeSchedule::scaled(1000)
        };
        assert_eq!(s.tau(0), 1.0);
        assert!((s.tau(50) - (1.0 + 1.0 / 16.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.tau(100), 1.0 / 16.0);
        assert_eq!(s.tau(5000), 1.0 / 16.0);
        assert_eq!(s.beta(0), 0.0);
        assert!((s.beta(5) - 3.3).abs() < 1e-12);
        assert_eq!(s.beta(10), 6.6);
        assert_eq!(s.lr(0), 1e-4);
        assert!((s.lr(500) - (1e-4 + 1.25e-6) / 2.0).abs() < 1e-15);
        assert_eq!(s.lr(1000), 1.25e-6);
        let late = VaeSchedule {
            beta_start: 100,
            ..s
        };
        assert_eq!(late.beta(99), 0.0);
        assert_eq!(late.beta(100), 0.0);
        assert!((late.beta(105) - 3.3).abs() < 1e-12);
        assert_eq!(late.beta(110), 6.6);
    }

    /// One 6×6 grey image with a white pixel at (2, 2).
    fn white_pixel_on_grey() -> Tensor {
        let mut v = vec![0.5f32; 3 * 36];
        for ch in 0..3 {
            v[ch * 36 + 2 * 6 + 2] = 1.0;
        }
        Tensor::from_vec(v, (1, 3, 6, 6), &Device::Cpu).unwrap()
    }

    #[test]
    fn foreground_weights_mark_objects_and_their_rim() {
        // It and its 8 neighbours are foreground.
        let x = white_pixel_on_grey();
        let w = foreground_weights(&x, 9.0).unwrap();
        assert_eq!(w.dims(), &[1, 1, 6, 6]);
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = (9.0 * 10.0 + 27.0) / 36.0;
        for y in 0..6 {
            for x in 0..6 {
                let near = (1..=3).contains(&y) && (1..=3).contains(&x);
                let want = if near { 10.0 } else { 1.0 } / mean;
                assert!((w[y * 6 + x] as f64 - want).abs() < F32_TOL, "({y}, {x})");
            }
        }
        // Weight 0 is the unweighted sum.
        let w0 = foreground_weights(&x, 0.0).unwrap();
        assert_eq!(w0.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
    }

    #[test]
    fn edge_weights_mark_both_sides_of_every_boundary() {
        // It and its 8 neighbours are edges.
        let x = white_pixel_on_grey();
        let w = edge_weights(&x, 4.0).unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for y in 0..6 {
            for x in 0..6 {
                let near = (1..=3).contains(&y) && (1..=3).contains(&x);
                assert_eq!(w[y * 6 + x], if near { 5.0 } else { 1.0 }, "({y}, {x})");
            }
        }
    }

    #[test]
    fn harden_some_makes_the_chosen_fraction_one_hot() {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 1.0, (4, 8, 16, 16), &dev).unwrap();
        let soft = softmax(&logits, 1).unwrap();
        let count_hard = |t: &Tensor| {
            let max = t.max_keepdim(1).unwrap().flatten_all().unwrap();
            let v = max.to_vec1::<f32>().unwrap();
            v.iter().filter(|&&m| (m - 1.0).abs() < 1e-6).count()
        };
        assert_eq!(
            count_hard(&harden_some(&soft, 0.0, &mut Rng::new(1)).unwrap()),
            0
        );
        assert_eq!(
            count_hard(&harden_some(&soft, 1.0, &mut Rng::new(1)).unwrap()),
            1024
        );
        let half = count_hard(&harden_some(&soft, 0.5, &mut Rng::new(1)).unwrap());
        assert!((412..612).contains(&half), "{half} of 1024");
    }

    #[test]
    fn gumbel_softmax_is_a_distribution_that_sharpens_with_tau() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[[1f32]], [[2.]], [[0.5]]]], &dev).unwrap(); // (1, 3, 1, 1)
        let soft = gumbel_softmax(&logits, 1.0, 1, &mut Rng::new(3)).unwrap();
        let sum = soft.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((sum - 1.0).abs() < 1e-6);
        let hard = gumbel_softmax(&logits, 1.0 / 16.0, 1, &mut Rng::new(3)).unwrap();
        let max_soft = soft.max_all().unwrap().to_scalar::<f32>().unwrap();
        let max_hard = hard.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max_hard > max_soft);
    }
}
