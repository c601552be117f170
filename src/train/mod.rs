//! The training loop skeleton both stages share: run directory, AdamW, EMA, progress, loss curve,
//! sample images and atomic, resumable checkpoints.
//!
//! Run directory layout:
//! ```text
//! OUT/config.json                    model config (a resume must match it)
//! OUT/train.json                     training options (a resume reuses them)
//! OUT/checkpoints/step-NNNNNNNN/     weights, optimizer moments, EMA, state.json
//! OUT/checkpoints/latest             name of the newest complete checkpoint
//! OUT/metrics.csv, OUT/loss.png      the loss curve
//! OUT/samples/                       sample grids written by the stage
//! ```
//! A checkpoint is written into a `.partial` directory and renamed into place, and `latest` is
//! replaced atomically, so an interrupted write leaves the previous checkpoint intact.
//! All randomness is drawn from `Rng::stream(seed, purpose, step)`, so the state needed to resume
//! bit-exactly is the step count alone.

mod checkpoint;
mod history;
pub mod optim;
mod progress;

pub(crate) use checkpoint::load_into;
use checkpoint::{load_safetensors, save_checkpoint};
pub use checkpoint::{prepare, Start};
use history::History;

use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use optim::{AdamW, AdamWConfig, Ema};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// What every stage's training loop needs besides its own options.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct LoopOptions {
    pub steps: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub checkpoint_every: usize,
    pub sample_every: usize,
    pub log_every: usize,
    /// Checkpoints kept on disk (older ones are deleted).
    pub keep_checkpoints: usize,
    pub adamw: AdamWConfig,
    pub ema_decay: f64,
}

impl LoopOptions {
    /// Checkpoints and samples every 500 updates, a log line every 10, the last two checkpoints
    /// kept, EMA decay 0.999.
    pub fn new(steps: usize, batch_size: usize, seed: u64, adamw: AdamWConfig) -> Self {
        LoopOptions {
            steps,
            seed,
            batch_size,
            checkpoint_every: 500,
            sample_every: 500,
            log_every: 10,
            keep_checkpoints: 2,
            adamw,
            ema_decay: 0.999,
        }
    }
}

/// One stage's model, data and loss, driven by [`run`].
pub trait Stage {
    /// Loss of update `step` (0-based) and named metrics for the progress line and curves.
    fn loss(&mut self, step: usize) -> Result<(Tensor, Vec<(&'static str, f64)>)>;
    /// Learning rate of update `step`.
    fn lr(&self, step: usize) -> f64;
    /// Write the inference files (from EMA weights) into the run directory.
    fn export(&self, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()>;
    /// Write sample images for `step` into `out/samples` and measure the (EMA) weights on data
    /// held out of training: the metrics returned join that step's row of the curves.
    fn sample(
        &self,
        weights: &HashMap<String, Tensor>,
        step: usize,
        out: &Path,
    ) -> Result<Vec<(&'static str, f64)>>;
}

/// Sorted (name, var) pairs of a var map.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Deterministic initialisation: every variable, in name order, gets `init(name, shape, rng)`.
pub fn init_vars(
    varmap: &VarMap,
    seed: u64,
    init: impl Fn(&str, &[usize], &mut crate::rng::Rng) -> Vec<f32>,
) -> Result<()> {
    for (i, (name, var)) in named_vars(varmap).into_iter().enumerate() {
        let mut rng = crate::rng::Rng::stream(seed, "init", i as u64);
        let dims = var.dims().to_vec();
        let values = init(&name, &dims, &mut rng);
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// What a finished (or stopped) run reports.
#[derive(Debug)]
pub struct Summary {
    pub step: usize,
    pub metrics: Vec<(&'static str, f64)>,
    pub steps_per_sec: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Train `stage` until `opts.steps` (or `stop_at`), checkpointing as configured.
pub fn run(
    stage: &mut dyn Stage,
    varmap: &VarMap,
    opts: &LoopOptions,
    out: &Path,
    start: Start,
    stop_at: Option<usize>,
) -> Result<Summary> {
    let vars = named_vars(varmap);
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let mut opt = AdamW::new(vars.clone(), opts.adamw.clone())?;
    let mut ema = Ema::new(&vars, opts.ema_decay)?;
    let mut step = 0;
    if let Start::Resume { step: s, dir } = &start {
        load_into(
            &vars,
            &load_safetensors(&dir.join("weights.safetensors"), &device)?,
            dir,
        )?;
        let ofile = dir.join("optimizer.safetensors");
        opt.load_state(&load_safetensors(&ofile, &device)?)
            .map_err(|m| Error::checkpoint(&ofile, m))?;
        let efile = dir.join("ema.safetensors");
        let shadow = load_safetensors(&efile, &device)?;
        for (name, _) in &vars {
            let t = shadow
                .get(name)
                .ok_or_else(|| Error::checkpoint(&efile, format!("lacks tensor `{name}`")))?;
            ema.shadow.insert(name.clone(), t.clone());
        }
        step = *s;
    }
    let mut history = History::load(&out.join("metrics.csv"), step);
    let end = stop_at.map_or(opts.steps, |s| s.min(opts.steps));
    let mut progress = progress::Progress::new(opts.steps, step, opts.log_every);
    let started = std::time::Instant::now();
    let first = step;
    let mut metrics = vec![];
    while step < end {
        let (loss, m) = stage.loss(step)?;
        let grads = loss.backward()?;
        let lr = stage.lr(step);
        let gnorm = opt.step(&grads, lr, step + 1)?;
        ema.update(&vars, step + 1)?;
        step += 1;
        dalle_runtimes::failpoint::hit("update", step);
        metrics = m;
        metrics.push(("grad_norm", gnorm));
        metrics.push(("lr", lr));
        if !metrics.iter().all(|(_, v)| v.is_finite()) {
            return Err(Error::Usage(format!(
                "training diverged at step {step} ({}); resume from the last checkpoint with a lower learning rate",
                progress::format_metrics(&metrics)
            )));
        }
        let sampled = step % opts.sample_every == 0 || step == end;
        if sampled {
            let held_out = stage.sample(&ema.shadow, step, out)?;
            if !held_out.is_empty() {
                progress.note(&format!(
                    "step {step} (EMA weights, held-out): {}",
                    progress::format_metrics(&held_out)
                ));
            }
            metrics.extend(held_out);
        }
        progress.update(step, &metrics);
        if step % opts.log_every == 0 || sampled {
            history.push(step, &metrics);
        }
        let checkpoint = step % opts.checkpoint_every == 0 || step == end;
        if sampled {
            history.save(out)?;
        }
        if checkpoint {
            save_checkpoint(
                out,
                step,
                opts.seed,
                &vars,
                &opt,
                &ema,
                opts.keep_checkpoints,
            )?;
            stage.export(&ema.shadow, out)?;
            history.save(out)?;
        }
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    Ok(Summary {
        step,
        metrics,
        steps_per_sec: if secs > 0.0 {
            (step - first) as f64 / secs
        } else {
            0.0
        },
        peak_rss_bytes: crate::util::peak_rss_bytes(),
    })
}
