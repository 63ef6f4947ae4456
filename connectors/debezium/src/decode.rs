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

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use oppen_connector_api::Op;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

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

/// A JSON value as the row decoder meets it: scalars borrowed from the
/// record where they can be, objects and arrays as [`Value`].
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Json(Value),
}

impl std::fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "{}", Value::String(s.to_string())),
            Scalar::Json(v) => write!(f, "{v}"),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Int(i))
            }
            fn visit_u64<E>(self, u: u64) -> Result<Scalar<'de>, E> {
                Ok(i64::try_from(u).map_or(Scalar::Float(u as f64), Scalar::Int))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Float(x))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(s)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Scalar<'de>, A::Error> {
                Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Scalar::Json)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Scalar<'de>, A::Error> {
                Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Scalar::Json)
            }
        }
        d.deserialize_any(V)
    }
}

/// A row image's fields in record order.
struct Pairs<'a>(Vec<(Cow<'a, str>, Scalar<'a>)>);

impl<'de> Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Pairs<'de>, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    pairs.push((key, map.next_value::<Scalar<'de>>()?));
                }
                Ok(Pairs(pairs))
            }
        }
        d.deserialize_map(V)
    }
}

fn expect_int(v: &Scalar) -> Result<i64, String> {
    match v {
        Scalar::Int(i) => Ok(*i),
        other => Err(format!("expected an integer, found {}", short(other))),
    }
}

fn short(v: &Scalar) -> String {
    let mut s = v.to_string();
    if s.len() > 40 {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn base64_bytes(v: &Scalar) -> Result<Vec<u8>, String> {
    let Scalar::Str(text) = v else {
        return Err(format!("expected base64 text, found {}", short(v)));
    };
    BASE64
        .decode(text.as_bytes())
        .map_err(|e| format!("invalid base64 `{}`: {e}", short(v)))
}

/// Big-endian two's complement bytes as an integer.
fn unscaled(bytes: &[u8]) -> Result<i128, String> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 16 {
        return Err(format!(
            "a decimal of {} bytes does not fit 38 digits",
            bytes.len()
        ));
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    Ok(i128::from_be_bytes(buf))
}

/// An unscaled integer with a scale, as decimal text.
fn decimal_text(unscaled: i128, scale: i32) -> String {
    if scale <= 0 {
        let mut s = unscaled.to_string();
        if unscaled != 0 {
            s.extend(std::iter::repeat_n('0', scale.unsigned_abs() as usize));
        }
        return s;
    }
    let digits = unscaled.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{}{int}.{frac}", if unscaled < 0 { "-" } else { "" })
}

fn time_text(count: i64, per_second: i64) -> String {
    let seconds = count.div_euclid(per_second);
    let frac = count.rem_euclid(per_second);
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if frac == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        let width = per_second.ilog10() as usize;
        format!("{h:02}:{m:02}:{s:02}.{frac:0width$}")
    }
}

fn cell(kind: &Kind, v: Scalar) -> Result<Cell, String> {
    if v == Scalar::Null {
        return Ok(Cell::Null);
    }
    Ok(match kind {
        Kind::Int => Cell::Int(expect_int(&v)?),
        Kind::Float => Cell::Float(match &v {
            Scalar::Int(i) => *i as f64,
            Scalar::Float(x) => *x,
            // Connect writes NaN and infinities as strings.
            Scalar::Str(s) => s
                .parse()
                .map_err(|_| format!("expected a number, found {}", short(&v)))?,
            _ => return Err(format!("expected a number, found {}", short(&v))),
        }),
        Kind::Bool => match v {
            Scalar::Bool(b) => Cell::Bool(b),
            other => return Err(format!("expected true or false, found {}", short(&other))),
        },
        Kind::Text | Kind::Bytes | Kind::Json => Cell::Text(match v {
            Scalar::Str(s) => s.into_owned(),
            other => other.to_string(),
        }),
        Kind::Decimal { precision, .. } => {
            let n = unscaled(&base64_bytes(&v)?)?;
            if n.unsigned_abs() >= 10u128.pow(u32::from(*precision)) {
                return Err(format!("{n} has more than {precision} digits"));
            }
            Cell::Decimal(n)
        }
        Kind::VariableDecimal => match &v {
            Scalar::Json(Value::Object(o)) => {
                let scale = o
                    .get("scale")
                    .and_then(Value::as_i64)
                    .ok_or("a VariableScaleDecimal without `scale`")?;
                let value = match o.get("value") {
                    Some(Value::String(s)) => Scalar::Str(Cow::Borrowed(s.as_str())),
                    _ => return Err("a VariableScaleDecimal without `value`".to_string()),
                };
                let n = unscaled(&base64_bytes(&value)?)?;
                Cell::Text(decimal_text(n, scale as i32))
            }
            // A Decimal beyond 38 digits arrives as bytes.
            Scalar::Str(_) => Cell::Text(decimal_text(unscaled(&base64_bytes(&v)?)?, 0)),
            other => return Err(format!("expected a decimal, found {}", short(other))),
        },
        Kind::Date => Cell::Date(
            i32::try_from(expect_int(&v)?)
                .map_err(|_| format!("date {} out of range", short(&v)))?,
        ),
        Kind::Time { per_second } => Cell::Text(time_text(expect_int(&v)?, *per_second)),
        Kind::Timestamp { per_second } => {
            let n = expect_int(&v)?;
            Cell::Micros(match per_second {
                1_000 => n
                    .checked_mul(1_000)
                    .ok_or_else(|| format!("timestamp {n} out of range"))?,
                1_000_000 => n,
                // Nanoseconds: published to the microsecond.
                _ => n.div_euclid(1_000),
            })
        }
        Kind::ZonedTimestamp => {
            let Scalar::Str(text) = &v else {
                return Err(format!("expected a zoned timestamp, found {}", short(&v)));
            };
            let t = DateTime::parse_from_rfc3339(text)
                .map_err(|e| format!("`{text}` is not an ISO 8601 timestamp: {e}"))?;
            Cell::Micros(t.with_timezone(&Utc).timestamp_micros())
        }
        Kind::Bits { length } => {
            let bytes = base64_bytes(&v)?;
            // Little-endian bytes: bit 0 is the lowest bit of the first byte.
            let total = if *length > 0 {
                *length
            } else {
                bytes.len() * 8
            };
            let bits: String = (0..total)
                .rev()
                .map(|i| {
                    let set = bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1);
                    if set { '1' } else { '0' }
                })
                .collect();
            Cell::Text(bits)
        }
    })
}

/// Rows of one column set, built into Arrow arrays.
#[derive(Debug)]
pub struct RowBuilder {
    columns: Arc<Columns>,
    builders: Vec<Builder>,
    rows: usize,
}

#[derive(Debug)]
enum Builder {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Text(StringBuilder),
    Decimal(Decimal128Builder, u8, i8),
    Date(Date32Builder),
    Micros(TimestampMicrosecondBuilder),
}

impl RowBuilder {
    /// An empty builder for rows with `columns`.
    pub fn new(columns: Arc<Columns>) -> Self {
        let builders = columns
            .columns
            .iter()
            .map(|c| match c.kind.arrow_type() {
                DataType::Int64 => Builder::Int(Int64Builder::new()),
                DataType::Float64 => Builder::Float(Float64Builder::new()),
                DataType::Boolean => Builder::Bool(BooleanBuilder::new()),
                DataType::Decimal128(p, s) => Builder::Decimal(Decimal128Builder::new(), p, s),
                DataType::Date32 => Builder::Date(Date32Builder::new()),
                DataType::Timestamp(..) => Builder::Micros(TimestampMicrosecondBuilder::new()),
                _ => Builder::Text(StringBuilder::new()),
            })
            .collect();
        RowBuilder {
            columns,
            builders,
            rows: 0,
        }
    }

    /// The columns the rows have.
    pub fn columns(&self) -> &Arc<Columns> {
        &self.columns
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row was appended.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends a decoded row (cells in column order, as [`Decoder::decode`] gives them).
    pub fn append(&mut self, cells: Vec<Cell>) {
        for (builder, cell) in self.builders.iter_mut().zip(cells) {
            match (builder, cell) {
                (Builder::Int(b), Cell::Int(v)) => b.append_value(v),
                (Builder::Float(b), Cell::Float(v)) => b.append_value(v),
                (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (Builder::Text(b), Cell::Text(v)) => b.append_value(v),
                (Builder::Decimal(b, ..), Cell::Decimal(v)) => b.append_value(v),
                (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
                (Builder::Micros(b), Cell::Micros(v)) => b.append_value(v),
                (Builder::Int(b), _) => b.append_null(),
                (Builder::Float(b), _) => b.append_null(),
                (Builder::Bool(b), _) => b.append_null(),
                (Builder::Text(b), _) => b.append_null(),
                (Builder::Decimal(b, ..), _) => b.append_null(),
                (Builder::Date(b), _) => b.append_null(),
                (Builder::Micros(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
    }

    /// The rows as a record batch; the builder is empty afterwards.
    pub fn finish(&mut self) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(|b| -> Result<ArrayRef, arrow::error::ArrowError> {
                Ok(match b {
                    Builder::Int(b) => Arc::new(b.finish()),
                    Builder::Float(b) => Arc::new(b.finish()),
                    Builder::Bool(b) => Arc::new(b.finish()),
                    Builder::Text(b) => Arc::new(b.finish()),
                    Builder::Decimal(b, p, s) => {
                        Arc::new(b.finish().with_precision_and_scale(*p, *s)?)
                    }
                    Builder::Date(b) => Arc::new(b.finish()),
                    Builder::Micros(b) => Arc::new(b.finish().with_timezone("UTC")),
                })
            })
            .collect::<Result<_, _>>()?;
        self.rows = 0;
        arrow::array::RecordBatch::try_new(self.columns.schema.clone(), arrays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../../pipelines/data/debezium/sqlserver-invoices.jsonl");

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
