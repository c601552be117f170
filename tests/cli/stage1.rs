//! Stage 1 and the image tools: `train-vae`, `encode`, `decode`, `reconstruct`, and their bad
//! inputs.

use super::*;

#[test]
fn train_encode_decode_reconstruct_and_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shapes");
    let run = tmp.path().join("run");
    shapes(&data, 16, 2);
    let stats = ok(&["data", "stats", p(&data)]);
    assert!(stats.contains("16 seen, 16 usable, 0 skipped"), "{stats}");
    // A second set into the same directory is refused and the first is left as it was.
    let before = std::fs::read(data.join("metadata.jsonl")).unwrap();
    fails(
        &["data", "shapes", "--out", p(&data), "--count", "2"],
        "pass --force to replace them",
    );
    assert_eq!(std::fs::read(data.join("metadata.jsonl")).unwrap(), before);
    let other = tmp.path().join("other");
    let o = p(&other);
    fails(
        &["data", "shapes", "--out", o, "--count", "0"],
        "--count must be at least 1",
    );
    fails(
        &["data", "shapes", "--out", o, "--image-size", "100000"],
        "--image-size must be from 16 to 1024",
    );
    assert!(!other.exists());

    let train = |extra: &[&str]| {
        let mut a = vec![
            "train-vae",
            "--data",
            p(&data),
            "--out",
            p(&run),
            "--steps",
            "2",
            "--batch-size",
            "2",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let args = train(&["--stop-at", "1"]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for f in [
        "config.json",
        "encoder.safetensors",
        "decoder.safetensors",
        "loss.png",
        "checkpoints/latest",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // A second fresh run into the same directory would overwrite it.
    let args = train(&[]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "already holds a training run",
    );
    // Resuming with another preset.
    let args = train(&["--resume", "--preset", "small"]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "was trained with preset `tiny`",
    );
    let args = train(&["--resume"]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // The finished run is not silently left as it was: the option that differs is named.
    let mut args = train(&["--resume"]);
    args[6] = "5".into(); // --steps 2 → 5
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "loop.steps (stored 2, given 5)",
    );

    // The caption tokenizer.
    let tok = tmp.path().join("tokenizer.json");
    let out = ok(&[
        "tokenizer",
        "train",
        "--data",
        p(&data),
        "--vocab",
        "300",
        "--out",
        p(&tok),
    ]);
    assert!(out.contains("16 captions"), "{out}");
    assert!(tok.exists());
    fails(
        &[
            "tokenizer",
            "train",
            "--data",
            p(&data),
            "--vocab",
            "100",
            "--out",
            p(&tok),
        ],
        "too small",
    );
    let notdir = tmp.path().join("notdir");
    std::fs::write(&notdir, b"x").unwrap();
    let bad_out = notdir.join("tokenizer.json");
    fails(
        &[
            "tokenizer",
            "train",
            "--data",
            p(&data),
            "--vocab",
            "300",
            "--out",
            p(&bad_out),
        ],
        p(&bad_out),
    );

    // encode → decode → reconstruct.
    let img = data.join("000000.png");
    let json = ok(&["encode", "--vae", p(&run), "--input", p(&img), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["grid"], 8);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 8);
    let tokens = tmp.path().join("tokens.json");
    std::fs::write(&tokens, &json).unwrap();
    let out = tmp.path().join("decoded.png");
    ok(&[
        "decode",
        "--vae",
        p(&run),
        "--tokens",
        p(&tokens),
        "--out",
        p(&out),
    ]);
    assert_eq!(image::open(&out).unwrap().width(), 64);
    let recon = tmp.path().join("recon.png");
    ok(&[
        "reconstruct",
        "--vae",
        p(&run),
        "--input",
        p(&img),
        "--out",
        p(&recon),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&recon).unwrap());
    let plain = ok(&["encode", "--vae", p(&run), "--input", p(&img)]);
    assert_eq!(plain.lines().count(), 8);

    // The round-trip judge, with its failures drawn (a 2-step dVAE gets every scene wrong).
    let fails_png = tmp.path().join("failures.png");
    let judged = ok(&[
        "vae",
        "judge",
        "--vae",
        p(&run),
        "--scenes",
        "3",
        "--failures",
        p(&fails_png),
    ]);
    assert!(judged.contains("rt_correct"), "{judged}");
    assert!(judged.contains("the first 6 failures"), "{judged}");
    // Six pairs, four a row: 8 images wide, 2 rows of 64 px with 2-pixel gaps.
    let grid = image::open(&fails_png).unwrap();
    assert_eq!((grid.width(), grid.height()), (8 * 66 + 2, 2 * 66 + 2));

    // A wrongly sized image is resized with a warning.
    let big = tmp.path().join("big.png");
    image::RgbImage::from_pixel(100, 80, image::Rgb([1, 2, 3]))
        .save(&big)
        .unwrap();
    let o = dalle(&["encode", "--vae", p(&run), "--input", p(&big)]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("resizing"));

    // Bad inputs to the tools.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "[1, 2, 3]").unwrap();
    fails(
        &[
            "decode",
            "--vae",
            p(&run),
            "--tokens",
            p(&bad),
            "--out",
            p(&out),
        ],
        "expected 64 tokens",
    );
    let mut ids = vec![0u32; 63];
    ids.push(99_999);
    std::fs::write(&bad, serde_json::to_string(&ids).unwrap()).unwrap();
    fails(
        &[
            "decode",
            "--vae",
            p(&run),
            "--tokens",
            p(&bad),
            "--out",
            p(&out),
        ],
        "outside the codebook",
    );
    std::fs::write(&bad, "not json").unwrap();
    fails(
        &[
            "decode",
            "--vae",
            p(&run),
            "--tokens",
            p(&bad),
            "--out",
            p(&out),
        ],
        "is not JSON",
    );
    let zero = tmp.path().join("zero.png");
    std::fs::write(&zero, b"").unwrap();
    fails(
        &["encode", "--vae", p(&run), "--input", p(&zero)],
        "empty file",
    );
    fails(
        &["encode", "--vae", p(&data), "--input", p(&img)],
        "not a dVAE directory",
    );
    let blocked = tmp.path().join("file.txt");
    std::fs::write(&blocked, b"x").unwrap();
    fails(
        &[
            "reconstruct",
            "--vae",
            p(&run),
            "--input",
            p(&img),
            "--out",
            p(&blocked.join("x.png")),
        ],
        "cannot write PNG",
    );

    // import-openai: our files use dall_e's keys, so they import as OpenAI weights.
    let imported = tmp.path().join("imported");
    let flags = [
        "--n-hid",
        "32",
        "--n-blk-per-group",
        "1",
        "--vocab-size",
        "512",
        "--n-init",
        "64",
        "--image-size",
        "64",
    ];
    let enc = run.join("encoder.safetensors");
    let dec = run.join("decoder.safetensors");
    let mut a = vec![
        "vae",
        "import-openai",
        "--encoder",
        p(&enc),
        "--decoder",
        p(&dec),
        "--out",
        p(&imported),
    ];
    a.extend(flags);
    ok(&a);
    let again = ok(&[
        "encode",
        "--vae",
        p(&imported),
        "--input",
        p(&img),
        "--json",
    ]);
    assert_eq!(again, json);
    // Wrong config flags name the mismatching tensor.
    let mut a = vec![
        "vae",
        "import-openai",
        "--encoder",
        p(&enc),
        "--decoder",
        p(&dec),
        "--out",
        p(&imported),
    ];
    a.extend([
        "--n-hid",
        "64",
        "--n-blk-per-group",
        "1",
        "--vocab-size",
        "512",
        "--n-init",
        "64",
        "--image-size",
        "64",
    ]);
    fails(&a, "tensor `blocks.");
    // A missing tensor is named.
    let mut t = candle_core::safetensors::load(&enc, &candle_core::Device::Cpu).unwrap();
    t.remove("blocks.output.conv.b");
    let cut = tmp.path().join("cut.safetensors");
    candle_core::safetensors::save(&t, &cut).unwrap();
    let mut a = vec![
        "vae",
        "import-openai",
        "--encoder",
        p(&cut),
        "--decoder",
        p(&dec),
        "--out",
        p(&imported),
    ];
    a.extend(flags);
    fails(&a, "lacks tensor `blocks.output.conv.b`");
}

#[test]
fn train_vae_bad_data_and_output_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let common = |data: &str, out: &str| -> Vec<String> {
        ["train-vae", "--data", data, "--out", out, "--steps", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |a: Vec<String>, needle: &str| {
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    run(
        common(p(&tmp.path().join("missing")), p(&out)),
        "does not exist",
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run(
        common(p(&empty), p(&out)),
        "no metadata.jsonl and no .tar shards",
    );
    // Every sample filtered out.
    std::fs::write(
        empty.join("metadata.jsonl"),
        "{\"file_name\": \"gone.png\", \"text\": \"a red square\"}\n",
    )
    .unwrap();
    run(
        common(p(&empty), p(&tmp.path().join("out2"))),
        "no usable samples",
    );
    // Nothing of a run is written for a data set it cannot train on.
    assert!(!tmp.path().join("out2").exists());
    // Output under a regular file cannot be created (even as root).
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let good = tmp.path().join("good");
    ok(&["data", "shapes", "--out", p(&good), "--count", "2"]);
    run(
        common(p(&good), p(&file.join("sub"))),
        "cannot create output directory",
    );
    let mut a = common(p(&empty), p(&out));
    a.extend(["--preset".into(), "huge".into()]);
    run(a, "unknown preset `huge`");
    let mut a = common(p(&empty), p(&out));
    a.extend(["--device".into(), "cuda".into()]);
    run(a, "CUDA");
    run(
        ["data", "stats", p(&tmp.path().join("missing"))]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "does not exist",
    );
    run(
        ["data", "stats", p(&file)]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "is a file, not a data set",
    );
}

#[test]
fn train_vae_image_size_sets_the_token_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shapes32");
    let vae = tmp.path().join("vae");
    ok(&[
        "data",
        "shapes",
        "--out",
        p(&data),
        "--count",
        "8",
        "--image-size",
        "32",
    ]);
    let with = |extra: &[&'static str]| {
        let mut a = vec![
            "train-vae",
            "--data",
            p(&data),
            "--out",
            p(&vae),
            "--steps",
            "1",
            "--batch-size",
            "2",
        ];
        a.extend_from_slice(extra);
        a
    };
    // `tiny`'s dVAE is f8: 36 px is no whole number of tokens.
    fails(&with(&["--image-size", "36"]), "a multiple of 8");
    assert!(!vae.exists(), "a refused run leaves no directory");
    ok(&with(&["--image-size", "32"]));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vae.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["geometry"]["image_size"], 32, "{config}");
    assert_eq!(config["geometry"]["grid"], 4, "{config}");
    let image = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|x| x == "png"))
        .expect("a rendered image");
    let tokens = ok(&["encode", "--vae", p(&vae), "--input", p(&image), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&tokens).unwrap();
    assert_eq!(v["grid"], 4, "{v}");
    // Stage 2 takes its grid from the dVAE, and the export and generation follow.
    let (run, model, png) = (
        tmp.path().join("tf"),
        tmp.path().join("model"),
        tmp.path().join("g.png"),
    );
    let config = train_one_step(&vae, &data, &run);
    assert_eq!(config["geometry"]["grid"], 4, "{config}");
    ok(&["export", "--transformer", p(&run), "--out", p(&model)]);
    ok(&[
        "generate",
        "a red circle",
        "--model",
        p(&model),
        "--num-images",
        "1",
        "--save-tokens",
        p(&tmp.path().join("g.json")),
        "--out",
        p(&png),
    ]);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("g.json")).unwrap()).unwrap();
    assert_eq!(saved["grid"], 4, "{saved}");
    assert!(png.exists());
}
