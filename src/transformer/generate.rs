//! Native generation with a KV cache: prefill the caption (and any primed image rows) once, then
//! one image token per step for all images of the request as one batch.

use super::{KvCache, Transformer};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use dalle_runtimes::sampler::{guide, Sampler, SamplingParams};

/// One generation request for a single caption.
#[derive(Clone, Debug)]
pub struct Request {
    /// Caption ids in the unified vocabulary, exactly `text_len` of them (see `TokenLayout::caption`).
    pub text: Vec<u32>,
    pub num_images: usize,
    pub params: SamplingParams,
    pub seed: u64,
    /// Classifier-free guidance scale; 1 disables guidance (and the unconditional half-batch).
    pub guidance_scale: f32,
    /// Image codes of the first rows to keep (the paper's image completion), row-major.
    pub prime: Vec<u32>,
}

/// Generate `num_images` grids of image codes (not unified ids), row-major.
pub fn generate(model: &Transformer, req: &Request, device: &Device) -> Result<Vec<Vec<u32>>> {
    let layout = model.layout();
    let n_image = model.seq_len() - layout.text_len;
    if req.text.len() != layout.text_len {
        return Err(Error::Usage(format!(
            "caption must be {} ids, got {}",
            layout.text_len,
            req.text.len()
        )));
    }
    if req.num_images == 0 {
        return Err(Error::Usage("--num-images must be at least 1".into()));
    }
    if req.prime.len() >= n_image {
        return Err(Error::Usage(format!(
            "priming {} of {n_image} image tokens leaves nothing to generate",
            req.prime.len()
        )));
    }
    if !(req.guidance_scale.is_finite() && req.guidance_scale >= 0.0) {
        return Err(Error::Usage(format!(
            "guidance scale must be ≥ 0 (got {})",
            req.guidance_scale
        )));
    }
    let guided = req.guidance_scale != 1.0;
    let n = req.num_images;
    let mut samplers = (0..n as u64)
        .map(|i| Sampler::for_image(req.params, req.seed, i))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Usage(e.to_string()))?;
    // Rows 0..n condition on the caption; rows n..2n (with guidance) on the empty caption.
    let empty: Vec<u32> = (0..layout.text_len).map(|i| layout.pad(i)).collect();
    let primed: Vec<u32> = req.prime.iter().map(|&c| layout.image(c)).collect();
    let mut prefix: Vec<u32> = vec![];
    for row in 0..if guided { 2 * n } else { n } {
        prefix.extend(if row < n { &req.text } else { &empty });
        prefix.extend(&primed);
    }
    let b = if guided { 2 * n } else { n };
    let mut cache = KvCache::new(model.n_layers());
    let ids = Tensor::from_vec(prefix, (b, layout.text_len + primed.len()), device)?;
    let mut logits = last_position(&model.forward(&ids, Some(&mut cache))?)?;
    let mut out: Vec<Vec<u32>> = vec![req.prime.clone(); n];
    let image = layout.image_offset()..layout.vocab_size();
    for pos in req.prime.len()..n_image {
        let mut next = Vec::with_capacity(b);
        for i in 0..n {
            let mut row = logits[i].clone();
            if guided {
                guide(&mut row, &logits[n + i], req.guidance_scale);
            }
            let id = samplers[i].sample(&row, image.clone()) as u32;
            out[i].push(id - layout.image_offset() as u32);
            next.push(id);
        }
        if pos + 1 == n_image {
            break;
        }
        if guided {
            next.extend_from_within(..n);
        }
        let ids = Tensor::from_vec(next, (b, 1), device)?;
        logits = last_position(&model.forward(&ids, Some(&mut cache))?)?;
    }
    Ok(out)
}

/// (b, t, vocab) → the last position's logits of each row.
fn last_position(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (_, t, _) = logits.dims3()?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?)
}
