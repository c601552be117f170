//! 2× max pooling (the encoder) and nearest 2× upsampling with its backward, a 2×2 sum pool
//! (the decoder), one pass each way over channel-major activations.

use super::{contiguous_f32, par_chunks};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Nearest-neighbour ×2 upsampling of `(…, h, w)` (any leading axes).
#[derive(Clone, Copy, Debug)]
pub struct Upsample2;

/// Sum over 2×2 blocks of `(…, 2h, 2w)`: the adjoint of [`Upsample2`].
#[derive(Clone, Copy, Debug)]
pub struct SumPool2;

impl CustomOp1 for Upsample2 {
    fn name(&self) -> &'static str {
        "upsample2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let src = contiguous_f32(storage, layout, "upsample2")?;
        let mut out = crate::kernels::zeros(b * c * h * w * 4);
        for (row, dst) in out.chunks_exact_mut(4 * w).enumerate() {
            let s = &src[row * w..(row + 1) * w];
            let (top, bottom) = dst.split_at_mut(2 * w);
            for (x, &v) in s.iter().enumerate() {
                top[2 * x] = v;
                top[2 * x + 1] = v;
            }
            bottom.copy_from_slice(top);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(SumPool2)?))
    }
}

impl CustomOp1 for SumPool2 {
    fn name(&self) -> &'static str {
        "sum-pool2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = layout.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("sum-pool2: {h2}×{w2} is not even");
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let src = contiguous_f32(storage, layout, "sum-pool2")?;
        let mut out = crate::kernels::zeros(b * c * h * w);
        for (row, dst) in out.chunks_exact_mut(w).enumerate() {
            let s = &src[row * 4 * w..(row + 1) * 4 * w];
            let (top, bottom) = s.split_at(2 * w);
            for (x, d) in dst.iter_mut().enumerate() {
                *d = top[2 * x] + top[2 * x + 1] + bottom[2 * x] + bottom[2 * x + 1];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Upsample2)?))
    }
}

/// 2×2 max pooling of `(…, 2h, 2w)` (any leading axes). Its gradient goes to the first
/// maximum of each window, in one pass ([`MaxPool2Grad`]); as a reshape and two max reductions,
/// candle's backward compared every input with a broadcast maximum, twice (~130 ms of a dVAE
/// training step at batch 8).
#[derive(Clone, Copy, Debug)]
pub struct MaxPool2;

/// The input gradient of [`MaxPool2`]: `(x, grad of the pooled output)` → the shape of `x`.
#[derive(Clone, Copy, Debug)]
struct MaxPool2Grad;

/// `(rows of 2w, w)` pooled halves: leading axes × h, and w, of a `(…, 2h, 2w)` input.
fn pool_geometry(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    let dims = layout.shape().dims();
    let (h2, w2) = match dims {
        [.., h2, w2] => (*h2, *w2),
        _ => candle_core::bail!("{op}: needs at least two axes, got {dims:?}"),
    };
    if h2 % 2 != 0 || w2 % 2 != 0 {
        candle_core::bail!("{op}: {h2}×{w2} is not even");
    }
    Ok((layout.shape().elem_count() / (2 * w2).max(1), w2 / 2))
}

/// Index (0..4: top-left, top-right, bottom-left, bottom-right) of the first maximum of window
/// `x` of the two input rows `top`, `bottom`, and its value.
fn window_max(top: &[f32], bottom: &[f32], x: usize) -> (usize, f32) {
    let vals = [top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]];
    let mut best = 0;
    for i in 1..4 {
        if vals[i] > vals[best] {
            best = i;
        }
    }
    (best, vals[best])
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, w) = pool_geometry(layout, self.name())?;
        let src = contiguous_f32(storage, layout, self.name())?;
        let mut out = crate::kernels::zeros(rows * w);
        par_chunks(&mut out, w, |row, dst| {
            let (top, bottom) = src[row * 4 * w..(row + 1) * 4 * w].split_at(2 * w);
            for (x, d) in dst.iter_mut().enumerate() {
                *d = window_max(top, bottom, x).1;
            }
        });
        let mut dims = layout.shape().dims().to_vec();
        let n = dims.len();
        dims[n - 2] /= 2;
        dims[n - 1] /= 2;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &MaxPool2Grad,
        )?))
    }
}

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "max-pool2-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, w) = pool_geometry(l1, self.name())?;
        let (x, g) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        if g.len() != rows * w {
            candle_core::bail!(
                "{}: gradient {:?} does not pool {:?}",
                self.name(),
                l2.shape(),
                l1.shape()
            );
        }
        let mut dx = crate::kernels::zeros(x.len());
        par_chunks(&mut dx, 4 * w, |row, dst| {
            let (top, bottom) = x[row * 4 * w..(row + 1) * 4 * w].split_at(2 * w);
            for (xx, &gv) in g[row * w..(row + 1) * w].iter().enumerate() {
                let (i, _) = window_max(top, bottom, xx);
                dst[(i / 2) * 2 * w + 2 * xx + i % 2] = gv;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    /// On ties-free random data the one-pass pooling equals two max reductions, values and
    /// gradient.
    #[test]
    fn max_pool_matches_two_max_reductions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 2, 6, 10), &dev)?;
        agree_on(
            &[x],
            0.0,
            |t| t[0].apply_op1(MaxPool2),
            |t| t[0].reshape((3, 2, 3, 2, 5, 2))?.max(5)?.max(3),
        )?;
        let odd = Tensor::zeros((2, 3, 5), candle_core::DType::F32, &dev)?;
        assert!(odd.apply_op1(MaxPool2).is_err());
        Ok(())
    }

    #[test]
    fn upsample_and_sum_pool_match_broadcasts() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
        agree_on(
            &[x],
            1e-6,
            |t| t[0].apply_op1(Upsample2),
            |t| {
                t[0].reshape((2, 3, 4, 1, 5, 1))?
                    .broadcast_as((2, 3, 4, 2, 5, 2))?
                    .reshape((2, 3, 8, 10))
            },
        )?;
        let y = Tensor::randn(0f32, 1., (2, 3, 4, 6), &dev)?;
        agree_on(
            &[y],
            1e-6,
            |t| t[0].apply_op1(SumPool2),
            |t| t[0].reshape((2, 3, 2, 2, 3, 2))?.sum(5)?.sum(3),
        )
    }
}
