//! The `dalle` binary: tools round-trip, and every bad input is one clear error line.

use std::path::Path;
use std::process::{Command, Output};

fn dalle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = dalle(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "dalle {args:?} failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The command fails with exit code 1 and a single `error:` line containing `needle`.
fn fails(args: &[&str], needle: &str) {
    let o = dalle(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "dalle {args:?} should fail: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        err.trim_end().lines().last().unwrap().starts_with("error:"),
        "{err}"
    );
    assert!(errors[0].contains(needle), "expected `{needle}` in: {err}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn info_prints_presets_and_rejects_unknown_ones() {
    let out = ok(&["info", "--preset", "paper"]);
    assert!(
        out.contains("32×32 tokens") && out.contains("transformer 12293849088"),
        "{out}"
    );
    fails(
        &["info", "--preset", "huge"],
        "valid presets are tiny, shapes, small, paper",
    );
}

#[test]
fn bench_reports_decode_roofline_cache_and_training_figures() {
    let json = ok(&[
        "bench",
        "--decode-seconds",
        "0",
        "--preset",
        "tiny",
        "--runtimes",
        "candle,tract",
        "--batch",
        "1,2",
        "--recompute-positions",
        "2",
        "--train-batch",
        "2",
        "--train-reps",
        "1",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let pos = |v: &serde_json::Value, k: &str| {
        let x = v[k].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{k} = {x} in {v}");
    };
    for k in ["copy_gb_per_s", "read_gb_per_s", "matmul_gflop_per_s"] {
        pos(&r["ceilings"], k);
    }
    let rows = r["decode"].as_array().unwrap();
    let runs: Vec<(String, u64)> = rows
        .iter()
        .map(|d| {
            (
                d["runtime"].as_str().unwrap().to_string(),
                d["batch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [("candle", 1), ("candle", 2), ("tract", 1), ("tract", 2)].map(|(n, b)| (n.to_string(), b))
    );
    for d in rows {
        for k in [
            "prefill_s",
            "first_step_s",
            "middle_step_s",
            "last_step_s",
            "transformer_s",
            "dvae_decode_s",
            "whole_image_s",
            "image_tokens_per_s",
            "no_cache_transformer_s",
            "kv_cache_speedup",
            "decode_floor_s",
            "decode_floor_fraction",
            "middle_floor_fraction",
            "peak_rss_mb",
            "steps_s",
        ] {
            pos(d, k);
        }
        // The floor pass is one of the passes, and its fraction is its floor ÷ its steps.
        let passes = d["passes"].as_u64().unwrap();
        assert!(
            passes >= 1 && d["floor_pass"].as_u64().unwrap() < passes,
            "{d}"
        );
        let fraction = d["decode_floor_s"].as_f64().unwrap() / d["steps_s"].as_f64().unwrap();
        assert!(
            (d["decode_floor_fraction"].as_f64().unwrap() - fraction).abs() < 1e-9,
            "{d}"
        );
        for k in ["copy_gb_per_s", "read_gb_per_s", "matmul_gflop_per_s"] {
            pos(&d["ceilings"], k);
        }
        // tiny: 32 caption + 64 image positions; 2 timed without the cache, first and last.
        assert_eq!(d["recompute_positions"], serde_json::json!([32, 95]));
    }
    for k in ["transformer_step_s", "dvae_step_s"] {
        pos(&r["train"], k);
    }
    assert!(r["peer"].is_null());

    // A model directory, as a table.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-tiny");
    let table = ok(&[
        "bench",
        "--decode-seconds",
        "0",
        "--model",
        p(&model),
        "--runtimes",
        "tract",
        "--batch",
        "1",
        "--recompute-positions",
        "2",
        "--train-batch",
        "0",
    ]);
    assert!(
        table.contains("memory copy") && table.contains("GFLOP/s"),
        "{table}"
    );
    assert!(table.contains("| tract | 1 |"), "{table}");

    // Another grid for the preset: 4×4 image tokens after tiny's 32 caption positions; the
    // weights exported in f16 (candle streams them as such at batch 1).
    let json = ok(&[
        "bench",
        "--decode-seconds",
        "0",
        "--preset",
        "tiny",
        "--grid",
        "4",
        "--fp16",
        "--runtimes",
        "candle,tract",
        "--batch",
        "1",
        "--recompute-positions",
        "2",
        "--train-batch",
        "0",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["image_tokens"], 16, "{r}");
    assert_eq!(r["dtype"], "f16", "{r}");
    assert_eq!(
        r["decode"][0]["recompute_positions"],
        serde_json::json!([32, 47])
    );

    fails(&["bench", "--batch", "0"], "at least 1");
    fails(&["bench", "--grid", "0"], "at least 1");
    fails(&["bench", "--passes", "0"], "--passes must be at least 1");
    fails(
        &["bench", "--decode-seconds=-1"],
        "--decode-seconds must be a number of seconds, 0 or more",
    );
    fails(&["bench", "--runtimes", "nope"], "unknown runtime `nope`");
    fails(
        &[
            "bench",
            "--peer",
            "pytorch",
            "--peer-python",
            "/nonexistent/python",
        ],
        "bench/install-peer.sh",
    );
}

/// A stand-in for the peer's Python that speaks `pytorch_peer.py`'s protocol (a report on
/// stdout; `--serve-train`: a ready line, then one answer per requested step) with fixed
/// times, or that stops after `die_after` answers.
#[cfg(unix)]
fn fake_peer(dir: &Path, die_after: usize) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-python");
    let script = format!(
        r#"#!/bin/sh
case " $* " in
*" --serve-train "*)
  echo '{{"ready": true, "openai_dvae_params": 1234}}'
  n=0
  while read -r step; do
    [ "$step" = quit ] && exit 0
    n=$((n + 1))
    [ "$n" -gt {die_after} ] && {{ echo "fake peer: out of steps" >&2; exit 3; }}
    case "$step" in
      transformer) echo '{{"s": 2.0}}' ;;
      openai_dvae) echo '{{"s": 0.5}}' ;;
      dvae) echo '{{"s": 0.25}}' ;;
      *) echo '{{"error": "unknown step"}}' ;;
    esac
  done ;;
*)
  echo '{{"peer": "fake", "version": "0", "torch": "0", "threads": 1, "transformer_params": 1, "dvae_params": 1, "generate": [{{"batch": 1, "prefill_s": 0.1, "first_step_s": 0.01, "last_step_s": 0.01, "transformer_s": 1.0, "dvae_decode_s": 0.1, "image_tokens_per_s": 16.0}}]}}' ;;
esac
"#
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[cfg(unix)]
#[test]
fn bench_alternates_training_steps_with_the_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |python: &Path| -> Vec<String> {
        [
            "bench",
            "--decode-seconds",
            "0",
            "--preset",
            "tiny",
            "--runtimes",
            "candle",
            "--batch",
            "1",
            "--recompute-positions",
            "1",
            "--train-batch",
            "1",
            "--train-reps",
            "2",
            "--peer",
            "pytorch",
            "--peer-python",
            p(python),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let fake = fake_peer(tmp.path(), 100);
    let a = args(&fake);
    let json = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let train = &r["peer"]["train"];
    assert_eq!(train["transformer_step_s"], 2.0, "{r}");
    assert_eq!(train["openai_dvae_step_s"], 0.5, "{r}");
    assert_eq!(train["dvae_step_s"], 0.25, "{r}");
    assert_eq!(train["openai_dvae_params"], 1234, "{r}");
    let ours = r["train"]["dvae_step_s"].as_f64().unwrap();
    assert!(ours > 0.0, "{r}");
    let figures = r["versus_peer"].as_array().unwrap();
    assert!(
        figures
            .iter()
            .any(|f| f["what"].as_str().unwrap_or("").contains("OpenAI")),
        "{r}"
    );

    // A peer that dies between steps is one clear error, not a hang or a panic.
    let dir = tmp.path().join("dying");
    std::fs::create_dir(&dir).unwrap();
    let dying = fake_peer(&dir, 1);
    let a = args(&dying);
    fails(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "the PyTorch peer stopped",
    );
}

#[test]
fn masks_prints_the_contract_matrix() {
    let json = ok(&[
        "masks",
        "--text-len",
        "3",
        "--grid",
        "4",
        "--kind",
        "column",
        "--json",
    ]);
    let m: Vec<Vec<u8>> = serde_json::from_str(&json).unwrap();
    assert_eq!(m.len(), 19);
    // Image query 4 (row 1, col 0) sees the text and image key 0 above it, and itself.
    assert_eq!(
        m[7],
        [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let drawn = ok(&[
        "masks",
        "--text-len",
        "2",
        "--grid",
        "3",
        "--kind",
        "conv",
        "--kernel",
        "3",
    ]);
    assert_eq!(drawn.lines().count(), 11);
    fails(
        &[
            "masks",
            "--text-len",
            "2",
            "--grid",
            "3",
            "--kind",
            "conv",
            "--kernel",
            "4",
        ],
        "must be odd",
    );
}

#[test]
fn train_encode_decode_reconstruct_and_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shapes");
    let run = tmp.path().join("run");
    ok(&[
        "data",
        "shapes",
        "--out",
        p(&data),
        "--count",
        "16",
        "--seed",
        "2",
    ]);
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
fn stage_two_train_and_generate_with_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shapes");
    let vae = tmp.path().join("vae");
    let run = tmp.path().join("tf");
    ok(&[
        "data",
        "shapes",
        "--out",
        p(&data),
        "--count",
        "12",
        "--seed",
        "4",
    ]);
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
    ok(&[
        "train",
        "--vae",
        p(&vae),
        "--data",
        p(&data),
        "--out",
        p(&run),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
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
