//! `dalle info` and `dalle masks`: a preset's geometry, the sparse attention masks.

use anyhow::{bail, Result};
use clap::Args;
use dalle::config::Config;

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MasksArgs {
    #[arg(long)]
    pub text_len: usize,
    #[arg(long)]
    pub grid: usize,
    #[arg(long, value_parser = ["row", "column", "conv"])]
    pub kind: String,
    /// Side of the convolutional window (odd).
    #[arg(long, default_value_t = 11)]
    pub kernel: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let InfoArgs { preset, json } = a;
    let c = Config::preset(&preset)?;
    let (enc, dec, tf) = (
        c.vae.encoder_params(),
        c.vae.decoder_params(),
        c.transformer_params(),
    );
    if json {
        let v = serde_json::json!({
            "config": c, "params": { "dvae_encoder": enc, "dvae_decoder": dec, "transformer": tf }
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let g = &c.geometry;
    let t = &c.transformer;
    println!("preset {}", c.preset);
    println!(
        "  image          {0}×{0} px → {1}×{1} tokens (codebook {2})",
        g.image_size, g.grid, g.codebook
    );
    println!(
        "  text           {} tokens, BPE vocab {}",
        g.text_len, g.text_vocab
    );
    println!(
        "  sequence       {} = {} text + {} image",
        g.seq_len(),
        g.text_len,
        g.image_tokens()
    );
    println!(
        "  dVAE           group_count {} n_hid {} n_blk_per_group {} n_init {}",
        c.vae.group_count, c.vae.n_hid, c.vae.n_blk_per_group, c.vae.n_init
    );
    println!(
        "  transformer    d_model {} layers {} heads {} conv kernel {}",
        t.d_model, t.n_layers, t.n_heads, t.conv_kernel
    );
    println!("  params         dVAE encoder {enc}, decoder {dec}, transformer {tf}");
    Ok(())
}

pub fn masks(a: MasksArgs) -> Result<()> {
    let MasksArgs {
        text_len,
        grid,
        kind,
        kernel,
        json,
    } = a;
    use dalle_runtimes::AttentionKind;
    if grid == 0 {
        bail!("--grid must be at least 1");
    }
    if (text_len + grid * grid) > 4096 {
        bail!(
            "a {0}×{0} matrix is too large to print; use a smaller --grid or --text-len",
            text_len + grid * grid
        );
    }
    let kind = match kind.as_str() {
        "row" => AttentionKind::Row,
        "column" => AttentionKind::Column,
        _ if kernel.is_multiple_of(2) => bail!("--kernel must be odd (got {kernel})"),
        _ => AttentionKind::Conv { kernel },
    };
    let m = dalle_runtimes::mask_matrix(text_len, grid, kind);
    if json {
        let rows: Vec<Vec<u8>> = m
            .iter()
            .map(|r| r.iter().map(|&b| b as u8).collect())
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        for row in &m {
            println!(
                "{}",
                row.iter()
                    .map(|&b| if b { '█' } else { '·' })
                    .collect::<String>()
            );
        }
    }
    Ok(())
}
