//! The queue's error type.

/// What went wrong, named by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to Postgres")]
    Connect {
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations")]
    Migrate {
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("{step}")]
    Query {
        step: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("listening for notifications")]
    Listen {
        #[source]
        source: sqlx::Error,
    },
    #[error("phone number {phone_number_id} is in use by account {by}")]
    PhoneNumberInUse { phone_number_id: String, by: String },
    #[error("test Postgres: {0}")]
    TestCluster(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach the step name to a sqlx error.
pub(crate) trait StepExt<T> {
    fn step(self, step: &'static str) -> Result<T>;
}

impl<T> StepExt<T> for std::result::Result<T, sqlx::Error> {
    fn step(self, step: &'static str) -> Result<T> {
        self.map_err(|source| Error::Query { step, source })
    }
}
