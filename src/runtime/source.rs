//! A pipeline's source: the one match over the kinds of source, its start
//! and its events, retried with backoff and jitter while the error is transient.

use std::collections::BTreeMap;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use oppen_connector_api::{Position, Source, SourceEvent, SourceHints};
use oppen_connector_debezium::DebeziumSource;
use oppen_connector_files::FilesSource;
use oppen_connector_postgres::PostgresSource;
use tokio::sync::watch;

use super::{RunError, RunOptions};
use crate::config::{Pipeline, SourceConfig};
use crate::ops::telemetry::PipelineTelemetry;

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
