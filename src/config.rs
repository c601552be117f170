//! Model presets (`tiny`, `small`, `paper`) and their validation.
//!
//! A preset fixes the geometry both stages share, the dVAE of `dall_e` 0.1 and the transformer of
//! Ramesh et al. 2021 §2. Configs are serialised next to every checkpoint so a checkpoint of one
//! preset is never resumed or loaded as another.

use crate::{Error, Result};
use dalle_runtimes::manifest::DvaeEncoder;
use dalle_runtimes::{Geometry, Norms};
use serde::{Deserialize, Serialize};

/// The discrete VAE's architecture, with the field names of OpenAI's `dall_e` 0.1
/// `Encoder`/`Decoder` (`input_channels` and `output_channels` are both `channels`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Number of resolution groups; the image is downsampled by `2^(group_count - 1)`.
    pub group_count: usize,
    /// Width of the first group; group `g` (1-based) is `2^(g-1) * n_hid` wide.
    pub n_hid: usize,
    /// Residual blocks per group.
    pub n_blk_per_group: usize,
    /// Codebook size (image vocabulary).
    pub vocab_size: usize,
    /// Width of the decoder's first 1×1 conv out of the one-hot codes.
    pub n_init: usize,
    /// Image channels (RGB: 3).
    pub channels: usize,
    /// Scale of every residual branch. `None` is `dall_e`'s 1 / n_layers² (n_layers = blocks in
    /// all groups), which keeps OpenAI's weights loading unchanged; configs without the field get it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_gain: Option<f64>,
    /// The encoder's architecture: `dall_e`'s (the default, also for configs without the field)
    /// or `patch`, each code from its own cell's pixels alone.
    #[serde(default, skip_serializing_if = "DvaeEncoder::is_dall_e")]
    pub encoder: DvaeEncoder,
}

impl VaeConfig {
    /// Pixels per token along one side.
    pub fn downsample(&self) -> usize {
        1 << (self.group_count - 1)
    }

    /// The residual branches' scale: [`VaeConfig::post_gain`] or `dall_e`'s 1 / n_layers².
    pub fn post_gain(&self) -> f64 {
        self.post_gain
            .unwrap_or_else(|| Self::dall_e_post_gain(self.group_count, self.n_blk_per_group))
    }

    /// `dall_e`'s residual scale, 1 / n_layers² with n_layers = `group_count · n_blk_per_group`.
    pub fn dall_e_post_gain(group_count: usize, n_blk_per_group: usize) -> f64 {
        let n = (group_count * n_blk_per_group) as f64;
        1.0 / (n * n)
    }

    /// Width of group `g` (1-based).
    pub fn group_width(&self, g: usize) -> usize {
        self.n_hid << (g - 1)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vae.group_count", self.group_count),
            ("vae.n_hid", self.n_hid),
            ("vae.n_blk_per_group", self.n_blk_per_group),
            ("vae.vocab_size", self.vocab_size),
            ("vae.n_init", self.n_init),
            ("vae.channels", self.channels),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1 (got 0)"));
            }
        }
        // Far above any real dVAE (dall_e: n_hid 256, 8192 codes), low enough that parameter
        // counts and buffer sizes derived from them cannot overflow.
        for (field, v, max) in [
            ("vae.n_hid", self.n_hid, 1 << 16),
            ("vae.n_blk_per_group", self.n_blk_per_group, 1 << 8),
            ("vae.vocab_size", self.vocab_size, 1 << 20),
        ] {
            if v > max {
                return Err(Error::config(
                    field,
                    format!("must be at most {max} (got {v})"),
                ));
            }
        }
        if self.group_count > 8 {
            return Err(Error::config(
                "vae.group_count",
                format!("must be at most 8 (got {})", self.group_count),
            ));
        }
        if let Some(g) = self.post_gain {
            if !(g > 0.0 && g.is_finite()) {
                return Err(Error::config(
                    "vae.post_gain",
                    format!("must be a positive number (got {g})"),
                ));
            }
        }
        if !self.n_hid.is_multiple_of(4) {
            return Err(Error::config(
                "vae.n_hid",
                format!(
                    "must be a multiple of 4: residual paths are n_out/4 wide (got {})",
                    self.n_hid
                ),
            ));
        }
        Ok(())
    }

    /// Parameter count of the encoder, from the architecture (`dall_e/encoder.py`).
    pub fn encoder_params(&self) -> usize {
        let widths: Vec<usize> = (1..=self.group_count)
            .map(|g| self.group_width(g))
            .collect();
        self.stack_params(
            (self.channels, self.n_hid, 7),
            &widths,
            [3, 3, 3, 1],
            self.vocab_size,
        )
    }

    /// Parameter count of the decoder, from the architecture (`dall_e/decoder.py`).
    pub fn decoder_params(&self) -> usize {
        let widths: Vec<usize> = (1..=self.group_count)
            .rev()
            .map(|g| self.group_width(g))
            .collect();
        self.stack_params(
            (self.vocab_size, self.n_init, 1),
            &widths,
            [1, 3, 3, 3],
            2 * self.channels,
        )
    }

    /// Input conv, residual groups (id path where the width changes; res path n_out/4 wide),
    /// 1×1 output conv.
    fn stack_params(
        &self,
        (n_in, first, kw): (usize, usize, usize),
        widths: &[usize],
        k: [usize; 4],
        n_out: usize,
    ) -> usize {
        let conv = |i: usize, o: usize, k: usize| o * i * k * k + o;
        let mut n = conv(n_in, first, kw);
        let mut width = first;
        for &out in widths {
            for _ in 0..self.n_blk_per_group {
                let h = out / 4;
                if width != out {
                    n += conv(width, out, 1);
                }
                n +=
                    conv(width, h, k[0]) + conv(h, h, k[1]) + conv(h, h, k[2]) + conv(h, out, k[3]);
                width = out;
            }
        }
        n + conv(width, n_out, 1)
    }
}

/// The stage-2 transformer (Ramesh et al. 2021 §2.2, §B.1): pre-LN decoder blocks with the
/// row / column / convolutional sparse attention pattern.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Side of the convolutional attention window of the last layer (odd).
    pub conv_kernel: usize,
    /// Extra layer norms (ruDALL-E's sandwich and double final norms); none in the presets.
    #[serde(default, skip_serializing_if = "Norms::is_plain")]
    pub norms: Norms,
}

impl TransformerConfig {
    fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("transformer.d_model", self.d_model),
            ("transformer.n_layers", self.n_layers),
            ("transformer.n_heads", self.n_heads),
            ("transformer.conv_kernel", self.conv_kernel),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1 (got 0)"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "transformer.d_model",
                format!(
                    "must be divisible by n_heads = {} (got {})",
                    self.n_heads, self.d_model
                ),
            ));
        }
        if self.conv_kernel.is_multiple_of(2) {
            return Err(Error::config(
                "transformer.conv_kernel",
                format!("must be odd (got {})", self.conv_kernel),
            ));
        }
        Ok(())
    }
}

/// A whole model: shared geometry plus both stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Preset the config came from (informational; a changed field makes it custom).
    pub preset: String,
    pub geometry: Geometry,
    pub vae: VaeConfig,
    pub transformer: TransformerConfig,
}

/// Names accepted by [`Config::preset`].
pub const PRESETS: [&str; 4] = ["tiny", "shapes", "small", "paper"];

impl Config {
    /// One of the named presets (see `PRESETS`).
    pub fn preset(name: &str) -> Result<Config> {
        let (geometry, vae, transformer) = match name {
            "tiny" => (
                geom(64, 8, 512, 32, 1024),
                vae(4, 32, 1, 512, 64),
                tf(128, 4, 4, 11),
            ),
            // The bundled model: `tiny`'s transformer over a 16×16 grid of an f4 dVAE (three
            // groups), since an f8 token of a 64-px image cannot carry an 8–10 px shape.
            "shapes" => (
                geom(64, 16, 512, 32, 1024),
                vae(3, 64, 1, 512, 64),
                tf(128, 4, 4, 11),
            ),
            "small" => (
                geom(128, 16, 2048, 64, 4096),
                vae(4, 64, 2, 2048, 128),
                tf(512, 12, 8, 11),
            ),
            // The paper's 12B model; the dVAE is OpenAI's released one (dall_e 0.1 defaults).
            "paper" => (
                geom(256, 32, 8192, 256, 16384),
                vae(4, 256, 2, 8192, 128),
                tf(3968, 64, 62, 11),
            ),
            _ => {
                return Err(Error::UnknownPreset {
                    name: name.to_string(),
                    valid: PRESETS.join(", "),
                })
            }
        };
        let cfg = Config {
            preset: name.to_string(),
            geometry,
            vae,
            transformer,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every field and the agreement between the geometry and the two stages.
    pub fn validate(&self) -> Result<()> {
        self.geometry
            .validate()
            .map_err(|e| Error::config("geometry", e.to_string()))?;
        self.vae.validate()?;
        self.transformer.validate()?;
        let g = &self.geometry;
        if g.image_size != g.grid * self.vae.downsample() {
            return Err(Error::config(
                "geometry.grid",
                format!(
                    "is {} but a dVAE with group_count {} turns {}px images into a {}×{} grid",
                    g.grid,
                    self.vae.group_count,
                    g.image_size,
                    g.image_size / self.vae.downsample(),
                    g.image_size / self.vae.downsample()
                ),
            ));
        }
        if g.codebook != self.vae.vocab_size {
            return Err(Error::config(
                "vae.vocab_size",
                format!(
                    "is {} but geometry.codebook is {}",
                    self.vae.vocab_size, g.codebook
                ),
            ));
        }
        Ok(())
    }

    /// Read a config saved next to a checkpoint, validating it.
    pub fn load(path: &std::path::Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Config = serde_json::from_str(&text)
            .map_err(|e| Error::input(path, format!("not a dalle config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Transformer parameter count: embeddings (unified vocabulary, text positions, image rows and
    /// columns), `n_layers` pre-LN blocks (LN, fused QKV, output projection, LN, 4× MLP, all with
    /// biases), final LN and the untied output head over the unified vocabulary.
    pub fn transformer_params(&self) -> usize {
        let d = self.transformer.d_model;
        let g = &self.geometry;
        let vocab = dalle_runtimes::TokenLayout::from(g).vocab_size();
        let embed = vocab * d + g.text_len * d + 2 * g.grid * d;
        let block = 2 * d
            + (3 * d * d + 3 * d)
            + (d * d + d)
            + 2 * d
            + (4 * d * d + 4 * d)
            + (4 * d * d + d);
        embed + self.transformer.n_layers * block + 2 * d + (d * vocab + vocab)
    }
}

fn geom(
    image_size: usize,
    grid: usize,
    codebook: usize,
    text_len: usize,
    text_vocab: usize,
) -> Geometry {
    Geometry {
        image_size,
        grid,
        codebook,
        text_len,
        text_vocab,
    }
}

fn vae(
    group_count: usize,
    n_hid: usize,
    n_blk_per_group: usize,
    vocab_size: usize,
    n_init: usize,
) -> VaeConfig {
    VaeConfig {
        group_count,
        n_hid,
        n_blk_per_group,
        vocab_size,
        n_init,
        channels: 3,
        post_gain: None,
        encoder: DvaeEncoder::DallE,
    }
}

fn tf(d_model: usize, n_layers: usize, n_heads: usize, conv_kernel: usize) -> TransformerConfig {
    TransformerConfig {
        norms: Norms::default(),
        d_model,
        n_layers,
        n_heads,
        conv_kernel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for p in PRESETS {
            Config::preset(p).unwrap();
        }
    }

    #[test]
    fn unknown_preset_lists_valid_ones() {
        let e = Config::preset("huge").unwrap_err().to_string();
        assert!(
            e.contains("huge") && e.contains("tiny, shapes, small, paper"),
            "{e}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = Config::preset("tiny").unwrap();
        c.vae.n_hid = 30;
        assert!(c.validate().unwrap_err().to_string().contains("vae.n_hid"));
        let mut c = Config::preset("tiny").unwrap();
        c.geometry.grid = 16;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("geometry.grid"));
        let mut c = Config::preset("tiny").unwrap();
        c.transformer.n_heads = 3;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("transformer.d_model"));
    }

    #[test]
    fn post_gain_defaults_to_dall_e_and_old_configs_load() {
        let c = Config::preset("shapes").unwrap();
        assert_eq!(c.vae.post_gain, None);
        assert!((c.vae.post_gain() - 1.0 / 9.0).abs() < 1e-15);
        // A config written before the field existed reads as dall_e's value and writes back
        // without the field.
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("post_gain"), "{text}");
        let mut set = c.clone();
        set.vae.post_gain = Some(1.0);
        let back: Config = serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
        assert_eq!(back.vae.post_gain(), 1.0);
        set.vae.post_gain = Some(-1.0);
        assert!(set
            .validate()
            .unwrap_err()
            .to_string()
            .contains("vae.post_gain"));
    }

    #[test]
    fn openai_dvae_parameter_count() {
        // dall_e 0.1 at its defaults (n_hid 256, 2 blocks per group, vocab 8192, n_init 128),
        // counted by summing o·i·k²+o over the conv list of dall_e/encoder.py and decoder.py.
        let c = Config::preset("paper").unwrap();
        assert_eq!(c.vae.encoder_params(), 53_786_240);
        assert_eq!(c.vae.decoder_params(), 43_829_766);
    }
}
