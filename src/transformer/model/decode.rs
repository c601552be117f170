//! One cached decoding step on the CPU in f32, outside candle's graph: every row's token at its
//! own position, each layer's small operations (layer norm, attention over the allowed keys,
//! bias, GELU, residual) as plain loops over per-step buffers, and the weight matrices as
//! matrix-vector passes shared by a [`Team`] (≤ [`linear::SMALL_ROWS`] rows; f32 weights, or
//! their f16 copy, see [`Transformer::keep_f16_weights`]), the few-rows product
//! ([`linear::gemm_few_rows`], ≤ 32) or one matrix product. The same
//! arithmetic as [`Transformer::forward`] on one position (parity tests compare the two); what
//! it saves is a step's ~200 tensor allocations and ~15 candle ops per layer, each a pass over
//! its operands and some a hand-off to candle's thread pool — at batch 1 about a third of the
//! step on top of the weight pass, which is the step's floor.

use super::{store, Attention, Block, KvCache, LayerNorm, Linear, Transformer};
use crate::kernels::team::{Disjoint, Team};
use crate::kernels::{activation, linear, norm, softmax};
use candle_core::{CpuStorage, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// A contiguous f32 CPU tensor's values, borrowed for as long as the guard lives.
struct Raw<'a>(StorageRef<'a>, usize, usize);

impl Raw<'_> {
    fn get(&self) -> &[f32] {
        match &*self.0 {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.1..self.2],
            // `raw` built this guard only over f32 CPU storage.
            _ => unreachable!("Raw holds f32 CPU storage only"),
        }
    }
}

fn raw(t: &Tensor) -> Result<Raw<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("decode: weight {:?} is not contiguous", t.shape());
    };
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("decode: weights must be f32 on the CPU");
    }
    Ok(Raw(guard, start, end))
}

/// `x (rows, d)` → `out (rows, d)`: layer norm with its affine step, ε = 1e-5 as the model's.
fn layer_norm(ln: &LayerNorm, x: &[f32], d: usize, out: &mut [f32]) -> Result<()> {
    let (w, b) = (raw(&ln.weight)?, raw(&ln.bias)?);
    let (w, b) = (w.get(), b.get());
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let (mean, inv) = norm::row_moments(xr, 1e-5);
        for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (v - mean) * inv * wv + bv;
        }
    }
    Ok(())
}

/// How a step's parallel work is shared: by a [`Team`] (steps of up to
/// [`linear::SMALL_ROWS`] rows, a pass over the weights), or by rayon's pool (larger batches, whose
/// products are gemm's or the few-rows kernel's).
#[derive(Clone, Copy)]
enum Par<'a> {
    Team(&'a Team),
    Pool,
}

impl Par<'_> {
    /// `job(i)` for every `i < parts`.
    fn each(self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
        match self {
            Par::Team(team) => team.parallel(parts, job),
            Par::Pool => (0..parts).into_par_iter().for_each(job),
        }
    }
}

/// Bytes of weight one part of a team's matrix-vector pass reads: small enough that the two
/// ends meet within a few microseconds of each other, large enough that claiming (one atomic
/// exchange) is noise.
const PART_BYTES: usize = 32 << 10;

/// `out (rows, n) = x (rows, k) · wᵀ + b`, then `f` on every value.
fn linear(
    par: Par,
    lin: &Linear,
    x: &[f32],
    out: &mut [f32],
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    let (w, b) = (raw(&lin.weight)?, raw(&lin.bias)?);
    let (w, b) = (w.get(), b.get());
    let n = b.len();
    let k = w.len() / n.max(1);
    let m = x.len() / k.max(1);
    if let Par::Team(team) = par {
        // Each part: a run of weight rows dotted with every input row, bias and `f` applied.
        let out = Disjoint::new(&mut out[..m * n]);
        let by_rows = |elem: usize, dot: &(dyn Fn(usize, usize) -> f32 + Sync)| {
            let per = (PART_BYTES / (k * elem).max(1)).clamp(1, n.max(1));
            let parts = n.div_ceil(per);
            team.parallel(parts, &|p| {
                let rows = p * per..((p + 1) * per).min(n);
                for (j, &bj) in rows.clone().zip(&b[rows]) {
                    for i in 0..m {
                        // SAFETY: part `p` alone writes the columns of its weight rows.
                        unsafe { out.write(i * n + j, f(dot(j, i) + bj)) };
                    }
                }
            });
        };
        let row = |i: usize| &x[i * k..(i + 1) * k];
        match &lin.half {
            Some(h) => {
                let (dot, h) = (linear::pick_dot_f16(), h.get());
                by_rows(2, &|j, i| dot(row(i), &h[j * k..(j + 1) * k]));
            }
            None => {
                let dot = linear::pick_dot();
                by_rows(4, &|j, i| dot(row(i), &w[j * k..(j + 1) * k]));
            }
        }
        return Ok(());
    }
    if m <= linear::FEW_ROWS && linear::gemm_few_rows(x, w, (m, n, k), out, (Some(b), &f)).is_some()
    {
        return Ok(());
    }
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(b);
    }
    crate::kernels::matmul((m, n, k), out, (x, k, 1), (w, 1, k), true)?;
    out.par_iter_mut().for_each(|o| *o = f(*o));
    Ok(())
}

/// Attention of each row's query over the cached keys and values at positions `keys[row]`:
/// `qkv (rows, 3·d)` as the qkv projection writes it, `kb`/`vb` the layer's cache buffers
/// (rows, heads, capacity, hd), `y (rows, d)` the heads' outputs side by side.
#[allow(clippy::too_many_arguments)]
fn attend(
    par: Par,
    attn: &Attention,
    qkv: &[f32],
    kb: &[f32],
    vb: &[f32],
    capacity: usize,
    keys: &[&[u32]],
    y: &mut [f32],
) {
    let (h, hd) = (attn.n_heads, attn.head_dim);
    let d = h * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let head = pick_head(hd);
    let tasks = y.len() / hd;
    let y = Disjoint::new(y);
    par.each(tasks, &|task| {
        let (r, i) = (task / h, task % h);
        // SAFETY: task `task` alone writes its head's `hd` outputs.
        let out = unsafe { y.run(task * hd, hd) };
        let q = &qkv[r * 3 * d + i * hd..][..hd];
        let base = (r * h + i) * capacity * hd;
        let span = capacity * hd;
        head(
            q,
            &kb[base..base + span],
            &vb[base..base + span],
            keys[r],
            scale,
            out,
        );
    });
}

/// One head of [`attend`]: `out = softmax(scale · q·Kᵀ) · V` over the rows `keys` of the
/// head's keys and values (`capacity × hd` each).
type Head = fn(&[f32], &[f32], &[f32], &[u32], f32, &mut [f32]);

fn head_portable(q: &[f32], k: &[f32], v: &[f32], keys: &[u32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let mut p: Vec<f32> = keys
        .iter()
        .map(|&pos| crate::kernels::dot(q, &k[pos as usize * hd..][..hd]) * scale)
        .collect();
    softmax::softmax_row(&mut p);
    out.fill(0.0);
    for (&pos, &w) in keys.iter().zip(&p) {
        let vr = &v[pos as usize * hd..][..hd];
        out.iter_mut().zip(vr).for_each(|(o, &vv)| *o += w * vv);
    }
}

/// [`head_portable`] in 8-lane FMAs for head widths of `LANES` × 8: the query and the output
/// stay in registers while the keys and values stream past (with the width a runtime value
/// they lived on the stack, and each value row's FMAs were a load-add-store chain).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2<const LANES: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: &[u32],
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = 8 * LANES;
    let qv: [__m256; LANES] = std::array::from_fn(|c| _mm256_loadu_ps(q[8 * c..][..8].as_ptr()));
    let mut p = Vec::with_capacity(keys.len());
    // The keys four ahead, and this key's values (read after the softmax), are prefetched:
    // the allowed positions jump (text, then windows), and the cache is far larger than the
    // caches. Decode loop of `small`, batch 16, alternated: 19.9–24.6 → 19.1–22.3 ms a step.
    for (i, &pos) in keys.iter().enumerate() {
        if let Some(&next) = keys.get(i + 4) {
            let kn = k.as_ptr().wrapping_add(next as usize * hd).cast::<i8>();
            for l in (0..hd * 4).step_by(64) {
                _mm_prefetch(kn.wrapping_add(l), _MM_HINT_T0);
            }
        }
        let vn = v.as_ptr().wrapping_add(pos as usize * hd).cast::<i8>();
        for l in (0..hd * 4).step_by(64) {
            _mm_prefetch(vn.wrapping_add(l), _MM_HINT_T0);
        }
        let kr = k[pos as usize * hd..][..hd].as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2];
        for (c, qc) in qv.iter().enumerate() {
            acc[c & 1] = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(kr.add(8 * c)), acc[c & 1]);
        }
        let s = _mm256_add_ps(acc[0], acc[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        p.push(_mm_cvtss_f32(s) * scale);
    }
    softmax::softmax_row(&mut p);
    let mut o = [_mm256_setzero_ps(); LANES];
    for (&pos, &w) in keys.iter().zip(&p) {
        let vr = v[pos as usize * hd..][..hd].as_ptr();
        let wv = _mm256_set1_ps(w);
        for (c, oc) in o.iter_mut().enumerate() {
            *oc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr.add(8 * c)), *oc);
        }
    }
    for (c, oc) in o.iter().enumerate() {
        _mm256_storeu_ps(out[8 * c..][..8].as_mut_ptr(), *oc);
    }
}

/// The fastest [`Head`] for this CPU and head width.
fn pick_head(hd: usize) -> Head {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::isa::avx2() && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features (checked above); every slice index is checked.
        match hd {
            16 => {
                return |q, k, v, keys, scale, out| unsafe {
                    head_avx2::<2>(q, k, v, keys, scale, out)
                }
            }
            32 => {
                return |q, k, v, keys, scale, out| unsafe {
                    head_avx2::<4>(q, k, v, keys, scale, out)
                }
            }
            64 => {
                return |q, k, v, keys, scale, out| unsafe {
                    head_avx2::<8>(q, k, v, keys, scale, out)
                }
            }
            128 => {
                return |q, k, v, keys, scale, out| unsafe {
                    head_avx2::<16>(q, k, v, keys, scale, out)
                }
            }
            _ => {}
        }
    }
    let _ = hd;
    head_portable
}

/// Buffers of one step, reused by every layer.
struct Scratch {
    h: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    a: Vec<f32>,
    fc: Vec<f32>,
}

impl Block {
    /// One layer on `x (rows, d)` in place; the cache slot gets this position's keys and values.
    fn decode(
        &self,
        par: Par,
        x: &mut [f32],
        s: &mut Scratch,
        slot: &mut Option<(Tensor, Tensor)>,
        (pasts, capacity): (&[usize], usize),
        keys: &[&[u32]],
    ) -> Result<()> {
        let attn = &self.attn;
        let (h, hd) = (attn.n_heads, attn.head_dim);
        let d = h * hd;
        let rows = x.len() / d;
        layer_norm(&self.ln_1, x, d, &mut s.h)?;
        linear(par, &attn.qkv, &s.h, &mut s.qkv, |v| v)?;
        // This position's keys and values into the cache buffers, (rows, heads, 1, hd).
        let part = |i: usize| -> Result<Tensor> {
            let mut v = Vec::with_capacity(rows * d);
            for r in s.qkv.chunks_exact(3 * d) {
                v.extend_from_slice(&r[i * d..(i + 1) * d]);
            }
            Tensor::from_vec(v, (rows, h, 1, hd), &candle_core::Device::Cpu)
        };
        let (kb, vb) = store(slot, &part(1)?, &part(2)?, pasts, capacity)?;
        {
            let (kr, vr) = (raw(&kb)?, raw(&vb)?);
            attend(
                par,
                attn,
                &s.qkv,
                kr.get(),
                vr.get(),
                capacity,
                keys,
                &mut s.y,
            );
        }
        linear(par, &attn.proj, &s.y, &mut s.a, |v| v)?;
        // The sandwich norms write into `s.h`, free between the layer's two halves.
        let add = |x: &mut [f32], s: &mut Scratch, ln: Option<&LayerNorm>| -> Result<()> {
            let branch = match ln {
                Some(ln) => {
                    layer_norm(ln, &s.a, d, &mut s.h)?;
                    &s.h
                }
                None => &s.a,
            };
            x.iter_mut().zip(branch).for_each(|(o, &v)| *o += v);
            Ok(())
        };
        add(x, s, self.sandwich.as_ref().map(|(ln, _)| ln))?;
        layer_norm(&self.ln_2, x, d, &mut s.h)?;
        linear(par, &self.mlp.fc, &s.h, &mut s.fc, activation::gelu_f32)?;
        linear(par, &self.mlp.proj, &s.fc, &mut s.a, |v| v)?;
        add(x, s, self.sandwich.as_ref().map(|(_, ln)| ln))
    }
}

impl Transformer {
    /// Whether [`Transformer::decode_step`] serves a call: one new position per row, a cache,
    /// CPU f32 weights.
    pub(super) fn decodes_natively(&self, ids: &Tensor) -> bool {
        ids.device().is_cpu()
            && ids.dim(1).is_ok_and(|t| t == 1)
            && self.tokens.embeddings().dtype() == candle_core::DType::F32
    }

    /// `ids (rows, 1)`, each row at its position in `cache` → `(rows, 1, vocab)` logits; the cache is
    /// extended in place. The caller has checked the cache's layer count and the position.
    ///
    /// The step runs on rayon's threads, so that its parallel work is split in place instead of
    /// each of its ~60 phases being handed to the pool from outside, the caller sleeping until it
    /// is done (8.5 → 6.8 ms a step at batch 1 when the step was still candle ops): up to
    /// [`linear::SMALL_ROWS`] rows as a [`Team`], more with rayon's fork-join.
    pub(super) fn decode_step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let ids: Vec<u32> = ids
            .flatten_all()?
            .to_dtype(candle_core::DType::U32)?
            .to_vec1()?;
        if ids.len() <= linear::SMALL_ROWS {
            let helpers = rayon::current_num_threads().saturating_sub(1);
            Team::run(helpers, |team| {
                self.decode_rows(Par::Team(team), &ids, cache)
            })
        } else {
            rayon::scope(|_| self.decode_rows(Par::Pool, &ids, cache))
        }
    }

    /// [`Transformer::decode_step`] on the ids as a list, its parallel work shared by `par`.
    /// Each row is at its own position (a server's requests join the batch at any step).
    fn decode_rows(&self, par: Par, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let rows = ids.len();
        let pasts = cache.row_pasts(rows)?;
        let d = self.config.transformer.d_model;
        let vocab = self.layout.vocab_size();
        let capacity = self.seq_len();
        // Token embedding plus the row's position embedding (text position, or image row +
        // column).
        let mut x = vec![0f32; rows * d];
        {
            let table = raw(self.tokens.embeddings())?;
            let table = table.get();
            let (text_pos, rw, cw) = (
                raw(&self.text_pos)?,
                raw(&self.image_row)?,
                raw(&self.image_col)?,
            );
            for ((xr, &id), &past) in x.chunks_exact_mut(d).zip(ids).zip(&pasts) {
                let Some(e) = table.get(id as usize * d..(id as usize + 1) * d) else {
                    candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
                };
                if past < self.text_len {
                    let pos = &text_pos.get()[past * d..(past + 1) * d];
                    xr.iter_mut()
                        .zip(e.iter().zip(pos))
                        .for_each(|(o, (a, b))| *o = a + b);
                } else {
                    let (r, c) = (
                        (past - self.text_len) / self.grid,
                        (past - self.text_len) % self.grid,
                    );
                    let (rp, cp) = (&rw.get()[r * d..(r + 1) * d], &cw.get()[c * d..(c + 1) * d]);
                    for (((o, a), b), c) in xr.iter_mut().zip(e).zip(rp).zip(cp) {
                        *o = a + (b + c);
                    }
                }
            }
        }
        // The positions each layer's mask allows each row's query to read: one set of lists
        // per distinct position among the rows.
        let mut distinct: Vec<usize> = pasts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let allowed: Vec<(Vec<Vec<u32>>, Vec<usize>)> =
            distinct.iter().map(|&p| self.allowed_keys(p)).collect();
        let of_row: Vec<usize> = pasts
            .iter()
            .map(|p| distinct.binary_search(p).unwrap_or(0))
            .collect();
        let mut s = Scratch {
            h: vec![0f32; rows * d],
            qkv: vec![0f32; rows * 3 * d],
            y: vec![0f32; rows * d],
            a: vec![0f32; rows * d],
            fc: vec![0f32; rows * 4 * d],
        };
        let at: &[usize] = match cache.past_len() {
            Some(_) => &pasts[..1],
            None => &pasts,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let keys: Vec<&[u32]> = of_row
                .iter()
                .map(|&j| &allowed[j].0[allowed[j].1[i]][..])
                .collect();
            block.decode(
                par,
                &mut x,
                &mut s,
                &mut cache.layers[i],
                (at, capacity),
                &keys,
            )?;
        }
        cache.pasts = pasts.iter().map(|p| p + 1).collect();
        layer_norm(&self.ln_f, &x, d, &mut s.h)?;
        if let Some(ln) = &self.ln_head {
            layer_norm(ln, &s.h, d, &mut s.y)?;
            std::mem::swap(&mut s.h, &mut s.y);
        }
        let mut logits = vec![0f32; rows * vocab];
        linear(par, &self.head, &s.h, &mut logits, |v| v)?;
        Tensor::from_vec(logits, (rows, 1, vocab), &candle_core::Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_heads_agree_with_the_portable_one() {
        let mut rng = crate::rng::Rng::new(7);
        for hd in [16, 24, 32, 64, 128] {
            let capacity = 40;
            let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
            let (q, k, v) = (draw(hd), draw(capacity * hd), draw(capacity * hd));
            let keys: Vec<u32> = (0..capacity as u32).filter(|p| p % 3 != 1).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let (mut want, mut got) = (vec![0f32; hd], vec![1f32; hd]);
            head_portable(&q, &k, &v, &keys, scale, &mut want);
            pick_head(hd)(&q, &k, &v, &keys, scale, &mut got);
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() < 1e-5, "head width {hd}: {a} vs {b}");
            }
        }
    }
}
