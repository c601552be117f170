//! `dalle serve`: a model directory behind HTTP (the OpenAI Images API, the Open Inference
//! Protocol v2, Prometheus metrics), batching concurrent requests.

use super::ProviderArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    /// An exported model directory (`dalle export`); default: the bundled `models/shapes-96`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// candle, tract, ort, cuda or trt.
    #[arg(long, default_value = "tract")]
    pub runtime: String,
    /// Device of the candle runtime: cpu, or cuda in a `--features cuda` build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub providers: ProviderArgs,
    /// Address to listen on (0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Rows (images; twice with guidance) sampled at once over all requests.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests that may wait for rows; one more gets 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The model's name in /v2/models/NAME and the OpenAI API's `model`; default: the model
    /// directory's name.
    #[arg(long)]
    pub name: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 65536)]
    pub max_body: usize,
    /// A prompt longer than the model's caption is a 400 instead of being truncated (with an
    /// `x-dalle-warning` header).
    #[arg(long)]
    pub strict: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if a.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    let model = match &a.model {
        Some(m) => m.clone(),
        None => dalle::bundled_model()?,
    };
    let kind = dalle_runtimes::RuntimeKind::parse(&a.runtime)?;
    let device = dalle::util::device(&a.device)?;
    let generator = dalle::runtime::open_on(&model, kind, &a.providers.options(), &device)?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => std::fs::canonicalize(&model)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "dalle".into()),
    };
    if name.is_empty() || name.contains(['/', '?', '#']) || name.chars().any(char::is_control) {
        bail!("--name {name:?} cannot be a URL path segment: use letters, digits, '-', '_' or '.'");
    }
    let options = dalle::serve::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        name: name.clone(),
        max_body: a.max_body,
        strict: a.strict,
    };
    let runtime = generator.session().name();
    dalle::serve::serve(generator, options, |addr| {
        // Tests and scripts read the port from this line.
        println!("dalle serve: model `{name}` on {runtime}, listening on http://{addr}");
    })
}
