//! The core role: claims a pool's agent jobs and runs turns.

pub mod admin;
pub mod agent;
pub mod handoff;
pub mod inbox;
pub mod job_payload;
pub use ::tools;
pub mod turn;

use std::sync::Arc;
use std::time::Duration;

use crds::agent_pool::{AgentPoolSpec, LaneSpec, ModelProvider};
use queue::ClaimedJob;
use queue::notifier::Notifier;
use queue::rescuer::{Rescuer, RescuerConfig};
use queue::runner::{self, Handler, Outcome, RunnerConfig};
use service::secret::SecretString;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use agent::Agent;
use agent::openai::{OpenAiAgent, OpenAiConfig};
use agent::rules::RulesAgent;
use tools::{Diagnostic, Registry, Toolbox};
use turn::TurnRunner;

/// What a turn needs from the AgentPool spec.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Queue name: `<namespace>/<pool>`.
    pub queue: String,
    pub system_prompt: Option<String>,
    pub lanes: Vec<LaneSpec>,
    pub history_messages: i64,
    pub session_ttl_seconds: i64,
}

impl PoolSettings {
    pub fn from_spec(queue: &str, spec: &AgentPoolSpec) -> Self {
        Self {
            queue: queue.to_string(),
            system_prompt: spec.system_prompt.clone(),
            lanes: spec.effective_lanes(),
            history_messages: spec.history_messages as i64,
            session_ttl_seconds: spec.session_ttl_seconds as i64,
        }
    }
}

/// Build the agent the spec asks for. `api_key` comes from the Secret the spec references.
pub fn build_agent(spec: &AgentPoolSpec, api_key: Option<SecretString>) -> anyhow::Result<Agent> {
    Ok(match spec.model.provider {
        ModelProvider::Rules => Agent::Rules(RulesAgent),
        ModelProvider::Openai => {
            let model =
                spec.model.model.clone().ok_or_else(|| {
                    anyhow::anyhow!("model.model is required for provider openai")
                })?;
            Agent::OpenAi(OpenAiAgent::new(OpenAiConfig {
                base_url: spec
                    .model
                    .base_url
                    .clone()
                    .unwrap_or_else(|| "https://api.openai.com".into()),
                model,
                api_key,
                timeout: Duration::from_secs(spec.model.timeout_seconds.max(1) as u64),
                max_steps: spec.model.max_steps.max(1),
                max_tokens: spec.model.max_tokens.max(1),
                temperature: spec.model.temperature,
            })?)
        }
    })
}

/// Resolve the pool's tools and record any diagnostics where operators can see them.
pub async fn resolve_tools(
    db: &PgPool,
    queue: &str,
    spec: &AgentPoolSpec,
) -> Result<(Toolbox, Vec<Diagnostic>), sqlx::Error> {
    let (registry, mut diags) = Registry::builtin();
    let (toolbox, more) = registry.enable(&spec.tools);
    diags.extend(more);
    record_diagnostics(db, queue, &diags).await?;
    for d in &diags {
        tracing::warn!(pool = %queue, plugin = %d.plugin_id, field = %d.field, "tool disabled: {}", d.message);
    }
    Ok((toolbox, diags))
}

/// Replace the pool's plugin diagnostics with the current ones.
pub async fn record_diagnostics(
    db: &PgPool,
    queue: &str,
    diags: &[Diagnostic],
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM plugin_diagnostics WHERE pool = $1")
        .bind(queue)
        .execute(&mut *tx)
        .await?;
    for d in diags {
        sqlx::query(
            "INSERT INTO plugin_diagnostics (pool, plugin_id, field, message) VALUES ($1, $2, $3, $4)
             ON CONFLICT (pool, plugin_id, field) DO UPDATE SET message = EXCLUDED.message, observed_at = now()",
        )
        .bind(queue)
        .bind(&d.plugin_id)
        .bind(&d.field)
        .bind(&d.message)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

struct TurnHandler(Arc<TurnRunner>);

impl Handler for TurnHandler {
    async fn handle(&self, job: ClaimedJob) -> Outcome {
        if job.kind != job_payload::AgentTurn::KIND {
            return Outcome::Fail {
                error: format!("unknown job kind {:?}", job.kind),
                permanent: true,
            };
        }
        self.0.run(job).await
    }
}

/// Settings of a core worker process.
pub struct CoreSettings {
    pub queue: String,
    pub spec: AgentPoolSpec,
    pub api_key: Option<SecretString>,
    pub processor_id: String,
    /// Job lock; heartbeats extend it every third.
    pub lock: Duration,
    pub poll_interval: Duration,
}

/// A running core worker.
pub struct RunningCore {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    pub diagnostics: Vec<Diagnostic>,
}

impl RunningCore {
    /// Stop claiming, finish running turns, stop.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// A crash: stop everything where it is.
    pub fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn start(db: PgPool, s: CoreSettings, metrics: Metrics) -> anyhow::Result<RunningCore> {
    handoff::sync_team(&db, &s.queue, &s.spec.team).await?;
    let (tools, diagnostics) = resolve_tools(&db, &s.queue, &s.spec).await?;
    let agent = build_agent(&s.spec, s.api_key.clone())?;
    let runner = Arc::new(TurnRunner {
        pool: db.clone(),
        settings: PoolSettings::from_spec(&s.queue, &s.spec),
        agent,
        tools,
        metrics: metrics.clone(),
    });
    let notifier = Notifier::start(db.clone());
    let mut cfg = RunnerConfig::new(s.queue.clone(), s.processor_id.clone());
    cfg.concurrency = s.spec.concurrency_per_replica.max(1) as usize;
    cfg.claim_batch = cfg.concurrency;
    cfg.lock = s.lock;
    cfg.poll_interval = s.poll_interval;
    let cancel = CancellationToken::new();
    let wake = notifier.jobs(&s.queue);
    let c = cancel.clone();
    let run_db = db.clone();
    let runner_task = tokio::spawn(async move {
        let _notifier = notifier;
        runner::run(run_db, cfg, Arc::new(TurnHandler(runner)), wake, c).await;
    });
    let rescuer = Rescuer::new(db.clone(), RescuerConfig::default());
    let rescuer_task = tokio::spawn(rescuer.run(cancel.clone()));
    let stats_task = tokio::spawn(stats_loop(db, s.queue.clone(), metrics, cancel.clone()));
    tracing::info!(pool = %s.queue, concurrency = s.spec.concurrency_per_replica, "core worker started");
    Ok(RunningCore {
        cancel,
        tasks: vec![runner_task, rescuer_task, stats_task],
        diagnostics,
    })
}

async fn stats_loop(db: PgPool, queue: String, metrics: Metrics, cancel: CancellationToken) {
    loop {
        if let Ok(s) = queue::stats::for_queue(&db, &queue).await {
            metrics.queue_pending.set(s.pending);
            metrics
                .queue_oldest_pending_seconds
                .set(s.oldest_pending_seconds as i64);
        }
        if let Ok(h) = queue::stats::handoffs_for_pool(&db, &queue).await {
            metrics.handoffs_open.set(h.open);
            metrics.handoff_oldest_seconds.set(h.oldest_seconds as i64);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
