//! The `dalle` command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dalle::config::{Config, VaeConfig};
use dalle::data::filters::Filters;
use dalle::data::shapes::Split;
use dalle::data::Index;
use dalle::vae::io::Vae;
use dalle::vae::train::{VaeTrainOptions, VaeTrainRequest};
use std::path::PathBuf;

/// Training frees and re-allocates the same large tensors every step; this keeps them mapped
/// instead of faulting them in afresh, while a training command runs (see `dalle::alloc`).
#[global_allocator]
static ALLOC: dalle::alloc::ReuseLarge = dalle::alloc::ReuseLarge;

#[derive(Parser)]
#[command(
    name = "dalle",
    version,
    about = "DALL·E (Ramesh et al. 2021) in Rust: train, export, generate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a preset's geometry and parameter counts.
    Info {
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a sparse attention mask (rows = queries, 1 = may attend).
    Masks {
        #[arg(long)]
        text_len: usize,
        #[arg(long)]
        grid: usize,
        #[arg(long, value_parser = ["row", "column", "conv"])]
        kind: String,
        /// Side of the convolutional window (odd).
        #[arg(long, default_value_t = 11)]
        kernel: usize,
        #[arg(long)]
        json: bool,
    },
    /// Measure candle decode speed with and without the KV cache (random weights).
    Bench(BenchArgs),
    /// Make or inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Caption tokenizer.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Train the discrete VAE (stage 1).
    TrainVae(TrainVaeArgs),
    /// Train the transformer (stage 2) on captions and dVAE tokens.
    Train(TrainArgs),
    /// Generate images for a caption.
    Generate(GenerateArgs),
    /// Zero-shot compositional accuracy on the shapes benchmark (seen vs held-out combinations).
    Eval {
        /// Model directory; default: the bundled `models/shapes-tiny`.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_parser = ["shapes"], default_value = "shapes")]
        benchmark: String,
        #[arg(long, default_value = "tract")]
        runtime: String,
        /// Scenes per split.
        #[arg(long, default_value_t = 100)]
        samples: usize,
        /// Guidance scales to compare (1 = none).
        #[arg(long, value_delimiter = ',', default_value = "1,3")]
        guidance: Vec<f32>,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        json: bool,
        /// Write a grid of the first generated images (seen row, held-out row framed in red) at
        /// the first guidance scale.
        #[arg(long)]
        grid: Option<PathBuf>,
        #[command(flatten)]
        providers: ProviderArgs,
    },
    /// Compare runtimes on one model directory: logits, greedy tokens, decoded images.
    Parity {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated; the first is the reference.
        #[arg(long, value_delimiter = ',', default_value = "candle,tract,ort")]
        runtimes: Vec<String>,
        #[arg(long, default_value = "a red circle above a blue square")]
        prompt: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        providers: ProviderArgs,
    },
    /// Install what a runtime needs at run time.
    #[command(subcommand)]
    Setup(SetupCommand),
    /// Export a trained model to an ONNX model directory (manifest, tokenizer, three graphs).
    Export {
        /// A `dalle train` run directory (transformer.safetensors, tokenizer.json, config.json).
        #[arg(long, required_unless_present = "from_model")]
        transformer: Option<PathBuf>,
        /// dVAE directory; defaults to the run's own `vae/` copy.
        #[arg(long, conflicts_with = "from_model")]
        vae: Option<PathBuf>,
        /// Re-export an exported model directory (any schema version) with this version: its
        /// weights come from its graphs, its sampling defaults from its manifest (the sampling
        /// flags below are ignored). Upgrades a directory whose training run is gone.
        #[arg(long, conflicts_with = "transformer")]
        from_model: Option<PathBuf>,
        /// Model directory to create.
        #[arg(long)]
        out: PathBuf,
        /// ONNX opset (17 to 21).
        #[arg(long, default_value_t = 17)]
        opset: i64,
        /// Half-precision weights and computation (inputs and outputs stay f32), for GPU
        /// runtimes; the candle runtime also streams them as f16 when decoding up to 4 images at
        /// a time on the CPU (half the bytes of each step).
        #[arg(long)]
        fp16: bool,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
        /// Graphs whose weights exceed this many bytes keep them in `<graph>.onnx.data`.
        #[arg(long, default_value_t = 1 << 30)]
        external_data_threshold: u64,
        /// Default sampling of the model, recorded in its manifest (`generate` flags override).
        #[arg(long, default_value_t = 1.0)]
        guidance_scale: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
    },
    /// dVAE utilities.
    #[command(subcommand)]
    Vae(VaeCommand),
    /// Print the token grid of an image.
    Encode {
        #[arg(long)]
        vae: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Turn a token grid (JSON) back into an image.
    Decode {
        #[arg(long)]
        vae: PathBuf,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Encode and decode an image.
    Reconstruct {
        #[arg(long)]
        vae: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum SetupCommand {
    /// Fetch the ONNX Runtime 1.31.1 library (the `onnxruntime` wheel, or `onnxruntime-gpu` with
    /// --gpu) with pip and unpack its shared libraries into the cache directory.
    Ort {
        #[arg(long)]
        gpu: bool,
        /// Unpack here instead of the cache directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Largest side `data shapes` renders (4×4 supersampled, one image at a time: ~12 MiB).
const MAX_SHAPES_SIZE: u32 = 1024;

#[derive(Subcommand)]
enum DataCommand {
    /// Write the procedural shapes set in the image-folder format.
    Shapes {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "train")]
        split: Split,
        /// Side of the square images in pixels (16 to 1024).
        #[arg(long, default_value_t = 64)]
        image_size: u32,
        /// Write into a non-empty --out, replacing its metadata.jsonl and same-named images.
        #[arg(long)]
        force: bool,
    },
    /// Count usable and skipped samples (decodes every image).
    Stats {
        dir: PathBuf,
        #[command(flatten)]
        filters: FilterArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on a dataset's captions.
    Train {
        #[arg(long)]
        data: PathBuf,
        /// Largest vocabulary (the preset's text vocabulary, e.g. 1024 for tiny).
        #[arg(long)]
        vocab: usize,
        #[arg(long)]
        out: PathBuf,
        /// Merges must occur at least this often.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[command(flatten)]
        filters: FilterArgs,
    },
}

#[derive(Subcommand)]
enum VaeCommand {
    /// Import OpenAI's dall_e weights (encoder.pkl / decoder.pkl converted to safetensors).
    ImportOpenai {
        #[arg(long)]
        encoder: PathBuf,
        #[arg(long)]
        decoder: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        group_count: usize,
        #[arg(long, default_value_t = 256)]
        n_hid: usize,
        #[arg(long, default_value_t = 2)]
        n_blk_per_group: usize,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value_t = 128)]
        n_init: usize,
        #[arg(long, default_value_t = 3)]
        channels: usize,
        #[arg(long, default_value_t = 256)]
        image_size: usize,
    },
    /// Mean PSNR of encode → decode over a dataset's first COUNT images.
    Psnr {
        #[arg(long)]
        vae: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 256)]
        count: usize,
    },
    /// The judge on the argmax round trip (encode → codes → decode) of fixed shapes scenes: the
    /// ceiling a transformer on this dVAE can reach (the training diagnostics' rt_* figures).
    Judge {
        #[arg(long)]
        vae: PathBuf,
        /// Scenes per split (seen and held-out).
        #[arg(long, default_value_t = dalle::vae::train::DIAGNOSTIC_SCENES)]
        scenes: usize,
    },
}

/// The paper's dataset filters.
/// `dalle bench`: every runtime's decode speed against the machine's roofline, the KV cache's
/// gain, training steps, and optionally the PyTorch peer, measured side by side in one run.
#[derive(Args, Debug)]
struct BenchArgs {
    /// A model directory to measure; default: `--preset` with random weights, exported on the fly.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Image grid in tokens per side, replacing the preset's (the image side scales with it):
    /// e.g. `--preset small --grid 32` for a 32×32-token image.
    #[arg(long, conflicts_with = "model")]
    grid: Option<usize>,
    /// Export the preset's random weights in f16, as `dalle export --fp16` does (the floor
    /// then counts 2 bytes a weight).
    #[arg(long, conflicts_with = "model")]
    fp16: bool,
    /// Comma-separated runtimes (candle, tract, ort; cuda and trt where a GPU is present).
    #[arg(long, value_delimiter = ',', default_value = "candle,tract")]
    runtimes: Vec<String>,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Image positions timed without the KV cache (evenly spaced; the rest interpolated).
    #[arg(long, default_value_t = 3)]
    recompute_positions: usize,
    /// Times each image is decoded with the KV cache, at least (more until --decode-seconds
    /// have passed, up to 10× this), each pass with the memory rates measured around it: the
    /// fastest pass gives the whole-image figures, the pass nearest the floor of its own moment
    /// the step times and floor. The peer's generation is the fastest of this many passes.
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Seconds each runtime × batch row keeps decoding after its --passes (see there).
    #[arg(long, default_value_t = 10.0)]
    decode_seconds: f64,
    /// Batch of the training-step timings of both stages; 0 skips them.
    #[arg(long, default_value_t = 8)]
    train_batch: usize,
    /// Timed training steps per stage, ours and the peer's (after one warm-up step each); the
    /// median is reported.
    #[arg(long, default_value_t = 5)]
    train_reps: usize,
    /// Also run a peer implementation in the same invocation: `pytorch` (bench/pytorch_peer.py).
    #[arg(long, value_parser = ["pytorch"])]
    peer: Option<String>,
    /// Python of the peer; default $DALLE_PEER_PYTHON, else target/peer (bench/install-peer.sh).
    #[arg(long)]
    peer_python: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    providers: ProviderArgs,
}

/// The weights' precision of an export: `--fp16` or f32.
fn weights_dtype(fp16: bool) -> dalle_runtimes::Dtype {
    if fp16 {
        dalle_runtimes::Dtype::F16
    } else {
        dalle_runtimes::Dtype::F32
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    let runtimes = a
        .runtimes
        .iter()
        .map(|r| dalle_runtimes::RuntimeKind::parse(r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
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

#[derive(Args, Clone)]
struct FilterArgs {
    /// Reject captions with fewer words.
    #[arg(long, default_value_t = 2)]
    min_caption_words: usize,
    /// Keep captions that the English heuristic rejects.
    #[arg(long)]
    allow_non_english: bool,
    /// Another boilerplate caption pattern (regular expression, case-insensitive); repeatable.
    #[arg(long = "boilerplate")]
    boilerplate: Vec<String>,
    /// Drop the built-in boilerplate patterns.
    #[arg(long)]
    no_default_boilerplate: bool,
}

impl FilterArgs {
    fn build(&self) -> Result<Filters> {
        Filters::new(
            self.min_caption_words,
            !self.allow_non_english,
            &self.boilerplate,
            !self.no_default_boilerplate,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// What both training commands take.
#[derive(Args)]
struct RunArgs {
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    steps: usize,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this step (checkpointing), as if interrupted; continue later with --resume.
    #[arg(long)]
    stop_at: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak learning rate (paper: 1e-4 for the dVAE, 4.5e-4 for the transformer).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 500)]
    sample_every: usize,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    #[command(flatten)]
    filters: FilterArgs,
}

impl RunArgs {
    /// The preset, the device and the checked peak learning rate.
    fn check(&self, batch_size: usize) -> Result<(Config, candle_core::Device, Option<f64>)> {
        let config = Config::preset(&self.preset)?;
        let device = dalle::util::device(&self.device)?;
        if self.steps == 0 || batch_size == 0 {
            bail!("--steps and --batch-size must be at least 1");
        }
        if let Some(lr) = self.lr {
            if !(lr > 0.0 && lr.is_finite()) {
                bail!("--lr must be a positive number (got {lr})");
            }
        }
        Ok((config, device, self.lr))
    }

    fn apply(&self, lp: &mut dalle::train::LoopOptions) {
        lp.checkpoint_every = self.checkpoint_every.max(1);
        lp.sample_every = self.sample_every.max(1);
        lp.log_every = self.log_every.max(1);
    }
}

#[derive(Args)]
struct TrainVaeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Steps over which τ anneals 1 → 1/16 (default: half the run).
    #[arg(long)]
    tau_steps: Option<usize>,
    /// Steps over which β ramps 0 → 6.6 (default: a tenth of the run).
    #[arg(long)]
    beta_steps: Option<usize>,
    /// Final KL weight β (paper: 6.6).
    #[arg(long, default_value_t = 6.6)]
    beta_max: f64,
    /// Starting gumbel-softmax temperature (paper: 1).
    #[arg(long, default_value_t = 1.0)]
    tau_start: f64,
    /// Final gumbel-softmax temperature, the floor τ anneals to (paper: 1/16).
    #[arg(long, default_value_t = 1.0 / 16.0)]
    tau_end: f64,
    /// Update at which the β ramp starts (paper: 0): e.g. once reconstructions are good.
    #[arg(long, default_value_t = 0)]
    beta_start: usize,
    /// Scale of the dVAE's residual branches (default: dall_e's 1 / n_layers²); stored in the
    /// run's config.json, so export and every runtime use it.
    #[arg(long, allow_negative_numbers = true)]
    post_gain: Option<f64>,
    /// Width of the dVAE's first group (default: the preset's), stored in config.json.
    #[arg(long)]
    n_hid: Option<usize>,
    /// Residual blocks per dVAE group (default: the preset's), stored in config.json.
    #[arg(long)]
    blocks_per_group: Option<usize>,
    /// Codebook size, the image vocabulary (default: the preset's), stored in config.json; stage 2
    /// takes it from the dVAE.
    #[arg(long)]
    codebook: Option<usize>,
    /// Gumbel noise multiplier: 1 is the paper, 0 a noise-free softmax relaxation.
    #[arg(long, default_value_t = 1.0)]
    gumbel_scale: f64,
    /// Decode the one-hot argmax with straight-through gradients (not in the paper).
    #[arg(long)]
    straight_through: bool,
    /// Start the encoder's output conv as k-means centroids of its initial features (not in the
    /// paper).
    #[arg(long)]
    kmeans_init: bool,
    /// Train the decoder alone against the initial (e.g. --kmeans-init) encoder (not in the paper).
    #[arg(long)]
    freeze_encoder: bool,
    /// From this update on, freeze the encoder and train the decoder on the argmax codes that
    /// stage 2 and the runtimes decode, instead of relaxed samples (not in the paper).
    #[arg(long)]
    decoder_finetune_from: Option<usize>,
    /// Reconstruction likelihood (paper: logit-laplace).
    #[arg(long, value_enum, default_value = "logit-laplace")]
    likelihood: dalle::vae::loss::Likelihood,
    /// Extra reconstruction weight on object pixels: those that differ from the image's
    /// border colour, and their rim (0: the paper's unweighted likelihood; not in the paper).
    #[arg(long, default_value_t = 0.0)]
    foreground_weight: f64,
    /// Extra reconstruction weight on edge pixels, both sides of every boundary (0: the paper's
    /// unweighted likelihood; not in the paper). The field keeps weight 1.
    #[arg(long, default_value_t = 0.0)]
    edge_weight: f64,
    /// Fraction of latent positions, drawn each update, that the decoder sees as hard one-hot
    /// codes with straight-through gradients (0: the paper; 1: --straight-through).
    #[arg(long, default_value_t = 0.0)]
    hard_fraction: f64,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The trained dVAE directory.
    #[arg(long)]
    vae: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Probability of the empty caption per sample (for classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// BPE-dropout rate (paper: 0.1); resume is bit-exact only at 0.
    #[arg(long, default_value_t = 0.1)]
    bpe_dropout: f32,
    /// Held-out data (same format as --data): its loss (EMA weights, up to 256 samples) is
    /// measured at every sample step and joins metrics.csv and the curves.
    #[arg(long)]
    eval_data: Option<PathBuf>,
}

fn train(a: TrainArgs) -> Result<()> {
    let (config, device, lr) = a.run.check(a.batch_size)?;
    if !(0.0..=1.0).contains(&a.caption_dropout) {
        bail!(
            "--caption-dropout must be in [0, 1] (got {})",
            a.caption_dropout
        );
    }
    use dalle::transformer::train::{
        train_transformer, TransformerTrainOptions, TransformerTrainRequest,
    };
    // Activation memory of one update (saved activations of every layer, attention
    // probabilities, logits and their gradients), so that only what cannot fit is refused.
    let (g, t) = (&config.geometry, &config.transformer);
    let seq = (g.text_len + g.grid * g.grid) as u64;
    let vocab = (g.text_vocab + g.text_len + g.codebook) as u64;
    let per_seq = 4
        * (t.n_layers as u64 * (seq * t.d_model as u64 * 40 + 3 * t.n_heads as u64 * seq * seq)
            + 3 * seq * vocab);
    dalle_runtimes::memory::check(
        per_seq.saturating_mul(a.batch_size as u64),
        &format!("a transformer update of batch {}", a.batch_size),
        "use a smaller --batch-size",
    )
    .map_err(|m| anyhow::anyhow!(m))?;
    let mut options = TransformerTrainOptions::new(a.run.steps, a.batch_size, a.run.seed);
    if let Some(lr) = lr {
        options.lr_end = lr * options.lr_end / options.lr_peak;
        options.lr_peak = lr;
    }
    options.caption_dropout = a.caption_dropout;
    options.bpe_dropout = a.bpe_dropout;
    a.run.apply(&mut options.lp);
    let s = train_transformer(TransformerTrainRequest {
        config,
        vae: a.vae,
        data: a.run.data.clone(),
        out: a.run.out.clone(),
        eval_data: a.eval_data.clone(),
        options,
        resume: a.run.resume,
        stop_at: a.run.stop_at,
        device,
        filters: a.run.filters.build()?,
    })?;
    report(&s, &a.run.out);
    Ok(())
}

fn report(s: &dalle::train::Summary, out: &std::path::Path) {
    let metrics: Vec<String> = s
        .metrics
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    println!(
        "step {}: {}; {:.2} steps/s; peak RSS {}; checkpoint in {}",
        s.step,
        metrics.join(", "),
        s.steps_per_sec,
        s.peak_rss_bytes.map_or("unknown".into(), |b| format!(
            "{:.0} MiB",
            b as f64 / (1 << 20) as f64
        )),
        out.display()
    );
}

#[derive(Args)]
struct GenerateArgs {
    /// The caption (may be empty: unconditional).
    prompt: Option<String>,
    /// Read the caption from a UTF-8 file instead.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// candle, tract, ort, cuda or trt; default tract with --model, candle with --checkpoint.
    #[arg(long)]
    runtime: Option<String>,
    /// An exported model directory (`dalle export`); default: the bundled `models/shapes-tiny`.
    #[arg(long, conflicts_with = "checkpoint")]
    model: Option<PathBuf>,
    /// A `dalle train` run directory (candle only).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Device of the candle runtime: cpu, or cuda in a `--features cuda` build.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    providers: ProviderArgs,
    #[arg(long, default_value_t = 4)]
    num_images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature; default: the model's manifest, else 1.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Keep the k most likely tokens; default: the model's manifest, else all.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling (1: off); default: the model's manifest.
    #[arg(long)]
    top_p: Option<f32>,
    /// Classifier-free guidance (1: none); default: the model's manifest, else 1.
    #[arg(long, allow_negative_numbers = true)]
    guidance_scale: Option<f32>,
    /// Keep the first --prime-rows token rows of this image and generate the rest.
    #[arg(long, requires = "prime_rows")]
    prime_image: Option<PathBuf>,
    #[arg(long, requires = "prime_image")]
    prime_rows: Option<usize>,
    /// Also write the generated token grids as JSON.
    #[arg(long)]
    save_tokens: Option<PathBuf>,
    /// A caption longer than the model's text length is an error instead of a warning.
    #[arg(long)]
    strict: bool,
    /// The PNG to write. An existing regular file there is replaced (atomically); a symbolic
    /// link, directory, device or FIFO is refused, never replaced.
    #[arg(long)]
    out: PathBuf,
}

/// ONNX Runtime execution-provider options.
#[derive(clap::Args, Debug, Clone)]
struct ProviderArgs {
    /// When CUDA / TensorRT cannot be registered, warn and run on CPU instead of failing.
    #[arg(long)]
    allow_fallback: bool,
    /// TensorRT: build FP16 engines.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: cache built engines in this directory.
    #[arg(long)]
    trt_cache: Option<PathBuf>,
}

impl ProviderArgs {
    fn options(&self) -> dalle_runtimes::OpenOptions {
        dalle_runtimes::OpenOptions {
            allow_fallback: self.allow_fallback,
            trt_fp16: self.trt_fp16,
            trt_cache_dir: self.trt_cache.clone(),
        }
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let model = match (&a.model, &a.checkpoint) {
        (Some(m), _) => Some(m.clone()),
        (None, None) => Some(dalle::bundled_model()?),
        (None, Some(_)) => None,
    };
    let runtime = a
        .runtime
        .clone()
        .unwrap_or_else(|| if model.is_some() { "tract" } else { "candle" }.to_string());
    let kind = dalle_runtimes::RuntimeKind::parse(&runtime)?;
    if a.checkpoint.is_some() && kind != dalle_runtimes::RuntimeKind::Candle {
        bail!("--checkpoint runs on candle only; export the run with `dalle export` and pass --model for --runtime {runtime}");
    }
    // A model directory's manifest supplies the defaults; a checkpoint has none.
    let defaults = match &model {
        Some(m) => dalle_runtimes::Manifest::load(m)?.sampling,
        None => dalle_runtimes::SamplingDefaults::default(),
    };
    let params = dalle_runtimes::SamplingParams {
        temperature: a.temperature.unwrap_or(defaults.temperature),
        top_k: a.top_k.or(defaults.top_k),
        top_p: a.top_p.or(defaults.top_p),
    };
    params.validate()?;
    let guidance_scale = a.guidance_scale.unwrap_or(defaults.guidance_scale);
    let prompt = match (&a.prompt, &a.prompt_file) {
        (_, Some(f)) => {
            let bytes = std::fs::read(f)
                .with_context(|| format!("cannot read prompt file {}", f.display()))?;
            String::from_utf8(bytes)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "prompt file {} is not UTF-8 (byte {})",
                        f.display(),
                        e.utf8_error().valid_up_to()
                    )
                })?
                .trim()
                .to_string()
        }
        (Some(p), None) => p.clone(),
        (None, None) => String::new(),
    };
    if let Some(at) = prompt.find(|c: char| c.is_control() && !c.is_whitespace()) {
        bail!(
            "the prompt has a control character (byte {at}: {:?}); remove it and try again",
            prompt[at..].chars().next().unwrap_or('\0')
        );
    }
    // An output we cannot write fails now, not after the images are made.
    dalle::fsutil::refuse_non_regular(&a.out)?;
    dalle::plot::image_format(&a.out)?;
    if let Some(model) = &model {
        return generate_model(&a, model, kind, &prompt, params, guidance_scale);
    }
    let device = dalle::util::device(&a.device)?;
    let dir = a
        .checkpoint
        .as_ref()
        .expect("no model directory means a checkpoint");
    let config = Config::load(&dir.join("config.json"))
        .with_context(|| format!("{} is not a `dalle train` run", dir.display()))?;
    let weights = dalle::vae::io::read_f32(&dir.join("transformer.safetensors"), &device)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &device);
    let model = dalle::transformer::Transformer::new(&config, vb).with_context(|| {
        format!(
            "{}: transformer.safetensors does not match config.json",
            dir.display()
        )
    })?;
    let tokenizer = dalle::text::load(&dir.join("tokenizer.json"))?;
    let vae = Vae::load(&dir.join("vae"), &device)?;
    let layout = model.layout();
    let bpe = dalle::text::encode(&tokenizer, &prompt)?;
    let (text, truncated) = layout.caption(&bpe).map_err(|id| {
        anyhow::anyhow!("tokenizer id {id} is outside the model's text vocabulary")
    })?;
    if truncated {
        let msg = format!(
            "the prompt is {} tokens; the model reads the first {}",
            bpe.len(),
            layout.text_len
        );
        if a.strict {
            bail!("{msg} (--strict)");
        }
        eprintln!("warning: {msg}");
    }
    let mut prime = vec![];
    if let (Some(img), Some(rows)) = (&a.prime_image, a.prime_rows) {
        if rows == 0 || rows >= vae.grid() {
            bail!(
                "--prime-rows must be between 1 and {} (got {rows})",
                vae.grid() - 1
            );
        }
        let image = dalle::data::load_square(img, vae.image_size())?;
        prime = vae.encode(&[image])?.remove(0);
        prime.truncate(rows * vae.grid());
    }
    let req = dalle::transformer::generate::Request {
        text,
        num_images: a.num_images,
        params,
        seed: a.seed,
        guidance_scale,
        prime,
    };
    let codes = dalle::transformer::generate::generate(&model, &req, &device)?;
    if let Some(path) = &a.save_tokens {
        let rows: Vec<Vec<&[u32]>> = codes
            .iter()
            .map(|c| c.chunks(vae.grid()).collect())
            .collect();
        let json = serde_json::json!({ "grid": vae.grid(), "prompt": prompt, "images": rows });
        dalle::fsutil::write_bytes_atomic(path, json.to_string().as_bytes())?;
    }
    let images = vae.decode(&codes)?;
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    dalle::plot::save_image(&dalle::plot::grid(&images, cols), &a.out)?;
    println!(
        "wrote {} image(s) for {prompt:?} to {}",
        images.len(),
        a.out.display()
    );
    Ok(())
}

/// `dalle generate --model DIR`: any runtime through the shared `Generator`.
fn generate_model(
    a: &GenerateArgs,
    model: &std::path::Path,
    kind: dalle_runtimes::RuntimeKind,
    prompt: &str,
    params: dalle_runtimes::SamplingParams,
    guidance_scale: f32,
) -> Result<()> {
    let device = dalle::util::device(&a.device)?;
    let gen = dalle::runtime::open_on(model, kind, &a.providers.options(), &device)?;
    let m = gen.manifest().clone();
    let mut prime = vec![];
    if let (Some(img), Some(rows)) = (&a.prime_image, a.prime_rows) {
        let grid = m.geometry.grid;
        if rows == 0 || rows >= grid {
            bail!(
                "--prime-rows must be between 1 and {} (got {rows})",
                grid - 1
            );
        }
        let image = dalle::data::load_square(img, m.geometry.image_size as u32)?;
        let x = dalle::data::images_to_tensor(&[image], &candle_core::Device::Cpu)?;
        let pixels: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let codes = gen.session().encode(&pixels, 1)?;
        prime = codes[..rows * grid].iter().map(|&c| c as u32).collect();
    }
    let req = dalle_runtimes::Request {
        prompt: prompt.to_string(),
        num_images: a.num_images,
        params,
        seed: a.seed,
        guidance_scale,
        prime,
        strict: a.strict,
    };
    let (_, truncated) = gen.caption(prompt)?;
    if truncated && !a.strict {
        eprintln!(
            "warning: the prompt is longer than the model's {} caption tokens; the rest is dropped",
            m.geometry.text_len
        );
    }
    let start = std::time::Instant::now();
    let mut progress = |done: usize, total: usize| {
        if done == total || done.is_multiple_of(8) {
            eprint!("\r{}: image tokens {done}/{total}", gen.session().name());
        }
    };
    let out = gen.generate_with(&req, &mut progress)?;
    eprintln!(" ({:.2} s)", start.elapsed().as_secs_f64());
    if let Some(path) = &a.save_tokens {
        let grid = m.geometry.grid;
        let rows: Vec<Vec<&[u32]>> = out.codes.iter().map(|c| c.chunks(grid).collect()).collect();
        let json = serde_json::json!({ "grid": grid, "prompt": prompt, "images": rows });
        dalle::fsutil::write_bytes_atomic(path, json.to_string().as_bytes())?;
    }
    let images: Vec<image::RgbImage> = out
        .images
        .into_iter()
        .map(|i| image::RgbImage::from_raw(i.width, i.height, i.rgb).expect("3 bytes a pixel"))
        .collect();
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    dalle::plot::save_image(&dalle::plot::grid(&images, cols), &a.out)?;
    println!(
        "wrote {} image(s) for {prompt:?} to {} ({})",
        images.len(),
        a.out.display(),
        kind.name()
    );
    Ok(())
}

fn train_vae(a: TrainVaeArgs) -> Result<()> {
    let (mut config, device, lr) = a.run.check(a.batch_size)?;
    if a.post_gain.is_some()
        || a.n_hid.is_some()
        || a.blocks_per_group.is_some()
        || a.codebook.is_some()
    {
        config.vae.post_gain = a.post_gain.or(config.vae.post_gain);
        config.vae.n_hid = a.n_hid.unwrap_or(config.vae.n_hid);
        config.vae.n_blk_per_group = a.blocks_per_group.unwrap_or(config.vae.n_blk_per_group);
        config.vae.vocab_size = a.codebook.unwrap_or(config.vae.vocab_size);
        config.geometry.codebook = config.vae.vocab_size;
        config.validate()?;
    }
    // Activation memory of one update, a slight underestimate (the `shapes` preset's batch 32
    // measured 2.3 GB peak; this says 1.6 GB), so only what cannot fit is refused.
    // Plus the code logits and their relaxed samples (~6 tensors of codebook × grid² a picture),
    // and the weights with their gradients, Adam moments and EMA (5 copies).
    let g = &config.geometry;
    let per_image = 48 * 4 * (g.image_size as u64).pow(2) * config.vae.n_hid as u64
        + 6 * 4 * (g.codebook as u64) * (g.grid as u64).pow(2);
    let weights = 5 * 4 * (config.vae.encoder_params() + config.vae.decoder_params()) as u64;
    dalle_runtimes::memory::check(
        per_image
            .saturating_mul(a.batch_size as u64)
            .saturating_add(weights),
        &format!("a dVAE update of batch {}", a.batch_size),
        "use a smaller --batch-size (or --codebook, --n-hid)",
    )
    .map_err(|m| anyhow::anyhow!(m))?;
    let mut options = VaeTrainOptions::new(a.run.steps, a.batch_size, a.run.seed);
    if let Some(lr) = lr {
        options.schedule.lr_end = lr * (options.schedule.lr_end / options.schedule.lr_start);
        options.schedule.lr_start = lr;
    }
    options.schedule.tau_steps = a.tau_steps.unwrap_or(options.schedule.tau_steps).max(1);
    options.schedule.beta_steps = a.beta_steps.unwrap_or(options.schedule.beta_steps).max(1);
    for (flag, v) in [
        ("--beta-max", a.beta_max),
        ("--tau-start", a.tau_start),
        ("--tau-end", a.tau_end),
        ("--gumbel-scale", a.gumbel_scale),
        ("--foreground-weight", a.foreground_weight),
        ("--edge-weight", a.edge_weight),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{flag} must be a finite number ≥ 0 (got {v})");
        }
    }
    if a.tau_start == 0.0 || a.tau_end == 0.0 {
        bail!("--tau-start and --tau-end must be above 0 (got 0)");
    }
    options.schedule.beta_max = a.beta_max;
    options.schedule.tau_start = a.tau_start;
    options.schedule.tau_end = a.tau_end;
    options.schedule.beta_start = a.beta_start;
    options.schedule.gumbel_scale = a.gumbel_scale;
    options.schedule.likelihood = a.likelihood;
    options.schedule.straight_through = a.straight_through;
    options.schedule.kmeans_init = a.kmeans_init;
    options.schedule.freeze_encoder = a.freeze_encoder;
    options.schedule.decoder_finetune_from = a.decoder_finetune_from;
    options.schedule.foreground_weight = a.foreground_weight;
    options.schedule.edge_weight = a.edge_weight;
    if !(0.0..=1.0).contains(&a.hard_fraction) {
        bail!(
            "--hard-fraction must be from 0 to 1 (got {})",
            a.hard_fraction
        );
    }
    options.schedule.hard_fraction = a.hard_fraction;
    a.run.apply(&mut options.lp);
    let summary = dalle::vae::train::train_vae(VaeTrainRequest {
        config,
        data: a.run.data.clone(),
        out: a.run.out.clone(),
        options,
        resume: a.run.resume,
        stop_at: a.run.stop_at,
        device,
        filters: a.run.filters.build()?,
    })?;
    report(&summary, &a.run.out);
    Ok(())
}

fn info(preset: &str, json: bool) -> Result<()> {
    let c = Config::preset(preset)?;
    let (enc, dec, tf) = (
        c.vae.encoder_params(),
        c.vae.decoder_params(),
        c.transformer_params(),
    );
    if json {
        let v = serde_json::json!({
            "config": c, "params": { "dvae_encoder": enc, "dvae_decoder": dec, "transformer": tf }
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let g = &c.geometry;
    let t = &c.transformer;
    println!("preset {}", c.preset);
    println!(
        "  image          {0}×{0} px → {1}×{1} tokens (codebook {2})",
        g.image_size, g.grid, g.codebook
    );
    println!(
        "  text           {} tokens, BPE vocab {}",
        g.text_len, g.text_vocab
    );
    println!(
        "  sequence       {} = {} text + {} image",
        g.seq_len(),
        g.text_len,
        g.image_tokens()
    );
    println!(
        "  dVAE           group_count {} n_hid {} n_blk_per_group {} n_init {}",
        c.vae.group_count, c.vae.n_hid, c.vae.n_blk_per_group, c.vae.n_init
    );
    println!(
        "  transformer    d_model {} layers {} heads {} conv kernel {}",
        t.d_model, t.n_layers, t.n_heads, t.conv_kernel
    );
    println!("  params         dVAE encoder {enc}, decoder {dec}, transformer {tf}");
    Ok(())
}

fn masks(text_len: usize, grid: usize, kind: &str, kernel: usize, json: bool) -> Result<()> {
    use dalle_runtimes::AttentionKind;
    if grid == 0 {
        bail!("--grid must be at least 1");
    }
    if (text_len + grid * grid) > 4096 {
        bail!(
            "a {0}×{0} matrix is too large to print; use a smaller --grid or --text-len",
            text_len + grid * grid
        );
    }
    let kind = match kind {
        "row" => AttentionKind::Row,
        "column" => AttentionKind::Column,
        _ if kernel.is_multiple_of(2) => bail!("--kernel must be odd (got {kernel})"),
        _ => AttentionKind::Conv { kernel },
    };
    let m = dalle_runtimes::mask_matrix(text_len, grid, kind);
    if json {
        let rows: Vec<Vec<u8>> = m
            .iter()
            .map(|r| r.iter().map(|&b| b as u8).collect())
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        for row in &m {
            println!(
                "{}",
                row.iter()
                    .map(|&b| if b { '█' } else { '·' })
                    .collect::<String>()
            );
        }
    }
    Ok(())
}

/// The image tokenizer of `encode`, `decode` and `reconstruct`: a dVAE run's weights on candle,
/// or an exported model directory's dVAE graphs on tract.
enum ImageCodec {
    Weights(Box<Vae>),
    Model(Box<dalle_runtimes::Generator>),
}

impl ImageCodec {
    fn open(dir: &std::path::Path) -> Result<Self> {
        if dir.join(dalle_runtimes::names::MANIFEST).exists() {
            let opts = dalle_runtimes::OpenOptions::default();
            let kind = dalle_runtimes::RuntimeKind::Tract;
            return Ok(ImageCodec::Model(Box::new(dalle::runtime::open(
                dir, kind, &opts,
            )?)));
        }
        let vae = Vae::load(dir, &candle_core::Device::Cpu)?;
        Ok(ImageCodec::Weights(Box::new(vae)))
    }

    fn image_size(&self) -> u32 {
        match self {
            ImageCodec::Weights(v) => v.image_size(),
            ImageCodec::Model(g) => g.manifest().geometry.image_size as u32,
        }
    }

    fn grid(&self) -> usize {
        match self {
            ImageCodec::Weights(v) => v.grid(),
            ImageCodec::Model(g) => g.manifest().geometry.grid,
        }
    }

    fn encode(&self, images: &[image::RgbImage]) -> Result<Vec<Vec<u32>>> {
        match self {
            ImageCodec::Weights(v) => Ok(v.encode(images)?),
            ImageCodec::Model(g) => {
                let x = dalle::data::images_to_tensor(images, &candle_core::Device::Cpu)?;
                let codes = g
                    .session()
                    .encode(&x.flatten_all()?.to_vec1()?, images.len())?;
                let n = self.grid() * self.grid();
                Ok(codes
                    .chunks(n)
                    .map(|c| c.iter().map(|&t| t as u32).collect())
                    .collect())
            }
        }
    }

    fn decode(&self, tokens: &[Vec<u32>]) -> Result<Vec<image::RgbImage>> {
        match self {
            ImageCodec::Weights(v) => Ok(v.decode(tokens)?),
            ImageCodec::Model(g) => {
                let m = g.manifest();
                let n = m.geometry.image_tokens();
                for t in tokens {
                    if t.len() != n {
                        bail!(
                            "expected {n} tokens ({0}×{0} grid), got {1}",
                            m.geometry.grid,
                            t.len()
                        );
                    }
                    if let Some(bad) = t.iter().find(|&&c| c as usize >= m.geometry.codebook) {
                        bail!(
                            "token {bad} is outside the codebook (0..{})",
                            m.geometry.codebook
                        );
                    }
                }
                let flat: Vec<i64> = tokens.iter().flatten().map(|&t| t as i64).collect();
                let pixels = g.session().decode(&flat, tokens.len())?;
                Ok(dalle_runtimes::generator::to_images(
                    &pixels,
                    tokens.len(),
                    m.geometry.image_size,
                )
                .into_iter()
                .map(|i| {
                    image::RgbImage::from_raw(i.width, i.height, i.rgb).expect("3 bytes a pixel")
                })
                .collect())
            }
        }
    }
}

fn parse_tokens(path: &PathBuf) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    Ok(dalle::vae::io::parse_token_file(&text, path)?)
}

fn main() {
    dalle::util::pin_thread_count();
    dalle::util::tune_allocator();
    if std::env::var_os("DALLE_SYSTEM_ALLOC").is_some() {
        dalle::alloc::forbid_reuse();
    }
    dalle::util::default_sigpipe();
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // clap reads `--seed -1` as an unknown flag `-1` and suggests `-- -1`, which would make
        // it a prompt; say what is wrong instead.
        if e.kind() == clap::error::ErrorKind::UnknownArgument {
            let negative = std::env::args()
                .skip(1)
                .collect::<Vec<_>>()
                .windows(2)
                .find_map(|w| {
                    (w[0].starts_with("--") && w[1].starts_with('-') && w[1].parse::<f64>().is_ok())
                        .then(|| (w[0].clone(), w[1].clone()))
                });
            if let Some((flag, value)) = negative {
                eprintln!("error: {flag} {value}: {flag} does not take a negative number");
                std::process::exit(2);
            }
        }
        e.exit()
    });
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let cpu = candle_core::Device::Cpu;
    match cli.command {
        Command::Info { preset, json } => info(&preset, json)?,
        Command::Masks {
            text_len,
            grid,
            kind,
            kernel,
            json,
        } => masks(text_len, grid, &kind, kernel, json)?,
        Command::Data(DataCommand::Shapes {
            out,
            count,
            seed,
            split,
            image_size,
            force,
        }) => {
            if !(16..=MAX_SHAPES_SIZE).contains(&image_size) {
                bail!(
                    "--image-size must be from 16 to {MAX_SHAPES_SIZE} pixels (got {image_size})"
                );
            }
            if count == 0 {
                bail!("--count must be at least 1 (got 0)");
            }
            dalle::data::shapes::write_set(&out, count, seed, split, image_size, force)?;
            println!("wrote {count} {split:?} samples to {}", out.display());
        }
        Command::Data(DataCommand::Stats { dir, filters, json }) => {
            let idx = Index::scan(&dir, &filters.build()?, true)?;
            if json {
                let v = serde_json::json!({ "seen": idx.seen, "usable": idx.samples.len(), "skipped": idx.skips });
                println!("{v}");
            } else {
                print!("{}", idx.report());
            }
        }
        Command::Bench(a) => bench(a)?,
        Command::TrainVae(a) => {
            let _reuse = dalle::alloc::ReuseGuard::new();
            train_vae(a)?
        }
        Command::Train(a) => {
            let _reuse = dalle::alloc::ReuseGuard::new();
            train(a)?
        }
        Command::Generate(a) => generate(a)?,
        Command::Eval {
            model,
            benchmark: _,
            runtime,
            samples,
            guidance,
            top_k,
            json,
            grid,
            providers,
        } => {
            if samples == 0 {
                bail!("--samples must be at least 1");
            }
            if let Some(dir) = grid.as_deref().and_then(std::path::Path::parent) {
                // Fail before the evaluation, not after it.
                if !dir.as_os_str().is_empty() && !dir.is_dir() {
                    bail!("--grid: directory {} does not exist", dir.display());
                }
            }
            let kind = dalle_runtimes::RuntimeKind::parse(&runtime)?;
            let model = match model {
                Some(m) => m,
                None => dalle::bundled_model()?,
            };
            let gen = dalle::runtime::open(&model, kind, &providers.options())?;
            let truth =
                dalle::eval::ground_truth(samples, gen.manifest().geometry.image_size as u32);
            let scores =
                dalle::eval::shapes(&gen, samples, &guidance, top_k, &mut |l| eprintln!("{l}"))?;
            let (psnr, round_trip) = dalle::eval::dvae_round_trip(&gen, samples)?;
            let mut examples = vec![];
            if let Some(path) = &grid {
                let top = guidance[0];
                let rows: Vec<&dalle::eval::Score> =
                    scores.iter().filter(|s| s.guidance_scale == top).collect();
                dalle::plot::save_png(&dalle::eval::example_grid(&rows), path)?;
                for s in &rows {
                    for (caption, _) in &s.examples {
                        examples.push(serde_json::json!({ "split": s.split, "caption": caption }));
                    }
                }
                eprintln!(
                    "wrote the example grid to {} (guidance {top})",
                    path.display()
                );
            }
            if json {
                let v = serde_json::json!({ "runtime": runtime, "samples": samples, "scores": scores, "judge_on_ground_truth": truth, "judge_on_dvae_round_trip": round_trip, "dvae_psnr_heldout_db": psnr, "grid_examples": examples });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let attrs = ["colour", "shape", "size", "position", "count", "relation"];
                print!("{:<9} {:>8}", "split", "guidance");
                for a in attrs {
                    print!(" {a:>8}");
                }
                println!(" {:>8}", "correct");
                let row = |s: &dalle::eval::Score, g: String| {
                    print!("{:<9} {g:>8}", s.split);
                    for a in attrs {
                        match s.attributes.get(a) {
                            Some(&(ok, n)) => print!(" {:>7.1}%", 100.0 * ok as f64 / n as f64),
                            None => print!(" {:>8}", "-"),
                        }
                    }
                    println!(" {:>7.1}%", 100.0 * s.accuracy());
                };
                for s in &scores {
                    row(s, format!("{}", s.guidance_scale));
                }
                for s in &round_trip {
                    row(s, "dvae".into());
                }
                for s in &truth {
                    row(s, "truth".into());
                }
                println!(
                    "({samples} scenes per split; `dvae` = the judge on the renders after the dVAE \
                     round trip, `truth` = on the renders themselves)"
                );
                println!("dVAE round trip on {samples} held-out renders: PSNR {psnr:.2} dB");
                for (i, e) in examples.iter().enumerate() {
                    println!(
                        "grid {i}: [{}] {}",
                        e["split"].as_str().unwrap_or(""),
                        e["caption"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Command::Parity {
            model,
            runtimes,
            prompt,
            json,
            providers,
        } => {
            if runtimes.len() < 2 {
                bail!("--runtimes needs at least two runtimes to compare (got {runtimes:?})");
            }
            let gens = runtimes
                .iter()
                .map(|r| {
                    let kind = dalle_runtimes::RuntimeKind::parse(r)?;
                    Ok(dalle::runtime::open(&model, kind, &providers.options())?)
                })
                .collect::<Result<Vec<_>>>()?;
            let rows = dalle::parity::compare(&gens, &prompt)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<10} {:<10} {:>14} {:>14} {:>14}  result",
                    "reference", "runtime", "logits max|Δ|", "greedy tokens", "image max|Δ|"
                );
                for r in &rows {
                    println!(
                        "{:<10} {:<10} {:>14.2e} {:>14} {:>14.2e}  {}",
                        r.reference,
                        r.runtime,
                        r.logits_max_abs_diff,
                        if r.greedy_tokens_identical {
                            "identical"
                        } else {
                            "DIFFER"
                        },
                        r.image_max_abs_diff,
                        if r.pass { "pass" } else { "FAIL" }
                    );
                }
                if let Some(r) = rows.first() {
                    println!(
                        "tolerances ({} weights): logits {:.1e}, image {:.1e}, greedy tokens identical",
                        gens[0].manifest().dtype,
                        r.tolerances.logits,
                        r.tolerances.image
                    );
                }
            }
            if rows.iter().any(|r| !r.pass) {
                bail!(
                    "parity failed: a runtime differs from {} beyond tolerance",
                    runtimes[0]
                );
            }
        }
        Command::Setup(SetupCommand::Ort { gpu, dir }) => {
            let dir = dir.unwrap_or_else(|| dalle_runtimes::ort::library_dir(gpu));
            let lib = dalle::setup::ort(gpu, &dir)?;
            println!(
                "ONNX Runtime {} ready: {}",
                dalle_runtimes::ort::ORT_VERSION,
                lib.display()
            );
            if std::env::var_os("ORT_DYLIB_PATH").is_some() {
                eprintln!("note: ORT_DYLIB_PATH is set and takes precedence over this directory");
            }
        }
        Command::Export {
            transformer,
            vae,
            from_model,
            out,
            opset,
            fp16,
            force,
            external_data_threshold,
            guidance_scale,
            top_k,
            top_p,
            temperature,
        } => {
            let sampling = dalle_runtimes::SamplingDefaults {
                temperature,
                top_k,
                top_p,
                guidance_scale,
            };
            sampling.params().validate()?;
            if !(guidance_scale.is_finite() && guidance_scale >= 0.0) {
                bail!("--guidance-scale must be a finite number ≥ 0 (got {guidance_scale})");
            }
            let opts = dalle_export::ExportOptions {
                opset,
                dtype: weights_dtype(fp16),
                force,
                external_data_threshold,
            };
            let mut progress = |line: &str| eprintln!("{line}");
            let m = match (&from_model, &transformer) {
                (Some(dir), _) => {
                    let input = dalle::export::load_model_dir(dir)?;
                    dalle_export::export(&input, &out, &opts, &mut progress)?
                }
                (None, Some(run)) => dalle::export::export_with_sampling(
                    run,
                    vae.as_deref(),
                    &out,
                    &opts,
                    sampling,
                    &mut progress,
                )?,
                (None, None) => bail!("give --transformer RUN_DIR or --from-model MODEL_DIR"),
            };
            println!(
                "exported {} ({} layers, {}, opset {}) to {}",
                m.preset,
                m.transformer.n_layers,
                m.dtype,
                m.opset,
                out.display()
            );
        }
        Command::Tokenizer(TokenizerCommand::Train {
            data,
            vocab,
            out,
            min_frequency,
            filters,
        }) => {
            let idx = Index::scan(&data, &filters.build()?, false)?;
            if idx.samples.is_empty() {
                bail!(
                    "dataset {} has no usable captions ({} skipped)",
                    data.display(),
                    idx.skipped()
                );
            }
            let captions: Vec<String> = idx.samples.into_iter().map(|s| s.text).collect();
            let tok = dalle::text::train(&captions, vocab, min_frequency)?;
            dalle::text::save(&tok, &out)?;
            println!(
                "trained a {}-id BPE tokenizer on {} captions → {}",
                dalle::text::vocab_size(&tok),
                captions.len(),
                out.display()
            );
        }
        Command::Vae(VaeCommand::ImportOpenai {
            encoder,
            decoder,
            out,
            group_count,
            n_hid,
            n_blk_per_group,
            vocab_size,
            n_init,
            channels,
            image_size,
        }) => {
            let vae = VaeConfig {
                group_count,
                n_hid,
                n_blk_per_group,
                vocab_size,
                n_init,
                channels,
                post_gain: None,
            };
            let c = dalle::vae::io::import_openai(&encoder, &decoder, vae, image_size, &out)?;
            println!(
                "imported OpenAI dVAE ({0}px → {1}×{1} tokens) into {2}",
                c.geometry.image_size,
                c.geometry.grid,
                out.display()
            );
        }
        Command::Vae(VaeCommand::Judge { vae, scenes }) => {
            if scenes == 0 {
                bail!("--scenes must be at least 1 (got 0)");
            }
            let vae = Vae::load(&vae, &cpu)?;
            let rt = dalle::vae::train::round_trip_diagnostics(&vae, scenes)?;
            let line: Vec<String> = rt
                .metrics()
                .iter()
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            println!("{}", line.join("  "));
            // What the round trip gets wrong: fully correct scenes by the objects they hold,
            // worst first.
            let mut kinds: Vec<_> = rt.by_kind.iter().collect();
            kinds.sort_by(|a, b| {
                let rate = |(ok, n): (usize, usize)| ok as f64 / n.max(1) as f64;
                rate(*a.1).total_cmp(&rate(*b.1)).then(a.0.cmp(b.0))
            });
            println!("fully correct scenes by what they hold (worst first):");
            for (kind, (ok, n)) in kinds {
                let pct = 100.0 * *ok as f64 / (*n).max(1) as f64;
                println!("  {kind:<16} {pct:5.1}%  ({ok} of {n})");
            }
        }
        Command::Vae(VaeCommand::Psnr { vae, data, count }) => {
            let vae = Vae::load(&vae, &cpu)?;
            let (db, n) = dalle::vae::train::psnr(&vae, &data, count)?;
            println!("PSNR {db:.2} dB over {n} images");
        }
        Command::Encode { vae, input, json } => {
            let vae = ImageCodec::open(&vae)?;
            let img = dalle::data::load_square(&input, vae.image_size())?;
            let tokens = vae.encode(&[img])?.remove(0);
            let rows: Vec<&[u32]> = tokens.chunks(vae.grid()).collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "grid": vae.grid(), "tokens": rows })
                );
            } else {
                for r in rows {
                    println!(
                        "{}",
                        r.iter().map(|t| format!("{t:>5}")).collect::<String>()
                    );
                }
            }
        }
        Command::Decode { vae, tokens, out } => {
            let vae = ImageCodec::open(&vae)?;
            let ids = parse_tokens(&tokens)?;
            if ids.is_empty() {
                bail!("{}: lists no images", tokens.display());
            }
            let images = vae
                .decode(&ids)
                .with_context(|| format!("cannot decode {}", tokens.display()))?;
            let img = match images.as_slice() {
                [one] => one.clone(),
                many => dalle::plot::grid(many, (many.len() as f64).sqrt().ceil() as usize),
            };
            dalle::plot::save_image(&img, &out)?;
            println!("wrote {}", out.display());
        }
        Command::Reconstruct { vae, input, out } => {
            let vae = ImageCodec::open(&vae)?;
            let img = dalle::data::load_square(&input, vae.image_size())?;
            let recon = vae.decode(&vae.encode(&[img])?)?.remove(0);
            dalle::plot::save_image(&recon, &out)?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
