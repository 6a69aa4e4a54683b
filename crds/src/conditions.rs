//! Condition types, reasons and a helper that keeps `lastTransitionTime` honest.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The object is serving: for an account, a gateway holds the Lease and credentials are valid;
/// for a pool, the core Deployment has its desired replicas ready.
pub const READY: &str = "Ready";
/// A gateway pod holds the account's Lease and renews it.
pub const LEASE_HELD: &str = "LeaseHeld";
/// The credentials Secret exists and has every key the gateway reads.
pub const CREDENTIALS_VALID: &str = "CredentialsValid";
/// The spec passed the operator's checks (the ones CEL cannot express, like a referenced object).
pub const SPEC_VALID: &str = "SpecValid";
/// Tool plugins configured on an AgentPool passed their manifest and config-schema checks.
pub const TOOLS_VALID: &str = "ToolsValid";
/// Every team member of an AgentPool has a usable inbox token (set only when `spec.inbox` is).
pub const INBOX_READY: &str = "InboxReady";
/// WhatsApp Web: the number is linked (the session in Postgres has a device identity).
/// False with reason `PairingRequired` (see `status.pairing`) or `LoggedOut`.
pub const PAIRED: &str = "Paired";
/// WhatsApp Web: the Lease holder has the phone's socket open and logged in.
pub const CONNECTED: &str = "Connected";
/// The operator scaled (or is holding) an AgentPool according to its queue.
pub const SCALING_ACTIVE: &str = "ScalingActive";

/// True while another WhatsAppAccount in use has this account's phone number (its message names
/// it): nothing runs for this account until that one is deleted or changed.
pub const PHONE_NUMBER_CONFLICT: &str = "PhoneNumberConflict";
/// True while the spec sets fields that no longer act (see its message).
pub const DEPRECATED: &str = "Deprecated";
pub const STATUS_TRUE: &str = "True";
pub const STATUS_FALSE: &str = "False";
pub const STATUS_UNKNOWN: &str = "Unknown";

/// Set (insert or update) a condition by type. `lastTransitionTime` only moves when the status
/// value changes, as `kubectl wait --for=condition` and every controller reading it expect.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) {
    let message = message.into();
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != status {
            existing.last_transition_time = now;
        }
        existing.status = status.to_string();
        existing.reason = reason.to_string();
        existing.message = message;
        existing.observed_generation = observed_generation;
    } else {
        conditions.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation,
            last_transition_time: now,
        });
    }
}

/// Look a condition up by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of that type exists with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == STATUS_TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut c = Vec::new();
        set_condition(
            &mut c,
            READY,
            STATUS_FALSE,
            "Pending",
            "waiting",
            Some(1),
            at(10),
        );
        set_condition(
            &mut c,
            READY,
            STATUS_FALSE,
            "Pending",
            "still waiting",
            Some(2),
            at(20),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, at(10));
        assert_eq!(c[0].message, "still waiting");
        assert_eq!(c[0].observed_generation, Some(2));
        set_condition(
            &mut c,
            READY,
            STATUS_TRUE,
            "LeaseHeld",
            "ok",
            Some(2),
            at(30),
        );
        assert_eq!(c[0].last_transition_time, at(30));
        assert!(is_true(&c, READY));
        assert!(!is_true(&c, LEASE_HELD));
    }
}
