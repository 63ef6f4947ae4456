//! Encoders for published files: Parquet (zstd, statistics, typed) and CSV (UTF-8,
//! comma, header, RFC 4180 quoting, `\n`).

use arrow::array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

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
}

/// Encodes a batch in `format`.
pub fn encode(format: OutputFormat, batch: &RecordBatch) -> Result<Bytes, EncodeError> {
    match format {
        OutputFormat::Parquet => parquet_bytes(batch),
        OutputFormat::Csv => csv_bytes(batch),
    }
}

fn parquet_bytes(batch: &RecordBatch) -> Result<Bytes, EncodeError> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(format!("oppen {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 4);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(properties))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(Bytes::from(out))
}

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
