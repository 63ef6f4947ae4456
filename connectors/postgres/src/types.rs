//! PostgreSQL types to Arrow: which Arrow type a column gets, and builders that
//! append values in the binary COPY form (snapshot) or the text form (stream).
//!
//! Both paths must give the same value for the same datum, so that a row read
//! by the snapshot and the same row changed later publish alike. Types without
//! a fast binary path are read as text in both (`::text` in the snapshot's
//! COPY, and the stream's text form, under the same DateStyle, IntervalStyle,
//! TimeZone and float settings).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};
use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

use crate::wire::PG_EPOCH_OFFSET_US;

/// Days between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// How a column is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// numeric with a declared precision ≤ 38 and scale.
    Numeric {
        precision: u8,
        scale: i8,
    },
    /// text, varchar, bpchar, name, json, enums: UTF-8 bytes as they are.
    Text,
    /// jsonb: binary form is a version byte and the text.
    Jsonb,
    Uuid,
    Date,
    Timestamp,
    TimestampTz,
    /// An array: the server's text form, published as JSON text.
    Array(Element),
    /// Everything else: the server's text form (intervals, times, bytea,
    /// unconstrained numeric, network types, ...).
    Other,
}

/// How array elements appear in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// Numbers (integers, floats, numeric): JSON numbers.
    Number,
    /// Booleans: JSON true/false.
    Bool,
    /// Everything else: JSON strings.
    Text,
}

impl Kind {
    /// The kind of a base type OID with its modifier (domains resolved by the caller).
    pub fn of(oid: u32, typmod: i32, is_enum: bool) -> Kind {
        match oid {
            16 => Kind::Bool,
            21 => Kind::Int2,
            23 => Kind::Int4,
            20 => Kind::Int8,
            700 => Kind::Float4,
            701 => Kind::Float8,
            1700 => {
                // typmod = ((precision << 16) | scale) + 4; -1 when unconstrained.
                if typmod >= 4 {
                    let t = typmod - 4;
                    let precision = (t >> 16) & 0xFFFF;
                    let scale = t & 0xFFFF;
                    if (1..=38).contains(&precision) && scale <= precision {
                        return Kind::Numeric {
                            precision: precision as u8,
                            scale: scale as i8,
                        };
                    }
                }
                Kind::Other
            }
            25 | 1043 | 1042 | 19 | 114 | 18 => Kind::Text,
            3802 => Kind::Jsonb,
            2950 => Kind::Uuid,
            1082 => Kind::Date,
            1114 => Kind::Timestamp,
            1184 => Kind::TimestampTz,
            _ if is_enum => Kind::Text,
            _ => Kind::Other,
        }
    }

    /// The Arrow type of a column of this kind.
    pub fn arrow_type(self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int2 | Kind::Int4 | Kind::Int8 => DataType::Int64,
            Kind::Float4 | Kind::Float8 => DataType::Float64,
            Kind::Numeric { precision, scale } => DataType::Decimal128(precision, scale),
            Kind::Text | Kind::Jsonb | Kind::Uuid | Kind::Array(_) | Kind::Other => DataType::Utf8,
            Kind::Date => DataType::Date32,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }

    /// Whether the snapshot reads this column in binary (else `::text`).
    pub fn binary_in_snapshot(self) -> bool {
        !matches!(self, Kind::Other | Kind::Array(_))
    }
}

/// Builds one Arrow column from PostgreSQL values.
#[derive(Debug)]
pub enum ColumnBuilder {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Decimal(Decimal128Builder, i8),
    Text(StringBuilder),
    Array(StringBuilder, Element),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, bool),
}

impl ColumnBuilder {
    /// A builder for `kind` with room for `capacity` rows.
    pub fn new(kind: Kind, capacity: usize) -> Self {
        Self::sized(kind, capacity, capacity * 16)
    }

    /// A builder for `kind` with room for `capacity` rows and, for text,
    /// `text_bytes` bytes of values.
    pub fn sized(kind: Kind, capacity: usize, text_bytes: usize) -> Self {
        match kind {
            Kind::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            Kind::Int2 | Kind::Int4 | Kind::Int8 => {
                ColumnBuilder::Int(Int64Builder::with_capacity(capacity))
            }
            Kind::Float4 | Kind::Float8 => {
                ColumnBuilder::Float(Float64Builder::with_capacity(capacity))
            }
            Kind::Numeric { precision, scale } => ColumnBuilder::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)
                    .unwrap_or_default(),
                scale,
            ),
            Kind::Text | Kind::Jsonb | Kind::Uuid | Kind::Other => {
                ColumnBuilder::Text(StringBuilder::with_capacity(capacity, text_bytes))
            }
            Kind::Array(element) => {
                ColumnBuilder::Array(StringBuilder::with_capacity(capacity, text_bytes), element)
            }
            Kind::Date => ColumnBuilder::Date(Date32Builder::with_capacity(capacity)),
            Kind::Timestamp => ColumnBuilder::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(capacity),
                false,
            ),
            Kind::TimestampTz => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity), true)
            }
        }
    }

    /// Appends a NULL.
    pub fn append_null(&mut self) {
        match self {
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Int(b) => b.append_null(),
            ColumnBuilder::Float(b) => b.append_null(),
            ColumnBuilder::Decimal(b, _) => b.append_null(),
            ColumnBuilder::Text(b) | ColumnBuilder::Array(b, _) => b.append_null(),
            ColumnBuilder::Date(b) => b.append_null(),
            ColumnBuilder::Timestamp(b, _) => b.append_null(),
        }
    }

    /// Appends a value in its binary COPY form.
    pub fn append_binary(&mut self, kind: Kind, v: &[u8]) -> Result<(), String> {
        fn be<const N: usize>(v: &[u8]) -> Result<[u8; N], String> {
            v.try_into()
                .map_err(|_| format!("expected {N} bytes, got {}", v.len()))
        }
        match (self, kind) {
            (ColumnBuilder::Bool(b), _) => b.append_value(be::<1>(v)?[0] != 0),
            (ColumnBuilder::Int(b), Kind::Int2) => {
                b.append_value(i16::from_be_bytes(be(v)?).into())
            }
            (ColumnBuilder::Int(b), Kind::Int4) => {
                b.append_value(i32::from_be_bytes(be(v)?).into())
            }
            (ColumnBuilder::Int(b), _) => b.append_value(i64::from_be_bytes(be(v)?)),
            (ColumnBuilder::Float(b), Kind::Float4) => {
                b.append_value(f32::from_be_bytes(be(v)?).into())
            }
            (ColumnBuilder::Float(b), _) => b.append_value(f64::from_be_bytes(be(v)?)),
            (ColumnBuilder::Decimal(b, scale), _) => match numeric_binary(v, *scale)? {
                Some(n) => b.append_value(n),
                None => b.append_null(),
            },
            (ColumnBuilder::Text(b), Kind::Uuid) => {
                let bytes: [u8; 16] = be(v)?;
                b.append_value(format_uuid(&bytes));
            }
            (ColumnBuilder::Text(b), Kind::Jsonb) => {
                let text = v.get(1..).ok_or("empty jsonb")?;
                b.append_value(std::str::from_utf8(text).map_err(|e| e.to_string())?);
            }
            (ColumnBuilder::Text(b), _) => {
                b.append_value(std::str::from_utf8(v).map_err(|e| e.to_string())?)
            }
            // The snapshot reads arrays as `::text`: the same literal the stream sends.
            (ColumnBuilder::Array(b, element), _) => b.append_value(array_json(
                std::str::from_utf8(v).map_err(|e| e.to_string())?,
                *element,
            )?),
            (ColumnBuilder::Date(b), _) => {
                let days = i32::from_be_bytes(be(v)?);
                // ±infinity are stored as i32::MAX/MIN: keep them as the extremes.
                b.append_value(days.saturating_add(PG_EPOCH_OFFSET_DAYS));
            }
            (ColumnBuilder::Timestamp(b, _), _) => {
                let us = i64::from_be_bytes(be(v)?);
                b.append_value(us.saturating_add(PG_EPOCH_OFFSET_US));
            }
        }
        Ok(())
    }

    /// Appends a value in its text form.
    pub fn append_text(&mut self, v: &[u8]) -> Result<(), String> {
        let s = std::str::from_utf8(v).map_err(|e| e.to_string())?;
        match self {
            ColumnBuilder::Bool(b) => b.append_value(match s {
                "t" => true,
                "f" => false,
                _ => return Err(not_a(s, "a boolean")),
            }),
            ColumnBuilder::Int(b) => {
                b.append_value(s.parse::<i64>().map_err(|_| not_a(s, "an integer"))?)
            }
            ColumnBuilder::Float(b) => b.append_value(parse_float(s)?),
            ColumnBuilder::Decimal(b, scale) => match numeric_text(s, *scale)? {
                Some(n) => b.append_value(n),
                None => b.append_null(),
            },
            ColumnBuilder::Text(b) => b.append_value(s),
            ColumnBuilder::Array(b, element) => b.append_value(array_json(s, *element)?),
            ColumnBuilder::Date(b) => b.append_value(date_text(s)?),
            ColumnBuilder::Timestamp(b, tz) => b.append_value(timestamp_text(s, *tz)?),
        }
        Ok(())
    }

    /// The finished column.
    pub fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Int(b) => Arc::new(b.finish()),
            ColumnBuilder::Float(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, _) => Arc::new(b.finish()),
            ColumnBuilder::Text(b) | ColumnBuilder::Array(b, _) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b, true) => Arc::new(b.finish().with_timezone("UTC")),
            ColumnBuilder::Timestamp(b, false) => Arc::new(b.finish()),
        }
    }
}

/// An array literal (`{1,2}`, `{"a b",NULL}`, `{{1,2},{3,4}}`, `[0:1]={1,2}`) as JSON.
pub fn array_json(literal: &str, element: Element) -> Result<String, String> {
    let bad = || not_a(literal, "an array literal");
    // Explicit bounds (`[0:1]={...}`) do not change the elements.
    let body = match literal.strip_prefix('[') {
        Some(_) => literal.split_once('=').ok_or_else(bad)?.1,
        None => literal,
    };
    let bytes = body.as_bytes();
    let mut out = String::with_capacity(body.len() + 8);
    let mut pos = 0;
    let mut depth = 0usize;
    while pos < bytes.len() {
        match bytes[pos] {
            b'{' => {
                out.push('[');
                depth += 1;
                pos += 1;
            }
            b'}' => {
                out.push(']');
                depth = depth.checked_sub(1).ok_or_else(bad)?;
                pos += 1;
            }
            b',' => {
                out.push(',');
                pos += 1;
            }
            b'"' => {
                let mut value = String::new();
                pos += 1;
                loop {
                    match bytes.get(pos) {
                        Some(b'\\') => {
                            let next = body[pos + 1..].chars().next().ok_or_else(bad)?;
                            value.push(next);
                            pos += 1 + next.len_utf8();
                        }
                        Some(b'"') => {
                            pos += 1;
                            break;
                        }
                        Some(_) => {
                            let c = body[pos..].chars().next().ok_or_else(bad)?;
                            value.push(c);
                            pos += c.len_utf8();
                        }
                        None => return Err(bad()),
                    }
                }
                push_json_string(&mut out, &value);
            }
            _ => {
                let end = body[pos..].find([',', '}']).map_or(body.len(), |e| pos + e);
                let raw = body[pos..end].trim();
                if raw.eq_ignore_ascii_case("NULL") {
                    out.push_str("null");
                } else {
                    match element {
                        Element::Bool => out.push_str(if raw == "t" { "true" } else { "false" }),
                        Element::Number if raw.parse::<f64>().is_ok_and(f64::is_finite) => {
                            out.push_str(raw)
                        }
                        _ => push_json_string(&mut out, raw),
                    }
                }
                pos = end;
            }
        }
    }
    if depth != 0 {
        return Err(bad());
    }
    Ok(out)
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A decode error. It names the expected form and the value's length, never
/// the value: errors end up in logs, and a value may be personal data.
fn not_a(value: &str, expected: &str) -> String {
    format!("a {}-byte value is not {expected}", value.len())
}

fn format_uuid(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[(byte >> 4) as usize] as char);
        s.push(HEX[(byte & 15) as usize] as char);
    }
    s
}

fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => s.parse().map_err(|_| not_a(s, "a number")),
    }
}

/// A numeric in binary form, scaled to `scale` (rounded half away from zero, as
/// PostgreSQL rounds). `None` for NaN and infinities, which a decimal cannot hold.
fn numeric_binary(v: &[u8], scale: i8) -> Result<Option<i128>, String> {
    if v.len() < 8 {
        return Err("numeric shorter than its header".into());
    }
    let ndigits = i16::from_be_bytes([v[0], v[1]]);
    let weight = i16::from_be_bytes([v[2], v[3]]) as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    if sign == 0xC000 || sign == 0xD000 || sign == 0xF000 {
        return Ok(None);
    }
    if ndigits < 0 || v.len() < 8 + 2 * ndigits as usize {
        return Err("numeric digits missing".into());
    }
    // Value = Σ digit[i] × 10000^(weight − i); we want value × 10^scale.
    let mut acc: i128 = 0;
    let scale = scale as i32;
    let mut remainder_digit: Option<i32> = None;
    for i in 0..ndigits as usize {
        let d = u16::from_be_bytes([v[8 + 2 * i], v[9 + 2 * i]]) as i32;
        // Exponent of this digit's last decimal place, in units of 10^-scale.
        let exp10 = 4 * (weight - i as i32) + scale;
        if exp10 >= 0 {
            let m = 10i128
                .checked_pow(exp10 as u32)
                .ok_or("numeric too large for decimal(38)")?;
            acc = acc
                .checked_add(m.checked_mul(d as i128).ok_or("numeric too large")?)
                .ok_or("numeric too large")?;
        } else if exp10 > -4 {
            let div = 10i32.pow((-exp10) as u32);
            acc += (d / div) as i128;
            remainder_digit.get_or_insert((d % div) * 10 / div);
        } else {
            remainder_digit.get_or_insert(d / 1000);
        }
    }
    if remainder_digit.is_some_and(|r| r >= 5) {
        acc += 1;
    }
    Ok(Some(if sign == 0x4000 { -acc } else { acc }))
}

/// A numeric in text form, scaled to `scale`.
fn numeric_text(s: &str, scale: i8) -> Result<Option<i128>, String> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(None);
    }
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let bad = || not_a(s, "a decimal");
    let mut acc: i128 = 0;
    for c in int.bytes() {
        if !c.is_ascii_digit() {
            return Err(bad());
        }
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_add((c - b'0') as i128))
            .ok_or_else(bad)?;
    }
    let mut frac_bytes = frac.bytes();
    for _ in 0..scale {
        let d = match frac_bytes.next() {
            Some(c) if c.is_ascii_digit() => c - b'0',
            Some(_) => return Err(bad()),
            None => 0,
        };
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_add(d as i128))
            .ok_or_else(bad)?;
    }
    if frac_bytes.next().is_some_and(|c| c >= b'5') {
        acc += 1;
    }
    Ok(Some(if negative { -acc } else { acc }))
}

fn date_text(s: &str) -> Result<i32, String> {
    match s {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let d = match iso_date(s.as_bytes()) {
        Some(d) => d,
        None => NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| not_a(s, "a date"))?,
    };
    Ok((d - NaiveDate::default()).num_days() as i32)
}

/// The value of `b` read as decimal digits, if it is only digits.
fn decimal(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

/// `YYYY-MM-DD`, the form the server sends for every date of years 1-9999,
/// read by position. chrono's `parse_from_str` parses its format string again
/// for every value: 6.6% of a catch-up's CPU. `None` for any other form (BC,
/// years past 9999), which chrono then reads.
fn iso_date(b: &[u8]) -> Option<NaiveDate> {
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = i32::try_from(decimal(&b[..4])?).ok()?;
    NaiveDate::from_ymd_opt(year, decimal(&b[5..7])?, decimal(&b[8..10])?)
}

/// `YYYY-MM-DD HH:MM:SS` and up to six fractional digits, read by position
/// (see [`iso_date`]); `None` for any other form.
fn iso_timestamp(b: &[u8]) -> Option<NaiveDateTime> {
    if b.len() < 19 || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let micros = match &b[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=6).contains(&fraction.len()) => {
            decimal(fraction)? * 10u32.pow(6 - fraction.len() as u32)
        }
        _ => return None,
    };
    let time = NaiveTime::from_hms_micro_opt(
        decimal(&b[11..13])?,
        decimal(&b[14..16])?,
        decimal(&b[17..19])?,
        micros,
    )?;
    Some(iso_date(&b[..10])?.and_time(time))
}

/// `2024-01-02 03:04:05.123456` (+ `+00` for timestamptz, with TimeZone=UTC).
fn timestamp_text(s: &str, tz: bool) -> Result<i64, String> {
    match s {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let naive = if tz {
        // With TimeZone=UTC the offset is always +00.
        s.strip_suffix("+00")
            .ok_or_else(|| not_a(s, "a UTC timestamp"))?
    } else {
        s
    };
    let t = match iso_timestamp(naive.as_bytes()) {
        Some(t) => t,
        None => NaiveDateTime::parse_from_str(naive, "%Y-%m-%d %H:%M:%S%.f")
            .map_err(|_| not_a(s, "a timestamp"))?,
    };
    Ok(t.and_utc().timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary numeric for `digits` (base-10000) with weight, sign and dscale.
    fn numeric(digits: &[u16], weight: i16, negative: bool) -> Vec<u8> {
        let mut v = (digits.len() as i16).to_be_bytes().to_vec();
        v.extend(weight.to_be_bytes());
        v.extend(if negative { 0x4000u16 } else { 0 }.to_be_bytes());
        v.extend(0i16.to_be_bytes());
        for d in digits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_binary_and_text_agree() {
        // 12345.6789 = [1, 2345, 6789], weight 1.
        let b = numeric(&[1, 2345, 6789], 1, false);
        assert_eq!(numeric_binary(&b, 2).unwrap(), Some(1_234_568));
        assert_eq!(numeric_text("12345.6789", 2).unwrap(), Some(1_234_568));
        // -0.05 = [500], weight -1.
        let b = numeric(&[500], -1, true);
        assert_eq!(numeric_binary(&b, 2).unwrap(), Some(-5));
        assert_eq!(numeric_text("-0.05", 2).unwrap(), Some(-5));
        // 100000000 = [1], weight 2.
        let b = numeric(&[1], 2, false);
        assert_eq!(numeric_binary(&b, 0).unwrap(), Some(100_000_000));
        assert_eq!(numeric_text("100000000", 0).unwrap(), Some(100_000_000));
        assert_eq!(numeric_binary(&numeric(&[], 0, false), 2).unwrap(), Some(0));
        assert!(numeric_text("1e5", 2).is_err());
    }

    #[test]
    fn arrays_become_json() {
        assert_eq!(
            array_json("{1,2,NULL}", Element::Number).unwrap(),
            "[1,2,null]"
        );
        assert_eq!(
            array_json(r#"{a1,"b \"q\"","x,y"}"#, Element::Text).unwrap(),
            r#"["a1","b \"q\"","x,y"]"#
        );
        assert_eq!(
            array_json("{{t,f},{f,t}}", Element::Bool).unwrap(),
            "[[true,false],[false,true]]"
        );
        assert_eq!(array_json("[0:1]={7,8}", Element::Number).unwrap(), "[7,8]");
        assert_eq!(array_json("{}", Element::Text).unwrap(), "[]");
        assert_eq!(array_json("{NaN}", Element::Number).unwrap(), r#"["NaN"]"#);
        assert!(array_json("{1,2", Element::Number).is_err());
    }

    #[test]
    fn typmods() {
        let typmod = ((18 << 16) | 2) + 4;
        assert_eq!(
            Kind::of(1700, typmod, false),
            Kind::Numeric {
                precision: 18,
                scale: 2
            }
        );
        assert_eq!(Kind::of(1700, -1, false), Kind::Other);
        assert_eq!(Kind::of(99999, -1, true), Kind::Text);
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(date_text("1970-01-02").unwrap(), 1);
        assert_eq!(
            timestamp_text("2000-01-01 00:00:00.5+00", true).unwrap(),
            PG_EPOCH_OFFSET_US + 500_000
        );
        assert_eq!(
            timestamp_text("2000-01-01 00:00:00", false).unwrap(),
            PG_EPOCH_OFFSET_US
        );
        assert_eq!(
            format_uuid(&[0xab; 16]),
            "abababab-abab-abab-abab-abababababab"
        );
        // A form only chrono reads (more than six fractional digits), and
        // what neither reads.
        assert_eq!(
            timestamp_text("2000-01-01 00:00:00.1234567", false).unwrap(),
            PG_EPOCH_OFFSET_US + 123_456
        );
        for bad in ["2024-02-30", "2024-01-0x", "20240101"] {
            assert!(date_text(bad).is_err(), "{bad}");
        }
        for bad in [
            "2024-01-01 24:00:00",
            "2024-01-01 00:00:00.",
            "2024-01-01T00:00:00",
        ] {
            assert!(timestamp_text(bad, false).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Read by position, dates and timestamps are what chrono's parser
        /// makes of them, for every fraction the server writes.
        #[test]
        fn iso_forms_read_as_chrono_reads_them(
            y in 1i32..=9999, m in 1u32..=12, d in 1u32..=31, h in 0u32..24, mi in 0u32..60,
            sec in 0u32..60, micros in 0u32..1_000_000, digits in 0usize..=6,
        ) {
            let date = format!("{y:04}-{m:02}-{d:02}");
            proptest::prop_assert_eq!(
                iso_date(date.as_bytes()),
                NaiveDate::parse_from_str(&date, "%Y-%m-%d").ok()
            );
            let fraction = format!("{micros:06}");
            let mut text = format!("{date} {h:02}:{mi:02}:{sec:02}");
            if digits > 0 {
                text = format!("{text}.{}", &fraction[..digits]);
            }
            proptest::prop_assert_eq!(
                iso_timestamp(text.as_bytes()),
                NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S%.f").ok()
            );
        }
    }
}
