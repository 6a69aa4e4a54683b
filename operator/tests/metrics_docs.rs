//! The metrics table of docs/runbook.md against what the binaries register: every metric named
//! there exists with that type and those labels, and every registered metric is named there; and
//! every metric name anywhere in README.md and docs/ is one that /metrics exports. A renamed
//! metric, a new one left undocumented or a doc typo fails here, not on someone's dashboard.

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::encoding::text::encode;

/// `name -> (type, label names)` of every family in the encoded registry. Families with labels
/// show their label names once they have a sample, so the caller gives each one.
fn families(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
            }
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, labels)) = line.split_once('{') else {
            continue;
        };
        let family = out
            .keys()
            .filter(|f| series.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .cloned();
        let Some(family) = family else { continue };
        let labels = labels.split('}').next().unwrap_or_default();
        for pair in labels.split(',') {
            if let Some((k, _)) = pair.split_once('=')
                && k != "le"
                && let Some(entry) = out.get_mut(&family)
            {
                entry.1.insert(k.to_string());
            }
        }
    }
    out
}

/// The rows of the runbook's metrics table: `(sample name, type, label names)`.
fn documented() -> Vec<(String, String, BTreeSet<String>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    fakes::scrape::documented(&root, "whatsapp_")
        .into_iter()
        .map(|d| (d.sample, d.kind, d.labels))
        .collect()
}

/// Every family the worker and the operator register, with a sample in each labelled one.
fn registered() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut text = String::new();
    // Worker: one sample per labelled family, so its label names show.
    let (w, wreg) = worker::metrics::Metrics::new();
    for f in [
        &w.webhooks,
        &w.inbound_messages,
        &w.statuses,
        &w.sends,
        &w.turns,
        &w.team_actions,
        &w.media_fetches,
    ] {
        f.get_or_create(&worker::metrics::Outcome::of("x")).inc();
    }
    encode(&mut text, &wreg).expect("encode worker");
    let (o, oreg) = operator::metrics::Metrics::new();
    o.runs
        .get_or_create(&operator::metrics::Metrics::kind("x"))
        .inc();
    o.duration
        .get_or_create(&operator::metrics::Metrics::kind("x"))
        .observe(1.0);
    o.failures
        .get_or_create(&operator::metrics::Failure {
            kind: "x".into(),
            error: "y".into(),
        })
        .inc();
    o.accounts
        .get_or_create(&operator::metrics::Phase { phase: "x".into() })
        .set(1);
    for f in [&o.queue_depth, &o.desired_replicas] {
        f.get_or_create(&operator::metrics::Pool { pool: "x".into() })
            .set(1);
    }
    let mut otext = String::new();
    encode(&mut otext, &oreg).expect("encode operator");
    text.push_str(&otext);
    families(&text)
}

#[test]
fn the_runbook_names_every_metric_with_its_type_and_labels() {
    let registered = registered();
    let rows = documented();
    assert!(rows.len() >= 20, "the table was not found: {rows:?}");
    let mut named = BTreeSet::new();
    for (name, kind, labels) in &rows {
        // Counters are exported as <family>_total.
        let family = match kind.as_str() {
            "counter" => name
                .strip_suffix("_total")
                .unwrap_or_else(|| panic!("the counter {name} is exported with _total")),
            _ => name.as_str(),
        };
        let Some((actual_kind, actual_labels)) = registered.get(family) else {
            panic!("docs/runbook.md names {name}, which no binary registers");
        };
        assert_eq!(actual_kind, kind, "{name}'s type");
        assert_eq!(actual_labels, labels, "{name}'s labels");
        named.insert(family.to_string());
    }
    let undocumented: Vec<_> = registered.keys().filter(|f| !named.contains(*f)).collect();
    assert!(
        undocumented.is_empty(),
        "registered but not in docs/runbook.md: {undocumented:?}"
    );
}

#[test]
fn every_metric_the_docs_mention_exists() {
    let registered = registered();
    let mut samples = BTreeSet::new();
    for (family, (kind, _)) in &registered {
        match kind.as_str() {
            "counter" => {
                samples.insert(format!("{family}_total"));
            }
            "histogram" => {
                for suffix in ["", "_bucket", "_sum", "_count"] {
                    samples.insert(format!("{family}{suffix}"));
                }
            }
            _ => {
                samples.insert(family.clone());
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs") {
        files.push(entry.expect("entry").path());
    }
    let mut mentioned = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for prefix in ["whatsapp_worker_", "whatsapp_operator_"] {
            for (at, _) in text.match_indices(prefix) {
                let rest = &text[at + prefix.len()..];
                let tail: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if tail.is_empty() {
                    continue; // the prefix itself
                }
                let name = format!("{prefix}{tail}");
                assert!(
                    samples.contains(&name),
                    "{} mentions {name}, which /metrics does not export",
                    file.display()
                );
                mentioned += 1;
            }
        }
    }
    assert!(mentioned > 20, "only {mentioned} mentions found");
}
