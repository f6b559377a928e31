//! `GET /v1/models`, vLLM's `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`,
//! `GET /health` and `GET /metrics` (Prometheus text format).

use std::fmt::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{parse_body, ApiError, Shared};

pub async fn health(AxState(state): AxState<Shared>) -> Response {
    if state.engine.is_stopping() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

pub async fn models(AxState(state): AxState<Shared>) -> Response {
    let registry = state.registry.clone();
    let names = tokio::task::spawn_blocking(move || registry.lock().unwrap_or_else(|p| p.into_inner()).names())
        .await
        .unwrap_or_default();
    let card = |id: &str, parent: Option<&str>| json!({"id": id, "object": "model", "created": state.created, "owned_by": "spiel", "root": id, "parent": parent});
    let mut data = vec![card(&state.base_name, None)];
    data.extend(names.iter().map(|n| card(n, Some(&state.base_name))));
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: Option<PathBuf>,
}

fn loading_allowed(state: &Shared) -> Result<(), ApiError> {
    if state.allow_loading {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "adapter loading is off; start the server with --allow-adapter-loading",
        ))
    }
}

pub async fn load_adapter(AxState(state): AxState<Shared>, body: Bytes) -> Response {
    let result = async {
        loading_allowed(&state)?;
        let body: LoadBody = parse_body(&body)?;
        let path = body
            .lora_path
            .ok_or_else(|| ApiError::bad_request("lora_path: required"))?;
        let registry = state.registry.clone();
        let name = body.lora_name.clone();
        tokio::task::spawn_blocking(move || {
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .register(&name, &path)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        Ok::<_, ApiError>(format!("Success: adapter '{}' added successfully.", body.lora_name))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

pub async fn unload_adapter(AxState(state): AxState<Shared>, body: Bytes) -> Response {
    let result = async {
        loading_allowed(&state)?;
        let body: LoadBody = parse_body(&body)?;
        state
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unregister(&body.lora_name)?;
        Ok::<_, ApiError>(format!("Success: adapter '{}' removed successfully.", body.lora_name))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub async fn metrics(AxState(state): AxState<Shared>) -> Response {
    let e = state.engine.stats();
    let r = state.registry.lock().unwrap_or_else(|p| p.into_inner()).stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    let outcomes: Vec<(String, String)> = e
        .outcomes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|((a, o), n)| {
            (
                format!("{{adapter=\"{}\",outcome=\"{}\"}}", label(a), label(o)),
                n.to_string(),
            )
        })
        .collect();
    metric(
        "spiel_requests_total",
        "counter",
        "Requests by adapter (the request's model) and outcome.",
        outcomes,
    );
    metric(
        "spiel_prompt_tokens_total",
        "counter",
        "Prompt tokens read.",
        one(e.prompt_tokens.load(Ordering::Relaxed).to_string()),
    );
    metric(
        "spiel_generated_tokens_total",
        "counter",
        "Tokens generated.",
        one(e.generated_tokens.load(Ordering::Relaxed).to_string()),
    );
    metric(
        "spiel_decode_steps_total",
        "counter",
        "Batched decode steps run.",
        one(e.steps.load(Ordering::Relaxed).to_string()),
    );
    metric(
        "spiel_queue_depth",
        "gauge",
        "Requests waiting for a place in the batch.",
        one(e.queued.load(Ordering::SeqCst).to_string()),
    );
    metric(
        "spiel_running_batch",
        "gauge",
        "Sequences in the running batch.",
        one(e.running.load(Ordering::SeqCst).to_string()),
    );
    metric(
        "spiel_adapter_loads_total",
        "counter",
        "Adapters loaded from disk.",
        one(r.loads.to_string()),
    );
    metric(
        "spiel_adapter_evictions_total",
        "counter",
        "Adapters evicted to stay under --adapter-memory.",
        one(r.evictions.to_string()),
    );
    metric(
        "spiel_adapter_load_seconds_total",
        "counter",
        "Seconds spent loading adapters.",
        one(format!("{:.6}", r.load_seconds)),
    );
    metric(
        "spiel_adapter_resident_bytes",
        "gauge",
        "Bytes of the adapters held in memory.",
        one(r.resident_bytes.to_string()),
    );
    metric(
        "spiel_adapters_resident",
        "gauge",
        "Adapters held in memory.",
        one(r.resident.to_string()),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
