//! `dalle serve` (tract) on the 64-px `models/shapes-tiny` — unguided and 8×8 tokens, so that
//! the row arithmetic below is one row an image and requests finish fast; the bundled model
//! goes through the same code — talked to over real HTTP on 127.0.0.1.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `dalle serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dalle"));
        cmd.args(["serve", "--port", "0"])
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .env(
                "DALLE_MODEL",
                concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-tiny"),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(at) = line.find("http://") else {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the server did not start: {line:?} {err}");
        };
        Server {
            child,
            base: line[at..].trim().to_string(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// (status, headers we look at, body as JSON or as text).
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn post(url: &str, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
    let mut r = agent()
        .post(url)
        .header("content-type", content_type)
        .send(body.into())
        .unwrap();
    reply(&mut r)
}

fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap())
}

fn reply(r: &mut ureq::http::Response<ureq::Body>) -> Reply {
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: the body is not JSON ({e}): {text:?}"));
    Reply {
        status,
        retry_after,
        body,
    }
}

fn generate(server: &Server, body: Value) -> Reply {
    post(
        &server.url("/v1/images/generations"),
        "application/json",
        body.to_string(),
    )
}

/// The RGB pixels of the PNGs of an OpenAI API answer.
fn images(r: &Reply) -> Vec<Vec<u8>> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let png = base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().unwrap())
                .unwrap();
            image::load_from_memory(&png).unwrap().to_rgb8().into_raw()
        })
        .collect()
}

#[test]
fn same_seed_gives_the_png_of_dalle_generate_through_both_apis() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g.png");
    let status = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args([
            "generate",
            "a red circle above a blue square",
            "--num-images",
            "4",
        ])
        .args(["--seed", "11", "--out", out.to_str().unwrap()])
        .env(
            "DALLE_MODEL",
            concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-tiny"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // `generate` tiles the images two a row with a 2-pixel gap.
    let grid = image::open(&out).unwrap().to_rgb8();
    let tiles: Vec<Vec<u8>> = (0..4u32)
        .map(|i| {
            let (x, y) = (2 + (i % 2) * 66, 2 + (i / 2) * 66);
            image::imageops::crop_imm(&grid, x, y, 64, 64)
                .to_image()
                .into_raw()
        })
        .collect();
    let server = Server::start(&[], &[]);
    let r = generate(
        &server,
        json!({"prompt": "a red circle above a blue square", "n": 4, "seed": 11, "size": "64x64", "response_format": "b64_json"}),
    );
    assert!(r.body["created"].as_u64().unwrap() > 0);
    assert!(
        images(&r) == tiles,
        "the server's images differ from `dalle generate`'s"
    );
    let want = tiles[0].clone();
    // Open Inference Protocol v2: the same image as UINT8 [1, 64, 64, 3].
    let r = post(
        &server.url("/v2/models/shapes-tiny/infer"),
        "application/json",
        json!({"id": "x1", "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
               "data": ["a red circle above a blue square"]}], "parameters": {"seed": 11, "n": 1}})
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["id"], "x1");
    let o = &r.body["outputs"][0];
    assert_eq!(o["name"], "image");
    assert_eq!(o["datatype"], "UINT8");
    assert_eq!(o["shape"], json!([1, 64, 64, 3]));
    let data: Vec<u8> = o["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert!(data == want, "v2's image differs from `dalle generate`'s");
    // The rest of v2: health, server and model metadata.
    assert_eq!(get(&server.url("/v2/health/live")).0, 200);
    assert_eq!(get(&server.url("/v2/health/ready")).0, 200);
    assert_eq!(get(&server.url("/v2/models/shapes-tiny/ready")).0, 200);
    let (status, meta) = get(&server.url("/v2/models/shapes-tiny"));
    assert_eq!(status, 200);
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["name"], "shapes-tiny");
    assert_eq!(meta["inputs"][0]["datatype"], "BYTES");
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 64, 64, 3]));
}

#[test]
fn sixteen_concurrent_clients_get_their_sequential_twins() {
    let server = Server::start(&["--max-batch", "16"], &[]);
    let body = |seed: u64| json!({"prompt": "a green star", "n": 1, "seed": seed, "top_k": 8});
    // Sequential twins first, one request at a time.
    let twins: Vec<Vec<u8>> = (0..64)
        .map(|seed| images(&generate(&server, body(seed))).remove(0))
        .collect();
    let got = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16u64)
            .map(|client| {
                let server = &server;
                s.spawn(move || {
                    (0..4u64)
                        .map(|i| {
                            let seed = client * 4 + i;
                            (seed, images(&generate(server, body(seed))).remove(0))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(got.len(), 64, "every request answered");
    for (seed, image) in got {
        assert!(
            image == twins[seed as usize],
            "seed {seed}: batched image differs from its sequential twin"
        );
    }
    // The metrics saw batches of more than one row, and every request.
    let (status, text) = get(&server.url("/metrics"));
    assert_eq!(status, 200);
    let requests: u64 = text
        .lines()
        .filter(|l| l.starts_with("dalle_requests_total{endpoint=\"openai\",status=\"200\"}"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(requests, 128);
    let single: u64 = metric(&text, "dalle_batch_rows_bucket{le=\"1\"}");
    let all: u64 = metric(&text, "dalle_batch_rows_count");
    assert!(single < all, "no call ran more than one row: {text}");
    for series in [
        "dalle_queue_depth",
        "dalle_running_rows",
        "dalle_image_tokens_total",
        "dalle_image_tokens_per_second",
        "dalle_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} missing: {text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse::<f64>()
        .unwrap() as u64
}

#[test]
fn bad_requests_get_json_errors_and_the_server_goes_on() {
    let server = Server::start(&["--max-batch", "8"], &[]);
    let url = server.url("/v1/images/generations");
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            "application/json",
            b"{\"prompt\": ".to_vec(),
            400,
            "bad JSON",
        ),
        (
            "n 0",
            "application/json",
            json!({"prompt": "a", "n": 0}).to_string().into(),
            400,
            "n must be between 1 and 8",
        ),
        (
            "n 10000",
            "application/json",
            json!({"prompt": "a", "n": 10000}).to_string().into(),
            400,
            "n must be between 1 and 8",
        ),
        (
            "a 1 MB body",
            "application/json",
            vec![b' '; 1 << 20],
            413,
            "larger than 65536 bytes",
        ),
        (
            "a wrong content type",
            "text/plain",
            json!({"prompt": "a"}).to_string().into(),
            415,
            "Content-Type: application/json",
        ),
        (
            "an unknown model",
            "application/json",
            json!({"prompt": "a", "model": "dall-e-3"})
                .to_string()
                .into(),
            404,
            "unknown model `dall-e-3`",
        ),
        (
            "another size",
            "application/json",
            json!({"prompt": "a", "size": "1024x1024"})
                .to_string()
                .into(),
            400,
            "\"64x64\"",
        ),
        (
            "url responses",
            "application/json",
            json!({"prompt": "a", "response_format": "url"})
                .to_string()
                .into(),
            400,
            "b64_json",
        ),
        (
            "an unknown field",
            "application/json",
            json!({"prompt": "a", "quality": "hd"}).to_string().into(),
            400,
            "unknown field `quality`",
        ),
        (
            "no prompt",
            "application/json",
            json!({"n": 1}).to_string().into(),
            400,
            "prompt",
        ),
        (
            "a negative temperature",
            "application/json",
            json!({"prompt": "a", "temperature": -1}).to_string().into(),
            400,
            "temperature",
        ),
        (
            "no rerank candidate",
            "application/json",
            json!({"prompt": "a", "rerank": 0}).to_string().into(),
            400,
            "rerank must be at least 1",
        ),
        (
            "a control character",
            "application/json",
            json!({"prompt": "a\u{7}b"}).to_string().into(),
            400,
            "control character",
        ),
    ];
    for (what, content_type, body, status, needle) in cases {
        let r = post(&url, content_type, body);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let message = r.body["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {}", r.body));
        assert!(message.contains(needle), "{what}: {message}");
    }
    // v2's errors: `{"error": "..."}`.
    let v2 =
        |path: &str, body: Value| post(&server.url(path), "application/json", body.to_string());
    let prompt =
        json!([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red circle"]}]);
    for (what, path, body, status, needle) in [
        (
            "an unknown model",
            "/v2/models/nope/infer",
            json!({"inputs": prompt}),
            404,
            "unknown model `nope`",
        ),
        (
            "no inputs",
            "/v2/models/shapes-tiny/infer",
            json!({"inputs": []}),
            400,
            "expected one input",
        ),
        (
            "an unknown parameter",
            "/v2/models/shapes-tiny/infer",
            json!({"inputs": prompt, "parameters": {"steps": 3}}),
            400,
            "unknown field `steps`",
        ),
        (
            "two prompts",
            "/v2/models/shapes-tiny/infer",
            json!({"inputs": [{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}),
            400,
            "one string",
        ),
        (
            "a FP32 prompt",
            "/v2/models/shapes-tiny/infer",
            json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
            400,
            "BYTES",
        ),
    ] {
        let r = v2(path, body);
        assert_eq!(r.status, status, "v2 {what}: {}", r.body);
        let message = r.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("v2 {what}: {}", r.body));
        assert!(message.contains(needle), "v2 {what}: {message}");
    }
    let (status, text) = get(&server.url("/v2/models/nope"));
    assert_eq!(status, 404, "{text}");
    let (status, text) = get(&server.url("/no/such/path"));
    assert_eq!(status, 404);
    assert!(text.contains("no such endpoint"), "{text}");
    let (status, text) = get(&url);
    assert_eq!(status, 405);
    assert!(text.contains("does not take GET"), "{text}");
    // Still serving.
    let r = generate(&server, json!({"prompt": "a red circle", "seed": 1}));
    assert_eq!(images(&r).len(), 1);
    let r = generate(
        &server,
        json!({"prompt": "a red circle", "seed": 1, "n": 8}),
    );
    assert_eq!(images(&r).len(), 8);
}

#[test]
fn a_long_prompt_is_truncated_with_a_warning_or_refused_under_strict() {
    let long = "a red circle above a blue square ".repeat(20);
    let server = Server::start(&[], &[]);
    let r = agent()
        .post(server.url("/v1/images/generations"))
        .header("content-type", "application/json")
        .send(json!({"prompt": long, "seed": 3}).to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let warning = r
        .headers()
        .get("x-dalle-warning")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(warning.contains("truncated"), "{warning}");
    assert_eq!(r.headers().get("x-dalle-seed").unwrap(), "3");
    let r = generate(&server, json!({"prompt": long, "strict": true}));
    assert_eq!(r.status, 400, "{}", r.body);
    drop(server);
    let server = Server::start(&["--strict"], &[]);
    let r = generate(&server, json!({"prompt": long}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("strict"));
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_the_rest_are_served() {
    let server = Server::start(&["--max-batch", "1", "--max-queue", "1"], &[]);
    let replies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12u64)
            .map(|seed| {
                let server = &server;
                s.spawn(move || generate(server, json!({"prompt": "a blue ring", "seed": seed})))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(
        !full.is_empty(),
        "12 requests at once on 1 row and a queue of 1: none refused"
    );
    for r in &full {
        assert_eq!(r.retry_after.as_deref(), Some("1"));
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"));
    }
    for r in replies.iter().filter(|r| r.status != 503) {
        assert_eq!(images(r).len(), 1);
    }
}

#[test]
fn a_runtime_error_fails_that_request_only() {
    // The third transformer call of the process fails: the first request's.
    let server = Server::start(&[], &[("DALLE_FAIL_AT", "forward:3")]);
    let r = generate(&server, json!({"prompt": "a red circle", "seed": 1}));
    assert_eq!(r.status, 500, "{}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("generation failed") && message.contains("forward:3"),
        "{message}"
    );
    assert_eq!(
        images(&generate(
            &server,
            json!({"prompt": "a red circle", "seed": 1})
        ))
        .len(),
        1
    );
}

#[test]
fn sigterm_under_load_finishes_the_requests_in_flight() {
    let mut server = Server::start(&["--max-batch", "4"], &[]);
    let pid = server.child.id() as i32;
    let replies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6u64)
            .map(|seed| {
                let server = &server;
                s.spawn(move || {
                    generate(
                        server,
                        json!({"prompt": "a purple diamond", "seed": seed, "n": 2}),
                    )
                })
            })
            .collect();
        // Signal once every request has arrived and some are still running or waiting.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, text) = get(&server.url("/metrics"));
            let answered = text
                .lines()
                .find(|l| l.starts_with("dalle_requests_total{endpoint=\"openai\",status=\"200\"}"))
                .map_or(0, |l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap());
            let running = metric(&text, "dalle_running_rows") / 2;
            let waiting = metric(&text, "dalle_queue_depth");
            if answered + running + waiting == 6 && answered < 6 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the requests never all arrived: {text}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for r in &replies {
        assert_eq!(images(r).len(), 2);
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the server exited {status}");
    // It no longer listens.
    let addr = server.base.trim_start_matches("http://").to_string();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn a_client_that_disconnects_frees_its_rows() {
    let server = Server::start(&["--max-batch", "32"], &[]);
    let addr = server.base.trim_start_matches("http://").to_string();
    // 16 guided images (32 rows), sent raw, and the connection closed before the answer.
    let body = json!({"prompt": "a white triangle", "n": 16, "seed": 5, "guidance_scale": 3.0})
        .to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&get(&server.url("/metrics")).1, "dalle_running_rows") == 0 {
        assert!(Instant::now() < deadline, "the request never ran");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(conn);
    // Its 32 rows are freed before its 64 steps (the bundled model's 8×8 grid) would have ended.
    while metric(&get(&server.url("/metrics")).1, "dalle_running_rows") != 0 {
        assert!(Instant::now() < deadline, "the rows were never freed");
        std::thread::sleep(Duration::from_millis(2));
    }
    let tokens = metric(&get(&server.url("/metrics")).1, "dalle_image_tokens_total");
    assert!(
        tokens < 16 * 64,
        "the abandoned request ran to the end ({tokens} tokens)"
    );
    assert_eq!(
        images(&generate(
            &server,
            json!({"prompt": "a red circle", "seed": 2})
        ))
        .len(),
        1
    );
}

#[test]
fn bench_compares_serving_with_offline_batches() {
    let out = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args([
            "bench",
            "--model",
            concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-tiny"),
        ])
        .args([
            "--runtimes",
            "tract",
            "--serve-clients",
            "1,4",
            "--serve-requests",
            "2",
        ])
        .args(["--serve-batch", "4", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "offline batch 1",
            "offline batch 4",
            "serve, 1 clients",
            "serve, 4 clients",
            "serve, 4 staggered"
        ]
    );
    for r in rows.as_array().unwrap() {
        assert!(r["image_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["p99"].as_f64().unwrap() >= r["p50"].as_f64().unwrap(),
            "{r}"
        );
    }
    assert_eq!(rows[2]["images"], 2);
    assert_eq!(rows[3]["images"], 8);
    assert_eq!(rows[4]["images"], 8);
    assert_eq!(rows[2]["rows_per_call"], 1.0);
    let out = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .args([
            "bench",
            "--model",
            concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-tiny"),
        ])
        .args(["--serve-clients", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("≥ 1"));
}
