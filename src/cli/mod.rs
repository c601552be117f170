//! The `dalle` command line: one module per command, each with its clap arguments and its `run`.

mod bench;
mod codec;
mod data;
mod eval;
mod export;
mod generate;
mod import;
mod info;
mod parity;
mod serve;
mod setup;
mod tokenizer;
mod train;
mod train_vae;
mod vae;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use dalle::data::filters::Filters;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dalle",
    version,
    about = "DALL·E (Ramesh et al. 2021) in Rust: train, export, generate"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a preset's geometry and parameter counts.
    Info(info::InfoArgs),
    /// Print a sparse attention mask (rows = queries, 1 = may attend).
    Masks(info::MasksArgs),
    /// Measure candle decode speed with and without the KV cache (random weights).
    Bench(bench::BenchArgs),
    /// Make or inspect datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Caption tokenizer.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Train the discrete VAE (stage 1).
    TrainVae(train_vae::TrainVaeArgs),
    /// Train the transformer (stage 2) on captions and dVAE tokens.
    Train(train::TrainArgs),
    /// Generate images for a caption.
    Generate(generate::GenerateArgs),
    /// Zero-shot compositional accuracy on the shapes benchmark (seen vs held-out combinations).
    Eval(eval::EvalArgs),
    /// Compare runtimes on one model directory: logits, greedy tokens, decoded images.
    Parity(parity::ParityArgs),
    /// Serve a model directory over HTTP (OpenAI Images API, Open Inference Protocol v2,
    /// Prometheus metrics), batching concurrent requests.
    Serve(serve::ServeArgs),
    /// Install what a runtime needs at run time.
    #[command(subcommand)]
    Setup(setup::SetupCommand),
    /// Export a trained model to an ONNX model directory (manifest, tokenizer, three graphs).
    Export(export::ExportArgs),
    /// Import a model trained elsewhere (ruDALL-E) as a model directory.
    Import(import::ImportArgs),
    /// dVAE utilities.
    #[command(subcommand)]
    Vae(vae::VaeCommand),
    /// Print the token grid of an image.
    Encode(codec::EncodeArgs),
    /// Turn a token grid (JSON) back into an image.
    Decode(codec::DecodeArgs),
    /// Encode and decode an image.
    Reconstruct(codec::ReconstructArgs),
}

/// Run one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::info(a),
        Command::Masks(a) => info::masks(a),
        Command::Bench(a) => bench::run(a),
        Command::Data(c) => data::run(c),
        Command::Tokenizer(c) => tokenizer::run(c),
        Command::TrainVae(a) => train_vae::run(a),
        Command::Train(a) => train::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Parity(a) => parity::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Setup(c) => setup::run(c),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
        Command::Vae(c) => vae::run(c),
        Command::Encode(a) => codec::encode(a),
        Command::Decode(a) => codec::decode(a),
        Command::Reconstruct(a) => codec::reconstruct(a),
    }
}

/// The paper's dataset filters.
#[derive(Args, Clone)]
pub struct FilterArgs {
    /// Reject captions with fewer words.
    #[arg(long, default_value_t = 2)]
    pub min_caption_words: usize,
    /// Keep captions that the English heuristic rejects.
    #[arg(long)]
    pub allow_non_english: bool,
    /// Another boilerplate caption pattern (regular expression, case-insensitive); repeatable.
    #[arg(long = "boilerplate")]
    pub boilerplate: Vec<String>,
    /// Drop the built-in boilerplate patterns.
    #[arg(long)]
    pub no_default_boilerplate: bool,
}

impl FilterArgs {
    pub fn build(&self) -> Result<Filters> {
        Filters::new(
            self.min_caption_words,
            !self.allow_non_english,
            &self.boilerplate,
            !self.no_default_boilerplate,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// ONNX Runtime execution-provider options.
#[derive(clap::Args, Debug, Clone)]
pub struct ProviderArgs {
    /// When CUDA / TensorRT cannot be registered, warn and run on CPU instead of failing.
    #[arg(long)]
    pub allow_fallback: bool,
    /// TensorRT: build FP16 engines.
    #[arg(long)]
    pub trt_fp16: bool,
    /// TensorRT: cache built engines in this directory.
    #[arg(long)]
    pub trt_cache: Option<PathBuf>,
}

impl ProviderArgs {
    pub fn options(&self) -> dalle_runtimes::OpenOptions {
        dalle_runtimes::OpenOptions {
            allow_fallback: self.allow_fallback,
            trt_fp16: self.trt_fp16,
            trt_cache_dir: self.trt_cache.clone(),
        }
    }
}

/// The weights' precision of an export: `--fp16` or f32.
pub fn weights_dtype(fp16: bool) -> dalle_runtimes::Dtype {
    if fp16 {
        dalle_runtimes::Dtype::F16
    } else {
        dalle_runtimes::Dtype::F32
    }
}
