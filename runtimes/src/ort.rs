//! The ONNX Runtime runtime through the `ort` crate, loading `libonnxruntime` at run time
//! (`load-dynamic`): execution providers CPU, CUDA (feature `cuda`) and TensorRT (feature
//! `tensorrt`). Nothing is linked at build time; the library comes from `ORT_DYLIB_PATH` or the
//! directory `dalle setup ort [--gpu]` fills (see [`library_dir`]).

use crate::session::{
    check_decode, check_encode, check_forward, host_to_capacity, regroup_buffers, take_for_regroup,
    write_rows, KvCache, RuntimeError, Session,
};
use crate::{names, Manifest};
use ort::session::{Session as OrtSession, SessionInputValue};
use ort::value::{Tensor, TensorRef};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Keys and values per layer in the graph's fixed-capacity layout `[batch, heads, max_seq,
/// head_dim]`: lent to ONNX Runtime in place every step, and each step's `present` (only the
/// new positions) written into them.
#[derive(Clone)]
struct OrtKv(Vec<(Vec<f32>, Vec<f32>)>);

impl OrtKv {
    /// From buffers layer after layer, keys then values.
    fn from_buffers(buffers: Vec<Vec<f32>>) -> Self {
        let mut it = buffers.into_iter();
        let mut layers = vec![];
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            layers.push((k, v));
        }
        OrtKv(layers)
    }
}

/// The ONNX Runtime release the adapter is built and tested against (`ort` rc.15 reads ≥ 1.31).
pub const ORT_VERSION: &str = "1.31.1";
/// File name of the library inside the wheel's `onnxruntime/capi/`.
pub const LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// The cache directory of the libraries `dalle setup` fetches: `$DALLE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/dalle`, else `~/.cache/dalle`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DALLE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("dalle")))
        .or_else(|| std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache/dalle")))
        .unwrap_or_else(|| PathBuf::from(".dalle-cache"))
}

/// Where `dalle setup ort` unpacks the libraries: [`cache_dir`], then `ort/<version>/<cpu|gpu>`.
pub fn library_dir(gpu: bool) -> PathBuf {
    cache_dir()
        .join("ort")
        .join(ORT_VERSION)
        .join(if gpu { "gpu" } else { "cpu" })
}

/// The library to load: `ORT_DYLIB_PATH`, else the GPU then the CPU setup directory.
pub fn find_library() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        let what = if p.is_dir() {
            format!("is a directory; point it at the {LIBRARY} file inside it")
        } else if p.exists() {
            format!("is not a regular file; point it at {LIBRARY}")
        } else {
            format!("does not exist; run `dalle setup ort` or point it at {LIBRARY}")
        };
        return Err(RuntimeError::OrtLibrary(format!(
            "ORT_DYLIB_PATH={} {what}",
            p.display()
        )));
    }
    for gpu in [true, false] {
        let p = library_dir(gpu).join(LIBRARY);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(RuntimeError::OrtLibrary(format!(
        "the ONNX Runtime {ORT_VERSION} library was not found: run `dalle setup ort` (CPU) or \
         `dalle setup ort --gpu` (CUDA/TensorRT), or set ORT_DYLIB_PATH to {LIBRARY}"
    )))
}

/// The process-wide ONNX Runtime environment (the library can be loaded once per process).
fn environment() -> Result<&'static (PathBuf, ort::environment::Environment), RuntimeError> {
    static ENV: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> =
        OnceLock::new();
    ENV.get_or_init(|| {
        let path = find_library().map_err(|e| e.to_string())?;
        let env = ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("dalle")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))?;
        Ok((path, env))
    })
    .as_ref()
    .map_err(|e| RuntimeError::OrtLibrary(e.clone()))
}

/// Which execution provider runs the graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    pub fn runtime_name(self) -> &'static str {
        match self {
            Provider::Cpu => "ort",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "trt",
        }
    }
}

/// How to open an ONNX Runtime session.
#[derive(Clone, Debug)]
pub struct OrtOptions {
    pub provider: Provider,
    /// When the provider cannot be registered, warn and run on CPU instead of failing.
    pub allow_fallback: bool,
    /// TensorRT: build FP16 engines.
    pub trt_fp16: bool,
    /// TensorRT: where engines are cached between runs (none: rebuilt every time).
    pub trt_cache_dir: Option<PathBuf>,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            provider: Provider::Cpu,
            allow_fallback: false,
            trt_fp16: false,
            trt_cache_dir: None,
        }
    }
}

fn run_err(runtime: &'static str) -> impl Fn(ort::Error) -> RuntimeError {
    move |e| RuntimeError::Run {
        runtime,
        message: e.to_string(),
    }
}

/// The execution provider to register, or `None` for plain CPU.
fn dispatch(
    opts: &OrtOptions,
    manifest: &Manifest,
) -> Result<Option<ort::ep::ExecutionProviderDispatch>, RuntimeError> {
    match opts.provider {
        Provider::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Provider::Cuda => Ok(Some(ort::ep::CUDA::default().build().error_on_failure())),
        #[cfg(feature = "tensorrt")]
        Provider::TensorRt => {
            // Optimisation profiles: batch 1..16 (opt 1), one new token to a full sequence of
            // them; the cache buffers always hold max_seq positions.
            let t = &manifest.transformer;
            let max = manifest.max_seq();
            let shapes = |b: usize, seq: usize| {
                let mut s = vec![format!("{}:{b}x{seq}", names::INPUT_IDS)];
                for i in 0..t.n_layers {
                    for n in [names::past_key(i), names::past_value(i)] {
                        s.push(format!("{n}:{b}x{}x{max}x{}", t.n_heads, t.head_dim));
                    }
                }
                s.join(",")
            };
            let mut ep = ort::ep::TensorRT::default()
                .with_fp16(opts.trt_fp16)
                .with_profile_min_shapes(shapes(1, 1))
                .with_profile_opt_shapes(shapes(1, 1))
                .with_profile_max_shapes(shapes(16, max));
            if let Some(dir) = &opts.trt_cache_dir {
                ep = ep
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display().to_string());
            }
            Ok(Some(ep.build().error_on_failure()))
        }
        #[allow(unreachable_patterns)]
        p => Err(RuntimeError::NotBuilt {
            runtime: p.runtime_name(),
            feature: if p == Provider::Cuda {
                "cuda"
            } else {
                "tensorrt"
            },
        }),
    }
}

fn missing_provider(p: Provider, lib: &Path, e: &str) -> String {
    let (name, needs) = match p {
        Provider::Cuda => (
            "CUDA",
            "libonnxruntime_providers_cuda.so from onnxruntime-gpu 1.31.1 with CUDA 13 and cuDNN 9",
        ),
        _ => (
            "TensorRT",
            "libonnxruntime_providers_tensorrt.so from onnxruntime-gpu 1.31.1 with TensorRT 10, CUDA 13 and cuDNN 9",
        ),
    };
    format!(
        "ONNX Runtime at {} cannot register the {name} execution provider ({}); it needs {needs}: \
         run `dalle setup ort --gpu` on a machine with an NVIDIA GPU, or pass --allow-fallback to run on CPU",
        lib.display(),
        e.lines().next().unwrap_or(e).trim()
    )
}

fn open_graph(
    path: &Path,
    opts: &OrtOptions,
    manifest: &Manifest,
    runtime: &'static str,
) -> Result<OrtSession, RuntimeError> {
    let (lib, env) = environment()?;
    let load = |e: ort::Error| RuntimeError::Load {
        runtime,
        file: path.display().to_string(),
        message: e.to_string(),
    };
    let mut builder = OrtSession::builder(env).map_err(load)?;
    // Idle intra-op threads block instead of spinning: spinning bought nothing measurable
    // offline here, and on a small machine it starved the threads around it (a server's HTTP
    // and batching threads: `dalle bench --serve-clients 16` ran 8 rows a call instead of 16,
    // 83% of offline batch-16 throughput instead of 98%; bench/NOTES.md).
    builder = builder
        .with_intra_op_spinning(false)
        .map_err(|e| RuntimeError::Load {
            runtime,
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
    let mut builder = match dispatch(opts, manifest)? {
        None => builder,
        Some(ep) => match builder.with_execution_providers([ep]) {
            Ok(b) => b,
            Err(e) => {
                let msg = missing_provider(opts.provider, lib, &e.to_string());
                if !opts.allow_fallback {
                    return Err(RuntimeError::Provider(msg));
                }
                // One warning per process, not one per graph.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| eprintln!("warning: {msg}; running on CPU (--allow-fallback)"));
                e.recover()
            }
        },
    };
    builder.commit_from_file(path).map_err(load)
}

/// A model directory on ONNX Runtime. Each graph's session is behind a mutex (ort runs take
/// `&mut`); different threads may use different graphs at once.
pub struct OrtRuntimeSession {
    manifest: Manifest,
    name: &'static str,
    encoder: Mutex<OrtSession>,
    decoder: Mutex<OrtSession>,
    transformer: Mutex<OrtSession>,
}

impl OrtRuntimeSession {
    pub fn open(dir: &Path, manifest: Manifest, opts: &OrtOptions) -> Result<Self, RuntimeError> {
        let name = opts.provider.runtime_name();
        let open = |f: &str| open_graph(&dir.join(f), opts, &manifest, name).map(Mutex::new);
        Ok(OrtRuntimeSession {
            encoder: open(names::DVAE_ENCODER)?,
            decoder: open(names::DVAE_DECODER)?,
            transformer: open(names::TRANSFORMER)?,
            name,
            manifest,
        })
    }

    /// Full path of the library in use.
    pub fn library() -> Result<PathBuf, RuntimeError> {
        Ok(environment()?.0.clone())
    }
}

fn lock(m: &Mutex<OrtSession>) -> std::sync::MutexGuard<'_, OrtSession> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session for OrtRuntimeSession {
    fn name(&self) -> &'static str {
        self.name
    }

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn forward(
        &self,
        ids: &[i64],
        batch: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, RuntimeError> {
        let t = check_forward(&self.manifest, ids, batch, cache)?;
        let e = run_err(self.name);
        let cap = self.manifest.max_seq();
        let (b, h, hd) = (batch, cache.heads, cache.head_dim);
        let mut kv = match cache.take_native_as(self.name, |kv: &OrtKv| Ok(kv.clone()))? {
            Some(kv) => kv,
            None => OrtKv::from_buffers(host_to_capacity(cache, cap)?),
        };
        let buffer = vec![b, h, cap, hd];
        let past: Vec<i64> = cache.lens.iter().map(|&l| l as i64).collect();
        let mut inputs: Vec<(String, SessionInputValue)> = vec![
            (
                names::INPUT_IDS.into(),
                Tensor::from_array((vec![batch, t], ids.to_vec()))
                    .map_err(&e)?
                    .into(),
            ),
            (
                names::PAST_LENGTH.into(),
                Tensor::from_array((vec![batch], past)).map_err(&e)?.into(),
            ),
        ];
        for (i, (k, v)) in kv.0.iter().enumerate() {
            let kt = TensorRef::from_array_view((buffer.clone(), &k[..])).map_err(&e)?;
            let vt = TensorRef::from_array_view((buffer.clone(), &v[..])).map_err(&e)?;
            inputs.push((names::past_key(i), kt.into()));
            inputs.push((names::past_value(i), vt.into()));
        }
        let mut session = lock(&self.transformer);
        let out = session.run(inputs).map_err(&e)?;
        let logits = out[names::LOGITS]
            .try_extract_tensor::<f32>()
            .map_err(&e)?
            .1
            .to_vec();
        // Each step's new positions go straight from ONNX Runtime's output into the buffers.
        for (i, (k, v)) in kv.0.iter_mut().enumerate() {
            for (buffer, name) in [(k, names::present_key(i)), (v, names::present_value(i))] {
                let value = out.get(&name).ok_or_else(|| RuntimeError::Run {
                    runtime: self.name,
                    message: format!("the graph returned no `{name}`"),
                })?;
                let new = value.try_extract_tensor::<f32>().map_err(&e)?.1;
                write_rows(buffer, new, b * h, cap, hd, &cache.lens, t);
            }
        }
        drop(out);
        drop(session);
        cache.set_native(self.name, Arc::new(kv));
        cache.advance(t);
        Ok(logits)
    }

    fn regroup(
        &self,
        mut parts: Vec<KvCache>,
        picks: &[(usize, usize)],
    ) -> Result<KvCache, RuntimeError> {
        let (lens, held) =
            take_for_regroup(self.name, &mut parts, picks, |kv: &OrtKv| Ok(kv.clone()))?;
        let cap = self.manifest.max_seq();
        let mut out = KvCache::new(&self.manifest, picks.len());
        let views: Vec<Vec<&[f32]>> = held
            .iter()
            .map(|kv| {
                kv.iter()
                    .flat_map(|kv| kv.0.iter())
                    .flat_map(|(k, v)| [&k[..], &v[..]])
                    .collect()
            })
            .collect();
        let n = 2 * self.manifest.transformer.n_layers;
        let data = regroup_buffers(&views, n, out.heads * cap * out.head_dim, picks);
        out.set_native(self.name, Arc::new(OrtKv::from_buffers(data)));
        out.lens = lens;
        Ok(out)
    }

    fn decode(&self, tokens: &[i64], batch: usize) -> Result<Vec<f32>, RuntimeError> {
        let n = check_decode(&self.manifest, tokens, batch)?;
        let e = run_err(self.name);
        let input = Tensor::from_array((vec![batch, n], tokens.to_vec())).map_err(&e)?;
        let mut session = lock(&self.decoder);
        let out = session
            .run(vec![(names::IMAGE_TOKENS, SessionInputValue::from(input))])
            .map_err(&e)?;
        let pixels = out[names::IMAGE]
            .try_extract_tensor::<f32>()
            .map_err(&e)?
            .1
            .to_vec();
        Ok(pixels)
    }

    fn encode(&self, pixels: &[f32], batch: usize) -> Result<Vec<i64>, RuntimeError> {
        check_encode(&self.manifest, pixels, batch)?;
        let e = run_err(self.name);
        let s = self.manifest.geometry.image_size;
        let input = Tensor::from_array((vec![batch, 3, s, s], pixels.to_vec())).map_err(&e)?;
        let mut session = lock(&self.encoder);
        let out = session
            .run(vec![(names::IMAGE, SessionInputValue::from(input))])
            .map_err(&e)?;
        let tokens = out[names::IMAGE_TOKENS]
            .try_extract_tensor::<i64>()
            .map_err(&e)?
            .1
            .to_vec();
        Ok(tokens)
    }
}
