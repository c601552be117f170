//! `dalle import`: models trained elsewhere as model directories.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use dalle::import::rudalle;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub what: ImportWhat,
}

#[derive(Subcommand)]
pub enum ImportWhat {
    /// A ruDALL-E model (ai-forever/ru-dalle; Apache-2.0): its transformer, Sber's VQGAN and its
    /// YouTokenToMe tokenizer, as a model directory every runtime serves. The PyTorch files are
    /// read without running them (a file whose pickle names anything but tensors is refused).
    Rudalle(RudalleArgs),
}

#[derive(Args)]
pub struct RudalleArgs {
    /// The transformer's checkpoint (Malevich: `pytorch_model_v3.bin`).
    #[arg(long)]
    pub transformer: PathBuf,
    /// Sber's VQGAN checkpoint (`vqgan.gumbelf8-sber.model.ckpt`).
    #[arg(long)]
    pub vqgan: PathBuf,
    /// The YouTokenToMe model (`bpe.model`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The model directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Which ruDALL-E family the transformer is (v2: Malevich_v2, Emojich — refused).
    #[arg(long, value_enum, default_value = "v3")]
    pub version: rudalle::Version,
    /// Attention heads (default: the published models' count for their width).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Store weights and compute in f16 (the graphs' inputs and outputs stay f32).
    #[arg(long)]
    pub fp16: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ImportArgs) -> Result<()> {
    let ImportWhat::Rudalle(a) = a.what;
    if a.out.exists() && !a.force {
        bail!("{} exists; pass --force to replace it", a.out.display());
    }
    // The converted tokenizer, until the export copies it into OUT.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "dalle-import-{}-tokenizer.json",
        std::process::id()
    )));
    let tokenizer_json = scratch.0.clone();
    let paths = rudalle::ImportPaths {
        transformer: &a.transformer,
        vqgan: &a.vqgan,
        tokenizer: &a.tokenizer,
    };
    let options = rudalle::Options {
        version: a.version,
        n_heads: a.heads,
    };
    eprintln!("reading {}", a.transformer.display());
    let input = rudalle::export_input(&paths, options, &tokenizer_json)?;
    let opts = dalle_export::ExportOptions {
        dtype: super::weights_dtype(a.fp16),
        force: a.force,
        ..Default::default()
    };
    let mut progress = |line: &str| eprintln!("{line}");
    let m = dalle_export::export(&input, &a.out, &opts, &mut progress)?;
    println!(
        "wrote ruDALL-E ({} layers, width {}, {}×{} VQGAN tokens of {} codes, {}) to {}; try \
         `dalle generate --model {} \"…\"`",
        m.transformer.n_layers,
        m.transformer.d_model,
        m.geometry.grid,
        m.geometry.grid,
        m.geometry.codebook,
        m.dtype,
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
