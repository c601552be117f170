//! Sber's VQGAN graphs (ruDALL-E's image tokenizer), op for op as `dalle::vae::vqgan`: the same
//! `dvae_encoder.onnx` / `dvae_decoder.onnx` contract as the dVAE's (image in [0, 1] ↔ tokens),
//! over taming-transformers' encoder and decoder. Weight names are the checkpoint's.
//! GroupNorm is a reshape to (b, 32, ·) and InstanceNormalization (every opset this exporter
//! writes has it; GroupNormalization needs opset 18).

use crate::onnx::{Attr, Dim, Elem, Graph};
use crate::{ExportError, Weights};
use dalle_runtimes::manifest::VqganDims;
use dalle_runtimes::{names, Dtype, Geometry};
use tract_onnx::pb::ModelProto;

type R<T> = Result<T, ExportError>;

/// taming's `Normalize`: GroupNorm(32, ε 1e-6).
const GROUPS: usize = 32;
const GN_EPS: f32 = 1e-6;

/// `torch.nn.Conv2d` weights `{p}.weight` (n_out, n_in, k, k), `{p}.bias`; "same" padding, or
/// taming's stride-2 downsampling (pad right and bottom by one).
fn conv(
    g: &mut Graph,
    x: &str,
    p: &str,
    n_in: usize,
    n_out: usize,
    k: usize,
    down: bool,
) -> R<String> {
    let w = g.weight(&format!("{p}.weight"), &[n_out, n_in, k, k])?;
    let b = g.weight(&format!("{p}.bias"), &[n_out])?;
    let q = ((k - 1) / 2) as i64;
    let (pads, strides) = match down {
        true => (vec![0, 0, 1, 1], vec![2, 2]),
        false => (vec![q, q, q, q], vec![1, 1]),
    };
    let attrs = vec![
        ("kernel_shape", Attr::Ints(vec![k as i64, k as i64])),
        ("pads", Attr::Ints(pads)),
        ("strides", Attr::Ints(strides)),
    ];
    Ok(g.op("Conv", &[x, &w, &b], attrs))
}

/// GroupNorm(32) over `c` channels at `side`×`side`, with its affine `{p}.weight` / `{p}.bias`.
fn norm(g: &mut Graph, x: &str, p: &str, c: usize, side: usize) -> R<String> {
    let grouped = g.ints(&[0, GROUPS as i64, -1]);
    let y = g.op("Reshape", &[x, &grouped], vec![]);
    let ones = g.table(&[1.0; GROUPS], &[GROUPS]);
    let zeros = g.table(&[0.0; GROUPS], &[GROUPS]);
    let y = g.op(
        "InstanceNormalization",
        &[&y, &ones, &zeros],
        vec![("epsilon", Attr::Float(GN_EPS))],
    );
    let back = g.ints(&[0, c as i64, side as i64, side as i64]);
    let y = g.op("Reshape", &[&y, &back], vec![]);
    let shape = g.ints(&[1, c as i64, 1, 1]);
    let w = g.weight(&format!("{p}.weight"), &[c])?;
    let w = g.op("Reshape", &[&w, &shape], vec![]);
    let b = g.weight(&format!("{p}.bias"), &[c])?;
    let b = g.op("Reshape", &[&b, &shape], vec![]);
    let y = g.op("Mul", &[&y, &w], vec![]);
    Ok(g.op("Add", &[&y, &b], vec![]))
}

fn swish(g: &mut Graph, x: &str) -> String {
    let s = g.op("Sigmoid", &[x], vec![]);
    g.op("Mul", &[x, &s], vec![])
}

/// taming's `ResnetBlock` (no time embedding): n_in → n_out.
fn resnet(g: &mut Graph, x: &str, p: &str, n_in: usize, n_out: usize, side: usize) -> R<String> {
    let h = norm(g, x, &format!("{p}.norm1"), n_in, side)?;
    let h = swish(g, &h);
    let h = conv(g, &h, &format!("{p}.conv1"), n_in, n_out, 3, false)?;
    let h = norm(g, &h, &format!("{p}.norm2"), n_out, side)?;
    let h = swish(g, &h);
    let h = conv(g, &h, &format!("{p}.conv2"), n_out, n_out, 3, false)?;
    let id = match n_in == n_out {
        true => x.to_string(),
        false => conv(g, x, &format!("{p}.nin_shortcut"), n_in, n_out, 1, false)?,
    };
    Ok(g.op("Add", &[&id, &h], vec![]))
}

/// taming's `AttnBlock`: one head over the side² positions, scaled by 1/√c.
fn attn(g: &mut Graph, x: &str, p: &str, c: usize, side: usize) -> R<String> {
    let h = norm(g, x, &format!("{p}.norm"), c, side)?;
    let flat = g.ints(&[0, c as i64, (side * side) as i64]);
    let mut qkv = vec![];
    for part in ["q", "k", "v"] {
        let t = conv(g, &h, &format!("{p}.{part}"), c, c, 1, false)?;
        qkv.push(g.op("Reshape", &[&t, &flat], vec![]));
    }
    let qt = g.op(
        "Transpose",
        &[&qkv[0]],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let a = g.op("MatMul", &[&qt, &qkv[1]], vec![]); // (b, hw_q, hw_k)
    let scale = g.scalar((c as f32).powf(-0.5));
    let a = g.op("Mul", &[&a, &scale], vec![]);
    let a = g.op("Softmax", &[&a], vec![("axis", Attr::Int(-1))]);
    let at = g.op(
        "Transpose",
        &[&a],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let y = g.op("MatMul", &[&qkv[2], &at], vec![]); // (b, c, hw_q)
    let four = g.ints(&[0, c as i64, side as i64, side as i64]);
    let y = g.op("Reshape", &[&y, &four], vec![]);
    let y = conv(g, &y, &format!("{p}.proj_out"), c, c, 1, false)?;
    Ok(g.op("Add", &[x, &y], vec![]))
}

fn mid(g: &mut Graph, x: &str, p: &str, c: usize, side: usize) -> R<String> {
    let h = resnet(g, x, &format!("{p}.mid.block_1"), c, c, side)?;
    let h = attn(g, &h, &format!("{p}.mid.attn_1"), c, side)?;
    resnet(g, &h, &format!("{p}.mid.block_2"), c, c, side)
}

/// `dvae_encoder.onnx` of a VQGAN: image f32 [batch, 3, H, W] in [0, 1] → argmax codes.
pub fn encoder(
    geometry: &Geometry,
    v: &VqganDims,
    weights: &Weights,
    dtype: Dtype,
    opset: i64,
    source: &str,
) -> R<ModelProto> {
    let mut g = Graph::new(dtype, source, weights);
    let (s, n) = (geometry.image_size, geometry.image_tokens());
    let batch = Dim::Named(names::DIM_BATCH);
    let image = g.input(
        names::IMAGE,
        Elem::F32,
        &[
            batch.clone(),
            Dim::Fixed(v.channels),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    );
    let levels = v.ch_mult.len();
    let logits = g.scoped("/encoder", |g| -> R<String> {
        let x = g.from_f32(&image);
        let (two, one) = (g.scalar(2.0), g.scalar(1.0));
        let x = g.op("Mul", &[&x, &two], vec![]);
        let x = g.op("Sub", &[&x, &one], vec![]);
        let mut h = conv(g, &x, "encoder.conv_in", v.channels, v.ch, 3, false)?;
        let (mut width, mut side) = (v.ch, s);
        for i in 0..levels {
            for j in 0..v.num_res_blocks {
                let p = format!("encoder.down.{i}");
                h = resnet(g, &h, &format!("{p}.block.{j}"), width, v.width(i), side)?;
                width = v.width(i);
                if v.attn_levels.contains(&i) {
                    h = attn(g, &h, &format!("{p}.attn.{j}"), width, side)?;
                }
            }
            if i + 1 < levels {
                h = conv(
                    g,
                    &h,
                    &format!("encoder.down.{i}.downsample.conv"),
                    width,
                    width,
                    3,
                    true,
                )?;
                side /= 2;
            }
        }
        let h = mid(g, &h, "encoder", width, side)?;
        let h = norm(g, &h, "encoder.norm_out", width, side)?;
        let h = swish(g, &h);
        let h = conv(g, &h, "encoder.conv_out", width, v.z_channels, 3, false)?;
        let h = conv(g, &h, "quant_conv", v.z_channels, v.embed_dim, 1, false)?;
        let logits = conv(
            g,
            &h,
            "quantize.proj",
            v.embed_dim,
            geometry.codebook,
            1,
            false,
        )?;
        let shape = g.ints(&[0, geometry.codebook as i64, n as i64]);
        Ok(g.op("Reshape", &[&logits, &shape], vec![]))
    })?;
    crate::dvae::argmax_tokens(&mut g, &logits, n);
    g.finish(
        "dvae_encoder",
        opset,
        "VQGAN encoder (ruDALL-E's Sber VQGAN, taming-transformers): image in [0,1] → argmax codebook tokens",
    )
}

/// `dvae_decoder.onnx` of a VQGAN: image_tokens i64 [batch, h·w] → image f32 in [0, 1].
pub fn decoder(
    geometry: &Geometry,
    v: &VqganDims,
    weights: &Weights,
    dtype: Dtype,
    opset: i64,
    source: &str,
) -> R<ModelProto> {
    let mut g = Graph::new(dtype, source, weights);
    let (s, grid, n) = (geometry.image_size, geometry.grid, geometry.image_tokens());
    let batch = Dim::Named(names::DIM_BATCH);
    let tokens = g.input(
        names::IMAGE_TOKENS,
        Elem::I64,
        &[batch.clone(), Dim::Fixed(n)],
    );
    let levels = v.ch_mult.len();
    let image = g.scoped("/decoder", |g| -> R<String> {
        let table = g.weight("quantize.embed.weight", &[geometry.codebook, v.embed_dim])?;
        let z = g.op("Gather", &[&table, &tokens], vec![("axis", Attr::Int(0))]); // (b, n, d)
        let z = g.op(
            "Transpose",
            &[&z],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
        );
        let shape = g.ints(&[0, v.embed_dim as i64, grid as i64, grid as i64]);
        let z = g.op("Reshape", &[&z, &shape], vec![]);
        let z = conv(
            g,
            &z,
            "post_quant_conv",
            v.embed_dim,
            v.z_channels,
            1,
            false,
        )?;
        let mut width = v.width(levels - 1);
        let mut side = grid;
        let mut h = conv(g, &z, "decoder.conv_in", v.z_channels, width, 3, false)?;
        h = mid(g, &h, "decoder", width, side)?;
        for i in (0..levels).rev() {
            for j in 0..=v.num_res_blocks {
                let p = format!("decoder.up.{i}");
                h = resnet(g, &h, &format!("{p}.block.{j}"), width, v.width(i), side)?;
                width = v.width(i);
                if v.attn_levels.contains(&i) {
                    h = attn(g, &h, &format!("{p}.attn.{j}"), width, side)?;
                }
            }
            if i > 0 {
                h = crate::dvae::upsample(g, &h, width, side);
                side *= 2;
                h = conv(
                    g,
                    &h,
                    &format!("decoder.up.{i}.upsample.conv"),
                    width,
                    width,
                    3,
                    false,
                )?;
            }
        }
        let h = norm(g, &h, "decoder.norm_out", width, side)?;
        let h = swish(g, &h);
        let h = conv(g, &h, "decoder.conv_out", width, v.channels, 3, false)?;
        let (lo, hi) = (g.scalar(-1.0), g.scalar(1.0));
        let h = g.op("Clip", &[&h, &lo, &hi], vec![]);
        let (one, half) = (g.scalar(1.0), g.scalar(0.5));
        let h = g.op("Add", &[&h, &one], vec![]);
        Ok(g.op("Mul", &[&h, &half], vec![]))
    })?;
    g.scoped("/decoder", |g| g.to_f32_output(&image, names::IMAGE));
    g.output(
        names::IMAGE,
        Elem::F32,
        &[batch, Dim::Fixed(v.channels), Dim::Fixed(s), Dim::Fixed(s)],
    );
    g.finish(
        "dvae_decoder",
        opset,
        "VQGAN decoder (ruDALL-E's Sber VQGAN, taming-transformers): codebook tokens → image in [0,1]",
    )
}
