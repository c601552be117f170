//! `dalle setup`: install what a runtime needs at run time.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum SetupCommand {
    /// Fetch the ONNX Runtime 1.31.1 library (the `onnxruntime` wheel, or `onnxruntime-gpu` with
    /// --gpu) with pip and unpack its shared libraries into the cache directory.
    Ort {
        #[arg(long)]
        gpu: bool,
        /// Unpack here instead of the cache directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Fetch OpenBLAS (the `scipy-openblas32` wheel, built for every x86 kind) with pip and unpack
    /// it into the cache directory; training then runs its matrix products on it (DALLE_BLAS
    /// chooses another library, or `off`).
    Blas {
        /// Unpack here instead of the cache directory (then point DALLE_BLAS at the library).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(cmd: SetupCommand) -> Result<()> {
    match cmd {
        SetupCommand::Ort { gpu, dir } => {
            let dir = dir.unwrap_or_else(|| dalle_runtimes::ort::library_dir(gpu));
            let lib = dalle::setup::ort(gpu, &dir)?;
            println!(
                "ONNX Runtime {} ready: {}",
                dalle_runtimes::ort::ORT_VERSION,
                lib.display()
            );
            if std::env::var_os("ORT_DYLIB_PATH").is_some() {
                eprintln!("note: ORT_DYLIB_PATH is set and takes precedence over this directory");
            }
        }
        SetupCommand::Blas { dir } => {
            let default = dalle::kernels::blas::library_dir();
            let lib = dalle::setup::blas(dir.as_deref().unwrap_or(&default))?;
            println!("OpenBLAS ready: {}", lib.display());
            if dir.is_some_and(|d| d != default) {
                eprintln!(
                    "note: outside the cache directory it is used only with DALLE_BLAS={}",
                    lib.display()
                );
            } else if std::env::var_os("DALLE_BLAS").is_some_and(|v| !v.is_empty()) {
                eprintln!("note: DALLE_BLAS is set and takes precedence over this directory");
            }
        }
    }
    Ok(())
}
