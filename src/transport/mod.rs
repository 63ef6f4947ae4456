//! The Kafka transport's codec and topic: how classified rows travel between a
//! connector and its publishers when they run in separate processes.
//!
//! A connector (`oppen run --role connector`) captures and classifies, then
//! produces the classified rows to the transport topic, partitioned by `_key`.
//! Publishers (`--role publisher`) consume the topic in a consumer group and
//! commit versions. Only classified rows ever reach the topic. The two role
//! loops live in the runtime; this module holds what they share: the message
//! format ([`Meta`], [`encode`], [`decode`]), the partitioning of rows by key,
//! and the topic's creation.
//!
//! The handshake (DESIGN.md "Transport and scale"):
//! - Every message carries the source position, whether it ends a source
//!   transaction in its partition, and the connector's session. A transaction
//!   that touches a partition ends there with a message marked as its end; a
//!   complete image (snapshot, export file) reaches every partition.
//! - A publisher stages a partition's messages only when the transaction they
//!   belong to has ended in that partition, so a version holds whole
//!   transactions. The version manifest records, per partition, the next
//!   offset and the newest whole transaction's source position (`transport`);
//!   consumer-group offsets are stored only after the version commit.
//! - The connector acknowledges a source position once every message up to it
//!   is acknowledged by the brokers and lies below the offsets the newest
//!   version records. It keeps that position in the state location and resumes
//!   there; what it sends again after a crash is recognised by its position and
//!   skipped by the publishers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, RecordBatch, UInt8Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use chrono::{DateTime, Utc};
use oppen_connector_api::{BatchKind, Op, Position};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::classify::SourceInfo;
use crate::config::KafkaTransport;

/// The column that carries each row's operation in a transport message.
const OP_COLUMN: &str = "_op";

/// Header names.
pub const HEADER_META: &str = "oppen.meta";
/// The schema fingerprint header.
pub const HEADER_SCHEMA: &str = "oppen.schema";

/// What a transport message says besides its rows (the `oppen.meta` header).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The source position reached once the rows are applied.
    pub position: Position,
    /// Whether the rows are part of a complete image.
    pub snapshot: bool,
    /// The last message of a source transaction in this partition.
    pub end: bool,
    /// When the source committed the changes.
    pub time: Option<DateTime<Utc>>,
    /// The connector's session: a transaction a crashed session left
    /// unfinished is dropped when another session's messages follow.
    pub session: u64,
    /// Partitions the connector spreads keys over (for image scopes).
    pub partitions: u32,
    /// The source's description, from the connector's classifier.
    pub source: SourceInfo,
}

impl Meta {
    /// The batch kind.
    pub fn kind(&self) -> BatchKind {
        if self.snapshot {
            BatchKind::Snapshot
        } else {
            BatchKind::Changes
        }
    }
}

/// A fingerprint of a schema: publishers cut a version when it changes, as
/// the embedded engine does when the source's schema changes.
pub fn fingerprint(schema: &Schema) -> String {
    let mut h = Sha256::new();
    for f in schema.fields() {
        h.update(format!("{}:{}:{};", f.name(), f.data_type(), f.is_nullable()).as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Encodes classified rows and their operations as an Arrow IPC stream.
pub fn encode(data: &RecordBatch, ops: &[Op]) -> Result<Vec<u8>, ArrowError> {
    let mut fields: Vec<Arc<Field>> = data.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(OP_COLUMN, DataType::UInt8, false)));
    let mut columns: Vec<ArrayRef> = data.columns().to_vec();
    columns.push(Arc::new(UInt8Array::from_iter_values(
        ops.iter().map(|op| *op as u8),
    )));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())?;
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    Ok(out)
}

/// Decodes a transport message's rows and operations.
pub fn decode(bytes: &[u8]) -> Result<(RecordBatch, Vec<Op>), ArrowError> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let mut batches = Vec::new();
    for batch in reader {
        batches.push(batch?);
    }
    let batch = match batches.len() {
        1 => batches
            .pop()
            .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())),
        _ => arrow::compute::concat_batches(&schema, &batches)?,
    };
    let at = schema
        .index_of(OP_COLUMN)
        .map_err(|_| ArrowError::SchemaError(format!("no {OP_COLUMN} column")))?;
    let ops_array = batch
        .column(at)
        .as_any()
        .downcast_ref::<UInt8Array>()
        .ok_or_else(|| ArrowError::SchemaError(format!("{OP_COLUMN} is not UInt8")))?;
    let ops = ops_array
        .values()
        .iter()
        .map(|v| match v {
            0 => Ok(Op::Insert),
            1 => Ok(Op::Update),
            2 => Ok(Op::Delete),
            3 => Ok(Op::Read),
            other => Err(ArrowError::InvalidArgumentError(format!(
                "unknown operation {other}"
            ))),
        })
        .collect::<Result<Vec<Op>, _>>()?;
    let mut batch = batch;
    batch.remove_column(at);
    Ok((batch, ops))
}

/// Splits classified rows by the transport partition of their `_key`:
/// `(partition, row indices)` for every partition that has rows.
pub fn split_by_partition(
    data: &RecordBatch,
    partitions: u32,
) -> Result<Vec<Vec<u32>>, ArrowError> {
    let keys = crate::publish::state::keys(data)?;
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); partitions as usize];
    for row in 0..data.num_rows() {
        let key = crate::publish::state::key_at(keys, row);
        let p = crate::publish::state::key_partition(&key, partitions);
        rows[p as usize].push(row as u32);
    }
    Ok(rows)
}

/// Takes rows of a batch (and their operations) by index.
pub fn take_rows(
    data: &RecordBatch,
    ops: &[Op],
    rows: &[u32],
) -> Result<(RecordBatch, Vec<Op>), ArrowError> {
    if rows.len() == data.num_rows() {
        return Ok((data.clone(), ops.to_vec()));
    }
    let indices = arrow::array::UInt32Array::from(rows.to_vec());
    let taken = arrow::compute::take_record_batch(data, &indices)?;
    Ok((taken, rows.iter().map(|&r| ops[r as usize]).collect()))
}

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A Kafka client could not be made from the pipeline's settings.
    #[error("Kafka {what}: {source}")]
    Client {
        what: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The brokers could not be reached, or did not do what was asked;
    /// retrying may help.
    #[error(transparent)]
    Brokers(oppen_connector_api::Error),
    /// The brokers refused a message for good.
    #[error("the brokers refused a message for {topic}: {reason}")]
    Refused { topic: String, reason: String },
    /// The producer stopped before every message was acknowledged.
    #[error("the producer for {topic} stopped")]
    ProducerStopped { topic: String },
    /// No partition of the topic was assigned to this publisher.
    #[error(
        "no partition of {topic} was assigned to this publisher within {seconds} s; are \
         there more publishers than partitions?"
    )]
    NoPartition { topic: String, seconds: u64 },
}

impl TransportError {
    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TransportError::Brokers(e) if e.is_retryable())
    }
}

/// A client configuration with the brokers and the passed-through properties.
pub fn client(config: &KafkaTransport) -> rdkafka::ClientConfig {
    oppen_connector_debezium::client_config(&config.brokers, &config.properties)
}

/// How long broker requests (metadata, topic creation) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the topic unless it exists (connector and publishers each do, so
/// whichever starts first creates it with the configured partitions); returns
/// its partition count.
pub async fn ensure_topic<C: rdkafka::client::ClientContext>(
    config: &KafkaTransport,
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<u32, TransportError> {
    let admin: AdminClient<DefaultClientContext> =
        self::client(config)
            .create()
            .map_err(|source| TransportError::Client {
                what: "admin client".into(),
                source,
            })?;
    let results = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                config.partitions,
                TopicReplication::Fixed(-1),
            )],
            &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
        )
        .await
        .map_err(|e| transient(&format!("create the transport topic {topic}"), e))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(
                topic,
                partitions = config.partitions,
                "created the transport topic"
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(TransportError::Brokers(
                    oppen_connector_api::Error::Transient {
                        message: format!("create the transport topic {topic}: {code}"),
                        source: None,
                    },
                ));
            }
        }
    }
    partition_count(client, topic, &config.brokers).await
}

/// The partitions of a topic, by metadata (a topic just created may take a
/// moment to show).
async fn partition_count<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    brokers: &str,
) -> Result<u32, TransportError> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let metadata =
            tokio::task::block_in_place(|| client.fetch_metadata(Some(topic), REQUEST_TIMEOUT))
                .map_err(|e| transient(&format!("reach the brokers {brokers}"), e))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .filter(|n| *n > 0);
        match found {
            Some(n) => return Ok(n),
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => {
                return Err(TransportError::Brokers(
                    oppen_connector_api::Error::Transient {
                        message: format!("topic {topic} does not exist (yet) on {brokers}"),
                        source: None,
                    },
                ));
            }
        }
    }
}

fn transient(what: &str, e: rdkafka::error::KafkaError) -> TransportError {
    TransportError::Brokers(oppen_connector_debezium::transient(what, e))
}

/// Reads a header's value as text.
pub fn header<'a>(
    headers: Option<&'a rdkafka::message::BorrowedHeaders>,
    name: &str,
) -> Option<&'a [u8]> {
    use rdkafka::message::Headers as _;
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{FixedSizeBinaryArray, StringArray};

    fn batch(keys: &[[u8; 32]]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("_key", DataType::FixedSizeBinary(32), false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let names: Vec<Option<String>> = (0..keys.len()).map(|i| Some(format!("n{i}"))).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    FixedSizeBinaryArray::try_from_iter(keys.iter().map(|k| k.to_vec())).unwrap(),
                ),
                Arc::new(StringArray::from(names)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn messages_round_trip_rows_and_operations() {
        let keys: Vec<[u8; 32]> = (0..10u8).map(|i| [i.wrapping_mul(37); 32]).collect();
        let data = batch(&keys);
        let ops: Vec<Op> = (0..10)
            .map(|i| [Op::Insert, Op::Update, Op::Delete, Op::Read][i % 4])
            .collect();
        let bytes = encode(&data, &ops).unwrap();
        let (back, back_ops) = decode(&bytes).unwrap();
        assert_eq!(back, data);
        assert_eq!(back_ops, ops);
        assert_eq!(fingerprint(&back.schema()), fingerprint(&data.schema()));
    }

    #[test]
    fn every_key_lands_in_exactly_one_partition() {
        let keys: Vec<[u8; 32]> = (0..200u32)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_le_bytes());
                k[8..12].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
                k
            })
            .collect();
        let data = batch(&keys);
        let parts = split_by_partition(&data, 4).unwrap();
        let total: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(total, 200);
        for (p, rows) in parts.iter().enumerate() {
            assert!(!rows.is_empty(), "partition {p} got no keys");
            for &r in rows {
                assert_eq!(
                    crate::publish::state::key_partition(&keys[r as usize], 4),
                    p as u32
                );
            }
        }
    }

    #[test]
    fn validation_names_reserved_properties() {
        let t: KafkaTransport = serde_json::from_str(
            r#"{"brokers": "localhost:9092", "properties": {"acks": "1", "compression.type": "zstd"}}"#,
        )
        .unwrap();
        let problems = t.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("acks"));
        assert_eq!(t.topic("fakturor"), "oppen.fakturor");
        assert!(!format!("{t:?}").contains("zstd"));
    }
}
