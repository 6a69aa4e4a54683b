//! Bearer tokens of team members.
//!
//! One token per member of the pool's `team`, read from the inbox Secret (mounted as files, one
//! per key, named by the member's `tokenKey`). Tokens are kept as SHA-256 digests and a
//! presented token is hashed and compared with every digest in constant time, so neither the
//! comparison nor the position of the match says anything about the bytes of a token. A token
//! only counts while its member is listed in the AgentPool: removing someone from `team` locks
//! them out even if the Secret still has their key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crds::agent_pool::TeamMember;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shorter tokens are refused when loading: they could be guessed.
pub const MIN_TOKEN_LEN: usize = crds::agent_pool::INBOX_MIN_TOKEN_LEN;
/// How often a mounted tokens directory is read again (kubelet updates Secret volumes in place).
const RELOAD_EVERY: Duration = Duration::from_secs(15);

/// An authenticated team member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub name: Option<String>,
}

struct Entry {
    member: Member,
    digest: [u8; 32],
}

/// The tokens of one pool's team.
#[derive(Default)]
pub struct TeamTokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for TeamTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamTokens")
            .field("members", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TeamTokens {
    /// Tokens from `(token key, token)` pairs. Returns the problems a person should fix: members
    /// without a token, tokens too short to be safe.
    pub fn from_pairs(
        team: &[TeamMember],
        tokens: impl IntoIterator<Item = (String, String)>,
    ) -> (Self, Vec<String>) {
        let tokens: std::collections::BTreeMap<String, String> = tokens
            .into_iter()
            .map(|(k, v)| (k, v.trim().to_string()))
            .collect();
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        for m in team {
            let key = m.effective_token_key();
            match tokens.get(&key) {
                None => problems.push(format!(
                    "team member {} has no token (key {key:?}) in the inbox Secret and cannot log in",
                    m.id
                )),
                Some(t) if t.chars().count() < MIN_TOKEN_LEN => problems.push(format!(
                    "the token of team member {} (key {key:?}) is shorter than {MIN_TOKEN_LEN} characters and is ignored",
                    m.id
                )),
                Some(t) => entries.push(Entry {
                    member: Member {
                        id: m.id.clone(),
                        name: m.name.clone(),
                    },
                    digest: digest(t),
                }),
            }
        }
        (Self { entries }, problems)
    }

    /// Tokens from a directory with one file per key (a mounted Secret). Dotfiles are the
    /// kubelet's bookkeeping and are skipped.
    pub fn from_dir(team: &[TeamMember], dir: &Path) -> std::io::Result<(Self, Vec<String>)> {
        let mut pairs = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let bytes = std::fs::read(entry.path())?;
            if let Ok(text) = String::from_utf8(bytes) {
                pairs.push((name, text));
            }
        }
        Ok(Self::from_pairs(team, pairs))
    }

    /// The member a presented token belongs to.
    pub fn verify(&self, token: &str) -> Option<&Member> {
        let presented = digest(token);
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&presented)) {
                found = Some(&e.member);
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Tokens shared by the request handlers, replaced whole on reload.
#[derive(Clone, Default)]
pub struct SharedTokens(Arc<RwLock<Arc<TeamTokens>>>);

impl SharedTokens {
    pub fn new(tokens: TeamTokens) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(tokens))))
    }

    pub fn current(&self) -> Arc<TeamTokens> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, tokens: TeamTokens) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
    }

    /// Load tokens from a mounted Secret and keep reading it, so a rotated token takes effect
    /// without a restart. Problems are logged when they change.
    pub fn watch_dir(team: Vec<TeamMember>, dir: PathBuf) -> Self {
        let shared = Self::default();
        let load = {
            let shared = shared.clone();
            let mut last_problems: Option<Vec<String>> = None;
            move || match TeamTokens::from_dir(&team, &dir) {
                Ok((tokens, problems)) => {
                    if last_problems.as_ref() != Some(&problems) {
                        for p in &problems {
                            tracing::warn!(dir = %dir.display(), "team inbox: {p}");
                        }
                        tracing::info!(
                            members = team.len(),
                            usable = team.len().saturating_sub(problems.len()),
                            "team inbox tokens loaded"
                        );
                        last_problems = Some(problems);
                    }
                    shared.replace(tokens);
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "team inbox: cannot read the tokens directory; keeping the tokens loaded before");
                }
            }
        };
        let mut load = load;
        load();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                load();
            }
        });
        shared
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, key: Option<&str>) -> TeamMember {
        TeamMember {
            id: id.into(),
            name: None,
            online: true,
            token_key: key.map(str::to_string),
        }
    }

    #[test]
    fn tokens_map_to_listed_members_only() {
        let team = [
            member("alice@example.com", None),
            member("bob", Some("bob-token")),
        ];
        let (tokens, problems) = TeamTokens::from_pairs(
            &team,
            [
                (
                    "alice_example.com".into(),
                    "alice-secret-0123456789\n".into(),
                ),
                ("bob-token".into(), "short".into()),
                ("mallory".into(), "mallory-secret-0123456789".into()),
            ],
        );
        assert_eq!(
            tokens
                .verify("alice-secret-0123456789")
                .map(|m| m.id.as_str()),
            Some("alice@example.com")
        );
        assert!(tokens.verify("short").is_none(), "short tokens are refused");
        assert!(
            tokens.verify("mallory-secret-0123456789").is_none(),
            "a key of nobody in the team grants nothing"
        );
        assert!(tokens.verify("alice-secret-012345678").is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("bob"), "{problems:?}");
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn debug_does_not_show_digests() {
        let (tokens, _) = TeamTokens::from_pairs(
            &[member("a", None)],
            [("a".into(), "a-secret-0123456789abc".into())],
        );
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("digest"), "{shown}");
    }
}
