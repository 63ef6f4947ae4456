//! One value of a record turned into a cell of its column's kind: Debezium's
//! logical types (decimals, dates, times, timestamps, bits) decoded.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::scalar::Scalar;
use super::{Cell, Kind};

pub(super) fn expect_int(v: &Scalar) -> Result<i64, String> {
    match v {
        Scalar::Int(i) => Ok(*i),
        other => Err(format!("expected an integer, found {}", short(other))),
    }
}

pub(super) fn short(v: &Scalar) -> String {
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

pub(super) fn base64_bytes(v: &Scalar) -> Result<Vec<u8>, String> {
    let Scalar::Str(text) = v else {
        return Err(format!("expected base64 text, found {}", short(v)));
    };
    BASE64
        .decode(text.as_bytes())
        .map_err(|e| format!("invalid base64 `{}`: {e}", short(v)))
}

/// Big-endian two's complement bytes as an integer.
pub(super) fn unscaled(bytes: &[u8]) -> Result<i128, String> {
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
pub(super) fn decimal_text(unscaled: i128, scale: i32) -> String {
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

pub(super) fn time_text(count: i64, per_second: i64) -> String {
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

pub(super) fn cell(kind: &Kind, v: Scalar) -> Result<Cell, String> {
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
