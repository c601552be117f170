//! Stage 1: the discrete VAE (Ramesh et al. 2021 §2.1).

mod direct;
pub mod io;
pub mod loss;
pub mod model;
mod ops;
pub mod train;
mod winograd;

pub use model::{Decoder, Encoder};
