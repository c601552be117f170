//! The dVAE's CPU training hot spots as candle custom ops, each pair the other's backward.
//!
//! - im2col / col2im: a k×k "same" convolution is `W · im2col(x)`. Built from `narrow` and
//!   `stack`, im2col's backward materialises k² zero-padded copies of the input and adds them up;
//!   col2im is one scatter-add pass.
//! - bias add: as a broadcast, its backward reduces over the batch and pixel axes together, which
//!   candle does element by element; here it is two contiguous sums.
//! - nearest ×2 upsampling / 2×2 sum pooling: the same, for the decoder's upsampling.
//!
//! All are f32 on CPU; [`super::model`] uses candle's own ops elsewhere.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// `(b, c, h, w)` → `(b, c·k·k, h·w)`: column `(ci·k + dy)·k + dx` at pixel `(y, x)` holds
/// `x[ci, y + dy − pad, x + dx − pad]` (zero outside the image).
#[derive(Clone, Copy, Debug)]
pub struct Im2Col {
    pub k: usize,
    pub pad: usize,
}

/// The adjoint of [`Im2Col`]: `(b, c·k·k, h·w)` → `(b, c, h, w)`, summing every column entry back
/// onto the pixel it was read from.
#[derive(Clone, Copy, Debug)]
pub struct Col2Im {
    pub k: usize,
    pub pad: usize,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{op}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Calls `f(src_index, col_index)` for every in-image tap of one image: `src_index` into the
/// `(c, h, w)` plane, `col_index` into the `(c·k·k, h·w)` columns.
#[inline]
fn for_each_tap(
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    mut f: impl FnMut(usize, usize),
) {
    let hw = h * w;
    for ci in 0..c {
        for dy in 0..k {
            for dx in 0..k {
                let row = ((ci * k + dy) * k + dx) * hw;
                for y in 0..h {
                    let sy = y + dy;
                    if sy < pad || sy - pad >= h {
                        continue;
                    }
                    let src_row = (ci * h + sy - pad) * w;
                    // x + dx − pad in [0, w)  ⇔  x in [pad − dx, w + pad − dx)
                    let x0 = pad.saturating_sub(dx);
                    let x1 = (w + pad).saturating_sub(dx).min(w);
                    for x in x0..x1 {
                        f(src_row + x + dx - pad, row + y * w + x);
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let src = contiguous_f32(storage, layout, "im2col")?;
        let (k, pad) = (self.k, self.pad);
        let per_in = c * h * w;
        let per_out = c * k * k * h * w;
        let mut out = vec![0f32; b * per_out];
        for (img, dst) in out.chunks_exact_mut(per_out).enumerate() {
            let s = &src[img * per_in..(img + 1) * per_in];
            for_each_tap(c, h, w, k, pad, |si, di| dst[di] = s[si]);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c * k * k, h * w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, channels, h, w) = arg.dims4()?;
        let op = Col2Im {
            k: self.k,
            pad: self.pad,
            channels,
            h,
            w,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(op)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, ckk, hw) = layout.shape().dims3()?;
        let Col2Im {
            k,
            pad,
            channels: c,
            h,
            w,
        } = *self;
        if ckk != c * k * k || hw != h * w {
            candle_core::bail!(
                "col2im: got ({b}, {ckk}, {hw}), expected (b, {}, {})",
                c * k * k,
                h * w
            );
        }
        let src = contiguous_f32(storage, layout, "col2im")?;
        let per_in = ckk * hw;
        let per_out = c * h * w;
        let mut out = vec![0f32; b * per_out];
        for (img, dst) in out.chunks_exact_mut(per_out).enumerate() {
            let s = &src[img * per_in..(img + 1) * per_in];
            for_each_tap(c, h, w, k, pad, |di, si| dst[di] += s[si]);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = Im2Col {
            k: self.k,
            pad: self.pad,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(op)?))
    }
}

/// `x (b, c, …) + bias (c)` broadcast over the batch and every trailing axis.
#[derive(Clone, Copy, Debug)]
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "bias-add")?;
        let bias = contiguous_f32(s2, l2, "bias-add")?;
        let dims = l1.shape().dims();
        if dims.len() < 2 || l2.shape().dims() != [dims[1]] {
            candle_core::bail!(
                "bias-add: bias {:?} does not match input {dims:?}",
                l2.shape()
            );
        }
        let inner: usize = dims[2..].iter().product();
        let mut out = x.to_vec();
        for (i, plane) in out.chunks_exact_mut(inner.max(1)).enumerate() {
            let b = bias[i % dims[1]];
            plane.iter_mut().for_each(|v| *v += b);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, c) = (arg1.dim(0)?, arg1.dim(1)?);
        let grad_bias = grad_res.reshape((b, c, ()))?.sum(2)?.sum(0)?;
        Ok((Some(grad_res.clone()), Some(grad_bias)))
    }
}

/// Nearest-neighbour ×2 upsampling of `(b, c, h, w)`.
#[derive(Clone, Copy, Debug)]
pub struct Upsample2;

/// Sum over 2×2 blocks of `(b, c, 2h, 2w)`: the adjoint of [`Upsample2`].
#[derive(Clone, Copy, Debug)]
pub struct SumPool2;

impl CustomOp1 for Upsample2 {
    fn name(&self) -> &'static str {
        "upsample2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let src = contiguous_f32(storage, layout, "upsample2")?;
        let mut out = vec![0f32; b * c * h * w * 4];
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
        let mut out = vec![0f32; b * c * h * w];
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The reference: shifted views of the zero-padded input, stacked.
    fn im2col_views(x: &Tensor, k: usize, pad: usize) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xp = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
        let mut shifted = Vec::new();
        for dy in 0..k {
            for dx in 0..k {
                shifted.push(xp.narrow(2, dy, h)?.narrow(3, dx, w)?);
            }
        }
        Tensor::stack(&shifted, 2)?.reshape((b, c * k * k, h * w))
    }

    #[test]
    fn matches_shifted_views_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (k, pad, h, w) in [(3, 1, 5, 4), (7, 3, 6, 6), (1, 0, 3, 2)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?)?;
            let g = Tensor::randn(0f32, 1., (2, 3 * k * k, h * w), &dev)?;
            let ours = x.as_tensor().apply_op1(Im2Col { k, pad })?;
            let reference = im2col_views(x.as_tensor(), k, pad)?;
            let fwd = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(fwd, 0.0, "k={k}: forward differs");
            let ga = (ours * &g)?.sum_all()?.backward()?;
            let gb = (reference * &g)?.sum_all()?.backward()?;
            let (ga, gb) = (ga.get(&x).unwrap(), gb.get(&x).unwrap());
            let bwd = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(bwd < 1e-5, "k={k}: backward differs by {bwd}");
        }
        Ok(())
    }

    /// Forward and input gradients of `ours` and `reference` agree on random inputs.
    fn agree(
        inputs: &[Tensor],
        ours: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (ours(&xs)?, reference(&xs)?);
        assert_eq!(a.dims(), b.dims());
        let fwd = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(fwd < 1e-6, "forward differs by {fwd}");
        let g = Tensor::randn(0f32, 1., a.dims(), a.device())?;
        let (ga, gb) = (
            (a * &g)?.sum_all()?.backward()?,
            (b * &g)?.sum_all()?.backward()?,
        );
        for v in &vars {
            let d = (ga.get(v).unwrap() - gb.get(v).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn bias_add_matches_broadcast_add() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 4, 5, 2), &dev)?;
        let b = Tensor::randn(0f32, 1., 4, &dev)?;
        agree(
            &[x, b],
            |t| t[0].apply_op2(&t[1], BiasAdd),
            |t| t[0].broadcast_add(&t[1].reshape((1, 4, 1, 1))?),
        )
    }

    #[test]
    fn upsample_and_sum_pool_match_broadcasts() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
        agree(
            &[x],
            |t| t[0].apply_op1(Upsample2),
            |t| {
                t[0].reshape((2, 3, 4, 1, 5, 1))?
                    .broadcast_as((2, 3, 4, 2, 5, 2))?
                    .reshape((2, 3, 8, 10))
            },
        )?;
        let y = Tensor::randn(0f32, 1., (2, 3, 4, 6), &dev)?;
        agree(
            &[y],
            |t| t[0].apply_op1(SumPool2),
            |t| t[0].reshape((2, 3, 2, 2, 3, 2))?.sum(5)?.sum(3),
        )
    }
}
