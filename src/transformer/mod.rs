//! Stage 2: the sparse-attention transformer over caption and image tokens.

pub mod generate;
pub mod model;
pub mod sparse;
pub mod train;

pub use model::{KvCache, Transformer};
