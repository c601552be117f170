//! `dalle bench`: decoding speed of every runtime on one model directory (a trained one, or a
//! preset with random weights exported on the fly), set against the machine's ceilings measured
//! in the same run (the roofline floor of each decode step), the same decode without the KV
//! cache, training steps of both stages, and optionally a PyTorch peer (`dalle-pytorch`).
//!
//! Every figure is measured in one process, side by side; nothing here asserts a time.

pub mod decode;
pub mod machine;
pub mod model;
pub mod peer;
pub mod serve;
pub mod train;

use crate::Result;
use dalle_runtimes::Manifest;
use decode::{measure, DecodeRow, Passes};
use machine::Ceilings;
use serde::Serialize;

/// What `dalle bench` was asked to do.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// A model directory; otherwise `preset` with random weights.
    pub model: Option<std::path::PathBuf>,
    pub preset: String,
    /// Image grid replacing the preset's (e.g. 32 for 32×32 image tokens).
    pub grid: Option<usize>,
    /// Weights of the preset's export (f16: as `dalle export --fp16`).
    pub dtype: dalle_runtimes::Dtype,
    pub runtimes: Vec<dalle_runtimes::RuntimeKind>,
    pub batches: Vec<usize>,
    /// Image positions timed without the KV cache (at least 2: the first and the last).
    pub recompute_positions: usize,
    /// Cached decodes of the image per row, at least (the peer's generation: exactly), and
    /// more until `decode_seconds` have passed: see [`measure`] and [`DecodeRow::set_floor`].
    pub passes: usize,
    pub decode_seconds: f64,
    /// Batch of the training-step timings; 0 skips them.
    pub train_batch: usize,
    pub train_reps: usize,
    /// Python of the PyTorch peer; `None` runs no peer.
    pub peer_python: Option<std::path::PathBuf>,
    pub open: dalle_runtimes::OpenOptions,
}

/// Our figure set against the peer's.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub what: String,
    pub ours: f64,
    pub peer: f64,
    /// How many times faster we are (> 1: faster).
    pub speedup: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub preset: String,
    /// The exported weights' precision, which the floor counts the bytes of.
    pub dtype: dalle_runtimes::Dtype,
    pub transformer_params: usize,
    pub text_len: usize,
    pub image_tokens: usize,
    pub ceilings: Ceilings,
    pub cpu: machine::CpuInfo,
    /// Every f32 and bf16 matmul rate measured in this run: candle's own kernel, the BLAS set up
    /// for training, the peer's torch.
    pub matmul: Vec<machine::MatmulCeiling>,
    /// The fastest f32 kernel of those: the compute ceiling of the "best kernel" floors.
    pub best_f32: Option<machine::MatmulCeiling>,
    pub decode: Vec<DecodeRow>,
    pub train: Option<train::TrainSteps>,
    pub peer: Option<peer::PeerReport>,
    pub versus_peer: Vec<Comparison>,
}

/// Run the whole benchmark; progress goes to `progress`, one line per phase.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if opts.batches.is_empty() || opts.batches.contains(&0) {
        return Err(crate::Error::Usage(
            "--batch sizes must be at least 1".into(),
        ));
    }
    if opts.passes == 0 {
        return Err(crate::Error::Usage("--passes must be at least 1".into()));
    }
    if !(opts.decode_seconds.is_finite() && opts.decode_seconds >= 0.0) {
        return Err(crate::Error::Usage(format!(
            "--decode-seconds must be a number of seconds, 0 or more (got {})",
            opts.decode_seconds
        )));
    }
    if opts.grid == Some(0) {
        return Err(crate::Error::Usage("--grid must be at least 1".into()));
    }
    if opts.runtimes.is_empty() {
        return Err(crate::Error::Usage("--runtimes names no runtime".into()));
    }
    if let Some(py) = &opts.peer_python {
        peer::check(py)?;
    }
    // A missing ONNX Runtime library is an error now rather than minutes into the run.
    use dalle_runtimes::RuntimeKind::{Cuda, Ort, Trt};
    if opts.runtimes.iter().any(|k| matches!(k, Ort | Cuda | Trt)) {
        dalle_runtimes::ort::find_library()?;
    }
    progress("measuring the machine's ceilings (memory copy, f32 matmul)");
    let mut probe = machine::Probe::new()?;
    let ceilings = probe.measure(5)?;
    let ceiling = |kernel: &str, dtype: &str, gflop_per_s: f64| machine::MatmulCeiling {
        kernel: kernel.into(),
        dtype: dtype.into(),
        gflop_per_s,
    };
    let mut matmul = vec![ceiling(
        "candle (gemm crate)",
        "f32",
        ceilings.matmul_gflop_per_s,
    )];
    if let Some(rate) = probe.blas_matmul(3)? {
        matmul.push(ceiling(&crate::kernels::blas::describe(), "f32", rate));
    }
    let model = match &opts.model {
        Some(dir) => model::BenchModel::existing(dir),
        None => {
            progress(&format!(
                "exporting a random-weight `{}` model ({})",
                opts.preset, opts.dtype
            ));
            model::BenchModel::random(&opts.preset, 0, opts.grid, opts.dtype)?
        }
    };
    let manifest = Manifest::load(&model.dir).map_err(dalle_runtimes::RuntimeError::from)?;
    let cfg = crate::runtime::config_of(&manifest)?;
    let mut decode = vec![];
    // The matmul rate measured after a row is the next row's "before" (only a session opening
    // lies between them).
    let mut around: Option<Ceilings> = None;
    for &kind in &opts.runtimes {
        progress(&format!("opening {}", kind.name()));
        let session =
            crate::runtime::open_session(&model.dir, kind, &opts.open, &candle_core::Device::Cpu)?;
        for &batch in &opts.batches {
            progress(&format!(
                "{} batch {batch}: decoding one image, then recomputing",
                kind.name()
            ));
            // The matmul rate next to the row; the memory rates are measured around each of
            // its passes (below).
            let before = match around.take() {
                Some(c) => c,
                None => probe.matmul(3)?,
            };
            // A middle step's bytes: its working set, read around each pass at the same
            // moment as the copy (the shared last-level cache's rate moves with its tenants).
            let middle = manifest.geometry.text_len + manifest.geometry.image_tokens() / 2;
            let working_set = machine::decode_step_cost(&manifest, batch, middle).bytes as usize;
            let reset = machine::reset_peak_rss();
            let mut row = measure(
                session.as_ref(),
                batch,
                opts.recompute_positions,
                Passes {
                    at_least: opts.passes,
                    seconds: opts.decode_seconds,
                },
                &mut || {
                    // The runtime's worker threads may still spin for a moment after a pass
                    // (ONNX Runtime's do, by default): they would share the cores with the
                    // probe's copy and make the floor of the moment too lenient.
                    std::thread::sleep(train::SETTLE);
                    let mut c = probe.memory(2)?;
                    c.working_set_gb_per_s = probe.read_working_set(working_set, 5)?;
                    Ok(c)
                },
            )?;
            // The probe's buffers were resident before the peak was reset: not the row's.
            row.peak_rss_mb = reset
                .then(crate::util::peak_rss_bytes)
                .flatten()
                .map(|b| b.saturating_sub(probe.resident_bytes) as f64 / (1 << 20) as f64);
            std::thread::sleep(train::SETTLE);
            let after = probe.matmul(3)?;
            row.set_floor(&manifest, &before.strictest(&after));
            around = Some(after);
            decode.push(row);
        }
    }
    let mut peer = match &opts.peer_python {
        Some(py) => {
            progress(&format!(
                "running the PyTorch peer's generation ({})",
                py.display()
            ));
            Some(peer::run(
                py,
                &cfg,
                &opts.batches,
                (0, opts.train_reps),
                (opts.passes, machine::threads()),
            )?)
        }
        None => None,
    };
    let train = if opts.train_batch > 0 {
        let mut trainer = match &opts.peer_python {
            Some(py) => {
                progress("starting the PyTorch peer's training steps");
                Some(peer::PeerTrainer::start(
                    py,
                    &cfg,
                    opts.train_batch,
                    machine::threads(),
                )?)
            }
            None => None,
        };
        progress(&format!(
            "training steps of both stages at batch {}{}",
            opts.train_batch,
            if trainer.is_some() {
                ", each in turn with the peer's"
            } else {
                ""
            }
        ));
        let (ours, theirs) =
            train::train_steps(&cfg, opts.train_batch, opts.train_reps, trainer.as_mut())?;
        if let Some(p) = peer.as_mut() {
            p.train = theirs;
        }
        Some(ours)
    } else {
        None
    };
    let versus_peer = peer
        .as_ref()
        .map(|p| compare(&decode, train.as_ref(), p))
        .unwrap_or_default();
    if let Some(p) = &peer {
        for (dtype, rate) in &p.matmul_gflop_per_s {
            matmul.push(ceiling(&format!("torch {}", p.torch), dtype, *rate));
        }
    }
    let best_f32 = matmul
        .iter()
        .filter(|c| c.dtype == "f32")
        .max_by(|a, b| a.gflop_per_s.total_cmp(&b.gflop_per_s))
        .cloned();
    // Each row's middle step against the strictest floor this run can set: the best f32
    // kernel's rate instead of candle's, and the read rate of the step's own working set
    // measured around the row's floor pass (the last-level cache's where it fits there).
    if let Some(best) = &best_f32 {
        for row in &mut decode {
            let middle = manifest.geometry.text_len + manifest.geometry.image_tokens() / 2;
            let cost = machine::decode_step_cost(&manifest, row.batch, middle);
            let c = Ceilings {
                matmul_gflop_per_s: best.gflop_per_s.max(row.ceilings.matmul_gflop_per_s),
                copy_gb_per_s: row
                    .ceilings
                    .copy_gb_per_s
                    .max(row.ceilings.working_set_gb_per_s),
                ..row.ceilings.clone()
            };
            row.middle_floor_fraction_best = cost.floor_s(&c) / row.middle_step_s;
        }
    }
    Ok(BenchReport {
        model: opts.model.as_ref().map_or_else(
            || format!("{} (random weights)", opts.preset),
            |d| d.display().to_string(),
        ),
        preset: manifest.preset.clone(),
        dtype: manifest.dtype,
        transformer_params: cfg.transformer_params(),
        text_len: manifest.geometry.text_len,
        image_tokens: manifest.geometry.image_tokens(),
        ceilings,
        cpu: machine::cpu_info(),
        matmul,
        best_f32,
        decode,
        train,
        peer,
        versus_peer,
    })
}

fn compare(
    decode: &[DecodeRow],
    train: Option<&train::TrainSteps>,
    peer: &peer::PeerReport,
) -> Vec<Comparison> {
    let mut out = vec![];
    for p in &peer.generate {
        let best = decode
            .iter()
            .filter(|r| r.batch == p.batch)
            .max_by(|a, b| a.image_tokens_per_s.total_cmp(&b.image_tokens_per_s));
        if let Some(r) = best {
            out.push(Comparison {
                what: format!("image tokens/s, batch {} (best: {})", p.batch, r.runtime),
                ours: r.image_tokens_per_s,
                peer: p.image_tokens_per_s,
                speedup: r.image_tokens_per_s / p.image_tokens_per_s,
            });
        }
    }
    if let (Some(ours), Some(theirs)) = (train, &peer.train) {
        let b = ours.batch;
        let mut rows = vec![(
            format!("transformer training step s, batch {b}"),
            ours.transformer_step_s,
            theirs.transformer_step_s,
        )];
        if let Some(openai) = theirs.openai_dvae_step_s {
            rows.push((
                format!("dVAE training step s, batch {b} (peer: OpenAI's dall_e dVAE, the same network)"),
                ours.dvae_step_s,
                openai,
            ));
        }
        rows.push((
            format!(
                "dVAE training step s, batch {b} (peer: dalle-pytorch's DiscreteVAE, {:.2}M params, another network)",
                peer.dvae_params as f64 / 1e6
            ),
            ours.dvae_step_s,
            theirs.dvae_step_s,
        ));
        for (what, a, b) in rows {
            out.push(Comparison {
                what,
                ours: a,
                peer: b,
                speedup: b / a,
            });
        }
    }
    out
}

fn ms(s: f64) -> String {
    format!("{:.1}", s * 1e3)
}

/// The report as plain-text tables.
pub fn table(r: &BenchReport) -> String {
    use std::fmt::Write;
    let c = &r.ceilings;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model: {} — {:.1}M transformer parameters in {}, {} text + {} image tokens",
        r.model,
        r.transformer_params as f64 / 1e6,
        r.dtype,
        r.text_len,
        r.image_tokens
    );
    let _ = writeln!(
        s,
        "machine: {} threads; memory copy {:.1} GB/s (read + write, {} MiB; reading alone {:.1}); f32 matmul {:.1} GFLOP/s ({}³)",
        c.threads,
        c.copy_gb_per_s,
        c.copy_bytes >> 20,
        c.read_gb_per_s,
        c.matmul_gflop_per_s,
        c.matmul_n
    );
    let _ = writeln!(
        s,
        "cpu: {} ({}); our kernels: {}; training products: {}",
        r.cpu.model,
        r.cpu.features.join(" "),
        crate::kernels::isa::describe(),
        crate::kernels::blas::describe()
    );
    let rates: Vec<String> = r
        .matmul
        .iter()
        .map(|c| format!("{} {} {:.0}", c.kernel, c.dtype, c.gflop_per_s))
        .collect();
    let _ = writeln!(s, "matmul ceilings, GFLOP/s on 2048³: {}", rates.join("; "));
    let _ = writeln!(
        s,
        "\nEach decoding pass is set against the floor of its own moment (memory rates measured just\nbefore and after it); the step times and floors are those of the pass that comes closest to\nits floor, last÷first the median over the passes, the whole-image figures the fastest pass's.\n\n| runtime | batch | passes | prefill ms | step ms first / middle / last | last÷first | transformer s | dVAE s | image tok/s | no-cache s | KV-cache × | floor ms (middle) | % of floor (middle / all steps) | ceilings at the row: copy (read) GB/s, GFLOP/s | peak RSS MB |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for d in &r.decode {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} / {} / {} | {:.2} | {:.2} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {:.0}% / {:.0}% | {:.1} ({:.1}), {:.1} | {} |",
            d.runtime,
            d.batch,
            d.passes,
            ms(d.prefill_s),
            ms(d.first_step_s),
            ms(d.middle_step_s),
            ms(d.last_step_s),
            d.last_over_first,
            d.transformer_s,
            d.dvae_decode_s,
            d.image_tokens_per_s,
            d.no_cache_transformer_s,
            d.kv_cache_speedup,
            ms(d.middle_floor_s),
            100.0 * d.middle_floor_fraction,
            100.0 * d.decode_floor_fraction,
            d.ceilings.copy_gb_per_s,
            d.ceilings.read_gb_per_s,
            d.ceilings.matmul_gflop_per_s,
            d.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}")),
        );
    }
    if let Some(best) = &r.best_f32 {
        let rows: Vec<String> = r
            .decode
            .iter()
            .map(|d| {
                format!(
                    "{} b{} {:.0}% (read {:.0} GB/s)",
                    d.runtime,
                    d.batch,
                    100.0 * d.middle_floor_fraction_best,
                    d.ceilings.working_set_gb_per_s
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "% of the strictest floor (middle step; the best f32 kernel, {} at {:.0} GFLOP/s, and the read rate of the step's own working set, cache-resident where it fits): {}",
            best.kernel,
            best.gflop_per_s,
            rows.join(", ")
        );
    }
    if let Some(t) = &r.train {
        let _ = writeln!(
            s,
            "\ntraining step at batch {}: transformer {:.2} s ({:.1}M params), dVAE {:.2} s ({:.2}M params)",
            t.batch,
            t.transformer_step_s,
            t.transformer_params as f64 / 1e6,
            t.dvae_step_s,
            t.dvae_params as f64 / 1e6
        );
    }
    if let Some(p) = &r.peer {
        let _ = writeln!(
            s,
            "\npeer: {} {} on torch {} ({} threads; {:.1}M transformer, {:.2}M dVAE params; dense attention with its KV cache)",
            p.peer,
            p.version,
            p.torch,
            p.threads,
            p.transformer_params as f64 / 1e6,
            p.dvae_params as f64 / 1e6
        );
        let _ = writeln!(s, "| figure | ours | peer | ours ÷ peer (speed) |");
        let _ = writeln!(s, "|---|---|---|---|");
        for v in &r.versus_peer {
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.2} | {:.2}× |",
                v.what, v.ours, v.peer, v.speedup
            );
        }
    }
    s
}
