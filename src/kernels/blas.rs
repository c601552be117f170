//! An optional BLAS under [`super::matmul`]: OpenBLAS from PyPI's `scipy-openblas32` wheel
//! (`dalle setup blas`), or any library that exports `cblas_sgemm`, loaded at run time. Nothing
//! links against it, so the build and the default binary stay pure Rust; where none is set up,
//! the products run on the `gemm` crate (candle's own kernel) as before.
//!
//! Which library, from `DALLE_BLAS`: unset or empty, the one `dalle setup blas` unpacked into
//! [`library_dir`] if it is there, else none; `off`, none; a path, that library, and an error on
//! every product if it cannot be loaded (never a silent fall back to the slower kernel).
//! OpenBLAS's kernels are picked for the CPU when it loads (its DYNAMIC_ARCH build), so the
//! same file serves AVX2, AVX-512 and AMX machines. Measured on a 2-core Xeon (Emerald Rapids):
//! 225 GFLOP/s on 2048³ and 400 on the transformer's (2304 × 256) · (256 × 768), where the
//! `gemm` crate gave about half (bench/NOTES.md).

use candle_core::Result;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The wheel `dalle setup blas` fetches, pinned.
pub const OPENBLAS_WHEEL: &str = "scipy-openblas32==0.3.34.481.3";
/// The library file inside that wheel, and its name in [`library_dir`].
pub const OPENBLAS_LIBRARY: &str = "libscipy_openblas.so";

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
) -> ();
type SetThreads = unsafe extern "C" fn(c_int) -> ();

/// A raw pointer the bands of one product share; each band touches its own part.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used inside [`Blas::gemm`], whose bands write disjoint parts of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `SendPtr`, not its field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// A loaded BLAS: its `cblas_sgemm` and where it came from.
pub struct Blas {
    sgemm: Sgemm,
    pub path: PathBuf,
    /// The symbol prefix found (`scipy_` for the wheel's build, empty for a plain OpenBLAS,
    /// MKL or BLIS).
    pub prefix: &'static str,
    _lib: libloading::Library,
}

/// Where `dalle setup blas` unpacks the library: the cache directory of `dalle setup ort`
/// (`$DALLE_CACHE_DIR`, else `$XDG_CACHE_HOME/dalle`, else `~/.cache/dalle`), then
/// `blas/openblas-<version>`.
pub fn library_dir() -> PathBuf {
    let version = OPENBLAS_WHEEL.rsplit("==").next().unwrap_or("0");
    dalle_runtimes::ort::cache_dir()
        .join("blas")
        .join(format!("openblas-{version}"))
}

impl Blas {
    /// Load `path` and find its `cblas_sgemm` (with or without the wheel's `scipy_` prefix);
    /// it is set to run on the calling thread alone ([`Blas::gemm`] splits the work).
    pub fn load(path: &Path) -> std::result::Result<Blas, String> {
        let what = |e: &dyn std::fmt::Display| format!("BLAS library {}: {e}", path.display());
        if !path.is_file() {
            return Err(what(&"no such file; run `dalle setup blas`, point DALLE_BLAS at a library exporting cblas_sgemm, or set DALLE_BLAS=off"));
        }
        // SAFETY: loading a shared library runs its initialisers; a BLAS's set up its thread
        // pool and read the CPU's features, nothing else.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            what(&format!("cannot be loaded as a shared library ({e}{why})"))
        })?;
        for prefix in ["scipy_", ""] {
            let name = format!("{prefix}cblas_sgemm\0");
            // SAFETY: `cblas_sgemm` has this signature in every CBLAS (cblas.h).
            let Ok(sgemm) = (unsafe { lib.get::<Sgemm>(name.as_bytes()) }) else {
                continue;
            };
            let sgemm = *sgemm;
            for threads in [
                format!("{prefix}openblas_set_num_threads\0"),
                "MKL_Set_Num_Threads\0".to_string(),
            ] {
                // SAFETY: both take the thread count as an int and return nothing.
                if let Ok(set) = unsafe { lib.get::<SetThreads>(threads.as_bytes()) } {
                    unsafe { set(1) };
                    break;
                }
            }
            return Ok(Blas {
                sgemm,
                path: path.to_path_buf(),
                prefix,
                _lib: lib,
            });
        }
        Err(what(
            &"exports no cblas_sgemm; point DALLE_BLAS at OpenBLAS, MKL or BLIS",
        ))
    }

    /// `dst (m × n) = lhs · rhs (+ dst)` as [`super::matmul`] takes them, if each operand has a
    /// unit stride (row- or column-major), lies inside its slice, and every size fits a C int;
    /// `None` otherwise (nothing written). Split
    /// across up to `threads` of rayon's threads.
    pub fn gemm(
        &self,
        threads: usize,
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        lhs: (&[f32], usize, usize),
        rhs: (&[f32], usize, usize),
        accumulate: bool,
    ) -> Option<()> {
        // (transpose flag, leading dimension) of an operand of `rows × cols`, or None: a unit
        // column stride is the operand row-major; a unit row stride, its transpose row-major.
        let view = |(_, rs, cs): (&[f32], usize, usize), rows: usize, cols: usize| {
            if cs == 1 && rs >= cols.max(1) {
                Some((NO_TRANS, rs))
            } else if rs == 1 && cs >= rows.max(1) {
                Some((TRANS, cs))
            } else {
                None
            }
        };
        // Every element the strides reach inside its slice (else None: not a product to run).
        if !super::product_fits((m, n, k), dst, lhs, rhs) {
            return None;
        }
        let (ta, lda) = view(lhs, m, k)?;
        let (tb, ldb) = view(rhs, k, n)?;
        let fits = |v: usize| c_int::try_from(v).ok();
        let (_, _, ki) = (fits(m)?, fits(n)?, fits(k)?);
        let (lda, ldb, ldc) = (fits(lda)?, fits(ldb)?, fits(n.max(1))?);
        if m == 0 || n == 0 {
            return Some(());
        }
        if k == 0 {
            if !accumulate {
                dst.fill(0.0);
            }
            return Some(());
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        // The library runs on one thread (set at load); the cores split the product here, by
        // bands of output rows, or of output columns where there are few rows. One pool of
        // threads (rayon's) instead of two: OpenBLAS's own workers spin between calls, taking
        // the cores from the element-wise ops that run between the products.
        let by_rows = m >= n || n < 2 * 64;
        let (long, unit) = if by_rows { (m, 16) } else { (n, 64) };
        let bands = threads.min(long / unit).max(1);
        let per = long.div_ceil(bands).next_multiple_of(unit);
        let dst_ptr = SendPtr(dst.as_mut_ptr());
        let (a, b) = (
            SendPtr(lhs.0.as_ptr().cast_mut()),
            SendPtr(rhs.0.as_ptr().cast_mut()),
        );
        let band = |i: usize| {
            let start = i * per;
            let len = per.min(long - start.min(long));
            if len == 0 {
                return;
            }
            // Rows start.. of lhs (and of dst), or columns start.. of rhs (and of dst).
            let (mb, nb) = if by_rows { (len, n) } else { (m, len) };
            let (a_off, b_off, c_off) = if by_rows {
                (start * lhs.1, 0, start * n)
            } else {
                (0, start * rhs.2, start)
            };
            let (mb, nb) = (mb as c_int, nb as c_int);
            // SAFETY: every element the strides reach lies inside its slice and `dst` holds
            // m × n values (both checked above); each band reads a
            // sub-matrix of the operands and writes its own rows or columns of `dst`, which no
            // other band touches; the flags and leading dimensions describe exactly the strides.
            unsafe {
                (self.sgemm)(
                    ROW_MAJOR,
                    ta,
                    tb,
                    mb,
                    nb,
                    ki,
                    1.0,
                    a.at(a_off),
                    lda,
                    b.at(b_off),
                    ldb,
                    beta,
                    dst_ptr.at(c_off),
                    ldc,
                )
            };
        };
        if bands == 1 {
            band(0);
        } else {
            use rayon::prelude::*;
            (0..bands).into_par_iter().for_each(band);
        }
        Some(())
    }
}

/// The BLAS the products use (see the module's text), loaded once.
pub fn blas() -> Result<Option<&'static Blas>> {
    static BLAS: OnceLock<std::result::Result<Option<Blas>, String>> = OnceLock::new();
    let chosen = BLAS.get_or_init(|| {
        let var = std::env::var_os("DALLE_BLAS").unwrap_or_default();
        if var == "off" || var == "none" {
            return Ok(None);
        }
        if var.is_empty() {
            let default = library_dir().join(OPENBLAS_LIBRARY);
            return if default.is_file() {
                Blas::load(&default).map(Some)
            } else {
                Ok(None)
            };
        }
        let path = PathBuf::from(var);
        if path.is_dir() {
            return Blas::load(&path.join(OPENBLAS_LIBRARY))
                .map(Some)
                .map_err(|e| format!("DALLE_BLAS names a directory: {e}"));
        }
        Blas::load(&path).map(Some)
    });
    match chosen {
        Ok(b) => Ok(b.as_ref()),
        Err(e) => Err(candle_core::Error::Msg(e.clone())),
    }
}

/// Load the BLAS now (see [`blas`]), so that a `DALLE_BLAS` that cannot be loaded is reported
/// before a command starts its work, as a usage error.
pub fn check() -> crate::Result<()> {
    blas().map(|_| ()).map_err(|e| match e {
        candle_core::Error::Msg(m) => crate::Error::Usage(m),
        other => other.into(),
    })
}

/// What the products run on, in words, for the bench and `dalle info`.
pub fn describe() -> String {
    match blas() {
        Ok(Some(b)) => format!("BLAS {}", b.path.display()),
        Ok(None) => {
            "the gemm crate (no BLAS set up: `dalle setup blas` for faster training)".to_string()
        }
        Err(e) => format!("error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library of `DALLE_BLAS` (a path), else the setup directory's: CI sets one up
    /// (`scripts/test.sh`) and must test it; elsewhere a machine without one skips.
    fn library() -> Option<Blas> {
        let var = std::env::var_os("DALLE_BLAS").filter(|v| !v.is_empty() && v != "off");
        let path = var.map_or_else(|| library_dir().join(OPENBLAS_LIBRARY), PathBuf::from);
        match Blas::load(&path) {
            Ok(b) => Some(b),
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI must test the BLAS: {e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    /// Every layout the callers use (row-major, transposed, strided rows), split by rows and by
    /// columns, on one thread and on several, with and without accumulation: the same values
    /// as the `gemm` crate's product.
    #[test]
    fn blas_products_equal_the_gemm_crates() {
        let Some(blas) = library() else { return };
        let mut rng = crate::rng::Rng::new(5);
        for (m, n, k) in [
            (100, 7, 33),
            (5, 300, 17),
            (64, 64, 64),
            (1, 9, 4),
            (37, 129, 1),
        ] {
            let a: Vec<f32> = (0..m * k * 2).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n * 2).map(|_| rng.normal() as f32).collect();
            // (values, row stride, column stride): row-major, transposed, rows padded to twice.
            let lhs = [(&a[..], k, 1), (&a[..], 1, m), (&a[..], 2 * k, 1)];
            let rhs = [(&b[..], n, 1), (&b[..], 1, k), (&b[..], 2 * n, 1)];
            for (l, r) in lhs.iter().flat_map(|l| rhs.iter().map(move |r| (*l, *r))) {
                for (threads, accumulate) in [(1, false), (2, false), (4, true)] {
                    let start: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
                    let (mut want, mut got) = (start.clone(), start.clone());
                    super::super::matmul_gemm_crate((m, n, k), &mut want, l, r, accumulate)
                        .unwrap();
                    blas.gemm(threads, (m, n, k), &mut got, l, r, accumulate)
                        .expect("a unit-stride layout");
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "({m}, {n}, {k}) strides {:?} {:?} at {i}: {g} vs {w}",
                            (l.1, l.2),
                            (r.1, r.2)
                        );
                    }
                }
            }
        }
        // No unit stride: left to the gemm crate.
        let v = vec![1f32; 64];
        let mut out = vec![0f32; 4];
        assert!(blas
            .gemm(1, (2, 2, 2), &mut out, (&v, 4, 2), (&v, 2, 1), false)
            .is_none());
        // Operands shorter than their strides reach: refused, nothing read or written.
        let gemm = |mnk, lhs, rhs, out: &mut Vec<f32>| blas.gemm(1, mnk, out, lhs, rhs, false);
        assert!(gemm((2, 2, 40), (&v[..], 40, 1), (&v[..], 2, 1), &mut out).is_none());
        assert!(gemm((3, 2, 2), (&v[..], 2, 1), (&v[..], 2, 1), &mut out).is_none());
        assert!(gemm((2, 2, 2), (&v[..], 2, 1), (&v[..], 2, 1), &mut out).is_some());
        assert_eq!(out, [2.0; 4]);
    }
}
