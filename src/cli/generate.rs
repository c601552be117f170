//! `dalle generate`: images for a caption, from an exported model directory on any runtime or
//! from a training run on candle.

use super::ProviderArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use dalle::config::Config;
use dalle::vae::io::Vae;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// The caption (may be empty: unconditional).
    pub prompt: Option<String>,
    /// Read the caption from a UTF-8 file instead.
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    /// candle, tract, ort, cuda or trt; default tract with --model, candle with --checkpoint.
    #[arg(long)]
    pub runtime: Option<String>,
    /// An exported model directory (`dalle export`); default: the bundled `models/shapes-96`.
    #[arg(long, conflicts_with = "checkpoint")]
    pub model: Option<PathBuf>,
    /// A `dalle train` run directory (candle only).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Device of the candle runtime: cpu, or cuda in a `--features cuda` build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub providers: ProviderArgs,
    #[arg(long, default_value_t = 4)]
    pub num_images: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature; default: the model's manifest, else 1.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens; default: the model's manifest, else all.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling (1: off); default: the model's manifest.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Classifier-free guidance (1: none); default: the model's manifest, else 1.
    #[arg(long, allow_negative_numbers = true)]
    pub guidance_scale: Option<f32>,
    /// Sample this many candidates per image and keep the one the caption explains best (its
    /// log-likelihood ratio against the empty caption; the paper reranks with CLIP); default:
    /// the model's manifest, else 1. Costs that many times the sampling.
    #[arg(long)]
    pub rerank: Option<usize>,
    /// Keep the first --prime-rows token rows of this image and generate the rest.
    #[arg(long, requires = "prime_rows")]
    pub prime_image: Option<PathBuf>,
    #[arg(long, requires = "prime_image")]
    pub prime_rows: Option<usize>,
    /// Also write the generated token grids as JSON.
    #[arg(long)]
    pub save_tokens: Option<PathBuf>,
    /// A caption longer than the model's text length is an error instead of a warning.
    #[arg(long)]
    pub strict: bool,
    /// The PNG to write. An existing regular file there is replaced (atomically); a symbolic
    /// link, directory, device or FIFO is refused, never replaced.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: GenerateArgs) -> Result<()> {
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
    let rerank = a.rerank.unwrap_or(defaults.rerank);
    if rerank == 0 {
        bail!("--rerank must be at least 1 (1 keeps the one sample of each image)");
    }
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
        let sampling = (params, guidance_scale, rerank);
        return generate_model(&a, model, kind, &prompt, sampling);
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
        rerank,
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
    (params, guidance_scale, rerank): (dalle_runtimes::SamplingParams, f32, usize),
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
        rerank,
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
