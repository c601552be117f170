//! The `dalle` model contract and inference runtimes.
//!
//! This crate is what a program embedding DALL·E inference depends on: it carries no training
//! code and no candle-nn. Everything that the exporter and the runtimes must agree on lives here
//! once, starting with the model geometry.

pub mod geometry;
pub mod layout;
pub mod manifest;
pub mod masks;
pub mod names;
pub mod rng;
pub mod sampler;

pub use geometry::{Geometry, GeometryError};
pub use layout::TokenLayout;
pub use manifest::{Dtype, Manifest, ManifestError};
pub use masks::{allowed, layer_kinds, mask_matrix, AttentionKind};
pub use sampler::{Sampler, SamplingError, SamplingParams};
