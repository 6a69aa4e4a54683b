//! What every reconcile gets.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::events::{Recorder, Reporter};
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::pool::scaling::Recommendation;

/// Operator settings that shape the objects it creates.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of gateways and core workers unless a resource overrides it.
    pub worker_image: String,
    /// Postgres URL handed to workers (through a Secret per resource).
    pub database_url: String,
    /// How often a pool's queue is looked at (seconds).
    pub pool_resync_seconds: u64,
    /// How often an account's Lease is looked at for status (seconds).
    pub account_resync_seconds: u64,
}

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub db: Option<PgPool>,
    pub settings: Settings,
    pub metrics: Metrics,
    /// Recent replica recommendations per pool, for scale-down stabilization.
    pub recommendations: Mutex<HashMap<String, Vec<Recommendation>>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        db: Option<PgPool>,
        settings: Settings,
        metrics: Metrics,
        identity: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::MANAGER.into(),
            instance: Some(identity.to_string()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            db,
            settings,
            metrics,
            recommendations: Mutex::default(),
        }
    }
}
