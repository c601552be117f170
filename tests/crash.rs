//! Crash safety of the `dalle` binary: training killed at any moment (including half way through
//! a checkpoint) resumes to a result bit-identical to an uninterrupted run, and a killed
//! `export --force` leaves a whole model directory, the old one or the new one.
//!
//! Exact moments come from the `DALLE_KILL_AT` hook (`dalle_runtimes::failpoint`: the process
//! aborts there, leaving the files a `kill -9` would); one more kill per run is a real SIGKILL
//! at a moment chosen by the clock.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dalle"));
    c.args(args)
        .env_remove("DALLE_KILL_AT")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn run(args: &[&str], kill_at: Option<&str>) -> ExitStatus {
    let mut c = command(args);
    if let Some(k) = kill_at {
        c.env("DALLE_KILL_AT", k);
    }
    c.status().unwrap()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Run the training command `args` (writing `out`) to its end through every kill of `kills` and
/// one SIGKILL after `sigkill_after`, resuming after each as a user's script would: with
/// `--resume` once a checkpoint exists.
fn train_through_kills(args: &[&str], out: &Path, kills: &[&str], sigkill_after: Duration) {
    let with_resume = || {
        let mut a = args.to_vec();
        if out.join("checkpoints/latest").exists() {
            a.push("--resume");
        }
        a
    };
    for k in kills {
        let status = run(&with_resume(), Some(k));
        assert_eq!(
            status.signal(),
            Some(libc_sigabrt()),
            "DALLE_KILL_AT={k}: expected to die there, got {status}"
        );
    }
    let mut child = command(&with_resume()).spawn().unwrap();
    std::thread::sleep(sigkill_after);
    let _ = child.kill(); // SIGKILL (the run may already have ended: then nothing happens)
    let _ = child.wait();
    let status = run(&with_resume(), None);
    assert!(status.success(), "the final resume failed: {status}");
}

/// SIGABRT, what `failpoint::hit` dies of.
fn libc_sigabrt() -> i32 {
    6
}

#[test]
fn killed_training_resumes_bit_identical_and_killed_export_leaves_a_whole_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    assert!(run(
        &[
            "data",
            "shapes",
            "--out",
            p(&data),
            "--count",
            "16",
            "--seed",
            "5"
        ],
        None
    )
    .success());

    // Stage 1.
    let vae_args = |out: &Path| -> Vec<String> {
        [
            "train-vae",
            "--preset",
            "tiny",
            "--data",
            p(&data),
            "--out",
            p(out),
            "--steps",
            "10",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "2",
            "--sample-every",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let vae_straight = tmp.path().join("vae-straight");
    assert!(run(&refs(&vae_args(&vae_straight)), None).success());
    let vae = tmp.path().join("vae");
    let kills = [
        "checkpoint-weights:2", // half way through the first checkpoint: nothing to resume yet
        "update:3",
        "checkpoint-written:4", // every file written, not yet renamed into place
        "checkpoint-renamed:6", // in place, `latest` still names step 4
        "checkpoint-latest:8",  // `latest` updated, older checkpoints not yet pruned
    ];
    train_through_kills(
        &refs(&vae_args(&vae)),
        &vae,
        &kills,
        Duration::from_millis(700),
    );
    common::assert_same_checkpoint(&vae_straight, &vae);
    for f in ["encoder.safetensors", "decoder.safetensors"] {
        assert_eq!(
            std::fs::read(vae_straight.join(f)).unwrap(),
            std::fs::read(vae.join(f)).unwrap(),
            "{f} differs"
        );
    }

    // Stage 2, on that dVAE.
    let tf_args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--preset",
            "tiny",
            "--vae",
            p(&vae),
            "--data",
            p(&data),
            "--out",
            p(out),
            "--steps",
            "10",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "2",
            "--sample-every",
            "1000",
            "--bpe-dropout",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let tf_straight = tmp.path().join("tf-straight");
    assert!(run(&refs(&tf_args(&tf_straight)), None).success());
    let tf = tmp.path().join("tf");
    train_through_kills(
        &refs(&tf_args(&tf)),
        &tf,
        &kills,
        Duration::from_millis(700),
    );
    common::assert_same_checkpoint(&tf_straight, &tf);
    assert_eq!(
        std::fs::read(tf_straight.join("transformer.safetensors")).unwrap(),
        std::fs::read(tf.join("transformer.safetensors")).unwrap()
    );

    // Export: a kill before the swap leaves the old model, one after it the new one; never a
    // half one, never none.
    let model = tmp.path().join("model");
    let export = |extra: &[&str], kill: Option<&str>| {
        let mut a = vec!["export", "--transformer", p(&tf), "--out", p(&model)];
        a.extend_from_slice(extra);
        run(&a, kill)
    };
    assert!(export(&["--top-k", "3"], None).success());
    let top_k = || {
        dalle_runtimes::Manifest::load(&model)
            .expect("a whole model directory")
            .sampling
            .top_k
    };
    assert_eq!(top_k(), Some(3));
    let st = export(&["--force", "--top-k", "4"], Some("export-staged:0"));
    assert_eq!(st.signal(), Some(libc_sigabrt()));
    assert_eq!(top_k(), Some(3), "killed before the swap: the old model");
    let st = export(&["--force", "--top-k", "5"], Some("export-swapped:0"));
    assert_eq!(st.signal(), Some(libc_sigabrt()));
    assert_eq!(top_k(), Some(5), "killed after the swap: the new model");
    assert!(export(&["--force", "--top-k", "6"], None).success());
    assert_eq!(top_k(), Some(6));
}
