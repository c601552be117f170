//! `dalle bench`: speed and memory against the machine's roofline (and a PyTorch peer).

use super::{weights_dtype, ProviderArgs};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// `dalle bench`: every runtime's decode speed against the machine's roofline, the KV cache's
/// gain, training steps, and optionally the PyTorch peer, measured side by side in one run.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A model directory to measure; default: `--preset` with random weights, exported on the fly.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Image grid in tokens per side, replacing the preset's (the image side scales with it):
    /// e.g. `--preset small --grid 32` for a 32×32-token image.
    #[arg(long, conflicts_with = "model")]
    pub grid: Option<usize>,
    /// Export the preset's random weights in f16, as `dalle export --fp16` does (the floor
    /// then counts 2 bytes a weight).
    #[arg(long, conflicts_with = "model")]
    pub fp16: bool,
    /// Comma-separated runtimes (candle, tract, ort; cuda and trt where a GPU is present).
    #[arg(long, value_delimiter = ',', default_value = "candle,tract")]
    pub runtimes: Vec<String>,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch: Vec<usize>,
    /// Image positions timed without the KV cache (evenly spaced; the rest interpolated).
    #[arg(long, default_value_t = 3)]
    pub recompute_positions: usize,
    /// Times each image is decoded with the KV cache, at least (more until --decode-seconds
    /// have passed, up to 10× this), each pass with the memory rates measured around it: the
    /// fastest pass gives the whole-image figures, the pass nearest the floor of its own moment
    /// the step times and floor. The peer's generation is the fastest of this many passes.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Seconds each runtime × batch row keeps decoding after its --passes (see there).
    #[arg(long, default_value_t = 10.0)]
    pub decode_seconds: f64,
    /// Batch of the training-step timings of both stages; 0 skips them.
    #[arg(long, default_value_t = 8)]
    pub train_batch: usize,
    /// Timed training steps per stage, ours and the peer's (after one warm-up step each); the
    /// median is reported.
    #[arg(long, default_value_t = 5)]
    pub train_reps: usize,
    /// Also run a peer implementation in the same invocation: `pytorch` (bench/pytorch_peer.py).
    #[arg(long, value_parser = ["pytorch"])]
    pub peer: Option<String>,
    /// Python of the peer; default $DALLE_PEER_PYTHON, else target/peer (bench/install-peer.sh).
    #[arg(long)]
    pub peer_python: Option<PathBuf>,
    /// Measure serving instead: offline generation at batch 1 and --serve-batch against
    /// `dalle serve` (in this process, loopback HTTP) with these numbers of concurrent clients,
    /// on the first of --runtimes, e.g. `--serve-clients 1,4,16`.
    #[arg(long, value_delimiter = ',')]
    pub serve_clients: Vec<usize>,
    /// Requests (one image each) every serving client sends.
    #[arg(long, default_value_t = 4)]
    pub serve_requests: usize,
    /// The server's --max-batch, and the offline batch it is compared with.
    #[arg(long, default_value_t = 16)]
    pub serve_batch: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub providers: ProviderArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let runtimes = a
        .runtimes
        .iter()
        .map(|r| dalle_runtimes::RuntimeKind::parse(r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if !a.serve_clients.is_empty() {
        return serve(&a, runtimes[0]);
    }
    let opts = dalle::bench::BenchOptions {
        model: a.model,
        preset: a.preset,
        grid: a.grid,
        dtype: weights_dtype(a.fp16),
        runtimes,
        batches: a.batch,
        recompute_positions: a.recompute_positions,
        passes: a.passes,
        decode_seconds: a.decode_seconds,
        train_batch: a.train_batch,
        train_reps: a.train_reps,
        peer_python: a
            .peer
            .is_some()
            .then(|| dalle::bench::peer::python(a.peer_python.as_deref())),
        open: a.providers.options(),
    };
    let report = dalle::bench::run(&opts, &mut |line| eprintln!("bench: {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", dalle::bench::table(&report));
    }
    Ok(())
}

/// `dalle bench --serve-clients …`: serving against offline generation.
fn serve(a: &BenchArgs, runtime: dalle_runtimes::RuntimeKind) -> Result<()> {
    let model = match &a.model {
        Some(dir) => dalle::bench::model::BenchModel::existing(dir),
        None => {
            dalle::bench::model::BenchModel::random(&a.preset, 0, a.grid, weights_dtype(a.fp16))?
        }
    };
    let opts = dalle::bench::serve::ServeBenchOptions {
        runtime,
        providers: a.providers.options(),
        clients: a.serve_clients.clone(),
        requests: a.serve_requests,
        max_batch: a.serve_batch,
    };
    let rows = dalle::bench::serve::run(&model.dir, &opts, &mut |line| eprintln!("bench: {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        dalle::bench::serve::print(&rows, runtime.name());
    }
    Ok(())
}
