//! Checkpoints trained elsewhere, imported as this project's models: PyTorch files read safely
//! ([`torch`]) and ruDALL-E's transformer ([`rudalle`]).

pub mod rudalle;
pub mod torch;
pub mod yttm;
