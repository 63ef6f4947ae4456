//! The Debezium connector: reads a Debezium change topic on Kafka (JSON
//! converter, with or without schemas) and hands its changes to the engine.
//!
//! The connector assigns itself every partition of the topic and reads from
//! the offsets the newest committed version recorded (its position), so a
//! restart neither loses nor repeats a change; the consumer group's offsets
//! are committed after each version too, for operators' lag tools. Records
//! that cannot be decoded go to a dead-letter topic with the reason in a
//! header, and the pipeline goes on.

pub mod decode;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use oppen_connector_api::{
    BatchKind, ChangeBatch, Error, Op, Position, Rejection, Result, Source, SourceEvent,
    SourceHealth,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;

use crate::decode::{Columns, Decoder, Record, RowBuilder};

/// How long `next` waits for a record before it checks whether the topic is read to its end.
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// Records are gathered into one batch for at most this long.
const GATHER: Duration = Duration::from_millis(200);
/// Most rows in one batch.
const MAX_ROWS: usize = 65_536;
/// How long broker requests (metadata, watermarks, dead letters) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A librdkafka property value (YAML may give numbers and booleans).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Property {
    Text(String),
    Integer(i64),
    Number(f64),
    Flag(bool),
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Property::Text(s) => f.write_str(s),
            Property::Integer(i) => write!(f, "{i}"),
            Property::Number(n) => write!(f, "{n}"),
            Property::Flag(b) => write!(f, "{b}"),
        }
    }
}

/// The record format on the topic.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Kafka Connect's JSON converter, with or without schemas.
    #[default]
    Json,
}

/// `source.debezium` in a pipeline file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumConfig {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// The Debezium change topic.
    pub topic: String,
    /// The record format.
    #[serde(default)]
    pub format: Format,
    /// The columns that identify a row; default: the record key's fields.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// The consumer group offsets are committed to (default `oppen.<topic>`).
    #[serde(default)]
    pub group: Option<String>,
    /// Where undecodable records go (default `<topic>.dlq`).
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// librdkafka properties passed through (security.protocol, sasl.*, ssl.*, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, Property>,
}

impl fmt::Debug for DebeziumConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Properties may hold SASL passwords: only their names are shown.
        f.debug_struct("DebeziumConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DebeziumConfig {
    /// Problems with the settings, said plainly.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.brokers.trim().is_empty() {
            problems.push("brokers is empty; give host:port of at least one broker".to_string());
        }
        if self.topic.trim().is_empty() {
            problems.push("topic is empty; name the Debezium change topic".to_string());
        }
        if self.key.as_ref().is_some_and(Vec::is_empty) {
            problems.push("key is empty; name the key columns or leave key out".to_string());
        }
        for reserved in [
            "group.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "bootstrap.servers",
        ] {
            if self.properties.contains_key(reserved) {
                problems.push(format!(
                    "properties.{reserved} is set by oppen (use brokers or group instead)"
                ));
            }
        }
        problems
    }

    /// The consumer group.
    pub fn group(&self) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("oppen.{}", self.topic))
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
    }

    fn client(&self) -> ClientConfig {
        client_config(&self.brokers, &self.properties)
    }
}

/// A librdkafka client configuration: the brokers and the passed-through
/// properties (shared with oppen's Kafka transport).
pub fn client_config(brokers: &str, properties: &BTreeMap<String, Property>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (name, value) in properties {
        c.set(name, value.to_string());
    }
    c
}

/// A broker error worth retrying, saying what was attempted.
pub fn transient(what: &str, e: KafkaError) -> Error {
    Error::Transient {
        message: format!("{what}: {e}"),
        source: Some(Box::new(e)),
    }
}

/// High watermark per partition, from librdkafka's statistics.
type Watermarks = Arc<Mutex<BTreeMap<i32, i64>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The consumer's context: keeps the high watermarks its statistics report.
struct StatsContext {
    topic: String,
    watermarks: Watermarks,
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            let mut marks = lock(&self.watermarks);
            for (p, partition) in &topic.partitions {
                // Partition -1 is librdkafka's internal unassigned partition.
                if *p >= 0 {
                    marks.insert(*p, partition.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for StatsContext {}

/// The Debezium source.
pub struct DebeziumSource {
    config: DebeziumConfig,
    consumer: Option<StreamConsumer<StatsContext>>,
    watermarks: Watermarks,
    producer: Option<FutureProducer>,
    decoder: Decoder,
    key: Vec<String>,
    partitions: Vec<i32>,
    /// The next offset per partition, as far as the batches handed to the
    /// engine go: where reading resumes after an error.
    handed: BTreeMap<i32, i64>,
    /// The next offset per partition, as far as read (rows may still be gathered).
    read: BTreeMap<i32, i64>,
    rows: Option<RowBuilder>,
    ops: Vec<Op>,
    time: Option<DateTime<Utc>>,
    ready: VecDeque<SourceEvent>,
    schema: Option<SchemaRef>,
    health: SourceHealth,
    /// Since when nothing has arrived while the topic is not read to its end.
    quiet_since: Option<Instant>,
    /// Whether idle waits for the end of the topic however long records take
    /// to arrive (`run --once`), instead of reporting idle after a quiet spell.
    whole_topic: bool,
    /// Whether the dead-letter topic is known to exist.
    dead_letter_ready: bool,
}

impl fmt::Debug for DebeziumSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DebeziumSource")
            .field("topic", &self.config.topic)
            .field("handed", &self.handed)
            .finish_non_exhaustive()
    }
}

impl DebeziumSource {
    /// Reports idle only at the end of every partition, however long the
    /// records take (for `run --once`: a broker that pauses is not the end
    /// of the topic, and stopping there would publish a stale version as done).
    #[must_use]
    pub fn reading_to_the_end(mut self) -> Self {
        self.whole_topic = true;
        self
    }

    /// A source for `config`; nothing connects until [`Source::start`].
    pub fn new(config: DebeziumConfig) -> Self {
        DebeziumSource {
            key: config.key.clone().unwrap_or_default(),
            config,
            consumer: None,
            watermarks: Watermarks::default(),
            producer: None,
            decoder: Decoder::new(),
            partitions: Vec::new(),
            handed: BTreeMap::new(),
            read: BTreeMap::new(),
            rows: None,
            ops: Vec::new(),
            time: None,
            ready: VecDeque::new(),
            schema: None,
            health: SourceHealth::default(),
            quiet_since: None,
            whole_topic: false,
            dead_letter_ready: false,
        }
    }

    /// Connects and assigns every partition at `from` (else its first offset).
    async fn connect(&mut self, from: &BTreeMap<i32, i64>) -> Result<()> {
        let mut client = self.config.client();
        client
            .set("group.id", self.config.group())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "250");
        lock(&self.watermarks).clear();
        let context = StatsContext {
            topic: self.config.topic.clone(),
            watermarks: self.watermarks.clone(),
        };
        let consumer: StreamConsumer<StatsContext> = client
            .create_with_context(context)
            .map_err(|e| Error::Config(format!("Kafka consumer for {}: {e}", self.config.topic)))?;
        let topic = self.config.topic.clone();
        let (partitions, marks) = tokio::task::block_in_place(|| {
            let metadata = consumer
                .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
                .map_err(|e| transient(&format!("reach the brokers {}", self.config.brokers), e))?;
            let t = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .ok_or_else(|| Error::Transient {
                    message: format!(
                        "topic {topic} does not exist (yet) on {}",
                        self.config.brokers
                    ),
                    source: None,
                })?;
            let partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            let mut marks = BTreeMap::new();
            for p in &partitions {
                let m = consumer
                    .fetch_watermarks(&topic, *p, REQUEST_TIMEOUT)
                    .map_err(|e| transient(&format!("read the offsets of {topic}/{p}"), e))?;
                marks.insert(*p, m);
            }
            Ok::<_, Error>((partitions, marks))
        })?;
        let mut list = TopicPartitionList::new();
        let mut start = BTreeMap::new();
        for p in &partitions {
            let (low, _) = marks[p];
            let at = match from.get(p) {
                Some(&at) if at < low => {
                    return Err(Error::Config(format!(
                        "{topic}/{p}: offset {at}, where the last version ended, is no longer in the topic \
                         (the first is {low}: retention removed records). Changes are lost: start a new \
                         dataset from a fresh Debezium snapshot"
                    )));
                }
                Some(&at) => at,
                None => low,
            };
            start.insert(*p, at);
            list.add_partition_offset(&topic, *p, Offset::Offset(at))
                .map_err(|e| transient("assign partitions", e))?;
        }
        consumer
            .assign(&list)
            .map_err(|e| transient("assign partitions", e))?;
        tracing::info!(topic, partitions = partitions.len(), from = ?start, "reading the Debezium topic");
        self.partitions = partitions;
        self.read = start.clone();
        self.handed = start;
        self.rows = None;
        self.ops.clear();
        self.time = None;
        self.ready.clear();
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Whether every partition is read to its end, by the high watermarks
    /// librdkafka reports in its statistics (from its fetch responses, which
    /// are right on every broker; tansu 0.6 answers a ListOffsets for the
    /// latest offset with the last batch's first offset).
    fn at_end(&mut self) -> bool {
        let Some(backlog) = self.backlog() else {
            return false;
        };
        self.health.backlog = Some(backlog);
        backlog == 0
    }

    /// Records in the topic not read yet; `None` until every partition's high
    /// watermark is known.
    fn backlog(&self) -> Option<u64> {
        let high = lock(&self.watermarks).clone();
        let mut backlog = 0;
        for p in &self.partitions {
            let h = *high.get(p)?;
            if h < 0 {
                return None;
            }
            backlog += (h - self.read.get(p).copied().unwrap_or(0)).max(0) as u64;
        }
        Some(backlog)
    }

    /// Notes how far the engine has the source when an event goes out.
    fn hand(&mut self, event: SourceEvent) -> SourceEvent {
        if let SourceEvent::Batch(batch) = &event
            && let Position::Kafka { offsets } = &batch.position
        {
            self.handed.clone_from(offsets);
        }
        event
    }

    /// Hands the gathered rows out as a batch.
    fn flush(&mut self) -> Result<()> {
        let Some(rows) = self.rows.as_mut() else {
            return Ok(());
        };
        if rows.is_empty() {
            return Ok(());
        }
        let data = rows
            .finish()
            .map_err(|e| Error::Config(format!("building a batch: {e}")))?;
        if let Some(backlog) = self.backlog() {
            self.health.backlog = Some(backlog);
        }
        self.ready.push_back(SourceEvent::Batch(ChangeBatch {
            data,
            ops: std::mem::take(&mut self.ops),
            kind: BatchKind::Changes,
            position: Position::Kafka {
                offsets: self.read.clone(),
            },
            commit_time: self.time.take(),
            // Debezium records are committed one by one (no transaction metadata).
            end_of_transaction: true,
        }));
        Ok(())
    }

    /// Takes one record. Its offset counts as read only once it is handled,
    /// so a batch handed out before it never claims it.
    async fn on_record(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) -> Result<()> {
        self.health.last_data = Some(Instant::now());
        if self.key.is_empty()
            && let Some(fields) = key.as_deref().and_then(decode::key_fields)
        {
            self.key = fields;
        }
        let decoded = self.decoder.decode(value.as_deref());
        match decoded {
            Ok(Record::Change {
                op,
                columns,
                cells,
                time,
            }) => {
                self.rows_for(&columns)?.append(cells);
                self.ops.push(op);
                self.time = self.time.max(time);
                self.read.insert(partition, offset + 1);
            }
            Ok(Record::Truncate { time }) => {
                self.flush()?;
                self.read.insert(partition, offset + 1);
                if let Some(schema) = self.schema.clone() {
                    self.ready.push_back(SourceEvent::Batch(ChangeBatch {
                        data: arrow::array::RecordBatch::new_empty(schema),
                        ops: Vec::new(),
                        kind: BatchKind::Snapshot,
                        position: Position::Kafka {
                            offsets: self.read.clone(),
                        },
                        commit_time: time,
                        end_of_transaction: true,
                    }));
                }
            }
            Ok(Record::Skip) => {
                self.read.insert(partition, offset + 1);
            }
            Err(reason) => {
                self.flush()?;
                let what = format!("{}/{partition}@{offset}", self.config.topic);
                self.dead_letter(&what, &reason, key, value).await?;
                self.read.insert(partition, offset + 1);
                self.ready.push_back(SourceEvent::Rejected(Rejection {
                    what,
                    reason,
                    moved_to: Some(self.config.dead_letter_topic()),
                }));
            }
        }
        Ok(())
    }

    /// The row builder for `columns`, handing out the rows of the previous
    /// columns first (a schema change starts a new batch).
    fn rows_for(&mut self, columns: &Arc<Columns>) -> Result<&mut RowBuilder> {
        let same = self
            .rows
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r.columns(), columns) || r.columns() == columns);
        if !same {
            self.flush()?;
            self.schema = Some(columns.schema.clone());
            self.rows = Some(RowBuilder::new(columns.clone()));
        }
        self.rows
            .as_mut()
            .ok_or_else(|| Error::Config("no row builder".into()))
    }

    /// Creates the dead-letter topic unless it exists (brokers need not
    /// create topics on first use).
    async fn create_dead_letter_topic(&self, topic: &str) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client()
            .create()
            .map_err(|e| Error::Config(format!("Kafka admin client: {e}")))?;
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(-1))],
                &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
            )
            .await
            .map_err(|e| transient(&format!("create the dead-letter topic {topic}"), e))?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, "created the dead-letter topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::Transient {
                        message: format!("create the dead-letter topic {topic}: {code}"),
                        source: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// Produces an undecodable record to the dead-letter topic, with why.
    async fn dead_letter(
        &mut self,
        what: &str,
        reason: &str,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) -> Result<()> {
        if self.producer.is_none() {
            let mut client = self.config.client();
            client
                .set("enable.idempotence", "true")
                .set("message.timeout.ms", "30000");
            self.producer = Some(client.create().map_err(|e| {
                Error::Config(format!("Kafka producer for the dead-letter topic: {e}"))
            })?);
        }
        let topic = self.config.dead_letter_topic();
        if !self.dead_letter_ready {
            self.create_dead_letter_topic(&topic).await?;
            self.dead_letter_ready = true;
        }
        let Some(producer) = &self.producer else {
            return Ok(());
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "oppen.error",
                value: Some(reason),
            })
            .insert(Header {
                key: "oppen.source",
                value: Some(what),
            });
        let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(&topic).headers(headers);
        if let Some(k) = &key {
            record = record.key(k);
        }
        if let Some(v) = &value {
            record = record.payload(v);
        }
        producer
            .send(record, REQUEST_TIMEOUT)
            .await
            .map_err(|(e, _)| {
                // Not delivered: read the record again after reconnecting.
                self.consumer = None;
                transient(&format!("write {what} to the dead-letter topic {topic}"), e)
            })?;
        tracing::warn!(
            record = what,
            dead_letter_topic = topic,
            reason,
            "undecodable record set aside"
        );
        Ok(())
    }
}

impl Source for DebeziumSource {
    fn key(&self) -> &[String] {
        &self.key
    }

    async fn start(&mut self, resume: Option<Position>) -> Result<()> {
        let from = match resume {
            None => BTreeMap::new(),
            Some(Position::Kafka { offsets }) => offsets,
            Some(other) => {
                return Err(Error::Config(format!(
                    "the dataset's last version was published from another kind of source ({other}); \
                     a Debezium pipeline needs its own dataset"
                )));
            }
        };
        self.consumer = None;
        self.connect(&from).await
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        if let Some(event) = self.ready.pop_front() {
            return Ok(self.hand(event));
        }
        if self.consumer.is_none() {
            // After an error: read again from what the engine has (batches
            // gathered but not handed out are read again).
            let from = self.handed.clone();
            self.connect(&from).await?;
        }
        let started = Instant::now();
        loop {
            let gathering = self.rows.as_ref().is_some_and(|r| !r.is_empty());
            let wait = if gathering {
                Duration::from_millis(5)
            } else {
                IDLE_WAIT
            };
            let Some(consumer) = &self.consumer else {
                return Err(Error::Transient {
                    message: "the Kafka consumer is closed".into(),
                    source: None,
                });
            };
            let received = match tokio::time::timeout(wait, consumer.recv()).await {
                Ok(Ok(m)) => Some((
                    m.partition(),
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                )),
                Ok(Err(e)) => {
                    self.consumer = None;
                    return Err(transient(&format!("read {}", self.config.topic), e));
                }
                Err(_) => None,
            };
            match received {
                Some((partition, offset, key, value)) => {
                    self.quiet_since = None;
                    self.health.behind_since = None;
                    self.on_record(partition, offset, key, value).await?;
                    let full = self.rows.as_ref().is_some_and(|r| r.len() >= MAX_ROWS);
                    if full || started.elapsed() >= GATHER {
                        self.flush()?;
                    }
                }
                None if gathering => self.flush()?,
                None => {
                    if self.ready.is_empty() {
                        if self.at_end() {
                            self.health.behind_since = None;
                            return Ok(SourceEvent::Idle);
                        }
                        // Records wait but none arrive (a broker restarting, a
                        // partition leader moving): say so, and let the engine
                        // commit what it holds.
                        let since = *self.quiet_since.get_or_insert_with(Instant::now);
                        self.health.behind_since.get_or_insert(since);
                        if since.elapsed() >= Duration::from_secs(30) {
                            tracing::warn!(
                                topic = self.config.topic,
                                "the topic has unread records, but none arrive"
                            );
                            self.quiet_since = None;
                            if !self.whole_topic {
                                return Ok(SourceEvent::Idle);
                            }
                        }
                    }
                }
            }
            if let Some(event) = self.ready.pop_front() {
                return Ok(self.hand(event));
            }
        }
    }

    async fn ack(&mut self, position: &Position) -> Result<()> {
        let (Position::Kafka { offsets }, Some(consumer)) = (position, &self.consumer) else {
            return Ok(());
        };
        let mut list = TopicPartitionList::new();
        for (p, at) in offsets {
            list.add_partition_offset(&self.config.topic, *p, Offset::Offset(*at))
                .map_err(|e| transient("commit offsets", e))?;
        }
        // The position in the committed version is what a restart reads from;
        // the group's offsets are for lag tools, so a failed commit only warns.
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            tracing::warn!(topic = self.config.topic, error = %e, "could not commit the consumer group's offsets");
        }
        Ok(())
    }

    fn schema(&self) -> Option<SchemaRef> {
        self.schema.clone()
    }

    fn idle_pause(&self) -> Duration {
        // `next` itself waits for records.
        Duration::ZERO
    }

    fn health(&self) -> SourceHealth {
        self.health.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_property_values() {
        let config: DebeziumConfig = serde_json::from_value(serde_json::json!({
            "brokers": "k:9092",
            "topic": "econ.dbo.invoices",
            "properties": { "sasl.password": "Sasl-Secret-77", "linger.ms": 5 }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("Sasl-Secret-77"), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
        assert_eq!(config.properties["linger.ms"].to_string(), "5");
        assert!(config.validate().is_empty());
        let mut bad = config;
        bad.properties
            .insert("group.id".into(), Property::Text("x".into()));
        assert!(bad.validate()[0].contains("properties.group.id is set by oppen"));
    }
}
