//! What every reconcile gets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::events::{Recorder, Reporter};
use service::secret::SecretString;
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::pool::scaling::Recommendation;

/// Operator settings that shape the objects it creates.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of gateways and core workers unless a resource overrides it.
    pub worker_image: String,
    /// Postgres URL handed to workers (through a Secret per resource).
    pub database_url: SecretString,
    /// How often a pool's queue is looked at (seconds).
    pub pool_resync_seconds: u64,
    /// How often an account's Lease is looked at for status (seconds).
    pub account_resync_seconds: u64,
}

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub db: Option<PgPool>,
    pub settings: Settings,
    pub metrics: Metrics,
    /// Recent replica recommendations per pool, for scale-down stabilization.
    pub recommendations: Mutex<HashMap<String, Vec<Recommendation>>>,
    /// Outbound counters of every account, read once per period for all of them (not one
    /// all-accounts query per account reconcile).
    pub outbound_stats: tokio::sync::Mutex<Option<(std::time::Instant, OutboundByAccount)>>,
    /// Accounts whose per-number gateway objects (from before the fleets) this process has
    /// already removed, so that is done once per account, not on every reconcile.
    pub legacy_removed: Mutex<std::collections::HashSet<String>>,
}

/// Outbound counters by account id.
pub type OutboundByAccount = Arc<HashMap<String, queue::stats::OutboundStats>>;

/// How long one read of every account's outbound counters serves the reconciles.
const OUTBOUND_STATS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl Context {
    /// The outbound counters of `account`, from a read of all accounts at most
    /// [`OUTBOUND_STATS_TTL`] old (None without a database or when it fails).
    pub async fn outbound_stats(&self, account: &str) -> Option<queue::stats::OutboundStats> {
        let db = self.db.as_ref()?;
        let mut cached = self.outbound_stats.lock().await;
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < OUTBOUND_STATS_TTL);
        if !fresh {
            match queue::stats::outbound_by_account(db).await {
                Ok(all) => {
                    let by_id = all.into_iter().map(|s| (s.account_id.clone(), s)).collect();
                    *cached = Some((std::time::Instant::now(), Arc::new(by_id)));
                }
                Err(error) => {
                    tracing::warn!(error = %queue::rescuer::error_chain(&error), "reading outbound stats");
                    return None;
                }
            }
        }
        cached
            .as_ref()
            .and_then(|(_, all)| all.get(account).cloned())
    }

    /// Publish Events (warning?, reason, note) about an object; a failure to publish is logged,
    /// never fatal to the reconcile.
    /// Publish `events` about `reference`. `related` (the Pod that holds a Lease now) is part
    /// of the recorder's series key: repeats of one reason about different pods stay separate
    /// Events instead of counting up under the first one's note.
    pub async fn publish_events(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        related: Option<&k8s_openapi::api::core::v1::ObjectReference>,
        action: &str,
        events: Vec<(bool, &str, String)>,
    ) {
        for (warning, reason, note) in events {
            let ev = kube::runtime::events::Event {
                type_: if warning {
                    kube::runtime::events::EventType::Warning
                } else {
                    kube::runtime::events::EventType::Normal
                },
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: related.cloned(),
            };
            if let Err(error) = self.recorder.publish(&ev, reference).await {
                tracing::warn!(%error, reason, "could not publish event");
            }
        }
    }

    /// The end of every reconcile: record its duration, then wait for a change when the spec is
    /// invalid (no hot loop) or look again after `resync_seconds`.
    pub fn reconciled(
        &self,
        kind: &str,
        started: std::time::Instant,
        spec_ok: bool,
        resync_seconds: u64,
    ) -> kube::runtime::controller::Action {
        self.metrics
            .duration
            .get_or_create(&crate::metrics::Metrics::kind(kind))
            .observe(started.elapsed().as_secs_f64());
        if spec_ok {
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(
                resync_seconds,
            ))
        } else {
            kube::runtime::controller::Action::await_change()
        }
    }

    /// The shared error policy: log, count by error kind, retry later with a fixed delay.
    pub fn reconcile_failed(
        &self,
        kind: &str,
        name: &str,
        error: &crate::Error,
    ) -> kube::runtime::controller::Action {
        tracing::warn!(kind, name, error = %queue::rescuer::error_chain(error), "reconcile failed");
        self.metrics
            .failures
            .get_or_create(&crate::metrics::Failure {
                kind: kind.into(),
                error: error.metric_label().into(),
            })
            .inc();
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(15))
    }

    /// Set the accounts-by-phase gauge from every account the controller sees (an account
    /// without a status yet counts as Pending; deleted ones drop out).
    pub fn count_account_phases(&self, accounts: &[std::sync::Arc<crds::WhatsAppAccount>]) {
        for p in ["Pending", "Ready", "Degraded", "Suspended"] {
            let n = accounts
                .iter()
                .filter(|a| {
                    a.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .map_or("Pending".to_string(), |phase| phase.to_string())
                        == p
                })
                .count() as i64;
            self.metrics
                .accounts
                .get_or_create(&crate::metrics::Phase {
                    phase: p.to_string(),
                })
                .set(n);
        }
    }

    pub fn new(
        client: kube::Client,
        db: Option<PgPool>,
        settings: Settings,
        metrics: Metrics,
        identity: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::MANAGER.into(),
            instance: Some(identity.to_string()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            db,
            settings,
            metrics,
            recommendations: Mutex::default(),
            legacy_removed: Mutex::default(),
            outbound_stats: tokio::sync::Mutex::default(),
        }
    }
}
