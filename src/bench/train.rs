//! One training update of each stage (forward, backward, AdamW) on random data, timed: the
//! figure set against the PyTorch peer's training step.

use crate::config::Config;
use crate::rng::Rng;
use crate::train::optim::AdamW;
use crate::transformer::train::TransformerTrainOptions;
use crate::transformer::{model::loss, Transformer};
use crate::vae::loss::{gumbel_softmax, kl_to_uniform, logit_laplace_nll};
use crate::vae::model::map_pixels;
use crate::vae::train::VaeTrainOptions;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

/// Median seconds of one update of each stage at `batch`.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSteps {
    pub batch: usize,
    pub transformer_step_s: f64,
    pub transformer_params: usize,
    pub dvae_step_s: f64,
    pub dvae_params: usize,
}

/// Median of `reps` timed calls after one untimed warm-up call.
fn median_time(reps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    f(0)?;
    let mut times = vec![];
    for i in 1..=reps.max(1) {
        let t = std::time::Instant::now();
        f(i)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Time `reps` updates of each stage of `cfg` at `batch` on the CPU.
pub fn train_steps(cfg: &Config, batch: usize, reps: usize) -> Result<TrainSteps> {
    // As `dalle train` runs: large freed tensors are reused between steps (see `crate::alloc`).
    let _reuse = crate::alloc::ReuseGuard::new();
    let dev = Device::Cpu;
    let g = &cfg.geometry;

    // Stage 2: captions and image codes drawn at random, the paper's loss and optimizer.
    let vm = VarMap::new();
    let model = Transformer::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    crate::train::init_vars(&vm, 0, crate::transformer::model::init_value)?;
    // Each stage's own optimiser settings, as `dalle train` / `dalle train-vae` use them.
    let adamw = TransformerTrainOptions::new(1, batch, 0).lp.adamw;
    let mut opt = AdamW::new(crate::train::named_vars(&vm), adamw)?;
    let layout = model.layout();
    let s = model.seq_len();
    let transformer_step_s = median_time(reps, |i| {
        let mut rng = Rng::stream(0, "bench-ids", i as u64);
        let ids: Vec<u32> = (0..batch * s)
            .map(|j| {
                let r = rng.next_u64() as usize;
                if j % s < g.text_len {
                    (r % g.text_vocab) as u32
                } else {
                    layout.image((r % g.codebook) as u32)
                }
            })
            .collect();
        let ids = Tensor::from_vec(ids, (batch, s), &dev)?;
        let (total, _, _) = loss(&model.forward(&ids, None)?, &ids, g.text_len)?;
        opt.step(&total.backward()?, 1e-4, i + 1)?;
        Ok(())
    })?;

    // Stage 1: the ELB of `VaeStage::loss` (logit-Laplace + β·KL through the gumbel-softmax).
    let (vm, encoder, decoder) = crate::vae::train::new_model(cfg, 0, &dev)?;
    let adamw = VaeTrainOptions::new(1, batch, 0).lp.adamw;
    let mut opt = AdamW::new(crate::train::named_vars(&vm), adamw)?;
    let px = g.image_size;
    let dvae_step_s = median_time(reps, |i| {
        let x = Tensor::rand(0f32, 1.0, (batch, 3, px, px), &dev)?;
        let logits = encoder.forward(&x)?;
        let mut rng = Rng::stream(0, "bench-gumbel", i as u64);
        let z = gumbel_softmax(&logits, 1.0, 1, &mut rng)?;
        let stats = decoder.forward(&z)?;
        let c = cfg.vae.channels;
        let nll = logit_laplace_nll(
            &map_pixels(&x)?,
            &stats.narrow(1, 0, c)?,
            &stats.narrow(1, c, c)?,
        )?;
        let l = ((nll + (kl_to_uniform(&logits, 1)? * 6.6)?)? / x.elem_count() as f64)?;
        opt.step(&l.backward()?, 1e-4, i + 1)?;
        Ok(())
    })?;
    Ok(TrainSteps {
        batch,
        transformer_step_s,
        transformer_params: cfg.transformer_params(),
        dvae_step_s,
        dvae_params: cfg.vae.encoder_params() + cfg.vae.decoder_params(),
    })
}
