//! File and tensor names of the model directory: the one place the exporter and every runtime
//! take them from. Tensor names follow HF optimum / onnxruntime-genai.

/// `manifest.json`: what the directory holds (see [`crate::manifest`]).
pub const MANIFEST: &str = "manifest.json";
/// The caption tokenizer in the HF `tokenizers` format.
pub const TOKENIZER: &str = "tokenizer.json";
/// Image → tokens.
pub const DVAE_ENCODER: &str = "dvae_encoder.onnx";
/// Tokens → image.
pub const DVAE_DECODER: &str = "dvae_decoder.onnx";
/// The transformer with a KV cache.
pub const TRANSFORMER: &str = "transformer.onnx";

/// f32 `[batch, 3, H, W]` in [0, 1]: the encoder's input and the decoder's output.
pub const IMAGE: &str = "image";
/// i64 `[batch, grid·grid]` codebook indices in raster order.
pub const IMAGE_TOKENS: &str = "image_tokens";
/// i64 `[batch, seq]` ids of the unified vocabulary.
pub const INPUT_IDS: &str = "input_ids";
/// f32 `[batch, seq, vocab]`.
pub const LOGITS: &str = "logits";

/// Symbolic dimension names of the graphs' inputs and outputs.
pub const DIM_BATCH: &str = "batch";
pub const DIM_SEQ: &str = "seq";
pub const DIM_PAST: &str = "past_seq";
pub const DIM_TOTAL: &str = "total_seq";

/// f32 `[batch, heads, past_seq, head_dim]` keys of layer `i` for the positions seen so far.
pub fn past_key(i: usize) -> String {
    format!("past_key_values.{i}.key")
}

/// Values of layer `i`, shaped like [`past_key`].
pub fn past_value(i: usize) -> String {
    format!("past_key_values.{i}.value")
}

/// `[batch, heads, past_seq + seq, head_dim]`: the keys to feed back as `past_key(i)`.
pub fn present_key(i: usize) -> String {
    format!("present.{i}.key")
}

/// Values of layer `i`, shaped like [`present_key`].
pub fn present_value(i: usize) -> String {
    format!("present.{i}.value")
}
