//! `hayate serve`: an OpenAI-compatible HTTP server over one model.
//!
//! - [`engine`]: the engine thread, which owns the model and generates
//!   the requests of a bounded queue together (continuous batching),
//!   streaming each reply back; [`metrics`]: what `/metrics` reports;
//! - [`api`]: the requests as OpenAI's API defines them, checked field by
//!   field; [`error`]: OpenAI's error objects;
//! - stop strings and the split of a chat reply into reasoning, content
//!   and tool calls come from `hayate_chat::{stop, reply}`;
//! - this module: the routes (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/models`, `/health`, `/metrics`, `/apply-template`), the API key,
//!   body limits and streaming.

pub mod api;
pub mod engine;
pub mod error;
pub mod metrics;

use crate::api::{
    ChatRequest, CompletionRequest, Prompt, Sampling, SamplingFields, ToolChoice, top_logprobs,
};
use crate::engine::{EngineHandle, Event, Job, SubmitError, TokenLogprob};
use crate::error::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hayate_chat::RenderOptions;
use hayate_chat::grammar::{Constraint, GrammarCompiler};
use hayate_chat::reply::{Part, ReplySplitter, marker_ids};
use hayate_chat::tools::{ToolCall, ToolSyntax, ToolTemplate};
use hayate_engine::SamplingParams;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The model's name in responses and `/v1/models`.
    pub model_id: String,
    /// Required as `Authorization: Bearer KEY` on `/v1/*`, when set.
    pub api_key: Option<String>,
    /// Most bytes of a request body.
    pub max_body_bytes: usize,
    /// Sampling defaults for fields a request leaves out.
    pub defaults: SamplingParams,
}

/// Default limit of a request body: conversations far longer than any
/// context fit, and a client cannot make the server buffer gigabytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

struct AppState {
    config: ServerConfig,
    engine: EngineHandle,
    /// Compiles `response_format` schemas and grammars (absent when the
    /// tokenizer cannot be read as llguidance needs).
    grammars: Option<GrammarCompiler>,
    /// Makes response ids unique and seeds requests that give none.
    counter: AtomicU64,
    started: u64,
}

type Shared = Arc<AppState>;

/// The routes over a started engine; `grammars` compiles constraints.
pub fn router(
    config: ServerConfig,
    engine: EngineHandle,
    grammars: Option<GrammarCompiler>,
) -> Router {
    let state = Arc::new(AppState {
        config,
        engine,
        grammars,
        counter: AtomicU64::new(0),
        started: unix_time(),
    });
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/apply-template", post(apply_template))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// Counts every response for `/metrics` and logs one line per request.
async fn log_request(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.engine.metrics.count_request(&path, status);
    tracing::info!(
        "{method} {path} {status} in {:.1} ms (streamed replies: until the headers)",
        started.elapsed().as_secs_f64() * 1e3
    );
    response
}

async fn metrics(State(state): State<Shared>) -> Response {
    let text = state
        .engine
        .metrics
        .render(state.engine.pending.load(Ordering::SeqCst));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Serves `router` on `listener` until Ctrl-C.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut differ = u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        differ |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    differ == 0
}

async fn authorize(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid API key is required (Authorization: Bearer KEY)",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(request).await
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn health(State(state): State<Shared>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "queued": state.engine.pending.load(Ordering::SeqCst),
        "tokens_generated": state.engine.metrics.generated_tokens.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn models(State(state): State<Shared>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model_id,
            "object": "model",
            "created": state.started,
            "owned_by": "hayate",
            "context_length": state.engine.capacity,
        }],
    }))
    .into_response()
}

/// The body, or a 413 beyond the limit.
async fn read_body(state: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body exceeds {} bytes",
                    state.config.max_body_bytes
                ),
            )
        })
}

/// The shape of the reply: chat or plain completion.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// What a handler hands the engine and keeps for the response.
struct Prepared {
    kind: Kind,
    id: String,
    model: String,
    prompt: Vec<u32>,
    sampling: Sampling,
    max_tokens: Option<u64>,
    /// The field `max_tokens` came from, for errors.
    max_tokens_field: &'static str,
    logprobs: Option<usize>,
    include_usage: bool,
    /// Text returned before the completion (`echo`).
    echo: Option<String>,
    /// The grammar of the reply.
    constraint: Option<Constraint>,
    /// The syntax tool calls in the reply are read in, when tools were offered.
    tools: Option<ToolSyntax>,
    /// A grammar holds the reply's calls to their compact form, so that
    /// they can stream as they are written.
    calls_held: bool,
    /// The prompt's text, for a chat request.
    rendered: Option<String>,
}

impl AppState {
    fn next_number(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst)
    }

    /// A seed for a request that gives none: different every request.
    fn fresh_seed(&self) -> u64 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ self.next_number().wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

async fn chat_completions(State(state): State<Shared>, body: Body) -> Response {
    let prepared = match prepare_chat(&state, body).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    respond(state, prepared).await
}

async fn completions(State(state): State<Shared>, body: Body) -> Response {
    let prepared = match prepare_completion(&state, body).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    respond(state, prepared).await
}

/// `POST /apply-template` (as llama.cpp's server names it): the prompt a
/// chat request would run, tools and tool results included, without running it.
async fn apply_template(State(state): State<Shared>, body: Body) -> Response {
    match prepare_chat(&state, body).await {
        Ok(p) => axum::Json(json!({
            "prompt": p.rendered,
            "tokens": p.prompt.len(),
            "tool_syntax": p.tools.map(ToolSyntax::name),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn prepare_chat(state: &AppState, body: Body) -> Result<Prepared, ApiError> {
    let bytes = read_body(state, body).await?;
    let request: ChatRequest = api::parse(&bytes)?;
    let fields: SamplingFields = api::parse(&bytes)?;
    let tools = request.tool_request()?;
    let sampling = fields.resolve(&state.config.defaults, state.fresh_seed())?;
    let tokenizer = &state.engine.tokenizer;
    let Some(source) = tokenizer.template_source() else {
        return Err(ApiError::invalid(
            "messages",
            "this model has no chat template: use /v1/completions",
        ));
    };
    let template = ToolTemplate::of(source);
    let syntax = template.syntax;
    let turns = request.turns()?;
    let shown = tools.as_ref().filter(|t| t.choice != ToolChoice::None);
    let (messages, template_tools) = template.messages(&turns, shown.map(|t| &t.listing));
    let special = |marker: &str| tokenizer.special_token_id(marker);
    let tool_grammar = shown.and_then(|t| t.grammar(syntax, &special));
    // Whether the constraint is the tools' grammar (whose calls can stream).
    let (constraint, calls_held) = match tool_grammar {
        Some(_) if request.response_format.is_some() || request.grammar.is_some() => {
            return Err(ApiError::invalid(
                "tool_choice",
                "a required tool call cannot be combined with response_format or grammar",
            ));
        }
        Some(grammar) => (
            api::constraint(state.grammars.as_ref(), None, Some(&grammar))
                .map_err(|e| ApiError::invalid("tools", e.message))?,
            true,
        ),
        None => match api::constraint(
            state.grammars.as_ref(),
            request.response_format.as_ref(),
            request.grammar.as_deref(),
        )? {
            Some(c) => (Some(c), false),
            // A call the model starts on its own is held to the schemas too.
            None => match (
                state.grammars.as_ref(),
                shown.and_then(|t| t.auto_grammar(syntax, &special)),
            ) {
                (Some(compiler), Some(grammar)) => (
                    Some(
                        compiler
                            .lark(&grammar)
                            .map_err(|e| ApiError::invalid("tools", e))?,
                    ),
                    true,
                ),
                _ => (None, false),
            },
        },
    };
    let options = RenderOptions {
        add_generation_prompt: true,
        tools: template_tools,
        extra: request.chat_template_kwargs.as_ref(),
    };
    let text = tokenizer
        .render_chat_with(&messages, &options)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let logprobs = match request.logprobs {
        Some(true) => Some(top_logprobs("top_logprobs", request.top_logprobs)?),
        _ if request.top_logprobs.is_some_and(|n| n > 0) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        _ => None,
    };
    Ok(Prepared {
        kind: Kind::Chat,
        id: format!("chatcmpl-{:016x}", state.fresh_seed()),
        model: request
            .model
            .unwrap_or_else(|| state.config.model_id.clone()),
        prompt,
        sampling,
        max_tokens: request.max_completion_tokens.or(request.max_tokens),
        max_tokens_field: if request.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        },
        logprobs,
        include_usage: request
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        echo: None,
        constraint,
        tools: shown.map(|_| syntax),
        calls_held,
        rendered: Some(text),
    })
}

async fn prepare_completion(state: &AppState, body: Body) -> Result<Prepared, ApiError> {
    let bytes = read_body(state, body).await?;
    let request: CompletionRequest = api::parse(&bytes)?;
    let fields: SamplingFields = api::parse(&bytes)?;
    let sampling = fields.resolve(&state.config.defaults, state.fresh_seed())?;
    let constraint = api::constraint(
        state.grammars.as_ref(),
        request.response_format.as_ref(),
        request.grammar.as_deref(),
    )?;
    let tokenizer = &state.engine.tokenizer;
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "prompt",
                format!("one prompt per request is supported, not {n}"),
            ))
        }
    };
    let encode = |text: &str| {
        tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let prompt = match request.prompt {
        Prompt::Text(t) => encode(&t)?,
        Prompt::Texts(list) => {
            one(list.len())?;
            encode(&list[0])?
        }
        Prompt::Tokens(ids) => ids,
        Prompt::TokenLists(lists) => {
            one(lists.len())?;
            lists.into_iter().next().unwrap_or_default()
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "the prompt encodes to no tokens",
        ));
    }
    let vocab = state.engine.vocab;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let logprobs = request
        .logprobs
        .map(|n| top_logprobs("logprobs", Some(n)))
        .transpose()?;
    let echo = match request.echo {
        Some(true) => Some(
            tokenizer
                .decode(&prompt)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
        ),
        _ => None,
    };
    Ok(Prepared {
        kind: Kind::Text,
        id: format!("cmpl-{:016x}", state.fresh_seed()),
        model: request
            .model
            .unwrap_or_else(|| state.config.model_id.clone()),
        prompt,
        sampling,
        // OpenAI's default for completions.
        max_tokens: Some(request.max_tokens.unwrap_or(16)),
        max_tokens_field: "max_tokens",
        logprobs,
        include_usage: request
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        echo,
        constraint,
        tools: None,
        calls_held: false,
        rendered: None,
    })
}

/// Checks the lengths, queues the job and answers, streaming or whole.
async fn respond(state: Shared, mut prepared: Prepared) -> Response {
    let capacity = state.engine.capacity;
    let n_prompt = prepared.prompt.len();
    if n_prompt >= capacity {
        return ApiError::invalid(
            if prepared.kind == Kind::Chat { "messages" } else { "prompt" },
            format!(
                "the prompt has {n_prompt} tokens but a sequence holds {capacity} (the context, or what the KV memory holds); shorten it (it is never truncated)"
            ),
        )
        .with_code("context_length_exceeded")
        .into_response();
    }
    let room = capacity - n_prompt;
    let max_tokens = match prepared.max_tokens {
        None => room,
        Some(m) if m as usize > room => {
            let field = prepared.max_tokens_field;
            return ApiError::invalid(
                field,
                format!(
                    "{n_prompt} prompt tokens and {m} to generate exceed the {capacity} tokens a sequence holds (the context, or what the KV memory holds)"
                ),
            )
            .with_code("context_length_exceeded")
            .into_response();
        }
        Some(m) => m as usize,
    };
    let (send, receive) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt: std::mem::take(&mut prepared.prompt),
        params: prepared.sampling.params.clone(),
        max_tokens,
        stops: prepared.sampling.stops.clone(),
        logprobs: prepared.logprobs,
        constraint: prepared.constraint.take(),
        shown: match prepared.kind {
            Kind::Chat => marker_ids(&state.engine.tokenizer, prepared.tools),
            Kind::Text => Vec::new(),
        },
        events: send,
    };
    match state.engine.submit(job) {
        Ok(()) => {}
        Err(SubmitError::Full) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy: its queue is full; retry shortly",
            )
            .into_response();
        }
        Err(SubmitError::Gone) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine has stopped")
                .into_response();
        }
    }
    let reply = Reply {
        created: unix_time(),
        prepared,
    };
    if reply.prepared.sampling.stream {
        stream_reply(reply, receive).into_response()
    } else {
        whole_reply(reply, receive).await
    }
}

/// A reply's fixed parts.
struct Reply {
    created: u64,
    prepared: Prepared,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.prepared.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.prepared.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.prepared.model,
            "system_fingerprint": concat!("hayate-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    /// Log-probabilities of `entries` in the shape of this kind of reply.
    fn logprobs(&self, entries: &[TokenLogprob], text_offset: usize) -> Value {
        if self.prepared.logprobs.is_none() {
            return Value::Null;
        }
        match self.prepared.kind {
            Kind::Chat => json!({
                "content": entries.iter().map(|e| json!({
                    "token": e.token,
                    "logprob": e.logprob,
                    "bytes": e.token.as_bytes(),
                    "top_logprobs": e.top.iter().map(|(t, l)| json!({
                        "token": t, "logprob": l, "bytes": t.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
            Kind::Text => {
                let mut offset = text_offset;
                let mut offsets = Vec::with_capacity(entries.len());
                for e in entries {
                    offsets.push(offset);
                    offset += e.token.len();
                }
                json!({
                    "tokens": entries.iter().map(|e| &e.token).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                    "top_logprobs": entries.iter().map(|e| {
                        e.top.iter().map(|(t, l)| (t.clone(), json!(l))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// A splitter for this chat reply: its tools, and whether the prompt
    /// already opened a reasoning block.
    fn splitter(&self) -> ReplySplitter {
        let splitter = ReplySplitter::after(
            self.prepared.rendered.as_deref().unwrap_or(""),
            self.prepared.tools,
        );
        if self.prepared.calls_held {
            splitter.streaming_calls()
        } else {
            splitter
        }
    }

    /// The id of the reply's `index`th call.
    fn call_id(&self, index: usize) -> String {
        format!(
            "call_{}_{index}",
            self.prepared.id.trim_start_matches("chatcmpl-")
        )
    }

    /// `calls` as OpenAI lists them (with `index` in a stream's deltas).
    /// `calls` as OpenAI lists them, from the `first`th of the reply on
    /// (with `index` in a stream's deltas). The arguments are the model's
    /// text where it can be kept, as streamed fragments carry it.
    fn tool_calls(&self, calls: &[ToolCall], first: usize, streaming: bool) -> Value {
        calls
            .iter()
            .enumerate()
            .skip(first)
            .map(|(i, c)| {
                let arguments = c
                    .arguments_text
                    .clone()
                    .unwrap_or_else(|| c.arguments.to_string());
                let mut call = json!({
                    "id": self.call_id(i),
                    "type": "function",
                    "function": { "name": c.name, "arguments": arguments },
                });
                if streaming {
                    call["index"] = json!(i);
                }
                call
            })
            .collect()
    }

    fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": { "cached_tokens": cached_tokens },
        })
    }
}

async fn whole_reply(reply: Reply, mut events: UnboundedReceiver<Event>) -> Response {
    let mut text = reply.prepared.echo.clone().unwrap_or_default();
    let start = text.len();
    let mut entries = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text { text: t, logprobs } => {
                text += &t;
                entries.extend(logprobs);
            }
            Event::Failed(message) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).into_response();
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                timings,
            } => {
                let logprobs = reply.logprobs(&entries, start);
                let choice = match reply.prepared.kind {
                    Kind::Chat => {
                        let (reasoning, content, calls) = reply.splitter().split(&text);
                        let mut message = json!({
                            "role": "assistant",
                            "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { json!(content) },
                            "refusal": null,
                        });
                        if !reasoning.is_empty() {
                            message["reasoning_content"] = json!(reasoning);
                        }
                        let finish = if calls.is_empty() {
                            finish.as_str()
                        } else {
                            message["tool_calls"] = reply.tool_calls(&calls, 0, false);
                            "tool_calls"
                        };
                        json!({
                            "index": 0,
                            "message": message,
                            "logprobs": logprobs,
                            "finish_reason": finish,
                        })
                    }
                    Kind::Text => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish.as_str(),
                    }),
                };
                let mut body = reply.envelope(false, json!([choice]));
                body["usage"] = Reply::usage(prompt_tokens, completion_tokens, cached_tokens);
                body["timings"] = timings.json();
                return axum::Json(body).into_response();
            }
        }
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine ended the request without a reply",
    )
    .into_response()
}

fn sse_json(value: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(value.to_string()))
}

/// Server-sent events, as OpenAI streams them: a first chunk with the
/// role (chat), one chunk per piece of text, a last one with the
/// `finish_reason`, a `usage` chunk when asked for, then `[DONE]`.
fn stream_reply(reply: Reply, events: UnboundedReceiver<Event>) -> impl IntoResponse {
    let reply = Arc::new(reply);
    let opening = match reply.prepared.kind {
        Kind::Chat => Some(reply.envelope(
            true,
            json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]),
        )),
        Kind::Text => reply.prepared.echo.as_ref().map(|echo| {
            reply.envelope(
                true,
                json!([{ "index": 0, "text": echo, "logprobs": null, "finish_reason": null }]),
            )
        }),
    };
    let mut offset = reply.prepared.echo.as_ref().map_or(0, String::len);
    // A chat reply goes through the splitter (reasoning, calls, content);
    // text from the first call opener on is held back until the end.
    let mut splitter = (reply.prepared.kind == Kind::Chat).then(|| reply.splitter());
    let body = UnboundedReceiverStream::new(events).flat_map(move |event| {
        let reply = reply.clone();
        let mut out = Vec::new();
        let chunk = |reply: &Reply, part: Part, lp: Value| {
            let call_delta = |call: Value| json!({ "index": 0, "delta": { "tool_calls": [call] }, "logprobs": lp, "finish_reason": null });
            let choice = match (reply.prepared.kind, part) {
                (_, Part::CallName { index, name }) => call_delta(json!({
                    "index": index, "id": reply.call_id(index), "type": "function",
                    "function": { "name": name, "arguments": "" },
                })),
                (_, Part::CallArguments { index, text }) => call_delta(json!({
                    "index": index, "function": { "arguments": text },
                })),
                (Kind::Chat, Part::Content(text)) => json!({ "index": 0, "delta": { "content": text }, "logprobs": lp, "finish_reason": null }),
                (Kind::Chat, Part::Reasoning(text)) => json!({ "index": 0, "delta": { "reasoning_content": text }, "logprobs": lp, "finish_reason": null }),
                (Kind::Text, Part::Content(text) | Part::Reasoning(text)) => json!({ "index": 0, "text": text, "logprobs": lp, "finish_reason": null }),
            };
            sse_json(&reply.envelope(true, json!([choice])))
        };
        let mut finish_calls = false;
        match event {
            Event::Text { text, logprobs } => {
                let at = offset;
                offset += text.len();
                let mut lp = reply.logprobs(&logprobs, at);
                match &mut splitter {
                    Some(s) => {
                        for part in s.push(&text) {
                            out.push(chunk(&reply, part, std::mem::take(&mut lp)));
                        }
                    }
                    None => out.push(chunk(&reply, Part::Content(text), lp)),
                }
            }
            Event::Failed(message) => {
                let error = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message);
                out.push(sse_json(&error.body()));
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                timings,
            } => {
                if let Some(s) = &mut splitter {
                    let (parts, calls) = s.finish();
                    for part in parts {
                        out.push(chunk(&reply, part, Value::Null));
                    }
                    let streamed = s.streamed_calls();
                    finish_calls = !calls.is_empty();
                    if calls.len() > streamed {
                        let delta = json!({ "tool_calls": reply.tool_calls(&calls, streamed, true) });
                        let choice = json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": null }]);
                        out.push(sse_json(&reply.envelope(true, choice)));
                    }
                }
                let finish = if finish_calls { "tool_calls" } else { finish.as_str() };
                let choice = match reply.prepared.kind {
                    Kind::Chat => json!({ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish }),
                    Kind::Text => json!({ "index": 0, "text": "", "logprobs": null, "finish_reason": finish }),
                };
                let mut last = reply.envelope(true, json!([choice]));
                last["timings"] = timings.json();
                let usage = Reply::usage(prompt_tokens, completion_tokens, cached_tokens);
                if reply.prepared.include_usage {
                    last["usage"] = Value::Null;
                    out.push(sse_json(&last));
                    let mut tail = reply.envelope(true, json!([]));
                    tail["usage"] = usage;
                    out.push(sse_json(&tail));
                } else {
                    out.push(sse_json(&last));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
            }
        }
        futures_util::stream::iter(out)
    });
    let head = futures_util::stream::iter(opening.map(|o| sse_json(&o)));
    Sse::new(head.chain(body)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn keys_compare_by_content_and_length() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
