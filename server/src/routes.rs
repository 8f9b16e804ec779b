//! The HTTP endpoints: request parsing (size-limited, OpenAI-style errors), prompt building
//! (chat template, tokenizer, cartridge lookup — on a blocking thread), submission to the engine,
//! and the responses, whole or as server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cartridge_formats::cart::Kind;
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::chat_template::{ChatMessage, ChatTemplate};
use cartridge_runtime::generate::{FinishReason, GenerateRequest, TextStream};
use cartridge_runtime::tokenizer::Tokenizer;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{self, ChatRequest, Common, CompletionRequest, Limits, PromptField};
use crate::engine::{EngineHandle, Event, Job, PrefixParts};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::{Loaded, Registry};

/// What the served model is, as `/v1/models` reports it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name requests use.
    pub name: String,
    /// Identity (checked by a remote self-study backend before it trusts this server).
    pub fingerprint: ModelFingerprint,
    /// Positions the model supports (prefix + prompt + output).
    pub context_window: usize,
    /// Vocabulary size (prompt ids must be below it).
    pub vocab_size: usize,
    /// Ids that end a chat answer.
    pub chat_stop_tokens: Vec<u32>,
    /// Ids that end a plain completion.
    pub eos_tokens: Vec<u32>,
}

/// Everything the handlers share.
pub struct AppState {
    /// The engine's queue.
    pub engine: EngineHandle,
    /// The served cartridges.
    pub registry: Arc<Registry>,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template.
    pub template: Option<Arc<ChatTemplate>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The model.
    pub info: ModelInfo,
    /// Per-request limits.
    pub limits: Limits,
    /// How a request's cartridges share positions.
    pub composition: cartridge_runtime::Composition,
}

type Shared = Arc<AppState>;

/// The router of all endpoints.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/cartridges", get(cartridges))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Count every response by endpoint and status.
async fn count_requests(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match path {
        "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/models"
        | "/v1/cartridges"
        | "/health"
        | "/metrics" => path.to_string(),
        _ => "other".to_string(),
    };
    let resp = next.run(req).await;
    s.metrics.count_request(&endpoint, resp.status().as_u16());
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("", "not_found", "no such endpoint")
}

async fn health(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "queued": s.engine.queued(),
        "running": s.metrics.running.load(Ordering::Relaxed),
    }))
}

async fn metrics(State(s): State<Shared>) -> Response {
    let text = s.metrics.render(s.registry.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.info.name,
            "object": "model",
            "created": 0,
            "owned_by": "cartridge",
            "max_model_len": s.info.context_window,
            "fingerprint": s.info.fingerprint,
            "stop_token_ids": s.info.chat_stop_tokens,
        }],
    }))
}

async fn cartridges(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let reg = s.registry.clone();
    let list = tokio::task::spawn_blocking(move || reg.list())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot list the cartridge folder: {e}")))?;
    Ok(Json(json!({"object": "list", "data": list})))
}

/// The body, at most `limit` bytes.
async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            // The limit error is http-body-util's `LengthLimitError`, boxed inside axum's error.
            let mut cause: Option<&dyn std::error::Error> = Some(&e);
            let mut too_large = false;
            while let Some(c) = cause {
                too_large |= c.to_string().contains("length limit exceeded");
                cause = c.source();
            }
            if too_large {
                ApiError::too_large(limit)
            } else {
                ApiError::invalid(format!("cannot read the request body: {e}"))
            }
        })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

/// Which response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A request ready for the engine, plus how to answer it.
struct Prepared {
    endpoint: Endpoint,
    prefix: PrefixParts,
    request: GenerateRequest,
    stream: bool,
    stops: Vec<String>,
    /// Report the chosen tokens' log-probs, with this many alternatives each.
    logprobs: bool,
    alternatives: usize,
    tokens_as_ids: bool,
}

async fn chat(State(s): State<Shared>, req: Request) -> Response {
    let start = Instant::now();
    let result = async {
        let body = read_body(req, s.limits.max_body_bytes).await?;
        let r: ChatRequest = parse(&body)?;
        let st = s.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare_chat(&st, r))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        run(s.clone(), prepared, start).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Shared>, req: Request) -> Response {
    let start = Instant::now();
    let result = async {
        let body = read_body(req, s.limits.max_body_bytes).await?;
        let r: CompletionRequest = parse(&body)?;
        let st = s.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare_completion(&st, r))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        run(s.clone(), prepared, start).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The cartridges and soft prompt a request names, loaded (blocking).
fn prefix_of(s: &AppState, c: &Common) -> Result<(PrefixParts, Option<String>), ApiError> {
    let mut parts = PrefixParts {
        composition: s.composition,
        ..PrefixParts::default()
    };
    let refs = c.cartridges.as_deref().unwrap_or(&[]);
    if refs.len() > s.limits.max_cartridges {
        return Err(ApiError::invalid_param(
            "cartridges",
            format!("at most {} cartridges per request", s.limits.max_cartridges),
        ));
    }
    for r in refs {
        if let Loaded::Cartridge(kv) = s.registry.get("cartridges", &r.id, Kind::Kv)? {
            parts
                .key
                .push(format!("kv:{}", r.id.trim_end_matches(".cart")));
            parts.cartridges.push(kv);
        }
    }
    let mut summary = None;
    if let Some(r) = &c.soft_prompt {
        if let Loaded::SoftPrompt(t, text) =
            s.registry.get("soft_prompt", &r.id, Kind::SoftPrompt)?
        {
            parts
                .key
                .push(format!("soft:{}", r.id.trim_end_matches(".cart")));
            parts.soft_prompt = Some(t);
            summary = text;
        }
    }
    Ok((parts, summary))
}

fn check_model(s: &AppState, c: &Common) -> Result<(), ApiError> {
    match &c.model {
        Some(m) if m != &s.info.name => Err(ApiError::not_found(
            "model",
            "model_not_found",
            format!("this server serves {:?}, not {m:?}", s.info.name),
        )),
        _ => Ok(()),
    }
}

fn prepare_chat(s: &AppState, r: ChatRequest) -> Result<Prepared, ApiError> {
    check_model(s, &r.common)?;
    let template = s
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this model has no chat template; use /v1/completions"))?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "at least one message is needed",
        ));
    }
    let mut messages = Vec::with_capacity(r.messages.len() + 1);
    for m in &r.messages {
        messages.push(ChatMessage::new(m.role.clone(), m.text()?));
    }
    let (prefix, summary) = prefix_of(s, &r.common)?;
    // As `cartridge chat` renders it: a soft prompt's summary is the system message; otherwise a
    // prefix stands in for the system message, as in self-study.
    let rendered = match summary {
        Some(text) => {
            messages.insert(0, ChatMessage::new("system", text));
            template.render(&messages, true)
        }
        None if !prefix.is_empty() => template.render_after_system("system", &messages, true),
        None => template.render(&messages, true),
    }
    .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let prompt = s
        .tokenizer
        .encode(&rendered, false)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let top = r.top_logprobs.unwrap_or(0) as usize;
    let logprobs = r.logprobs.unwrap_or(false) || top > 0;
    let max_tokens = r.max_completion_tokens.or(r.common.max_tokens);
    finish_prepare(
        s,
        Endpoint::Chat,
        &r.common,
        prefix,
        prompt,
        max_tokens,
        logprobs,
        top,
        s.info.chat_stop_tokens.clone(),
    )
}

fn prepare_completion(s: &AppState, r: CompletionRequest) -> Result<Prepared, ApiError> {
    check_model(s, &r.common)?;
    if r.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "echo is not supported"));
    }
    let (prefix, summary) = prefix_of(s, &r.common)?;
    let prompt = match r.prompt {
        PromptField::Ids(ids) => ids,
        PromptField::Text(text) => {
            let text = match summary {
                Some(sum) => format!("{sum}\n{text}"),
                None => text,
            };
            // A prefix plays the sequence start (as in training): no BOS after it.
            s.tokenizer
                .encode(&text, prefix.is_empty())
                .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?
        }
    };
    let top = r.logprobs.unwrap_or(0) as usize;
    finish_prepare(
        s,
        Endpoint::Completion,
        &r.common,
        prefix,
        prompt,
        Some(r.common.max_tokens.unwrap_or(16)),
        r.logprobs.is_some(),
        top,
        s.info.eos_tokens.clone(),
    )
}

#[allow(clippy::too_many_arguments)]
fn finish_prepare(
    s: &AppState,
    endpoint: Endpoint,
    c: &Common,
    prefix: PrefixParts,
    prompt: Vec<u32>,
    max_tokens: Option<u64>,
    logprobs: bool,
    top: usize,
    mut stop_tokens: Vec<u32>,
) -> Result<Prepared, ApiError> {
    let l = &s.limits;
    let sampling = api::sampling(c)?;
    let stops = api::stop_strings(&c.stop)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    if prompt.len() > l.max_prompt_tokens {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "the prompt has {} tokens; this server accepts at most {}",
                prompt.len(),
                l.max_prompt_tokens
            ),
        ));
    }
    let vocab = s.info.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary ({vocab})"),
        ));
    }
    let max_tokens = max_tokens.unwrap_or(l.max_output_tokens as u64);
    if max_tokens == 0 || max_tokens > l.max_output_tokens as u64 {
        return Err(ApiError::invalid_param(
            "max_tokens",
            format!("max_tokens must be in 1..={}", l.max_output_tokens),
        ));
    }
    let max_tokens = max_tokens as usize;
    let total = prefix.len() + prompt.len() + max_tokens;
    if total > s.info.context_window {
        return Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "prefix ({}) + prompt ({}) + max_tokens ({max_tokens}) = {total} exceeds the \
                 model's {} positions",
                prefix.len(),
                prompt.len(),
                s.info.context_window
            ),
        ));
    }
    if top > l.max_top_logprobs {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("at most {} alternatives per position", l.max_top_logprobs),
        ));
    }
    if let Some(extra) = &c.stop_token_ids {
        if let Some(bad) = extra.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid_param(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary"),
            ));
        }
        stop_tokens.extend(extra);
    }
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    Ok(Prepared {
        endpoint,
        prefix,
        request: GenerateRequest {
            prompt,
            sampling,
            max_tokens,
            stop_tokens,
            // The chosen token's log-prob comes with the alternatives: ask for at least one.
            top_logprobs: if logprobs { top.max(1) } else { 0 },
        },
        stream: c.stream.unwrap_or(false),
        stops,
        logprobs,
        alternatives: top,
        tokens_as_ids: c.return_tokens_as_token_ids.unwrap_or(false),
    })
}

/// `chatcmpl-N` / `cmpl-N`, unique within the process.
fn response_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    match endpoint {
        Endpoint::Chat => format!("chatcmpl-{n}"),
        Endpoint::Completion => format!("cmpl-{n}"),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::StopToken(_) | FinishReason::Stopped => "stop",
        FinishReason::Length => "length",
    }
}

/// Token ids to text (the tokenizer, boxed so the tracker can live in a stream).
type Decode = Box<dyn Fn(&[u32]) -> String + Send>;

/// Follows one request's tokens: text (stop strings held back), ids, log-probs.
struct Tracker {
    text: TextStream<Decode>,
    tokenizer: Arc<Tokenizer>,
    stop_tokens: Vec<u32>,
    top: usize,
    logprobs: bool,
    tokens_as_ids: bool,
    endpoint: Endpoint,
    ids: Vec<u32>,
    /// Per token: (chosen logprob, alternatives).
    lps: Vec<(f32, Vec<(u32, f32)>)>,
    finish: Option<&'static str>,
    first_token_at: Option<Instant>,
}

impl Tracker {
    fn new(s: &AppState, p: &Prepared) -> Self {
        let tok = s.tokenizer.clone();
        let decode: Decode = Box::new(move |ids: &[u32]| tok.decode(ids, true).unwrap_or_default());
        Self {
            text: TextStream::new(decode, p.stops.clone()),
            tokenizer: s.tokenizer.clone(),
            stop_tokens: p.request.stop_tokens.clone(),
            top: p.alternatives,
            logprobs: p.logprobs,
            tokens_as_ids: p.tokens_as_ids,
            endpoint: p.endpoint,
            ids: Vec::new(),
            lps: Vec::new(),
            finish: None,
            first_token_at: None,
        }
    }

    /// Take one event: the text to emit now (possibly empty) or the request's error.
    fn take(&mut self, event: Event) -> Result<String, ApiError> {
        let t = match event {
            Event::Failed(e) => return Err(e),
            Event::Token(t) => t,
        };
        self.first_token_at.get_or_insert_with(Instant::now);
        self.ids.push(t.token);
        if self.logprobs {
            self.lps.push((t.logprob, t.top_logprobs));
        }
        let mut out = String::new();
        if !self.stop_tokens.contains(&t.token) {
            let (delta, stopped) = self.text.push(t.token);
            out = delta;
            if stopped {
                self.finish = Some("stop");
                return Ok(out);
            }
        }
        if let Some(f) = t.finish {
            self.finish = Some(finish_name(f));
            out.push_str(&self.text.finish());
        }
        Ok(out)
    }

    fn token_string(&self, id: u32) -> String {
        if self.tokens_as_ids {
            format!("token_id:{id}")
        } else {
            self.tokenizer.decode(&[id], false).unwrap_or_default()
        }
    }

    /// Log-probs of tokens `from..` in the endpoint's format (ids included as extensions).
    fn logprobs_json(&self, from: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let ids = self.ids.get(from..).unwrap_or(&[]);
        let lps = self.lps.get(from..).unwrap_or(&[]);
        let top_n = self.top;
        match self.endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = ids
                    .iter()
                    .zip(lps)
                    .map(|(&id, (lp, alts))| {
                        let top: Vec<Value> = alts
                            .iter()
                            .take(top_n)
                            .map(|&(a, l)| {
                                json!({"token": self.token_string(a), "token_id": a, "logprob": l})
                            })
                            .collect();
                        json!({"token": self.token_string(id), "token_id": id, "logprob": lp,
                               "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            }
            Endpoint::Completion => {
                let tokens: Vec<String> = ids.iter().map(|&i| self.token_string(i)).collect();
                let token_logprobs: Vec<f32> = lps.iter().map(|x| x.0).collect();
                let top: Vec<Value> = lps
                    .iter()
                    .map(|(_, alts)| {
                        let map: serde_json::Map<String, Value> = alts
                            .iter()
                            .take(top_n)
                            .map(|&(a, l)| (self.token_string(a), json!(l)))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                let top_ids: Vec<Value> = lps
                    .iter()
                    .map(|(_, alts)| {
                        Value::Array(
                            alts.iter()
                                .take(top_n)
                                .map(|&(a, l)| json!([a, l]))
                                .collect(),
                        )
                    })
                    .collect();
                json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                       "token_ids": ids, "top_logprobs_ids": top_ids})
            }
        }
    }
}

/// Submit and answer, whole or streamed.
async fn run(s: Shared, p: Prepared, start: Instant) -> Result<Response, ApiError> {
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = p.request.prompt.len();
    let job = Job {
        prefix: p.prefix.clone(),
        request: p.request.clone(),
        events: tx,
        deadline: start + s.limits.timeout,
    };
    s.engine.submit(job)?;
    s.metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let tracker = Tracker::new(&s, &p);
    if p.stream {
        Ok(stream_response(s, p.endpoint, tracker, rx, start, prompt_tokens).into_response())
    } else {
        whole_response(s, p.endpoint, tracker, rx, start, prompt_tokens).await
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

fn observe(s: &AppState, t: &Tracker, start: Instant) {
    s.metrics
        .request_seconds
        .observe(start.elapsed().as_secs_f64());
    if let Some(first) = t.first_token_at {
        s.metrics
            .ttft_seconds
            .observe((first - start).as_secs_f64());
    }
}

async fn whole_response(
    s: Shared,
    endpoint: Endpoint,
    mut t: Tracker,
    mut rx: UnboundedReceiver<Event>,
    start: Instant,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::from_std(start + s.limits.timeout);
    let mut text = String::new();
    while t.finish.is_none() {
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(ApiError::timeout()),
            Ok(None) => return Err(ApiError::internal("the engine dropped the request")),
            Ok(Some(e)) => e,
        };
        text.push_str(&t.take(event)?);
    }
    // Dropping the receiver here cancels the sequence if a stop string ended it early.
    drop(rx);
    observe(&s, &t, start);
    let finish = t.finish.unwrap_or("stop");
    let (object, choice) = match endpoint {
        Endpoint::Chat => (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": t.logprobs_json(0), "finish_reason": finish, "token_ids": t.ids}),
        ),
        Endpoint::Completion => (
            "text_completion",
            json!({"index": 0, "text": text, "logprobs": t.logprobs_json(0),
                   "finish_reason": finish, "token_ids": t.ids}),
        ),
    };
    Ok(Json(json!({
        "id": response_id(endpoint),
        "object": object,
        "created": now_secs(),
        "model": s.info.name,
        "choices": [choice],
        "usage": usage(prompt_tokens, t.ids.len()),
    }))
    .into_response())
}

/// Where a stream is.
struct StreamState {
    s: Shared,
    endpoint: Endpoint,
    t: Tracker,
    rx: Option<UnboundedReceiver<Event>>,
    start: Instant,
    prompt_tokens: usize,
    sent_role: bool,
    sent_lps: usize,
    done: bool,
    id: String,
    created: u64,
}

impl StreamState {
    fn chunk(&self, delta_text: Option<String>, finish: Option<&str>, role: bool) -> Value {
        let lps = self.t.logprobs_json(self.sent_lps);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(d) = delta_text {
                    delta.insert("content".into(), json!(d));
                }
                json!({"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish})
            }
            Endpoint::Completion => json!({"index": 0, "text": delta_text.unwrap_or_default(),
                "logprobs": lps, "finish_reason": finish}),
        };
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created,
                           "model": self.s.info.name, "choices": [choice]});
        if finish.is_some() {
            v["usage"] = usage(self.prompt_tokens, self.t.ids.len());
        }
        v
    }
}

fn stream_response(
    s: Shared,
    endpoint: Endpoint,
    t: Tracker,
    rx: UnboundedReceiver<Event>,
    start: Instant,
    prompt_tokens: usize,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let id = response_id(endpoint);
    let state = StreamState {
        s,
        endpoint,
        t,
        rx: Some(rx),
        start,
        prompt_tokens,
        sent_role: false,
        sent_lps: 0,
        done: false,
        id,
        created: now_secs(),
    };
    let events = stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if st.endpoint == Endpoint::Chat && !st.sent_role {
            st.sent_role = true;
            let v = st.chunk(None, None, true);
            return Some((Ok(SseEvent::default().data(v.to_string())), st));
        }
        if st.t.finish.is_some() || st.rx.is_none() {
            st.done = true;
            return Some((Ok(SseEvent::default().data("[DONE]")), st));
        }
        let deadline = tokio::time::Instant::from_std(st.start + st.s.limits.timeout);
        let rx = st.rx.as_mut()?;
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => Err(ApiError::timeout()),
            Ok(None) => Err(ApiError::internal("the engine dropped the request")),
            Ok(Some(e)) => Ok(e),
        };
        let delta = event.and_then(|e| st.t.take(e));
        let data = match delta {
            Err(e) => {
                st.rx = None;
                e.body()
            }
            Ok(text) => {
                let finish = st.t.finish;
                let v = st.chunk(Some(text), finish, false);
                st.sent_lps = st.t.ids.len();
                if finish.is_some() {
                    // Closing the channel now cancels a sequence a stop string ended early.
                    st.rx = None;
                    observe(&st.s, &st.t, st.start);
                }
                v
            }
        };
        Some((Ok(SseEvent::default().data(data.to_string())), st))
    });
    Sse::new(events)
}
