//! ONNX export of `dalle` checkpoints into a model directory (the contract of
//! `dalle_runtimes::manifest` and `dalle_runtimes::names`).
//!
//! The graphs are built directly as ONNX protobuf (the prost types of `tract_onnx::pb`, so no
//! `protoc` is needed), op for op as the candle models: `dvae_encoder.onnx`, `dvae_decoder.onnx`
//! and `transformer.onnx` with a KV cache. This crate knows nothing of candle: the caller hands it
//! the architecture numbers and the weights as plain f32 arrays.

pub mod dvae;
pub mod onnx;
pub mod transformer;
pub mod triton;
pub mod vqgan;

use dalle_runtimes::manifest::{
    sha256_file, DvaeDims, LayoutRanges, SamplingDefaults, TransformerDims, VqganDims,
    SCHEMA_VERSION,
};
use dalle_runtimes::{layer_kinds, names, Dtype, Geometry, Manifest, Norms, TokenLayout};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use onnx::OPSETS;

/// One checkpoint tensor: row-major f32 values and their shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// A checkpoint: tensors by name (the candle variable names).
pub type Weights = BTreeMap<String, Weight>;

/// The dVAE's architecture (`dall_e` 0.1's `Encoder`/`Decoder` arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DvaeSpec {
    pub group_count: usize,
    pub n_hid: usize,
    pub n_blk_per_group: usize,
    pub vocab_size: usize,
    pub n_init: usize,
    pub channels: usize,
    /// Scale of every residual branch (`dall_e`: 1 / n_layers²).
    pub post_gain: f64,
    /// The encoder's architecture.
    pub encoder: dalle_runtimes::manifest::DvaeEncoder,
}

/// The transformer's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerSpec {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub conv_kernel: usize,
    /// Extra layer norms (see [`Norms`]).
    pub norms: Norms,
}

/// The network that turns images into tokens and back (`dvae_encoder.onnx`,
/// `dvae_decoder.onnx`): OpenAI's dVAE, or Sber's VQGAN of an imported ruDALL-E model.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageCodec {
    Dvae(DvaeSpec),
    Vqgan(VqganDims),
}

/// Everything an export reads. `*_source` name the checkpoints in error messages.
#[derive(Clone, Debug)]
pub struct ExportInput {
    /// Preset name recorded in the manifest.
    pub preset: String,
    /// Geometry of the dVAE checkpoint and of the transformer checkpoint: they must agree.
    pub dvae_geometry: Geometry,
    pub transformer_geometry: Geometry,
    pub codec: ImageCodec,
    pub encoder: Weights,
    pub encoder_source: String,
    pub decoder: Weights,
    pub decoder_source: String,
    pub transformer: TransformerSpec,
    pub transformer_weights: Weights,
    pub transformer_source: String,
    /// `tokenizer.json` to copy into the directory.
    pub tokenizer: PathBuf,
    pub sampling: SamplingDefaults,
}

/// How to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub opset: i64,
    pub dtype: Dtype,
    /// Replace an existing output directory.
    pub force: bool,
    /// A graph whose weights exceed this many bytes stores them in `<graph>.onnx.data`.
    pub external_data_threshold: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: 17,
            dtype: Dtype::F32,
            force: false,
            // Protobuf messages cannot exceed 2 GiB; leave room for the graph itself.
            external_data_threshold: 1 << 30,
        }
    }
}

/// Why an export failed. Nothing is left behind: the directory appears only when complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error("checkpoint {source_name}: {message}")]
    Tensor {
        source_name: String,
        message: String,
    },
    #[error("the dVAE and transformer checkpoints have different geometry ({0}); export a transformer trained on this dVAE")]
    Geometry(String),
    #[error("unknown opset {0}: this exporter writes opsets {lo} to {hi}", lo = OPSETS.start(), hi = OPSETS.end())]
    Opset(i64),
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |error| ExportError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Fields in which two geometries differ, as `name a ≠ b`.
fn geometry_diff(a: &Geometry, b: &Geometry) -> Vec<String> {
    [
        ("image_size", a.image_size, b.image_size),
        ("grid", a.grid, b.grid),
        ("codebook", a.codebook, b.codebook),
        ("text_len", a.text_len, b.text_len),
        ("text_vocab", a.text_vocab, b.text_vocab),
    ]
    .iter()
    .filter(|(_, x, y)| x != y)
    .map(|(n, x, y)| format!("{n}: dVAE {x}, transformer {y}"))
    .collect()
}

/// Check the inputs agree with each other before any graph is built.
pub(crate) fn check(input: &ExportInput, opts: &ExportOptions) -> Result<(), ExportError> {
    if !OPSETS.contains(&opts.opset) {
        return Err(ExportError::Opset(opts.opset));
    }
    let diff = geometry_diff(&input.dvae_geometry, &input.transformer_geometry);
    if !diff.is_empty() {
        return Err(ExportError::Geometry(diff.join(", ")));
    }
    let g = &input.dvae_geometry;
    g.validate()
        .map_err(|e| ExportError::Invalid(e.to_string()))?;
    let (codebook, down) = match &input.codec {
        ImageCodec::Dvae(d) => (d.vocab_size, 1usize << d.group_count.saturating_sub(1)),
        ImageCodec::Vqgan(v) => (g.codebook, v.downsample()),
    };
    if codebook != g.codebook || g.image_size / down != g.grid {
        return Err(ExportError::Invalid(format!(
            "the image tokenizer (codebook {codebook}, downsampling {down}) does not produce the geometry's {}×{} grid of {} codes from {} px",
            g.grid, g.grid, g.codebook, g.image_size
        )));
    }
    let t = &input.transformer;
    if t.n_heads == 0 || !t.d_model.is_multiple_of(t.n_heads) {
        return Err(ExportError::Invalid(format!(
            "transformer d_model {} is not divisible by n_heads {}",
            t.d_model, t.n_heads
        )));
    }
    if !input.tokenizer.is_file() {
        return Err(ExportError::Invalid(format!(
            "tokenizer {} does not exist; a `dalle train` run directory holds tokenizer.json",
            input.tokenizer.display()
        )));
    }
    Ok(())
}

/// Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); an error where the system or
/// file system cannot, and the caller falls back to two renames.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        };
        let (ca, cb) = (c(a)?, c(b)?);
        const RENAME_EXCHANGE: u32 = 2;
        // SAFETY: two valid NUL-terminated paths; the syscall reads them and nothing else.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(std::io::Error::other("no atomic exchange here"))
    }
}

/// A sibling of `out` to build into; renamed into place at the end.
fn staging_dir(out: &Path, tag: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Export the three graphs, the tokenizer and the manifest into `out`. `progress` receives one
/// line per graph.
pub fn export(
    input: &ExportInput,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ExportError> {
    check(input, opts)?;
    publish(out, opts.force, |stage| {
        write_dir(input, stage, opts, progress)
    })
}

/// Write a directory through `write` into a staging directory beside `out`, then swap it into
/// place: nothing is left behind on failure, and `out` (replaced only with `force`) is always
/// either the old directory or the whole new one.
pub(crate) fn publish<T>(
    out: &Path,
    force: bool,
    write: impl FnOnce(&Path) -> Result<T, ExportError>,
) -> Result<T, ExportError> {
    if out.exists() && !force {
        return Err(ExportError::Exists(out.to_path_buf()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    }
    let stage = staging_dir(out, "partial");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).map_err(io(&stage))?;
    }
    std::fs::create_dir(&stage).map_err(io(&stage))?;
    let written = match write(&stage) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
    };
    dalle_runtimes::failpoint::hit("export-staged", 0);
    // Swap into place: the old directory (with --force) is removed only once the new one is
    // there; on Linux the two trade places in one atomic step, so `out` is always a whole model.
    if out.exists() {
        let old = staging_dir(out, "old");
        if exchange(&stage, out).is_ok() {
            std::fs::rename(&stage, &old).map_err(io(&stage))?;
        } else {
            std::fs::rename(out, &old).map_err(io(out))?;
            std::fs::rename(&stage, out).map_err(io(out))?;
        }
        dalle_runtimes::failpoint::hit("export-swapped", 0);
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&stage, out).map_err(io(out))?;
    }
    Ok(written)
}

pub(crate) fn write_dir(
    input: &ExportInput,
    dir: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ExportError> {
    let g = input.dvae_geometry;
    let mut files = vec![];
    let mut save = |name: &str,
                    build: &dyn Fn() -> Result<tract_onnx::pb::ModelProto, ExportError>|
     -> Result<(), ExportError> {
        let t0 = Instant::now();
        let model = build()?;
        let graph = model
            .graph
            .as_ref()
            .map(|g| (g.node.len(), g.initializer.len()));
        let (nodes, inits) = graph.unwrap_or((0, 0));
        let written = onnx::save(model, &dir.join(name), opts.external_data_threshold)?;
        let bytes: u64 = written
            .iter()
            .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
            .sum();
        progress(&format!(
            "{name}: {nodes} nodes, {inits} initialisers, {:.1} MB{}, {:.1} s",
            bytes as f64 / 1e6,
            if written.len() > 1 {
                " (external data)"
            } else {
                ""
            },
            t0.elapsed().as_secs_f64()
        ));
        files.extend(written);
        Ok(())
    };
    let (dt, op) = (opts.dtype, opts.opset);
    save(names::DVAE_ENCODER, &|| {
        let (w, src) = (&input.encoder, &input.encoder_source);
        match &input.codec {
            ImageCodec::Dvae(d) => dvae::encoder(&g, d, w, dt, op, src),
            ImageCodec::Vqgan(v) => vqgan::encoder(&g, v, w, dt, op, src),
        }
    })?;
    save(names::DVAE_DECODER, &|| {
        let (w, src) = (&input.decoder, &input.decoder_source);
        match &input.codec {
            ImageCodec::Dvae(d) => dvae::decoder(&g, d, w, dt, op, src),
            ImageCodec::Vqgan(v) => vqgan::decoder(&g, v, w, dt, op, src),
        }
    })?;
    save(names::TRANSFORMER, &|| {
        transformer::transformer(
            &g,
            &input.transformer,
            &input.transformer_weights,
            opts.dtype,
            opts.opset,
            &input.transformer_source,
        )
    })?;
    let tok = dir.join(names::TOKENIZER);
    std::fs::copy(&input.tokenizer, &tok).map_err(io(&input.tokenizer))?;
    files.push(names::TOKENIZER.into());

    let mut entries = BTreeMap::new();
    for f in files {
        let path = dir.join(&f);
        entries.insert(f, sha256_file(&path).map_err(io(&path))?);
    }
    let t = &input.transformer;
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        producer: format!("dalle {}", env!("CARGO_PKG_VERSION")),
        preset: input.preset.clone(),
        geometry: g,
        layout: LayoutRanges::from(TokenLayout::from(&g)),
        transformer: TransformerDims {
            d_model: t.d_model,
            n_layers: t.n_layers,
            n_heads: t.n_heads,
            head_dim: t.d_model / t.n_heads,
            norms: t.norms,
        },
        dvae: match &input.codec {
            ImageCodec::Dvae(d) => Some(DvaeDims {
                group_count: d.group_count,
                n_hid: d.n_hid,
                n_blk_per_group: d.n_blk_per_group,
                n_init: d.n_init,
                channels: d.channels,
                post_gain: Some(d.post_gain),
                encoder: d.encoder,
            }),
            ImageCodec::Vqgan(_) => None,
        },
        vqgan: match &input.codec {
            ImageCodec::Vqgan(v) => Some(v.clone()),
            ImageCodec::Dvae(_) => None,
        },
        layers: layer_kinds(t.n_layers, t.conv_kernel),
        io: Default::default(),
        opset: opts.opset,
        dtype: opts.dtype,
        sampling: input.sampling,
        files: entries,
    };
    manifest.check().map_err(ExportError::Invalid)?;
    let json =
        serde_json::to_string_pretty(&manifest).map_err(|e| ExportError::Invalid(e.to_string()))?;
    let path = dir.join(names::MANIFEST);
    std::fs::write(&path, json + "\n").map_err(io(&path))?;
    Ok(manifest)
}

/// Read the initialisers of an exported graph back as f32 weights (f16 ones are widened;
/// external data is read from next to the file). Builder-made constants (`/const/…`) are skipped.
pub fn read_initializers(path: &Path) -> Result<Weights, ExportError> {
    use prost::Message;
    use tract_onnx::pb::tensor_proto::DataType;
    let bytes = std::fs::read(path).map_err(io(path))?;
    let bad = |m: String| ExportError::Invalid(format!("{}: {m}", path.display()));
    let model = tract_onnx::pb::ModelProto::decode(bytes.as_slice())
        .map_err(|e| bad(format!("not an ONNX model ({e}); re-export it")))?;
    let graph = model.graph.ok_or_else(|| bad("has no graph".into()))?;
    let mut out = Weights::new();
    for t in graph.initializer {
        if t.name.starts_with('/') {
            continue;
        }
        let raw = if t.external_data.is_empty() {
            t.raw_data
        } else {
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.clone())
            };
            let loc =
                get("location").ok_or_else(|| bad(format!("`{}` lacks a location", t.name)))?;
            let offset: usize = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
            let data_path = path.with_file_name(&loc);
            let data = std::fs::read(&data_path).map_err(io(&data_path))?;
            let length: usize = get("length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(data.len() - offset.min(data.len()));
            data.get(offset..offset + length)
                .ok_or_else(|| bad(format!("`{}` lies outside {loc}", t.name)))?
                .to_vec()
        };
        let data: Vec<f32> = if t.data_type == DataType::Float as i32 {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else if t.data_type == DataType::Float16 as i32 {
            raw.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        } else {
            continue;
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if dims.iter().product::<usize>() != data.len() {
            return Err(bad(format!(
                "`{}` holds {} values for shape {dims:?}",
                t.name,
                data.len()
            )));
        }
        out.insert(t.name, Weight { dims, data });
    }
    Ok(out)
}
