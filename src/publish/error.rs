//! Why publishing failed.

use arrow::error::ArrowError;

use super::writer;

/// Errors while publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store failed (retryable where the store says so).
    #[error("store {store}: {source}")]
    Store {
        store: String,
        #[source]
        source: object_store::Error,
    },
    /// Another publisher committed this version first.
    #[error("version {version} of {dataset} was committed by another publisher")]
    Conflict { dataset: String, version: u64 },
    /// Encoding or a kernel failed.
    #[error("{0}")]
    Arrow(#[from] ArrowError),
    /// A file could not be encoded.
    #[error("{0}")]
    Encode(#[from] writer::EncodeError),
    /// A manifest or state file is unreadable.
    #[error("{path}: {message}")]
    Corrupt { path: String, message: String },
    /// The private state for the newest version is missing or made with another key.
    #[error("{0}")]
    State(String),
    /// A part of a first version written while it was staged failed, and its
    /// rows are not in memory to write again: the version must be read from
    /// the source again (the runtime does so after a pause).
    #[error(
        "{dataset}: writing part {part} failed ({reason}); the version is read from the source again"
    )]
    PartLost {
        dataset: String,
        part: String,
        reason: String,
    },
}

impl PublishError {
    /// Whether retrying may help (a lost part: after reading the source again).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PublishError::Store { .. }
                | PublishError::Conflict { .. }
                | PublishError::PartLost { .. }
        )
    }
}
