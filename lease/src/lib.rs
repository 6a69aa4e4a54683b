//! Single ownership on a `coordination.k8s.io/v1` Lease, plus a fencing epoch in Postgres.
//!
//! Three owners use it: the Cloud API sender of a phone number, the WhatsApp Web session owner
//! of a phone number (one socket per phone), and the operator's leader election.
//!
//! The protocol follows client-go's leader election (`leaderelection.go`, `resourcelock`):
//!
//! - Every `retryPeriod` a candidate reads the Lease. It may take it when nobody holds it
//!   (`holderIdentity` empty, as after a clean release) or when the record has not changed for
//!   `leaseDuration` as measured on the candidate's own clock since it first saw that record
//!   (never by comparing `renewTime` with local time: clocks differ between nodes). Writes use
//!   the object's `resourceVersion`, so of two candidates only one update succeeds; the other
//!   gets 409 Conflict.
//! - The holder renews every `retryPeriod`. If no renewal succeeded for `renewDeadline`
//!   (< `leaseDuration`), it stops at once (stops sending, closes its socket), before any
//!   standby can legally take over. [`Leadership::may_act`] checks that trust window before
//!   every send, so even a holder whose renew loop is stuck stops on time.
//! - On acquiring, the new holder bumps the account's fencing epoch in Postgres (the [`Fence`]
//!   hook) before it sends or connects. Outbound claims, completions and session-store writes
//!   are conditional on that epoch, so a holder that was paused past its lease and wakes up
//!   cannot claim, complete or write anything (see `queue::fence`).
//! - On shutdown the holder stops (sending, its socket), lets the send in flight finish, then releases the
//!   Lease (empty holder, duration 1 s) so a standby takes over within one retry period.
//! - A planned handover (`kubectl whatsapp release`) annotates the Lease with
//!   [`RELEASE_ANNOTATION`] naming the holder. The holder sees it at its next round, stops,
//!   waits until its duty is idle (every [`Leadership::working`] guard dropped: no send in
//!   flight, socket closed), releases the Lease (clearing the annotation) and does not try to
//!   take it again for one lease duration, so a standby takes over.
//!
//! Why not a crate: kube-lease-manager (the one that supports kube 5) manages leases through
//! server-side apply and reports only "is leader"; it has no renew deadline separate from the
//! lease duration and no hook to fence before the first send, which are the two properties this
//! crate exists for.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::gauge::Gauge;

/// What the holder does while it holds the Lease; it names the work in log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Duty {
    /// Send an account's outbound messages (Cloud API gateway).
    #[default]
    Send,
    /// Hold an account's WhatsApp Web socket.
    Connect,
    /// Lead (the operator's controllers).
    Lead,
}

impl Duty {
    fn doing(self) -> &'static str {
        match self {
            Duty::Send => "sending",
            Duty::Connect => "connected",
            Duty::Lead => "leading",
        }
    }
}

/// The fencing hook run on acquisition, before the holder does anything: it returns the new
/// epoch every later write is conditional on.
pub enum Fence {
    /// No fence (leader election); the term's epoch is 0.
    None,
    /// Bump `account_fences` for this account (see `queue::fence`).
    Postgres { pool: PgPool, account: String },
}

/// Gauges the elector keeps current.
#[derive(Debug, Clone, Default)]
pub struct LeaseGauges {
    /// 1 while holding.
    pub held: Gauge,
    /// The epoch held (0 when not holding).
    pub epoch: Gauge,
}

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub duty: Duty,
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// Errors of one election round.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("reading Lease {0}")]
    Get(String, #[source] kube::Error),
    #[error("writing Lease {0}")]
    Write(String, #[source] kube::Error),
    #[error("Lease {0}: the API server did not answer within the renew deadline")]
    TimedOut(String),
}

#[derive(Debug, Clone, Copy)]
struct Term {
    epoch: i64,
    renewed: Instant,
}

/// Set on the Lease to the holder's identity to ask that holder to hand the Lease over.
pub const RELEASE_ANNOTATION: &str = "whatsapp.kube-agents.io/release-holder";

/// Whether this process may act (send, hold the socket, lead), shared by the elector and the owner.
pub struct Leadership {
    term: Mutex<Option<Term>>,
    renew_deadline: Duration,
    changed: watch::Sender<Option<i64>>,
    /// Read-held while the duty works; a planned handover takes it for writing, so it waits
    /// for the work in flight.
    busy: std::sync::Arc<tokio::sync::RwLock<()>>,
}

/// Held while doing the duty's work under a term (a batch of sends, an open socket).
pub type WorkGuard = tokio::sync::OwnedRwLockReadGuard<()>;

impl Leadership {
    pub fn new(renew_deadline: Duration) -> Self {
        Self {
            term: Mutex::new(None),
            renew_deadline,
            changed: watch::channel(None).0,
            busy: Default::default(),
        }
    }

    /// A guard to hold while working under the term; check [`Self::may_act`] again after
    /// taking it (a handover may have stopped the term while it waited).
    pub async fn working(&self) -> WorkGuard {
        self.busy.clone().read_owned().await
    }

    /// Wait until no [`WorkGuard`] is held, at most `within`; false if work was still going on.
    async fn quiesced(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.busy.clone().write_owned())
            .await
            .is_ok()
    }

    /// The epoch to act under, if this process holds the Lease and renewed it within the
    /// renew deadline.
    pub fn may_act(&self) -> Option<i64> {
        let term = *self.term.lock().unwrap_or_else(|e| e.into_inner());
        term.filter(|t| t.renewed.elapsed() < self.renew_deadline)
            .map(|t| t.epoch)
    }

    /// Changes of the held epoch (None: not holding).
    pub fn subscribe(&self) -> watch::Receiver<Option<i64>> {
        self.changed.subscribe()
    }

    fn start(&self, epoch: i64, renewed: Instant) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = Some(Term { epoch, renewed });
        self.changed.send_replace(Some(epoch));
    }

    fn renewed(&self, at: Instant) {
        if let Some(t) = self.term.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            t.renewed = at;
        }
    }

    /// Stop now (losing the Lease, or shutting down).
    pub fn stop(&self) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.changed.send_replace(None);
    }

    fn holding(&self) -> bool {
        self.term
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// The last Lease record seen and when (on our clock) it was first seen.
#[derive(Debug, Clone)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
    duration: Duration,
    at: Instant,
}

/// Runs the election for one account.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseSettings,
    fence: Fence,
    leadership: std::sync::Arc<Leadership>,
    observed: Mutex<Option<Observed>>,
    gauges: LeaseGauges,
    /// After a planned handover: do not take the Lease again before this.
    hold_off_until: Mutex<Option<Instant>>,
    /// Whether this elector may take the Lease when it is free or expired. A gateway fleet
    /// turns it on only for the numbers of its fair share; it never affects renewing.
    may_take: AtomicBool,
    /// A handover asked for by this process (a fleet pod over its share).
    handover_requested: AtomicBool,
}

enum Round {
    Held,
    NotHeld,
    /// We hold it and the Lease asks us to hand it over.
    ReleaseRequested,
}

impl Elector {
    pub fn new(
        client: kube::Client,
        cfg: LeaseSettings,
        fence: Fence,
        leadership: std::sync::Arc<Leadership>,
        gauges: LeaseGauges,
    ) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Self {
            api,
            cfg,
            fence,
            leadership,
            observed: Mutex::new(None),
            gauges,
            hold_off_until: Mutex::new(None),
            may_take: AtomicBool::new(true),
            handover_requested: AtomicBool::new(false),
        }
    }

    /// The Lease's name.
    pub fn lease_name(&self) -> &str {
        &self.cfg.name
    }

    /// Allow or forbid taking the Lease when it is free or expired (renewing a held Lease is
    /// never affected). While forbidden and not holding, a round makes no API call at all: the
    /// caller feeds what it lists through [`Self::observe`].
    pub fn set_may_take(&self, allowed: bool) {
        self.may_take.store(allowed, Ordering::SeqCst);
    }

    /// Hand the Lease over at the next round, as a release annotation would ask.
    pub fn request_handover(&self) {
        self.handover_requested.store(true, Ordering::SeqCst);
    }

    /// Whether this process holds the Lease and may act under it.
    pub fn holding(&self) -> bool {
        self.leadership.may_act().is_some()
    }

    /// Whether a just-finished handover keeps this elector away from the Lease.
    pub fn holding_off_now(&self) -> bool {
        self.holding_off()
    }

    /// Record a copy of the Lease read elsewhere (a list), as a round's read would: the
    /// expiry of another holder is measured on this process's clock from the first time a
    /// record was seen unchanged.
    pub fn observe(&self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let lease_seconds = self.cfg.duration.as_secs().max(1) as i32;
        let record_duration =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(lease_seconds).max(1) as u64);
        let mut obs = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let same = obs.as_ref().is_some_and(|o| {
            o.holder == holder
                && o.renew_time == spec.renew_time
                && o.resource_version == lease.metadata.resource_version
        });
        if !same {
            *obs = Some(Observed {
                holder,
                renew_time: spec.renew_time,
                resource_version: lease.metadata.resource_version.clone(),
                duration: record_duration,
                at: Instant::now(),
            });
        }
    }

    /// Whether the last record seen is free (no holder) or expired on this process's clock; a
    /// Lease never seen counts as free (the first round reads it anyway).
    pub fn looks_free(&self) -> bool {
        let obs = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match obs.as_ref() {
            None => true,
            Some(o) => {
                o.holder.is_none()
                    || o.holder.as_deref() == Some(self.cfg.identity.as_str())
                    || o.at.elapsed() >= o.duration
            }
        }
    }

    /// The holder in the last record seen.
    pub fn observed_holder(&self) -> Option<String> {
        self.observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|o| o.holder.clone())
    }

    /// Run rounds every retry period until cancelled. Does not release: call [`Self::release`]
    /// after the sender has stopped.
    pub async fn run(&self, cancel: CancellationToken) {
        loop {
            let attempt_started = Instant::now();
            // Bounded: kube's client retries 429/503/504 for minutes, and a round that hangs
            // would leave the step-down, the gauges and a standby's takeover waiting on it.
            let round = tokio::time::timeout(self.cfg.renew_deadline, self.round())
                .await
                .unwrap_or_else(|_| Err(ElectionError::TimedOut(self.cfg.name.clone())));
            match round {
                Ok(Round::Held) => {
                    if self.leadership.holding() {
                        self.leadership.renewed(attempt_started);
                    } else {
                        self.begin_term(attempt_started).await;
                    }
                }
                Ok(Round::NotHeld) => {
                    if self.leadership.holding() {
                        tracing::warn!(lease = %self.cfg.name, "another pod holds the Lease; stepped down");
                        self.step_down();
                    }
                }
                Ok(Round::ReleaseRequested) => self.hand_over().await,
                Err(error) => {
                    tracing::warn!(lease = %self.cfg.name, error = %queue::rescuer::error_chain(&error), "lease round failed");
                }
            }
            // Self-fence: the trust window closed without a successful renewal.
            if self.leadership.holding() && self.leadership.may_act().is_none() {
                tracing::error!(
                    lease = %self.cfg.name,
                    renew_deadline_seconds = self.cfg.renew_deadline.as_secs(),
                    "could not renew the Lease within the renew deadline; stepped down"
                );
                self.step_down();
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
    }

    /// A planned handover: stop, wait for the work in flight, release, and stay away for one
    /// lease duration so that a standby takes over.
    async fn hand_over(&self) {
        self.handover_requested.store(false, Ordering::SeqCst);
        tracing::info!(lease = %self.cfg.name, holder = %self.cfg.identity, "asked to hand the Lease over; stopping");
        *self
            .hold_off_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + self.cfg.duration);
        self.step_down();
        if !self.leadership.quiesced(self.cfg.renew_deadline).await {
            // The fence still stops whatever is left; the Lease must not stay held meanwhile.
            tracing::warn!(lease = %self.cfg.name, "work still in flight after the renew deadline; releasing anyway");
        }
        self.release().await;
    }

    fn holding_off(&self) -> bool {
        self.hold_off_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    fn step_down(&self) {
        self.leadership.stop();
        self.gauges.held.set(0);
        self.gauges.epoch.set(0);
    }

    async fn begin_term(&self, renewed: Instant) {
        let bumped = match &self.fence {
            Fence::Postgres { pool, account } => {
                queue::fence::bump(pool, account, &self.cfg.identity).await
            }
            Fence::None => Ok(0),
        };
        match bumped {
            Ok(epoch) => {
                tracing::info!(lease = %self.cfg.name, holder = %self.cfg.identity, fence_epoch = epoch, "acquired the Lease; {}", self.cfg.duty.doing());
                self.leadership.start(epoch, renewed);
                self.gauges.held.set(1);
                self.gauges.epoch.set(epoch);
            }
            Err(error) => {
                // Without a fence we must not act; the next round retries.
                tracing::warn!(error = %queue::rescuer::error_chain(&error), "holding the Lease but could not bump the fence");
            }
        }
    }

    /// One acquire-or-renew attempt.
    async fn round(&self) -> Result<Round, ElectionError> {
        if !self.leadership.holding() && !self.may_take.load(Ordering::SeqCst) {
            // Not ours to take: no API call (see `observe`).
            return Ok(Round::NotHeld);
        }
        let now = MicroTime(jiff::Timestamp::now());
        let lease_seconds = self.cfg.duration.as_secs().max(1) as i32;
        let current = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| ElectionError::Get(self.cfg.name.clone(), e))?;
        if self.holding_off() {
            // Just handed over: leave the Lease to a standby.
            return Ok(Round::NotHeld);
        }
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(lease_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Held),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => {
                    Ok(Round::NotHeld)
                }
                Err(e) => Err(ElectionError::Write(self.cfg.name.clone(), e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        self.observe(&lease);
        let observed_at = self
            .observed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|o| (o.at, o.duration));
        let mine = holder.as_deref() == Some(self.cfg.identity.as_str());
        if mine
            && (self.release_requested(&lease) || self.handover_requested.load(Ordering::SeqCst))
        {
            return Ok(Round::ReleaseRequested);
        }
        if let (Some(_), false) = (&holder, mine)
            && let Some((at, duration)) = observed_at
            && at.elapsed() < duration
        {
            return Ok(Round::NotHeld);
        }
        let mut next = spec.clone();
        if !mine {
            next.acquire_time = Some(now.clone());
            next.lease_transitions = Some(
                spec.lease_transitions.unwrap_or(0)
                    + if holder.is_some() || spec.acquire_time.is_some() {
                        1
                    } else {
                        0
                    },
            );
        }
        next.holder_identity = Some(self.cfg.identity.clone());
        next.lease_duration_seconds = Some(lease_seconds);
        next.renew_time = Some(now);
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Held),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Round::NotHeld),
            Err(e) => Err(ElectionError::Write(self.cfg.name.clone(), e)),
        }
    }

    fn release_requested(&self, lease: &Lease) -> bool {
        lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RELEASE_ANNOTATION))
            .is_some_and(|who| who == &self.cfg.identity)
    }

    /// Give the Lease up (only if we still hold it), so a standby takes over at its next round.
    /// A handover request naming us is cleared with it.
    pub async fn release(&self) {
        self.step_down();
        // Bounded like a round: a shutdown must not wait minutes on a throttled API server.
        if tokio::time::timeout(self.cfg.renew_deadline, self.write_release())
            .await
            .is_err()
        {
            tracing::warn!(lease = %self.cfg.name, "could not release the Lease in time; it expires on its own");
        }
    }

    async fn write_release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let mine = lease
            .spec
            .as_ref()
            .is_some_and(|s| s.holder_identity.as_deref() == Some(self.cfg.identity.as_str()));
        if !mine {
            return;
        }
        if self.release_requested(&lease)
            && let Some(a) = lease.metadata.annotations.as_mut()
        {
            a.remove(RELEASE_ANNOTATION);
        }
        let now = MicroTime(jiff::Timestamp::now());
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now.clone());
            spec.acquire_time = Some(now);
        }
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.cfg.name, "released the Lease"),
            Err(error) => {
                tracing::warn!(lease = %self.cfg.name, %error, "could not release the Lease; it expires on its own")
            }
        }
    }
}
