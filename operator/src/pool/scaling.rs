//! How many core workers a pool wants, as a pure function (tested without a cluster).
//!
//! - Up: `ceil(pending / targetPendingPerReplica)`, plus one while the oldest pending job has
//!   waited longer than `maxPendingAgeSeconds`; applied at once, so a burst is met within one
//!   resync (a few seconds; KEDA's Postgres scaler polls every 30 s by default).
//! - Down: like the HPA's stabilization window, never below the highest recommendation of the
//!   last `scaleDownStabilizationSeconds`, so a short lull does not tear workers down.
//! - Always within `[minReplicas, maxReplicas]`.

use std::time::Duration;

/// A past recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    pub at: jiff::Timestamp,
    pub replicas: i32,
}

/// What the decision looks at.
#[derive(Debug, Clone)]
pub struct ScaleInput<'a> {
    pub pending: i64,
    pub oldest_pending_seconds: f64,
    pub current: i32,
    pub min: i32,
    pub max: i32,
    pub target_pending_per_replica: i32,
    pub max_pending_age_seconds: i32,
    pub stabilization: Duration,
    pub now: jiff::Timestamp,
    /// Earlier recommendations (any age; old ones are ignored).
    pub history: &'a [Recommendation],
}

/// The decision, and the raw recommendation to remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleDecision {
    pub desired: i32,
    pub recommendation: Recommendation,
}

pub fn desired_replicas(i: &ScaleInput) -> ScaleDecision {
    let (min, max) = (i.min.max(0), i.max.max(i.min.max(0)));
    let target = i64::from(i.target_pending_per_replica.max(1));
    let mut raw = i.pending.max(0).div_euclid(target) + i64::from(i.pending.max(0) % target != 0);
    if i.pending > 0 && i.oldest_pending_seconds > f64::from(i.max_pending_age_seconds) {
        raw = raw.max(i64::from(i.current) + 1);
    }
    let raw = raw.clamp(i64::from(min), i64::from(max)) as i32;
    let recommendation = Recommendation {
        at: i.now,
        replicas: raw,
    };
    let window_start = i.now
        - jiff::SignedDuration::try_from(i.stabilization).unwrap_or(jiff::SignedDuration::ZERO);
    let stabilized = if raw >= i.current {
        raw
    } else {
        // Scale down only to the highest recommendation within the window (the current count
        // counts as one when nothing is remembered, e.g. after an operator restart).
        let recent = i
            .history
            .iter()
            .filter(|r| r.at >= window_start)
            .map(|r| r.replicas)
            .max();
        let floor = if i.history.is_empty() {
            i.current
        } else {
            recent.unwrap_or(raw)
        };
        raw.max(floor).min(i.current)
    };
    ScaleDecision {
        desired: stabilized.clamp(min, max),
        recommendation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        pending: i64,
        current: i32,
        history: &[Recommendation],
        now: jiff::Timestamp,
    ) -> ScaleInput<'_> {
        ScaleInput {
            pending,
            oldest_pending_seconds: 0.0,
            current,
            min: 1,
            max: 10,
            target_pending_per_replica: 20,
            max_pending_age_seconds: 30,
            stabilization: Duration::from_secs(300),
            now,
            history,
        }
    }

    fn t(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + secs).expect("timestamp")
    }

    #[test]
    fn scales_up_at_once_from_depth_within_bounds() {
        assert_eq!(
            desired_replicas(&input(0, 1, &[], t(0))).desired,
            1,
            "min when idle"
        );
        assert_eq!(
            desired_replicas(&input(21, 1, &[], t(0))).desired,
            2,
            "ceil(21/20)"
        );
        assert_eq!(desired_replicas(&input(100, 2, &[], t(0))).desired, 5);
        assert_eq!(
            desired_replicas(&input(10_000, 2, &[], t(0))).desired,
            10,
            "capped at max"
        );
    }

    #[test]
    fn old_pending_work_adds_a_replica() {
        let mut i = input(5, 3, &[], t(0));
        i.oldest_pending_seconds = 45.0;
        assert_eq!(desired_replicas(&i).desired, 4);
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let history = [Recommendation {
            at: t(0),
            replicas: 8,
        }];
        // 100 s later the queue is empty: stay at 8 (the window's highest recommendation).
        let d = desired_replicas(&input(0, 8, &history, t(100)));
        assert_eq!(d.desired, 8);
        assert_eq!(d.recommendation.replicas, 1);
        // Past the window (301 s) the old recommendation no longer counts.
        let history = [
            Recommendation {
                at: t(0),
                replicas: 8,
            },
            Recommendation {
                at: t(100),
                replicas: 3,
            },
        ];
        assert_eq!(desired_replicas(&input(0, 8, &history, t(301))).desired, 3);
        assert_eq!(desired_replicas(&input(0, 8, &history, t(401))).desired, 1);
    }

    #[test]
    fn with_no_history_the_current_count_holds_during_the_window() {
        assert_eq!(desired_replicas(&input(0, 6, &[], t(0))).desired, 6);
    }

    #[test]
    fn min_zero_allows_scale_to_zero_and_min_above_max_is_clamped() {
        let mut i = input(0, 0, &[], t(0));
        i.min = 0;
        assert_eq!(desired_replicas(&i).desired, 0);
        let mut i = input(0, 1, &[], t(0));
        i.min = 5;
        i.max = 2;
        assert_eq!(desired_replicas(&i).desired, 5);
    }
}
