//! `dalle parity`: one model directory on several runtimes, compared.

use super::ProviderArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ParityArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated; the first is the reference.
    #[arg(long, value_delimiter = ',', default_value = "candle,tract,ort")]
    pub runtimes: Vec<String>,
    #[arg(long, default_value = "a red circle above a blue square")]
    pub prompt: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub providers: ProviderArgs,
}

pub fn run(a: ParityArgs) -> Result<()> {
    let ParityArgs {
        model,
        runtimes,
        prompt,
        json,
        providers,
    } = a;
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
    Ok(())
}
