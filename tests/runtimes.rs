//! Conformance of every runtime on one exported model: prefill = step-by-step, batch rows are
//! independent, parity with candle, the same seed gives the same images, sessions are shared
//! across threads, and bad model directories are clear errors. ONNX Runtime runs when its
//! library is found (scripts/test.sh installs it; in CI its absence is a failure).

use dalle_runtimes::{names, KvCache, OpenOptions, Request, RuntimeError, RuntimeKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// fp32 logits of two runtimes (DESIGN.md "Parity").
const LOGITS_TOL: f32 = 1e-4;

fn export_tiny(root: &Path) -> PathBuf {
    export_tiny_with(root, &[])
}

fn export_tiny_with(root: &Path, flags: &[&str]) -> PathBuf {
    let run = root.join("run");
    let bin = env!("CARGO_BIN_EXE_dalle");
    // A random-weight tiny model: the export tests' helper builds it the same way.
    let cfg = dalle::config::Config::preset("tiny").unwrap();
    common::random_run(&run, &cfg);
    let out = root.join("model");
    let o = std::process::Command::new(bin)
        .args([
            "export",
            "--transformer",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

mod common;

use common::runtimes;

#[test]
fn every_runtime_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let opts = OpenOptions::default();
    let reference = dalle::runtime::open(&dir, RuntimeKind::Candle, &opts).unwrap();
    let m = reference.manifest().clone();
    let s = m.max_seq();
    let l = m.token_layout();
    let ids: Vec<i64> = (0..2 * s)
        .map(|i| {
            if i % s < l.text_len {
                (i * 13 % l.text_vocab) as i64
            } else {
                l.image((i * 7 % l.codebook) as u32) as i64
            }
        })
        .collect();
    let mut c = KvCache::new(&m, 2);
    let want = reference.session().forward(&ids, 2, &mut c).unwrap();
    let want_images = reference
        .generate(&Request::new("a red circle").num_images(2).top_k(8).seed(5))
        .unwrap();
    let vocab = l.vocab_size();
    for kind in runtimes() {
        let g = dalle::runtime::open(&dir, kind, &opts).unwrap();
        let sess = g.session();
        // Parity of the whole sequence at past 0.
        let mut c = KvCache::new(&m, 2);
        let got = sess.forward(&ids, 2, &mut c).unwrap();
        let d = common::max_abs_diff(&got, &want);
        assert!(d <= LOGITS_TOL, "{}: logits differ by {d}", kind.name());
        assert_eq!(c.lens, vec![s; 2]);
        // Prefill of half then single steps = the whole sequence.
        let half = s / 2;
        let row = |r: usize, a: usize, b: usize| ids[r * s + a..r * s + b].to_vec();
        let mut c = KvCache::new(&m, 2);
        let mut prefix = row(0, 0, half);
        prefix.extend(row(1, 0, half));
        sess.forward(&prefix, 2, &mut c).unwrap();
        for p in half..s {
            let step = sess.forward(&[ids[p], ids[s + p]], 2, &mut c).unwrap();
            for r in 0..2 {
                let w = &want[(r * s + p) * vocab..(r * s + p + 1) * vocab];
                let d = common::max_abs_diff(&step[r * vocab..(r + 1) * vocab], w);
                assert!(
                    d <= LOGITS_TOL,
                    "{}: step {p} row {r} differs by {d}",
                    kind.name()
                );
            }
        }
        // Batch independence: row 1 alone gives row 1's logits.
        let mut c = KvCache::new(&m, 1);
        let alone = sess.forward(&row(1, 0, s), 1, &mut c).unwrap();
        let d = common::max_abs_diff(&alone, &want[s * vocab..]);
        assert!(
            d <= LOGITS_TOL,
            "{}: batch row 1 alone differs by {d}",
            kind.name()
        );
        // Rows at different positions share a call: row 0 at `half` and row 1 at 3, prefilled
        // into caches of their own and joined (`regroup`), step together; then row 0 leaves
        // and row 1 goes on alone.
        let mut a = KvCache::new(&m, 1);
        sess.forward(&row(0, 0, half), 1, &mut a).unwrap();
        let mut b = KvCache::new(&m, 1);
        sess.forward(&row(1, 0, 3), 1, &mut b).unwrap();
        assert!(sess.mixed_positions(), "{}", kind.name());
        let mut c = sess.regroup(vec![a, b], &[(0, 0), (1, 0)]).unwrap();
        assert_eq!(c.lens, vec![half, 3]);
        let logits_at = |r: usize, p: usize| &want[(r * s + p) * vocab..(r * s + p + 1) * vocab];
        for k in 0..4 {
            let (p0, p1) = (half + k, 3 + k);
            let step = sess.forward(&[ids[p0], ids[s + p1]], 2, &mut c).unwrap();
            for (r, p) in [(0, p0), (1, p1)] {
                let d = common::max_abs_diff(&step[r * vocab..(r + 1) * vocab], logits_at(r, p));
                assert!(
                    d <= LOGITS_TOL,
                    "{}: mixed positions: row {r} at {p} differs by {d}",
                    kind.name()
                );
            }
        }
        let mut c = sess.regroup(vec![c], &[(0, 1)]).unwrap();
        assert_eq!(c.lens, vec![7]);
        let step = sess.forward(&[ids[s + 7]], 1, &mut c).unwrap();
        let d = common::max_abs_diff(&step, logits_at(1, 7));
        assert!(
            d <= LOGITS_TOL,
            "{}: row 1 after row 0 left differs by {d}",
            kind.name()
        );
        let e = sess.regroup(vec![c], &[(0, 1)]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A cloned cache is a separate cache: the runtimes write steps into their buffers in
        // place, so a clone must not see (or overwrite) the other's positions.
        let (text, x, y, z) = (row(0, 0, half), ids[half], ids[half + 1], ids[half + 2]);
        let after = |steps: &[i64]| {
            let mut c = KvCache::new(&m, 1);
            sess.forward(&text, 1, &mut c).unwrap();
            let mut logits = vec![];
            for &t in steps {
                logits = sess.forward(&[t], 1, &mut c).unwrap();
            }
            logits
        };
        let mut a = KvCache::new(&m, 1);
        sess.forward(&text, 1, &mut a).unwrap();
        let mut b = a.clone();
        sess.forward(&[x], 1, &mut a).unwrap();
        sess.forward(&[y], 1, &mut b).unwrap();
        let (za, zb) = (
            sess.forward(&[z], 1, &mut a).unwrap(),
            sess.forward(&[z], 1, &mut b).unwrap(),
        );
        for (got, steps) in [(za, [x, z]), (zb, [y, z])] {
            let d = common::max_abs_diff(&got, &after(&steps));
            assert!(
                d <= LOGITS_TOL,
                "{}: cloned caches interfere ({d})",
                kind.name()
            );
        }
        // Same seed, same images.
        let out = g
            .generate(&Request::new("a red circle").num_images(2).top_k(8).seed(5))
            .unwrap();
        assert_eq!(out.codes, want_images.codes, "{}", kind.name());
        assert_eq!(out.images, want_images.images, "{}", kind.name());
        // Error cases: positions beyond the sequence, ids outside the vocabulary.
        let mut c = KvCache::new(&m, 1);
        let e = sess.forward(&vec![0; s + 1], 1, &mut c).unwrap_err();
        assert!(
            e.to_string().contains("exceed the model's sequence length"),
            "{e}"
        );
        let e = sess.forward(&[vocab as i64], 1, &mut c).unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
        let e = sess.decode(&[0; 3], 1).unwrap_err();
        assert!(matches!(e, RuntimeError::Request(_)), "{e}");
    }
    // candle keeps its cache as tensors between steps; another runtime handed that cache says
    // so instead of reading empty host layers.
    let mut c = KvCache::new(&m, 1);
    reference.session().forward(&ids[..4], 1, &mut c).unwrap();
    assert_eq!(c.native.as_ref().map(|(owner, _)| *owner), Some("candle"));
    let tract = dalle::runtime::open(&dir, RuntimeKind::Tract, &opts).unwrap();
    let e = tract.session().forward(&ids[4..5], 1, &mut c).unwrap_err();
    assert!(e.to_string().contains("holds candle's state"), "{e}");
}

/// An `--fp16` export on tract, which widens it to f32 on loading (tract's own f16 kernels on x86
/// are generic loops, ~1000× slower on the dVAE; the speed is `dalle bench --fp16`'s to show),
/// agrees with candle's run of it: the logits within the f16 parity tolerance (the graph's f16
/// scalars — attention scale, GELU's constants — stay f16-rounded), the decoded pixels likewise.
#[test]
fn f16_exports_run_in_f32_arithmetic_on_tract() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny_with(tmp.path(), &["--fp16"]);
    let opts = OpenOptions::default();
    let candle = dalle::runtime::open(&dir, RuntimeKind::Candle, &opts).unwrap();
    let tract = dalle::runtime::open(&dir, RuntimeKind::Tract, &opts).unwrap();
    let m = candle.manifest().clone();
    assert_eq!(m.dtype, dalle_runtimes::Dtype::F16);
    let l = m.token_layout();
    let ids: Vec<i64> = (0..m.max_seq())
        .map(|i| {
            if i < l.text_len {
                (i * 5 % l.text_vocab) as i64
            } else {
                l.image((i * 11 % l.codebook) as u32) as i64
            }
        })
        .collect();
    let logits = |g: &dalle_runtimes::Generator| {
        let mut c = KvCache::new(&m, 1);
        g.session().forward(&ids, 1, &mut c).unwrap()
    };
    let want = logits(&candle);
    let tol = dalle::parity::Tolerances::for_model(m.dtype, &want);
    let d = common::max_abs_diff(&logits(&tract), &want);
    assert!(
        d <= tol.logits,
        "tract's f16 export differs from candle's by {d} (tolerance {})",
        tol.logits
    );
    let codes: Vec<i64> = (0..2 * m.geometry.image_tokens())
        .map(|i| (i * 7 % m.geometry.codebook) as i64)
        .collect();
    let (a, b) = (
        tract.session().decode(&codes, 2).unwrap(),
        candle.session().decode(&codes, 2).unwrap(),
    );
    let d = common::max_abs_diff(&a, &b);
    assert!(d <= tol.image, "decoded pixels differ by {d}");
}

#[test]
fn generators_are_shared_across_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let g =
        Arc::new(dalle::runtime::open(&dir, RuntimeKind::Tract, &OpenOptions::default()).unwrap());
    let req = |i: u64| {
        Request::new(format!("shape {i}"))
            .num_images(1)
            .seed(i)
            .top_k(16)
    };
    let sequential: Vec<_> = (0..4).map(|i| g.generate(&req(i)).unwrap().codes).collect();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let g = Arc::clone(&g);
            std::thread::spawn(move || g.generate(&req(i)).unwrap().codes)
        })
        .collect();
    let parallel: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(parallel, sequential);
}

/// One reply per twin, `(request index, output)`, each equal to its twin: the images the
/// request gets alone.
type Reply = (usize, Result<dalle_runtimes::Output, RuntimeError>);

fn expect_twins(
    rx: &std::sync::mpsc::Receiver<Reply>,
    twins: &[dalle_runtimes::Output],
    kind: RuntimeKind,
) {
    for _ in 0..twins.len() {
        let (i, out) = rx.recv().unwrap();
        let out = out.unwrap();
        assert_eq!(out.codes, twins[i].codes, "{kind:?}: request {i}'s codes");
        assert_eq!(
            out.images, twins[i].images,
            "{kind:?}: request {i}'s images"
        );
    }
}

/// Requests batched across callers (`Batcher`) give each caller the images it gets alone, on
/// every runtime: mixed image counts, guidance (two rows an image) and priming (its own cohort),
/// submitted all at once so that they share `forward` calls.
#[test]
fn batched_requests_equal_their_sequential_twins_on_every_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let reqs: Vec<Request> = (0..6u64)
        .map(|i| {
            let r = Request::new(format!("shape {i}"))
                .num_images(1 + i as usize % 3)
                .seed(i)
                .top_k(16);
            match i {
                2 | 5 => r.guidance_scale(3.0),
                3 => r.rerank(3),
                4 => r.prime(vec![1, 2, 3]),
                _ => r,
            }
        })
        .collect();
    for kind in runtimes() {
        let g = Arc::new(dalle::runtime::open(&dir, kind, &OpenOptions::default()).unwrap());
        let twins: Vec<_> = reqs.iter().map(|r| g.generate(r).unwrap()).collect();
        let mut batcher =
            dalle_runtimes::Batcher::new(g.clone(), dalle_runtimes::BatcherOptions::new(32, 16));
        let (tx, rx) = std::sync::mpsc::channel();
        let tickets: Vec<_> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let tx = tx.clone();
                batcher
                    .submit(r, move |out| tx.send((i, out)).unwrap())
                    .unwrap()
            })
            .collect();
        expect_twins(&rx, &twins, kind);
        let stats = batcher.stats();
        assert!(
            stats.forward_rows > stats.forward_calls,
            "{kind:?}: no call batched two requests: {stats:?}"
        );
        // Too many rows, a bad request, and a full queue are refused at once.
        let e = batcher
            .submit(
                &Request::new("x").num_images(17).guidance_scale(2.0),
                |_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("34 rows"), "{e}");
        let e = batcher
            .submit(&Request::new("x").temperature(-1.0), |_| {})
            .unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        drop(tickets);
        batcher.shutdown();
        let e = batcher.submit(&reqs[0], |_| {}).unwrap_err();
        assert!(e.to_string().contains("shutting down"), "{e}");
    }
}

/// Reranking keeps, of each image's candidates, the one with the best caption fit: candidate 0
/// is the image drawn without reranking, so the kept fit is never below it, and where it is
/// equal the image is that one. Without unconditional rows there is no fit; zero candidates is
/// a request error.
#[test]
fn rerank_keeps_the_best_fitting_candidate_on_every_runtime() {
    // The fit of one image computed in batches of other sizes (tract's kernels round by batch):
    // a sum of 64 log-probability differences, ~1e-5 apart measured.
    const FIT_TOL: f32 = 1e-3;
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    for kind in runtimes() {
        let g = dalle::runtime::open(&dir, kind, &OpenOptions::default()).unwrap();
        let base = Request::new("a red circle").num_images(3).seed(2).top_k(16);
        assert_eq!(g.generate(&base).unwrap().caption_fit, None, "{kind:?}");
        for guidance in [1.0, 2.0] {
            let one = g.generate(&base.clone().guidance_scale(guidance).rerank(1));
            let best = g.generate(&base.clone().guidance_scale(guidance).rerank(4));
            let (one, best) = (one.unwrap(), best.unwrap());
            let best_fit = best.caption_fit.clone().expect("a fit with reranking");
            assert_eq!(
                best.codes.len(),
                3,
                "{kind:?}: one image per image asked for"
            );
            if guidance == 1.0 {
                // No guidance and no reranking: no unconditional rows, no fit.
                assert_eq!(one.caption_fit, None, "{kind:?}");
                continue;
            }
            let one_fit = one.caption_fit.clone().expect("a fit under guidance");
            for j in 0..3 {
                assert!(best_fit[j].is_finite(), "{kind:?}: {best_fit:?}");
                assert!(
                    best_fit[j] >= one_fit[j] - FIT_TOL,
                    "{kind:?} image {j}: {best_fit:?} < {one_fit:?}"
                );
                if best.codes[j] == one.codes[j] {
                    let d = (best_fit[j] - one_fit[j]).abs();
                    assert!(
                        d <= FIT_TOL,
                        "{kind:?} image {j}: same image, fits {d} apart"
                    );
                }
            }
        }
        let e = g.generate(&base.clone().rerank(0)).unwrap_err();
        assert!(e.to_string().contains("rerank"), "{kind:?}: {e}");
    }
}

/// Token-granular batching: a request that arrives while another is sampling joins its batch at
/// the next step (one call steps both, each at its own position) and leaves when its image is
/// done; each gets the images it gets alone.
#[test]
fn a_request_joins_the_running_batch_on_every_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let reqs: Vec<Request> = (0..3u64)
        .map(|i| Request::new(format!("shape {i}")).seed(i).top_k(16))
        .collect();
    for kind in runtimes() {
        let g = Arc::new(dalle::runtime::open(&dir, kind, &OpenOptions::default()).unwrap());
        let twins: Vec<_> = reqs.iter().map(|r| g.generate(r).unwrap()).collect();
        let batcher =
            dalle_runtimes::Batcher::new(g.clone(), dalle_runtimes::BatcherOptions::new(8, 16));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut tickets = vec![];
        for (i, r) in reqs.iter().enumerate() {
            // Each request once the one before it is a few steps into its image.
            let calls = batcher.stats().forward_calls;
            while i > 0 && batcher.stats().forward_calls < calls + 3 {
                std::thread::yield_now();
            }
            let tx = tx.clone();
            tickets.push(
                batcher
                    .submit(r, move |out| tx.send((i, out)).unwrap())
                    .unwrap(),
            );
        }
        expect_twins(&rx, &twins, kind);
        // One-row requests that arrived at different steps: calls of two and three rows are
        // steps shared by requests at different positions.
        let stats = batcher.stats();
        let shared: u64 = stats.rows_histogram[1..].iter().sum();
        assert!(
            shared > 0,
            "{kind:?}: no step was shared by requests that arrived apart: {stats:?}"
        );
    }
}

#[test]
fn bad_model_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let open = |d: &Path| {
        dalle::runtime::open(d, RuntimeKind::Tract, &OpenOptions::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let d = copy("missing");
    std::fs::remove_file(d.join(names::DVAE_DECODER)).unwrap();
    assert!(
        open(&d).contains("`dvae_decoder.onnx` is missing"),
        "{}",
        open(&d)
    );
    let d = copy("truncated");
    let bytes = std::fs::read(d.join(names::TRANSFORMER)).unwrap();
    std::fs::write(d.join(names::TRANSFORMER), &bytes[..bytes.len() / 2]).unwrap();
    assert!(open(&d).contains("sha256"), "{}", open(&d));
    let d = copy("future");
    let text = std::fs::read_to_string(d.join(names::MANIFEST)).unwrap();
    std::fs::write(
        d.join(names::MANIFEST),
        text.replace(
            &format!(
                "\"schema_version\": {}",
                dalle_runtimes::manifest::SCHEMA_VERSION
            ),
            "\"schema_version\": 7",
        ),
    )
    .unwrap();
    assert!(open(&d).contains("schema version 7"), "{}", open(&d));
    // A tokenizer that is not one (its checksum re-recorded, so only the content is wrong).
    let d = copy("tokenizer");
    std::fs::write(d.join(names::TOKENIZER), "not json").unwrap();
    rehash(&d, names::TOKENIZER);
    assert!(
        open(&d).contains("not a readable tokenizer.json"),
        "{}",
        open(&d)
    );
    let e = RuntimeKind::parse("onnx").unwrap_err().to_string();
    assert!(e.contains("candle, tract, ort, cuda, trt"), "{e}");
}

/// Record `file`'s new checksum in the manifest, so only its content is wrong.
fn rehash(dir: &Path, file: &str) {
    let path = dir.join(names::MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let e = dalle_runtimes::manifest::sha256_file(&dir.join(file)).unwrap();
    m["files"][file] = serde_json::to_value(e).unwrap();
    std::fs::write(&path, m.to_string()).unwrap();
}

#[test]
fn a_truncated_graph_with_a_matching_checksum_fails_to_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let path = dir.join(names::TRANSFORMER);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    rehash(&dir, names::TRANSFORMER);
    for kind in runtimes() {
        let e = dalle::runtime::open(&dir, kind, &OpenOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{} opened a truncated graph", kind.name()));
        let msg = e.to_string();
        assert!(
            matches!(e, RuntimeError::Load { .. }),
            "{}: {msg}",
            kind.name()
        );
        assert!(msg.contains("transformer.onnx"), "{}: {msg}", kind.name());
    }
}

/// `dalle generate` on CUDA / TensorRT without a GPU build of ONNX Runtime: one error line naming
/// the provider library; with --allow-fallback a warning and the image on CPU. Without the
/// library at all: one line saying how to get it.
#[test]
fn gpu_providers_without_a_gpu_fail_clearly_or_fall_back() {
    if dalle_runtimes::ort::find_library().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install ONNX Runtime"
        );
        eprintln!("skipping: no ONNX Runtime library");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = export_tiny(tmp.path());
    let png = tmp.path().join("out.png");
    let dalle = |runtime: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dalle"));
        c.args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--runtime",
            runtime,
        ]);
        c.args([
            "--num-images",
            "1",
            "--out",
            png.to_str().unwrap(),
            "a red circle",
        ]);
        c.args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    for (runtime, provider, lib) in [
        ("trt", "TensorRT", "libonnxruntime_providers_tensorrt.so"),
        ("cuda", "CUDA", "libonnxruntime_providers_cuda.so"),
    ] {
        let o = dalle(runtime, &[], &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(provider) && err.contains(lib) && err.contains("1.31.1"),
            "{err}"
        );
        let o = dalle(runtime, &["--allow-fallback"], &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert_eq!(err.matches("warning:").count(), 1, "{err}");
        assert!(png.is_file());
    }
    let empty = tmp.path().join("empty-cache");
    let o = dalle(
        "ort",
        &[],
        &[
            ("ORT_DYLIB_PATH", ""),
            ("DALLE_CACHE_DIR", empty.to_str().unwrap()),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("dalle setup ort"), "{err}");
}
