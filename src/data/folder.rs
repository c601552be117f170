//! The image-folder format (`metadata.jsonl` with `file_name` and `text`, the Hugging Face
//! imagefolder convention): a writer for generated sets and the line parser of the reader.

use crate::fsutil::write_bytes_atomic;
use crate::{Error, Result};
use image::RgbImage;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes PNGs and appends their metadata lines; `finish` publishes `metadata.jsonl` atomically.
pub struct FolderWriter {
    dir: PathBuf,
    lines: Vec<u8>,
}

impl FolderWriter {
    /// A writer into `dir`, created if missing. A `dir` that already holds anything is refused
    /// unless `replace`: the set's `metadata.jsonl` and same-named images would replace what is there.
    pub fn create(dir: &Path, replace: bool) -> Result<Self> {
        if !replace {
            if let Ok(mut entries) = std::fs::read_dir(dir) {
                if let Some(Ok(first)) = entries.next() {
                    return Err(Error::input(
                        dir,
                        format!(
                            "the output directory is not empty (it holds {:?}); writing a set \
                             here would replace its metadata.jsonl and same-named images: choose \
                             a new or empty --out, or pass --force to replace them",
                            first.file_name()
                        ),
                    ));
                }
            }
        }
        crate::fsutil::ensure_writable_dir(dir)?;
        Ok(FolderWriter {
            dir: dir.to_path_buf(),
            lines: vec![],
        })
    }

    /// Save `image` as `file_name` without a metadata line of its own (an image another line
    /// names, e.g. a negative).
    pub fn add_image(&mut self, file_name: &str, image: &RgbImage) -> Result<()> {
        let path = self.dir.join(file_name);
        image
            .save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| Error::input(&path, format!("cannot write image: {e}")))
    }

    /// Save `image` as `file_name` and record its caption and any extra fields.
    pub fn add(
        &mut self,
        file_name: &str,
        image: &RgbImage,
        text: &str,
        extra: serde_json::Value,
    ) -> Result<()> {
        self.add_image(file_name, image)?;
        let path = self.dir.join(file_name);
        let mut line = serde_json::json!({ "file_name": file_name, "text": text });
        if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
            obj.extend(extra);
        }
        serde_json::to_writer(&mut self.lines, &line)
            .map_err(|e| Error::input(&path, e.to_string()))?;
        let _ = self.lines.write_all(b"\n");
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        write_bytes_atomic(&self.dir.join("metadata.jsonl"), &self.lines)
    }
}

/// One parsed metadata line.
pub enum MetaLine {
    Entry {
        file_name: String,
        text: String,
        extra: serde_json::Value,
    },
    /// The line is not UTF-8.
    NotUtf8,
    /// The line is not a JSON object with string `file_name` and `text`; the message says why.
    Bad(String),
}

pub fn parse_line(bytes: &[u8]) -> MetaLine {
    let Ok(line) = std::str::from_utf8(bytes) else {
        return MetaLine::NotUtf8;
    };
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return MetaLine::Bad(format!("not JSON ({e})")),
    };
    let get = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
    match (get("file_name"), get("text")) {
        (Some(file_name), Some(text)) => MetaLine::Entry {
            file_name,
            text,
            extra: value,
        },
        (None, _) => MetaLine::Bad("no string `file_name`".into()),
        (_, None) => MetaLine::Bad("no string `text`".into()),
    }
}
