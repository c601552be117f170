//! Helpers shared by the integration tests.

use candle_core::Device;
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
