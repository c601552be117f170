//! Raw f32 CPU kernels shared by the custom ops of both stages: slices out of candle storage and
//! a matrix product through `gemm` (candle's own matmul crate) that writes into a caller's buffer.

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

/// `dst (m × n, row-major) = lhs (m × k) · rhs (k × n)` (`+=` with `accumulate`), each operand
/// given as (values, row stride, column stride), on the cores candle uses.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) -> Result<()> {
    let last = |rows: usize, cols: usize, (v, rs, cs): (&[f32], usize, usize)| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < v.len()
    };
    if dst.len() != m * n || !last(m, k, lhs) || !last(k, n, rhs) {
        candle_core::bail!("matmul: operands too short for ({m} × {k}) · ({k} × {n})");
    }
    let threads = crate::util::threads();
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
