//! `transformer.onnx`: the stage-2 transformer with a KV cache, op for op as
//! `dalle::transformer::Transformer`. One graph serves prefill (past length 0) and decoding: the
//! positions `past .. past + seq` come from the past keys' shape, and each layer's additive mask is
//! the rows `past .. past + seq`, columns `0 .. past + seq` of a constant table computed from
//! [`dalle_runtimes::allowed`], one table per distinct attention kind.

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

/// candle's `gelu`: the tanh approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
fn gelu(g: &mut Graph, x: &str) -> String {
    let x2 = g.op("Mul", &[x, x], vec![]);
    let x3 = g.op("Mul", &[&x2, x], vec![]);
    let c = g.scalar(0.044715);
    let cx3 = g.op("Mul", &[&x3, &c], vec![]);
    let inner = g.op("Add", &[x, &cx3], vec![]);
    let k = g.scalar((2.0 / std::f64::consts::PI).sqrt() as f32);
    let scaled = g.op("Mul", &[&inner, &k], vec![]);
    let t = g.op("Tanh", &[&scaled], vec![]);
    let one = g.scalar(1.0);
    let t1 = g.op("Add", &[&t, &one], vec![]);
    let half = g.scalar(0.5);
    let hx = g.op("Mul", &[x, &half], vec![]);
    g.op("Mul", &[&hx, &t1], vec![])
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
    let mut g = Graph::new(dtype, source, weights);
    let layout = TokenLayout::from(geometry);
    let (d, heads) = (spec.d_model, spec.n_heads);
    let hd = d / heads;
    let (vocab, seq_max, grid) = (layout.vocab_size(), geometry.seq_len(), geometry.grid);
    let batch = Dim::Named(names::DIM_BATCH);
    let ids = g.input(
        names::INPUT_IDS,
        Elem::I64,
        &[batch.clone(), Dim::Named(names::DIM_SEQ)],
    );
    let kv_dims = |len: &'static str| {
        [
            batch.clone(),
            Dim::Fixed(heads),
            Dim::Named(len),
            Dim::Fixed(hd),
        ]
    };
    let mut past = vec![];
    for i in 0..spec.n_layers {
        let k = g.input(&names::past_key(i), Elem::F32, &kv_dims(names::DIM_PAST));
        let v = g.input(&names::past_value(i), Elem::F32, &kv_dims(names::DIM_PAST));
        past.push((k, v));
    }

    let x = g.scoped("/model", |g| -> R<String> {
        // past = past_key_values.0.key.shape[2]; positions past .. past + seq.
        let (past_len, end) = g.scoped("positions", |g| {
            let past_len = g.op(
                "Shape",
                &[&past[0].0],
                vec![("start", Attr::Int(2)), ("end", Attr::Int(3))],
            );
            let t = g.op(
                "Shape",
                &[&ids],
                vec![("start", Attr::Int(1)), ("end", Attr::Int(2))],
            );
            let end = g.op("Add", &[&past_len, &t], vec![]);
            (past_len, end)
        });
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
            let axes = g.ints(&[0]);
            let pos = g.op("Slice", &[&all, &past_len, &end, &axes], vec![]);
            Ok(g.op("Add", &[&tok, &pos], vec![]))
        })?;

        // Mask rows past .. end, columns 0 .. end of each distinct kind's table.
        let kinds = layer_kinds(spec.n_layers, spec.conv_kernel);
        let mut masks: Vec<(AttentionKind, String)> = vec![];
        for &kind in &kinds {
            if masks.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let label = match kind {
                AttentionKind::Row => "row",
                AttentionKind::Column => "column",
                AttentionKind::Conv { .. } => "conv",
            };
            let m = g.scoped(&format!("mask.{label}"), |g| {
                let table = g.table(&mask_table(geometry, kind), &[seq_max, seq_max]);
                let zero = g.ints(&[0]);
                let starts = g.op("Concat", &[&past_len, &zero], vec![("axis", Attr::Int(0))]);
                let ends = g.op("Concat", &[&end, &end], vec![("axis", Attr::Int(0))]);
                let axes = g.ints(&[0, 1]);
                g.op("Slice", &[&table, &starts, &ends, &axes], vec![])
            });
            masks.push((kind, m));
        }

        let mut x = x;
        for (i, kind) in kinds.iter().enumerate() {
            let mask = masks
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, m)| m.clone());
            let mask = mask.expect("every kind has a table");
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
                    let cache = |g: &mut Graph, past: &str, new: &str, present: String| {
                        let past = g.from_f32(past);
                        let all = g.op("Concat", &[&past, new], vec![("axis", Attr::Int(2))]);
                        g.to_f32_output(&all, &present);
                        all
                    };
                    let k = cache(g, &pk, &k, names::present_key(i));
                    let v = cache(g, &pv, &v, names::present_value(i));
                    let kt = g.op(
                        "Transpose",
                        &[&k],
                        vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
                    );
                    let s = g.op("MatMul", &[&q, &kt], vec![]);
                    let scale = g.scalar(1.0 / (hd as f32).sqrt());
                    let s = g.op("Mul", &[&s, &scale], vec![]);
                    let s = g.op("Add", &[&s, &mask], vec![]);
                    let att = g.op("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
                    let y = g.op("MatMul", &[&att, &v], vec![]);
                    let y = g.op(
                        "Transpose",
                        &[&y],
                        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
                    );
                    let merged = g.ints(&[0, 0, d as i64]);
                    let y = g.op("Reshape", &[&y, &merged], vec![]);
                    g.scoped("proj", |g| linear(g, &y, &format!("{p}.attn.proj"), d, d))
                })?;
                let x = g.op("Add", &[&x, &a], vec![]);
                let h = g.scoped("ln_2", |g| layer_norm(g, &x, &format!("{p}.ln_2"), d))?;
                let m = g.scoped("mlp", |g| -> R<String> {
                    let f = g.scoped("fc", |g| linear(g, &h, &format!("{p}.mlp.fc"), d, 4 * d))?;
                    let f = g.scoped("gelu", |g| gelu(g, &f));
                    g.scoped("proj", |g| {
                        linear(g, &f, &format!("{p}.mlp.proj"), 4 * d, d)
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
        let h = g.scoped("ln_f", |g| layer_norm(g, &x, "ln_f", d))?;
        g.scoped("head", |g| linear(g, &h, "head", d, vocab))
    })?;
    g.scoped("/model", |g| g.to_f32_output(&x, names::LOGITS));
    g.output(
        names::LOGITS,
        Elem::F32,
        &[batch.clone(), Dim::Named(names::DIM_SEQ), Dim::Fixed(vocab)],
    );
    for i in 0..spec.n_layers {
        g.output(
            &names::present_key(i),
            Elem::F32,
            &kv_dims(names::DIM_TOTAL),
        );
        g.output(
            &names::present_value(i),
            Elem::F32,
            &kv_dims(names::DIM_TOTAL),
        );
    }
    g.finish(
        "transformer",
        opset,
        "DALL·E stage-2 transformer (Ramesh et al. 2021) with a KV cache: \
         input_ids at positions past_seq .. past_seq + seq → logits, present keys/values",
    )
}
