//! `manifest.json`: what a model directory holds and how to drive it. The exporter writes it,
//! every runtime reads it through [`Manifest::load`], which checks the numbers agree with each
//! other and that every file is the one that was exported (sha256).

use crate::{names, AttentionKind, Geometry, TokenLayout};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The manifest format this crate reads and writes.
///
/// 2: the KV cache is a fixed-capacity buffer the caller updates (`past_sequence_length` input,
/// `present` holds only the new positions) — schema 1 graphs concatenated and returned the
/// whole cache every step.
///
/// 3: `past_sequence_length` is `[batch]`, one past length per row (schema 2: `[1]` for all
/// rows), so rows at different positions share a call.
pub const SCHEMA_VERSION: u32 = 3;

/// Element type of the weights and the computation inside the graphs. Inputs and outputs are
/// f32 / i64 in both cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        })
    }
}

/// The transformer's sizes a runtime needs for its KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerDims {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    /// Layer norms beyond the pre-LN blocks of models trained here (absent: none).
    #[serde(default, skip_serializing_if = "Norms::is_plain")]
    pub norms: Norms,
}

/// The layer norms a transformer has beyond its pre-LN blocks (`ln_1`, `ln_2`) and final
/// `ln_f`: CogView's sandwich norms and a second final norm, as ruDALL-E's checkpoints have them.
/// Models trained here have neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Norms {
    /// A layer norm on each residual branch's output before it is added (CogView's sandwich
    /// layer norm): `layers.{i}.attn.ln_out` and `layers.{i}.mlp.ln_out`.
    #[serde(default)]
    pub sandwich: bool,
    /// A second layer norm after `ln_f`, before the head: `ln_head`.
    #[serde(default)]
    pub head: bool,
}

impl Norms {
    /// Neither extra norm: the models this project trains.
    pub fn is_plain(&self) -> bool {
        *self == Norms::default()
    }
}

/// The dVAE's architecture (`dall_e` 0.1's arguments), for runtimes that rebuild it natively.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvaeDims {
    pub group_count: usize,
    pub n_hid: usize,
    pub n_blk_per_group: usize,
    pub n_init: usize,
    pub channels: usize,
    /// Scale of every residual branch; absent (older manifests): `dall_e`'s 1 / n_layers².
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_gain: Option<f64>,
    /// The encoder's architecture; absent (older manifests): `dall_e`'s.
    #[serde(default, skip_serializing_if = "DvaeEncoder::is_dall_e")]
    pub encoder: DvaeEncoder,
}

/// Which network turns an image into codes. The decoder is `dall_e`'s either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DvaeEncoder {
    /// `dall_e` 0.1's: a 7×7 input conv and residual groups of 3×3 convs with max pooling
    /// between them, so each code also sees the pixels around its own cell.
    #[default]
    DallE,
    /// Each code from its own cell's f×f pixels alone: an f×f convolution of stride f, then
    /// [`PATCH_HIDDEN_LAYERS`] 1×1 layers and the 1×1 output, ReLU between them (not in the
    /// paper). A grey cell gets the same code whatever is drawn next to it.
    Patch,
}

/// Hidden 1×1 layers of a [`DvaeEncoder::Patch`] encoder (`blocks.hidden_{i}`, i from 1).
pub const PATCH_HIDDEN_LAYERS: usize = 2;

impl DvaeEncoder {
    pub fn is_dall_e(&self) -> bool {
        *self == DvaeEncoder::DallE
    }
}

/// Sber's VQGAN (ruDALL-E's image tokenizer; taming-transformers' `Encoder` / `Decoder` with
/// a gumbel quantizer), as its config names it: the image tokenizer of imported ruDALL-E models,
/// in place of [`DvaeDims`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqganDims {
    /// Width of the first level (`ch`) and each level's multiple of it (`ch_mult`); the image is
    /// downsampled by 2^(levels − 1).
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Levels (0: full resolution) whose residual blocks are each followed by attention.
    pub attn_levels: Vec<usize>,
    pub z_channels: usize,
    /// Width of a codebook vector.
    pub embed_dim: usize,
    pub channels: usize,
}

impl VqganDims {
    /// Width of level `i`.
    pub fn width(&self, i: usize) -> usize {
        self.ch * self.ch_mult[i]
    }

    /// Pixels per token side.
    pub fn downsample(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }
}

/// The unified vocabulary spelled out: `[text | pads | image]` offsets and sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutRanges {
    pub text_vocab: usize,
    pub text_len: usize,
    pub codebook: usize,
    pub pad_offset: usize,
    pub image_offset: usize,
    pub vocab_size: usize,
}

impl From<TokenLayout> for LayoutRanges {
    fn from(l: TokenLayout) -> Self {
        LayoutRanges {
            text_vocab: l.text_vocab,
            text_len: l.text_len,
            codebook: l.codebook,
            pad_offset: l.pad(0) as usize,
            image_offset: l.image_offset(),
            vocab_size: l.vocab_size(),
        }
    }
}

/// Input and output names; per-layer names carry `{i}` for the layer index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoNames {
    pub image: String,
    pub image_tokens: String,
    pub input_ids: String,
    pub logits: String,
    pub past_length: String,
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
}

impl Default for IoNames {
    /// The names of [`crate::names`].
    fn default() -> Self {
        let template =
            |f: fn(usize) -> String| f(usize::MAX).replace(&usize::MAX.to_string(), "{i}");
        IoNames {
            image: names::IMAGE.into(),
            image_tokens: names::IMAGE_TOKENS.into(),
            input_ids: names::INPUT_IDS.into(),
            logits: names::LOGITS.into(),
            past_length: names::PAST_LENGTH.into(),
            past_key: template(names::past_key),
            past_value: template(names::past_value),
            present_key: template(names::present_key),
            present_value: template(names::present_value),
        }
    }
}

/// Sampling settings a runtime uses unless the caller overrides them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub guidance_scale: f32,
    /// Candidates sampled per image, the best fit to the caption kept ([`crate::Request::rerank`]);
    /// absent = 1, so manifests written before it read (and write) unchanged.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub rerank: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            guidance_scale: 1.0,
            rerank: 1,
        }
    }
}

impl SamplingDefaults {
    pub fn params(&self) -> crate::SamplingParams {
        crate::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// Size and checksum of one file of the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// The whole manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// The program that wrote the directory, e.g. `dalle 0.1.0`.
    pub producer: String,
    /// Preset the checkpoints were trained from (informational).
    pub preset: String,
    pub geometry: Geometry,
    pub layout: LayoutRanges,
    pub transformer: TransformerDims,
    /// The image tokenizer: OpenAI's dVAE (every model trained here), or …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dvae: Option<DvaeDims>,
    /// … Sber's VQGAN (imported ruDALL-E models). Exactly one of the two is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqgan: Option<VqganDims>,
    /// Attention kind of each transformer layer, in order.
    pub layers: Vec<AttentionKind>,
    pub io: IoNames,
    pub opset: i64,
    pub dtype: Dtype,
    pub sampling: SamplingDefaults,
    /// Every file of the directory but the manifest, by name.
    pub files: BTreeMap<String, FileEntry>,
}

/// A model directory that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a valid manifest ({message}); re-export the model with `dalle export`")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: manifest schema version {found}, this build reads {SCHEMA_VERSION}; re-export the model with this version: `dalle export --from-model DIR --out NEW_DIR`")]
    Schema { path: PathBuf, found: u32 },
    #[error("{path}: inconsistent manifest: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{dir}: not a model directory (no manifest.json): {hint}")]
    NotAModel { dir: PathBuf, hint: String },
    #[error("{dir}: `{file}` is missing; the manifest lists it (copy the whole model directory)")]
    MissingFile { dir: PathBuf, file: String },
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}: the file changed after export; re-export or copy it again")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// What a directory without a manifest is, and what to do with it.
fn not_a_model_hint(dir: &Path) -> String {
    let has = |f: &str| dir.join(f).exists();
    if has("transformer.safetensors") {
        format!(
            "it is a `dalle train` run; export it with `dalle export --transformer {} --out \
             MODEL_DIR`, or generate from it on candle with `--checkpoint {}`",
            dir.display(),
            dir.display()
        )
    } else if has("encoder.safetensors") {
        "it is a `dalle train-vae` run (a dVAE alone); train the transformer on it with \
         `dalle train --vae DIR`, then `dalle export`"
            .to_string()
    } else {
        "pass a directory written by `dalle export`".to_string()
    }
}

/// Lower-case hex sha256 and length of a file, read in chunks.
pub fn sha256_file(path: &Path) -> Result<FileEntry, std::io::Error> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileEntry { bytes, sha256 })
}

impl Manifest {
    /// Files every model directory must hold besides the manifest.
    pub const REQUIRED: [&'static str; 4] = [
        names::TOKENIZER,
        names::DVAE_ENCODER,
        names::DVAE_DECODER,
        names::TRANSFORMER,
    ];

    /// Read, check and verify `dir/manifest.json` and every file it lists.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let m = Manifest::read(dir)?;
        m.verify_files(dir)?;
        Ok(m)
    }

    /// Read and check the manifest without hashing the files.
    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(names::MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound && dir.is_dir() {
                ManifestError::NotAModel {
                    dir: dir.to_path_buf(),
                    hint: not_a_model_hint(dir),
                }
            } else {
                ManifestError::Io {
                    path: path.clone(),
                    error,
                }
            }
        })?;
        Manifest::parse(&text, &path)
    }

    /// Parse and check a manifest's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let path = path.to_path_buf();
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ManifestError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let found = value.get("schema_version").and_then(|v| v.as_u64());
        if found != Some(SCHEMA_VERSION as u64) {
            return Err(ManifestError::Schema {
                path,
                found: found.unwrap_or(0) as u32,
            });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| ManifestError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        m.check()
            .map_err(|message| ManifestError::Invalid { path, message })?;
        Ok(m)
    }

    /// The numbers must describe one model.
    pub fn check(&self) -> Result<(), String> {
        self.geometry.validate().map_err(|e| e.to_string())?;
        let want = LayoutRanges::from(TokenLayout::from(&self.geometry));
        if self.layout != want {
            return Err(format!(
                "layout {:?} does not follow from the geometry (expected {want:?})",
                self.layout
            ));
        }
        let t = &self.transformer;
        let mut sizes = vec![
            ("transformer.d_model", t.d_model, 1 << 16),
            ("transformer.n_layers", t.n_layers, 1 << 12),
            ("transformer.n_heads", t.n_heads, 1 << 12),
            ("transformer.head_dim", t.head_dim, 1 << 16),
        ];
        match (&self.dvae, &self.vqgan) {
            (Some(d), None) => sizes.extend([
                ("dvae.group_count", d.group_count, 16),
                ("dvae.n_hid", d.n_hid, 1 << 14),
                ("dvae.n_blk_per_group", d.n_blk_per_group, 64),
                ("dvae.n_init", d.n_init, 1 << 14),
                ("dvae.channels", d.channels, 64),
            ]),
            (None, Some(v)) => {
                sizes.extend([
                    ("vqgan.ch", v.ch, 1 << 14),
                    ("vqgan.levels", v.ch_mult.len(), 16),
                    ("vqgan.num_res_blocks", v.num_res_blocks, 64),
                    ("vqgan.z_channels", v.z_channels, 1 << 14),
                    ("vqgan.embed_dim", v.embed_dim, 1 << 14),
                    ("vqgan.channels", v.channels, 64),
                ]);
                sizes.extend(v.ch_mult.iter().map(|&m| ("vqgan.ch_mult", m, 64)));
                if v.ch_mult.is_empty() || v.attn_levels.iter().any(|&l| l >= v.ch_mult.len()) {
                    return Err(format!(
                        "vqgan has {} levels and attention at levels {:?}",
                        v.ch_mult.len(),
                        v.attn_levels
                    ));
                }
            }
            _ => return Err("it names both or neither of `dvae` and `vqgan`".into()),
        }
        // Bounds far above any real model, so nothing derived from them overflows.
        for (field, v, max) in sizes {
            if v > max {
                return Err(format!(
                    "{field} is {v}, above the largest this build handles ({max})"
                ));
            }
        }
        if t.n_heads == 0 || t.n_heads * t.head_dim != t.d_model {
            return Err(format!(
                "transformer n_heads {} × head_dim {} ≠ d_model {}",
                t.n_heads, t.head_dim, t.d_model
            ));
        }
        if self.layers.len() != t.n_layers {
            return Err(format!(
                "{} attention kinds listed for {} layers",
                self.layers.len(),
                t.n_layers
            ));
        }
        if self.io != IoNames::default() {
            return Err(format!(
                "I/O names {:?} differ from this schema's {:?}",
                self.io,
                IoNames::default()
            ));
        }
        if let Some(f) = Self::REQUIRED
            .iter()
            .find(|f| !self.files.contains_key(**f))
        {
            return Err(format!("`{f}` is not listed under files"));
        }
        Ok(())
    }

    /// Hash every listed file and compare with the manifest.
    pub fn verify_files(&self, dir: &Path) -> Result<(), ManifestError> {
        for (name, want) in &self.files {
            let path = dir.join(name);
            // A dangling or looping symlink is a file that cannot be read, not a missing one.
            if std::fs::symlink_metadata(&path).is_err() {
                return Err(ManifestError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: name.clone(),
                });
            }
            let got = sha256_file(&path).map_err(|error| ManifestError::Io {
                path: path.clone(),
                error,
            })?;
            if got.sha256 != want.sha256 {
                return Err(ManifestError::Checksum {
                    path,
                    expected: want.sha256.clone(),
                    actual: got.sha256,
                });
            }
        }
        Ok(())
    }

    /// The token layout of the transformer's vocabulary.
    pub fn token_layout(&self) -> TokenLayout {
        TokenLayout::from(&self.geometry)
    }

    /// Longest sequence the transformer takes (caption then image).
    pub fn max_seq(&self) -> usize {
        self.geometry.seq_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_names_are_templates_of_the_name_functions() {
        let io = IoNames::default();
        assert_eq!(io.past_key, "past_key_values.{i}.key");
        assert_eq!(io.present_value, "present.{i}.value");
        assert_eq!(io.past_key.replace("{i}", "3"), names::past_key(3));
    }

    #[test]
    fn sha256_of_a_known_string() {
        let dir = std::env::temp_dir().join(format!("dalle-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let e = sha256_file(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.bytes, 3);
        assert_eq!(
            e.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
