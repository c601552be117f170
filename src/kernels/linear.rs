//! Matrix products for few rows: dot products (f32 and f16 weights), the matrix-vector pass of
//! decoding, the few-row product, and the linear layer as one op with its backward pass.

use super::{contiguous_f32, fused_cpu};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

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
    if crate::kernels::isa::avx2() && std::is_x86_feature_detected!("fma") {
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
    if crate::kernels::isa::avx2()
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
    let mut out_t = crate::kernels::zeros(n * m);
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
        && crate::kernels::isa::avx2()
        && std::is_x86_feature_detected!("fma")
    {
        use rayon::prelude::*;
        const NR: usize = 6;
        let mut out_t = crate::kernels::zeros(n * m);
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
        let mut y = crate::kernels::zeros(m * n);
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
                    let mut dx = crate::kernels::zeros(m * k);
                    matmul((m, k, n), &mut dx, (g, n, 1), (wv, k, 1), false)?;
                    let mut dw = crate::kernels::zeros(n * k);
                    matmul((n, k, m), &mut dw, (g, 1, n), (xv, k, 1), false)?;
                    let mut db = crate::kernels::zeros(n);
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

/// `a · b` (or `a · bᵀ` with `bt`) over the last two axes, for each index of the leading ones:
/// attention's q·kᵀ and weights·v. The products of the batch run in parallel, each on one
/// thread (on the BLAS where one is set up, [`super::blas`]); candle's batched matmul runs
/// them one after another, each split across the cores, which at attention's sizes (320 × 64)
/// leaves the cores waiting. Backward: da = g·bᵀ, db = aᵀ·g (bt: db = gᵀ·a).
struct BatchedMatmul {
    bt: bool,
}

impl BatchedMatmul {
    /// (batch, m, n, k) of `a (.., m, k)` and `b (.., k, n)` (bt: `(.., n, k)`).
    fn dims(&self, a: &Shape, b: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (da, db) = (a.dims(), b.dims());
        let fit = da.len() >= 2 && da.len() == db.len() && da[..da.len() - 2] == db[..db.len() - 2];
        if !fit {
            candle_core::bail!("batched matmul: {a:?} and {b:?} do not fit together");
        }
        let r = da.len();
        let (m, k) = (da[r - 2], da[r - 1]);
        let (k2, n) = if self.bt {
            (db[r - 1], db[r - 2])
        } else {
            (db[r - 2], db[r - 1])
        };
        if k != k2 {
            candle_core::bail!("batched matmul: {a:?} and {b:?} do not fit together");
        }
        Ok((a.elem_count() / (m * k).max(1), m, n, k))
    }
}

/// `out[i] = lhs[i] · rhs[i]` for `batch` products of (m × k) · (k × n), each operand's matrix
/// `i` at `i × its size` with the strides given, in parallel over `i`.
fn products(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    out: &mut [f32],
    (a, ars, acs): (&[f32], usize, usize),
    (b, brs, bcs): (&[f32], usize, usize),
) -> Result<()> {
    use rayon::prelude::*;
    let (sa, sb) = (a.len() / batch.max(1), b.len() / batch.max(1));
    out.par_chunks_mut((m * n).max(1))
        .enumerate()
        .try_for_each(|(i, o)| {
            let (ai, bi) = (&a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb]);
            super::matmul_serial((m, n, k), o, (ai, ars, acs), (bi, brs, bcs), false)
        })
}

impl candle_core::CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, m, n, k) = self.dims(l1.shape(), l2.shape())?;
        let op = self.name();
        let (a, b) = (contiguous_f32(s1, l1, op)?, contiguous_f32(s2, l2, op)?);
        let mut out = crate::kernels::zeros(batch * m * n);
        let rhs = if self.bt { (b, 1, k) } else { (b, n, 1) };
        if m * n * k > 0 {
            products(batch, (m, n, k), &mut out, (a, k, 1), rhs)?;
        }
        let mut dims = l1.shape().dims().to_vec();
        let r = dims.len();
        dims[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::kernels::with_f32;
        let (batch, m, n, k) = self.dims(a.shape(), b.shape())?;
        let op = self.name();
        let (da, db) = with_f32(grad, op, |g| {
            with_f32(a, op, |av| {
                with_f32(b, op, |bv| {
                    let (mut da, mut db) = (
                        crate::kernels::zeros(batch * m * k),
                        crate::kernels::zeros(batch * n * k),
                    );
                    if m * n * k > 0 {
                        // da (m × k) = g (m × n) · bᵀ (n × k).
                        let bt = if self.bt { (bv, k, 1) } else { (bv, 1, n) };
                        products(batch, (m, k, n), &mut da, (g, n, 1), bt)?;
                        if self.bt {
                            // db (n × k) = gᵀ (n × m) · a (m × k).
                            products(batch, (n, k, m), &mut db, (g, 1, n), (av, k, 1))?;
                        } else {
                            // db (k × n) = aᵀ (k × m) · g (m × n).
                            products(batch, (k, n, m), &mut db, (av, 1, k), (g, n, 1))?;
                        }
                    }
                    Ok((da, db))
                })
            })
        })?;
        let dev = a.device();
        Ok((
            Some(Tensor::from_vec(da, a.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// `a · b` over the last two axes (`a · bᵀ` with `bt`), batched over the leading ones:
/// [`BatchedMatmul`] on the CPU in f32, candle's matmul elsewhere.
pub fn batched_matmul(a: &Tensor, b: &Tensor, bt: bool) -> Result<Tensor> {
    if fused_cpu(a) && fused_cpu(b) {
        return a
            .contiguous()?
            .apply_op2(&b.contiguous()?, BatchedMatmul { bt });
    }
    if bt {
        a.matmul(&b.t()?)
    } else {
        a.matmul(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    /// The batched product equals candle's matmul, values and gradients of both operands, with
    /// and without the right operand transposed, over 3-D and 4-D batches.
    #[test]
    fn batched_matmul_matches_candles() {
        for (a_shape, b_shape, bt) in [
            (vec![3, 7, 5], vec![3, 5, 9], false),
            (vec![3, 7, 5], vec![3, 9, 5], true),
            (vec![2, 3, 20, 16], vec![2, 3, 20, 16], true),
            (vec![2, 3, 20, 20], vec![2, 3, 20, 16], false),
        ] {
            let (a, b) = (var(&a_shape, 1.0), var(&b_shape, 1.0));
            let (at, bt_) = (a.as_tensor(), b.as_tensor());
            let theirs = if bt {
                at.matmul(&bt_.t().unwrap()).unwrap()
            } else {
                at.matmul(bt_).unwrap()
            };
            agree(
                &[&a, &b],
                batched_matmul(at, bt_, bt).unwrap(),
                theirs,
                1e-4,
                1e-3,
            );
        }
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((2, 5, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(batched_matmul(&a, &b, false).is_err());
        assert!(batched_matmul(&a, &b, true).is_ok());
    }

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
            // Outputs are sums of 517 products of N(0, 1) values (|y| up to ~100): two
            // summation orders (OpenBLAS's bands, candle's gemm) differ by ~1e-4 at the tail
            // of 63 000 outputs (1.14e-4 seen in CI), so 1e-3 absolute (~1e-5 relative).
            agree(
                &[&x, &w, &b],
                linear(xt, wt, bt).unwrap(),
                theirs,
                1e-3,
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
}
