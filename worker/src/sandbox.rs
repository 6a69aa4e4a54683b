//! The local sandbox: the whole pipeline on one machine, no cluster and no WhatsApp account.
//!
//! Starts (or uses `DATABASE_URL`) a Postgres, the fake WhatsApp Cloud API with its web chat
//! page, an in-process fake Kubernetes API for the Lease, one gateway (which takes the Lease and
//! sends) and one core worker. A message typed in the page goes through the real pipeline:
//! signed webhook -> gateway -> Postgres queue -> agent -> outbox -> lease-gated send -> page.
//! The team inbox runs beside it: type "human" as the customer, answer as Alice in the inbox,
//! and resume the agent from there.

use std::time::Duration;

use fakes::cloud_api::{CloudApiConfig, FakeCloudApi};
use fakes::kube_api::FakeKubeApi;
use serde_json::json;
use service::secret::{ExposeSecret, SecretString};

use crate::config::AccountArgs;
use crate::core::inbox::auth::{SharedTokens, TeamTokens};
use crate::core::inbox::events::TeamEvents;
use crate::core::inbox::{self, InboxState};
use crate::gateway::lease::LeaseSettings;
use crate::gateway::{self, GatewaySettings, RunningGateway};
use crate::metrics::Metrics;

/// Sandbox options.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// Address of the chat page (the fake WhatsApp).
    #[arg(long, env = "SANDBOX_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Postgres to use; default: a throwaway cluster (needs PostgreSQL's initdb).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = service::secret::parse)]
    pub database_url: Option<SecretString>,
    /// An OpenAI-compatible endpoint (e.g. http://localhost:11434 for Ollama); default: the
    /// rules agent, which needs no key.
    #[arg(long, env = "LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    #[arg(long, env = "LLM_MODEL")]
    pub llm_model: Option<String>,
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true, value_parser = service::secret::parse)]
    pub llm_api_key: Option<SecretString>,
    /// Address of the team inbox (the human side of handoff).
    #[arg(long, env = "SANDBOX_INBOX_ADDR", default_value = "127.0.0.1:8081")]
    pub inbox_addr: String,
    /// Token of the sandbox's team member (Alice); default: a random one, printed at start.
    #[arg(long, env = "SANDBOX_TEAM_TOKEN", hide_env_values = true, value_parser = service::secret::parse)]
    pub team_token: Option<SecretString>,
}

/// A running sandbox.
pub struct Sandbox {
    pub cloud: FakeCloudApi,
    pub gateway: RunningGateway,
    pub core: crate::core::RunningCore,
    /// The team inbox, served like a core worker serves it.
    pub inbox: fakes::Server,
    /// Alice's token for the inbox.
    pub team_token: String,
    _kube: FakeKubeApi,
}

impl Sandbox {
    pub async fn start(args: SandboxArgs) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let url = match &args.database_url {
            Some(u) if !u.expose_secret().is_empty() => u.expose_secret().to_string(),
            _ => queue::testing::start_cluster(queue::testing::Durability::Fast)?.url,
        };
        let pool = queue::connect(&url, 20).await?;
        let cloud = FakeCloudApi::start_on(&args.addr, CloudApiConfig::default()).await?;
        // The WABA's templates, as a business would have them approved (and one paused).
        cloud.add_template("order_update", "en_US", 2, "APPROVED");
        cloud.add_template("appointment_reminder", "en_US", 1, "APPROVED");
        cloud.add_template("spring_promo", "en_US", 0, "PAUSED");
        let kube_api = FakeKubeApi::start().await?;
        let kube = kube::Client::try_from(kube::Config::new(kube_api.url().parse()?))?;
        let account = AccountArgs {
            id: "sandbox/demo".into(),
            phone_number_id: cloud.phone_number_id().into(),
            api_base_url: cloud.api_base_url(),
            waba_id: Some(cloud.waba_id().into()),
            routing: crate::config::RoutingArgs {
                pool: "sandbox/agents".into(),
                handoff_message: "Thanks! A member of our team will reply here shortly.".into(),
                allowed_contacts: vec![],
                max_message_age_seconds: 86_400,
                answer_groups: false,
            },
            access_token: cloud.access_token().into(),
            app_secret: cloud.app_secret().into(),
            verify_token: "sandbox".into(),
            rate_per_second: 80,
            per_recipient_burst: 20,
            retry: crate::config::RetryArgs {
                max_attempts: 8,
                backoff_seconds: 1,
                in_doubt_grace_seconds: 30,
            },
            media: Default::default(),
        };
        let lease = LeaseSettings {
            duty: lease::Duty::Send,
            name: "whatsapp-demo".into(),
            namespace: "sandbox".into(),
            identity: "sandbox-gateway-0".into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        let (metrics, registry) = Metrics::new();
        let probes = crate::http::router(crate::http::Probes {
            pool: pool.clone(),
            registry: std::sync::Arc::new(registry),
            draining: Default::default(),
        });
        let gateway = gateway::start(
            pool.clone(),
            Some(kube),
            GatewaySettings {
                account,
                lease,
                listen: "127.0.0.1:0".into(),
                ingress_only: false,
            },
            metrics.clone(),
            probes,
        )
        .await?;
        cloud.set_webhook_url(format!("http://{}/webhook", gateway.addr));
        let team = json!([{ "id": "alice@example.com", "name": "Alice" }]);
        let spec = match &args.llm_base_url {
            Some(base) => {
                json!({ "model": { "provider": "openai", "baseUrl": base, "model": args.llm_model.clone().unwrap_or_else(|| "gpt-4o-mini".into()) },
                                  "tools": [{ "id": "handoff" }, { "id": "set_lane" }, { "id": "business_hours" }],
                                  "team": team })
            }
            None => json!({ "team": team }),
        };
        let spec: crds::AgentPoolSpec = serde_json::from_value(spec)?;
        let team_token = match &args.team_token {
            Some(t) if !t.expose_secret().is_empty() => t.expose_secret().to_string(),
            _ => uuid::Uuid::new_v4().simple().to_string(),
        };
        let (tokens, problems) = TeamTokens::from_pairs(
            &spec.team,
            [("alice_example.com".to_string(), team_token.clone())],
        );
        anyhow::ensure!(
            problems.is_empty(),
            "sandbox team token: {}",
            problems.join("; ")
        );
        let inbox = fakes::Server::start_on(
            &args.inbox_addr,
            inbox::router(InboxState {
                db: pool.clone(),
                pool: "sandbox/agents".into(),
                tokens: SharedTokens::new(tokens),
                events: TeamEvents::start(pool.clone()),
                metrics: metrics.clone(),
            }),
        )
        .await?;
        let core = crate::core::start(
            pool,
            crate::core::CoreSettings {
                queue: "sandbox/agents".into(),
                spec,
                api_key: args.llm_api_key.clone(),
                processor_id: "sandbox-core-0".into(),
                lock: Duration::from_secs(60),
                poll_interval: Duration::from_secs(1),
            },
            metrics,
        )
        .await?;
        Ok(Self {
            cloud,
            gateway,
            core,
            inbox,
            team_token,
            _kube: kube_api,
        })
    }

    pub async fn shutdown(self) {
        self.core.shutdown().await;
        self.gateway.shutdown().await;
    }
}
