//! Which x86 vector extensions the kernels use: detected at run time (no `-C target-cpu`
//! needed; one binary runs on AVX2-only and AVX-512 machines alike), and capped by
//! `DALLE_CPU` (`avx512`, the default: all the CPU has; `avx2`; `portable`: neither, the
//! `gemm` crate and plain loops), so that the slower paths can be run and tested on any machine.

use std::sync::atomic::{AtomicU8, Ordering};

/// A cap on the extensions the kernels use, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable = 0,
    Avx2 = 1,
    Avx512 = 2,
}

const UNSET: u8 = u8::MAX;
static CAP: AtomicU8 = AtomicU8::new(UNSET);

impl Isa {
    /// `DALLE_CPU`'s values: `avx512` (or unset / empty), `avx2`, `portable`.
    pub fn parse(v: &str) -> Option<Isa> {
        match v {
            "" | "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "portable" => Some(Isa::Portable),
            _ => None,
        }
    }
}

/// The cap from `DALLE_CPU`, or an error that says what it may be.
pub fn from_env() -> Result<Isa, String> {
    let v = std::env::var("DALLE_CPU").unwrap_or_default();
    Isa::parse(&v).ok_or_else(|| {
        format!("DALLE_CPU={v:?} is not a kernel level: use avx512 (the default: all the CPU has), avx2 or portable")
    })
}

/// The cap in force: set by [`set_cap`], else `DALLE_CPU` (an unknown value caps nothing here;
/// the binary refuses it at start-up).
pub fn cap() -> Isa {
    match CAP.load(Ordering::Relaxed) {
        0 => Isa::Portable,
        1 => Isa::Avx2,
        2 => Isa::Avx512,
        _ => {
            let c = from_env().unwrap_or(Isa::Avx512);
            CAP.store(c as u8, Ordering::Relaxed);
            c
        }
    }
}

/// Cap the kernels at `isa` from now on (the tests run every path with it).
pub fn set_cap(isa: Isa) {
    CAP.store(isa as u8, Ordering::Relaxed);
}

/// Whether the AVX2 + FMA kernels may run: the CPU has both and the cap allows them.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cap() >= Isa::Avx2 && avx2_detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 and FMA, whatever the cap.
pub fn avx2_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512F kernels may run: the CPU has it and the cap allows them.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cap() >= Isa::Avx512 && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The extensions in use, in words, for the bench and `dalle info`.
pub fn describe() -> &'static str {
    if avx512() {
        "AVX-512"
    } else if avx2() {
        "AVX2"
    } else {
        "portable"
    }
}
