//! ruDALL-E import: random-weight checkpoints made with the real package
//! (`scripts/rudalle-fixtures.py`, rudalle 1.1.3 on torch 2.15: tests/fixtures/rudalle) give
//! rudalle's logits on candle, tract and ONNX Runtime, teacher-forced and step by step; a
//! checkpoint that would run code when unpickled, truncated files and other models' files are
//! clear errors.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dalle::import::{rudalle, torch};
use dalle_runtimes::{KvCache, OpenOptions};
use std::path::{Path, PathBuf};

mod common;

/// fp32 logits of two implementations (DESIGN.md "Parity"; measured ~1e-5).
const LOGITS_TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rudalle")
        .join(name)
}

fn npy(name: &str) -> Tensor {
    Tensor::read_npy(fixture(name)).unwrap()
}

fn options() -> rudalle::Options {
    rudalle::Options {
        version: rudalle::Version::V3,
        n_heads: Some(4),
    }
}

fn imported() -> rudalle::Transformer {
    let path = fixture("transformer.pt");
    let state = torch::read(&path, None).unwrap();
    rudalle::transformer(&path, &state, options()).unwrap()
}

/// A whole config around the imported transformer, for the candle model alone (its dVAE part
/// is unused).
fn config(t: &rudalle::Transformer) -> dalle::Config {
    let mut cfg = dalle::Config::preset("tiny").unwrap();
    cfg.preset = "rudalle".into();
    cfg.geometry = t.geometry;
    cfg.vae.vocab_size = t.geometry.codebook;
    cfg.transformer = t.config.clone();
    cfg.validate().unwrap();
    cfg
}

/// rudalle's ids → ours: its caption's 0 pads become the per-position pad ids (rudalle does the
/// same inside its forward), its raw image codes move to the image range.
fn our_ids(t: &rudalle::Transformer) -> Vec<i64> {
    let layout = dalle_runtimes::TokenLayout::from(&t.geometry);
    let ids = npy("input_ids.npy").to_dtype(DType::I64).unwrap();
    let (b, s) = ids.dims2().unwrap();
    let ids: Vec<i64> = ids.flatten_all().unwrap().to_vec1().unwrap();
    (0..b * s)
        .map(|i| {
            let (p, v) = (i % s, ids[i]);
            if p >= layout.text_len {
                layout.image(v as u32) as i64
            } else if v == 0 {
                layout.pad(p) as i64
            } else {
                v
            }
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    common::max_abs_diff(&v(a), &v(b))
}

#[test]
fn imported_transformer_gives_rudalles_logits_in_candle() {
    let t = imported();
    assert!(t.config.norms.sandwich && t.config.norms.head);
    assert_eq!((t.config.n_layers, t.config.d_model), (4, 64));
    assert_eq!(
        (
            t.geometry.text_vocab,
            t.geometry.text_len,
            t.geometry.grid,
            t.geometry.codebook
        ),
        (320, 16, 8, 32)
    );
    let cfg = config(&t);
    let vb = VarBuilder::from_tensors(t.weights.clone(), DType::F32, &Device::Cpu);
    let model = dalle::transformer::model::Transformer::new(&cfg, vb).unwrap();
    let ids = our_ids(&t);
    let s = model.seq_len();
    let ids = Tensor::from_vec(
        ids.iter().map(|&v| v as u32).collect::<Vec<_>>(),
        (2, s),
        &Device::Cpu,
    )
    .unwrap();
    // Teacher-forced: the whole sequence at once.
    let want = npy("logits.npy");
    let got = model.forward(&ids, None).unwrap();
    let d = max_diff(&got, &want);
    eprintln!("teacher-forced: max |ours − rudalle| {d:.2e}");
    assert!(d < LOGITS_TOL, "teacher-forced logits differ by {d}");
    // The caption as one prefill, then one image token a step (the native decoding step).
    let want = npy("cached_logits.npy"); // (2, grid² + 1, vocab)
    let text_len = t.geometry.text_len;
    let mut cache = dalle::transformer::model::KvCache::new(model.n_layers());
    let first = model
        .forward(&ids.narrow(1, 0, text_len).unwrap(), Some(&mut cache))
        .unwrap();
    let mut steps = vec![first.narrow(1, text_len - 1, 1).unwrap()];
    for p in text_len..s - 1 {
        steps.push(
            model
                .forward(&ids.narrow(1, p, 1).unwrap(), Some(&mut cache))
                .unwrap(),
        );
    }
    let got = Tensor::cat(&steps, 1).unwrap();
    let want = want.narrow(1, 0, s - text_len).unwrap();
    let d = max_diff(&got, &want);
    eprintln!("prefill + cached steps: max |ours − rudalle| {d:.2e}");
    assert!(d < LOGITS_TOL, "cached-step logits differ by {d}");
}

/// A `torch.save`-shaped zip whose `data.pkl` is `pickle`.
fn checkpoint_with(path: &Path, pickle: &[u8]) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", stored).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

fn read_err(path: &Path) -> String {
    torch::read(path, None).unwrap_err().to_string()
}

#[test]
fn a_checkpoint_that_would_run_code_is_refused_and_nothing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    // What `pickle.dumps` writes (protocol 2) for a state dict whose one entry's `__reduce__`
    // is `(os.system, ("touch MARKER",))`: unpickled by Python, it runs the command.
    let command = format!("touch {}", marker.display());
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x06\x00\x00\x00weightq\x02cposix\nsystem\nq\x03X".to_vec();
    p.extend_from_slice(&(command.len() as u32).to_le_bytes());
    p.extend_from_slice(command.as_bytes());
    p.extend_from_slice(b"q\x04\x85q\x05Rq\x06s.");
    let path = tmp.path().join("evil.pt");
    checkpoint_with(&path, &p);
    let e = read_err(&path);
    assert!(
        e.contains("posix.system") && e.contains("refused") && e.contains("evil.pt"),
        "{e}"
    );
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn damaged_and_foreign_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let real = std::fs::read(fixture("transformer.pt")).unwrap();
    // Cut in half: the zip's directory (at its end) is gone.
    let cut = tmp.path().join("cut.pt");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    let e = read_err(&cut);
    assert!(e.contains("damaged or truncated"), "{e}");
    // Not a checkpoint at all, and one in torch's legacy format.
    let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-tiny/grid.png");
    assert!(read_err(&png).contains("not a PyTorch checkpoint"));
    let legacy = tmp.path().join("legacy.pt");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    assert!(read_err(&legacy).contains("legacy"));
    // A state dict without ruDALL-E's tensors (an empty one).
    let empty = tmp.path().join("empty.pt");
    checkpoint_with(&empty, b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01.");
    let state = torch::read(&empty, None).unwrap();
    let e = rudalle::transformer(&empty, &state, options())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lacks `text_embeddings.weight`") && e.contains("not a ruDALL-E transformer"),
        "{e}"
    );
    // The real checkpoint with a head count that does not divide its width, and as v2.
    let path = fixture("transformer.pt");
    let state = torch::read(&path, None).unwrap();
    let heads = rudalle::Options {
        n_heads: Some(5),
        ..options()
    };
    let e = rudalle::transformer(&path, &state, heads)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not split into 5 heads"), "{e}");
    let v2 = rudalle::Options {
        version: rudalle::Version::V2,
        ..options()
    };
    let e = rudalle::transformer(&path, &state, v2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("v2") && e.contains("Emojich"), "{e}");
    // Six layers (layers 0–1 copied as 4–5): rudalle's last layer would attend by column.
    let mut six = torch::read(&path, None).unwrap();
    let copies: Vec<(String, Tensor)> = six
        .tensors
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("transformer.layers.")?;
            let (i, tail) = rest.split_once('.')?;
            let i: usize = i.parse().ok().filter(|&i| i < 2)?;
            Some((format!("transformer.layers.{}.{tail}", i + 4), v.clone()))
        })
        .collect();
    six.tensors.extend(copies);
    let e = rudalle::transformer(&path, &six, options())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("6 layers") && e.contains("column"), "{e}");
    // A tensor no part of the model has.
    let mut extra = torch::read(&path, None).unwrap();
    let w = extra.tensors["to_logits.1.bias"].clone();
    extra.tensors.insert("to_logits.2.bias".into(), w);
    let e = rudalle::transformer(&path, &extra, options())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`to_logits.2.bias`") && e.contains("variant"),
        "{e}"
    );
    // Unknown width without --heads.
    let e = rudalle::transformer(
        &path,
        &state,
        rudalle::Options {
            n_heads: None,
            ..options()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--heads"), "{e}");
}

/// `dalle import rudalle` on the fixtures: a model directory whose transformer gives rudalle's
/// logits (prefill and cached steps) and whose VQGAN graphs give rudalle's codes and pixels, on
/// every runtime; `dalle parity` passes and `dalle generate` writes an image.
#[test]
fn imported_model_directory_matches_rudalle_on_every_runtime() {
    let t = imported();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let o = import(&fixture("vqgan.ckpt"), &fixture("bpe.model"), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("\"sandwich\": true")
            && manifest.contains("\"vqgan\"")
            && !manifest.contains("\"dvae\""),
        "{manifest}"
    );
    let ids = our_ids(&t);
    let s = t.geometry.text_len + t.geometry.grid * t.geometry.grid;
    let text_len = t.geometry.text_len;
    let want = npy("cached_logits.npy"); // (2, grid² + 1, vocab)
    let vocab = want.dim(2).unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let at = |r: usize, j: usize| &want[(r * (s - text_len + 1) + j) * vocab..][..vocab];
    let images: Vec<f32> = npy("vqgan_images.npy")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let codes: Vec<i64> = npy("vqgan_codes.npy")
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let pixels: Vec<f32> = npy("vqgan_pixels.npy")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let teacher: Vec<f32> = npy("logits.npy").flatten_all().unwrap().to_vec1().unwrap();
    for kind in common::runtimes() {
        let g = dalle::runtime::open(&out, kind, &OpenOptions::default()).unwrap();
        let sess = g.session();
        // Teacher-forced: the whole sequence in one call.
        let mut c = KvCache::new(g.manifest(), 2);
        let full = sess.forward(&ids, 2, &mut c).unwrap();
        let d = common::max_abs_diff(&full, &teacher);
        eprintln!(
            "{}: teacher-forced max |ours − rudalle| {d:.2e}",
            kind.name()
        );
        assert!(
            d < LOGITS_TOL,
            "{}: teacher-forced logits differ by {d}",
            kind.name()
        );
        // The caption as one prefill, then one image token a step.
        let mut c = KvCache::new(g.manifest(), 2);
        let mut prefix = ids[..text_len].to_vec();
        prefix.extend(&ids[s..s + text_len]);
        let first = sess.forward(&prefix, 2, &mut c).unwrap();
        let mut worst = 0f32;
        for r in 0..2 {
            let last = &first[(r * text_len + text_len - 1) * vocab..][..vocab];
            worst = worst.max(common::max_abs_diff(last, at(r, 0)));
        }
        for p in text_len..s - 1 {
            let step = sess.forward(&[ids[p], ids[s + p]], 2, &mut c).unwrap();
            for r in 0..2 {
                let d = common::max_abs_diff(
                    &step[r * vocab..(r + 1) * vocab],
                    at(r, p - text_len + 1),
                );
                worst = worst.max(d);
            }
        }
        let name = kind.name();
        eprintln!("{name}: logits max |ours − rudalle| {worst:.2e}");
        assert!(worst < LOGITS_TOL, "{name}: logits differ by {worst}");
        assert_eq!(
            sess.encode(&images, 2).unwrap(),
            codes,
            "{name}: VQGAN codes"
        );
        let d = common::max_abs_diff(&sess.decode(&codes, 2).unwrap(), &pixels);
        eprintln!("{name}: VQGAN pixels max |ours − rudalle| {d:.2e}");
        assert!(d < 1e-4, "{name}: VQGAN pixels differ by {d}");
    }
    let o = dalle_cmd()
        .args(["parity", "--runtimes", "candle,tract"])
        .arg("--model")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = tmp.path().join("out.png");
    let o = dalle_cmd()
        .args([
            "generate",
            "--runtime",
            "tract",
            "--num-images",
            "1",
            "красный круг",
        ])
        .arg("--model")
        .arg(&out)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap();
    assert!(
        img.width() >= 64 && img.height() >= 64,
        "{}×{}",
        img.width(),
        img.height()
    );
    // The same command again does not replace the directory without --force.
    let o = import(&fixture("vqgan.ckpt"), &fixture("bpe.model"), &out);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--force"), "{e}");
    assert!(out.join("manifest.json").is_file());
}

/// The VQGAN and the transformer of different models, and the transformer given as the VQGAN,
/// are clear errors naming the file.
#[test]
fn mismatched_import_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |vqgan: &Path, tokenizer: &Path| {
        let o = import(vqgan, tokenizer, &tmp.path().join("model"));
        assert!(!o.status.success());
        assert!(!tmp.path().join("model").exists());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&fixture("transformer.pt"), &fixture("bpe.model"));
    assert!(
        e.contains("quantize.embed.weight") && e.contains("transformer.pt"),
        "{e}"
    );
    let e = run(&fixture("vqgan.ckpt"), &fixture("vqgan.ckpt"));
    assert!(e.contains("not a YouTokenToMe BPE model"), "{e}");
}

fn dalle_cmd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_dalle"))
}

/// `dalle import rudalle` of the fixture transformer with `vqgan` and `tokenizer` into `out`.
fn import(vqgan: &Path, tokenizer: &Path, out: &Path) -> std::process::Output {
    dalle_cmd()
        .args(["import", "rudalle", "--heads", "4"])
        .arg("--transformer")
        .arg(fixture("transformer.pt"))
        .arg("--vqgan")
        .arg(vqgan)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// The converted YouTokenToMe model gives YouTokenToMe's ids (rudalle's wrapper adds BOS 2 and
/// EOS 3) on 1,217 Russian and English captions, seen and unseen, with the white space, capitals
/// and unknown characters users type; `dalle`'s own encode path (what generation calls) is used.
#[test]
fn converted_youtokentome_model_gives_its_ids() {
    let tok = dalle::import::yttm::tokenizer(&fixture("bpe.model")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap())
            .unwrap();
    let captions = cases["captions"].as_array().unwrap();
    let ids = cases["ids"].as_array().unwrap();
    assert!(captions.len() >= 1000);
    let mut wrong = vec![];
    for (caption, want) in captions.iter().zip(ids) {
        let caption = caption.as_str().unwrap();
        let mut want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        want.insert(0, 2);
        want.push(3);
        let got = dalle_runtimes::tokenizer::encode(&tok, caption).unwrap();
        if got != want {
            wrong.push(format!("{caption:?}: ours {got:?}, YouTokenToMe {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} differ:\n{}",
        wrong.len(),
        captions.len(),
        wrong.join("\n")
    );
    // Saved and loaded as a model directory's tokenizer.json, it is the same.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    tok.save(&path, false).unwrap();
    let back = dalle_runtimes::tokenizer::load(&path).unwrap();
    let c = "Красный круг в центре";
    assert_eq!(
        dalle_runtimes::tokenizer::encode(&back, c).unwrap(),
        dalle_runtimes::tokenizer::encode(&tok, c).unwrap()
    );
}

#[test]
fn malformed_youtokentome_models_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let real = std::fs::read_to_string(fixture("bpe.model")).unwrap();
    let cases = [
        (
            "truncated",
            real[..real.len() / 2].to_string(),
            "truncated?",
        ),
        (
            "cut",
            real.lines().take(3).collect::<Vec<_>>().join("\n"),
            "ends before",
        ),
        (
            "json",
            "{\"model\": 1}".to_string(),
            "not a YouTokenToMe BPE model",
        ),
        (
            "forward",
            "1 1\n9601 4\n4 7 8\n1 0 2 3\n".to_string(),
            "before it is defined",
        ),
        ("nomark", "1 0\n97 4\n1 0 2 3\n".to_string(), "no word mark"),
    ];
    for (name, text, want) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let e = dalle::import::yttm::tokenizer(&p)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
    }
}

/// Sber's VQGAN rebuilt from its (Lightning, f16) checkpoint: rudalle's argmax codes of two
/// random images, and rudalle's pixels decoded from them.
#[test]
fn vqgan_gives_rudalles_codes_and_pixels_in_candle() {
    let state = torch::read(&fixture("vqgan.ckpt"), Some("state_dict")).unwrap();
    let vq = dalle::vae::vqgan::Vqgan::new(&state.tensors).unwrap();
    assert_eq!((vq.downsample(), vq.codebook()), (8, 32));
    let images = npy("vqgan_images.npy");
    let want: Vec<u32> = npy("vqgan_codes.npy")
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&c| c as u32)
        .collect();
    let codes = vq.encode(&images).unwrap();
    let got: Vec<u32> = codes.flatten_all().unwrap().to_vec1().unwrap();
    let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert_eq!(same, want.len(), "codes: ours {got:?}\nrudalle {want:?}");
    let pixels = vq.decode(&codes).unwrap();
    let d = max_diff(&pixels, &npy("vqgan_pixels.npy"));
    eprintln!("VQGAN decode: max |ours − rudalle| {d:.2e}");
    assert!(d < 1e-4, "decoded pixels differ by {d}");
}

/// A PyTorch Lightning checkpoint names its training metadata's classes (a callback as a dict
/// key): reading its `state_dict` accepts them, reading the file as a state dict does not.
#[test]
fn lightning_metadata_is_accepted_only_around_a_state_dict() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("lightning.ckpt");
    // {"state_dict": OrderedDict(), "callbacks": {ModelCheckpoint: {}}}, protocol 2.
    let mut p =
        b"\x80\x02}q\x00(X\x0a\x00\x00\x00state_dictq\x01ccollections\nOrderedDict\nq\x02)Rq\x03"
            .to_vec();
    p.extend_from_slice(b"X\x09\x00\x00\x00callbacksq\x04}q\x05");
    p.extend_from_slice(
        b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\nq\x06}q\x07su.",
    );
    checkpoint_with(&path, &p);
    let state = torch::read(&path, Some("state_dict")).unwrap();
    assert!(state.tensors.is_empty());
    let e = read_err(&path);
    assert!(
        e.contains("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        "{e}"
    );
    let e = torch::read(&path, Some("weights")).unwrap_err().to_string();
    assert!(e.contains("holds no `weights` entry"), "{e}");
}
