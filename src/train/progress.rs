//! A one-line progress display: redrawn in place on a terminal, one line per `log_every` steps
//! otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::time::Instant;

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

pub(crate) struct Progress {
    total: usize,
    first: usize,
    log_every: usize,
    tty: bool,
    started: Instant,
    last_draw: Instant,
}

impl Progress {
    pub fn new(total: usize, first: usize, log_every: usize) -> Self {
        let now = Instant::now();
        Progress {
            total,
            first,
            log_every: log_every.max(1),
            tty: std::io::stderr().is_terminal(),
            started: now,
            last_draw: now,
        }
    }

    pub fn update(&mut self, step: usize, metrics: &[(&'static str, f64)]) {
        let due = if self.tty {
            self.last_draw.elapsed().as_millis() >= 200
        } else {
            step.is_multiple_of(self.log_every)
        };
        if !due && step != self.total {
            return;
        }
        self.last_draw = Instant::now();
        let rate = (step - self.first) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let width = 24;
        let filled = (step * width) / self.total.max(1);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled.min(width));
        let line = format!(
            "[{bar}] {step}/{}  {}  {rate:.2} steps/s",
            self.total,
            format_metrics(metrics)
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// A line of its own (on a terminal, above the redrawn progress line).
    pub fn note(&self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{line}");
    }

    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
