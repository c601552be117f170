//! ONNX export of trained `dalle` checkpoints into a model directory.
//!
//! The graph builder and the three graphs (dVAE encoder, dVAE decoder, KV-cache transformer)
//! arrive with the export work (issue 4); until then this crate only fixes the workspace layout
//! and its dependency on the shared contract in `dalle-runtimes`.

pub use dalle_runtimes::Geometry;
