//! The `dalle` command line; each command lives in `cli/`.

mod cli;

use clap::Parser;

/// Training frees and re-allocates the same large tensors every step; this keeps them mapped
/// instead of faulting them in afresh, while a training command runs (see `dalle::kernels::alloc`).
#[cfg(not(feature = "mimalloc-measure"))]
#[global_allocator]
static ALLOC: dalle::kernels::alloc::ReuseLarge = dalle::kernels::alloc::ReuseLarge;
#[cfg(feature = "mimalloc-measure")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    dalle::util::pin_thread_count();
    dalle::util::tune_allocator();
    if std::env::var_os("DALLE_SYSTEM_ALLOC").is_some() {
        dalle::kernels::alloc::forbid_reuse();
    }
    dalle::util::default_sigpipe();
    let cli = cli::Cli::try_parse().unwrap_or_else(|e| {
        // clap reads `--seed -1` as an unknown flag `-1` and suggests `-- -1`, which would make
        // it a prompt; say what is wrong instead.
        if e.kind() == clap::error::ErrorKind::UnknownArgument {
            let negative = std::env::args()
                .skip(1)
                .collect::<Vec<_>>()
                .windows(2)
                .find_map(|w| {
                    (w[0].starts_with("--") && w[1].starts_with('-') && w[1].parse::<f64>().is_ok())
                        .then(|| (w[0].clone(), w[1].clone()))
                });
            if let Some((flag, value)) = negative {
                eprintln!("error: {flag} {value}: {flag} does not take a negative number");
                std::process::exit(2);
            }
        }
        e.exit()
    });
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
