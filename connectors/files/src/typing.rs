//! Column types for text exports: inference, and conversion from text with the
//! quirks of Swedish exports (decimal comma, space as thousands separator, local
//! times without an offset).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder,
    Int64Builder, StringArray, TimestampMicrosecondBuilder,
};
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use oppen_connector_api::ColumnType;

/// One value that did not convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    /// Row index within the array.
    pub row: usize,
    /// What is wrong, without the value itself (it may be personal data).
    pub message: String,
}

const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;
/// Inferred decimals get the widest precision, so a later export with bigger
/// amounts still fits the published type.
const INFERRED_DECIMAL_PRECISION: u8 = 38;
const MAX_INFERRED_SCALE: usize = 12;

/// Infers the narrowest type that holds every non-empty value.
///
/// Integers must not have leading zeros (account numbers and postal codes such as
/// `0123` stay text). Decimals take `.` or `,` as the decimal mark. Empty values
/// are NULL and say nothing about the type.
pub fn infer(values: &StringArray) -> ColumnType {
    let (mut integer, mut decimal, mut date, mut timestamp) = (true, true, true, true);
    let mut scale = 0usize;
    let mut any = false;
    for value in values.iter().flatten() {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        any = true;
        if integer && !is_plain_integer(value) {
            integer = false;
        }
        if decimal {
            match strict_decimal_scale(value) {
                Some(s) if s <= MAX_INFERRED_SCALE => scale = scale.max(s),
                _ => decimal = false,
            }
        }
        if date && parse_date(value).is_none() {
            date = false;
        }
        if timestamp && !looks_like_timestamp(value) {
            timestamp = false;
        }
        if !(integer || decimal || date || timestamp) {
            return ColumnType::Text;
        }
    }
    if !any {
        ColumnType::Text
    } else if integer {
        ColumnType::Integer
    } else if decimal {
        ColumnType::Decimal {
            precision: INFERRED_DECIMAL_PRECISION,
            scale: scale as i8,
        }
    } else if date {
        ColumnType::Date
    } else if timestamp
        && values
            .iter()
            .flatten()
            .all(|v| v.trim().is_empty() || parse_timestamp(v.trim(), chrono_tz::UTC).is_some())
    {
        ColumnType::Timestamp
    } else {
        ColumnType::Text
    }
}

fn is_plain_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

/// The number of fraction digits of a strict decimal (`-12.50`, `12,5`), or None.
fn strict_decimal_scale(v: &str) -> Option<usize> {
    let body = v.strip_prefix('-').unwrap_or(v);
    let (int, frac) = match body.split_once(['.', ',']) {
        Some((int, frac)) if !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit()) => {
            (int, frac.len())
        }
        Some(_) => return None,
        None => (body, 0),
    };
    let int_ok = !int.is_empty()
        && int.len() <= 26
        && int.bytes().all(|b| b.is_ascii_digit())
        && (int == "0" || !int.starts_with('0'));
    int_ok.then_some(frac)
}

fn looks_like_timestamp(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() >= 16
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b' ')
        && b[13] == b':'
}

/// Parses `YYYY-MM-DD`.
pub fn parse_date(v: &str) -> Option<NaiveDate> {
    let b = v.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)
}

/// Parses an ISO 8601 / RFC 3339 timestamp; one without an offset is local time in `tz`.
pub fn parse_timestamp(v: &str, tz: Tz) -> Option<DateTime<chrono::Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    let normalized = v.replacen(' ', "T", 1);
    if let Ok(t) = DateTime::parse_from_rfc3339(&normalized) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(&normalized, format) {
            // In the autumn hour that occurs twice, the earlier reading is taken.
            return tz
                .from_local_datetime(&naive)
                .earliest()
                .map(|t| t.with_timezone(&chrono::Utc));
        }
    }
    None
}

/// Parses a decimal as an unscaled i128 at `scale`. Accepts `.` or `,` as the
/// decimal mark and spaces (also no-break spaces) as thousands separators.
pub fn parse_decimal(v: &str, scale: i8) -> Result<i128, String> {
    let mut negative = false;
    let mut int: i128 = 0;
    let mut frac_digits = 0i32;
    let mut seen_mark = false;
    let mut seen_digit = false;
    for (i, c) in v.chars().enumerate() {
        match c {
            '-' | '\u{2212}' if i == 0 => negative = true,
            '+' if i == 0 => {}
            '0'..='9' => {
                seen_digit = true;
                int = int
                    .checked_mul(10)
                    .and_then(|x| x.checked_add(i128::from(c as u8 - b'0')))
                    .ok_or("number too large")?;
                if seen_mark {
                    frac_digits += 1;
                }
            }
            '.' | ',' if !seen_mark => seen_mark = true,
            ' ' | '\u{a0}' | '\u{202f}' if !seen_mark && seen_digit => {}
            _ => return Err(format!("`{c}` is not part of a number")),
        }
    }
    if !seen_digit {
        return Err("no digits".into());
    }
    let scale = i32::from(scale);
    if frac_digits > scale {
        return Err(format!(
            "{frac_digits} decimals, but the column has {scale}"
        ));
    }
    let factor = 10i128
        .checked_pow((scale - frac_digits) as u32)
        .ok_or("scale too large")?;
    let unscaled = int.checked_mul(factor).ok_or("number too large")?;
    Ok(if negative { -unscaled } else { unscaled })
}

fn parse_boolean(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "ja" | "j" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "nej" | "0" => Some(false),
        _ => None,
    }
}

/// Converts text values to `ty`. Empty values become NULL, and so do values that do
/// not convert; those are returned as errors.
pub fn convert(values: &StringArray, ty: ColumnType, tz: Tz) -> (ArrayRef, Vec<ValueError>) {
    let mut errors = Vec::new();
    macro_rules! build {
        ($builder:expr, $parse:expr) => {{
            let mut builder = $builder;
            for (row, value) in values.iter().enumerate() {
                match value.map(str::trim).filter(|v| !v.is_empty()) {
                    None => builder.append_null(),
                    Some(v) => match $parse(v) {
                        Ok(x) => builder.append_value(x),
                        Err(message) => {
                            errors.push(ValueError { row, message });
                            builder.append_null();
                        }
                    },
                }
            }
            Arc::new(builder.finish()) as ArrayRef
        }};
    }
    let n = values.len();
    let array = match ty {
        ColumnType::Text => {
            // Empty text is NULL as for every other type: CSV cannot tell them apart.
            // Only the validity changes: the text buffers are shared, not copied.
            let offsets = values.offsets();
            let valid = (0..n).map(|i| values.is_valid(i) && offsets[i + 1] > offsets[i]);
            let nulls = arrow::buffer::NullBuffer::from_iter(valid);
            let cleaned =
                StringArray::try_new(offsets.clone(), values.values().clone(), Some(nulls));
            match cleaned {
                Ok(a) => Arc::new(a) as ArrayRef,
                Err(_) => Arc::new(values.clone()) as ArrayRef,
            }
        }
        ColumnType::Integer => build!(Int64Builder::with_capacity(n), |v: &str| {
            v.parse::<i64>().or_else(|_| {
                // Thousands separators: "1 234".
                let cleaned: String = v
                    .chars()
                    .filter(|c| !matches!(c, ' ' | '\u{a0}' | '\u{202f}'))
                    .collect();
                cleaned
                    .parse::<i64>()
                    .map_err(|_| "not an integer".to_string())
            })
        }),
        ColumnType::Float => build!(Float64Builder::with_capacity(n), |v: &str| {
            v.replace(',', ".")
                .parse::<f64>()
                .map_err(|_| "not a number".to_string())
        }),
        ColumnType::Decimal { precision, scale } => {
            let max = 10i128.pow(u32::from(precision));
            let array = build!(Decimal128Builder::with_capacity(n), |v: &str| {
                parse_decimal(v, scale).and_then(|x| {
                    if x.abs() >= max {
                        Err(format!("does not fit decimal({precision},{scale})"))
                    } else {
                        Ok(x)
                    }
                })
            });
            let decimals = array
                .as_any()
                .downcast_ref::<arrow::array::Decimal128Array>()
                .map(|a| a.clone().with_precision_and_scale(precision, scale));
            match decimals {
                Some(Ok(a)) => Arc::new(a) as ArrayRef,
                // Precision and scale were validated when the type was parsed.
                _ => array,
            }
        }
        ColumnType::Date => build!(Date32Builder::with_capacity(n), |v: &str| {
            parse_date(v)
                .map(|d| d.num_days_from_ce() - UNIX_EPOCH_DAYS_FROM_CE)
                .ok_or_else(|| "not a date (expected YYYY-MM-DD)".to_string())
        }),
        ColumnType::Timestamp => {
            let array = build!(TimestampMicrosecondBuilder::with_capacity(n), |v: &str| {
                parse_timestamp(v, tz)
                    .map(|t| t.timestamp_micros())
                    .ok_or_else(|| {
                        "not a timestamp (expected ISO 8601, e.g. 2025-03-03T11:00:00+01:00)"
                            .to_string()
                    })
            });
            let ts = array
                .as_any()
                .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
                .map(|a| a.clone().with_timezone("UTC"));
            match ts {
                Some(a) => Arc::new(a) as ArrayRef,
                None => array,
            }
        }
        ColumnType::Boolean => build!(BooleanBuilder::with_capacity(n), |v: &str| {
            parse_boolean(v).ok_or_else(|| "not a boolean (true/false, ja/nej, 1/0)".to_string())
        }),
    };
    (array, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(values: &[&str]) -> StringArray {
        values.iter().map(|v| Some(*v)).collect()
    }

    #[test]
    fn infers_types() {
        assert_eq!(infer(&arr(&["1", "42", "-7", ""])), ColumnType::Integer);
        assert_eq!(infer(&arr(&["0123", "4"])), ColumnType::Text);
        assert_eq!(
            infer(&arr(&["2616,49", "5950,85", "12"])),
            ColumnType::Decimal {
                precision: 38,
                scale: 2
            }
        );
        assert_eq!(
            infer(&arr(&["59.742588"])),
            ColumnType::Decimal {
                precision: 38,
                scale: 6
            }
        );
        assert_eq!(infer(&arr(&["2025-01-27", ""])), ColumnType::Date);
        assert_eq!(
            infer(&arr(&["2025-03-03T11:00:00+01:00"])),
            ColumnType::Timestamp
        );
        assert_eq!(infer(&arr(&["299554-8324"])), ColumnType::Text);
        assert_eq!(infer(&arr(&["", ""])), ColumnType::Text);
        assert_eq!(infer(&arr(&["1.2.3"])), ColumnType::Text);
        assert_eq!(infer(&arr(&["12,"])), ColumnType::Text);
    }

    #[test]
    fn parses_decimal_comma_and_thousands() {
        assert_eq!(parse_decimal("2616,49", 2), Ok(261_649));
        assert_eq!(parse_decimal("2 616,49", 2), Ok(261_649));
        assert_eq!(parse_decimal("2\u{a0}616.4", 2), Ok(261_640));
        assert_eq!(parse_decimal("-5", 2), Ok(-500));
        assert!(
            parse_decimal("1,234", 2)
                .unwrap_err()
                .contains("3 decimals")
        );
        assert!(parse_decimal("12kr", 2).is_err());
        assert!(parse_decimal("", 2).is_err());
    }

    #[test]
    fn converts_with_errors_per_row() {
        let values = arr(&["1,5", "x", ""]);
        let (array, errors) = convert(
            &values,
            ColumnType::Decimal {
                precision: 18,
                scale: 2,
            },
            chrono_tz::UTC,
        );
        assert_eq!(array.null_count(), 2);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].row, 1);
    }

    #[test]
    fn local_times_use_the_zone() {
        let t = parse_timestamp("2025-03-03 11:00:00", chrono_tz::Europe::Stockholm);
        assert_eq!(
            t.map(|t| t.to_rfc3339()),
            Some("2025-03-03T10:00:00+00:00".into())
        );
        let t = parse_timestamp("2025-07-01T11:00", chrono_tz::Europe::Stockholm);
        assert_eq!(
            t.map(|t| t.to_rfc3339()),
            Some("2025-07-01T09:00:00+00:00".into())
        );
    }
}
