//! Encoders for published files: Parquet (zstd, statistics, typed) and CSV (UTF-8,
//! comma, header, RFC 4180 quoting, `\n`).

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, FieldRef, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowRowGroupWriterFactory, compute_leaves};
use parquet::basic::{Compression, ZstdLevel};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
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
/// itself are handed over as they are (see [`crate::store::ChunkWriter`]).
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
    encode_stream(
        format,
        &batch.schema(),
        std::iter::once(batch.clone()),
        sink,
    )
}

/// Encodes batches of `schema` in `format` as they come, into one file: a
/// part whose rows are still being read is encoded while they arrive, and
/// never held whole (see `publish::stream`). Parquet columns take their
/// encoding from the first batch's values.
pub fn encode_stream(
    format: OutputFormat,
    schema: &SchemaRef,
    batches: impl Iterator<Item = RecordBatch>,
    sink: &mut impl Sink,
) -> Result<(), EncodeError> {
    match format {
        OutputFormat::Parquet => parquet_stream(schema, batches, sink),
        OutputFormat::Csv => {
            let (mut header, mut room) = (true, 0);
            for batch in batches {
                csv_chunks(&batch, header, &mut room, |chunk| sink.put(chunk))?;
                header = false;
            }
            if header {
                // No rows: the file is its header.
                let empty = RecordBatch::new_empty(schema.clone());
                csv_chunks(&empty, true, &mut room, |chunk| sink.put(chunk))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
fn parquet_bytes(batch: &RecordBatch) -> Result<Bytes, EncodeError> {
    encode(OutputFormat::Parquet, batch)
}

fn parquet_stream(
    schema: &SchemaRef,
    mut batches: impl Iterator<Item = RecordBatch>,
    sink: &mut impl Sink,
) -> Result<(), EncodeError> {
    let first = batches
        .next()
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone()));
    let properties = parquet_properties(&first)?;
    let mut writer = ArrowWriter::try_new(sink, schema.clone(), Some(properties))?;
    writer.write(&first)?;
    drop(first);
    for batch in batches {
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(())
}

fn parquet_properties(batch: &RecordBatch) -> Result<WriterProperties, EncodeError> {
    let mut properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(format!("oppen {}", env!("CARGO_PKG_VERSION")));
    for name in mostly_distinct(batch)? {
        properties = properties.set_column_dictionary_enabled(ColumnPath::from(name), false);
    }
    Ok(properties.build())
}

/// A committed file of a part whose rows a version rewrites in place (same
/// rows, same order, some values changed): what did not change is copied
/// from it instead of encoded again.
#[derive(Debug, Clone)]
pub struct Previous {
    /// The file's bytes.
    pub bytes: Bytes,
    /// Per column of the batch: no value changed.
    pub unchanged: Vec<bool>,
    /// The rows whose values changed, ascending.
    pub changed_rows: Vec<u32>,
}

/// A part's rows after an update in place, as the encoders that copy from
/// the previous file need them: the columns that changed, whole, and the rows
/// that changed, whole. Unchanged columns are never read (their Parquet
/// chunks and CSV lines are copied), so they need not be in memory at all.
#[derive(Debug, Clone)]
pub struct InPlaceRows {
    /// The published schema.
    pub schema: SchemaRef,
    /// Rows in the part.
    pub rows: usize,
    /// Per column of `schema`: the whole new column where a value changed,
    /// `None` where none did.
    pub changed_columns: Vec<Option<ArrayRef>>,
    /// The changed rows' new values, in the order of
    /// [`Previous::changed_rows`].
    pub changed_rows: RecordBatch,
}

impl InPlaceRows {
    /// The parts of a whole batch an update in place needs; `None` when
    /// `previous` does not fit the batch (another column count, changed rows
    /// out of order or beyond it).
    pub fn of(batch: &RecordBatch, previous: &Previous) -> Result<Option<Self>, EncodeError> {
        if previous.unchanged.len() != batch.num_columns()
            || !rows_ascending_within(&previous.changed_rows, batch.num_rows())
        {
            return Ok(None);
        }
        let positions = arrow::array::UInt32Array::from(previous.changed_rows.clone());
        Ok(Some(Self {
            schema: batch.schema(),
            rows: batch.num_rows(),
            changed_columns: batch
                .columns()
                .iter()
                .zip(&previous.unchanged)
                .map(|(column, &unchanged)| (!unchanged).then(|| column.clone()))
                .collect(),
            changed_rows: arrow::compute::take_record_batch(batch, &positions)?,
        }))
    }

    /// Whether the rows and `previous` describe the same columns and rows.
    fn consistent(&self, previous: &Previous) -> bool {
        let rows = &previous.changed_rows;
        self.changed_columns.len() == self.schema.fields().len()
            && previous.unchanged.len() == self.changed_columns.len()
            && previous
                .unchanged
                .iter()
                .zip(&self.changed_columns)
                .all(|(&unchanged, column)| unchanged == column.is_none())
            && self.changed_rows.num_rows() == rows.len()
            && self.changed_rows.schema().fields() == self.schema.fields()
            && rows_ascending_within(rows, self.rows)
    }
}

/// Whether changed rows are ascending and all below `len`, as the encoders
/// that copy from a previous file walk them.
fn rows_ascending_within(rows: &[u32], len: usize) -> bool {
    rows.windows(2).all(|w| w[0] < w[1]) && rows.last().is_none_or(|&r| (r as usize) < len)
}

/// Encodes `batch` in `format` like [`encode_to`], copying from `previous`
/// what did not change: Parquet column chunks of unchanged columns, CSV lines
/// of unchanged rows. A 1% update of a wide table then costs the changed
/// columns and rows, not the whole part. Falls back to [`encode_to`] when the
/// previous file does not line up with the batch (another schema, another
/// row grouping, another row count); nothing is written before that is known.
/// Returns whether the previous file was used.
pub fn encode_reusing(
    format: OutputFormat,
    batch: &RecordBatch,
    previous: &Previous,
    sink: &mut impl Sink,
) -> Result<bool, EncodeError> {
    let reused = match InPlaceRows::of(batch, previous)? {
        Some(rows) => encode_in_place(format, &rows, previous, sink)?,
        None => false,
    };
    if !reused {
        encode_to(format, batch, sink)?;
    }
    Ok(reused)
}

/// Encodes a part updated in place from its previous file, as
/// [`encode_reusing`] does, from the changed columns and rows alone; `false`
/// (and nothing written) when the previous file does not line up, which
/// [`in_place_fits`] tells beforehand.
pub fn encode_in_place(
    format: OutputFormat,
    rows: &InPlaceRows,
    previous: &Previous,
    sink: &mut impl Sink,
) -> Result<bool, EncodeError> {
    if !rows.consistent(previous) {
        return Ok(false);
    }
    match format {
        OutputFormat::Parquet => parquet_in_place(rows, previous, sink),
        OutputFormat::Csv => csv_in_place(rows, previous, sink),
    }
}

/// Whether [`encode_in_place`] can write `rows` from `previous`.
pub fn in_place_fits(format: OutputFormat, rows: &InPlaceRows, previous: &Previous) -> bool {
    rows.consistent(previous)
        && match format {
            OutputFormat::Parquet => {
                rows.rows > 0
                    && reusable_parquet(&rows.schema, rows.rows, &previous.bytes).is_some()
            }
            OutputFormat::Csv => csv_fits(rows, &previous.bytes).is_some(),
        }
}

/// The previous Parquet file's metadata, if its column chunks can stand for
/// rows of `schema`: the same columns and types, row groups of the sizes this
/// writer would cut, and page indexes to carry over.
fn reusable_parquet(schema: &Schema, rows: usize, old: &Bytes) -> Option<ParquetMetaData> {
    let metadata = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Required)
        .parse_and_finish(old)
        .ok()?;
    let file = metadata.file_metadata();
    let found =
        parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
            .ok()?;
    let same_columns = found.fields().len() == schema.fields().len()
        && found.fields().iter().zip(schema.fields()).all(|(a, b)| {
            a.name() == b.name()
                && a.data_type() == b.data_type()
                && a.is_nullable() == b.is_nullable()
        });
    let groups = rows.div_ceil(ROW_GROUP_ROWS).max(1);
    let same_groups = metadata.num_row_groups() == groups
        && metadata.row_groups().iter().enumerate().all(|(g, group)| {
            group.num_rows() as usize == ROW_GROUP_ROWS.min(rows - g * ROW_GROUP_ROWS)
        });
    (same_columns && same_groups && metadata.page_index().is_some()).then_some(metadata)
}

/// Writes the rows as Parquet with the unchanged columns' chunks copied from
/// the previous file; `false` (and nothing written) if it does not line up.
fn parquet_in_place(
    rows: &InPlaceRows,
    previous: &Previous,
    sink: &mut impl Sink,
) -> Result<bool, EncodeError> {
    if rows.rows == 0 {
        return Ok(false);
    }
    let Some(old) = reusable_parquet(&rows.schema, rows.rows, &previous.bytes) else {
        return Ok(false);
    };
    let schema = rows.schema.clone();
    // Only the changed columns are encoded: their values decide their
    // encoding (the copied chunks keep theirs).
    let (fields, columns): (Vec<FieldRef>, Vec<ArrayRef>) = schema
        .fields()
        .iter()
        .zip(&rows.changed_columns)
        .filter_map(|(f, c)| Some((f.clone(), c.clone()?)))
        .unzip();
    let changed = RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.rows)),
    )?;
    let mut properties = parquet_properties(&changed)?;
    parquet::arrow::add_encoded_arrow_schema_to_metadata(&schema, &mut properties);
    let properties = Arc::new(properties);
    let descriptor = parquet::arrow::ArrowSchemaConverter::new()
        .with_coerce_types(properties.coerce_types())
        .convert(&schema)?;
    let mut writer = parquet::file::writer::SerializedFileWriter::new(
        sink,
        descriptor.root_schema_ptr(),
        properties,
    )?;
    let factory = ArrowRowGroupWriterFactory::new(&writer, schema.clone());
    for (g, group) in old.row_groups().iter().enumerate() {
        let (offset, length) = (g * ROW_GROUP_ROWS, group.num_rows() as usize);
        let mut encoders = factory.create_column_writers(g)?.into_iter();
        let pages = old.page_index_for_row_group(g);
        let mut row_group = writer.next_row_group()?;
        let mut leaf = 0;
        for (c, field) in schema.fields().iter().enumerate() {
            let leaves = (leaf..descriptor.num_columns())
                .take_while(|&l| descriptor.get_column_root_idx(l) == c)
                .count();
            match &rows.changed_columns[c] {
                None => {
                    for l in leaf..leaf + leaves {
                        encoders.next();
                        let chunk = group.column(l);
                        let close = ColumnCloseResult {
                            bytes_written: chunk.compressed_size() as u64,
                            rows_written: group.num_rows() as u64,
                            metadata: chunk.clone(),
                            bloom_filter: None,
                            column_index: pages.column_index(l).cloned(),
                            offset_index: pages.offset_index(l).cloned(),
                        };
                        row_group.append_column(&previous.bytes, close)?;
                    }
                }
                Some(column) => {
                    let column = column.slice(offset, length);
                    for values in compute_leaves(field, &column)? {
                        let mut encoder = encoders.next().ok_or_else(|| {
                            parquet::errors::ParquetError::General(format!(
                                "no column writer left for {}",
                                field.name()
                            ))
                        })?;
                        encoder.write(&values)?;
                        encoder.close()?.append_to_row_group(&mut row_group)?;
                    }
                }
            }
            leaf += leaves;
        }
        row_group.close()?;
    }
    writer.close()?;
    Ok(true)
}

/// Where each line of a CSV file starts (header first), and where the last
/// ends: `None` if the text does not end with a whole line. Quoted fields may
/// hold line breaks, so quotes are followed (a doubled quote inside a quoted
/// field toggles twice and changes nothing).
fn csv_lines(text: &[u8]) -> Option<Vec<usize>> {
    let mut starts = vec![0];
    let mut quoted = false;
    for at in memchr::memchr2_iter(b'"', b'\n', text) {
        if text[at] == b'"' {
            quoted = !quoted;
        } else if !quoted {
            starts.push(at + 1);
        }
    }
    (!quoted && starts.last() == Some(&text.len())).then_some(starts)
}

/// The previous CSV file's line starts, if its lines can stand for the
/// rows: a header as this writer writes it and a line per row.
fn csv_fits(rows: &InPlaceRows, old: &[u8]) -> Option<Vec<usize>> {
    let lines = csv_lines(old)?;
    // The header and one line per row.
    if lines.len() != rows.rows + 2 {
        return None;
    }
    let mut header = Vec::new();
    super::csv::encode_rows(
        &RecordBatch::new_empty(rows.schema.clone()),
        true,
        &mut header,
    )
    .ok()?;
    (old[..lines[1]] == header[..]).then_some(lines)
}

/// Writes the rows as CSV with the unchanged rows' lines copied from the
/// previous file; `false` (and nothing written) if it does not line up.
fn csv_in_place(
    rows: &InPlaceRows,
    previous: &Previous,
    sink: &mut impl Sink,
) -> Result<bool, EncodeError> {
    let old = &previous.bytes;
    let Some(lines) = csv_fits(rows, old) else {
        return Ok(false);
    };
    let mut from = 0;
    let mut line = Vec::new();
    for (i, &row) in previous.changed_rows.iter().enumerate() {
        let row = row as usize;
        // Everything before this row's line as it was (with the header).
        sink.write_all(&old[from..lines[row + 1]])?;
        line.clear();
        super::csv::encode_rows(&rows.changed_rows.slice(i, 1), false, &mut line)?;
        sink.write_all(&line)?;
        from = lines[row + 2];
    }
    sink.write_all(&old[from..])?;
    Ok(true)
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

/// Encodes a batch as CSV in chunks of rows, the header in the first if
/// `header`, handing each to `sink` as it is done, so a large file is never
/// whole in memory. Stops at the first error of `sink` (the writer is gone).
/// Each chunk starts with `room` bytes, the size of the one before (of this
/// batch or the one before it) plus an eighth, not empty: growing a few MB
/// by doubling copies it about once more.
fn csv_chunks(
    batch: &RecordBatch,
    header: bool,
    room: &mut usize,
    mut sink: impl FnMut(Bytes) -> std::io::Result<()>,
) -> Result<(), EncodeError> {
    let rows = batch.num_rows();
    let mut start = 0;
    loop {
        let len = CSV_CHUNK_ROWS.min(rows - start);
        let mut out = Vec::with_capacity(*room);
        super::csv::encode_rows(&batch.slice(start, len), header && start == 0, &mut out)?;
        *room = out.len() + out.len() / 8;
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

    use crate::config::OutputFormat;

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
        super::csv_chunks(&batch, true, &mut 0, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), whole.to_vec());
        // A writer that goes away stops the encoder, with its error.
        let mut taken = 0;
        let stopped = super::csv_chunks(&batch, true, &mut 0, |_| {
            taken += 1;
            Err(std::io::ErrorKind::BrokenPipe.into())
        });
        assert!(
            matches!(stopped, Err(super::EncodeError::Io(_))),
            "{stopped:?}"
        );
        assert_eq!(taken, 1);
    }

    /// A file encoded from batches as they come is the file of their rows
    /// encoded at once: CSV byte for byte (one header), Parquet row for row;
    /// a stream of no batches is a file of no rows.
    #[test]
    fn a_stream_of_batches_encodes_as_their_rows_at_once() {
        let whole = invoices(50_000, &[]);
        let slices = [0..7, 7..20_000, 20_000..20_001, 20_001..50_000];
        let streamed = |format, batches: &[RecordBatch]| {
            let mut out = Vec::new();
            super::encode_stream(format, &whole.schema(), batches.iter().cloned(), &mut out)
                .unwrap_or_else(|e| panic!("{e}"));
            out
        };
        let batches: Vec<RecordBatch> = slices
            .iter()
            .map(|r| whole.slice(r.start, r.len()))
            .collect();
        let csv_of = |rows: &RecordBatch| {
            super::csv_bytes(rows)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_vec()
        };
        assert_eq!(streamed(OutputFormat::Csv, &batches), csv_of(&whole));
        let (rows, _) = read_parquet(streamed(OutputFormat::Parquet, &batches));
        assert_eq!(rows, whole);
        // No batch at all: a header-only CSV, a Parquet file of no rows with every column.
        assert_eq!(streamed(OutputFormat::Csv, &[]), csv_of(&whole.slice(0, 0)));
        let empty = streamed(OutputFormat::Parquet, &[]);
        let metadata = parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&bytes::Bytes::from(empty))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(metadata.file_metadata().num_rows(), 0);
        assert_eq!(
            metadata.file_metadata().schema_descr().num_columns(),
            whole.num_columns()
        );
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

    /// Invoice-like rows; `changed` rows get another amount and note. Notes
    /// hold commas, quotes and line breaks, so CSV lines are not simply lines.
    fn invoices(rows: usize, changed: &[usize]) -> RecordBatch {
        use arrow::array::{Decimal128Array, Int64Array, StringArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("supplier", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(18, 2), true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let is_changed = |i: usize| changed.contains(&i);
        let note = |i: usize| match (i % 5, is_changed(i)) {
            (0, _) => None,
            (1, false) => Some(format!("order {i}, \"urgent\"")),
            (2, _) => Some(format!("line one\nline two {i}")),
            (_, true) => Some(format!("changed, \"{i}\"\r\n")),
            _ => Some(format!("order {i}")),
        };
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows as i64)),
                Arc::new(StringArray::from_iter(
                    (0..rows).map(|i| (i % 11 != 0).then(|| format!("Leverantör {}", i % 7))),
                )),
                Arc::new(
                    Decimal128Array::from_iter((0..rows).map(|i| {
                        (i % 13 != 0).then_some(i as i128 * 37 + i128::from(is_changed(i)))
                    }))
                    .with_precision_and_scale(18, 2)
                    .unwrap_or_else(|e| panic!("{e}")),
                ),
                Arc::new(StringArray::from_iter((0..rows).map(note))),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The file, and whether the previous one was used.
    fn reusing(
        format: OutputFormat,
        batch: &RecordBatch,
        previous: &super::Previous,
    ) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let reused = super::encode_reusing(format, batch, previous, &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        (out, reused)
    }

    fn read_parquet(bytes: Vec<u8>) -> (RecordBatch, parquet::file::metadata::ParquetMetaData) {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
        let bytes = bytes::Bytes::from(bytes);
        let metadata = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Required)
            .parse_and_finish(&bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap_or_else(|e| panic!("{e}"))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let batches: Vec<RecordBatch> = reader
            .map(|b| b.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let schema = batches[0].schema();
        let all =
            arrow::compute::concat_batches(&schema, &batches).unwrap_or_else(|e| panic!("{e}"));
        (all, metadata)
    }

    /// A part rewritten after an update in place: the Parquet file reads back
    /// as the new rows, with the unchanged columns' chunks the very bytes of
    /// the previous file; the CSV file is byte for byte what encoding the new
    /// rows whole gives.
    #[test]
    fn an_update_in_place_copies_what_did_not_change() {
        let rows = 5_000;
        let changed = [0, 3, 17, 2_500, 4_999];
        let old = invoices(rows, &[]);
        let new = invoices(rows, &changed);
        let previous = |format| super::Previous {
            bytes: super::encode(format, &old).unwrap_or_else(|e| panic!("{e}")),
            unchanged: vec![true, true, false, false],
            changed_rows: changed.iter().map(|&r| r as u32).collect(),
        };

        let (csv, reused) = reusing(OutputFormat::Csv, &new, &previous(OutputFormat::Csv));
        assert!(reused, "the CSV lines are copied from the previous file");
        let whole = super::csv_bytes(&new).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(&csv),
            String::from_utf8_lossy(&whole)
        );

        let before = previous(OutputFormat::Parquet);
        let (written, reused) = reusing(OutputFormat::Parquet, &new, &before);
        assert!(
            reused,
            "the Parquet chunks are copied from the previous file"
        );
        let (read, metadata) = read_parquet(written.clone());
        assert_eq!(read, new);
        let (_, old_metadata) = read_parquet(before.bytes.to_vec());
        let chunk = |bytes: &[u8], meta: &parquet::file::metadata::ParquetMetaData, c: usize| {
            let column = meta.row_group(0).column(c);
            let (start, len) = column.byte_range();
            bytes[start as usize..(start + len) as usize].to_vec()
        };
        for c in 0..2 {
            assert_eq!(
                chunk(&written, &metadata, c),
                chunk(&before.bytes, &old_metadata, c),
                "column {c} is copied"
            );
            assert_eq!(
                metadata.row_group(0).column(c).statistics(),
                old_metadata.row_group(0).column(c).statistics()
            );
        }
        assert_ne!(
            chunk(&written, &metadata, 2),
            chunk(&before.bytes, &old_metadata, 2),
            "the amounts changed"
        );
    }

    /// A previous file that does not line up (other columns, other rows) is
    /// ignored: the file is encoded whole, exactly as without one.
    #[test]
    fn a_previous_file_that_does_not_line_up_is_ignored() {
        let new = invoices(300, &[7]);
        let shorter = invoices(299, &[]);
        let narrower = new.project(&[0, 1, 2]).unwrap_or_else(|e| panic!("{e}"));
        for format in [OutputFormat::Csv, OutputFormat::Parquet] {
            let whole = super::encode(format, &new).unwrap_or_else(|e| panic!("{e}"));
            for old in [&shorter, &narrower] {
                let previous = super::Previous {
                    bytes: super::encode(format, old).unwrap_or_else(|e| panic!("{e}")),
                    unchanged: vec![true, true, false, true],
                    changed_rows: vec![7],
                };
                assert_eq!(
                    reusing(format, &new, &previous),
                    (whole.to_vec(), false),
                    "{format:?}"
                );
            }
            // Not a file of this writer at all.
            let garbage = super::Previous {
                bytes: bytes::Bytes::from_static(b"id,supplier\n\"open quote\n"),
                unchanged: vec![true; 4],
                changed_rows: vec![7],
            };
            assert_eq!(
                reusing(format, &new, &garbage),
                (whole.to_vec(), false),
                "{format:?}"
            );
        }
        // CSV lines are found by the changed rows: rows out of order or beyond
        // the batch mean encoding the file whole.
        let whole = super::encode(OutputFormat::Csv, &new).unwrap_or_else(|e| panic!("{e}"));
        for changed_rows in [vec![9, 7], vec![7, 300]] {
            let previous = super::Previous {
                bytes: super::encode(OutputFormat::Csv, &invoices(300, &[]))
                    .unwrap_or_else(|e| panic!("{e}")),
                unchanged: vec![true, true, false, false],
                changed_rows,
            };
            assert_eq!(
                reusing(OutputFormat::Csv, &new, &previous),
                (whole.to_vec(), false)
            );
        }
    }
}
