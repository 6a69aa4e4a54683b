//! `WhatsAppAccount`: one WhatsApp phone number and how it is served.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One WhatsApp phone number. The operator runs gateway pods for it, and only the holder of the
/// Lease `whatsapp-<name>` sends: over the Cloud API (every replica accepts webhooks), or over
/// WhatsApp Web (only the holder opens the phone's one socket).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "whatsapp.kube-agents.io",
    version = "v1alpha1",
    kind = "WhatsAppAccount",
    plural = "whatsappaccounts",
    shortname = "waa",
    category = "whatsapp",
    namespaced,
    cel,
    status = "WhatsAppAccountStatus",
    derive = "PartialEq",
    doc = "A WhatsApp phone number served by lease-gated gateway pods.",
    printcolumn(name = "Phone", type_ = "string", json_path = ".spec.phoneNumber"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".status.provider"),
    printcolumn(name = "Owner", type_ = "string", json_path = ".status.owner"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Connected",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WhatsAppAccountSpec {
    /// The phone number in E.164 form (`+` then 7 to 15 digits, e.g. `+15550783881`).
    /// Shown in `kubectl get whatsappaccounts`. For the Cloud API it does not route traffic
    /// (the phone number id does); for WhatsApp Web it is the number a pair code is asked for.
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^\\\\+[1-9][0-9]{6,14}$')").message("phoneNumber must be E.164: '+' followed by 7 to 15 digits, e.g. +15550783881"))]
    pub phone_number: String,

    /// How messages reach WhatsApp: `cloudApi` or `whatsappWeb`, exactly one.
    pub provider: ProviderSpec,

    /// The AgentPool (same namespace) whose core workers answer this number's conversations.
    /// Changing it moves new conversations' jobs to the other pool.
    pub agent_pool_ref: LocalObjectReference,

    /// If set, only these contacts (E.164 numbers or business-scoped user ids) get agent
    /// replies; messages from others are stored and acknowledged but not answered. Default: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_contacts: Vec<String>,

    /// Whether the agent answers in WhatsApp groups the number is in (WhatsApp Web). Default
    /// false: group messages are stored with their participant and never answered, so a bot
    /// added to a group does not answer everyone in it. `allowedContacts`, when set, must name
    /// the group's JID (`...@g.us`) for it to be answered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer_groups: bool,

    /// Text sent to the customer when the conversation is handed to a human.
    /// Default: "Thanks! A member of our team will reply here shortly."
    #[serde(default = "default_handoff_message")]
    pub handoff_message: String,

    /// Deprecated and ignored: gateways run as one fleet per AgentPool (its `gateways`
    /// section). Kept so that older manifests still apply; the `Deprecated` condition says
    /// when it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: Option<i32>,

    /// Lease timings with client-go leader-election semantics. Defaults: 15 s / 10 s / 2 s.
    #[serde(default)]
    pub lease: LeaseTimings,

    /// Outbound delivery: rate limits and retries.
    #[serde(default)]
    pub delivery: DeliverySpec,

    /// Media customers send (both providers): size limit and retention.
    #[serde(default)]
    pub media: MediaSpec,

    /// Stop serving this number: its Lease is released and nothing is sent. Its webhooks are
    /// kept unprocessed (up to 7 days) and stored when the number is resumed.
    #[serde(default)]
    pub suspend: bool,

    /// Deprecated and ignored: the gateway fleet runs the AgentPool's `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

fn default_handoff_message() -> String {
    "Thanks! A member of our team will reply here shortly.".to_string()
}

/// Where and how the account talks to WhatsApp.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.cloudApi) != has(self.whatsappWeb)").message("set exactly one of provider.cloudApi and provider.whatsappWeb"))]
#[x_kube(validation = Rule::new("has(oldSelf.cloudApi) == has(self.cloudApi)").message("the provider cannot be changed; create a new WhatsAppAccount"))]
pub struct ProviderSpec {
    /// The WhatsApp Cloud API (Meta's Graph API): webhooks in, HTTPS sends out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_api: Option<CloudApiSpec>,
    /// WhatsApp Web (multi-device, the protocol of the phone app's linked devices): one socket,
    /// held by the Lease holder; the session lives in Postgres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whatsapp_web: Option<WhatsAppWebSpec>,
}

/// The provider kind, as shown in `kubectl get whatsappaccounts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    CloudApi,
    WhatsAppWeb,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::CloudApi => "CloudAPI",
            ProviderKind::WhatsAppWeb => "WhatsAppWeb",
        }
    }
}

impl WhatsAppAccountSpec {
    /// The key of the account's phone number in the database: the Cloud API phone number id, or
    /// `web:<number>` for WhatsApp Web (which has no phone number id).
    pub fn phone_key(&self) -> Option<String> {
        match (&self.provider.cloud_api, &self.provider.whatsapp_web) {
            (Some(c), None) => Some(c.phone_number_id.clone()),
            (None, Some(_)) => Some(format!("web:{}", self.phone_number)),
            _ => None,
        }
    }
}

impl WhatsAppAccount {
    /// The other account named by a True `PhoneNumberConflict` condition, if any.
    pub fn phone_number_conflict(&self) -> Option<String> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == crate::conditions::PHONE_NUMBER_CONFLICT && c.status == "True")
            .map(|c| c.message.clone())
    }
}

impl ProviderSpec {
    /// The provider in use; `None` when neither or both are set (the CEL rule refuses that).
    pub fn kind(&self) -> Option<ProviderKind> {
        match (&self.cloud_api, &self.whatsapp_web) {
            (Some(_), None) => Some(ProviderKind::CloudApi),
            (None, Some(_)) => Some(ProviderKind::WhatsAppWeb),
            _ => None,
        }
    }
}

/// How a WhatsApp Web account is linked to the phone.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum PairingMethod {
    /// Scan a QR code with the phone (WhatsApp > Linked devices > Link a device).
    #[default]
    QrCode,
    /// Type an 8-character code on the phone ("Link with phone number instead"); the code is
    /// asked for `spec.phoneNumber`.
    PairCode,
}

/// WhatsApp Web settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhatsAppWebSpec {
    /// `QrCode` (default) or `PairCode`. The current code is in `status.pairing`, in an Event,
    /// and on the gateway Service's `/pairing` page.
    #[serde(default)]
    pub pairing: PairingMethod,

    /// The name contacts see for this linked device. Default: none (the phone's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub push_name: Option<String>,

    /// Pacing that keeps an ordinary number clear of WhatsApp's spam limits.
    #[serde(default)]
    pub pacing: WebPacing,

    /// Mark each customer message read (blue ticks) as soon as it is stored, as a person with
    /// the chat open would. Default: false (customers see delivered ticks only).
    #[serde(default)]
    pub read_receipts: bool,

    /// WebSocket URL of the WhatsApp Web server. Default: WhatsApp's own. Point it at a
    /// stand-in server in tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('wss://') || self.startsWith('ws://')").message("serverUrl must be a ws:// or wss:// URL"))]
    pub server_url: Option<String>,

    /// WhatsApp Web client version to announce, `major.minor.patch`. Default: fetched from
    /// web.whatsapp.com at connect time; pin it where the gateway has no egress to that site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+\.[0-9]+\.[0-9]+$"))]
    pub client_version: Option<String>,
}

/// Send pacing for a WhatsApp Web number.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebPacing {
    /// Messages per minute the number sends in all. Default: 20.
    #[serde(default = "default_web_per_minute")]
    #[schemars(range(min = 1, max = 600))]
    pub messages_per_minute: i32,
    /// Messages per minute to one recipient. Default: 6.
    #[serde(default = "default_web_per_recipient")]
    #[schemars(range(min = 1, max = 60))]
    pub per_recipient_per_minute: i32,
    /// Show "typing..." for this long before each reply, as a person would. Default: 0 (off).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub typing_millis: i32,
}

fn default_web_per_minute() -> i32 {
    20
}
fn default_web_per_recipient() -> i32 {
    6
}

impl Default for WebPacing {
    fn default() -> Self {
        Self {
            messages_per_minute: default_web_per_minute(),
            per_recipient_per_minute: default_web_per_recipient(),
            typing_millis: 0,
        }
    }
}

/// WhatsApp Cloud API settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudApiSpec {
    /// The phone number id from the App Dashboard. Inbound webhooks are routed by it and sends
    /// go to `{apiBaseUrl}/{phoneNumberId}/messages`.
    #[schemars(length(min = 1, max = 64))]
    pub phone_number_id: String,

    /// Base URL of the Graph API, version included. Default: `https://graph.facebook.com/v23.0`.
    /// Point it at a fake server in tests and sandboxes.
    #[serde(default = "default_api_base_url")]
    pub api_base_url: String,

    /// The Secret (same namespace) holding the credentials.
    pub credentials_secret_ref: CredentialsSecretRef,

    /// The WhatsApp Business Account (WABA) id the number belongs to, from the App Dashboard.
    /// When set, the holder lists its message templates (`GET /{wabaId}/message_templates`,
    /// every 10 minutes and on Meta's template status webhooks) and the team inbox offers them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+$')").message("wabaId is the numeric WhatsApp Business Account id"))]
    pub waba_id: Option<String>,
}

fn default_api_base_url() -> String {
    "https://graph.facebook.com/v23.0".to_string()
}

/// A Secret and the names of the keys the gateway reads from it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret in the account's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the Graph API access token (sent as `Authorization: Bearer`). Default: `accessToken`.
    #[serde(default = "default_access_token_key")]
    pub access_token_key: String,
    /// Key of the App Secret that signs webhooks (`X-Hub-Signature-256`). Default: `appSecret`.
    #[serde(default = "default_app_secret_key")]
    pub app_secret_key: String,
    /// Key of the webhook verify token typed into the App Dashboard. Default: `verifyToken`.
    #[serde(default = "default_verify_token_key")]
    pub verify_token_key: String,
}

fn default_access_token_key() -> String {
    "accessToken".to_string()
}
fn default_app_secret_key() -> String {
    "appSecret".to_string()
}
fn default_verify_token_key() -> String {
    "verifyToken".to_string()
}

impl CredentialsSecretRef {
    /// Every key the gateway needs, in a fixed order.
    pub fn keys(&self) -> [&str; 3] {
        [
            &self.access_token_key,
            &self.app_secret_key,
            &self.verify_token_key,
        ]
    }
}

/// A reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Leader-election timings for the account's Lease (client-go semantics).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.durationSeconds > self.renewDeadlineSeconds").message("lease.durationSeconds must be greater than lease.renewDeadlineSeconds"))]
#[x_kube(validation = Rule::new("self.renewDeadlineSeconds * 10 > self.retryPeriodSeconds * 12").message("lease.renewDeadlineSeconds must be greater than 1.2 x lease.retryPeriodSeconds"))]
pub struct LeaseTimings {
    /// How long a standby waits after the last renewal before taking the Lease. Default: 15.
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 2, max = 300))]
    pub duration_seconds: i32,
    /// How long the holder keeps sending without a successful renewal; past it the holder stops
    /// sending at once, before any standby could take over. Default: 10.
    #[serde(default = "default_renew_deadline")]
    #[schemars(range(min = 1, max = 299))]
    pub renew_deadline_seconds: i32,
    /// Interval between acquire and renew attempts. Default: 2.
    #[serde(default = "default_retry_period")]
    #[schemars(range(min = 1, max = 60))]
    pub retry_period_seconds: i32,
}

fn default_lease_duration() -> i32 {
    15
}
fn default_renew_deadline() -> i32 {
    10
}
fn default_retry_period() -> i32 {
    2
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            duration_seconds: default_lease_duration(),
            renew_deadline_seconds: default_renew_deadline(),
            retry_period_seconds: default_retry_period(),
        }
    }
}

/// Outbound delivery settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// Messages per second this number may send (Meta's default throughput is 80/s). Cloud API
    /// only: WhatsApp Web numbers are paced by `provider.whatsappWeb.pacing`. Default: 80.
    #[serde(default = "default_rate_per_second")]
    #[schemars(range(min = 1, max = 1000))]
    pub rate_per_second: i32,
    /// Sends to one recipient per 6 seconds before pacing (Meta's pair rate limit allows bursts
    /// up to 45 per 6 s, borrowed from future quota). Cloud API only (see `ratePerSecond`).
    /// Default: 6.
    #[serde(default = "default_pair_burst")]
    #[schemars(range(min = 1, max = 45))]
    pub per_recipient_burst: i32,
    /// Attempts before an outbound message is marked failed (set on each message when it is
    /// queued). Default: 8.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 50))]
    pub max_attempts: i32,
    /// First retry delay in seconds; later retries back off exponentially with jitter.
    /// Default: 1.
    #[serde(default = "default_backoff_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub backoff_seconds: i32,
    /// How long a send whose outcome is unknown (a timeout, or a holder that crashed mid-send)
    /// waits for its delivery status before it is sent again. Longer than the Lease's
    /// `durationSeconds`, so that a new holder does not resend what its predecessor's status
    /// webhook is about to settle. Default: 30.
    #[serde(default = "default_in_doubt_grace_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub in_doubt_grace_seconds: i32,
}

fn default_rate_per_second() -> i32 {
    80
}
fn default_pair_burst() -> i32 {
    6
}
fn default_max_attempts() -> i32 {
    8
}
fn default_backoff_seconds() -> i32 {
    1
}
fn default_in_doubt_grace_seconds() -> i32 {
    30
}

/// Media customers send (photos, voice notes, documents, videos, stickers), on either provider.
/// The number's Lease holder downloads them after the message is stored (a Cloud API webhook
/// answered, a WhatsApp Web message acknowledged) and keeps them in Postgres for the team inbox.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaSpec {
    /// Larger media are not stored (marked `too_large`; the transcript says so). WhatsApp
    /// allows up to 100 MB documents. Default: 16777216 (16 MiB).
    #[serde(default = "default_media_max_bytes")]
    #[schemars(range(min = 1024, max = 104_857_600))]
    pub max_bytes: i64,
    /// Days the bytes are kept after download; then they are dropped (the message stays).
    /// Default: 30.
    #[serde(default = "default_media_retention_days")]
    #[schemars(range(min = 1, max = 3650))]
    pub retention_days: i32,
}

fn default_media_max_bytes() -> i64 {
    16 * 1024 * 1024
}
fn default_media_retention_days() -> i32 {
    30
}

impl Default for MediaSpec {
    fn default() -> Self {
        Self {
            max_bytes: default_media_max_bytes(),
            retention_days: default_media_retention_days(),
        }
    }
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            rate_per_second: default_rate_per_second(),
            per_recipient_burst: default_pair_burst(),
            max_attempts: default_max_attempts(),
            in_doubt_grace_seconds: default_in_doubt_grace_seconds(),
            backoff_seconds: default_backoff_seconds(),
        }
    }
}

/// Where an account is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum AccountPhase {
    /// Created; the gateway is starting or no pod holds the Lease yet.
    #[default]
    Pending,
    /// A gateway pod holds the Lease and the credentials are valid: messages flow.
    Ready,
    /// Something needs attention (credentials, spec, an expired Lease); see the conditions.
    Degraded,
    /// `spec.suspend` is true: the gateway is scaled to zero.
    Suspended,
}

impl std::fmt::Display for AccountPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Observed state of a WhatsAppAccount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WhatsAppAccountStatus {
    /// Pending, Ready, Degraded or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AccountPhase>,
    /// Standard conditions: Ready, LeaseHeld, CredentialsValid, SpecValid; for WhatsApp Web
    /// also Paired and Connected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `CloudAPI` or `WhatsAppWeb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// WhatsApp Web only, while the number is not linked: how to link it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairing: Option<PairingStatus>,
    /// The gateway pod holding the Lease (the only one that sends), as in `kubectl get leases`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How many times the Lease changed hands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<i32>,
    /// When the holder last renewed the Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<Time>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Gateway pods ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Outbound messages waiting to be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_queued: Option<i64>,
    /// Outbound messages accepted by WhatsApp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_sent: Option<i64>,
    /// Outbound messages that failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_failed: Option<i64>,
    /// Outbound messages accepted by WhatsApp in the last five minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_last5m: Option<i64>,
    /// Outbound messages that failed for good in the last five minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_last5m: Option<i64>,
    /// The fencing epoch in Postgres: bumped by every new Lease holder before it sends; a
    /// holder with an older epoch can send nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_epoch: Option<i64>,
}

/// How to link a WhatsApp Web account right now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PairingStatus {
    /// `QrCode` or `PairCode`.
    pub method: String,
    /// The QR code's text (render it with any QR tool, or open the gateway's `/pairing` page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr_code: Option<String>,
    /// The 8-character code to type on the phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair_code: Option<String>,
    /// When this code stops working; a new one follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// What to do, in words.
    pub instructions: String,
}
