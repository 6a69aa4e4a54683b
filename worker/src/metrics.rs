//! Prometheus metrics of the worker (prefix `whatsapp_worker`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

impl Outcome {
    pub fn of(s: &str) -> Self {
        Self {
            outcome: s.to_string(),
        }
    }
}

/// Every metric the worker exports.
#[derive(Clone)]
pub struct Metrics {
    pub webhooks: Family<Outcome, Counter>,
    pub inbound_messages: Family<Outcome, Counter>,
    pub statuses: Family<Outcome, Counter>,
    pub sends: Family<Outcome, Counter>,
    pub standby_rounds: Counter,
    pub lease_held: Gauge,
    pub fence_epoch: Gauge,
    pub turns: Family<Outcome, Counter>,
    pub turn_seconds: Histogram,
    pub queue_pending: Gauge,
    pub queue_oldest_pending_seconds: Gauge,
    pub webhook_seconds: Histogram,
    pub team_actions: Family<Outcome, Counter>,
    pub media_fetches: Family<Outcome, Counter>,
    pub handoffs_open: Gauge,
    pub handoff_oldest_seconds: Gauge,
    pub handoff_first_reply_seconds: Histogram,
    pub unrouted_webhooks: Counter,
    pub leases_held: Gauge,
    pub fleet_members: Gauge,
    pub fleet_accounts: Gauge,
}

impl Metrics {
    /// The gauges the Lease elector keeps current.
    pub fn lease_gauges(&self) -> lease::LeaseGauges {
        lease::LeaseGauges {
            held: self.lease_held.clone(),
            epoch: self.fence_epoch.clone(),
        }
    }

    /// Register the metrics in a new registry.
    pub fn new() -> (Self, Registry) {
        let mut reg = Registry::with_prefix("whatsapp_worker");
        let m = Self {
            webhooks: Family::default(),
            inbound_messages: Family::default(),
            statuses: Family::default(),
            sends: Family::default(),
            standby_rounds: Counter::default(),
            lease_held: Gauge::default(),
            fence_epoch: Gauge::default(),
            turns: Family::default(),
            turn_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            queue_pending: Gauge::default(),
            queue_oldest_pending_seconds: Gauge::default(),
            webhook_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            team_actions: Family::default(),
            media_fetches: Family::default(),
            handoffs_open: Gauge::default(),
            handoff_oldest_seconds: Gauge::default(),
            // 5 s .. ~11 h
            handoff_first_reply_seconds: Histogram::new(exponential_buckets(5.0, 2.0, 14)),
            unrouted_webhooks: Counter::default(),
            leases_held: Gauge::default(),
            fleet_members: Gauge::default(),
            fleet_accounts: Gauge::default(),
        };
        reg.register(
            "unrouted_webhooks",
            "Verified webhook changes kept for a phone number id no account names yet",
            m.unrouted_webhooks.clone(),
        );
        reg.register(
            "leases_held",
            "Account Leases this gateway fleet pod holds",
            m.leases_held.clone(),
        );
        reg.register(
            "fleet_members",
            "Live pods of this pod's gateway fleet (its share is accounts / members)",
            m.fleet_members.clone(),
        );
        reg.register(
            "fleet_accounts",
            "Accounts of this pod's AgentPool that its fleet serves",
            m.fleet_accounts.clone(),
        );
        reg.register("webhooks", "Webhook POSTs by outcome", m.webhooks.clone());
        reg.register(
            "inbound_messages",
            "Inbound messages by outcome (stored, duplicate, ignored)",
            m.inbound_messages.clone(),
        );
        reg.register(
            "delivery_statuses",
            "Status webhooks by outcome",
            m.statuses.clone(),
        );
        reg.register("sends", "Outbound sends by outcome", m.sends.clone());
        reg.register(
            "sender_standby_rounds",
            "Sender rounds that found this pod without the Lease (grows on standby pods only)",
            m.standby_rounds.clone(),
        );
        reg.register(
            "lease_held",
            "1 while this pod holds the account's Lease and may send",
            m.lease_held.clone(),
        );
        reg.register(
            "fence_epoch",
            "Fencing epoch of this pod's current term (0 when not holding)",
            m.fence_epoch.clone(),
        );
        reg.register("agent_turns", "Agent turns by outcome", m.turns.clone());
        reg.register(
            "agent_turn_seconds",
            "Agent turn duration",
            m.turn_seconds.clone(),
        );
        reg.register(
            "queue_pending",
            "Pending jobs of this worker's pool",
            m.queue_pending.clone(),
        );
        reg.register(
            "queue_oldest_pending_seconds",
            "Age of the oldest pending job of this worker's pool",
            m.queue_oldest_pending_seconds.clone(),
        );
        reg.register(
            "webhook_seconds",
            "Webhook handling time",
            m.webhook_seconds.clone(),
        );
        reg.register(
            "team_actions",
            "Team inbox actions by kind (claim, assign, reply, refused_reply, resume, close)",
            m.team_actions.clone(),
        );
        reg.register(
            "media_fetches",
            "Downloads of the media customers send, by outcome (stored, retry, too_large, failed)",
            m.media_fetches.clone(),
        );
        reg.register(
            "handoffs_open",
            "Open handoffs of this worker's pool",
            m.handoffs_open.clone(),
        );
        reg.register(
            "handoff_oldest_seconds",
            "Age of the oldest open handoff of this worker's pool",
            m.handoff_oldest_seconds.clone(),
        );
        reg.register(
            "handoff_first_reply_seconds",
            "Time from a handoff to the first human reply",
            m.handoff_first_reply_seconds.clone(),
        );
        (m, reg)
    }
}
