//! The dVAE's convolutions as candle custom ops, on channel-major activations `(c, b, h, w)`.
//!
//! - [`ConvCm`]: a k×k "same" convolution with bias, optionally of `relu(x)`, as one op forward
//!   and backward. Where the CPU has AVX2 it runs the kernels of `direct` (and, for the 3×3
//!   layers they fit, `winograd`); otherwise (and for the wide 1×1 expansions, where a matrix
//!   product is faster) `W · im2col(x) + b`, one product over every image of the batch, the
//!   columns recomputed in backward. As separate candle ops the columns — k² times the input —
//!   were kept for the backward pass, and each large intermediate got a zero-filled gradient.
//! - [`ConvAdd`]: a residual block's last convolution with its gain and the identity sum.
//!
//! Both are f32 on CPU; `vae::model` uses candle's own ops elsewhere.

mod direct;
mod tiles;
mod winograd;

use super::{contiguous_f32, matmul, par_chunks, with_f32};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use tiles::Epilogue;

/// Geometry of a channel-major convolution input (the direct kernels' own).
use tiles::Geom as Planes;

impl Planes {
    fn n(&self) -> usize {
        self.b * self.h * self.w
    }

    /// For input channel `ci`: `f(tap, src, dst, len)` for each run of in-image pixels, `src`
    /// into `x (c, b, h, w)` and `dst` into row `tap` (of k²) of this channel's columns, each
    /// row `b·h·w` long: column `(ci·k + dy)·k + dx` at pixel `(img, y, x)` holds
    /// `x[ci, img, y + dy − pad, x + dx − pad]`, zero outside the image.
    fn runs(&self, ci: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (b, h, w, k, pad) = (self.b, self.h, self.w, self.k, self.pad);
        for dy in 0..k {
            for dx in 0..k {
                // x + dx − pad in [0, w)  ⇔  x in [pad − dx, w + pad − dx)
                let x0 = pad.saturating_sub(dx);
                let x1 = (w + pad).saturating_sub(dx).min(w);
                if x1 <= x0 {
                    continue;
                }
                for img in 0..b {
                    for y in 0..h {
                        let sy = y + dy;
                        if sy < pad || sy - pad >= h {
                            continue;
                        }
                        let src = ((ci * b + img) * h + sy - pad) * w + x0 + dx - pad;
                        let dst = (img * h + y) * w + x0;
                        f(dy * k + dx, src, dst, x1 - x0);
                    }
                }
            }
        }
    }

    /// `x (c, b, h, w)` → columns `(c·k², b·h·w)`, of `relu(x)` with `relu`.
    fn im2col(&self, x: &[f32], relu: bool) -> Vec<f32> {
        let (n, kk) = (self.n(), self.k * self.k);
        let mut cols = crate::kernels::zeros(self.c * kk * n);
        par_chunks(&mut cols, kk * n, |ci, dst| {
            self.runs(ci, |tap, s, d, len| {
                let (d, s) = (&mut dst[tap * n + d..][..len], &x[s..s + len]);
                if relu {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d = s.max(0.0));
                } else {
                    d.copy_from_slice(s);
                }
            });
        });
        cols
    }

    /// The columns the matrix product reads: `x` itself for a 1×1 kernel without ReLU, else
    /// [`Self::im2col`].
    fn columns<'a>(&self, x: &'a [f32], relu: bool) -> std::borrow::Cow<'a, [f32]> {
        if self.k == 1 && !relu {
            std::borrow::Cow::Borrowed(x)
        } else {
            std::borrow::Cow::Owned(self.im2col(x, relu))
        }
    }

    /// The adjoint: columns `(c·k², b·h·w)` → `(c, b, h, w)`, each entry added back onto the
    /// pixel it was read from.
    fn col2im(&self, cols: &[f32]) -> Vec<f32> {
        let (n, kk) = (self.n(), self.k * self.k);
        let mut x = crate::kernels::zeros(self.c * n);
        par_chunks(&mut x, n, |ci, dst| {
            let src = &cols[ci * kk * n..(ci + 1) * kk * n];
            let base = ci * n;
            self.runs(ci, |tap, s, d, len| {
                let d = tap * n + d;
                let s = s - base;
                dst[s..s + len]
                    .iter_mut()
                    .zip(&src[d..d + len])
                    .for_each(|(o, &v)| *o += v);
            });
        });
        x
    }
}

/// A k×k "same" convolution with bias of channel-major activations: `x (c, b, h, w)`, weight
/// `(n_out, c, k, k)`, bias `(n_out)` → `(n_out, b, h, w)`, of `relu(x)` with `relu` (the ReLU
/// that precedes every convolution of a residual path, fused so that neither it nor its gradient
/// is a tensor of its own). See the module docs.
#[derive(Clone, Copy, Debug)]
pub struct ConvCm {
    pub pad: usize,
    pub relu: bool,
}

impl ConvCm {
    fn planes(&self, x: &Layout, w: &[usize], b: &[usize]) -> Result<(Planes, usize)> {
        let (c, bsz, h, wd) = x.shape().dims4()?;
        let &[n_out, cw, k, k2] = w else {
            candle_core::bail!("conv: weight {w:?} is not (n_out, c, k, k)")
        };
        if cw != c || k != k2 || b != [n_out] || 2 * self.pad + 1 != k {
            candle_core::bail!(
                "conv: input {:?}, weight {w:?}, bias {b:?} and padding {} do not fit together",
                x.shape(),
                self.pad
            );
        }
        let planes = Planes {
            c,
            b: bsz,
            h,
            w: wd,
            k,
            pad: self.pad,
        };
        Ok((planes, n_out))
    }
}

/// Whether the direct kernels beat im2col + gemm for this layer. Measured per layer of the
/// `small` dVAE at batch 8, forward and backward (bench/NOTES.md, optimisation 22): gemm wins
/// only for the wide 1×1 expansions (128 → 512, 512 → 2048 channels), where there are no columns
/// to build and its panels are full; the direct kernels win or tie everywhere else, most (2×) on
/// the 16–64-channel layers at 64–128 px.
fn use_direct(p: &Planes, n_out: usize) -> bool {
    let wide_expansion = p.k == 1 && p.c >= 128 && n_out >= 4 * p.c;
    direct::available(p) && !wide_expansion
}

/// [`direct::forward`], or [`winograd::forward`] where that kernel fits the geometry (same
/// contract).
fn kernel_forward(
    g: &Planes,
    x: &[f32],
    relu: bool,
    w: &[f32],
    bias: Option<&[f32]>,
    n_out: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    if winograd::available(g) {
        winograd::forward(g, x, relu, w, bias, n_out, epilogue)
    } else {
        direct::forward(g, x, relu, w, bias, n_out, epilogue)
    }
}

/// [`direct::weight_grad`], or [`winograd::weight_grad`] where that kernel fits the geometry.
fn kernel_weight_grad(
    g: &Planes,
    x: &[f32],
    relu: bool,
    gy: &[f32],
    n_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    if winograd::available(g) {
        winograd::weight_grad(g, x, relu, gy, n_out)
    } else {
        direct::weight_grad(g, x, relu, gy, n_out)
    }
}

/// `W ⊛ relu?(x) + bias` of channel-major `x`, stored through `epilogue` (see
/// [`tiles::Epilogue`]).
fn conv_forward(
    p: &Planes,
    n_out: usize,
    (x, relu): (&[f32], bool),
    w: &[f32],
    bias: &[f32],
    epilogue: Epilogue,
) -> Result<Vec<f32>> {
    if use_direct(p, n_out) {
        let y = kernel_forward(p, x, relu, w, Some(bias), n_out, epilogue);
        return Ok(y);
    }
    let (n, ckk) = (p.n(), p.c * p.k * p.k);
    let cols = &p.columns(x, relu)[..];
    let mut y = crate::kernels::zeros(n_out * n);
    matmul((n_out, n, ckk), &mut y, (w, ckk, 1), (cols, n, 1), false)?;
    par_chunks(&mut y, n, |o, row| {
        let (b, at) = (bias[o], o * n);
        match epilogue {
            Epilogue::Store => row.iter_mut().for_each(|v| *v += b),
            Epilogue::Mask(m) => row
                .iter_mut()
                .zip(&m[at..at + n])
                .for_each(|(v, &m)| *v = if m > 0.0 { *v + b } else { 0.0 }),
            Epilogue::Residual(id, gain) => row
                .iter_mut()
                .zip(&id[at..at + n])
                .for_each(|(v, &i)| *v = i + gain * (*v + b)),
        }
    });
    Ok(y)
}

/// `(dx, dW, db)`; no dx when it is not needed.
type ConvGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Gradients `(dx, dW, db)` of `gain · (W ⊛ relu?(x) + b)` from the output gradient `g`: dW =
/// g · colsᵀ, db = Σ g over pixels, dx = col2im(Wᵀ · g) with the columns recomputed (or, on the
/// direct path, dx is the convolution of g with the flipped, transposed weight), zero where the
/// ReLU was.
fn conv_backward(
    p: &Planes,
    n_out: usize,
    (x, relu): (&[f32], bool),
    w: &[f32],
    g: &[f32],
    gain: f32,
    need_dx: bool,
) -> Result<ConvGrads> {
    let (n, ckk) = (p.n(), p.c * p.k * p.k);
    let scale = |v: &mut Vec<f32>| {
        if gain != 1.0 {
            v.iter_mut().for_each(|v| *v *= gain);
        }
    };
    if use_direct(p, n_out) {
        let geo = Planes { c: n_out, ..*p };
        let mut wf = direct::flip_transpose(w, n_out, p.c, p.k);
        scale(&mut wf);
        let epilogue = if relu {
            Epilogue::Mask(x)
        } else {
            Epilogue::Store
        };
        let dx = need_dx.then(|| kernel_forward(&geo, g, false, &wf, None, p.c, epilogue));
        let (mut dw, mut db) = kernel_weight_grad(p, x, relu, g, n_out);
        scale(&mut dw);
        scale(&mut db);
        return Ok((dx, dw, db));
    }
    let cols = &p.columns(x, relu)[..];
    let mut dw = crate::kernels::zeros(n_out * ckk);
    matmul((n_out, ckk, n), &mut dw, (g, n, 1), (cols, 1, n), false)?;
    let dx = if need_dx {
        let wg = if gain == 1.0 {
            std::borrow::Cow::Borrowed(w)
        } else {
            std::borrow::Cow::Owned(w.iter().map(|v| v * gain).collect())
        };
        let mut dcols = crate::kernels::zeros(ckk * n);
        matmul((ckk, n, n_out), &mut dcols, (&wg, 1, ckk), (g, n, 1), false)?;
        let mut dx = if p.k == 1 { dcols } else { p.col2im(&dcols) };
        if relu {
            dx.iter_mut().zip(x).for_each(|(d, &v)| {
                if v <= 0.0 {
                    *d = 0.0
                }
            });
        }
        Some(dx)
    } else {
        None
    };
    let mut db: Vec<f32> = g.chunks_exact(n.max(1)).map(crate::kernels::sum).collect();
    scale(&mut dw);
    scale(&mut db);
    Ok((dx, dw, db))
}

impl CustomOp3 for ConvCm {
    fn name(&self) -> &'static str {
        "conv-channel-major"
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
        let (p, n_out) = self.planes(l1, l2.shape().dims(), l3.shape().dims())?;
        let op = self.name();
        let (x, w, bias) = (
            contiguous_f32(s1, l1, op)?,
            contiguous_f32(s2, l2, op)?,
            contiguous_f32(s3, l3, op)?,
        );
        let y = conv_forward(&p, n_out, (x, self.relu), w, bias, Epilogue::Store)?;
        Ok((CpuStorage::F32(y), Shape::from((n_out, p.b, p.h, p.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (p, n_out) = self.planes(x.layout(), w.dims(), b.dims())?;
        let op = self.name();
        let (dx, dw, db) = with_f32(grad, op, |g| {
            with_f32(w, op, |wv| {
                with_f32(x, op, |xv| {
                    // The encoder's input image needs no gradient: skip its largest product.
                    conv_backward(&p, n_out, (xv, self.relu), wv, g, 1.0, x.track_op())
                })
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// A residual block's last convolution and the connection around it, as one op:
/// `id + gain · (W ⊛ relu?(x) + b)` for `(x, wb, id)`, where `wb` is the weight `(n_out, c, k,
/// k)` flattened with the bias after it (a custom op takes at most three tensors) and `id` is
/// `(n_out, b, h, w)`. As candle ops the scaling and the sum were two more passes over the
/// block's widest activation each way.
#[derive(Clone, Copy, Debug)]
pub struct ConvAdd {
    pub conv: ConvCm,
    pub gain: f32,
}

impl ConvAdd {
    /// The geometry, and the weight's length in `wb`.
    fn planes(&self, x: &Layout, wb: &Layout, id: &Layout) -> Result<(Planes, usize, usize)> {
        let n_out = id.shape().dims4()?.0;
        let (c, k) = (x.shape().dims4()?.0, 2 * self.conv.pad + 1);
        let wlen = n_out * c * k * k;
        if wb.shape().dims() != [wlen + n_out] {
            candle_core::bail!(
                "conv-add: packed weights {:?} are not a ({n_out}, {c}, {k}, {k}) weight and {n_out} biases",
                wb.shape()
            );
        }
        let (p, _) = self.conv.planes(x, &[n_out, c, k, k], &[n_out])?;
        if id.shape().dims() != [n_out, p.b, p.h, p.w] {
            candle_core::bail!(
                "conv-add: residual {:?} is not the output shape {:?}",
                id.shape(),
                [n_out, p.b, p.h, p.w]
            );
        }
        Ok((p, n_out, wlen))
    }
}

impl CustomOp3 for ConvAdd {
    fn name(&self) -> &'static str {
        "conv-add"
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
        let (p, n_out, wlen) = self.planes(l1, l2, l3)?;
        let op = self.name();
        let (x, wb, id) = (
            contiguous_f32(s1, l1, op)?,
            contiguous_f32(s2, l2, op)?,
            contiguous_f32(s3, l3, op)?,
        );
        let (w, bias) = wb.split_at(wlen);
        let epilogue = Epilogue::Residual(id, self.gain);
        let y = conv_forward(&p, n_out, (x, self.conv.relu), w, bias, epilogue)?;
        Ok((CpuStorage::F32(y), l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        id: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (p, n_out, wlen) = self.planes(x.layout(), wb.layout(), id.layout())?;
        let op = self.name();
        let relu = self.conv.relu;
        let (dx, dwb) = with_f32(grad, op, |g| {
            with_f32(wb, op, |wv| {
                with_f32(x, op, |xv| {
                    let need_dx = x.track_op();
                    let (dx, mut dw, db) =
                        conv_backward(&p, n_out, (xv, relu), &wv[..wlen], g, self.gain, need_dx)?;
                    dw.extend_from_slice(&db);
                    Ok((dx, dw))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dwb, wb.shape(), dev)?),
            Some(grad.clone()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::{Device, Var};

    /// The fused channel-major convolution equals ReLU + candle's `conv2d` + bias on the same
    /// data in (b, c, h, w), values and the gradients of input, weight and bias, for every kernel
    /// size the dVAE uses, with and without the ReLU, on both paths: a width that is not a
    /// multiple of 8 (im2col + gemm) and ones that are (the direct kernels where the CPU has AVX2,
    /// the AVX-512 forward kernel for widths that are a multiple of 16 where it has AVX-512, with
    /// output channels, pixels and (channel, tap) pairs that leave partial register tiles), and
    /// the Winograd kernel for 3×3 (widths 16 with 4 rows, 32 and 64; 4 and 2 vectors of tiles
    /// per block, either side of 64 input channels; short last blocks).
    #[test]
    fn channel_major_conv_matches_candles_conv2d_forward_and_backward() -> Result<()> {
        conv_matches_candle()
    }

    /// The same on the paths a CPU without AVX-512, and one without AVX2, takes (forced here
    /// with `isa::set_cap`, as `DALLE_CPU=avx2` / `portable` does): the one binary is correct on
    /// every x86 machine, not only on the one it runs on.
    #[test]
    fn conv_matches_candle_on_avx2_and_portable_paths() -> Result<()> {
        use crate::kernels::isa::{self, Isa};
        for cap in [Isa::Avx2, Isa::Portable] {
            isa::set_cap(cap);
            assert!(!isa::avx512());
            assert_eq!(isa::avx2(), cap == Isa::Avx2 && isa::avx2_detected());
            let r = conv_matches_candle();
            isa::set_cap(Isa::Avx512);
            r?;
        }
        Ok(())
    }

    fn conv_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let shapes = [
            (3, 4, 6, 5),
            (5, 7, 3, 16),
            (2, 3, 9, 8),
            (3, 13, 4, 32),
            (70, 7, 4, 16),
            (6, 65, 8, 16),
            (9, 5, 6, 64),
        ];
        for (c, n_out, h, w) in shapes {
            for k in [1, 3, 7] {
                // A sum of c·k² unit products (n_out·k² for the input gradient, 2·h·w for the
                // bias gradient) is ~√(terms) large, and so are its rounding errors.
                let terms = (c.max(n_out) * k * k).max(2 * h * w);
                let tol = 1e-4 * (terms as f32 / 64.0).sqrt().max(1.0);
                for relu in [false, true] {
                    let pad = (k - 1) / 2;
                    let x = Tensor::randn(0f32, 1., (c, 2, h, w), &dev)?; // (c, b, h, w)
                    let wt = Tensor::randn(0f32, 1., (n_out, c, k, k), &dev)?;
                    let b = Tensor::randn(0f32, 1., n_out, &dev)?;
                    agree_on(
                        &[x, wt, b],
                        tol,
                        |t| t[0].apply_op3(&t[1], &t[2], ConvCm { pad, relu }),
                        |t| {
                            let x = if relu { t[0].relu()? } else { t[0].clone() };
                            let y = x
                                .permute((1, 0, 2, 3))?
                                .conv2d(&t[1], pad, 1, 1, 1)?
                                .broadcast_add(&t[2].reshape((1, n_out, 1, 1))?)?;
                            y.permute((1, 0, 2, 3))
                        },
                    )?;
                }
            }
        }
        let x = Tensor::zeros((3, 2, 6, 5), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros(4, candle_core::DType::F32, &dev)?;
        let relu = false;
        assert!(x.apply_op3(&w, &b, ConvCm { pad: 1, relu }).is_err());
        // An input that needs no gradient (the encoder's image) gets none; the weight does.
        let x = Tensor::randn(0f32, 1., (3, 2, 4, 8), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?)?;
        let y = x.apply_op3(w.as_tensor(), &b, ConvCm { pad: 1, relu })?;
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none() && grads.get(w.as_tensor()).is_some());
        Ok(())
    }

    /// The residual convolution equals `id + gain · (conv(relu(x)) + b)` as candle ops, values
    /// and the gradients of x, weight, bias (through the packed weight) and id, on both paths.
    #[test]
    fn conv_add_matches_scaled_conv_plus_identity() -> Result<()> {
        let dev = Device::Cpu;
        let shapes = [
            (3, 4, 6, 5, 3),
            (5, 7, 3, 16, 3),
            (6, 5, 4, 8, 1),
            (5, 7, 2, 32, 3),
            (66, 8, 4, 16, 3),
        ];
        for (c, n_out, h, w, k) in shapes {
            let pad = (k - 1) / 2;
            let gain = 0.37;
            let inputs = [
                Tensor::randn(0f32, 1., (c, 2, h, w), &dev)?,
                Tensor::randn(0f32, 1., (n_out, c, k, k), &dev)?,
                Tensor::randn(0f32, 1., n_out, &dev)?,
                Tensor::randn(0f32, 1., (n_out, 2, h, w), &dev)?,
            ];
            let op = ConvAdd {
                conv: ConvCm { pad, relu: true },
                gain: gain as f32,
            };
            agree_on(
                &inputs,
                1e-4,
                |t| {
                    let wb = Tensor::cat(&[&t[1].flatten_all()?, &t[2]], 0)?;
                    t[0].apply_op3(&wb, &t[3], op)
                },
                |t| {
                    let y = t[0]
                        .relu()?
                        .permute((1, 0, 2, 3))?
                        .conv2d(&t[1], pad, 1, 1, 1)?
                        .broadcast_add(&t[2].reshape((1, n_out, 1, 1))?)?
                        .permute((1, 0, 2, 3))?;
                    &t[3] + (y * gain)?
                },
            )?;
        }
        Ok(())
    }
}
