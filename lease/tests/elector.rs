//! The elector on its own, against the fake Kubernetes API server over HTTP with the real kube
//! client (and real Postgres for the fence): the renew deadline, release and planned handover,
//! the fencing hook, and expiry measured on the candidate's own clock whatever the holder's
//! clock says.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fakes::kube_api::FakeKubeApi;
use lease::{Duty, Elector, Fence, Leadership, LeaseGauges, LeaseSettings};
use queue::testing::{TestDb, deadline, eventually, test_deadline};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases/whatsapp-line";

struct Candidate {
    elector: Arc<Elector>,
    leadership: Arc<Leadership>,
    gauges: LeaseGauges,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    fn start(kube: &FakeKubeApi, identity: &str, fence: Fence) -> Self {
        let settings = LeaseSettings {
            duty: Duty::Send,
            name: "whatsapp-line".into(),
            namespace: "default".into(),
            identity: identity.into(),
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(500),
        };
        let leadership = Arc::new(Leadership::new(settings.renew_deadline));
        let gauges = LeaseGauges::default();
        let elector = Arc::new(Elector::new(
            client(kube),
            settings,
            fence,
            leadership.clone(),
            gauges.clone(),
        ));
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (elector, cancel) = (elector.clone(), cancel.clone());
            async move { elector.run(cancel).await }
        });
        Self {
            elector,
            leadership,
            gauges,
            cancel,
            task,
        }
    }

    /// A clean stop: stop the rounds, then release.
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("elector task");
        self.elector.release().await;
    }
}

/// A candidate that has taken the free Lease.
async fn holding(kube: &FakeKubeApi, identity: &str) -> Candidate {
    let c = Candidate::start(kube, identity, Fence::None);
    until(
        "the first candidate to hold",
        Duration::from_secs(5),
        || c.leadership.may_act().is_some(),
    )
    .await;
    c
}

fn client(kube: &FakeKubeApi) -> kube::Client {
    let mut cfg = kube::Config::new(kube.url().parse().expect("fake url"));
    cfg.default_namespace = "default".into();
    cfg.read_timeout = Some(Duration::from_millis(500));
    cfg.write_timeout = Some(Duration::from_millis(500));
    kube::Client::try_from(cfg).expect("client")
}

fn holder(kube: &FakeKubeApi) -> Option<String> {
    kube.get(LEASE)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

/// Wait for `check` with a deadline; returns how long it took.
async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    eventually(what, within, || std::future::ready(check())).await;
    started.elapsed()
}

/// Count the Lease writes naming `holder`, and whether `acting` was true at any of them: the
/// fake API server calls this as each write is stored.
fn watch_writes(
    kube: &FakeKubeApi,
    holder: &'static str,
    acting: impl Fn() -> bool + Send + Sync + 'static,
) -> (Arc<AtomicUsize>, Arc<AtomicBool>) {
    let (writes, acted) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (w, a) = (writes.clone(), acted.clone());
    kube.on_change(move |collection, _, lease| {
        if collection.ends_with("/leases") && lease["spec"]["holderIdentity"] == holder {
            w.fetch_add(1, Ordering::SeqCst);
            if acting() {
                a.store(true, Ordering::SeqCst);
            }
        }
    });
    (writes, acted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_renew_stops_within_the_renew_deadline_before_anyone_may_take_over() {
    let _deadline = deadline(test_deadline());
    let kube = FakeKubeApi::start().await.expect("fake api");
    let a = holding(&kube, "a").await;
    assert_eq!(a.gauges.held.get(), 1);
    let b = Candidate::start(&kube, "b", Fence::None);
    kube.set_available(false);
    let stopped = until("a to stop acting", Duration::from_secs(5), || {
        a.leadership.may_act().is_none()
    })
    .await;
    // It last renewed at most one retry period before the cut; it stops 2 s after that renewal.
    assert!(
        stopped <= Duration::from_millis(2100),
        "acted {stopped:?} without renewing"
    );
    // The elector steps down (and clears its gauge) at the end of that round.
    until("the held gauge to clear", Duration::from_secs(3), || {
        a.gauges.held.get() == 0
    })
    .await;
    kube.set_available(true);
    // b saw a's record before the outage and may take it only once it has been unchanged for
    // the lease duration on b's clock; a may win it back first, which is also safe.
    until("someone to hold again", Duration::from_secs(10), || {
        a.leadership.may_act().is_some() || b.leadership.may_act().is_some()
    })
    .await;
    assert!(
        a.leadership.may_act().is_none() || b.leadership.may_act().is_none(),
        "two holders"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_hands_over_within_a_retry_period_and_a_handover_request_is_honoured() {
    let _deadline = deadline(test_deadline());
    let kube = FakeKubeApi::start().await.expect("fake api");
    let a = holding(&kube, "a").await;
    let b = Candidate::start(&kube, "b", Fence::None);
    // b reads the held record and stays a standby.
    until("b to observe a", Duration::from_secs(5), || {
        b.elector.observed_holder().as_deref() == Some("a")
    })
    .await;
    assert!(b.leadership.may_act().is_none());
    assert!(!b.elector.looks_free());

    // A clean stop releases: empty holder, and b takes over well before the lease duration.
    a.stop().await;
    assert_eq!(holder(&kube), None, "released");
    let took = until("b to take over", Duration::from_secs(3), || {
        b.leadership.may_act().is_some()
    })
    .await;
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(holder(&kube).as_deref(), Some("b"));

    // A planned handover: b waits for its work in flight, then releases and stays away.
    let c = Candidate::start(&kube, "c", Fence::None);
    let work = b.leadership.working().await;
    b.elector.request_handover();
    until("b to stop acting", Duration::from_secs(3), || {
        b.leadership.may_act().is_none()
    })
    .await;
    assert_eq!(
        holder(&kube).as_deref(),
        Some("b"),
        "not released while work is in flight"
    );
    drop(work);
    until("c to take over", Duration::from_secs(5), || {
        c.leadership.may_act().is_some()
    })
    .await;
    assert!(
        b.elector.holding_off_now(),
        "b stays away after handing over"
    );
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_term_starts_with_a_higher_fence_epoch_in_postgres() {
    let db = TestDb::new().await.expect("db");
    sqlx::query(
        "INSERT INTO accounts (id, phone_number_id, pool) VALUES ('ns/line', '1', 'ns/pool')",
    )
    .execute(&db.pool)
    .await
    .expect("account");
    let fence = || Fence::Postgres {
        pool: db.pool.clone(),
        account: "ns/line".into(),
    };
    let kube = FakeKubeApi::start().await.expect("fake api");
    let mut epochs = Vec::new();
    for who in ["a", "b", "c"] {
        let c = Candidate::start(&kube, who, fence());
        until("a term", Duration::from_secs(5), || {
            c.leadership.may_act().is_some()
        })
        .await;
        let epoch = c.leadership.may_act().expect("epoch");
        let (stored, holder): (i64, Option<String>) =
            sqlx::query_as("SELECT fence_epoch, fence_holder FROM accounts WHERE id = 'ns/line'")
                .fetch_one(&db.pool)
                .await
                .expect("fence");
        assert_eq!((stored, holder.as_deref()), (epoch, Some(who)));
        assert_eq!(c.gauges.epoch.get(), epoch);
        epochs.push(epoch);
        c.stop().await;
    }
    assert!(epochs.windows(2).all(|w| w[1] > w[0]), "{epochs:?}");

    // No fence, no term: a holder that cannot bump the epoch does not act.
    sqlx::query("DELETE FROM accounts")
        .execute(&db.pool)
        .await
        .expect("delete");
    let d = Candidate::start(&kube, "d", fence());
    let leadership = d.leadership.clone();
    let (writes, acted) = watch_writes(&kube, "d", move || leadership.may_act().is_some());
    // Every round d holds the Lease and fails to bump the fence; after each, it must not act.
    until(
        "three rounds holding the Lease",
        Duration::from_secs(5),
        || writes.load(Ordering::SeqCst) >= 3,
    )
    .await;
    assert!(!acted.load(Ordering::SeqCst), "acted without a fence");
    assert!(d.leadership.may_act().is_none(), "acted without a fence");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_measured_on_the_candidates_clock_not_the_holders() {
    let _deadline = deadline(test_deadline());
    let kube = FakeKubeApi::start().await.expect("fake api");
    // A holder whose clock is an hour behind, renewing every 500 ms: its renewTime always looks
    // expired to a candidate comparing timestamps, yet the record keeps changing.
    let lease = |renew: &str| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "namespace": "default" },
            "spec": { "holderIdentity": "skewed", "leaseDurationSeconds": 3,
                      "acquireTime": "2020-01-01T00:00:00.000000Z", "renewTime": renew }
        })
    };
    kube.put(LEASE, lease("2020-01-01T00:00:00.000000Z"));
    let b = Candidate::start(&kube, "b", Fence::None);
    // Any write naming b is a takeover, seen as it is stored.
    let (taken, _) = watch_writes(&kube, "b", || false);
    // For 6 s (twice the lease duration) the live holder renews every 500 ms and keeps it.
    let mut renewals = tokio::time::interval(Duration::from_millis(500));
    for i in 0..12 {
        renewals.tick().await;
        kube.put(LEASE, lease(&format!("2020-01-01T00:00:{i:02}.000000Z")));
    }
    assert_eq!(
        taken.load(Ordering::SeqCst),
        0,
        "took a Lease that was being renewed"
    );
    assert!(b.leadership.may_act().is_none());
    assert_eq!(holder(&kube).as_deref(), Some("skewed"));
    // The holder stops renewing; its last renewTime is in the future on our clock (its clock
    // is ahead now), which must not keep the Lease alive: b takes it one lease duration after
    // the record stopped changing.
    kube.put(
        LEASE,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "namespace": "default" },
            "spec": { "holderIdentity": "skewed", "leaseDurationSeconds": 3,
                      "renewTime": "2099-01-01T00:00:00.000000Z" }
        }),
    );
    let took = until(
        "b to take the abandoned Lease",
        Duration::from_secs(8),
        || b.leadership.may_act().is_some(),
    )
    .await;
    assert!(
        took >= Duration::from_millis(2500),
        "took over after {took:?}, before the lease duration"
    );
    assert_eq!(holder(&kube).as_deref(), Some("b"));
    b.stop().await;
}
