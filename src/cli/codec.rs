//! `dalle encode`, `decode` and `reconstruct`: images ↔ token grids through a dVAE.

use anyhow::{bail, Context, Result};
use clap::Args;
use dalle::vae::io::Vae;
use std::path::PathBuf;

#[derive(Args)]
pub struct EncodeArgs {
    #[arg(long)]
    pub vae: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[arg(long)]
    pub vae: PathBuf,
    #[arg(long)]
    pub tokens: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ReconstructArgs {
    #[arg(long)]
    pub vae: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    let EncodeArgs { vae, input, json } = a;
    let vae = ImageCodec::open(&vae)?;
    let img = dalle::data::load_square(&input, vae.image_size())?;
    let tokens = vae.encode(&[img])?.remove(0);
    let rows: Vec<&[u32]> = tokens.chunks(vae.grid()).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({ "grid": vae.grid(), "tokens": rows })
        );
    } else {
        for r in rows {
            println!(
                "{}",
                r.iter().map(|t| format!("{t:>5}")).collect::<String>()
            );
        }
    }
    Ok(())
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    let DecodeArgs { vae, tokens, out } = a;
    let vae = ImageCodec::open(&vae)?;
    let ids = parse_tokens(&tokens)?;
    if ids.is_empty() {
        bail!("{}: lists no images", tokens.display());
    }
    let images = vae
        .decode(&ids)
        .with_context(|| format!("cannot decode {}", tokens.display()))?;
    let img = match images.as_slice() {
        [one] => one.clone(),
        many => dalle::plot::grid(many, (many.len() as f64).sqrt().ceil() as usize),
    };
    dalle::plot::save_image(&img, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

pub fn reconstruct(a: ReconstructArgs) -> Result<()> {
    let ReconstructArgs { vae, input, out } = a;
    let vae = ImageCodec::open(&vae)?;
    let img = dalle::data::load_square(&input, vae.image_size())?;
    let recon = vae.decode(&vae.encode(&[img])?)?.remove(0);
    dalle::plot::save_image(&recon, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The image tokenizer of `encode`, `decode` and `reconstruct`: a dVAE run's weights on candle,
/// or an exported model directory's dVAE graphs on tract.
pub enum ImageCodec {
    Weights(Box<Vae>),
    Model(Box<dalle_runtimes::Generator>),
}

impl ImageCodec {
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        if dir.join(dalle_runtimes::names::MANIFEST).exists() {
            let opts = dalle_runtimes::OpenOptions::default();
            let kind = dalle_runtimes::RuntimeKind::Tract;
            return Ok(ImageCodec::Model(Box::new(dalle::runtime::open(
                dir, kind, &opts,
            )?)));
        }
        let vae = Vae::load(dir, &candle_core::Device::Cpu)?;
        Ok(ImageCodec::Weights(Box::new(vae)))
    }

    pub fn image_size(&self) -> u32 {
        match self {
            ImageCodec::Weights(v) => v.image_size(),
            ImageCodec::Model(g) => g.manifest().geometry.image_size as u32,
        }
    }

    pub fn grid(&self) -> usize {
        match self {
            ImageCodec::Weights(v) => v.grid(),
            ImageCodec::Model(g) => g.manifest().geometry.grid,
        }
    }

    pub fn encode(&self, images: &[image::RgbImage]) -> Result<Vec<Vec<u32>>> {
        match self {
            ImageCodec::Weights(v) => Ok(v.encode(images)?),
            ImageCodec::Model(g) => {
                let x = dalle::data::images_to_tensor(images, &candle_core::Device::Cpu)?;
                let codes = g
                    .session()
                    .encode(&x.flatten_all()?.to_vec1()?, images.len())?;
                let n = self.grid() * self.grid();
                Ok(codes
                    .chunks(n)
                    .map(|c| c.iter().map(|&t| t as u32).collect())
                    .collect())
            }
        }
    }

    pub fn decode(&self, tokens: &[Vec<u32>]) -> Result<Vec<image::RgbImage>> {
        match self {
            ImageCodec::Weights(v) => Ok(v.decode(tokens)?),
            ImageCodec::Model(g) => {
                let m = g.manifest();
                let n = m.geometry.image_tokens();
                for t in tokens {
                    if t.len() != n {
                        bail!(
                            "expected {n} tokens ({0}×{0} grid), got {1}",
                            m.geometry.grid,
                            t.len()
                        );
                    }
                    if let Some(bad) = t.iter().find(|&&c| c as usize >= m.geometry.codebook) {
                        bail!(
                            "token {bad} is outside the codebook (0..{})",
                            m.geometry.codebook
                        );
                    }
                }
                let flat: Vec<i64> = tokens.iter().flatten().map(|&t| t as i64).collect();
                let pixels = g.session().decode(&flat, tokens.len())?;
                Ok(dalle_runtimes::generator::to_images(
                    &pixels,
                    tokens.len(),
                    m.geometry.image_size,
                )
                .into_iter()
                .map(|i| {
                    image::RgbImage::from_raw(i.width, i.height, i.rgb).expect("3 bytes a pixel")
                })
                .collect())
            }
        }
    }
}

fn parse_tokens(path: &PathBuf) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    Ok(dalle::vae::io::parse_token_file(&text, path)?)
}
