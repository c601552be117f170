//! Model geometry: the numbers that fix every tensor shape crossing the model-dir contract.

use serde::{Deserialize, Serialize};

/// Image and sequence geometry shared by the dVAE, the transformer and every runtime.
///
/// The sequence the transformer sees is `text_len` caption tokens followed by `grid * grid`
/// image tokens in raster order (Ramesh et al. 2021, §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Geometry {
    /// Side of the square RGB image in pixels.
    pub image_size: usize,
    /// Side of the square token grid the dVAE encodes an image into.
    pub grid: usize,
    /// Number of dVAE codebook entries (image vocabulary).
    pub codebook: usize,
    /// Number of caption token positions.
    pub text_len: usize,
    /// Size of the BPE caption vocabulary.
    pub text_vocab: usize,
}

/// A geometry whose numbers cannot describe a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GeometryError {
    #[error("geometry field `{field}` must be at least 1 (got 0)")]
    Zero { field: &'static str },
    #[error("image_size {image_size} is not a multiple of grid {grid}: the dVAE downsamples by a whole factor")]
    NotDivisible { image_size: usize, grid: usize },
    #[error("geometry field `{field}` is {value}, above the largest this build handles ({max})")]
    TooLarge {
        field: &'static str,
        value: usize,
        max: usize,
    },
}

/// Upper bounds of each geometry field: far above any real model (the paper's is 256 px, a 32×32
/// grid, 8192 codes, 256 caption tokens of 16384), low enough that no size derived from them
/// (sequence length, unified vocabulary as `u32` ids, pixel counts) can overflow.
const GEOMETRY_MAX: [(&str, usize); 5] = [
    ("image_size", 1 << 15),
    ("grid", 1 << 10),
    ("codebook", 1 << 24),
    ("text_len", 1 << 16),
    ("text_vocab", 1 << 24),
];

impl Geometry {
    /// Number of image tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.grid * self.grid
    }

    /// Full sequence length: caption positions then image positions.
    pub fn seq_len(&self) -> usize {
        self.text_len + self.image_tokens()
    }

    /// Pixels per token along one side.
    pub fn downsample(&self) -> usize {
        self.image_size / self.grid
    }

    /// Check that the numbers describe a buildable model.
    pub fn validate(&self) -> Result<(), GeometryError> {
        for (field, v) in [
            ("image_size", self.image_size),
            ("grid", self.grid),
            ("codebook", self.codebook),
            ("text_len", self.text_len),
            ("text_vocab", self.text_vocab),
        ] {
            if v == 0 {
                return Err(GeometryError::Zero { field });
            }
            let max = GEOMETRY_MAX
                .iter()
                .find(|(f, _)| *f == field)
                .map_or(0, |m| m.1);
            if v > max {
                return Err(GeometryError::TooLarge {
                    field,
                    value: v,
                    max,
                });
            }
        }
        if !self.image_size.is_multiple_of(self.grid) {
            return Err(GeometryError::NotDivisible {
                image_size: self.image_size,
                grid: self.grid,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Geometry {
        Geometry {
            image_size: 64,
            grid: 8,
            codebook: 512,
            text_len: 32,
            text_vocab: 1024,
        }
    }

    #[test]
    fn derived_sizes() {
        let g = tiny();
        assert_eq!(g.image_tokens(), 64);
        assert_eq!(g.seq_len(), 96);
        assert_eq!(g.downsample(), 8);
        assert_eq!(g.validate(), Ok(()));
    }

    #[test]
    fn rejects_bad_numbers() {
        let g = Geometry { grid: 0, ..tiny() };
        assert_eq!(g.validate(), Err(GeometryError::Zero { field: "grid" }));
        let g = Geometry { grid: 7, ..tiny() };
        assert!(matches!(
            g.validate(),
            Err(GeometryError::NotDivisible { .. })
        ));
    }
}
