//! Softmaxes with backward passes: over the last axis (plain, and scaled + masked for attention)
//! and over any axis (the dVAE's codebook logits: softmax, log-softmax, Σ q ln q), with the
//! tensor-op versions that run on other devices and dtypes.

use super::activation::fast_exp;
use super::{contiguous_f32, fused_cpu, par_chunks, par_rows, par_rows2, row_pair, row_width};
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

struct SoftmaxLast;

/// Softmax of one row in place, `x` already shifted/masked: max, exp, normalise.
#[inline]
pub(crate) fn softmax_row(y: &mut [f32]) {
    let max = crate::kernels::max(y);
    for o in y.iter_mut() {
        *o = fast_exp(*o - max);
    }
    let inv = 1.0 / crate::kernels::sum(y);
    for o in y.iter_mut() {
        *o *= inv;
    }
}

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "fused-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let width = row_width(l);
        let mut y = crate::kernels::zeros(x.len());
        par_rows(x, &mut y, width, |x, y| {
            for (xr, yr) in x.chunks(width).zip(y.chunks_mut(width)) {
                yr.copy_from_slice(xr);
                softmax_row(yr);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_grad(res, grad, 1.0)?))
    }
}

/// `scale · y ⊙ (dy − Σ dy ⊙ y)` per row: softmax's backward in one pass (as tensor ops it is
/// four passes over the attention scores and as many allocations).
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, dy, width) = row_pair((s1, l1), (s2, l2), self.name())?;
        let mut dx = crate::kernels::zeros(y.len());
        let scale = self.scale;
        par_rows2(y, dy, &mut dx, width, |y, dy, dx| {
            for ((yr, gr), xr) in y
                .chunks(width)
                .zip(dy.chunks(width))
                .zip(dx.chunks_mut(width))
            {
                let dot = crate::kernels::dot(yr, gr);
                for ((o, &a), &g) in xr.iter_mut().zip(yr).zip(gr) {
                    *o = scale * a * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax's input gradient from its output `y` and output gradient `dy`, times `scale`.
fn softmax_grad(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_cpu(y) {
        y.contiguous()?.apply_op2_no_bwd(
            &dy.contiguous()?,
            &SoftmaxGrad {
                scale: scale as f32,
            },
        )
    } else {
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        dy.broadcast_sub(&dot)?.mul(y)? * scale
    }
}

/// Softmax over the last dim with a backward pass: one fused multi-threaded kernel forward on
/// the CPU in f32 (rows of −∞ but one finite value are fine; an all −∞ row is NaN, as in
/// candle); tensor ops elsewhere.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused_cpu(x) {
        x.contiguous()?.apply_op1(SoftmaxLast)
    } else {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

/// softmax(x · scale + mask) over the last axis, `x (…, t, s)` and an additive `mask (t, s)`
/// (0 or −∞) shared by the leading axes; differentiable in `x` only.
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let (t, width) = match dims {
            [.., t, s] => (*t, *s),
            _ => candle_core::bail!("{}: input {dims:?} has no (t, s) axes", self.name()),
        };
        if l2.shape().dims() != [t, width] {
            candle_core::bail!(
                "{}: mask {:?} is not ({t}, {width})",
                self.name(),
                l2.shape()
            );
        }
        let (x, mask) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        let scale = self.scale;
        let mut y = crate::kernels::zeros(x.len());
        let block = t * width;
        // Whole (t, s) blocks per worker, so that row i of a block takes mask row i.
        par_rows(x, &mut y, block.max(1), |x, y| {
            for (xb, yb) in x.chunks(block).zip(y.chunks_mut(block)) {
                for ((xr, yr), mr) in xb
                    .chunks(width)
                    .zip(yb.chunks_mut(width))
                    .zip(mask.chunks(width))
                {
                    for ((o, &v), &m) in yr.iter_mut().zip(xr).zip(mr) {
                        *o = v * scale + m;
                    }
                    softmax_row(yr);
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_grad(res, grad, self.scale as f64)?), None))
    }
}

/// softmax(x · scale + mask) over the last axis with `mask (t, s)` broadcast over `x (…, t, s)`:
/// one pass forward and one backward on the CPU in f32, instead of a scale, a broadcast add
/// and a softmax (each with its own backward pass over the attention scores); tensor ops
/// elsewhere.
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_cpu(x) {
        x.contiguous()?.apply_op2(
            &mask.contiguous()?,
            MaskedSoftmax {
                scale: scale as f32,
            },
        )
    } else {
        softmax_last(&(x * scale)?.broadcast_add(mask)?)
    }
}

/// `(outer, k, inner)`: a contiguous shape seen around axis `dim`.
fn around_axis(shape: &Shape, dim: usize, op: &str) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dim >= dims.len() {
        candle_core::bail!("{op}: axis {dim} of a rank-{} tensor", dims.len());
    }
    let (outer, inner) = (
        dims[..dim].iter().product(),
        dims[dim + 1..].iter().product(),
    );
    Ok((outer, dims[dim], inner))
}

/// The two inputs of an axis op's gradient: `(k, inner, a, b)`, where `a` is the forward
/// op's `(outer, k, inner)` tensor and `b` holds `b_per_outer(k, inner)` values per block.
fn axis_pair<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    dim: usize,
    b_per_outer: impl Fn(usize, usize) -> usize,
    op: &str,
) -> Result<(usize, usize, &'a [f32], &'a [f32])> {
    let (outer, k, inner) = around_axis(l1.shape(), dim, op)?;
    let (a, b) = (contiguous_f32(s1, l1, op)?, contiguous_f32(s2, l2, op)?);
    if b.len() != outer * b_per_outer(k, inner) {
        candle_core::bail!("{op}: input {:?}, gradient {:?}", l1.shape(), l2.shape());
    }
    Ok((k, inner, a, b))
}

/// For one block `x (k, inner)`: `lse[j] = ln Σ_r exp(x[r, j])` for every column, by sweeps
/// along contiguous rows (the reduced axis is the slow one).
fn column_lse(x: &[f32], k: usize, inner: usize, lse: &mut [f32]) {
    use crate::kernels::activation::fast_exp;
    lse.copy_from_slice(&x[..inner]);
    for row in x.chunks_exact(inner).take(k).skip(1) {
        lse.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
    }
    let mut sum = crate::kernels::zeros(inner);
    for row in x.chunks_exact(inner).take(k) {
        for ((s, &v), &m) in sum.iter_mut().zip(row).zip(lse.iter()) {
            *s += fast_exp(v - m);
        }
    }
    lse.iter_mut().zip(&sum).for_each(|(m, s)| *m += s.ln());
}

/// Softmax (or, with `log`, log-softmax) over axis `dim` of any contiguous tensor, in sweeps
/// along the rows of each `(k, inner)` block. The dVAE normalises its logits over the codebook,
/// axis 1 of `(b, vocab, h, w)`: as candle ops that was a transpose and a copy each way around a
/// last-axis softmax, and a backward pass of half a dozen broadcast ops.
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxAxis {
    pub dim: usize,
    pub log: bool,
}

/// The input gradient of [`SoftmaxAxis`] from `(its output, the output's gradient)`.
#[derive(Clone, Copy, Debug)]
struct SoftmaxAxisGrad(SoftmaxAxis);

impl CustomOp1 for SoftmaxAxis {
    fn name(&self) -> &'static str {
        "softmax-axis"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use crate::kernels::activation::fast_exp;
        let (_, k, inner) = around_axis(layout.shape(), self.dim, self.name())?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let mut y = crate::kernels::zeros(x.len());
        let log = self.log;
        par_chunks(&mut y, k * inner, |o, dst| {
            let src = &x[o * k * inner..(o + 1) * k * inner];
            let mut lse = crate::kernels::zeros(inner);
            column_lse(src, k, inner, &mut lse);
            for (d, s) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(inner)) {
                for ((d, &v), &l) in d.iter_mut().zip(s).zip(&lse) {
                    *d = if log { v - l } else { fast_exp(v - l) };
                }
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(
            res.contiguous()?
                .apply_op2_no_bwd(&g, &SoftmaxAxisGrad(*self))?,
        ))
    }
}

impl CustomOp2 for SoftmaxAxisGrad {
    fn name(&self) -> &'static str {
        "softmax-axis-grad"
    }

    /// softmax: dx = y ⊙ (g − Σ_k g ⊙ y); log-softmax: dx = g − exp(y) ⊙ Σ_k g.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use crate::kernels::activation::fast_exp;
        let same = |k, inner| k * inner;
        let (k, inner, y, g) = axis_pair((s1, l1), (s2, l2), self.0.dim, same, self.name())?;
        let log = self.0.log;
        let mut dx = crate::kernels::zeros(y.len());
        par_chunks(&mut dx, k * inner, |o, dst| {
            let range = o * k * inner..(o + 1) * k * inner;
            let (y, g) = (&y[range.clone()], &g[range]);
            let mut t = crate::kernels::zeros(inner);
            for (yr, gr) in y.chunks_exact(inner).zip(g.chunks_exact(inner)) {
                for ((t, &yv), &gv) in t.iter_mut().zip(yr).zip(gr) {
                    *t += if log { gv } else { gv * yv };
                }
            }
            for ((d, yr), gr) in dst
                .chunks_exact_mut(inner)
                .zip(y.chunks_exact(inner))
                .zip(g.chunks_exact(inner))
            {
                for (((d, &yv), &gv), &t) in d.iter_mut().zip(yr).zip(gr).zip(&t) {
                    *d = if log {
                        gv - fast_exp(yv) * t
                    } else {
                        yv * (gv - t)
                    };
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Σ_k q ln q over axis `dim` with q = softmax(x) (the negative entropy; the KL to the uniform
/// distribution less ln k), one value per position: the shape of `x` with `dim` of size 1. The
/// gradient, `g · q ⊙ (ln q − Σ q ln q)`, recomputes q from `x`.
#[derive(Clone, Copy, Debug)]
pub struct NegEntropy {
    pub dim: usize,
}

/// The gradient of [`NegEntropy`] from `(x, the per-position gradient)`.
#[derive(Clone, Copy, Debug)]
struct NegEntropyGrad(NegEntropy);

/// For one block `x (k, inner)`: ln-normaliser and Σ q ln q of every column.
fn column_neg_entropy(x: &[f32], k: usize, inner: usize) -> (Vec<f32>, Vec<f32>) {
    use crate::kernels::activation::fast_exp;
    let mut lse = crate::kernels::zeros(inner);
    column_lse(x, k, inner, &mut lse);
    let mut h = crate::kernels::zeros(inner);
    for row in x.chunks_exact(inner).take(k) {
        for ((h, &v), &l) in h.iter_mut().zip(row).zip(&lse) {
            let lnq = v - l;
            *h += fast_exp(lnq) * lnq;
        }
    }
    (lse, h)
}

impl CustomOp1 for NegEntropy {
    fn name(&self) -> &'static str {
        "neg-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, k, inner) = around_axis(layout.shape(), self.dim, self.name())?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let mut out = crate::kernels::zeros(x.len() / k.max(1));
        par_chunks(&mut out, inner, |o, dst| {
            let (_, h) = column_neg_entropy(&x[o * k * inner..(o + 1) * k * inner], k, inner);
            dst.copy_from_slice(&h);
        });
        let mut dims = layout.shape().dims().to_vec();
        dims[self.dim] = 1;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&g, &NegEntropyGrad(*self))?,
        ))
    }
}

impl CustomOp2 for NegEntropyGrad {
    fn name(&self) -> &'static str {
        "neg-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use crate::kernels::activation::fast_exp;
        let per_position = |_, inner| inner;
        let (k, inner, x, g) =
            axis_pair((s1, l1), (s2, l2), self.0.dim, per_position, self.name())?;
        let mut dx = crate::kernels::zeros(x.len());
        par_chunks(&mut dx, k * inner, |o, dst| {
            let src = &x[o * k * inner..(o + 1) * k * inner];
            let (lse, h) = column_neg_entropy(src, k, inner);
            let g = &g[o * inner..(o + 1) * inner];
            for (d, row) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(inner)) {
                for ((((d, &v), &l), &h), &g) in d.iter_mut().zip(row).zip(&lse).zip(&h).zip(g) {
                    let lnq = v - l;
                    *d = g * fast_exp(lnq) * (lnq - h);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over `dim` with the max subtracted as a constant: every op has a backward pass
/// (candle-nn's fused `softmax_last_dim` has none).
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let log = false;
        return x.contiguous()?.apply_op1(SoftmaxAxis { dim, log });
    }
    let last = x.rank() - 1;
    if dim != last {
        // candle reduces a contiguous last axis fast and any other axis element by element.
        return softmax(&x.transpose(dim, last)?.contiguous()?, last)?.transpose(dim, last);
    }
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

/// Log-softmax over `dim`, built from differentiable ops.
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let log = true;
        return x.contiguous()?.apply_op1(SoftmaxAxis { dim, log });
    }
    let last = x.rank() - 1;
    if dim != last {
        return log_softmax(&x.transpose(dim, last)?.contiguous()?, last)?.transpose(dim, last);
    }
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::activation::gelu;
    use crate::kernels::testing::*;
    use candle_core::Device;

    /// GELU, softmax and masked softmax equal candle's tensor-op versions, forward and
    /// backward, on a tensor large enough to take the multi-threaded path.
    #[test]
    fn fused_gelu_and_softmaxes_match_candle_ops() {
        let dev = Device::Cpu;
        let x = var(&[4, 3, 65, 129], 2.0);
        let xt = x.as_tensor();
        agree(&[&x], gelu(xt).unwrap(), xt.gelu().unwrap(), 1e-6, 1e-5);

        // A masked row as in attention: −∞ where not allowed.
        let row: Vec<f32> = (0..129)
            .map(|k| if k % 3 == 0 { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let row = Tensor::from_vec(row, 129, &dev).unwrap();
        let xm = xt.broadcast_add(&row).unwrap();
        agree(
            &[&x],
            softmax_last(&xm).unwrap(),
            softmax_ops(&xm),
            1e-6,
            1e-5,
        );

        // Scale and a (t, s) mask inside the softmax, shared by the leading axes.
        let (t, s) = (65, 129);
        let mask: Vec<f32> = (0..t * s)
            .map(|i| {
                if i % s <= i / s + 3 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &dev).unwrap();
        let theirs = softmax_ops(&(xt * 0.125).unwrap().broadcast_add(&mask).unwrap());
        let ours = masked_softmax(xt, &mask, 0.125).unwrap();
        agree(&[&x], ours, theirs, 1e-6, 1e-5);
        assert!(masked_softmax(xt, &mask.narrow(0, 0, 5).unwrap(), 1.0).is_err());
    }

    /// The axis softmax, log-softmax and negative entropy equal their candle-op versions
    /// (transpose to the last axis), values and gradients, on a middle, first and last axis.
    #[test]
    fn axis_softmax_and_entropy_match_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (2, 7, 3, 4), &dev)? * 3.0)?;
        for dim in [0, 1, 3] {
            let last = |t: &Tensor, log: bool| -> Result<Tensor> {
                let t = t.transpose(dim, 3)?.contiguous()?;
                let y = if log {
                    candle_nn::ops::log_softmax(&t, 3)?
                } else {
                    let m = t.max_keepdim(3)?.detach();
                    let e = t.broadcast_sub(&m)?.exp()?;
                    e.broadcast_div(&e.sum_keepdim(3)?)?
                };
                y.transpose(dim, 3)
            };
            for log in [false, true] {
                agree_on(
                    std::slice::from_ref(&x),
                    1e-5,
                    |t| t[0].apply_op1(SoftmaxAxis { dim, log }),
                    |t| last(&t[0], log),
                )?;
            }
            agree_on(
                std::slice::from_ref(&x),
                1e-5,
                |t| t[0].apply_op1(NegEntropy { dim }),
                |t| {
                    let lq = last(&t[0], true)?;
                    (lq.exp()? * &lq)?.sum_keepdim(dim)
                },
            )?;
        }
        assert!(x.apply_op1(NegEntropy { dim: 4 }).is_err());
        Ok(())
    }
}
