//! `oppen run --role publisher`: consume the transport topic in the dataset's
//! consumer group and commit versions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use backon::BackoffBuilder as _;
use chrono::{DateTime, Utc};
use oppen_connector_api::{Op, Position};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::commit::{self, OnConflict, Outcome, Resolve};
use super::open::open_described;
use super::source::retry_policy;
use super::{RunError, RunOptions, RunSummary};
use crate::classify::Classified;
use crate::config::KafkaTransport;
use crate::config::Pipeline;
use crate::ops::telemetry::PipelineTelemetry;
use crate::publish::Publisher;
use crate::publish::manifest::{PartitionProgress, TransportProgress};
use crate::publish::state::KeyScope;
use crate::store::Store;
use crate::transport::{self, HEADER_META, HEADER_SCHEMA, Meta, TransportError};

/// How often a publisher renews its membership record.
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A membership record not renewed for this long belongs to a publisher that is gone.
const MEMBER_TTL: Duration = Duration::from_secs(10);

/// A publisher's membership record: `<state>/<dataset>/publishers/<id>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct MemberRecord {
    id: String,
    expires: DateTime<Utc>,
}

/// Which publishers are alive, by records they renew in the state location,
/// and so which partitions this one reads: the live publishers sorted by id
/// take the partitions round robin.
///
/// The division needs no broker-side group protocol (tansu 0.6 keeps a crashed
/// member's partitions assigned, and a crashed member is exactly the case that
/// matters). It need not be exclusive either: a version commits only on top of
/// the newest one, and a publisher whose partition another publisher moved on
/// drops what it staged (see `commit`), so two owners for a moment cost work,
/// never correctness.
struct Membership {
    state: Store,
    prefix: String,
    id: String,
    partitions: u32,
    renewed: Option<Instant>,
}

impl Membership {
    fn new(state: Store, dataset: &str, partitions: u32) -> Result<Self, RunError> {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed)
            .map_err(|e| RunError::System(format!("no randomness for a publisher id: {e}")))?;
        Ok(Membership {
            state,
            prefix: format!("{dataset}/publishers"),
            id: hex::encode(seed),
            partitions,
            renewed: None,
        })
    }

    /// How long until the record must be renewed.
    fn due(&self) -> Duration {
        self.renewed
            .map_or(Duration::ZERO, |t| RENEW_EVERY.saturating_sub(t.elapsed()))
    }

    /// Renews this publisher's record and returns the partitions it reads now.
    async fn renew(&mut self) -> Result<BTreeSet<i32>, RunError> {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(MEMBER_TTL).unwrap_or_default();
        let record = MemberRecord {
            id: self.id.clone(),
            expires: now + ttl,
        };
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| RunError::System(format!("encoding a record: {e}")))?;
        self.state
            .put(&format!("{}/{}.json", self.prefix, self.id), bytes.into())
            .await?;
        self.renewed = Some(Instant::now());
        let mut live = BTreeSet::from([self.id.clone()]);
        for path in self.state.list(&self.prefix).await? {
            let Some(bytes) = self.state.get(&path).await? else {
                continue;
            };
            match serde_json::from_slice::<MemberRecord>(&bytes) {
                Ok(r) if r.expires > now => {
                    live.insert(r.id);
                }
                // Long gone: any publisher tidies it away.
                Ok(r) if r.expires + ttl < now => self.state.delete(&path).await?,
                Ok(_) => {}
                Err(e) => tracing::warn!(path, error = %e, "unreadable publisher record; ignored"),
            }
        }
        let index = live.iter().position(|id| *id == self.id).unwrap_or(0);
        let count = live.len();
        Ok((0..self.partitions as i32)
            .filter(|p| *p as usize % count == index)
            .collect())
    }

    /// Removes this publisher's record, so the others take its partitions at once.
    async fn leave(&self) {
        let path = format!("{}/{}.json", self.prefix, self.id);
        if let Err(e) = self.state.delete(&path).await {
            tracing::debug!(error = %e, "removing the publisher record failed; it expires");
        }
    }
}

/// A message read but not yet staged: its transaction has not ended in its
/// partition.
struct Buffered {
    meta: Meta,
    schema: String,
    rows: RecordBatch,
    ops: Vec<Op>,
    offset: i64,
}

/// What a publisher knows of one partition it owns.
#[derive(Default)]
struct Partition {
    /// Messages of the transaction under way.
    buffer: Vec<Buffered>,
    /// The offset after the newest staged (or skipped) message.
    staged_next: i64,
    /// The source position of the newest whole transaction staged.
    applied: Option<Position>,
}

impl Partition {
    fn from_progress(progress: Option<&PartitionProgress>) -> Self {
        Partition {
            buffer: Vec::new(),
            staged_next: progress.map_or(0, |p| p.next_offset),
            applied: progress.and_then(|p| p.applied.clone()),
        }
    }
}

/// The consuming half of a publisher.
struct Reader {
    consumer: StreamConsumer,
    topic: String,
    /// The partitions this publisher reads.
    owned: BTreeSet<i32>,
    /// The progress of the newest committed version this publisher knows.
    committed: TransportProgress,
    partitions: BTreeMap<i32, Partition>,
    /// The staged schema fingerprint.
    schema: String,
}

impl Reader {
    /// Forgets what is staged and reads its partitions on from the newest
    /// committed version (when the division of partitions changed, or another
    /// publisher moved one of them on).
    async fn restart(&mut self, publisher: &mut Publisher) -> Result<(), RunError> {
        publisher.discard_pending();
        let recovered = publisher.reload().await?;
        self.committed = recovered.transport.unwrap_or_else(|| TransportProgress {
            topic: self.topic.clone(),
            partitions: Vec::new(),
        });
        self.partitions = self
            .owned
            .iter()
            .map(|p| (*p, Partition::from_progress(self.committed.get(*p))))
            .collect();
        self.schema.clear();
        let mut list = TopicPartitionList::new();
        for (p, state) in &self.partitions {
            let offset = if state.staged_next > 0 {
                Offset::Offset(state.staged_next)
            } else {
                Offset::Beginning
            };
            list.add_partition_offset(&self.topic, *p, offset)
                .map_err(|source| TransportError::Client {
                    what: format!("assign {}/{p}", self.topic),
                    source,
                })?;
        }
        self.consumer
            .assign(&list)
            .map_err(|source| TransportError::Client {
                what: format!("assign partitions of {}", self.topic),
                source,
            })?;
        Ok(())
    }

    /// The progress the next version records: the committed one, with this
    /// publisher's partitions moved on.
    fn progress(&self) -> TransportProgress {
        let mut progress = self.committed.clone();
        for (p, state) in &self.partitions {
            let before = self.committed.get(*p).map_or(0, |c| c.next_offset);
            if state.staged_next > before {
                progress.set(PartitionProgress {
                    partition: *p,
                    next_offset: state.staged_next,
                    applied: state.applied.clone(),
                });
            }
        }
        progress
    }

    /// Whether every partition this publisher reads is staged up to its high
    /// watermark. A broker that cannot say counts as not at the end.
    fn read_to_end(&self) -> bool {
        tokio::task::block_in_place(|| {
            self.partitions.iter().all(|(p, state)| {
                match self
                    .consumer
                    .fetch_watermarks(&self.topic, *p, Duration::from_secs(10))
                {
                    Ok((_, high)) => state.staged_next >= high,
                    Err(e) => {
                        tracing::debug!(partition = p, error = %e, "cannot read the high watermark");
                        false
                    }
                }
            })
        })
    }

    /// Stores the group's offsets for the partitions this publisher owns
    /// (after a version commit only: operators' lag tools read them, and the
    /// connector counts them as published).
    fn commit_offsets(&self, progress: &TransportProgress) {
        let mut list = TopicPartitionList::new();
        for p in self.partitions.keys() {
            if let Some(progress) = progress.get(*p) {
                let _ = list.add_partition_offset(
                    &self.topic,
                    *p,
                    Offset::Offset(progress.next_offset),
                );
            }
        }
        if list.count() > 0
            && let Err(e) = self.consumer.commit(&list, CommitMode::Async)
        {
            tracing::debug!(error = %e, "storing the group's offsets failed; the next version stores them");
        }
    }
}

/// What a message says, or why it cannot be read.
fn read_message(
    message: &BorrowedMessage<'_>,
) -> Result<(Meta, String, RecordBatch, Vec<Op>), String> {
    let headers = message.headers();
    let meta = transport::header(headers, HEADER_META).ok_or("no oppen.meta header")?;
    let meta: Meta = serde_json::from_slice(meta).map_err(|e| format!("oppen.meta: {e}"))?;
    let schema = transport::header(headers, HEADER_SCHEMA)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    let (rows, ops) =
        transport::decode(message.payload().unwrap_or_default()).map_err(|e| e.to_string())?;
    Ok((meta, schema, rows, ops))
}

/// Runs a pipeline's publisher role until `stop` (or, with `once`, until the
/// topic has been quiet for the publish interval).
pub async fn run(
    pipeline: &Pipeline,
    config: &KafkaTransport,
    options: &RunOptions,
    mut stop: watch::Receiver<bool>,
    tel: &mut PipelineTelemetry,
) -> Result<RunSummary, RunError> {
    let dataset = pipeline.id().to_string();
    let topic = config.topic(&dataset);
    let (mut publisher, recovered, _keyer, _key) = open_described(pipeline, tel).await?;
    // The first version is encoded while the topic is still read.
    publisher.stream_images(true);
    let mut client = transport::client(config);
    client
        .set("group.id", config.group(&dataset))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    // Defaults a pipeline's properties may override. Messages are up to about
    // half a megabyte: fetch several at a time. A fetch waits at most 10 ms
    // for data: Kafka answers as soon as data is there anyway, but brokers that
    // hold every fetch for its whole wait (tansu 0.6) would otherwise add half
    // a second per round.
    for (name, value) in [
        ("max.partition.fetch.bytes", "8388608"),
        ("fetch.wait.max.ms", "10"),
    ] {
        if !config.properties.contains_key(name) {
            client.set(name, value);
        }
    }
    let consumer: StreamConsumer = client.create().map_err(|source| TransportError::Client {
        what: format!("consumer for {topic}"),
        source,
    })?;
    // Publishers may start before the connector: whichever comes first
    // creates the topic.
    let mut delays = retry_policy().build();
    let partitions = loop {
        match transport::ensure_topic(config, consumer.client(), &topic).await {
            Ok(n) => break n,
            Err(e) if e.is_retryable() => {
                let Some(delay) = delays.next() else {
                    return Err(e.into());
                };
                tel.retry("transport");
                tracing::warn!(dataset, error = %e, retry_in = ?delay, "the transport topic is not reachable; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut membership = Membership::new(pipeline.state.open()?, &dataset, partitions)?;
    tracing::info!(
        publisher = membership.id,
        dataset,
        topic,
        group = config.group(&dataset),
        "publishing from the transport topic"
    );
    tel.started();
    let mut reader = Reader {
        consumer,
        owned: BTreeSet::new(),
        topic: topic.clone(),
        committed: recovered
            .transport
            .clone()
            .unwrap_or_else(|| TransportProgress {
                topic: topic.clone(),
                partitions: Vec::new(),
            }),
        partitions: BTreeMap::new(),
        schema: String::new(),
    };
    let mut summary = RunSummary::default();
    let interval = Duration::from_secs_f64(pipeline.spec.publish.interval_seconds);
    let max_changes = pipeline.spec.publish.max_changes;
    let mut first_pending: Option<Instant> = None;
    // As in the embedded engine: under a sustained stream versions are cut no
    // more often than every two commit durations, so a backlog is read rather
    // than written out in many small versions.
    let mut last_commit = Duration::ZERO;
    let mut quiet_since = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        tel.turned("reading the transport topic");
        if membership.due().is_zero() {
            let owned = membership.renew().await?;
            if owned != reader.owned {
                tracing::info!(publisher = membership.id, partitions = ?owned, "transport partitions assigned");
                reader.owned = owned;
                // What is staged may come from partitions another publisher
                // reads now: start again from the newest version.
                reader.restart(&mut publisher).await?;
                first_pending = None;
                quiet_since = Instant::now();
            }
        }
        let every = interval.max(last_commit * 2);
        let wait = first_pending
            .map_or(interval, |t| every.saturating_sub(t.elapsed()))
            .min(membership.due());
        let received = tokio::select! {
            // What the message says is read at once: the message borrows the consumer.
            m = reader.consumer.recv() => Some(m.map(|m| (m.partition(), m.offset(), read_message(&m)))),
            _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => None,
            _ = stop.changed() => continue,
        };
        let idle = received.is_none();
        match received {
            Some(Ok((p, offset, read))) => {
                quiet_since = Instant::now();
                let committed = reader.committed.get(p).cloned();
                let state = reader
                    .partitions
                    .entry(p)
                    .or_insert_with(|| Partition::from_progress(committed.as_ref()));
                if offset < state.staged_next
                    || state.buffer.last().is_some_and(|b| offset <= b.offset)
                {
                    continue; // already in a version (or already buffered)
                }
                let (meta, schema, rows, ops) = match read {
                    Ok(read) => read,
                    Err(reason) => {
                        tel.dead_letter();
                        summary.rejected += 1;
                        tracing::error!(
                            dataset,
                            topic,
                            partition = p,
                            offset,
                            reason,
                            "transport message is unreadable; skipped"
                        );
                        if state.buffer.is_empty() {
                            state.staged_next = offset + 1;
                        }
                        continue;
                    }
                };
                if let Some(t) = meta.time {
                    tel.lag((Utc::now() - t).num_milliseconds() as f64 / 1000.0);
                }
                if state
                    .buffer
                    .first()
                    .is_some_and(|b| b.meta.session != meta.session)
                {
                    // The connector restarted inside a transaction: it sends the
                    // transaction again, whole.
                    tracing::warn!(
                        dataset,
                        partition = p,
                        dropped = state.buffer.len(),
                        "a restarted connector abandoned a transaction; dropping its first part"
                    );
                    state.buffer.clear();
                }
                if state
                    .applied
                    .as_ref()
                    .is_some_and(|a| a.is_at_or_after(&meta.position))
                {
                    // Sent again by a restarted connector; already staged.
                    if state.buffer.is_empty() {
                        state.staged_next = offset + 1;
                    }
                    continue;
                }
                let end = meta.end;
                state.buffer.push(Buffered {
                    meta,
                    schema,
                    rows,
                    ops,
                    offset,
                });
                if end {
                    let buffered = std::mem::take(&mut state.buffer);
                    // One source schema per version, as in the embedded engine: a
                    // transaction with another schema starts a new version.
                    if buffered.first().is_some_and(|b| b.schema != reader.schema)
                        && !reader.schema.is_empty()
                        && publisher.holds_whole_changes()
                    {
                        first_pending = None;
                        if commit(&mut publisher, &mut reader, &mut summary, tel).await? {
                            continue; // read again from the newest version
                        }
                    }
                    let (messages, started) = (buffered.len(), Instant::now());
                    stage(&mut publisher, &mut reader.schema, p, buffered)?;
                    publisher.settle().await;
                    tracing::trace!(
                        dataset,
                        partition = p,
                        messages,
                        ms = started.elapsed().as_millis() as u64,
                        "staged a transaction from the transport"
                    );
                    first_pending.get_or_insert_with(Instant::now);
                    if let Some(state) = reader.partitions.get_mut(&p) {
                        state.staged_next = offset + 1;
                    }
                }
            }
            Some(Err(e)) => {
                // librdkafka reconnects by itself; a broken broker shows as
                // errors here until it is back.
                tel.error("transport");
                tracing::warn!(dataset, error = %e, "reading the transport topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None => {}
        }
        let due = publisher.pending_rows() >= max_changes
            || first_pending.is_some_and(|t| t.elapsed() >= every)
            || (idle && publisher.pending_rows() > 0);
        if due && publisher.at_boundary() {
            let started = Instant::now();
            commit(&mut publisher, &mut reader, &mut summary, tel).await?;
            last_commit = started.elapsed();
            first_pending = None;
        } else if idle && publisher.pending_rows() == 0 {
            // Skipped messages moved offsets on without staging anything.
            let progress = reader.progress();
            if progress != reader.committed {
                reader.commit_offsets(&progress);
            }
        }
        // A `--once` run ends when its partitions have been quiet for a while
        // (with partitions assigned: joining the group takes a moment) and are
        // read to their ends: a broker that pauses is not the end of the topic.
        if options.once && quiet_since.elapsed() >= interval.max(Duration::from_secs(3)) {
            if !reader.owned.is_empty() {
                if reader.read_to_end() {
                    break;
                }
                tracing::info!(topic, "records wait that have not arrived yet; reading on");
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_secs(60) {
                return Err(TransportError::NoPartition {
                    topic: topic.clone(),
                    seconds: 60,
                }
                .into());
            }
        }
    }
    if publisher.holds_whole_changes() {
        commit(&mut publisher, &mut reader, &mut summary, tel).await?;
    }
    membership.leave().await;
    Ok(summary)
}

/// Stages a partition's whole transaction.
fn stage(
    publisher: &mut Publisher,
    staged_schema: &mut String,
    partition: i32,
    buffered: Vec<Buffered>,
) -> Result<(), RunError> {
    let last = buffered.len().saturating_sub(1);
    for (i, b) in buffered.into_iter().enumerate() {
        if *staged_schema != b.schema {
            publisher.set_source_info(
                b.meta.source.types.clone(),
                b.meta.source.unclassified.clone(),
            );
            if let Some(key) = b.meta.source.primary_key.clone() {
                publisher.set_primary_key(key);
            }
            staged_schema.clone_from(&b.schema);
        }
        publisher.set_image_scope(KeyScope::Partition {
            partition: partition as u32,
            of: b.meta.partitions,
        });
        let kind = b.meta.kind();
        let rows = b.rows.num_rows();
        publisher.stage(
            Classified {
                data: b.rows,
                suppressed_by: vec![None; rows],
                ops: b.ops,
                values_redacted: 0,
            },
            kind,
            i == last,
            b.meta.position,
            b.meta.time,
        )?;
    }
    Ok(())
}

/// Commits what is staged as a version with this publisher's progress; on a
/// conflict, on top of the other publisher's version. Returns true when what
/// was staged was dropped instead (another publisher took a partition), and
/// reading goes on from the newest version.
async fn commit(
    publisher: &mut Publisher,
    reader: &mut Reader,
    summary: &mut RunSummary,
    tel: &mut PipelineTelemetry,
) -> Result<bool, RunError> {
    let mut resolve = ReadOn {
        reader,
        progress: TransportProgress::default(),
    };
    match commit::commit(publisher, &mut resolve, tel).await? {
        Outcome::Dropped => Ok(true),
        Outcome::Committed(committed) => {
            let ReadOn { reader, progress } = resolve;
            if let Some(c) = committed {
                summary.versions.push(c);
                reader.committed = progress.clone();
            }
            // Nothing published changed, or it is committed: either way the
            // offsets are done with.
            reader.commit_offsets(&progress);
            Ok(false)
        }
    }
}

/// The publisher role's answer to a commit that cannot land: commit on top
/// of another publisher's version unless it took one of this publisher's
/// partitions, else read on from the newest version.
struct ReadOn<'a> {
    reader: &'a mut Reader,
    /// The progress the version being committed records.
    progress: TransportProgress,
}

impl Resolve for ReadOn<'_> {
    fn before_attempt(&mut self, publisher: &mut Publisher) {
        self.progress = self.reader.progress();
        publisher.set_transport(Some(self.progress.clone()));
    }

    async fn conflict(
        &mut self,
        publisher: &mut Publisher,
        version: u64,
        tel: &mut PipelineTelemetry,
    ) -> Result<OnConflict, RunError> {
        let reader = &mut *self.reader;
        let before = reader.committed.clone();
        // A first version written while it was staged cannot be put on
        // top of another: it is read from the topic again (`restart`
        // reads the winner's version).
        if publisher.is_streaming() {
            tracing::info!(
                dataset = tel.dataset(),
                version,
                "another publisher committed first; reading the topic again from its version"
            );
            reader.restart(publisher).await?;
            return Ok(OnConflict::Dropped);
        }
        let recovered = publisher.reload().await?;
        let theirs = recovered.transport.unwrap_or_default();
        // Another publisher moved on a partition this one staged from:
        // the group gave it away. What is staged is not ours to commit.
        let taken = reader.partitions.keys().any(|p| {
            theirs.get(*p).map_or(0, |t| t.next_offset)
                > before.get(*p).map_or(0, |b| b.next_offset)
        });
        if taken {
            tracing::info!(
                dataset = tel.dataset(),
                version,
                "another publisher took a partition; reading on from its version"
            );
            reader.restart(publisher).await?;
            return Ok(OnConflict::Dropped);
        }
        reader.committed = TransportProgress {
            topic: reader.topic.clone(),
            ..theirs
        };
        Ok(OnConflict::CommitOnTop)
    }

    async fn reread(
        &mut self,
        publisher: &mut Publisher,
        _tel: &mut PipelineTelemetry,
    ) -> Result<(), RunError> {
        // A streamed part's rows are gone: the version is read from the
        // topic again.
        self.reader.restart(publisher).await
    }
}
