//! OpenAI-compatible Chat Completions (OpenAI, Ollama, vLLM, llama.cpp) with tool calls.
//!
//! One turn loops: send the conversation and tool definitions; run the tool calls the model
//! returns and send their results back (one `role: tool` message per `tool_call_id`); stop at a
//! final answer or after `max_steps` model calls. Invalid tool arguments are reported to the
//! model as a tool result, so it can correct itself.
//!
//! Retries mirror the official SDK: two retries on connection errors, timeouts, 408, 409, 429
//! and 5xx, honouring `retry-after-ms` / `retry-after` up to 120 s (longer: no retry), else
//! 0.5 s doubling to 8 s with jitter. A 429 of type `insufficient_quota` is never retried.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};
use service::secret::{ExposeSecret, SecretString};

use super::{AgentError, AgentReply, TurnInput};
use crate::core::tools::{Action, ToolContext, Toolbox};

/// Settings of the endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<SecretString>,
    pub timeout: Duration,
    pub max_steps: i32,
    pub max_tokens: i32,
    pub temperature: Option<f64>,
}

pub struct OpenAiAgent {
    http: reqwest::Client,
    cfg: OpenAiConfig,
    url: String,
}

#[derive(Debug, Clone)]
struct CallError {
    retryable: bool,
    retry_after: Option<Duration>,
    message: String,
}

const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl OpenAiAgent {
    pub fn new(cfg: OpenAiConfig) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let url = format!(
            "{}/v1/chat/completions",
            cfg.base_url.trim_end_matches('/').trim_end_matches("/v1")
        );
        Ok(Self { http, cfg, url })
    }

    pub async fn respond(
        &self,
        input: &TurnInput,
        tools: &Toolbox,
        ctx: &ToolContext,
    ) -> Result<AgentReply, AgentError> {
        let mut messages = initial_messages(input);
        let mut reply = AgentReply::default();
        while reply.steps < self.cfg.max_steps {
            reply.steps += 1;
            let mut body = json!({ "model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_tokens });
            if !tools.is_empty() {
                body["tools"] = Value::Array(tools.definitions());
                body["tool_choice"] = json!("auto");
            }
            if let Some(t) = self.cfg.temperature {
                body["temperature"] = json!(t);
            }
            let resp = self.call_with_retries(&body).await?;
            reply.usage.prompt_tokens += resp["usage"]["prompt_tokens"].as_i64().unwrap_or(0);
            reply.usage.completion_tokens +=
                resp["usage"]["completion_tokens"].as_i64().unwrap_or(0);
            let message = resp["choices"][0]["message"].clone();
            let calls = message["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if calls.is_empty() {
                if let Some(text) = message["content"].as_str().filter(|t| !t.trim().is_empty()) {
                    reply.texts.push(text.to_string());
                }
                return Ok(reply);
            }
            messages.push(json!({ "role": "assistant", "content": message["content"].clone(), "tool_calls": calls }));
            let mut handed_off = false;
            for call in &calls {
                let id = call["id"].as_str().unwrap_or_default();
                let name = call["function"]["name"].as_str().unwrap_or_default();
                let args = call["function"]["arguments"].as_str().unwrap_or_default();
                let out = tools.call(name, args, ctx);
                if let Some(action) = out.action {
                    handed_off |= matches!(action, Action::Handoff { .. });
                    reply.actions.push(action);
                }
                messages
                    .push(json!({ "role": "tool", "tool_call_id": id, "content": out.content }));
            }
            if handed_off {
                // A human takes over; the handoff message is the reply.
                return Ok(reply);
            }
        }
        Err(AgentError::Permanent(format!(
            "no final answer after {} model calls (modelSpec.maxSteps)",
            self.cfg.max_steps
        )))
    }

    async fn call_with_retries(&self, body: &Value) -> Result<Value, AgentError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(8))
            .with_max_times(2)
            .with_jitter();
        (|| self.call_once(body))
            .retry(backoff)
            .when(|e: &CallError| e.retryable && e.retry_after.is_none_or(|d| d <= MAX_RETRY_AFTER))
            .adjust(|e: &CallError, dur| e.retry_after.or(dur))
            .notify(|e: &CallError, dur| tracing::info!(error = %e.message, retry_in_ms = dur.as_millis() as u64, "model call failed; retrying"))
            .await
            .map_err(|e| if e.retryable { AgentError::Transient(e.message) } else { AgentError::Permanent(e.message) })
    }

    async fn call_once(&self, body: &Value) -> Result<Value, CallError> {
        let mut req = self.http.post(&self.url).json(body);
        // Local servers ignore the key but some clients' servers require the header.
        req = req.bearer_auth(
            self.cfg
                .api_key
                .as_ref()
                .map_or("none", |k| k.expose_secret()),
        );
        let resp = req.send().await.map_err(|e| CallError {
            retryable: true,
            retry_after: None,
            message: if e.is_timeout() {
                format!("model request timed out after {:?}", self.cfg.timeout)
            } else {
                format!("model request failed: {e}")
            },
        })?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let should_retry_header = resp
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v == "true");
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            if value["choices"][0]["message"].is_object() {
                return Ok(value);
            }
            return Err(CallError {
                retryable: false,
                retry_after: None,
                message: "model response has no choices[0].message".into(),
            });
        }
        let err = &value["error"];
        let kind = err["type"].as_str().unwrap_or_default();
        let code = err["code"].as_str().unwrap_or_default();
        // Providers echo (part of) a rejected key; the message is logged and stored in the job.
        let said = service::secret::redact(
            err["message"].as_str().unwrap_or("no message"),
            &self.cfg.api_key,
        );
        let message = format!(
            "model endpoint answered {status}: {said} ({kind}{})",
            if code.is_empty() {
                String::new()
            } else {
                format!(", {code}")
            }
        );
        let quota = kind == "insufficient_quota"
            || code == "insufficient_quota"
            || code.ends_with("_limit_exceeded") && code != "rate_limit_exceeded"
            || code == "credit_balance_exhausted";
        let retryable = match should_retry_header {
            Some(v) => v && !quota,
            None => !quota && matches!(status, 408 | 409 | 429 | 500..=599),
        };
        Err(CallError {
            retryable,
            retry_after,
            message,
        })
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let d = get("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| get("retry-after"))?;
    (d > 0.0 && d.is_finite()).then(|| Duration::from_secs_f64(d))
}

fn initial_messages(input: &TurnInput) -> Vec<Value> {
    let mut system = input.system_prompt.clone().unwrap_or_else(|| {
        "You are a helpful assistant answering customers on WhatsApp. Be brief and friendly."
            .to_string()
    });
    if let Some(lane) = input
        .lane
        .as_ref()
        .and_then(|l| input.lanes.iter().find(|x| &x.name == l))
    {
        system.push_str(&format!(
            "\n\nThe conversation is in the {} lane.",
            lane.name
        ));
        if let Some(p) = &lane.prompt {
            system.push_str(&format!(" {p}"));
        }
    }
    if !input.lanes.is_empty() {
        let names: Vec<&str> = input.lanes.iter().map(|l| l.name.as_str()).collect();
        system.push_str(&format!("\nLanes: {}.", names.join(", ")));
    }
    if let Some(name) = &input.contact_name {
        system.push_str(&format!("\nThe customer's WhatsApp name is {name}."));
    }
    let mut messages = vec![json!({ "role": "system", "content": system })];
    for h in &input.history {
        messages.push(json!({ "role": h.role, "content": h.text }));
    }
    messages.push(json!({ "role": "user", "content": input.new_messages.join("\n") }));
    messages
}
