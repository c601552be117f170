//! 3×3 "same" convolutions by Winograd's minimal filtering F(2×2, 3×3) on AVX-512: each 2×2
//! block of outputs takes 16 multiply-adds per (input, output) channel pair instead of 36.
//!
//! The dVAE's 3×3 layers (forward, input gradient — the same convolution of the output gradient
//! with the flipped weight — and weight gradient) are ~60% of its training step; the direct
//! kernels of [`super::direct`] run them at 150–200 GFLOP/s, about the machine's matmul rate, so
//! only fewer operations make them faster. Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks" (2015): with `d` a 4×4 input tile and `g` the 3×3 kernel, the 2×2 outputs are
//! `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`.
//!
//! [`forward`]: a work unit is a band of rows of one image (whole rows of tiles), zero-padded
//! once as in the direct kernels. For each block of 16·`NV` tiles (16 tiles per vector: along a
//! row of tiles, or two rows of 8 at 16 px), the unit transforms every input channel's tiles into
//! the 16 "frequencies" ξ (`Bᵀ d B`, additions only) in a scratch area that stays in L2; then,
//! per 6 output channels, each ξ is a small product over the input channels with the transformed
//! weight, kept in 6 × `NV` registers as in the direct kernel, and the 16 products go through
//! `Aᵀ · A` (additions), the bias and the epilogue into 2 rows × 32 pixels per vector.
//! [`weight_grad`]: see there.
//!
//! The transforms use only ±1 and ½, so the rounding differs from the direct sum by a few ulps
//! of the operands' magnitude; the same inputs give the same outputs on any number of threads.

mod grad;

use super::tiles::{cache_aligned, for_units, Epilogue, Geom, Shared, TileEpilogue};
pub(crate) use grad::weight_grad;

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

/// Rows per work unit: the direct kernels' band, cut to whole vectors of tiles (a multiple of 2
/// rows, of 4 at 16 px).
fn unit_rows(g: &Geom) -> usize {
    let step = 2 * tile_rows(g);
    (g.band_rows() / step * step).max(step)
}

/// A unit's vectors of 16 tiles.
struct Vectors {
    /// Vectors in the unit.
    count: usize,
    per_row: usize,
    tr: usize,
    pw: usize,
    /// Offset of the unit's first pixel in an output plane.
    out0: usize,
    w: usize,
    /// From a vector's first tile to its ninth: in the band, in an output plane.
    halves: (usize, usize),
}

impl Vectors {
    fn new(g: &Geom, (img, y0, rows): (usize, usize, usize)) -> Self {
        let tr = tile_rows(g);
        let per_row = (g.w / 2 * tr).div_ceil(LANES);
        let pw = g.padded_width();
        Vectors {
            count: rows / (2 * tr) * per_row,
            per_row,
            tr,
            pw,
            out0: (img * g.h + y0) * g.w,
            w: g.w,
            halves: if tr == 2 {
                (2 * pw, 2 * g.w)
            } else {
                (LANES, LANES)
            },
        }
    }

    /// Vector p's first tile: the offset of its first input pixel in the band and of its first
    /// output pixel in an output plane.
    fn at(&self, p: usize) -> (usize, usize) {
        let (ty, tx) = (p / self.per_row * self.tr, p % self.per_row * LANES);
        (
            2 * ty * self.pw + 2 * tx,
            self.out0 + 2 * ty * self.w + 2 * tx,
        )
    }

    /// The `N` vectors from `p0`: a short last block repeats the unit's last vector (written
    /// twice, with the same value).
    fn block<const N: usize>(&self, p0: usize) -> [usize; N] {
        std::array::from_fn(|j| (p0 + j).min(self.count - 1))
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
            && crate::kernels::isa::avx512()
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
    let tiles = n_out.div_ceil(MR);
    let mut out = crate::kernels::zeros(XI * tiles * c * MR);
    for o in 0..n_out {
        for ci in 0..c {
            let g = &w[(o * c + ci) * 9..][..9];
            for (xi, &u) in g_g_transposed(g.try_into().expect("9 taps"))
                .iter()
                .enumerate()
            {
                out[((xi * tiles + o / MR) * c + ci) * MR + o % MR] = u;
            }
        }
    }
    out
}

/// `G g Gᵀ` (4×4, row-major) of a 3×3 kernel `g`, with `G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]`.
fn g_g_transposed(g: &[f32; 9]) -> [f32; XI] {
    // `G v` of a 3-vector.
    let gv = |v: [f32; 3]| {
        let half = 0.5 * (v[0] + v[2]);
        [v[0], half + 0.5 * v[1], half - 0.5 * v[1], v[2]]
    };
    let cols: [[f32; 4]; 3] = std::array::from_fn(|j| gv([g[j], g[3 + j], g[6 + j]]));
    let mut u = [0f32; XI];
    for a in 0..4 {
        let row = gv([cols[0][a], cols[1][a], cols[2][a]]);
        u[a * 4..a * 4 + 4].copy_from_slice(&row);
    }
    u
}

/// `Gᵀ u G` (3×3, row-major) of a 4×4 `u`: the gradient of a kernel from that of its
/// [`g_g_transposed`].
fn g_transposed_u_g(u: &[f32; XI]) -> [f32; 9] {
    // `Gᵀ v` of a 4-vector.
    let gtv = |v: [f32; 4]| {
        let half = 0.5 * (v[1] + v[2]);
        [v[0] + half, 0.5 * (v[1] - v[2]), half + v[3]]
    };
    let cols: [[f32; 3]; 4] = std::array::from_fn(|b| gtv([u[b], u[4 + b], u[8 + b], u[12 + b]]));
    let mut g = [0f32; 9];
    for i in 0..3 {
        let row = gtv([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
        g[i * 3..i * 3 + 3].copy_from_slice(&row);
    }
    g
}

/// `out (n_out, b, h, w) = W ⊛ relu?(x) + bias` for a 3×3 kernel with padding 1, passed through
/// `epilogue` as it is stored: [`super::direct::forward`]'s contract (which checks the lengths),
/// for the geometries of [`available`].
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    relu: bool,
    w: &[f32],
    bias: Option<&[f32]>,
    n_out: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    assert!(
        available(g),
        "Winograd convolution of an unsupported geometry {g:?}"
    );
    // Few channels: 4 vectors per block (the direct kernel's tile); many: 2, so that the
    // transformed block (16 · c · 16·NV floats) stays within L2 next to the band.
    if g.c <= 64 {
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
    let rows = unit_rows(g);
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
            let (v, m) = cache_aligned(rest).split_at_mut(v_len);
            g.fill_band(x, (img, y0, rows), relu, band);
            let band_plane = (rows + 2) * pw;
            let vs = Vectors::new(g, (img, y0, rows));
            let halves = vs.halves;
            for p0 in (0..vs.count).step_by(NV) {
                let pos = vs.block::<NV>(p0).map(|p| vs.at(p));
                // SAFETY: `available` checked AVX-512; a vector's tiles read band columns
                // 2·tx .. 2·tx + 33 ≤ w + 1 (16 px: 0 .. 17) of rows 2·ty .. 2·ty + 3 (16 px:
                // + 5) ≤ rows + 1, inside the band; `v` and `m` have the lengths the kernels
                // index; the 64 output pixels of a vector (rows 2·ty, 2·ty + 1, 32 pixels from
                // 2·tx; 16 px: rows 2·ty .. 2·ty + 3) are inside an output plane and the
                // epilogue's slice, and units write disjoint pixels.
                unsafe {
                    let geo = (band_plane, pw, halves.0);
                    let cols = std::array::from_fn(|j| j * LANES);
                    let to = (v.as_mut_ptr(), NV * LANES, cols);
                    input_transform::<NV>(band.as_ptr(), geo, c, &pos, to);
                    for t in 0..tiles {
                        let wt = ut.as_ptr().add(t * c * MR);
                        products::<NV>(wt, tiles * c * MR, c, v.as_ptr(), m.as_mut_ptr());
                        let valid = (n_out - t * MR).min(MR);
                        let out = (dst.at(t * MR * plane), plane, valid, g.w, halves.1);
                        let epi = TileEpilogue::at(epilogue, t * MR * plane);
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

/// `V[ξ][ci][tile] = (Bᵀ d B)[ξ]` for the 16·NV tiles of `pos` (band offsets) of every input
/// channel. `(band_plane, pw, half)`: floats per channel and per row of the band, and from a
/// vector's first tile to its ninth; `(v, stride, cols)`: V's rows of `stride` floats, one per
/// (ξ, channel), and the column of each vector's first tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform<const NV: usize>(
    band: *const f32,
    (band_plane, pw, half): (usize, usize, usize),
    c: usize,
    pos: &[(usize, usize); NV],
    (v, stride, cols): (*mut f32, usize, [usize; NV]),
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
                    _mm512_storeu_ps(v.add((xi * c + ci) * stride + cols[j]), val);
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
    epilogue: TileEpilogue,
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
                    _mm512_storeu_ps(out.add(at), epilogue.apply16(y, at));
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
    _: (*mut f32, usize, [usize; NV]),
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
    _: TileEpilogue,
) {
    unreachable!("Winograd convolution is only dispatched on x86-64 (see `available`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The Winograd weight and bias gradients equal the direct kernel's, with the whole layer
    /// in one chunk (16 px: two rows of 8 tiles per vector) and in many (64 px, 64 channels:
    /// one ξ's slice over all tiles would outgrow L2).
    #[test]
    fn weight_gradient_matches_the_direct_kernel_in_one_chunk_and_in_many() {
        for (c, n_out, b, hw) in [(8, 13, 2, 16), (64, 7, 2, 64)] {
            let g = Geom {
                c,
                b,
                h: hw,
                w: hw,
                k: 3,
                pad: 1,
            };
            if !available(&g) {
                return; // not an AVX-512 machine: nothing dispatches here
            }
            let plane = b * hw * hw;
            let (x, gy) = (values(c * plane, 1), values(n_out * plane, 2));
            for relu in [false, true] {
                let (dw, db) = weight_grad(&g, &x, relu, &gy, n_out);
                let (rw, rb) = super::super::direct::weight_grad(&g, &x, relu, &gy, n_out);
                let scale = rw.iter().fold(1f32, |m, v| m.max(v.abs()));
                let err = dw
                    .iter()
                    .zip(&rw)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "{c}→{n_out} at {hw} px: dW off by {err} (of {scale})"
                );
                let err = db
                    .iter()
                    .zip(&rb)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "{c}→{n_out} at {hw} px: db off by {err}"
                );
            }
        }
    }

    /// The kernel transform and its adjoint: ⟨G g Gᵀ, u⟩ = ⟨g, Gᵀ u G⟩.
    #[test]
    fn kernel_transform_and_its_gradient_are_adjoint() {
        let g: [f32; 9] = std::array::from_fn(|i| i as f32 * 0.37 - 1.1);
        let u: [f32; XI] = std::array::from_fn(|i| (i as f32 * 0.61).sin());
        let lhs: f32 = g_g_transposed(&g).iter().zip(&u).map(|(a, b)| a * b).sum();
        let rhs: f32 = g
            .iter()
            .zip(&g_transposed_u_g(&u))
            .map(|(a, b)| a * b)
            .sum();
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
