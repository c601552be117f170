//! `dalle train`: stage 2, the transformer on captions and dVAE tokens; and what both training
//! commands share.

use super::FilterArgs;
use anyhow::{bail, Result};
use clap::Args;
use dalle::config::Config;
use std::path::PathBuf;

/// What both training commands take.
#[derive(Args)]
pub struct RunArgs {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub steps: usize,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this step (checkpointing), as if interrupted; continue later with --resume.
    #[arg(long)]
    pub stop_at: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Peak learning rate (paper: 1e-4 for the dVAE, 4.5e-4 for the transformer).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 500)]
    pub sample_every: usize,
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    #[command(flatten)]
    pub filters: FilterArgs,
}

impl RunArgs {
    /// The preset, the device and the checked peak learning rate.
    pub fn check(&self, batch_size: usize) -> Result<(Config, candle_core::Device, Option<f64>)> {
        let config = Config::preset(&self.preset)?;
        let device = dalle::util::device(&self.device)?;
        if self.steps == 0 || batch_size == 0 {
            bail!("--steps and --batch-size must be at least 1");
        }
        if let Some(lr) = self.lr {
            if !(lr > 0.0 && lr.is_finite()) {
                bail!("--lr must be a positive number (got {lr})");
            }
        }
        Ok((config, device, self.lr))
    }

    pub fn apply(&self, lp: &mut dalle::train::LoopOptions) {
        lp.checkpoint_every = self.checkpoint_every.max(1);
        lp.sample_every = self.sample_every.max(1);
        lp.log_every = self.log_every.max(1);
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The trained dVAE directory.
    #[arg(long)]
    pub vae: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Probability of the empty caption per sample (for classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// BPE-dropout rate (paper: 0.1); resume is bit-exact only at 0.
    #[arg(long, default_value_t = 0.1)]
    bpe_dropout: f32,
    /// Held-out data (same format as --data): its loss (EMA weights, up to 256 samples) is
    /// measured at every sample step and joins metrics.csv and the curves.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Start from a `dalle train` run's weights (its transformer.safetensors: the EMA) instead of
    /// a fresh initialisation, with a fresh optimiser and learning-rate schedule — to train a
    /// finished run further. Its preset must be this run's, its dVAE encoder --vae's, and its
    /// tokenizer is reused.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Transformer depth instead of the preset's (pass it again with --resume). With
    /// --init-from a shallower run grows: its layers keep their attention kind and order, and
    /// each new layer starts as the identity (zero output projections).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Side of the last layer's convolutional attention window instead of the preset's (odd;
    /// pass it again with --resume). 2 × grid + 1 or more reads every earlier image position:
    /// dense causal attention. With --init-from the weights carry over unchanged (only which
    /// keys the layer reads differs).
    #[arg(long)]
    pub conv_kernel: Option<usize>,
    /// Weight of a hard-negative term beside the paper's loss: each sample whose metadata line
    /// lists negatives (`dalle data shapes --negatives`: two objects' attributes, places or
    /// shapes swapped) adds log(1 + e^−margin), margin = how many nats likelier its caption makes its
    /// code than a negative's at the first position where the two differ (after the same
    /// prefix: where the image commits to which object goes there). Teaches which object an
    /// attribute belongs to, worth ~1 nat of a 576-code image's loss. 0: the paper's loss alone.
    #[arg(long, default_value_t = 0.0)]
    pub negative_weight: f64,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (mut config, device, lr) = a.run.check(a.batch_size)?;
    if let Some(n) = a.layers {
        if n == 0 {
            bail!("--layers must be at least 1");
        }
        config.transformer.n_layers = n;
    }
    if let Some(k) = a.conv_kernel {
        if k.is_multiple_of(2) {
            bail!("--conv-kernel must be odd: the window is centred on its query (got {k})");
        }
        config.transformer.conv_kernel = k;
    }
    if !(0.0..=1.0).contains(&a.caption_dropout) {
        bail!(
            "--caption-dropout must be in [0, 1] (got {})",
            a.caption_dropout
        );
    }
    if !(a.negative_weight.is_finite() && a.negative_weight >= 0.0) {
        bail!(
            "--negative-weight must be a finite number, 0 or more (got {})",
            a.negative_weight
        );
    }
    use dalle::transformer::train::{
        train_transformer, TransformerTrainOptions, TransformerTrainRequest,
    };
    // Activation memory of one update (saved activations of every layer, attention
    // probabilities, logits and their gradients), so that only what cannot fit is refused.
    let (g, t) = (&config.geometry, &config.transformer);
    let seq = (g.text_len + g.grid * g.grid) as u64;
    let vocab = (g.text_vocab + g.text_len + g.codebook) as u64;
    let per_seq = 4
        * (t.n_layers as u64 * (seq * t.d_model as u64 * 40 + 3 * t.n_heads as u64 * seq * seq)
            + 3 * seq * vocab);
    dalle_runtimes::memory::check(
        per_seq.saturating_mul(a.batch_size as u64),
        &format!("a transformer update of batch {}", a.batch_size),
        "use a smaller --batch-size",
    )
    .map_err(|m| anyhow::anyhow!(m))?;
    let mut options = TransformerTrainOptions::new(a.run.steps, a.batch_size, a.run.seed);
    if let Some(lr) = lr {
        options.lr_end = lr * options.lr_end / options.lr_peak;
        options.lr_peak = lr;
    }
    options.caption_dropout = a.caption_dropout;
    options.bpe_dropout = a.bpe_dropout;
    options.init_from = a.init_from.clone();
    options.negative_weight = a.negative_weight;
    a.run.apply(&mut options.lp);
    let s = train_transformer(TransformerTrainRequest {
        config,
        vae: a.vae,
        data: a.run.data.clone(),
        out: a.run.out.clone(),
        eval_data: a.eval_data.clone(),
        options,
        resume: a.run.resume,
        stop_at: a.run.stop_at,
        device,
        filters: a.run.filters.build()?,
    })?;
    report(&s, &a.run.out);
    Ok(())
}

pub fn report(s: &dalle::train::Summary, out: &std::path::Path) {
    let metrics: Vec<String> = s
        .metrics
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    println!(
        "step {}: {}; {:.2} steps/s; peak RSS {}; checkpoint in {}",
        s.step,
        metrics.join(", "),
        s.steps_per_sec,
        s.peak_rss_bytes.map_or("unknown".into(), |b| format!(
            "{:.0} MiB",
            b as f64 / (1 << 20) as f64
        )),
        out.display()
    );
}
