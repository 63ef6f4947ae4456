//! `oppen run --role connector`: capture, classify, produce to the transport
//! topic, and acknowledge the source once publishers have committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt as _;
use oppen_connector_api::{BatchKind, Op, Position, Source as _, SourceEvent};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::capture::Capture;
use super::open::{pseudonym_key, resume_at};
use super::source::{PipelineSource, next_event, source, start_source};
use super::{RunError, RunOptions, RunSummary};
use crate::classify::Classified;
use crate::classify::SourceInfo;
use crate::config::KafkaTransport;
use crate::config::Pipeline;
use crate::ops::telemetry::PipelineTelemetry;
use crate::publish::manifest::TransportProgress;
use crate::store::Store;
use crate::transport::{self, HEADER_META, HEADER_SCHEMA, Meta, TransportError};

/// Where the connector keeps the source position it acknowledged last
/// (in the state location, beside the dataset's private state).
pub const CHECKPOINT_FILE: &str = "connector.json";
/// Broker requests (metadata, topic creation) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows are sent in messages of about this many bytes (brokers refuse
/// messages above 1 MB by default).
const MESSAGE_BYTES: usize = 512 * 1024;
/// Messages awaiting the broker's acknowledgement before the connector waits.
const MAX_IN_FLIGHT: usize = 4_096;
/// How often the connector looks for versions the publishers committed.
const ACK_EVERY: Duration = Duration::from_secs(1);

/// The connector's checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    /// The source position acknowledged last.
    position: Position,
}

/// Something the producer has in flight: a message, or the end of a source
/// transaction (acknowledgeable once everything before it is delivered).
enum InFlight {
    Message(DeliveryFuture),
    End(Position),
}

/// The producer side of a connector.
struct Sender {
    producer: FutureProducer,
    topic: String,
    partitions: u32,
    session: u64,
    in_flight: VecDeque<InFlight>,
    /// Per partition, the offset after the newest delivered message.
    delivered: BTreeMap<i32, i64>,
    /// Ends of transactions whose messages are all delivered, with the
    /// offsets they need committed.
    deliverable: VecDeque<(Position, BTreeMap<i32, i64>)>,
    /// Partitions that got messages of the open transaction.
    open: BTreeSet<i32>,
    /// The classified schema's fingerprint and the source description.
    schema: String,
    info: SourceInfo,
    sent_messages: u64,
    /// Reads the publishers' group offsets (never joins the group).
    watcher: BaseConsumer,
}

impl Sender {
    async fn connect(
        config: &KafkaTransport,
        topic: String,
        group: String,
    ) -> Result<Self, RunError> {
        let watcher: BaseConsumer = transport::client(config)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|source| TransportError::Client {
                what: format!("consumer for {topic}"),
                source,
            })?;
        let mut client = transport::client(config);
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.max.bytes", "4000000");
        // Defaults a pipeline's properties may override: batches linger a
        // little, and go compressed (Arrow buffers of text and decimals shrink
        // several times with lz4, which costs less CPU than the bytes cost the
        // broker).
        for (name, value) in [("linger.ms", "5"), ("compression.type", "lz4")] {
            if !config.properties.contains_key(name) {
                client.set(name, value);
            }
        }
        let producer: FutureProducer =
            client.create().map_err(|source| TransportError::Client {
                what: format!("producer for {topic}"),
                source,
            })?;
        let partitions = transport::ensure_topic(config, producer.client(), &topic).await?;
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed)
            .map_err(|e| RunError::System(format!("no randomness for a session id: {e}")))?;
        let session = u64::from_le_bytes(seed);
        tracing::info!(
            topic,
            partitions,
            session = format!("{session:016x}"),
            "producing to the transport topic"
        );
        Ok(Sender {
            producer,
            topic,
            partitions,
            session,
            in_flight: VecDeque::new(),
            delivered: BTreeMap::new(),
            deliverable: VecDeque::new(),
            open: BTreeSet::new(),
            schema: String::new(),
            info: SourceInfo::default(),
            sent_messages: 0,
            watcher,
        })
    }

    /// Sends one classified batch: its rows by partition, markers where a
    /// transaction or image ends.
    async fn send(
        &mut self,
        data: &arrow::array::RecordBatch,
        ops: &[Op],
        batch: &oppen_connector_api::ChangeBatch,
    ) -> Result<(), RunError> {
        let rows =
            tokio::task::block_in_place(|| transport::split_by_partition(data, self.partitions))
                .map_err(crate::publish::PublishError::from)?;
        let snapshot = batch.kind == BatchKind::Snapshot;
        let end = batch.end_of_transaction;
        for (p, rows) in rows.iter().enumerate() {
            let p = p as i32;
            // A complete image reaches every partition (its publisher must
            // learn that keys it holds are gone); a transaction's end reaches
            // every partition the transaction touched.
            let needed = !rows.is_empty() || snapshot || (end && self.open.contains(&p));
            if !needed {
                continue;
            }
            let (part, part_ops) = transport::take_rows(data, ops, rows)
                .map_err(crate::publish::PublishError::from)?;
            let per_row = part.get_array_memory_size() / part.num_rows().max(1);
            let chunk = (MESSAGE_BYTES / per_row.max(1)).max(1);
            let mut offset = 0;
            loop {
                let len = chunk.min(part.num_rows() - offset);
                let last = offset + len >= part.num_rows();
                let slice = part.slice(offset, len);
                self.produce(
                    p,
                    &slice,
                    &part_ops[offset..offset + len],
                    batch,
                    snapshot,
                    end && last,
                )
                .await?;
                offset += len;
                if last {
                    break;
                }
            }
            if !end {
                self.open.insert(p);
            }
        }
        if end {
            self.open.clear();
            self.in_flight
                .push_back(InFlight::End(batch.position.clone()));
        }
        self.collect(false).await
    }

    async fn produce(
        &mut self,
        partition: i32,
        rows: &arrow::array::RecordBatch,
        ops: &[Op],
        batch: &oppen_connector_api::ChangeBatch,
        snapshot: bool,
        end: bool,
    ) -> Result<(), RunError> {
        let payload = transport::encode(rows, ops).map_err(crate::publish::PublishError::from)?;
        let meta = Meta {
            position: batch.position.clone(),
            snapshot,
            end,
            time: batch.commit_time,
            session: self.session,
            partitions: self.partitions,
            source: self.info.clone(),
        };
        let meta = serde_json::to_vec(&meta)
            .map_err(|e| RunError::System(format!("encoding a record: {e}")))?;
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_META,
                value: Some(&meta),
            })
            .insert(Header {
                key: HEADER_SCHEMA,
                value: Some(self.schema.as_bytes()),
            });
        let topic = self.topic.clone();
        let mut record: FutureRecord<'_, [u8], Vec<u8>> = FutureRecord::to(&topic)
            .partition(partition)
            .payload(&payload)
            .headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(future) => {
                    self.in_flight.push_back(InFlight::Message(future));
                    self.sent_messages += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The local queue is full: wait for deliveries, then retry.
                    record = r;
                    self.collect(true).await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(TransportError::Refused {
                        topic: format!("{}/{partition}", self.topic),
                        reason: e.to_string(),
                    }
                    .into());
                }
            }
        }
        if self.in_flight.len() > MAX_IN_FLIGHT {
            self.collect(true).await?;
        }
        Ok(())
    }

    /// Takes the broker's acknowledgements in order: all that are ready, or
    /// (with `wait`) at least the oldest.
    async fn collect(&mut self, wait: bool) -> Result<(), RunError> {
        let mut waited = !wait;
        while let Some(front) = self.in_flight.front_mut() {
            match front {
                InFlight::End(_) => {
                    if let Some(InFlight::End(position)) = self.in_flight.pop_front() {
                        self.deliverable
                            .push_back((position, self.delivered.clone()));
                    }
                }
                InFlight::Message(future) => {
                    let result = if waited {
                        match future.now_or_never() {
                            Some(r) => r,
                            None => break,
                        }
                    } else {
                        waited = true;
                        future.await
                    };
                    self.in_flight.pop_front();
                    // librdkafka retries delivery itself (the idempotent producer
                    // keeps order and drops duplicates); an error here is final.
                    match result {
                        Ok(Ok(delivery)) => {
                            self.delivered
                                .insert(delivery.partition, delivery.offset + 1);
                        }
                        Ok(Err((e, _))) => {
                            return Err(TransportError::Refused {
                                topic: self.topic.clone(),
                                reason: e.to_string(),
                            }
                            .into());
                        }
                        Err(_) => {
                            return Err(TransportError::ProducerStopped {
                                topic: self.topic.clone(),
                            }
                            .into());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits until every message sent is acknowledged by the brokers.
    async fn drain(&mut self) -> Result<(), RunError> {
        while !self.in_flight.is_empty() {
            self.collect(true).await?;
        }
        Ok(())
    }

    /// The group offsets publishers stored, added to `progress` where they are
    /// ahead (a publisher stores them also when what it read changed nothing
    /// published, so no version recorded it).
    fn with_group_offsets(&self, mut progress: TransportProgress) -> TransportProgress {
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions as i32 {
            list.add_partition(&self.topic, p);
        }
        let stored =
            tokio::task::block_in_place(|| self.watcher.committed_offsets(list, REQUEST_TIMEOUT));
        match stored {
            Ok(list) => {
                for e in list.elements() {
                    if let Offset::Offset(at) = e.offset()
                        && progress
                            .get(e.partition())
                            .is_none_or(|p| p.next_offset < at)
                    {
                        let applied = progress.get(e.partition()).and_then(|p| p.applied.clone());
                        progress.set(crate::publish::manifest::PartitionProgress {
                            partition: e.partition(),
                            next_offset: at,
                            applied,
                        });
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the publishers' group offsets failed"),
        }
        progress
    }

    /// The newest source position whose messages the newest version covers;
    /// removes it and everything before it from the waiting ends.
    fn acknowledgeable(&mut self, committed: &TransportProgress) -> Option<Position> {
        let mut newest = None;
        while let Some((_, needs)) = self.deliverable.front() {
            let covered = needs.iter().all(|(p, end)| {
                committed
                    .get(*p)
                    .is_some_and(|progress| progress.next_offset >= *end)
            });
            if !covered {
                break;
            }
            newest = self.deliverable.pop_front().map(|(position, _)| position);
        }
        newest
    }
}

async fn read_checkpoint(state: &Store, dataset: &str) -> Result<Option<Position>, RunError> {
    let path = format!("{dataset}/{CHECKPOINT_FILE}");
    let Some(bytes) = state.get(&path).await? else {
        return Ok(None);
    };
    let checkpoint: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|e| RunError::StateFile {
            path: path.clone(),
            location: state.location().to_string(),
            reason: e.to_string(),
            hint: "remove it to start the source from a fresh snapshot",
        })?;
    Ok(Some(checkpoint.position))
}

/// Runs a pipeline's connector role until the source is done (`once`) or `stop`.
pub async fn run(
    pipeline: &Pipeline,
    config: &KafkaTransport,
    options: &RunOptions,
    mut stop: watch::Receiver<bool>,
    tel: &mut PipelineTelemetry,
) -> Result<RunSummary, RunError> {
    let dataset = pipeline.id().to_string();
    let store = pipeline.store.open()?;
    let state = pipeline.state.open()?;
    let key = pseudonym_key(pipeline, &state).await?;
    let resume = resume_at(options, read_checkpoint(&state, &dataset).await?);
    if let Some(position) = &resume {
        tracing::info!(dataset, %position, "resuming the source where publishers last committed");
    }
    let mut source = source(pipeline, BTreeMap::new(), options)?;
    start_source(&mut source, resume, tel, &mut stop).await?;
    // The brokers are reached (metadata, the topic, the producer's id) while
    // the source reads its first batch: a large export takes a second to
    // parse, and nothing needs the producer before it is parsed.
    let connecting = tokio::spawn({
        let config = config.clone();
        let (topic, group) = (config.topic(&dataset), config.group(&dataset));
        async move { Sender::connect(&config, topic, group).await }
    });
    let first = next_event(&mut source, tel)
        .await
        .inspect_err(|_| connecting.abort())?;
    let mut sender = connecting.await.map_err(|e| {
        RunError::System(format!(
            "connecting to the Kafka brokers did not finish: {e}"
        ))
    })??;
    let mut first = Some(first);
    let mut capture = Capture::new(pipeline, key);
    let mut last_ack = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        let (event, behind) = match first.take() {
            Some(event) => event,
            None => next_event(&mut source, tel).await?,
        };
        match event {
            SourceEvent::Batch(batch) => {
                let (pieces, info) = capture.classify(&batch, &source, tel)?;
                // One message per source batch: the position it carries is
                // acknowledged only with all of the batch's rows.
                let classified = Classified::join(pieces)?;
                if let Some(info) = info {
                    sender.schema = transport::fingerprint(&classified.data.schema());
                    sender.info = info;
                }
                sender
                    .send(&classified.data, &classified.ops, &batch)
                    .await?;
            }
            SourceEvent::Rejected(rejection) => capture.rejected(&rejection, tel),
            SourceEvent::Idle => {
                tel.lag(behind.unwrap_or(0.0));
                if options.once {
                    break;
                }
                sender.collect(false).await?;
                let pause = source.idle_pause().max(Duration::from_millis(50));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        if last_ack.elapsed() >= ACK_EVERY {
            acknowledge(&mut sender, &mut source, &store, &state, &dataset).await?;
            last_ack = Instant::now();
        }
    }
    // Everything read is handed to the brokers before the process ends; the
    // source is acknowledged as far as publishers have committed.
    sender.drain().await?;
    acknowledge(&mut sender, &mut source, &store, &state, &dataset).await?;
    tracing::info!(
        dataset,
        messages = sender.sent_messages,
        rows = capture.summary.rows_read,
        "connector done"
    );
    Ok(capture.summary)
}

/// Acknowledges the source as far as the newest version covers what was sent.
async fn acknowledge(
    sender: &mut Sender,
    source: &mut PipelineSource,
    store: &Store,
    state: &Store,
    dataset: &str,
) -> Result<(), RunError> {
    if sender.deliverable.is_empty() {
        return Ok(());
    }
    // The pointer may lag the newest version, never lead it: acknowledging by
    // it is at worst late.
    let committed = crate::publish::read_pointer(store, dataset)
        .await?
        .and_then(|v| v.transport)
        .unwrap_or_default();
    let committed = sender.with_group_offsets(committed);
    let Some(position) = sender.acknowledgeable(&committed) else {
        return Ok(());
    };
    // The checkpoint first: a crash between the two resumes at the checkpoint,
    // which the source still holds.
    let checkpoint = serde_json::to_vec(&Checkpoint {
        position: position.clone(),
    })
    .map_err(|e| RunError::System(format!("encoding a record: {e}")))?;
    state
        .put(
            &format!("{dataset}/{CHECKPOINT_FILE}"),
            Bytes::from(checkpoint),
        )
        .await?;
    source.ack(&position).await?;
    tracing::debug!(dataset, %position, "source acknowledged");
    Ok(())
}
