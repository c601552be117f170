//! Run directories and checkpoints: a fresh run or a resume checked against its stored config
//! and options, checkpoints written atomically (`.partial`, then renamed; `latest` replaced),
//! and the newest intact one found again after a crash.

use super::optim::{AdamW, Ema};
use crate::config::Config;
use crate::fsutil::{ensure_writable_dir, write_bytes_atomic};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// Set every var from `tensors` (a checkpoint, or the weights a run starts from), each present
/// with its shape, or say which is missing or misshapen in `file`.
pub(crate) fn load_into(
    vars: &[(String, Var)],
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
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

pub(super) fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| Error::checkpoint(path, format!("cannot read safetensors: {e}")))
}

pub(super) fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::checkpoint(path, e.to_string()))
}

pub(super) fn save_checkpoint(
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
}
