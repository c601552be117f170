//! AdamW with global-norm clipping, and an exponential moving average of the weights, both with
//! state that round-trips through safetensors so that a resumed run is bit-identical.

use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// AdamW hyper-parameters (Loshchilov & Hutter 2019).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices and kernels (rank ≥ 2), not biases or gains.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// One AdamW update of one CPU f32 parameter, as a single pass over its weight, gradient and
/// moments (as candle ops it was about fourteen passes, each allocating a tensor: ~5% of a
/// transformer training step here). The same arithmetic, in f32.
struct Update {
    /// Gradient clipping factor.
    scale: f32,
    b1: f32,
    b2: f32,
    /// Bias corrections 1 − βᵗ.
    c1: f32,
    c2: f32,
    eps: f32,
    lr: f32,
    /// 1 − lr · weight decay, or 1 where there is no decay.
    decay: f32,
}

impl Update {
    /// `(w, g, m, v)` → the new `(w, m, v)`.
    fn apply(
        &self,
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        use crate::kernels::with_f32;
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let op = "adamw";
        let (wn, mn, vn) = with_f32(w, op, |w| {
            with_f32(g, op, |g| {
                with_f32(m, op, |m| {
                    with_f32(v, op, |v| {
                        let n = w.len();
                        if [g.len(), m.len(), v.len()] != [n; 3] {
                            candle_core::bail!("{op}: weight, gradient and moments differ in size");
                        }
                        let (mut wn, mut mn, mut vn) = (
                            crate::kernels::zeros(n),
                            crate::kernels::zeros(n),
                            crate::kernels::zeros(n),
                        );
                        wn.par_chunks_mut(CHUNK)
                            .zip(mn.par_chunks_mut(CHUNK))
                            .zip(vn.par_chunks_mut(CHUNK))
                            .enumerate()
                            .for_each(|(c, ((wo, mo), vo))| {
                                let at = c * CHUNK..c * CHUNK + wo.len();
                                let ins = w[at.clone()]
                                    .iter()
                                    .zip(&g[at.clone()])
                                    .zip(&m[at.clone()])
                                    .zip(&v[at]);
                                let outs = wo.iter_mut().zip(mo.iter_mut()).zip(vo.iter_mut());
                                for ((((&w, &g), &m), &v), ((wo, mo), vo)) in ins.zip(outs) {
                                    let g = g * self.scale;
                                    let m = m * self.b1 + g * (1.0 - self.b1);
                                    let v = v * self.b2 + g * g * (1.0 - self.b2);
                                    let update = (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
                                    (*wo, *mo, *vo) = (w * self.decay - update * self.lr, m, v);
                                }
                            });
                        Ok((wn, mn, vn))
                    })
                })
            })
        })?;
        let (shape, dev) = (w.shape(), w.device());
        Ok((
            Tensor::from_vec(wn, shape, dev)?,
            Tensor::from_vec(mn, shape, dev)?,
            Tensor::from_vec(vn, shape, dev)?,
        ))
    }
}

/// AdamW over named variables, sorted by name so the update order is fixed.
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(mut params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, m, v })
    }

    /// The global L2 norm of the gradients, before clipping.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sq += if is_cpu_f32(g) {
                    crate::kernels::with_f32(g, "grad-norm", |v| Ok(crate::kernels::dot(v, v)))?
                        as f64
                } else {
                    g.sqr()?
                        .sum_all()?
                        .to_dtype(candle_core::DType::F64)?
                        .to_scalar::<f64>()?
                };
            }
        }
        Ok(sq.sqrt())
    }

    /// One update; `t` is the 1-based update count for bias correction. Returns the gradient norm.
    pub fn step(&mut self, grads: &GradStore, lr: f64, t: usize) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let scale = match self.cfg.grad_clip {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let w = p.as_tensor();
            let decay = if w.rank() >= 2 && self.cfg.weight_decay > 0.0 {
                1.0 - lr * self.cfg.weight_decay
            } else {
                1.0
            };
            if [w, g, &self.m[i], &self.v[i]].into_iter().all(is_cpu_f32) {
                let k = Update {
                    scale: scale as f32,
                    b1: b1 as f32,
                    b2: b2 as f32,
                    c1: c1 as f32,
                    c2: c2 as f32,
                    eps: self.cfg.eps as f32,
                    lr: lr as f32,
                    decay: decay as f32,
                };
                let (w, m, v) = k.apply(w, g, &self.m[i], &self.v[i])?;
                p.set(&w)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
            let g = if scale != 1.0 {
                (g * scale)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = if decay != 1.0 {
                (w * decay)?
            } else {
                w.clone()
            };
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// Moments as `m.NAME` / `v.NAME` for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restore moments saved by `state`; every parameter must be present with its shape.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (key, slot) in [
                (format!("m.{name}"), &mut self.m[i]),
                (format!("v.{name}"), &mut self.v[i]),
            ] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                if t.dims() != p.as_tensor().dims() {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        t.dims(),
                        p.dims()
                    ));
                }
                *slot = t.clone();
            }
        }
        Ok(())
    }
}

/// Exponential moving average of the weights; the decay warms up as min(decay, (1+t)/(10+t)) so
/// that short runs are not dominated by the initialisation.
pub struct Ema {
    pub decay: f64,
    pub shadow: HashMap<String, Tensor>,
}

impl Ema {
    pub fn new(params: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Ema { decay, shadow })
    }

    /// Fold in the current weights after update `t` (1-based): `s += (1 − d)(v − s)`, which
    /// leaves a weight that did not move exactly as it was (`d·s + (1 − d)·v` rounds it a little
    /// every update: a frozen encoder's exported weights drifted by up to 5e-5 in 1,600).
    pub fn update(&mut self, params: &[(String, Var)], t: usize) -> Result<()> {
        let d = self.decay.min((1.0 + t as f64) / (10.0 + t as f64));
        for (name, v) in params {
            if let Some(s) = self.shadow.get_mut(name) {
                let v = v.as_tensor().detach();
                *s = match d == 0.0 {
                    true => v.copy()?, // no averaging: exactly the weights
                    false => (&*s + ((v - &*s)? * (1.0 - d))?)?,
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The fused f32 update equals the tensor-op update (run in f64) over a few steps, with
    /// clipping, weight decay on the matrix and none on the vector: within f32 rounding.
    #[test]
    fn fused_update_matches_tensor_ops() -> Result<()> {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: Some(0.5),
        };
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (5, 7), &dev)?;
        let b0 = Tensor::randn(0f32, 1., 7, &dev)?;
        let run = |dtype: DType| -> Result<Vec<Vec<f32>>> {
            let w = Var::from_tensor(&w0.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&b0.to_dtype(dtype)?)?;
            let named = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
            let mut opt = AdamW::new(named, cfg.clone())?;
            for t in 1..=3 {
                let y = w.as_tensor().broadcast_mul(&b.as_tensor().unsqueeze(0)?)?;
                let loss = (y.sqr()?.sum_all()? + b.as_tensor().sum_all()?)?;
                opt.step(&loss.backward()?, 0.01, t)?;
            }
            [w, b]
                .iter()
                .map(|v| {
                    Ok(v.as_tensor()
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?)
                })
                .collect()
        };
        let (fused, reference) = (run(DType::F32)?, run(DType::F64)?);
        for (a, b) in fused.iter().zip(&reference) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        Ok(())
    }
}
