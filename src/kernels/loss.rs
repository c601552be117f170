//! The transformer's next-token loss: log-softmax and the gather of the targets in one pass.

use super::activation::fast_exp;
use super::{contiguous_f32, fused_cpu};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Cross-entropy of next-token prediction: `logits (b, s, V)`, `targets (b, s − 1)` (u32, the
/// ids of positions 1..s) → `nll (b, s − 1)`, nll = logsumexp(logits[p]) − logits[p][target],
/// for p < s − 1. Backward: softmax − one-hot times the incoming gradient, the last position 0.
/// As tensor ops (narrow, log-softmax, gather) that is ~8 nodes over the logits, the largest
/// tensor of a training step, each with its own backward pass.
struct NextTokenNll;

impl NextTokenNll {
    fn dims(logits: &Layout, targets: &Layout) -> Result<(usize, usize, usize)> {
        let (b, s, v) = logits.shape().dims3()?;
        if s < 2 || targets.shape().dims() != [b, s - 1] {
            candle_core::bail!(
                "next-token nll: logits {:?} and targets {:?} do not fit together",
                logits.shape(),
                targets.shape()
            );
        }
        Ok((b, s, v))
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{op}: u32 targets only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: contiguous targets only"),
    }
}

/// log Σ exp over one row.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = crate::kernels::max(row);
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - max)).sum();
    for c in chunks {
        acc.iter_mut()
            .zip(c)
            .for_each(|(s, &v)| *s += fast_exp(v - max));
    }
    max + (crate::kernels::sum(&acc) + tail).ln()
}

impl CustomOp2 for NextTokenNll {
    fn name(&self) -> &'static str {
        "next-token-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s, v) = Self::dims(l1, l2)?;
        let logits = contiguous_f32(s1, l1, self.name())?;
        let targets = u32_slice(s2, l2, self.name())?;
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("next-token nll: target {t} outside the vocabulary of {v}");
        }
        let mut nll = crate::kernels::zeros(b * (s - 1));
        use rayon::prelude::*;
        nll.par_iter_mut().enumerate().for_each(|(i, out)| {
            let r = (i / (s - 1)) * s + i % (s - 1);
            let row = &logits[r * v..(r + 1) * v];
            *out = log_sum_exp(row) - row[targets[i] as usize];
        });
        Ok((CpuStorage::F32(nll), Shape::from((b, s - 1))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::kernels::with_f32;
        use rayon::prelude::*;
        let (b, s, v) = Self::dims(logits.layout(), targets.layout())?;
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        let op = self.name();
        let d = with_f32(grad, op, |g| {
            with_f32(logits, op, |x| {
                let mut d = crate::kernels::zeros(b * s * v);
                d.par_chunks_mut(v).enumerate().for_each(|(r, dr)| {
                    let (seq, p) = (r / s, r % s);
                    if p == s - 1 {
                        return; // the last position predicts nothing
                    }
                    let i = seq * (s - 1) + p;
                    let xr = &x[r * v..(r + 1) * v];
                    let lse = log_sum_exp(xr);
                    for (o, &xv) in dr.iter_mut().zip(xr) {
                        *o = g[i] * fast_exp(xv - lse);
                    }
                    dr[t[i] as usize] -= g[i];
                });
                Ok(d)
            })
        })?;
        Ok((
            Some(Tensor::from_vec(d, logits.shape(), logits.device())?),
            None,
        ))
    }
}

/// Per-position next-token negative log-likelihood, `(b, s − 1)`, of `logits (b, s, V)` for
/// the ids `ids (b, s)`: [`NextTokenNll`] on the CPU in f32, tensor ops elsewhere.
pub fn next_token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, s, _) = logits.dims3()?;
    let targets = ids
        .narrow(1, 1, s - 1)?
        .to_dtype(candle_core::DType::U32)?
        .contiguous()?;
    if fused_cpu(logits) {
        return logits.contiguous()?.apply_op2(&targets, NextTokenNll);
    }
    let logp = crate::kernels::softmax::log_softmax(&logits.narrow(1, 0, s - 1)?, 2)?;
    logp.contiguous()?
        .gather(&targets.unsqueeze(2)?, 2)?
        .squeeze(2)?
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    /// The fused next-token loss equals log-softmax + gather, values and gradients.
    #[test]
    fn fused_next_token_nll_matches_log_softmax_and_gather() {
        let dev = Device::Cpu;
        let x = var(&[2, 5, 37], 3.0);
        let xt = x.as_tensor();
        let ids: Vec<u32> = (0..10u32).map(|i| (i * 7) % 37).collect();
        let ids = Tensor::from_vec(ids, (2, 5), &dev).unwrap();
        let logp = crate::kernels::softmax::log_softmax(&xt.narrow(1, 0, 4).unwrap(), 2).unwrap();
        let targets = ids.narrow(1, 1, 4).unwrap().unsqueeze(2).unwrap();
        let theirs = logp
            .contiguous()
            .unwrap()
            .gather(&targets.contiguous().unwrap(), 2);
        let theirs = theirs.unwrap().squeeze(2).unwrap().neg().unwrap();
        agree(&[&x], next_token_nll(xt, &ids).unwrap(), theirs, 1e-5, 1e-5);
        let bad = Tensor::from_vec(vec![40u32; 10], (2, 5), &dev).unwrap();
        assert!(next_token_nll(xt, &bad).is_err());
    }
}
