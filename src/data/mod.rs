//! Datasets: procedural shapes, image folders and WebDataset shards, read as a stream of
//! (image, caption) pairs through the paper's filters. Bad samples are skipped and counted,
//! never fatal.

pub mod filters;
pub mod folder;
pub mod loader;
pub mod shapes;

use crate::{Error, Result};
use filters::Filters;
use image::RgbImage;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where a sample's image bytes live.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    /// A member of a WebDataset `.tar` shard: byte range of its data.
    Tar {
        shard: PathBuf,
        offset: u64,
        len: u64,
    },
}

/// One usable sample: a reference to its image and its caption.
#[derive(Clone, Debug)]
pub struct Sample {
    pub source: Source,
    pub text: String,
    /// The whole metadata line (image folders), e.g. the shapes scene.
    pub extra: Option<serde_json::Value>,
}

/// Counts of skipped samples by reason.
pub type Skips = BTreeMap<&'static str, usize>;

/// The usable samples of a dataset directory and what was skipped on the way.
#[derive(Debug)]
pub struct Index {
    pub root: PathBuf,
    pub samples: Vec<Sample>,
    pub seen: usize,
    pub skips: Skips,
}

/// The members of one WebDataset key: name, image (data offset, bytes), caption (`None` inside
/// when it is not UTF-8).
type ShardKey = (String, Option<(u64, Vec<u8>)>, Option<Option<String>>);

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Decode an image's header (format and size) without decoding its pixels.
fn header_dims(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

/// Decode a whole image, refusing anything over the pixel limit before allocating it.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> std::result::Result<RgbImage, &'static str> {
    if bytes.is_empty() {
        return Err("empty_file");
    }
    let (w, h) = header_dims(bytes).ok_or("undecodable")?;
    if w as u64 * h as u64 > max_pixels {
        return Err("oversized");
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| "undecodable")?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(4).max(1 << 20));
    reader.limits(limits);
    reader
        .decode()
        .map(|i| i.to_rgb8())
        .map_err(|_| "undecodable")
}

impl Index {
    /// Scan `dir`: `metadata.jsonl` (image folder) and/or `*.tar` shards (WebDataset), or one
    /// `.tar` file. With `full_decode`, every image is decoded (slower; finds corrupt bodies).
    pub fn scan(dir: &Path, filters: &Filters, full_decode: bool) -> Result<Index> {
        let err = |m: String| Error::Dataset {
            path: dir.to_path_buf(),
            message: m,
        };
        if !dir.exists() {
            return Err(err("does not exist".into()));
        }
        let mut idx = Index {
            root: dir.to_path_buf(),
            samples: vec![],
            seen: 0,
            skips: Skips::new(),
        };
        let mut shards = vec![];
        if dir.is_file() {
            if dir.extension().is_none_or(|x| x != "tar") {
                return Err(err(
                    "is a file, not a data set: pass a directory (metadata.jsonl with file_name \
                     and text, or WebDataset .tar shards) or one .tar shard"
                        .into(),
                ));
            }
            shards.push(dir.to_path_buf());
        } else {
            let meta = dir.join("metadata.jsonl");
            if meta.exists() {
                idx.scan_folder(&meta, filters, full_decode)?;
            }
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            shards.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "tar")),
            );
            shards.sort();
            if !meta.exists() && shards.is_empty() {
                return Err(err(
                    "has no metadata.jsonl and no .tar shards: expected an image folder (metadata.jsonl with \
                     file_name and text) or WebDataset shards (KEY.jpg + KEY.txt); `dalle data shapes` writes one"
                        .into(),
                ));
            }
        }
        for shard in shards {
            idx.scan_shard(&shard, filters, full_decode);
        }
        Ok(idx)
    }

    fn skip(&mut self, reason: &'static str) {
        *self.skips.entry(reason).or_default() += 1;
    }

    /// Apply the caption and image filters to one candidate; returns whether it was kept.
    fn admit(&mut self, text: &str, bytes: &[u8], filters: &Filters, full_decode: bool) -> bool {
        if let Some(r) = filters.check_caption(text) {
            self.skip(r);
            return false;
        }
        if bytes.is_empty() {
            self.skip("empty_file");
            return false;
        }
        let Some((w, h)) = header_dims(bytes) else {
            self.skip("undecodable");
            return false;
        };
        if let Some(r) = filters.check_dims(w, h) {
            self.skip(r);
            return false;
        }
        if full_decode {
            if let Err(r) = decode_rgb(bytes, filters.max_pixels) {
                self.skip(r);
                return false;
            }
        }
        true
    }

    fn scan_folder(&mut self, meta: &Path, filters: &Filters, full_decode: bool) -> Result<()> {
        let bytes = std::fs::read(meta).map_err(|e| Error::io(meta, e))?;
        let base = meta.parent().unwrap_or(Path::new("."));
        let mut warned = 0;
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            self.seen += 1;
            let (file_name, text, extra) = match folder::parse_line(line) {
                folder::MetaLine::Entry {
                    file_name,
                    text,
                    extra,
                } => (file_name, text, extra),
                folder::MetaLine::NotUtf8 => {
                    self.skip("caption_not_utf8");
                    continue;
                }
                folder::MetaLine::Bad(why) => {
                    if warned < 5 {
                        eprintln!("warning: {}:{}: skipped: {why}", meta.display(), n + 1);
                        warned += 1;
                    }
                    self.skip("bad_metadata_line");
                    continue;
                }
            };
            let path = base.join(&file_name);
            // Reading the whole file is as cheap as its header for the sizes we accept, and a
            // header check alone does not see a zero-byte file.
            let data = match std::fs::metadata(&path) {
                Ok(m) if m.len() > filters.max_pixels * 4 + (1 << 20) => {
                    self.skip("oversized");
                    continue;
                }
                Ok(_) => match std::fs::read(&path) {
                    Ok(d) => d,
                    Err(_) => {
                        self.skip("missing_file");
                        continue;
                    }
                },
                Err(_) => {
                    self.skip("missing_file");
                    continue;
                }
            };
            if self.admit(&text, &data, filters, full_decode) {
                self.samples.push(Sample {
                    source: Source::File(path),
                    text,
                    extra: Some(extra),
                });
            }
        }
        Ok(())
    }

    /// Read one shard; a shard that is not a tar, or ends early, is counted, never fatal.
    fn scan_shard(&mut self, shard: &Path, filters: &Filters, full_decode: bool) {
        let Ok(file) = std::fs::File::open(shard) else {
            self.skip("unreadable_shard");
            return;
        };
        let mut archive = tar::Archive::new(file);
        let Ok(entries) = archive.entries() else {
            self.skip("unreadable_shard");
            return;
        };
        // img2dataset writes the members of one key next to each other.
        let mut pending: Option<ShardKey> = None;
        for entry in entries {
            let Ok(mut entry) = entry else {
                self.skip("corrupt_shard");
                break;
            };
            let Ok(path) = entry.path().map(|p| p.to_string_lossy().into_owned()) else {
                continue;
            };
            let (dir, file) = path
                .rsplit_once('/')
                .map_or(("", path.as_str()), |(d, f)| (d, f));
            let Some((stem, ext)) = file.split_once('.') else {
                continue;
            };
            let key = format!("{dir}/{stem}");
            if pending.as_ref().is_some_and(|p| p.0 != key) {
                // A key is whole once the next begins: admit it now, so a shard's images are
                // never all in memory at once.
                if let Some(done) = pending.take() {
                    self.admit_shard_key(shard, done, filters, full_decode);
                }
            }
            let slot = pending.get_or_insert_with(|| (key.clone(), None, None));
            let ext = ext.to_ascii_lowercase();
            let offset = entry.raw_file_position();
            let mut data = vec![];
            if entry.read_to_end(&mut data).is_err() {
                self.skip("corrupt_shard");
                break;
            }
            if IMAGE_EXTS.contains(&ext.as_str()) {
                slot.1 = Some((offset, data));
            } else if ext == "txt" {
                slot.2 = Some(String::from_utf8(data).ok());
            }
        }
        if let Some(done) = pending {
            self.admit_shard_key(shard, done, filters, full_decode);
        }
    }

    /// Count one shard key (its image and caption) as seen, and admit it or record why not.
    fn admit_shard_key(
        &mut self,
        shard: &Path,
        key: ShardKey,
        filters: &Filters,
        full_decode: bool,
    ) {
        let (_, image, text) = key;
        self.seen += 1;
        let text = match text {
            None => {
                self.skip("caption_missing");
                return;
            }
            Some(None) => {
                self.skip("caption_not_utf8");
                return;
            }
            Some(Some(t)) => t,
        };
        let Some((offset, data)) = image else {
            self.skip("image_missing");
            return;
        };
        if self.admit(&text, &data, filters, full_decode) {
            let source = Source::Tar {
                shard: shard.to_path_buf(),
                offset,
                len: data.len() as u64,
            };
            self.samples.push(Sample {
                source,
                text: text.trim().to_string(),
                extra: None,
            });
        }
    }

    /// Total skipped samples.
    pub fn skipped(&self) -> usize {
        self.skips.values().sum()
    }

    /// The `dalle data stats` report.
    pub fn report(&self) -> String {
        let mut s = format!(
            "dataset {}: {} seen, {} usable, {} skipped\n",
            self.root.display(),
            self.seen,
            self.samples.len(),
            self.skipped()
        );
        for (reason, n) in &self.skips {
            s.push_str(&format!("  {reason:<20} {n}\n"));
        }
        s
    }
}

/// Read a sample's image bytes.
pub fn read_bytes(source: &Source) -> std::io::Result<Vec<u8>> {
    match source {
        Source::File(p) => std::fs::read(p),
        Source::Tar { shard, offset, len } => {
            let mut f = std::fs::File::open(shard)?;
            f.seek(SeekFrom::Start(*offset))?;
            let mut buf = vec![0; *len as usize];
            f.read_exact(&mut buf)?;
            Ok(buf)
        }
    }
}

/// Resize so the shorter side is `size` (Lanczos-free triangle filter: fast and adequate for
/// downscaling photos and exact for the shapes set at its native size).
pub fn resize_short_side(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w.min(h) == size {
        return img.clone();
    }
    let (nw, nh) = if w <= h {
        (
            size,
            ((h as u64 * size as u64 + w as u64 / 2) / w as u64).max(size as u64) as u32,
        )
    } else {
        (
            ((w as u64 * size as u64 + h as u64 / 2) / h as u64).max(size as u64) as u32,
            size,
        )
    };
    image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle)
}

/// Crop a `size`×`size` window; `offset` ∈ [0, 1] places it along the longer side (0.5 = centre).
pub fn crop_square(img: &RgbImage, size: u32, offset: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let x = ((w - size.min(w)) as f64 * offset).round() as u32;
    let y = ((h - size.min(h)) as f64 * offset).round() as u32;
    image::imageops::crop_imm(img, x, y, size.min(w), size.min(h)).to_image()
}

/// Load an image file from disk as a square `size` RGB image (centre crop), for the tools.
pub fn load_square(path: &Path, size: u32) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = decode_rgb(&bytes, filters::DEFAULT_MAX_PIXELS).map_err(|why| {
        Error::input(
            path,
            format!("cannot use this image ({})", why.replace('_', " ")),
        )
    })?;
    if img.dimensions() != (size, size) {
        eprintln!(
            "warning: {} is {}×{}; resizing and centre-cropping to {size}×{size}",
            path.display(),
            img.width(),
            img.height()
        );
    }
    Ok(crop_square(&resize_short_side(&img, size), size, 0.5))
}

/// RGB images → (n, 3, H, W) f32 in [0, 1].
pub fn images_to_tensor(
    images: &[RgbImage],
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let plane = (w * h) as usize;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (i, img) in images.iter().enumerate() {
        for (p, px) in img.pixels().enumerate() {
            for c in 0..3 {
                data[(i * 3 + c) * plane + p] = px[c] as f32 / 255.0;
            }
        }
    }
    Ok(candle_core::Tensor::from_vec(
        data,
        (images.len(), 3, h as usize, w as usize),
        device,
    )?)
}
