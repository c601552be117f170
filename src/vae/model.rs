//! The discrete VAE of Ramesh et al. 2021 §2.1, layer for layer as OpenAI's `dall_e` 0.1.
//!
//! Parameter names mirror `dall_e`'s state dicts (`blocks.input.w`,
//! `blocks.group_1.block_1.res_path.conv_1.w`, `…id_path.w`, `blocks.output.conv.w`), so the
//! released `encoder.pkl` / `decoder.pkl`, converted to safetensors, load unchanged.

use crate::config::VaeConfig;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use dalle_runtimes::manifest::{DvaeEncoder, PATCH_HIDDEN_LAYERS};

/// ε of `dall_e`'s `map_pixels`: the encoder sees pixels squeezed into [ε, 1 − ε] so that the
/// logit-Laplace likelihood stays finite at 0 and 1.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// `dall_e.utils.map_pixels`: [0, 1] → [ε, 1 − ε].
pub fn map_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 - 2.0 * LOGIT_LAPLACE_EPS, LOGIT_LAPLACE_EPS)
}

/// `dall_e.utils.unmap_pixels`: back to [0, 1], clamped.
pub fn unmap_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(
        1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS),
        -LOGIT_LAPLACE_EPS / (1.0 - 2.0 * LOGIT_LAPLACE_EPS),
    )?
    .clamp(0f32, 1f32)
}

/// `dall_e.utils.Conv2d`: weight `w` (n_out, n_in, kw, kw), bias `b`, "same" padding.
#[derive(Clone, Debug)]
struct Conv {
    w: Tensor,
    b: Tensor,
    pad: usize,
}

impl Conv {
    fn new(n_in: usize, n_out: usize, kw: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((n_out, n_in, kw, kw), "w")?;
        let b = vb.get(n_out, "b")?;
        Ok(Conv {
            w,
            b,
            pad: (kw - 1) / 2,
        })
    }
}

impl Conv {
    /// The convolution of `relu(x)` with `relu`, else of `x`. `x` is channel-major, `(c, b, h,
    /// w)`, as everywhere inside [`Stack`]: on the CPU one fused op
    /// (`crate::kernels::conv::ConvCm`, which also back-propagates in one step, ReLU included). Other
    /// devices and dtypes use candle's `conv2d` on the (b, c, h, w) view.
    fn apply(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op3(
                &self.w,
                &self.b,
                crate::kernels::conv::ConvCm {
                    pad: self.pad,
                    relu,
                },
            );
        }
        let x = if relu { x.relu()? } else { x.clone() };
        let n_out = self.w.dim(0)?;
        let y = x
            .permute((1, 0, 2, 3))?
            .conv2d(&self.w, self.pad, 1, 1, 1)?;
        y.broadcast_add(&self.b.reshape((1, n_out, 1, 1))?)?
            .permute((1, 0, 2, 3))
    }
}

impl Conv {
    /// `id + gain · conv(relu(x))`: a residual path's last convolution and the connection
    /// around it, one op on the CPU (`crate::kernels::conv::ConvAdd`).
    fn apply_residual(&self, x: &Tensor, id: &Tensor, gain: f64) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let wb = Tensor::cat(&[&self.w.flatten_all()?, &self.b], 0)?;
            let conv = crate::kernels::conv::ConvCm {
                pad: self.pad,
                relu: true,
            };
            return x.contiguous()?.apply_op3(
                &wb,
                &id.contiguous()?,
                crate::kernels::conv::ConvAdd {
                    conv,
                    gain: gain as f32,
                },
            );
        }
        id + (self.apply(x, true)? * gain)?
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

/// (b, c, h, w) ↔ (c, b, h, w), contiguous.
fn swap_batch_channels(x: &Tensor) -> Result<Tensor> {
    x.permute((1, 0, 2, 3))?.contiguous()
}

/// 2×2 max pooling: a custom op on CPU, elsewhere a reshape and two max reductions
/// (differentiable without conv ops).
fn max_pool2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(crate::kernels::pool::MaxPool2);
    }
    let (c, b, h, w) = x.dims4()?;
    x.reshape((c, b, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

/// Nearest-neighbour ×2 upsampling (a custom op on CPU: the broadcast's backward is slow there).
fn upsample2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(crate::kernels::pool::Upsample2);
    }
    let (c, b, h, w) = x.dims4()?;
    x.reshape((c, b, h, 1, w, 1))?
        .broadcast_as((c, b, h, 2, w, 2))?
        .reshape((c, b, 2 * h, 2 * w))
}

/// Residual block: `id_path(x) + post_gain · res_path(x)` (`dall_e`: post_gain = 1 / n_layers²).
#[derive(Clone, Debug)]
struct Block {
    id_path: Option<Conv>,
    res_path: [Conv; 4],
    post_gain: f64,
}

impl Block {
    /// Encoder blocks use kernels 3,3,3,1 on the residual path; decoder blocks 1,3,3,3.
    fn new(
        n_in: usize,
        n_out: usize,
        post_gain: f64,
        kernels: [usize; 4],
        vb: VarBuilder,
    ) -> Result<Self> {
        let n_hid = n_out / 4;
        let id_path = if n_in != n_out {
            Some(Conv::new(n_in, n_out, 1, vb.pp("id_path"))?)
        } else {
            None
        };
        let rp = vb.pp("res_path");
        let widths = [
            (n_in, n_hid),
            (n_hid, n_hid),
            (n_hid, n_hid),
            (n_hid, n_out),
        ];
        let conv = |i: usize| {
            Conv::new(
                widths[i].0,
                widths[i].1,
                kernels[i],
                rp.pp(format!("conv_{}", i + 1)),
            )
        };
        let res_path = [conv(0)?, conv(1)?, conv(2)?, conv(3)?];
        Ok(Block {
            id_path,
            res_path,
            post_gain,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let id = match &self.id_path {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let [c1, c2, c3, c4] = &self.res_path;
        let h = c3.apply(&c2.apply(&c1.apply(x, true)?, true)?, true)?;
        c4.apply_residual(&h, &id, self.post_gain)
    }
}

/// The shape both networks share: an input conv, `group_count` groups of residual blocks with a
/// resampling step between groups, then ReLU and a 1×1 output conv. Activations inside are
/// channel-major, (c, b, h, w); [`Encoder`] and [`Decoder`] convert at their edges.
#[derive(Clone, Debug)]
struct Stack {
    input: Conv,
    groups: Vec<Vec<Block>>,
    output: Conv,
}

impl Stack {
    /// `widths[g]` is the width of group g + 1; `kernels` those of each residual path.
    fn new(
        vb: VarBuilder,
        (n_in, n_first, input_kw): (usize, usize, usize),
        widths: &[usize],
        (n_blk, post_gain): (usize, f64),
        kernels: [usize; 4],
        n_out: usize,
    ) -> Result<Self> {
        let vb = vb.pp("blocks");
        let input = Conv::new(n_in, n_first, input_kw, vb.pp("input"))?;
        let mut width = n_first;
        let mut groups = Vec::with_capacity(widths.len());
        for (g, &out) in widths.iter().enumerate() {
            let gvb = vb.pp(format!("group_{}", g + 1));
            let mut blocks = Vec::with_capacity(n_blk);
            for i in 1..=n_blk {
                blocks.push(Block::new(
                    width,
                    out,
                    post_gain,
                    kernels,
                    gvb.pp(format!("block_{i}")),
                )?);
                width = out;
            }
            groups.push(blocks);
        }
        let output = Conv::new(width, n_out, 1, vb.pp("output").pp("conv"))?;
        Ok(Stack {
            input,
            groups,
            output,
        })
    }

    /// Everything after the input conv; `resample` runs between groups.
    fn trunk(&self, x: Tensor, resample: fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.output.apply(&self.blocks(x, resample)?, true)
    }

    /// The trunk up to (and including) the ReLU before the output conv.
    fn features(&self, x: Tensor, resample: fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.blocks(x, resample)?.relu()
    }

    /// The residual groups, without the ReLU that follows them.
    fn blocks(&self, mut x: Tensor, resample: fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for b in blocks {
                x = b.forward(&x)?;
            }
            if g < last {
                x = resample(&x)?;
            }
        }
        Ok(x)
    }
}

/// Image [0, 1] → codebook logits over a `grid × grid` map.
#[derive(Clone, Debug)]
pub struct Encoder(EncoderNet);

#[derive(Clone, Debug)]
enum EncoderNet {
    /// `dall_e` 0.1's.
    DallE(Stack),
    /// [`DvaeEncoder::Patch`]: each cell's pixels alone.
    Patch(PatchNet),
}

/// A [`DvaeEncoder::Patch`] encoder: `blocks.input` an f×f conv of stride f (run as a 1×1 conv
/// over each cell's 3·f·f pixels), `blocks.hidden_{i}` 1×1 convs, `blocks.output.conv`; ReLU
/// before every layer but the first.
#[derive(Clone, Debug)]
struct PatchNet {
    cell: usize,
    input: Conv,
    hidden: Vec<Conv>,
    output: Conv,
}

impl PatchNet {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("blocks");
        let (f, c) = (cfg.downsample(), cfg.channels);
        let width = cfg.group_width(cfg.group_count);
        let cell = Conv::new(c, width, f, vb.pp("input"))?;
        // (width, c, f, f) → (width, c·f·f, 1, 1): the order [`Self::cells`] lays pixels out in.
        let input = Conv {
            w: cell.w.reshape((width, c * f * f, 1, 1))?,
            b: cell.b,
            pad: 0,
        };
        let hidden = (1..=PATCH_HIDDEN_LAYERS)
            .map(|i| Conv::new(width, width, 1, vb.pp(format!("hidden_{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let output = Conv::new(width, cfg.vocab_size, 1, vb.pp("output").pp("conv"))?;
        Ok(PatchNet {
            cell: f,
            input,
            hidden,
            output,
        })
    }

    /// (b, c, H, W) → (c·f·f, b, H/f, W/f), channel-major: each cell's pixels as channels, in
    /// the order of the input conv's (c, ky, kx) weights.
    fn cells(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.cell;
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h / f, f, w / f, f))?
            .permute((1, 3, 5, 0, 2, 4))?
            .contiguous()?
            .reshape((c * f * f, b, h / f, w / f))
    }

    /// Channel-major activations of the last hidden layer, before its ReLU.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.input.apply(&self.cells(x)?, false)?;
        for layer in &self.hidden {
            h = layer.apply(&h, true)?;
        }
        Ok(h)
    }
}

impl Encoder {
    /// Build under `vb` (the `blocks.` prefix is added here).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.encoder == DvaeEncoder::Patch {
            return Ok(Encoder(EncoderNet::Patch(PatchNet::new(cfg, vb)?)));
        }
        let widths: Vec<usize> = (1..=cfg.group_count).map(|g| cfg.group_width(g)).collect();
        let first = (cfg.channels, cfg.n_hid, 7);
        Ok(Encoder(EncoderNet::DallE(Stack::new(
            vb,
            first,
            &widths,
            (cfg.n_blk_per_group, cfg.post_gain()),
            [3, 3, 3, 1],
            cfg.vocab_size,
        )?)))
    }

    /// (b, 3, H, W) pixels in [0, 1] → (b, vocab, H/f, W/f) logits.
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let x = map_pixels(image)?;
        let logits = match &self.0 {
            EncoderNet::DallE(stack) => {
                let x = stack.input.forward(&swap_batch_channels(&x)?)?;
                stack.trunk(x, max_pool2)?
            }
            EncoderNet::Patch(net) => net.output.apply(&net.hidden(&x)?, true)?,
        };
        swap_batch_channels(&logits)
    }

    /// (b, 3, H, W) → (b, width, H/f, W/f): what the output conv turns into logits.
    pub fn features(&self, image: &Tensor) -> Result<Tensor> {
        let x = map_pixels(image)?;
        let features = match &self.0 {
            EncoderNet::DallE(stack) => {
                let x = stack.input.forward(&swap_batch_channels(&x)?)?;
                stack.features(x, max_pool2)?
            }
            EncoderNet::Patch(net) => net.hidden(&x)?.relu()?,
        };
        swap_batch_channels(&features)
    }

    /// (b, 3, H, W) → (b, grid·grid) token ids (argmax, no noise), raster order.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let logits = self.forward(image)?;
        let (b, v, h, w) = logits.dims4()?;
        logits
            .reshape((b, v, h * w))?
            .argmax(1)?
            .to_dtype(DType::U32)
    }
}

/// Codes → per-pixel logit-Laplace statistics (μ and ln b for each channel).
#[derive(Clone, Debug)]
pub struct Decoder {
    stack: Stack,
    vocab_size: usize,
}

impl Decoder {
    /// Build under `vb` (the `blocks.` prefix is added here). Group 1 is the widest: the decoder
    /// mirrors the encoder.
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let widths: Vec<usize> = (1..=cfg.group_count)
            .rev()
            .map(|g| cfg.group_width(g))
            .collect();
        let first = (cfg.vocab_size, cfg.n_init, 1);
        let stack = Stack::new(
            vb,
            first,
            &widths,
            (cfg.n_blk_per_group, cfg.post_gain()),
            [1, 3, 3, 3],
            2 * cfg.channels,
        )?;
        Ok(Decoder {
            stack,
            vocab_size: cfg.vocab_size,
        })
    }

    /// (b, vocab, h, w) soft or hard one-hot codes → (b, 2·channels, H, W) statistics.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.stack.input.forward(&swap_batch_channels(z)?)?;
        swap_batch_channels(&self.stack.trunk(x, upsample2)?)
    }

    /// (b, h·w) token ids → (b, 2·channels, H, W) statistics. The one-hot 1×1 conv is done as a
    /// gather of weight columns: the same numbers as `forward(one_hot)`, without the one-hot.
    pub fn forward_tokens(&self, tokens: &Tensor, grid: usize) -> Result<Tensor> {
        let b = tokens.dims2()?.0;
        let input = &self.stack.input;
        let n_init = input.w.dim(0)?;
        let table = input
            .w
            .reshape((n_init, self.vocab_size))?
            .t()?
            .contiguous()?; // (vocab, n_init)
        let x = table.embedding(&tokens.flatten_all()?)?; // (b·n, n_init)
        let x = x.t()?.contiguous()?.reshape((n_init, b, grid, grid))?;
        let x = x.broadcast_add(&input.b.reshape(((), 1, 1, 1))?)?;
        swap_batch_channels(&self.stack.trunk(x, upsample2)?)
    }

    /// Statistics → image in [0, 1]: `unmap_pixels(sigmoid(μ))`.
    pub fn to_image(stats: &Tensor) -> Result<Tensor> {
        let c = stats.dim(1)? / 2;
        unmap_pixels(&candle_nn::ops::sigmoid(&stats.narrow(1, 0, c)?)?)
    }

    /// (b, h·w) token ids → (b, 3, H, W) image in [0, 1].
    pub fn decode(&self, tokens: &Tensor, grid: usize) -> Result<Tensor> {
        Self::to_image(&self.forward_tokens(tokens, grid)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// f32 agreement of two summation orders over a few hundred products.
    const F32_TOL: f32 = 1e-5;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn conv_pool_and_upsample_equal_candles_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 5, 8, 6), &dev).unwrap();
        for k in [1, 3, 7] {
            let conv = Conv {
                w: Tensor::randn(0f32, 1f32, (4, 5, k, k), &dev).unwrap(),
                b: Tensor::randn(0f32, 1f32, 4, &dev).unwrap(),
                pad: (k - 1) / 2,
            };
            let want = x
                .conv2d(&conv.w, conv.pad, 1, 1, 1)
                .unwrap()
                .broadcast_add(&conv.b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let got = conv.forward(&swap_batch_channels(&x).unwrap()).unwrap();
            let got = swap_batch_channels(&got).unwrap();
            assert!(max_diff(&got, &want) < F32_TOL * 50.0, "k={k}");
        }
        // Pooling and upsampling of channel-major activations.
        let cm = swap_batch_channels(&x).unwrap();
        let pooled = swap_batch_channels(&max_pool2(&cm).unwrap()).unwrap();
        assert_eq!(max_diff(&pooled, &x.max_pool2d(2).unwrap()), 0.0);
        let up = swap_batch_channels(&upsample2(&cm).unwrap()).unwrap();
        assert_eq!(max_diff(&up, &x.upsample_nearest2d(16, 12).unwrap()), 0.0);
    }
}
