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

use super::tiles::{for_units, Epilogue, Geom, Shared, TileEpilogue, WEIGHT_GRAD_GROUPS};

/// Output channels per register tile.
const MR: usize = 3;
/// 8-float vectors (pixels / 8) per register tile of the forward pass; (input channel, tap)
/// pairs per tile of the weight gradient.
const NV: usize = 4;
// `tile_weight_grad` folds exactly four accumulators per channel.
const _: () = assert!(NV == 4);
/// Whether this CPU and geometry can take the direct path.
pub(crate) fn available(g: &Geom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        g.w.is_multiple_of(8)
            && g.w > 0
            && g.k == 2 * g.pad + 1
            && crate::kernels::isa::avx2()
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// The weight `(n_out, c, k, k)` regrouped as tiles of [`MR`] output channels: for tile `o`,
/// `c·k²` groups of `MR` values (zero for channels past `n_out`).
fn tile_weights(w: &[f32], n_out: usize, row: usize, mr: usize) -> Vec<f32> {
    let tiles = n_out.div_ceil(mr);
    let mut out = crate::kernels::zeros(tiles * row * mr);
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
        g.w.is_multiple_of(16) && crate::kernels::isa::avx512()
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
    let mut out = crate::kernels::zeros(w.len());
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
        || {
            (
                crate::kernels::zeros(n_out * row),
                crate::kernels::zeros(n_out),
            )
        },
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
    let (mut dw, mut db) = (
        crate::kernels::zeros(n_out * row),
        crate::kernels::zeros(n_out),
    );
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
