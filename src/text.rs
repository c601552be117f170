//! The caption tokenizer: byte-level BPE over NFKC-normalised, lowercased captions
//! (Ramesh et al. 2021 §2.2 BPE-encodes lowercased captions), trained with the `tokenizers` crate
//! and saved in its `tokenizer.json` format.

use crate::{Error, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::{Lowercase, Sequence, NFKC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{Model, Tokenizer, TokenizerBuilder};

/// Fewest ids a byte-level BPE vocabulary can have: the 256 byte symbols plus one merge.
pub const MIN_VOCAB: usize = 257;

fn tok_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::input(path, format!("{what}: {e}"))
}

/// Train a byte-level BPE tokenizer of at most `vocab` ids on `captions`.
pub fn train(captions: &[String], vocab: usize, min_frequency: u64) -> Result<Tokenizer> {
    if vocab < MIN_VOCAB {
        return Err(Error::Usage(format!(
            "--vocab {vocab} is too small: byte-level BPE needs at least {MIN_VOCAB} ids"
        )));
    }
    let normalizer = Sequence::new(vec![NFKC.into(), Lowercase.into()]);
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| Error::Usage(format!("cannot build tokenizer: {e}")))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(min_frequency)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tokenizer
        .train(&mut trainer, captions.iter())
        .map_err(|e| Error::Usage(format!("tokenizer training failed: {e}")))?;
    Ok(Tokenizer::from(tokenizer))
}

/// Save as `tokenizer.json` (written atomically).
pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let json = tokenizer
        .to_string(false)
        .map_err(|e| tok_err(path, "cannot serialise tokenizer", e))?;
    crate::fsutil::write_bytes_atomic(path, json.as_bytes())
}

/// Load a `tokenizer.json`.
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::input(
            path,
            "no such tokenizer file; train one with `dalle tokenizer train`",
        ));
    }
    Tokenizer::from_file(path).map_err(|e| tok_err(path, "not a readable tokenizer.json", e))
}

/// Caption → BPE ids, with the special ids the tokenizer's post-processor adds (none for the
/// byte-level BPE trained here; BOS … EOS for ruDALL-E's, `import::yttm`).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| Error::Usage(format!("cannot tokenize {text:?}: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// A copy of `tokenizer` whose BPE merges are each skipped with probability `p` (BPE-dropout,
/// Provilkov et al. 2019; the paper uses 10% during training).
pub fn with_dropout(tokenizer: &Tokenizer, p: f32) -> Result<Tokenizer> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::Usage(format!(
            "BPE dropout must be in [0, 1] (got {p})"
        )));
    }
    let mut t = tokenizer.clone();
    let tokenizers::ModelWrapper::BPE(bpe) = t.get_model() else {
        return Err(Error::Usage("BPE dropout needs a BPE tokenizer".into()));
    };
    let mut bpe = bpe.clone();
    bpe.dropout = if p > 0.0 { Some(p) } else { None };
    t.with_model(tokenizers::ModelWrapper::BPE(bpe));
    Ok(t)
}

/// Number of ids the tokenizer can produce.
pub fn vocab_size(tokenizer: &Tokenizer) -> usize {
    tokenizer.get_model().get_vocab_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..300u64)
            .map(|i| {
                crate::data::shapes::generate_one(0, crate::data::shapes::Split::Train, i, 16)
                    .caption
            })
            .collect()
    }

    #[test]
    fn trains_lowercases_round_trips_and_respects_the_vocab() {
        let tok = train(&corpus(), 400, 2).unwrap();
        assert!(
            vocab_size(&tok) <= 400 && vocab_size(&tok) > 256,
            "{}",
            vocab_size(&tok)
        );
        let a = encode(&tok, "A Red Circle above a blue square").unwrap();
        let b = encode(&tok, "a red circle above a blue square").unwrap();
        assert_eq!(a, b);
        // Frequent words become single tokens.
        assert!(a.len() < 12, "{a:?}");
        let back = tok.decode(&b, false).unwrap();
        // The pre-tokenizer adds a prefix space so the first word splits like the others.
        assert_eq!(back.trim_start(), "a red circle above a blue square");
        // Bytes never seen in training still encode (byte-level fallback).
        assert!(!encode(&tok, "ünïcödé ☃").unwrap().is_empty());
    }

    #[test]
    fn dropout_splits_more_and_rejects_bad_rates() {
        let tok = train(&corpus(), 400, 2).unwrap();
        let plain = encode(&tok, "three small green circles").unwrap();
        let dropped = encode(
            &with_dropout(&tok, 1.0).unwrap(),
            "three small green circles",
        )
        .unwrap();
        assert!(dropped.len() > plain.len());
        assert!(with_dropout(&tok, 1.5).is_err());
        assert!(train(&corpus(), 100, 2)
            .unwrap_err()
            .to_string()
            .contains("too small"));
    }

    #[test]
    fn save_load_round_trip() {
        let tok = train(&corpus(), 300, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        save(&tok, &p).unwrap();
        let back = load(&p).unwrap();
        assert_eq!(
            encode(&back, "a star").unwrap(),
            encode(&tok, "a star").unwrap()
        );
        std::fs::write(&p, "{}").unwrap();
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("not a readable tokenizer.json"));
    }
}
