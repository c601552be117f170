//! The curves of a run: one row of metrics per logged step, kept in `metrics.csv` (a resumed
//! run reads it back) and drawn into `loss.png`.

use crate::fsutil::write_bytes_atomic;
use crate::Result;
use std::path::Path;

/// The loss curve: one row per logged step.
pub(super) struct History {
    names: Vec<String>,
    steps: Vec<usize>,
    rows: Vec<Vec<f64>>,
}

impl History {
    pub(super) fn load(path: &Path, upto: usize) -> History {
        let mut h = History {
            names: vec![],
            steps: vec![],
            rows: vec![],
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return h;
        };
        let mut lines = text.lines();
        if let Some(head) = lines.next() {
            h.names = head.split(',').skip(1).map(str::to_string).collect();
        }
        for line in lines {
            let mut cells = line.split(',');
            let Some(Ok(step)) = cells.next().map(str::parse::<usize>) else {
                continue;
            };
            if step > upto {
                break;
            }
            h.steps.push(step);
            h.rows
                .push(cells.map(|c| c.parse().unwrap_or(f64::NAN)).collect());
        }
        h
    }

    /// One row; a metric first seen here gets a new column (earlier rows read NaN there).
    pub(super) fn push(&mut self, step: usize, metrics: &[(&'static str, f64)]) {
        for (n, _) in metrics {
            if !self.names.iter().any(|m| m == n) {
                self.names.push(n.to_string());
            }
        }
        let row = self
            .names
            .iter()
            .map(|n| {
                metrics
                    .iter()
                    .find(|(m, _)| m == n)
                    .map_or(f64::NAN, |(_, v)| *v)
            })
            .collect();
        self.steps.push(step);
        self.rows.push(row);
    }

    pub(super) fn save(&self, out: &Path) -> Result<()> {
        let mut csv = format!("step,{}\n", self.names.join(","));
        for (s, r) in self.steps.iter().zip(&self.rows) {
            // Rows written before a column existed read NaN there.
            let cells: Vec<String> = (0..self.names.len())
                .map(|i| format!("{}", r.get(i).copied().unwrap_or(f64::NAN)))
                .collect();
            csv.push_str(&format!("{s},{}\n", cells.join(",")));
        }
        write_bytes_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
        let series: Vec<(&str, Vec<f64>)> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.as_str(),
                    self.rows
                        .iter()
                        .map(|r| r.get(i).copied().unwrap_or(f64::NAN))
                        .collect(),
                )
            })
            .collect();
        crate::plot::loss_plot(&out.join("loss.png"), &self.steps, &series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_adds_columns_for_metrics_first_seen_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::load(&dir.path().join("metrics.csv"), 0);
        h.push(1, &[("loss", 2.0)]);
        h.push(2, &[("loss", 1.5), ("heldout_loss", 1.7)]);
        h.push(3, &[("loss", 1.0)]);
        assert_eq!(h.names, ["loss", "heldout_loss"]);
        assert_eq!(h.rows[1], [1.5, 1.7]);
        assert!(h.rows[2][1].is_nan());
        h.save(dir.path()).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert_eq!(csv, "step,loss,heldout_loss\n1,2,NaN\n2,1.5,1.7\n3,1,NaN\n");
        let back = History::load(&dir.path().join("metrics.csv"), 10);
        assert_eq!(back.names, h.names);
        assert_eq!(back.steps, [1, 2, 3]);
        assert_eq!(back.rows[1], [1.5, 1.7]);
        assert!(back.rows[0][1].is_nan());
    }
}
