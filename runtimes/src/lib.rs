//! The `dalle` model contract and inference runtimes.
//!
//! This crate is what a program embedding DALL·E inference depends on: it carries no training
//! code and no candle-nn. Everything that the exporter and the runtimes must agree on lives here
//! once, starting with the model geometry.

#[doc(hidden)]
pub mod batcher;
pub mod failpoint;
pub mod generator;
pub mod geometry;
pub mod layout;
pub mod manifest;
pub mod masks;
pub mod memory;
pub mod names;
#[cfg(feature = "ort")]
pub mod ort;
pub mod rng;
pub mod sampler;
pub mod session;
pub mod tokenizer;
#[cfg(feature = "tract")]
pub mod tract;

pub use batcher::{Batcher, BatcherOptions, BatcherStats, SubmitError, Ticket};
pub use generator::{Decoding, Generator, Image, Output, Request};
pub use geometry::{Geometry, GeometryError};
pub use layout::TokenLayout;
pub use manifest::{Dtype, Manifest, ManifestError, Norms, SamplingDefaults};
pub use masks::{allowed, layer_kinds, mask_matrix, AttentionKind};
pub use sampler::{Sampler, SamplingError, SamplingParams};
pub use session::{KvCache, RuntimeError, Session};

use std::path::Path;

/// The runtimes a model directory can be served by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// The native candle model (in the `dalle` crate, which implements [`Session`] for it).
    Candle,
    /// tract, pure Rust, CPU.
    Tract,
    /// ONNX Runtime on CPU.
    Ort,
    /// ONNX Runtime with the CUDA execution provider.
    Cuda,
    /// ONNX Runtime with the TensorRT execution provider.
    Trt,
}

impl RuntimeKind {
    pub const NAMES: [&'static str; 5] = ["candle", "tract", "ort", "cuda", "trt"];

    pub fn parse(name: &str) -> Result<Self, RuntimeError> {
        Ok(match name {
            "candle" => RuntimeKind::Candle,
            "tract" => RuntimeKind::Tract,
            "ort" | "ort-cpu" => RuntimeKind::Ort,
            "cuda" | "ort-cuda" => RuntimeKind::Cuda,
            "trt" | "tensorrt" | "ort-trt" => RuntimeKind::Trt,
            _ => return Err(RuntimeError::UnknownRuntime(name.into())),
        })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// Options of the ONNX Runtime providers (ignored by the other runtimes).
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub allow_fallback: bool,
    pub trt_fp16: bool,
    pub trt_cache_dir: Option<std::path::PathBuf>,
}

/// Open `dir` on one of this crate's runtimes (not candle: see the `dalle` crate). The manifest
/// and every file's sha256 are checked first.
pub fn open_session(
    dir: &Path,
    kind: RuntimeKind,
    opts: &OpenOptions,
) -> Result<Box<dyn Session>, RuntimeError> {
    let manifest = Manifest::load(dir)?;
    match kind {
        RuntimeKind::Candle => Err(RuntimeError::NotBuilt {
            runtime: "candle",
            feature: "the `dalle` crate's candle session",
        }),
        #[cfg(feature = "tract")]
        RuntimeKind::Tract => Ok(Box::new(tract::TractSession::open(dir, manifest)?)),
        #[cfg(feature = "ort")]
        RuntimeKind::Ort | RuntimeKind::Cuda | RuntimeKind::Trt => {
            let provider = match kind {
                RuntimeKind::Cuda => ort::Provider::Cuda,
                RuntimeKind::Trt => ort::Provider::TensorRt,
                _ => ort::Provider::Cpu,
            };
            let o = ort::OrtOptions {
                provider,
                allow_fallback: opts.allow_fallback,
                trt_fp16: opts.trt_fp16,
                trt_cache_dir: opts.trt_cache_dir.clone(),
            };
            Ok(Box::new(ort::OrtRuntimeSession::open(dir, manifest, &o)?))
        }
        #[allow(unreachable_patterns)]
        k => {
            let _ = (opts, &manifest);
            Err(RuntimeError::NotBuilt {
                runtime: k.name(),
                feature: if k == RuntimeKind::Tract {
                    "tract"
                } else {
                    "ort"
                },
            })
        }
    }
}

/// Open a model directory into a [`Generator`]: manifest, tokenizer and session.
pub fn open(dir: &Path, kind: RuntimeKind, opts: &OpenOptions) -> Result<Generator, RuntimeError> {
    let session = open_session(dir, kind, opts)?;
    let tokenizer = tokenizer::load(&dir.join(names::TOKENIZER))?;
    Ok(Generator::new(session, tokenizer))
}
