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
    }
    Ok(())
}
