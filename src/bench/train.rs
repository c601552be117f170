//! One training update of each stage (forward, backward, AdamW) on random data, timed: the
//! figure set against the PyTorch peer's training step.

use super::peer::{PeerTrain, PeerTrainer};
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

/// Medians of `reps` timed calls of our step and of each peer step, taken in turn (ours, then
/// each peer's) after one untimed warm-up call of each: a drift of the machine's speed during
/// the measurement slows both sides alike. With a peer, each timed step starts after a short
/// pause ([`SETTLE`]), so that neither side's step overlaps the other's tail (PyTorch's OpenMP
/// workers spin for a while after a parallel region; ours sleep at once).
pub(crate) const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

fn alternate(
    reps: usize,
    mut ours: impl FnMut(usize) -> Result<()>,
    peer: &mut Option<&mut PeerTrainer>,
    peer_steps: &[&str],
) -> Result<(f64, Vec<f64>)> {
    ours(0)?;
    for name in peer_steps {
        if let Some(p) = peer.as_deref_mut() {
            p.step(name)?;
        }
    }
    let paired = peer.is_some();
    let (mut mine, mut theirs) = (vec![], vec![vec![]; peer_steps.len()]);
    for i in 1..=reps.max(1) {
        if paired {
            std::thread::sleep(SETTLE);
        }
        let t = std::time::Instant::now();
        ours(i)?;
        mine.push(t.elapsed().as_secs_f64());
        for (name, times) in peer_steps.iter().zip(&mut theirs) {
            if let Some(p) = peer.as_deref_mut() {
                std::thread::sleep(SETTLE);
                times.push(p.step(name)?);
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Ok((median(mine), theirs.into_iter().map(median).collect()))
}

/// Time `reps` updates of each stage of `cfg` at `batch` on the CPU; with a peer, its steps
/// alternate with ours and come back as its training figures.
pub fn train_steps(
    cfg: &Config,
    batch: usize,
    reps: usize,
    mut peer: Option<&mut PeerTrainer>,
) -> Result<(TrainSteps, Option<PeerTrain>)> {
    // As `dalle train` runs: freed pages are kept for the next step.
    crate::util::keep_freed_memory();
    crate::kernels::blas::check()?;
    let (transformer_step_s, peer_transformer) = alternate(
        reps,
        transformer_stepper(cfg, batch)?,
        &mut peer,
        &["transformer"],
    )?;
    let (dvae_step_s, peer_dvae) = alternate(
        reps,
        dvae_stepper(cfg, batch)?,
        &mut peer,
        &["openai_dvae", "dvae"],
    )?;
    let ours = TrainSteps {
        batch,
        transformer_step_s,
        transformer_params: cfg.transformer_params(),
        dvae_step_s,
        dvae_params: cfg.vae.encoder_params() + cfg.vae.decoder_params(),
    };
    let theirs = peer.map(|p| PeerTrain {
        batch,
        transformer_step_s: peer_transformer[0],
        dvae_step_s: peer_dvae[1],
        openai_dvae_step_s: Some(peer_dvae[0]),
        openai_dvae_params: p.openai_dvae_params,
    });
    Ok((ours, theirs))
}

/// One stage-2 update per call (the argument seeds the batch): captions and image codes drawn
/// at random, the paper's loss and optimiser.
pub fn transformer_stepper(cfg: &Config, batch: usize) -> Result<impl FnMut(usize) -> Result<()>> {
    let dev = Device::Cpu;
    let g = cfg.geometry;
    let vm = VarMap::new();
    let model = Transformer::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    crate::train::init_vars(&vm, 0, crate::transformer::model::init_value)?;
    // Each stage's own optimiser settings, as `dalle train` / `dalle train-vae` use them.
    let adamw = TransformerTrainOptions::new(1, batch, 0).lp.adamw;
    let mut opt = AdamW::new(crate::train::named_vars(&vm), adamw)?;
    let layout = model.layout();
    let s = model.seq_len();
    Ok(move |i: usize| {
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
    })
}

/// One stage-1 update per call on random images: the ELB of `VaeStage::loss` (logit-Laplace +
/// β·KL through the gumbel-softmax).
pub fn dvae_stepper(cfg: &Config, batch: usize) -> Result<impl FnMut(usize) -> Result<()>> {
    let dev = Device::Cpu;
    let g = cfg.geometry;
    let channels = cfg.vae.channels;
    let (vm, encoder, decoder) = crate::vae::train::new_model(cfg, 0, &dev)?;
    let adamw = VaeTrainOptions::new(1, batch, 0).lp.adamw;
    let mut opt = AdamW::new(crate::train::named_vars(&vm), adamw)?;
    let px = g.image_size;
    Ok(move |i: usize| {
        let x = Tensor::rand(0f32, 1.0, (batch, 3, px, px), &dev)?;
        let logits = encoder.forward(&x)?;
        let mut rng = Rng::stream(0, "bench-gumbel", i as u64);
        let z = gumbel_softmax(&logits, 1.0, 1, &mut rng)?;
        let stats = decoder.forward(&z)?;
        let c = channels;
        let nll = logit_laplace_nll(
            &map_pixels(&x)?,
            &stats.narrow(1, 0, c)?,
            &stats.narrow(1, c, c)?,
        )?;
        let l = ((nll + (kl_to_uniform(&logits, 1)? * 6.6)?)? / x.elem_count() as f64)?;
        opt.step(&l.backward()?, 1e-4, i + 1)?;
        Ok(())
    })
}
