//! A fake OpenAI-compatible Chat Completions server (`POST /v1/chat/completions`).
//!
//! Replies come from a script (text, tool calls with raw argument strings, HTTP errors with
//! headers, delays); with an empty script it answers with a short echo of the last user message.
//! Every request is recorded, and a request that leaves an assistant `tool_calls` id unanswered
//! by a `role: tool` message is rejected with 400, as OpenAI does.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::Server;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A final answer (`finish_reason: stop`).
    Text(String),
    /// Tool calls: (name, raw arguments string: may be invalid JSON on purpose).
    ToolCalls(Vec<(String, String)>),
    /// An HTTP error with an OpenAI error body and extra headers.
    Error {
        status: u16,
        type_: String,
        code: Option<String>,
        headers: Vec<(String, String)>,
    },
    /// Wait, then answer with the inner reply.
    Delayed(Duration, Box<Reply>),
}

impl Reply {
    pub fn text(s: &str) -> Self {
        Self::Text(s.to_string())
    }
    pub fn tool(name: &str, args: &str) -> Self {
        Self::ToolCalls(vec![(name.to_string(), args.to_string())])
    }
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self::Error {
            status: 429,
            type_: "requests".into(),
            code: Some("rate_limit_exceeded".into()),
            headers: vec![("retry-after-ms".into(), retry_after_ms.to_string())],
        }
    }
    pub fn insufficient_quota() -> Self {
        Self::Error {
            status: 429,
            type_: "insufficient_quota".into(),
            code: Some("insufficient_quota".into()),
            headers: vec![],
        }
    }
    pub fn server_error(status: u16) -> Self {
        Self::Error {
            status,
            type_: "server_error".into(),
            code: None,
            headers: vec![],
        }
    }
}

#[derive(Default)]
struct Inner {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Value>>,
    counter: Mutex<u64>,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeLlm {
    inner: Arc<Inner>,
    server: Arc<Server>,
}

impl FakeLlm {
    pub async fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Inner::default());
        let router = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(inner.clone());
        let server = Server::start(router).await?;
        Ok(Self {
            inner,
            server: Arc::new(server),
        })
    }

    /// Base URL (without `/v1/chat/completions`).
    pub fn base_url(&self) -> String {
        self.server.url()
    }

    /// Queue replies, answered in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.inner.script).extend(replies);
    }

    /// Every request body received.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.inner.requests).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(status: u16, message: &str, type_: &str, code: Option<&str>) -> Response {
    let body =
        json!({ "error": { "message": message, "type": type_, "param": null, "code": code } });
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(body),
    )
        .into_response()
}

/// Every assistant tool call id must be answered by a later tool message with that id.
fn unanswered_tool_call(messages: &[Value]) -> Option<String> {
    let mut open: Vec<String> = Vec::new();
    let mut answered: HashSet<String> = HashSet::new();
    for m in messages {
        if m["role"] == "assistant" {
            if let Some(calls) = m["tool_calls"].as_array() {
                open.extend(
                    calls
                        .iter()
                        .filter_map(|c| c["id"].as_str().map(str::to_string)),
                );
            }
        } else if m["role"] == "tool"
            && let Some(id) = m["tool_call_id"].as_str()
        {
            answered.insert(id.to_string());
        }
    }
    open.into_iter().find(|id| !answered.contains(id))
}

async fn complete(
    State(inner): State<Arc<Inner>>,
    request_headers: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    if !request_headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "))
    {
        return error(
            401,
            "You didn't provide an API key.",
            "invalid_request_error",
            Some("invalid_api_key"),
        );
    }
    lock(&inner.requests).push(req.clone());
    let Some(messages) = req["messages"].as_array() else {
        return error(400, "messages is required", "invalid_request_error", None);
    };
    if req["model"].as_str().is_none() {
        return error(400, "model is required", "invalid_request_error", None);
    }
    if let Some(id) = unanswered_tool_call(messages) {
        return error(
            400,
            &format!(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. Missing: {id}"
            ),
            "invalid_request_error",
            None,
        );
    }
    let mut reply = lock(&inner.script).pop_front();
    while let Some(Reply::Delayed(d, inner_reply)) = reply {
        tokio::time::sleep(d).await;
        reply = Some(*inner_reply);
    }
    let n = {
        let mut c = lock(&inner.counter);
        *c += 1;
        *c
    };
    let model = req["model"].as_str().unwrap_or("fake").to_string();
    let (message, finish) = match reply {
        Some(Reply::Error {
            status,
            type_,
            code,
            headers,
        }) => {
            // Like OpenAI, a rejected key is named in the message (some compatible servers
            // echo it whole).
            let message = match code.as_deref() {
                Some("invalid_api_key") => format!(
                    "Incorrect API key provided: {}.",
                    request_headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or_default()
                ),
                _ => "scripted error".to_string(),
            };
            let mut resp = error(status, &message, &type_, code.as_deref());
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (k.parse::<axum::http::HeaderName>(), v.parse()) {
                    resp.headers_mut().insert(k, v);
                }
            }
            return resp;
        }
        Some(Reply::ToolCalls(calls)) => {
            let calls: Vec<Value> = calls
                .into_iter()
                .enumerate()
                .map(|(i, (name, args))| {
                    json!({ "id": format!("call_{n}_{i}"), "type": "function", "function": { "name": name, "arguments": args } })
                })
                .collect();
            (
                json!({ "role": "assistant", "content": null, "refusal": null, "tool_calls": calls }),
                "tool_calls",
            )
        }
        Some(Reply::Text(text)) => (
            json!({ "role": "assistant", "content": text, "refusal": null }),
            "stop",
        ),
        Some(Reply::Delayed(..)) | None => {
            let last = messages
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or("");
            (
                json!({ "role": "assistant", "content": format!("(fake model) You said: {last}"), "refusal": null }),
                "stop",
            )
        }
    };
    let prompt_tokens = req.to_string().len() / 4;
    Json(json!({
        "id": format!("chatcmpl-{n}"), "object": "chat.completion", "created": 1726012687, "model": model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish }],
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12 },
        "system_fingerprint": null
    }))
    .into_response()
}
