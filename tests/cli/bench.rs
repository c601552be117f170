//! `dalle bench`: its report, and its alternation with the PyTorch peer.

use super::*;

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
