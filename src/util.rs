//! Small process-level helpers.

/// Peak resident set size of this process (Linux `VmHWM`), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Pick the compute device by name: `cpu`, or `cuda` when built with the `cuda` feature.
pub fn device(name: &str) -> crate::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Ok(candle_core::Device::new_cuda(0)?),
        "cuda" => Err(crate::Error::Usage(
            "this dalle was built without CUDA support: rebuild with `--features cuda` (needs nvcc)".into(),
        )),
        other => Err(crate::Error::Usage(format!("unknown device `{other}`: use cpu or cuda"))),
    }
}

/// Keep freed memory in the process instead of returning it to the kernel after every tensor.
/// Training allocates and frees the same large activation buffers each step; with glibc's
/// defaults each of them is a fresh `mmap` and a round of page faults (measured here: 49 s of
/// 63 s in the kernel for 10 dVAE steps; 8 s after this call).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
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
