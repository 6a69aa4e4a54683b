//! An account's status as a pure function of what was observed, and the Events its changes
//! deserve.

use crds::account::{AccountPhase, WhatsAppAccountStatus};
use crds::conditions::{
    self, CREDENTIALS_VALID, LEASE_HELD, READY, SPEC_VALID, STATUS_FALSE, STATUS_TRUE,
};
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// What the credentials Secret looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Valid,
    SecretMissing(String),
    KeysMissing { secret: String, keys: Vec<String> },
}

/// Everything observed in one reconcile.
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub spec_problems: &'a [String],
    pub credentials: &'a Credentials,
    pub lease: Option<&'a LeaseSpec>,
    pub ready_replicas: i32,
    pub suspended: bool,
    pub outbound: Option<&'a queue::stats::OutboundStats>,
    pub now: jiff::Timestamp,
    pub previous: Option<&'a WhatsAppAccountStatus>,
}

/// Slack for clock differences between the holder's node and the operator's.
const CLOCK_SKEW_SECONDS: i64 = 5;

/// The current holder, if the Lease was renewed within its duration (plus skew).
pub fn live_holder(lease: Option<&LeaseSpec>, now: jiff::Timestamp) -> Option<String> {
    let lease = lease?;
    let holder = lease.holder_identity.clone().filter(|h| !h.is_empty())?;
    let renewed = lease.renew_time.as_ref()?.0;
    let duration = i64::from(lease.lease_duration_seconds.unwrap_or(15)) + CLOCK_SKEW_SECONDS;
    let expires = renewed
        .checked_add(jiff::SignedDuration::from_secs(duration))
        .ok()?;
    (expires > now).then_some(holder)
}

pub fn compute(o: &Observed) -> WhatsAppAccountStatus {
    let mut conds = o.previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let now = Time(o.now);
    let mut set = |t: &str, ok: bool, reason: &str, msg: String| {
        conditions::set_condition(
            &mut conds,
            t,
            if ok { STATUS_TRUE } else { STATUS_FALSE },
            reason,
            msg,
            o.generation,
            now.clone(),
        );
    };
    let spec_ok = o.spec_problems.is_empty();
    set(
        SPEC_VALID,
        spec_ok,
        if spec_ok { "Valid" } else { "InvalidSpec" },
        if spec_ok {
            "spec is valid".into()
        } else {
            o.spec_problems.join("; ")
        },
    );
    let creds_ok = *o.credentials == Credentials::Valid;
    let (reason, msg) = match o.credentials {
        Credentials::Valid => (
            "SecretFound",
            "credentials Secret has every key".to_string(),
        ),
        Credentials::SecretMissing(s) => (
            "SecretNotFound",
            format!("Secret {s} not found; gateways are scaled to 0 until it exists"),
        ),
        Credentials::KeysMissing { secret, keys } => (
            "KeysMissing",
            format!(
                "Secret {secret} lacks keys: {}; gateways are scaled to 0",
                keys.join(", ")
            ),
        ),
    };
    set(CREDENTIALS_VALID, creds_ok, reason, msg);
    let holder = live_holder(o.lease, o.now);
    let held = holder.is_some();
    let (reason, msg) = match (&holder, o.suspended) {
        (Some(h), _) => (
            "Held",
            format!("{h} holds the Lease and is the only pod sending"),
        ),
        (None, true) => ("Suspended", "suspended: no gateway runs".to_string()),
        (None, false) => (
            "NoHolder",
            "no gateway holds the Lease; nothing is being sent".to_string(),
        ),
    };
    set(LEASE_HELD, held, reason, msg);
    let ready = spec_ok && creds_ok && held && !o.suspended && o.ready_replicas > 0;
    let phase = if o.suspended {
        AccountPhase::Suspended
    } else if ready {
        AccountPhase::Ready
    } else if !spec_ok
        || !creds_ok
        || (o
            .lease
            .is_some_and(|l| l.holder_identity.as_deref().is_some_and(|h| !h.is_empty()))
            && !held)
    {
        // A holder that stopped renewing, bad credentials or a bad spec need attention.
        AccountPhase::Degraded
    } else {
        AccountPhase::Pending
    };
    let ready_reason = match phase {
        AccountPhase::Ready => "Serving",
        AccountPhase::Suspended => "Suspended",
        AccountPhase::Degraded => "Degraded",
        AccountPhase::Pending => "Pending",
    };
    set(READY, ready, ready_reason, format!("phase {phase}"));
    WhatsAppAccountStatus {
        phase: Some(phase),
        conditions: conds,
        owner: holder,
        lease_transitions: o.lease.and_then(|l| l.lease_transitions),
        renew_time: o
            .lease
            .and_then(|l| l.renew_time.as_ref())
            .map(|t| Time(t.0)),
        observed_generation: o.generation,
        ready_replicas: Some(o.ready_replicas),
        outbound_queued: o.outbound.map(|s| s.queued + s.sending),
        outbound_sent: o.outbound.map(|s| s.sent),
        outbound_failed: o.outbound.map(|s| s.failed),
    }
}

/// An Event to publish: (warning?, reason, note).
pub type EventSpec = (bool, &'static str, String);

/// Events for what changed between two statuses, so `kubectl describe` tells the story once per
/// transition rather than once per reconcile.
pub fn transitions(
    previous: Option<&WhatsAppAccountStatus>,
    next: &WhatsAppAccountStatus,
) -> Vec<EventSpec> {
    let mut events = Vec::new();
    let prev_owner = previous.and_then(|p| p.owner.clone());
    if next.owner != prev_owner {
        match (&prev_owner, &next.owner) {
            (None, Some(o)) => events.push((
                false,
                "LeaseAcquired",
                format!("{o} holds the Lease and sends"),
            )),
            (Some(a), Some(b)) => events.push((
                false,
                "OwnerChanged",
                format!("sending moved from {a} to {b}"),
            )),
            (Some(a), None) => events.push((
                true,
                "LeaseLost",
                format!("{a} stopped renewing the Lease; nothing is being sent"),
            )),
            (None, None) => {}
        }
    }
    let cond = |s: Option<&WhatsAppAccountStatus>, t: &str| {
        s.and_then(|s| conditions::find(&s.conditions, t))
            .map(|c| (c.status.clone(), c.message.clone()))
    };
    for (t, bad_reason, good_reason) in [
        (CREDENTIALS_VALID, "CredentialsInvalid", "CredentialsValid"),
        (SPEC_VALID, "InvalidSpec", "SpecValid"),
    ] {
        let before = cond(previous, t);
        let after = cond(Some(next), t);
        if before.as_ref().map(|b| &b.0) != after.as_ref().map(|a| &a.0)
            && let Some((status, msg)) = after
        {
            if status == STATUS_FALSE {
                events.push((true, bad_reason, msg));
            } else if before.is_some() {
                events.push((false, good_reason, msg));
            }
        }
    }
    if previous.and_then(|p| p.phase) != next.phase {
        match next.phase {
            Some(AccountPhase::Suspended) => events.push((
                false,
                "Suspended",
                "spec.suspend is true: gateways scaled to 0".into(),
            )),
            Some(AccountPhase::Ready) => events.push((
                false,
                "Ready",
                "a gateway holds the Lease; messages flow".into(),
            )),
            _ => {}
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed_secs_ago: i64, now: jiff::Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                now - jiff::SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    fn observed<'a>(
        lease: Option<&'a LeaseSpec>,
        creds: &'a Credentials,
        now: jiff::Timestamp,
    ) -> Observed<'a> {
        Observed {
            generation: Some(2),
            spec_problems: &[],
            credentials: creds,
            lease,
            ready_replicas: 2,
            suspended: false,
            outbound: None,
            now,
            previous: None,
        }
    }

    #[test]
    fn a_fresh_lease_makes_the_account_ready_with_its_owner() {
        let now = jiff::Timestamp::now();
        let l = lease("gw-0", 2, now);
        let s = compute(&observed(Some(&l), &Credentials::Valid, now));
        assert_eq!(s.phase, Some(AccountPhase::Ready));
        assert_eq!(s.owner.as_deref(), Some("gw-0"));
        assert_eq!(s.lease_transitions, Some(3));
        assert_eq!(s.observed_generation, Some(2));
        assert!(conditions::is_true(&s.conditions, READY));
        assert!(conditions::is_true(&s.conditions, LEASE_HELD));
        let ev = transitions(None, &s);
        assert!(ev.iter().any(|e| e.1 == "LeaseAcquired"));
    }

    #[test]
    fn a_stale_lease_has_no_owner_and_degrades() {
        let now = jiff::Timestamp::now();
        let l = lease("gw-0", 60, now);
        let s = compute(&observed(Some(&l), &Credentials::Valid, now));
        assert_eq!(s.owner, None);
        assert_eq!(s.phase, Some(AccountPhase::Degraded));
    }

    #[test]
    fn missing_credentials_are_a_condition_and_one_warning() {
        let now = jiff::Timestamp::now();
        let creds = Credentials::KeysMissing {
            secret: "creds".into(),
            keys: vec!["appSecret".into()],
        };
        let s = compute(&observed(None, &creds, now));
        assert_eq!(s.phase, Some(AccountPhase::Degraded));
        let c = conditions::find(&s.conditions, CREDENTIALS_VALID).expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "KeysMissing")
        );
        assert!(c.message.contains("appSecret"));
        let ev = transitions(None, &s);
        assert_eq!(ev.iter().filter(|e| e.1 == "CredentialsInvalid").count(), 1);
        // The same state again publishes nothing new.
        let again = compute(&Observed {
            previous: Some(&s),
            ..observed(None, &creds, now)
        });
        assert!(transitions(Some(&s), &again).is_empty());
    }

    #[test]
    fn owner_change_is_an_event() {
        let now = jiff::Timestamp::now();
        let a = compute(&observed(
            Some(&lease("gw-0", 1, now)),
            &Credentials::Valid,
            now,
        ));
        let l2 = lease("gw-1", 1, now);
        let b = compute(&Observed {
            previous: Some(&a),
            ..observed(Some(&l2), &Credentials::Valid, now)
        });
        let ev = transitions(Some(&a), &b);
        assert_eq!(
            ev,
            vec![(
                false,
                "OwnerChanged",
                "sending moved from gw-0 to gw-1".to_string()
            )]
        );
    }
}
