//! The machine's ceilings, measured in the same run as the benchmark (a large memory copy and a
//! large f32 matmul), the roofline floor of one decode step, and per-phase peak memory.

use crate::Result;
use dalle_runtimes::{allowed, Dtype, Manifest};
use serde::Serialize;
use std::time::Instant;

/// What this machine can do at most, measured now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ceilings {
    /// Bytes read plus bytes written per second by a multi-threaded copy of `copy_bytes`.
    pub copy_gb_per_s: f64,
    /// Bytes read per second by a multi-threaded pass over the copy's source (a sum), shown
    /// beside the copy but not used by the floor, which the copy sets. A decoding step at batch
    /// 1 is such a pass over the weights; where other tenants load the machine's memory path,
    /// reading alone can fall below a copy's read + write rate (see bench/NOTES.md).
    pub read_gb_per_s: f64,
    pub copy_bytes: usize,
    /// f32 matmul rate of candle's CPU kernel on an `matmul_n`³ product.
    pub matmul_gflop_per_s: f64,
    pub matmul_n: usize,
    pub threads: usize,
    /// Bytes read per second by a pass over a buffer the size of a decoding step's working set
    /// (its weights and cache), measured with the copy where the bench asks for it (0 where
    /// not): where that fits in the last-level cache, the cache's rate.
    #[serde(default)]
    pub working_set_gb_per_s: f64,
}

/// Threads the runtimes use: one per core the process may run on.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Best of `reps` timings of `f`, seconds.
pub fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The buffers the ceilings are measured on, made once and kept, so that they can be measured
/// again between a row's decoding passes (the machine's speed changes within seconds) without
/// touching a gigabyte of fresh memory each time. Both copy buffers are in huge pages, as the
/// candle runtime keeps its weights: in 4 KiB pages this machine's copy measured 28–42 GB/s
/// from run to run, in huge pages 41–44.
pub struct Probe {
    src: Vec<f32>,
    dst: Vec<f32>,
    /// Where the values start in `src` and `dst` (past their huge-page alignment).
    skip: (usize, usize),
    n: usize,
    a: candle_core::Tensor,
    b: candle_core::Tensor,
    /// The same operands as plain values, for the BLAS's product.
    ab: (Vec<f32>, Vec<f32>),
    /// Resident bytes the probe added to this process when it was made (Linux; else 0): what
    /// a peak-RSS reading taken while it lives overstates the rest by.
    pub resident_bytes: u64,
}

/// Bytes of the copy (512 MiB read, 512 MiB written) and side of the matmul.
const COPY_BYTES: usize = 512 << 20;
const MATMUL_N: usize = 2048;

impl Probe {
    pub fn new() -> Result<Self> {
        use candle_core::{Device, Tensor};
        let before = crate::util::rss_bytes();
        let n = COPY_BYTES / 4;
        let (mut src, s0) = crate::kernels::pages::huge_page_buffer::<f32>(n);
        src.extend((0..n).map(|i| i as f32));
        let (mut dst, d0) = crate::kernels::pages::huge_page_buffer::<f32>(n);
        dst.resize(d0 + n, 0.0);
        let a = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), &Device::Cpu)?;
        let mut probe = Probe {
            src,
            dst,
            skip: (s0, d0),
            n,
            ab: (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?),
            a,
            b,
            resident_bytes: 0,
        };
        // Untimed: faults the destination in, and starts the matmul's threads.
        probe.copy();
        probe.a.matmul(&probe.b)?;
        probe.resident_bytes = match (before, crate::util::rss_bytes()) {
            (Some(b), Some(a)) => a.saturating_sub(b),
            _ => 0,
        };
        Ok(probe)
    }

    fn copy(&mut self) {
        let chunk = self.n.div_ceil(threads());
        let src = &self.src[self.skip.0..];
        let dst = &mut self.dst[self.skip.1..];
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
    }

    fn read(&self) {
        let chunk = self.n.div_ceil(threads());
        std::thread::scope(|s| {
            for c in self.src[self.skip.0..].chunks(chunk) {
                s.spawn(move || std::hint::black_box(lane_sum(c)));
            }
        });
    }

    /// The ceilings now: copy and read rates the best of `tries`, the matmul rate the best of
    /// `tries` − 2 (at least 1; a 2048³ product takes ~4× a copy's time).
    pub fn measure(&mut self, tries: usize) -> Result<Ceilings> {
        let m = self.matmul(tries.saturating_sub(2))?;
        Ok(Ceilings {
            matmul_gflop_per_s: m.matmul_gflop_per_s,
            matmul_n: m.matmul_n,
            ..self.memory(tries)?
        })
    }

    /// The matmul rate now, best of `tries`; the memory rates are left at zero.
    pub fn matmul(&self, tries: usize) -> Result<Ceilings> {
        let secs = best_of(tries, || {
            std::hint::black_box(self.a.matmul(&self.b)?);
            Ok(())
        })?;
        Ok(Ceilings {
            matmul_gflop_per_s: 2.0 * (MATMUL_N as f64).powi(3) / secs / 1e9,
            matmul_n: MATMUL_N,
            threads: threads(),
            ..Ceilings::default()
        })
    }

    /// Bytes per second read by a parallel pass over the first `bytes` of the copy's
    /// source (at most all of it), best of `tries` after one warm-up pass: the rate at which a
    /// working set of that size can be read. Where it fits in the last-level cache (this Xeon's
    /// L3 is 300 MiB; `small`'s f32 weights are 177 MB) that is the cache's rate, not memory's.
    pub fn read_working_set(&self, bytes: usize, tries: usize) -> Result<f64> {
        let n = (bytes / 4).clamp(1, self.n);
        let src = &self.src[self.skip.0..self.skip.0 + n];
        // On rayon's pool, whose threads are already running (as the decoding step's are),
        // in pieces of 2 MB claimed in order: two freshly spawned threads each summing one half
        // read the same 177 MB at 21–67 GB/s, slower than the decoding step itself.
        let pass = || {
            use rayon::prelude::*;
            let s: f32 = src.par_chunks(1 << 19).map(lane_sum).sum();
            std::hint::black_box(s);
            Ok(())
        };
        pass()?;
        let secs = best_of(tries, pass)?;
        Ok((n * 4) as f64 / secs / 1e9)
    }

    /// The f32 rate of the BLAS set up for training ([`crate::kernels::blas`]) on the same
    /// product, best of `tries`: None without one.
    pub fn blas_matmul(&self, tries: usize) -> Result<Option<f64>> {
        let Some(blas) = crate::kernels::blas::blas()? else {
            return Ok(None);
        };
        let n = MATMUL_N;
        let mut c = vec![0f32; n * n];
        let (a, b) = (&self.ab.0, &self.ab.1);
        let secs = best_of(tries, || {
            blas.gemm(threads(), (n, n, n), &mut c, (a, n, 1), (b, n, 1), false)
                .ok_or_else(|| crate::Error::Usage("the BLAS took no row-major product".into()))
        })?;
        Ok(Some(2.0 * (n as f64).powi(3) / secs / 1e9))
    }

    /// The copy and read rates now, best of `tries`; the matmul rate is left at zero (its
    /// product's output would be fresh memory inside a row's peak-RSS window).
    pub fn memory(&mut self, tries: usize) -> Result<Ceilings> {
        let copy_s = best_of(tries, || {
            self.copy();
            Ok(())
        })?;
        std::hint::black_box(&self.dst);
        let read_s = best_of(tries, || {
            self.read();
            Ok(())
        })?;
        let bytes = (self.n * 4) as f64;
        Ok(Ceilings {
            copy_gb_per_s: 2.0 * bytes / copy_s / 1e9,
            read_gb_per_s: bytes / read_s / 1e9,
            copy_bytes: self.n * 4,
            threads: threads(),
            ..Ceilings::default()
        })
    }
}

/// The CPU by name and the vector and matrix extensions the kernels (ours, the BLAS's, the
/// peer's) can use on it, as Linux reports them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuInfo {
    pub model: String,
    pub features: Vec<String>,
}

/// This machine's [`CpuInfo`] (from `/proc/cpuinfo`; "unknown" elsewhere).
pub fn cpu_info() -> CpuInfo {
    const SHOWN: [&str; 10] = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_tile",
    ];
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let have: Vec<&str> = flags.split_whitespace().collect();
    CpuInfo {
        model: field("model name").unwrap_or_else(|| "unknown".into()),
        features: SHOWN
            .iter()
            .filter(|f| have.contains(f))
            .map(|f| f.to_string())
            .collect(),
    }
}

/// One matrix-product ceiling: a kernel's rate on the 2048³ product, measured in this run.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulCeiling {
    pub kernel: String,
    pub dtype: String,
    pub gflop_per_s: f64,
}

/// Σ of `v` in 64 independent lanes (which the compiler keeps in vector registers: four
/// chains of adds in flight, so that the adds' latency does not cap the rate below the cache's;
/// with 16 lanes, one chain, a core summed at most ~48 GB/s).
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let mut rows = v.chunks_exact(64);
    for r in &mut rows {
        acc.iter_mut().zip(r).for_each(|(a, &x)| *a += x);
    }
    acc.iter().sum::<f32>() + rows.remainder().iter().sum::<f32>()
}

impl Ceilings {
    /// The higher copy rate and the higher matmul rate of two measurements: the stricter floor.
    pub fn strictest(&self, other: &Ceilings) -> Ceilings {
        Ceilings {
            copy_gb_per_s: self.copy_gb_per_s.max(other.copy_gb_per_s),
            read_gb_per_s: self.read_gb_per_s.max(other.read_gb_per_s),
            matmul_gflop_per_s: self.matmul_gflop_per_s.max(other.matmul_gflop_per_s),
            working_set_gb_per_s: self.working_set_gb_per_s.max(other.working_set_gb_per_s),
            ..self.clone()
        }
    }
}

/// Bytes and FLOPs one decode step must at least move and compute.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StepCost {
    pub bytes: f64,
    pub flops: f64,
}

impl StepCost {
    /// Seconds at the machine's ceilings: whichever of memory and arithmetic takes longer.
    pub fn floor_s(&self, c: &Ceilings) -> f64 {
        (self.bytes / (c.copy_gb_per_s * 1e9)).max(self.flops / (c.matmul_gflop_per_s * 1e9))
    }
}

/// The least work of decoding one token at sequence position `pos` for `batch` rows: every
/// weight matrix read once (the token embedding only for the rows used), the keys and values the
/// layer's mask allows read once (f32, as every runtime keeps the cache), and two FLOPs per
/// multiply-add of the matmuls and of attention over the allowed keys.
pub fn decode_step_cost(m: &Manifest, batch: usize, pos: usize) -> StepCost {
    let t = &m.transformer;
    let (d, vocab) = (t.d_model as f64, m.layout.vocab_size as f64);
    let w_bytes = match m.dtype {
        Dtype::F32 => 4.0,
        Dtype::F16 => 2.0,
    };
    let b = batch as f64;
    // qkv, proj, fc, mlp proj; the head; layer norms and biases are noise at this size.
    let layer_params = 12.0 * d * d;
    let matmul_params = t.n_layers as f64 * layer_params + d * vocab;
    let keys: f64 = m
        .layers
        .iter()
        .map(|&kind| {
            (0..=pos)
                .filter(|&k| allowed(m.geometry.text_len, m.geometry.grid, kind, pos, k))
                .count() as f64
        })
        .sum();
    StepCost {
        bytes: matmul_params * w_bytes + b * d * w_bytes + 2.0 * b * keys * d * 4.0,
        flops: 2.0 * b * matmul_params + 4.0 * b * keys * d,
    }
}

/// Reset the peak-RSS mark of this process (Linux `clear_refs` 5), so that the next
/// [`crate::util::peak_rss_bytes`] reads the peak of what follows. Returns false where the
/// platform cannot, in which case the reading is the peak since start.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_cost_reads_only_the_allowed_keys() {
        let cfg = crate::config::Config::preset("tiny").unwrap();
        let m = crate::runtime::manifest_of(&cfg);
        let (t, g) = (cfg.geometry.text_len, cfg.geometry.grid);
        let first = decode_step_cost(&m, 1, t);
        let last = decode_step_cost(&m, 1, t + g * g - 1);
        // A dense cache would read ~3× more keys at the last position than at the first; the
        // masks keep the growth to the column layers' extra rows and the conv window.
        assert!(last.bytes > first.bytes);
        let d = cfg.transformer.d_model as f64;
        let per_key = 2.0 * d * 4.0;
        let extra_keys = (last.bytes - first.bytes) / per_key;
        let dense_extra = (m.layers.len() * (g * g - 1)) as f64;
        assert!(
            extra_keys < dense_extra / 2.0,
            "{extra_keys} vs {dense_extra}"
        );
        assert_eq!(decode_step_cost(&m, 4, t).flops, 4.0 * first.flops);
    }

    #[test]
    fn a_rows_floor_uses_the_higher_of_each_ceiling_around_it() {
        let at = |copy_gb_per_s, matmul_gflop_per_s| Ceilings {
            copy_gb_per_s,
            matmul_gflop_per_s,
            ..Ceilings::default()
        };
        let c = at(40.0, 210.0).strictest(&at(45.0, 190.0));
        assert_eq!((c.copy_gb_per_s, c.matmul_gflop_per_s), (45.0, 210.0));
        // The stricter ceilings give a floor no longer than either measurement's.
        let cost = StepCost {
            bytes: 1e8,
            flops: 1e9,
        };
        for one in [at(40.0, 210.0), at(45.0, 190.0)] {
            assert!(cost.floor_s(&c) <= cost.floor_s(&one));
        }
    }
}
