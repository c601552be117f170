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

pub mod optim;
mod progress;

use crate::config::Config;
use crate::fsutil::{ensure_writable_dir, write_bytes_atomic};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use optim::{AdamW, AdamWConfig, Ema};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// Where a prepared run starts.
#[derive(Debug)]
pub enum Start {
    Fresh,
    Resume { step: usize, dir: PathBuf },
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, format!("unreadable: {e}")))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    write_bytes_atomic(path, text.as_bytes())
}

/// Validate the run directory against `config` and `resume`, and settle the options: a fresh
/// run stores `options`; a resume returns the stored ones (warning when the command line differs).
pub fn prepare<O>(out: &Path, config: &Config, options: O, resume: bool) -> Result<(O, Start)>
where
    O: Serialize + DeserializeOwned + PartialEq,
{
    ensure_writable_dir(out)?;
    let cfg_path = out.join("config.json");
    let latest = out.join("checkpoints").join("latest");
    if !resume {
        if latest.exists() {
            return Err(Error::checkpoint(
                out,
                "already holds a training run: pass --resume to continue it, or choose another --out",
            ));
        }
        write_json(&cfg_path, config)?;
        write_json(&out.join("train.json"), &options)?;
        return Ok((options, Start::Fresh));
    }
    let stored = Config::load(&cfg_path).map_err(|e| match e {
        Error::Io { .. } => Error::checkpoint(
            out,
            "nothing to resume: no config.json (start without --resume)",
        ),
        e => e,
    })?;
    if &stored != config {
        return Err(Error::checkpoint(
            out,
            format!(
                "was trained with preset `{}` but this run asks for `{}` (configs differ); \
                 resume with --preset {} or choose another --out",
                stored.preset, config.preset, stored.preset
            ),
        ));
    }
    let (step, dir) = newest_intact_checkpoint(out)?;
    let train_json = out.join("train.json");
    let stored_opts: O = read_json(&train_json)?;
    // The stored run length, read once: both the refusal and the notice below need it.
    let stored_v = serde_json::to_value(&stored_opts).unwrap_or_default();
    let stored_steps = stored_v["loop"]["steps"].as_u64().map(|n| n as usize);
    if stored_opts != options {
        let steps = stored_steps.unwrap_or(0);
        let given_v = serde_json::to_value(&options).unwrap_or_default();
        let diffs = differences(&stored_v, &given_v, "").join(", ");
        if step >= steps {
            return Err(Error::checkpoint(
                out,
                format!(
                    "finished all {steps} steps of its run, and this command asks for other \
                     options ({diffs}); a finished run is not extended (its schedules are scaled \
                     to its length): start a new run with another --out"
                ),
            ));
        }
        eprintln!(
            "warning: resuming with the options stored in {}; the command line asked for \
             other values, which are ignored: {diffs}",
            train_json.display()
        );
    }
    if stored_steps.is_some_and(|steps| step >= steps) {
        eprintln!(
            "{}: the run already finished its {step} steps; nothing left to train",
            out.display()
        );
    }
    Ok((stored_opts, Start::Resume { step, dir }))
}

/// The step and directory of the checkpoint to resume from: the one `latest` names, or, when
/// that one is damaged (e.g. the process was killed while the disk lost a write), the newest
/// intact one, with a warning that says which and why.
fn newest_intact_checkpoint(out: &Path) -> Result<(usize, PathBuf)> {
    let root = out.join("checkpoints");
    let latest = std::fs::read_to_string(root.join("latest")).ok();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.reverse();
    // `latest` first, then the others newest first.
    if let Some(l) = latest.as_deref().map(str::trim) {
        names.retain(|n| n != l);
        names.insert(0, l.to_string());
    }
    if names.is_empty() {
        return Err(Error::checkpoint(
            out,
            "nothing to resume: no complete checkpoint yet (start without --resume)",
        ));
    }
    let mut damaged = vec![];
    for name in &names {
        let dir = root.join(name);
        match checkpoint_step(&dir) {
            Ok(step) => {
                if !damaged.is_empty() {
                    eprintln!(
                        "warning: {}; resuming from {name}, the newest intact checkpoint",
                        damaged.join("; ")
                    );
                }
                return Ok((step, dir));
            }
            Err(why) => damaged.push(format!("checkpoint {name} is damaged ({why})")),
        }
    }
    Err(Error::checkpoint(
        out,
        format!(
            "no intact checkpoint to resume from: {}; start a new run with another --out",
            damaged.join("; ")
        ),
    ))
}

/// The step of the checkpoint in `dir`, or why it cannot be resumed from: its state.json and the
/// headers and lengths of its three safetensors files are checked (not the values).
fn checkpoint_step(dir: &Path) -> std::result::Result<usize, String> {
    let state =
        std::fs::read_to_string(dir.join("state.json")).map_err(|e| format!("state.json: {e}"))?;
    let state: serde_json::Value =
        serde_json::from_str(&state).map_err(|e| format!("state.json: {e}"))?;
    let step = state["step"].as_u64().ok_or("state.json lacks `step`")? as usize;
    for file in [
        "weights.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
    ] {
        safetensors_complete(&dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
    }
    Ok(step)
}

/// Whether a safetensors file is whole: its header parses and the file is as long as the header's
/// last tensor says.
fn safetensors_complete(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| "shorter than its header".to_string())?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(format!(
            "header length {n} does not fit the file's {len} bytes"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let end = header
        .as_object()
        .ok_or("header is not an object")?
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if 8 + n + end != len {
        return Err(format!("{len} bytes, the header describes {}", 8 + n + end));
    }
    Ok(())
}

/// `path (stored A, given B)` for every leaf where two JSON values differ.
fn differences(stored: &serde_json::Value, given: &serde_json::Value, path: &str) -> Vec<String> {
    use serde_json::Value;
    match (stored, given) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    differences(
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        &sub,
                    )
                })
                .collect()
        }
        (a, b) if a != b => vec![format!("{path} (stored {a}, given {b})")],
        _ => vec![],
    }
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

fn load_into(vars: &[(String, Var)], tensors: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::checkpoint(file, format!("lacks tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::checkpoint(
                file,
                format!(
                    "tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(t)?;
    }
    Ok(())
}

fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| Error::checkpoint(path, format!("cannot read safetensors: {e}")))
}

fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::checkpoint(path, e.to_string()))
}

/// The loss curve: one row per logged step.
struct History {
    names: Vec<String>,
    steps: Vec<usize>,
    rows: Vec<Vec<f64>>,
}

impl History {
    fn load(path: &Path, upto: usize) -> History {
        let mut h = History {
            names: vec![],
            steps: vec![],
            rows: vec![],
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return h;
        };
        let mut lines = text.lines();
        if let Some(head) = lines.next() {
            h.names = head.split(',').skip(1).map(str::to_string).collect();
        }
        for line in lines {
            let mut cells = line.split(',');
            let Some(Ok(step)) = cells.next().map(str::parse::<usize>) else {
                continue;
            };
            if step > upto {
                break;
            }
            h.steps.push(step);
            h.rows
                .push(cells.map(|c| c.parse().unwrap_or(f64::NAN)).collect());
        }
        h
    }

    /// One row; a metric first seen here gets a new column (earlier rows read NaN there).
    fn push(&mut self, step: usize, metrics: &[(&'static str, f64)]) {
        for (n, _) in metrics {
            if !self.names.iter().any(|m| m == n) {
                self.names.push(n.to_string());
            }
        }
        let row = self
            .names
            .iter()
            .map(|n| {
                metrics
                    .iter()
                    .find(|(m, _)| m == n)
                    .map_or(f64::NAN, |(_, v)| *v)
            })
            .collect();
        self.steps.push(step);
        self.rows.push(row);
    }

    fn save(&self, out: &Path) -> Result<()> {
        let mut csv = format!("step,{}\n", self.names.join(","));
        for (s, r) in self.steps.iter().zip(&self.rows) {
            // Rows written before a column existed read NaN there.
            let cells: Vec<String> = (0..self.names.len())
                .map(|i| format!("{}", r.get(i).copied().unwrap_or(f64::NAN)))
                .collect();
            csv.push_str(&format!("{s},{}\n", cells.join(",")));
        }
        write_bytes_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
        let series: Vec<(&str, Vec<f64>)> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.as_str(),
                    self.rows
                        .iter()
                        .map(|r| r.get(i).copied().unwrap_or(f64::NAN))
                        .collect(),
                )
            })
            .collect();
        crate::plot::loss_plot(&out.join("loss.png"), &self.steps, &series)
    }
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

fn save_checkpoint(
    out: &Path,
    step: usize,
    seed: u64,
    vars: &[(String, Var)],
    opt: &AdamW,
    ema: &Ema,
    keep: usize,
) -> Result<()> {
    let root = out.join("checkpoints");
    let name = format!("step-{step:08}");
    let tmp = root.join(format!(".{name}.partial"));
    let dir = root.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    save_safetensors(&weights, &tmp.join("weights.safetensors"))?;
    dalle_runtimes::failpoint::hit("checkpoint-weights", step);
    save_safetensors(&opt.state(), &tmp.join("optimizer.safetensors"))?;
    save_safetensors(&ema.shadow, &tmp.join("ema.safetensors"))?;
    // Every random draw of update s comes from Rng::stream(seed, purpose, s), so the generator
    // state of a resumed run is (seed, step).
    let state = serde_json::json!({
        "step": step,
        "rng": { "kind": "xoshiro256++ stream per (seed, purpose, step)", "seed": seed, "next_step": step },
    });
    write_json(&tmp.join("state.json"), &state)?;
    dalle_runtimes::failpoint::hit("checkpoint-written", step);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    dalle_runtimes::failpoint::hit("checkpoint-renamed", step);
    write_bytes_atomic(&root.join("latest"), name.as_bytes())?;
    dalle_runtimes::failpoint::hit("checkpoint-latest", step);
    // Keep the newest `keep` checkpoints.
    let mut old: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::io(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    old.sort();
    let excess = old.len().saturating_sub(keep.max(1));
    for p in old.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one() {
        let out = tempfile::tempdir().unwrap();
        let root = out.path().join("checkpoints");
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let tensors = HashMap::from([("w".to_string(), t)]);
        for step in [10usize, 20] {
            let dir = root.join(format!("step-{step:08}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["weights", "optimizer", "ema"] {
                candle_core::safetensors::save(&tensors, dir.join(format!("{f}.safetensors")))
                    .unwrap();
            }
            std::fs::write(dir.join("state.json"), format!("{{\"step\": {step}}}")).unwrap();
        }
        std::fs::write(root.join("latest"), "step-00000020").unwrap();
        assert_eq!(newest_intact_checkpoint(out.path()).unwrap().0, 20);
        // Cut the newest one's optimizer state short: step 10 is used instead.
        let opt = root.join("step-00000020/optimizer.safetensors");
        let bytes = std::fs::read(&opt).unwrap();
        std::fs::write(&opt, &bytes[..bytes.len() - 4]).unwrap();
        let (step, dir) = newest_intact_checkpoint(out.path()).unwrap();
        assert_eq!((step, dir), (10, root.join("step-00000010")));
        // A bad header length, and then nothing intact: one error naming both.
        let w = root.join("step-00000010/weights.safetensors");
        std::fs::write(&w, u64::MAX.to_le_bytes()).unwrap();
        let err = newest_intact_checkpoint(out.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no intact checkpoint") && err.contains("header length"),
            "{err}"
        );
        // `latest` naming a missing checkpoint is no worse.
        std::fs::write(root.join("latest"), "step-00000099").unwrap();
        let err = newest_intact_checkpoint(out.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("step-00000099 is damaged"), "{err}");
    }

    #[test]
    fn history_adds_columns_for_metrics_first_seen_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::load(&dir.path().join("metrics.csv"), 0);
        h.push(1, &[("loss", 2.0)]);
        h.push(2, &[("loss", 1.5), ("heldout_loss", 1.7)]);
        h.push(3, &[("loss", 1.0)]);
        assert_eq!(h.names, ["loss", "heldout_loss"]);
        assert_eq!(h.rows[1], [1.5, 1.7]);
        assert!(h.rows[2][1].is_nan());
        h.save(dir.path()).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert_eq!(csv, "step,loss,heldout_loss\n1,2,NaN\n2,1.5,1.7\n3,1,NaN\n");
        let back = History::load(&dir.path().join("metrics.csv"), 10);
        assert_eq!(back.names, h.names);
        assert_eq!(back.steps, [1, 2, 3]);
        assert_eq!(back.rows[1], [1.5, 1.7]);
        assert!(back.rows[0][1].is_nan());
    }
}
