//! A Triton Inference Server model repository (`dalle export --triton DIR`): the two dVAE graphs
//! with dynamic batching, and the transformer with sequence batching and implicit state, all on
//! the onnxruntime backend with TensorRT acceleration settings. Sampling and guidance stay with
//! the client (the repository's README shows the loop).
//!
//! Triton's implicit state replaces each state input with its output whole after every call, so
//! the transformer here is the graph's [`Present::FullBuffers`] variant: its `present` outputs
//! are the full fixed-capacity buffers with the call's positions written in, and the past length
//! is a state of its own (`past_sequence_length` → `present_sequence_length`).

use crate::transformer::{transformer_with, Present};
use crate::{check, io, onnx, publish, write_dir, ExportError, ExportInput, ExportOptions};
use dalle_runtimes::{names, Manifest, TokenLayout};
use std::fmt::Write;
use std::path::Path;

/// Model names inside the repository.
pub const ENCODER: &str = "dvae_encoder";
pub const DECODER: &str = "dvae_decoder";
pub const TRANSFORMER: &str = "transformer";

/// Largest batch of the dVAE models' dynamic batching.
const DVAE_MAX_BATCH: usize = 16;

/// Write the repository to `out` (atomically, as [`crate::export`] does a model directory).
pub fn export_triton(
    input: &ExportInput,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ExportError> {
    check(input, opts)?;
    publish(out, opts.force, |stage| {
        // The model directory first (its dVAE graphs, tokenizer and manifest are reused), then
        // the state variant of the transformer.
        let dir = stage.join(".model");
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        let m = write_dir(input, &dir, opts, progress)?;
        for (graph, model) in [
            (names::DVAE_ENCODER, ENCODER),
            (names::DVAE_DECODER, DECODER),
        ] {
            let version = stage.join(model).join("1");
            std::fs::create_dir_all(&version).map_err(io(&version))?;
            std::fs::rename(dir.join(graph), version.join("model.onnx")).map_err(io(&version))?;
            // External weights keep their file name: the graph refers to it.
            let data = format!("{graph}.data");
            if dir.join(&data).exists() {
                std::fs::rename(dir.join(&data), version.join(&data)).map_err(io(&version))?;
            }
        }
        for file in [names::MANIFEST, names::TOKENIZER] {
            std::fs::rename(dir.join(file), stage.join(file)).map_err(io(stage))?;
        }
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        let version = stage.join(TRANSFORMER).join("1");
        std::fs::create_dir_all(&version).map_err(io(&version))?;
        let graph = transformer_with(
            &input.dvae_geometry,
            &input.transformer,
            &input.transformer_weights,
            opts.dtype,
            opts.opset,
            &input.transformer_source,
            Present::FullBuffers,
        )?;
        onnx::save(
            graph,
            &version.join("model.onnx"),
            opts.external_data_threshold,
        )?;
        progress("transformer (state variant): written");
        for (model, text) in [
            (ENCODER, encoder_config(&m)),
            (DECODER, decoder_config(&m)),
            (TRANSFORMER, transformer_config(&m)),
        ] {
            let path = stage.join(model).join("config.pbtxt");
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        let path = stage.join("README.md");
        std::fs::write(&path, readme(&m)).map_err(io(&path))?;
        Ok(m)
    })
}

/// The TensorRT accelerator of the onnxruntime backend: FP16 engines, cached on disk.
const TENSORRT: &str = r#"optimization {
  execution_accelerators {
    gpu_execution_accelerator: [
      {
        name: "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
        parameters { key: "max_workspace_size_bytes" value: "1073741824" }
        parameters { key: "trt_engine_cache_enable" value: "1" }
        parameters { key: "trt_engine_cache_path" value: "/tmp/dalle-trt-engines" }
      }
    ]
  }
}
"#;

fn encoder_config(m: &Manifest) -> String {
    let (s, n) = (m.geometry.image_size, m.geometry.image_tokens());
    let image = (names::IMAGE, "TYPE_FP32", format!("3, {s}, {s}"));
    dvae_config(
        ENCODER,
        image,
        (names::IMAGE_TOKENS, "TYPE_INT64", n.to_string()),
    )
}

fn decoder_config(m: &Manifest) -> String {
    let (s, n) = (m.geometry.image_size, m.geometry.image_tokens());
    let tokens = (names::IMAGE_TOKENS, "TYPE_INT64", n.to_string());
    dvae_config(
        DECODER,
        tokens,
        (names::IMAGE, "TYPE_FP32", format!("3, {s}, {s}")),
    )
}

/// A dVAE graph with dynamic batching: one input and one output, each (name, type, dims).
fn dvae_config(name: &str, input: (&str, &str, String), output: (&str, &str, String)) -> String {
    format!(
        r#"name: "{name}"
backend: "onnxruntime"
max_batch_size: {DVAE_MAX_BATCH}
input [
  {{ name: "{}" data_type: {} dims: [ {} ] }}
]
output [
  {{ name: "{}" data_type: {} dims: [ {} ] }}
]
dynamic_batching {{ }}
{TENSORRT}"#,
        input.0, input.1, input.2, output.0, output.1, output.2,
    )
}

/// One sequence (one image, or the unconditional half of a guided one) per correlation id, batch
/// 1; its KV buffers and past length live in the server as implicit state, zero at the start.
fn transformer_config(m: &Manifest) -> String {
    let t = &m.transformer;
    let cap = m.max_seq();
    let vocab = m.token_layout().vocab_size();
    let mut states = String::new();
    let _ = write!(
        states,
        r#"    {{
      input_name: "{past}"
      output_name: "{present}"
      data_type: TYPE_INT64
      dims: [ 1 ]
      initial_state: {{ data_type: TYPE_INT64 dims: [ 1 ] zero_data: true name: "empty" }}
    }}"#,
        past = names::PAST_LENGTH,
        present = names::PRESENT_LENGTH,
    );
    for i in 0..t.n_layers {
        for (past, present) in [
            (names::past_key(i), names::present_key(i)),
            (names::past_value(i), names::present_value(i)),
        ] {
            let _ = write!(
                states,
                r#",
    {{
      input_name: "{past}"
      output_name: "{present}"
      data_type: TYPE_FP32
      dims: [ 1, {h}, {cap}, {hd} ]
      initial_state: {{ data_type: TYPE_FP32 dims: [ 1, {h}, {cap}, {hd} ] zero_data: true name: "empty" }}
    }}"#,
                h = t.n_heads,
                hd = t.head_dim,
            );
        }
    }
    format!(
        r#"name: "{TRANSFORMER}"
backend: "onnxruntime"
max_batch_size: 0
input [
  {{ name: "{ids}" data_type: TYPE_INT64 dims: [ 1, -1 ] }}
]
output [
  {{ name: "{logits}" data_type: TYPE_FP32 dims: [ 1, -1, {vocab} ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  state [
{states}
  ]
}}
{TENSORRT}"#,
        ids = names::INPUT_IDS,
        logits = names::LOGITS,
    )
}

fn readme(m: &Manifest) -> String {
    let g = &m.geometry;
    let layout = TokenLayout::from(g);
    format!(
        r#"# dalle model repository for Triton Inference Server

Written by `dalle export --triton` (preset `{preset}`, {dtype}). Serve it with
`tritonserver --model-repository=THIS_DIR` (the onnxruntime backend; TensorRT FP16 engines are
built on first use and cached in `/tmp/dalle-trt-engines`).

| model | inputs → outputs | batching |
|---|---|---|
| `{ENCODER}` | `image` f32 [3, {s}, {s}] in [0, 1] → `image_tokens` i64 [{n}] | dynamic, up to {DVAE_MAX_BATCH} |
| `{TRANSFORMER}` | `input_ids` i64 [1, seq] → `logits` f32 [1, seq, {vocab}] | sequence batching: one sequence per correlation id; the KV cache and its length are implicit state |
| `{DECODER}` | `image_tokens` i64 [{n}] → `image` f32 [3, {s}, {s}] | dynamic, up to {DVAE_MAX_BATCH} |

`manifest.json` describes the token layout and the default sampling; `tokenizer.json` is the
caption tokenizer (HF `tokenizers`). Sampling and classifier-free guidance run in the client:

1. Tokenize the caption into exactly {text_len} ids: BPE ids, then the padding ids `{pad} + i` at
   positions i past the caption's end (`manifest.json`: `layout`).
2. Open a sequence (a new correlation id, `sequence_start`) and send the {text_len} caption ids
   as `input_ids`; with guidance, open a second sequence with the empty caption (all padding).
3. Take the last position's logits over the image vocabulary (ids {image_offset} ..
   {image_end}), mix with guidance (`uncond + scale · (cond − uncond)`), sample (temperature,
   top-k, top-p), and send the sampled id as the next one-token `input_ids` of each sequence;
   {n} times in all, the last with `sequence_end`.
4. Subtract {image_offset} from the sampled ids and send the {n} codes to `{DECODER}`.

The repository's transformer differs from the model directory's only in its outputs: its
`present.*` are the whole buffers with the call's keys and values written in, and
`present_sequence_length` is the next call's `past_sequence_length`.
"#,
        preset = m.preset,
        dtype = m.dtype,
        s = g.image_size,
        n = g.image_tokens(),
        vocab = layout.vocab_size(),
        text_len = g.text_len,
        pad = layout.pad(0),
        image_offset = layout.image_offset(),
        image_end = layout.vocab_size(),
    )
}
