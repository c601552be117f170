//! Datasets: the shapes generator's splits and determinism, both readers, the filters, and bad
//! input counted as skips.

use dalle::data::filters::Filters;
use dalle::data::shapes::{generate_one, is_held_out, Split, HELD_OUT};
use dalle::data::Index;
use std::path::Path;

#[test]
fn heldout_split_holds_only_heldout_combinations_and_train_none() {
    let n = 1500;
    let mut hits = vec![0usize; HELD_OUT.len()];
    for i in 0..n {
        let t = generate_one(11, Split::Train, i, 32);
        assert!(
            !is_held_out(&t.scene),
            "train sample {i} is held out: {:?}",
            t.scene
        );
        let h = generate_one(11, Split::Heldout, i, 32);
        assert!(
            is_held_out(&h.scene),
            "heldout sample {i} is not: {:?}",
            h.scene
        );
        for (k, combo) in HELD_OUT.iter().enumerate() {
            hits[k] += combo.matches(&h.scene) as usize;
        }
    }
    // Every held-out combination is represented.
    assert!(hits.iter().all(|&h| h > 20), "{hits:?}");
}

#[test]
fn generation_is_deterministic_by_seed() {
    let a = generate_one(5, Split::Train, 42, 64);
    let b = generate_one(5, Split::Train, 42, 64);
    let c = generate_one(6, Split::Train, 42, 64);
    assert_eq!(a.caption, b.caption);
    assert_eq!(a.image, b.image);
    assert!(a.caption != c.caption || a.image != c.image);
}

#[test]
fn every_generated_caption_passes_the_paper_filters() {
    let f = Filters::default();
    for i in 0..2000 {
        for split in [Split::Train, Split::Heldout] {
            let s = generate_one(1, split, i, 16);
            assert_eq!(f.check_caption(&s.caption), None, "{}", s.caption);
        }
    }
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid PNG header declaring a 30000×30000 RGB image, with almost no pixel data.
fn bomb_png() -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(30_000u32.to_be_bytes());
    ihdr.extend(30_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    // An empty zlib stream as the only IDAT: decoders read the header up to here.
    let mut idat = b"IDAT".to_vec();
    idat.extend([0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png.extend(8u32.to_be_bytes());
    png.extend(&idat);
    png.extend(crc32(&idat).to_be_bytes());
    png.extend(0u32.to_be_bytes());
    png.extend(b"IEND");
    png.extend(crc32(b"IEND").to_be_bytes());
    png
}

fn write_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let good = png_bytes(40, 40);
    std::fs::write(dir.join("good1.png"), &good).unwrap();
    std::fs::write(dir.join("good2.png"), &good).unwrap();
    std::fs::write(dir.join("wide.png"), png_bytes(90, 40)).unwrap();
    std::fs::write(dir.join("zero.png"), b"").unwrap();
    let mut corrupt = good.clone();
    corrupt.truncate(good.len() / 2 + 10);
    let mid = corrupt.len() - 20;
    corrupt[mid..].iter_mut().for_each(|b| *b ^= 0x5A);
    std::fs::write(dir.join("corrupt.png"), corrupt).unwrap();
    std::fs::write(dir.join("bomb.png"), bomb_png()).unwrap();
    let mut meta = String::new();
    for (f, t) in [
        ("good1.png", "a green square on grey"),
        ("good2.png", "another green square"),
        ("wide.png", "a very wide image of a square"),
        ("zero.png", "an empty file with a caption"),
        ("corrupt.png", "a corrupt image of a square"),
        ("bomb.png", "a decompression bomb of a square"),
        ("good1.png", "x"),
        ("good1.png", "photographed on 2020-01-02 by someone"),
        ("missing.png", "a file that is not there"),
    ] {
        meta.push_str(&serde_json::json!({ "file_name": f, "text": t }).to_string());
        meta.push('\n');
    }
    meta.push_str("{not json\n");
    let mut bytes = meta.into_bytes();
    bytes.extend(b"{\"file_name\": \"good1.png\", \"text\": \"caf\xe9 au lait\"}\n");
    std::fs::write(dir.join("metadata.jsonl"), bytes).unwrap();
}

fn count(idx: &Index, reason: &str) -> usize {
    idx.skips.get(reason).copied().unwrap_or(0)
}

#[test]
fn image_folder_reader_counts_every_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    let idx = Index::scan(tmp.path(), &Filters::default(), true).unwrap();
    assert_eq!(idx.seen, 11);
    assert_eq!(idx.samples.len(), 2, "{}", idx.report());
    assert_eq!(count(&idx, "aspect_ratio"), 1);
    assert_eq!(count(&idx, "empty_file"), 1);
    assert_eq!(count(&idx, "undecodable"), 1);
    assert_eq!(count(&idx, "oversized"), 1);
    assert_eq!(count(&idx, "caption_too_short"), 1);
    assert_eq!(count(&idx, "boilerplate"), 1);
    assert_eq!(count(&idx, "missing_file"), 1);
    assert_eq!(count(&idx, "bad_metadata_line"), 1);
    assert_eq!(count(&idx, "caption_not_utf8"), 1);
    // Without full decoding the corrupt body is only found when loaded; the loader skips it.
    let quick = Index::scan(tmp.path(), &Filters::default(), false).unwrap();
    assert_eq!(quick.samples.len(), 3);
    let loader =
        dalle::data::loader::Loader::new(quick, 32, dalle::data::filters::DEFAULT_MAX_PIXELS, 0)
            .unwrap();
    let (ids, images) = loader.batch(0, 6).unwrap();
    assert_eq!(images.len(), 6);
    assert!(images.iter().all(|i| i.dimensions() == (32, 32)));
    assert!(ids.iter().all(|&i| loader.image(i).is_some()));
}

fn append(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
}

#[test]
fn webdataset_shards_are_read_by_key_with_bad_members_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(vec![]);
    append(&mut b, "00000/000000001.jpg", &png_bytes(48, 40)); // content sniffed, not the extension
    append(
        &mut b,
        "00000/000000001.txt",
        b"a green square on a grey field",
    );
    append(&mut b, "00000/000000001.json", b"{}");
    append(&mut b, "00000/000000002.png", &png_bytes(40, 40));
    append(&mut b, "00000/000000002.txt", b"caf\xe9 cr\xe8me");
    append(&mut b, "00000/000000003.png", &png_bytes(40, 40));
    append(
        &mut b,
        "00000/000000004.txt",
        b"a caption without its image",
    );
    append(&mut b, "00000/000000005.webp", b"");
    append(&mut b, "00000/000000005.txt", b"an empty image file here");
    append(&mut b, "00000/000000006.png", &bomb_png());
    append(&mut b, "00000/000000006.txt", b"a declared giant image");
    std::fs::write(tmp.path().join("00000.tar"), b.into_inner().unwrap()).unwrap();
    // A shard that is not a tar at all.
    std::fs::write(tmp.path().join("00001.tar"), b"this is not a tar file").unwrap();

    let idx = Index::scan(tmp.path(), &Filters::default(), true).unwrap();
    assert_eq!(idx.samples.len(), 1, "{}", idx.report());
    assert_eq!(idx.samples[0].text, "a green square on a grey field");
    assert_eq!(count(&idx, "caption_not_utf8"), 1);
    assert_eq!(count(&idx, "caption_missing"), 1);
    assert_eq!(count(&idx, "image_missing"), 1);
    assert_eq!(count(&idx, "empty_file"), 1);
    assert_eq!(count(&idx, "oversized"), 1);
    // Random access into the shard returns the member's bytes.
    let bytes = dalle::data::read_bytes(&idx.samples[0].source).unwrap();
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 48);
}

#[test]
fn missing_and_empty_directories_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Index::scan(&tmp.path().join("nope"), &Filters::default(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    let e = Index::scan(tmp.path(), &Filters::default(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no metadata.jsonl"), "{e}");
    // A directory whose samples are all filtered out is an error for training.
    std::fs::write(
        tmp.path().join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"a b c\"}\n",
    )
    .unwrap();
    let idx = Index::scan(tmp.path(), &Filters::default(), false).unwrap();
    let e = dalle::data::loader::Loader::new(idx, 32, 1 << 20, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no usable samples") && e.contains("missing_file 1"),
        "{e}"
    );
}
