//! ruDALL-E's transformer (ai-forever/ru-dalle 1.1.3, `rudalle/dalle/model.py` and
//! `transformer.py`) as this project's: the same sparse-attention decoder, whose masks, layer
//! pattern, fused head-major `[q|k|v]` projection, tanh-GELU MLP and unified vocabulary (text
//! BPE ids, one pad id per caption position, then image codes) are ours, plus two layer norms
//! per block around the residual branches (CogView's sandwich norms) and a second final norm
//! (`Norms`). PB-relax, the −10000 additive mask and the ±65504 clamp change nothing in f32.
//!
//! Names (theirs → ours): `text_embeddings` ++ `image_embeddings` → `embed.tokens`,
//! `text_pos_embeddings` (its first `text_len` rows) → `embed.text_pos`,
//! `image_{row,col}_embeddings` → `embed.image_{row,col}`, per layer `input_layernorm` → `ln_1`,
//! `attention.query_key_value` → `attn.qkv`, `attention.dense` → `attn.proj`,
//! `before_first_addition_layernorm` → `attn.ln_out`, `post_attention_layernorm` → `ln_2`,
//! `mlp.dense_h_to_4h` → `mlp.fc`, `mlp.dense_4h_to_h` → `mlp.proj`,
//! `before_second_addition_layernorm` → `mlp.ln_out`; `transformer.final_layernorm` → `ln_f`,
//! `to_logits.0` → `ln_head`, `to_logits.1` → `head`.

use super::torch::StateDict;
use crate::config::TransformerConfig;
use crate::{Error, Result};
use candle_core::Tensor;
use dalle_runtimes::{Geometry, Norms};
use std::collections::HashMap;
use std::path::Path;

/// ruDALL-E's convolutional attention window (`get_conv_mask`'s default kernel).
pub const CONV_KERNEL: usize = 11;

/// Side of the image one VQGAN token covers (Sber's VQGAN is f8).
pub const VQGAN_DOWNSAMPLE: usize = 8;

/// Which of ruDALL-E's model families a checkpoint belongs to (`hf_version` in rudalle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Version {
    /// Malevich (`pytorch_model_v3.bin`), Surrealist_XL, Kandinsky.
    V3,
    /// Malevich_v2, Emojich: a BOS before the caption and a conv mask that wraps around the
    /// image's edges.
    V2,
}

/// What the state dict cannot say: the head count (it changes no weight's shape).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub version: Version,
    /// Attention heads; `None`: the published models' count for their width (2048 → 16,
    /// Malevich; 3840 → 60, Kandinsky; 768 → 12, rudalle's `dummy`).
    pub n_heads: Option<usize>,
}

/// An imported transformer: its geometry (the image side assumes the f8 VQGAN), config and
/// weights under this project's names.
pub struct Transformer {
    pub geometry: Geometry,
    pub config: TransformerConfig,
    pub weights: HashMap<String, Tensor>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The transformer in ruDALL-E checkpoint `path`, read with [`super::torch::read`].
pub fn transformer(path: &Path, state: &StateDict, options: Options) -> Result<Transformer> {
    if options.version == Version::V2 {
        return Err(bad(
            path,
            "ruDALL-E v2 models (Malevich_v2, Emojich) prepend a BOS token to the caption and \
             wrap the convolutional attention mask around the image's edges; this import \
             supports v3 (Malevich `pytorch_model_v3.bin`, Surrealist_XL, Kandinsky) only",
        ));
    }
    let t = &state.tensors;
    let get = |name: &str| -> Result<&Tensor> {
        t.get(name).ok_or_else(|| {
            let why = match state.other.get(name) {
                Some(why) => format!("its `{name}` is {why}"),
                None => format!("it lacks `{name}`"),
            };
            bad(
                path,
                format!(
                    "{why}: not a ruDALL-E transformer checkpoint (Malevich's \
                     `pytorch_model_v3.bin` holds `text_embeddings.weight`, \
                     `transformer.layers.0.…`, `to_logits.1.weight`)"
                ),
            )
        })
    };
    let dims = |name: &str| -> Result<Vec<usize>> { Ok(get(name)?.dims().to_vec()) };
    let text = dims("text_embeddings.weight")?;
    let [vocab_with_pads, d] = text[..] else {
        return Err(bad(path, "`text_embeddings.weight` is not a matrix"));
    };
    let codebook = dims("image_embeddings.weight")?[0];
    let text_len = dims("text_pos_embeddings.weight")?[0].saturating_sub(1);
    let grid = dims("image_row_embeddings.weight")?[0];
    let n_layers = (0..)
        .take_while(|i| t.contains_key(&format!("transformer.layers.{i}.input_layernorm.weight")))
        .count();
    if text_len == 0 || grid == 0 || n_layers == 0 || vocab_with_pads <= text_len {
        return Err(bad(
            path,
            format!(
                "its geometry is not a model's: {n_layers} layers, text length {text_len}, \
                 grid {grid}, text vocabulary with pads {vocab_with_pads}"
            ),
        ));
    }
    // rudalle's last layer is a column layer where (L − 2) mod 4 = 0; ours is always the conv.
    if n_layers >= 2 && (n_layers - 2) % 4 == 0 {
        return Err(bad(
            path,
            format!(
                "it has {n_layers} layers: at depths where (layers − 2) is a multiple of 4, \
                 ruDALL-E's last layer attends by column, which the exported graphs do not \
                 express (every published ruDALL-E has 24 or 64 layers)"
            ),
        ));
    }
    let n_heads = match options.n_heads {
        Some(h) => h,
        None => match d {
            2048 => 16,
            3840 => 60,
            768 => 12,
            _ => {
                return Err(bad(
                    path,
                    format!(
                        "its width {d} is not a published model's, so its head count is \
                         unknown; pass it (--heads)"
                    ),
                ))
            }
        },
    };
    if n_heads == 0 || d % n_heads != 0 {
        return Err(bad(
            path,
            format!("its width {d} does not split into {n_heads} heads"),
        ));
    }
    let sandwich = t.contains_key("transformer.layers.0.before_first_addition_layernorm.weight");
    let geometry = Geometry {
        image_size: grid * VQGAN_DOWNSAMPLE,
        grid,
        codebook,
        text_len,
        text_vocab: vocab_with_pads - text_len,
    };
    geometry
        .validate()
        .map_err(|e| bad(path, format!("its geometry is not a model's: {e}")))?;

    // (ours, theirs, shape) of every weight copied as it is.
    let mut plan: Vec<(String, String, Vec<usize>)> = vec![];
    let norm = |plan: &mut Vec<_>, ours: &str, theirs: &str| {
        for part in ["weight", "bias"] {
            plan.push((
                format!("{ours}.{part}"),
                format!("{theirs}.{part}"),
                vec![d],
            ));
        }
    };
    let linear = |plan: &mut Vec<_>, ours: &str, theirs: &str, n_in: usize, n_out: usize| {
        plan.push((
            format!("{ours}.weight"),
            format!("{theirs}.weight"),
            vec![n_out, n_in],
        ));
        plan.push((
            format!("{ours}.bias"),
            format!("{theirs}.bias"),
            vec![n_out],
        ));
    };
    for (ours, theirs) in [
        ("image_row", "image_row_embeddings"),
        ("image_col", "image_col_embeddings"),
    ] {
        plan.push((
            format!("embed.{ours}"),
            format!("{theirs}.weight"),
            vec![grid, d],
        ));
    }
    for i in 0..n_layers {
        let (o, p) = (format!("layers.{i}"), format!("transformer.layers.{i}"));
        norm(
            &mut plan,
            &format!("{o}.ln_1"),
            &format!("{p}.input_layernorm"),
        );
        linear(
            &mut plan,
            &format!("{o}.attn.qkv"),
            &format!("{p}.attention.query_key_value"),
            d,
            3 * d,
        );
        linear(
            &mut plan,
            &format!("{o}.attn.proj"),
            &format!("{p}.attention.dense"),
            d,
            d,
        );
        norm(
            &mut plan,
            &format!("{o}.ln_2"),
            &format!("{p}.post_attention_layernorm"),
        );
        linear(
            &mut plan,
            &format!("{o}.mlp.fc"),
            &format!("{p}.mlp.dense_h_to_4h"),
            d,
            4 * d,
        );
        linear(
            &mut plan,
            &format!("{o}.mlp.proj"),
            &format!("{p}.mlp.dense_4h_to_h"),
            4 * d,
            d,
        );
        if sandwich {
            norm(
                &mut plan,
                &format!("{o}.attn.ln_out"),
                &format!("{p}.before_first_addition_layernorm"),
            );
            norm(
                &mut plan,
                &format!("{o}.mlp.ln_out"),
                &format!("{p}.before_second_addition_layernorm"),
            );
        }
    }
    norm(&mut plan, "ln_f", "transformer.final_layernorm");
    norm(&mut plan, "ln_head", "to_logits.0");
    linear(
        &mut plan,
        "head",
        "to_logits.1",
        d,
        vocab_with_pads + codebook,
    );

    let mut used = std::collections::BTreeSet::new();
    let mut take = |theirs: &str, shape: &[usize]| -> Result<Tensor> {
        let w = get(theirs)?;
        if w.dims() != shape {
            return Err(bad(
                path,
                format!(
                    "`{theirs}` is {:?}; a model of width {d} with this geometry needs {shape:?}",
                    w.dims()
                ),
            ));
        }
        used.insert(theirs.to_string());
        Ok(w.clone())
    };
    let mut weights = HashMap::new();
    for (ours, theirs, shape) in &plan {
        weights.insert(ours.clone(), take(theirs, shape)?);
    }
    let text_table = take("text_embeddings.weight", &[vocab_with_pads, d])?;
    let image_table = take("image_embeddings.weight", &[codebook, d])?;
    weights.insert(
        "embed.tokens.weight".into(),
        Tensor::cat(&[&text_table, &image_table], 0)?,
    );
    // Position `text_len` (v2's extra position, after its BOS) is unused in v3.
    let pos = take("text_pos_embeddings.weight", &[text_len + 1, d])?;
    weights.insert("embed.text_pos".into(), pos.narrow(0, 0, text_len)?);
    // Whatever else is a float tensor is a part this import would silently drop; the attention
    // masks (buffers, bool or float by rudalle's version) are ours already.
    let masks = ["row_mask", "col_mask", "conv_mask"].map(|m| format!("transformer.{m}"));
    if let Some(extra) = t.keys().find(|k| !used.contains(*k) && !masks.contains(k)) {
        return Err(bad(
            path,
            format!(
                "it holds `{extra}`, which no part of ruDALL-E's v3 transformer has: a different \
                 variant, which this import does not support"
            ),
        ));
    }
    Ok(Transformer {
        geometry,
        config: TransformerConfig {
            d_model: d,
            n_layers,
            n_heads,
            conv_kernel: CONV_KERNEL,
            norms: Norms {
                sandwich,
                head: true,
            },
        },
        weights,
    })
}

/// What `dalle import rudalle` reads.
pub struct ImportPaths<'a> {
    /// The transformer's state dict (`pytorch_model_v3.bin`).
    pub transformer: &'a Path,
    /// Sber's VQGAN (`vqgan.gumbelf8-sber.model.ckpt`: a Lightning checkpoint, or a bare state
    /// dict).
    pub vqgan: &'a Path,
    /// The YouTokenToMe model (`bpe.model`).
    pub tokenizer: &'a Path,
}

/// ruDALL-E's sampling settings (its README's `generate_images(…, top_k=2048, top_p=0.995)`),
/// the top-k capped at the codebook.
pub fn sampling(codebook: usize) -> dalle_runtimes::SamplingDefaults {
    dalle_runtimes::SamplingDefaults {
        temperature: 1.0,
        top_k: Some(2048.min(codebook)),
        top_p: Some(0.995),
        guidance_scale: 1.0,
        rerank: 1,
    }
}

/// Everything an export of a ruDALL-E model reads: the transformer, the VQGAN split into its
/// encoder's and decoder's weights, and the tokenizer converted into `tokenizer_json` (a path
/// the caller owns).
pub fn export_input(
    paths: &ImportPaths,
    options: Options,
    tokenizer_json: &Path,
) -> Result<dalle_export::ExportInput> {
    let state = super::torch::read(paths.transformer, None)?;
    let t = transformer(paths.transformer, &state, options)?;
    drop(state);
    let vq = read_vqgan(paths.vqgan)?;
    let dims = crate::vae::vqgan::dims(&vq).map_err(|e| bad(paths.vqgan, e.to_string()))?;
    // The structure is checked by building it (names, shapes, GroupNorm widths).
    crate::vae::vqgan::Vqgan::new(&vq).map_err(|e| bad(paths.vqgan, e.to_string()))?;
    let codebook = vq["quantize.embed.weight"].dim(0)?;
    if codebook != t.geometry.codebook || dims.downsample() != VQGAN_DOWNSAMPLE {
        return Err(bad(
            paths.vqgan,
            format!(
                "a VQGAN of {codebook} codes at f{}; the transformer {} reads {} codes of an f8 \
                 VQGAN: they are not one model's",
                dims.downsample(),
                paths.transformer.display(),
                t.geometry.codebook
            ),
        ));
    }
    let tok = super::yttm::tokenizer(paths.tokenizer)?;
    let ids = tok.get_vocab_size(true);
    if ids > t.geometry.text_vocab {
        return Err(bad(
            paths.tokenizer,
            format!(
                "has {ids} ids; the transformer's text vocabulary is {}: not this model's \
                 tokenizer",
                t.geometry.text_vocab
            ),
        ));
    }
    tok.save(tokenizer_json, false).map_err(|e| {
        bad(
            tokenizer_json,
            format!("cannot write the converted tokenizer ({e})"),
        )
    })?;
    let part = |prefixes: &[&str]| -> Result<dalle_export::Weights> {
        let picked: HashMap<String, Tensor> = vq
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        crate::export::to_weights(&picked)
    };
    let spec = dalle_export::TransformerSpec {
        d_model: t.config.d_model,
        n_layers: t.config.n_layers,
        n_heads: t.config.n_heads,
        conv_kernel: t.config.conv_kernel,
        norms: t.config.norms,
    };
    Ok(dalle_export::ExportInput {
        preset: "rudalle".into(),
        dvae_geometry: t.geometry,
        transformer_geometry: t.geometry,
        codec: dalle_export::ImageCodec::Vqgan(dims),
        encoder: part(&["encoder.", "quant_conv.", "quantize.proj."])?,
        encoder_source: paths.vqgan.display().to_string(),
        decoder: part(&["decoder.", "post_quant_conv.", "quantize.embed."])?,
        decoder_source: paths.vqgan.display().to_string(),
        transformer: spec,
        transformer_weights: crate::export::to_weights(&t.weights)?,
        transformer_source: paths.transformer.display().to_string(),
        tokenizer: tokenizer_json.to_path_buf(),
        sampling: sampling(t.geometry.codebook),
    })
}

/// The VQGAN's tensors: a Lightning checkpoint's `state_dict`, or the file's own state dict.
fn read_vqgan(path: &Path) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let state = match super::torch::read(path, Some("state_dict")) {
        Ok(s) => s,
        Err(Error::Checkpoint { message, .. }) if message.contains("holds no `state_dict`") => {
            super::torch::read(path, None)?
        }
        Err(e) => return Err(e),
    };
    if state
        .tensors
        .keys()
        .any(|k| k.starts_with("model.decoder.decoder.") || k.contains("idwt"))
    {
        return Err(bad(
            path,
            "is the DWT variant of Sber's VQGAN (vqgan.gumbelf8-sber-dwt: its decoder ends in an \
             inverse wavelet transform), which this import does not support; use \
             vqgan.gumbelf8-sber.model.ckpt",
        ));
    }
    if !state.tensors.contains_key("quantize.embed.weight") {
        return Err(bad(
            path,
            "lacks `quantize.embed.weight`: not a ruDALL-E VQGAN checkpoint \
             (vqgan.gumbelf8-sber.model.ckpt)",
        ));
    }
    Ok(state.tensors)
}
