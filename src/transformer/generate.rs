//! Generation from a candle model in memory (a training run's checkpoint or EMA weights), through
//! the one sampling loop all runtimes share.

use super::Transformer;
use crate::runtime::CandleSession;
use crate::Result;
use candle_core::Device;
use dalle_runtimes::generator::sample_codes;
use dalle_runtimes::SamplingParams;

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
    /// Candidates per image, the best fit to the caption kept (`dalle_runtimes::Request::rerank`).
    pub rerank: usize,
    /// Image codes of the first rows to keep (the paper's image completion), row-major.
    pub prime: Vec<u32>,
}

/// Generate `num_images` grids of image codes (not unified ids), row-major: the sampling loop of
/// `dalle_runtimes::generator::sample_codes`, on this candle model.
pub fn generate(model: &Transformer, req: &Request, device: &Device) -> Result<Vec<Vec<u32>>> {
    let session = CandleSession::from_models(model.clone(), None, device);
    let r = dalle_runtimes::Request {
        prompt: String::new(),
        num_images: req.num_images,
        params: req.params,
        seed: req.seed,
        guidance_scale: req.guidance_scale,
        rerank: req.rerank,
        prime: req.prime.clone(),
        strict: false,
    };
    Ok(sample_codes(&session, &req.text, &r, &mut |_, _| {})?.0)
}
