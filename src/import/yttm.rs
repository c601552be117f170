//! YouTokenToMe BPE models (ruDALL-E's `bpe.model`) as `tokenizer.json`, giving the same ids.
//!
//! The model file (YouTokenToMe 1.0.6, `BPEState::dump`): a line `chars rules`, one line
//! `codepoint id` per character, one line `x y z` per merge rule (tokens x and y make z; a
//! rule's line is its priority), and `unk pad bos eos` ids. YouTokenToMe splits text at ASCII
//! white space (and its word mark U+2581), starts each word with the mark, maps a run of unknown
//! characters to one unk id, and applies the lowest-numbered rule first, leftmost first — which
//! is what `tokenizers`' BPE does with the rules as its ranked merges, unk fusing, and a
//! Metaspace pre-tokenizer after a split at those white-space characters. ruDALL-E's pipeline
//! lowercases captions and wraps them in BOS … EOS: a Lowercase normalizer and a template
//! post-processor do that here.

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// YouTokenToMe's word mark.
const MARK: char = '\u{2581}';

/// Names of the special ids in the converted vocabulary (they are not characters, so no text
/// produces them).
const SPECIAL: [&str; 4] = ["<UNK>", "<PAD>", "<BOS>", "<EOS>"];

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The YouTokenToMe model at `path` as a tokenizer.
pub fn tokenizer(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        bad(
            path,
            "is not text: not a YouTokenToMe BPE model (ruDALL-E's `bpe.model` is a text file)",
        )
    })?;
    let not_yttm = |line: usize, what: &str| {
        bad(
            path,
            format!(
                "line {line}: {what}: not a YouTokenToMe BPE model (ruDALL-E's `bpe.model`: a \
                 line `chars rules`, then `codepoint id`, `x y z` and `unk pad bos eos` lines)"
            ),
        )
    };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).peekable();
    let mut numbers = |want: usize, what: &str| -> Result<Vec<u32>> {
        let (n, line) = lines
            .next()
            .ok_or_else(|| not_yttm(text.lines().count() + 1, &format!("ends before {what}")))?;
        let v: Vec<u32> = line
            .split_ascii_whitespace()
            .map(|w| w.parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| not_yttm(n, &format!("`{line}` is not {want} numbers ({what})")))?;
        if v.len() != want {
            if v.len() < want && lines.peek().is_none() {
                return Err(not_yttm(
                    n,
                    &format!("the file ends inside {what} (truncated?)"),
                ));
            }
            return Err(not_yttm(
                n,
                &format!("`{line}` is not {want} numbers ({what})"),
            ));
        }
        Ok(v)
    };
    let head = numbers(2, "the character and rule counts")?;
    let (n_chars, n_rules) = (head[0] as usize, head[1] as usize);
    // id → token text.
    let mut token: HashMap<u32, String> = HashMap::new();
    for _ in 0..n_chars {
        let v = numbers(2, "a character's code point and id")?;
        let c = char::from_u32(v[0]).ok_or_else(|| {
            bad(
                path,
                format!(
                    "character id {} has code point {}, not a character",
                    v[1], v[0]
                ),
            )
        })?;
        token.insert(v[1], c.to_string());
    }
    let mut rules = Vec::with_capacity(n_rules);
    for _ in 0..n_rules {
        let v = numbers(3, "a merge rule")?;
        let part = |id: u32| {
            token.get(&id).cloned().ok_or_else(|| {
                bad(
                    path,
                    format!("merge rule {v:?} uses token {id} before it is defined"),
                )
            })
        };
        let (x, y) = (part(v[0])?, part(v[1])?);
        token.insert(v[2], format!("{x}{y}"));
        rules.push((x, y));
    }
    let special = numbers(4, "the unk, pad, bos and eos ids")?;
    if !token.values().any(|t| t == &MARK.to_string()) {
        return Err(bad(
            path,
            "has no word mark (U+2581) among its characters: not a YouTokenToMe model",
        ));
    }
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(token.len() + 4);
    for (&id, t) in &token {
        if let Some(other) = vocab.insert(t.clone(), id) {
            return Err(bad(
                path,
                format!(
                    "ids {other} and {id} are both `{t}`: a vocabulary with one token text \
                     twice cannot be converted"
                ),
            ));
        }
    }
    for (name, &id) in SPECIAL.iter().zip(&special) {
        if token.contains_key(&id) {
            return Err(bad(
                path,
                format!("special id {id} ({name}) is also a token"),
            ));
        }
        vocab.insert(name.to_string(), id);
    }
    let make = |e: Box<dyn std::error::Error + Send + Sync>| {
        bad(
            path,
            format!("cannot be expressed as a BPE tokenizer ({e})"),
        )
    };
    let model = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), rules)
        .unk_token(SPECIAL[0].into())
        .fuse_unk(true)
        .build()
        .map_err(make)?;
    // C's isspace in the "C" locale, and the word mark itself.
    let split = Split::new(
        SplitPattern::Regex(format!("[ \\t\\n\\x0B\\x0C\\r{MARK}]+")),
        SplitDelimiterBehavior::Removed,
        false,
    )
    .map_err(make)?;
    let pre = Sequence::new(vec![
        split.into(),
        Metaspace::new(MARK, PrependScheme::Always, false).into(),
    ]);
    let (bos, eos) = (special[2], special[3]);
    let post = TemplateProcessing::builder()
        .try_single(format!("{}:0 $A:0 {}:0", SPECIAL[2], SPECIAL[3]))
        .map_err(|e| make(e.into()))?
        .special_tokens(vec![(SPECIAL[2], bos), (SPECIAL[3], eos)])
        .build()
        .map_err(|e| make(e.into()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(Lowercase))
        .map_err(make)?
        .with_pre_tokenizer(Some(pre))
        .with_post_processor(Some(post))
        .with_decoder(Some(Metaspace::new(MARK, PrependScheme::Always, false)));
    Ok(tokenizer)
}
