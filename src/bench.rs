//! Decode-speed measurement of the native candle transformer (random weights): tokens/s with the
//! KV cache and with full recomputation, per preset and batch size.

use crate::config::Config;
use crate::transformer::{KvCache, Transformer};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::time::Instant;

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeSpeed {
    pub preset: String,
    pub batch: usize,
    /// Caption prefill, seconds.
    pub prefill_s: f64,
    /// Image tokens per second per sequence × batch, with the KV cache, over the whole image.
    pub cached_tokens_per_s: f64,
    /// The same without the cache (each step recomputes the whole prefix), over the last
    /// `uncached_steps` image positions: the steady-state cost at the end of an image.
    pub uncached_tokens_per_s: f64,
    pub uncached_steps: usize,
}

/// Measure `preset` at `batch` (random weights, deterministic ids).
pub fn decode_speed(preset: &str, batch: usize, uncached_steps: usize) -> Result<DecodeSpeed> {
    let cfg = Config::preset(preset)?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    Transformer::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    crate::train::init_vars(&vm, 0, crate::transformer::model::init_value)?;
    // Inference weights are plain tensors: built from `Var`s every op would be recorded for
    // back-propagation and the KV cache would keep each step's whole graph alive.
    let weights = crate::train::named_vars(&vm)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    let model = Transformer::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev))?;
    let layout = model.layout();
    let (t, s) = (layout.text_len, model.seq_len());
    let ids: Vec<u32> = (0..batch * s)
        .map(|i| {
            if i % s < t {
                (i % 7) as u32
            } else {
                layout.image((i % 13) as u32)
            }
        })
        .collect();
    let ids = Tensor::from_vec(ids, (batch, s), &dev)?;

    let mut cache = KvCache::new(model.n_layers());
    let start = Instant::now();
    model.forward(&ids.narrow(1, 0, t)?, Some(&mut cache))?;
    let prefill_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for p in t..s {
        model.forward(&ids.narrow(1, p, 1)?, Some(&mut cache))?;
    }
    let cached = start.elapsed().as_secs_f64();

    let steps = uncached_steps.clamp(1, s - t);
    let start = Instant::now();
    for p in s - steps..s {
        model.forward(&ids.narrow(1, 0, p + 1)?, None)?;
    }
    let uncached = start.elapsed().as_secs_f64();
    Ok(DecodeSpeed {
        preset: preset.to_string(),
        batch,
        prefill_s,
        cached_tokens_per_s: ((s - t) * batch) as f64 / cached,
        uncached_tokens_per_s: (steps * batch) as f64 / uncached,
        uncached_steps: steps,
    })
}
