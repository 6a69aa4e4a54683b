//! Statements composed from shared parts.
//!
//! A block that several statements need the same way (taking a job to `running`, finding a
//! key's next waiting job, the oldest pending job per queue) is written once in a
//! `queue/sql/part_*.sql` file and spliced into each statement where it says `{part_name}`, with
//! the part's `:name` holes filled by that statement's columns and parameters. Composition
//! happens once per process; the database sees the same single statement as before, so plans
//! and round trips are unchanged.

use std::sync::LazyLock;

const TAKE_RUNNING: &str = include_str!("../sql/part_take_running.sql");
const NEXT_WAITING: &str = include_str!("../sql/part_next_waiting.sql");
const OLDEST_PENDING: &str = include_str!("../sql/part_oldest_pending.sql");

/// A part without its leading comment, with each `:hole` replaced. Holes are replaced longest
/// name first, so `:queue` cannot eat the start of `:queues`.
fn part(text: &str, holes: &[(&str, &str)]) -> String {
    let mut body: String = text
        .lines()
        .skip_while(|l| l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut holes = holes.to_vec();
    holes.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in holes {
        body = body.replace(&format!(":{name}"), value);
    }
    body
}

/// The `SET` list that takes a job to `running` when `chain` holds (else to `pending`).
pub(crate) fn take_running(chain: &str, processor: &str, lock_seconds: &str) -> String {
    part(
        TAKE_RUNNING,
        &[
            ("chain", chain),
            ("processor", processor),
            ("lock_seconds", lock_seconds),
        ],
    )
}

/// The oldest waiting job of `(queue, key)`, after job id `after` when given.
pub(crate) fn next_waiting(queue: &str, key: &str, after: Option<&str>) -> String {
    let text = match after {
        Some(_) => NEXT_WAITING.to_string(),
        None => NEXT_WAITING
            .lines()
            .filter(|l| !l.contains(":after"))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    part(
        &text,
        &[
            ("queue", queue),
            ("key", key),
            ("after", after.unwrap_or("")),
        ],
    )
}

/// The oldest runnable pending job's `run_at` for each queue of relation `queues`.
pub(crate) fn oldest_pending(queues: &str) -> String {
    part(OLDEST_PENDING, &[("queues", queues)])
}

/// `template` with each `{name}` replaced by its part; panics at first use if a statement names
/// a part it was not given (caught by every test that runs the statement, and by the unit test
/// below for all of them).
pub(crate) fn compose(template: &str, parts: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (name, text) in parts {
        let hole = format!("{{{name}}}");
        assert!(out.contains(&hole), "statement has no {hole}");
        out = out.replace(&hole, text);
    }
    out
}

/// A composed statement, built on first use.
pub(crate) type Statement = LazyLock<String>;

#[cfg(test)]
mod tests {
    use crate::jobs::composed_statements;

    #[test]
    fn every_composed_statement_has_all_its_parts_filled() {
        for (name, text) in composed_statements() {
            for hole in ["{take_running}", "{next_waiting}", "{oldest_pending}"] {
                assert!(!text.contains(hole), "{name} still has {hole}");
            }
            for hole in [":chain", ":processor", ":lock_seconds", ":after", ":key"] {
                assert!(!text.contains(hole), "{name} still has {hole}");
            }
            assert!(
                !text.contains(":queue ") && !text.contains(":queues"),
                "{name} still has a :queue hole"
            );
        }
    }
}
