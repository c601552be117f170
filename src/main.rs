//! The `dalle` command line; each command lives in `cli/`.

mod cli;

use clap::Parser;

/// mimalloc: the same training-step times as the large-block reuse allocator this project had
/// written for itself (glibc `mmap`s and faults in every block over 32 MB afresh), with ~20% less
/// peak memory (bench/NOTES.md, optimisation 46).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = dalle::kernels::isa::from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    dalle::util::pin_thread_count();
    dalle::util::tune_allocator();
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
