//! `dalle serve`: one model directory behind HTTP.
//!
//! - `POST /v1/images/generations`: the OpenAI Images API (`b64_json` PNGs);
//! - the Open Inference Protocol v2 that KServe and Triton clients speak (`/v2/...`);
//! - `GET /metrics`: Prometheus text.
//!
//! Every request goes to one [`Batcher`], which samples the images of concurrent requests
//! together; the HTTP side only checks, queues and answers. A request's errors are JSON in its
//! API's shape; none of them stops the server. SIGTERM (or Ctrl-C) stops accepting connections,
//! lets every request in flight finish, then exits.

mod metrics;
mod protocol;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dalle_runtimes::{Batcher, BatcherOptions, Generator, Output, RuntimeError, SubmitError};
use metrics::Metrics;
use protocol::{ApiError, Dialect};
use std::sync::Arc;
use std::time::Instant;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Rows (images, twice with guidance) sampled at once over all requests.
    pub max_batch: usize,
    /// Requests that may wait; one more is answered 503.
    pub max_queue: usize,
    /// The model's name in `/v2/models/NAME` and in the OpenAI API's `model` field.
    pub name: String,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// A prompt longer than the model's caption is a 400 (else it is truncated, with a warning
    /// header).
    pub strict: bool,
}

struct App {
    batcher: Batcher,
    options: ServeOptions,
    runtime: &'static str,
    metrics: Metrics,
}

/// Serve `generator` until SIGTERM or Ctrl-C; `on_listening` gets the bound address (the port
/// is the system's choice when `options.port` is 0).
pub fn serve(
    generator: Generator,
    options: ServeOptions,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    serve_until(generator, options, on_listening, stop_signal())
}

/// As [`serve`], stopping (after the requests in flight) when `stop` completes.
pub fn serve_until(
    generator: Generator,
    options: ServeOptions,
    on_listening: impl FnOnce(std::net::SocketAddr),
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the HTTP server's threads")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", options.host, options.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {addr} (check --host; a port in use needs another --port)"
                )
            })?;
        on_listening(listener.local_addr()?);
        let runtime = generator.session().name();
        let batcher = Batcher::new(
            Arc::new(generator),
            BatcherOptions::new(options.max_batch, options.max_queue),
        );
        let app = Arc::new(App {
            batcher,
            options,
            runtime,
            metrics: Metrics::new(),
        });
        let sampler = tokio::spawn(metrics::sample_rate(app.clone()));
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(stop)
            .await
            .context("the HTTP server failed")?;
        sampler.abort();
        eprintln!("dalle serve: stopped accepting; every request in flight was answered");
        Ok(())
    })
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(openai_generate))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(v2_infer))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    eprintln!("dalle serve: stopping — finishing the requests in flight");
}

/// The body of a JSON POST: 415 for another content type, 413 above the limit.
async fn json_body(app: &App, dialect: Dialect, req: Request) -> Result<Bytes, ApiError> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            dialect,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON: send `Content-Type: application/json`",
        ));
    }
    // A body over the limit is still read (up to `DRAIN`), so that the client, still sending,
    // gets the 413 instead of a reset connection.
    const DRAIN: usize = 16 << 20;
    let limit = app.options.max_body;
    let too_large = || {
        ApiError::new(
            dialect,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )
    };
    let body = axum::body::to_bytes(req.into_body(), DRAIN.max(limit))
        .await
        .map_err(|_| too_large())?;
    if body.len() > limit {
        return Err(too_large());
    }
    Ok(body)
}

async fn openai_generate(State(app): State<Arc<App>>, req: Request) -> Response {
    let start = Instant::now();
    let result = async {
        let body = json_body(&app, Dialect::OpenAi, req).await?;
        let request = protocol::openai_request(&body, &app)?;
        let (output, seed) = run(&app, Dialect::OpenAi, request).await?;
        Ok((protocol::openai_response(&output)?, output.truncated, seed))
    }
    .await;
    respond(&app, "openai", start, result)
}

async fn v2_infer(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    req: Request,
) -> Response {
    let start = Instant::now();
    let result = async {
        known_model(&app, &name)?;
        let body = json_body(&app, Dialect::V2, req).await?;
        let (request, id) = protocol::v2_request(&body, &app)?;
        let (output, seed) = run(&app, Dialect::V2, request).await?;
        Ok((
            protocol::v2_response(&output, &app, id),
            output.truncated,
            seed,
        ))
    }
    .await;
    respond(&app, "v2_infer", start, result)
}

/// A generation's answer: its JSON (or the error), with the seed it ran with and a warning
/// when its prompt was cut to the model's caption; counted in the metrics under `endpoint`.
fn respond(
    app: &App,
    endpoint: &'static str,
    start: Instant,
    result: Result<(axum::Json<serde_json::Value>, bool, u64), ApiError>,
) -> Response {
    let response = match result {
        Ok((json, truncated, seed)) => with_headers(json.into_response(), truncated, seed, app),
        Err(e) => e.into_response(),
    };
    app.metrics
        .observe(endpoint, response.status(), start.elapsed());
    response
}

fn with_headers(mut r: Response, truncated: bool, seed: u64, app: &App) -> Response {
    let h = r.headers_mut();
    h.insert("x-dalle-seed", HeaderValue::from(seed));
    if truncated {
        let text_len = app.batcher.generator().manifest().geometry.text_len;
        let msg = format!("prompt truncated to the model's {text_len} caption tokens");
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("x-dalle-warning", v);
        }
    }
    r
}

/// Queue one request on the batcher and wait for its images. Dropping this future (the client
/// went away) drops the ticket, which cancels the request and frees its rows.
async fn run(
    app: &App,
    dialect: Dialect,
    req: dalle_runtimes::Request,
) -> Result<(Output, u64), ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let seed = req.seed;
    let ticket = app
        .batcher
        .submit(&req, move |result| {
            let _ = tx.send(result);
        })
        .map_err(|e| submit_error(dialect, e))?;
    let result = rx.await.map_err(|_| {
        ApiError::new(
            dialect,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request was dropped by the batcher",
        )
    })?;
    drop(ticket);
    match result {
        Ok(out) => Ok((out, seed)),
        Err(RuntimeError::Request(m)) => Err(ApiError::new(dialect, StatusCode::BAD_REQUEST, m)),
        Err(e) => Err(ApiError::new(
            dialect,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {e}"),
        )),
    }
}

fn submit_error(dialect: Dialect, e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull(_) => {
            ApiError::new(dialect, StatusCode::SERVICE_UNAVAILABLE, e.to_string()).retry_after(1)
        }
        SubmitError::Stopped => {
            ApiError::new(dialect, StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        SubmitError::TooLarge { .. } | SubmitError::Request(_) => {
            ApiError::new(dialect, StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

fn known_model(app: &App, name: &str) -> Result<(), ApiError> {
    if name == app.options.name {
        Ok(())
    } else {
        Err(ApiError::new(
            Dialect::V2,
            StatusCode::NOT_FOUND,
            format!(
                "unknown model `{name}`: this server serves `{}`",
                app.options.name
            ),
        ))
    }
}

async fn server_metadata() -> Response {
    axum::Json(serde_json::json!({
        "name": "dalle",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(serde_json::json!({ "live": true })).into_response()
}

async fn ready() -> Response {
    axum::Json(serde_json::json!({ "ready": true })).into_response()
}

async fn model_ready(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Response {
    match known_model(&app, &name) {
        Ok(()) => axum::Json(serde_json::json!({ "name": name, "ready": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model_metadata(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Response {
    match known_model(&app, &name) {
        Ok(()) => axum::Json(protocol::v2_metadata(&app)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&app.batcher.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let dialect = if uri.path().starts_with("/v2") {
        Dialect::V2
    } else {
        Dialect::OpenAi
    };
    ApiError::new(
        dialect,
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint: {}; this server has POST /v1/images/generations, /v2/... and GET /metrics",
            uri.path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::new(
        Dialect::OpenAi,
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
    .into_response()
}
