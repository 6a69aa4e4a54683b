//! One account in a fleet pod: its Lease elector, and its duty (the Cloud API sender, or the
//! WhatsApp Web session owner) running only while this pod holds the Lease.

use std::sync::Arc;
use std::time::Duration;

use lease::{Duty, Elector, Fence, Leadership, LeaseGauges, LeaseSettings};
use queue::notifier::Notifier;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::accounts::{FleetAccount, Provider, Timings};
use crate::gateway::cloud_api::CloudApi;
use crate::gateway::media::{CloudMedia, MediaFetcher};
use crate::gateway::outbound_media::CloudDelivery;
use crate::gateway::sender::Sender;
use crate::gateway::templates::TemplateSync;
use crate::metrics::Metrics;
use crate::web::inbound::WebInbound;
use crate::web::owner::SessionOwner;

/// What every slot of a pod shares.
#[derive(Clone)]
pub struct Shared {
    pub db: PgPool,
    pub kube: kube::Client,
    pub namespace: String,
    pub identity: String,
    /// One LISTEN connection for every account's wake-ups.
    pub notifier: Notifier,
    /// One HTTP client (one connection pool) for every Cloud API number.
    pub http: reqwest::Client,
    pub metrics: Metrics,
}

/// A running slot.
pub struct Slot {
    pub elector: Arc<Elector>,
    pub timings: Timings,
    pub kind: &'static str,
    config: watch::Sender<Arc<FleetAccount>>,
    elector_task: (JoinHandle<()>, CancellationToken),
    supervisor: (JoinHandle<()>, CancellationToken),
    /// Consecutive rounds the Lease looked free, and this pod held it (see `share::plan`).
    pub free_rounds: u32,
    pub held_rounds: u32,
}

fn kind_of(a: &FleetAccount) -> &'static str {
    match a.provider {
        Provider::Cloud(_) => "cloud",
        Provider::Web(_) => "web",
    }
}

impl Slot {
    /// Start electing (gated: the fleet allows taking the Lease) and supervising the duty.
    pub fn start(shared: &Shared, account: Arc<FleetAccount>) -> Self {
        let leadership = Arc::new(Leadership::new(account.timings.renew_deadline));
        let duty = match account.provider {
            Provider::Cloud(_) => Duty::Send,
            Provider::Web(_) => Duty::Connect,
        };
        let elector = Arc::new(Elector::new(
            shared.kube.clone(),
            LeaseSettings {
                duty,
                name: crds::lease_name(&account.name),
                namespace: shared.namespace.clone(),
                identity: shared.identity.clone(),
                duration: account.timings.duration,
                renew_deadline: account.timings.renew_deadline,
                retry_period: account.timings.retry_period,
            },
            Fence::Postgres {
                pool: shared.db.clone(),
                account: account.id.clone(),
            },
            leadership.clone(),
            // Per-account gauges stay unregistered; the fleet exports how many it holds.
            LeaseGauges::default(),
        ));
        elector.set_may_take(false);
        let elector_cancel = CancellationToken::new();
        let (e, c) = (elector.clone(), elector_cancel.clone());
        let elector_task = tokio::spawn(async move { e.run(c).await });
        let (config, config_rx) = watch::channel(account.clone());
        let supervisor_cancel = CancellationToken::new();
        let (s, c) = (shared.clone(), supervisor_cancel.clone());
        let supervisor = tokio::spawn(async move { supervise(s, leadership, config_rx, c).await });
        Self {
            elector,
            timings: account.timings,
            kind: kind_of(&account),
            config,
            elector_task: (elector_task, elector_cancel),
            supervisor: (supervisor, supervisor_cancel),
            free_rounds: 0,
            held_rounds: 0,
        }
    }

    /// Whether `account` can be served by this slot (same Lease timings and provider kind):
    /// then [`Self::update`] applies it without giving the Lease up.
    pub fn fits(&self, account: &FleetAccount) -> bool {
        self.timings == account.timings && self.kind == kind_of(account)
    }

    pub fn fingerprint(&self) -> String {
        self.config.borrow().fingerprint.clone()
    }

    /// New settings or credentials: the duty restarts with them if it is running.
    pub fn update(&self, account: Arc<FleetAccount>) {
        self.config.send_replace(account);
    }

    /// A planned stop: the duty stops (the send in flight finishes, the socket closes), then
    /// the Lease is released so another pod takes over within one retry period.
    pub async fn stop(self) {
        self.supervisor.1.cancel();
        let _ = self.supervisor.0.await;
        self.elector_task.1.cancel();
        let _ = self.elector_task.0.await;
        self.elector.release().await;
    }

    /// A crash: everything stops where it is; the Lease is left to expire.
    pub fn kill(&self) {
        self.supervisor.0.abort();
        self.elector_task.0.abort();
    }
}

/// Run the duty during each term, with the latest settings.
async fn supervise(
    shared: Shared,
    leadership: Arc<Leadership>,
    mut config: watch::Receiver<Arc<FleetAccount>>,
    cancel: CancellationToken,
) {
    let mut changes = leadership.subscribe();
    loop {
        while leadership.may_act().is_none() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(crate::web::owner::WATCH_INTERVAL) => {}
            }
        }
        let account = config.borrow_and_update().clone();
        let duty_cancel = CancellationToken::new();
        let duty = start_duty(&shared, &account, leadership.clone(), duty_cancel.clone());
        let mut duty = std::pin::pin!(duty);
        let finished = loop {
            tokio::select! {
                _ = &mut duty => break true,
                _ = cancel.cancelled() => break false,
                _ = config.changed() => break false,
                _ = changes.changed() => {
                    if leadership.may_act().is_none() { break false; }
                }
                _ = tokio::time::sleep(crate::web::owner::WATCH_INTERVAL) => {
                    if leadership.may_act().is_none() { break false; }
                }
            }
        };
        if !finished {
            duty_cancel.cancel();
            duty.await;
        }
        if cancel.is_cancelled() {
            return;
        }
        if finished {
            // The duty ended on its own (a logged-out WhatsApp Web device waits for its term
            // to end inside the owner): do not spin.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The duty of one term: returns when cancelled (after the send in flight, with the socket
/// closed) or when it ends on its own.
async fn start_duty(
    shared: &Shared,
    account: &FleetAccount,
    leadership: Arc<Leadership>,
    cancel: CancellationToken,
) {
    match &account.provider {
        Provider::Cloud(a) => {
            let api = CloudApi::with_client(
                shared.http.clone(),
                &a.api_base_url,
                &a.phone_number_id,
                &a.access_token,
            );
            let templates = a.waba_id.as_deref().map(|waba_id| {
                TemplateSync::new(
                    shared.db.clone(),
                    shared.http.clone(),
                    &a.api_base_url,
                    waba_id,
                    &a.access_token,
                )
                .run(
                    leadership.clone(),
                    shared.notifier.templates(waba_id),
                    cancel.clone(),
                )
            });
            let media = MediaFetcher::new(
                shared.db.clone(),
                &a.id,
                &a.routing.pool,
                a.media.limits(),
                CloudMedia::new(shared.http.clone(), &a.api_base_url, &a.access_token),
                shared.metrics.clone(),
            )
            .run(
                leadership.clone(),
                shared.notifier.media(&a.id),
                cancel.clone(),
            );
            let sender = Sender::new(
                shared.db.clone(),
                a.sender_config(&shared.identity),
                CloudDelivery::new(api, shared.db.clone()),
                leadership,
                shared.notifier.outbound(&a.id),
                shared.metrics.clone(),
            );
            // The sender, the media fetcher and the template listing share the term.
            match templates {
                Some(templates) => {
                    tokio::join!(sender.run(cancel), media, templates);
                }
                None => {
                    tokio::join!(sender.run(cancel), media);
                }
            }
        }
        Provider::Web(w) => {
            let owner = SessionOwner::new(
                shared.db.clone(),
                shared.notifier.clone(),
                w.web_settings(&shared.identity),
                leadership,
                WebInbound::new(
                    shared.db.clone(),
                    w.routing.ingest_target(&w.id),
                    shared.metrics.clone(),
                )
                .with_read_receipts(w.read_receipts),
                shared.metrics.clone(),
            );
            owner.run(cancel).await;
        }
    }
}
