//! The sparse attention masks of Ramesh et al. 2021 (§2.2 and appendix B.1): the one definition
//! the candle model, the exporter and every runtime share.
//!
//! The sequence is `text_len` caption tokens then `grid × grid` image tokens in raster order.
//! Every layer is causal; caption tokens attend causally among themselves; every image query sees
//! every caption key. Among image tokens (query q, key k, q ≥ k in raster order, grid width w):
//! - `Row`: q − k ≤ w, the previous w image positions and itself;
//! - `Column`: (q − k) mod w = 0, the same column in earlier rows;
//! - `Conv { kernel }`: k's (row, col) within the kernel × kernel window centred on q's.
//!
//! Layer pattern (1-based layer i): column where (i − 2) mod 4 = 0, otherwise row; the last layer
//! is convolutional.

use serde::{Deserialize, Serialize};

/// Which sparse pattern one attention layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AttentionKind {
    Row,
    Column,
    Conv { kernel: usize },
}

/// Whether query position `q` may attend to key position `k`.
pub fn allowed(text_len: usize, grid: usize, kind: AttentionKind, q: usize, k: usize) -> bool {
    if k > q {
        return false;
    }
    if q < text_len || k < text_len {
        return true;
    }
    let (qi, ki) = (q - text_len, k - text_len);
    match kind {
        AttentionKind::Row => qi - ki <= grid,
        AttentionKind::Column => (qi - ki) % grid == 0,
        AttentionKind::Conv { kernel } => {
            let half = kernel / 2;
            let (qr, qc, kr, kc) = (qi / grid, qi % grid, ki / grid, ki % grid);
            qr.abs_diff(kr) <= half && qc.abs_diff(kc) <= half
        }
    }
}

/// The full (text_len + grid²)² matrix, rows = queries; `true` = may attend.
pub fn mask_matrix(text_len: usize, grid: usize, kind: AttentionKind) -> Vec<Vec<bool>> {
    let n = text_len + grid * grid;
    (0..n)
        .map(|q| {
            (0..n)
                .map(|k| allowed(text_len, grid, kind, q, k))
                .collect()
        })
        .collect()
}

/// The attention kind of each of `n_layers` layers (0-based index in the result).
pub fn layer_kinds(n_layers: usize, conv_kernel: usize) -> Vec<AttentionKind> {
    (1..=n_layers)
        .map(|i| {
            if i == n_layers {
                AttentionKind::Conv {
                    kernel: conv_kernel,
                }
            } else if i >= 2 && (i - 2) % 4 == 0 {
                AttentionKind::Column
            } else {
                AttentionKind::Row
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected matrices for text_len 3 on a 4×4 grid, written from the definitions above
    /// (rows = queries 0‥18, columns = keys).
    const ROW: [&str; 19] = [
        "1000000000000000000",
        "1100000000000000000",
        "1110000000000000000",
        "1111000000000000000",
        "1111100000000000000",
        "1111110000000000000",
        "1111111000000000000",
        "1111111100000000000",
        "1110111110000000000",
        "1110011111000000000",
        "1110001111100000000",
        "1110000111110000000",
        "1110000011111000000",
        "1110000001111100000",
        "1110000000111110000",
        "1110000000011111000",
        "1110000000001111100",
        "1110000000000111110",
        "1110000000000011111",
    ];
    const COLUMN: [&str; 19] = [
        "1000000000000000000",
        "1100000000000000000",
        "1110000000000000000",
        "1111000000000000000",
        "1110100000000000000",
        "1110010000000000000",
        "1110001000000000000",
        "1111000100000000000",
        "1110100010000000000",
        "1110010001000000000",
        "1110001000100000000",
        "1111000100010000000",
        "1110100010001000000",
        "1110010001000100000",
        "1110001000100010000",
        "1111000100010001000",
        "1110100010001000100",
        "1110010001000100010",
        "1110001000100010001",
    ];
    // Kernel 3: the image query at (r, c) sees earlier keys with |Δr| ≤ 1 and |Δc| ≤ 1.
    const CONV3: [&str; 19] = [
        "1000000000000000000",
        "1100000000000000000",
        "1110000000000000000",
        "1111000000000000000",
        "1111100000000000000",
        "1110110000000000000",
        "1110011000000000000",
        "1111100100000000000",
        "1111110110000000000",
        "1110111011000000000",
        "1110011001100000000",
        "1110000110010000000",
        "1110000111011000000",
        "1110000011101100000",
        "1110000001100110000",
        "1110000000011001000",
        "1110000000011101100",
        "1110000000001110110",
        "1110000000000110011",
    ];

    fn render(m: &[Vec<bool>]) -> Vec<String> {
        m.iter()
            .map(|r| r.iter().map(|&b| if b { '1' } else { '0' }).collect())
            .collect()
    }

    #[test]
    fn hand_written_matrices() {
        assert_eq!(render(&mask_matrix(3, 4, AttentionKind::Row)), ROW);
        assert_eq!(render(&mask_matrix(3, 4, AttentionKind::Column)), COLUMN);
        assert_eq!(
            render(&mask_matrix(3, 4, AttentionKind::Conv { kernel: 3 })),
            CONV3
        );
    }

    #[test]
    fn no_query_sees_a_later_key_and_every_image_query_sees_all_text() {
        for kind in [
            AttentionKind::Row,
            AttentionKind::Column,
            AttentionKind::Conv { kernel: 11 },
        ] {
            let m = mask_matrix(5, 6, kind);
            for (q, row) in m.iter().enumerate() {
                assert!(row[q], "{kind:?}: {q} must see itself");
                assert!(
                    row[q + 1..].iter().all(|&b| !b),
                    "{kind:?}: {q} sees the future"
                );
                assert!(
                    row[..5.min(q + 1)].iter().all(|&b| b),
                    "{kind:?}: {q} misses text"
                );
            }
        }
    }

    #[test]
    fn layer_pattern_of_the_64_layer_model() {
        let kinds = layer_kinds(64, 11);
        let columns: Vec<usize> = (0..64)
            .filter(|&i| kinds[i] == AttentionKind::Column)
            .map(|i| i + 1)
            .collect();
        let expected: Vec<usize> = (0..16).map(|j| 2 + 4 * j).collect(); // 2, 6, 10, …, 62
        assert_eq!(columns, expected);
        assert_eq!(kinds[63], AttentionKind::Conv { kernel: 11 });
        assert_eq!(
            kinds.iter().filter(|k| **k == AttentionKind::Row).count(),
            64 - 16 - 1
        );
        assert_eq!(layer_kinds(1, 11), vec![AttentionKind::Conv { kernel: 11 }]);
    }

    #[test]
    fn serialises_with_a_kind_tag() {
        let s = serde_json::to_string(&AttentionKind::Conv { kernel: 11 }).unwrap();
        assert_eq!(s, r#"{"kind":"conv","kernel":11}"#);
        assert_eq!(
            serde_json::from_str::<AttentionKind>(r#"{"kind":"row"}"#).unwrap(),
            AttentionKind::Row
        );
    }
}
