//! The CSV encoder: RFC 4180, UTF-8, comma, header row, `\n`, a field quoted
//! only when it holds a comma, a quote or a line break; NULL is an empty
//! field. Byte for byte what arrow's CSV writer writes (a test compares them),
//! but the common column types are formatted straight into the output: arrow
//! formats every cell through a dynamic formatter and a second buffer, which
//! makes CSV the slowest file of a version. Other types go through arrow's
//! own formatter.

use arrow::array::{
    Array, AsArray, BooleanArray, Date32Array, Decimal128Array, GenericStringArray, PrimitiveArray,
    RecordBatch, TimestampMicrosecondArray,
};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use arrow::error::ArrowError;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Rows written before the output is sized for the rest.
const SAMPLE_ROWS: usize = 1024;

/// Writes an integer column's cell `row`.
type IntWriter<'a> = Box<dyn Fn(usize, &mut Vec<u8>) + 'a>;

/// How one column's cells are written.
enum Column<'a> {
    Utf8(&'a GenericStringArray<i32>, Quoting),
    LargeUtf8(&'a GenericStringArray<i64>, Quoting),
    Int(IntWriter<'a>),
    Decimal(&'a Decimal128Array, u32),
    Date(&'a Date32Array),
    /// A timestamp with a time zone, written in UTC (see [`utc_micros`]).
    UtcMicros(&'a TimestampMicrosecondArray),
    Boolean(&'a BooleanArray),
    /// Arrow's formatter, for every other type.
    Other(ArrayFormatter<'a>),
}

/// What a text column's values may need, judged once from all its bytes.
#[derive(Clone, Copy)]
enum Quoting {
    /// No value holds a comma, quote or line break: none is quoted.
    Never,
    /// Some value holds a comma or line break, none a quote: each value is
    /// checked, and a quoted one needs no doubled quotes.
    NoQuotes,
    /// Each value is checked and its quotes doubled.
    Check,
}

impl Quoting {
    fn of<O: arrow::array::OffsetSizeTrait>(array: &GenericStringArray<O>) -> Self {
        // The bytes of the array's rows only (a slice shares a larger buffer).
        let offsets = array.value_offsets();
        let (first, last) = (offsets[0].as_usize(), offsets[offsets.len() - 1].as_usize());
        let bytes = &array.value_data()[first..last];
        if !bytes.iter().any(|&b| needs_quotes(b)) {
            Quoting::Never
        } else if !bytes.contains(&b'"') {
            Quoting::NoQuotes
        } else {
            Quoting::Check
        }
    }
}

fn needs_quotes(b: u8) -> bool {
    matches!(b, b',' | b'"' | b'\n' | b'\r')
}

/// Encodes a batch as CSV with a header row, whole (files are written in
/// chunks of rows: `writer::encode_to`).
#[cfg(test)]
pub fn encode(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<(), ArrowError> {
    encode_rows(batch, true, out)
}

/// Encodes a batch's rows as CSV, after a header row if `header`: a file
/// written in chunks has its header in the first.
pub fn encode_rows(batch: &RecordBatch, header: bool, out: &mut Vec<u8>) -> Result<(), ArrowError> {
    let schema = batch.schema();
    let options = FormatOptions::default()
        .with_null("")
        .with_display_error(false);
    let columns = batch
        .columns()
        .iter()
        .map(|array| column(array.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()?;
    let single = columns.len() == 1;
    // Null tests only for columns that have nulls.
    let nulls: Vec<_> = batch
        .columns()
        .iter()
        .map(|a| a.logical_nulls().filter(|n| n.null_count() > 0))
        .collect();
    let mut scratch = String::new();
    if header {
        for (i, field) in schema.fields().iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            text(field.name(), single, Quoting::Check, out);
        }
        out.push(b'\n');
    }
    let rows = batch.num_rows();
    for row in 0..rows {
        if row == SAMPLE_ROWS {
            // Size the output once from the rows written so far: text is often
            // larger than the columns in memory (dates, decimals), and growing
            // a large buffer by doubling holds both copies for a moment.
            let per_row = out.len() / SAMPLE_ROWS + 1;
            out.reserve(per_row * (rows - row) * 21 / 20);
        }
        for (i, (column, nulls)) in columns.iter().zip(&nulls).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                if single {
                    out.extend_from_slice(b"\"\"");
                }
                continue;
            }
            match column {
                Column::Utf8(a, q) => text(a.value(row), single, *q, out),
                Column::LargeUtf8(a, q) => text(a.value(row), single, *q, out),
                Column::Int(write) => write(row, out),
                Column::Decimal(a, scale) => decimal(a.value(row), *scale, out),
                Column::Date(a) => date(a, row, out),
                Column::UtcMicros(a) => utc_micros(a.value(row), out),
                Column::Boolean(a) => {
                    out.extend_from_slice(if a.value(row) { b"true" } else { b"false" })
                }
                Column::Other(formatter) => {
                    use std::fmt::Write as _;
                    scratch.clear();
                    write!(scratch, "{}", formatter.value(row))
                        .map_err(|e| ArrowError::CsvError(e.to_string()))?;
                    text(&scratch, single, Quoting::Check, out);
                }
            }
        }
        out.push(b'\n');
    }
    Ok(())
}

fn column<'a>(array: &'a dyn Array, options: &FormatOptions<'a>) -> Result<Column<'a>, ArrowError> {
    Ok(match array.data_type() {
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            Column::Utf8(a, Quoting::of(a))
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            Column::LargeUtf8(a, Quoting::of(a))
        }
        DataType::Int8 => integers::<Int8Type>(array),
        DataType::Int16 => integers::<Int16Type>(array),
        DataType::Int32 => integers::<Int32Type>(array),
        DataType::Int64 => integers::<Int64Type>(array),
        DataType::UInt8 => integers::<UInt8Type>(array),
        DataType::UInt16 => integers::<UInt16Type>(array),
        DataType::UInt32 => integers::<UInt32Type>(array),
        DataType::UInt64 => integers::<UInt64Type>(array),
        DataType::Decimal128(_, scale) if *scale >= 0 => {
            Column::Decimal(array.as_primitive(), *scale as u32)
        }
        DataType::Date32 => Column::Date(array.as_primitive()),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => {
            Column::UtcMicros(array.as_primitive())
        }
        DataType::Boolean => Column::Boolean(array.as_boolean()),
        _ => Column::Other(ArrayFormatter::try_new(array, options)?),
    })
}

fn integers<'a, T>(array: &'a dyn Array) -> Column<'a>
where
    T: ArrowPrimitiveType,
    T::Native: itoa::Integer,
{
    let values: &'a PrimitiveArray<T> = array.as_primitive();
    Column::Int(Box::new(move |row, out| {
        out.extend_from_slice(itoa::Buffer::new().format(values.value(row)).as_bytes())
    }))
}

/// A text field, quoted when it holds a comma, a quote or a line break (and,
/// as the only field of a record, when empty: an empty line is no record).
fn text(value: &str, single: bool, quoting: Quoting, out: &mut Vec<u8>) {
    let bytes = value.as_bytes();
    let quote = match quoting {
        Quoting::Never => false,
        Quoting::NoQuotes | Quoting::Check => bytes.iter().any(|&b| needs_quotes(b)),
    } || (single && bytes.is_empty());
    if !quote {
        out.extend_from_slice(bytes);
        return;
    }
    out.push(b'"');
    if let Quoting::NoQuotes = quoting {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    for part in bytes.split_inclusive(|&b| b == b'"') {
        out.extend_from_slice(part);
        if part.last() == Some(&b'"') {
            out.push(b'"');
        }
    }
    out.push(b'"');
}

/// An exact decimal: the unscaled integer with a point `scale` digits from the right.
fn decimal(value: i128, scale: u32, out: &mut Vec<u8>) {
    if value < 0 {
        out.push(b'-');
    }
    let mut buffer = itoa::Buffer::new();
    // Formatting a u128 is several times slower than a u64, and amounts fit.
    let digits = match u64::try_from(value.unsigned_abs()) {
        Ok(small) => buffer.format(small),
        Err(_) => buffer.format(value.unsigned_abs()),
    }
    .as_bytes();
    let scale = scale as usize;
    if scale == 0 {
        out.extend_from_slice(digits);
    } else if digits.len() > scale {
        let (whole, fraction) = digits.split_at(digits.len() - scale);
        out.extend_from_slice(whole);
        out.push(b'.');
        out.extend_from_slice(fraction);
    } else {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', scale - digits.len()));
        out.extend_from_slice(digits);
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`): a handful of integer operations, where
/// chrono's conversion was a tenth of the CSV time.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Fills month and day into `text`, which starts `YYYY-MM-DD`.
fn put_month_day(month: u32, day: u32, text: &mut [u8]) {
    put_digits(month, &mut text[5..7]);
    put_digits(day, &mut text[8..10]);
}

/// Writes `text` (starting `YYYY-`) with `year` in front: four digits in
/// 0..=9999 (the whole text in one copy), otherwise signed, as chrono writes it.
#[inline]
fn put_with_year(year: i64, text: &mut [u8], out: &mut Vec<u8>) {
    if (0..=9999).contains(&year) {
        put_digits(year as u32, &mut text[..4]);
        out.extend_from_slice(text);
    } else {
        put_signed_year(year, &text[4..], out);
    }
}

#[cold]
fn put_signed_year(year: i64, rest: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("{year:+05}").as_bytes());
    out.extend_from_slice(rest);
}

/// A date as `YYYY-MM-DD`; a date chrono cannot represent is left empty, as
/// arrow's writer leaves it.
fn date(array: &Date32Array, row: usize, out: &mut Vec<u8>) {
    let (year, month, day) = civil(i64::from(array.value(row)));
    if !(0..=9999).contains(&year) && array.value_as_date(row).is_none() {
        return;
    }
    let mut text = *b"0000-00-00";
    put_month_day(month, day, &mut text);
    put_with_year(year, &mut text, out);
}

/// A UTC timestamp as `2024-01-01T00:00:00Z`, a fraction as chrono's `%.f`
/// writes it (none, 3 or 6 digits for microseconds). Arrow formats timestamps
/// through a chrono format string parsed again for every value: this writes
/// the digits.
fn utc_micros(us: i64, out: &mut Vec<u8>) {
    let seconds = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000) as u32;
    let (year, month, day) = civil(seconds.div_euclid(86_400));
    if !(0..=9999).contains(&year) && chrono::DateTime::from_timestamp_micros(us).is_none() {
        return;
    }
    let of_day = seconds.rem_euclid(86_400) as u32;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    put_month_day(month, day, &mut text);
    put_digits(of_day / 3600, &mut text[11..13]);
    put_digits(of_day / 60 % 60, &mut text[14..16]);
    put_digits(of_day % 60, &mut text[17..19]);
    let end = if micros == 0 {
        19
    } else if micros.is_multiple_of(1000) {
        put_digits(micros / 1000, &mut text[20..23]);
        23
    } else {
        put_digits(micros, &mut text[20..26]);
        26
    };
    text[end] = b'Z';
    put_with_year(year, &mut text[..=end], out);
}

/// `value` as exactly `out.len()` decimal digits, zero-padded.
fn put_digits(mut value: u32, out: &mut [u8]) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
        LargeStringArray, RecordBatch, StringArray, TimestampMicrosecondArray, UInt8Array,
    };
    use proptest::prelude::*;

    /// What arrow's CSV writer writes.
    fn reference(batch: &RecordBatch) -> String {
        let mut out = Vec::new();
        {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .with_timestamp_tz_format("%Y-%m-%dT%H:%M:%S%.fZ".to_string())
                .build(&mut out);
            writer.write(batch).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    fn ours(batch: &RecordBatch) -> String {
        let mut out = Vec::new();
        super::encode(batch, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn text() -> impl Strategy<Value = Option<String>> {
        proptest::option::weighted(0.9, "[a-zåäö ,\"\r\n;'0-9]{0,8}")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn writes_what_arrows_csv_writer_writes(
            rows in proptest::collection::vec((
                text(),
                proptest::option::weighted(0.9, any::<i64>()),
                proptest::option::weighted(0.9, any::<i32>()),
                proptest::option::weighted(0.9, -10_i128.pow(18)..10_i128.pow(18)),
                proptest::option::weighted(0.9, -1_000_000i32..3_000_000),
                proptest::option::weighted(0.9, any::<bool>()),
                proptest::option::weighted(0.9, any::<f64>()),
                proptest::option::weighted(0.9, any::<u8>()),
                proptest::option::weighted(0.9, prop_oneof![
                    // Years 0 to 9999, whole seconds, milliseconds or microseconds.
                    (-62_167_219_200i64..253_402_300_799, 0i64..3, 0i64..1_000_000).prop_map(
                        |(s, unit, us)| s * 1_000_000 + [0, us / 1000 * 1000, us][unit as usize]
                    ),
                    // Any year chrono (and so arrow's writer) can write.
                    -8_000_000_000_000_000_000i64..8_000_000_000_000_000_000,
                ]),
                proptest::option::weighted(0.9, "[a-zåäö ;'0-9]{0,8}"),
            ), 1..20),
            scale in 0i8..6,
            single in any::<bool>(),
            skip in 0usize..3,
        ) {
            let texts: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
            let columns: Vec<(&str, ArrayRef)> = vec![
                ("text, \"quoted\"", Arc::new(StringArray::from(texts.clone()))),
                ("large", Arc::new(LargeStringArray::from(texts))),
                ("i64", Arc::new(rows.iter().map(|r| r.1).collect::<Int64Array>())),
                ("i32", Arc::new(rows.iter().map(|r| r.2).collect::<Int32Array>())),
                ("amount", Arc::new(
                    rows.iter().map(|r| r.3).collect::<Decimal128Array>()
                        .with_precision_and_scale(38, scale).unwrap(),
                )),
                ("day", Arc::new(rows.iter().map(|r| r.4).collect::<Date32Array>())),
                ("flag", Arc::new(rows.iter().map(|r| r.5).collect::<BooleanArray>())),
                ("float", Arc::new(rows.iter().map(|r| r.6).collect::<Float64Array>())),
                ("u8", Arc::new(rows.iter().map(|r| r.7).collect::<UInt8Array>())),
                ("at", Arc::new(
                    rows.iter().map(|r| r.8).collect::<TimestampMicrosecondArray>().with_timezone("UTC"),
                )),
                ("plain", Arc::new(rows.iter().map(|r| r.9.clone()).collect::<StringArray>())),
            ];
            let batch = if single {
                // One column: an empty field must still make a record.
                RecordBatch::try_from_iter(columns.into_iter().take(1)).unwrap()
            } else {
                RecordBatch::try_from_iter(columns).unwrap()
            };
            prop_assert_eq!(ours(&batch), reference(&batch));
            // A slice shares its buffers with rows outside it.
            let skip = skip.min(batch.num_rows());
            let sliced = batch.slice(skip, batch.num_rows() - skip);
            prop_assert_eq!(ours(&sliced), reference(&sliced));
        }
    }
}
