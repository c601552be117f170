//! `GET /metrics`: Prometheus text format (version 0.0.4), written by hand — a handful of series.

use super::App;
use axum::http::StatusCode;
use dalle_runtimes::batcher::{BatcherStats, ROW_BUCKETS};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the request latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Over how long the image tokens/s gauge is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inner {
    /// (endpoint, status) → requests answered.
    requests: BTreeMap<(&'static str, u16), u64>,
    /// Per endpoint: latency bucket counts (the last: above every bound), sum of seconds.
    latency: BTreeMap<&'static str, (Vec<u64>, f64)>,
    /// (when, image tokens so far), oldest first, over the last `RATE_WINDOW`.
    token_samples: Vec<(Instant, u64)>,
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one answered request.
    pub fn observe(&self, endpoint: &'static str, status: StatusCode, took: Duration) {
        let mut m = self.lock();
        *m.requests.entry((endpoint, status.as_u16())).or_default() += 1;
        let (buckets, sum) = m
            .latency
            .entry(endpoint)
            .or_insert_with(|| (vec![0; LATENCY_BUCKETS.len() + 1], 0.0));
        let s = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        buckets[i] += 1;
        *sum += s;
    }

    fn sample_tokens(&self, tokens: u64) {
        let now = Instant::now();
        let mut m = self.lock();
        m.token_samples.push((now, tokens));
        m.token_samples
            .retain(|(t, _)| now.duration_since(*t) <= RATE_WINDOW);
    }

    /// Image tokens per second over the last `RATE_WINDOW` (0 before two samples).
    fn token_rate(&self, tokens_now: u64) -> f64 {
        let m = self.lock();
        match m.token_samples.first() {
            Some(&(t, n)) if t.elapsed().as_secs_f64() > 0.0 => {
                tokens_now.saturating_sub(n) as f64 / t.elapsed().as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub fn render(&self, stats: &BatcherStats) -> String {
        let rate = self.token_rate(stats.image_tokens);
        let m = self.lock();
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP dalle_requests_total Requests answered, by endpoint and HTTP status."
        );
        let _ = writeln!(o, "# TYPE dalle_requests_total counter");
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                o,
                "dalle_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(o, "# HELP dalle_queue_depth Requests waiting for rows.");
        let _ = writeln!(o, "# TYPE dalle_queue_depth gauge");
        let _ = writeln!(o, "dalle_queue_depth {}", stats.waiting);
        let _ = writeln!(
            o,
            "# HELP dalle_running_rows Rows (images, twice with guidance) being sampled."
        );
        let _ = writeln!(o, "# TYPE dalle_running_rows gauge");
        let _ = writeln!(o, "dalle_running_rows {}", stats.running_rows);
        let _ = writeln!(
            o,
            "# HELP dalle_batch_rows Rows per transformer call (prefills and steps)."
        );
        let _ = writeln!(o, "# TYPE dalle_batch_rows histogram");
        let mut cumulative = 0;
        for (bound, n) in ROW_BUCKETS.iter().zip(&stats.rows_histogram) {
            cumulative += n;
            let le = if *bound == usize::MAX {
                "+Inf".to_string()
            } else {
                bound.to_string()
            };
            let _ = writeln!(o, "dalle_batch_rows_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(o, "dalle_batch_rows_sum {}", stats.forward_rows);
        let _ = writeln!(o, "dalle_batch_rows_count {}", stats.forward_calls);
        let _ = writeln!(o, "# HELP dalle_image_tokens_total Image tokens sampled.");
        let _ = writeln!(o, "# TYPE dalle_image_tokens_total counter");
        let _ = writeln!(o, "dalle_image_tokens_total {}", stats.image_tokens);
        let _ = writeln!(o, "# HELP dalle_image_tokens_per_second Image tokens sampled per second over the last 10 s.");
        let _ = writeln!(o, "# TYPE dalle_image_tokens_per_second gauge");
        let _ = writeln!(o, "dalle_image_tokens_per_second {rate:.1}");
        let _ = writeln!(
            o,
            "# HELP dalle_request_duration_seconds Time from a request's arrival to its answer."
        );
        let _ = writeln!(o, "# TYPE dalle_request_duration_seconds histogram");
        for (endpoint, (buckets, sum)) in &m.latency {
            let mut cumulative = 0;
            for (i, n) in buckets.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(o, "dalle_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(
                o,
                "dalle_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {sum}"
            );
            let _ = writeln!(
                o,
                "dalle_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {cumulative}"
            );
        }
        o
    }
}

/// Sample the image-token count once a second, for the tokens/s gauge.
pub async fn sample_rate(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        app.metrics.sample_tokens(app.batcher.stats().image_tokens);
    }
}
