//! Crash-test hooks. When the environment variable `DALLE_KILL_AT` is `NAME:N`, the process dies
//! at once at the point [`hit`]`(NAME, N)` marks — `abort`, which runs no destructor and flushes
//! nothing, so the files on disk are what a `kill -9` there would leave. The crash tests use it to
//! stop training and export at exact moments (e.g. half way through a checkpoint) and check that
//! a resume ends bit-identical and that no half-written output is ever left in place.
//!
//! `DALLE_FAIL_AT=NAME:N` makes the N-th pass through [`fail`]`(NAME)` in this process an error
//! (once): the serving tests use it to make one request's runtime call fail.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Die here if `DALLE_KILL_AT` names this point (`name:n`).
pub fn hit(name: &str, n: usize) {
    if let Some(v) = std::env::var_os("DALLE_KILL_AT") {
        if v.to_str() == Some(format!("{name}:{n}").as_str()) {
            eprintln!("DALLE_KILL_AT={name}:{n}: dying here");
            std::process::abort();
        }
    }
}

/// An error on the `N`-th call with this name if `DALLE_FAIL_AT` is `name:N` (counted per
/// process over every name), else `Ok`.
pub fn fail(name: &str) -> Result<(), crate::RuntimeError> {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let Some(v) = std::env::var_os("DALLE_FAIL_AT") else {
        return Ok(());
    };
    let Some((point, n)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return Ok(());
    };
    if point != name {
        return Ok(());
    }
    let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    if n.parse() == Ok(call) {
        return Err(crate::RuntimeError::Run {
            runtime: "failpoint",
            message: format!("DALLE_FAIL_AT={name}:{n}: this call fails"),
        });
    }
    Ok(())
}
