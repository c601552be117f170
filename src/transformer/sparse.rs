//! Whole-sequence attention that computes only what the paper's sparse masks can allow.
//!
//! Dense masked attention over `text_len + grid²` positions scores every pair and throws most of
//! them away: an image query of a row layer may read the caption and the previous `grid` image
//! positions, yet it is scored against all of them. Here the image queries are grouped by
//! image row (or, for column layers, by image column), and each group reads a window of key
//! *slots*: the caption, then the image rows (columns) from `back` before its own up to its own.
//! A mask over those slots, computed from [`dalle_runtimes::allowed`] (the one definition of
//! the masks), zeroes what the kind forbids inside the window, so the result is the dense
//! result: the weights of keys outside the window are exactly 0 there. A window that would miss
//! a key the kind allows is never built ([`SlotPlan::new`] checks every query and says `None`).
//!
//! At the 96-px preset's 32 + 24² positions a query scores 80 slots in a row layer, 56 in a
//! column layer and 176 in an 11 × 11 convolutional one, instead of up to 608.

use crate::kernels::linear::batched_matmul;
use crate::kernels::softmax::masked_softmax;
use candle_core::{Device, Result, Tensor};
use dalle_runtimes::{allowed, AttentionKind};

/// The dense additive mask of one kind over the whole sequence, (n, n) for n = text_len + grid²:
/// 0 where the query (row) may attend to the key (column), −∞ elsewhere.
pub fn additive_mask(
    text_len: usize,
    grid: usize,
    kind: AttentionKind,
    device: &Device,
) -> Result<Tensor> {
    let n = text_len + grid * grid;
    let m: Vec<f32> = (0..n * n)
        .map(|i| match allowed(text_len, grid, kind, i / n, i % n) {
            true => 0.0,
            false => f32::NEG_INFINITY,
        })
        .collect();
    Tensor::from_vec(m, (n, n), device)
}

/// How one attention kind's image queries are grouped and which key slots each group reads.
#[derive(Clone, Debug)]
pub struct SlotPlan {
    text_len: usize,
    grid: usize,
    /// Group image queries by column (the grid transposed) instead of by row.
    transpose: bool,
    /// Rows (columns) before a group's own that its window reads.
    back: usize,
    /// Additive (grid², slots) mask, queries in the group order (row-major, or column-major
    /// when transposed): 0 where the kind allows the slot's key, −∞ elsewhere.
    image_mask: Tensor,
    /// Additive causal (text_len, text_len) mask of the caption queries.
    text_mask: Tensor,
}

impl SlotPlan {
    /// The plan of one kind, or `None` where no window smaller than the whole sequence covers
    /// what the kind allows (then dense attention is as cheap).
    pub fn new(
        text_len: usize,
        grid: usize,
        kind: AttentionKind,
        device: &Device,
    ) -> Result<Option<Self>> {
        let (transpose, back) = match kind {
            AttentionKind::Row => (false, 1),
            AttentionKind::Column => (true, 0),
            AttentionKind::Conv { kernel } => (false, (kernel / 2).min(grid.saturating_sub(1))),
        };
        if text_len == 0 || grid == 0 || back + 1 >= grid {
            return Ok(None);
        }
        let slots = text_len + (back + 1) * grid;
        let n_img = grid * grid;
        // Image (row, column) of a position in the group layout.
        let image = |outer: usize, inner: usize| match transpose {
            true => (inner, outer),
            false => (outer, inner),
        };
        let pos = |(r, c): (usize, usize)| text_len + r * grid + c;
        let mut mask = vec![f32::NEG_INFINITY; n_img * slots];
        for outer in 0..grid {
            for inner in 0..grid {
                let q = pos(image(outer, inner));
                let row = &mut mask[(outer * grid + inner) * slots..][..slots];
                let mut covered = 0;
                for (s, m) in row.iter_mut().enumerate() {
                    let key = if s < text_len {
                        Some(s)
                    } else {
                        let (j, x) = ((s - text_len) / grid, (s - text_len) % grid);
                        (outer + j)
                            .checked_sub(back)
                            .map(|key_outer| pos(image(key_outer, x)))
                    };
                    if key.is_some_and(|k| allowed(text_len, grid, kind, q, k)) {
                        *m = 0.0;
                        covered += 1;
                    }
                }
                let wanted = (0..=q)
                    .filter(|&k| allowed(text_len, grid, kind, q, k))
                    .count();
                if covered != wanted {
                    return Ok(None);
                }
            }
        }
        let text_mask: Vec<f32> = (0..text_len * text_len)
            .map(|i| match i % text_len <= i / text_len {
                true => 0.0,
                false => f32::NEG_INFINITY,
            })
            .collect();
        Ok(Some(SlotPlan {
            text_len,
            grid,
            transpose,
            back,
            image_mask: Tensor::from_vec(mask, (n_img, slots), device)?,
            text_mask: Tensor::from_vec(text_mask, (text_len, text_len), device)?,
        }))
    }

    /// Key slots each image query reads.
    pub fn slots(&self) -> usize {
        self.image_mask.dim(1).unwrap_or(0)
    }

    /// Attention of a whole sequence: `q`, `k`, `v` (b, h, text_len + grid², hd) → (b, h, same,
    /// hd); differentiable.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, h, n, hd) = q.dims4()?;
        let (t, g) = (self.text_len, self.grid);
        if n != t + g * g {
            candle_core::bail!(
                "sparse attention planned for {} positions, got {n}",
                t + g * g
            );
        }
        let text = |x: &Tensor| x.narrow(2, 0, t);
        // (b, h, grid, grid, hd) in the group layout: groups on axis 2.
        let groups = |x: &Tensor| -> Result<Tensor> {
            let x = x.narrow(2, t, g * g)?.reshape((b, h, g, g, hd))?;
            match self.transpose {
                true => x.transpose(2, 3)?.contiguous(),
                false => Ok(x),
            }
        };
        // (b, h, grid, slots, hd): the caption, then rows outer − back ‥ outer of each group
        // (zeros before the first row; the mask never lets them through).
        let window = |x: &Tensor| -> Result<Tensor> {
            let img = groups(x)?;
            let padded = match self.back {
                0 => img,
                back => Tensor::cat(&[&img.zeros_like()?.narrow(2, 0, back)?, &img], 2)?,
            };
            let mut parts = vec![text(x)?
                .unsqueeze(2)?
                .broadcast_as((b, h, g, t, hd))?
                .contiguous()?];
            for j in 0..=self.back {
                parts.push(padded.narrow(2, j, g)?);
            }
            Tensor::cat(&parts, 3)
        };
        let text_out = {
            let att = masked_softmax(
                &batched_matmul(&text(q)?.contiguous()?, &text(k)?.contiguous()?, true)?,
                &self.text_mask,
                scale,
            )?;
            batched_matmul(&att, &text(v)?.contiguous()?, false)?
        };
        let (kw, vw) = (window(k)?, window(v)?);
        let slots = self.slots();
        let scores = batched_matmul(&groups(q)?.contiguous()?, &kw, true)?; // (b, h, g, g, slots)
        let att = masked_softmax(
            &scores.reshape((b, h, g * g, slots))?,
            &self.image_mask,
            scale,
        )?;
        let img = batched_matmul(&att.reshape((b, h, g, g, slots))?, &vw, false)?; // (b, h, g, g, hd)
        let img = match self.transpose {
            true => img.transpose(2, 3)?.contiguous()?,
            false => img,
        };
        Tensor::cat(&[&text_out, &img.reshape((b, h, g * g, hd))?], 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{agree, var};

    fn dense(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let att = masked_softmax(&batched_matmul(q, k, true).unwrap(), mask, scale).unwrap();
        batched_matmul(&att, v, false).unwrap()
    }

    /// Every kind's slot attention gives the dense masked attention's values and gradients
    /// (q, k and v), on grids where the windows are smaller than the sequence.
    #[test]
    fn slot_attention_equals_dense_masked_attention() {
        let dev = Device::Cpu;
        for (text_len, grid) in [(3, 4), (5, 6), (4, 7)] {
            for kind in [
                AttentionKind::Row,
                AttentionKind::Column,
                AttentionKind::Conv { kernel: 3 },
                AttentionKind::Conv { kernel: 5 },
            ] {
                let plan = SlotPlan::new(text_len, grid, kind, &dev)
                    .unwrap()
                    .expect("a window smaller than the sequence");
                let n = text_len + grid * grid;
                let vars: Vec<_> = (1..=3).map(|i| var(&[2, 3, n, 4], i as f32)).collect();
                let (q, k, v) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );
                let mask = additive_mask(text_len, grid, kind, &dev).unwrap();
                let want = dense(q, k, v, &mask, 0.5);
                let got = plan.attend(q, k, v, 0.5).unwrap();
                agree(&vars.iter().collect::<Vec<_>>(), got, want, 1e-5, 1e-4);
            }
        }
    }

    /// The windows of the 96-px preset's kinds: what the module's header promises.
    #[test]
    fn slot_counts_of_the_96_px_preset() {
        let dev = Device::Cpu;
        let slots = |kind| {
            SlotPlan::new(32, 24, kind, &dev)
                .unwrap()
                .map(|p| p.slots())
        };
        assert_eq!(slots(AttentionKind::Row), Some(80));
        assert_eq!(slots(AttentionKind::Column), Some(56));
        assert_eq!(slots(AttentionKind::Conv { kernel: 11 }), Some(176));
        // A kernel as wide as the grid leaves nothing to skip.
        assert_eq!(slots(AttentionKind::Conv { kernel: 47 }), None);
    }
}
