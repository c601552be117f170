//! The weight gradient of the Winograd 3×3 convolution (see [`weight_grad`]).

use super::super::tiles::{cache_aligned, for_units, with_buffer, Geom, Shared};
use super::*;

/// Up to this many bytes of transformed tiles (input and output gradient), [`weight_grad`]
/// transforms the whole layer at once and splits the products over ξ among the cores: one
/// reduction over all tiles ...
const ONE_CHUNK_BYTES: usize = 24 << 20;
/// ... and one ξ's transformed input (which the products read once per [`MR`] output channels)
/// within L2.
const SLICE_BYTES: usize = 384 << 10;
/// Larger layers go in chunks of about this many bytes, one per core at a time, each with its
/// own partial sums, ...
const CHUNK_BYTES: usize = 4 << 20;
/// ... but at least this many tiles: each register tile's 24 sums are reduced over their 16
/// lanes once per chunk (128 → 512 channels at 16 px in chunks of 64 tiles: 1.5× slower).
const CHUNK_TILES: usize = 256;

/// Input channels per register tile of the weight gradient's products.
const NC: usize = 4;

thread_local! {
    /// Each thread's buffer for [`weight_grad`]'s transformed tiles, kept between calls.
    static TILES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The weight and bias gradients of `y = W ⊛ relu?(x) + b` (3×3, padding 1) from the output
/// gradient `gy (n_out, b, h, w)`: [`super::super::direct::weight_grad`]'s contract, for the geometries
/// of [`available`].
///
/// `y = Aᵀ [U ⊙ V] A` per tile with `U = G g Gᵀ`, so `∂L/∂U = Σ_tiles (A ∂y Aᵀ) ⊙ V` and
/// `∂L/∂g = Gᵀ (∂L/∂U) G`: per ξ, a product of the transformed output gradient `Z (n_out ×
/// tiles)` with the transformed input `V (c × tiles)` over the tiles, 16 multiply-adds per tile
/// and channel pair where the direct kernel takes 36. A layer whose transformed tiles fit
/// [`ONE_CHUNK_BYTES`] (and one ξ's input slice [`SLICE_BYTES`]) is transformed at once, its
/// units spread over the cores, and its 16 products then split among them; a larger one goes in
/// chunks of consecutive units ([`CHUNK_BYTES`], at least [`CHUNK_TILES`]), one chunk per core
/// at a time with partial sums of its own, added in chunk order. Each sum is reduced over its 16
/// lanes once per chunk. Either way the result does not depend on the number of threads.
pub(crate) fn weight_grad(
    g: &Geom,
    x: &[f32],
    relu: bool,
    gy: &[f32],
    n_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let c = g.c;
    let plane = g.b * g.h * g.w;
    assert!(available(g) && x.len() == c * plane && gy.len() == n_out * plane);
    let pw = g.padded_width();
    let rows = unit_rows(g);
    let units = g.units(rows);
    // Every unit's rows are a multiple of 2 (of 4 at 16 px) and its tile rows fill whole
    // vectors, so each unit has a multiple of 16 tiles.
    let tiles_of = |u: &(usize, usize, usize)| u.2 / 2 * g.w / 2;
    let first_tile = |u: &(usize, usize, usize)| (u.0 * g.h + u.1) / 2 * (g.w / 2);
    let per_tile = XI * (c + n_out) * 4;
    let total: usize = units.iter().map(tiles_of).sum();
    let cap = if total * per_tile <= ONE_CHUNK_BYTES && total * c * 4 <= SLICE_BYTES {
        total
    } else {
        (CHUNK_BYTES / per_tile)
            .max(CHUNK_TILES)
            .max(units.iter().map(tiles_of).max().unwrap_or(0))
    };
    let mut chunks: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    for u in units {
        match chunks.last_mut() {
            Some(ch) if ch.iter().map(tiles_of).sum::<usize>() + tiles_of(&u) <= cap => ch.push(u),
            _ => chunks.push(vec![u]),
        }
    }
    // One cache line more than the columns: rows a power of two apart (512 tiles = 2 KB) map
    // to the same cache sets, and the products read 10 of them at once (128 → 128 channels at
    // 16 px: 85 → 158 ms over 4 steps).
    let stride = cap.next_multiple_of(LANES) + LANES;
    let (v_len, z_len) = (XI * c * stride, XI * n_out * stride);
    let band_len = g.band_len(rows);
    // Transforms one unit's tiles into columns col0 .. of V and Z (rows `stride` apart).
    let transform = |(img, y0, rows): (usize, usize, usize),
                     band: &mut [f32],
                     v: &Shared,
                     z: &Shared,
                     col0: usize| {
        g.fill_band(x, (img, y0, rows), relu, band);
        let band_plane = (rows + 2) * pw;
        let vs = Vectors::new(g, (img, y0, rows));
        let halves = vs.halves;
        for p0 in (0..vs.count).step_by(4) {
            let p = vs.block::<4>(p0);
            let pos = p.map(|p| vs.at(p));
            let cols = p.map(|p| col0 + p * LANES);
            // SAFETY: AVX-512 checked by `available`; band reads as in `forward`; the gradient
            // reads are the output pixels `forward` writes; the unit's columns col0 .. col0 +
            // its tiles ≤ its chunk's ≤ `stride`, so the stores stay inside V and Z, apart from
            // other units'.
            unsafe {
                let geo = (band_plane, pw, halves.0);
                input_transform::<4>(band.as_ptr(), geo, c, &pos, (v.at(0), stride, cols));
                let gy = (gy.as_ptr(), plane, n_out, g.w, halves.1);
                grad_transform(gy, &pos, (z.at(0), stride, cols));
            }
        }
    };
    // The products of one ξ over a chunk's `k` tiles, added to `du` (n_out × c).
    let product = |xi: usize, v: &[f32], z: &[f32], k: usize, du: &mut [f32]| {
        let (zx, vx) = (&z[xi * n_out * stride..], &v[xi * c * stride..]);
        // SAFETY: AVX-512 checked by `available`; the chunk's units wrote the first `k`
        // columns of the n_out rows of `zx` and the c rows of `vx`.
        unsafe { weight_products((zx.as_ptr(), vx.as_ptr(), stride, k), (n_out, c), du) };
    };
    // The thread's tile buffer (a fresh one if it is in use further up the stack).
    let with_tiles = |f: &mut dyn FnMut(&mut [f32], &mut [f32])| {
        // V and Z start on a cache line (16 floats), as do their rows.
        with_buffer(&TILES, v_len + z_len + 16, |buf| {
            let (v, z) = cache_aligned(buf)[..v_len + z_len].split_at_mut(v_len);
            f(v, z)
        })
    };
    let du = if chunks.len() > 1 {
        // Large layers: each core takes whole chunks, its own partial gradient per chunk,
        // the partials added in chunk order.
        let parts: Vec<Vec<f32>> = chunks
            .par_iter()
            .map(|chunk| {
                let mut du = crate::kernels::zeros(XI * n_out * c);
                with_tiles(&mut |v, z| {
                    let (vp, zp) = (Shared(v.as_mut_ptr()), Shared(z.as_mut_ptr()));
                    let base = first_tile(&chunk[0]);
                    super::super::tiles::with_scratch(band_len, |band| {
                        for &u in chunk {
                            transform(u, band, &vp, &zp, first_tile(&u) - base);
                        }
                    });
                    let k: usize = chunk.iter().map(tiles_of).sum();
                    for (xi, du) in du.chunks_exact_mut(n_out * c).enumerate() {
                        product(xi, v, z, k, du);
                    }
                });
                du
            })
            .collect();
        let mut du = crate::kernels::zeros(XI * n_out * c);
        for part in &parts {
            du.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        du
    } else {
        // One chunk (the small layers): the units' transforms spread over the cores, then the
        // 16 ξ's products.
        let mut du = crate::kernels::zeros(XI * n_out * c);
        with_tiles(&mut |v, z| {
            let (vp, zp) = (Shared(v.as_mut_ptr()), Shared(z.as_mut_ptr()));
            for chunk in &chunks {
                let base = first_tile(&chunk[0]);
                let (vr, zr) = (&vp, &zp);
                for_units(
                    chunk.clone(),
                    band_len,
                    usize::MAX,
                    || (),
                    |_, u, band| transform(u, band, vr, zr, first_tile(&u) - base),
                );
                let k: usize = chunk.iter().map(tiles_of).sum();
                let (v, z) = (&*v, &*z);
                du.par_chunks_mut(n_out * c)
                    .enumerate()
                    .for_each(|(xi, du)| product(xi, v, z, k, du));
            }
        });
        du
    };
    let mut dw = crate::kernels::zeros(n_out * c * 9);
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(o, dw)| {
        for (ci, dw) in dw.chunks_exact_mut(9).enumerate() {
            let u: [f32; XI] = std::array::from_fn(|xi| du[(xi * n_out + o) * c + ci]);
            dw.copy_from_slice(&g_transposed_u_g(&u));
        }
    });
    let db = (0..n_out)
        .into_par_iter()
        .map(|o| crate::kernels::sum(&gy[o * plane..(o + 1) * plane]))
        .collect();
    (dw, db)
}

/// `Z[ξ][o][tile] = (A ∂y Aᵀ)[ξ]` for the 16·4 tiles of `pos` (output offsets) of every output
/// channel. `gy` = (output gradient, plane length, channels, image width, from a vector's first
/// output pixel to its seventeenth); `(z, stride, cols)` as `input_transform`'s destination.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn grad_transform(
    (gy, plane, n_out, w, half): (*const f32, usize, usize, usize, usize),
    pos: &[(usize, usize); 4],
    (z, stride, cols): (*mut f32, usize, [usize; 4]),
) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let zero = _mm512_setzero_ps();
    for o in 0..n_out {
        for (j, &(_, o0)) in pos.iter().enumerate() {
            let r0 = gy.add(o * plane + o0);
            // d[a][b]: output row a, column b of each tile.
            let d: [[__m512; 2]; 2] = std::array::from_fn(|a| {
                let r = r0.add(a * w);
                let (lo, hi) = (_mm512_loadu_ps(r), _mm512_loadu_ps(r.add(half)));
                [
                    _mm512_permutex2var_ps(lo, even, hi),
                    _mm512_permutex2var_ps(lo, odd, hi),
                ]
            });
            // Row r of q = A d (4×2), then row r of Z = q Aᵀ (4×4); A = [1 0; 1 1; 1 −1; 0 −1].
            for r in 0..4 {
                let qr: [__m512; 2] = std::array::from_fn(|b| {
                    let (d0, d1) = (d[0][b], d[1][b]);
                    match r {
                        0 => d0,
                        1 => _mm512_add_ps(d0, d1),
                        2 => _mm512_sub_ps(d0, d1),
                        _ => _mm512_sub_ps(zero, d1),
                    }
                });
                let row = [
                    qr[0],
                    _mm512_add_ps(qr[0], qr[1]),
                    _mm512_sub_ps(qr[0], qr[1]),
                    _mm512_sub_ps(zero, qr[1]),
                ];
                for (s, &val) in row.iter().enumerate() {
                    let xi = r * 4 + s;
                    _mm512_storeu_ps(z.add((xi * n_out + o) * stride + cols[j]), val);
                }
            }
        }
    }
}

/// `du[o][ci] += Σ_tiles Z[o][tile] · V[ci][tile]` for one ξ over the first `k` columns (a
/// multiple of 16) of rows `stride` apart, [`MR`] output × [`NC`] input channels per register
/// tile, each sum reduced over its 16 lanes at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weight_products(
    (z, v, stride, k): (*const f32, *const f32, usize, usize),
    (n_out, c): (usize, usize),
    du: &mut [f32],
) {
    use std::arch::x86_64::*;
    for ot in 0..n_out.div_ceil(MR) {
        let orow: [*const f32; MR] =
            std::array::from_fn(|i| z.add((ot * MR + i).min(n_out - 1) * stride));
        for ct in 0..c.div_ceil(NC) {
            let crow: [*const f32; NC] =
                std::array::from_fn(|j| v.add((ct * NC + j).min(c - 1) * stride));
            let mut acc = [[_mm512_setzero_ps(); NC]; MR];
            for t in (0..k).step_by(LANES) {
                let zs: [__m512; MR] = std::array::from_fn(|i| _mm512_loadu_ps(orow[i].add(t)));
                let vs: [__m512; NC] = std::array::from_fn(|j| _mm512_loadu_ps(crow[j].add(t)));
                for (row, &zi) in acc.iter_mut().zip(&zs) {
                    for (a, &vj) in row.iter_mut().zip(&vs) {
                        *a = _mm512_fmadd_ps(zi, vj, *a);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate().take(n_out - ot * MR) {
                for (j, &a) in row.iter().enumerate().take(c - ct * NC) {
                    du[(ot * MR + i) * c + ct * NC + j] += _mm512_reduce_add_ps(a);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn grad_transform(
    _: (*const f32, usize, usize, usize, usize),
    _: &[(usize, usize); 4],
    _: (*mut f32, usize, [usize; 4]),
) {
    unreachable!("Winograd convolution is only dispatched on x86-64 (see `available`)")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn weight_products(
    _: (*const f32, *const f32, usize, usize),
    _: (usize, usize),
    _: &mut [f32],
) {
    unreachable!("Winograd convolution is only dispatched on x86-64 (see `available`)")
}
