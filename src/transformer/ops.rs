//! Fused CPU kernels with backward passes for the transformer's hot spots: GELU, softmax (plain
//! and scaled + masked), layer norm, the linear layer (with a matrix-vector path for decoding)
//! and the next-token loss. As tensor ops each of these is several candle ops, and candle's
//! backward pass zero-fills a gradient buffer and adds into it for every op's input: on the
//! activations of a training step that is most of the time the matmuls leave. Every kernel is
//! checked against its tensor-op version, values and gradients (tests below); on other devices
//! or dtypes the tensor ops run instead.

use crate::kernels::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Inputs smaller than this run on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// `f` over `rows` chunks of `width` values of `x` into `y`, split across the cores.
fn par_rows(x: &[f32], y: &mut [f32], width: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    par_rows2(x, x, y, width, |x, _, y| f(x, y));
}

/// As [`par_rows`] with a second input read row by row alongside the first.
fn par_rows2(
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    width: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) {
    let threads = crate::util::threads();
    let rows = a.len() / width.max(1);
    if a.len() < PARALLEL_MIN || threads == 1 || rows < 2 {
        f(a, b, y);
        return;
    }
    let per = rows.div_ceil(threads) * width;
    std::thread::scope(|s| {
        for ((ac, bc), yc) in a.chunks(per).zip(b.chunks(per)).zip(y.chunks_mut(per)) {
            let f = &f;
            s.spawn(move || f(ac, bc, yc));
        }
    });
}

/// Length of the last axis (rows are runs of it), at least 1.
fn row_width(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// The values of two same-shaped contiguous f32 inputs (an output and its gradient, say) and
/// their row width.
fn row_pair<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    op: &str,
) -> Result<(&'a [f32], &'a [f32], usize)> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: {:?} vs {:?}", l1.shape(), l2.shape());
    }
    Ok((
        contiguous_f32(s1, l1, op)?,
        contiguous_f32(s2, l2, op)?,
        row_width(l1),
    ))
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// eˣ in f32 within ~2 ulp, without a libm call, so that loops over it vectorise (a training
/// step spent ~15% of its forward pass in libm's `tanhf`/`expm1f` for GELU). Range reduction
/// x = n·ln 2 + r, |r| ≤ ln 2 / 2, a degree-6 Taylor polynomial for eʳ (error < 2e-7), and 2ⁿ
/// built in the exponent bits. Below −87 (e⁻⁸⁷ is near the smallest normal f32) the result is 0,
/// so masked −∞ scores get exactly zero weight; above 88 it saturates at e⁸⁸.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without `round()`.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let e = p * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// σ(2u) for GELU's u = √(2/π)·(x + 0.044715·x³): ½(1 + tanh u) = 1 / (1 + e^(−2u)).
#[inline(always)]
fn gelu_gate(v: f32) -> f32 {
    let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v);
    1.0 / (1.0 + fast_exp(-2.0 * u))
}

/// candle's tanh-approximated GELU, ½x(1 + tanh u), as x·σ(2u) (the same function).
#[inline]
pub(crate) fn gelu_f32(v: f32) -> f32 {
    v * gelu_gate(v)
}

/// Its derivative: σ + 2x·σ(1 − σ)·√(2/π)·(1 + 3·0.044715·x²), σ = σ(2u).
#[inline]
fn gelu_grad_f32(v: f32) -> f32 {
    let s = gelu_gate(v);
    s + 2.0 * v * s * (1.0 - s) * SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v)
}

struct Gelu;
struct GeluGrad;

/// `f` over every value of a contiguous f32 tensor, split across the cores.
fn map_f32(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s, l, op)?;
    let mut y = vec![0f32; x.len()];
    par_rows(x, &mut y, 1, |x, y| {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = f(v);
        }
    });
    Ok((CpuStorage::F32(y), l.shape().clone()))
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_f32(s, l, self.name(), gelu_f32)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.contiguous()?.apply_op1_no_bwd(&GeluGrad)?;
        Ok(Some(grad.mul(&d)?))
    }
}

impl CustomOp1 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_f32(s, l, self.name(), gelu_grad_f32)
    }
}

/// GELU (tanh approximation) with a backward pass: one fused multi-threaded kernel each way on
/// the CPU in f32; candle's `gelu` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

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
        let mut y = vec![0f32; x.len()];
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
        let mut dx = vec![0f32; y.len()];
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
        let mut y = vec![0f32; x.len()];
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
        let mut y = vec![0f32; x.len()];
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
        let mut dx = vec![0f32; x.len()];
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

/// Cross-entropy of next-token prediction: `logits (b, s, V)`, `targets (b, s − 1)` (u32, the
/// ids of positions 1..s) → `nll (b, s − 1)`, nll = logsumexp(logits[p]) − logits[p][target],
/// for p < s − 1. Backward: softmax − one-hot times the incoming gradient, the last position 0.
/// As tensor ops (narrow, log-softmax, gather) that is ~8 nodes over the logits, the largest
/// tensor of a training step, each with its own backward pass.
struct NextTokenNll;

impl NextTokenNll {
    fn dims(logits: &Layout, targets: &Layout) -> Result<(usize, usize, usize)> {
        let (b, s, v) = logits.shape().dims3()?;
        if s < 2 || targets.shape().dims() != [b, s - 1] {
            candle_core::bail!(
                "next-token nll: logits {:?} and targets {:?} do not fit together",
                logits.shape(),
                targets.shape()
            );
        }
        Ok((b, s, v))
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{op}: u32 targets only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: contiguous targets only"),
    }
}

/// log Σ exp over one row.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = crate::kernels::max(row);
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - max)).sum();
    for c in chunks {
        acc.iter_mut()
            .zip(c)
            .for_each(|(s, &v)| *s += fast_exp(v - max));
    }
    max + (crate::kernels::sum(&acc) + tail).ln()
}

impl CustomOp2 for NextTokenNll {
    fn name(&self) -> &'static str {
        "next-token-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, v) = Self::dims(l1, l2)?;
        let logits = contiguous_f32(s1, l1, self.name())?;
        let targets = u32_slice(s2, l2, self.name())?;
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("next-token nll: target {t} outside the vocabulary of {v}");
        }
        let mut nll = vec![0f32; b * (s - 1)];
        use rayon::prelude::*;
        nll.par_iter_mut().enumerate().for_each(|(i, out)| {
            let r = (i / (s - 1)) * s + i % (s - 1);
            let row = &logits[r * v..(r + 1) * v];
            *out = log_sum_exp(row) - row[targets[i] as usize];
        });
        Ok((CpuStorage::F32(nll), Shape::from((b, s - 1))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::kernels::with_f32;
        use rayon::prelude::*;
        let (b, s, v) = Self::dims(logits.layout(), targets.layout())?;
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        let op = self.name();
        let d = with_f32(grad, op, |g| {
            with_f32(logits, op, |x| {
                let mut d = vec![0f32; b * s * v];
                d.par_chunks_mut(v).enumerate().for_each(|(r, dr)| {
                    let (seq, p) = (r / s, r % s);
                    if p == s - 1 {
                        return; // the last position predicts nothing
                    }
                    let i = seq * (s - 1) + p;
                    let xr = &x[r * v..(r + 1) * v];
                    let lse = log_sum_exp(xr);
                    for (o, &xv) in dr.iter_mut().zip(xr) {
                        *o = g[i] * fast_exp(xv - lse);
                    }
                    dr[t[i] as usize] -= g[i];
                });
                Ok(d)
            })
        })?;
        Ok((
            Some(Tensor::from_vec(d, logits.shape(), logits.device())?),
            None,
        ))
    }
}

/// Per-position next-token negative log-likelihood, `(b, s − 1)`, of `logits (b, s, V)` for
/// the ids `ids (b, s)`: [`NextTokenNll`] on the CPU in f32, tensor ops elsewhere.
pub fn next_token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, s, _) = logits.dims3()?;
    let targets = ids
        .narrow(1, 1, s - 1)?
        .to_dtype(candle_core::DType::U32)?
        .contiguous()?;
    if fused_cpu(logits) {
        return logits.contiguous()?.apply_op2(&targets, NextTokenNll);
    }
    let logp = crate::vae::model::log_softmax(&logits.narrow(1, 0, s - 1)?, 2)?;
    logp.contiguous()?
        .gather(&targets.unsqueeze(2)?, 2)?
        .squeeze(2)?
        .neg()
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
        let mut sum = vec![0f32; n];
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
        let mut y = vec![0f32; x.len()];
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

/// Row counts up to this are a pass over the weights, one row per sequence: [`gemv_rows`] in
/// the graph's linear op, a team's matrix-vector pass in a native decoding step.
pub const SMALL_ROWS: usize = 4;

pub(crate) type Dot = fn(&[f32], &[f32]) -> f32;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (for the loads): i + 32 ≤ n, so every lane read is inside both slices.
    while i + 32 <= n {
        for (u, s) in acc.iter_mut().enumerate() {
            let (x, y) = (
                _mm256_loadu_ps(pa.add(i + 8 * u)),
                _mm256_loadu_ps(pb.add(i + 8 * u)),
            );
            *s = _mm256_fmadd_ps(x, y, *s);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    lanes.iter().sum::<f32>() + crate::kernels::dot(&a[i..n], &b[i..n])
}

/// The fastest dot product this CPU runs.
pub(crate) fn pick_dot() -> Dot {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return |a, b| unsafe { dot_avx2_fma(a, b) };
    }
    crate::kernels::dot
}

/// A dot product of f32 values with f16 ones.
pub(crate) type DotF16 = fn(&[f32], &[half::f16]) -> f32;

/// [`dot_avx2_fma`] with `b` in f16, widened by F16C as it is loaded: the same lanes, the
/// same order of additions, so the same sum as over `b` widened beforehand.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2_fma(a: &[f32], b: &[half::f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (for the loads): i + 32 ≤ n, so every lane read is inside both slices (8 f16 are
    // the 16 bytes one `_mm_loadu_si128` reads).
    while i + 32 <= n {
        for (u, s) in acc.iter_mut().enumerate() {
            let (x, y) = (
                _mm256_loadu_ps(pa.add(i + 8 * u)),
                _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i + 8 * u).cast::<__m128i>())),
            );
            *s = _mm256_fmadd_ps(x, y, *s);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    let tail: Vec<f32> = b[i..n].iter().map(|v| v.to_f32()).collect();
    lanes.iter().sum::<f32>() + crate::kernels::dot(&a[i..n], &tail)
}

/// The f16 twin of [`pick_dot`]: where F16C is missing, the row is widened first and
/// [`pick_dot`]'s product taken, so both paths give the f32 kernel's sums.
pub(crate) fn pick_dot_f16() -> DotF16 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return |a, b| unsafe { dot_f16_avx2_fma(a, b) };
    }
    |a, b| {
        let wide: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        pick_dot()(a, &wide)
    }
}

/// `x (m, k) · wᵀ` for `w (n, k)` and few rows `m`, written into `out (m, n)`: each weight row
/// is read once, straight from memory, and dotted with every row of `x`. The general matmul
/// kernel packs the whole weight into panels on every call, which for one row reads and writes
/// it twice more than the product needs: decoding at batch 1 is a pass over the weights.
pub(crate) fn gemv_rows(x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize), out: &mut [f32]) {
    let dot = pick_dot();
    // (n, m): each task owns whole weight rows; a few tasks per thread balance the load.
    let mut out_t = vec![0f32; n * m];
    let per = n.div_ceil(4 * crate::util::threads()).max(16);
    use rayon::prelude::*;
    out_t
        .par_chunks_mut(per * m.max(1))
        .enumerate()
        .for_each(|(c, chunk)| {
            for (jj, o) in chunk.chunks_mut(m.max(1)).enumerate() {
                let j = c * per + jj;
                for (i, v) in o.iter_mut().enumerate() {
                    *v = dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                }
            }
        });
    for (j, col) in out_t.chunks(m.max(1)).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

/// Row counts up to this take [`gemm_few_rows`] in a decoding step: one row per sequence.
pub const FEW_ROWS: usize = 32;

/// `f(x (m, k) · wᵀ + bias)` for `w (n, k)` and up to [`FEW_ROWS`] rows, written into
/// `out (m, n)`, on
/// AVX2/FMA (None elsewhere, or for `k` not a multiple of 8): like [`gemv_rows`] each weight
/// row is read once, straight from memory, but a 2-row × 6-weight-row tile of dot products is
/// kept in registers, so each weight vector loaded serves 2 rows and each input vector 6 weight
/// rows. The general matrix product packs the whole weight on every call. Measured on the
/// batch-16 decode loop of `small`: weight passes 25–33 → 16–22 ms per step (tiles of 4 × 3,
/// 4 × 2, 6 × 2, 3 × 4, 1 × 8 and 2 × 4 were all within that noise), and the prefetch below
/// takes another ~20% off.
pub(crate) fn gemm_few_rows(
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    out: &mut [f32],
    (bias, f): (Option<&[f32]>, &(impl Fn(f32) -> f32 + Sync)),
) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if m <= FEW_ROWS
        && k.is_multiple_of(8)
        && x.len() >= m * k
        && w.len() >= n * k
        && out.len() >= m * n
        && bias.is_none_or(|b| b.len() >= n)
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        use rayon::prelude::*;
        const NR: usize = 6;
        let mut out_t = vec![0f32; n * m];
        let per = (n.div_ceil(4 * crate::util::threads()).max(16)).next_multiple_of(NR);
        out_t
            .par_chunks_mut(per * m)
            .enumerate()
            .for_each(|(c, chunk)| {
                let j0 = c * per;
                let rows = chunk.len() / m;
                // SAFETY: AVX2/FMA checked above; weight rows j0 .. j0 + rows and input rows
                // 0 .. m are inside `w` and `x` (lengths checked above), k a multiple of 8.
                unsafe { few_rows_avx2(x, &w[j0 * k..(j0 + rows) * k], (m, rows, k), chunk) };
                // The epilogue here, on both cores: at 16 rows it was ~1 ms a step serially.
                for (jj, col) in chunk.chunks_mut(m).enumerate() {
                    let b = bias.map_or(0.0, |b| b[j0 + jj]);
                    col.iter_mut().for_each(|v| *v = f(*v + b));
                }
            });
        out[..m * n]
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = out_t[j * m + i];
                }
            });
        return Some(());
    }
    let _ = (x, w, m, n, k, out, bias, f);
    None
}

/// [`gemm_few_rows`] over one run of weight rows: `out_t (rows, m)` = `w (rows, k) · xᵀ`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_avx2(
    x: &[f32],
    w: &[f32],
    (m, rows, k): (usize, usize, usize),
    out_t: &mut [f32],
) {
    use std::arch::x86_64::*;
    const MR: usize = 2;
    const NR: usize = 6;
    let hsum = |v: __m256| -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    };
    // The weight rows two tiles ahead are prefetched into L2 while this tile computes, a line
    // or so per inner iteration: without it each tile's first pass over its weight rows
    // (NR interleaved streams of k floats, too short for the hardware prefetcher to catch up)
    // stalled on memory, and the product ran at half its in-cache rate. Microbenchmark of one
    // step's weights at 16 rows, huge pages, medians of 6: 17.6–18.7 ms without, 12.2–16.5
    // with (1–3 tiles ahead, L1 or L2 alike within the noise).
    const AHEAD: usize = 2;
    let iters = m.div_ceil(MR) * (k / 8);
    let (tile_bytes, all_bytes) = (NR * k * 4, rows * k * 4);
    let bytes = w.as_ptr().cast::<i8>();
    for j0 in (0..rows).step_by(NR) {
        let nr = NR.min(rows - j0);
        let ahead = (j0 + AHEAD * NR) * k * 4;
        let mut it = 0;
        // Short tiles repeat their last row; only the valid sums are stored.
        let wp: [*const f32; NR] =
            std::array::from_fn(|r| w.as_ptr().add((j0 + r.min(nr - 1)) * k));
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            let xp: [*const f32; MR] =
                std::array::from_fn(|i| x.as_ptr().add((i0 + i.min(mr - 1)) * k));
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            for kk in (0..k).step_by(8) {
                let at = ahead + it * tile_bytes / iters;
                if at < all_bytes {
                    // A prefetch never faults; `at` stays inside `w` anyway.
                    _mm_prefetch(bytes.add(at), _MM_HINT_T1);
                }
                it += 1;
                let xv: [__m256; MR] = std::array::from_fn(|i| _mm256_loadu_ps(xp[i].add(kk)));
                for r in 0..NR {
                    let wv = _mm256_loadu_ps(wp[r].add(kk));
                    for i in 0..MR {
                        acc[i][r] = _mm256_fmadd_ps(xv[i], wv, acc[i][r]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(mr) {
                for (r, &v) in a.iter().enumerate().take(nr) {
                    out_t[(j0 + r) * m + i0 + i] = hsum(v);
                }
            }
        }
    }
}

/// `x · wᵀ + b` over the last axis of `x` (any rank), `w (n, k)` and `b (n)` as candle-nn's
/// `Linear` stores them: one graph node each way. As tensor ops (reshape, matmul, bias add,
/// reshape) every intermediate also costs candle's backward a zero-filled gradient buffer and
/// an add. Forward: the bias is written first and the product added onto it (one pass);
/// up to [`SMALL_ROWS`] rows take [`gemv_rows`]. Backward: dx = g·W, dW = gᵀ·x, db = Σ g.
struct LinearOp;

impl LinearOp {
    fn dims(x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
        let k = x.shape().dims().last().copied().unwrap_or(1);
        let (n, k2) = w.shape().dims2()?;
        if k != k2 || b.shape().dims() != [n] || k == 0 {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?} do not fit together",
                x.shape(),
                w.shape(),
                b.shape()
            );
        }
        Ok((x.shape().elem_count() / k, n, k))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (m, n, k) = Self::dims(l1, l2, l3)?;
        let op = self.name();
        let x = contiguous_f32(s1, l1, op)?;
        let (w, b) = (contiguous_f32(s2, l2, op)?, contiguous_f32(s3, l3, op)?);
        let mut y = vec![0f32; m * n];
        if m <= SMALL_ROWS {
            gemv_rows(x, w, (m, n, k), &mut y);
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(o, &bv)| *o += bv);
            }
        } else {
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
            // wᵀ as the right operand: element (kk, j) is w[j·k + kk].
            crate::kernels::matmul((m, n, k), &mut y, (x, k, 1), (w, 1, k), true)?;
        }
        let mut dims = l1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::kernels::{matmul, with_f32};
        let (m, n, k) = Self::dims(x.layout(), w.layout(), b.layout())?;
        let op = self.name();
        let (dx, dw, db) = with_f32(grad, op, |g| {
            with_f32(w, op, |wv| {
                with_f32(x, op, |xv| {
                    let mut dx = vec![0f32; m * k];
                    matmul((m, k, n), &mut dx, (g, n, 1), (wv, k, 1), false)?;
                    let mut dw = vec![0f32; n * k];
                    matmul((n, k, m), &mut dw, (g, 1, n), (xv, k, 1), false)?;
                    let mut db = vec![0f32; n];
                    for row in g.chunks_exact(n) {
                        db.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
                    }
                    Ok((dx, dw, db))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// `x · wᵀ + b` over the last axis of `x`: [`LinearOp`] on the CPU in f32, tensor ops elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_cpu(x) {
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp);
    }
    let mut dims = x.dims().to_vec();
    let k = dims.pop().unwrap_or(1);
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?.broadcast_add(b)?;
    dims.push(w.dim(0)?);
    y.reshape(dims)
}

fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
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

    #[test]
    fn few_rows_product_matches_a_plain_loop() {
        let mut rng = crate::rng::Rng::new(3);
        for (m, n, k) in [(5, 7, 24), (16, 13, 64), (32, 6, 8), (1, 1, 8)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let mut got = vec![f32::NAN; m * n];
            let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.5).collect();
            let relu = |v: f32| v.max(0.0);
            if gemm_few_rows(&x, &w, (m, n, k), &mut got, (Some(&b), &relu)).is_none() {
                return; // no AVX2/FMA here: the callers take the general product
            }
            for i in 0..m {
                for j in 0..n {
                    let dot: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                    let want = (dot + b[j]).max(0.0);
                    let v = got[i * n + j];
                    assert!(
                        (v - want).abs() < 1e-4,
                        "({m}, {n}, {k}) at ({i}, {j}): {v} vs {want}"
                    );
                }
            }
        }
    }
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "max |Δ| {d} > {tol}");
    }

    fn var(shape: &[usize], std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// `ours` and `theirs` (the same function of `vars`) agree within `fwd`, and the gradients of
    /// Σ output ⊙ probe with respect to every var within `bwd`.
    fn agree(vars: &[&Var], ours: Tensor, theirs: Tensor, fwd: f32, bwd: f32) {
        close(&ours, &theirs, fwd);
        let probe = Tensor::randn(0f32, 1.0, ours.dims(), ours.device()).unwrap();
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(ours), grads(theirs));
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d <= bwd, "gradient of var {i}: max |Δ| {d} > {bwd}");
        }
    }

    /// softmax from tensor ops, the reference for the fused ones.
    fn softmax_ops(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

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

    /// The fused linear layer equals candle's matmul + bias, values and gradients of input,
    /// weight and bias: on the matrix-vector path (1 and 3 rows, a length that is not a
    /// multiple of the vector width) and the matmul path (a 3-D input of 210 rows).
    #[test]
    fn fused_linear_matches_matmul_and_bias() {
        for x_shape in [vec![1, 517], vec![3, 517], vec![3, 70, 517]] {
            let (x, w, b) = (var(&x_shape, 1.0), var(&[300, 517], 1.0), var(&[300], 1.0));
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let theirs = xt.broadcast_matmul(&wt.t().unwrap()).unwrap();
            let theirs = theirs.broadcast_add(bt).unwrap();
            agree(
                &[&x, &w, &b],
                linear(xt, wt, bt).unwrap(),
                theirs,
                1e-4,
                1e-3,
            );
        }
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, &b).is_err());
        assert_eq!(crate::kernels::dot(&[1.0; 37], &[2.0; 37]), 74.0);
    }

    /// The fused next-token loss equals log-softmax + gather, values and gradients.
    #[test]
    fn fused_next_token_nll_matches_log_softmax_and_gather() {
        let dev = Device::Cpu;
        let x = var(&[2, 5, 37], 3.0);
        let xt = x.as_tensor();
        let ids: Vec<u32> = (0..10u32).map(|i| (i * 7) % 37).collect();
        let ids = Tensor::from_vec(ids, (2, 5), &dev).unwrap();
        let logp = crate::vae::model::log_softmax(&xt.narrow(1, 0, 4).unwrap(), 2).unwrap();
        let targets = ids.narrow(1, 1, 4).unwrap().unsqueeze(2).unwrap();
        let theirs = logp
            .contiguous()
            .unwrap()
            .gather(&targets.contiguous().unwrap(), 2);
        let theirs = theirs.unwrap().squeeze(2).unwrap().neg().unwrap();
        agree(&[&x], next_token_nll(xt, &ids).unwrap(), theirs, 1e-5, 1e-5);
        let bad = Tensor::from_vec(vec![40u32; 10], (2, 5), &dev).unwrap();
        assert!(next_token_nll(xt, &bad).is_err());
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -86_999..=87_999 {
            let x = i as f32 * 1e-3 + 1.3e-4;
            let (ours, libm) = (fast_exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-88.0), 0.0);
        assert!(fast_exp(1000.0).is_finite());
        assert!(fast_exp(f32::NAN).is_nan());
    }
}
