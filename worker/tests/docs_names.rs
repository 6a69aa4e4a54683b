//! The worker's names in README.md and docs/ exist with that spelling: every `whatsapp-worker
//! <role>` answers `--help`, every environment variable named there is read by the code, the
//! chart or a script (or set in the same doc's own commands), and every backticked CamelCase name
//! (a condition type or reason, an Event, a type) appears in the code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn docs() -> Vec<(PathBuf, String)> {
    let mut files = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).expect("docs") {
        files.push(entry.expect("entry").path());
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            (f, text)
        })
        .collect()
}

/// Every file under `dir` (recursively) whose name ends with one of `endings`.
fn sources(dir: &Path, endings: &[&str], out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') || name == ".ci" {
                sources(&path, endings, out);
            }
        } else if endings.iter().any(|e| name.ends_with(e))
            || path.starts_with(root().join("scripts"))
            || path.starts_with(root().join(".ci"))
        {
            out.push(std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
}

#[test]
fn every_documented_worker_role_exists() {
    let mut roles = BTreeSet::new();
    for (_, text) in docs() {
        for (at, _) in text.match_indices("whatsapp-worker ") {
            let word: String = text[at + "whatsapp-worker ".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            if !word.is_empty() {
                roles.insert(word);
            }
        }
    }
    assert!(roles.len() >= 3, "only {roles:?} found");
    for role in roles {
        let out = Command::new(env!("CARGO_BIN_EXE_whatsapp-worker"))
            .args([role.as_str(), "--help"])
            .output()
            .expect("run whatsapp-worker");
        assert!(
            out.status.success(),
            "the docs show `whatsapp-worker {role}`, which does not exist:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_documented_environment_variable_is_read_somewhere() {
    let mut code = Vec::new();
    sources(
        &root(),
        &[".rs", ".yaml", ".tpl", ".sh", ".toml"],
        &mut code,
    );
    let code = code.join("\n");
    let mut checked = 0;
    for (file, text) in docs() {
        // Words of capitals, digits and underscores with an underscore in them: `WA_POOL`.
        let names: BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| {
                w.len() > 3
                    && w.contains('_')
                    && w.starts_with(|c: char| c.is_ascii_uppercase())
                    && w.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        for name in names {
            let set_in_doc = text.contains(&format!("{name}="));
            assert!(
                set_in_doc || code.contains(name),
                "{} names {name}, which nothing reads",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} names checked");
}

#[test]
fn every_documented_condition_reason_event_and_type_exists() {
    // Production code only: a reason that only a test spells does not reach a user.
    let mut code = Vec::new();
    for dir in [
        "crds/src",
        "operator/src",
        "worker/src",
        "queue/src",
        "lease/src",
        "service/src",
        "tools/src",
        "plugin/src",
        "charts",
    ] {
        sources(&root().join(dir), &[".rs", ".yaml", ".tpl"], &mut code);
    }
    let code = code.join("\n");
    let identifiers: BTreeSet<&str> = code.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    // docs/testing.md is about the tests: their helpers count there.
    let mut all = Vec::new();
    sources(&root(), &[".rs"], &mut all);
    let all = all.join("\n");
    let test_identifiers: BTreeSet<&str> =
        all.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    let mut checked = 0;
    for (file, text) in docs() {
        // Backticked CamelCase words: condition types and reasons, Events, enum values
        // (`PhoneNumberConflict`, `NoHolder`, `OwnerChanged`, `QrCode`).
        let words: BTreeSet<&str> = text
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| {
                w.len() > 3
                    && w.starts_with(|c: char| c.is_ascii_uppercase())
                    && w.chars().all(|c| c.is_ascii_alphanumeric())
                    && w.chars().skip(1).any(|c| c.is_ascii_uppercase())
                    && w.chars().any(|c| c.is_ascii_lowercase())
            })
            .collect();
        // And the reasons of the plugin's condition columns: `Connected=False(NoHolder)`.
        let mut words = words;
        for status in ["=True(", "=False(", "=Unknown("] {
            for (at, _) in text.match_indices(status) {
                let rest = &text[at + status.len()..];
                if let Some(reason) = rest.split(')').next()
                    && reason.chars().all(|c| c.is_ascii_alphanumeric())
                    && !reason.is_empty()
                {
                    words.insert(reason);
                }
            }
        }
        let known = if file.ends_with("testing.md") {
            &test_identifiers
        } else {
            &identifiers
        };
        for word in words {
            assert!(
                known.contains(word),
                "{} names `{word}`, which appears nowhere in the code",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} words checked");
}
