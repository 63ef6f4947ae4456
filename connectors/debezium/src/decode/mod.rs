//! Debezium change records (Kafka Connect JSON converter, with or without
//! schemas) decoded into typed rows.
//!
//! A record's value is the change envelope: `before`, `after`, `op`
//! (c/u/d/r/t), `source` and `ts_ms`; with schemas enabled it is wrapped as
//! `{"schema": ..., "payload": ...}`. Every record of a schemas-enabled topic
//! repeats its schema, so the schema is kept as raw text and parsed only when
//! it differs from the previous record's. Logical types are decoded from the
//! schema; without a schema, column types are inferred from the values.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, Utc};
use oppen_connector_api::Op;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

mod cell;
mod rows;
mod scalar;

use self::cell::cell;
pub use self::rows::RowBuilder;
use self::scalar::Pairs;
pub use self::scalar::Scalar;

/// How a column's values are encoded in the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// int8/16/32/64.
    Int,
    /// float32/64.
    Float,
    /// boolean.
    Bool,
    /// string (also enums, UUIDs, XML, zoned times).
    Text,
    /// bytes without a logical type: kept as their base64 text.
    Bytes,
    /// JSON (`io.debezium.data.Json`) or a struct, array or map: JSON text.
    Json,
    /// `org.apache.kafka.connect.data.Decimal`: base64 big-endian unscaled bytes.
    Decimal { precision: u8, scale: i8 },
    /// `io.debezium.data.VariableScaleDecimal`: `{scale, value}`, as decimal text.
    VariableDecimal,
    /// Days since the epoch (`io.debezium.time.Date`, Connect `Date`).
    Date,
    /// Time of day as an integer count of `1/per_second` seconds.
    Time { per_second: i64 },
    /// A point in time as an integer count of `1/per_second` seconds since the epoch.
    Timestamp { per_second: i64 },
    /// `io.debezium.time.ZonedTimestamp`: ISO 8601 text with an offset.
    ZonedTimestamp,
    /// `io.debezium.data.Bits`: base64 little-endian bytes, as a string of 0 and 1.
    Bits { length: usize },
}

impl Kind {
    fn arrow_type(&self) -> DataType {
        match self {
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Bool => DataType::Boolean,
            Kind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            Kind::Date => DataType::Date32,
            Kind::Timestamp { .. } | Kind::ZonedTimestamp => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            Kind::Text
            | Kind::Bytes
            | Kind::Json
            | Kind::VariableDecimal
            | Kind::Time { .. }
            | Kind::Bits { .. } => DataType::Utf8,
        }
    }
}

/// A column of the change rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
}

/// The columns of a table as the records describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub columns: Vec<Column>,
    /// The Arrow schema of rows with these columns.
    pub schema: SchemaRef,
    /// Column positions by name.
    index: std::collections::HashMap<String, usize>,
}

impl Columns {
    fn new(columns: Vec<Column>) -> Self {
        let fields: Vec<ArrowField> = columns
            .iter()
            .map(|c| ArrowField::new(&c.name, c.kind.arrow_type(), true))
            .collect();
        Columns {
            schema: Arc::new(Schema::new(fields)),
            index: columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
            columns,
        }
    }
}

/// One value of a row, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Decimal(i128),
    Date(i32),
    /// Microseconds since the epoch, UTC.
    Micros(i64),
}

/// What one record says.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A row changed: its new image (its old one for a delete).
    Change {
        op: Op,
        columns: Arc<Columns>,
        cells: Vec<Cell>,
        /// When the source committed the change (`source.ts_ms`).
        time: Option<DateTime<Utc>>,
    },
    /// The table was truncated.
    Truncate { time: Option<DateTime<Utc>> },
    /// A tombstone (null value) or a message that changes no row.
    Skip,
}

/// Decodes records, remembering the newest schema.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The raw text of the newest schema and what it decoded to.
    schema: Option<(String, Arc<Columns>)>,
    /// The columns inferred from schemaless records.
    inferred: Option<Arc<Columns>>,
}

#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<&'a RawValue>,
    #[serde(default)]
    op: Option<Cow<'a, str>>,
    #[serde(default)]
    source: Option<SourceInfo>,
    #[serde(default)]
    ts_ms: Option<i64>,
}

#[derive(Deserialize)]
struct SourceInfo {
    #[serde(default)]
    ts_ms: Option<i64>,
}

#[derive(Deserialize)]
struct ConnectSchema {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    fields: Vec<ConnectSchema>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
}

impl Decoder {
    /// A decoder with no schema seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes a record's value (`None`: a tombstone). The error says what is wrong.
    pub fn decode(&mut self, value: Option<&[u8]>) -> Result<Record, String> {
        let Some(bytes) = value else {
            return Ok(Record::Skip);
        };
        if bytes.is_empty() {
            return Ok(Record::Skip);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        if let Some((schema, payload)) = self.split_known(text)
            && let Ok(envelope) = serde_json::from_str::<Envelope>(payload)
        {
            return self.change(Some(schema), &envelope);
        }
        let wrapped: Wrapped = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let (schema, payload) = match (wrapped.schema, wrapped.payload) {
            (schema, Some(payload)) => (schema.map(RawValue::get), payload.get()),
            // No `payload`: schemas are disabled and the value is the envelope.
            (_, None) => (None, text),
        };
        if payload == "null" {
            return Ok(Record::Skip);
        }
        let envelope: Envelope = serde_json::from_str(payload)
            .map_err(|e| format!("not a Debezium change envelope: {e}"))?;
        self.change(schema, &envelope)
    }

    /// The schema and payload texts of a record that repeats the newest
    /// schema byte for byte, as the JSON converter writes every record of a
    /// table: found without scanning the schema. `None` otherwise (the full
    /// parse decides then).
    fn split_known<'t>(&self, text: &'t str) -> Option<(&'t str, &'t str)> {
        let (raw, _) = self.schema.as_ref()?;
        let rest = text.strip_prefix("{\"schema\":")?;
        let after_schema = rest.strip_prefix(raw.as_str())?;
        let payload = after_schema
            .strip_prefix(",\"payload\":")?
            .trim_end()
            .strip_suffix('}')?;
        Some((&rest[..raw.len()], payload))
    }

    fn change(&mut self, schema: Option<&str>, envelope: &Envelope) -> Result<Record, String> {
        let time = envelope
            .source
            .as_ref()
            .and_then(|s| s.ts_ms)
            .or(envelope.ts_ms)
            .and_then(DateTime::from_timestamp_millis);
        let op = match envelope.op.as_deref() {
            Some("c") => Op::Insert,
            Some("u") => Op::Update,
            Some("d") => Op::Delete,
            Some("r") => Op::Read,
            Some("t") => return Ok(Record::Truncate { time }),
            // A logical decoding message: no row changes.
            Some("m") => return Ok(Record::Skip),
            Some(other) => return Err(format!("unknown op `{other}`")),
            None => return Err("the envelope has no `op`".to_string()),
        };
        let image = if op == Op::Delete {
            envelope.before
        } else {
            envelope.after
        };
        let Some(image) = image.filter(|i| i.get() != "null") else {
            let which = if op == Op::Delete { "before" } else { "after" };
            return Err(format!(
                "op `{}` without `{which}`",
                envelope.op.as_deref().unwrap_or("")
            ));
        };
        let Pairs(pairs) = serde_json::from_str(image.get())
            .map_err(|e| format!("the row image is not a JSON object: {e}"))?;
        let columns = match schema {
            Some(schema) if schema != "null" => self.schema_columns(schema)?,
            _ => self.inferred_columns(&pairs),
        };
        let mut values: Vec<Scalar> = Vec::new();
        values.resize_with(columns.columns.len(), || Scalar::Null);
        for (name, value) in pairs {
            if let Some(&i) = columns.index.get(name.as_ref()) {
                values[i] = value;
            }
        }
        let mut cells = Vec::with_capacity(columns.columns.len());
        for (column, value) in columns.columns.iter().zip(values) {
            cells.push(
                cell(&column.kind, value).map_err(|e| format!("column `{}`: {e}", column.name))?,
            );
        }
        Ok(Record::Change {
            op,
            columns,
            cells,
            time,
        })
    }

    fn schema_columns(&mut self, raw: &str) -> Result<Arc<Columns>, String> {
        if let Some((text, columns)) = &self.schema
            && text == raw
        {
            return Ok(columns.clone());
        }
        let schema: ConnectSchema =
            serde_json::from_str(raw).map_err(|e| format!("the schema is not valid: {e}"))?;
        let image = schema
            .fields
            .iter()
            .find(|f| f.field.as_deref() == Some("after"))
            .or_else(|| {
                schema
                    .fields
                    .iter()
                    .find(|f| f.field.as_deref() == Some("before"))
            })
            .ok_or("the schema has no `after` or `before` field")?;
        let columns = image
            .fields
            .iter()
            .map(|f| {
                Ok(Column {
                    name: f.field.clone().ok_or("a schema field has no name")?,
                    kind: kind_of(f)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let columns = Arc::new(Columns::new(columns));
        self.schema = Some((raw.to_string(), columns.clone()));
        Ok(columns)
    }

    /// Columns from a schemaless row: kinds follow the values, widening an
    /// integer column to float and anything inconsistent to text.
    fn inferred_columns(&mut self, row: &[(Cow<'_, str>, Scalar<'_>)]) -> Arc<Columns> {
        let mut columns: Vec<Column> = self
            .inferred
            .as_ref()
            .map(|c| c.columns.clone())
            .unwrap_or_default();
        let mut changed = false;
        for (name, value) in row {
            let seen = match value {
                Scalar::Null => None,
                Scalar::Bool(_) => Some(Kind::Bool),
                Scalar::Int(_) => Some(Kind::Int),
                Scalar::Float(_) => Some(Kind::Float),
                Scalar::Str(_) => Some(Kind::Text),
                Scalar::Json(_) => Some(Kind::Json),
            };
            match columns.iter_mut().find(|c| c.name == *name) {
                None => {
                    columns.push(Column {
                        name: name.to_string(),
                        kind: seen.unwrap_or(Kind::Text),
                    });
                    changed = true;
                }
                Some(column) => {
                    let Some(seen) = seen else { continue };
                    let wider = match (&column.kind, &seen) {
                        (a, b) if a == b => None,
                        (Kind::Int, Kind::Float) => Some(Kind::Float),
                        (Kind::Float, Kind::Int) | (Kind::Text, _) => None,
                        _ => Some(Kind::Text),
                    };
                    if let Some(kind) = wider {
                        column.kind = kind;
                        changed = true;
                    }
                }
            }
        }
        match &self.inferred {
            Some(c) if !changed => c.clone(),
            _ => {
                let c = Arc::new(Columns::new(columns));
                self.inferred = Some(c.clone());
                c
            }
        }
    }
}

/// The record key's field names (the default key of the dataset).
pub fn key_fields(key: &[u8]) -> Option<Vec<String>> {
    let value: Value = serde_json::from_slice(key).ok()?;
    let payload = match value.get("payload") {
        Some(p) if value.get("schema").is_some() => p,
        _ => &value,
    };
    Some(payload.as_object()?.keys().cloned().collect())
}

fn kind_of(f: &ConnectSchema) -> Result<Kind, String> {
    let param = |name: &str| -> Option<String> {
        f.parameters.as_ref()?.get(name).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    Ok(match f.name.as_deref() {
        Some("org.apache.kafka.connect.data.Decimal") => {
            let scale: i8 = param("scale")
                .unwrap_or_else(|| "0".into())
                .parse()
                .map_err(|_| "a Decimal's scale is not a number".to_string())?;
            let precision: u8 = param("connect.decimal.precision")
                .and_then(|p| p.parse().ok())
                .unwrap_or(38);
            if precision > 38 || scale < 0 || scale as u8 > precision.max(1) {
                Kind::VariableDecimal
            } else {
                Kind::Decimal {
                    precision: precision.max(1),
                    scale,
                }
            }
        }
        Some("io.debezium.data.VariableScaleDecimal") => Kind::VariableDecimal,
        Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => Kind::Date,
        Some("io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => {
            Kind::Time { per_second: 1_000 }
        }
        Some("io.debezium.time.MicroTime") => Kind::Time {
            per_second: 1_000_000,
        },
        Some("io.debezium.time.NanoTime") => Kind::Time {
            per_second: 1_000_000_000,
        },
        Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
            Kind::Timestamp { per_second: 1_000 }
        }
        Some("io.debezium.time.MicroTimestamp") => Kind::Timestamp {
            per_second: 1_000_000,
        },
        Some("io.debezium.time.NanoTimestamp") => Kind::Timestamp {
            per_second: 1_000_000_000,
        },
        Some("io.debezium.time.ZonedTimestamp") => Kind::ZonedTimestamp,
        Some("io.debezium.data.Bits") => Kind::Bits {
            length: param("length").and_then(|l| l.parse().ok()).unwrap_or(0),
        },
        Some("io.debezium.data.Json") => Kind::Json,
        _ => match f.kind.as_str() {
            "int8" | "int16" | "int32" | "int64" => Kind::Int,
            "float" | "float32" | "float64" | "double" => Kind::Float,
            "boolean" => Kind::Bool,
            "string" => Kind::Text,
            "bytes" => Kind::Bytes,
            "struct" | "array" | "map" => Kind::Json,
            other => return Err(format!("unknown schema type `{other}`")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::cell::decimal_text;
    use super::*;

    const SAMPLE: &str =
        include_str!("../../../../pipelines/data/debezium/sqlserver-invoices.jsonl");

    fn value_of(line: &str) -> Option<String> {
        let record: Value = serde_json::from_str(line).unwrap();
        match &record["value"] {
            Value::Null => None,
            v => Some(v.to_string()),
        }
    }

    #[test]
    fn decodes_the_sample_topic() {
        let mut decoder = Decoder::new();
        let (mut changes, mut skipped) = (0, 0);
        let first = value_of(SAMPLE.lines().next().unwrap()).unwrap();
        let Record::Change {
            op,
            cells,
            columns,
            time,
        } = decoder.decode(Some(first.as_bytes())).unwrap()
        else {
            panic!("not a change")
        };
        assert_eq!(op, Op::Read);
        let names: Vec<&str> = columns.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "invoice_id",
                "supplier_name",
                "supplier_org_nr",
                "amount_sek",
                "invoice_date",
                "registered_at",
                "note"
            ]
        );
        assert_eq!(cells[0], Cell::Int(100000));
        // "AvYP" = 0x02F60F = 194063 → 1940.63 at scale 2.
        assert_eq!(cells[3], Cell::Decimal(194_063));
        assert_eq!(cells[4], Cell::Date(20148));
        assert_eq!(cells[5], Cell::Micros(1_740_787_200_000_000));
        assert_eq!(time, DateTime::from_timestamp_millis(1_740_787_200_000));
        for line in SAMPLE.lines() {
            let value = value_of(line);
            let value = value.as_deref().map(str::as_bytes);
            // A warm decoder (schema known: the fast path) and a cold one agree.
            assert_eq!(decoder.decode(value), Decoder::new().decode(value));
            match decoder.decode(value).unwrap() {
                Record::Change { .. } => changes += 1,
                Record::Skip => skipped += 1,
                Record::Truncate { .. } => panic!("no truncate in the sample"),
            }
        }
        assert_eq!((changes, skipped), (400, 65));
    }

    #[test]
    fn decodes_logical_types() {
        let schema = r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
            {"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"neg"},
            {"type":"struct","name":"io.debezium.data.VariableScaleDecimal","field":"var"},
            {"type":"int32","name":"io.debezium.time.Time","field":"t_ms"},
            {"type":"int64","name":"io.debezium.time.MicroTime","field":"t_us"},
            {"type":"int64","name":"io.debezium.time.Timestamp","field":"ts_ms"},
            {"type":"int64","name":"io.debezium.time.NanoTimestamp","field":"ts_ns"},
            {"type":"string","name":"io.debezium.time.ZonedTimestamp","field":"zoned"},
            {"type":"bytes","name":"io.debezium.data.Bits","parameters":{"length":"10"},"field":"bits"},
            {"type":"string","name":"io.debezium.data.Json","field":"doc"},
            {"type":"boolean","field":"flag"},
            {"type":"float64","field":"ratio"}]}]}"#;
        let payload = r#"{"before":null,"after":{
            "neg":"/zg=","var":{"scale":3,"value":"MDk="},"t_ms":3723004,"t_us":3723000005,
            "ts_ms":1700000000123,"ts_ns":1700000000123456789,"zoned":"2025-03-01T10:00:00+01:00",
            "bits":"BQI=","doc":"{\"a\":1}","flag":true,"ratio":0.25},"op":"c","source":{"ts_ms":1}}"#;
        let value = format!(r#"{{"schema":{schema},"payload":{payload}}}"#);
        let Record::Change { cells, columns, .. } =
            Decoder::new().decode(Some(value.as_bytes())).unwrap()
        else {
            panic!()
        };
        // 0xFF38 = -200 → -2.00.
        assert_eq!(cells[0], Cell::Decimal(-200));
        assert_eq!(
            columns.schema.field(0).data_type(),
            &DataType::Decimal128(10, 2)
        );
        // 0x3039 = 12345 at scale 3.
        assert_eq!(cells[1], Cell::Text("12.345".into()));
        assert_eq!(cells[2], Cell::Text("01:02:03.004".into()));
        assert_eq!(cells[3], Cell::Text("01:02:03.000005".into()));
        assert_eq!(cells[4], Cell::Micros(1_700_000_000_123_000));
        assert_eq!(cells[5], Cell::Micros(1_700_000_000_123_456));
        assert_eq!(cells[6], Cell::Micros(1_740_819_600_000_000));
        // Bytes 05 02, little-endian, 10 bits: 10 0000 0101.
        assert_eq!(cells[7], Cell::Text("1000000101".into()));
        assert_eq!(cells[8], Cell::Text("{\"a\":1}".into()));
        assert_eq!(cells[9], Cell::Bool(true));
        assert_eq!(cells[10], Cell::Float(0.25));
        let mut rows = RowBuilder::new(columns);
        rows.append(cells);
        assert_eq!(rows.finish().unwrap().num_rows(), 1);
    }

    #[test]
    fn schemaless_records_infer_and_widen_types() {
        let mut d = Decoder::new();
        let a = br#"{"before":null,"after":{"id":1,"n":2,"s":"x"},"op":"c"}"#;
        let b = br#"{"before":null,"after":{"id":2,"n":2.5,"s":"y","new":true},"op":"u"}"#;
        let Record::Change { columns: ca, .. } = d.decode(Some(a)).unwrap() else {
            panic!()
        };
        let Record::Change {
            columns: cb, cells, ..
        } = d.decode(Some(b)).unwrap()
        else {
            panic!()
        };
        assert_eq!(ca.columns[1].kind, Kind::Int);
        assert_eq!(cb.columns[1].kind, Kind::Float);
        assert_eq!(cb.columns.len(), 4);
        assert_eq!(cells[3], Cell::Bool(true));
        let Record::Change { columns: cc, .. } = d.decode(Some(a)).unwrap() else {
            panic!()
        };
        assert!(Arc::ptr_eq(&cb, &cc), "an unchanged schema is shared");
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let mut d = Decoder::new();
        let cases: [(&[u8], &str); 5] = [
            (b"{not json", "not JSON"),
            (
                br#"{"before":null,"after":{"id":1},"op":"x"}"#,
                "unknown op `x`",
            ),
            (
                br#"{"before":null,"after":null,"op":"c"}"#,
                "without `after`",
            ),
            (br#"{"after":{"id":1}}"#, "no `op`"),
            (b"\xff\xfe", "not UTF-8"),
        ];
        for (input, expected) in cases {
            let e = d.decode(Some(input)).unwrap_err();
            assert!(e.contains(expected), "{e}");
        }
        let schema = r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
            {"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"},"field":"amount"}]}]}"#;
        let value =
            format!(r#"{{"schema":{schema},"payload":{{"after":{{"amount":"!!"}},"op":"c"}}}}"#);
        let e = d.decode(Some(value.as_bytes())).unwrap_err();
        assert!(e.contains("column `amount`: invalid base64"), "{e}");
        assert_eq!(d.decode(None).unwrap(), Record::Skip);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Decoder::new().decode(Some(&bytes));
        }
    }

    #[test]
    fn decimal_text_places_the_point() {
        assert_eq!(decimal_text(12345, 3), "12.345");
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(decimal_text(7, 0), "7");
        assert_eq!(decimal_text(7, -2), "700");
    }
}
