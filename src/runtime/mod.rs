//! The runtime: the role loops that run a pipeline, and what they share.
//!
//! ```text
//!   run ─► role ─┬─ embedded   source → capture → publisher, in one task
//!                ├─ connector  source → capture → Kafka topic
//!                └─ publisher  Kafka topic → publisher
//!
//!   each role: open (stores, key, publisher) → source (start, next, back off)
//!              → capture (classify) → commit (the one commit loop) → ack
//! ```
//!
//! Every role acknowledges a source position only after the version holding
//! it is committed (DESIGN.md, "Guarantees"), and every role commits through
//! [`commit::commit`], which retries and settles conflicts the same way.

mod capture;
mod commit;
mod connector;
mod embedded;
mod error;
mod open;
mod publisher;
mod source;

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Pipeline, SourceConfig, TransportConfig};
use crate::ops::telemetry::{PipelineTelemetry, Telemetry};
use crate::publish;

pub use self::connector::CHECKPOINT_FILE;
pub use self::error::RunError;
pub use self::open::{
    GENERATED_KEY_FILE, dataset_meta, digest_file, open, pseudonym_key, public_url, published_key,
    settings,
};
pub use self::source::{PipelineSource, files_source, source};

/// Which part of a pipeline a process runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Source, classifier and publisher in one process (the embedded mode).
    #[default]
    All,
    /// Capture and classify, then produce to the pipeline's transport topic.
    Connector,
    /// Consume the transport topic and commit versions.
    Publisher,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::All => "all",
            Role::Connector => "connector",
            Role::Publisher => "publisher",
        })
    }
}

/// How a pipeline runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Process what is there, commit, and return.
    pub once: bool,
    /// Show a progress bar (only drawn on a terminal).
    pub progress: bool,
    /// How long export files must be unchanged before they are read; `None`
    /// keeps the pipeline's setting (and `once` reads at once).
    pub settle: Option<Duration>,
    /// Ignore the committed source position and start from a fresh snapshot
    /// (the recovery after a PostgreSQL replication slot was lost).
    pub resnapshot: bool,
    /// Where the pipeline reports metrics and health.
    pub telemetry: Telemetry,
    /// Which part of the pipeline runs here.
    pub role: Role,
    /// The replication slots several pipelines of this run name: they read
    /// each through one stream.
    pub shared_slots: oppen_connector_postgres::shared::SharedSlots,
}

/// What a run did, for the caller and for tests.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Versions committed.
    pub versions: Vec<publish::Committed>,
    /// Rows read from the source.
    pub rows_read: u64,
    /// Inputs set aside by the source.
    pub rejected: u64,
    /// Rows suppressed, per row rule.
    pub suppressed: Vec<u64>,
    /// Values changed by redact.
    pub values_redacted: u64,
    /// Source columns dropped because no rule names them.
    pub unclassified: Vec<String>,
}

/// Runs one pipeline until the source is done (`once`) or `stop` turns true.
pub async fn run(
    pipeline: &Pipeline,
    options: &RunOptions,
    stop: watch::Receiver<bool>,
) -> Result<RunSummary, RunError> {
    use tracing::Instrument as _;
    let kind = match &pipeline.spec.source.value {
        SourceConfig::Files(_) => "files",
        SourceConfig::Postgres(_) => "postgres",
        SourceConfig::Debezium(_) => "debezium",
    };
    let mut tel = options
        .telemetry
        .pipeline(pipeline.id(), kind, &pipeline.spec.health);
    let span = tracing::info_span!("pipeline", dataset = pipeline.id(), role = %options.role);
    let result = run_role(pipeline, options, stop, &mut tel)
        .instrument(span)
        .await;
    if let Err(e) = &result {
        tel.error(e.kind());
    }
    tel.stopped(result.as_ref().err().map(ToString::to_string));
    result
}

/// Runs the part of the pipeline `options.role` names.
async fn run_role(
    pipeline: &Pipeline,
    options: &RunOptions,
    stop: watch::Receiver<bool>,
    tel: &mut PipelineTelemetry,
) -> Result<RunSummary, RunError> {
    let kafka = pipeline.spec.transport.as_ref().map(|t| match &t.value {
        TransportConfig::Kafka(kafka) => kafka,
    });
    match (options.role, kafka) {
        (Role::All, _) => embedded::run(pipeline, options, stop, tel).await,
        (Role::Connector, Some(kafka)) => connector::run(pipeline, kafka, options, stop, tel).await,
        (Role::Publisher, Some(kafka)) => publisher::run(pipeline, kafka, options, stop, tel).await,
        (role, None) => Err(RunError::Config(format!(
            "{}: --role {role} needs a transport; add `transport: {{ kafka: {{ brokers: HOST:PORT }} }}` \
             to the pipeline, or run with --role all",
            pipeline.file.display()
        ))),
    }
}
