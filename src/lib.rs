//! `dalle`: DALL·E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation") in Rust.
//!
//! Stage 1 is the discrete VAE ([`vae`]), trained natively in Candle on data read by [`data`];
//! the shared training skeleton is [`train`]; model presets live in [`config`].

pub mod bench;
pub mod config;
pub mod data;
mod error;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod import;
pub mod kernels;
pub mod parity;
pub mod plot;
pub mod runtime;
pub mod serve;
pub mod setup;
pub use dalle_runtimes::rng;
pub mod text;
pub mod train;
pub mod transformer;
pub mod util;
pub mod vae;

pub use config::Config;
pub use error::{Error, Result};

/// Where the bundled model lives, relative to the repository root.
pub const BUNDLED_MODEL: &str = "models/shapes-96";

/// The bundled model directory: `$DALLE_MODEL` if set, else `models/shapes-96` of the source
/// tree this binary was built from, else next to the current directory.
pub fn bundled_model() -> Result<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("DALLE_MODEL").filter(|v| !v.is_empty()) {
        return Ok(dir.into());
    }
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED_MODEL);
    let candidates = [built, std::path::PathBuf::from(BUNDLED_MODEL)];
    for dir in &candidates {
        if dir.join(dalle_runtimes::names::MANIFEST).is_file() {
            return Ok(dir.clone());
        }
    }
    Err(Error::Usage(format!(
        "no --model given and the bundled model is not at {} (this binary was built from {}); \
         pass --model DIR with a directory written by `dalle export`, or set DALLE_MODEL",
        candidates[1].display(),
        env!("CARGO_MANIFEST_DIR")
    )))
}
