//! Stage 2: `train`, `generate` and `export`, and their bad inputs.

use super::*;
use candle_core::Device;

#[test]
fn stage_two_train_and_generate_with_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shapes");
    let vae = tmp.path().join("vae");
    let run = tmp.path().join("tf");
    shapes(&data, 12, 4);
    ok(&[
        "train-vae",
        "--data",
        p(&data),
        "--out",
        p(&vae),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]);
    let train = [
        "train",
        "--vae",
        p(&vae),
        "--data",
        p(&data),
        "--out",
        p(&run),
        "--batch-size",
        "2",
        "--bpe-dropout",
        "0",
    ];
    let mut a = train.to_vec();
    a.extend(["--steps", "2", "--sample-every", "2"]);
    let out = ok(&a);
    assert!(out.contains("step 2"), "{out}");
    for f in [
        "transformer.safetensors",
        "tokenizer.json",
        "vae/encoder.safetensors",
        "samples/sample-00000002.png",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // The token cache is reused on the next run (here: a resume of the finished run, which says
    // there is nothing left to train).
    let mut a = train.to_vec();
    a.extend(["--steps", "2", "--sample-every", "2", "--resume"]);
    let o = dalle(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("using the token cache"), "{err}");
    assert!(err.contains("already finished its 2 steps"), "{err}");
    // A dVAE of another geometry is refused.
    let mut a = train.to_vec();
    a.extend(["--steps", "3", "--preset", "small"]);
    fails(&a, "needs 128px");

    let img = tmp.path().join("grid.png");
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--checkpoint",
            p(&run),
            "--out",
            p(&img),
            "--num-images",
            "2",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run_ok = |a: Vec<String>| ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let run_fail = |a: Vec<String>, needle: &str| {
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    let tokens = tmp.path().join("tokens.json");
    run_ok(gen(&[
        "a red circle",
        "--seed",
        "3",
        "--save-tokens",
        p(&tokens),
    ]));
    let first = std::fs::read(&img).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokens).unwrap()).unwrap();
    assert_eq!(saved["images"].as_array().unwrap().len(), 2);
    // A training run where a model directory is expected, and the other way round.
    fails(
        &["generate", "--model", p(&run), "--out", p(&img), "x"],
        "it is a `dalle train` run; export it with `dalle export --transformer",
    );
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-tiny");
    let sample = data.join("000000.png");
    // An exported model directory encodes and decodes through its ONNX graphs (tract).
    let grid = ok(&[
        "encode",
        "--vae",
        p(&bundled),
        "--input",
        p(&sample),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&grid).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 8);
    let model_tokens = tmp.path().join("model-tokens.json");
    std::fs::write(&model_tokens, &grid).unwrap();
    let from_model = tmp.path().join("from-model.png");
    ok(&[
        "decode",
        "--vae",
        p(&bundled),
        "--tokens",
        p(&model_tokens),
        "--out",
        p(&from_model),
    ]);
    assert_eq!(image::open(&from_model).unwrap().width(), 64);
    // A `dalle train` run stands for the dVAE it was trained on.
    ok(&["encode", "--vae", p(&run), "--input", p(&sample)]);
    // `decode` reads what `--save-tokens` wrote: both images, as one grid.
    let decoded = tmp.path().join("decoded.png");
    ok(&[
        "decode",
        "--vae",
        p(&vae),
        "--tokens",
        p(&tokens),
        "--out",
        p(&decoded),
    ]);
    assert_eq!(
        image::open(&decoded).unwrap().width(),
        image::open(&img).unwrap().width()
    );
    run_ok(gen(&["a red circle", "--seed", "3"]));
    assert_eq!(std::fs::read(&img).unwrap(), first, "same seed, same image");
    run_ok(gen(&["", "--top-k", "1", "--guidance-scale", "2"]));
    run_ok(gen(&[
        "a red circle",
        "--prime-image",
        p(&data.join("000000.png")),
        "--prime-rows",
        "3",
    ]));

    let long = "a red circle ".repeat(20);
    let o = dalle(
        &gen(&[long.as_str()])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stderr).contains("warning: the prompt is")
    );
    run_fail(gen(&[long.as_str(), "--strict"]), "--strict");
    run_fail(gen(&["x", "--top-p", "1.5"]), "top-p must be in (0, 1]");
    run_fail(gen(&["x", "--temperature", "-1"]), "temperature must be");
    run_fail(
        [
            "generate",
            "--checkpoint",
            p(&run),
            "--out",
            p(&img),
            "x",
            "--num-images",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        "at least 1",
    );
    run_fail(
        gen(&["x", "--runtime", "onnx"]),
        "valid runtimes are candle",
    );
    let nul = tmp.path().join("nul.txt");
    std::fs::write(&nul, b"a red\0circle").unwrap();
    run_fail(gen(&["--prompt-file", p(&nul)]), "control character");
    fails(
        &[
            "generate",
            "--checkpoint",
            p(&run),
            "--out",
            p(&img),
            "x",
            "--num-images",
            "100000000",
        ],
        "ask for fewer images per call",
    );
    // The extension names the format; an unknown one is refused before any work.
    let jpg = tmp.path().join("grid.jpg");
    ok(&[
        "generate",
        "--checkpoint",
        p(&run),
        "--out",
        p(&jpg),
        "x",
        "--num-images",
        "1",
    ]);
    assert_eq!(
        &std::fs::read(&jpg).unwrap()[..2],
        &[0xff, 0xd8],
        "JPEG bytes"
    );
    fails(
        &[
            "generate",
            "--checkpoint",
            p(&run),
            "--out",
            p(&tmp.path().join("g.bmp")),
            "x",
        ],
        "name the file .png, .jpg or .webp",
    );
    let latin1 = tmp.path().join("prompt.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    run_fail(gen(&["--prompt-file", p(&latin1)]), "not UTF-8");
    let big = tmp.path().join("big.png");
    image::RgbImage::from_pixel(90, 70, image::Rgb([9, 9, 9]))
        .save(&big)
        .unwrap();
    let o = dalle(
        &gen(&["x", "--prime-image", p(&big), "--prime-rows", "2"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("resizing"));
    run_fail(
        gen(&["x", "--prime-image", p(&big), "--prime-rows", "8"]),
        "--prime-rows must be between 1 and 7",
    );
    run_fail(
        ["generate", "--checkpoint", p(&data), "--out", p(&img)]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "is not a `dalle train` run",
    );
}

#[test]
fn a_dvae_codebook_size_flows_into_stage_two_and_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, vae, run, model) = (
        tmp.path().join("shapes"),
        tmp.path().join("vae"),
        tmp.path().join("tf"),
        tmp.path().join("model"),
    );
    ok(&["data", "shapes", "--out", p(&data), "--count", "8"]);
    let vae_args = [
        "train-vae",
        "--data",
        p(&data),
        "--out",
        p(&vae),
        "--steps",
        "1",
    ];
    let mut a = vae_args.to_vec();
    a.extend(["--batch-size", "2", "--codebook", "64"]);
    ok(&a);
    let mut a = vae_args.to_vec();
    a.extend(["--codebook", "0", "--resume"]);
    fails(&a, "codebook");
    let config = train_one_step(&vae, &data, &run);
    assert_eq!(config["geometry"]["codebook"], 64, "{config}");
    assert_eq!(config["vae"]["vocab_size"], 64, "{config}");
    ok(&["export", "--transformer", p(&run), "--out", p(&model)]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["geometry"]["codebook"], 64, "{manifest}");
    let img = tmp.path().join("out.png");
    ok(&[
        "generate",
        "a red circle",
        "--model",
        p(&model),
        "--out",
        p(&img),
        "--num-images",
        "1",
    ]);
    assert!(img.exists());
}

/// `train --init-from RUN` starts from the run's (EMA) weights with its tokenizer, and refuses a
/// run whose codes came from another dVAE encoder — before it writes anything.
#[test]
fn init_from_starts_from_a_runs_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, vae, other_vae) = (
        tmp.path().join("shapes"),
        tmp.path().join("vae"),
        tmp.path().join("vae2"),
    );
    let (run, next, refused) = (
        tmp.path().join("tf"),
        tmp.path().join("tf2"),
        tmp.path().join("tf3"),
    );
    shapes(&data, 12, 4);
    for (dir, seed) in [(&vae, "0"), (&other_vae, "1")] {
        ok(&[
            "train-vae",
            "--data",
            p(&data),
            "--out",
            p(dir),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--seed",
            seed,
        ]);
    }
    let train = |vae: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec![
            "train",
            "--vae",
            p(vae),
            "--data",
            p(&data),
            "--out",
            p(out),
            "--batch-size",
            "2",
            "--bpe-dropout",
            "0",
        ];
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run_args = train(&vae, &run, &["--steps", "3"]);
    ok(&run_args.iter().map(String::as_str).collect::<Vec<_>>());
    // A learning rate of 1e-12: one update leaves the weights where they started.
    let from_run = |out: &Path, extra: &[&str]| {
        let mut e = vec!["--steps", "1", "--lr", "1e-12", "--init-from", p(&run)];
        e.extend(extra);
        ok(&train(&vae, out, &e)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
    };
    from_run(&next, &[]);
    let read = |dir: &Path| {
        let w = dalle::vae::io::read_f32(&dir.join("transformer.safetensors"), &Device::Cpu);
        w.unwrap()
    };
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a = read(&run);
    let unmoved = |dir: &Path| {
        let b = read(dir);
        assert_eq!(a.len(), b.len());
        for (name, t) in &a {
            let d = (flat(t).iter().zip(flat(&b[name])))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-6, "{name} moved by {d}");
        }
    };
    unmoved(&next);
    assert_eq!(
        std::fs::read(run.join("tokenizer.json")).unwrap(),
        std::fs::read(next.join("tokenizer.json")).unwrap()
    );
    let stored = std::fs::read_to_string(next.join("train.json")).unwrap();
    assert!(stored.contains("\"init_from\""), "{stored}");
    // Grown to 6 layers (`--layers`): the 4 source layers become 0, 1, 2 and 5, the new ones
    // add nothing, so the grown model's logits are the source's.
    let grown = tmp.path().join("tf-grown");
    from_run(&grown, &["--layers", "6"]);
    let logits = |dir: &Path| {
        let cfg = dalle::Config::load(&dir.join("config.json")).unwrap();
        let vb =
            candle_nn::VarBuilder::from_tensors(read(dir), candle_core::DType::F32, &Device::Cpu);
        let model = dalle::transformer::model::Transformer::new(&cfg, vb).unwrap();
        let seq = cfg.geometry.text_len + cfg.geometry.grid * cfg.geometry.grid;
        let ids: Vec<u32> = (0..seq as u32).map(|i| i * 7 % 100).collect();
        let ids = candle_core::Tensor::from_vec(ids, (1, seq), &Device::Cpu).unwrap();
        (
            cfg.transformer.n_layers,
            flat(&model.forward(&ids, None).unwrap()),
        )
    };
    let ((n_run, want), (n_grown, got)) = (logits(&run), logits(&grown));
    assert_eq!((n_run, n_grown), (4, 6));
    let d = want
        .iter()
        .zip(&got)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "the grown model's logits differ by {d}");
    // A wider convolutional window (`--conv-kernel`; 33 reads the whole grid): the same weights,
    // recorded in the new run's config.
    let dense = tmp.path().join("tf-dense");
    from_run(&dense, &["--conv-kernel", "33"]);
    let cfg = dalle::Config::load(&dense.join("config.json")).unwrap();
    assert_eq!(cfg.transformer.conv_kernel, 33);
    unmoved(&dense);
    // A deeper source than the run: refused before anything is written.
    let shallow = tmp.path().join("tf-shallow");
    let shallow_args = train(
        &vae,
        &shallow,
        &["--steps", "1", "--init-from", p(&grown), "--layers", "3"],
    );
    fails(
        &shallow_args.iter().map(String::as_str).collect::<Vec<_>>(),
        "6 layers, more than this run's 3",
    );
    assert!(!shallow.exists());
    // Another encoder's codes: refused, nothing written.
    let refused_args = train(
        &other_vae,
        &refused,
        &["--steps", "1", "--init-from", p(&run)],
    );
    fails(
        &refused_args.iter().map(String::as_str).collect::<Vec<_>>(),
        "another dVAE encoder",
    );
    assert!(!refused.exists());
}
