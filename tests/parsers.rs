//! Property tests of every parser user input reaches: manifest.json, token files, metadata.jsonl
//! lines, tar shards, prompts through the tokenizer and caption layout, and safetensors files.
//! Each gets `DALLE_FUZZ_CASES` (default 10,000) inputs: valid seeds mutated (bytes flipped,
//! inserted, deleted, duplicated, numbers replaced by extreme ones, truncated) or pure noise. A
//! parser may refuse an input, never panic; and the process's peak memory stays bounded.

use dalle::rng::Rng;
use std::path::Path;

fn cases() -> usize {
    std::env::var("DALLE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Numbers a mutation may put where a number was.
const EXTREMES: [&str; 10] = [
    "0",
    "-1",
    "1e308",
    "-0.0",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "99999999999999999999999",
    "NaN",
    "2147483648",
];

/// One mutation of `seed` (or, one time in sixteen, noise).
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    if rng.below(16) == 0 {
        let n = rng.below(600);
        return (0..n).map(|_| rng.below(256) as u8).collect();
    }
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len().max(1);
        match rng.below(7) {
            0 => {
                let i = rng.below(len);
                if i < v.len() {
                    v[i] = rng.below(256) as u8;
                }
            }
            1 => {
                let i = rng.below(len + 1).min(v.len());
                let bytes: Vec<u8> = (0..1 + rng.below(8))
                    .map(|_| rng.below(256) as u8)
                    .collect();
                v.splice(i..i, bytes);
            }
            2 => {
                let i = rng.below(len).min(v.len());
                let j = (i + 1 + rng.below(32)).min(v.len());
                v.drain(i..j);
            }
            3 => v.truncate(rng.below(len)),
            4 => {
                let i = rng.below(len).min(v.len());
                let j = (i + 1 + rng.below(64)).min(v.len());
                let copy = v[i..j].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, copy);
            }
            5 => {
                // Replace the digits around a random position by an extreme number.
                let i = rng.below(len).min(v.len().saturating_sub(1));
                if v.get(i).is_some_and(u8::is_ascii_digit) {
                    let (mut a, mut b) = (i, i);
                    while a > 0 && v[a - 1].is_ascii_digit() {
                        a -= 1;
                    }
                    while b < v.len() && v[b].is_ascii_digit() {
                        b += 1;
                    }
                    let n = EXTREMES[rng.below(EXTREMES.len())].as_bytes().to_vec();
                    v.splice(a..b, n);
                }
            }
            _ => {
                // Swap two bytes.
                if v.len() >= 2 {
                    let (i, j) = (rng.below(v.len()), rng.below(v.len()));
                    v.swap(i, j);
                }
            }
        }
    }
    v
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The peak resident memory of this test process stays under 1 GiB: no input made a parser
/// allocate what its header claimed.
fn assert_bounded_memory() {
    if let Some(peak) = dalle::util::peak_rss_bytes() {
        assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
    }
}

#[test]
fn manifests_are_parsed_or_refused() {
    let seed = std::fs::read(repo("models/shapes-tiny/manifest.json")).unwrap();
    let path = Path::new("manifest.json");
    let mut rng = Rng::new(1);
    let mut parsed = 0;
    for _ in 0..cases() {
        let text = String::from_utf8_lossy(&mutate(&seed, &mut rng)).into_owned();
        if let Ok(m) = dalle_runtimes::Manifest::parse(&text, path) {
            parsed += 1;
            // What the runtimes compute from a manifest must not overflow either.
            let _ = (m.token_layout().vocab_size(), m.max_seq());
            let _ = dalle_runtimes::KvCache::new(&m, 1);
        }
    }
    assert!(
        parsed > 0,
        "no mutation left a valid manifest: the seed is wrong"
    );
    assert_bounded_memory();
}

#[test]
fn token_files_are_parsed_or_refused() {
    let seeds: [&[u8]; 3] = [
        br#"{"grid": 2, "tokens": [[1, 2], [3, 4]]}"#,
        br#"{"grid": 2, "prompt": "a red circle", "images": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]}"#,
        b"[1, 2, 3, 4]",
    ];
    let mut rng = Rng::new(2);
    for i in 0..cases() {
        let text = String::from_utf8_lossy(&mutate(seeds[i % 3], &mut rng)).into_owned();
        let _ = dalle::vae::io::parse_token_file(&text, Path::new("tokens.json"));
    }
    assert_bounded_memory();
}

#[test]
fn metadata_lines_are_parsed_or_refused() {
    let seeds: [&[u8]; 3] = [
        br#"{"file_name": "000000.png", "text": "a red circle", "scene": {"kind": "single"}}"#,
        br#"{"file_name": "a/b.jpg", "text": "caf\u00e9 \ud83d\ude00"}"#,
        br#"{"file_name": "../../etc/passwd", "text": ""}"#,
    ];
    let mut rng = Rng::new(3);
    for i in 0..cases() {
        let _ = dalle::data::folder::parse_line(&mutate(seeds[i % 3], &mut rng));
    }
    assert_bounded_memory();
}

/// A small valid shard: two samples, one with a path that climbs out of the shard.
fn seed_shard() -> Vec<u8> {
    let mut png = vec![];
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut builder = tar::Builder::new(vec![]);
    for (name, data) in [
        ("000.png", png.as_slice()),
        ("000.txt", b"a red square".as_slice()),
        ("../up/001.png", png.as_slice()),
        ("../up/001.txt", b"a blue circle on grey".as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append_data(&mut h, name, data).unwrap_or_else(|_| {
            // The tar crate refuses `..` in names it writes; write that entry's name raw.
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append(&h, data).unwrap();
        });
    }
    builder.into_inner().unwrap()
}

#[test]
fn tar_shards_are_scanned_or_refused() {
    let seed = seed_shard();
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard.tar");
    std::fs::write(&shard, &seed).unwrap();
    let filters = dalle::data::filters::Filters::default();
    let whole = dalle::data::Index::scan(&shard, &filters, true).unwrap();
    assert_eq!(whole.samples.len(), 2, "{}", whole.report());
    let mut rng = Rng::new(4);
    for _ in 0..cases() {
        std::fs::write(&shard, mutate(&seed, &mut rng)).unwrap();
        let _ = dalle::data::Index::scan(&shard, &filters, true);
    }
    assert_bounded_memory();
}

#[test]
fn prompts_are_tokenized_and_laid_out() {
    let tok = tokenizers::Tokenizer::from_file(repo("models/shapes-tiny/tokenizer.json")).unwrap();
    let m = dalle_runtimes::Manifest::load(&repo("models/shapes-tiny")).unwrap();
    let layout = m.token_layout();
    let mut rng = Rng::new(5);
    let ranges: [(u32, u32); 6] = [
        (0x20, 0x7f),       // ASCII
        (0x00, 0x20),       // control characters
        (0x300, 0x370),     // combining marks
        (0x4e00, 0x4f00),   // CJK
        (0x1f600, 0x1f650), // emoji
        (0xe000, 0xf900),   // private use
    ];
    for _ in 0..cases() {
        let n = if rng.below(50) == 0 {
            2000
        } else {
            rng.below(80)
        };
        let prompt: String = (0..n)
            .filter_map(|_| {
                let (lo, hi) = ranges[rng.below(ranges.len())];
                char::from_u32(lo + rng.below((hi - lo) as usize) as u32)
            })
            .collect();
        let ids = dalle::text::encode(&tok, &prompt).unwrap();
        let (caption, truncated) = layout.caption(&ids).expect("the tokenizer's ids fit");
        assert_eq!(caption.len(), layout.text_len);
        assert_eq!(truncated, ids.len() > layout.text_len);
    }
    assert_bounded_memory();
}

#[test]
fn safetensors_files_are_read_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let t = candle_core::Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
    let u = candle_core::Tensor::new(&[7u8, 8, 9], &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w".to_string(), t), ("b".to_string(), u)]),
        &path,
    )
    .unwrap();
    let seed = std::fs::read(&path).unwrap();
    assert_eq!(
        dalle::vae::io::read_f32(&path, &candle_core::Device::Cpu)
            .unwrap()
            .len(),
        2
    );
    let mut rng = Rng::new(6);
    for i in 0..cases() {
        let mut bytes = mutate(&seed, &mut rng);
        if i % 10 == 0 && bytes.len() >= 8 {
            // A header length far beyond the file.
            bytes[..8].copy_from_slice(&(rng.next_u64() >> rng.below(64)).to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let _ = dalle::vae::io::read_f32(&path, &candle_core::Device::Cpu);
    }
    assert_bounded_memory();
}
