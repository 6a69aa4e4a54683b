//! The `fleet` role: one pod of an AgentPool's gateway fleet.
//!
//! - **Ingress**: webhooks for the Cloud API numbers it knows, verified against the app secret
//!   of the numbers a delivery names, routed by `phone_number_id` (`gateway::webhook`);
//!   deliveries for numbers without an account yet are kept and replayed when the account
//!   appears. A fleet pod knows its pool's numbers; the namespace's one webhook URL is served
//!   by the `ingress` role, the same code with every number of the namespace and no egress
//!   (`FleetSettings::ingress_only`), so that only it reads every number's credentials.
//! - **Egress** for the numbers of its pool whose Lease it holds: the Cloud API sender or the
//!   WhatsApp Web socket, exactly as a one-number gateway runs them (`slot`), each under its own
//!   Lease and fencing epoch.
//! - **Shares**: every retry period the pod lists the namespace's Leases (one request),
//!   heartbeats its fleet membership in Postgres while that works, and takes or hands over
//!   Leases to hold its fair share (`share`).
//! - Accounts come from a watch of the API server (`accounts`), so numbers come and go without
//!   restarting the pod; one Postgres pool and one LISTEN connection serve every number.

pub mod accounts;
pub mod share;
pub mod slot;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use service::secret::ExposeSecret;
use sqlx::PgPool;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gateway::routes::{Route, RouteTable, Routes};
use crate::gateway::webhook::{self, WebhookState};
use crate::http::Draining;
use crate::metrics::Metrics;
use accounts::{AccountSet, FleetAccount, Provider};
use slot::{Shared, Slot};

/// Settings of a fleet pod.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// The AgentPool's name; the pod serves the egress of its accounts.
    pub pool: String,
    pub namespace: String,
    /// The pod's name: Lease holder identity and fleet member.
    pub identity: String,
    pub listen: String,
    /// How often shares are looked at (and the Leases listed).
    pub round: Duration,
    /// A member not seen for this long no longer counts towards the shares.
    pub member_ttl: Duration,
    /// How often credentials Secrets are read again.
    pub secret_refresh: Duration,
    /// On SIGTERM, readiness fails this long before the pod stops taking webhooks, so the
    /// Service's endpoints move away first (they lag behind a stopping pod).
    pub drain: Duration,
    /// Leases handed over per round at most when over the share.
    pub max_release_per_round: usize,
    /// The namespace's webhook ingress: every account of the namespace, no Leases, no sends.
    pub ingress_only: bool,
}

impl FleetSettings {
    pub fn new(pool: &str, namespace: &str, identity: &str, listen: &str) -> Self {
        Self {
            pool: pool.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            listen: listen.into(),
            round: Duration::from_secs(2),
            member_ttl: Duration::from_secs(10),
            secret_refresh: Duration::from_secs(60),
            drain: Duration::from_secs(5),
            max_release_per_round: 8,
            ingress_only: false,
        }
    }

    /// The namespace's webhook ingress.
    pub fn ingress(namespace: &str, identity: &str, listen: &str) -> Self {
        Self {
            ingress_only: true,
            ..Self::new("", namespace, identity, listen)
        }
    }

    fn queue(&self) -> String {
        format!("{}/{}", self.namespace, self.pool)
    }
}

type Slots = Arc<Mutex<BTreeMap<String, Slot>>>;

/// A running fleet pod.
pub struct RunningFleet {
    pub addr: SocketAddr,
    routes: Routes,
    pub metrics: Metrics,
    pub draining: Draining,
    settings: FleetSettings,
    db: PgPool,
    slots: Slots,
    server: JoinHandle<()>,
    server_stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
}

impl RunningFleet {
    /// Cloud API numbers this pod routes webhooks for.
    pub fn routed(&self) -> usize {
        self.routes.current().len()
    }

    /// Accounts whose Lease this pod holds now.
    pub async fn held(&self) -> Vec<String> {
        self.slots
            .lock()
            .await
            .iter()
            .filter(|(_, s)| s.elector.holding())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How long readiness fails before the pod stops taking webhooks on shutdown.
    pub fn set_drain(&mut self, drain: Duration) {
        self.settings.drain = drain;
    }

    /// SIGTERM: fail readiness, keep taking webhooks while the endpoints move, stop every duty
    /// (sends in flight finish, sockets close), release every Lease, leave the fleet, stop.
    pub async fn shutdown(self) {
        self.draining.start();
        tokio::time::sleep(self.settings.drain).await;
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        let slots = std::mem::take(&mut *self.slots.lock().await);
        futures::future::join_all(slots.into_values().map(Slot::stop)).await;
        if !self.settings.ingress_only
            && let Err(error) =
                queue::members::leave(&self.db, &self.settings.queue(), &self.settings.identity)
                    .await
        {
            tracing::warn!(error = %queue::rescuer::error_chain(&error), "could not leave the fleet; the others wait for the member TTL");
        }
        self.server_stop.cancel();
        let _ = self.server.await;
    }

    /// A crash, as far as one process can stage it: every task stops where it is and Leases
    /// expire on their own. WhatsApp Web clients run tasks of their own whose sockets outlive
    /// this, so tests of sockets across a crash kill a `whatsapp-worker fleet` process instead.
    pub fn kill(self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        self.server.abort();
        if let Ok(slots) = self.slots.try_lock() {
            for s in slots.values() {
                s.kill();
            }
        }
    }
}

/// Start a fleet pod: HTTP server (webhooks, pairing pages, `extra_routes`: the probes, whose
/// readiness follows `draining`), the account watch, and the share rounds.
pub async fn start(
    db: PgPool,
    kube: kube::Client,
    settings: FleetSettings,
    metrics: Metrics,
    draining: Draining,
    extra_routes: Router,
) -> anyhow::Result<RunningFleet> {
    let cancel = CancellationToken::new();
    let source = accounts::watch_accounts(
        kube.clone(),
        &settings.namespace,
        (!settings.ingress_only).then(|| settings.pool.clone()),
        settings.secret_refresh,
        cancel.clone(),
    );
    let routes = Routes::default();
    let served = routes.clone();
    // Only the ingress takes webhooks: a fleet pod knows only its pool's numbers, and would
    // keep another pool's deliveries where nothing replays them.
    let webhooks = settings.ingress_only.then(|| WebhookState {
        pool: db.clone(),
        routes: routes.clone(),
        namespace: settings.namespace.as_str().into(),
        metrics: metrics.clone(),
        publisher: queue::notifier::Publisher::start(db.clone()),
        statuses: crate::gateway::status_writer::StatusWriter::start(db.clone()),
    });
    let pages = Router::new()
        .route("/pairing/{account}", get(pairing_page))
        .with_state(PageState {
            db: db.clone(),
            namespace: settings.namespace.clone(),
        });
    let router = webhooks
        .clone()
        .map(webhook::router)
        .unwrap_or_default()
        .merge(pages)
        .merge(extra_routes);
    let crate::http::Server {
        addr,
        task: server,
        stop: server_stop,
    } = crate::http::serve(&settings.listen, router, "fleet").await?;

    let shared = Shared {
        db: db.clone(),
        kube: kube.clone(),
        namespace: settings.namespace.clone(),
        identity: settings.identity.clone(),
        notifier: queue::notifier::Notifier::start(db.clone()),
        http: crate::gateway::cloud_api::CloudApi::http_client(Duration::from_secs(20))?,
        metrics: metrics.clone(),
    };
    let slots: Slots = Arc::default();
    let ingress = tokio::spawn(serve_ingress(
        db.clone(),
        source.accounts.clone(),
        webhooks,
        metrics.clone(),
    ));
    let mut tasks = vec![source.task, ingress];
    if !settings.ingress_only {
        tasks.push(tokio::spawn(run_rounds(
            shared,
            settings.clone(),
            source.accounts.clone(),
            slots.clone(),
            cancel.clone(),
        )));
    }
    Ok(RunningFleet {
        addr,
        routes: served,
        metrics,
        draining,
        settings,
        db,
        slots,
        server,
        server_stop,
        tasks,
        cancel,
    })
}

/// Keep the account rows in step with the accounts, and on the ingress the webhook routes too,
/// replaying what was kept for numbers that just appeared.
async fn serve_ingress(
    db: PgPool,
    mut accounts: watch::Receiver<Arc<AccountSet>>,
    webhooks: Option<WebhookState>,
    metrics: Metrics,
) {
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    let mut last_expiry = std::time::Instant::now();
    loop {
        let set = accounts.borrow_and_update().clone();
        // Account rows first: a routed webhook's ingest needs its account's row.
        let mut all_rows_written = true;
        for a in set.values() {
            let key = format!("{}|{}", a.fingerprint, a.routing.pool);
            if rows.get(&a.id) == Some(&key) {
                continue;
            }
            match queue::fence::upsert_account_row(
                &db,
                &queue::fence::AccountRow {
                    id: &a.id,
                    phone_number_id: &a.phone_key(),
                    pool: &a.routing.pool,
                    handoff_message: &a.routing.handoff_message,
                    allowed_contacts: &a.routing.allowed(),
                    outbound_max_attempts: a.max_attempts(),
                    waba_id: a.waba_id(),
                },
            )
            .await
            {
                Ok(()) => {
                    rows.insert(a.id.clone(), key);
                }
                Err(error) => {
                    all_rows_written = false;
                    tracing::warn!(account = %a.id, error = %queue::rescuer::error_chain(&error), "could not write the account row; retrying");
                }
            }
        }
        metrics.fleet_accounts.set(set.len() as i64);
        if let Some(webhooks) = &webhooks {
            let table = RouteTable::new(set.values().filter_map(|a| route(a, &rows)));
            for phone in webhooks.routes.replace(table) {
                if let Err(error) = webhook::replay_unrouted(webhooks, &phone).await {
                    tracing::warn!(phone_number_id = %phone, error = %queue::rescuer::error_chain(&error), "replaying kept webhooks failed; they stay kept");
                }
            }
        }
        if last_expiry.elapsed() > Duration::from_secs(3600) {
            last_expiry = std::time::Instant::now();
            let _ = queue::unrouted::expire(&db).await;
            let _ = queue::members::forget_stale(&db).await;
        }
        let retry =
            tokio::time::sleep(Duration::from_secs(if all_rows_written { 3600 } else { 2 }));
        tokio::select! {
            changed = accounts.changed() => if changed.is_err() { return },
            _ = retry => {}
        }
    }
}

/// The ingress route of a Cloud API account whose row is written.
fn route(a: &FleetAccount, rows: &BTreeMap<String, String>) -> Option<Route> {
    let Provider::Cloud(c) = &a.provider else {
        return None;
    };
    rows.contains_key(&a.id).then(|| Route {
        phone_number_id: c.phone_number_id.clone(),
        app_secret: c.app_secret.expose_secret().into(),
        verify_token: c.verify_token.expose_secret().into(),
        target: Arc::new(a.routing.ingest_target(&a.id)),
        waba_id: c.waba_id.as_deref().map(Arc::from),
    })
}

/// Every round: bring the slots in step with the pool's accounts, list the Leases, heartbeat,
/// and take or hand over Leases towards the fair share.
async fn run_rounds(
    shared: Shared,
    settings: FleetSettings,
    mut accounts: watch::Receiver<Arc<AccountSet>>,
    slots: Slots,
    cancel: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(shared.kube.clone(), &settings.namespace);
    let queue = settings.queue();
    let mut changed = true;
    loop {
        if changed {
            let set = accounts.borrow_and_update().clone();
            sync_slots(&shared, &settings, &set, &slots).await;
        }
        round(&shared, &settings, &queue, &leases, &slots).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(settings.round) => changed = false,
            c = accounts.changed() => {
                if c.is_err() { return; }
                changed = true;
            }
        }
    }
}

/// Start slots for new accounts of the pool, update changed ones, and stop (releasing their
/// Leases) those that left it.
async fn sync_slots(shared: &Shared, settings: &FleetSettings, set: &AccountSet, slots: &Slots) {
    let mine: BTreeMap<&String, &Arc<FleetAccount>> = set
        .iter()
        .filter(|(_, a)| a.pool_name == settings.pool)
        .collect();
    let mut stopping = Vec::new();
    {
        let mut slots = slots.lock().await;
        let gone: Vec<String> = slots
            .iter()
            .filter(|(id, s)| mine.get(id).is_none_or(|a| !s.fits(a)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(s) = slots.remove(&id) {
                tracing::info!(account = %id, "account left this fleet (or its Lease timings changed); stopping it");
                stopping.push(s);
            }
        }
        for (id, a) in mine {
            match slots.get(id) {
                Some(s) if s.fingerprint() != a.fingerprint => s.update(a.clone()),
                Some(_) => {}
                None => {
                    slots.insert(id.clone(), Slot::start(shared, a.clone()));
                }
            }
        }
    }
    futures::future::join_all(stopping.into_iter().map(Slot::stop)).await;
}

async fn round(
    shared: &Shared,
    settings: &FleetSettings,
    queue: &str,
    leases: &Api<Lease>,
    slots: &Slots,
) {
    // One list for every Lease of the namespace: standby slots make no API call of their own.
    // Bounded by the round: kube's client retries 429/503 for minutes, and a pod that hangs
    // here would miss its heartbeats long after the API server is back.
    let listed = match tokio::time::timeout(settings.round, leases.list(&Default::default()))
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service("no answer within one round".into())))
    {
        Ok(list) => list.items,
        Err(error) => {
            // Cut off from the API server: no heartbeat, so the others stop counting this pod
            // after the member TTL; held Leases step down on their own by the renew deadline.
            tracing::warn!(%error, "listing Leases failed");
            return;
        }
    };
    let members = match queue::members::heartbeat(
        &shared.db,
        queue,
        &settings.identity,
        settings.member_ttl,
    )
    .await
    {
        Ok(m) => m,
        Err(error) => {
            tracing::warn!(error = %queue::rescuer::error_chain(&error), "fleet heartbeat failed");
            return;
        }
    };
    let by_name: BTreeMap<&str, &Lease> = listed
        .iter()
        .filter_map(|l| l.metadata.name.as_deref().map(|n| (n, l)))
        .collect();
    let mut slots = slots.lock().await;
    let mut views = Vec::with_capacity(slots.len());
    for (id, s) in slots.iter_mut() {
        if let Some(l) = by_name.get(s.elector.lease_name()) {
            s.elector.observe(l);
        }
        let held = s.elector.holding();
        let free = !held && s.elector.looks_free() && !s.elector.holding_off_now();
        s.free_rounds = if free { s.free_rounds + 1 } else { 0 };
        s.held_rounds = if held { s.held_rounds + 1 } else { 0 };
        views.push(share::LeaseView {
            account: id.clone(),
            held,
            free,
            free_rounds: s.free_rounds,
            held_rounds: s.held_rounds,
        });
    }
    // Who holds how many of the pool's Leases, from the same list.
    let mut held_by: BTreeMap<String, usize> = BTreeMap::new();
    for s in slots.values() {
        if let Some(holder) = by_name
            .get(s.elector.lease_name())
            .and_then(|l| l.spec.as_ref())
            .and_then(|spec| spec.holder_identity.clone())
            .filter(|h| !h.is_empty())
        {
            *held_by.entry(holder).or_default() += 1;
        }
    }
    let plan = share::plan(
        &settings.identity,
        &members,
        &views,
        &held_by,
        settings.max_release_per_round,
    );
    let take: HashSet<&String> = plan.take.iter().collect();
    for (id, s) in slots.iter() {
        s.elector.set_may_take(take.contains(id));
    }
    for id in &plan.release {
        if let Some(s) = slots.get(id) {
            tracing::info!(account = %id, members = members.len(), "over this pod's share; handing the Lease over");
            s.elector.request_handover();
        }
    }
    let held = views.iter().filter(|v| v.held).count();
    shared.metrics.leases_held.set(held as i64);
    shared.metrics.fleet_members.set(members.len() as i64);
}

#[derive(Clone)]
struct PageState {
    db: PgPool,
    namespace: String,
}

/// `/pairing/<account>`: the pairing page of one of the namespace's WhatsApp Web accounts.
async fn pairing_page(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(s): State<PageState>,
    Path(account): Path<String>,
) -> impl IntoResponse {
    let id = format!("{}/{account}", s.namespace);
    crate::web::gateway::render_pairing_page(peer, &s.db, &id).await
}
