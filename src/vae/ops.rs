//! The dVAE's CPU training hot spots as candle custom ops.
//!
//! - [`ConvCm`]: a k×k "same" convolution with bias, optionally of `relu(x)`, as one op forward
//!   and backward, on channel-major activations `(c, b, h, w)`. Where the CPU has AVX2 it runs
//!   the direct kernels of `super::direct`; otherwise (and for the wide 1×1 expansions, where a
//!   matrix product is faster) `W · im2col(x) + b`, one product over every image of the batch,
//!   the columns recomputed in backward. As separate candle ops the columns — k² times the input —
//!   were kept for the backward pass, and each large intermediate got a zero-filled gradient.
//! - [`ConvAdd`]: a residual block's last convolution with its gain and the identity sum.
//! - [`MaxPool2`], [`Upsample2`] / [`SumPool2`] (each the other's backward): one pass each way.
//! - [`SoftmaxAxis`], [`NegEntropy`]: softmax, log-softmax and Σ q ln q over the codebook axis of
//!   the logits, without transposes.
//!
//! All are f32 on CPU; [`super::model`] and [`super::loss`] use candle's own ops elsewhere.

use super::direct::Epilogue;
use crate::kernels::{contiguous_f32, matmul, with_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Split `dst` into `chunk`-long pieces and run `f(index, piece)` on them across the cores.
fn par_chunks(dst: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = crate::util::threads();
    let chunks = dst.len() / chunk.max(1);
    if threads == 1 || chunks < 2 {
        dst.chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(i, d)| f(i, d));
        return;
    }
    let per = chunks.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in dst.chunks_mut(per * chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, d) in part.chunks_mut(chunk).enumerate() {
                    f(t * per + i, d);
                }
            });
        }
    });
}

/// Geometry of a channel-major convolution input (the direct kernels' own).
use super::direct::Geom as Planes;

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
        let mut cols = vec![0f32; self.c * kk * n];
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
        let mut x = vec![0f32; self.c * n];
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
    super::direct::available(p) && !wide_expansion
}

/// `W ⊛ relu?(x) + bias` of channel-major `x`, stored through `epilogue` (see
/// [`super::direct::Epilogue`]).
fn conv_forward(
    p: &Planes,
    n_out: usize,
    (x, relu): (&[f32], bool),
    w: &[f32],
    bias: &[f32],
    epilogue: Epilogue,
) -> Result<Vec<f32>> {
    if use_direct(p, n_out) {
        let y = super::direct::forward(p, x, relu, w, Some(bias), n_out, epilogue);
        return Ok(y);
    }
    let (n, ckk) = (p.n(), p.c * p.k * p.k);
    let cols = &p.columns(x, relu)[..];
    let mut y = vec![0f32; n_out * n];
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
        let mut wf = super::direct::flip_transpose(w, n_out, p.c, p.k);
        scale(&mut wf);
        let epilogue = if relu {
            Epilogue::Mask(x)
        } else {
            Epilogue::Store
        };
        let dx = need_dx.then(|| super::direct::forward(&geo, g, false, &wf, None, p.c, epilogue));
        let (mut dw, mut db) = super::direct::weight_grad(p, x, relu, g, n_out);
        scale(&mut dw);
        scale(&mut db);
        return Ok((dx, dw, db));
    }
    let cols = &p.columns(x, relu)[..];
    let mut dw = vec![0f32; n_out * ckk];
    matmul((n_out, ckk, n), &mut dw, (g, n, 1), (cols, 1, n), false)?;
    let dx = if need_dx {
        let wg = if gain == 1.0 {
            std::borrow::Cow::Borrowed(w)
        } else {
            std::borrow::Cow::Owned(w.iter().map(|v| v * gain).collect())
        };
        let mut dcols = vec![0f32; ckk * n];
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
        let mut out = vec![0f32; rows * w];
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
        let mut dx = vec![0f32; x.len()];
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
    use crate::transformer::ops::fast_exp;
    lse.copy_from_slice(&x[..inner]);
    for row in x.chunks_exact(inner).take(k).skip(1) {
        lse.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
    }
    let mut sum = vec![0f32; inner];
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
        use crate::transformer::ops::fast_exp;
        let (_, k, inner) = around_axis(layout.shape(), self.dim, self.name())?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        let log = self.log;
        par_chunks(&mut y, k * inner, |o, dst| {
            let src = &x[o * k * inner..(o + 1) * k * inner];
            let mut lse = vec![0f32; inner];
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
        use crate::transformer::ops::fast_exp;
        let same = |k, inner| k * inner;
        let (k, inner, y, g) = axis_pair((s1, l1), (s2, l2), self.0.dim, same, self.name())?;
        let log = self.0.log;
        let mut dx = vec![0f32; y.len()];
        par_chunks(&mut dx, k * inner, |o, dst| {
            let range = o * k * inner..(o + 1) * k * inner;
            let (y, g) = (&y[range.clone()], &g[range]);
            let mut t = vec![0f32; inner];
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
    use crate::transformer::ops::fast_exp;
    let mut lse = vec![0f32; inner];
    column_lse(x, k, inner, &mut lse);
    let mut h = vec![0f32; inner];
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
        let mut out = vec![0f32; x.len() / k.max(1)];
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
        use crate::transformer::ops::fast_exp;
        let per_position = |_, inner| inner;
        let (k, inner, x, g) =
            axis_pair((s1, l1), (s2, l2), self.0.dim, per_position, self.name())?;
        let mut dx = vec![0f32; x.len()];
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and input gradients of `ours` and `reference` agree on random inputs, within
    /// `tol` (f32 sums in another order).
    fn agree(
        inputs: &[Tensor],
        tol: f32,
        ours: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (ours(&xs)?, reference(&xs)?);
        assert_eq!(a.dims(), b.dims());
        let fwd = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(fwd <= tol, "forward differs by {fwd}");
        let g = Tensor::randn(0f32, 1., a.dims(), a.device())?;
        let (ga, gb) = (
            (a * &g)?.sum_all()?.backward()?,
            (b * &g)?.sum_all()?.backward()?,
        );
        for (i, v) in vars.iter().enumerate() {
            let d = (ga.get(v).unwrap() - gb.get(v).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d <= tol, "gradient of input {i} differs by {d}");
        }
        Ok(())
    }

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
                // A sum of c·k² unit products (n_out·k² for the input gradient) is ~√(c·k²)
                // large, and so are its rounding errors.
                let tol = 1e-4 * ((c.max(n_out) * k * k) as f32 / 64.0).sqrt().max(1.0);
                for relu in [false, true] {
                    let pad = (k - 1) / 2;
                    let x = Tensor::randn(0f32, 1., (c, 2, h, w), &dev)?; // (c, b, h, w)
                    let wt = Tensor::randn(0f32, 1., (n_out, c, k, k), &dev)?;
                    let b = Tensor::randn(0f32, 1., n_out, &dev)?;
                    agree(
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
            agree(
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
                agree(
                    std::slice::from_ref(&x),
                    1e-5,
                    |t| t[0].apply_op1(SoftmaxAxis { dim, log }),
                    |t| last(&t[0], log),
                )?;
            }
            agree(
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

    /// On ties-free random data the one-pass pooling equals two max reductions, values and
    /// gradient.
    #[test]
    fn max_pool_matches_two_max_reductions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 2, 6, 10), &dev)?;
        agree(
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
        agree(
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
        agree(
            &[y],
            1e-6,
            |t| t[0].apply_op1(SumPool2),
            |t| t[0].reshape((2, 3, 2, 2, 3, 2))?.sum(5)?.sum(3),
        )
    }
}
