//! `dalle tokenizer`: train the caption BPE.

use super::FilterArgs;
use anyhow::{bail, Result};
use clap::Subcommand;
use dalle::data::Index;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
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

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train {
            data,
            vocab,
            out,
            min_frequency,
            filters,
        } => {
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
    }
    Ok(())
}
