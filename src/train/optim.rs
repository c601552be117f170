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
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
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
            let g = if scale != 1.0 {
                (g * scale)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let w = p.as_tensor();
            let decayed = if w.rank() >= 2 && self.cfg.weight_decay > 0.0 {
                (w * (1.0 - lr * self.cfg.weight_decay))?
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

    /// Fold in the current weights after update `t` (1-based).
    pub fn update(&mut self, params: &[(String, Var)], t: usize) -> Result<()> {
        let d = self.decay.min((1.0 + t as f64) / (10.0 + t as f64));
        for (name, v) in params {
            if let Some(s) = self.shadow.get_mut(name) {
                *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?;
            }
        }
        Ok(())
    }
}
