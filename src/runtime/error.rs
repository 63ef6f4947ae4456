//! Why a pipeline stopped: one variant per class of failure, so the errors
//! metric's `kind` label comes from the variant, never from message text.

use crate::classify::ClassifyError;
use crate::config::Diagnostics;
use crate::publish::PublishError;
use crate::transport::TransportError;

/// Errors that stop a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The pipeline's settings do not fit what it is asked to do (a role
    /// without a transport, a command for another kind of source).
    #[error("{0}")]
    Config(String),
    /// The steward's rules do not fit the columns the source has.
    #[error("{0}")]
    Rules(Diagnostics),
    /// The pseudonym key could not be read, made or kept.
    #[error("pseudonym key: {0}")]
    PseudonymKey(String),
    /// The source failed and retrying did not help.
    #[error("source: {0}")]
    Source(#[from] oppen_connector_api::Error),
    /// Classification refused the data (egress guard).
    #[error("{0}")]
    Classify(#[from] ClassifyError),
    /// Publishing failed and retrying did not help.
    #[error("{0}")]
    Publish(#[from] PublishError),
    /// A store could not be opened or did not answer.
    #[error("{0}")]
    Store(#[from] object_store::Error),
    /// The Kafka transport failed and retrying did not help.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Other publishers kept committing the version first.
    #[error("{dataset}: version {version} kept being committed by another publisher")]
    CommitConflict { dataset: String, version: u64 },
    /// A file oppen keeps for itself in the state location is unreadable.
    #[error("{path} in {location} is unreadable ({reason}); {hint}")]
    StateFile {
        path: String,
        location: String,
        reason: String,
        hint: &'static str,
    },
    /// The machine could not give what the process needs (randomness).
    #[error("{0}")]
    System(String),
}

impl RunError {
    /// The error's kind, as the errors metric labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Config(_) => "config",
            RunError::Rules(_) => "rules",
            RunError::PseudonymKey(_) => "pseudonym_key",
            RunError::Source(_) => "source",
            RunError::Classify(_) => "classify",
            RunError::Publish(_) => "publish",
            RunError::Store(_) => "store",
            RunError::Transport(_) => "transport",
            RunError::CommitConflict { .. } => "conflict",
            RunError::StateFile { .. } => "state",
            RunError::System(_) => "system",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind is a metric label: lowercase words joined by `_`, and no
    /// two variants share one unless they are one class.
    #[test]
    fn kinds_are_labels() {
        let errors = [
            RunError::Config(String::new()),
            RunError::Rules(Diagnostics::default()),
            RunError::PseudonymKey(String::new()),
            RunError::Transport(TransportError::ProducerStopped { topic: "t".into() }),
            RunError::CommitConflict {
                dataset: "d".into(),
                version: 1,
            },
            RunError::StateFile {
                path: "p".into(),
                location: "l".into(),
                reason: "r".into(),
                hint: "h",
            },
            RunError::System(String::new()),
        ];
        let kinds: std::collections::BTreeSet<_> = errors.iter().map(RunError::kind).collect();
        assert_eq!(kinds.len(), errors.len());
        for kind in kinds {
            assert!(
                kind.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{kind}"
            );
        }
    }
}
