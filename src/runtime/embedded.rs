//! The embedded role (`--role all`): one task pulls a batch from the source,
//! classifies it and stages it, and commits when a version is due. The source
//! is read only as fast as that loop goes.

use std::time::{Duration, Instant};

use oppen_connector_api::{Source as _, SourceEvent};
use tokio::sync::watch;

use super::capture::Capture;
use super::commit::{self, OnConflict, Outcome, Resolve};
use super::open::{open_described, resume_at};
use super::source::{PipelineSource, next_event, source, start_source};
use super::{RunError, RunOptions, RunSummary};
use crate::config::Pipeline;
use crate::ops::telemetry::PipelineTelemetry;
use crate::publish::Publisher;

pub(super) async fn run(
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

/// Commits what the publisher holds as a version, then acknowledges the
/// source up to it.
async fn commit(
    publisher: &mut Publisher,
    source: &mut PipelineSource,
    summary: &mut RunSummary,
    tel: &mut PipelineTelemetry,
) -> Result<(), RunError> {
    use tracing::Instrument as _;
    let span = tracing::info_span!("version", version = publisher.version() + 1);
    async {
        let staged_position = publisher.pending_position().cloned();
        match commit::commit(publisher, &mut Reread { source }, tel).await? {
            Outcome::Dropped => {}
            Outcome::Committed(Some(c)) => {
                if let Some(position) = &c.position {
                    source.ack(position).await?;
                }
                summary.versions.push(c);
            }
            Outcome::Committed(None) => {
                if let Some(position) = &staged_position
                    && publisher.pending_position().is_none()
                {
                    // The staged changes alter nothing published (say, only a
                    // dropped column changed): the committed version already is
                    // their result, so they are acknowledged too. Otherwise a
                    // table whose published columns stay still would pin the
                    // source (a replication slot keeps its WAL).
                    source.ack(position).await?;
                }
            }
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// The embedded role's answer to a commit that cannot land: what another
/// publisher already committed is not committed again, and whatever is
/// dropped is read from the source again.
struct Reread<'a> {
    source: &'a mut PipelineSource,
}

impl Reread<'_> {
    /// Drops what is staged and starts the source again at `position`.
    async fn read_again(
        &mut self,
        publisher: &mut Publisher,
        position: Option<oppen_connector_api::Position>,
        tel: &mut PipelineTelemetry,
    ) -> Result<(), RunError> {
        publisher.discard_pending();
        tel.discarded();
        self.source.start(position).await?;
        Ok(())
    }
}

impl Resolve for Reread<'_> {
    async fn conflict(
        &mut self,
        publisher: &mut Publisher,
        _version: u64,
        tel: &mut PipelineTelemetry,
    ) -> Result<OnConflict, RunError> {
        let dataset = tel.dataset().to_string();
        // A first version written while it was staged cannot be put on top
        // of another: its changes are read from the source again.
        let streamed = publisher.is_streaming();
        let recovered = publisher.reload().await?;
        let covered = match (&recovered.position, publisher.pending_position()) {
            (Some(theirs), Some(ours)) => theirs.is_at_or_after(ours),
            _ => false,
        };
        if !covered && !streamed {
            return Ok(OnConflict::CommitOnTop);
        }
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
        self.read_again(publisher, recovered.position, tel).await?;
        Ok(OnConflict::Dropped)
    }

    async fn reread(
        &mut self,
        publisher: &mut Publisher,
        tel: &mut PipelineTelemetry,
    ) -> Result<(), RunError> {
        let recovered = publisher.reload().await?;
        self.read_again(publisher, recovered.position, tel).await
    }
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
