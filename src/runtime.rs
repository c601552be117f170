//! The candle runtime: the native models rebuilt from a model directory's ONNX initialisers
//! (which carry the candle variable names), serving the same [`Session`] trait as tract and ONNX
//! Runtime, so one `Generator` and one `dalle parity` cover all of them.

use crate::config::{Config, TransformerConfig, VaeConfig};
use crate::transformer::{KvCache as CandleCache, Transformer};
use crate::vae::model::{Decoder, Encoder};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dalle_runtimes::session::{check_decode, check_encode, check_forward};
use dalle_runtimes::{
    names, AttentionKind, Generator, KvCache, Manifest, OpenOptions, RuntimeError, RuntimeKind,
    Session,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const NAME: &str = "candle";

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Run {
        runtime: NAME,
        message: e.to_string(),
    }
}

/// The model config a manifest describes; an error for a model whose image tokenizer is not a
/// dVAE (an imported ruDALL-E's VQGAN), which a [`Config`] cannot describe.
pub fn config_of(m: &Manifest) -> Result<Config, RuntimeError> {
    let dvae = m.dvae.ok_or_else(|| {
        RuntimeError::Request(
            "this model's image tokenizer is a VQGAN (an imported ruDALL-E), not a dVAE this \
             command knows the shape of"
                .into(),
        )
    })?;
    Ok(config_with(m, dvae))
}

/// [`config_of`] with the dVAE's dimensions given (any, where the caller uses only the
/// transformer's part).
fn config_with(m: &Manifest, dvae: dalle_runtimes::manifest::DvaeDims) -> Config {
    let conv_kernel = m
        .layers
        .iter()
        .find_map(|k| match k {
            AttentionKind::Conv { kernel } => Some(*kernel),
            _ => None,
        })
        .unwrap_or(11);
    Config {
        preset: m.preset.clone(),
        geometry: m.geometry,
        vae: VaeConfig {
            group_count: dvae.group_count,
            n_hid: dvae.n_hid,
            n_blk_per_group: dvae.n_blk_per_group,
            vocab_size: m.geometry.codebook,
            n_init: dvae.n_init,
            channels: dvae.channels,
            post_gain: dvae.post_gain,
            encoder: dvae.encoder,
        },
        transformer: TransformerConfig {
            d_model: m.transformer.d_model,
            n_layers: m.transformer.n_layers,
            n_heads: m.transformer.n_heads,
            conv_kernel,
            norms: m.transformer.norms,
        },
    }
}

fn weights(
    dir: &Path,
    file: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>, RuntimeError> {
    let path = dir.join(file);
    let w = dalle_export::read_initializers(&path).map_err(|e| RuntimeError::Load {
        runtime: NAME,
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    if !device.is_cpu() || file != names::TRANSFORMER {
        return w
            .into_iter()
            .map(|(n, w)| Ok((n, Tensor::from_vec(w.data, w.dims, device).map_err(err)?)))
            .collect();
    }
    // The transformer's weights on the CPU: views into one buffer in huge pages, which a
    // decoding step streams through once per token (see `kernels::pages::huge_page_buffer`).
    let total = w.values().map(|w| w.data.len()).sum();
    let (mut all, skip) = crate::kernels::pages::huge_page_buffer::<f32>(total);
    let mut at = Vec::with_capacity(w.len());
    for (name, w) in w {
        at.push((name, all.len(), w.data.len(), w.dims));
        all.extend_from_slice(&w.data);
    }
    let all = Tensor::from_vec(all, skip + total, device).map_err(err)?;
    at.into_iter()
        .map(|(name, start, len, dims)| {
            Ok((
                name,
                all.narrow(0, start, len)
                    .and_then(|t| t.reshape(dims))
                    .map_err(err)?,
            ))
        })
        .collect()
}

/// The manifest a model of `cfg` would be exported with (no files).
pub fn manifest_of(cfg: &Config) -> Manifest {
    let t = &cfg.transformer;
    Manifest {
        schema_version: dalle_runtimes::manifest::SCHEMA_VERSION,
        producer: format!("dalle {}", env!("CARGO_PKG_VERSION")),
        preset: cfg.preset.clone(),
        geometry: cfg.geometry,
        layout: dalle_runtimes::TokenLayout::from(&cfg.geometry).into(),
        transformer: dalle_runtimes::manifest::TransformerDims {
            d_model: t.d_model,
            n_layers: t.n_layers,
            n_heads: t.n_heads,
            head_dim: t.d_model / t.n_heads,
            norms: t.norms,
        },
        vqgan: None,
        dvae: Some(dalle_runtimes::manifest::DvaeDims {
            group_count: cfg.vae.group_count,
            n_hid: cfg.vae.n_hid,
            n_blk_per_group: cfg.vae.n_blk_per_group,
            n_init: cfg.vae.n_init,
            channels: cfg.vae.channels,
            post_gain: cfg.vae.post_gain,
            encoder: cfg.vae.encoder,
        }),
        layers: dalle_runtimes::layer_kinds(t.n_layers, t.conv_kernel),
        io: Default::default(),
        opset: 17,
        dtype: dalle_runtimes::Dtype::F32,
        sampling: Default::default(),
        files: Default::default(),
    }
}

/// What a VQGAN model's [`Config`] carries as its (unused) dVAE part.
const DVAE_UNUSED: dalle_runtimes::manifest::DvaeDims = dalle_runtimes::manifest::DvaeDims {
    group_count: 4,
    n_hid: 256,
    n_blk_per_group: 2,
    n_init: 128,
    channels: 3,
    post_gain: None,
    encoder: dalle_runtimes::manifest::DvaeEncoder::DallE,
};

/// The candle session's KV cache between steps: each layer's (keys, values) buffers of the
/// whole sequence's capacity, written in place step after step.
struct NativeCache(Vec<Option<(Tensor, Tensor)>>);

/// The candle models behind the runtime trait: from a model directory, or from in-memory
/// models (a training run's checkpoint; then the dVAE is optional).
/// The image tokenizer of a candle session.
enum Codec {
    Dvae(Encoder, Decoder),
    Vqgan(Box<crate::vae::vqgan::Vqgan>),
}

pub struct CandleSession {
    manifest: Manifest,
    device: Device,
    vae: Option<Codec>,
    transformer: Transformer,
}

impl CandleSession {
    pub fn open(dir: &Path, manifest: Manifest, device: &Device) -> Result<Self, RuntimeError> {
        // A VQGAN model's config: the transformer reads only the geometry and its own part.
        let cfg = config_with(&manifest, manifest.dvae.unwrap_or(DVAE_UNUSED));
        let vb = |file: &str| -> Result<VarBuilder<'static>, RuntimeError> {
            Ok(VarBuilder::from_tensors(
                weights(dir, file, device)?,
                DType::F32,
                device,
            ))
        };
        let load = |file: &str, e: candle_core::Error| RuntimeError::Load {
            runtime: NAME,
            file: dir.join(file).display().to_string(),
            message: format!("weights do not match the manifest: {e}"),
        };
        let codec = match manifest.vqgan {
            None => Codec::Dvae(
                Encoder::new(&cfg.vae, vb(names::DVAE_ENCODER)?)
                    .map_err(|e| load(names::DVAE_ENCODER, e))?,
                Decoder::new(&cfg.vae, vb(names::DVAE_DECODER)?)
                    .map_err(|e| load(names::DVAE_DECODER, e))?,
            ),
            Some(_) => {
                // Both graphs' weights under the checkpoint's names (the codebook is the
                // decoder's, the quantizer's projection the encoder's).
                let mut all: std::collections::BTreeMap<String, Tensor> =
                    weights(dir, names::DVAE_ENCODER, device)?
                        .into_iter()
                        .collect();
                all.extend(weights(dir, names::DVAE_DECODER, device)?);
                let vq = crate::vae::vqgan::Vqgan::new(&all).map_err(|e| RuntimeError::Load {
                    runtime: NAME,
                    file: dir.join(names::DVAE_DECODER).display().to_string(),
                    message: format!("weights do not match the manifest: {e}"),
                })?;
                Codec::Vqgan(Box::new(vq))
            }
        };
        let mut transformer = Transformer::new(&cfg, vb(names::TRANSFORMER)?)
            .map_err(|e| load(names::TRANSFORMER, e))?;
        // Weights exported in f16 (widened to f32 on loading) are streamed as f16 by decoding
        // steps at batch ≤ 4: the same values, half the bytes of the pass that is the step.
        if manifest.dtype == dalle_runtimes::Dtype::F16 && device.is_cpu() {
            transformer
                .keep_f16_weights()
                .map_err(|e| load(names::TRANSFORMER, e))?;
        }
        Ok(CandleSession {
            manifest,
            device: device.clone(),
            vae: Some(codec),
            transformer,
        })
    }

    /// A session over models already built (e.g. from a `dalle train` run); without a dVAE,
    /// `decode` and `encode` are errors.
    pub fn from_models(
        transformer: Transformer,
        vae: Option<(Encoder, Decoder)>,
        device: &Device,
    ) -> Self {
        CandleSession {
            manifest: manifest_of(transformer.config()),
            device: device.clone(),
            vae: vae.map(|(e, d)| Codec::Dvae(e, d)),
            transformer,
        }
    }

    fn vae(&self) -> Result<&Codec, RuntimeError> {
        self.vae
            .as_ref()
            .ok_or_else(|| RuntimeError::Request("this candle session has no dVAE".into()))
    }
}

/// A cloned cache's own copy of the shared buffers (every step writes them in place).
fn native_copy(c: &NativeCache) -> Result<NativeCache, RuntimeError> {
    let layers = c.0.iter().map(|l| match l {
        Some((k, v)) => Ok(Some((k.copy()?, v.copy()?))),
        None => Ok(None),
    });
    Ok(NativeCache(
        layers.collect::<candle_core::Result<_>>().map_err(err)?,
    ))
}

impl Session for CandleSession {
    fn name(&self) -> &'static str {
        NAME
    }

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn forward(
        &self,
        ids: &[i64],
        batch: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, RuntimeError> {
        let t = check_forward(&self.manifest, ids, batch, cache)?;
        let dev = &self.device;
        // The cache stays as candle tensors between steps (in `cache.native`); host layers are
        // read only for a cache filled elsewhere.
        let layers = match cache.take_native_as(NAME, native_copy)? {
            // Buffers are written in place: a cache that was cloned gets copies of its own.
            Some(NativeCache(layers)) => layers,
            None => {
                if cache.uniform_len().is_none() {
                    return Err(RuntimeError::Request(
                        "a KV cache on the host holds rows of equal length".into(),
                    ));
                }
                let dims = cache.dims();
                cache
                    .layers
                    .iter()
                    .map(|(k, v)| {
                        if cache.is_empty() {
                            return Ok(None);
                        }
                        let k = Tensor::from_slice(k, &dims, dev)?;
                        let v = Tensor::from_slice(v, &dims, dev)?;
                        Ok(Some((k, v)))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(err)?
            }
        };
        let mut c = CandleCache::from_layers(layers, cache.lens.clone());
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let ids = Tensor::from_vec(ids, (batch, t), dev).map_err(err)?;
        let logits = self.transformer.forward(&ids, Some(&mut c)).map_err(err)?;
        cache.set_native(NAME, Arc::new(NativeCache(c.into_layers())));
        cache.advance(t);
        logits.flatten_all().and_then(|x| x.to_vec1()).map_err(err)
    }

    /// Rows at different positions step on the CPU's own decoding path only.
    fn mixed_positions(&self) -> bool {
        self.device.is_cpu()
    }

    fn regroup(
        &self,
        mut parts: Vec<KvCache>,
        picks: &[(usize, usize)],
    ) -> Result<KvCache, RuntimeError> {
        let (lens, held) =
            dalle_runtimes::session::take_for_regroup(NAME, &mut parts, picks, native_copy)?;
        let m = &self.manifest;
        let mut out = KvCache::new(m, picks.len());
        let dims = (1, out.heads, m.max_seq(), out.head_dim);
        let mut layers = vec![];
        for i in 0..m.transformer.n_layers {
            let mut rows = (vec![], vec![]);
            for &(part, row) in picks {
                let (k, v) = match held[part].as_ref().and_then(|c| c.0[i].as_ref()) {
                    Some((k, v)) => (k.narrow(0, row, 1), v.narrow(0, row, 1)),
                    None => (
                        Tensor::zeros(dims, DType::F32, &self.device),
                        Tensor::zeros(dims, DType::F32, &self.device),
                    ),
                };
                rows.0.push(k.map_err(err)?);
                rows.1.push(v.map_err(err)?);
            }
            layers.push(if picks.is_empty() {
                None
            } else {
                let k = Tensor::cat(&rows.0, 0).map_err(err)?;
                let v = Tensor::cat(&rows.1, 0).map_err(err)?;
                Some((k, v))
            });
        }
        out.set_native(NAME, Arc::new(NativeCache(layers)));
        out.lens = lens;
        Ok(out)
    }

    fn decode(&self, tokens: &[i64], batch: usize) -> Result<Vec<f32>, RuntimeError> {
        let n = check_decode(&self.manifest, tokens, batch)?;
        let ids: Vec<u32> = tokens.iter().map(|&c| c as u32).collect();
        let ids = Tensor::from_vec(ids, (batch, n), &self.device).map_err(err)?;
        let img = match self.vae()? {
            Codec::Dvae(_, d) => d.decode(&ids, self.manifest.geometry.grid).map_err(err)?,
            Codec::Vqgan(v) => v.decode(&ids).map_err(err)?,
        };
        img.flatten_all().and_then(|x| x.to_vec1()).map_err(err)
    }

    fn encode(&self, pixels: &[f32], batch: usize) -> Result<Vec<i64>, RuntimeError> {
        check_encode(&self.manifest, pixels, batch)?;
        let s = self.manifest.geometry.image_size;
        let x = Tensor::from_slice(pixels, (batch, 3, s, s), &self.device).map_err(err)?;
        let codes = match self.vae()? {
            Codec::Dvae(e, _) => e.encode(&x).map_err(err)?,
            Codec::Vqgan(v) => v.encode(&x).map_err(err)?,
        };
        let codes: Vec<u32> = codes.flatten_all().and_then(|c| c.to_vec1()).map_err(err)?;
        Ok(codes.into_iter().map(|c| c as i64).collect())
    }
}

/// Open a model directory on any runtime, candle included (on `device`; the others ignore it).
pub fn open_session(
    dir: &Path,
    kind: RuntimeKind,
    opts: &OpenOptions,
    device: &Device,
) -> Result<Box<dyn Session>, RuntimeError> {
    match kind {
        RuntimeKind::Candle => {
            let manifest = Manifest::load(dir)?;
            Ok(Box::new(CandleSession::open(dir, manifest, device)?))
        }
        k => dalle_runtimes::open_session(dir, k, opts),
    }
}

/// Open a model directory into a `Generator` on any runtime, candle on the CPU included.
pub fn open(dir: &Path, kind: RuntimeKind, opts: &OpenOptions) -> Result<Generator, RuntimeError> {
    open_on(dir, kind, opts, &Device::Cpu)
}

/// As [`open`], with candle on `device` (CPU, or CUDA in a `--features cuda` build).
pub fn open_on(
    dir: &Path,
    kind: RuntimeKind,
    opts: &OpenOptions,
    device: &Device,
) -> Result<Generator, RuntimeError> {
    let session = open_session(dir, kind, opts, device)?;
    let tokenizer = dalle_runtimes::tokenizer::load(&dir.join(names::TOKENIZER))?;
    Ok(Generator::new(session, tokenizer))
}
