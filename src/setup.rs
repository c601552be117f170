//! `dalle setup ort` and `dalle setup blas`: shared libraries loaded at run time, from PyPI's
//! wheels (no registry crate ships them, and ort's own download host is unreachable from many
//! build machines): ONNX Runtime, and OpenBLAS for the training products.

use crate::{Error, Result};
use dalle_runtimes::ort::{LIBRARY, ORT_VERSION};
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        Error::Usage(format!(
            "{what}: cannot run {:?} ({e}); needs python3 with pip",
            cmd.get_program()
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(Error::Usage(format!("{what} failed: {last}")));
    }
    Ok(())
}

/// Download the `onnxruntime` (or `onnxruntime-gpu`) wheel and unpack `onnxruntime/capi/*.so*`
/// into `dir`. Returns the path of the main library.
pub fn ort(gpu: bool, dir: &Path) -> Result<PathBuf> {
    let package = if gpu {
        "onnxruntime-gpu"
    } else {
        "onnxruntime"
    };
    let spec = format!("{package}=={ORT_VERSION}");
    wheel_libraries(&spec, "onnxruntime/capi/lib", LIBRARY, dir)
}

/// Download the `scipy-openblas32` wheel (OpenBLAS built for every x86 kind, its symbols
/// prefixed `scipy_`) and unpack its library into `dir`. Returns the library's path.
pub fn blas(dir: &Path) -> Result<PathBuf> {
    use crate::kernels::blas::{OPENBLAS_LIBRARY, OPENBLAS_WHEEL};
    let lib = wheel_libraries(
        OPENBLAS_WHEEL,
        "scipy_openblas32/lib/lib",
        OPENBLAS_LIBRARY,
        dir,
    )?;
    // Loaded once here, so that a library this machine cannot run is reported now.
    crate::kernels::blas::Blas::load(&lib).map_err(Error::Usage)?;
    Ok(lib)
}

/// Download the wheel `spec` (`package==version`) with pip and unpack its shared libraries whose
/// member names start with `member_prefix` into `dir`, where `library` must then be.
fn wheel_libraries(spec: &str, member_prefix: &str, library: &str, dir: &Path) -> Result<PathBuf> {
    let package = spec.split("==").next().unwrap_or(spec);
    let tmp = dir.with_file_name(format!(
        ".{}-download-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("ort"),
        std::process::id()
    ));
    if dir.exists() && !dir.is_dir() {
        return Err(Error::input(
            dir,
            "is not a directory: choose a directory for the library with --dir",
        ));
    }
    // The directory itself first, so a place where it cannot be made is reported by its name
    // (not by the download's temporary sibling).
    std::fs::create_dir_all(dir).map_err(|e| Error::Input {
        path: dir.to_path_buf(),
        message: format!("cannot create the library directory ({e}); choose a writable --dir"),
    })?;
    std::fs::create_dir_all(&tmp).map_err(|e| Error::Input {
        path: dir.to_path_buf(),
        message: format!(
            "cannot create a download folder beside it ({e}); choose a --dir in a writable place"
        ),
    })?;
    let result = (|| {
        run(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--only-binary=:all:",
                ])
                .arg(spec)
                .arg("--dest")
                .arg(&tmp),
            &format!("pip download {spec}"),
        )?;
        let wheel = std::fs::read_dir(&tmp)
            .map_err(|e| Error::io(&tmp, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| Error::Usage(format!("pip left no wheel in {}", tmp.display())))?;
        let script = "import sys, zipfile, os\n\
            z = zipfile.ZipFile(sys.argv[1]); out = sys.argv[2]\n\
            for n in z.namelist():\n    \
                if n.startswith(sys.argv[3]) and '.so' in n:\n        \
                    open(os.path.join(out, os.path.basename(n)), 'wb').write(z.read(n))\n";
        let unpacked = tmp.join("lib");
        std::fs::create_dir_all(&unpacked).map_err(|e| Error::io(&unpacked, e))?;
        run(
            Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(&wheel)
                .arg(&unpacked)
                .arg(member_prefix),
            "unpacking the wheel",
        )?;
        if !unpacked.join(library).is_file() {
            return Err(Error::Usage(format!(
                "the {package} wheel holds no {library}"
            )));
        }
        // Only the library files are written into `dir`, each replaced by a rename; whatever else
        // the directory holds is the user's and stays as it is.
        if dir.exists() && !dir.is_dir() {
            return Err(Error::input(
                dir,
                "is not a directory: choose a directory for the library with --dir",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for entry in std::fs::read_dir(&unpacked).map_err(|e| Error::io(&unpacked, e))? {
            let from = entry.map_err(|e| Error::io(&unpacked, e))?.path();
            let Some(name) = from.file_name() else {
                continue;
            };
            let to = dir.join(name);
            if to.is_dir() {
                return Err(Error::input(
                    &to,
                    "is a directory where the library file goes: move it away or choose another --dir",
                ));
            }
            std::fs::rename(&from, &to)
                .or_else(|_| std::fs::copy(&from, &to).map(|_| ()))
                .map_err(|e| Error::io(&to, e))?;
        }
        Ok(dir.join(library))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
