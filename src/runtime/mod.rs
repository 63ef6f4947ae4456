//! Wiring of a pipeline: source → classify → publisher, version cuts, source
//! acknowledgement after commit, retries, and shutdown.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use oppen_connector_api::{Position, Source, SourceEvent, SourceHints};
use oppen_connector_debezium::DebeziumSource;
use oppen_connector_files::FilesSource;
use oppen_connector_postgres::PostgresSource;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::classify::{Classifier, Keyer, PseudonymKey};
use crate::config::pipeline::KeySource;
use crate::config::{Pipeline, SourceConfig};
use crate::ops::telemetry::{PipelineTelemetry, Telemetry};
use crate::publish::catalog::DatasetMeta;
use crate::publish::store::Store;
use crate::publish::{self, Publisher, Settings};

/// The file in the state location that holds a generated pseudonym key.
pub const GENERATED_KEY_FILE: &str = "pseudonym.key";

/// Errors that stop a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The pipeline's configuration does not fit its source.
    #[error("{0}")]
    Config(String),
    /// The source failed and retrying did not help.
    #[error("source: {0}")]
    Source(#[from] oppen_connector_api::Error),
    /// Classification refused the data (egress guard).
    #[error("{0}")]
    Classify(#[from] crate::classify::ClassifyError),
    /// Publishing failed and retrying did not help.
    #[error("{0}")]
    Publish(#[from] publish::PublishError),
    /// A store could not be opened.
    #[error("{0}")]
    Store(#[from] object_store::Error),
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
    pub role: crate::transport::Role,
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

/// Test hook at a named point of a commit. `OPPEN_FAILPOINT=<name>` aborts the
/// process there (the crash tests kill a publisher between two steps of a commit);
/// `OPPEN_FAILPOINT=<name>=sleep:<ms>` pauses it (the race tests let another
/// publisher commit first).
pub fn failpoint(name: &str) {
    static FAILPOINT: OnceLock<Option<String>> = OnceLock::new();
    let Some(spec) = FAILPOINT
        .get_or_init(|| std::env::var("OPPEN_FAILPOINT").ok())
        .as_deref()
    else {
        return;
    };
    let (point, action) = spec.split_once('=').unwrap_or((spec, "abort"));
    if point != name {
        return;
    }
    match action
        .strip_prefix("sleep:")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        Some(ms) => {
            eprintln!("failpoint {name}: sleeping {ms} ms");
            std::thread::sleep(Duration::from_millis(ms));
        }
        None => {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

/// SHA-256 of a file's bytes, hex.
pub fn digest_file(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| hex::encode(Sha256::digest(b)))
        .unwrap_or_default()
}

/// Loads the pseudonym key: from the environment or a file when the pipeline
/// names one, else the key generated once in the state location.
pub async fn pseudonym_key(pipeline: &Pipeline, state: &Store) -> Result<PseudonymKey, RunError> {
    match pipeline.spec.pseudonym_key.as_ref().map(|k| &k.value) {
        Some(KeySource::Env(name)) => {
            let value = std::env::var(name).map_err(|_| {
                RunError::Config(format!(
                    "environment variable {name} (pseudonym_key) is not set"
                ))
            })?;
            PseudonymKey::from_text(&value).map_err(|e| RunError::Config(format!("{name}: {e}")))
        }
        Some(KeySource::File(path)) => {
            let path = pipeline
                .file
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                RunError::Config(format!("pseudonym key file {}: {e}", path.display()))
            })?;
            PseudonymKey::from_text(&text)
                .map_err(|e| RunError::Config(format!("{}: {e}", path.display())))
        }
        None => {
            if let Some(bytes) = state
                .get(GENERATED_KEY_FILE)
                .await
                .map_err(|e| RunError::Config(e.to_string()))?
            {
                return PseudonymKey::from_text(&String::from_utf8_lossy(&bytes))
                    .map_err(RunError::Config);
            }
            let key = PseudonymKey::generate().map_err(RunError::Config)?;
            // Two pipelines sharing a state location may race here: the first wins,
            // the other reads the winner's key.
            match state
                .create(GENERATED_KEY_FILE, key.to_hex().into_bytes().into())
                .await?
            {
                Ok(()) => {
                    tracing::info!(location = %state.location(), "generated a pseudonym key in the state location; back it up with the state");
                    Ok(key)
                }
                Err(_) => {
                    let bytes = state.get(GENERATED_KEY_FILE).await?.unwrap_or_default();
                    PseudonymKey::from_text(&String::from_utf8_lossy(&bytes))
                        .map_err(RunError::Config)
                }
            }
        }
    }
}

/// The publisher settings of a pipeline.
pub fn settings(pipeline: &Pipeline, keyer: &Keyer) -> Settings {
    let publish = &pipeline.spec.publish;
    let partition_by = publish.partition_by.as_ref().map(|p| {
        let column = &p.value.column;
        let published = pipeline
            .rule(column)
            .and_then(|r| r.rename.clone())
            .unwrap_or_else(|| column.clone());
        (published, p.value.by)
    });
    Settings {
        dataset: pipeline.id().to_string(),
        formats: publish.formats.value.clone(),
        partition_by,
        keep_versions: publish.keep_versions.value,
        max_file_rows: publish.max_file_rows.value,
        row_cache_bytes: publish.cache_mb << 20,
        rules_digest: digest_file(&pipeline.rules_file),
        key_fingerprint: keyer.fingerprint(),
        catalog: Some((dataset_meta(pipeline), public_url(pipeline))),
    }
}

/// Where consumers reach the store: `publish.public_url`, else the store itself.
pub fn public_url(pipeline: &Pipeline) -> String {
    match &pipeline.spec.publish.public_url {
        Some(url) => url.value.trim_end_matches('/').to_string(),
        None => pipeline.store.to_string(),
    }
}

/// The catalog description of a pipeline's dataset.
pub fn dataset_meta(pipeline: &Pipeline) -> DatasetMeta {
    let d = &pipeline.spec.dataset;
    let accrual = d.accrual.map(|a| a.eu_code().to_string());
    let access = match d.access.value {
        crate::config::Access::Open => "PUBLIC",
        crate::config::Access::Shared => "RESTRICTED",
        crate::config::Access::Internal => "NON_PUBLIC",
    };
    DatasetMeta {
        id: pipeline.id().to_string(),
        title: d.title.clone(),
        description: d.description.clone(),
        publisher: d.publisher.name.clone(),
        org_nr: d
            .publisher
            .org_nr
            .value
            .chars()
            .filter(char::is_ascii_digit)
            .collect(),
        contact: d.contact.clone(),
        license: d.license.clone(),
        conforms_to: d.conforms_to.clone(),
        accrual,
        access: access.to_string(),
        keywords: d.keywords.clone(),
        themes: d.themes.clone(),
        primary_key: published_key(pipeline, crate::config::source_key(pipeline)),
        issued: None,
        modified: None,
        temporal: None,
        files: Default::default(),
        columns: Vec::new(),
        rows: 0,
    }
}

/// The source key as consumers see it: a primary key only if every key column
/// is published as is (under its published name); else none.
pub fn published_key(pipeline: &Pipeline, key: &[String]) -> Vec<String> {
    key.iter()
        .map(|k| {
            let rule = pipeline.rule(k)?;
            (rule.action == crate::config::Action::Keep)
                .then(|| rule.rename.clone().unwrap_or_else(|| k.clone()))
        })
        .collect::<Option<Vec<String>>>()
        .unwrap_or_default()
}

/// Opens the stores, the pseudonym key and the publisher of a pipeline.
pub async fn open(
    pipeline: &Pipeline,
) -> Result<(Publisher, publish::Recovered, Keyer, PseudonymKey), RunError> {
    let store = pipeline.store.open()?;
    let state = pipeline.state.open()?;
    let key = pseudonym_key(pipeline, &state).await?;
    let keyer = Keyer::new(&key);
    let settings = settings(pipeline, &keyer);
    let (publisher, recovered) = Publisher::open(settings, store, state).await?;
    Ok((publisher, recovered, keyer, key))
}

/// [`open`], and the dataset described to the telemetry (accrual period,
/// newest version).
pub(crate) async fn open_described(
    pipeline: &Pipeline,
    tel: &mut PipelineTelemetry,
) -> Result<(Publisher, publish::Recovered, Keyer, PseudonymKey), RunError> {
    let opened = open(pipeline).await?;
    let recovered = &opened.1;
    tel.describe(
        pipeline
            .spec
            .dataset
            .accrual
            .and_then(|a| a.period_seconds()),
        recovered.created.map(|t| (recovered.version, t)),
    );
    Ok(opened)
}

/// Where the source starts: at `committed`, or with `--resnapshot` afresh.
pub(crate) fn resume_at(options: &RunOptions, committed: Option<Position>) -> Option<Position> {
    if options.resnapshot {
        tracing::warn!("--resnapshot: reading the source from a fresh snapshot");
        return None;
    }
    committed
}

/// Any source a pipeline may have.
#[derive(Debug)]
pub enum PipelineSource {
    Files(Box<FilesSource>),
    Postgres(Box<PostgresSource>),
    Debezium(Box<DebeziumSource>),
}

impl Source for PipelineSource {
    fn key(&self) -> &[String] {
        match self {
            PipelineSource::Files(s) => s.key(),
            PipelineSource::Postgres(s) => s.key(),
            PipelineSource::Debezium(s) => s.key(),
        }
    }

    async fn start(&mut self, resume: Option<Position>) -> oppen_connector_api::Result<()> {
        match self {
            PipelineSource::Files(s) => s.start(resume).await,
            PipelineSource::Postgres(s) => s.start(resume).await,
            PipelineSource::Debezium(s) => s.start(resume).await,
        }
    }

    async fn next(&mut self) -> oppen_connector_api::Result<SourceEvent> {
        match self {
            PipelineSource::Files(s) => s.next().await,
            PipelineSource::Postgres(s) => s.next().await,
            PipelineSource::Debezium(s) => s.next().await,
        }
    }

    async fn ack(&mut self, position: &Position) -> oppen_connector_api::Result<()> {
        match self {
            PipelineSource::Files(s) => s.ack(position).await,
            PipelineSource::Postgres(s) => s.ack(position).await,
            PipelineSource::Debezium(s) => s.ack(position).await,
        }
    }

    fn schema(&self) -> Option<arrow::datatypes::SchemaRef> {
        match self {
            PipelineSource::Files(s) => s.schema(),
            PipelineSource::Postgres(s) => s.schema(),
            PipelineSource::Debezium(s) => s.schema(),
        }
    }

    fn idle_pause(&self) -> Duration {
        match self {
            PipelineSource::Files(s) => s.idle_pause(),
            PipelineSource::Postgres(s) => s.idle_pause(),
            PipelineSource::Debezium(s) => s.idle_pause(),
        }
    }

    fn health(&self) -> oppen_connector_api::SourceHealth {
        match self {
            PipelineSource::Files(s) => s.health(),
            PipelineSource::Postgres(s) => s.health(),
            PipelineSource::Debezium(s) => s.health(),
        }
    }
}

/// The source of a pipeline, before start. Export files are read without
/// waiting for them to settle in a `--once` run or with `--settle 0`; in a
/// `--once` run a database's or topic's backlog is read to its end before
/// the source reports idle.
pub fn source(
    pipeline: &Pipeline,
    known: BTreeMap<String, oppen_connector_api::ColumnType>,
    options: &RunOptions,
) -> Result<PipelineSource, RunError> {
    let settle_now = options.once || options.settle.is_some_and(|d| d.is_zero());
    Ok(match &pipeline.spec.source.value {
        SourceConfig::Files(_) => {
            PipelineSource::Files(Box::new(files_source(pipeline, known, settle_now)?))
        }
        SourceConfig::Postgres(config) => {
            let source =
                PostgresSource::new(config.clone())?.sharing(options.shared_slots.hub(config));
            PipelineSource::Postgres(Box::new(if options.once {
                source.reading_to_the_end()
            } else {
                source
            }))
        }
        SourceConfig::Debezium(config) => {
            let source = DebeziumSource::new(config.clone());
            PipelineSource::Debezium(Box::new(if options.once {
                source.reading_to_the_end()
            } else {
                source
            }))
        }
    })
}

/// The export-drop source of a pipeline, before start.
pub fn files_source(
    pipeline: &Pipeline,
    known: BTreeMap<String, oppen_connector_api::ColumnType>,
    settle_now: bool,
) -> Result<FilesSource, RunError> {
    let SourceConfig::Files(config) = &pipeline.spec.source.value else {
        return Err(RunError::Config(format!(
            "{}: this command reads export files; the pipeline's source is not a folder",
            pipeline.file.display()
        )));
    };
    let hints = SourceHints {
        column_types: pipeline.column_types(),
        known_types: known,
    };
    let source = FilesSource::new(config.clone(), hints)?;
    Ok(if settle_now {
        source.without_settling()
    } else {
        source
    })
}

pub(crate) fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(8)
        .with_jitter()
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

impl RunError {
    /// The error's kind, as the errors metric labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Config(_) => "config",
            RunError::Source(_) => "source",
            RunError::Classify(_) => "classify",
            RunError::Publish(_) | RunError::Store(_) => "publish",
        }
    }
}

/// Runs the part of the pipeline `options.role` names.
async fn run_role(
    pipeline: &Pipeline,
    options: &RunOptions,
    stop: watch::Receiver<bool>,
    tel: &mut PipelineTelemetry,
) -> Result<RunSummary, RunError> {
    use crate::transport::{Role, TransportConfig, connector, publisher};
    let kafka = pipeline.spec.transport.as_ref().map(|t| match &t.value {
        TransportConfig::Kafka(kafka) => kafka,
    });
    match (options.role, kafka) {
        (Role::All, _) => run_pipeline(pipeline, options, stop, tel).await,
        (Role::Connector, Some(kafka)) => connector::run(pipeline, kafka, options, stop, tel).await,
        (Role::Publisher, Some(kafka)) => publisher::run(pipeline, kafka, options, stop, tel).await,
        (role, None) => Err(RunError::Config(format!(
            "{}: --role {role} needs a transport; add `transport: {{ kafka: {{ brokers: HOST:PORT }} }}` \
             to the pipeline, or run with --role all",
            pipeline.file.display()
        ))),
    }
}

async fn run_pipeline(
    pipeline: &Pipeline,
    options: &RunOptions,
    mut stop: watch::Receiver<bool>,
    tel: &mut PipelineTelemetry,
) -> Result<RunSummary, RunError> {
    let dataset = pipeline.id().to_string();
    let (mut publisher, recovered, _keyer, key) = open_described(pipeline, tel).await?;
    // The first version is encoded while the source is still read.
    publisher.stream_images(true);
    if recovered.version > 0 {
        tracing::info!(dataset, version = recovered.version, rows = recovered.rows, position = ?recovered.position.as_ref().map(ToString::to_string), "resuming from committed version");
    }
    let mut source = source(pipeline, recovered.source_types.clone(), options)?;
    let resume = resume_at(options, recovered.position.clone());
    start_source(&mut source, resume, tel, &mut stop).await?;
    let progress = progress_bar(options.progress, &dataset);
    let mut capture = Capture::new(pipeline, key);
    let interval = Duration::from_secs_f64(pipeline.spec.publish.interval_seconds);
    let max_changes = pipeline.spec.publish.max_changes;
    let mut first_pending: Option<Instant> = None;
    // How long the newest commit took. Under a sustained stream versions are cut
    // no more often than every two commit durations, so writing versions takes at
    // most about a third of the time and a backlog is caught up (`interval` still
    // bounds the wait whenever commits are quick).
    let mut last_commit = Duration::ZERO;
    loop {
        if *stop.borrow() {
            break;
        }
        let (event, behind) = next_event(&mut source, tel).await?;
        match event {
            SourceEvent::Batch(batch) => {
                if capture.schema_changes(&batch)
                    && capture.compiled()
                    && publisher.holds_whole_changes()
                {
                    // One source schema per version: a column dropped at the source
                    // must not keep its old values because it came back (or changed
                    // type) before the version was cut.
                    commit(&mut publisher, &mut source, &mut capture.summary, tel).await?;
                    first_pending = None;
                }
                let (pieces, info) = capture.classify(&batch, &source, tel)?;
                if let Some(info) = info {
                    publisher.set_source_info(info.types, info.unclassified);
                    if let Some(key) = info.primary_key {
                        publisher.set_primary_key(key);
                    }
                }
                // The pieces of one batch are staged as the batches of one
                // transaction: only the last may end it.
                let last = pieces.len().saturating_sub(1);
                for (i, classified) in pieces.into_iter().enumerate() {
                    publisher.stage(
                        classified,
                        batch.kind,
                        batch.end_of_transaction && i == last,
                        batch.position.clone(),
                        batch.commit_time,
                    )?;
                }
                if batch.kind == oppen_connector_api::BatchKind::Snapshot
                    && let Some(rows) = source.health().image_rows
                {
                    publisher.expect_image_rows(rows as usize);
                }
                publisher.settle().await;
                first_pending.get_or_insert_with(Instant::now);
                if let Some(p) = &progress {
                    p.inc(batch.data.num_rows() as u64);
                }
                let due = publisher.snapshot_complete()
                    || publisher.pending_rows() >= max_changes
                    || first_pending.is_some_and(|t| t.elapsed() >= interval.max(last_commit * 2));
                if due && publisher.at_boundary() {
                    let started = Instant::now();
                    commit(&mut publisher, &mut source, &mut capture.summary, tel).await?;
                    last_commit = started.elapsed();
                    first_pending = None;
                }
            }
            SourceEvent::Rejected(rejection) => capture.rejected(&rejection, tel),
            SourceEvent::Idle => {
                tel.lag(behind.unwrap_or(0.0));
                if publisher.holds_whole_changes() {
                    commit(&mut publisher, &mut source, &mut capture.summary, tel).await?;
                    first_pending = None;
                }
                if options.once {
                    break;
                }
                let pause = source.idle_pause();
                if !pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }
    // Shutdown (or the end of a --once run): commit what is held, if whole.
    if publisher.holds_whole_changes() {
        commit(&mut publisher, &mut source, &mut capture.summary, tel).await?;
    }
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    Ok(capture.summary)
}

/// Starts the source at `resume`. A database that is not up yet is waited
/// for (backoff with jitter), unless the run is stopped.
pub(crate) async fn start_source(
    source: &mut PipelineSource,
    resume: Option<Position>,
    tel: &mut PipelineTelemetry,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let mut delays = retry_policy().build();
    while let Err(e) = source.start(resume.clone()).await {
        back_off(
            e,
            &mut delays,
            ("source did not start", "source_start"),
            tel,
            Some(stop),
        )
        .await?;
    }
    tel.started();
    Ok(())
}

/// The source's next event, retried with backoff while the error is
/// transient; records the source's health, and a batch's capture and lag.
/// Returns how long the source has known of changes it has not delivered.
pub(crate) async fn next_event(
    source: &mut PipelineSource,
    tel: &mut PipelineTelemetry,
) -> Result<(SourceEvent, Option<f64>), RunError> {
    let mut delays = retry_policy().build();
    let event = loop {
        match source.next().await {
            Ok(event) => break event,
            Err(e) => back_off(e, &mut delays, ("source failed", "source"), tel, None).await?,
        }
    };
    tel.turned("reading the source");
    let health = source.health();
    let behind = health.behind_since.map(|t| t.elapsed().as_secs_f64());
    tel.source_health(health);
    if let SourceEvent::Batch(batch) = &event {
        tel.captured(&batch.ops, batch.commit_time);
        if let Some(t) = batch.commit_time {
            let lag = (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0;
            tel.lag(lag.max(behind.unwrap_or(0.0)));
        }
    }
    Ok((event, behind))
}

/// What the classifier reports when the source's schema changed: the
/// source's column types, the columns no rule names, and the key to describe
/// when the source found it itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceInfo {
    /// The source's column types.
    pub types: BTreeMap<String, oppen_connector_api::ColumnType>,
    /// Source columns no rule classifies (dropped).
    pub unclassified: Vec<String>,
    /// The published primary key, when the source found its key itself (a
    /// table's primary key, a Debezium record key).
    pub primary_key: Option<Vec<String>>,
}

/// The capture half of a pipeline: classifies source batches by the rules,
/// compiling the classifier again whenever the source's schema changes, and
/// keeps the run's counts. Shared by the embedded engine and the connector role.
pub(crate) struct Capture<'a> {
    pipeline: &'a Pipeline,
    key: PseudonymKey,
    classifier: Option<Classifier>,
    pub summary: RunSummary,
}

impl<'a> Capture<'a> {
    pub fn new(pipeline: &'a Pipeline, key: PseudonymKey) -> Self {
        Capture {
            pipeline,
            key,
            classifier: None,
            summary: RunSummary {
                suppressed: vec![0; pipeline.rules.rows.len()],
                ..RunSummary::default()
            },
        }
    }

    /// Whether a classifier has been compiled.
    pub fn compiled(&self) -> bool {
        self.classifier.is_some()
    }

    /// Whether `batch` comes with another schema than the classifier's.
    pub fn schema_changes(&self, batch: &oppen_connector_api::ChangeBatch) -> bool {
        self.classifier
            .as_ref()
            .is_none_or(|c| c.source_schema() != &batch.data.schema())
    }

    /// Classifies a batch, in the pieces it was split into for the cores
    /// (see [`Classifier::classify_pieces`]); with the source's description
    /// when the schema changed.
    pub fn classify(
        &mut self,
        batch: &oppen_connector_api::ChangeBatch,
        source: &PipelineSource,
        tel: &mut PipelineTelemetry,
    ) -> Result<(Vec<crate::classify::Classified>, Option<SourceInfo>), RunError> {
        let pipeline = self.pipeline;
        let dataset = pipeline.id();
        let mut info = None;
        if self.schema_changes(batch) {
            let schema = batch.data.schema();
            let compiled = Classifier::compile_keyed(
                pipeline,
                schema.clone(),
                &self.key,
                source.key(),
                matches!(source, PipelineSource::Files(_)),
            )
            .map_err(|d| RunError::Config(format!("{d}")))?;
            for column in &compiled.unclassified {
                tracing::warn!(
                    dataset,
                    column,
                    "column has no rule and is not published (unclassified: drop)"
                );
            }
            // The source's types and the unclassified columns change only
            // with its schema: reported here, not for every batch.
            self.summary.unclassified.clone_from(&compiled.unclassified);
            tel.unclassified(compiled.unclassified.len());
            info = Some(SourceInfo {
                types: oppen_connector_api::known_types(&schema),
                unclassified: compiled.unclassified.clone(),
                primary_key: crate::config::source_key(pipeline)
                    .is_empty()
                    .then(|| published_key(pipeline, source.key())),
            });
            self.classifier = Some(compiled);
        }
        let Some(c) = self.classifier.as_ref() else {
            return Err(RunError::Config("no classifier".into()));
        };
        let started = Instant::now();
        let pieces = tokio::task::block_in_place(|| c.classify_pieces(batch))?;
        tracing::trace!(
            dataset,
            rows = batch.num_rows(),
            us = started.elapsed().as_micros() as u64,
            "classified batch"
        );
        self.summary.rows_read += batch.num_rows() as u64;
        for classified in &pieces {
            let suppressed = classified.suppressed_counts(pipeline.rules.rows.len());
            tel.classified(&suppressed, classified.values_redacted);
            for (total, n) in self.summary.suppressed.iter_mut().zip(suppressed) {
                *total += n;
            }
            self.summary.values_redacted += classified.values_redacted;
        }
        Ok((pieces, info))
    }

    /// Counts and logs an input the source set aside.
    pub fn rejected(
        &mut self,
        rejection: &oppen_connector_api::Rejection,
        tel: &mut PipelineTelemetry,
    ) {
        self.summary.rejected += 1;
        tel.dead_letter();
        tracing::error!(
            dataset = self.pipeline.id(),
            what = rejection.what,
            moved_to = rejection.moved_to.as_deref().unwrap_or("-"),
            reason = rejection.reason,
            "input rejected; the pipeline goes on"
        );
    }
}

/// What to do after a source operation failed with `e`: waits for the next
/// retry (backoff with jitter) and returns, or returns the error when it is
/// not transient or the retries are used up. With `stop`, the wait ends when it
/// turns true, and no retry is made once it is.
pub(crate) async fn back_off(
    e: oppen_connector_api::Error,
    delays: &mut impl Iterator<Item = Duration>,
    (what, edge): (&str, &str),
    tel: &PipelineTelemetry,
    stop: Option<&mut watch::Receiver<bool>>,
) -> Result<(), RunError> {
    if !e.is_retryable() || stop.as_ref().is_some_and(|s| *s.borrow()) {
        return Err(e.into());
    }
    let Some(delay) = delays.next() else {
        return Err(e.into());
    };
    tel.error("source");
    tel.retry(edge);
    tracing::warn!(error = %e, retry_in = ?delay, "{what}; retrying");
    match stop {
        Some(stop) => tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        },
        None => tokio::time::sleep(delay).await,
    }
    Ok(())
}

async fn commit(
    publisher: &mut Publisher,
    source: &mut PipelineSource,
    summary: &mut RunSummary,
    tel: &mut PipelineTelemetry,
) -> Result<(), RunError> {
    use tracing::Instrument as _;
    let span = tracing::info_span!("version", version = publisher.version() + 1);
    commit_version(publisher, source, summary, tel)
        .instrument(span)
        .await
}

async fn commit_version(
    publisher: &mut Publisher,
    source: &mut PipelineSource,
    summary: &mut RunSummary,
    tel: &mut PipelineTelemetry,
) -> Result<(), RunError> {
    tel.turned("committing a version");
    let dataset = tel.dataset().to_string();
    let dataset = dataset.as_str();
    let started = Instant::now();
    let staged_position = publisher.pending_position().cloned();
    let mut delays = retry_policy().build();
    let committed = loop {
        match publisher.commit().await {
            Ok(c) => break c,
            // Another publisher committed this version first: read what it
            // committed, then either our changes are already in it (resume the
            // source after its position) or commit ours on top of it.
            Err(publish::PublishError::Conflict { version, .. }) => {
                tel.error("conflict");
                let Some(delay) = delays.next() else {
                    return Err(RunError::Config(format!(
                        "{dataset}: version {version} kept being committed by another publisher"
                    )));
                };
                // A first version written while it was staged cannot be put on
                // top of another: its changes are read from the source again.
                let streamed = publisher.is_streaming();
                let recovered = publisher.reload().await?;
                let covered = match (&recovered.position, publisher.pending_position()) {
                    (Some(theirs), Some(ours)) => theirs.is_at_or_after(ours),
                    _ => false,
                };
                if covered || streamed {
                    if covered {
                        tracing::info!(
                            dataset,
                            version = recovered.version,
                            "another publisher committed these changes; resuming after its position"
                        );
                    } else {
                        tracing::warn!(
                            dataset,
                            version = recovered.version,
                            "another publisher committed first; reading the source again after its position"
                        );
                    }
                    publisher.discard_pending();
                    tel.discarded();
                    source.start(recovered.position).await?;
                    return Ok(());
                }
                tel.retry("commit");
                tracing::warn!(dataset, version, retry_in = ?delay, "another publisher committed first; committing on top of it");
                tokio::time::sleep(delay).await;
            }
            Err(e) if e.is_retryable() => {
                tel.error("publish");
                let Some(delay) = delays.next() else {
                    return Err(e.into());
                };
                tel.retry("commit");
                tracing::warn!(dataset, error = %e, retry_in = ?delay, "commit failed; retrying");
                tokio::time::sleep(delay).await;
                if matches!(e, publish::PublishError::PartLost { .. }) {
                    // A streamed part's rows are gone: the version is read
                    // from the source again.
                    let recovered = publisher.reload().await?;
                    publisher.discard_pending();
                    tel.discarded();
                    source.start(recovered.position).await?;
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(c) = committed {
        published(tel, &c, started.elapsed());
        if let Some(position) = &c.position {
            source.ack(position).await?;
        }
        summary.versions.push(c);
    } else if let Some(position) = &staged_position
        && publisher.pending_position().is_none()
    {
        // The staged changes alter nothing published (say, only a dropped
        // column changed): the committed version already is their result, so
        // they are acknowledged too. Otherwise a table whose published columns
        // stay still would pin the source (a replication slot keeps its WAL).
        source.ack(position).await?;
    }
    Ok(())
}

/// Records and logs a committed version.
pub(crate) fn published(tel: &mut PipelineTelemetry, c: &publish::Committed, took: Duration) {
    tel.committed(c, took);
    tracing::info!(
        dataset = tel.dataset(),
        version = c.version,
        rows = c.rows,
        inserts = c.inserts,
        updates = c.updates,
        deletes = c.deletes,
        partitions = c.partitions_written,
        ms = took.as_millis() as u64,
        "published version"
    );
}

fn progress_bar(enabled: bool, dataset: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} {prefix}: {human_pos} rows ({per_sec}) {elapsed}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(dataset.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}
