//! The `dalle` binary: tools round-trip, and every bad input is one clear error line.

mod bench;
mod stage1;
mod stage2;

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

/// `dalle data shapes` of `count` scenes with `seed` into `dir`.
fn shapes(dir: &Path, count: usize, seed: u64) {
    let (count, seed) = (count.to_string(), seed.to_string());
    ok(&[
        "data",
        "shapes",
        "--out",
        p(dir),
        "--count",
        &count,
        "--seed",
        &seed,
    ]);
}

/// One stage-2 update (batch 2) on `vae` and `data` into `run`; its config.json.
fn train_one_step(vae: &Path, data: &Path, run: &Path) -> serde_json::Value {
    ok(&[
        "train",
        "--vae",
        p(vae),
        "--data",
        p(data),
        "--out",
        p(run),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]);
    serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap()
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
