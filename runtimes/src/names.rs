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
/// i64 `[1]`: how many positions of the KV cache are filled; this call's tokens sit at
/// positions `past_sequence_length ..`.
pub const PAST_LENGTH: &str = "past_sequence_length";

/// i64 `[1]`, output of the state variant (`dalle export --triton`): `past_sequence_length` +
/// this call's positions, the next call's `past_sequence_length`.
pub const PRESENT_LENGTH: &str = "present_sequence_length";

/// Symbolic dimension names of the graphs' inputs and outputs.
pub const DIM_BATCH: &str = "batch";
pub const DIM_SEQ: &str = "seq";

/// f32 `[batch, heads, max_seq, head_dim]` keys of layer `i`: a fixed-capacity buffer (the
/// manifest's whole sequence) whose first `past_sequence_length` positions are filled; the rest
/// is never read. The caller owns it and writes each call's [`present_key`] into it.
pub fn past_key(i: usize) -> String {
    format!("past_key_values.{i}.key")
}

/// Values of layer `i`, shaped like [`past_key`].
pub fn past_value(i: usize) -> String {
    format!("past_key_values.{i}.value")
}

/// `[batch, heads, seq, head_dim]`: the keys of this call's positions only, to be written into
/// the caller's buffer at `past_sequence_length ..` before the next call.
pub fn present_key(i: usize) -> String {
    format!("present.{i}.key")
}

/// Values of layer `i`, shaped like [`present_key`].
pub fn present_value(i: usize) -> String {
    format!("present.{i}.value")
}
