//! What the direct and Winograd kernels share: the geometry of a channel-major convolution,
//! work units of output rows over the cores (with reproducible partial sums), per-thread scratch
//! buffers and the epilogue applied as outputs are stored.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The padded input band of one work unit is sized to about this many bytes (L2 holds 0.5–2 MB).
const BAND_BYTES: usize = 384 << 10;

/// Geometry of one convolution: input `(c, b, h, w)`, `k×k` kernel, "same" padding `pad`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub c: usize,
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub pad: usize,
}

impl Geom {
    pub(super) fn padded_width(&self) -> usize {
        self.w + 2 * self.pad
    }

    /// Output rows per work unit: the padded band of all input channels fits [`BAND_BYTES`].
    pub(super) fn band_rows(&self) -> usize {
        let row_bytes = 4 * self.c * self.padded_width();
        (BAND_BYTES / row_bytes.max(1))
            .saturating_sub(2 * self.pad)
            .clamp(1, self.h.max(1))
    }

    /// Work units: (image, first row, rows), `r` rows each (the last of an image fewer).
    pub(super) fn units(&self, r: usize) -> Vec<(usize, usize, usize)> {
        (0..self.b)
            .flat_map(|img| {
                (0..self.h)
                    .step_by(r)
                    .map(move |y0| (img, y0, r.min(self.h - y0)))
            })
            .collect()
    }

    /// Floats in the padded band of a unit of `band_rows` rows.
    pub(super) fn band_len(&self, band_rows: usize) -> usize {
        self.c * (band_rows + 2 * self.pad) * self.padded_width()
    }

    /// Offset of each (input channel, tap) pair in a padded band, in the order of a weight row
    /// `(c, k, k)`.
    pub(super) fn tap_offsets(&self, band_rows: usize) -> Vec<usize> {
        let (pw, k) = (self.padded_width(), self.k);
        let plane = (band_rows + 2 * self.pad) * pw;
        (0..self.c)
            .flat_map(|ci| (0..k * k).map(move |t| ci * plane + (t / k) * pw + t % k))
            .collect()
    }

    /// Copy rows `y0 − pad .. y0 + rows + pad` of image `img`, every channel, into `band`
    /// (`c × (rows + 2·pad) × (w + 2·pad)`), zero outside the image, ReLU applied if asked.
    pub(super) fn fill_band(
        &self,
        x: &[f32],
        (img, y0, rows): (usize, usize, usize),
        relu: bool,
        band: &mut [f32],
    ) {
        let (pw, p, w, h) = (self.padded_width(), self.pad, self.w, self.h);
        let ph = rows + 2 * p;
        for ci in 0..self.c {
            for ry in 0..ph {
                let dst = &mut band[(ci * ph + ry) * pw..(ci * ph + ry + 1) * pw];
                let sy = (y0 + ry).wrapping_sub(p);
                if sy >= h {
                    dst.fill(0.0);
                    continue;
                }
                let src = &x[((ci * self.b + img) * h + sy) * w..][..w];
                dst[..p].fill(0.0);
                dst[p + w..].fill(0.0);
                let mid = &mut dst[p..p + w];
                if relu {
                    mid.iter_mut().zip(src).for_each(|(d, &s)| *d = s.max(0.0));
                } else {
                    mid.copy_from_slice(src);
                }
            }
        }
    }
}

/// A raw pointer that worker threads may share: each writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(super) struct Shared(pub(super) *mut f32);
// SAFETY: only used where parallel work units write disjoint elements (the outputs of
// `forward`, the transformed tiles' columns of `winograd::weight_grad`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so that closures capture the `Shared` and not its raw field.
    pub(super) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Run `f(state, unit, buffer)` over `units`, spread over the cores (one task per
/// thread of rayon's pool, already running; spawning two threads per pass, ~200 per dVAE step,
/// measured 1.71–2.2 s a step against 1.68–1.84 s this way, alternated runs). The units are cut
/// into at most `groups` runs of consecutive units, each with its own state (made by `init`) and
/// taken whole by one worker, in unit order; the states come back in group order. So sums kept in
/// the states come out the same whichever worker took which run and however many cores there
/// are: training is reproducible (and resumes bit for bit). Each worker has one `buffer_len`
/// buffer for the padded bands (and whatever scratch space `f` needs).
pub(super) fn for_units<S: Send>(
    units: Vec<(usize, usize, usize)>,
    buffer_len: usize,
    groups: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, (usize, usize, usize), &mut [f32]) + Sync,
) -> Vec<S> {
    let groups = groups.clamp(1, units.len().max(1));
    let run = |gi: usize| &units[gi * units.len() / groups..(gi + 1) * units.len() / groups];
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        with_scratch(buffer_len, |band| loop {
            let gi = next.fetch_add(1, Ordering::Relaxed);
            if gi >= groups {
                break;
            }
            let mut state = init();
            for &u in run(gi) {
                f(&mut state, u, band);
            }
            done.push((gi, state));
        });
        done
    };
    let threads = crate::util::threads().min(groups);
    let mut done = if threads <= 1 {
        work()
    } else {
        use rayon::prelude::*;
        (0..threads)
            .into_par_iter()
            .flat_map_iter(|_| work())
            .collect()
    };
    done.sort_by_key(|&(gi, _)| gi);
    done.into_iter().map(|(_, s)| s).collect()
}

thread_local! {
    /// Each thread's buffer for [`for_units`], kept between calls: a training step makes ~200
    /// convolution calls, each of which would otherwise allocate and zero 0.4–7 MB per thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on this thread's scratch buffer of at least `len` floats (contents left by earlier
/// calls), or on a fresh one if the thread's is in use further up its stack.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&SCRATCH, len, f)
}

/// [`with_scratch`] on the thread-local buffer `key`.
pub(super) fn with_buffer<R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                *buf = crate::kernels::zeros(len);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut crate::kernels::zeros(len)),
    })
}

/// The part of `buf` from its first cache line boundary on (up to 16 floats are skipped).
pub(super) fn cache_aligned(buf: &mut [f32]) -> &mut [f32] {
    let skip = buf.as_ptr().align_offset(64).min(16);
    &mut buf[skip..]
}

/// Runs of units whose weight-gradient partial sums are kept apart (see [`for_units`]): enough to
/// balance a few cores, few enough that the partial sums stay small.
pub(super) const WEIGHT_GRAD_GROUPS: usize = 8;

/// What [`forward`] does with each output value `v = W ⊛ x + b` as it stores it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Epilogue<'a> {
    /// `v`.
    Store,
    /// `v · [mask > 0]`, `mask` the shape of the output (a ReLU's gradient).
    Mask(&'a [f32]),
    /// `id + gain · v`, `id` the shape of the output (a residual connection).
    Residual(&'a [f32], f32),
}

/// [`Epilogue`] as the register tile sees it: the slice's first element for the tile's first
/// channel.
#[derive(Clone, Copy)]
pub(super) enum TileEpilogue {
    Store,
    Mask(*const f32),
    Residual(*const f32, f32),
}

impl TileEpilogue {
    /// The tile's epilogue for output channels from `first` (the offset of the tile's first
    /// channel's plane).
    pub(super) fn at(epilogue: Epilogue, first: usize) -> Self {
        match epilogue {
            Epilogue::Store => Self::Store,
            Epilogue::Mask(m) => Self::Mask(m[first..].as_ptr()),
            Epilogue::Residual(id, gain) => Self::Residual(id[first..].as_ptr(), gain),
        }
    }

    /// 8 output values `v` at offset `at` from the tile's first channel, through the epilogue.
    ///
    /// # Safety
    /// AVX2 and FMA; `at + 8` is inside the epilogue's slice.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn apply8(
        self,
        v: std::arch::x86_64::__m256,
        at: usize,
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        match self {
            Self::Store => v,
            Self::Mask(m) => {
                let keep =
                    _mm256_cmp_ps(_mm256_loadu_ps(m.add(at)), _mm256_setzero_ps(), _CMP_GT_OQ);
                _mm256_and_ps(v, keep)
            }
            Self::Residual(id, gain) => {
                _mm256_fmadd_ps(_mm256_set1_ps(gain), v, _mm256_loadu_ps(id.add(at)))
            }
        }
    }

    /// 16 output values `v` at offset `at` from the tile's first channel, through the epilogue.
    ///
    /// # Safety
    /// AVX-512F; `at + 16` is inside the epilogue's slice.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn apply16(
        self,
        v: std::arch::x86_64::__m512,
        at: usize,
    ) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        match self {
            Self::Store => v,
            Self::Mask(m) => {
                let keep =
                    _mm512_cmp_ps_mask(_mm512_loadu_ps(m.add(at)), _mm512_setzero_ps(), _CMP_GT_OQ);
                _mm512_maskz_mov_ps(keep, v)
            }
            Self::Residual(id, gain) => {
                _mm512_fmadd_ps(_mm512_set1_ps(gain), v, _mm512_loadu_ps(id.add(at)))
            }
        }
    }
}
