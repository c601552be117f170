//! Layer norm's normalisation and its per-feature scale and shift, each one fused op with its
//! backward pass.

use super::{contiguous_f32, fused_cpu, par_rows, par_rows2, row_pair, row_width};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Mean and 1/√(variance + ε) of one row, summed in f64: a sequential f32 sum of activations
/// with a large common offset loses enough bits to double the cached-vs-full decoding gap of
/// the tests' small model (candle's own reduction sums in SIMD lanes, which is more accurate).
/// Each sum runs in [`LANES`] independent f64 lanes, which the compiler keeps in vector
/// registers: one chain of dependent f64 adds took ~1.2 µs for a row of 512 (25 rows per
/// decoding step and sequence, 0.4 ms of a batch-16 step).
#[inline]
pub(crate) fn row_moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = lane_sum(x, |v| v as f64) / n;
    let var = lane_sum(x, |v| (v as f64 - mean).powi(2)) / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// Lanes of [`lane_sum`].
const LANES: usize = 8;

/// Σ f(v) over `x` in f64, [`LANES`] partial sums added at the end.
#[inline]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f64>()
}

/// Layer norm without its affine step, `(x − mean) / √(var + ε)` over the last axis.
struct Normalize {
    eps: f32,
}

/// Its backward from `x` and `dy`: `(dy − mean(dy) − ŷ·mean(dy ⊙ ŷ)) / σ`.
struct NormalizeGrad {
    eps: f32,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "fused-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let width = row_width(l);
        let mut y = crate::kernels::zeros(x.len());
        let eps = self.eps;
        par_rows(x, &mut y, width, |x, y| {
            for (xr, yr) in x.chunks(width).zip(y.chunks_mut(width)) {
                let (mean, inv) = row_moments(xr, eps);
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - mean) * inv;
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = NormalizeGrad { eps: self.eps };
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "fused-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy, width) = row_pair((s1, l1), (s2, l2), self.name())?;
        let n = width as f64;
        let eps = self.eps;
        let mut dx = crate::kernels::zeros(x.len());
        par_rows2(x, dy, &mut dx, width, |x, dy, dx| {
            for ((xr, gr), or) in x
                .chunks(width)
                .zip(dy.chunks(width))
                .zip(dx.chunks_mut(width))
            {
                let (mean, inv) = row_moments(xr, eps);
                let (mut g_mean, mut gy_mean) = (0f64, 0f64);
                for (&v, &g) in xr.iter().zip(gr) {
                    g_mean += g as f64;
                    gy_mean += (g * (v - mean) * inv) as f64;
                }
                let (g_mean, gy_mean) = ((g_mean / n) as f32, (gy_mean / n) as f32);
                for ((o, &v), &g) in or.iter_mut().zip(xr).zip(gr) {
                    *o = inv * (g - g_mean - (v - mean) * inv * gy_mean);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `(x − mean) / √(var + ε)` over the last axis, differentiable: one pass each way on the CPU
/// in f32 (as tensor ops: seven ops forward, each with its own backward pass); tensor ops
/// elsewhere.
pub fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_cpu(x) {
        x.contiguous()?.apply_op1(Normalize { eps: eps as f32 })
    } else {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)
    }
}

/// Σ over rows of a contiguous `(…, n)` tensor → `(n)`: the weight and bias gradients of a
/// per-feature scale or shift. candle reduces a broadcast's leading axes element by element
/// through its strided-index path; this is one pass in memory order.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let n = row_width(l);
        let mut sum = crate::kernels::zeros(n);
        for row in x.chunks_exact(n) {
            sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
        }
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

fn column_sum(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&ColumnSum)
}

/// `x ⊙ w + b` with `w`, `b` over the last axis (layer norm's affine step).
struct ScaleShift;

/// The last axis of `x` and the length of each per-feature vector, which must agree.
fn feature_width(x: &Layout, per_feature: &[&Layout], op: &str) -> Result<usize> {
    let n = x.shape().dims().last().copied().unwrap_or(1);
    for l in per_feature {
        if l.shape().dims() != [n] {
            candle_core::bail!("{op}: {:?} does not match input {:?}", l.shape(), x.shape());
        }
    }
    Ok(n.max(1))
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "scale-shift"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let n = feature_width(l1, &[l2, l3], op)?;
        let x = contiguous_f32(s1, l1, op)?;
        let (w, b) = (contiguous_f32(s2, l2, op)?, contiguous_f32(s3, l3, op)?);
        let mut y = crate::kernels::zeros(x.len());
        par_rows(x, &mut y, n, |x, y| {
            for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
                for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *o = v * wv + bv;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.broadcast_mul(w)?;
        let dw = column_sum(&(grad * x)?)?;
        Ok((Some(dx), Some(dw), Some(column_sum(grad)?)))
    }
}

/// `x ⊙ w + b`, `w` and `b` of the last axis's length, likewise.
pub fn scale_shift(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_cpu(x) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, ScaleShift)
    } else {
        x.broadcast_mul(w)?.broadcast_add(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    /// The fused layer-norm core equals the tensor-op version, values and gradients.
    #[test]
    fn fused_normalize_matches_tensor_ops() {
        let x = var(&[4, 70, 512], 3.0);
        let xt = (x.as_tensor() + 1.5).unwrap();
        let mean = xt.mean_keepdim(D::Minus1).unwrap();
        let xc = xt.broadcast_sub(&mean).unwrap();
        let v = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let theirs = xc
            .broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        agree(&[&x], normalize(&xt, 1e-5).unwrap(), theirs, 1e-5, 1e-4);
    }

    /// The per-feature scale-shift equals candle's broadcasts, values and gradients.
    #[test]
    fn fused_scale_shift_matches_broadcasts() {
        let (x, w, b) = (var(&[3, 70, 300], 1.0), var(&[300], 1.0), var(&[300], 1.0));
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let theirs = xt.broadcast_mul(wt).unwrap().broadcast_add(bt).unwrap();
        agree(
            &[&x, &w, &b],
            scale_shift(xt, wt, bt).unwrap(),
            theirs,
            0.0,
            1e-3,
        );
        assert!(scale_shift(xt, &wt.narrow(0, 0, 10).unwrap(), bt).is_err());
    }
}
