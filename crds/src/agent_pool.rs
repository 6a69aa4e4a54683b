//! `AgentPool`: a scalable fleet of core workers and the agent they run.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A fleet of core workers that claim this pool's conversation jobs from the Postgres queue and
/// run the agent. The operator scales it from queue depth between `minReplicas` and
/// `maxReplicas`, unless `replicas` is set (by you or by an HPA through `/scale`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "whatsapp.kube-agents.io",
    version = "v1alpha1",
    kind = "AgentPool",
    plural = "agentpools",
    shortname = "ap",
    category = "whatsapp",
    namespaced,
    cel,
    status = "AgentPoolStatus",
    derive = "PartialEq",
    doc = "A scalable pool of core workers running an agent (LLM with tools, or a rules router).",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicas"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicas"),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queueDepth"),
    printcolumn(
        name = "Handoffs",
        type_ = "integer",
        json_path = ".status.openHandoffs"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be less than or equal to maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.lanes) || self.lanes.all(l, !has(l.buttons) || l.buttons.all(b, !has(b.lane) || self.lanes.exists(x, x.name == b.lane)))").message("a lane button's lane must be the name of a lane of this pool"))]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolSpec {
    /// Fewest core workers, also when the queue is empty. Default: 1.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most core workers. Default: 10.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Fixed replica count. When set (by you, or by an HPA/KEDA through the `/scale`
    /// subresource) the operator stops autoscaling from the queue and uses it, clamped to
    /// min/max. Default: unset (queue-driven autoscaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pending jobs one replica is expected to absorb; desired replicas =
    /// ceil(pending / targetPendingPerReplica). Default: 20.
    #[serde(default = "default_target_pending")]
    #[schemars(range(min = 1))]
    pub target_pending_per_replica: i32,
    /// Add one replica while the oldest pending job has waited longer than this. Default: 30.
    #[serde(default = "default_max_pending_age")]
    #[schemars(range(min = 1))]
    pub max_pending_age_seconds: i32,
    /// Scale down only to the highest desired count seen in this window, so a short lull does
    /// not tear workers down. Default: 300.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// Agent turns one replica runs at once. Default: 8.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency_per_replica: i32,
    /// The model that answers. Default: the `rules` router, which needs no API key.
    #[serde(default)]
    pub model: ModelSpec,
    /// System prompt for LLM providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Lanes a conversation can be in (e.g. info, commerce, support). The rules router picks a
    /// lane by keywords and answers from its replies; LLM providers add the lane's prompt.
    /// Default: info, commerce and support lanes with generic replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub lanes: Vec<LaneSpec>,
    /// Tool plugins enabled for the agent, with their config and channel policy. Invalid ones
    /// are reported in the `ToolsValid` condition and skipped; they never stop the worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Human team members that handoffs are assigned to (round-robin, least recently assigned
    /// online member first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub team: Vec<TeamMember>,
    /// The team inbox on the core workers: where team members read and answer handed-off
    /// conversations. Default: no tokens (every team endpoint answers 401) and no Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox: Option<InboxSpec>,
    /// How many past messages of a conversation the agent sees. Default: 20.
    #[serde(default = "default_history")]
    #[schemars(range(min = 1, max = 200))]
    pub history_messages: i32,
    /// A conversation idle longer than this starts a fresh session (lane and dialogue reset;
    /// the message log is kept). Default: 86400 (24 h, WhatsApp's service window).
    #[serde(default = "default_session_ttl")]
    #[schemars(range(min = 60))]
    pub session_ttl_seconds: i32,
    /// Container image of the core workers and the gateway fleet. Default: the operator's
    /// worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of each core worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The pool's gateway fleet (`ap-<pool>-gateway`): the pods that hold the Leases of the
    /// pool's numbers, send their replies and hold their WhatsApp Web sockets, and take the
    /// namespace's webhooks. Numbers come and go without restarting these pods.
    /// Default: one pod per 100 numbers, at least 2, at most 10.
    #[serde(default)]
    pub gateways: GatewayFleetSpec,
}

/// How many gateway pods a pool runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("gateways.minReplicas must be less than or equal to gateways.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct GatewayFleetSpec {
    /// A fixed number of gateway pods. Default: unset (sized from `numbersPerPod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// Numbers one pod serves: replicas = ceil(numbers / numbersPerPod) within min and max.
    /// Default: 100.
    #[serde(default = "default_numbers_per_pod")]
    #[schemars(range(min = 1, max = 5000))]
    pub numbers_per_pod: i32,
    /// Fewest gateway pods (two, so a pod's death or a rolling update moves Leases to a
    /// running pod instead of waiting for a new one). Default: 2.
    #[serde(default = "default_gateway_min")]
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: i32,
    /// Most gateway pods. Default: 10.
    #[serde(default = "default_gateway_max")]
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Resources of each gateway container. Default: requests 50m CPU and 64Mi, limit 512Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for GatewayFleetSpec {
    fn default() -> Self {
        Self {
            replicas: None,
            numbers_per_pod: default_numbers_per_pod(),
            min_replicas: default_gateway_min(),
            max_replicas: default_gateway_max(),
            resources: None,
        }
    }
}

impl GatewayFleetSpec {
    /// Gateway pods for `numbers` numbers.
    pub fn replicas_for(&self, numbers: usize) -> i32 {
        if let Some(fixed) = self.replicas {
            return fixed.max(0);
        }
        let wanted = (numbers as u64).div_ceil(self.numbers_per_pod.max(1) as u64) as i64;
        wanted.clamp(
            self.min_replicas.max(0) as i64,
            self.max_replicas.max(self.min_replicas).max(0) as i64,
        ) as i32
    }
}

fn default_numbers_per_pod() -> i32 {
    100
}
fn default_gateway_min() -> i32 {
    2
}
fn default_gateway_max() -> i32 {
    10
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    10
}
fn default_target_pending() -> i32 {
    20
}
fn default_max_pending_age() -> i32 {
    30
}
fn default_stabilization() -> i32 {
    300
}
fn default_concurrency() -> i32 {
    8
}
fn default_history() -> i32 {
    20
}
fn default_session_ttl() -> i32 {
    86_400
}

/// Which model answers, and how it is reached.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.provider != 'openai' || has(self.model)").message("model.model is required when model.provider is openai"))]
pub struct ModelSpec {
    /// `rules` (no LLM: keyword lanes and canned replies) or `openai` (any OpenAI-compatible
    /// Chat Completions endpoint: OpenAI, Ollama, vLLM, llama.cpp). Default: rules.
    #[serde(default)]
    pub provider: ModelProvider,
    /// Base URL of the endpoint, without `/v1/chat/completions`.
    /// Default: `https://api.openai.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Model name, e.g. `gpt-4o-mini` or `llama3.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Secret key holding the API key (sent as `Authorization: Bearer`). Optional for local
    /// servers that ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Timeout of one model request. Default: 60.
    #[serde(default = "default_model_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: i32,
    /// Most model calls in one turn (tool calls loop back to the model). Default: 6.
    #[serde(default = "default_max_steps")]
    #[schemars(range(min = 1, max = 32))]
    pub max_steps: i32,
    /// Sampling temperature. Default: unset (the server's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Most tokens in one completion. Default: 512.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 1))]
    pub max_tokens: i32,
}

fn default_model_timeout() -> i32 {
    60
}
fn default_max_steps() -> i32 {
    6
}
fn default_max_tokens() -> i32 {
    512
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            provider: ModelProvider::Rules,
            base_url: None,
            model: None,
            api_key_secret_ref: None,
            timeout_seconds: default_model_timeout(),
            max_steps: default_max_steps(),
            temperature: None,
            max_tokens: default_max_tokens(),
        }
    }
}

/// The agent's brain.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum ModelProvider {
    /// No LLM: keyword routing to lanes and canned replies. Works without an API key.
    #[default]
    Rules,
    /// Any OpenAI-compatible Chat Completions endpoint, with tool calls.
    Openai,
}

/// A key in a Secret of the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// A lane: a topic a conversation can be routed to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaneSpec {
    /// Lane name, e.g. `info`, `commerce`, `support`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Words that route a message to this lane (case-insensitive, whole words).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// Extra instructions for LLM providers while the conversation is in this lane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Canned replies of the rules router, used in turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<String>,
    /// Hand the conversation to a human when routed here (rules router).
    #[serde(default)]
    pub handoff: bool,
    /// Route media the customer sends (a photo, voice note, document, video or sticker) here
    /// when no keyword matched (rules router): e.g. a lane that hands photos of damaged goods
    /// to a human. The first such lane wins.
    #[serde(default)]
    pub media: bool,
    /// Reply options offered with this lane's replies (rules router): up to 3 as WhatsApp reply
    /// buttons, 4 to 10 as a list, on the Cloud API; numbered options on WhatsApp Web. A tap (or
    /// the title or its number typed) routes to the option's `lane`, or back to this lane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub buttons: Vec<LaneButton>,
}

/// A reply button of a lane.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaneButton {
    /// What the button says (WhatsApp allows 20 characters).
    #[schemars(length(min = 1, max = 20))]
    pub title: String,
    /// The lane a tap leads to. Default: the lane that offered the button.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
}

/// A tool plugin enabled for the agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// Plugin id from the registry, e.g. `handoff`, `set_lane`, `business_hours`.
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
    /// Plugin config, checked against the plugin's `configSchema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub config: Option<serde_json::Value>,
    /// Policy per channel (`whatsapp`, ...): allow or deny. Channels not listed follow the
    /// plugin manifest's allowed channels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub channels: BTreeMap<String, ToolPolicy>,
}

/// Whether a tool may run on a channel.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ToolPolicy {
    /// The model may call it.
    Allow,
    /// The tool is not offered to the model.
    Deny,
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// A human who can take handed-off conversations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamMember {
    /// Stable id (e.g. an email address).
    #[schemars(length(min = 1, max = 253))]
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether the member takes new handoffs now. Default: true.
    #[serde(default = "default_true")]
    pub online: bool,
    /// Key of this member's bearer token in `inbox.tokensSecretRef`. Default: the id with every
    /// character outside `[-._a-zA-Z0-9]` replaced by `_` (`alice@example.com` ->
    /// `alice_example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub token_key: Option<String>,
}

impl TeamMember {
    /// The key of this member's token in the inbox tokens Secret.
    pub fn effective_token_key(&self) -> String {
        self.token_key.clone().unwrap_or_else(|| {
            self.id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
    }
}

/// Team tokens shorter than this are refused (they could be guessed).
pub const INBOX_MIN_TOKEN_LEN: usize = 16;

/// The team inbox: an authenticated API and web page on the core workers for the humans that
/// handed-off conversations go to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.tokensSecretRef)").message("inbox.enabled needs inbox.tokensSecretRef: without tokens nobody can log in"))]
pub struct InboxSpec {
    /// Create the Service `ap-<pool>-inbox` in front of the core workers' inbox (expose it
    /// with an Ingress). Default: false.
    #[serde(default)]
    pub enabled: bool,
    /// Secret holding one bearer token (at least 16 characters) per team member, under the
    /// member's `tokenKey`. Mounted into the core workers; a changed token is picked up within
    /// about a minute, no restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_secret_ref: Option<crate::account::LocalObjectReference>,
}

fn default_true() -> bool {
    true
}

/// Observed state of an AgentPool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolStatus {
    /// Replicas of the core Deployment (for `/scale`).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas the operator wants now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Ready core workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Pending jobs of this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// Running jobs of this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_jobs: Option<i64>,
    /// Dead jobs (out of attempts), kept for inspection and replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_jobs: Option<i64>,
    /// Age of the oldest pending job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_seconds: Option<i64>,
    /// When the operator last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Open handoffs of this pool: conversations waiting for or with a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_handoffs: Option<i64>,
    /// Age of the oldest open handoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_handoff_seconds: Option<i64>,
    /// Pods of the gateway fleet, and how many are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ready_replicas: Option<i32>,
    /// WhatsAppAccounts that reference this pool (and are not suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numbers: Option<i32>,
    /// Label selector of the core pods (for `/scale` and HPAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: Ready, ScalingActive, ToolsValid, SpecValid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl AgentPoolSpec {
    /// The configured lanes, or the built-in info/commerce/support set when none are given.
    pub fn effective_lanes(&self) -> Vec<LaneSpec> {
        if !self.lanes.is_empty() {
            return self.lanes.clone();
        }
        default_lanes()
    }
}

/// Built-in lanes used when an AgentPool declares none.
pub fn default_lanes() -> Vec<LaneSpec> {
    let lane = |name: &str, keywords: &[&str], reply: &str, handoff: bool| LaneSpec {
        name: name.to_string(),
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
        prompt: None,
        replies: vec![reply.to_string()],
        handoff,
        // Photos and voice notes are mostly about a problem.
        media: name == "support",
        buttons: vec![],
    };
    vec![
        lane(
            "info",
            &[
                "hi", "hello", "hours", "open", "where", "address", "info", "hola",
            ],
            "Hi! We're open Monday to Friday, 9:00-18:00. Ask me about prices, orders or support.",
            false,
        ),
        lane(
            "commerce",
            &[
                "price", "prices", "buy", "order", "cost", "shop", "catalog", "pay",
            ],
            "Happy to help you order. Tell me the product and quantity and I'll prepare it.",
            false,
        ),
        lane(
            "support",
            &[
                "help",
                "problem",
                "broken",
                "refund",
                "complaint",
                "support",
                "issue",
            ],
            "Sorry to hear that. Describe the problem and I'll sort it out, or type 'human' to talk to a person.",
            false,
        ),
        lane(
            "human",
            &["human", "agent", "person", "operator"],
            "Connecting you with a person.",
            true,
        ),
    ]
}
