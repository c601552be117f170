//! `dalle vae`: import OpenAI's dVAE, PSNR and the judge on a dVAE's round trip.

use anyhow::{bail, Result};
use clap::Subcommand;
use dalle::config::VaeConfig;
use dalle::vae::io::Vae;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum VaeCommand {
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
        /// Write the first failed round trips (scene | reconstruction) to this image and list
        /// their captions and what the judge saw.
        #[arg(long)]
        failures: Option<PathBuf>,
    },
}

pub fn run(cmd: VaeCommand) -> Result<()> {
    let cpu = candle_core::Device::Cpu;
    match cmd {
        VaeCommand::ImportOpenai {
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
        } => {
            let vae = VaeConfig {
                group_count,
                n_hid,
                n_blk_per_group,
                vocab_size,
                n_init,
                channels,
                post_gain: None,
                encoder: Default::default(),
            };
            let c = dalle::vae::io::import_openai(&encoder, &decoder, vae, image_size, &out)?;
            println!(
                "imported OpenAI dVAE ({0}px → {1}×{1} tokens) into {2}",
                c.geometry.image_size,
                c.geometry.grid,
                out.display()
            );
        }
        VaeCommand::Judge {
            vae,
            scenes,
            failures,
        } => {
            if scenes == 0 {
                bail!("--scenes must be at least 1 (got 0)");
            }
            if let Some(path) = &failures {
                // An output we cannot write fails now, not after the round trips.
                dalle::fsutil::refuse_non_regular(path)?;
                dalle::plot::image_format(path)?;
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
            if let Some(path) = failures {
                // Each failure: the scene and its reconstruction side by side, four pairs a row.
                let pairs: Vec<_> = rt
                    .failures
                    .iter()
                    .flat_map(|f| [f.original.clone(), f.reconstruction.clone()])
                    .collect();
                if pairs.is_empty() {
                    println!("no failed round trip: {} not written", path.display());
                } else {
                    dalle::plot::save_image(&dalle::plot::grid(&pairs, 8), &path)?;
                    println!(
                        "the first {} failures (scene | reconstruction, four a row) in {}:",
                        rt.failures.len(),
                        path.display()
                    );
                    for (i, f) in rt.failures.iter().enumerate() {
                        println!(
                            "  {i:2}. {:?} → judged: {}",
                            f.caption,
                            f.detected.join(", ")
                        );
                    }
                }
            }
        }
        VaeCommand::Psnr { vae, data, count } => {
            let vae = Vae::load(&vae, &cpu)?;
            let (db, n) = dalle::vae::train::psnr(&vae, &data, count)?;
            println!("PSNR {db:.2} dB over {n} images");
        }
    }
    Ok(())
}
