//! Buffers in transparent huge pages: the weights and KV cache a decoding step streams through.

/// Bytes of a transparent huge page on x86-64 and aarch64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// A buffer with room for `len` values after `skip` leading default values (zeros), where
/// `skip` (< 2 MiB of them) puts the values' start on a huge-page boundary and the kernel is
/// asked (Linux `madvise(MADV_HUGEPAGE)`, which needs no privileges where transparent huge
/// pages are in `madvise` mode) to back them with 2 MiB pages. A pass over 170 MB of weights in 4 KiB pages
/// ends each hardware prefetch stream at every page and walks the page table every 4 KiB: a
/// decoding step's weight pass measured 25–30 GB/s in 4 KiB pages, 33–55 GB/s in huge pages.
/// Elsewhere the advice is skipped and the buffer is an ordinary one.
pub fn huge_page_buffer<T: Copy + Default>(len: usize) -> (Vec<T>, usize) {
    let size = std::mem::size_of::<T>().max(1);
    let spare = HUGE_PAGE / size;
    let mut v: Vec<T> = Vec::with_capacity(len + spare);
    let addr = v.as_ptr() as usize;
    let start = addr.next_multiple_of(HUGE_PAGE);
    let skip = (start - addr) / size;
    #[cfg(target_os = "linux")]
    {
        let end = (addr + (len + skip) * size).next_multiple_of(HUGE_PAGE);
        let capacity_end = addr + v.capacity() * size;
        // Only whole pages inside the allocation: the last huge page may reach past its end.
        let end = if end > capacity_end {
            end - HUGE_PAGE
        } else {
            end
        };
        if end > start {
            // The allocator may hand out memory it got (and faulted in, as 4 KiB pages) before;
            // the advice only shapes pages faulted from now on, so the old ones are dropped.
            // SAFETY: [start, end) lies inside `v`'s allocation, whose contents are not yet
            // initialised: dropping its pages (they read as zeros next) loses nothing.
            unsafe {
                let p = start as *mut libc::c_void;
                libc::madvise(p, end - start, libc::MADV_HUGEPAGE);
                libc::madvise(p, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    v.resize(skip, T::default());
    (v, skip)
}

/// Zeros of `shape` in `like`'s dtype and device; f32 on the CPU in huge pages
/// ([`huge_page_buffer`]): a decoding step reads the allowed keys and values of
/// every row and head, scattered over the whole cache (252 MB at batch 16 for `small`), and in
/// 4 KiB pages nearly every read of a key walks the page table.
pub fn zeroed_like(
    shape: (usize, usize, usize, usize),
    like: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    if !(like.device().is_cpu() && like.dtype() == candle_core::DType::F32) {
        return candle_core::Tensor::zeros(shape, like.dtype(), like.device());
    }
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let (mut v, skip) = huge_page_buffer::<f32>(n);
    v.resize(skip + n, 0.0);
    candle_core::Tensor::from_vec(v, skip + n, like.device())?
        .narrow(0, skip, n)?
        .reshape(shape)
}
