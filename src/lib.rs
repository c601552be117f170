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
pub mod parity;
pub mod plot;
pub mod runtime;
pub mod setup;
pub use dalle_runtimes::rng;
pub mod text;
pub mod train;
pub mod transformer;
pub mod util;
pub mod vae;

pub use config::Config;
pub use error::{Error, Result};
