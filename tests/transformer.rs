//! Stage 2: the sparse transformer's cache, gradients and parameter count.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dalle::config::Config;
use dalle::transformer::model::{init_value, loss};
use dalle::transformer::{KvCache, Transformer};
use dalle_runtimes::AttentionKind;

/// Cached and uncached attention sum the same products in a different order: agreement to this
/// fraction of the largest logit.
const F32_CACHE_REL_TOL: f32 = 1e-5;

/// Three layers: row, column, conv — every mask kind. 4 caption tokens, 4×4 image tokens.
fn micro() -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.geometry.image_size = 32;
    c.geometry.grid = 4;
    c.geometry.codebook = 16;
    c.geometry.text_len = 4;
    c.geometry.text_vocab = 20;
    c.vae.vocab_size = 16;
    c.transformer.d_model = 32;
    c.transformer.n_layers = 3;
    c.transformer.n_heads = 4;
    c.transformer.conv_kernel = 3;
    c.validate().unwrap();
    c
}

fn build(cfg: &Config, seed: u64) -> (VarMap, Transformer) {
    let vm = VarMap::new();
    let model =
        Transformer::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    // Larger than the training init so that attention is far from uniform (scores ×25), but
    // not so large that near-tied scores turn f32 rounding into logit differences: at 8–20×
    // the cached-vs-full gap of batch 3 landed anywhere from 0.3× to 1.7× the 1e-5 tolerance
    // depending only on how the layer norm rounds (candle's tensor ops or the fused kernel, both
    // within 5e-7 of each other); at 5× both are 10× inside it.
    dalle::train::init_vars(&vm, seed, |n, d, r| {
        init_value(n, d, r).iter().map(|v| v * 5.0).collect()
    })
    .unwrap();
    (vm, model)
}

fn random_ids(b: usize, cfg: &Config, seed: u64) -> Tensor {
    let layout = dalle_runtimes::TokenLayout::from(&cfg.geometry);
    let mut rng = dalle::rng::Rng::new(seed);
    let s = cfg.geometry.seq_len();
    let ids: Vec<u32> = (0..b * s)
        .map(|i| {
            if i % s < cfg.geometry.text_len {
                rng.below(cfg.geometry.text_vocab) as u32
            } else {
                layout.image(rng.below(cfg.geometry.codebook) as u32)
            }
        })
        .collect();
    Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap()
}

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

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let cfg = micro();
    let (_vm, model) = build(&cfg, 3);
    assert_eq!(
        model.kinds(),
        &[
            AttentionKind::Row,
            AttentionKind::Column,
            AttentionKind::Conv { kernel: 3 }
        ]
    );
    let s = cfg.geometry.seq_len();
    let t = cfg.geometry.text_len;
    // Batch 6 takes the decoding step's matrix-product path, 1 and 3 its matrix-vector one.
    for b in [1, 3, 6] {
        let ids = random_ids(b, &cfg, b as u64);
        let full = model.forward(&ids, None).unwrap();
        // Prefill half the caption, then one token per step (text positions too).
        let mut cache = KvCache::new(model.n_layers());
        let mut parts = vec![model
            .forward(&ids.narrow(1, 0, t / 2).unwrap(), Some(&mut cache))
            .unwrap()];
        for p in t / 2..s {
            parts.push(
                model
                    .forward(&ids.narrow(1, p, 1).unwrap(), Some(&mut cache))
                    .unwrap(),
            );
        }
        assert_eq!(cache.past_len(), Some(s));
        let stepped = Tensor::cat(&parts, 1).unwrap();
        let tol = F32_CACHE_REL_TOL * max_abs(&full).max(1.0);
        let d = max_diff(&full, &stepped);
        assert!(
            d < tol,
            "batch {b}: cached vs full differ by {d} (tolerance {tol})"
        );
        // Uneven chunks too.
        let mut cache = KvCache::new(model.n_layers());
        let a = model
            .forward(&ids.narrow(1, 0, 7).unwrap(), Some(&mut cache))
            .unwrap();
        let c = model
            .forward(&ids.narrow(1, 7, s - 7).unwrap(), Some(&mut cache))
            .unwrap();
        let chunked = Tensor::cat(&[a, c], 1).unwrap();
        for p in 0..s {
            let d = max_diff(
                &full.narrow(1, p, 1).unwrap(),
                &chunked.narrow(1, p, 1).unwrap(),
            );
            assert!(
                d < tol,
                "batch {b}: chunked decoding differs at position {p} by {d} (tolerance {tol})"
            );
        }
        // The masks matter: changing a later token never changes earlier logits.
        let mut changed = ids.to_vec2::<u32>().unwrap();
        changed[0][s - 1] ^= 1;
        let changed = Tensor::new(changed, &Device::Cpu).unwrap();
        let other = model.forward(&changed, None).unwrap();
        assert_eq!(
            max_diff(
                &full.narrow(1, 0, s - 1).unwrap(),
                &other.narrow(1, 0, s - 1).unwrap()
            ),
            0.0
        );
    }
    // Past the end of the sequence is an error, not a panic.
    let mut cache = KvCache::new(model.n_layers());
    let ids = random_ids(1, &cfg, 9);
    model.forward(&ids, Some(&mut cache)).unwrap();
    assert!(model
        .forward(&ids.narrow(1, 0, 1).unwrap(), Some(&mut cache))
        .is_err());
}

/// Logits of a prefill of the caption, then one image token per step.
fn stepped_logits(model: &Transformer, ids: &Tensor, cfg: &Config) -> Tensor {
    let (t, s) = (cfg.geometry.text_len, cfg.geometry.seq_len());
    let mut cache = KvCache::new(model.n_layers());
    let mut parts = vec![model
        .forward(&ids.narrow(1, 0, t).unwrap(), Some(&mut cache))
        .unwrap()];
    for p in t..s {
        parts.push(
            model
                .forward(&ids.narrow(1, p, 1).unwrap(), Some(&mut cache))
                .unwrap(),
        );
    }
    Tensor::cat(&parts, 1).unwrap()
}

#[test]
fn f16_weight_streaming_gives_the_f32_logits_exactly() {
    // d_model 40: rows of 40 values take the vector kernel's tail as well.
    for d in [32, 40] {
        let mut cfg = micro();
        cfg.transformer.d_model = d;
        cfg.validate().unwrap();
        let (vm, model) = build(&cfg, 4);
        let mut halved = model.clone();
        halved.keep_f16_weights().unwrap();
        let ids = random_ids(1, &cfg, 11);
        // On weights f16 cannot hold, the steps do read the f16 copy: the logits move.
        let moved = max_diff(
            &stepped_logits(&model, &ids, &cfg),
            &stepped_logits(&halved, &ids, &cfg),
        );
        assert!(moved > 0.0, "d_model {d}: the f16 copy was not used");
        // On weights that are f16 values (an `--fp16` export, widened on loading), the same
        // logits to the last bit, at batch 1 and 3 (the matrix-vector path).
        for var in vm.all_vars() {
            let rounded = var
                .as_tensor()
                .to_dtype(DType::F16)
                .and_then(|t| t.to_dtype(DType::F32))
                .unwrap();
            var.set(&rounded).unwrap();
        }
        let mut halved = model.clone();
        halved.keep_f16_weights().unwrap();
        for b in [1, 3] {
            let ids = random_ids(b, &cfg, 12 + b as u64);
            let d = max_diff(
                &stepped_logits(&model, &ids, &cfg),
                &stepped_logits(&halved, &ids, &cfg),
            );
            assert_eq!(d, 0.0, "d_model {}, batch {b}", cfg.transformer.d_model);
        }
    }
}

#[test]
fn every_parameter_receives_a_gradient_and_training_lowers_the_loss() {
    let cfg = micro();
    let (vm, model) = build(&cfg, 5);
    let ids = random_ids(4, &cfg, 11);
    let logits = model.forward(&ids, None).unwrap();
    let (total, _, _) = loss(&logits, &ids, cfg.geometry.text_len).unwrap();
    let grads = total.backward().unwrap();
    let vars = dalle::train::named_vars(&vm);
    assert_eq!(vars.len(), 4 + 3 * 12 + 2 + 2);
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "zero gradient for {name}");
    }

    let (vm, model) = build(&cfg, 5);
    dalle::train::init_vars(&vm, 5, init_value).unwrap();
    let adamw = dalle::train::optim::AdamWConfig {
        beta1: 0.9,
        beta2: 0.96,
        eps: 1e-8,
        weight_decay: 4.5e-2,
        grad_clip: Some(4.0),
    };
    let mut opt = dalle::train::optim::AdamW::new(dalle::train::named_vars(&vm), adamw).unwrap();
    let mut losses = vec![];
    for step in 0..30 {
        let (total, _, _) = loss(
            &model.forward(&ids, None).unwrap(),
            &ids,
            cfg.geometry.text_len,
        )
        .unwrap();
        losses.push(total.to_scalar::<f32>().unwrap());
        opt.step(&total.backward().unwrap(), 3e-3, step + 1)
            .unwrap();
    }
    assert!(losses[29] < losses[0] * 0.7, "{losses:?}");
}

#[test]
fn parameter_count_matches_the_config_formula() {
    let cfg = Config::preset("tiny").unwrap();
    let vm = VarMap::new();
    let _model =
        Transformer::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let n: usize = dalle::train::named_vars(&vm)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(n, cfg.transformer_params());
    // The paper's 12B model, by the same formula.
    assert_eq!(
        Config::preset("paper").unwrap().transformer_params(),
        12_293_849_088
    );
}

#[test]
fn loss_weights_text_one_eighth_and_image_seven_eighths() {
    let cfg = micro();
    let (_vm, model) = build(&cfg, 1);
    let ids = random_ids(2, &cfg, 2);
    let (total, text, image) = loss(
        &model.forward(&ids, None).unwrap(),
        &ids,
        cfg.geometry.text_len,
    )
    .unwrap();
    let (t, i, tot) = (
        text.to_scalar::<f32>().unwrap(),
        image.to_scalar::<f32>().unwrap(),
        total.to_scalar::<f32>().unwrap(),
    );
    assert!((tot - (t / 8.0 + 7.0 * i / 8.0)).abs() < 1e-5);
    assert!(t > 0.0 && i > 0.0);
}

/// The image-codes-only losses: the text part is the full-vocabulary loss's, the image part the
/// cross-entropy of log-softmax over the image range of the full logits (the same numbers
/// computed the long way), the total weighs them 1/8 and 7/8, and every parameter still gets a
/// gradient; without the option it is `loss` over `forward` exactly.
#[test]
fn image_codes_only_loss_is_the_cross_entropy_over_the_codes() {
    let cfg = micro();
    let (vm, model) = build(&cfg, 3);
    let ids = random_ids(3, &cfg, 4);
    let (t, s) = (cfg.geometry.text_len, cfg.geometry.seq_len());
    let layout = dalle_runtimes::TokenLayout::from(&cfg.geometry);
    let logits = model.forward(&ids, None).unwrap();
    let (full_total, full_text, _) = loss(&logits, &ids, t).unwrap();
    let (total, text, image) = model.losses(&ids, true).unwrap();
    let image_logits = logits
        .narrow(1, t - 1, s - t)
        .unwrap()
        .narrow(2, layout.image_offset(), layout.codebook)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&image_logits, 2).unwrap();
    let codes: Vec<u32> = ids
        .narrow(1, t, s - t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .map(|&id| layout.image_code(id).unwrap())
        .collect();
    let codes = Tensor::from_vec(codes, (3, s - t, 1), &Device::Cpu).unwrap();
    let want = logp
        .gather(&codes, 2)
        .unwrap()
        .neg()
        .unwrap()
        .mean_all()
        .unwrap();
    let v = |x: &Tensor| x.to_scalar::<f32>().unwrap();
    assert!(
        (v(&image) - v(&want)).abs() < 1e-5,
        "{} vs {}",
        v(&image),
        v(&want)
    );
    assert!((v(&text) - v(&full_text)).abs() < 1e-6);
    assert!((v(&total) - (v(&text) / 8.0 + 7.0 * v(&image) / 8.0)).abs() < 1e-5);
    let grads = total.backward().unwrap();
    for (name, var) in dalle::train::named_vars(&vm) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(
            v(&g.abs().unwrap().sum_all().unwrap()) > 0.0,
            "zero gradient for {name}"
        );
    }
    let (plain, _, _) = model.losses(&ids, false).unwrap();
    assert_eq!(v(&plain), v(&full_total));
}

/// A choice's margin is how much likelier the row's code is than the alternative at its
/// position: the alternative's NLL minus the code's, read from a row holding the alternative
/// there (same prefix, so the same prediction) — under both losses, as the softmax's
/// normaliser cancels.
#[test]
fn a_code_choice_margin_is_the_difference_of_the_two_codes_log_likelihoods() {
    use dalle::transformer::model::CodeChoice;
    let cfg = micro();
    let (_vm, model) = build(&cfg, 3);
    let ids = random_ids(2, &cfg, 5);
    let (t, s) = (cfg.geometry.text_len, cfg.geometry.seq_len());
    let layout = dalle_runtimes::TokenLayout::from(&cfg.geometry);
    let mut rows: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    let mut choices = vec![];
    for (row, position) in [(0usize, 0usize), (1, 5), (0, s - t - 1)] {
        let at = row * s + t + position;
        let code = layout.image_code(rows[at]).unwrap();
        let other = (code + 7) % cfg.geometry.codebook as u32;
        choices.push(CodeChoice {
            row,
            position,
            code,
            other,
        });
        // A row that holds the alternative there, everything before it the same.
        let mut alt = rows[row * s..(row + 1) * s].to_vec();
        alt[t + position] = layout.image(other);
        rows.extend(alt);
    }
    let all = Tensor::from_vec(rows, (5, s), &Device::Cpu).unwrap();
    for codes_only in [true, false] {
        let (_, image, margins) = model
            .position_nll_and_margins(&ids, codes_only, &choices)
            .unwrap();
        let margins: Vec<f32> = margins.unwrap().to_vec1().unwrap();
        let (_, nll) = model.position_nll(&all, codes_only).unwrap();
        let nll: Vec<Vec<f32>> = nll.to_vec2().unwrap();
        let plain: Vec<Vec<f32>> = image.to_vec2().unwrap();
        for (k, c) in choices.iter().enumerate() {
            let want = nll[2 + k][c.position] - nll[c.row][c.position];
            assert!((plain[c.row][c.position] - nll[c.row][c.position]).abs() < 1e-5);
            assert!(
                (margins[k] - want).abs() < 1e-4,
                "choice {k} ({codes_only}): {} vs {want}",
                margins[k]
            );
        }
    }
}

mod generation {
    use super::*;
    use dalle::transformer::generate::{generate, Request};
    use dalle_runtimes::SamplingParams;

    fn request(cfg: &Config) -> Request {
        let layout = dalle_runtimes::TokenLayout::from(&cfg.geometry);
        Request {
            text: layout.caption(&[3, 7, 1]).unwrap().0,
            num_images: 3,
            params: SamplingParams::default(),
            seed: 1,
            guidance_scale: 1.0,
            rerank: 1,
            prime: vec![],
        }
    }

    #[test]
    fn seeds_greedy_guidance_and_priming() {
        let cfg = micro();
        let (_vm, model) = build(&cfg, 7);
        let dev = Device::Cpu;
        let n = cfg.geometry.grid * cfg.geometry.grid;
        let base = request(&cfg);

        let a = generate(&model, &base, &dev).unwrap();
        assert_eq!(a.len(), 3);
        assert!(
            a.iter()
                .all(|img| img.len() == n
                    && img.iter().all(|&c| (c as usize) < cfg.geometry.codebook))
        );
        assert_eq!(
            a,
            generate(&model, &base, &dev).unwrap(),
            "same seed, same tokens"
        );
        let other = generate(
            &model,
            &Request {
                seed: 2,
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        assert_ne!(a, other, "different seeds, different tokens");
        // Image i does not depend on how many images share the batch.
        let one = generate(
            &model,
            &Request {
                num_images: 1,
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        assert_eq!(one[0], a[0]);

        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let top1 = SamplingParams {
            top_k: Some(1),
            ..Default::default()
        };
        let g = generate(
            &model,
            &Request {
                params: greedy,
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        let k = generate(
            &model,
            &Request {
                params: top1,
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        assert_eq!(g, k, "top-k 1 is greedy");
        // Greedy decoding equals the argmax of a full forward pass over its own output.
        let layout = model.layout();
        let mut ids: Vec<u32> = base.text.clone();
        ids.extend(g[0].iter().map(|&c| layout.image(c)));
        let full = model
            .forward(
                &Tensor::new(ids.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        let t = cfg.geometry.text_len;
        let img = full
            .narrow(2, layout.image_offset(), cfg.geometry.codebook)
            .unwrap();
        let argmax = img
            .narrow(1, t - 1, n)
            .unwrap()
            .argmax(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(argmax, g[0]);

        let guided1 = generate(
            &model,
            &Request {
                guidance_scale: 1.0,
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        assert_eq!(guided1, a, "guidance scale 1 is no guidance");
        let guided3 = generate(
            &model,
            &Request {
                guidance_scale: 3.0,
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        assert_ne!(guided3, a);

        let prime: Vec<u32> = (0..2 * cfg.geometry.grid as u32).map(|i| i % 16).collect();
        let primed = generate(
            &model,
            &Request {
                prime: prime.clone(),
                ..base.clone()
            },
            &dev,
        )
        .unwrap();
        assert!(primed
            .iter()
            .all(|img| img[..prime.len()] == prime[..] && img.len() == n));

        // Bad requests are errors.
        assert!(generate(
            &model,
            &Request {
                num_images: 0,
                ..base.clone()
            },
            &dev
        )
        .is_err());
        assert!(generate(
            &model,
            &Request {
                prime: vec![0; n],
                ..base.clone()
            },
            &dev
        )
        .is_err());
        assert!(generate(
            &model,
            &Request {
                text: vec![1],
                ..base.clone()
            },
            &dev
        )
        .is_err());
        let bad = SamplingParams {
            top_p: Some(2.0),
            ..Default::default()
        };
        assert!(generate(
            &model,
            &Request {
                params: bad,
                ..base
            },
            &dev
        )
        .unwrap_err()
        .to_string()
        .contains("top-p"));
    }
}

mod training {
    use super::*;
    use dalle::data::filters::Filters;
    use dalle::transformer::train::{
        train_transformer, TransformerTrainOptions, TransformerTrainRequest,
    };
    use std::path::Path;

    /// 32 px → 4×4 codes from a micro dVAE; a 300-id caption vocabulary (byte-level BPE needs
    /// more than 256) and 12 caption positions.
    fn config() -> Config {
        let mut c = micro();
        c.geometry.text_vocab = 300;
        c.geometry.text_len = 12;
        c.vae.n_hid = 8;
        c.vae.n_blk_per_group = 1;
        c.vae.n_init = 16;
        c.validate().unwrap();
        c
    }

    fn vae_dir(tmp: &Path, data: &Path) -> std::path::PathBuf {
        let out = tmp.join("vae");
        let mut options = dalle::vae::train::VaeTrainOptions::new(1, 2, 0);
        options.lp.sample_every = 100;
        dalle::vae::train::train_vae(dalle::vae::train::VaeTrainRequest {
            config: config(),
            data: data.to_path_buf(),
            out: out.clone(),
            options,
            resume: false,
            stop_at: None,
            device: Device::Cpu,
            filters: Filters::default(),
        })
        .unwrap();
        out
    }

    fn request(
        vae: &Path,
        data: &Path,
        out: &Path,
        steps: usize,
        resume: bool,
        stop_at: Option<usize>,
    ) -> TransformerTrainRequest {
        let mut options = TransformerTrainOptions::new(steps, 4, 9);
        options.bpe_dropout = 0.0;
        options.lr_peak = 3e-3;
        options.lp.checkpoint_every = 3;
        options.lp.sample_every = 1000;
        options.lp.log_every = 1;
        TransformerTrainRequest {
            config: config(),
            vae: vae.to_path_buf(),
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            eval_data: Some(data.to_path_buf()),
            options,
            resume,
            stop_at,
            device: Device::Cpu,
            filters: Filters::default(),
        }
    }

    #[test]
    fn loss_falls_and_resume_is_bit_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        dalle::data::shapes::write_set(&data, 24, 1, dalle::data::shapes::Split::Train, 32, false)
            .unwrap();
        let vae = vae_dir(tmp.path(), &data);

        let long = tmp.path().join("long");
        train_transformer(request(&vae, &data, &long, 40, false, None)).unwrap();
        let csv = std::fs::read_to_string(long.join("metrics.csv")).unwrap();
        let losses: Vec<f64> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        let first = losses[..3].iter().sum::<f64>() / 3.0;
        let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
        assert!(
            last < first * 0.8,
            "loss did not fall: {first:.3} → {last:.3}"
        );
        // The held-out loss (here over the training scenes themselves) joins the last row.
        let head: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let col = head.iter().position(|c| *c == "heldout_loss").unwrap();
        let last_row: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
        let heldout: f64 = last_row[col].parse().unwrap();
        assert!(
            heldout.is_finite() && heldout < first,
            "held-out loss {heldout} after training (first training loss {first})"
        );

        let straight = tmp.path().join("straight");
        train_transformer(request(&vae, &data, &straight, 8, false, None)).unwrap();
        let split = tmp.path().join("split");
        train_transformer(request(&vae, &data, &split, 8, false, Some(4))).unwrap();
        train_transformer(request(&vae, &data, &split, 8, true, None)).unwrap();
        super::common::assert_same_checkpoint(&straight, &split);
    }

    /// The hard-negative term: negatives that are copies of their samples offer no choice (no
    /// term, held-out margins 0 but for float rounding between batch rows, so no preference); with the real ones and a large weight, the model
    /// learns to prefer the images it trains on to their negatives.
    #[test]
    fn hard_negatives_are_paired_with_their_samples() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let spec = dalle::data::shapes::SetSpec {
            negatives: true,
            ..dalle::data::shapes::SetSpec::new(24, 1, dalle::data::shapes::Split::Train, 32)
        };
        dalle::data::shapes::write_set_capped(&data, &spec, false, &[]).unwrap();
        let vae = vae_dir(tmp.path(), &data);
        let column = |out: &Path, name: &str| -> Vec<f64> {
            let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
            let head: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
            let col = head.iter().position(|c| *c == name).unwrap();
            csv.lines()
                .skip(1)
                .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
                .filter(|v: &f64| !v.is_nan())
                .collect()
        };

        let copies = tmp.path().join("copies");
        std::fs::create_dir(&copies).unwrap();
        let meta = std::fs::read_to_string(data.join("metadata.jsonl")).unwrap();
        for line in meta.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let name = v["file_name"].as_str().unwrap();
            std::fs::copy(data.join(name), copies.join(name)).unwrap();
            for n in v["negatives"].as_array().into_iter().flatten() {
                std::fs::copy(data.join(name), copies.join(n.as_str().unwrap())).unwrap();
            }
        }
        std::fs::write(copies.join("metadata.jsonl"), &meta).unwrap();
        let out = tmp.path().join("same");
        let mut req = request(&vae, &copies, &out, 6, false, None);
        req.options.negative_weight = 1.0;
        req.eval_data = Some(copies.clone());
        train_transformer(req).unwrap();
        let head = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
        assert!(!head.lines().next().unwrap().contains("contrast"), "{head}");
        assert_eq!(column(&out, "heldout_prefer"), [0.0]);
        let margin = column(&out, "heldout_margin");
        assert_eq!(margin.len(), 1);
        assert!(
            margin[0].abs() < dalle::transformer::train::MARGIN_TIE_NATS,
            "copies of a sample score {margin:?} nats apart"
        );
        assert!(
            column(&out, "heldout_choice").is_empty(),
            "no decision to make"
        );

        let run = |weight: f64| {
            let out = tmp.path().join(format!("w{weight}"));
            let mut req = request(&vae, &data, &out, 60, false, None);
            req.options.negative_weight = weight;
            train_transformer(req).unwrap();
            (
                column(&out, "heldout_prefer")[0],
                column(&out, "heldout_margin")[0],
            )
        };
        let (plain, contrasted) = (run(0.0), run(3.0));
        // A resumed run keeps its stored weight, whatever the command line says.
        let straight = tmp.path().join("straight");
        let mut req = request(&vae, &data, &straight, 8, false, None);
        req.options.negative_weight = 3.0;
        train_transformer(req).unwrap();
        let split = tmp.path().join("split");
        let mut req = request(&vae, &data, &split, 8, false, Some(4));
        req.options.negative_weight = 3.0;
        train_transformer(req).unwrap();
        train_transformer(request(&vae, &data, &split, 8, true, None)).unwrap();
        super::common::assert_same_checkpoint(&straight, &split);
        assert!(
            contrasted.0 > plain.0 && contrasted.1 > plain.1 + 1.0,
            "{plain:?} {contrasted:?}"
        );
    }
}
