//! The HTTP face of `spiel serve`: an OpenAI-compatible API over the library's engine and adapter
//! registry (`spiel::serve`), on axum. [`openai`] holds the completion endpoints, [`admin`] the
//! model list, adapter loading, health and metrics; this file the shared state, the error
//! responses, the router and the shutdown sequence.

mod admin;
mod openai;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::FutureExt;
use serde_json::json;
use spiel::formats::tokenizer::Tokenizer;
use spiel::serve::engine::Engine;
use spiel::serve::registry::{Registry, RegistryError};

/// What every handler reads.
pub struct State {
    /// The engine requests are submitted to.
    pub engine: Arc<Engine>,
    /// Adapters by name.
    pub registry: Arc<Mutex<Registry>>,
    /// The base model's tokenizer (and chat template).
    pub tokenizer: Arc<Tokenizer>,
    /// The name requests use for the base alone.
    pub base_name: String,
    /// The model's context in tokens.
    pub context: usize,
    /// The most new tokens a request may ask for.
    pub max_tokens: usize,
    /// Whether the load and unload endpoints are on.
    pub allow_loading: bool,
    /// Unix time the server started (the models' `created`).
    pub created: u64,
    /// Request ids.
    pub next_id: AtomicU64,
}

impl State {
    /// A fresh request id with `prefix`.
    pub fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

pub type Shared = Arc<State>;

/// An error response in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
}

impl ApiError {
    /// 400: a malformed body or a bad parameter.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            code: None,
        }
    }

    /// With an OpenAI error code.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// Any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            code: None,
        }
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "invalid_request_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "internal_error",
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match &e {
            RegistryError::Unknown(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string()).with_code("model_not_found")
            }
            RegistryError::Refused(_) => ApiError::bad_request(e.to_string()),
            RegistryError::Load { .. } => ApiError::bad_request(e.to_string()).with_code("adapter_load_failed"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind(), "code": self.code}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// Parse a JSON body into `T`, naming the field (by its path) at fault; the body's syntax
/// errors name their line and column.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
    parse_value(value)
}

/// [`parse_body`] from an already parsed body.
pub fn parse_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." | "" => ApiError::bad_request(format!("request body: {inner}")),
            _ => ApiError::bad_request(format!("request body: field `{path}`: {inner}")),
        }
    })
}

/// A panic in a handler becomes a 500 for that request (logged); the server goes on.
async fn catch_panics(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path().to_string();
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("request to {path} panicked: {what}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {what}")).into_response()
        }
    }
}

/// The routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .route("/v1/models", get(admin::models))
        .route("/v1/load_lora_adapter", post(admin::load_adapter))
        .route("/v1/unload_lora_adapter", post(admin::unload_adapter))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn(catch_panics))
        .with_state(state)
}

/// Serve until Ctrl-C or SIGTERM; then refuse new requests (503), let running ones finish within
/// `deadline`, end what is left, and close the engine.
pub async fn serve(listener: tokio::net::TcpListener, state: Shared, deadline: Duration) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let engine = state.engine.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::warn!("shutting down: refusing new requests, finishing running ones");
        eprintln!(
            "shutting down: finishing running requests (at most {} s)",
            deadline.as_secs()
        );
        engine.stop_accepting();
        let _ = tx.send(true);
    });
    let signalled = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(signalled(rx.clone()));
    let past_deadline = async {
        signalled(rx).await;
        tokio::time::sleep(deadline).await;
    };
    tokio::select! {
        r = server => r?,
        _ = past_deadline => {
            tracing::warn!("shutdown deadline passed: ending the requests still running");
            state.engine.abort();
        }
    }
    state.engine.close();
    Ok(())
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
