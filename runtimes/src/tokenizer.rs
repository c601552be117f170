//! The caption tokenizer of a model directory (HF `tokenizers` format).

use crate::session::RuntimeError;
use std::path::Path;

pub use tokenizers::Tokenizer;

/// Load `tokenizer.json`.
pub fn load(path: &Path) -> Result<Tokenizer, RuntimeError> {
    Tokenizer::from_file(path).map_err(|e| RuntimeError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("not a readable tokenizer.json ({e}); re-export the model"),
    })
}

/// Caption → BPE ids, exactly as during training: with the special ids the tokenizer's
/// post-processor adds (none for the byte-level BPE `dalle` trains; BOS … EOS for an imported
/// ruDALL-E tokenizer).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, RuntimeError> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| RuntimeError::Request(format!("cannot tokenize {text:?}: {e}")))?;
    Ok(enc.get_ids().to_vec())
}
