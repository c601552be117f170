//! `dalle export`: a `dalle train` run (transformer, tokenizer) and its dVAE → a model directory
//! through `dalle-export`, which builds the ONNX graphs from plain arrays.

use crate::config::Config;
use crate::vae::io::read_f32;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use dalle_export::{DvaeSpec, ExportInput, ExportOptions, TransformerSpec, Weight, Weights};
use dalle_runtimes::manifest::SamplingDefaults;
use dalle_runtimes::Manifest;
use std::collections::HashMap;
use std::path::Path;

/// Candle tensors → the exporter's plain f32 arrays.
pub fn to_weights(tensors: &HashMap<String, Tensor>) -> Result<Weights> {
    tensors
        .iter()
        .map(|(name, t)| {
            let data = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok((
                name.clone(),
                Weight {
                    dims: t.dims().to_vec(),
                    data,
                },
            ))
        })
        .collect()
}

pub fn dvae_spec(c: &Config) -> DvaeSpec {
    let v = &c.vae;
    DvaeSpec {
        group_count: v.group_count,
        n_hid: v.n_hid,
        n_blk_per_group: v.n_blk_per_group,
        vocab_size: v.vocab_size,
        n_init: v.n_init,
        channels: v.channels,
        post_gain: v.post_gain(),
        encoder: v.encoder,
    }
}

pub fn transformer_spec(c: &Config) -> TransformerSpec {
    let t = &c.transformer;
    TransformerSpec {
        d_model: t.d_model,
        n_layers: t.n_layers,
        n_heads: t.n_heads,
        conv_kernel: t.conv_kernel,
        norms: t.norms,
    }
}

fn load_config(dir: &Path, what: &str) -> Result<Config> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(Error::checkpoint(
            dir,
            format!("is not a {what} directory (no config.json)"),
        ));
    }
    Config::load(&path)
}

/// Read a transformer run directory and a dVAE directory (by default the run's `vae/` copy).
pub fn load_input(transformer: &Path, vae: Option<&Path>) -> Result<ExportInput> {
    let device = Device::Cpu;
    if !transformer.join("transformer.safetensors").exists()
        && transformer.join("encoder.safetensors").exists()
    {
        return Err(Error::checkpoint(
            transformer,
            "is a `dalle train-vae` run (a dVAE alone), not a transformer run: train the \
             transformer on it with `dalle train --vae DIR`, then export that run",
        ));
    }
    let tcfg = load_config(transformer, "`dalle train` run")?;
    let vae_dir = vae
        .map(Path::to_path_buf)
        .unwrap_or_else(|| transformer.join("vae"));
    let vcfg = load_config(&vae_dir, "dVAE")?;
    let tpath = transformer.join("transformer.safetensors");
    let epath = vae_dir.join("encoder.safetensors");
    let dpath = vae_dir.join("decoder.safetensors");
    Ok(ExportInput {
        preset: tcfg.preset.clone(),
        dvae_geometry: vcfg.geometry,
        transformer_geometry: tcfg.geometry,
        codec: dalle_export::ImageCodec::Dvae(dvae_spec(&vcfg)),
        encoder: to_weights(&read_f32(&epath, &device)?)?,
        encoder_source: epath.display().to_string(),
        decoder: to_weights(&read_f32(&dpath, &device)?)?,
        decoder_source: dpath.display().to_string(),
        transformer: transformer_spec(&tcfg),
        transformer_weights: to_weights(&read_f32(&tpath, &device)?)?,
        transformer_source: tpath.display().to_string(),
        tokenizer: transformer.join("tokenizer.json"),
        sampling: SamplingDefaults::default(),
    })
}

/// Export `transformer` (+ `vae`) into `out` with default sampling settings; one progress line
/// per graph goes to `progress`.
pub fn export(
    transformer: &Path,
    vae: Option<&Path>,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest> {
    let input = load_input(transformer, vae)?;
    Ok(dalle_export::export(&input, out, opts, progress)?)
}

/// Read an exported model directory back — weights from its graphs' initialisers, sizes and
/// sampling defaults from its manifest, of any schema version — so it can be exported again by
/// this version (`dalle export --from-model`): the way to upgrade a directory whose training run
/// is gone, e.g. the bundled model.
pub fn load_model_dir(dir: &Path) -> Result<ExportInput> {
    use dalle_runtimes::{names, AttentionKind, Geometry};
    let path = dir.join(names::MANIFEST);
    let bad = |message: String| Error::Input {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() {
            Error::input(
                dir,
                "is not a model directory (no manifest.json): --from-model takes a directory \
                 written by `dalle export`; a `dalle train` run is exported with --transformer",
            )
        } else {
            Error::io(&path, e)
        }
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("is not a model manifest ({e})")))?;
    fn field<T: serde::de::DeserializeOwned>(
        v: &serde_json::Value,
        key: &str,
    ) -> std::result::Result<T, String> {
        let x = v.get(key).ok_or_else(|| format!("lacks `{key}`"))?;
        serde_json::from_value(x.clone()).map_err(|e| format!("`{key}`: {e}"))
    }
    let geometry: Geometry = field(&v, "geometry").map_err(&bad)?;
    let t: dalle_runtimes::manifest::TransformerDims = field(&v, "transformer").map_err(&bad)?;
    // The image tokenizer: `dvae`, or `vqgan` for an imported ruDALL-E (absent = None).
    let optional = |key: &str| v.get(key).is_some();
    let dvae: Option<dalle_runtimes::manifest::DvaeDims> = optional("dvae")
        .then(|| field(&v, "dvae"))
        .transpose()
        .map_err(&bad)?;
    let vqgan: Option<dalle_runtimes::manifest::VqganDims> = optional("vqgan")
        .then(|| field(&v, "vqgan"))
        .transpose()
        .map_err(&bad)?;
    let layers: Vec<AttentionKind> = field(&v, "layers").map_err(&bad)?;
    let conv_kernel = match layers.last() {
        Some(AttentionKind::Conv { kernel }) => *kernel,
        _ => return Err(bad("its last layer is not convolutional".into())),
    };
    let sampling: SamplingDefaults = field(&v, "sampling").map_err(&bad)?;
    let preset: String = field(&v, "preset").map_err(&bad)?;
    let graph = |file: &str| -> Result<(dalle_export::Weights, String)> {
        let p = dir.join(file);
        Ok((
            dalle_export::read_initializers(&p)?,
            p.display().to_string(),
        ))
    };
    let codec = match (dvae, vqgan) {
        (_, Some(v)) => dalle_export::ImageCodec::Vqgan(v),
        (Some(d), None) => dalle_export::ImageCodec::Dvae(DvaeSpec {
            group_count: d.group_count,
            n_hid: d.n_hid,
            n_blk_per_group: d.n_blk_per_group,
            vocab_size: geometry.codebook,
            n_init: d.n_init,
            channels: d.channels,
            post_gain: d.post_gain.unwrap_or_else(|| {
                crate::config::VaeConfig::dall_e_post_gain(d.group_count, d.n_blk_per_group)
            }),
            encoder: d.encoder,
        }),
        (None, None) => return Err(bad("lacks `dvae` (or `vqgan`)".into())),
    };
    let (encoder, encoder_source) = graph(names::DVAE_ENCODER)?;
    let (decoder, decoder_source) = graph(names::DVAE_DECODER)?;
    let (transformer_weights, transformer_source) = graph(names::TRANSFORMER)?;
    Ok(ExportInput {
        preset,
        dvae_geometry: geometry,
        transformer_geometry: geometry,
        codec,
        encoder,
        encoder_source,
        decoder,
        decoder_source,
        transformer: TransformerSpec {
            d_model: t.d_model,
            n_layers: t.n_layers,
            n_heads: t.n_heads,
            conv_kernel,
            norms: t.norms,
        },
        transformer_weights,
        transformer_source,
        tokenizer: dir.join(names::TOKENIZER),
        sampling,
    })
}
