//! Encoders for published files: Parquet (zstd, statistics, typed) and CSV (UTF-8,
//! comma, header, RFC 4180 quoting, `\n`).

use std::collections::HashSet;
use std::io::Write;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::config::OutputFormat;

/// Rows per Parquet row group: large groups compress and scan best.
const ROW_GROUP_ROWS: usize = 1024 * 1024;
/// zstd level 3: the library default, a good balance of speed and size.
const ZSTD_LEVEL: i32 = 3;

/// Errors while encoding a file.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Parquet failed.
    #[error("writing parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Arrow (CSV) failed.
    #[error("writing csv: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The bytes could not be handed on (the file's writer stopped).
    #[error("writing the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Where an encoder's bytes go: any writer, and whole chunks an encoder made
/// itself are handed over as they are (see [`crate::publish::store::ChunkWriter`]).
pub trait Sink: Write + Send {
    /// Takes a whole chunk of the file.
    fn put(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.write_all(&bytes)
    }
}

impl Sink for Vec<u8> {}

/// Encodes a batch in `format`.
pub fn encode(format: OutputFormat, batch: &RecordBatch) -> Result<Bytes, EncodeError> {
    let mut out = Vec::new();
    encode_to(format, batch, &mut out)?;
    Ok(Bytes::from(out))
}

/// Encodes a batch in `format` into `sink` as it goes, so the file is never
/// whole in memory when the sink passes it on.
pub fn encode_to(
    format: OutputFormat,
    batch: &RecordBatch,
    sink: &mut impl Sink,
) -> Result<(), EncodeError> {
    match format {
        OutputFormat::Parquet => parquet_to(batch, sink),
        OutputFormat::Csv => csv_chunks(batch, |chunk| sink.put(chunk)),
    }
}

#[cfg(test)]
fn parquet_bytes(batch: &RecordBatch) -> Result<Bytes, EncodeError> {
    encode(OutputFormat::Parquet, batch)
}

fn parquet_to(batch: &RecordBatch, sink: &mut impl Sink) -> Result<(), EncodeError> {
    let mut properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(format!("oppen {}", env!("CARGO_PKG_VERSION")));
    for name in mostly_distinct(batch)? {
        properties = properties.set_column_dictionary_enabled(ColumnPath::from(name), false);
    }
    let properties = properties.build();
    let mut writer = ArrowWriter::try_new(sink, batch.schema(), Some(properties))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(())
}

/// Rows sampled to judge a column's cardinality.
const SAMPLE_ROWS: usize = 1024;

/// The flat columns whose sampled values are more than half distinct (keys,
/// timestamps, free text). A dictionary does not pay for them: the writer
/// would intern values until the dictionary page is full, then fall back to
/// plain encoding anyway, and interning is a fifth of the Parquet time.
fn mostly_distinct(batch: &RecordBatch) -> Result<Vec<String>, EncodeError> {
    let sample = batch.slice(0, batch.num_rows().min(SAMPLE_ROWS));
    let mut names = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(sample.columns()) {
        let flat = field.data_type().is_primitive()
            || matches!(
                field.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary
            );
        if !flat || column.len() < 2 {
            continue;
        }
        let converter = RowConverter::new(vec![SortField::new(field.data_type().clone())])?;
        let rows = converter.convert_columns(std::slice::from_ref(column))?;
        let distinct: HashSet<&[u8]> = rows.iter().map(|r| r.data()).collect();
        if distinct.len() * 2 > column.len() {
            names.push(field.name().clone());
        }
    }
    Ok(names)
}

/// Rows per chunk of a CSV file streamed to its store: 2-4 MB of text for
/// an invoice table.
const CSV_CHUNK_ROWS: usize = 16 * 1024;

/// Encodes a batch as CSV in chunks of rows, the header in the first, handing
/// each to `sink` as it is done, so a large file is never whole in memory.
/// Stops at the first error of `sink` (the writer is gone).
fn csv_chunks(
    batch: &RecordBatch,
    mut sink: impl FnMut(Bytes) -> std::io::Result<()>,
) -> Result<(), EncodeError> {
    let rows = batch.num_rows();
    let mut start = 0;
    // Each chunk starts at the size of the one before, plus an eighth, not
    // empty: growing a few MB by doubling copies it about once more.
    let mut room = 0;
    loop {
        let len = CSV_CHUNK_ROWS.min(rows - start);
        let mut out = Vec::with_capacity(room);
        super::csv::encode_rows(&batch.slice(start, len), start == 0, &mut out)?;
        room = out.len() + out.len() / 8;
        sink(Bytes::from(out))?;
        start += len;
        if start >= rows {
            return Ok(());
        }
    }
}

/// The whole file in one call, which the chunks must equal.
#[cfg(test)]
fn csv_bytes(batch: &RecordBatch) -> Result<Bytes, EncodeError> {
    let mut out = Vec::new();
    super::csv::encode(batch, &mut out)?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{RecordBatch, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    /// Mostly distinct columns are written without a dictionary, repetitive
    /// ones with one, and both read back as written.
    #[test]
    fn dictionaries_only_where_values_repeat() {
        use arrow::array::{Array, Int64Array, StringArray};
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

        let rows = 10_000;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("supplier", DataType::Utf8, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("Leverantör {}", i % 7)),
                )),
                Arc::new(StringArray::from_iter(
                    (0..rows).map(|i| (i % 3 != 0).then(|| format!("order {i}"))),
                )),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let file = super::parquet_bytes(&batch).unwrap_or_else(|e| panic!("{e}"));
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(file).unwrap_or_else(|e| panic!("{e}"));
        let chunk = |i: usize| {
            reader
                .metadata()
                .row_group(0)
                .column(i)
                .dictionary_page_offset()
        };
        assert!(chunk(0).is_none(), "a unique key needs no dictionary");
        assert!(chunk(1).is_some(), "seven suppliers are a dictionary");
        assert!(chunk(2).is_none(), "distinct text needs no dictionary");
        let read: Vec<RecordBatch> = reader
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        let read = arrow::compute::concat_batches(&batch.schema(), &read)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read, batch);
        assert_eq!(read.column(2).null_count(), 3334);
    }

    /// A CSV file written in chunks is byte for byte the file written whole:
    /// one header, every row once, in order.
    #[test]
    fn csv_in_chunks_is_the_whole_file() {
        use arrow::array::{Int64Array, StringArray};

        let rows = 2 * super::CSV_CHUNK_ROWS as i64 + 5;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(StringArray::from_iter(
                    (0..rows).map(|i| (i % 5 != 0).then(|| format!("rad {i}, \"citat\""))),
                )),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let whole = super::csv_bytes(&batch).unwrap_or_else(|e| panic!("{e}"));
        let mut chunks = Vec::new();
        super::csv_chunks(&batch, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), whole.to_vec());
        // A writer that goes away stops the encoder, with its error.
        let mut taken = 0;
        let stopped = super::csv_chunks(&batch, |_| {
            taken += 1;
            Err(std::io::ErrorKind::BrokenPipe.into())
        });
        assert!(
            matches!(stopped, Err(super::EncodeError::Io(_))),
            "{stopped:?}"
        );
        assert_eq!(taken, 1);
    }

    /// The fast timestamp text is byte for byte what the chrono format wrote.
    #[test]
    fn timestamps_read_as_before() {
        let values = vec![
            Some(0),
            Some(1_704_067_200_000_000),
            Some(1_704_067_200_123_000),
            Some(1_704_067_200_123_456),
            Some(1_704_067_200_000_001),
            Some(-1),
            Some(-62_135_596_800_000_000),
            Some(-86_400_000_000 * 365 * 2100),
            Some(253_402_300_799_999_999),
            None,
        ];
        let array = TimestampMicrosecondArray::from(values).with_timezone("UTC");
        let schema = Arc::new(Schema::new(vec![Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        )]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(array)]).unwrap_or_else(|e| panic!("{e}"));
        let mut reference = Vec::new();
        {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .with_timestamp_tz_format("%Y-%m-%dT%H:%M:%S%.fZ".to_string())
                .build(&mut reference);
            writer.write(&batch).unwrap_or_else(|e| panic!("{e}"));
        }
        let fast = super::csv_bytes(&batch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&reference)
        );
    }
}
