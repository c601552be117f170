//! File writes that never leave a half-written file behind.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The temporary sibling that `write_atomic` writes before renaming.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Run `write` against a temporary path beside `path`, then rename it into place.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(path, e))
    })
}

/// Create `dir` (and parents) and prove it is writable, with an error that says what to do.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Input {
        path: dir.to_path_buf(),
        message: format!("cannot create output directory ({e}); choose a writable --out"),
    })?;
    let probe = dir.join(".dalle-write-test");
    std::fs::write(&probe, b"").map_err(|e| Error::Input {
        path: dir.to_path_buf(),
        message: format!("output directory is not writable ({e}); choose a writable --out"),
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
