//! The column actions, on whole Arrow arrays.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Date32Array, Decimal128Array, Float64Array, Int64Array, StringArray,
    StringBuilder, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use arrow::error::ArrowError;
use chrono::{DateTime, Datelike};

use super::detect;
use super::keys::Keyer;
use crate::config::Action;
use crate::config::rules::Generalize;

/// The type of the published column for `action` on a column of `input` type,
/// or why the action does not fit.
pub fn output_type(action: &Action, input: &DataType) -> Result<DataType, String> {
    Ok(match action {
        Action::Keep | Action::Drop => input.clone(),
        Action::Hash | Action::Mask { .. } | Action::Redact => DataType::Utf8,
        Action::Generalize(g) => match (g, input) {
            (
                Generalize::Year | Generalize::Month,
                DataType::Date32 | DataType::Timestamp(_, _),
            ) => DataType::Utf8,
            (Generalize::Year | Generalize::Month, other) => {
                return Err(format!(
                    "generalize to year or month needs a date or timestamp column, but it is {other}; \
                     add `type: date` to the rule if the values are dates"
                ));
            }
            (
                Generalize::Step(_) | Generalize::Decimals(_),
                DataType::Int64 | DataType::Float64,
            ) => input.clone(),
            (Generalize::Step(_), DataType::Decimal128(_, _)) => input.clone(),
            (Generalize::Decimals(d), DataType::Decimal128(p, s)) => {
                DataType::Decimal128(*p, (*s).min(*d as i8))
            }
            (Generalize::Step(_) | Generalize::Decimals(_), other) => {
                return Err(format!(
                    "generalize with step or decimals needs a numeric column, but it is {other}; \
                     add `type: decimal(18,2)` (or integer, float) to the rule"
                ));
            }
            (Generalize::Prefix(_), _) => DataType::Utf8,
        },
    })
}

fn as_text(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    if array.data_type() == &DataType::Utf8 {
        Ok(array.clone())
    } else {
        cast(array, &DataType::Utf8)
    }
}

fn strings(array: &ArrayRef) -> Result<&StringArray, ArrowError> {
    array
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ArrowError::CastError("expected text".into()))
}

fn downcast<T: 'static>(array: &ArrayRef) -> Result<&T, ArrowError> {
    array
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| ArrowError::CastError(format!("unexpected type {}", array.data_type())))
}

/// Maps every non-null text value; `f` returns None to keep the value unchanged.
/// Returns the new array and how many values changed.
fn map_text(
    array: &ArrayRef,
    mut f: impl FnMut(&str) -> Option<String>,
) -> Result<(ArrayRef, u64), ArrowError> {
    let text = as_text(array)?;
    let input = strings(&text)?;
    let mut builder = StringBuilder::with_capacity(input.len(), input.value_data().len());
    let mut changed = 0;
    for value in input.iter() {
        match value {
            None => builder.append_null(),
            Some(v) => match f(v) {
                Some(new) => {
                    changed += 1;
                    builder.append_value(new);
                }
                None => builder.append_value(v),
            },
        }
    }
    Ok((Arc::new(builder.finish()), changed))
}

/// Applies `action` to a column. Returns the published array and the number of
/// values `redact` changed.
pub fn apply(
    action: &Action,
    array: &ArrayRef,
    keyer: &Keyer,
) -> Result<(ArrayRef, u64), ArrowError> {
    match action {
        Action::Keep | Action::Drop => Ok((array.clone(), 0)),
        Action::Redact => redact(array),
        Action::Hash => map_text(array, |v| Some(keyer.token(v))).map(|(a, _)| (a, 0)),
        Action::Mask {
            keep_first,
            keep_last,
        } => map_text(array, |v| Some(mask(v, *keep_first, *keep_last))).map(|(a, _)| (a, 0)),
        Action::Generalize(g) => generalize(g, array).map(|a| (a, 0)),
    }
}

/// `redact` in one pass: most values hold nothing to redact, so the array is
/// only rebuilt from the first value that changes.
fn redact(array: &ArrayRef) -> Result<(ArrayRef, u64), ArrowError> {
    let text = as_text(array)?;
    let input = strings(&text)?;
    let mut builder: Option<StringBuilder> = None;
    let mut changed = 0;
    for (row, value) in input.iter().enumerate() {
        let redacted = value.and_then(detect::redact);
        changed += u64::from(redacted.is_some());
        if let Some(b) = builder.as_mut() {
            match redacted {
                Some(r) => b.append_value(r),
                None => b.append_option(value),
            }
        } else if let Some(r) = redacted {
            let mut b = StringBuilder::with_capacity(input.len(), input.value_data().len() + 64);
            for earlier in 0..row {
                b.append_option(input.is_valid(earlier).then(|| input.value(earlier)));
            }
            b.append_value(r);
            builder = Some(b);
        }
    }
    Ok(match builder {
        Some(mut b) => (Arc::new(b.finish()), changed),
        None => (text, 0),
    })
}

fn mask(value: &str, keep_first: usize, keep_last: usize) -> String {
    let count = value.chars().count();
    value
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i < keep_first || i + keep_last >= count || c.is_whitespace() {
                c
            } else {
                '*'
            }
        })
        .collect()
}

fn generalize(how: &Generalize, array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    let month = matches!(how, Generalize::Month);
    match (how, array.data_type()) {
        (Generalize::Year | Generalize::Month, DataType::Date32) => {
            let dates = downcast::<Date32Array>(array)?;
            Ok(Arc::new(
                dates
                    .iter()
                    .map(|d| {
                        d.and_then(|d| {
                            let date = chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163)?;
                            Some(period(date.year(), date.month(), month))
                        })
                    })
                    .collect::<StringArray>(),
            ))
        }
        (Generalize::Year | Generalize::Month, DataType::Timestamp(_, _)) => {
            let micros = cast(array, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            let ts = downcast::<TimestampMicrosecondArray>(&micros)?;
            Ok(Arc::new(
                ts.iter()
                    .map(|t| {
                        t.and_then(|t| {
                            let t = DateTime::from_timestamp_micros(t)?;
                            Some(period(t.year(), t.month(), month))
                        })
                    })
                    .collect::<StringArray>(),
            ))
        }
        (Generalize::Step(step), DataType::Int64) => {
            let step = step.round().max(1.0) as i64;
            let ints = downcast::<Int64Array>(array)?;
            Ok(Arc::new(
                ints.iter()
                    .map(|v| v.map(|v| v.div_euclid(step) * step))
                    .collect::<Int64Array>(),
            ))
        }
        (Generalize::Step(step), DataType::Float64) => {
            let floats = downcast::<Float64Array>(array)?;
            Ok(Arc::new(
                floats
                    .iter()
                    .map(|v| v.map(|v| (v / step).floor() * step))
                    .collect::<Float64Array>(),
            ))
        }
        (Generalize::Step(step), DataType::Decimal128(p, s)) => {
            let unscaled_step = (step * 10f64.powi(i32::from(*s))).round().max(1.0) as i128;
            let dec = downcast::<Decimal128Array>(array)?;
            let out: Decimal128Array = dec
                .iter()
                .map(|v| v.map(|v| v.div_euclid(unscaled_step) * unscaled_step))
                .collect();
            Ok(Arc::new(out.with_precision_and_scale(*p, *s)?))
        }
        (Generalize::Decimals(d), DataType::Float64) => {
            let factor = 10f64.powi(*d as i32);
            let floats = downcast::<Float64Array>(array)?;
            Ok(Arc::new(
                floats
                    .iter()
                    .map(|v| v.map(|v| (v * factor).round() / factor))
                    .collect::<Float64Array>(),
            ))
        }
        (Generalize::Decimals(d), DataType::Decimal128(p, s)) => {
            let target = (*s).min(*d as i8);
            let drop = 10i128.pow((*s - target) as u32);
            let dec = downcast::<Decimal128Array>(array)?;
            // Half away from zero, as people round.
            let out: Decimal128Array = dec
                .iter()
                .map(|v| {
                    v.map(|v| {
                        let q = v / drop;
                        let r = v % drop;
                        if r.abs() * 2 >= drop {
                            q + v.signum()
                        } else {
                            q
                        }
                    })
                })
                .collect();
            Ok(Arc::new(out.with_precision_and_scale(*p, target)?))
        }
        (Generalize::Decimals(_), DataType::Int64) => Ok(array.clone()),
        (Generalize::Prefix(n), _) => map_text(array, |v| {
            Some(
                v.chars()
                    .take(*n)
                    .collect::<String>()
                    .trim_end()
                    .to_string(),
            )
        })
        .map(|(a, _)| a),
        (_, other) => Err(ArrowError::CastError(format!(
            "generalize does not apply to {other}"
        ))),
    }
}

fn period(year: i32, month: u32, with_month: bool) -> String {
    if with_month {
        format!("{year:04}-{month:02}")
    } else {
        format!("{year:04}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::keys::PseudonymKey;

    fn keyer() -> Keyer {
        Keyer::new(&PseudonymKey::from_bytes(vec![9; 32]).unwrap_or_else(|e| panic!("{e}")))
    }

    fn text(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(values.iter().copied().collect::<StringArray>())
    }

    fn as_strings(a: &ArrayRef) -> Vec<Option<String>> {
        strings(a)
            .map(|s| s.iter().map(|v| v.map(str::to_string)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn keep_and_redact() {
        let k = keyer();
        let input = text(&[Some("Avser 990327-1485"), None, Some("Inget")]);
        let (out, n) = apply(&Action::Redact, &input, &k).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 1);
        assert_eq!(
            as_strings(&out),
            vec![
                Some("Avser [personnummer]".into()),
                None,
                Some("Inget".into())
            ]
        );
        let (out, _) = apply(&Action::Keep, &input, &k).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(as_strings(&out), as_strings(&input));
    }

    #[test]
    fn hash_and_mask() {
        let k = keyer();
        let input = text(&[Some("070-8570137"), Some("070-8570137")]);
        let (out, _) = apply(&Action::Hash, &input, &k).unwrap_or_else(|e| panic!("{e}"));
        let out = as_strings(&out);
        assert_eq!(out[0], out[1]);
        assert_ne!(out[0].as_deref(), Some("070-8570137"));
        let (out, _) = apply(
            &Action::Mask {
                keep_first: 0,
                keep_last: 4,
            },
            &input,
            &k,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(as_strings(&out)[0].as_deref(), Some("*******0137"));
    }

    #[test]
    fn generalize_dates_numbers_text() {
        let k = keyer();
        let dates: ArrayRef = Arc::new(Date32Array::from(vec![Some(20_115), None])); // 2025-01-27
        let (out, _) = apply(&Action::Generalize(Generalize::Month), &dates, &k)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(as_strings(&out), vec![Some("2025-01".into()), None]);
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![1234, -1]));
        let (out, _) = apply(&Action::Generalize(Generalize::Step(1000.0)), &ints, &k)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            downcast::<Int64Array>(&out)
                .map(|a| a.values().to_vec())
                .unwrap_or_default(),
            vec![1000, -1000]
        );
        let coords: ArrayRef = Arc::new(
            Decimal128Array::from(vec![59_742_588i128, -59_742_588])
                .with_precision_and_scale(38, 6)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let (out, _) = apply(&Action::Generalize(Generalize::Decimals(2)), &coords, &k)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.data_type(), &DataType::Decimal128(38, 2));
        assert_eq!(
            downcast::<Decimal128Array>(&out)
                .map(|a| a.values().to_vec())
                .unwrap_or_default(),
            vec![5974, -5974]
        );
        let postal = text(&[Some("123 45")]);
        let (out, _) = apply(&Action::Generalize(Generalize::Prefix(3)), &postal, &k)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(as_strings(&out), vec![Some("123".into())]);
        assert!(output_type(&Action::Generalize(Generalize::Month), &DataType::Utf8).is_err());
    }
}
