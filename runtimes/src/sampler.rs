//! The one host-side sampler every runtime uses: identical logits and seed give identical tokens
//! whichever runtime produced the logits.

use crate::rng::Rng;
use std::ops::Range;

/// How the next image token is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (nucleus sampling).
    pub top_p: Option<f32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

/// A sampling parameter outside its range.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SamplingError {
    #[error("temperature must be a finite number ≥ 0 (got {0}); use 0 for greedy decoding")]
    Temperature(f32),
    #[error("top-k must be at least 1 (got 0)")]
    TopK,
    #[error("top-p must be in (0, 1] (got {0})")]
    TopP(f32),
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::TopK);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError::TopP(p));
            }
        }
        Ok(())
    }
}

/// Classifier-free guidance (Ho & Salimans 2022): uncond + scale · (cond − uncond), in place on
/// `cond`. Scale 1 returns `cond` unchanged.
pub fn guide(cond: &mut [f32], uncond: &[f32], scale: f32) {
    if scale == 1.0 {
        return;
    }
    for (c, u) in cond.iter_mut().zip(uncond) {
        *c = u + scale * (*c - u);
    }
}

/// Draws tokens from logits with a seeded generator.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self, SamplingError> {
        Self::for_image(params, seed, 0)
    }

    /// The sampler of image `index` of a request: each image of a batch has its own stream, so
    /// image i is the same whatever the batch size.
    pub fn for_image(params: SamplingParams, seed: u64, index: u64) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng::stream(seed, "sample", index),
        })
    }

    /// The next token id, restricted to `allowed` (e.g. the image-code range of the unified
    /// vocabulary). `logits` covers the whole vocabulary.
    pub fn sample(&mut self, logits: &[f32], allowed: Range<usize>) -> usize {
        let slice = &logits[allowed.clone()];
        let greedy = self.params.temperature == 0.0 || self.params.top_k == Some(1);
        // Indices sorted by logit, highest first; ties broken by the lower index.
        let mut order: Vec<usize> = (0..slice.len()).collect();
        order.sort_by(|&a, &b| slice[b].total_cmp(&slice[a]).then(a.cmp(&b)));
        if greedy {
            // Draw anyway so that the stream advances the same way in every mode.
            self.rng.uniform();
            return allowed.start + order[0];
        }
        if let Some(k) = self.params.top_k {
            order.truncate(k.min(order.len()));
        }
        let t = self.params.temperature as f64;
        let max = slice[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((slice[i] as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u = self.rng.uniform();
        let mut acc = 0.0;
        for (p, &i) in probs.iter().zip(&order) {
            acc += p;
            if u < acc {
                return allowed.start + i;
            }
        }
        allowed.start + *order.last().unwrap_or(&0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![9.0, 0.5, 2.0, 1.0, 3.0, 0.0, 2.5, 1.5]
    }

    #[test]
    fn greedy_and_top_k_1_pick_the_argmax_of_the_allowed_range() {
        let mut greedy = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            1,
        )
        .unwrap();
        assert_eq!(greedy.sample(&logits(), 1..8), 4);
        let mut k1 = Sampler::new(
            SamplingParams {
                top_k: Some(1),
                ..Default::default()
            },
            2,
        )
        .unwrap();
        assert_eq!(k1.sample(&logits(), 1..8), 4);
        assert_eq!(k1.sample(&logits(), 0..8), 0);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed).unwrap();
            (0..64)
                .map(|_| s.sample(&logits(), 1..8))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        assert!(draw(3).iter().all(|&t| (1..8).contains(&t)));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: Some(2),
                ..Default::default()
            },
            5,
        )
        .unwrap();
        assert!((0..200).all(|_| [4, 6].contains(&s.sample(&logits(), 1..8))));
        // Logits 3.0 and 2.5 hold ≈ 60% of the mass of the range; top-p 0.5 keeps both at most.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: Some(0.5),
                ..Default::default()
            },
            5,
        )
        .unwrap();
        assert!((0..200).all(|_| [4, 6].contains(&s.sample(&logits(), 1..8))));
        // High temperature spreads the draws over the whole range.
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 100.0,
                ..Default::default()
            },
            5,
        )
        .unwrap();
        let mut seen: Vec<usize> = (0..500).map(|_| s.sample(&logits(), 1..8)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 7);
    }

    #[test]
    fn bad_parameters_are_errors() {
        let bad = |p: SamplingParams| Sampler::new(p, 0).unwrap_err();
        assert_eq!(
            bad(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }),
            SamplingError::Temperature(-1.0)
        );
        assert_eq!(
            bad(SamplingParams {
                top_k: Some(0),
                ..Default::default()
            }),
            SamplingError::TopK
        );
        assert_eq!(
            bad(SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            }),
            SamplingError::TopP(0.0)
        );
        assert_eq!(
            bad(SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            }),
            SamplingError::TopP(1.5)
        );
    }

    #[test]
    fn guidance_scale_one_is_no_guidance() {
        let mut cond = vec![1.0, 2.0, 3.0];
        guide(&mut cond, &[0.0, 0.0, 0.0], 1.0);
        assert_eq!(cond, [1.0, 2.0, 3.0]);
        guide(&mut cond, &[1.0, 1.0, 1.0], 3.0);
        assert_eq!(cond, [1.0, 4.0, 7.0]);
    }
}
