//! The one trait every runtime implements, and the host-side KV cache it extends.

use crate::{Manifest, ManifestError};
use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

/// Keys and values of every layer for the positions seen so far, on the host:
/// `[batch, heads, len, head_dim]` row-major per layer — or, for a runtime that keeps them in
/// its own form between steps (all of ours do: candle tensors; tract tensors and host buffers
/// for ONNX Runtime in the graphs' fixed-capacity layout, updated in place), in
/// [`KvCache::native`], with `layers` left empty.
#[derive(Clone)]
pub struct KvCache {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Positions held by each row. Rows may hold different numbers: a server's requests join
    /// and leave the batch at any step (see [`Session::regroup`]).
    pub lens: Vec<usize>,
    /// (keys, values) per layer.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// The owning runtime's name and its own copy of the cache: copying the whole cache to and
    /// from the host every step costs more than the step itself at long pasts and large batches.
    pub native: Option<(&'static str, Arc<dyn Any + Send + Sync>)>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("dims", &self.dims())
            .field("layers", &self.layers.len())
            .field("native", &self.native.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl KvCache {
    /// An empty cache (past length 0) for `batch` sequences of the manifest's model.
    pub fn new(manifest: &Manifest, batch: usize) -> Self {
        let t = &manifest.transformer;
        KvCache {
            batch,
            heads: t.n_heads,
            head_dim: t.head_dim,
            lens: vec![0; batch],
            layers: vec![(vec![], vec![]); t.n_layers],
            native: None,
        }
    }

    /// Take `runtime`'s own state out of the cache (`None`: the cache is empty or on the host);
    /// an error when another runtime holds it.
    pub fn take_native(
        &mut self,
        runtime: &'static str,
    ) -> Result<Option<Arc<dyn Any + Send + Sync>>, RuntimeError> {
        match self.native.take() {
            Some((owner, state)) if owner == runtime => Ok(Some(state)),
            Some((owner, state)) if !self.is_empty() => {
                self.native = Some((owner, state));
                Err(foreign(owner, runtime))
            }
            _ => Ok(None),
        }
    }

    /// `runtime`'s own state of type `T`, taken out of the cache: moved when this cache alone
    /// holds it, else made by `copy` (a cloned cache shares its state until its first step, and
    /// every runtime writes its state in place). `None`: the cache is empty or on the host.
    pub fn take_native_as<T: Any + Send + Sync>(
        &mut self,
        runtime: &'static str,
        copy: impl FnOnce(&T) -> Result<T, RuntimeError>,
    ) -> Result<Option<T>, RuntimeError> {
        let Some(state) = self.take_native(runtime)? else {
            return Ok(None);
        };
        let state = state.downcast::<T>().map_err(|_| RuntimeError::Run {
            runtime,
            message: format!("the KV cache's native state is not {runtime}'s"),
        })?;
        match Arc::try_unwrap(state) {
            Ok(own) => Ok(Some(own)),
            Err(shared) => copy(&shared).map(Some),
        }
    }

    /// Hand the cache to `runtime`'s own form of it, leaving the host layers empty.
    pub fn set_native(&mut self, runtime: &'static str, state: Arc<dyn Any + Send + Sync>) {
        for layer in &mut self.layers {
            *layer = (vec![], vec![]);
        }
        self.native = Some((runtime, state));
    }

    /// Shape of one layer's keys or values in the host layout (rows of equal length; the
    /// longest row's otherwise).
    pub fn dims(&self) -> [usize; 4] {
        let len = self.lens.iter().copied().max().unwrap_or(0);
        [self.batch, self.heads, len, self.head_dim]
    }

    /// The positions every row holds, when they hold the same number.
    pub fn uniform_len(&self) -> Option<usize> {
        match self.lens.split_first() {
            Some((&first, rest)) if rest.iter().all(|&l| l == first) => Some(first),
            None => Some(0),
            _ => None,
        }
    }

    /// No row holds a position yet.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Each row moved on by `t` positions (after a `forward` of `t` tokens a row).
    pub fn advance(&mut self, t: usize) {
        self.lens.iter_mut().for_each(|l| *l += t);
    }
}

/// One layer's keys or values in the graphs' fixed-capacity layout `[batch, heads, cap, head_dim]`
/// (positions `len ..` zero), copied from the host layout `[batch, heads, len, head_dim]`.
pub fn to_capacity(host: &[f32], dims: [usize; 4], cap: usize) -> Vec<f32> {
    let [b, h, len, hd] = dims;
    let mut buf = vec![0.0; b * h * cap * hd];
    if len > 0 {
        write_positions(&mut buf, host, b * h, cap, hd, 0, len);
    }
    buf
}

/// The cache's host layers in the graphs' capacity layout, layer after layer, keys then values
/// (zero-filled where nothing is held). Host layers hold rows of equal length.
pub fn host_to_capacity(cache: &KvCache, cap: usize) -> Result<Vec<Vec<f32>>, RuntimeError> {
    if cache.uniform_len().is_none() {
        return Err(RuntimeError::Request(
            "a KV cache on the host holds rows of equal length; rows at different positions \
             live in a runtime's own cache (KvCache::new, then forward)"
                .into(),
        ));
    }
    let dims = cache.dims();
    Ok(cache
        .layers
        .iter()
        .flat_map(|(k, v)| [to_capacity(k, dims, cap), to_capacity(v, dims, cap)])
        .collect())
}

/// Write `new` (`rows × t × hd`, e.g. a graph's `present` output) into `buf` (`rows × cap × hd`)
/// at positions `at .. at + t` of every row.
pub fn write_positions(
    buf: &mut [f32],
    new: &[f32],
    rows: usize,
    cap: usize,
    hd: usize,
    at: usize,
    t: usize,
) {
    write_rows(buf, new, rows, cap, hd, &[at], t);
}

/// [`write_positions`] where batch row `i` (`rows / at.len()` consecutive rows of `buf`, its
/// heads) writes at its own `at[i]`.
pub fn write_rows(
    buf: &mut [f32],
    new: &[f32],
    rows: usize,
    cap: usize,
    hd: usize,
    at: &[usize],
    t: usize,
) {
    let per = rows / at.len().max(1);
    for r in 0..rows {
        let dst = (r * cap + at[r / per]) * hd;
        buf[dst..dst + t * hd].copy_from_slice(&new[r * t * hd..(r + 1) * t * hd]);
    }
}

/// The rows `picks` (`(part, row)`: row `row` of `parts[part]`) of caches in the graphs'
/// capacity layout, one after another: `parts` hold each cache's buffers (layer after layer,
/// keys then values), `row_len` the values of one row of one buffer (heads · capacity ·
/// head_dim). A part with no buffers (nothing run yet) gives zero rows.
pub fn regroup_buffers(
    parts: &[Vec<&[f32]>],
    buffers: usize,
    row_len: usize,
    picks: &[(usize, usize)],
) -> Vec<Vec<f32>> {
    (0..buffers)
        .map(|i| {
            let mut out = Vec::with_capacity(picks.len() * row_len);
            for &(part, row) in picks {
                match parts[part].get(i) {
                    Some(buf) => out.extend_from_slice(&buf[row * row_len..(row + 1) * row_len]),
                    None => out.resize(out.len() + row_len, 0.0),
                }
            }
            out
        })
        .collect()
}

/// What every [`Session::regroup`] starts with: the picks checked (each names a row of a part),
/// the new cache's row lengths, and each part's state in `runtime`'s own form, taken out of it
/// (`None`: the part holds nothing yet). A part filled on the host is refused: its rows are not in
/// the runtime's buffers.
pub fn take_for_regroup<T: Any + Send + Sync>(
    runtime: &'static str,
    parts: &mut [KvCache],
    picks: &[(usize, usize)],
    copy: impl Fn(&T) -> Result<T, RuntimeError>,
) -> Result<(Vec<usize>, Vec<Option<T>>), RuntimeError> {
    let lens = picks
        .iter()
        .map(|&(part, row)| {
            parts
                .get(part)
                .and_then(|c| c.lens.get(row).copied())
                .ok_or_else(|| {
                    RuntimeError::Request(format!(
                        "regroup: row {row} of cache {part} does not exist ({} caches)",
                        parts.len()
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let held = parts
        .iter_mut()
        .map(|c| {
            if !c.is_empty() && c.native.is_none() {
                return Err(RuntimeError::Request(
                    "regroup takes caches this runtime has run".into(),
                ));
            }
            c.take_native_as(runtime, &copy)
        })
        .collect::<Result<_, _>>()?;
    Ok((lens, held))
}

fn foreign(owner: &str, runtime: &str) -> RuntimeError {
    RuntimeError::Request(format!(
        "this KV cache holds {owner}'s state; {runtime} needs a cache of its own (KvCache::new)"
    ))
}

/// Why a runtime could not be opened or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("unknown runtime `{0}`: valid runtimes are {valid}", valid = crate::RuntimeKind::NAMES.join(", "))]
    UnknownRuntime(String),
    #[error("runtime `{runtime}` is not part of this build (cargo feature `{feature}`)")]
    NotBuilt {
        runtime: &'static str,
        feature: &'static str,
    },
    #[error("{0}")]
    OrtLibrary(String),
    #[error("{0}")]
    Provider(String),
    #[error("{runtime}: cannot load {file}: {message}")]
    Load {
        runtime: &'static str,
        file: String,
        message: String,
    },
    #[error("{runtime}: {message}")]
    Run {
        runtime: &'static str,
        message: String,
    },
    #[error("{0}")]
    Request(String),
}

/// A model directory opened by one runtime. Sessions are shared across threads.
pub trait Session: Send + Sync {
    /// The runtime's name (`tract`, `ort-cpu`, …).
    fn name(&self) -> &'static str;

    fn manifest(&self) -> &Manifest;

    /// Run the transformer on `ids` (`batch` rows of equal length, unified vocabulary), row `r`
    /// at positions `cache.lens[r] ..`; returns `[batch, t, vocab]` logits and extends `cache`.
    fn forward(
        &self,
        ids: &[i64],
        batch: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, RuntimeError>;

    /// Whether `forward` takes rows at different positions in one call (a batch that requests
    /// join and leave at any step). Where not, only rows of equal length may share a cache.
    fn mixed_positions(&self) -> bool {
        true
    }

    /// A cache of rows taken from caches this session has run: row `i` of the result is row
    /// `picks[i].1` of `parts[picks[i].0]`, at its own position. How a server's batch takes in
    /// the rows of newly prefilled requests and lets finished ones go.
    fn regroup(
        &self,
        parts: Vec<KvCache>,
        picks: &[(usize, usize)],
    ) -> Result<KvCache, RuntimeError>;

    /// `[batch, grid²]` codebook tokens → `[batch, 3, H, W]` pixels in [0, 1].
    fn decode(&self, tokens: &[i64], batch: usize) -> Result<Vec<f32>, RuntimeError>;

    /// `[batch, 3, H, W]` pixels in [0, 1] → `[batch, grid²]` codebook tokens.
    fn encode(&self, pixels: &[f32], batch: usize) -> Result<Vec<i64>, RuntimeError>;
}

/// Checks every runtime makes before `forward`: a rectangular batch matching the cache, ids in
/// the vocabulary, positions within the sequence. Returns `t`.
pub fn check_forward(
    m: &Manifest,
    ids: &[i64],
    batch: usize,
    cache: &KvCache,
) -> Result<usize, RuntimeError> {
    if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
        return Err(RuntimeError::Request(format!(
            "{} ids do not form {batch} non-empty rows",
            ids.len()
        )));
    }
    if cache.batch != batch || cache.layers.len() != m.transformer.n_layers {
        return Err(RuntimeError::Request(format!(
            "the KV cache holds {} rows of {} layers; this call has {batch} rows of {}",
            cache.batch,
            cache.layers.len(),
            m.transformer.n_layers
        )));
    }
    let t = ids.len() / batch;
    if cache.lens.len() != batch {
        return Err(RuntimeError::Request(format!(
            "the KV cache holds positions of {} rows; this call has {batch}",
            cache.lens.len()
        )));
    }
    if let Some(&len) = cache.lens.iter().find(|&&l| l + t > m.max_seq()) {
        return Err(RuntimeError::Request(format!(
            "positions {len}..{} exceed the model's sequence length {}",
            len + t,
            m.max_seq()
        )));
    }
    let vocab = m.layout.vocab_size as i64;
    if let Some(bad) = ids.iter().find(|&&i| !(0..vocab).contains(&i)) {
        return Err(RuntimeError::Request(format!(
            "token id {bad} is outside the vocabulary (0..{vocab})"
        )));
    }
    Ok(t)
}

/// Checks before `decode`: whole grids of codes in the codebook. Returns the tokens per image.
pub fn check_decode(m: &Manifest, tokens: &[i64], batch: usize) -> Result<usize, RuntimeError> {
    let n = m.geometry.image_tokens();
    if batch == 0 || tokens.len() != batch * n {
        return Err(RuntimeError::Request(format!(
            "expected {batch} × {n} image tokens, got {}",
            tokens.len()
        )));
    }
    let k = m.geometry.codebook as i64;
    if let Some(bad) = tokens.iter().find(|&&c| !(0..k).contains(&c)) {
        return Err(RuntimeError::Request(format!(
            "image token {bad} is outside the codebook (0..{k})"
        )));
    }
    Ok(n)
}

/// Checks before `encode`: whole images of the model's size.
pub fn check_encode(m: &Manifest, pixels: &[f32], batch: usize) -> Result<(), RuntimeError> {
    let s = m.geometry.image_size;
    if batch == 0 || pixels.len() != batch * 3 * s * s {
        return Err(RuntimeError::Request(format!(
            "expected {batch} RGB images of {s}×{s} ({} values), got {}",
            batch * 3 * s * s,
            pixels.len()
        )));
    }
    Ok(())
}
