//! The unified token vocabulary of the transformer (Ramesh et al. 2021 §2.2, appendix B.2):
//!
//! ```text
//! [ text BPE ids : text_vocab | one pad id per caption position : text_len | image codes : codebook ]
//! ```
//!
//! A caption shorter than `text_len` is filled with the pad id *of each position*, so the model
//! can tell where the caption ended; image code `c` is id `text_vocab + text_len + c`.

use crate::Geometry;
use serde::{Deserialize, Serialize};

/// Offsets of the three id ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenLayout {
    pub text_vocab: usize,
    pub text_len: usize,
    pub codebook: usize,
}

impl From<&Geometry> for TokenLayout {
    fn from(g: &Geometry) -> Self {
        TokenLayout {
            text_vocab: g.text_vocab,
            text_len: g.text_len,
            codebook: g.codebook,
        }
    }
}

impl TokenLayout {
    /// Size of the unified vocabulary (the embedding table and the output head).
    pub fn vocab_size(&self) -> usize {
        self.text_vocab + self.text_len + self.codebook
    }

    /// The pad id of caption position `i`.
    pub fn pad(&self, i: usize) -> u32 {
        (self.text_vocab + i) as u32
    }

    /// First id of the image range.
    pub fn image_offset(&self) -> usize {
        self.text_vocab + self.text_len
    }

    /// The unified id of image code `c`.
    pub fn image(&self, code: u32) -> u32 {
        (self.image_offset() as u32) + code
    }

    /// The image code of a unified id, if it is one.
    pub fn image_code(&self, id: u32) -> Option<u32> {
        let id = id as usize;
        (self.image_offset()..self.vocab_size())
            .contains(&id)
            .then(|| (id - self.image_offset()) as u32)
    }

    /// Caption BPE ids → exactly `text_len` ids, padded per position. Returns the ids and
    /// whether the caption was truncated. Ids outside the text vocabulary are an error.
    pub fn caption(&self, bpe: &[u32]) -> Result<(Vec<u32>, bool), u32> {
        if let Some(&bad) = bpe.iter().find(|&&t| t as usize >= self.text_vocab) {
            return Err(bad);
        }
        let truncated = bpe.len() > self.text_len;
        let ids = (0..self.text_len)
            .map(|i| bpe.get(i).copied().unwrap_or_else(|| self.pad(i)))
            .collect();
        Ok((ids, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_do_not_overlap_and_round_trip() {
        let l = TokenLayout {
            text_vocab: 10,
            text_len: 4,
            codebook: 8,
        };
        assert_eq!(l.vocab_size(), 22);
        assert_eq!(l.pad(0), 10);
        assert_eq!(l.pad(3), 13);
        assert_eq!(l.image(0), 14);
        assert_eq!(l.image(7), 21);
        assert_eq!(l.image_code(21), Some(7));
        assert_eq!(l.image_code(13), None);
        assert_eq!(l.image_code(22), None);
    }

    #[test]
    fn captions_are_padded_per_position_or_truncated() {
        let l = TokenLayout {
            text_vocab: 10,
            text_len: 4,
            codebook: 8,
        };
        assert_eq!(l.caption(&[5, 6]).unwrap(), (vec![5, 6, 12, 13], false));
        assert_eq!(l.caption(&[]).unwrap(), (vec![10, 11, 12, 13], false));
        assert_eq!(
            l.caption(&[1, 2, 3, 4, 5]).unwrap(),
            (vec![1, 2, 3, 4], true)
        );
        assert_eq!(l.caption(&[1, 10]), Err(10));
    }
}
