//! Stage 1: dVAE architecture, gradients, training and resume.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dalle::config::{Config, VaeConfig};
use dalle::data::filters::Filters;
use dalle::vae::train::{new_model, train_vae, VaeTrainOptions, VaeTrainRequest};
use dalle::vae::{Decoder, Encoder};
use dalle_runtimes::manifest::DvaeEncoder;
use std::path::Path;

/// A dVAE small enough to train in seconds: 32 px → 4×4 tokens over 64 codes.
fn micro() -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.preset = "micro".into();
    c.geometry.image_size = 32;
    c.geometry.grid = 4;
    c.geometry.codebook = 64;
    c.vae = VaeConfig {
        group_count: 4,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 64,
        n_init: 16,
        channels: 3,
        post_gain: None,
        encoder: Default::default(),
    };
    c.validate().unwrap();
    c
}

fn names_and_shapes(build: impl Fn(VarBuilder)) -> Vec<(String, Vec<usize>)> {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu));
    let mut v: Vec<(String, Vec<usize>)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    v.sort();
    v
}

/// The state-dict keys `dall_e` 0.1 produces for group_count 4, n_hid 8, n_blk_per_group 1,
/// vocab_size 16, n_init 8, written out from encoder.py / decoder.py by hand.
fn dall_e_encoder_keys() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("blocks.input.w", vec![8, 3, 7, 7]),
        ("blocks.input.b", vec![8]),
        // group_1: 8 → 8, no id_path; res path hidden width 8/4 = 2; kernels 3,3,3,1.
        ("blocks.group_1.block_1.res_path.conv_1.w", vec![2, 8, 3, 3]),
        ("blocks.group_1.block_1.res_path.conv_1.b", vec![2]),
        ("blocks.group_1.block_1.res_path.conv_2.w", vec![2, 2, 3, 3]),
        ("blocks.group_1.block_1.res_path.conv_2.b", vec![2]),
        ("blocks.group_1.block_1.res_path.conv_3.w", vec![2, 2, 3, 3]),
        ("blocks.group_1.block_1.res_path.conv_3.b", vec![2]),
        ("blocks.group_1.block_1.res_path.conv_4.w", vec![8, 2, 1, 1]),
        ("blocks.group_1.block_1.res_path.conv_4.b", vec![8]),
        // group_2: 8 → 16.
        ("blocks.group_2.block_1.id_path.w", vec![16, 8, 1, 1]),
        ("blocks.group_2.block_1.id_path.b", vec![16]),
        ("blocks.group_2.block_1.res_path.conv_1.w", vec![4, 8, 3, 3]),
        ("blocks.group_2.block_1.res_path.conv_1.b", vec![4]),
        ("blocks.group_2.block_1.res_path.conv_2.w", vec![4, 4, 3, 3]),
        ("blocks.group_2.block_1.res_path.conv_2.b", vec![4]),
        ("blocks.group_2.block_1.res_path.conv_3.w", vec![4, 4, 3, 3]),
        ("blocks.group_2.block_1.res_path.conv_3.b", vec![4]),
        (
            "blocks.group_2.block_1.res_path.conv_4.w",
            vec![16, 4, 1, 1],
        ),
        ("blocks.group_2.block_1.res_path.conv_4.b", vec![16]),
        // group_3: 16 → 32.
        ("blocks.group_3.block_1.id_path.w", vec![32, 16, 1, 1]),
        ("blocks.group_3.block_1.id_path.b", vec![32]),
        (
            "blocks.group_3.block_1.res_path.conv_1.w",
            vec![8, 16, 3, 3],
        ),
        ("blocks.group_3.block_1.res_path.conv_1.b", vec![8]),
        ("blocks.group_3.block_1.res_path.conv_2.w", vec![8, 8, 3, 3]),
        ("blocks.group_3.block_1.res_path.conv_2.b", vec![8]),
        ("blocks.group_3.block_1.res_path.conv_3.w", vec![8, 8, 3, 3]),
        ("blocks.group_3.block_1.res_path.conv_3.b", vec![8]),
        (
            "blocks.group_3.block_1.res_path.conv_4.w",
            vec![32, 8, 1, 1],
        ),
        ("blocks.group_3.block_1.res_path.conv_4.b", vec![32]),
        // group_4: 32 → 64.
        ("blocks.group_4.block_1.id_path.w", vec![64, 32, 1, 1]),
        ("blocks.group_4.block_1.id_path.b", vec![64]),
        (
            "blocks.group_4.block_1.res_path.conv_1.w",
            vec![16, 32, 3, 3],
        ),
        ("blocks.group_4.block_1.res_path.conv_1.b", vec![16]),
        (
            "blocks.group_4.block_1.res_path.conv_2.w",
            vec![16, 16, 3, 3],
        ),
        ("blocks.group_4.block_1.res_path.conv_2.b", vec![16]),
        (
            "blocks.group_4.block_1.res_path.conv_3.w",
            vec![16, 16, 3, 3],
        ),
        ("blocks.group_4.block_1.res_path.conv_3.b", vec![16]),
        (
            "blocks.group_4.block_1.res_path.conv_4.w",
            vec![64, 16, 1, 1],
        ),
        ("blocks.group_4.block_1.res_path.conv_4.b", vec![64]),
        ("blocks.output.conv.w", vec![16, 64, 1, 1]),
        ("blocks.output.conv.b", vec![16]),
    ];
    let mut out: Vec<(String, Vec<usize>)> = v.drain(..).map(|(k, s)| (k.to_string(), s)).collect();
    out.sort();
    out
}

fn dall_e_decoder_keys() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("blocks.input.w", vec![8, 16, 1, 1]),
        ("blocks.input.b", vec![8]),
        // group_1: n_init 8 → 8·n_hid = 64; hidden 16; kernels 1,3,3,3.
        ("blocks.group_1.block_1.id_path.w", vec![64, 8, 1, 1]),
        ("blocks.group_1.block_1.id_path.b", vec![64]),
        (
            "blocks.group_1.block_1.res_path.conv_1.w",
            vec![16, 8, 1, 1],
        ),
        ("blocks.group_1.block_1.res_path.conv_1.b", vec![16]),
        (
            "blocks.group_1.block_1.res_path.conv_2.w",
            vec![16, 16, 3, 3],
        ),
        ("blocks.group_1.block_1.res_path.conv_2.b", vec![16]),
        (
            "blocks.group_1.block_1.res_path.conv_3.w",
            vec![16, 16, 3, 3],
        ),
        ("blocks.group_1.block_1.res_path.conv_3.b", vec![16]),
        (
            "blocks.group_1.block_1.res_path.conv_4.w",
            vec![64, 16, 3, 3],
        ),
        ("blocks.group_1.block_1.res_path.conv_4.b", vec![64]),
        // group_2: 64 → 32.
        ("blocks.group_2.block_1.id_path.w", vec![32, 64, 1, 1]),
        ("blocks.group_2.block_1.id_path.b", vec![32]),
        (
            "blocks.group_2.block_1.res_path.conv_1.w",
            vec![8, 64, 1, 1],
        ),
        ("blocks.group_2.block_1.res_path.conv_1.b", vec![8]),
        ("blocks.group_2.block_1.res_path.conv_2.w", vec![8, 8, 3, 3]),
        ("blocks.group_2.block_1.res_path.conv_2.b", vec![8]),
        ("blocks.group_2.block_1.res_path.conv_3.w", vec![8, 8, 3, 3]),
        ("blocks.group_2.block_1.res_path.conv_3.b", vec![8]),
        (
            "blocks.group_2.block_1.res_path.conv_4.w",
            vec![32, 8, 3, 3],
        ),
        ("blocks.group_2.block_1.res_path.conv_4.b", vec![32]),
        // group_3: 32 → 16.
        ("blocks.group_3.block_1.id_path.w", vec![16, 32, 1, 1]),
        ("blocks.group_3.block_1.id_path.b", vec![16]),
        (
            "blocks.group_3.block_1.res_path.conv_1.w",
            vec![4, 32, 1, 1],
        ),
        ("blocks.group_3.block_1.res_path.conv_1.b", vec![4]),
        ("blocks.group_3.block_1.res_path.conv_2.w", vec![4, 4, 3, 3]),
        ("blocks.group_3.block_1.res_path.conv_2.b", vec![4]),
        ("blocks.group_3.block_1.res_path.conv_3.w", vec![4, 4, 3, 3]),
        ("blocks.group_3.block_1.res_path.conv_3.b", vec![4]),
        (
            "blocks.group_3.block_1.res_path.conv_4.w",
            vec![16, 4, 3, 3],
        ),
        ("blocks.group_3.block_1.res_path.conv_4.b", vec![16]),
        // group_4: 16 → 8.
        ("blocks.group_4.block_1.id_path.w", vec![8, 16, 1, 1]),
        ("blocks.group_4.block_1.id_path.b", vec![8]),
        (
            "blocks.group_4.block_1.res_path.conv_1.w",
            vec![2, 16, 1, 1],
        ),
        ("blocks.group_4.block_1.res_path.conv_1.b", vec![2]),
        ("blocks.group_4.block_1.res_path.conv_2.w", vec![2, 2, 3, 3]),
        ("blocks.group_4.block_1.res_path.conv_2.b", vec![2]),
        ("blocks.group_4.block_1.res_path.conv_3.w", vec![2, 2, 3, 3]),
        ("blocks.group_4.block_1.res_path.conv_3.b", vec![2]),
        ("blocks.group_4.block_1.res_path.conv_4.w", vec![8, 2, 3, 3]),
        ("blocks.group_4.block_1.res_path.conv_4.b", vec![8]),
        // 2 × 3 output channels: μ and ln b per RGB channel.
        ("blocks.output.conv.w", vec![6, 8, 1, 1]),
        ("blocks.output.conv.b", vec![6]),
    ];
    let mut out: Vec<(String, Vec<usize>)> = v.drain(..).map(|(k, s)| (k.to_string(), s)).collect();
    out.sort();
    out
}

#[test]
fn parameter_names_and_shapes_match_dall_e() {
    let cfg = VaeConfig {
        group_count: 4,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 16,
        n_init: 8,
        channels: 3,
        post_gain: None,
        encoder: Default::default(),
    };
    let enc = names_and_shapes(|vb| {
        Encoder::new(&cfg, vb).unwrap();
    });
    let dec = names_and_shapes(|vb| {
        Decoder::new(&cfg, vb).unwrap();
    });
    assert_eq!(enc, dall_e_encoder_keys());
    assert_eq!(dec, dall_e_decoder_keys());
    let count = |v: &[(String, Vec<usize>)]| {
        v.iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(count(&enc), cfg.encoder_params());
    assert_eq!(count(&dec), cfg.decoder_params());
}

#[test]
fn tiny_shapes_64px_to_8x8_and_back() {
    let cfg = Config::preset("tiny").unwrap();
    let (_vm, enc, dec) = new_model(&cfg, 0, &Device::Cpu).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let logits = enc.forward(&x).unwrap();
    assert_eq!(logits.dims(), &[2, 512, 8, 8]);
    let tokens = enc.encode(&x).unwrap();
    assert_eq!(tokens.dims(), &[2, 64]);
    let img = dec.decode(&tokens, 8).unwrap();
    assert_eq!(img.dims(), &[2, 3, 64, 64]);
    let (lo, hi) = (
        img.min_all().unwrap().to_scalar::<f32>().unwrap(),
        img.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!(
        (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi),
        "{lo} {hi}"
    );
    // The gather used for token input equals the one-hot 1×1 conv of the training path.
    let ids = tokens.to_dtype(DType::I64).unwrap();
    let one_hot = candle_nn::encoding::one_hot(ids, 512, 1f32, 0f32).unwrap(); // (2, 64, 512)
    let z = one_hot
        .transpose(1, 2)
        .unwrap()
        .reshape((2, 512, 8, 8))
        .unwrap();
    let via_conv = Decoder::to_image(&dec.forward(&z).unwrap()).unwrap();
    let diff = (via_conv - img)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "gather vs one-hot conv: {diff}");
}

/// The largest change of any cell's logits but those of cell (row 1, column 2) when only that
/// cell's pixels change, and the change of that cell's own logits.
fn change_outside_and_inside_a_cell(cfg: &Config) -> (f32, f32) {
    let dev = Device::Cpu;
    let (_vm, enc, _dec) = new_model(cfg, 3, &dev).unwrap();
    let f = cfg.vae.downsample();
    let x = Tensor::rand(0f32, 1f32, (1, 3, 32, 32), &dev).unwrap();
    let mut px: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    for c in 0..3 {
        for y in f..2 * f {
            for xx in 2 * f..3 * f {
                px[(c * 32 + y) * 32 + xx] = 1.0 - px[(c * 32 + y) * 32 + xx];
            }
        }
    }
    let y = Tensor::from_vec(px, (1, 3, 32, 32), &dev).unwrap();
    let (a, b) = (enc.forward(&x).unwrap(), enc.forward(&y).unwrap());
    let d = (a - b).unwrap().abs().unwrap().max(1).unwrap(); // (1, h, w)
    let d: Vec<Vec<f32>> = d.squeeze(0).unwrap().to_vec2().unwrap();
    let mut outside = 0f32;
    for (r, row) in d.iter().enumerate() {
        for (col, &v) in row.iter().enumerate() {
            if (r, col) != (1, 2) {
                outside = outside.max(v);
            }
        }
    }
    (outside, d[1][2])
}

#[test]
fn a_patch_encoder_codes_each_cell_from_its_own_pixels_alone() {
    let mut cfg = micro();
    cfg.vae.encoder = DvaeEncoder::Patch;
    let (outside, inside) = change_outside_and_inside_a_cell(&cfg);
    assert_eq!(
        outside, 0.0,
        "a cell's logits moved with another cell's pixels"
    );
    assert!(inside > 0.0, "the changed cell's logits did not move");
    // dall_e's encoder sees past its cell: the neighbours' logits move too.
    let (outside, _) = change_outside_and_inside_a_cell(&micro());
    assert!(outside > 0.0);
}

#[test]
fn every_parameter_receives_a_gradient() {
    for encoder in [DvaeEncoder::DallE, DvaeEncoder::Patch] {
        let mut cfg = micro();
        cfg.vae.encoder = encoder;
        every_parameter_receives_a_gradient_with(&cfg);
    }
}

fn every_parameter_receives_a_gradient_with(cfg: &Config) {
    let cfg = cfg.clone();
    let dev = Device::Cpu;
    let (vm, enc, dec) = new_model(&cfg, 1, &dev).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &dev).unwrap();
    let logits = enc.forward(&x).unwrap();
    let mut rng = dalle::rng::Rng::new(0);
    let z = dalle::vae::loss::gumbel_softmax(&logits, 0.5, 1, &mut rng).unwrap();
    let stats = dec.forward(&z).unwrap();
    let mu = stats.narrow(1, 0, 3).unwrap();
    let log_b = stats.narrow(1, 3, 3).unwrap();
    let x_mapped = dalle::vae::model::map_pixels(&x).unwrap();
    let nll = dalle::vae::loss::logit_laplace_nll(&x_mapped, &mu, &log_b).unwrap();
    let kl = dalle::vae::loss::kl_to_uniform(&logits, 1).unwrap();
    let loss = (nll + (kl * 6.6).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars = dalle::train::named_vars(&vm);
    assert!(vars.len() > 40, "{} variables", vars.len());
    for (name, var) in vars {
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
        assert!(
            norm > 0.0 && norm.is_finite(),
            "zero or non-finite gradient for {name}: {norm}"
        );
    }
}

fn request(
    data: &Path,
    out: &Path,
    steps: usize,
    resume: bool,
    stop_at: Option<usize>,
) -> VaeTrainRequest {
    let mut options = VaeTrainOptions::new(steps, 8, 7);
    options.schedule.lr_start = 2e-3;
    options.lp.checkpoint_every = 5;
    options.lp.sample_every = 1000;
    options.lp.log_every = 1;
    VaeTrainRequest {
        config: micro(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        options,
        resume,
        stop_at,
        device: Device::Cpu,
        filters: Filters::default(),
    }
}

/// The tensors of one of a run's exported weight files (`encoder.safetensors`, …).
fn weights(dir: &Path, file: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
fn tensor_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    common::max_abs_diff(
        &a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
}

fn metric(dir: &Path, name: &str) -> Vec<f64> {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let col = lines
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == name)
        .unwrap();
    lines
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn training_lowers_reconstruction_loss_and_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dalle::data::shapes::write_set(&data, 64, 3, dalle::data::shapes::Split::Train, 32, false)
        .unwrap();

    // A longer run lowers the reconstruction NLL (nats per pixel channel).
    let long = tmp.path().join("long");
    assert_eq!(
        train_vae(request(&data, &long, 60, false, None))
            .unwrap()
            .step,
        60
    );
    let recon = metric(&long, "recon");
    let first: f64 = recon[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = recon[recon.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first - 0.05,
        "reconstruction NLL did not fall: {first:.4} → {last:.4}"
    );

    // 20 straight steps.
    let straight = tmp.path().join("straight");
    assert_eq!(
        train_vae(request(&data, &straight, 20, false, None))
            .unwrap()
            .step,
        20
    );

    // 10 steps, stop, resume, 10 more.
    let split = tmp.path().join("split");
    assert_eq!(
        train_vae(request(&data, &split, 20, false, Some(10)))
            .unwrap()
            .step,
        10
    );
    assert_eq!(
        train_vae(request(&data, &split, 20, true, None))
            .unwrap()
            .step,
        20
    );

    common::assert_same_checkpoint(&straight, &split);
    // The inference files are the EMA weights and load back as a dVAE.
    let vae = dalle::vae::io::Vae::load(&split, &Device::Cpu).unwrap();
    assert_eq!(vae.grid(), 4);
    assert!(split.join("loss.png").exists());
}

/// The bundled recipe's stage 1: k-means start, frozen encoder, straight-through hard codes.
#[test]
fn kmeans_start_gives_content_codes_and_a_frozen_encoder_stays_put() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dalle::data::shapes::write_set(&data, 64, 3, dalle::data::shapes::Split::Train, 32, false)
        .unwrap();
    let out = tmp.path().join("run");
    let mut req = request(&data, &out, 10, false, None);
    let s = &mut req.options.schedule;
    s.kmeans_init = true;
    s.freeze_encoder = true;
    s.straight_through = true;
    s.gumbel_scale = 0.0;
    s.beta_max = 0.0;
    req.options.lp.ema_decay = 0.0; // the exported weights are the last step's
    train_vae(req).unwrap();

    let vae = dalle::vae::io::Vae::load(&out, &Device::Cpu).unwrap();
    let images: Vec<image::RgbImage> = (0..16)
        .map(|i| {
            let p = data.join(format!("{i:06}.png"));
            dalle::data::load_square(&p, 32).unwrap()
        })
        .collect();
    let codes = vae.encode(&images).unwrap();
    let distinct: std::collections::BTreeSet<u32> = codes.iter().flatten().copied().collect();
    // Background alone would be a handful of codes (plain field, borders); objects add more.
    assert!(
        distinct.len() >= 12,
        "k-means codes do not depend on content: {} distinct codes",
        distinct.len()
    );
    // Frozen: the encoder weights equal those of a fresh k-means start with the same seed.
    let again = tmp.path().join("again");
    let mut req = request(&data, &again, 1, false, None);
    let s = &mut req.options.schedule;
    s.kmeans_init = true;
    s.freeze_encoder = true;
    s.straight_through = true;
    req.options.lp.ema_decay = 0.0;
    train_vae(req).unwrap();
    let a = weights(&out, "encoder.safetensors");
    let b = weights(&again, "encoder.safetensors");
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let d = tensor_diff(t, &b[name]);
        assert!(d == 0.0, "{name} moved by {d} with a frozen encoder");
    }
}

#[test]
fn decoder_finetune_moves_only_the_decoder_and_diagnostics_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dalle::data::shapes::write_set(&data, 64, 3, dalle::data::shapes::Split::Train, 32, false)
        .unwrap();
    let out = tmp.path().join("run");
    let req = |stop_at: Option<usize>| {
        let mut r = request(&data, &out, 6, stop_at.is_none(), stop_at);
        r.options.schedule.decoder_finetune_from = Some(3);
        r.options.lp.ema_decay = 0.0; // the exported weights are the last step's
        r.options.lp.sample_every = 3;
        r
    };
    train_vae(req(Some(3))).unwrap();
    let load = |f: &str| weights(&out, f);
    let (enc3, dec3) = (load("encoder.safetensors"), load("decoder.safetensors"));
    train_vae(req(None)).unwrap();
    let (enc6, dec6) = (load("encoder.safetensors"), load("decoder.safetensors"));
    let diff = tensor_diff;
    for (name, t) in &enc3 {
        let d = diff(t, &enc6[name]);
        assert!(
            d == 0.0,
            "{name} moved by {d} while the decoder alone trains"
        );
    }
    let moved = dec3
        .iter()
        .filter(|(n, t)| diff(t, &dec6[*n]) > 0.0)
        .count();
    assert_eq!(
        moved,
        dec3.len(),
        "every decoder tensor trains on hard codes"
    );

    // The round-trip judge, codebook use and PSNR join the curves at each sample step.
    for name in ["rt_correct", "rt_shape"] {
        let v: Vec<f64> = metric(&out, name)
            .into_iter()
            .filter(|v| !v.is_nan())
            .collect();
        assert_eq!(v.len(), 2, "{name} at steps 3 and 6");
        assert!(v.iter().all(|v| (0.0..=1.0).contains(v)), "{name}: {v:?}");
    }
    let codes = metric(&out, "active_codes");
    assert!(
        codes.iter().all(|&c| (1.0..=64.0).contains(&c)),
        "{codes:?}"
    );
    assert!(metric(&out, "rt_psnr").iter().any(|v| *v > 5.0));
}

/// `--init-from` with the decoder fine-tune from update 0: the run starts from the trained
/// weights, the encoder — and so every code a stage 2 was trained on — stays bit for bit, the
/// decoder trains (at a learning rate small enough that it stays within 1e-4 of where it
/// started, where a fresh initialisation is far away), and train.json records where it
/// started. A directory that is no dVAE is refused before the run directory is written.
#[test]
fn init_from_continues_a_trained_dvae_and_keeps_its_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dalle::data::shapes::write_set(&data, 64, 3, dalle::data::shapes::Split::Train, 32, false)
        .unwrap();
    let first = tmp.path().join("first");
    let mut req = request(&data, &first, 4, false, None);
    req.options.lp.ema_decay = 0.0;
    req.options.lp.seed = 11; // not the second run's seed: its fresh start would differ
    train_vae(req).unwrap();

    let second = tmp.path().join("second");
    let mut req = request(&data, &second, 3, false, None);
    req.options.init_from = Some(first.clone());
    req.options.schedule.decoder_finetune_from = Some(0);
    req.options.schedule.lr_start = 1e-6;
    // The exported weights are the EMA's, which must leave the unmoved encoder as it was.
    req.options.lp.ema_decay = 0.999;
    train_vae(req).unwrap();
    let (load, diff) = (weights, tensor_diff);
    let (enc1, enc2) = (
        load(&first, "encoder.safetensors"),
        load(&second, "encoder.safetensors"),
    );
    for (name, t) in &enc1 {
        assert!(
            diff(t, &enc2[name]) == 0.0,
            "{name} moved: the codes would change"
        );
    }
    let (dec1, dec2) = (
        load(&first, "decoder.safetensors"),
        load(&second, "decoder.safetensors"),
    );
    let moved: Vec<f32> = dec1.iter().map(|(n, t)| diff(t, &dec2[n])).collect();
    assert!(moved.iter().any(|&d| d > 0.0), "the decoder trains");
    assert!(
        moved.iter().all(|&d| d < 1e-4),
        "the decoder started elsewhere: {moved:?}"
    );
    let recorded = std::fs::read_to_string(second.join("train.json")).unwrap();
    assert!(recorded.contains("\"init_from\""), "{recorded}");

    let third = tmp.path().join("third");
    let mut req = request(&data, &third, 3, false, None);
    req.options.init_from = Some(data.clone());
    let e = train_vae(req).unwrap_err().to_string();
    assert!(e.contains("not a dVAE directory"), "{e}");
    assert!(!third.exists(), "a refused start writes nothing");
}
