//! One row of `dalle bench`'s decoding table: a runtime at a batch size, decoding the whole
//! image with its KV cache (several passes, each against the floor of its own moment) and a few
//! positions without it.

use super::machine::{decode_step_cost, Ceilings};
use crate::Result;
use dalle_runtimes::{KvCache, Manifest, Session};
use serde::Serialize;
use std::time::Instant;

/// Steps around the first, middle and last image position whose median is reported: single
/// steps of a few milliseconds are noisy on a shared machine, and so were 5 (session 12: a
/// batch-1 pass of 4.0 ms steps read 5.5 ms at its middle five). 15 steps are about an image
/// row of `small`, over which a step's floor changes by < 1%.
const WINDOW: usize = 15;

/// How many cached decodes of the image a row runs: at least `at_least`, and more (up to
/// [`MAX_PASSES_FACTOR`] × `at_least`) until `seconds` have passed.
#[derive(Clone, Copy, Debug)]
pub struct Passes {
    pub at_least: usize,
    pub seconds: f64,
}

const MAX_PASSES_FACTOR: usize = 10;

/// One cached decode of the image, with the machine's memory rates measured around it.
#[derive(Clone, Debug, Default)]
pub struct Pass {
    pub prefill_s: f64,
    /// Each image position's step, seconds.
    pub steps: Vec<f64>,
    /// Copy and read rates: the higher of those measured just before and just after the pass
    /// (the matmul rate is left at zero).
    pub memory: Ceilings,
}

/// One runtime at one batch size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DecodeRow {
    pub runtime: String,
    pub batch: usize,
    /// Caption prefill (past 0 → text_len) of the fastest pass, seconds.
    pub prefill_s: f64,
    /// Cached decodes of the image this row ran.
    pub passes: usize,
    /// The pass (from 0) whose steps are reported below and set against the floor: the one
    /// that comes closest to the floor of its own moment ([`DecodeRow::set_floor`]).
    pub floor_pass: usize,
    /// Σ of that pass's image steps, seconds.
    pub steps_s: f64,
    /// That pass's median step around the first, middle and last image position, seconds.
    pub first_step_s: f64,
    pub middle_step_s: f64,
    pub last_step_s: f64,
    /// The last image step ÷ the first (each the median of its [`WINDOW`]), the median over
    /// every pass: a hiccup in one pass's last steps does not decide whether the step cost is
    /// flat (session 11: 1.56 from one pass's 21 ms steps, 1.07 when rerun).
    pub last_over_first: f64,
    /// Prefill + every image step with the KV cache (no sampling), seconds.
    pub transformer_s: f64,
    /// The dVAE decoder on the whole batch, seconds.
    pub dvae_decode_s: f64,
    /// transformer_s + dvae_decode_s.
    pub whole_image_s: f64,
    /// batch × image tokens ÷ transformer_s.
    pub image_tokens_per_s: f64,
    /// Without the cache (every step recomputes its whole prefix): step times measured at the
    /// `recompute_positions` image positions and interpolated linearly over the image.
    pub no_cache_transformer_s: f64,
    pub recompute_positions: Vec<usize>,
    /// no_cache_transformer_s ÷ transformer_s.
    pub kv_cache_speedup: f64,
    /// Σ over the image of the roofline floor of each step, seconds, and that ÷ `steps_s`
    /// (1 = at the machine's limit).
    pub decode_floor_s: f64,
    pub decode_floor_fraction: f64,
    /// Floor of the middle step and that ÷ its measured time.
    pub middle_floor_s: f64,
    pub middle_floor_fraction: f64,
    /// The middle step against its floor with the fastest f32 kernel measured in the run (the
    /// BLAS's or the peer's torch, where faster than candle's): see `BenchReport::best_f32`.
    pub middle_floor_fraction_best: f64,
    /// Peak resident memory from opening the session to the end of its measurements (the
    /// bench's own probe buffers, resident throughout, taken out).
    pub peak_rss_mb: Option<f64>,
    /// The ceilings this row's floor uses: the copy and read rates measured around its floor
    /// pass (the higher of just before and just after it), the matmul rate the higher of just
    /// before and just after the row. The machine's speed drifts 20–30% over minutes and its
    /// memory switches between a fast and a slow state within seconds, so a floor from
    /// ceilings measured at another moment than the steps compares them with another machine.
    pub ceilings: Ceilings,
    #[serde(skip)]
    pub pass_log: Vec<Pass>,
}

fn probe_ids(m: &Manifest, batch: usize) -> Vec<i64> {
    let (l, s) = (m.token_layout(), m.max_seq());
    (0..batch * s)
        .map(|i| {
            let (row, p) = (i / s, i % s);
            if p < l.text_len {
                ((p * 31 + row * 7) % l.text_vocab) as i64
            } else {
                l.image(((p * 17 + row * 5) % l.codebook) as u32) as i64
            }
        })
        .collect()
}

/// Columns `from..to` of every row of a `[batch, s]` id matrix.
fn columns(ids: &[i64], s: usize, from: usize, to: usize) -> Vec<i64> {
    ids.chunks(s).flat_map(|r| &r[from..to]).copied().collect()
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn window(steps: &[f64], centre: usize) -> f64 {
    let lo = centre
        .saturating_sub(WINDOW / 2)
        .min(steps.len() - WINDOW.min(steps.len()));
    median(&steps[lo..(lo + WINDOW).min(steps.len())])
}

/// Linear interpolation of `(x, y)` samples (sorted by x) at `x`.
fn interpolate(points: &[(usize, f64)], x: usize) -> f64 {
    match points {
        [] => 0.0,
        [(_, y)] => *y,
        _ => {
            let i = points
                .windows(2)
                .position(|w| x <= w[1].0)
                .unwrap_or(points.len() - 2);
            let ((x0, y0), (x1, y1)) = (points[i], points[i + 1]);
            y0 + (y1 - y0) * (x as f64 - x0 as f64) / (x1 as f64 - x0 as f64)
        }
    }
}

impl DecodeRow {
    /// Set each pass against the roofline floor of its own moment — copy and read rates from
    /// its [`Pass::memory`], the matmul rate from `around` (its memory rates are not used) —
    /// and report the pass that comes closest to its floor over all its steps: its steps, its
    /// floor and its ceilings.
    pub fn set_floor(&mut self, m: &Manifest, around: &Ceilings) {
        let (t, s) = (m.geometry.text_len, m.max_seq());
        let n = s - t;
        let floors_at = |c: &Ceilings| -> Vec<f64> {
            (t..s)
                .map(|p| decode_step_cost(m, self.batch, p).floor_s(c))
                .collect()
        };
        let mut best: Option<(f64, usize, Ceilings, Vec<f64>)> = None;
        for (i, pass) in self.pass_log.iter().enumerate() {
            let c = Ceilings {
                matmul_gflop_per_s: around.matmul_gflop_per_s,
                matmul_n: around.matmul_n,
                ..pass.memory.clone()
            };
            let floors = floors_at(&c);
            let fraction = floors.iter().sum::<f64>() / pass.steps.iter().sum::<f64>();
            if best.as_ref().is_none_or(|b| fraction > b.0) {
                best = Some((fraction, i, c, floors));
            }
        }
        let Some((fraction, i, c, floors)) = best else {
            return;
        };
        let steps = &self.pass_log[i].steps;
        self.floor_pass = i;
        self.steps_s = steps.iter().sum();
        self.first_step_s = window(steps, 0);
        self.middle_step_s = window(steps, n / 2);
        self.last_step_s = window(steps, n - 1);
        self.decode_floor_s = floors.iter().sum();
        self.decode_floor_fraction = fraction;
        self.middle_floor_s = floors[n / 2];
        self.middle_floor_fraction = self.middle_floor_s / self.middle_step_s;
        self.ceilings = c;
    }
}

/// The median over `log`'s passes of last ÷ first image step (NaN for no passes).
fn last_over_first(log: &[Pass], n: usize) -> f64 {
    let mut r: Vec<f64> = log
        .iter()
        .map(|p| window(&p.steps, n - 1) / window(&p.steps, 0))
        .collect();
    r.sort_by(f64::total_cmp);
    match r.len() {
        0 => f64::NAN,
        l if l % 2 == 1 => r[l / 2],
        l => 0.5 * (r[l / 2 - 1] + r[l / 2]),
    }
}

/// Measure one session at one batch size; `memory` measures the machine's memory rates, which
/// happens before the first cached decode and after each. The step figures are the fastest
/// pass's, and the floor is left at zero, until [`DecodeRow::set_floor`] sets each pass against
/// the floor of its moment.
pub fn measure(
    session: &dyn Session,
    batch: usize,
    recompute: usize,
    passes: Passes,
    memory: &mut dyn FnMut() -> Result<Ceilings>,
) -> Result<DecodeRow> {
    let m = session.manifest();
    let (t, s) = (m.geometry.text_len, m.max_seq());
    let n = s - t;
    let ids = probe_ids(m, batch);
    let text = columns(&ids, s, 0, t);

    // Warm-up: plans, allocations and caches of the first calls are not what a user waits for
    // image after image.
    let mut cache = KvCache::new(m, batch);
    session.forward(&text, batch, &mut cache)?;
    session.forward(&columns(&ids, s, t, t + 1), batch, &mut cache)?;

    // Cached decodes, as many as `passes` asks for, each with the memory rates around it:
    // this machine's memory switches between a fast and a slow state (a two-thread read of
    // 177 MB: ~55 against ~33 GB/s) for spans of a fraction of a second to tens of seconds, so
    // a pass is compared with the machine of its own moment. The fastest pass gives the row's
    // whole-image figures.
    let mut log: Vec<Pass> = Vec::new();
    let mut last = memory()?;
    let begun = Instant::now();
    let at_least = passes.at_least.max(1);
    while log.len() < at_least
        || (begun.elapsed().as_secs_f64() < passes.seconds
            && log.len() < MAX_PASSES_FACTOR * at_least)
    {
        let mut cache = KvCache::new(m, batch);
        let start = Instant::now();
        session.forward(&text, batch, &mut cache)?;
        let prefill_s = start.elapsed().as_secs_f64();
        let mut steps = Vec::with_capacity(n);
        for p in t..s {
            let step = columns(&ids, s, p, p + 1);
            let start = Instant::now();
            session.forward(&step, batch, &mut cache)?;
            steps.push(start.elapsed().as_secs_f64());
        }
        let now = memory()?;
        log.push(Pass {
            prefill_s,
            steps,
            memory: last.strictest(&now),
        });
        last = now;
    }
    let total = |p: &Pass| p.prefill_s + p.steps.iter().sum::<f64>();
    let fastest = log
        .iter()
        .min_by(|a, b| total(a).total_cmp(&total(b)))
        .expect("at least one pass");
    let (transformer_s, prefill_s) = (total(fastest), fastest.prefill_s);
    let steps = fastest.steps.clone();

    let codes: Vec<i64> = ids
        .chunks(s)
        .flat_map(|r| &r[t..])
        .map(|&id| id - m.token_layout().image_offset() as i64)
        .collect();
    let start = Instant::now();
    session.decode(&codes, batch)?;
    let dvae_decode_s = start.elapsed().as_secs_f64();

    // Without the cache: step p recomputes positions 0..=p from scratch.
    let k = recompute.clamp(2, n);
    let positions: Vec<usize> = (0..k).map(|i| t + i * (n - 1) / (k - 1)).collect();
    let mut points = Vec::with_capacity(k);
    for &p in &positions {
        let mut fresh = KvCache::new(m, batch);
        let prefix = columns(&ids, s, 0, p + 1);
        let start = Instant::now();
        session.forward(&prefix, batch, &mut fresh)?;
        points.push((p, start.elapsed().as_secs_f64()));
    }
    let no_cache_transformer_s = prefill_s + (t..s).map(|p| interpolate(&points, p)).sum::<f64>();

    Ok(DecodeRow {
        runtime: session.name().to_string(),
        batch,
        prefill_s,
        passes: log.len(),
        floor_pass: 0,
        steps_s: steps.iter().sum(),
        first_step_s: window(&steps, 0),
        middle_step_s: window(&steps, n / 2),
        last_step_s: window(&steps, n - 1),
        last_over_first: last_over_first(&log, n),
        transformer_s,
        dvae_decode_s,
        whole_image_s: transformer_s + dvae_decode_s,
        image_tokens_per_s: (batch * n) as f64 / transformer_s,
        no_cache_transformer_s,
        recompute_positions: positions,
        kv_cache_speedup: no_cache_transformer_s / transformer_s,
        decode_floor_s: 0.0,
        decode_floor_fraction: 0.0,
        middle_floor_s: 0.0,
        middle_floor_fraction: 0.0,
        middle_floor_fraction_best: 0.0,
        peak_rss_mb: None,
        ceilings: Ceilings::default(),
        pass_log: log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_is_linear_between_samples_and_exact_at_them() {
        let pts = [(10, 1.0), (20, 3.0), (30, 4.0)];
        assert_eq!(interpolate(&pts, 10), 1.0);
        assert_eq!(interpolate(&pts, 15), 2.0);
        assert_eq!(interpolate(&pts, 25), 3.5);
        assert_eq!(interpolate(&pts, 30), 4.0);
    }

    #[test]
    fn each_pass_meets_the_floor_of_its_own_moment() {
        let cfg = crate::config::Config::preset("tiny").unwrap();
        let m = crate::runtime::manifest_of(&cfg);
        let n = cfg.geometry.image_tokens();
        let pass = |step: f64, copy: f64| Pass {
            prefill_s: 0.1,
            steps: vec![step; n],
            memory: Ceilings {
                copy_gb_per_s: copy,
                read_gb_per_s: copy,
                ..Ceilings::default()
            },
        };
        // A matmul rate so high that every floor is the memory one: floor ∝ 1 / copy rate.
        let around = Ceilings {
            copy_gb_per_s: 1000.0,
            matmul_gflop_per_s: 1e9,
            ..Ceilings::default()
        };
        let mut row = DecodeRow {
            batch: 1,
            // 1 ms steps on a fast machine, 2 ms on one 10× slower: the second is nearer its
            // floor (5× its fraction), and the row's copy rate is its moment's, not `around`'s.
            pass_log: vec![pass(1e-3, 100.0), pass(2e-3, 10.0)],
            ..DecodeRow::default()
        };
        row.set_floor(&m, &around);
        assert_eq!(row.floor_pass, 1);
        assert_eq!(row.ceilings.copy_gb_per_s, 10.0);
        assert_eq!(row.ceilings.matmul_gflop_per_s, 1e9);
        assert_eq!(row.middle_step_s, 2e-3);
        let bytes = |p| decode_step_cost(&m, 1, p).bytes;
        let t = cfg.geometry.text_len;
        let floor: f64 = (t..t + n).map(|p| bytes(p) / 10e9).sum();
        assert!((row.decode_floor_s - floor).abs() < 1e-12 * floor.max(1.0));
        assert!((row.decode_floor_fraction - floor / (n as f64 * 2e-3)).abs() < 1e-9);
    }

    /// Last ÷ first is the median over the passes: one pass with slow last steps (a hiccup)
    /// does not decide it, whichever pass the row reports.
    #[test]
    fn last_over_first_is_the_median_over_passes() {
        let flat = |v: f64| Pass {
            steps: vec![v; 20],
            ..Pass::default()
        };
        let mut hiccup = flat(1.0);
        hiccup.steps[10..].fill(1.6);
        let log = [flat(1.0), hiccup.clone(), flat(2.0)];
        assert_eq!(last_over_first(&log, 20), 1.0);
        assert!((last_over_first(&[flat(1.0), hiccup], 20) - 1.3).abs() < 1e-12);
        assert!(last_over_first(&[], 20).is_nan());
    }

    #[test]
    fn window_median_stays_inside_the_steps() {
        let mut steps: Vec<f64> = (0..20).map(f64::from).collect();
        steps[0] = 100.0;
        assert_eq!(window(&steps, 0), 8.0); // 1‥14 and 100
        assert_eq!(window(&steps, 10), 10.0); // 3‥17
        assert_eq!(window(&steps, 19), 12.0); // 5‥19
        assert_eq!(window(&steps[..2], 1), 100.0);
    }
}
