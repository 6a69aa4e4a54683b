//! HTTP errors of the worker's endpoints.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why a request failed. 4xx are the caller's fault and are not logged; a 5xx is logged once
/// and its details never reach the body.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("missing or invalid X-Hub-Signature-256")]
    BadSignature,
    #[error("malformed webhook body: {0}")]
    Malformed(String),
    #[error("verification failed")]
    VerifyFailed,
    #[error(transparent)]
    Queue(#[from] queue::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Applying a batch of writes failed (the cause is logged by the writer).
    #[error("batched write failed: {0}")]
    Batch(String),
    /// Too many verified deliveries for numbers without an account are kept already: Meta
    /// delivers this one again later.
    #[error("too many webhooks for unknown phone number ids are kept; try again later")]
    UnroutedFull,
    /// The database did not answer in time (down, failing over): the sender should retry.
    #[error("the database did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadSignature => StatusCode::UNAUTHORIZED,
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::VerifyFailed => StatusCode::FORBIDDEN,
            Self::Queue(_) | Self::Db(_) | Self::Batch(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout(_) | Self::UnroutedFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %queue::rescuer::error_chain(&self), "request failed");
            return (status, "internal error").into_response();
        }
        (status, self.to_string()).into_response()
    }
}
