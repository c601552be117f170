//! GELU (tanh form) as one fused op with its backward pass, and the libm-free `fast_exp` that
//! the softmaxes and GELU vectorise with.

use super::{contiguous_f32, par_rows};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// eˣ in f32 within ~2 ulp, without a libm call, so that loops over it vectorise (a training
/// step spent ~15% of its forward pass in libm's `tanhf`/`expm1f` for GELU). Range reduction
/// x = n·ln 2 + r, |r| ≤ ln 2 / 2, a degree-6 Taylor polynomial for eʳ (error < 2e-7), and 2ⁿ
/// built in the exponent bits. Below −87 (e⁻⁸⁷ is near the smallest normal f32) the result is 0,
/// so masked −∞ scores get exactly zero weight; above 88 it saturates at e⁸⁸.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without `round()`.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let e = p * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// σ(2u) for GELU's u = √(2/π)·(x + 0.044715·x³): ½(1 + tanh u) = 1 / (1 + e^(−2u)).
#[inline(always)]
fn gelu_gate(v: f32) -> f32 {
    let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v);
    1.0 / (1.0 + fast_exp(-2.0 * u))
}

/// candle's tanh-approximated GELU, ½x(1 + tanh u), as x·σ(2u) (the same function).
#[inline]
pub(crate) fn gelu_f32(v: f32) -> f32 {
    v * gelu_gate(v)
}

/// Its derivative: σ + 2x·σ(1 − σ)·√(2/π)·(1 + 3·0.044715·x²), σ = σ(2u).
#[inline]
fn gelu_grad_f32(v: f32) -> f32 {
    let s = gelu_gate(v);
    s + 2.0 * v * s * (1.0 - s) * SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v)
}

struct Gelu;
struct GeluGrad;

/// `f` over every value of a contiguous f32 tensor, split across the cores.
fn map_f32(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s, l, op)?;
    let mut y = crate::kernels::zeros(x.len());
    par_rows(x, &mut y, 1, |x, y| {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = f(v);
        }
    });
    Ok((CpuStorage::F32(y), l.shape().clone()))
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_f32(s, l, self.name(), gelu_f32)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.contiguous()?.apply_op1_no_bwd(&GeluGrad)?;
        Ok(Some(grad.mul(&d)?))
    }
}

impl CustomOp1 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_f32(s, l, self.name(), gelu_grad_f32)
    }
}

/// GELU (tanh approximation) with a backward pass: one fused multi-threaded kernel each way on
/// the CPU in f32; candle's `gelu` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -86_999..=87_999 {
            let x = i as f32 * 1e-3 + 1.3e-4;
            let (ours, libm) = (fast_exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-88.0), 0.0);
        assert!(fast_exp(1000.0).is_finite());
        assert!(fast_exp(f32::NAN).is_nan());
    }
}
