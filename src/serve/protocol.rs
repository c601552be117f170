//! The two APIs' requests, responses and errors: the OpenAI Images API and the Open Inference
//! Protocol v2 (KServe / Triton).

use super::App;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use dalle_runtimes::{Image, Output, Request, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};

/// Which API an error answers in: OpenAI's `{"error": {"message": …, "type": …}}` or v2's
/// `{"error": "…"}`.
#[derive(Clone, Copy, Debug)]
pub enum Dialect {
    OpenAi,
    V2,
}

/// A request that is answered with an error status and a JSON body saying what was wrong.
#[derive(Debug)]
pub struct ApiError {
    dialect: Dialect,
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(dialect: Dialect, status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            dialect,
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Ask the client to come back in `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn bad(dialect: Dialect, message: impl Into<String>) -> Self {
        ApiError::new(dialect, StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.dialect {
            Dialect::OpenAi => {
                let kind = match self.status.as_u16() {
                    404 => "not_found_error",
                    400..=499 => "invalid_request_error",
                    503 => "overloaded_error",
                    _ => "server_error",
                };
                json!({ "error": { "message": self.message, "type": kind, "param": null, "code": null } })
            }
            Dialect::V2 => json!({ "error": self.message }),
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Sampling fields both APIs take (OpenAI's as body fields, v2's as `parameters`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    n: Option<i64>,
    seed: Option<u64>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    temperature: Option<f32>,
    guidance_scale: Option<f32>,
    rerank: Option<usize>,
    strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    prompt: String,
    model: Option<String>,
    size: Option<String>,
    response_format: Option<String>,
    /// OpenAI's end-user id: accepted, not used.
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn parse<'a, T: Deserialize<'a>>(dialect: Dialect, body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(dialect, format!("bad JSON body: {e}")))
}

/// `POST /v1/images/generations`'s body → the request to run, and its response format.
pub fn openai_request(body: &[u8], app: &App) -> Result<Request, ApiError> {
    let d = Dialect::OpenAi;
    // `flatten` and `deny_unknown_fields` do not combine in serde: check the field names first.
    let value: Value = parse(d, body)?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::bad(d, "the body must be a JSON object"));
    };
    const KNOWN: [&str; 13] = [
        "prompt",
        "model",
        "n",
        "size",
        "response_format",
        "user",
        "seed",
        "top_k",
        "top_p",
        "temperature",
        "guidance_scale",
        "rerank",
        "strict",
    ];
    if let Some(k) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad(
            d,
            format!("unknown field `{k}`: the fields are {}", KNOWN.join(", ")),
        ));
    }
    let r: OpenAiRequest =
        serde_json::from_value(value).map_err(|e| ApiError::bad(d, format!("bad request: {e}")))?;
    if let Some(model) = &r.model {
        if *model != app.options.name {
            return Err(ApiError::new(
                d,
                StatusCode::NOT_FOUND,
                format!(
                    "unknown model `{model}`: this server serves `{}`",
                    app.options.name
                ),
            ));
        }
    }
    let s = app.batcher.generator().manifest().geometry.image_size;
    if let Some(size) = &r.size {
        if *size != format!("{s}x{s}") {
            return Err(ApiError::bad(
                d,
                format!("this model makes {s}x{s} images: `size` must be \"{s}x{s}\" or left out (got {size:?})"),
            ));
        }
    }
    // The only response format: PNGs in base64 inside the JSON.
    if let Some(other) = r.response_format.as_deref().filter(|f| *f != "b64_json") {
        return Err(ApiError::bad(
            d,
            format!("response_format {other:?} is not served: use \"b64_json\" (images come back in the response, no URLs)"),
        ));
    }
    request(d, r.prompt, r.sampling, app)
}

fn png(image: &Image) -> Result<Vec<u8>, ApiError> {
    let mut out = vec![];
    let img = image::RgbImage::from_raw(image.width, image.height, image.rgb.clone()).ok_or_else(
        || {
            ApiError::new(
                Dialect::OpenAi,
                StatusCode::INTERNAL_SERVER_ERROR,
                "an image has the wrong number of pixels",
            )
        },
    )?;
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| {
            ApiError::new(
                Dialect::OpenAi,
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode PNG: {e}"),
            )
        })?;
    Ok(out)
}

/// The OpenAI answer: each image a base64 PNG.
pub fn openai_response(out: &Output) -> Result<axum::Json<Value>, ApiError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = out
        .images
        .iter()
        .map(|img| Ok(json!({ "b64_json": b64.encode(png(img)?) })))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(axum::Json(json!({ "created": created, "data": data })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Request {
    id: Option<String>,
    inputs: Vec<V2Input>,
    #[serde(default)]
    parameters: Sampling,
    /// Which outputs to return: only `image` exists.
    outputs: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct V2Input {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

/// `POST /v2/models/NAME/infer`'s body → the request to run, and the request's `id`.
pub fn v2_request(body: &[u8], app: &App) -> Result<(Request, Option<String>), ApiError> {
    let d = Dialect::V2;
    let r: V2Request = parse(d, body)?;
    if let Some(outputs) = &r.outputs {
        for o in outputs {
            let name = o.get("name").and_then(Value::as_str).unwrap_or("");
            if name != "image" {
                return Err(ApiError::bad(
                    d,
                    format!("unknown output {name:?}: the model's one output is \"image\""),
                ));
            }
        }
    }
    let [input] = &r.inputs[..] else {
        return Err(ApiError::bad(
            d,
            format!(
                "expected one input (\"prompt\", BYTES, shape [1]); got {}",
                r.inputs.len()
            ),
        ));
    };
    if input.name != "prompt" || input.datatype != "BYTES" {
        return Err(ApiError::bad(
            d,
            format!(
                "expected the input \"prompt\" of datatype BYTES; got {:?} of {}",
                input.name, input.datatype
            ),
        ));
    }
    let texts: Vec<&str> = match &input.data {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::String(s) => vec![s.as_str()],
        _ => vec![],
    };
    let elements: i64 = input.shape.iter().product();
    let [prompt] = &texts[..] else {
        return Err(ApiError::bad(
            d,
            "the prompt input must hold one string (shape [1]); send one request per prompt",
        ));
    };
    if elements != 1 {
        return Err(ApiError::bad(
            d,
            format!("the prompt's shape {:?} is not [1]", input.shape),
        ));
    }
    Ok((request(d, prompt.to_string(), r.parameters, app)?, r.id))
}

pub fn v2_response(out: &Output, app: &App, id: Option<String>) -> axum::Json<Value> {
    let s = app.batcher.generator().manifest().geometry.image_size;
    let data: Vec<u8> = out
        .images
        .iter()
        .flat_map(|i| i.rgb.iter().copied())
        .collect();
    let mut body = json!({
        "model_name": app.options.name,
        "model_version": "1",
        "outputs": [{
            "name": "image",
            "datatype": "UINT8",
            "shape": [out.images.len(), s, s, 3],
            "data": data,
        }],
    });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    axum::Json(body)
}

pub fn v2_metadata(app: &App) -> Value {
    let s = app.batcher.generator().manifest().geometry.image_size;
    json!({
        "name": app.options.name,
        "versions": ["1"],
        "platform": format!("dalle/{}", app.runtime),
        "inputs": [{ "name": "prompt", "datatype": "BYTES", "shape": [1] }],
        "outputs": [{ "name": "image", "datatype": "UINT8", "shape": [-1, s, s, 3] }],
    })
}

/// The prompt and sampling fields → a checked request: the model's sampling defaults fill what
/// is left out; a missing seed is drawn (and returned in `x-dalle-seed`).
fn request(d: Dialect, prompt: String, s: Sampling, app: &App) -> Result<Request, ApiError> {
    let m = app.batcher.generator().manifest();
    if let Some(at) = prompt.find(|c: char| c.is_control() && !c.is_whitespace()) {
        return Err(ApiError::bad(
            d,
            format!("the prompt has a control character at byte {at}; remove it"),
        ));
    }
    let defaults = &m.sampling;
    let guidance = s.guidance_scale.unwrap_or(defaults.guidance_scale);
    let rerank = s.rerank.unwrap_or(defaults.rerank);
    if rerank == 0 {
        return Err(ApiError::bad(
            d,
            "rerank must be at least 1 (1 keeps the one sample of each image)",
        ));
    }
    let per_image = dalle_runtimes::generator::request_rows(
        &Request::new("").guidance_scale(guidance).rerank(rerank),
    );
    let max_n = (app.options.max_batch / per_image).max(1);
    let n = s.n.unwrap_or(1);
    if n < 1 || n > max_n as i64 {
        return Err(ApiError::bad(
            d,
            format!("n must be between 1 and {max_n} on this server (got {n})"),
        ));
    }
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.or(defaults.top_k),
        top_p: s.top_p.or(defaults.top_p),
    };
    params
        .validate()
        .map_err(|e| ApiError::bad(d, e.to_string()))?;
    let seed = s.seed.unwrap_or_else(random_seed);
    let mut req = Request::new(prompt)
        .num_images(n as usize)
        .seed(seed)
        .guidance_scale(guidance)
        .rerank(rerank)
        .strict(app.options.strict || s.strict.unwrap_or(false));
    req.params = params;
    Ok(req)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() >> 11
}
