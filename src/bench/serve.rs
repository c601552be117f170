//! Serving against offline generation on one runtime, side by side in one run: image tokens/s
//! and per-request latency of `Generator::generate` at batch 1 and at the server's batch, then of
//! `dalle serve` (in this process, on loopback) with 1, 4, 16 … concurrent HTTP clients, each
//! sending its next request as soon as the last is answered.

use anyhow::{bail, Context, Result};
use dalle_runtimes::{OpenOptions, Request, RuntimeKind};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// One line of the comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeRow {
    /// `offline batch N` or `serve, N clients`.
    pub label: String,
    pub images: usize,
    pub seconds: f64,
    pub image_tokens_per_s: f64,
    /// Per call (offline) or per request (serving), seconds.
    pub p50: f64,
    pub p99: f64,
    /// Rows per transformer call (serving: from the server's metrics; offline: the batch, with
    /// guidance twice it).
    pub rows_per_call: f64,
}

pub struct ServeBenchOptions {
    pub runtime: RuntimeKind,
    pub providers: OpenOptions,
    pub clients: Vec<usize>,
    /// Requests each client sends (one image each); the offline rows make as many images as the
    /// largest client count does in all.
    pub requests: usize,
    pub max_batch: usize,
}

pub fn run(
    model: &Path,
    o: &ServeBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ServeRow>> {
    if o.clients.is_empty() || o.clients.contains(&0) || o.requests == 0 || o.max_batch == 0 {
        bail!("serving bench: client counts, requests per client and the batch must be ≥ 1");
    }
    let open = || {
        crate::runtime::open_on(model, o.runtime, &o.providers, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot open {} on {}", model.display(), o.runtime.name()))
    };
    let generator = open()?;
    let m = generator.manifest().clone();
    let tokens = m.geometry.image_tokens();
    let guidance = m.sampling.guidance_scale;
    let per_image = if guidance != 1.0 { 2 } else { 1 };
    let batch = (o.max_batch / per_image).max(1);
    let total = o.clients.iter().max().copied().unwrap_or(1) * o.requests;
    let mut rows = vec![];
    // Warm up (first-call allocations and plan building).
    generator.generate(&request(0, 1, guidance))?;
    for b in [1, batch] {
        progress(&format!("offline batch {b}"));
        let calls = total.div_ceil(b);
        let mut lat = vec![];
        let start = Instant::now();
        for i in 0..calls {
            let t = Instant::now();
            generator.generate(&request(i as u64, b, guidance))?;
            lat.push(t.elapsed().as_secs_f64());
        }
        rows.push(row(
            format!("offline batch {b}"),
            calls * b,
            start.elapsed(),
            tokens,
            lat,
            (b * per_image) as f64,
        ));
    }
    drop(generator);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = crate::serve::ServeOptions {
        host: "127.0.0.1".into(),
        port: 0,
        max_batch: o.max_batch,
        max_queue: 4096,
        name: "bench".into(),
        max_body: 65536,
        strict: false,
    };
    let generator = open()?;
    let server = std::thread::spawn(move || {
        crate::serve::serve_until(
            generator,
            options,
            |addr| {
                let _ = addr_tx.send(addr);
            },
            async {
                let _ = stop_rx.await;
            },
        )
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .context("the server did not start")?;
    let mut probe = Conn::open(addr)?;
    probe.generate(0)?;
    // The largest client count once more with staggered starts: client i waits i/c of an
    // offline batch-1 request before its first, so arrivals spread over the steps as they do
    // when clients are independent: each request joins the running batch at the step after it
    // arrives, and the rows-per-call column shows how full the steps were.
    let single = rows[0].p50;
    let largest = o.clients.iter().max().copied().unwrap_or(1);
    let runs = o
        .clients
        .iter()
        .map(|&c| (c, 0.0))
        .chain((largest > 1).then_some((largest, single)));
    for (c, spread) in runs {
        let label = if spread > 0.0 {
            format!("serve, {c} staggered")
        } else {
            format!("serve, {c} clients")
        };
        progress(&label);
        let before = probe.batch_rows()?;
        let start = Instant::now();
        let lat = std::thread::scope(|s| {
            let handles: Vec<_> = (0..c)
                .map(|client| {
                    s.spawn(move || -> Result<Vec<f64>> {
                        let mut conn = Conn::open(addr)?;
                        std::thread::sleep(Duration::from_secs_f64(
                            spread * client as f64 / c as f64,
                        ));
                        (0..o.requests)
                            .map(|i| {
                                let t = Instant::now();
                                conn.generate((client * o.requests + i) as u64)?;
                                Ok(t.elapsed().as_secs_f64())
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a client thread panicked"))
                .collect::<Result<Vec<_>>>()
        })?;
        let took = start.elapsed();
        let after = probe.batch_rows()?;
        let lat: Vec<f64> = lat.into_iter().flatten().collect();
        rows.push(row(
            label,
            lat.len(),
            took,
            tokens,
            lat,
            (after.0 - before.0) / (after.1 - before.1).max(1.0),
        ));
    }
    let _ = stop_tx.send(());
    server.join().expect("the server thread panicked")?;
    Ok(rows)
}

fn request(seed: u64, n: usize, guidance: f32) -> Request {
    Request::new("a red circle above a blue square")
        .num_images(n)
        .seed(seed)
        .guidance_scale(guidance)
}

fn row(
    label: String,
    images: usize,
    took: Duration,
    tokens: usize,
    mut lat: Vec<f64>,
    rows_per_call: f64,
) -> ServeRow {
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    ServeRow {
        label,
        images,
        seconds: took.as_secs_f64(),
        image_tokens_per_s: (images * tokens) as f64 / took.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
        rows_per_call,
    }
}

/// A keep-alive HTTP/1.1 connection to the server: plain requests over a socket, as a client
/// library would send them.
struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            addr,
            reader: BufReader::new(stream),
        })
    }

    fn generate(&mut self, seed: u64) -> Result<()> {
        let body =
            serde_json::json!({"prompt": "a red circle above a blue square", "n": 1, "seed": seed})
                .to_string();
        self.call("POST", "/v1/images/generations", &body).map(drop)
    }

    /// (rows summed over transformer calls, calls) from the server's `/metrics`.
    fn batch_rows(&mut self) -> Result<(f64, f64)> {
        let text = self.call("GET", "/metrics", "")?;
        let read = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .with_context(|| format!("{name} missing from /metrics"))
        };
        Ok((
            read("dalle_batch_rows_sum ")?,
            read("dalle_batch_rows_count ")?,
        ))
    }

    /// One request; the body of a 200 answer, else an error.
    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<String> {
        write!(
            self.reader.get_mut(),
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        let mut length = None;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; length.context("the answer has no Content-Length")?];
        self.reader.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.contains(" 200 ") {
            bail!("{}: {body}", status.trim());
        }
        Ok(body)
    }
}

/// The comparison as a table, with the ratio the serving goal is stated in.
pub fn print(rows: &[ServeRow], runtime: &str) {
    println!(
        "serving on {runtime}: image tokens/s and latency per call (offline) or request (serve)"
    );
    println!(
        "{:<20} {:>7} {:>9} {:>12} {:>9} {:>9} {:>10}",
        "", "images", "seconds", "img tok/s", "p50 s", "p99 s", "rows/call"
    );
    for r in rows {
        println!(
            "{:<20} {:>7} {:>9.2} {:>12.0} {:>9.3} {:>9.3} {:>10.1}",
            r.label, r.images, r.seconds, r.image_tokens_per_s, r.p50, r.p99, r.rows_per_call
        );
    }
    let offline = rows.iter().rfind(|r| r.label.starts_with("offline"));
    let served = rows.iter().rfind(|r| r.label.ends_with("clients"));
    if let (Some(o), Some(s)) = (offline, served) {
        println!(
            "{} / {}: {:.0}% of the offline throughput",
            s.label,
            o.label,
            100.0 * s.image_tokens_per_s / o.image_tokens_per_s
        );
    }
}
