//! Which Cloud API numbers an ingress accepts webhooks for, and under which app secret.
//!
//! Meta sends every webhook of an app to one callback URL, so one ingress serves every number
//! of a namespace. The table is swapped whole when accounts or their Secrets change; a request
//! reads one consistent snapshot.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::ingest::IngestTarget;

/// One Cloud API number.
#[derive(Debug)]
pub struct Route {
    pub phone_number_id: String,
    /// The app secret of the Meta app the number belongs to (numbers of one app share it).
    pub app_secret: Arc<str>,
    pub verify_token: Arc<str>,
    pub target: Arc<IngestTarget>,
    /// The WhatsApp Business Account (`wabaId`), when the spec names it: its template status
    /// webhooks are accepted under this number's app secret.
    pub waba_id: Option<Arc<str>>,
}

/// A snapshot of the routes.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_phone: HashMap<String, Arc<Route>>,
    /// Distinct app secrets: a delivery is verified against each (a namespace has few apps).
    secrets: Vec<Arc<str>>,
    verify_tokens: Vec<Arc<str>>,
}

impl RouteTable {
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Self {
        let mut t = Self::default();
        for r in routes {
            if !t.secrets.contains(&r.app_secret) {
                t.secrets.push(r.app_secret.clone());
            }
            if !t.verify_tokens.contains(&r.verify_token) {
                t.verify_tokens.push(r.verify_token.clone());
            }
            t.by_phone.insert(r.phone_number_id.clone(), Arc::new(r));
        }
        t
    }

    pub fn get(&self, phone_number_id: &str) -> Option<&Arc<Route>> {
        self.by_phone.get(phone_number_id)
    }

    /// The app secret `body` was signed with, if it is one of ours.
    pub fn signer(&self, body: &[u8], header: Option<&str>) -> Option<&Arc<str>> {
        self.secrets
            .iter()
            .find(|secret| super::signature::verify(secret, body, header))
    }

    /// Whether a number of WABA `waba_id` belongs to the app that signed with `signer`: its
    /// template status webhooks are then ours to apply.
    pub fn knows_waba(&self, waba_id: &str, signer: &Arc<str>) -> bool {
        self.by_phone
            .values()
            .any(|r| r.waba_id.as_deref() == Some(waba_id) && r.app_secret == *signer)
    }

    /// Whether `token` is one of the numbers' verify tokens (compared in constant time).
    pub fn verify_token_matches(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.verify_tokens.iter().fold(false, |found, t| {
            found | bool::from(token.as_bytes().ct_eq(t.as_bytes()))
        })
    }

    pub fn phone_number_ids(&self) -> impl Iterator<Item = &str> {
        self.by_phone.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_phone.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_phone.is_empty()
    }
}

/// The live table, shared by the webhook handlers and whoever learns the accounts.
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<Arc<RouteTable>>>);

impl Routes {
    pub fn new(table: RouteTable) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(table))))
    }

    pub fn current(&self) -> Arc<RouteTable> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swap in a new table; returns the phone number ids that are new in it (their kept
    /// webhooks are to be replayed).
    pub fn replace(&self, table: RouteTable) -> Vec<String> {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        let added = table
            .phone_number_ids()
            .filter(|p| current.get(p).is_none())
            .map(str::to_string)
            .collect();
        *current = Arc::new(table);
        added
    }
}
