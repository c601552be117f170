//! `transformer.onnx`: the stage-2 transformer with a KV cache, op for op as
//! `dalle::transformer::Transformer`. One graph serves prefill (past length 0) and decoding: row
//! `r`'s positions `past[r] .. past[r] + seq` come from the `past_sequence_length` input, one
//! length per row (schema 3), so rows at different points of their sequences — a server's
//! requests that joined the batch at different steps — share one call. The cache is a
//! fixed-capacity buffer per layer that the graph only reads; `present` carries just the new
//! positions, which the caller writes into its buffer. Attention is sparse in the
//! graph as in candle: each query gathers from the cache only the keys its layer's mask allows
//! (a constant index table per distinct attention kind, built from [`dalle_runtimes::allowed`]),
//! so a decode step's attention reads the same number of keys at the first image token and the
//! last; this call's own keys are attended densely under the rows/columns `past .. past + seq`
//! of a constant mask table.

use crate::onnx::{Attr, Dim, Elem, Graph};
use crate::{ExportError, TransformerSpec, Weights};
use dalle_runtimes::{allowed, layer_kinds, names, AttentionKind, Dtype, Geometry, TokenLayout};
use tract_onnx::pb::ModelProto;

type R<T> = Result<T, ExportError>;

/// Layer-norm ε of the candle model.
const LN_EPS: f32 = 1e-5;

/// Additive mask table for one kind: 0 where query row may see key column, −∞ elsewhere.
pub fn mask_table(geometry: &Geometry, kind: AttentionKind) -> Vec<f32> {
    let n = geometry.seq_len();
    (0..n * n)
        .map(|i| {
            if allowed(geometry.text_len, geometry.grid, kind, i / n, i % n) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}

/// Each query position's allowed keys in ascending order, padded with the query's own position
/// to the widest row: `(table [seq_max, width], width)`. A row's keys below any `past ≤ p` are
/// its first entries, at most `past` of them.
pub fn key_table(geometry: &Geometry, kind: AttentionKind) -> (Vec<i64>, usize) {
    let n = geometry.seq_len();
    let rows: Vec<Vec<i64>> = (0..n)
        .map(|q| {
            (0..=q)
                .filter(|&k| allowed(geometry.text_len, geometry.grid, kind, q, k))
                .map(|k| k as i64)
                .collect()
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut table = Vec::with_capacity(n * width);
    for (q, row) in rows.iter().enumerate() {
        table.extend_from_slice(row);
        table.extend(std::iter::repeat_n(q as i64, width - row.len()));
    }
    (table, width)
}

/// What every layer of one attention kind shares in a call at positions `past[r] .. past[r] +
/// seq` of each row `r`.
#[derive(Clone)]
struct KindTables {
    /// i64 `[b, heads, seq · c, 1]`: each query's cached key positions, for a `GatherND` over
    /// the cache `[b, heads, max_seq, hd]` with two batch dimensions (each row and head reads
    /// its own positions; the cache is not reshaped, which would copy it in tract), c =
    /// min(width, max(max(past), 1)).
    rows: String,
    /// i64 `[5]`: `[0, 0, seq, -1, hd]`, the gathered keys' shape per query.
    per_query: String,
    /// `[b, 1, seq, seq + c]`: 0 where the query may see the key, −∞ elsewhere, over [this
    /// call's own positions ++ the gathered cached keys]; a gathered key at or past the row's
    /// `past` is one of this call's own (counted in the first block) or padding, so it is −∞
    /// in the second.
    mask: String,
}

/// `positions` is the i64 `[b, seq]` tensor `past[r] .. past[r] + seq`; `past` is i64 `[b]`,
/// `seq` i64 `[1]`. Every shape follows from `positions` (gathers, not slices with computed
/// bounds), so tract's symbolic shapes stay `seq`.
fn kind_tables(
    g: &mut Graph,
    geometry: &Geometry,
    kind: AttentionKind,
    (heads, hd): (usize, usize),
    past: &str,
    positions: &str,
    seq: &str,
) -> KindTables {
    let n = geometry.seq_len();
    let (keys, width) = key_table(geometry, kind);
    let c = {
        let (one, w) = (g.ints(&[1]), g.ints(&[width as i64]));
        let most = g.op("ReduceMax", &[past], vec![("keepdims", Attr::Int(1))]);
        let at_least_one = g.op("Max", &[&most, &one], vec![]);
        g.op("Min", &[&w, &at_least_one], vec![])
    };
    let keys = g.int_table(&keys, &[n, width]);
    // [b, seq, width] → [b, seq, c]
    let rows = g.op("Gather", &[&keys, positions], vec![("axis", Attr::Int(0))]);
    let c0 = g.op("Squeeze", &[&c], vec![]);
    let (z0, o0) = (g.int_scalar(0), g.int_scalar(1));
    let cols = g.op("Range", &[&z0, &c0, &o0], vec![]);
    let rows = g.op("Gather", &[&rows, &cols], vec![("axis", Attr::Int(2))]);
    let (one, two) = (g.ints(&[1]), g.ints(&[1, 2]));
    let past3 = g.op("Unsqueeze", &[past, &two], vec![]);
    let cached = g.op("Less", &[&rows, &past3], vec![]);
    let (open, shut) = (g.scalar(0.0), g.scalar(f32::NEG_INFINITY));
    let cached_mask = g.op("Where", &[&cached, &open, &shut], vec![]);
    // This call's own block: table[positions[r, i], positions[r, j]], from the flattened table.
    let table = g.table(&mask_table(geometry, kind), &[n * n]);
    let nn = g.int_scalar(n as i64);
    let (last, mid) = (g.ints(&[2]), g.ints(&[1]));
    let qi = g.op("Unsqueeze", &[positions, &last], vec![]);
    let qi = g.op("Mul", &[&qi, &nn], vec![]);
    let kj = g.op("Unsqueeze", &[positions, &mid], vec![]);
    let own_idx = g.op("Add", &[&qi, &kj], vec![]);
    let own_mask = g.op("Gather", &[&table, &own_idx], vec![("axis", Attr::Int(0))]);
    let mask = g.op(
        "Concat",
        &[&own_mask, &cached_mask],
        vec![("axis", Attr::Int(2))],
    );
    let mask = g.op("Unsqueeze", &[&mask, &one], vec![]);
    // [b, seq, c] → [b, heads, seq · c, 1]
    let rows = g.op("Unsqueeze", &[&rows, &one], vec![]);
    let every_head = g.ints(&[1, heads as i64, 1, 1]);
    let rows = g.op("Expand", &[&rows, &every_head], vec![]);
    let flat = g.ints(&[0, 0, -1, 1]);
    let rows = g.op("Reshape", &[&rows, &flat], vec![]);
    let (zz, tail) = (g.ints(&[0, 0]), g.ints(&[-1, hd as i64]));
    let per_query = g.op("Concat", &[&zz, seq, &tail], vec![("axis", Attr::Int(0))]);
    KindTables {
        rows,
        mask,
        per_query,
    }
}

/// Attention of `q` `[b, h, seq, hd]` over the cached keys its mask allows — gathered per query
/// from `cached` by `tables.rows`, so a decode step reads only those, not the whole cache — and
/// over this call's own keys `new`, as one softmax over both blocks; `seq` is i64 `[1]`, this
/// call's length. Returns `[b, h, seq, hd]`.
fn sparse_attention(
    g: &mut Graph,
    tables: &KindTables,
    q: &str,
    new: (&str, &str),
    cached: (&str, &str),
    hd: usize,
    seq: &str,
) -> String {
    // [b, h, seq, c, hd]
    let gather = |g: &mut Graph, cache: &str| {
        let x = g.op(
            "GatherND",
            &[cache, &tables.rows],
            vec![("batch_dims", Attr::Int(2))],
        );
        g.op("Reshape", &[&x, &tables.per_query], vec![])
    };
    let (kg, vg) = (gather(g, cached.0), gather(g, cached.1));
    let three = g.ints(&[3]);
    let scale = g.scalar(1.0 / (hd as f32).sqrt());
    let q = g.op("Mul", &[q, &scale], vec![]);
    let q5 = g.op("Unsqueeze", &[&q, &three], vec![]);
    let kgt = g.op(
        "Transpose",
        &[&kg],
        vec![("perm", Attr::Ints(vec![0, 1, 2, 4, 3]))],
    );
    let s_cached = g.op("MatMul", &[&q5, &kgt], vec![]);
    let s_cached = g.op("Squeeze", &[&s_cached, &three], vec![]);
    let kt = g.op(
        "Transpose",
        &[new.0],
        vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
    );
    let s_own = g.op("MatMul", &[&q, &kt], vec![]);
    // One softmax over [own ++ cached] (own first: its width is `seq`, a shape tract can type,
    // so both slices below have symbolic lengths). Every row has a finite score: a query sees
    // itself.
    let s = g.op(
        "Concat",
        &[&s_own, &s_cached],
        vec![("axis", Attr::Int(-1))],
    );
    let s = g.op("Add", &[&s, &tables.mask], vec![]);
    let att = g.op("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
    let (zero, huge) = (g.ints(&[0]), g.ints(&[i64::MAX]));
    let a_own = g.op("Slice", &[&att, &zero, seq, &three], vec![]);
    let a_cached = g.op("Slice", &[&att, seq, &huge, &three], vec![]);
    let y_own = g.op("MatMul", &[&a_own, new.1], vec![]);
    let a_cached = g.op("Unsqueeze", &[&a_cached, &three], vec![]);
    let y_cached = g.op("MatMul", &[&a_cached, &vg], vec![]);
    let y_cached = g.op("Squeeze", &[&y_cached, &three], vec![]);
    g.op("Add", &[&y_own, &y_cached], vec![])
}

fn layer_norm(g: &mut Graph, x: &str, prefix: &str, d: usize) -> R<String> {
    let w = g.weight(&format!("{prefix}.weight"), &[d])?;
    let b = g.weight(&format!("{prefix}.bias"), &[d])?;
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(LN_EPS))],
    ))
}

/// candle-nn's `Linear`: x · Wᵀ + b with W stored (out, in) under `{prefix}.weight`.
fn linear(g: &mut Graph, x: &str, prefix: &str, n_in: usize, n_out: usize) -> R<String> {
    let w = g.weight(&format!("{prefix}.weight"), &[n_out, n_in])?;
    let b = g.weight(&format!("{prefix}.bias"), &[n_out])?;
    let wt = g.op("Transpose", &[&w], vec![("perm", Attr::Ints(vec![1, 0]))]);
    let y = g.op("MatMul", &[x, &wt], vec![]);
    Ok(g.op("Add", &[&y, &b], vec![]))
}

/// candle's `gelu`: the tanh approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), written
/// as x·σ(x·(a + b·x²)) with a = 2√(2/π), b = 0.044715·a (0.5·(1 + tanh z) = σ(2z)): six nodes
/// instead of nine.
fn gelu(g: &mut Graph, x: &str) -> String {
    let a = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
    let x2 = g.op("Mul", &[x, x], vec![]);
    let b = g.scalar((0.044715 * a) as f32);
    let bx2 = g.op("Mul", &[&x2, &b], vec![]);
    let a = g.scalar(a as f32);
    let p = g.op("Add", &[&bx2, &a], vec![]);
    let z = g.op("Mul", &[x, &p], vec![]);
    let s = g.op("Sigmoid", &[&z], vec![]);
    g.op("Mul", &[x, &s], vec![])
}

/// What the graph's `present` outputs hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Present {
    /// The model directory's contract: this call's positions only, `[batch, heads, seq,
    /// head_dim]`; the caller writes them into its buffers.
    NewPositions,
    /// For servers whose state is replaced whole by the outputs (Triton's implicit state): the
    /// full buffers `[batch, heads, max_seq, head_dim]` with this call's positions written in at
    /// `past_sequence_length`, and `present_sequence_length` = the next call's past length.
    FullBuffers,
}

/// Index tensors of the spans of a full buffer that a call keeps.
struct Spans {
    zero: String,
    past: String,
    end: String,
    cap: String,
    axis: String,
}

/// `out` = `buf` (f32 `[b, h, max_seq, hd]`) with `new` (`[b, h, seq, hd]`) at positions
/// `past .. past + seq`.
fn write_in(g: &mut Graph, buf: &str, new: &str, s: &Spans, out: &str) {
    let before = g.op("Slice", &[buf, &s.zero, &s.past, &s.axis], vec![]);
    let after = g.op("Slice", &[buf, &s.end, &s.cap, &s.axis], vec![]);
    g.op_to(
        "Concat",
        &[&before, new, &after],
        vec![("axis", Attr::Int(2))],
        out,
    );
}

/// Build the graph. Inputs `input_ids` and `past_key_values.{i}.key/value`; outputs `logits`
/// and `present.{i}.key/value` (see `dalle_runtimes::names`).
pub fn transformer(
    geometry: &Geometry,
    spec: &TransformerSpec,
    weights: &Weights,
    dtype: Dtype,
    opset: i64,
    source: &str,
) -> R<ModelProto> {
    transformer_with(
        geometry,
        spec,
        weights,
        dtype,
        opset,
        source,
        Present::NewPositions,
    )
}

/// [`transformer`], with the `present` outputs of `present`.
pub fn transformer_with(
    geometry: &Geometry,
    spec: &TransformerSpec,
    weights: &Weights,
    dtype: Dtype,
    opset: i64,
    source: &str,
    present: Present,
) -> R<ModelProto> {
    let mut g = Graph::new(dtype, source, weights);
    let layout = TokenLayout::from(geometry);
    let (d, heads) = (spec.d_model, spec.n_heads);
    let hd = d / heads;
    let (vocab, grid, seq_max) = (layout.vocab_size(), geometry.grid, geometry.seq_len());
    let batch = Dim::Named(names::DIM_BATCH);
    let ids = g.input(
        names::INPUT_IDS,
        Elem::I64,
        &[batch.clone(), Dim::Named(names::DIM_SEQ)],
    );
    // Each row's past length (schema 3); the full-buffer variant serves one sequence a call
    // (Triton's sequence batcher) and keeps its one length, `[1]`.
    let past_dims = match present {
        Present::NewPositions => [batch.clone()],
        Present::FullBuffers => [Dim::Fixed(1)],
    };
    let past_len = g.input(names::PAST_LENGTH, Elem::I64, &past_dims);
    let kv_dims = |len: Dim| [batch.clone(), Dim::Fixed(heads), len, Dim::Fixed(hd)];
    let mut past = vec![];
    for i in 0..spec.n_layers {
        let k = g.input(
            &names::past_key(i),
            Elem::F32,
            &kv_dims(Dim::Fixed(seq_max)),
        );
        let v = g.input(
            &names::past_value(i),
            Elem::F32,
            &kv_dims(Dim::Fixed(seq_max)),
        );
        past.push((k, v));
    }

    let x = g.scoped("/model", |g| -> R<String> {
        // Positions past[r] .. past[r] + seq of each row r: Range(0, seq) + past, [b, seq].
        let (seq, past_rows, positions) = g.scoped("positions", |g| {
            let seq = g.op(
                "Shape",
                &[&ids],
                vec![("start", Attr::Int(1)), ("end", Attr::Int(2))],
            );
            let b = g.op(
                "Shape",
                &[&ids],
                vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
            );
            let past_rows = match present {
                Present::NewPositions => past_len.clone(),
                Present::FullBuffers => g.op("Expand", &[&past_len, &b], vec![]),
            };
            let t = g.op("Squeeze", &[&seq], vec![]);
            let (zero, one) = (g.int_scalar(0), g.int_scalar(1));
            let offsets = g.op("Range", &[&zero, &t, &one], vec![]);
            let axis = g.ints(&[1]);
            let past2 = g.op("Unsqueeze", &[&past_rows, &axis], vec![]);
            let positions = g.op("Add", &[&past2, &offsets], vec![]);
            (seq.clone(), past_rows, positions)
        });
        // Full-buffer outputs: the kept spans [0, past) and [past + seq, max_seq) of each buffer.
        let spans = (present == Present::FullBuffers).then(|| {
            g.scoped("present.spans", |g| {
                let end = g.op("Add", &[&past_len, &seq], vec![]);
                Spans {
                    zero: g.ints(&[0]),
                    past: past_len.clone(),
                    end,
                    cap: g.ints(&[seq_max as i64]),
                    axis: g.ints(&[2]),
                }
            })
        });
        if let Some(s) = &spans {
            g.op_to("Identity", &[&s.end], vec![], names::PRESENT_LENGTH);
        }
        let x = g.scoped("embed", |g| -> R<String> {
            let table = g.weight("embed.tokens.weight", &[vocab, d])?;
            let tok = g.op("Gather", &[&table, &ids], vec![("axis", Attr::Int(0))]);
            let text_pos = g.weight("embed.text_pos", &[geometry.text_len, d])?;
            let row = g.weight("embed.image_row", &[grid, d])?;
            let col = g.weight("embed.image_col", &[grid, d])?;
            // image position (r, c) = row[r] + col[c], raster order.
            let (one, zero) = (g.ints(&[1]), g.ints(&[0]));
            let r3 = g.op("Unsqueeze", &[&row, &one], vec![]);
            let c3 = g.op("Unsqueeze", &[&col, &zero], vec![]);
            let rc = g.op("Add", &[&r3, &c3], vec![]);
            let flat = g.ints(&[(grid * grid) as i64, d as i64]);
            let image_pos = g.op("Reshape", &[&rc, &flat], vec![]);
            let all = g.op(
                "Concat",
                &[&text_pos, &image_pos],
                vec![("axis", Attr::Int(0))],
            );
            let pos = g.op("Gather", &[&all, &positions], vec![("axis", Attr::Int(0))]);
            Ok(g.op("Add", &[&tok, &pos], vec![]))
        })?;

        // Per distinct kind: which cached keys each query gathers, and the additive mask over
        // [gathered cached keys ++ this call's keys].
        let kinds = layer_kinds(spec.n_layers, spec.conv_kernel);
        let sandwich = spec.norms.sandwich;
        let mut tables: Vec<(AttentionKind, KindTables)> = vec![];
        for &kind in &kinds {
            if tables.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let label = match kind {
                AttentionKind::Row => "row",
                AttentionKind::Column => "column",
                AttentionKind::Conv { .. } => "conv",
            };
            let t = g.scoped(&format!("mask.{label}"), |g| {
                kind_tables(g, geometry, kind, (heads, hd), &past_rows, &positions, &seq)
            });
            tables.push((kind, t));
        }

        let mut x = x;
        for (i, kind) in kinds.iter().enumerate() {
            let tables = tables
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, t)| t.clone())
                .expect("every kind has tables");
            let (pk, pv) = past[i].clone();
            x = g.scoped(&format!("layers.{i}"), |g| -> R<String> {
                let p = format!("layers.{i}");
                let h = g.scoped("ln_1", |g| layer_norm(g, &x, &format!("{p}.ln_1"), d))?;
                let a = g.scoped("attn", |g| -> R<String> {
                    let qkv =
                        g.scoped("qkv", |g| linear(g, &h, &format!("{p}.attn.qkv"), d, 3 * d))?;
                    let shape = g.ints(&[0, 0, 3, heads as i64, hd as i64]);
                    let qkv = g.op("Reshape", &[&qkv, &shape], vec![]);
                    let qkv = g.op(
                        "Transpose",
                        &[&qkv],
                        vec![("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))],
                    );
                    let pick = |g: &mut Graph, j: i64| {
                        let idx = g.int_scalar(j);
                        g.op("Gather", &[&qkv, &idx], vec![("axis", Attr::Int(0))])
                    };
                    let (q, k, v) = (pick(g, 0), pick(g, 1), pick(g, 2));
                    // The new positions go out as `present`, for the caller to write into its
                    // buffer; the buffer itself is only read, at the gathered positions.
                    match present {
                        Present::NewPositions => {
                            g.to_f32_output(&k, &names::present_key(i));
                            g.to_f32_output(&v, &names::present_value(i));
                        }
                        Present::FullBuffers => {
                            let spans = spans.as_ref().expect("spans of the full buffers");
                            for (new, buf, out) in [
                                (&k, &pk, names::present_key(i)),
                                (&v, &pv, names::present_value(i)),
                            ] {
                                let new = g.scoped("present", |g| {
                                    let t = format!("{new}.f32");
                                    g.to_f32_output(new, &t);
                                    t
                                });
                                write_in(g, buf, &new, spans, &out);
                            }
                        }
                    }
                    let (ck, cv) = (g.from_f32(&pk), g.from_f32(&pv));
                    let y = sparse_attention(g, &tables, &q, (&k, &v), (&ck, &cv), hd, &seq);
                    let y = g.op(
                        "Transpose",
                        &[&y],
                        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
                    );
                    let merged = g.ints(&[0, 0, d as i64]);
                    let y = g.op("Reshape", &[&y, &merged], vec![]);
                    let y = g.scoped("proj", |g| linear(g, &y, &format!("{p}.attn.proj"), d, d))?;
                    if !sandwich {
                        return Ok(y);
                    }
                    g.scoped("ln_out", |g| {
                        layer_norm(g, &y, &format!("{p}.attn.ln_out"), d)
                    })
                })?;
                let x = g.op("Add", &[&x, &a], vec![]);
                let h = g.scoped("ln_2", |g| layer_norm(g, &x, &format!("{p}.ln_2"), d))?;
                let m = g.scoped("mlp", |g| -> R<String> {
                    let f = g.scoped("fc", |g| linear(g, &h, &format!("{p}.mlp.fc"), d, 4 * d))?;
                    let f = g.scoped("gelu", |g| gelu(g, &f));
                    let y = g.scoped("proj", |g| {
                        linear(g, &f, &format!("{p}.mlp.proj"), 4 * d, d)
                    })?;
                    if !sandwich {
                        return Ok(y);
                    }
                    g.scoped("ln_out", |g| {
                        layer_norm(g, &y, &format!("{p}.mlp.ln_out"), d)
                    })
                })?;
                Ok(g.op("Add", &[&x, &m], vec![]))
            })?;
            let elem = g.dtype;
            g.annotate(
                &x,
                elem,
                &[batch.clone(), Dim::Named(names::DIM_SEQ), Dim::Fixed(d)],
            );
        }
        let mut h = g.scoped("ln_f", |g| layer_norm(g, &x, "ln_f", d))?;
        if spec.norms.head {
            h = g.scoped("ln_head", |g| layer_norm(g, &h, "ln_head", d))?;
        }
        g.scoped("head", |g| linear(g, &h, "head", d, vocab))
    })?;
    g.scoped("/model", |g| g.to_f32_output(&x, names::LOGITS));
    g.output(
        names::LOGITS,
        Elem::F32,
        &[batch.clone(), Dim::Named(names::DIM_SEQ), Dim::Fixed(vocab)],
    );
    let present_len = match present {
        Present::NewPositions => Dim::Named(names::DIM_SEQ),
        Present::FullBuffers => Dim::Fixed(seq_max),
    };
    for i in 0..spec.n_layers {
        g.output(
            &names::present_key(i),
            Elem::F32,
            &kv_dims(present_len.clone()),
        );
        g.output(
            &names::present_value(i),
            Elem::F32,
            &kv_dims(present_len.clone()),
        );
    }
    if present == Present::FullBuffers {
        g.output(names::PRESENT_LENGTH, Elem::I64, &[Dim::Fixed(1)]);
    }
    g.finish(
        "transformer",
        opset,
        "DALL·E stage-2 transformer (Ramesh et al. 2021) with a KV cache: input_ids at \
         positions past_sequence_length[row] .. + seq, past_key_values (fixed-capacity buffers, \
         read only at the keys each layer's mask allows) → logits, present keys/values of the \
         new positions (the caller writes them into its buffers)",
    )
}
