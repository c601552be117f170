//! File writes that never leave a half-written file behind.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The temporary sibling that `write_atomic` writes before renaming: unique per process and call,
/// so two writers of one path never write into each other's file.
fn temp_sibling(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}-{n}.partial", std::process::id()))
}

/// Run `write` against a temporary path beside `path`, then rename it into place. Only a regular
/// file (or nothing) at `path` is ever replaced: a directory, symlink, device, FIFO or socket
/// there is refused before anything is written.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    refuse_non_regular(path)?;
    let tmp = temp_sibling(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// An error when something other than a regular file is at `path` (a directory, symlink,
/// device, FIFO or socket): what [`write_atomic`] refuses to replace. Check an output path
/// with it before a long computation.
pub fn refuse_non_regular(path: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let kind = meta.file_type();
        if !kind.is_file() {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file (a device, FIFO or socket)"
            };
            return Err(Error::input(
                path,
                format!("is {what}; dalle only replaces regular files: choose another output path"),
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_regular_files_and_refuses_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.png");
        std::fs::write(&file, b"old").unwrap();
        write_bytes_atomic(&file, b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");

        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"the user's").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        for (path, what) in [(&link, "symbolic link"), (&sub, "directory")] {
            let e = write_bytes_atomic(path, b"x").unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("another output path"), "{e}");
        }
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"the user's");
        // Nothing is left behind, and temporary names never repeat.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_ne!(temp_sibling(&file), temp_sibling(&file));
    }
}
