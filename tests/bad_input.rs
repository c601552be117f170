//! The bad-input table: every hostile input of the reliability probe (issue 22) against the
//! `dalle` binary. Each row runs one command in a directory of fixtures (a data set, a finished
//! dVAE run, a finished transformer run, an exported model, files of the user's) and asserts the
//! exit code, one `error:` line (the last line of stderr; clap's usage errors, exit 2, may list
//! the valid values below it) that contains the row's words, no panic, and that every file and link under the directory is byte-identical afterwards, with
//! nothing added.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a path holds, for the before/after comparison.
#[derive(Debug, PartialEq)]
enum Entry {
    File(Vec<u8>),
    Dir,
    Link(PathBuf),
    Special,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let t = meta.file_type();
            let entry = if t.is_symlink() {
                Entry::Link(std::fs::read_link(&path).unwrap())
            } else if t.is_dir() {
                stack.push(path.clone());
                Entry::Dir
            } else if t.is_file() {
                Entry::File(std::fs::read(&path).unwrap())
            } else {
                Entry::Special
            };
            out.insert(path, entry);
        }
    }
    out
}

fn dalle(args: &[String], env: &[(&str, String)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dalle"));
    c.args(args).env_remove("DALLE_KILL_AT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(args: &[&str]) {
    let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let o = dalle(&a, &[]);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One row: the command's words (`{T}` stands for the fixture directory), its exit code, the
/// words its error line must hold, and environment variables.
struct Case {
    args: &'static str,
    code: i32,
    needle: &'static str,
    env: &'static [(&'static str, &'static str)],
}

const fn case(args: &'static str, code: i32, needle: &'static str) -> Case {
    Case {
        args,
        code,
        needle,
        env: &[],
    }
}

const CASES: &[Case] = &[
    // Destroys data (before): generate --out over what is not a regular file.
    case("generate x --out {T}/link.png", 1, "is a symbolic link"),
    case("generate x --out {T}/user", 1, "is a directory"),
    case("generate x --out {T}/fifo.png", 1, "not a regular file"),
    case("generate x --out /dev/full", 1, "not a regular file"),
    // data shapes into an existing data set.
    case("data shapes --out {T}/data --count 2", 1, "pass --force to replace them"),
    // Crashes (before): sizes beyond the machine.
    case("generate x --model {T}/model --out {T}/o.png --num-images 100000000", 1, "ask for fewer images per call"),
    case("data shapes --out {T}/new --image-size 100000", 1, "--image-size must be from 16 to 1024"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps 1 --batch-size 100000000", 1, "use a smaller --batch-size"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --batch-size 100000000", 1, "use a smaller --batch-size"),
    // Silent on wrong input (before).
    case("train-vae --preset tiny --data {T}/data --out {T}/vae --steps 5 --batch-size 2 --resume", 1, "loop.steps (stored 2, given 5)"),
    case("generate --prompt-file {T}/nul.txt --model {T}/model --out {T}/o.png", 1, "control character"),
    case("generate x --model {T}/model --out {T}/o.bmp", 1, "name the file .png, .jpg or .webp"),
    case("generate x --model {T}/model --out {T}/o", 1, "cannot tell the image format from no extension"),
    case("data shapes --out {T}/new --count 0", 1, "--count must be at least 1"),
    case("data shapes --out {T}/new --cap shape=3", 2, "KIND=N with KIND one of single, count, relation"),
    case("data shapes --out {T}/new --count 2 --cap single=0 --cap count=0 --cap relation=0", 1, "nothing was written"),
    case("data stats {T}/user/NOTES.txt", 1, "is a file, not a data set"),
    case("train-vae --preset tiny --data {T}/empty --out {T}/new --steps 1", 1, "has no samples"),
    case("train-vae --preset tiny --data {T}/gone --out {T}/new --steps 1", 1, "no usable samples (1 seen, 1 skipped: missing_file 1)"),
    // Vague (before).
    case("generate x --model {T}/tf --out {T}/o.png", 1, "it is a `dalle train` run; export it"),
    case("generate x --model {T}/vae --out {T}/o.png", 1, "it is a `dalle train-vae` run"),
    case("generate x --model {T}/user --out {T}/o.png", 1, "not a model directory (no manifest.json)"),
    case("generate x --model {T}/loop-model --out {T}/o.png", 1, "transformer.onnx"),
    case("generate x --seed -1 --out {T}/o.png", 2, "--seed does not take a negative number"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps -5", 2, "--steps does not take a negative number"),
    case("generate x --model {T}/model --guidance-scale inf --out {T}/o.png", 1, "must be a finite number"),
    Case {
        args: "generate x --model {T}/model --runtime ort --out {T}/o.png",
        code: 1,
        needle: "is a directory; point it at the",
        env: &[("ORT_DYLIB_PATH", "{T}/user")],
    },
    case("setup ort --dir /proc/dalle-ort", 1, "/proc/dalle-ort"),
    case("setup blas --dir {T}/data/000000.png", 1, "is not a directory"),
    Case {
        args: "train-vae --preset tiny --data {T}/data --out {T}/new --steps 1",
        code: 1,
        needle: "no such file; run `dalle setup blas`",
        env: &[("DALLE_BLAS", "{T}/missing.so")],
    },
    Case {
        args: "train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1",
        code: 1,
        needle: "cannot be loaded as a shared library",
        env: &[("DALLE_BLAS", "{T}/data/000000.png")],
    },
    case("encode --vae {T}/user --input {T}/data/000000.png", 1, "is not a dVAE directory"),
    // Clear before, kept clear.
    case("generate x --model {T}/model --top-p 1.5 --out {T}/o.png", 1, "top-p must be in (0, 1]"),
    case("generate x --model {T}/model --temperature -1 --out {T}/o.png", 1, "temperature must be"),
    case("generate x --model {T}/model --runtime onnx --out {T}/o.png", 1, "valid runtimes are candle"),
    case("generate x --model {T}/missing --out {T}/o.png", 1, "missing"),
    case("generate x --model {T}/model --prime-image {T}/data/000000.png --prime-rows 99 --out {T}/o.png", 1, "--prime-rows must be between 1 and 7"),
    case("train-vae --preset huge --data {T}/data --out {T}/new --steps 1", 1, "unknown preset `huge`"),
    case("train-vae --preset tiny --data {T}/missing --out {T}/new --steps 1", 1, "does not exist"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps 1 --lr 0", 1, "--lr must be a positive number"),
    case("train-vae --preset tiny --data {T}/data --out {T}/vae --steps 2 --batch-size 2", 1, "already holds a training run"),
    case("train-vae --data {T}/data --out {T}/new --steps 1 --init-from {T}/user", 1, "is not a dVAE directory"),
    case("train-vae --data {T}/data --out {T}/new --steps 1 --init-from {T}/vae --image-size 32", 1, "--image-size changes the dVAE's shape"),
    case("train-vae --data {T}/data --out {T}/new --steps 1 --init-from {T}/vae --kmeans-init", 1, "give one or the other"),
    case("train-vae --data {T}/data --out {T}/new --steps 1 --init-from {T}/vae --encoder patch", 1, "--encoder changes the dVAE's shape"),
    case("train-vae --data {T}/data --out {T}/new --steps 1 --encoder conv", 2, "invalid value 'conv' for '--encoder"),
    case("train --preset small --vae {T}/vae --data {T}/data --out {T}/new --steps 1", 1, "needs 128px"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --init-from {T}/vae", 1, "is a `dalle train-vae` run"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --init-from {T}/user", 1, "is not a `dalle train` run"),
    case("decode --vae {T}/vae --tokens {T}/user/NOTES.txt --out {T}/o.png", 1, "is not JSON"),
    case("decode --vae {T}/vae --tokens {T}/short.json --out {T}/o.png", 1, "expected 64 tokens"),
    case("export --transformer {T}/tf --out {T}/model", 1, "exists; pass --force to replace it"),
    case("export --transformer {T}/tf --out {T}/new --opset 3", 1, "unknown opset 3"),
    case("export --from-model {T}/model --triton --out {T}/model", 1, "exists; pass --force to replace it"),
    case("info --preset huge", 1, "unknown preset `huge`"),
    case("masks --text-len 4 --grid 4 --kind nope", 2, "invalid value 'nope' for '--kind <KIND>'"),
    case("eval --model {T}/model --samples 0", 1, "--samples must be at least 1"),
    case("eval --model {T}/model --guidance x", 2, "invalid value 'x' for '--guidance"),
    case("eval --model {T}/model --samples 2 --benchmark nope", 2, "invalid value 'nope' for '--benchmark"),
    case("generate x --model {T}/model --num-images 0 --out {T}/o.png", 1, "at least 1"),
    case("generate x --model {T}/model --top-k 0 --out {T}/o.png", 1, "top-k must be at least 1"),
    case("generate x --model {T}/model --rerank 0 --out {T}/o.png", 1, "--rerank must be at least 1"),
    case("generate x --model {T}/model --rerank 100000000 --out {T}/o.png", 1, "fewer rerank candidates"),
    case("eval --model {T}/model --samples 2 --rerank 0", 1, "--rerank must be at least 1"),
    case("export --transformer {T}/tf --out {T}/new --rerank 0", 1, "--rerank must be at least 1"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --layers 0", 1, "--layers must be at least 1"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --conv-kernel 8", 1, "--conv-kernel must be odd"),
    case("generate --prompt-file {T}/missing.txt --out {T}/o.png", 1, "cannot read prompt file"),
    case("generate --prompt-file {T}/latin1.txt --out {T}/o.png", 1, "is not UTF-8"),
    case("generate x --model {T}/model --prime-image {T}/user/NOTES.txt --prime-rows 2 --out {T}/o.png", 1, "cannot use this image"),
    case("generate x --checkpoint {T}/data --out {T}/o.png", 1, "is not a `dalle train` run"),
    case("generate x --checkpoint {T}/tf --runtime tract --out {T}/o.png", 1, "--checkpoint runs on candle only"),
    case("generate x --model {T}/model --runtime candle --device tpu --out {T}/o.png", 1, "unknown device `tpu`"),
    case("decode --vae {T}/vae --tokens {T}/missing.json --out {T}/o.png", 1, "cannot read token file"),
    case("decode --vae {T}/vae --tokens {T}/big.json --out {T}/o.png", 1, "outside the codebook"),
    case("reconstruct --vae {T}/vae --input {T}/user/NOTES.txt --out {T}/o.png", 1, "cannot use this image"),
    case("encode --vae {T}/vae --input {T}/missing.png", 1, "missing.png"),
    case("train --preset tiny --vae {T}/missing --data {T}/data --out {T}/new --steps 1", 1, "is not a dVAE directory"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --caption-dropout 2", 1, "--caption-dropout must be in [0, 1]"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --negative-weight 0.1", 1, "lists no hard negatives"),
    case("train --preset tiny --vae {T}/vae --data {T}/data --out {T}/new --steps 1 --negative-weight nan", 1, "--negative-weight must be a finite number"),
    case("train --preset tiny --vae {T}/vae --data {T}/negbad --out {T}/new --steps 1 --negative-weight 0.1", 1, "not a list of file names"),
    case("train --preset tiny --vae {T}/vae --data {T}/neggone --out {T}/new --steps 1 --negative-weight 0.1", 1, "gone.neg.png"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps 1 --tau-start 0", 1, "must be above 0"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps 1 --hard-fraction 2", 1, "--hard-fraction must be from 0 to 1"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps 1 --beta-max nan", 1, "--beta-max must be a finite number"),
    case("train-vae --preset tiny --data {T}/data --out {T}/new --steps 1 --device cuda", 1, "CUDA"),
    case("tokenizer train --data {T}/data --vocab 0 --out {T}/tok.json", 1, "needs at least 257 ids"),
    case("export --transformer {T}/vae --out {T}/new", 1, "is a `dalle train-vae` run"),
    case("export --from-model {T}/user --out {T}/new", 1, "not a model directory (no manifest.json)"),
    case("vae judge --vae {T}/vae --scenes 0", 1, "--scenes must be at least 1"),
    case("vae judge --vae {T}/vae --failures {T}/user", 1, "is a directory"),
    case("vae psnr --vae {T}/vae --data {T}/empty", 1, "has no samples"),
    case("parity --model {T}/user", 1, "not a model directory"),
    case("data shapes --out /proc/dalle-x --count 1", 1, "cannot create output directory"),
    // dalle serve: refused before it listens.
    case("serve --model {T}/user", 1, "not a model directory (no manifest.json)"),
    case("serve --model {T}/model --max-batch 0", 1, "--max-batch must be at least 1"),
    case("serve --model {T}/model --max-queue 0", 1, "--max-queue must be at least 1"),
    case("serve --model {T}/model --runtime onnx", 1, "valid runtimes are candle"),
    case("serve --model {T}/model --name a/b", 1, "cannot be a URL path segment"),
    case("serve --model {T}/model --host 256.0.0.1 --port 1", 1, "cannot listen on 256.0.0.1:1"),
    case("serve --model {T}/model --port 99999", 2, "invalid value '99999' for '--port"),
];

/// The fixtures every row may read: a data set, a finished dVAE and transformer (2 steps of
/// `tiny`), their export, and files of the user's that nothing may touch.
fn fixtures(t: &Path) {
    let s = |p: &str| t.join(p).to_str().unwrap().to_string();
    ok(&[
        "data",
        "shapes",
        "--out",
        &s("data"),
        "--count",
        "8",
        "--seed",
        "1",
    ]);
    ok(&[
        "train-vae",
        "--preset",
        "tiny",
        "--data",
        &s("data"),
        "--out",
        &s("vae"),
        "--steps",
        "2",
        "--batch-size",
        "2",
    ]);
    ok(&[
        "train",
        "--preset",
        "tiny",
        "--vae",
        &s("vae"),
        "--data",
        &s("data"),
        "--out",
        &s("tf"),
        "--steps",
        "2",
        "--batch-size",
        "2",
    ]);
    ok(&["export", "--transformer", &s("tf"), "--out", &s("model")]);
    // A copy of the model whose transformer.onnx is a symlink loop.
    let lm = t.join("loop-model");
    std::fs::create_dir(&lm).unwrap();
    for e in std::fs::read_dir(t.join("model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), lm.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(lm.join("transformer.onnx")).unwrap();
    std::os::unix::fs::symlink("transformer.onnx", lm.join("transformer.onnx")).unwrap();
    let user = t.join("user");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("NOTES.txt"), "the user's notes").unwrap();
    std::fs::write(t.join("target.png"), "the user's picture").unwrap();
    std::os::unix::fs::symlink(t.join("target.png"), t.join("link.png")).unwrap();
    let fifo = std::ffi::CString::new(s("fifo.png")).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::fs::write(t.join("nul.txt"), b"a red\0circle").unwrap();
    std::fs::write(t.join("short.json"), "[1, 2, 3]").unwrap();
    let big: Vec<u32> = (0..64).map(|i| if i == 9 { 99_999 } else { 0 }).collect();
    std::fs::write(t.join("big.json"), serde_json::to_string(&big).unwrap()).unwrap();
    std::fs::write(t.join("latin1.txt"), b"caf\xe9").unwrap();
    std::fs::create_dir(t.join("empty")).unwrap();
    std::fs::write(t.join("empty/metadata.jsonl"), "").unwrap();
    // Sets whose one sample lists its hard negatives wrongly: not a list, a missing file.
    for (dir, negatives) in [("negbad", "3"), ("neggone", "[\"gone.neg.png\"]")] {
        std::fs::create_dir(t.join(dir)).unwrap();
        std::fs::copy(t.join("data/000000.png"), t.join(dir).join("a.png")).unwrap();
        std::fs::write(
            t.join(dir).join("metadata.jsonl"),
            format!("{{\"file_name\": \"a.png\", \"text\": \"a red square\", \"negatives\": {negatives}}}\n"),
        )
        .unwrap();
    }
    std::fs::create_dir(t.join("gone")).unwrap();
    std::fs::write(
        t.join("gone/metadata.jsonl"),
        "{\"file_name\": \"gone.png\", \"text\": \"a red square\"}\n",
    )
    .unwrap();
}

#[test]
fn every_bad_input_is_one_clear_error_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    fixtures(t);
    let root = t.to_str().unwrap();
    let full_before = std::fs::metadata("/dev/full")
        .map(|m| m.file_type().is_char_device())
        .ok();
    let mut failures = vec![];
    for c in CASES {
        let args: Vec<String> = c.args.split(' ').map(|w| w.replace("{T}", root)).collect();
        let env: Vec<(&str, String)> = c
            .env
            .iter()
            .map(|(k, v)| (*k, v.replace("{T}", root)))
            .collect();
        let before = snapshot(t);
        let o = dalle(&args, &env);
        let err = String::from_utf8_lossy(&o.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        let mut wrong = vec![];
        if o.status.code() != Some(c.code) {
            wrong.push(format!("exit {:?}, expected {}", o.status.code(), c.code));
        }
        if err.contains("panicked") {
            wrong.push("panicked".into());
        }
        // Usage errors (exit 2, from clap) may add the valid values and a --help hint below.
        let last = err.trim_end().lines().last().unwrap_or("");
        if errors.len() != 1 || (c.code == 1 && !last.starts_with("error:")) {
            wrong.push("not one `error:` line at the end".into());
        }
        if !errors.iter().any(|l| l.contains(c.needle)) {
            wrong.push(format!("no `{}` in the error", c.needle));
        }
        let after = snapshot(t);
        if after != before {
            let changed: Vec<_> = after
                .keys()
                .chain(before.keys())
                .filter(|k| after.get(*k) != before.get(*k))
                .map(|k| k.strip_prefix(t).unwrap_or(k).display().to_string())
                .collect();
            wrong.push(format!("files changed: {changed:?}"));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "dalle {}: {}\n  stderr: {}",
                c.args,
                wrong.join("; "),
                err.trim_end()
            ));
        }
    }
    assert_eq!(
        std::fs::metadata("/dev/full")
            .map(|m| m.file_type().is_char_device())
            .ok(),
        full_before,
        "/dev/full is no longer a device"
    );
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
