//! A global allocator that keeps large freed blocks for the next allocation of the same size.
//!
//! A training step allocates and frees the same large tensors every step (activations, im2col
//! columns, gradients: tens to hundreds of MB each). glibc serves blocks over its mmap threshold
//! (at most 32 MB) with a fresh `mmap` and returns them with `munmap`, so every step faults
//! every page of them in again, zeroed by the kernel: perf showed ~45% of a dVAE training step
//! in page faults and `munmap`. [`ReuseLarge`] wraps the system allocator and parks freed blocks
//! of at least [`MIN_BLOCK`] bytes (sizes rounded up to [`GRANULE`]) in a table, handing one back
//! when the same rounded size is asked for again. What it holds is bounded by the program's own
//! high-water mark: parked + in-use large bytes stay within about 1.5× the most in use at once
//! since parking was turned on (the oldest parked blocks go back to the system first; blocks
//! allocated before are not told apart, hence "about"). Smaller blocks go straight to the
//! system. Parking is off until [`set_reuse`] or a [`ReuseGuard`] turns it on.
//!
//! The `dalle` binary installs it (`#[global_allocator]` in `main.rs`); a program embedding the
//! library can do the same:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: dalle::kernels::alloc::ReuseLarge = dalle::kernels::alloc::ReuseLarge;
//! let _reuse = dalle::kernels::alloc::ReuseGuard::new(); // for the training loop's lifetime
//! let v = vec![0f32; 1 << 20];
//! assert!(v.iter().all(|&x| x == 0.0));
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

static ENABLED: AtomicBool = AtomicBool::new(false);
static ALLOWED: AtomicBool = AtomicBool::new(true);

/// Turn parking on or off (off at start). Training turns it on for its steps (`dalle train`,
/// `dalle train-vae`, the training phase of `dalle bench`); off, every parked block goes back
/// to the system, so inference keeps the system allocator's footprint (with parking on through
/// a whole `dalle bench --grid 32` run, candle's peak RSS was 1.5 GB instead of 0.6 GB: blocks
/// of the export and the no-cache recompute stayed parked).
pub fn set_reuse(on: bool) {
    let on = on && ALLOWED.load(Ordering::Relaxed);
    ENABLED.store(on, Ordering::Relaxed);
    if !on {
        let mut evicted = Evicted::new();
        {
            let mut p = parked();
            while p.evict_oldest(&mut evicted) {}
            // Blocks still in use were counted while parking was on; they go straight to the
            // system when freed (see `park`).
            p.live = 0;
            p.peak = 0;
        }
        // SAFETY: every parked block came from `System` with its recorded layout.
        unsafe { evicted.release() };
    }
}

/// Never park (for measuring what parking saves): `dalle` calls this when `DALLE_SYSTEM_ALLOC`
/// is set.
pub fn forbid_reuse() {
    ALLOWED.store(false, Ordering::Relaxed);
    set_reuse(false);
}

/// Parking on for the lifetime of the guard (see [`set_reuse`]).
pub struct ReuseGuard(());

impl ReuseGuard {
    pub fn new() -> Self {
        set_reuse(true);
        ReuseGuard(())
    }
}

impl Default for ReuseGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReuseGuard {
    fn drop(&mut self) {
        set_reuse(false);
    }
}

/// Blocks smaller than this go to the system allocator untouched.
pub const MIN_BLOCK: usize = 1 << 20;
/// Large sizes are rounded up to a multiple of this, so near-equal sizes share blocks.
pub const GRANULE: usize = 64 << 10;
const SLOTS: usize = 1024;

#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    size: usize,
    align: usize,
    /// When it was parked: the smallest is evicted first.
    stamp: u64,
}

const EMPTY: Slot = Slot {
    ptr: 0,
    size: 0,
    align: 0,
    stamp: 0,
};

struct Parked {
    slots: [Slot; SLOTS],
    /// Bytes parked in `slots`.
    parked: usize,
    /// Bytes of large blocks in use, and their high-water mark: parked + live never exceeds it.
    live: usize,
    peak: usize,
    clock: u64,
}

static PARKED: Mutex<Parked> = Mutex::new(Parked {
    slots: [EMPTY; SLOTS],
    parked: 0,
    live: 0,
    peak: 0,
    clock: 0,
});

fn parked() -> MutexGuard<'static, Parked> {
    // The critical sections below cannot panic; a poisoned lock still holds a valid table.
    PARKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Blocks taken out of the table, to be returned to the system once the lock is released.
struct Evicted {
    blocks: [Slot; SLOTS],
    n: usize,
}

impl Parked {
    /// Move the oldest parked block to `out`; false when none is parked.
    fn evict_oldest(&mut self, out: &mut Evicted) -> bool {
        let Some(oldest) = (0..SLOTS)
            .filter(|&i| self.slots[i].ptr != 0)
            .min_by_key(|&i| self.slots[i].stamp)
        else {
            return false;
        };
        out.blocks[out.n] = self.slots[oldest];
        out.n += 1;
        self.parked -= self.slots[oldest].size;
        self.slots[oldest] = EMPTY;
        true
    }
}

impl Evicted {
    fn new() -> Self {
        Evicted {
            blocks: [EMPTY; SLOTS],
            n: 0,
        }
    }

    /// # Safety
    /// Each block was allocated by `System` with its recorded size and alignment.
    unsafe fn release(self) {
        for s in &self.blocks[..self.n] {
            System.dealloc(
                s.ptr as *mut u8,
                Layout::from_size_align_unchecked(s.size, s.align),
            );
        }
    }
}

/// The system allocator, reusing large freed blocks (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReuseLarge;

/// The layout a large request is served with, or `None` for a small one.
fn rounded(layout: Layout) -> Option<Layout> {
    if layout.size() < MIN_BLOCK {
        return None;
    }
    let size = layout.size().checked_next_multiple_of(GRANULE)?;
    Layout::from_size_align(size, layout.align()).ok()
}

impl ReuseLarge {
    /// A parked block of exactly `layout`, else a new one from `alloc` (the system's): the
    /// oldest parked blocks go back first if this one would raise parked + live past the peak.
    unsafe fn take(
        layout: Layout,
        alloc: unsafe fn(&System, Layout) -> *mut u8,
    ) -> (*mut u8, bool) {
        if !ENABLED.load(Ordering::Relaxed) {
            return (alloc(&System, layout), false);
        }
        let mut evicted = Evicted::new();
        {
            let mut p = parked();
            p.live += layout.size();
            if let Some(slot) = p
                .slots
                .iter_mut()
                .find(|s| s.ptr != 0 && s.size == layout.size() && s.align == layout.align())
            {
                let ptr = slot.ptr as *mut u8;
                *slot = EMPTY;
                p.parked -= layout.size();
                return (ptr, true);
            }
            p.peak = p.peak.max(p.live);
            // Some slack: backward passes ask for sizes in another order than forward ones, and
            // a strict bound evicted blocks that the same step wanted again.
            while p.parked + p.live > p.peak + p.peak / 2 && p.evict_oldest(&mut evicted) {}
        }
        evicted.release();
        let ptr = alloc(&System, layout);
        if ptr.is_null() {
            parked().live -= layout.size();
        }
        (ptr, false)
    }

    /// Park `ptr` (allocated with `layout`); the oldest block goes back if the table is full.
    unsafe fn park(ptr: *mut u8, layout: Layout) {
        let mut evicted = Evicted::new();
        {
            let mut p = parked();
            if !ENABLED.load(Ordering::Relaxed) || p.live < layout.size() {
                // Not counted when it was allocated (parking was off then).
                drop(p);
                return System.dealloc(ptr, layout);
            }
            p.live -= layout.size();
            if !p.slots.iter().any(|s| s.ptr == 0) {
                p.evict_oldest(&mut evicted);
            }
            p.clock += 1;
            let stamp = p.clock;
            let slot = p
                .slots
                .iter_mut()
                .find(|s| s.ptr == 0)
                .expect("a slot is free or was freed above");
            *slot = Slot {
                ptr: ptr as usize,
                size: layout.size(),
                align: layout.align(),
                stamp,
            };
            p.parked += layout.size();
        }
        evicted.release();
    }
}

unsafe impl GlobalAlloc for ReuseLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match rounded(layout) {
            None => System.alloc(layout),
            Some(big) => Self::take(big, System::alloc).0,
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match rounded(layout) {
            None => System.alloc_zeroed(layout),
            Some(big) => {
                // Fresh pages from the system are zeroed already; a parked block is not.
                let (ptr, reused) = Self::take(big, System::alloc_zeroed);
                if reused {
                    ptr.write_bytes(0, big.size());
                }
                ptr
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match rounded(layout) {
            None => System.dealloc(ptr, layout),
            Some(big) => Self::park(ptr, big),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (rounded(layout), rounded(new_layout)) {
            (None, None) => System.realloc(ptr, layout, new_size),
            // Still the same rounded block: nothing moves.
            (Some(old), Some(new)) if old.size() == new.size() => ptr,
            _ => {
                let new_ptr = self.alloc(new_layout);
                if !new_ptr.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new_ptr
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_large_block_is_reused_zeroed_and_small_ones_pass_through() {
        let a = ReuseLarge;
        let big = Layout::from_size_align(3 * MIN_BLOCK + 5, 64).unwrap();
        // Off (the default): a freed block is not kept.
        unsafe {
            let p = a.alloc(big);
            a.dealloc(p, big);
        }
        assert_eq!(parked().parked, 0);
        set_reuse(true);
        unsafe {
            let p = a.alloc(big);
            assert!(!p.is_null());
            p.write_bytes(7, big.size());
            a.dealloc(p, big);
            // Same rounded size (a few bytes more): the parked block comes back, zeroed.
            let again = Layout::from_size_align(3 * MIN_BLOCK + 9, 64).unwrap();
            let q = a.alloc_zeroed(again);
            assert_eq!(p, q, "the parked block is handed out again");
            assert!(std::slice::from_raw_parts(q, again.size())
                .iter()
                .all(|&b| b == 0));
            // Growing within the granule keeps the block; past it moves and keeps the bytes.
            q.write_bytes(3, again.size());
            let r = a.realloc(q, again, again.size() + 16);
            assert_eq!(r, q);
            let grown = Layout::from_size_align(again.size() + 16, 64).unwrap();
            let s = a.realloc(r, grown, 5 * MIN_BLOCK);
            assert!(std::slice::from_raw_parts(s, again.size())
                .iter()
                .all(|&b| b == 3));
            a.dealloc(s, Layout::from_size_align(5 * MIN_BLOCK, 64).unwrap());
            let small = Layout::from_size_align(100, 8).unwrap();
            let t = a.alloc(small);
            assert!(!t.is_null());
            a.dealloc(t, small);
        }
        {
            let p = parked();
            assert!(p.parked > 0 && p.parked + p.live <= p.peak + p.peak / 2);
        }
        // Turning it off hands every parked block back.
        set_reuse(false);
        assert_eq!(parked().parked, 0);
    }
}
