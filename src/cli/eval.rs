//! `dalle eval`: the judge's scores of generated images on the shapes benchmark.

use super::ProviderArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory; default: the bundled `models/shapes-96`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_parser = ["shapes"], default_value = "shapes")]
    pub benchmark: String,
    #[arg(long, default_value = "tract")]
    pub runtime: String,
    /// Scenes per split.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Guidance scales to compare (1 = none).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    pub guidance: Vec<f32>,
    /// Keep the k most likely tokens; default: the model's manifest.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Candidates per image, the best fit to the caption kept; default: the model's manifest.
    #[arg(long)]
    pub rerank: Option<usize>,
    #[arg(long)]
    pub json: bool,
    /// Also measure binding without sampling: on each split's relation scenes, how often the
    /// transformer prefers the true render to the one with the two objects' colours swapped.
    #[arg(long)]
    pub binding: bool,
    /// Write a grid of the first generated images (seen row, held-out row framed in red) at
    /// the first guidance scale.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    #[command(flatten)]
    pub providers: ProviderArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let EvalArgs {
        model,
        benchmark: _,
        runtime,
        samples,
        guidance,
        top_k,
        rerank,
        json,
        binding,
        grid,
        providers,
    } = a;
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
    let gen = std::sync::Arc::new(dalle::runtime::open(&model, kind, &providers.options())?);
    let truth = dalle::eval::ground_truth(samples, gen.manifest().geometry.image_size as u32);
    // Sampling as `generate` samples this model, but for the guidance scales compared.
    let defaults = gen.manifest().sampling;
    let mut params = defaults.params();
    params.top_k = top_k.or(params.top_k);
    let rerank = rerank.unwrap_or(defaults.rerank);
    if rerank == 0 {
        bail!("--rerank must be at least 1 (1 keeps the one sample of each image)");
    }
    let sampling = dalle::eval::Sampling {
        params,
        rerank,
        guidance,
    };
    let scores = dalle::eval::shapes(&gen, samples, &sampling, &mut |l| eprintln!("{l}"))?;
    let guidance = sampling.guidance;
    let (psnr, round_trip) = dalle::eval::dvae_round_trip(&gen, samples)?;
    let binding = if binding {
        Some(dalle::eval::binding(&gen, samples)?)
    } else {
        None
    };
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
        let v = serde_json::json!({ "runtime": runtime, "samples": samples, "scores": scores, "judge_on_ground_truth": truth, "judge_on_dvae_round_trip": round_trip, "dvae_psnr_heldout_db": psnr, "grid_examples": examples, "binding": binding });
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
        println!(
            "sampling: top-k {}, top-p {}, temperature {}, rerank {rerank}",
            params.top_k.map_or("off".into(), |k| k.to_string()),
            params.top_p.map_or("off".into(), |p| p.to_string()),
            params.temperature
        );
        for s in &scores {
            let kinds: Vec<String> = s
                .kinds
                .iter()
                .map(|(k, &(ok, n))| format!("{k} {ok}/{n}"))
                .collect();
            println!(
                "fully correct by scene kind, {} guidance {}: {}",
                s.split,
                s.guidance_scale,
                kinds.join(", ")
            );
        }
        println!("dVAE round trip on {samples} held-out renders: PSNR {psnr:.2} dB");
        for b in binding.iter().flatten() {
            println!(
                "binding, {}: the true render preferred to the attribute-swapped one in {}/{} \
                 relation scenes, mean margin {:.2} nats",
                b.split, b.preferred, b.scenes, b.mean_margin
            );
        }
        for (i, e) in examples.iter().enumerate() {
            println!(
                "grid {i}: [{}] {}",
                e["split"].as_str().unwrap_or(""),
                e["caption"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
