//! Reading a `/metrics` scrape and the metrics table of docs/runbook.md, for the tests that
//! check one against the other (a live scrape of every role).

use std::collections::BTreeSet;
use std::path::Path;

/// A row of the table. Counters are named with `_total` in the docs and scraped as such; the
/// family name is without it.
pub struct Documented {
    pub sample: String,
    pub kind: String,
    pub labels: BTreeSet<String>,
    /// The "Set by" cell's entries as written: `fleet`, `fleet (WhatsApp Web)`.
    pub set_by: Vec<String>,
}

impl Documented {
    /// The family name as `# TYPE` has it (counters without `_total`).
    pub fn family(&self) -> &str {
        self.sample.strip_suffix("_total").unwrap_or(&self.sample)
    }

    /// Whether the docs say `role` sets it, not counting entries qualified by one of `unless`
    /// (`"(WhatsApp Web)"`: only a fleet with WhatsApp Web numbers).
    pub fn set_by(&self, role: &str, unless: &[&str]) -> bool {
        self.set_by.iter().any(|entry| {
            entry.split_whitespace().next() == Some(role)
                && !unless.iter().any(|q| entry.ends_with(q))
        })
    }

    /// The roles the "Set by" cell names (`core (team inbox)` is `core`).
    pub fn roles(&self) -> BTreeSet<&str> {
        self.set_by
            .iter()
            .filter_map(|entry| entry.split_whitespace().next())
            .collect()
    }
}

/// The rows of docs/runbook.md's metrics table whose name starts with `prefix`, from the
/// repository at `root`.
pub fn documented(root: &Path, prefix: &str) -> Vec<Documented> {
    let path = root.join("docs/runbook.md");
    let text = std::fs::read_to_string(path).expect("runbook");
    let table = text
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Metrics section");
    let ticked = |cell: &str| -> BTreeSet<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    table
        .lines()
        .filter(|l| l.starts_with(&format!("| `{prefix}")))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            Documented {
                sample: ticked(cells[1]).into_iter().next().expect("name"),
                kind: cells[2].to_string(),
                labels: ticked(cells[3]),
                set_by: cells[4]
                    .split(',')
                    .map(|entry| entry.trim().to_string())
                    .collect(),
            }
        })
        .collect()
}

/// One scraped sample: its series name, label names and value.
pub struct Sample {
    pub name: String,
    pub labels: BTreeSet<String>,
    pub value: f64,
}

/// The `# TYPE` family names and the samples of an exposition text.
pub fn parse(text: &str) -> (BTreeSet<String>, Vec<Sample>) {
    let mut families = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.extend(rest.split_whitespace().next().map(str::to_string));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.trim_end_matches('}')
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
                    .filter(|k| k != "le")
                    .collect(),
            ),
            None => (series, BTreeSet::new()),
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().unwrap_or(f64::NAN),
        });
    }
    (families, samples)
}

/// The sum of a scraped series' values (all label sets).
pub fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}
