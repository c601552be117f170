//! Stage 1: the discrete VAE (Ramesh et al. 2021 §2.1).
pub mod io;
pub mod loss;
pub mod model;
pub mod train;
pub mod vqgan;

pub use model::{Decoder, Encoder};
