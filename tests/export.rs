//! `dalle export`: the exported graphs, run in tract, give the candle models' numbers; the
//! manifest round-trips; ONNX's own checker accepts every graph; bad input is a clear error.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dalle::config::Config;
use dalle::transformer::Transformer;
use dalle_export::ExportOptions;
use dalle_runtimes::manifest::DvaeEncoder;
use dalle_runtimes::{names, Dtype, Manifest, ManifestError, TokenLayout};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::prelude::*;

mod common;

/// f32 agreement of two evaluation orders (candle vs tract kernels) on logits and pixels.
const F32_TOL: f32 = 1e-4;
/// Half-precision weights and arithmetic against the f32 candle model, relative to the largest
/// logit.
const F16_REL_TOL: f32 = 2e-2;

/// Three layers (row, column, conv); 6 caption positions then an 8×8 grid, so decoding runs
/// 64 single-token steps after the prefill.
fn config() -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.preset = "export-test".into();
    c.geometry.image_size = 64;
    c.geometry.grid = 8;
    c.geometry.codebook = 32;
    c.geometry.text_len = 6;
    c.geometry.text_vocab = 300;
    c.vae.vocab_size = 32;
    c.vae.n_hid = 16;
    c.vae.n_init = 16;
    c.transformer.d_model = 32;
    c.transformer.n_layers = 3;
    c.transformer.n_heads = 4;
    c.transformer.conv_kernel = 3;
    c.validate().unwrap();
    c
}

fn run_dir(root: &Path, cfg: &Config) -> PathBuf {
    let run = root.join("run");
    common::random_run(&run, cfg);
    run
}

fn export(run: &Path, out: &Path, opts: &ExportOptions) -> Manifest {
    dalle::export::export(run, None, out, opts, &mut |_| {}).unwrap()
}

fn plan(path: &Path) -> Arc<TypedRunnableModel> {
    tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn tract_f32(dims: &[usize], data: &[f32]) -> TValue {
    Tensor_::from_shape(dims, data).unwrap().into_tvalue()
}

fn tract_i64(dims: &[usize], data: &[i64]) -> TValue {
    Tensor_::from_shape(dims, data).unwrap().into_tvalue()
}

type Tensor_ = tract_onnx::prelude::Tensor;

fn values_f32(v: &TValue) -> Vec<f32> {
    v.to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn random_images(b: usize, size: usize, seed: u64) -> Vec<f32> {
    let mut rng = dalle::rng::Rng::new(seed);
    (0..b * 3 * size * size)
        .map(|_| rng.uniform() as f32)
        .collect()
}

fn random_ids(b: usize, cfg: &Config, seed: u64) -> Vec<u32> {
    let layout = TokenLayout::from(&cfg.geometry);
    let mut rng = dalle::rng::Rng::new(seed);
    let s = cfg.geometry.seq_len();
    (0..b * s)
        .map(|i| {
            if i % s < cfg.geometry.text_len {
                rng.below(layout.text_vocab + layout.text_len) as u32
            } else {
                layout.image(rng.below(cfg.geometry.codebook) as u32)
            }
        })
        .collect()
}

/// The candle models of a run directory.
struct Candle {
    vae: dalle::vae::io::Vae,
    transformer: Transformer,
}

fn candle(run: &Path, cfg: &Config) -> Candle {
    let weights =
        dalle::vae::io::read_f32(&run.join("transformer.safetensors"), &Device::Cpu).unwrap();
    let transformer = Transformer::new(
        cfg,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let vae = dalle::vae::io::Vae::load(&run.join("vae"), &Device::Cpu).unwrap();
    Candle { vae, transformer }
}

/// Candle's teacher-forced logits over whole sequences: (b, seq, vocab) flattened.
fn candle_logits(m: &Candle, ids: &[u32], b: usize, seq: usize) -> Vec<f32> {
    let t = Tensor::from_vec(ids.to_vec(), (b, seq), &Device::Cpu).unwrap();
    m.transformer
        .forward(&t, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The caller's side of the graph's KV contract: per layer, keys and values in fixed-capacity
/// buffers `[b, heads, max_seq, head_dim]`, of which the first `len` positions are filled.
struct Cache {
    dims: [usize; 4],
    len: usize,
    layers: Vec<[Vec<f32>; 2]>,
}

fn empty_cache(m: &Manifest, b: usize) -> Cache {
    let t = &m.transformer;
    let dims = [b, t.n_heads, m.max_seq(), t.head_dim];
    let zeros = || vec![0.0; dims.iter().product()];
    Cache {
        dims,
        len: 0,
        layers: (0..t.n_layers).map(|_| [zeros(), zeros()]).collect(),
    }
}

/// Run `transformer.onnx` on ids (b, t), every row at positions `cache.len ..`; returns the logits and
/// writes the `present` outputs (only the new positions) into the cache.
fn tract_step(
    plan: &Arc<TypedRunnableModel>,
    ids: &[i64],
    b: usize,
    cache: &mut Cache,
) -> Vec<f32> {
    let t = ids.len() / b;
    let mut inputs: TVec<TValue> = tvec![
        tract_i64(&[b, t], ids),
        tract_i64(&[b], &vec![cache.len as i64; b])
    ];
    for kv in &cache.layers {
        for x in kv {
            inputs.push(tract_f32(&cache.dims, x));
        }
    }
    let out = plan.run(inputs).unwrap();
    let [_, h, cap, hd] = cache.dims;
    for (kv, present) in cache.layers.iter_mut().zip(out[1..].chunks(2)) {
        for (x, new) in kv.iter_mut().zip(present) {
            assert_eq!(
                new.shape(),
                &[b, h, t, hd],
                "present holds the new positions only"
            );
            let new = values_f32(new);
            dalle_runtimes::session::write_positions(x, &new, b * h, cap, hd, cache.len, t);
        }
    }
    cache.len += t;
    values_f32(&out[0])
}

/// Teacher-forced logits of the whole sequence in one call (past length 0) and, separately,
/// a prefill of the caption followed by one call per image token with a growing past: both equal
/// candle's full forward within `tol`.
fn check_transformer(dir: &Path, m: &Manifest, c: &Candle, cfg: &Config, tol: f32) {
    let plan = plan(&dir.join(names::TRANSFORMER));
    let (s, t, vocab) = (
        cfg.geometry.seq_len(),
        cfg.geometry.text_len,
        m.layout.vocab_size,
    );
    for b in [1, 4] {
        let ids = random_ids(b, cfg, 10 + b as u64);
        let want = candle_logits(c, &ids, b, s);
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let ids64: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let got = tract_step(&plan, &ids64, b, &mut empty_cache(m, b));
        let d = common::max_abs_diff(&got, &want);
        eprintln!(
            "{}: teacher-forced b={b}: max |Δ| {d:.2e}, largest logit {scale:.1}",
            dir.display()
        );
        assert!(
            d <= tol * scale.max(1.0),
            "teacher-forced b={b}: max diff {d} (scale {scale})"
        );

        // Prefill the caption, then one token at a time.
        let prefix: Vec<i64> = (0..b)
            .flat_map(|r| ids64[r * s..r * s + t].to_vec())
            .collect();
        let mut cache = empty_cache(m, b);
        let mut logits = tract_step(&plan, &prefix, b, &mut cache);
        let mut steps = 0;
        for pos in t..=s {
            // `logits` are positions pos - len .. pos - 1; compare the last one.
            let n = logits.len() / (b * vocab);
            for r in 0..b {
                let got = &logits[(r * n + n - 1) * vocab..(r * n + n) * vocab];
                let want = &want[(r * s + pos - 1) * vocab..(r * s + pos) * vocab];
                let d = common::max_abs_diff(got, want);
                assert!(
                    d <= tol * scale.max(1.0),
                    "b={b} position {}: max diff {d}",
                    pos - 1
                );
            }
            if pos == s {
                break;
            }
            let next: Vec<i64> = (0..b).map(|r| ids64[r * s + pos]).collect();
            logits = tract_step(&plan, &next, b, &mut cache);
            steps += 1;
        }
        assert!(steps >= 20, "only {steps} decode steps");
        assert_eq!(cache.len, s);
    }
}

/// Encoder tokens identical, decoder pixels within `tol`, batch 1 and 4.
fn check_dvae(dir: &Path, c: &Candle, cfg: &Config, tol: f32) {
    let size = cfg.geometry.image_size;
    let n = cfg.geometry.image_tokens();
    let enc = plan(&dir.join(names::DVAE_ENCODER));
    let dec = plan(&dir.join(names::DVAE_DECODER));
    for b in [1, 4] {
        let px = random_images(b, size, b as u64);
        let x = Tensor::from_vec(px.clone(), (b, 3, size, size), &Device::Cpu).unwrap();
        let want: Vec<u32> = c
            .vae
            .encoder
            .encode(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let out = enc.run(tvec![tract_f32(&[b, 3, size, size], &px)]).unwrap();
        let got: Vec<u32> = out[0]
            .to_plain_array_view::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(got, want, "encoder tokens b={b}");
        assert!(want.iter().collect::<std::collections::HashSet<_>>().len() > 1);

        let codes: Vec<u32> = (0..b * n)
            .map(|i| ((i * 7 + b) % cfg.geometry.codebook) as u32)
            .collect();
        let t = Tensor::from_vec(codes.clone(), (b, n), &Device::Cpu).unwrap();
        let want: Vec<f32> = c
            .vae
            .decoder
            .decode(&t, cfg.geometry.grid)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ids: Vec<i64> = codes.iter().map(|&v| v as i64).collect();
        let out = dec.run(tvec![tract_i64(&[b, n], &ids)]).unwrap();
        assert_eq!(out[0].shape(), &[b, 3, size, size]);
        let d = common::max_abs_diff(&values_f32(&out[0]), &want);
        assert!(d <= tol, "decoder pixels b={b}: max diff {d}");
    }
}

#[test]
fn exported_graphs_in_tract_match_the_candle_models() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config();
    let run = run_dir(tmp.path(), &cfg);
    let out = tmp.path().join("model");
    let m = export(&run, &out, &ExportOptions::default());
    let c = candle(&run, &cfg);
    check_dvae(&out, &c, &cfg, F32_TOL);
    check_transformer(&out, &m, &c, &cfg, F32_TOL);
}

/// A convolutional window as wide as twice the grid reads every earlier position: dense causal
/// attention, exported through the same gathered-key tables.
#[test]
fn a_whole_grid_window_exports_and_matches_candle_in_tract() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.transformer.conv_kernel = 2 * cfg.geometry.grid + 1;
    let run = run_dir(tmp.path(), &cfg);
    let out = tmp.path().join("model");
    let m = export(&run, &out, &ExportOptions::default());
    let c = candle(&run, &cfg);
    check_transformer(&out, &m, &c, &cfg, F32_TOL);
}

#[test]
fn a_patch_encoder_exports_and_gives_the_candle_codes_in_tract() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.vae.encoder = DvaeEncoder::Patch;
    let run = run_dir(tmp.path(), &cfg);
    let out = tmp.path().join("model");
    let m = export(&run, &out, &ExportOptions::default());
    assert_eq!(m.dvae.map(|d| d.encoder), Some(DvaeEncoder::Patch));
    let c = candle(&run, &cfg);
    check_dvae(&out, &c, &cfg, F32_TOL);
}

#[test]
fn external_data_and_fp16_exports_run_in_tract() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config();
    let run = run_dir(tmp.path(), &cfg);
    let c = candle(&run, &cfg);

    let ext = tmp.path().join("external");
    let opts = ExportOptions {
        external_data_threshold: 0,
        ..Default::default()
    };
    let m = export(&run, &ext, &opts);
    for f in [names::DVAE_ENCODER, names::DVAE_DECODER, names::TRANSFORMER] {
        let data = format!("{f}.data");
        assert!(ext.join(&data).is_file(), "{data} missing");
        assert!(m.files.contains_key(&data), "{data} not in the manifest");
    }
    check_dvae(&ext, &c, &cfg, F32_TOL);
    check_transformer(&ext, &m, &c, &cfg, F32_TOL);

    let half = tmp.path().join("fp16");
    let opts = ExportOptions {
        dtype: Dtype::F16,
        ..Default::default()
    };
    let m = export(&run, &half, &opts);
    assert_eq!(m.dtype, Dtype::F16);
    check_transformer(&half, &m, &c, &cfg, F16_REL_TOL);
}

/// `onnx.checker.check_model(path, full_check=True)` on every graph of an f32, an fp16 and an
/// external-data export. scripts/test.sh installs the `onnx` package into target/py.
#[test]
fn onnx_checker_accepts_every_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config();
    let run = run_dir(tmp.path(), &cfg);
    let mut graphs = vec![];
    for (name, opts) in [
        ("f32", ExportOptions::default()),
        (
            "f16",
            ExportOptions {
                dtype: Dtype::F16,
                ..Default::default()
            },
        ),
        (
            "ext",
            ExportOptions {
                external_data_threshold: 0,
                opset: 21,
                ..Default::default()
            },
        ),
    ] {
        let dir = tmp.path().join(name);
        export(&run, &dir, &opts);
        for f in [names::DVAE_ENCODER, names::DVAE_DECODER, names::TRANSFORMER] {
            graphs.push(dir.join(f));
        }
    }
    let python = std::env::var("DALLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import sys, onnx\n\
                  for p in sys.argv[1:]:\n    \
                      onnx.checker.check_model(p, full_check=True)\n    \
                      print('ok', p)\n";
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(&graphs)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; scripts/test.sh sets DALLE_PYTHON"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "onnx.checker rejected a graph (or `onnx` is not installed for {python}; \
         scripts/test.sh installs it):\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        graphs.len()
    );
}

#[test]
fn manifest_round_trips_and_checksums_are_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config();
    let run = run_dir(tmp.path(), &cfg);
    let out = tmp.path().join("model");
    let written = export(&run, &out, &ExportOptions::default());
    let loaded = Manifest::load(&out).unwrap();
    assert_eq!(loaded, written);
    assert_eq!(loaded.geometry, cfg.geometry);
    assert_eq!(loaded.layers, dalle_runtimes::layer_kinds(3, 3));
    assert_eq!(loaded.transformer.head_dim, 8);
    assert_eq!(loaded.layout.image_offset, 306);
    assert_eq!(loaded.files.len(), 4);

    // A changed file is caught by its checksum, a missing one by name.
    let path = out.join(names::TRANSFORMER);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = Manifest::load(&out).unwrap_err();
    assert!(matches!(e, ManifestError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("transformer.onnx"), "{e}");
    std::fs::remove_file(out.join(names::TOKENIZER)).unwrap();
    let e = Manifest::load(&out).unwrap_err();
    assert!(matches!(e, ManifestError::MissingFile { .. }), "{e}");

    // A manifest edited by hand to disagree with itself is refused.
    let mut m = written.clone();
    m.layers.pop();
    std::fs::write(
        out.join(names::MANIFEST),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    let e = Manifest::read(&out).unwrap_err();
    assert!(
        e.to_string()
            .contains("attention kinds listed for 3 layers"),
        "{e}"
    );
    let mut v = serde_json::to_value(&written).unwrap();
    v["schema_version"] = 99.into();
    std::fs::write(out.join(names::MANIFEST), v.to_string()).unwrap();
    let e = Manifest::read(&out).unwrap_err();
    assert!(matches!(e, ManifestError::Schema { found: 99, .. }), "{e}");
}

fn export_err(run: &Path, vae: Option<&Path>, out: &Path, opts: &ExportOptions) -> String {
    let e = dalle::export::export(run, vae, out, opts, &mut |_| {}).unwrap_err();
    e.to_string()
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config();
    let run = run_dir(tmp.path(), &cfg);
    let out = tmp.path().join("model");
    let opts = ExportOptions::default();

    // Checkpoint tensors that do not match the config: missing, reshaped, extra.
    let tpath = run.join("transformer.safetensors");
    let good = candle_core::safetensors::load(&tpath, &Device::Cpu).unwrap();
    let mut t = good.clone();
    t.remove("layers.1.attn.proj.bias");
    candle_core::safetensors::save(&t, &tpath).unwrap();
    let e = export_err(&run, None, &out, &opts);
    assert!(e.contains("lacks tensor `layers.1.attn.proj.bias`"), "{e}");
    let mut t = good.clone();
    t.insert(
        "ln_f.weight".into(),
        Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &tpath).unwrap();
    let e = export_err(&run, None, &out, &opts);
    assert!(
        e.contains("tensor `ln_f.weight` has shape [31] but the config requires [32]"),
        "{e}"
    );
    let mut t = good.clone();
    t.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &tpath).unwrap();
    let e = export_err(&run, None, &out, &opts);
    assert!(
        e.contains("has tensor `extra.weight` that the config does not define"),
        "{e}"
    );
    candle_core::safetensors::save(&good, &tpath).unwrap();
    assert!(!out.exists());

    // A dVAE of another geometry.
    let mut other = cfg.clone();
    other.geometry.codebook = 64;
    other.vae.vocab_size = 64;
    let other_run = run_dir(&tmp.path().join("other"), &other);
    let e = export_err(&run, Some(&other_run.join("vae")), &out, &opts);
    assert!(
        e.contains("different geometry") && e.contains("codebook: dVAE 64, transformer 32"),
        "{e}"
    );

    // Unknown opsets.
    for opset in [16, 22] {
        let e = export_err(
            &run,
            None,
            &out,
            &ExportOptions {
                opset,
                ..Default::default()
            },
        );
        assert!(
            e.contains(&format!("unknown opset {opset}")) && e.contains("17 to 21"),
            "{e}"
        );
    }
    assert!(!out.exists());

    // An existing directory is kept unless --force.
    export(&run, &out, &opts);
    std::fs::write(out.join("keep.txt"), "user file").unwrap();
    let e = export_err(&run, None, &out, &opts);
    assert!(e.contains("exists; pass --force"), "{e}");
    assert!(out.join("keep.txt").exists());
    export(
        &run,
        &out,
        &ExportOptions {
            force: true,
            ..Default::default()
        },
    );
    assert!(!out.join("keep.txt").exists());
    Manifest::load(&out).unwrap();
    // No staging directories left next to it.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".model"))
        .collect();
    assert!(leftovers.is_empty());

    // An output path that cannot be created (its parent is a file).
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = export_err(&run, None, &file.join("model"), &opts);
    assert!(e.contains("a-file"), "{e}");
}

#[test]
fn cli_prints_a_line_per_graph_and_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_dir(tmp.path(), &config());
    let out = tmp.path().join("model");
    let dalle = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dalle"))
            .args(["export", "--transformer", run.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = dalle(&["--fp16"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for f in [names::DVAE_ENCODER, names::DVAE_DECODER, names::TRANSFORMER] {
        assert_eq!(
            err.lines()
                .filter(|l| l.starts_with(&format!("{f}: ")))
                .count(),
            1,
            "{err}"
        );
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("f16, opset 17"));
    for (args, needle) in [
        (&[][..], "exists; pass --force to replace it"),
        (&["--force", "--opset", "9"][..], "unknown opset 9"),
    ] {
        let o = dalle(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("error:") && lines[0].contains(needle),
            "{err}"
        );
    }
    assert_eq!(Manifest::load(&out).unwrap().dtype, Dtype::F16);
}

/// A model directory of an older schema is refused with the command that upgrades it, and
/// `--from-model` re-exports a directory from its own graphs and manifest: same weights, same
/// dVAE graphs byte for byte, same sampling defaults.
#[test]
fn from_model_re_exports_a_model_dir_with_its_weights_and_settings() {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old");
    std::fs::create_dir(&old).unwrap();
    for e in std::fs::read_dir(&bundled).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), old.join(e.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(old.join(names::MANIFEST)).unwrap();
    let now = format!(
        "\"schema_version\": {}",
        dalle_runtimes::manifest::SCHEMA_VERSION
    );
    let v1 = text.replace(&now, "\"schema_version\": 1");
    assert_ne!(v1, text);
    std::fs::write(old.join(names::MANIFEST), v1).unwrap();
    let err = Manifest::load(&old).unwrap_err().to_string();
    assert!(
        err.contains("schema version 1") && err.contains("dalle export --from-model"),
        "{err}"
    );

    let out = tmp.path().join("new");
    let input = dalle::export::load_model_dir(&old).unwrap();
    let m = dalle_export::export(&input, &out, &ExportOptions::default(), &mut |_| {}).unwrap();
    let src = Manifest::load(&bundled).unwrap();
    assert_eq!(m.sampling, src.sampling);
    assert_eq!(m.geometry, src.geometry);
    assert_eq!(m.layers, src.layers);
    for f in [names::DVAE_ENCODER, names::DVAE_DECODER, names::TOKENIZER] {
        let (a, b) = (
            std::fs::read(bundled.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs after the round trip");
    }
    let weights = |d: &Path| dalle_export::read_initializers(&d.join(names::TRANSFORMER)).unwrap();
    let (a, b) = (weights(&bundled), weights(&out));
    assert_eq!(a.len(), b.len());
    for (name, w) in &a {
        let x = &b[name];
        assert!(
            x.dims == w.dims && x.data == w.data,
            "weight {name} changed"
        );
    }
    // Not a model directory: one clear error.
    let err = dalle::export::load_model_dir(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("manifest.json"), "{err}");
}

/// `dalle export --triton`: every config parses as Triton's ModelConfig, and the transformer's
/// state variant, fed its own output states back as Triton's implicit state does (through
/// Python's onnxruntime: scripts/triton-check.py), decodes greedily the same codes as `dalle
/// generate` (temperature 0) on ONNX Runtime and on tract.
#[test]
fn triton_repository_configs_parse_and_its_state_graph_generates_the_same_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let bundled = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-tiny");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args(["export", "--from-model", bundled, "--triton", "--out"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "README.md",
        "manifest.json",
        "tokenizer.json",
        "dvae_encoder/config.pbtxt",
        "dvae_encoder/1/model.onnx",
        "dvae_decoder/config.pbtxt",
        "dvae_decoder/1/model.onnx",
        "transformer/config.pbtxt",
        "transformer/1/model.onnx",
    ] {
        assert!(repo.join(f).is_file(), "{f} missing");
    }
    // Nothing else: no staging directory, no model-directory leftovers.
    let mut top: Vec<String> = std::fs::read_dir(&repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        [
            "README.md",
            "dvae_decoder",
            "dvae_encoder",
            "manifest.json",
            "tokenizer.json",
            "transformer"
        ]
    );
    let prompt = "a red circle above a blue square";
    let mut runtimes = vec![dalle_runtimes::RuntimeKind::Tract];
    match dalle_runtimes::ort::find_library() {
        Ok(_) => runtimes.push(dalle_runtimes::RuntimeKind::Ort),
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI must test ONNX Runtime: {e}"),
        Err(_) => {}
    }
    let mut want = vec![];
    for kind in runtimes {
        let g = dalle::runtime::open(Path::new(bundled), kind, &Default::default()).unwrap();
        let req = dalle_runtimes::Request::new(prompt).temperature(0.0);
        want.push((kind, g.generate(&req).unwrap().codes.remove(0)));
    }
    let g = dalle::runtime::open(
        Path::new(bundled),
        dalle_runtimes::RuntimeKind::Tract,
        &Default::default(),
    )
    .unwrap();
    let caption = g.caption(prompt).unwrap().0;
    let python = std::env::var("DALLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/triton-check.py"
        ))
        .arg(&repo)
        .arg(serde_json::to_string(&caption).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; scripts/test.sh sets DALLE_PYTHON"));
    assert!(
        out.status.success(),
        "scripts/triton-check.py failed (scripts/test.sh installs onnxruntime and tritonclient for {python}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<u32> = got["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got["image_shape"], serde_json::json!([1, 3, 64, 64]));
    for (kind, want) in want {
        assert_eq!(
            codes, want,
            "the state graph's greedy codes differ from {kind:?}'s"
        );
    }
}
