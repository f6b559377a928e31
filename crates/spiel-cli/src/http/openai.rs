//! `POST /v1/completions` and `POST /v1/chat/completions`: the request bodies, their checks,
//! submission to the engine, and the response as one JSON object or as server-sent events ending
//! in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use spiel::formats::tokenizer::Message;
use spiel::model::decode::ServedAdapter;
use spiel::serve::engine::{Event, EventSink, Request, SamplingParams, SubmitError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{parse_body, parse_value, ApiError, Shared};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The extension field: several adapters composed for one request (sparse deltas add).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdapterRef {
    name: String,
    #[serde(default = "one")]
    scale: f32,
}

fn one() -> f32 {
    1.0
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    adapters: Option<Vec<AdapterRef>>,
    n: Option<usize>,
    /// vLLM's extension: generate `max_tokens` whatever end-of-turn tokens come.
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: OneOrMany,
}

/// A chat message's content: a string or a list of text parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
}

/// The body's endpoint-specific part and the shared fields, each parsed with its field paths.
fn bodies<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, Common), ApiError> {
    let value: Value = parse_body(body)?;
    Ok((parse_value(value.clone())?, parse_value(value)?))
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// The engine's events for one request, into a channel the handler reads.
struct ChannelSink(UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

pub async fn completions(AxState(state): AxState<Shared>, body: Bytes) -> Response {
    let result = async {
        let (body, common): (CompletionBody, Common) = bodies(&body)?;
        let prompts = body.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(ApiError::bad_request(format!(
                "prompt: exactly one prompt per request is supported, got {}",
                prompts.len()
            )));
        }
        let text = prompts.into_iter().next().expect("one");
        start(&state, common, text, Kind::Completion).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat_completions(AxState(state): AxState<Shared>, body: Bytes) -> Response {
    let result = async {
        let (body, common): (ChatBody, Common) = bodies(&body)?;
        if body.messages.is_empty() {
            return Err(ApiError::bad_request("messages: at least one message is required"));
        }
        let mut msgs = Vec::with_capacity(body.messages.len());
        for (i, m) in body.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role: `{}` is not one of system, user, assistant",
                    m.role
                )));
            }
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut t = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (&*p.kind, &p.text) {
                            ("text", Some(s)) => t.push_str(s),
                            _ => {
                                return Err(ApiError::bad_request(format!(
                                    "messages[{i}].content[{j}]: only text parts are supported"
                                )))
                            }
                        }
                    }
                    t
                }
            };
            msgs.push(Message::new(&m.role, &content));
        }
        let text = state
            .tokenizer
            .apply_chat_template(&msgs, true)
            .map_err(|e| ApiError::bad_request(format!("messages: {e}")))?;
        start(&state, common, text, Kind::Chat).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Check the parameters, resolve the adapters, submit, and answer.
async fn start(state: &Shared, c: Common, text: String, kind: Kind) -> Result<Response, ApiError> {
    let label = c.model.clone();
    let refuse = |e: ApiError| {
        state
            .engine
            .stats()
            .count(&label, &format!("rejected_{}", e.status().as_u16()));
        e
    };
    if state.engine.is_stopping() {
        return Err(refuse(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )));
    }
    let params = check_params(state, &c, kind).map_err(refuse)?;
    let prompt = state
        .tokenizer
        .encode(&text)
        .map_err(|e| refuse(ApiError::bad_request(format!("prompt: {e}"))))?;
    if prompt.is_empty() {
        return Err(refuse(ApiError::bad_request("prompt: it is empty")));
    }
    if prompt.len() + params.max_tokens > state.context {
        return Err(refuse(
            ApiError::bad_request(format!(
                "this model's context is {} tokens; the prompt has {} and max_tokens is {} ({} in all)",
                state.context,
                prompt.len(),
                params.max_tokens,
                prompt.len() + params.max_tokens
            ))
            .with_code("context_length_exceeded"),
        ));
    }
    let adapters = resolve_adapters(state, &c).await.map_err(refuse)?;
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = prompt.len();
    let request = Request {
        prompt,
        adapters,
        params,
        label: label.clone(),
        sink: Box::new(ChannelSink(tx)),
    };
    state.engine.submit(request).map_err(|e| {
        refuse(match e {
            SubmitError::QueueFull => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "the queue is full; retry later"),
            SubmitError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        })
    })?;
    let reply = Reply {
        id: state.id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: c.model,
        kind,
    };
    if c.stream {
        let usage = c.stream_options.unwrap_or_default().include_usage;
        Ok(stream(reply, rx, usage, prompt_tokens).into_response())
    } else {
        collect(reply, rx).await
    }
}

fn check_params(state: &Shared, c: &Common, kind: Kind) -> Result<SamplingParams, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n: only one choice per request is supported"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad_request(format!(
            "temperature: {temperature} is not in [0, 2]"
        )));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!("top_p: {top_p} is not in (0, 1]")));
    }
    // Completions default to 16 new tokens (as OpenAI's); chat to the server's limit.
    let default = if kind == Kind::Chat {
        state.max_tokens
    } else {
        16.min(state.max_tokens)
    };
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(default);
    if max_tokens == 0 || max_tokens > state.max_tokens {
        return Err(ApiError::bad_request(format!(
            "max_tokens: {max_tokens} is not in 1..={} (the server's --max-tokens)",
            state.max_tokens
        )));
    }
    let stop: Vec<String> = c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    if stop.len() > 4 {
        return Err(ApiError::bad_request("stop: at most 4 stop strings"));
    }
    Ok(SamplingParams {
        max_tokens,
        temperature,
        top_p,
        seed: c.seed.unwrap_or_else(rand_seed),
        stop,
        ignore_eos: c.ignore_eos,
    })
}

fn rand_seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (std::process::id() as u64).rotate_left(32)
}

/// The request's adapters in order: the one `model` names (unless it is the base), then the
/// `adapters` extension's.
async fn resolve_adapters(state: &Shared, c: &Common) -> Result<Vec<(Arc<ServedAdapter>, f32)>, ApiError> {
    let mut wanted: Vec<(String, f32)> = Vec::new();
    if c.model != state.base_name {
        wanted.push((c.model.clone(), 1.0));
    }
    for (i, a) in c.adapters.iter().flatten().enumerate() {
        if !a.scale.is_finite() {
            return Err(ApiError::bad_request(format!(
                "adapters[{i}].scale: not a finite number"
            )));
        }
        wanted.push((a.name.clone(), a.scale));
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let registry = state.registry.clone();
    tokio::task::spawn_blocking(move || {
        let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
        wanted
            .into_iter()
            .map(|(name, scale)| Ok((reg.get(&name)?, scale)))
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("loading adapters: {e}")))?
}

/// What every response object carries.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A choice holding `text` (a delta when streaming).
    fn choice(&self, text: Option<&str>, finish: Option<&str>, chunk: bool) -> Value {
        match (self.kind, chunk) {
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, false) => {
                json!({"index": 0, "message": {"role": "assistant", "content": text.unwrap_or("")}, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, true) => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn failed(msg: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)
}

async fn collect(reply: Reply, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                let choice = reply.choice(Some(&text), Some(reason.as_str()), false);
                let body = reply.wrap(false, json!([choice]), Some(usage(prompt_tokens, completion_tokens)));
                return Ok(axum::Json(body).into_response());
            }
            Event::Failed(msg) => return Err(failed(msg)),
        }
    }
    Err(failed("the engine dropped the request".into()))
}

/// The response as server-sent events: a role chunk first (chat), a chunk per text piece, a last
/// chunk with the finish reason, the usage chunk when asked for, then `[DONE]`.
fn stream(
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
    prompt_tokens: usize,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut first: Vec<SseEvent> = Vec::new();
    if reply.kind == Kind::Chat {
        let c = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
        first.push(data(reply.wrap(true, c, None)));
    }
    let state = (reply, rx, std::collections::VecDeque::from(first), false);
    let s = futures_util::stream::unfold(state, move |(reply, mut rx, mut pending, mut ended)| async move {
        loop {
            if let Some(ev) = pending.pop_front() {
                return Some((Ok(ev), (reply, rx, pending, ended)));
            }
            if ended {
                return None;
            }
            match rx.recv().await {
                Some(Event::Text(t)) => {
                    pending.push_back(data(reply.wrap(
                        true,
                        json!([reply.choice(Some(&t), None, true)]),
                        None,
                    )));
                }
                Some(Event::Finished {
                    reason,
                    completion_tokens,
                    ..
                }) => {
                    let u = usage(prompt_tokens, completion_tokens);
                    let last = reply.wrap(true, json!([reply.choice(None, Some(reason.as_str()), true)]), None);
                    pending.push_back(data(last));
                    if include_usage {
                        pending.push_back(data(reply.wrap(true, json!([]), Some(u))));
                    }
                    pending.push_back(SseEvent::default().data("[DONE]"));
                    ended = true;
                }
                other => {
                    let msg = match other {
                        Some(Event::Failed(msg)) => msg,
                        _ => "the engine dropped the request".to_string(),
                    };
                    let err = json!({"error": {"message": msg, "type": "internal_error", "code": null}});
                    pending.push_back(data(err));
                    pending.push_back(SseEvent::default().data("[DONE]"));
                    ended = true;
                }
            }
        }
    });
    Sse::new(s)
}
