//! Prometheus metrics of the operator (prefix `whatsapp_operator`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Failure {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pool {
    pub pool: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub runs: Family<Kind, Counter>,
    pub failures: Family<Failure, Counter>,
    pub duration: Family<Kind, Histogram>,
    pub accounts: Family<Phase, Gauge>,
    pub queue_depth: Family<Pool, Gauge>,
    pub desired_replicas: Family<Pool, Gauge>,
    /// 1 on the replica that leads (with leader election on).
    pub leader: Gauge,
}

impl Metrics {
    pub fn new() -> (Self, Registry) {
        let mut reg = Registry::with_prefix("whatsapp_operator");
        let m = Self {
            runs: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            accounts: Family::default(),
            queue_depth: Family::default(),
            desired_replicas: Family::default(),
            leader: Gauge::default(),
        };
        reg.register("reconcile_runs", "Reconciles by kind", m.runs.clone());
        reg.register(
            "reconcile_failures",
            "Failed reconciles by kind and error",
            m.failures.clone(),
        );
        reg.register(
            "reconcile_duration_seconds",
            "Reconcile duration by kind",
            m.duration.clone(),
        );
        reg.register(
            "accounts",
            "WhatsAppAccounts by phase (as last reconciled)",
            m.accounts.clone(),
        );
        reg.register(
            "pool_queue_depth",
            "Pending jobs per AgentPool",
            m.queue_depth.clone(),
        );
        reg.register(
            "pool_desired_replicas",
            "Desired core replicas per AgentPool",
            m.desired_replicas.clone(),
        );
        reg.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        (m, reg)
    }

    pub fn kind(k: &str) -> Kind {
        Kind {
            kind: k.to_string(),
        }
    }
}
