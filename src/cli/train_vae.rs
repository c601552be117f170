//! `dalle train-vae`: stage 1, the discrete VAE.

use super::train::RunArgs;
use anyhow::{bail, Result};
use clap::Args;
use dalle::vae::train::{VaeTrainOptions, VaeTrainRequest};
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainVaeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Steps over which τ anneals 1 → 1/16 (default: half the run).
    #[arg(long)]
    pub tau_steps: Option<usize>,
    /// Steps over which β ramps 0 → 6.6 (default: a tenth of the run).
    #[arg(long)]
    pub beta_steps: Option<usize>,
    /// Final KL weight β (paper: 6.6).
    #[arg(long, default_value_t = 6.6)]
    pub beta_max: f64,
    /// Starting gumbel-softmax temperature (paper: 1).
    #[arg(long, default_value_t = 1.0)]
    pub tau_start: f64,
    /// Final gumbel-softmax temperature, the floor τ anneals to (paper: 1/16).
    #[arg(long, default_value_t = 1.0 / 16.0)]
    pub tau_end: f64,
    /// Update at which the β ramp starts (paper: 0): e.g. once reconstructions are good.
    #[arg(long, default_value_t = 0)]
    pub beta_start: usize,
    /// Scale of the dVAE's residual branches (default: dall_e's 1 / n_layers²); stored in the
    /// run's config.json, so export and every runtime use it.
    #[arg(long, allow_negative_numbers = true)]
    pub post_gain: Option<f64>,
    /// Width of the dVAE's first group (default: the preset's), stored in config.json.
    #[arg(long)]
    pub n_hid: Option<usize>,
    /// Residual blocks per dVAE group (default: the preset's), stored in config.json.
    #[arg(long)]
    pub blocks_per_group: Option<usize>,
    /// Side of the training images in pixels (default: the preset's), a multiple of the dVAE's
    /// downsampling; the token grid follows. Stored in config.json; write the data at this size
    /// (`dalle data shapes --image-size N`).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// The encoder: `dall-e` (the paper's) or `patch`, each code from its own f×f pixels alone,
    /// so that a token of empty background does not announce the object beside it (not in the
    /// paper). Stored in config.json.
    #[arg(long, value_enum)]
    pub encoder: Option<EncoderArg>,
    /// Codebook size, the image vocabulary (default: the preset's), stored in config.json; stage 2
    /// takes it from the dVAE.
    #[arg(long)]
    pub codebook: Option<usize>,
    /// Gumbel noise multiplier: 1 is the paper, 0 a noise-free softmax relaxation.
    #[arg(long, default_value_t = 1.0)]
    pub gumbel_scale: f64,
    /// Decode the one-hot argmax with straight-through gradients (not in the paper).
    #[arg(long)]
    pub straight_through: bool,
    /// Start the encoder's output conv as k-means centroids of its initial features (not in the
    /// paper).
    #[arg(long)]
    pub kmeans_init: bool,
    /// Train the decoder alone against the initial (e.g. --kmeans-init) encoder (not in the paper).
    #[arg(long)]
    pub freeze_encoder: bool,
    /// From this update on, freeze the encoder and train the decoder on the argmax codes that
    /// stage 2 and the runtimes decode, instead of relaxed samples (not in the paper).
    #[arg(long)]
    pub decoder_finetune_from: Option<usize>,
    /// Reconstruction likelihood (paper: logit-laplace).
    #[arg(long, value_enum, default_value = "logit-laplace")]
    pub likelihood: dalle::vae::loss::Likelihood,
    /// Extra reconstruction weight on object pixels: those that differ from the image's
    /// border colour, and their rim (0: the paper's unweighted likelihood; not in the paper).
    #[arg(long, default_value_t = 0.0)]
    pub foreground_weight: f64,
    /// Extra reconstruction weight on edge pixels, both sides of every boundary (0: the paper's
    /// unweighted likelihood; not in the paper). The field keeps weight 1.
    #[arg(long, default_value_t = 0.0)]
    pub edge_weight: f64,
    /// Fraction of latent positions, drawn each update, that the decoder sees as hard one-hot
    /// codes with straight-through gradients (0: the paper; 1: --straight-through).
    #[arg(long, default_value_t = 0.0)]
    pub hard_fraction: f64,
    /// Start from a trained dVAE's weights (a `dalle train-vae` run, or the `dalle train` run it
    /// went into) instead of a fresh initialisation; its config.json gives the geometry. With
    /// `--decoder-finetune-from 0` this trains its decoder further on its own argmax codes: the
    /// codes, and so a stage 2 trained on them, stay as they are (not in the paper).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
}

/// `--encoder`'s values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EncoderArg {
    DallE,
    Patch,
}

impl From<EncoderArg> for dalle_runtimes::manifest::DvaeEncoder {
    fn from(a: EncoderArg) -> Self {
        match a {
            EncoderArg::DallE => Self::DallE,
            EncoderArg::Patch => Self::Patch,
        }
    }
}

pub fn run(a: TrainVaeArgs) -> Result<()> {
    let (mut config, device, lr) = a.run.check(a.batch_size)?;
    if let Some(dir) = &a.init_from {
        if a.kmeans_init || a.freeze_encoder {
            bail!(
                "--init-from starts from trained weights; --kmeans-init and --freeze-encoder \
                 start from a fresh encoder: give one or the other"
            );
        }
        let given = [
            ("--post-gain", a.post_gain.is_some()),
            ("--n-hid", a.n_hid.is_some()),
            ("--blocks-per-group", a.blocks_per_group.is_some()),
            ("--codebook", a.codebook.is_some()),
            ("--image-size", a.image_size.is_some()),
            ("--encoder", a.encoder.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            bail!(
                "{flag} changes the dVAE's shape, which --init-from takes from {}: leave it out",
                dir.display()
            );
        }
        config = dalle::vae::train::initial_weights(dir, &device)?.0;
    }
    if a.post_gain.is_some()
        || a.n_hid.is_some()
        || a.blocks_per_group.is_some()
        || a.codebook.is_some()
        || a.image_size.is_some()
        || a.encoder.is_some()
    {
        config.vae.post_gain = a.post_gain.or(config.vae.post_gain);
        config.vae.n_hid = a.n_hid.unwrap_or(config.vae.n_hid);
        config.vae.n_blk_per_group = a.blocks_per_group.unwrap_or(config.vae.n_blk_per_group);
        config.vae.vocab_size = a.codebook.unwrap_or(config.vae.vocab_size);
        config.vae.encoder = a.encoder.map_or(config.vae.encoder, Into::into);
        config.geometry.codebook = config.vae.vocab_size;
        if let Some(size) = a.image_size {
            let f = config.vae.downsample();
            let max = super::data::MAX_SHAPES_SIZE as usize;
            if !(16..=max).contains(&size) || !size.is_multiple_of(f) {
                bail!(
                    "--image-size must be from 16 to {max} pixels and a multiple of {f} (the dVAE \
                     turns {f}×{f} pixels into one token; got {size})"
                );
            }
            config.geometry.image_size = size;
            config.geometry.grid = size / f;
        }
        config.validate()?;
    }
    // Activation memory of one update, a slight underestimate (the `shapes` preset's batch 32
    // measured 2.3 GB peak; this says 1.6 GB), so only what cannot fit is refused.
    // Plus the code logits and their relaxed samples (~6 tensors of codebook × grid² a picture),
    // and the weights with their gradients, Adam moments and EMA (5 copies).
    let g = &config.geometry;
    let per_image = 48 * 4 * (g.image_size as u64).pow(2) * config.vae.n_hid as u64
        + 6 * 4 * (g.codebook as u64) * (g.grid as u64).pow(2);
    let weights = 5 * 4 * (config.vae.encoder_params() + config.vae.decoder_params()) as u64;
    dalle_runtimes::memory::check(
        per_image
            .saturating_mul(a.batch_size as u64)
            .saturating_add(weights),
        &format!("a dVAE update of batch {}", a.batch_size),
        "use a smaller --batch-size (or --codebook, --n-hid)",
    )
    .map_err(|m| anyhow::anyhow!(m))?;
    let mut options = VaeTrainOptions::new(a.run.steps, a.batch_size, a.run.seed);
    if let Some(lr) = lr {
        options.schedule.lr_end = lr * (options.schedule.lr_end / options.schedule.lr_start);
        options.schedule.lr_start = lr;
    }
    options.schedule.tau_steps = a.tau_steps.unwrap_or(options.schedule.tau_steps).max(1);
    options.schedule.beta_steps = a.beta_steps.unwrap_or(options.schedule.beta_steps).max(1);
    for (flag, v) in [
        ("--beta-max", a.beta_max),
        ("--tau-start", a.tau_start),
        ("--tau-end", a.tau_end),
        ("--gumbel-scale", a.gumbel_scale),
        ("--foreground-weight", a.foreground_weight),
        ("--edge-weight", a.edge_weight),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{flag} must be a finite number ≥ 0 (got {v})");
        }
    }
    if a.tau_start == 0.0 || a.tau_end == 0.0 {
        bail!("--tau-start and --tau-end must be above 0 (got 0)");
    }
    options.schedule.beta_max = a.beta_max;
    options.schedule.tau_start = a.tau_start;
    options.schedule.tau_end = a.tau_end;
    options.schedule.beta_start = a.beta_start;
    options.schedule.gumbel_scale = a.gumbel_scale;
    options.schedule.likelihood = a.likelihood;
    options.schedule.straight_through = a.straight_through;
    options.schedule.kmeans_init = a.kmeans_init;
    options.schedule.freeze_encoder = a.freeze_encoder;
    options.schedule.decoder_finetune_from = a.decoder_finetune_from;
    options.schedule.foreground_weight = a.foreground_weight;
    options.schedule.edge_weight = a.edge_weight;
    if !(0.0..=1.0).contains(&a.hard_fraction) {
        bail!(
            "--hard-fraction must be from 0 to 1 (got {})",
            a.hard_fraction
        );
    }
    options.schedule.hard_fraction = a.hard_fraction;
    options.init_from = a.init_from.clone();
    a.run.apply(&mut options.lp);
    let summary = dalle::vae::train::train_vae(VaeTrainRequest {
        config,
        data: a.run.data.clone(),
        out: a.run.out.clone(),
        options,
        resume: a.run.resume,
        stop_at: a.run.stop_at,
        device,
        filters: a.run.filters.build()?,
    })?;
    super::train::report(&summary, &a.run.out);
    Ok(())
}
