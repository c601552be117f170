//! Every CPU kernel of both stages, behind the small API the model files call. The model files
//! (`vae::model`, `transformer::model`) say what is computed; these modules say how, on a CPU,
//! fast: each fused op runs where the tensor is f32 on the CPU and falls back to candle's tensor
//! ops elsewhere, and each is tested against that tensor-op version (values and gradients).
//!
//! - [`conv`]: the dVAE's convolutions on channel-major activations (im2col + gemm; direct and
//!   Winograd AVX2/AVX-512 kernels), the residual sum fused in;
//! - [`pool`]: 2× max pooling, nearest 2× upsampling and its backward;
//! - [`softmax`]: softmax over the last axis (plain, scaled + masked) and over any axis
//!   (log-softmax and Σ q ln q of the codebook logits);
//! - [`activation`]: GELU and the libm-free `fast_exp`;
//! - [`norm`]: layer norm's normalisation, scale and shift;
//! - [`loss`]: the next-token loss;
//! - [`linear`]: dot products, matrix-vector and few-row products, the linear layer;
//! - [`team`]: the spinning thread team of a decoding step;
//! - [`pages`]: buffers in transparent huge pages;
//! - this module: slices out of candle storage, a matrix product into a caller's buffer, sums and
//!   row-parallel loops shared by the others.

pub mod activation;
pub mod blas;
pub mod conv;
pub mod isa;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pages;
pub mod pool;
pub mod softmax;
pub mod team;
#[cfg(test)]
pub(crate) mod testing;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{op}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// A contiguous f32 CPU tensor's values, copied out only if it is not contiguous already.
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(contiguous_f32(cpu, layout, op)?),
        _ => candle_core::bail!("{op}: CPU tensors only"),
    }
}

/// `n` zeros, written by all the cores from `PAR_ZEROS` values on. A fresh buffer of the
/// allocator's is zeroed by one thread (a memset, or the kernel's page faults), and the other
/// cores wait for it: in a training step of `small` (batch 8) those fills were ~6% of the time.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    const PAR_ZEROS: usize = 1 << 16;
    let threads = crate::util::threads();
    if n < PAR_ZEROS || threads == 1 {
        return vec![0f32; n];
    }
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(n.div_ceil(threads))
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first n values were all written just above.
    unsafe { v.set_len(n) };
    v
}

/// `dst (m × n, row-major) = lhs (m × k) · rhs (k × n)` (`+=` with `accumulate`), each operand
/// given as (values, row stride, column stride), on the cores candle uses.
pub(crate) fn matmul(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) -> Result<()> {
    matmul_on(crate::util::threads(), true, mnk, dst, lhs, rhs, accumulate)
}

/// [`matmul`] on the calling thread alone: for products that are themselves run in parallel.
pub(crate) fn matmul_serial(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) -> Result<()> {
    matmul_on(1, true, mnk, dst, lhs, rhs, accumulate)
}

/// [`matmul`] on the `gemm` crate (candle's kernel) whatever BLAS is set up: the reference the
/// BLAS is tested against.
#[cfg(test)]
pub(crate) fn matmul_gemm_crate(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) -> Result<()> {
    matmul_on(
        crate::util::threads(),
        false,
        mnk,
        dst,
        lhs,
        rhs,
        accumulate,
    )
}

/// Whether `dst` holds m × n values and every element the strides of `lhs (m × k)` and
/// `rhs (k × n)` reach lies inside its slice: what a product through raw pointers needs.
pub(crate) fn product_fits(
    (m, n, k): (usize, usize, usize),
    dst: &[f32],
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) -> bool {
    let inside = |rows: usize, cols: usize, (v, rs, cs): (&[f32], usize, usize)| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < v.len()
    };
    dst.len() == m * n && inside(m, k, lhs) && inside(k, n, rhs)
}

fn matmul_on(
    threads: usize,
    use_blas: bool,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) -> Result<()> {
    if !product_fits((m, n, k), dst, lhs, rhs) {
        candle_core::bail!("matmul: operands too short for ({m} × {k}) · ({k} × {n})");
    }
    if let Some(blas) = blas::blas()?.filter(|_| use_blas) {
        if blas
            .gemm(threads, (m, n, k), dst, lhs, rhs, accumulate)
            .is_some()
        {
            return Ok(());
        }
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the strides reach is inside its slice (checked above); dst does not
    // alias the operands (a `&mut` borrow), and is read only with `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Lanes of the reductions below: each lane sums (or takes the maximum of) every 16th value, so
/// the order of the operations is fixed and the loop vectorises without fast-math; a plain
/// `iter().sum()` is one serial chain of adds (one per ~4 cycles).
const LANES: usize = 16;

/// Σ x.
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(s, &v)| *s += v);
    }
    acc.iter().sum::<f32>() + tail
}

/// max x (−∞ for an empty slice).
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(m, &v)| *m = m.max(v));
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Σ aᵢbᵢ over the shorter length.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Inputs smaller than this run on the calling thread.
pub(crate) const PARALLEL_MIN: usize = 1 << 16;

/// `f` over `rows` chunks of `width` values of `x` into `y`, split across the cores.
pub(crate) fn par_rows(
    x: &[f32],
    y: &mut [f32],
    width: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    par_rows2(x, x, y, width, |x, _, y| f(x, y));
}

/// As [`par_rows`] with a second input read row by row alongside the first.
pub(crate) fn par_rows2(
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
pub(crate) fn row_width(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// The values of two same-shaped contiguous f32 inputs (an output and its gradient, say) and
/// their row width.
pub(crate) fn row_pair<'a>(
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

pub(crate) fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Split `dst` into `chunk`-long pieces and run `f(index, piece)` on them across the cores.
pub(crate) fn par_chunks(dst: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
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

#[cfg(test)]
mod tests {
    /// The lane reductions equal the serial ones (to f32 rounding) on every length around the
    /// lane count, including empty.
    #[test]
    fn lane_reductions_match_serial_ones() {
        for n in [0, 1, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
            assert_eq!(super::sum(&a), a.iter().sum::<f32>(), "n={n}");
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&a), m, "n={n}");
            let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(super::dot(&a, &b), d, "n={n}");
        }
    }
}
