//! The operator's errors, named by the step that failed.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {kind} {name}")]
    Get {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status of {name}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading queue stats")]
    Queue(#[from] queue::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("serializing {0}")]
    Serialize(&'static str, #[source] serde_json::Error),
}

impl Error {
    /// Label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "apply",
            Self::Get { .. } => "get",
            Self::Delete { .. } => "delete",
            Self::Status { .. } => "status",
            Self::Queue(_) => "queue",
            Self::MissingField(_) => "missing_field",
            Self::Serialize(..) => "serialize",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
