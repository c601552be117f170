//! Crash-test hooks. When the environment variable `DALLE_KILL_AT` is `NAME:N`, the process dies
//! at once at the point [`hit`]`(NAME, N)` marks — `abort`, which runs no destructor and flushes
//! nothing, so the files on disk are what a `kill -9` there would leave. The crash tests use it to
//! stop training and export at exact moments (e.g. half way through a checkpoint) and check that
//! a resume ends bit-identical and that no half-written output is ever left in place.

/// Die here if `DALLE_KILL_AT` names this point (`name:n`).
pub fn hit(name: &str, n: usize) {
    if let Some(v) = std::env::var_os("DALLE_KILL_AT") {
        if v.to_str() == Some(format!("{name}:{n}").as_str()) {
            eprintln!("DALLE_KILL_AT={name}:{n}: dying here");
            std::process::abort();
        }
    }
}
