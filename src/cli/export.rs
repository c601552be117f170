//! `dalle export`: a trained run (or an older model directory) → an ONNX model directory.

use super::weights_dtype;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    /// A `dalle train` run directory (transformer.safetensors, tokenizer.json, config.json).
    #[arg(long, required_unless_present = "from_model")]
    pub transformer: Option<PathBuf>,
    /// dVAE directory; defaults to the run's own `vae/` copy.
    #[arg(long, conflicts_with = "from_model")]
    pub vae: Option<PathBuf>,
    /// Re-export an exported model directory (any schema version) with this version: its
    /// weights come from its graphs, its sampling defaults from its manifest (the sampling
    /// flags below are ignored). Upgrades a directory whose training run is gone.
    #[arg(long, conflicts_with = "transformer")]
    pub from_model: Option<PathBuf>,
    /// Model directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// ONNX opset (17 to 21).
    #[arg(long, default_value_t = 17)]
    pub opset: i64,
    /// Half-precision weights and computation (inputs and outputs stay f32), for GPU
    /// runtimes; the candle runtime also streams them as f16 when decoding up to 4 images at
    /// a time on the CPU (half the bytes of each step).
    #[arg(long)]
    pub fp16: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// Write a Triton Inference Server model repository to --out instead of a model directory:
    /// the dVAE graphs with dynamic batching, the transformer with sequence batching and
    /// implicit state (its KV cache lives in the server), onnxruntime backend with TensorRT
    /// FP16 settings, and a README with the client's sampling loop.
    #[arg(long)]
    pub triton: bool,
    /// Graphs whose weights exceed this many bytes keep them in `<graph>.onnx.data`.
    #[arg(long, default_value_t = 1 << 30)]
    pub external_data_threshold: u64,
    /// Default sampling of the model, recorded in its manifest (`generate` flags override).
    #[arg(long, default_value_t = 1.0)]
    pub guidance_scale: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Candidates sampled per image, the best fit to the caption kept (see `generate --rerank`).
    #[arg(long, default_value_t = 1)]
    pub rerank: usize,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let ExportArgs {
        transformer,
        vae,
        from_model,
        out,
        opset,
        force,
        triton,
        fp16,
        external_data_threshold,
        guidance_scale,
        top_k,
        top_p,
        temperature,
        rerank,
    } = a;
    let sampling = dalle_runtimes::SamplingDefaults {
        temperature,
        top_k,
        top_p,
        guidance_scale,
        rerank,
    };
    if rerank == 0 {
        bail!("--rerank must be at least 1 (1 keeps the one sample of each image)");
    }
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
    let input = match (&from_model, &transformer) {
        (Some(dir), _) => dalle::export::load_model_dir(dir)?,
        (None, Some(run)) => {
            let mut input = dalle::export::load_input(run, vae.as_deref())?;
            input.sampling = sampling;
            input
        }
        (None, None) => bail!("give --transformer RUN_DIR or --from-model MODEL_DIR"),
    };
    if triton {
        let m = dalle_export::triton::export_triton(&input, &out, &opts, &mut progress)?;
        println!(
            "wrote a Triton model repository of {} ({} layers, {}, opset {}) to {}",
            m.preset,
            m.transformer.n_layers,
            m.dtype,
            m.opset,
            out.display()
        );
        return Ok(());
    }
    let m = dalle_export::export(&input, &out, &opts, &mut progress)?;
    println!(
        "exported {} ({} layers, {}, opset {}) to {}",
        m.preset,
        m.transformer.n_layers,
        m.dtype,
        m.opset,
        out.display()
    );
    Ok(())
}
