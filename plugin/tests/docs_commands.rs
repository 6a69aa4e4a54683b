//! Every `kubectl whatsapp ...` command that README.md and docs/ show exists with that spelling:
//! its `--help` answers. A renamed subcommand fails here, not in a reader's terminal.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// `kubectl whatsapp <words>` as written in the docs: the subcommand words, up to the first
/// argument (a name, a flag, a placeholder).
fn documented_commands() -> BTreeSet<Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs") {
        files.push(entry.expect("entry").path());
    }
    let mut out = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (at, _) in text.match_indices("kubectl whatsapp ") {
            let words: Vec<String> = text[at + "kubectl whatsapp ".len()..]
                .split_whitespace()
                .take(2)
                .take_while(|w| {
                    w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
                })
                .map(str::to_string)
                .collect();
            if !words.is_empty() {
                out.insert(words);
            }
        }
    }
    out
}

#[test]
fn every_documented_plugin_command_exists() {
    let commands = documented_commands();
    assert!(commands.len() >= 5, "only {commands:?} found");
    for words in commands {
        let full = Command::new(env!("CARGO_BIN_EXE_kubectl-whatsapp"))
            .args(&words)
            .arg("--help")
            .output()
            .expect("run kubectl-whatsapp");
        let first = Command::new(env!("CARGO_BIN_EXE_kubectl-whatsapp"))
            .arg(&words[0])
            .arg("--help")
            .output()
            .expect("run kubectl-whatsapp");
        assert!(
            first.status.success(),
            "the docs show `kubectl whatsapp {}`, which does not exist:\n{}",
            words[0],
            String::from_utf8_lossy(&first.stderr)
        );
        // A command with subcommands (`jobs`): the second word must be one of them. Otherwise
        // the second word is an argument (`status support-line`).
        let help = String::from_utf8_lossy(&first.stdout);
        if words.len() == 2 && help.contains("Commands:") {
            assert!(
                full.status.success(),
                "the docs show `kubectl whatsapp {}`, which does not exist:\n{}",
                words.join(" "),
                String::from_utf8_lossy(&full.stderr)
            );
        }
    }
}
