//! Retry delays: exponential with jitter, so a burst of failures does not retry in lockstep.

use std::time::Duration;

use rand::Rng;

/// Delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`, capped at `cap`, with
/// ±20 % jitter.
pub fn retry_delay(attempt: i32, base: Duration, cap: Duration) -> Duration {
    let exp = attempt.clamp(1, 30) - 1;
    let raw = base.as_secs_f64() * 2f64.powi(exp);
    let capped = raw.min(cap.as_secs_f64());
    let jitter = rand::rng().random_range(0.8..=1.2);
    Duration::from_secs_f64(capped * jitter)
}

/// The default job retry delay: 1 s doubling up to 10 minutes.
pub fn job_retry_delay(attempt: i32) -> Duration {
    retry_delay(attempt, Duration::from_secs(1), Duration::from_secs(600))
}

/// `now + delay` as a Postgres timestamp.
pub fn at(delay: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        for attempt in 1..=10 {
            let d = retry_delay(attempt, base, cap).as_secs_f64();
            let nominal = (2f64.powi(attempt - 1)).min(60.0);
            assert!(
                d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                "attempt {attempt}: {d}"
            );
        }
        assert!(retry_delay(1000, base, cap) <= Duration::from_secs(72));
    }
}
