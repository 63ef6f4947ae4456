//! The contract between oppen's connectors and its engine.
//!
//! A connector turns a source system into a stream of [`SourceEvent`]s. Each
//! [`ChangeBatch`] is columnar (one Arrow [`RecordBatch`] plus one [`Op`] per row)
//! and carries the [`Position`] the source reaches once the batch is applied.
//!
//! Connectors depend on this crate only, never on the engine.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The `Result` of connector operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What happened to a row at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Op {
    /// A new row.
    Insert = 0,
    /// A changed row; the batch holds the row's new image.
    Update = 1,
    /// A removed row; the batch holds at least its key columns.
    Delete = 2,
    /// A row read by a snapshot (initial copy or a full export).
    Read = 3,
}

impl Op {
    /// The lowercase name used in published change files.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Read => "read",
        }
    }
}

/// Where a source is: resumable and totally ordered per source.
///
/// The engine stores the position of the newest change a version holds in that
/// version's manifest, and hands it back to [`Source::start`] after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    /// A PostgreSQL log sequence number.
    Lsn { lsn: u64 },
    /// Kafka offsets per partition: the next offset to read.
    Kafka {
        #[serde(with = "partition_keys")]
        offsets: BTreeMap<i32, i64>,
    },
    /// The last export file fully processed, by name (files sort by name) and content.
    File { name: String, sha256: String },
}

/// Partition numbers as JSON object keys: written as strings, read back as
/// numbers. (An internally tagged enum buffers its fields, and a buffered map
/// key stays a string, so the derived integer keys would not read back.)
mod partition_keys {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<i32, i64>, s: S) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<String, i64>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i32, i64>, D::Error> {
        BTreeMap::<String, i64>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                k.parse::<i32>().map(|k| (k, v)).map_err(|_| {
                    serde::de::Error::custom(format!("partition `{k}` is not a number"))
                })
            })
            .collect()
    }
}

impl Position {
    /// Whether this position includes everything up to `other` (same source kind).
    /// Used when another publisher committed first: if its position is at or
    /// after ours, our staged changes are already published.
    pub fn is_at_or_after(&self, other: &Position) -> bool {
        match (self, other) {
            (Position::Lsn { lsn: a }, Position::Lsn { lsn: b }) => a >= b,
            (Position::File { name: a, .. }, Position::File { name: b, .. }) => a >= b,
            (Position::Kafka { offsets: a }, Position::Kafka { offsets: b }) => b
                .iter()
                .all(|(partition, offset)| a.get(partition).is_some_and(|o| o >= offset)),
            _ => false,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Lsn { lsn } => write!(f, "{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF),
            Position::Kafka { offsets } => {
                let parts: Vec<String> = offsets.iter().map(|(p, o)| format!("{p}:{o}")).collect();
                write!(f, "kafka[{}]", parts.join(","))
            }
            Position::File { name, sha256 } => {
                write!(f, "{name} (sha256 {})", &sha256[..sha256.len().min(12)])
            }
        }
    }
}

/// What a batch's rows mean together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Individual changes, applied as upserts and deletes on the key.
    Changes,
    /// Part of a complete image of the table. All `Snapshot` batches up to and
    /// including the one with [`ChangeBatch::end_of_transaction`] set are the whole
    /// table: keys the engine holds that the image lacks are deleted.
    Snapshot,
}

/// One columnar batch of rows from one source table.
///
/// Invariants: `ops.len() == data.num_rows()`; the key columns named by the
/// source are present in `data`; a `Delete` carries at least its key columns.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    /// The rows, in source column order.
    pub data: RecordBatch,
    /// One operation per row.
    pub ops: Vec<Op>,
    /// What the rows mean together.
    pub kind: BatchKind,
    /// The source position reached once this batch is applied.
    pub position: Position,
    /// When the source committed these changes, where the source knows it.
    pub commit_time: Option<DateTime<Utc>>,
    /// True when a version may end after this batch: a version never holds half a
    /// source transaction (or half an export file).
    pub end_of_transaction: bool,
}

impl ChangeBatch {
    /// The number of rows.
    pub fn num_rows(&self) -> usize {
        self.data.num_rows()
    }
}

/// Input that a source set aside instead of emitting, with why.
///
/// The engine counts these; the connector has already stored the input in its
/// dead-letter location (for files, next to a reason file).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// What was rejected: a file name, or a file name with a line.
    pub what: String,
    /// Why, with file, line and column where known, and what to do.
    pub reason: String,
    /// Where the rejected input now is.
    pub moved_to: Option<String>,
}

/// What a source reports from [`Source::next`].
#[derive(Debug)]
pub enum SourceEvent {
    /// Rows to apply.
    Batch(ChangeBatch),
    /// Input set aside; the source goes on.
    Rejected(Rejection),
    /// Nothing more is available now; ask again later.
    Idle,
}

/// A column type a steward may ask for, or a source infers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ColumnType {
    /// 64-bit signed integer.
    Integer,
    /// Exact decimal with a precision and scale.
    Decimal { precision: u8, scale: i8 },
    /// 64-bit floating point.
    Float,
    /// A calendar date.
    Date,
    /// A point in time (UTC, microseconds).
    Timestamp,
    /// true/false.
    Boolean,
    /// UTF-8 text.
    Text,
}

impl ColumnType {
    /// The Arrow type a column of this type has.
    pub fn arrow_type(self) -> DataType {
        match self {
            ColumnType::Integer => DataType::Int64,
            ColumnType::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            ColumnType::Float => DataType::Float64,
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Text => DataType::Utf8,
        }
    }

    /// The type of an Arrow column, where it is one oppen knows.
    pub fn from_arrow(data_type: &DataType) -> Option<Self> {
        Some(match data_type {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => ColumnType::Integer,
            DataType::Decimal128(p, s) => ColumnType::Decimal {
                precision: *p,
                scale: *s,
            },
            DataType::Float32 | DataType::Float64 => ColumnType::Float,
            DataType::Date32 => ColumnType::Date,
            DataType::Timestamp(_, _) => ColumnType::Timestamp,
            DataType::Boolean => ColumnType::Boolean,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnType::Text,
            _ => return None,
        })
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Integer => f.write_str("integer"),
            ColumnType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            ColumnType::Float => f.write_str("float"),
            ColumnType::Date => f.write_str("date"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::Boolean => f.write_str("boolean"),
            ColumnType::Text => f.write_str("text"),
        }
    }
}

impl std::str::FromStr for ColumnType {
    type Err = String;

    /// Parses `integer`, `decimal(18,2)`, `float`, `date`, `timestamp`, `boolean`, `text`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let simple = match t.as_str() {
            "integer" | "int" | "bigint" => Some(ColumnType::Integer),
            "float" | "double" => Some(ColumnType::Float),
            "date" => Some(ColumnType::Date),
            "timestamp" => Some(ColumnType::Timestamp),
            "boolean" | "bool" => Some(ColumnType::Boolean),
            "text" | "string" => Some(ColumnType::Text),
            "decimal" => Some(ColumnType::Decimal {
                precision: 38,
                scale: 2,
            }),
            _ => None,
        };
        if let Some(t) = simple {
            return Ok(t);
        }
        let args = t
            .strip_prefix("decimal(")
            .and_then(|rest| rest.strip_suffix(')'))
            .ok_or_else(|| {
                format!(
                    "unknown type `{s}`; expected integer, decimal(P,S), float, date, timestamp, \
                     boolean or text"
                )
            })?;
        let (p, s_) = args.split_once([',', ' ']).ok_or_else(|| {
            format!("`{s}`: decimal needs a precision and a scale, e.g. decimal(18,2)")
        })?;
        let precision: u8 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: precision must be a number from 1 to 38"))?;
        let scale: i8 = s_
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: scale must be a number from 0 to the precision"))?;
        if !(1..=38).contains(&precision) || scale < 0 || scale as u8 > precision {
            return Err(format!(
                "`{s}`: precision must be 1..=38 and scale 0..=precision"
            ));
        }
        Ok(ColumnType::Decimal { precision, scale })
    }
}

/// The types of a schema's columns that oppen knows, keyed by column name (what
/// a version records as its source's types).
pub fn known_types(schema: &arrow::datatypes::Schema) -> BTreeMap<String, ColumnType> {
    schema
        .fields()
        .iter()
        .filter_map(|f| ColumnType::from_arrow(f.data_type()).map(|t| (f.name().clone(), t)))
        .collect()
}

/// What the engine tells a source before it starts.
#[derive(Debug, Clone, Default)]
pub struct SourceHints {
    /// Types stewards set in the rules, by source column name.
    pub column_types: BTreeMap<String, ColumnType>,
    /// Types the dataset already publishes, by source column name, so that a
    /// source that infers types keeps them stable across restarts.
    pub known_types: BTreeMap<String, ColumnType>,
}

/// Errors from connectors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source configuration cannot work (missing folder, bad credentials, ...).
    /// Retrying will not help.
    #[error("{0}")]
    Config(String),
    /// A transient failure (network, busy file); retrying may help.
    #[error("{message}")]
    Transient {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the operation may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config(_) => false,
            Error::Transient { .. } => true,
            Error::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::InvalidData
            ),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// A source of changes for one table.
///
/// Contract:
/// - **Ordering**: batches come in source order; positions never move backward.
/// - **Duplicates**: after a restart the source may emit changes again from the
///   position it is started at. The engine absorbs them (idempotent upserts on the
///   key), so a source must never skip, but may repeat.
/// - **Durability**: a source must not consider input consumed (slot feedback,
///   offset commit, file marked done) until [`Source::ack`] is called with a
///   position at or after it. `ack` is only called for positions held by a
///   durably committed version, or for positions whose changes alter nothing
///   that version publishes (so that version already is their result).
/// - **Transactions**: a version never ends inside a batch sequence whose last
///   batch has not set `end_of_transaction`.
pub trait Source: Send {
    /// The key columns, in order.
    fn key(&self) -> &[String];

    /// Starts reading after `resume` (the position of the newest committed
    /// version), or from the beginning when there is none.
    fn start(&mut self, resume: Option<Position>) -> impl Future<Output = Result<()>> + Send;

    /// The next event. Returns [`SourceEvent::Idle`] rather than waiting long
    /// when nothing is available; the engine then pauses for [`Source::idle_pause`].
    fn next(&mut self) -> impl Future<Output = Result<SourceEvent>> + Send;

    /// Everything up to and including `position` is durably committed.
    fn ack(&mut self, position: &Position) -> impl Future<Output = Result<()>> + Send;

    /// The schema of the rows this source emits, once known.
    fn schema(&self) -> Option<SchemaRef>;

    /// How long the engine waits after [`SourceEvent::Idle`] before asking
    /// again. A source that waits for input inside `next` (a replication
    /// stream) returns zero.
    fn idle_pause(&self) -> std::time::Duration {
        DEFAULT_IDLE_PAUSE
    }

    /// What the source knows about its upstream, for health checks and
    /// metrics; sources that know nothing keep the default.
    fn health(&self) -> SourceHealth {
        SourceHealth::default()
    }
}

/// How long the engine waits after an idle report, unless the source says otherwise.
pub const DEFAULT_IDLE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A source's view of its upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceHealth {
    /// Since when the source has known that the upstream holds changes it has
    /// not received yet; `None` when it has everything, or cannot tell.
    pub behind_since: Option<std::time::Instant>,
    /// When data last arrived from the upstream.
    pub last_data: Option<std::time::Instant>,
    /// Bytes the upstream retains for this source (a replication slot's WAL).
    pub retained_bytes: Option<u64>,
    /// Messages the upstream holds that the source has not read (Kafka
    /// consumer lag).
    pub backlog: Option<u64>,
    /// About how many rows the image being read holds (a table's row
    /// estimate during its snapshot), so the engine can size its key index
    /// once instead of growing it step by step.
    pub image_rows: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_column_types() {
        assert_eq!(
            "decimal(18,2)".parse::<ColumnType>(),
            Ok(ColumnType::Decimal {
                precision: 18,
                scale: 2
            })
        );
        assert_eq!("Integer".parse::<ColumnType>(), Ok(ColumnType::Integer));
        assert!("decimal(18)".parse::<ColumnType>().is_err());
        assert!("decimal(40,2)".parse::<ColumnType>().is_err());
        assert!(
            "money"
                .parse::<ColumnType>()
                .unwrap_err()
                .contains("unknown type")
        );
    }

    #[test]
    fn kafka_positions_read_back() {
        let p = Position::Kafka {
            offsets: [(0, 5), (12, 7)].into(),
        };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(text, r#"{"kind":"kafka","offsets":{"0":5,"12":7}}"#);
        assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), p);
    }

    #[test]
    fn orders_positions() {
        let file = |n: &str| Position::File {
            name: n.into(),
            sha256: String::new(),
        };
        assert!(file("export-02").is_at_or_after(&file("export-01")));
        assert!(file("export-01").is_at_or_after(&file("export-01")));
        assert!(!file("export-01").is_at_or_after(&file("export-02")));
        assert!(Position::Lsn { lsn: 9 }.is_at_or_after(&Position::Lsn { lsn: 3 }));
        let kafka = |o: &[(i32, i64)]| Position::Kafka {
            offsets: o.iter().copied().collect(),
        };
        assert!(kafka(&[(0, 5), (1, 7)]).is_at_or_after(&kafka(&[(0, 5), (1, 6)])));
        assert!(!kafka(&[(0, 5)]).is_at_or_after(&kafka(&[(0, 5), (1, 6)])));
        assert!(!Position::Lsn { lsn: 1 }.is_at_or_after(&file("a")));
    }

    #[test]
    fn displays_positions() {
        assert_eq!(Position::Lsn { lsn: 0x1_0000_00FF }.to_string(), "1/FF");
    }
}
