//! The dVAE graphs: `dvae_encoder.onnx` (image → argmax tokens) and `dvae_decoder.onnx`
//! (tokens → image), op for op as the candle model in `dalle::vae::model` (OpenAI's `dall_e` 0.1).

use crate::onnx::{Attr, Dim, Elem, Graph};
use crate::{DvaeSpec, ExportError, Weights};
use dalle_runtimes::manifest::{DvaeEncoder, PATCH_HIDDEN_LAYERS};
use dalle_runtimes::{names, Dtype, Geometry};
use tract_onnx::pb::ModelProto;

/// ε of `dall_e`'s `map_pixels` / `unmap_pixels`.
const LOGIT_LAPLACE_EPS: f32 = 0.1;

type R<T> = Result<T, ExportError>;

/// `dall_e.utils.Conv2d`: weights `{prefix}.w` (n_out, n_in, k, k), `{prefix}.b`, "same" padding.
fn conv(g: &mut Graph, x: &str, prefix: &str, n_in: usize, n_out: usize, k: usize) -> R<String> {
    let w = g.weight(&format!("{prefix}.w"), &[n_out, n_in, k, k])?;
    let b = g.weight(&format!("{prefix}.b"), &[n_out])?;
    let p = ((k - 1) / 2) as i64;
    let attrs = vec![
        ("kernel_shape", Attr::Ints(vec![k as i64, k as i64])),
        ("pads", Attr::Ints(vec![p, p, p, p])),
    ];
    Ok(g.op("Conv", &[x, &w, &b], attrs))
}

/// What happens between groups.
#[derive(Clone, Copy)]
enum Resample {
    /// 2×2 max pooling (encoder).
    Pool,
    /// Nearest ×2 upsampling (decoder).
    Up,
}

/// The residual groups shared by both networks, with `resample` between groups, then ReLU and
/// the 1×1 output conv. `widths[g]` is group g + 1's width.
#[allow(clippy::too_many_arguments)]
fn trunk(
    g: &mut Graph,
    mut x: String,
    mut width: usize,
    widths: &[usize],
    spec: &DvaeSpec,
    kernels: [usize; 4],
    n_out: usize,
    (mut side, resample): (usize, Resample),
) -> R<String> {
    let post_gain = spec.post_gain as f32;
    for (gi, &out) in widths.iter().enumerate() {
        let group = format!("group_{}", gi + 1);
        for bi in 1..=spec.n_blk_per_group {
            let block = format!("block_{bi}");
            let prefix = format!("blocks.{group}.{block}");
            let input = x.clone();
            x = g.scoped(&group, |g| {
                g.scoped(&block, |g| -> R<String> {
                    let id = if width != out {
                        g.scoped("id_path", |g| {
                            conv(g, &input, &format!("{prefix}.id_path"), width, out, 1)
                        })?
                    } else {
                        input.clone()
                    };
                    let hid = out / 4;
                    let dims = [(width, hid), (hid, hid), (hid, hid), (hid, out)];
                    let mut h = input.clone();
                    for (i, &(a, b)) in dims.iter().enumerate() {
                        let name = format!("conv_{}", i + 1);
                        h = g.scoped("res_path", |g| {
                            g.scoped(&name, |g| {
                                let r = g.op("Relu", &[&h], vec![]);
                                conv(
                                    g,
                                    &r,
                                    &format!("{prefix}.res_path.{name}"),
                                    a,
                                    b,
                                    kernels[i],
                                )
                            })
                        })?;
                    }
                    let gain = g.scalar(post_gain);
                    let h = g.op("Mul", &[&h, &gain], vec![]);
                    Ok(g.op("Add", &[&id, &h], vec![]))
                })
            })?;
            width = out;
        }
        if gi + 1 < widths.len() {
            (x, side) = match resample {
                Resample::Pool => (g.scoped(&group, |g| max_pool(g, &x)), side / 2),
                Resample::Up => (g.scoped(&group, |g| upsample(g, &x, width, side)), side * 2),
            };
        }
    }
    g.scoped("output", |g| {
        let r = g.op("Relu", &[&x], vec![]);
        conv(g, &r, "blocks.output.conv", width, n_out, 1)
    })
}

fn max_pool(g: &mut Graph, x: &str) -> String {
    g.op(
        "MaxPool",
        &[x],
        vec![
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
        ],
    )
}

/// Nearest ×2 as a reshape and a broadcast: (b, c, h, w) → (b, c, h, 1, w, 1) → expand to
/// (…, 2, …, 2) → (b, c, 2h, 2w); `side` is h (= w).
pub(crate) fn upsample(g: &mut Graph, x: &str, width: usize, side: usize) -> String {
    let (c, s) = (width as i64, side as i64);
    let six = g.ints(&[0, c, s, 1, s, 1]);
    let x6 = g.op("Reshape", &[x, &six], vec![]);
    let rep = g.ints(&[1, 1, 1, 2, 1, 2]);
    let up = g.op("Expand", &[&x6, &rep], vec![]);
    let four = g.ints(&[0, c, 2 * s, 2 * s]);
    g.op("Reshape", &[&up, &four], vec![])
}

/// The encoders' output: `image_tokens` i64 [batch, n], the argmax over axis 1 of `logits`
/// (batch, codebook, n).
pub(crate) fn argmax_tokens(g: &mut Graph, logits: &str, n: usize) {
    g.scoped("/encoder", |g| {
        g.op_to(
            "ArgMax",
            &[logits],
            vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
            names::IMAGE_TOKENS,
        )
    });
    g.output(
        names::IMAGE_TOKENS,
        Elem::I64,
        &[Dim::Named(names::DIM_BATCH), Dim::Fixed(n)],
    );
}

fn group_widths(spec: &DvaeSpec) -> Vec<usize> {
    (0..spec.group_count).map(|g| spec.n_hid << g).collect()
}

/// A [`DvaeEncoder::Patch`] encoder's logits (b, vocab, h, w): an f×f conv of stride f, then
/// the hidden and output 1×1 convs with a ReLU before each.
fn patch_encoder(g: &mut Graph, x: &str, spec: &DvaeSpec) -> R<String> {
    let f = 1usize << (spec.group_count - 1);
    let width = *group_widths(spec).last().expect("group_count ≥ 1");
    let mut h = g.scoped("input", |g| -> R<String> {
        let w = g.weight("blocks.input.w", &[width, spec.channels, f, f])?;
        let b = g.weight("blocks.input.b", &[width])?;
        let attrs = vec![
            ("kernel_shape", Attr::Ints(vec![f as i64, f as i64])),
            ("strides", Attr::Ints(vec![f as i64, f as i64])),
        ];
        Ok(g.op("Conv", &[x, &w, &b], attrs))
    })?;
    for i in 1..=PATCH_HIDDEN_LAYERS {
        let name = format!("hidden_{i}");
        h = g.scoped(&name, |g| {
            let r = g.op("Relu", &[&h], vec![]);
            conv(g, &r, &format!("blocks.{name}"), width, width, 1)
        })?;
    }
    g.scoped("output", |g| {
        let r = g.op("Relu", &[&h], vec![]);
        conv(g, &r, "blocks.output.conv", width, spec.vocab_size, 1)
    })
}

/// `dvae_encoder.onnx`: image f32 [batch, 3, H, W] in [0, 1] → image_tokens i64 [batch, h·w].
pub fn encoder(
    geometry: &Geometry,
    spec: &DvaeSpec,
    weights: &Weights,
    dtype: Dtype,
    opset: i64,
    source: &str,
) -> R<ModelProto> {
    let mut g = Graph::new(dtype, source, weights);
    let s = geometry.image_size;
    let n = geometry.image_tokens();
    let image = g.input(
        names::IMAGE,
        Elem::F32,
        &[
            Dim::Named(names::DIM_BATCH),
            Dim::Fixed(spec.channels),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    );
    let logits = g.scoped("/encoder", |g| -> R<String> {
        let x = g.from_f32(&image);
        let scale = g.scalar(1.0 - 2.0 * LOGIT_LAPLACE_EPS);
        let shift = g.scalar(LOGIT_LAPLACE_EPS);
        let x = g.scoped("map_pixels", |g| {
            let m = g.op("Mul", &[&x, &scale], vec![]);
            g.op("Add", &[&m, &shift], vec![])
        });
        if spec.encoder == DvaeEncoder::Patch {
            let logits = patch_encoder(g, &x, spec)?;
            let shape = g.ints(&[0, spec.vocab_size as i64, n as i64]);
            return Ok(g.op("Reshape", &[&logits, &shape], vec![]));
        }
        let x = g.scoped("input", |g| {
            conv(g, &x, "blocks.input", spec.channels, spec.n_hid, 7)
        })?;
        let widths = group_widths(spec);
        let logits = trunk(
            g,
            x,
            spec.n_hid,
            &widths,
            spec,
            [3, 3, 3, 1],
            spec.vocab_size,
            (s, Resample::Pool),
        )?;
        let shape = g.ints(&[0, spec.vocab_size as i64, n as i64]);
        Ok(g.op("Reshape", &[&logits, &shape], vec![]))
    })?;
    argmax_tokens(&mut g, &logits, n);
    g.finish(
        "dvae_encoder",
        opset,
        "dVAE encoder (Ramesh et al. 2021, dall_e 0.1): image in [0,1] → argmax codebook tokens",
    )
}

/// `dvae_decoder.onnx`: image_tokens i64 [batch, h·w] → image f32 [batch, 3, H, W] in [0, 1].
/// The decoder's first 1×1 conv over one-hot codes is a gather of its weight columns.
pub fn decoder(
    geometry: &Geometry,
    spec: &DvaeSpec,
    weights: &Weights,
    dtype: Dtype,
    opset: i64,
    source: &str,
) -> R<ModelProto> {
    let mut g = Graph::new(dtype, source, weights);
    let (s, grid, n) = (geometry.image_size, geometry.grid, geometry.image_tokens());
    let tokens = g.input(
        names::IMAGE_TOKENS,
        Elem::I64,
        &[Dim::Named(names::DIM_BATCH), Dim::Fixed(n)],
    );
    let image = g.scoped("/decoder", |g| -> R<String> {
        let x = g.scoped("input", |g| -> R<String> {
            let w = g.weight("blocks.input.w", &[spec.n_init, spec.vocab_size, 1, 1])?;
            let b = g.weight("blocks.input.b", &[spec.n_init])?;
            let mat = g.ints(&[spec.n_init as i64, spec.vocab_size as i64]);
            let w2 = g.op("Reshape", &[&w, &mat], vec![]);
            let table = g.op("Transpose", &[&w2], vec![("perm", Attr::Ints(vec![1, 0]))]);
            let x = g.op("Gather", &[&table, &tokens], vec![("axis", Attr::Int(0))]);
            let x = g.op(
                "Transpose",
                &[&x],
                vec![("perm", Attr::Ints(vec![0, 2, 1]))],
            );
            let shape = g.ints(&[0, spec.n_init as i64, grid as i64, grid as i64]);
            let x = g.op("Reshape", &[&x, &shape], vec![]);
            let bshape = g.ints(&[1, spec.n_init as i64, 1, 1]);
            let b4 = g.op("Reshape", &[&b, &bshape], vec![]);
            Ok(g.op("Add", &[&x, &b4], vec![]))
        })?;
        let widths: Vec<usize> = group_widths(spec).into_iter().rev().collect();
        let stats = trunk(
            g,
            x,
            spec.n_init,
            &widths,
            spec,
            [1, 3, 3, 3],
            2 * spec.channels,
            (grid, Resample::Up),
        )?;
        g.scoped("unmap_pixels", |g| -> R<String> {
            let starts = g.ints(&[0]);
            let ends = g.ints(&[spec.channels as i64]);
            let axes = g.ints(&[1]);
            let mu = g.op("Slice", &[&stats, &starts, &ends, &axes], vec![]);
            let p = g.op("Sigmoid", &[&mu], vec![]);
            let scale = g.scalar(1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS));
            let shift = g.scalar(-LOGIT_LAPLACE_EPS / (1.0 - 2.0 * LOGIT_LAPLACE_EPS));
            let m = g.op("Mul", &[&p, &scale], vec![]);
            let a = g.op("Add", &[&m, &shift], vec![]);
            let (lo, hi) = (g.scalar(0.0), g.scalar(1.0));
            Ok(g.op("Clip", &[&a, &lo, &hi], vec![]))
        })
    })?;
    g.scoped("/decoder", |g| g.to_f32_output(&image, names::IMAGE));
    g.output(
        names::IMAGE,
        Elem::F32,
        &[
            Dim::Named(names::DIM_BATCH),
            Dim::Fixed(spec.channels),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    );
    g.finish(
        "dvae_decoder",
        opset,
        "dVAE decoder (Ramesh et al. 2021, dall_e 0.1): codebook tokens → image in [0,1]",
    )
}
