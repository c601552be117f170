//! Helpers shared by the integration tests.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dalle::config::Config;
use dalle::transformer::model::init_value;
use dalle::transformer::Transformer;
use dalle::vae::model::{Decoder, Encoder};
use std::collections::HashMap;
use std::path::Path;

/// The bit patterns of every tensor of a run's latest checkpoint (weights, optimizer moments,
/// EMA), sorted by file and name: two runs are bit-identical when these are equal.
pub fn checkpoint_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let latest = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    let mut out = vec![];
    for f in [
        "weights.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
    ] {
        let path = dir.join("checkpoints").join(latest.trim()).join(f);
        for (k, v) in candle_core::safetensors::load(path, &Device::Cpu).unwrap() {
            let bits = v
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            out.push((format!("{f}/{k}"), bits));
        }
    }
    out.sort();
    out
}

/// Assert two runs' latest checkpoints are bit-identical.
pub fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (a, b) = (checkpoint_bits(a), checkpoint_bits(b));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(va == vb, "{ka} differs after resume");
    }
}

/// Random weights for every variable `build` asks for: transformer matrices 10× GPT-2's init
/// (attention far from uniform), convolutions N(0, 1/fan_in), biases and layer-norm gains perturbed by N(0, 0.1²) so a miswired one shows.
pub fn random_vars<M>(
    seed: u64,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> HashMap<String, Tensor> {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    dalle::train::init_vars(&vm, seed, |name, dims, rng| {
        let base = init_value(name, dims, rng);
        if dims.len() == 4 {
            // dVAE convolutions: N(0, 1/fan_in), so that codes depend on the image.
            let fan_in: usize = dims[1..].iter().product();
            base.iter()
                .map(|v| v / 0.02 / (fan_in as f32).sqrt())
                .collect()
        } else if dims.len() >= 2 {
            base.iter().map(|v| v * 10.0).collect()
        } else {
            base.iter()
                .map(|v| v + (rng.normal() * 0.1) as f32)
                .collect()
        }
    })
    .unwrap();
    dalle::train::named_vars(&vm)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect()
}

/// A `dalle train`-shaped run directory with random weights: config.json,
/// transformer.safetensors, tokenizer.json and vae/.
pub fn random_run(run: &Path, cfg: &Config) {
    std::fs::create_dir_all(run.join("vae")).unwrap();
    let enc = random_vars(1, |vb| Encoder::new(&cfg.vae, vb));
    let dec = random_vars(2, |vb| Decoder::new(&cfg.vae, vb));
    dalle::vae::io::save_dir(&run.join("vae"), cfg, &enc, &dec).unwrap();
    let tf = random_vars(3, |vb| Transformer::new(cfg, vb));
    candle_core::safetensors::save(&tf, run.join("transformer.safetensors")).unwrap();
    let json = serde_json::to_string_pretty(cfg).unwrap();
    std::fs::write(run.join("config.json"), json).unwrap();
    let captions: Vec<String> = ["a red circle", "two blue squares", "a star above a ring"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tok = dalle::text::train(&captions, cfg.geometry.text_vocab, 1).unwrap();
    dalle::text::save(&tok, &run.join("tokenizer.json")).unwrap();
}

/// Largest elementwise |a − b| of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The runtimes a test runs on: candle and tract, and ONNX Runtime when its library is found
/// (scripts/test.sh installs it; in CI its absence is a failure).
pub fn runtimes() -> Vec<dalle_runtimes::RuntimeKind> {
    use dalle_runtimes::RuntimeKind;
    let mut v = vec![RuntimeKind::Candle, RuntimeKind::Tract];
    match dalle_runtimes::ort::find_library() {
        Ok(_) => v.push(RuntimeKind::Ort),
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI must test ONNX Runtime: {e}"),
        Err(e) => eprintln!("skipping ort: {e}"),
    }
    v
}
