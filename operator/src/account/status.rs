//! An account's status as a pure function of what was observed, and the Events its changes
//! deserve.

use crds::account::{
    AccountPhase, PairingMethod, PairingStatus, ProviderKind, WhatsAppAccountStatus,
};
use crds::conditions::{
    self, CONNECTED, CREDENTIALS_VALID, DEPRECATED, LEASE_HELD, PAIRED, PHONE_NUMBER_CONFLICT,
    READY, SPEC_VALID, STATUS_FALSE, STATUS_TRUE,
};
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use queue::web_session::{SessionState, WebSession};

/// What the credentials Secret looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Valid,
    /// WhatsApp Web: the session is in Postgres, there is no Secret.
    NotNeeded,
    SecretMissing(String),
    KeysMissing {
        secret: String,
        keys: Vec<String>,
    },
}

impl Credentials {
    pub fn usable(&self) -> bool {
        matches!(self, Credentials::Valid | Credentials::NotNeeded)
    }
}

/// What was observed of a WhatsApp Web account's socket.
pub struct WebObserved<'a> {
    pub method: PairingMethod,
    /// The row the Lease holder writes; None before any gateway ran.
    pub session: Option<&'a WebSession>,
    /// The fleet's Service, which serves the pairing page.
    pub service: String,
    /// The page's path on it (`/pairing/<account>`).
    pub path: String,
}

/// Everything observed in one reconcile.
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub spec_problems: &'a [String],
    pub credentials: &'a Credentials,
    /// Another account in use with this phone number (`namespace/name`).
    pub phone_conflict: Option<&'a str>,
    pub lease: Option<&'a LeaseSpec>,
    pub ready_replicas: i32,
    pub suspended: bool,
    pub outbound: Option<&'a queue::stats::OutboundStats>,
    /// The account's fencing epoch, when the database answered.
    pub fence_epoch: Option<i64>,
    pub provider: Option<ProviderKind>,
    pub web: Option<WebObserved<'a>>,
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
    let creds_ok = o.credentials.usable();
    let (reason, msg) = match o.credentials {
        Credentials::Valid => (
            "SecretFound",
            "credentials Secret has every key".to_string(),
        ),
        Credentials::NotNeeded => (
            "NotNeeded",
            "WhatsApp Web keeps its session in Postgres; no Secret is needed".to_string(),
        ),
        Credentials::SecretMissing(s) => (
            "SecretNotFound",
            format!(
                "Secret {s} not found; the gateway fleet does not serve this number until it exists"
            ),
        ),
        Credentials::KeysMissing { secret, keys } => (
            "KeysMissing",
            format!(
                "Secret {secret} lacks keys: {}; the gateway fleet does not serve this number",
                keys.join(", ")
            ),
        ),
    };
    set(CREDENTIALS_VALID, creds_ok, reason, msg);
    let number_free = o.phone_conflict.is_none();
    let (reason, msg) = match o.phone_conflict {
        Some(other) => (
            "InUse",
            format!(
                "WhatsAppAccount {other} uses this phone number; nothing runs for this account                  until that one is deleted or names another number"
            ),
        ),
        None => (
            "Available",
            "no other account uses this phone number".to_string(),
        ),
    };
    // True means a conflict: set's flag is the condition's status.
    set(PHONE_NUMBER_CONFLICT, !number_free, reason, msg);
    let holder = live_holder(o.lease, o.now);
    let held = holder.is_some();
    let (reason, msg) = match (&holder, o.suspended) {
        (Some(h), _) => (
            "Held",
            format!("{h} holds the Lease and is the only pod sending"),
        ),
        (None, true) => (
            "Suspended",
            "suspended: no gateway holds the Lease".to_string(),
        ),
        (None, false) => (
            "NoHolder",
            "no gateway holds the Lease; nothing is being sent".to_string(),
        ),
    };
    set(LEASE_HELD, held, reason, msg);
    let mut pairing = None;
    let mut connected = true;
    if let Some(web) = &o.web {
        let state = web.session.and_then(|s| s.state());
        let detail = web
            .session
            .and_then(|s| s.detail.clone())
            .unwrap_or_default();
        let (paired, reason, msg) = match state {
            None | Some(SessionState::Unpaired) | Some(SessionState::Pairing) => (
                false,
                "PairingRequired",
                "link this number: see status.pairing".to_string(),
            ),
            Some(SessionState::LoggedOut) => (
                false,
                "LoggedOut",
                format!(
                    "the phone removed this linked device ({detail}); the gateway will not reconnect. \
                     Link it again: see status.pairing"
                ),
            ),
            Some(_) => (
                true,
                "Paired",
                format!(
                    "linked as {}",
                    web.session
                        .and_then(|s| s.device_jid.clone())
                        .unwrap_or_default()
                ),
            ),
        };
        set(PAIRED, paired, reason, msg);
        connected = held && state == Some(SessionState::Connected);
        // The holder's last failed attempt to reach WhatsApp, while it is not connected.
        let connect_error = web
            .session
            .filter(|_| !connected && held)
            .and_then(|s| s.connect_error.as_deref());
        let (reason, msg) = match (state, &holder) {
            (Some(SessionState::Connected), Some(h)) if connected => (
                "Connected",
                format!("{h} holds the Lease and the number's only socket"),
            ),
            (_, None) => (
                "NoHolder",
                "no gateway holds the Lease, so no socket is open".to_string(),
            ),
            (Some(SessionState::LoggedOut), _) => (
                "LoggedOut",
                "logged out from the phone; not reconnecting".to_string(),
            ),
            _ if connect_error.is_some() => (
                "ConnectFailed",
                connect_failed_message(connect_error.unwrap_or_default()),
            ),
            (Some(SessionState::Pairing), _) | (None, _) | (Some(SessionState::Unpaired), _) => (
                "NotPaired",
                "waiting for the number to be linked".to_string(),
            ),
            (Some(_), _) => ("Disconnected", detail.clone()),
        };
        set(CONNECTED, connected, reason, msg);
        if !paired {
            let mut p = pairing_status(web, held);
            if let Some(error) = connect_error
                && p.qr_code.is_none()
                && p.pair_code.is_none()
            {
                p.instructions = format!("no code yet: {}", connect_failed_message(error));
            }
            pairing = Some(p);
        }
    }
    let ready = spec_ok
        && creds_ok
        && number_free
        && held
        && connected
        && !o.suspended
        && o.ready_replicas > 0;
    let phase = if o.suspended {
        AccountPhase::Suspended
    } else if ready {
        AccountPhase::Ready
    } else if !spec_ok
        || !creds_ok
        || !number_free
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
        provider: o.provider.map(|p| p.as_str().to_string()),
        pairing,
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
        sent_last5m: o.outbound.map(|s| s.sent_recently),
        failed_last5m: o.outbound.map(|s| s.failed_recently),
        fence_epoch: o
            .fence_epoch
            .or_else(|| o.previous.and_then(|p| p.fence_epoch)),
    }
}

/// Say which spec fields no longer act (`Deprecated` True), or drop the condition.
pub fn set_deprecated(
    status: &mut WhatsAppAccountStatus,
    deprecated: &[String],
    generation: Option<i64>,
    now: jiff::Timestamp,
) {
    if deprecated.is_empty() {
        status.conditions.retain(|c| c.type_ != DEPRECATED);
        return;
    }
    conditions::set_condition(
        &mut status.conditions,
        DEPRECATED,
        STATUS_TRUE,
        "FieldsIgnored",
        deprecated.join("; "),
        generation,
        Time(now),
    );
}

/// The Connected condition's message when the holder cannot reach WhatsApp: the error, and
/// what usually fixes it.
fn connect_failed_message(error: &str) -> String {
    format!(
        "the gateway cannot reach WhatsApp: {error}. It keeps retrying. If the pods have no \
         egress to WhatsApp, allow web.whatsapp.com (the version check and the socket, \
         wss://web.whatsapp.com/ws/chat), or pin spec.provider.whatsappWeb.clientVersion and \
         point serverUrl at a reachable endpoint"
    )
}

/// How to link the number now, from what the Lease holder last showed.
fn pairing_status(web: &WebObserved, held: bool) -> PairingStatus {
    let session = web
        .session
        .filter(|s| s.state() == Some(SessionState::Pairing));
    let method = match web.method {
        PairingMethod::QrCode => "QrCode",
        PairingMethod::PairCode => "PairCode",
    };
    let page = format!(
        "kubectl port-forward svc/{} 8080:80, then open http://localhost:8080{}",
        web.service, web.path
    );
    let instructions = match (session, web.method) {
        (None, _) if !held => "waiting for a gateway to hold the Lease and ask for a code".into(),
        (None, _) => "waiting for the gateway to show a code".into(),
        (Some(_), PairingMethod::QrCode) => format!(
            "On the phone: WhatsApp > Settings > Linked devices > Link a device, and scan the \
             QR code ({page})"
        ),
        (Some(_), PairingMethod::PairCode) => format!(
            "On the phone: WhatsApp > Settings > Linked devices > Link a device > Link with \
             phone number instead, and type the pair code ({page})"
        ),
    };
    PairingStatus {
        method: method.into(),
        qr_code: session.and_then(|s| s.qr_code.clone()),
        pair_code: session.and_then(|s| s.pair_code.clone()),
        expires_at: session
            .and_then(|s| s.code_expires_at)
            .and_then(|t| jiff::Timestamp::from_millisecond(t.timestamp_millis()).ok())
            .map(Time),
        instructions,
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
    // A handover through a release is seen as holder -> none -> new holder (or not at all
    // between two reconciles); the Lease's transition count says the Lease changed hands.
    let moved = previous
        .and_then(|p| p.lease_transitions)
        .is_some_and(|before| next.lease_transitions.unwrap_or(0) > before);
    if next.owner != prev_owner {
        match (&prev_owner, &next.owner) {
            (None, Some(o)) if moved => events.push((
                false,
                "OwnerChanged",
                format!("the Lease moved to {o}, which sends now"),
            )),
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
    let code = |s: Option<&WhatsAppAccountStatus>| {
        s.and_then(|s| s.pairing.as_ref())
            .and_then(|p| p.pair_code.clone().or(p.qr_code.clone()))
    };
    if let Some(new) = code(Some(next))
        && code(previous).as_ref() != Some(&new)
        && let Some(p) = &next.pairing
    {
        let shown = match &p.pair_code {
            Some(pc) => format!("pair code {pc}"),
            None => format!("QR code {new}"),
        };
        events.push((false, "PairingCode", format!("{shown}. {}", p.instructions)));
    }
    // A number that cannot reach WhatsApp says so once, even while Connected stays False.
    let connected_reason = |s: Option<&WhatsAppAccountStatus>| {
        s.and_then(|s| conditions::find(&s.conditions, CONNECTED))
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, msg)) = connected_reason(Some(next))
        && reason == "ConnectFailed"
        && connected_reason(previous).map(|p| p.0).as_deref() != Some("ConnectFailed")
    {
        events.push((true, "ConnectFailed", msg));
    }
    for (t, bad_reason, good_reason) in [
        (PAIRED, "NotPaired", "Paired"),
        (CONNECTED, "Disconnected", "Connected"),
    ] {
        let before = cond(previous, t);
        let after = cond(Some(next), t);
        if before.as_ref().map(|b| &b.0) != after.as_ref().map(|a| &a.0)
            && let Some((status, msg)) = after
        {
            if status == STATUS_TRUE {
                events.push((false, good_reason, msg));
            } else if before.is_some() {
                events.push((true, bad_reason, msg));
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
            phone_conflict: None,
            lease,
            ready_replicas: 2,
            suspended: false,
            outbound: None,
            fence_epoch: None,
            provider: Some(ProviderKind::CloudApi),
            web: None,
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
    fn a_phone_number_in_use_elsewhere_is_a_condition_naming_the_other_account() {
        let now = jiff::Timestamp::now();
        let s = compute(&Observed {
            phone_conflict: Some("shop/old-line"),
            ..observed(None, &Credentials::Valid, now)
        });
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == PHONE_NUMBER_CONFLICT)
            .expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "InUse"));
        assert!(c.message.contains("shop/old-line"), "{}", c.message);
        assert_eq!(s.phase, Some(AccountPhase::Degraded));
        let free = compute(&observed(None, &Credentials::Valid, now));
        let c = free
            .conditions
            .iter()
            .find(|c| c.type_ == PHONE_NUMBER_CONFLICT)
            .expect("condition");
        assert_eq!(c.status, "False");
    }

    #[test]
    fn a_handover_through_a_release_is_an_owner_change_naming_the_new_holder() {
        let now = jiff::Timestamp::now();
        let a = compute(&observed(
            Some(&lease("gw-0", 1, now)),
            &Credentials::Valid,
            now,
        ));
        // Released: no holder for a moment.
        let released = LeaseSpec {
            holder_identity: None,
            ..lease("gw-0", 1, now)
        };
        let gap = compute(&Observed {
            previous: Some(&a),
            ..observed(Some(&released), &Credentials::Valid, now)
        });
        let taken = LeaseSpec {
            lease_transitions: Some(4),
            ..lease("gw-1", 0, now)
        };
        let b = compute(&Observed {
            previous: Some(&gap),
            ..observed(Some(&taken), &Credentials::Valid, now)
        });
        let ev = transitions(Some(&gap), &b);
        assert!(
            ev.iter()
                .any(|e| e.1 == "OwnerChanged" && e.2.contains("gw-1")),
            "{ev:?}"
        );
        assert!(!ev.iter().any(|e| e.1 == "LeaseAcquired"), "{ev:?}");
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

    #[test]
    fn a_web_number_that_cannot_reach_whatsapp_says_so_instead_of_waiting_for_a_code() {
        let now = jiff::Timestamp::now();
        let l = lease("gw-0", 1, now);
        let session = WebSession {
            account_id: "shop/web".into(),
            state: "unpaired".into(),
            device_jid: None,
            pairing_method: None,
            qr_code: None,
            pair_code: None,
            code_expires_at: None,
            detail: Some("opening the socket".into()),
            holder: Some("gw-0".into()),
            connected_since: None,
            updated_at: chrono::Utc::now(),
            connect_error: Some("failed to lookup address information: web.whatsapp.com".into()),
            connect_error_at: Some(chrono::Utc::now()),
        };
        let web = |session| WebObserved {
            method: PairingMethod::QrCode,
            session,
            service: "ap-support-gateway".into(),
            path: "/pairing/shop/web".into(),
        };
        let with_error = Observed {
            provider: Some(ProviderKind::WhatsAppWeb),
            web: Some(web(Some(&session))),
            ..observed(Some(&l), &Credentials::Valid, now)
        };
        let s = compute(&with_error);
        let c = conditions::find(&s.conditions, CONNECTED).expect("Connected");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ConnectFailed")
        );
        assert!(c.message.contains("web.whatsapp.com") && c.message.contains("clientVersion"));
        let instructions = &s.pairing.as_ref().expect("pairing").instructions;
        assert!(
            instructions.contains("cannot reach WhatsApp") && instructions.contains("lookup"),
            "{instructions}"
        );
        let ev = transitions(None, &s);
        assert_eq!(
            ev.iter().filter(|e| e.1 == "ConnectFailed" && e.0).count(),
            1
        );
        // Said once: the same failure on the next reconcile publishes nothing new.
        let again = compute(&Observed {
            previous: Some(&s),
            ..with_error
        });
        assert!(
            !transitions(Some(&s), &again)
                .iter()
                .any(|e| e.1 == "ConnectFailed")
        );
        // Without an error it is the usual wait for a code.
        let waiting = WebSession {
            connect_error: None,
            ..session.clone()
        };
        let s = compute(&Observed {
            provider: Some(ProviderKind::WhatsAppWeb),
            web: Some(web(Some(&waiting))),
            ..observed(Some(&l), &Credentials::Valid, now)
        });
        let c = conditions::find(&s.conditions, CONNECTED).expect("Connected");
        assert_eq!(c.reason, "NotPaired");
    }
}
