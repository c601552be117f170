//! Training progress: an `indicatif` bar on a terminal, one line per `log_every` steps otherwise
//! (CI logs).

use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub(crate) fn format_metrics(metrics: &[(&'static str, f64)]) -> String {
    metrics
        .iter()
        .map(|(n, v)| {
            if v.abs() >= 1e-3 || *v == 0.0 {
                format!("{n} {v:.4}")
            } else {
                format!("{n} {v:.2e}")
            }
        })
        .collect::<Vec<_>>()
        .join("  ")
}

/// The progress of a training run: an `indicatif` bar (rate, ETA, the latest metrics) redrawn
/// on a terminal; elsewhere (CI logs, `nohup … > log`) the same as one plain line every
/// `log_every` steps, since a redrawn bar would be noise in a file.
pub(crate) struct Progress {
    /// Hidden when stderr is not a terminal.
    bar: ProgressBar,
    total: usize,
    first: usize,
    log_every: usize,
    tty: bool,
    started: Instant,
}

impl Progress {
    /// A run of `total` steps, resumed at `first` (the rate counts from there).
    pub fn new(total: usize, first: usize, log_every: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            let style = ProgressStyle::with_template(
                "[{bar:24}] {pos}/{len}  {rate} · ETA {eta}  {wide_msg}",
            )
            .expect("a valid template")
            .progress_chars("#>.")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.2} steps/s", s.per_sec());
            });
            ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr_with_hz(5))
                .with_style(style)
                .with_position(first as u64)
        } else {
            ProgressBar::hidden()
        };
        Progress {
            bar,
            total,
            first,
            log_every: log_every.max(1),
            tty,
            started: Instant::now(),
        }
    }

    pub fn update(&mut self, step: usize, metrics: &[(&'static str, f64)]) {
        if self.tty {
            self.bar.set_message(format_metrics(metrics));
            self.bar.set_position(step as u64);
            return;
        }
        if !step.is_multiple_of(self.log_every) && step != self.total {
            return;
        }
        let rate = (step - self.first) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let width = 24;
        let filled = (step * width) / self.total.max(1);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled.min(width));
        let eta = if rate > 0.0 {
            let left = (self.total.saturating_sub(step)) as f64 / rate;
            format!("  ETA {}", HumanDuration(Duration::from_secs_f64(left)))
        } else {
            String::new()
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "[{bar}] {step}/{}  {}  {rate:.2} steps/s{eta}",
            self.total,
            format_metrics(metrics)
        );
        let _ = err.flush();
    }

    /// A line of its own (on a terminal, above the bar).
    pub fn note(&self, line: &str) {
        if self.tty {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// Leave the bar's last state on the screen.
    pub fn finish(&self) {
        if self.tty {
            self.bar.finish();
            eprintln!(); // the bar leaves the cursor on its own line
        }
    }
}
