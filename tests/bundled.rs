//! The bundled model (`models/shapes-tiny`): it loads, its files match their checksums, the
//! front-door command writes an image, and `dalle eval` on it scores well above chance, so a
//! broken model or exporter cannot land silently.

use std::path::PathBuf;
use std::process::Command;

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dalle::BUNDLED_MODEL)
}

/// Samples per split: small enough for a debug build, large enough that chance cannot pass.
const SAMPLES: usize = 16;

/// Chance levels: one of 8 colours; fully correct needs colour, shape (1 of 6), size (1 of 2),
/// position or relation and count at once, far below 1%.
const CHANCE_COLOUR: f64 = 1.0 / 8.0;

/// What the bundled model must reach on `SAMPLES` scenes at guidance 3: well above chance, well
/// below its measured accuracy (models/shapes-tiny/README.md), so sampling noise does not fail CI.
const MIN_COLOUR: f64 = 3.0 * CHANCE_COLOUR;
const MIN_FULLY_CORRECT_SEEN: f64 = 0.15;

#[test]
fn bundled_manifest_matches_its_files() {
    let m = dalle_runtimes::Manifest::load(&bundled()).expect("bundled manifest");
    m.verify_files(&bundled())
        .expect("bundled files match the manifest");
    assert_eq!(m.preset, "tiny");
}

#[test]
fn eval_on_the_bundled_model_is_well_above_chance() {
    let out = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args([
            "eval",
            "--samples",
            &SAMPLES.to_string(),
            "--guidance",
            "3",
            "--json",
        ])
        .env_remove("DALLE_MODEL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scores = v["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 2, "one score per split");
    for s in scores {
        let split = s["split"].as_str().unwrap();
        let (ok, n) = (
            s["attributes"]["colour"][0].as_f64().unwrap(),
            s["attributes"]["colour"][1].as_f64().unwrap(),
        );
        assert!(
            ok / n >= MIN_COLOUR,
            "{split}: colour accuracy {ok}/{n} is not above {MIN_COLOUR} (chance {CHANCE_COLOUR})"
        );
        if split == "seen" {
            let full = s["fully_correct"].as_f64().unwrap() / s["samples"].as_f64().unwrap();
            assert!(
                full >= MIN_FULLY_CORRECT_SEEN,
                "seen: fully correct {full} is below {MIN_FULLY_CORRECT_SEEN}"
            );
        }
    }
}

#[test]
fn generate_without_a_model_uses_the_bundled_one() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let out = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args(["generate", "a red circle above a blue square", "--out"])
        .arg(&png)
        .env_remove("DALLE_MODEL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap().to_rgb8();
    // Four 64-px images in a 2×2 grid with 2-px gaps.
    assert_eq!(img.dimensions(), (2 * 66 + 2, 2 * 66 + 2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(tract)"), "{stdout}");
}

#[test]
fn a_missing_bundled_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args(["generate", "a red circle", "--out", "x.png"])
        .env("DALLE_MODEL", dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere"), "{err}");
}
