//! Command-line and environment configuration. The operator sets the environment variables in
//! the Deployments it creates; flags are for running by hand.

use std::time::Duration;

use clap::Args;
use service::secret::SecretString;

/// Settings every role needs.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Postgres URL of the shared queue.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = service::secret::parse)]
    pub database_url: SecretString,
    /// Address of the HTTP server (webhooks for gateways; probes and metrics for every role).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// This process in job rows and Lease holder identity: the pod name in a cluster.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    pub identity: String,
    /// Postgres connections of this process.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
}

fn default_identity() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("worker-{}", std::process::id()))
}

/// One WhatsApp account served by a gateway.
#[derive(Args, Debug, Clone)]
pub struct AccountArgs {
    /// Account id, `<namespace>/<name>` of the WhatsAppAccount.
    #[arg(long = "account", env = "WA_ACCOUNT")]
    pub id: String,
    /// Cloud API phone number id.
    #[arg(long, env = "WA_PHONE_NUMBER_ID")]
    pub phone_number_id: String,
    /// Graph API base URL, version included.
    #[arg(
        long,
        env = "WA_API_BASE_URL",
        default_value = "https://graph.facebook.com/v23.0"
    )]
    pub api_base_url: String,
    /// The WhatsApp Business Account id (`provider.cloudApi.wabaId`): its templates are listed.
    #[arg(long, env = "WA_WABA_ID")]
    pub waba_id: Option<String>,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[arg(long, env = "WA_ACCESS_TOKEN", hide_env_values = true, value_parser = service::secret::parse)]
    pub access_token: SecretString,
    #[arg(long, env = "WA_APP_SECRET", hide_env_values = true, value_parser = service::secret::parse)]
    pub app_secret: SecretString,
    #[arg(long, env = "WA_VERIFY_TOKEN", hide_env_values = true, value_parser = service::secret::parse)]
    pub verify_token: SecretString,
    /// Messages per second this number may send.
    #[arg(long, env = "WA_RATE_PER_SECOND", default_value_t = 80)]
    pub rate_per_second: u32,
    /// Sends to one recipient per 6 seconds before pacing.
    #[arg(long, env = "WA_PER_RECIPIENT_BURST", default_value_t = 6)]
    pub per_recipient_burst: u32,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub media: MediaArgs,
}

/// The media customers send to a number (WhatsAppAccount `spec.media`), for both providers.
#[derive(Args, Debug, Clone)]
pub struct MediaArgs {
    /// Media customers send larger than this (bytes) are not stored (`spec.media.maxBytes`).
    #[arg(long, env = "WA_MEDIA_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub media_max_bytes: u64,
    /// Stored media bytes are dropped this many days after download (`spec.media.retentionDays`).
    #[arg(long, env = "WA_MEDIA_RETENTION_DAYS", default_value_t = 30)]
    pub media_retention_days: u32,
}

impl Default for MediaArgs {
    fn default() -> Self {
        Self {
            media_max_bytes: 16 * 1024 * 1024,
            media_retention_days: 30,
        }
    }
}

impl MediaArgs {
    /// The limits of the media this number's customers send.
    pub fn limits(&self) -> crate::gateway::media::MediaLimits {
        crate::gateway::media::MediaLimits {
            max_bytes: self.media_max_bytes,
            retention: std::time::Duration::from_secs(
                u64::from(self.media_retention_days) * 86_400,
            ),
        }
    }
}

/// How a number's failed and in-doubt sends are retried (WhatsAppAccount `spec.delivery`), for
/// both providers.
#[derive(Args, Debug, Clone)]
pub struct RetryArgs {
    /// Send attempts before a message fails for good.
    #[arg(long, env = "WA_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: i32,
    /// First retry delay (seconds); later ones back off exponentially with jitter.
    #[arg(long, env = "WA_BACKOFF_SECONDS", default_value_t = 1)]
    pub backoff_seconds: u64,
    /// How long a send with an unknown outcome (timeout, a deposed holder's send) waits for its
    /// status webhook or receipt before it is sent again.
    #[arg(long, env = "WA_IN_DOUBT_GRACE_SECONDS", default_value_t = 30)]
    pub in_doubt_grace_seconds: u64,
}

impl RetryArgs {
    /// From the account's `spec.delivery`.
    pub fn from_delivery(d: &crds::account::DeliverySpec) -> Self {
        Self {
            max_attempts: d.max_attempts.max(1),
            backoff_seconds: d.backoff_seconds.max(1) as u64,
            in_doubt_grace_seconds: d.in_doubt_grace_seconds.max(1) as u64,
        }
    }
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts.max(1)
    }
    pub fn backoff(&self) -> Duration {
        Duration::from_secs(self.backoff_seconds.max(1))
    }
    pub fn in_doubt_grace(&self) -> Duration {
        Duration::from_secs(self.in_doubt_grace_seconds)
    }
}

impl AccountArgs {
    /// How this number's sender runs under the Lease holder `identity`.
    pub fn sender_config(&self, identity: &str) -> crate::gateway::sender::SenderConfig {
        crate::gateway::sender::SenderConfig {
            account: self.id.clone(),
            identity: identity.to_string(),
            pacing: crate::gateway::sender::Pacing::cloud_api(
                self.rate_per_second,
                self.per_recipient_burst,
            ),
            backoff: self.retry.backoff(),
            in_doubt_grace: self.retry.in_doubt_grace(),
            concurrency: 16,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Who answers an account's customers; the same for both gateway roles.
#[derive(Args, Debug, Clone)]
pub struct RoutingArgs {
    /// Queue of the AgentPool that answers (`<namespace>/<pool>`).
    #[arg(long, env = "WA_POOL")]
    pub pool: String,
    #[arg(
        long,
        env = "WA_HANDOFF_MESSAGE",
        default_value = "Thanks! A member of our team will reply here shortly."
    )]
    pub handoff_message: String,
    /// Comma-separated allow-list of contacts; empty: everyone.
    #[arg(
        long,
        env = "WA_ALLOWED_CONTACTS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub allowed_contacts: Vec<String>,
    /// Inbound messages older than this are stored but not answered (a backlog after an outage).
    #[arg(long, env = "WA_MAX_MESSAGE_AGE_SECONDS", default_value_t = 86_400)]
    pub max_message_age_seconds: i64,
    /// Answer in WhatsApp groups (WhatsApp Web); default: groups are stored, never answered.
    #[arg(long, env = "WA_ANSWER_GROUPS", default_value_t = false)]
    pub answer_groups: bool,
}

impl RoutingArgs {
    /// The allow-list as phone digits (no `+`), blanks dropped.
    pub fn allowed(&self) -> Vec<String> {
        self.allowed_contacts
            .iter()
            .map(|c| c.trim().trim_start_matches('+').to_string())
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// What the ingest needs to store the account's inbound messages.
    pub fn ingest_target(&self, account: &str) -> crate::gateway::ingest::IngestTarget {
        crate::gateway::ingest::IngestTarget {
            account: account.to_string(),
            pool: self.pool.clone(),
            allowed_contacts: self.allowed(),
            max_message_age_seconds: self.max_message_age_seconds,
            answer_groups: self.answer_groups,
        }
    }
}

#[derive(Args, Debug, Clone)]
/// One AgentPool served by a core worker.
pub struct PoolArgs {
    /// Queue of the AgentPool, `<namespace>/<name>`.
    #[arg(long = "pool", env = "WA_POOL")]
    pub queue: String,
    /// The AgentPool spec as JSON or YAML (the operator mounts it from a ConfigMap).
    #[arg(long, env = "AGENT_POOL_SPEC_FILE")]
    pub pool_spec_file: Option<String>,
    /// API key of the model endpoint.
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true, value_parser = service::secret::parse)]
    pub llm_api_key: Option<SecretString>,
    /// Job lock in seconds (heartbeats extend it).
    #[arg(long, env = "JOB_LOCK_SECONDS", default_value_t = 60)]
    pub job_lock_seconds: u64,
    /// Directory with one bearer token file per team member (the inbox Secret, mounted); read
    /// again every 15 s. Without it every team inbox endpoint answers 401.
    #[arg(long, env = "TEAM_TOKENS_DIR")]
    pub team_tokens_dir: Option<std::path::PathBuf>,
    /// Token of the pool's admin API (`/admin/v1`, used by `kubectl whatsapp`; the operator
    /// puts it in the Secret `ap-<pool>-admin`). Without it the admin API answers 403.
    #[arg(long, env = "WA_ADMIN_TOKEN", hide_env_values = true, value_parser = service::secret::parse)]
    pub admin_token: Option<SecretString>,
}

/// One pod of an AgentPool's gateway fleet (the `fleet` role).
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// The AgentPool whose numbers this pod sends for, `<namespace>/<name>`.
    #[arg(long = "pool", env = "WA_POOL")]
    pub pool: String,
    /// How often the pod lists Leases and looks at its share, in milliseconds.
    #[arg(long, env = "WA_FLEET_ROUND_MILLIS", default_value_t = 2000)]
    pub round_millis: u64,
    /// A fleet member not heard from for this long no longer counts towards the shares.
    #[arg(long, env = "WA_FLEET_MEMBER_TTL_SECONDS", default_value_t = 10)]
    pub member_ttl_seconds: u64,
    /// How often credentials Secrets are read again (token rotation).
    #[arg(long, env = "WA_SECRET_REFRESH_SECONDS", default_value_t = 60)]
    pub secret_refresh_seconds: u64,
    /// On SIGTERM: seconds of failing readiness, still taking webhooks, before stopping.
    #[arg(long, env = "WA_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,
}

impl FleetArgs {
    /// The pool's namespace and name.
    pub fn split(&self) -> (&str, &str) {
        self.pool.split_once('/').unwrap_or(("default", &self.pool))
    }
}

/// The namespace's webhook ingress (the `ingress` role): its namespace is the pod's.
#[derive(Args, Debug, Clone)]
pub struct IngressArgs {
    /// The namespace whose Cloud API numbers it takes webhooks for.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// How often credentials Secrets are read again (secret rotation).
    #[arg(long, env = "WA_SECRET_REFRESH_SECONDS", default_value_t = 60)]
    pub secret_refresh_seconds: u64,
    /// On SIGTERM: seconds of failing readiness, still taking webhooks, before stopping.
    #[arg(long, env = "WA_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,
}

/// The account's Lease.
#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// Lease name; default `whatsapp-<account name>`.
    #[arg(long, env = "WA_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Namespace of the Lease: the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    #[arg(long, env = "WA_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    #[arg(long, env = "WA_LEASE_RENEW_DEADLINE_SECONDS", default_value_t = 10)]
    pub renew_deadline_seconds: u64,
    #[arg(long, env = "WA_LEASE_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub retry_period_seconds: u64,
}

/// One WhatsApp Web account (the `web-gateway` role).
#[derive(clap::Args, Debug, Clone)]
pub struct WebAccountArgs {
    /// Account id, `<namespace>/<name>`.
    #[arg(long = "account", env = "WA_ACCOUNT")]
    pub id: String,
    /// The number in E.164 form (the pair code is asked for it).
    #[arg(long, env = "WA_PHONE_NUMBER")]
    pub phone_number: String,
    #[command(flatten)]
    pub routing: RoutingArgs,
    /// `QrCode` or `PairCode`.
    #[arg(long, env = "WA_WEB_PAIRING", default_value = "QrCode")]
    pub pairing: String,
    #[arg(long, env = "WA_WEB_PUSH_NAME")]
    pub push_name: Option<String>,
    /// WebSocket URL of the server (default: WhatsApp's).
    #[arg(long, env = "WA_WEB_SERVER_URL")]
    pub server_url: Option<String>,
    /// Client version to announce, `major.minor.patch` (default: fetched from web.whatsapp.com).
    #[arg(long, env = "WA_WEB_CLIENT_VERSION", value_parser = parse_client_version)]
    pub client_version: Option<(u32, u32, u32)>,
    #[arg(long, env = "WA_WEB_MESSAGES_PER_MINUTE", default_value_t = 20)]
    pub messages_per_minute: u32,
    #[arg(long, env = "WA_WEB_PER_RECIPIENT_PER_MINUTE", default_value_t = 6)]
    pub per_recipient_per_minute: u32,
    #[arg(long, env = "WA_WEB_TYPING_MILLIS", default_value_t = 0)]
    pub typing_millis: u64,
    /// Mark customers' messages read once stored (`provider.whatsappWeb.readReceipts`).
    #[arg(long, env = "WA_WEB_READ_RECEIPTS", default_value_t = false)]
    pub read_receipts: bool,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub media: MediaArgs,
}

impl WebAccountArgs {
    /// How this number's session owner runs under the Lease holder `identity`.
    pub fn web_settings(&self, identity: &str) -> crate::web::owner::WebSettings {
        crate::web::owner::WebSettings {
            account: self.id.clone(),
            phone_number: self.phone_number.clone(),
            pairing: match self.pairing.as_str() {
                "PairCode" => crate::web::owner::Pairing::PairCode,
                _ => crate::web::owner::Pairing::QrCode,
            },
            push_name: self.push_name.clone(),
            server_url: self.server_url.clone(),
            client_version: self.client_version,
            version_check_url: crate::web::owner::VERSION_CHECK_URL.to_string(),
            identity: identity.to_string(),
            pacing: crate::gateway::sender::Pacing::whatsapp_web(
                self.messages_per_minute,
                self.per_recipient_per_minute,
            ),
            typing: Duration::from_millis(self.typing_millis),
            read_receipts: self.read_receipts,
            backoff: self.retry.backoff(),
            in_doubt_grace: self.retry.in_doubt_grace(),
            max_attempts: self.retry.max_attempts(),
            pool: self.routing.pool.clone(),
            media: self.media.limits(),
        }
    }
}

/// `2.3000.1027934701` -> (2, 3000, 1027934701).
pub fn parse_client_version(s: &str) -> Result<(u32, u32, u32), String> {
    let parts: Vec<u32> = s
        .split('.')
        .map(|p| p.parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?} is not major.minor.patch: {e}"))?;
    match parts[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err(format!("{s:?} is not major.minor.patch")),
    }
}
