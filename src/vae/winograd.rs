//! 3×3 "same" convolutions by Winograd's minimal filtering F(2×2, 3×3) on AVX-512: each 2×2
//! block of outputs takes 16 multiply-adds per (input, output) channel pair instead of 36.
//!
//! The dVAE's 3×3 layers (forward, and the input gradient, which is the same convolution of the
//! output gradient with the flipped weight) are ~60% of its training step; the direct kernels of
//! [`super::direct`] run them at 150–200 GFLOP/s, about the machine's matmul rate, so only fewer
//! operations make them faster. Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"
//! (2015): with `d` a 4×4 input tile and `g` the 3×3 kernel, the 2×2 outputs are
//! `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`.
//!
//! A work unit is a band of rows of one image (even, so that tiles do not straddle units),
//! zero-padded once as in the direct kernels. For each block of 16·`NV` tiles (16 tiles per
//! vector, along a row of tiles), the unit transforms every input channel's tiles into the
//! 16 "frequencies" ξ (`Bᵀ d B`, additions only) in a scratch area that stays in L2; then, per
//! 6 output channels, each ξ is a small product over the input channels with the transformed
//! weight, kept in 6 × `NV` registers as in the direct kernel, and the 16 products go through
//! `Aᵀ · A` (additions), the bias and the epilogue into 2 rows × 32 pixels per vector.
//!
//! The transforms use only ±1 and ½ (in `G`), so the rounding differs from the direct sum by a
//! few ulps of the operands' magnitude; the same inputs give the same outputs on any number of
//! threads (each output is computed by one unit in a fixed order).

use super::direct::{for_units, Epilogue, Geom, Shared};

/// Output channels per register tile.
const MR: usize = 6;
/// Lanes of an AVX-512 vector: tiles per vector.
const LANES: usize = 16;
/// Frequencies of F(2×2, 3×3): a 4×4 tile.
const XI: usize = 16;

/// Rows of tiles one vector covers: 1 where a row of the image holds 16 tiles or a multiple, 2
/// where it holds 8 (16 pixels wide: the vector's second half is the next row of tiles).
fn tile_rows(g: &Geom) -> usize {
    if g.w == LANES {
        2
    } else {
        1
    }
}

/// Whether [`forward`] can take this geometry on this CPU: a 3×3 kernel with padding 1, and
/// either a width that is a multiple of 32 (16 tiles of 2 pixels per vector) and an even height,
/// or a width of 16 and a height that is a multiple of 4.
pub(crate) fn available(g: &Geom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        g.k == 3
            && g.pad == 1
            && (g.w.is_multiple_of(2 * LANES) || g.w == LANES)
            && g.w > 0
            && g.h.is_multiple_of(2 * tile_rows(g))
            && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// `U = G g Gᵀ` of every (output, input) channel pair of `w (n_out, c, 3, 3)`, laid out as
/// `(ξ, output tile, c, MR)` (zero for channels past `n_out`): what the product of one ξ and
/// one tile of [`MR`] output channels reads, in the order it reads it.
fn transform_weights(w: &[f32], n_out: usize, c: usize) -> Vec<f32> {
    const G: [[f32; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let tiles = n_out.div_ceil(MR);
    let mut out = vec![0f32; XI * tiles * c * MR];
    for o in 0..n_out {
        for ci in 0..c {
            let g = &w[(o * c + ci) * 9..][..9];
            // gg = G g (4×3), then u = gg Gᵀ (4×4).
            let gg: [[f32; 3]; 4] = std::array::from_fn(|a| {
                std::array::from_fn(|j| (0..3).map(|i| G[a][i] * g[i * 3 + j]).sum())
            });
            for (a, gga) in gg.iter().enumerate() {
                for (b, gb) in G.iter().enumerate() {
                    let u: f32 = gga.iter().zip(gb).map(|(p, q)| p * q).sum();
                    let xi = a * 4 + b;
                    out[((xi * tiles + o / MR) * c + ci) * MR + o % MR] = u;
                }
            }
        }
    }
    out
}

/// `out (n_out, b, h, w) = W ⊛ relu?(x) + bias` for a 3×3 kernel with padding 1, passed through
/// `epilogue` as it is stored: [`super::direct::forward`]'s contract, for the geometries of
/// [`available`].
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    relu: bool,
    w: &[f32],
    bias: Option<&[f32]>,
    n_out: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let c = g.c;
    let plane = g.b * g.h * g.w;
    assert!(available(g) && x.len() == c * plane && w.len() == n_out * c * 9);
    assert!(bias.is_none_or(|b| b.len() == n_out));
    match epilogue {
        Epilogue::Mask(m) | Epilogue::Residual(m, _) => assert_eq!(m.len(), n_out * plane),
        Epilogue::Store => {}
    }
    // Few channels: 4 vectors per block (the direct kernel's tile); many: 2, so that the
    // transformed block (16 · c · 16·NV floats) stays within L2 next to the band.
    if c <= 64 {
        run::<4>(g, x, relu, w, bias, n_out, epilogue)
    } else {
        run::<2>(g, x, relu, w, bias, n_out, epilogue)
    }
}

fn run<const NV: usize>(
    g: &Geom,
    x: &[f32],
    relu: bool,
    w: &[f32],
    bias: Option<&[f32]>,
    n_out: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let (c, plane, pw) = (g.c, g.b * g.h * g.w, g.padded_width());
    let ut = transform_weights(w, n_out, c);
    let tiles = n_out.div_ceil(MR);
    let bias: Vec<f32> = (0..tiles * MR)
        .map(|o| bias.and_then(|b| b.get(o)).copied().unwrap_or(0.0))
        .collect();
    let len = n_out * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = Shared(out.spare_capacity_mut().as_mut_ptr().cast());
    // Units of whole vectors: 2 or 4 rows at a time.
    let tr = tile_rows(g);
    let step = 2 * tr;
    let rows = (g.band_rows() / step * step).max(step);
    let band_len = g.band_len(rows);
    let v_len = XI * c * NV * LANES;
    let m_len = XI * MR * NV * LANES;
    // The scratch areas start on a cache line (16 floats).
    let buffer_len = band_len + 16 + v_len + m_len;
    for_units(
        g.units(rows),
        buffer_len,
        usize::MAX,
        || (),
        |_, (img, y0, rows), buffer| {
            let (band, rest) = buffer.split_at_mut(band_len);
            let skip = rest.as_ptr().align_offset(64).min(16);
            let (v, m) = rest[skip..].split_at_mut(v_len);
            g.fill_band(x, (img, y0, rows), relu, band);
            let band_plane = (rows + 2) * pw;
            let per_row = (g.w / 2 * tr).div_ceil(LANES);
            let vecs = rows / step * per_row;
            // Vector p: offsets of its tiles' first input pixel in the band, and of their first
            // output pixel in an output plane; its second half starts `halves` further on.
            let at = |p: usize| {
                let (ty, tx) = (p / per_row * tr, p % per_row * LANES);
                (
                    2 * ty * pw + 2 * tx,
                    (img * g.h + y0 + 2 * ty) * g.w + 2 * tx,
                )
            };
            let halves = if tr == 2 {
                (2 * pw, 2 * g.w)
            } else {
                (LANES, LANES)
            };
            for p0 in (0..vecs).step_by(NV) {
                // A short last block repeats the unit's last vector: written twice, same value.
                let pos: [(usize, usize); NV] = std::array::from_fn(|j| at((p0 + j).min(vecs - 1)));
                // SAFETY: `available` checked AVX-512; a vector's tiles read band columns
                // 2·tx .. 2·tx + 33 ≤ w + 1 (16 px: 0 .. 17) of rows 2·ty .. 2·ty + 3 (16 px:
                // + 5) ≤ rows + 1, inside the band; `v` and `m` have the lengths the kernels
                // index; the 64 output pixels of a vector (rows 2·ty, 2·ty + 1, 32 pixels from
                // 2·tx; 16 px: rows 2·ty .. 2·ty + 3) are inside an output plane and the
                // epilogue's slice, and units write disjoint pixels.
                unsafe {
                    let geo = (band_plane, pw, halves.0);
                    input_transform::<NV>(band.as_ptr(), geo, c, &pos, v.as_mut_ptr());
                    for t in 0..tiles {
                        let wt = ut.as_ptr().add(t * c * MR);
                        products::<NV>(wt, tiles * c * MR, c, v.as_ptr(), m.as_mut_ptr());
                        let valid = (n_out - t * MR).min(MR);
                        let out = (dst.at(t * MR * plane), plane, valid, g.w, halves.1);
                        let epi = match epilogue {
                            Epilogue::Store => Epi::Store,
                            Epilogue::Mask(s) => Epi::Mask(s[t * MR * plane..].as_ptr()),
                            Epilogue::Residual(s, gain) => {
                                Epi::Residual(s[t * MR * plane..].as_ptr(), gain)
                            }
                        };
                        output_transform::<NV>(m.as_ptr(), &bias[t * MR..], &pos, out, epi);
                    }
                }
            }
        },
    );
    // SAFETY: the units cover every (image, row pair) once and store every channel of every
    // pixel of their rows, so all `len` values are written.
    unsafe { out.set_len(len) };
    out
}

/// The epilogue as the output transform sees it: its slice from the tile's first channel.
#[derive(Clone, Copy)]
enum Epi {
    Store,
    Mask(*const f32),
    Residual(*const f32, f32),
}

/// `V[ξ][ci][tile] = (Bᵀ d B)[ξ]` for the 16·NV tiles of `pos` (band offsets) of every input
/// channel, `v` laid out `(ξ, c, NV·16)`. `(band_plane, pw, half)`: floats per channel and per
/// row of the band, and from a vector's first tile to its ninth.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform<const NV: usize>(
    band: *const f32,
    (band_plane, pw, half): (usize, usize, usize),
    c: usize,
    pos: &[(usize, usize); NV],
    v: *mut f32,
) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for ci in 0..c {
        for (j, &(b0, _)) in pos.iter().enumerate() {
            let r0 = band.add(ci * band_plane + b0);
            // t = d B: row i of the tile, column k of the transform.
            let t: [[__m512; 4]; 4] = std::array::from_fn(|i| {
                let r = r0.add(i * pw);
                let (a, b) = (_mm512_loadu_ps(r), _mm512_loadu_ps(r.add(half)));
                let (a2, b2) = (_mm512_loadu_ps(r.add(2)), _mm512_loadu_ps(r.add(half + 2)));
                let d0 = _mm512_permutex2var_ps(a, even, b);
                let d1 = _mm512_permutex2var_ps(a, odd, b);
                let d2 = _mm512_permutex2var_ps(a2, even, b2);
                let d3 = _mm512_permutex2var_ps(a2, odd, b2);
                [
                    _mm512_sub_ps(d0, d2),
                    _mm512_add_ps(d1, d2),
                    _mm512_sub_ps(d2, d1),
                    _mm512_sub_ps(d1, d3),
                ]
            });
            let [t0, t1, t2, t3] = t;
            for k in 0..4 {
                let col = [
                    _mm512_sub_ps(t0[k], t2[k]),
                    _mm512_add_ps(t1[k], t2[k]),
                    _mm512_sub_ps(t2[k], t1[k]),
                    _mm512_sub_ps(t1[k], t3[k]),
                ];
                for (a, &val) in col.iter().enumerate() {
                    let xi = a * 4 + k;
                    _mm512_storeu_ps(v.add(((xi * c + ci) * NV + j) * LANES), val);
                }
            }
        }
    }
}

/// `M[ξ][i][tile] = Σ_ci U[ξ][i][ci] · V[ξ][ci][tile]` for one tile of [`MR`] output channels
/// (`wt` its weights at ξ = 0, `xi_stride` floats from one ξ to the next), `m` laid out
/// `(ξ, MR, NV·16)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn products<const NV: usize>(
    wt: *const f32,
    xi_stride: usize,
    c: usize,
    v: *const f32,
    m: *mut f32,
) {
    use std::arch::x86_64::*;
    for xi in 0..XI {
        let w = wt.add(xi * xi_stride);
        let vx = v.add(xi * c * NV * LANES);
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for ci in 0..c {
            let ws: [__m512; MR] = std::array::from_fn(|i| _mm512_set1_ps(*w.add(ci * MR + i)));
            let xs: [__m512; NV] =
                std::array::from_fn(|j| _mm512_loadu_ps(vx.add((ci * NV + j) * LANES)));
            for (row, &wi) in acc.iter_mut().zip(&ws) {
                for (a, &xv) in row.iter_mut().zip(&xs) {
                    *a = _mm512_fmadd_ps(wi, xv, *a);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &a) in row.iter().enumerate() {
                _mm512_storeu_ps(m.add(((xi * MR + i) * NV + j) * LANES), a);
            }
        }
    }
}

/// `Y = Aᵀ M A + bias` for each of the tile's `valid` channels and NV vectors of tiles, two rows
/// of 32 pixels per vector (or four of 16), stored through the epilogue. `out` = (first channel's
/// plane, plane length, channels to store, image width, from a vector's first output pixel to
/// its seventeenth).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform<const NV: usize>(
    m: *const f32,
    bias: &[f32],
    pos: &[(usize, usize); NV],
    (out, plane, valid, w, half): (*mut f32, usize, usize, usize, usize),
    epilogue: Epi,
) {
    use std::arch::x86_64::*;
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (i, &b) in bias.iter().enumerate().take(valid) {
        let bv = _mm512_set1_ps(b);
        for (j, &(_, o0)) in pos.iter().enumerate() {
            let mm = |xi: usize| _mm512_loadu_ps(m.add(((xi * MR + i) * NV + j) * LANES));
            // s = Aᵀ M (2×4), then y = s A (2×2).
            let s: [[__m512; 4]; 2] = {
                let mut s = [[_mm512_setzero_ps(); 4]; 2];
                let [s0, s1] = &mut s;
                for (k, (a, b)) in s0.iter_mut().zip(s1.iter_mut()).enumerate() {
                    let (m0, m1, m2, m3) = (mm(k), mm(4 + k), mm(8 + k), mm(12 + k));
                    *a = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                    *b = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
                }
                s
            };
            for (a, s) in s.iter().enumerate() {
                let y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]), bv);
                let y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]), bv);
                let row = i * plane + o0 + a * w;
                for (h, idx) in [lo, hi].into_iter().enumerate() {
                    let at = row + h * half;
                    let y = _mm512_permutex2var_ps(y0, idx, y1);
                    let y = match epilogue {
                        Epi::Store => y,
                        Epi::Mask(mask) => {
                            let keep = _mm512_cmp_ps_mask(
                                _mm512_loadu_ps(mask.add(at)),
                                _mm512_setzero_ps(),
                                _CMP_GT_OQ,
                            );
                            _mm512_maskz_mov_ps(keep, y)
                        }
                        Epi::Residual(id, gain) => {
                            _mm512_fmadd_ps(_mm512_set1_ps(gain), y, _mm512_loadu_ps(id.add(at)))
                        }
                    };
                    _mm512_storeu_ps(out.add(at), y);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_transform<const NV: usize>(
    _: *const f32,
    _: (usize, usize, usize),
    _: usize,
    _: &[(usize, usize); NV],
    _: *mut f32,
) {
    unreachable!("Winograd convolution is only dispatched on x86-64 (see `available`)")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products<const NV: usize>(_: *const f32, _: usize, _: usize, _: *const f32, _: *mut f32) {
    unreachable!("Winograd convolution is only dispatched on x86-64 (see `available`)")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn output_transform<const NV: usize>(
    _: *const f32,
    _: &[f32],
    _: &[(usize, usize); NV],
    _: (*mut f32, usize, usize, usize, usize),
    _: Epi,
) {
    unreachable!("Winograd convolution is only dispatched on x86-64 (see `available`)")
}
