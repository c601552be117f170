//! `dalle data`: write the shapes set, count a data set's usable samples.

use super::FilterArgs;
use anyhow::{bail, Result};
use clap::Subcommand;
use dalle::data::shapes::{KindCap, SetSpec, Split};
use dalle::data::Index;
use std::path::PathBuf;

/// Largest image side `data shapes` renders (4×4 supersampled, one image at a time: ~12 MiB)
/// and `train-vae --image-size` takes.
pub(super) const MAX_SHAPES_SIZE: u32 = 1024;

#[derive(Subcommand)]
pub enum DataCommand {
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
        /// Keep at most N scenes of KIND (single, count, relation) of the --count drawn; later
        /// ones are skipped, so the set is the uncapped one less those scenes (repeatable: a
        /// relation-heavy mix is `--cap single=5000 --cap count=4000`).
        #[arg(long = "cap", value_name = "KIND=N")]
        caps: Vec<KindCap>,
        /// Also render each scene's hard negatives beside it (`NNNNNN.negK.png`, listed in its
        /// metadata line): each relation scene with its two objects' attributes swapped, with
        /// their places swapped and with their shapes swapped — for `dalle train
        /// --negative-weight`.
        #[arg(long)]
        negatives: bool,
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

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Shapes {
            out,
            count,
            seed,
            split,
            image_size,
            force,
            caps,
            negatives,
        } => {
            if !(16..=MAX_SHAPES_SIZE).contains(&image_size) {
                bail!(
                    "--image-size must be from 16 to {MAX_SHAPES_SIZE} pixels (got {image_size})"
                );
            }
            if count == 0 {
                bail!("--count must be at least 1 (got 0)");
            }
            let spec = SetSpec {
                negatives,
                ..SetSpec::new(count, seed, split, image_size)
            };
            let written = dalle::data::shapes::write_set_capped(&out, &spec, force, &caps)?;
            if written < count {
                println!(
                    "wrote {written} {split:?} samples of {count} drawn (--cap) to {}",
                    out.display()
                );
            } else {
                println!("wrote {count} {split:?} samples to {}", out.display());
            }
        }
        DataCommand::Stats { dir, filters, json } => {
            let idx = Index::scan(&dir, &filters.build()?, true)?;
            if json {
                let v = serde_json::json!({ "seen": idx.seen, "usable": idx.samples.len(), "skipped": idx.skips });
                println!("{v}");
            } else {
                print!("{}", idx.report());
            }
        }
    }
    Ok(())
}
