//! Loading and saving dVAE weights: our checkpoint directories and OpenAI's released weights.
//!
//! A dVAE directory holds `config.json`, `encoder.safetensors` and `decoder.safetensors`; each
//! safetensors file has exactly the keys of `dall_e`'s `Encoder` / `Decoder` state dicts.

use super::model::{Decoder, Encoder};
use crate::config::{Config, VaeConfig};
use crate::data::images_to_tensor;
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use std::collections::HashMap;
use std::path::Path;

/// A loaded dVAE ready for encoding and decoding.
pub struct Vae {
    pub config: Config,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub device: Device,
}

/// Read a safetensors file as f32 tensors.
pub fn read_f32(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let raw = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::checkpoint(path, format!("cannot read safetensors ({e})")))?;
    raw.into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect()
}

/// Build an encoder or decoder from `tensors`, requiring exactly the expected keys and shapes.
fn build<M>(
    tensors: HashMap<String, Tensor>,
    path: &Path,
    device: &Device,
    make: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    // Record which keys the architecture asks for, then compare.
    let expected = candle_nn::VarMap::new();
    make(VarBuilder::from_varmap(&expected, DType::F32, &Device::Cpu))
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let expected = expected
        .data()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    for name in names {
        let want = expected[name].dims();
        match tensors.get(name) {
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!("lacks tensor `{name}` (shape {want:?}) that the config requires"),
                ))
            }
            Some(t) if t.dims() != want => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?} but the config requires {want:?}",
                        t.dims()
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.contains_key(*k)) {
        return Err(Error::checkpoint(
            path,
            format!("has tensor `{extra}` that the config does not define"),
        ));
    }
    make(VarBuilder::from_tensors(tensors, DType::F32, device))
        .map_err(|e| Error::checkpoint(path, e.to_string()))
}

impl Vae {
    /// Build from in-memory weights named `encoder.…` and `decoder.…` (a training run's EMA).
    pub fn from_prefixed(
        config: &Config,
        weights: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Vae> {
        let (enc, dec) = split_prefixed(weights);
        let vcfg = config.vae.clone();
        let encoder = build(enc, Path::new("encoder"), device, |vb| {
            Encoder::new(&vcfg, vb)
        })?;
        let decoder = build(dec, Path::new("decoder"), device, |vb| {
            Decoder::new(&vcfg, vb)
        })?;
        Ok(Vae {
            config: config.clone(),
            encoder,
            decoder,
            device: device.clone(),
        })
    }

    /// Load a dVAE directory (ours, or one written by `dalle vae import-openai`).
    pub fn load(dir: &Path, device: &Device) -> Result<Vae> {
        // A `dalle train` run keeps the dVAE it was trained on in its vae/ folder.
        if !dir.join("encoder.safetensors").exists() && dir.join("vae/config.json").exists() {
            return Vae::load(&dir.join("vae"), device);
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            let message = if dir.join("manifest.json").exists() {
                "is an exported model directory (ONNX graphs); this command reads a dVAE's \
                 weights: pass the `dalle train-vae` run (or the `dalle train` run) it was \
                 exported from"
            } else {
                "is not a dVAE directory (no config.json); train one with `dalle train-vae`"
            };
            return Err(Error::checkpoint(dir, message));
        }
        let config = Config::load(&cfg_path)?;
        let vcfg = config.vae.clone();
        let ep = dir.join("encoder.safetensors");
        let dp = dir.join("decoder.safetensors");
        let encoder = build(read_f32(&ep, device)?, &ep, device, |vb| {
            Encoder::new(&vcfg, vb)
        })?;
        let decoder = build(read_f32(&dp, device)?, &dp, device, |vb| {
            Decoder::new(&vcfg, vb)
        })?;
        Ok(Vae {
            config,
            encoder,
            decoder,
            device: device.clone(),
        })
    }

    pub fn image_size(&self) -> u32 {
        self.config.geometry.image_size as u32
    }

    pub fn grid(&self) -> usize {
        self.config.geometry.grid
    }

    /// Square images of the model size → token grids in raster order.
    pub fn encode(&self, images: &[RgbImage]) -> Result<Vec<Vec<u32>>> {
        let x = images_to_tensor(images, &self.device)?;
        Ok(self.encoder.encode(&x)?.to_vec2::<u32>()?)
    }

    /// Token grids → images.
    pub fn decode(&self, tokens: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
        let n = self.grid() * self.grid();
        let vocab = self.config.vae.vocab_size as u32;
        for t in tokens {
            if t.len() != n {
                return Err(Error::Usage(format!(
                    "expected {n} tokens ({0}×{0} grid), got {1}",
                    self.grid(),
                    t.len()
                )));
            }
            if let Some(bad) = t.iter().find(|&&v| v >= vocab) {
                return Err(Error::Usage(format!(
                    "token {bad} is outside the codebook (0..{vocab})"
                )));
            }
        }
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (tokens.len(), n), &self.device)?;
        crate::plot::tensor_to_images(&self.decoder.decode(&ids, self.grid())?)
    }
}

/// Split `encoder.X` / `decoder.X` keys into two maps of `X`.
pub fn split_prefixed(
    weights: &HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let (mut enc, mut dec) = (HashMap::new(), HashMap::new());
    for (k, t) in weights {
        if let Some(n) = k.strip_prefix("encoder.") {
            enc.insert(n.to_string(), t.clone());
        } else if let Some(n) = k.strip_prefix("decoder.") {
            dec.insert(n.to_string(), t.clone());
        }
    }
    (enc, dec)
}

/// Write `config.json`, `encoder.safetensors`, `decoder.safetensors` atomically into `dir`.
pub fn save_dir(
    dir: &Path,
    config: &Config,
    enc: &HashMap<String, Tensor>,
    dec: &HashMap<String, Tensor>,
) -> Result<()> {
    for (name, tensors) in [("encoder.safetensors", enc), ("decoder.safetensors", dec)] {
        let path = dir.join(name);
        write_atomic(&path, |tmp| {
            candle_core::safetensors::save(tensors, tmp)
                .map_err(|e| Error::checkpoint(&path, e.to_string()))
        })?;
    }
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Usage(e.to_string()))?;
    crate::fsutil::write_bytes_atomic(&dir.join("config.json"), text.as_bytes())
}

/// Turn OpenAI's `dall_e` weights (their `encoder.pkl` / `decoder.pkl` state dicts converted to
/// safetensors) into a dVAE directory, checking every tensor against `vae` and `image_size`.
pub fn import_openai(
    encoder: &Path,
    decoder: &Path,
    vae: VaeConfig,
    image_size: usize,
    out: &Path,
) -> Result<Config> {
    let mut config = Config::preset("paper")?;
    config.preset = "openai".into();
    config.geometry.image_size = image_size;
    config.geometry.codebook = vae.vocab_size;
    config.geometry.grid = image_size / vae.downsample().max(1);
    config.vae = vae;
    config.validate()?;
    let device = Device::Cpu;
    let enc = read_f32(encoder, &device)?;
    let dec = read_f32(decoder, &device)?;
    let vcfg = config.vae.clone();
    build(enc.clone(), encoder, &device, |vb| Encoder::new(&vcfg, vb))?;
    build(dec.clone(), decoder, &device, |vb| Decoder::new(&vcfg, vb))?;
    crate::fsutil::ensure_writable_dir(out)?;
    save_dir(out, &config, &enc, &dec)?;
    Ok(config)
}

/// The images of a token file's text: `encode --json`'s `{"tokens": rows}`, `generate
/// --save-tokens`' `{"images": [rows, ...]}`, or a bare list of rows or of ids (one image).
/// `path` only names the file in errors.
pub fn parse_token_file(text: &str, path: &Path) -> Result<Vec<Vec<u32>>> {
    use serde_json::Value;
    let bad = |m: String| Error::input(path, m);
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("is not JSON ({e})")))?;
    let kind = |x: &Value| match x {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let images: Vec<&Value> = match (&v, v.get("images"), v.get("tokens")) {
        (_, Some(Value::Array(xs)), _) => xs.iter().collect(),
        (_, _, Some(t)) => vec![t],
        (Value::Array(_), _, _) => vec![&v],
        (other, _, _) => {
            return Err(bad(format!(
                "expected token ids (a list of rows of integers, or an object with `tokens` or \
                 `images`), found {}",
                kind(other)
            )))
        }
    };
    images
        .into_iter()
        .map(|grid| {
            let mut out = vec![];
            let mut stack = vec![grid];
            // A flat list or a list of rows.
            while let Some(x) = stack.pop() {
                match x {
                    Value::Array(xs) => stack.extend(xs.iter().rev()),
                    Value::Number(n) => {
                        out.push(n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                            || bad(format!("token {n} is not a non-negative integer")),
                        )?)
                    }
                    other => {
                        return Err(bad(format!(
                            "expected token ids (integers), found {}",
                            kind(other)
                        )))
                    }
                }
            }
            Ok(out)
        })
        .collect()
}
