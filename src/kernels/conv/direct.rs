//! Direct k×k convolutions of channel-major activations `(c, b, h, w)` on AVX2/FMA, for the
//! dVAE's wide, thin layers (16–64 channels over 64–128 px images at batch 8).
//!
//! There the im2col + matrix product of [`super::ConvCm`] streams a column matrix k² times
//! the input through memory, twice per pass, and the product itself has 16–64 rows: it ran at
//! 25–40 GFLOP/s here where a large product runs at ~190. These kernels read the input in bands
//! of whole rows, copied once into a zero-padded buffer that stays in the core's L2 cache (the
//! optional ReLU of the input applied on the way), and keep a 3-channel × 32-pixel tile of the
//! output in registers (6 × 64 in AVX-512's 32 registers, for widths that are a multiple of 16:
//! alternated dVAE steps of `small`, 1.69 → 1.63 s) while they walk the input channels and
//! kernel taps:
//!
//! - [`forward`]: `y = W ⊛ relu?(x) + b`, optionally multiplied by `mask > 0` as it is stored;
//! - the input gradient is [`forward`] of the output gradient with the weight transposed and
//!   flipped ([`flip_transpose`]), masked by the pre-ReLU input;
//! - [`weight_grad`]: `dW[o, i, tap] = Σ_p g[o, p] · relu?(x)[i, p + tap]`, `db[o] = Σ_p g[o, p]`,
//!   with a partial sum per fixed run of work units, added in order (reproducible on any number
//!   of threads, so training resumes bit for bit).
//!
//! Only x86-64 with AVX2 and FMA and widths that are a multiple of 8 take this path
//! ([`available`]); everything else keeps im2col.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Output channels per register tile.
const MR: usize = 3;
/// 8-float vectors (pixels / 8) per register tile of the forward pass; (input channel, tap)
/// pairs per tile of the weight gradient.
const NV: usize = 4;
// `tile_weight_grad` folds exactly four accumulators per channel.
const _: () = assert!(NV == 4);
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
    fn tap_offsets(&self, band_rows: usize) -> Vec<usize> {
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

/// Whether this CPU and geometry can take the direct path.
pub(crate) fn available(g: &Geom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        g.w.is_multiple_of(8)
            && g.w > 0
            && g.k == 2 * g.pad + 1
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
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
                *buf = vec![0f32; len];
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// The part of `buf` from its first cache line boundary on (up to 16 floats are skipped).
pub(super) fn cache_aligned(buf: &mut [f32]) -> &mut [f32] {
    let skip = buf.as_ptr().align_offset(64).min(16);
    &mut buf[skip..]
}

/// Runs of units whose weight-gradient partial sums are kept apart (see [`for_units`]): enough to
/// balance a few cores, few enough that the partial sums stay small.
const WEIGHT_GRAD_GROUPS: usize = 8;

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

/// The weight `(n_out, c, k, k)` regrouped as tiles of [`MR`] output channels: for tile `o`,
/// `c·k²` groups of `MR` values (zero for channels past `n_out`).
fn tile_weights(w: &[f32], n_out: usize, row: usize, mr: usize) -> Vec<f32> {
    let tiles = n_out.div_ceil(mr);
    let mut out = vec![0f32; tiles * row * mr];
    for o in 0..n_out {
        let (t, i) = (o / mr, o % mr);
        for (j, &v) in w[o * row..(o + 1) * row].iter().enumerate() {
            out[(t * row + j) * mr + i] = v;
        }
    }
    out
}

/// Output channels per register tile of the AVX-512 forward kernel ([`NV`] vectors of 16
/// pixels each).
const MR_WIDE: usize = 6;

/// Whether [`forward`] takes the AVX-512 kernel for this geometry.
fn wide(g: &Geom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        g.w.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// `(n_out, c, k, k)` → `(c, n_out, k, k)` with both spatial axes reversed: the weight whose
/// "same" convolution of the output gradient is the input gradient.
pub(crate) fn flip_transpose(w: &[f32], n_out: usize, c: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut out = vec![0f32; w.len()];
    for o in 0..n_out {
        for i in 0..c {
            for t in 0..kk {
                out[(i * n_out + o) * kk + (kk - 1 - t)] = w[(o * c + i) * kk + t];
            }
        }
    }
    out
}

/// `out (n_out, b, h, w) = W ⊛ relu?(x) + bias`, passed through `epilogue` as it is stored. `w`
/// is `(n_out, c, k, k)`. See the module docs.
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    relu: bool,
    w: &[f32],
    bias: Option<&[f32]>,
    n_out: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let row = g.c * g.k * g.k;
    let plane = g.b * g.h * g.w;
    assert!(available(g) && x.len() == g.c * plane && w.len() == n_out * row);
    assert!(bias.is_none_or(|b| b.len() == n_out));
    match epilogue {
        Epilogue::Mask(m) | Epilogue::Residual(m, _) => assert_eq!(m.len(), n_out * plane),
        Epilogue::Store => {}
    }
    let wide = wide(g);
    let (mr, lanes) = if wide { (MR_WIDE, 16) } else { (MR, 8) };
    let wt = tile_weights(w, n_out, row, mr);
    let len = n_out * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = Shared(out.spare_capacity_mut().as_mut_ptr().cast());
    let pw = g.padded_width();
    let r = g.band_rows();
    for_units(
        g.units(r),
        g.band_len(r),
        usize::MAX,
        || (),
        |_, (img, y0, rows), band| {
            g.fill_band(x, (img, y0, rows), relu, band);
            let offs = g.tap_offsets(rows);
            let vecs = rows * g.w / lanes;
            // Vector v of the band: padded-band and output offsets of its first pixel.
            let at = |v: usize| {
                let (r, x0) = (v / (g.w / lanes), v % (g.w / lanes) * lanes);
                (r * pw + x0, (img * g.h + y0 + r) * g.w + x0)
            };
            for t in 0..n_out.div_ceil(mr) {
                let mut init = [0f32; MR_WIDE];
                for (i, v) in init.iter_mut().enumerate().take(mr) {
                    *v = bias.and_then(|b| b.get(t * mr + i)).copied().unwrap_or(0.0);
                }
                let valid = (n_out - t * mr).min(mr);
                let first = t * mr * plane;
                let epi = TileEpilogue::at(epilogue, first);
                for v0 in (0..vecs).step_by(NV) {
                    // A short last tile repeats the band's last vector: written twice, same value.
                    let pos: [(usize, usize); NV] =
                        std::array::from_fn(|j| at((v0 + j).min(vecs - 1)));
                    // SAFETY: `available` checked AVX2/FMA; every band offset + tap offset + 8 is
                    // inside `band` (a tap reaches at most 2·pad rows and columns past the vector,
                    // the band has them), every output offset + 8 inside a plane of `out` and of
                    // the epilogue's slice (w is a multiple of 8), and units write disjoint pixels.
                    unsafe {
                        let out = (dst.at(first), plane, valid);
                        let wt = wt.as_ptr().add(t * row * mr);
                        if wide {
                            tile_forward_wide(band.as_ptr(), &pos, &offs, wt, init, out, epi);
                        } else {
                            let init: [f32; MR] = std::array::from_fn(|i| init[i]);
                            tile_forward(band.as_ptr(), &pos, &offs, wt, init, out, epi);
                        }
                    }
                }
            }
        },
    );
    // SAFETY: the units cover every (image, row) once and store every channel of every pixel
    // of their rows, so all `len` values are written.
    unsafe { out.set_len(len) };
    out
}

/// One register tile of [`forward`]: [`MR`] output channels × [`NV`] vectors of 8 pixels.
/// `pos[j]` = (offset in the band, offset in an output plane) of vector j; `offs` the (channel,
/// tap) offsets; `wt` their [`MR`] weights each; `out` = (first channel's plane, plane length,
/// channels to store).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_forward(
    band: *const f32,
    pos: &[(usize, usize); NV],
    offs: &[usize],
    wt: *const f32,
    init: [f32; MR],
    (out, plane, valid): (*mut f32, usize, usize),
    epilogue: TileEpilogue,
) {
    use std::arch::x86_64::*;
    let mut acc: [[__m256; NV]; MR] = std::array::from_fn(|i| [_mm256_set1_ps(init[i]); NV]);
    let base: [*const f32; NV] = std::array::from_fn(|j| band.add(pos[j].0));
    for (q, &o) in offs.iter().enumerate() {
        let wq = wt.add(q * MR);
        let ws: [__m256; MR] = std::array::from_fn(|i| _mm256_broadcast_ss(&*wq.add(i)));
        for j in 0..NV {
            let xv = _mm256_loadu_ps(base[j].add(o));
            for i in 0..MR {
                acc[i][j] = _mm256_fmadd_ps(ws[i], xv, acc[i][j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(valid) {
        for (j, &a) in row.iter().enumerate() {
            let at = i * plane + pos[j].1;
            _mm256_storeu_ps(out.add(at), epilogue.apply8(a, at));
        }
    }
}

/// [`tile_forward`] in AVX-512: [`MR_WIDE`] output channels × [`NV`] vectors of 16 pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_forward_wide(
    band: *const f32,
    pos: &[(usize, usize); NV],
    offs: &[usize],
    wt: *const f32,
    init: [f32; MR_WIDE],
    (out, plane, valid): (*mut f32, usize, usize),
    epilogue: TileEpilogue,
) {
    use std::arch::x86_64::*;
    let mut acc: [[__m512; NV]; MR_WIDE] = std::array::from_fn(|i| [_mm512_set1_ps(init[i]); NV]);
    let base: [*const f32; NV] = std::array::from_fn(|j| band.add(pos[j].0));
    for (q, &o) in offs.iter().enumerate() {
        let wq = wt.add(q * MR_WIDE);
        let ws: [__m512; MR_WIDE] = std::array::from_fn(|i| _mm512_set1_ps(*wq.add(i)));
        for j in 0..NV {
            let xv = _mm512_loadu_ps(base[j].add(o));
            for i in 0..MR_WIDE {
                acc[i][j] = _mm512_fmadd_ps(ws[i], xv, acc[i][j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(valid) {
        for (j, &a) in row.iter().enumerate() {
            let at = i * plane + pos[j].1;
            _mm512_storeu_ps(out.add(at), epilogue.apply16(a, at));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_forward_wide(
    _: *const f32,
    _: &[(usize, usize); NV],
    _: &[usize],
    _: *const f32,
    _: [f32; MR_WIDE],
    _: (*mut f32, usize, usize),
    _: TileEpilogue,
) {
    unreachable!("direct convolution is only dispatched on x86-64 (see `available`)")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_forward(
    _: *const f32,
    _: &[(usize, usize); NV],
    _: &[usize],
    _: *const f32,
    _: [f32; MR],
    _: (*mut f32, usize, usize),
    _: TileEpilogue,
) {
    unreachable!("direct convolution is only dispatched on x86-64 (see `available`)")
}

/// The weight and bias gradients of `y = W ⊛ relu?(x) + b` from the output gradient `gy
/// (n_out, b, h, w)`: `(dW (n_out, c, k, k), db (n_out))`, by the direct kernel, whatever the
/// geometry.
pub(crate) fn weight_grad(
    g: &Geom,
    x: &[f32],
    relu: bool,
    gy: &[f32],
    n_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let row = g.c * g.k * g.k;
    let plane = g.b * g.h * g.w;
    assert!(available(g) && x.len() == g.c * plane && gy.len() == n_out * plane);
    let pw = g.padded_width();
    let r = g.band_rows();
    let parts = for_units(
        g.units(r),
        g.band_len(r),
        WEIGHT_GRAD_GROUPS,
        || (vec![0f32; n_out * row], vec![0f32; n_out]),
        |(dw, db), (img, y0, rows), band| {
            g.fill_band(x, (img, y0, rows), relu, band);
            let offs = g.tap_offsets(rows);
            let start = (img * g.h + y0) * g.w;
            for t in 0..n_out.div_ceil(MR) {
                // Rows past n_out repeat the last channel; their sums are dropped.
                let rows_g: [usize; MR] =
                    std::array::from_fn(|i| (t * MR + i).min(n_out - 1) * plane + start);
                let valid = (n_out - t * MR).min(MR);
                // The bias gradient first: it brings this tile's gradient rows into cache for
                // the passes below, instead of a pass of its own over the whole gradient.
                for (i, &r) in rows_g.iter().enumerate().take(valid) {
                    db[t * MR + i] += crate::kernels::sum(&gy[r..r + rows * g.w]);
                }
                for q0 in (0..row).step_by(NV) {
                    let qs: [usize; NV] = std::array::from_fn(|j| offs[(q0 + j).min(row - 1)]);
                    // SAFETY: AVX2/FMA checked by `available`; the band and gradient offsets stay
                    // inside their slices as in `forward` (the gradient rows of this unit are
                    // `rows · w` long from `start`).
                    let sums = unsafe {
                        tile_weight_grad(band.as_ptr(), pw, &qs, gy.as_ptr(), &rows_g, (rows, g.w))
                    };
                    for (i, s) in sums.iter().enumerate().take(valid) {
                        for (j, &v) in s.iter().enumerate().take(row - q0) {
                            dw[(t * MR + i) * row + q0 + j] += v;
                        }
                    }
                }
            }
        },
    );
    let (mut dw, mut db) = (vec![0f32; n_out * row], vec![0f32; n_out]);
    for (pdw, pdb) in parts {
        dw.iter_mut().zip(&pdw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pdb).for_each(|(a, b)| *a += b);
    }
    (dw, db)
}

/// One tile of [`weight_grad`]: Σ over a band's pixels of gradient rows `gy[rows_g[i] ..]`
/// times band values at `qs[j]` past each pixel, for [`MR`] output channels × [`NV`] (channel,
/// tap) pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_weight_grad(
    band: *const f32,
    pw: usize,
    qs: &[usize; NV],
    gy: *const f32,
    rows_g: &[usize; MR],
    (rows, w): (usize, usize),
) -> [[f32; NV]; MR] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for r in 0..rows {
        for x0 in (0..w).step_by(8) {
            let gv: [__m256; MR] =
                std::array::from_fn(|i| _mm256_loadu_ps(gy.add(rows_g[i] + r * w + x0)));
            let b = band.add(r * pw + x0);
            for j in 0..NV {
                let xv = _mm256_loadu_ps(b.add(qs[j]));
                for i in 0..MR {
                    acc[i][j] = _mm256_fmadd_ps(gv[i], xv, acc[i][j]);
                }
            }
        }
    }
    // Each channel's NV sums at once: pairwise horizontal adds fold the four accumulators'
    // lanes into one 4-lane vector (NV = 4), instead of NV stores and 7·NV scalar adds.
    let mut out = [[0f32; NV]; MR];
    for (o, a) in out.iter_mut().zip(&acc) {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(o.as_mut_ptr(), s);
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_weight_grad(
    _: *const f32,
    _: usize,
    _: &[usize; NV],
    _: *const f32,
    _: &[usize; MR],
    _: (usize, usize),
) -> [[f32; NV]; MR] {
    unreachable!("direct convolution is only dispatched on x86-64 (see `available`)")
}
