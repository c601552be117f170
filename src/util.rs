//! Small process-level helpers.

/// Peak resident set size of this process (Linux `VmHWM`), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident set size of this process now (Linux `VmRSS`), if the platform reports it.
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Pick the compute device by name: `cpu`, or `cuda` when built with the `cuda` feature.
pub fn device(name: &str) -> crate::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => candle_core::Device::new_cuda(0).map_err(|e| {
            let e = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            crate::Error::Usage(format!(
                "--device cuda: no usable CUDA device ({e}); run on a machine with an NVIDIA GPU \
                 and its driver (libcuda), or use --device cpu"
            ))
        }),
        "cuda" => Err(crate::Error::Usage(
            "this dalle was built without CUDA support: rebuild with `--features cuda` (needs nvcc)".into(),
        )),
        other => Err(crate::Error::Usage(format!("unknown device `{other}`: use cpu or cuda"))),
    }
}

/// Threads for this process's own parallel kernels: candle's count (`RAYON_NUM_THREADS`, else
/// the CPUs available), read once. Finding the CPU count reads cgroup and /proc files; asked
/// per kernel call it cost ~5% of a batch-1 decoding step.
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Pin `RAYON_NUM_THREADS` to the CPU count when it is unset, before any thread starts: candle
/// asks for its thread count on every matmul and, without the variable, counts the CPUs anew
/// each time (cgroup and /proc reads).
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads().to_string());
    }
}

/// glibc's thresholds for what still allocates through it (the C++ of ONNX Runtime; the binary's
/// Rust allocations go through mimalloc): keep freed memory in the process instead of a fresh
/// `mmap` and a round of page faults for every large block.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// For a training loop, which frees and allocates the same large tensors every step: mimalloc
/// (the binary's allocator) keeps freed pages instead of returning them to the system after its
/// default delay, to fault them in again on the next step. Measured on a `small` training step
/// (batch 8, 2-core Xeon): ~4% faster, with the zero-fills spread over the cores ~15% in all
/// (bench/NOTES.md, optimisation 47). Not for decoding, whose peak memory is the figure.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc 2's `mimalloc.h` (libmimalloc-sys names no constant).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one option of mimalloc's (-1: no purging); any thread may call it.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// Let a closed stdout (`dalle encode … | head`) end the process quietly, as other Unix tools
/// do, instead of panicking inside `println!`.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// PSNR (dB) of a mean squared error of values in [0, 1] (an exact match counts as 100 dB).
pub fn psnr_db(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-10)).log10()
}
