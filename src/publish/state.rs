//! Keyed state: the published rows of every partition with their `_key`, and an
//! index from `_key` to partition and row fingerprint.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeBinaryArray, RecordBatch, StringArray, UInt32Array,
    new_null_array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use chrono::Datelike;

use super::index::KeyIndex;
use crate::classify::{KEY_BYTES, KEY_COLUMN};
use crate::config::PartitionGrain;

/// A row's `_key`: HMAC-SHA-256 truncated to 16 bytes. 128 bits keep
/// collisions out of reach (about 1 in 10^20 for a billion keys) at half the
/// memory of the full 32 bytes, in the index and in every batch and state file.
pub type Key = [u8; 16];

/// Hashes a `_key` by taking 8 of its bytes: keys are HMAC outputs, already
/// uniformly distributed, so hashing them again (SipHash) would only cost time.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 16]` hashes as its length, then its bytes: keep the bytes.
        if bytes.len() >= 8 {
            let mut first = [0u8; 8];
            first.copy_from_slice(&bytes[..8]);
            self.0 ^= u64::from_le_bytes(first);
        } else {
            for &b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(b);
            }
        }
    }
}

/// Builds [`KeyHasher`]s.
pub type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;
/// A map keyed by `_key`.
pub type KeyMap<V> = HashMap<Key, V, KeyHash>;
/// A set of `_key`s.
pub type KeySet = std::collections::HashSet<Key, KeyHash>;

/// The share of keys a complete image covers: every key (the embedded engine),
/// or the keys of one transport partition (a publisher on Kafka sees only the
/// image rows of the partitions it owns, so the rest must not look deleted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyScope {
    /// Every key.
    #[default]
    All,
    /// The keys [`key_partition`] puts in `partition` of `of`.
    Partition { partition: u32, of: u32 },
}

impl KeyScope {
    /// Whether `key` is in the scope.
    pub fn contains(&self, key: &Key) -> bool {
        match *self {
            KeyScope::All => true,
            KeyScope::Partition { partition, of } => key_partition(key, of) == partition,
        }
    }
}

/// The transport partition of a key among `of`. Keys are HMAC outputs, so
/// their bytes are already uniform; bytes 8..16 are used because bytes 0..8
/// place keys in hash tables ([`KeyHasher`]).
pub fn key_partition(key: &[u8], of: u32) -> u32 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[8..16]);
    (u64::from_le_bytes(bytes) % u64::from(of.max(1))) as u32
}

/// Where a key's row is, and what it looked like. Packed to 4-byte
/// alignment: the key index holds one per key, and (key, entry) then takes
/// 28 bytes a slot instead of 32 (16 MB less for 2,000,000 keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct Entry {
    /// Partition id (see [`Partitions`]).
    pub partition: u32,
    /// Fingerprint of the published values.
    pub hash: u64,
}

// The index's slot size the packing is for.
const _: () = assert!(size_of::<(Key, Entry)>() == 28);

/// Partition names interned as small ids.
#[derive(Debug, Default, Clone)]
pub struct Partitions {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Partitions {
    /// The id of a name, adding it if new.
    pub fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    /// The name of an id.
    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// The `_key` column of a classified batch.
pub fn keys(batch: &RecordBatch) -> Result<&FixedSizeBinaryArray, ArrowError> {
    batch
        .column_by_name(KEY_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
        .ok_or_else(|| ArrowError::SchemaError(format!("batch has no {KEY_COLUMN} column")))
}

/// A `_key` is as wide as the index's [`Key`].
const _: () = assert!(KEY_BYTES == size_of::<Key>());

/// `batch` with its `_key` column cut to [`KEY_BYTES`] bytes a key, the bytes
/// the index always used. State files and transport messages written before
/// `_key` was truncated carry all 32 bytes of the HMAC; rows read from them
/// or staged from an older connector are cut here, so a dataset never holds
/// keys of two widths. A batch of narrow keys is returned as it is.
pub fn narrow_keys(batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let Ok(at) = schema.index_of(KEY_COLUMN) else {
        return Ok(batch);
    };
    let &DataType::FixedSizeBinary(width) = schema.field(at).data_type() else {
        return Err(ArrowError::SchemaError(format!(
            "{KEY_COLUMN} is {}, not fixed-size binary",
            schema.field(at).data_type()
        )));
    };
    match usize::try_from(width) {
        Ok(KEY_BYTES) => return Ok(batch),
        Ok(w) if w > KEY_BYTES => {}
        _ => {
            return Err(ArrowError::SchemaError(format!(
                "{KEY_COLUMN} has {width} bytes a key; at least {KEY_BYTES} are needed"
            )));
        }
    }
    let wide = batch.column(at).as_fixed_size_binary();
    let mut narrow = Vec::with_capacity(wide.len() * KEY_BYTES);
    for row in 0..wide.len() {
        narrow.extend_from_slice(&wide.value(row)[..KEY_BYTES]);
    }
    let narrow =
        FixedSizeBinaryArray::try_new(KEY_BYTES as i32, narrow.into(), wide.logical_nulls())?;
    let mut fields: Vec<FieldRef> = schema.fields().iter().cloned().collect();
    fields[at] = Arc::new(
        fields[at]
            .as_ref()
            .clone()
            .with_data_type(DataType::FixedSizeBinary(KEY_BYTES as i32)),
    );
    let mut columns = batch.columns().to_vec();
    columns[at] = Arc::new(narrow);
    RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )
}

/// The index key of a row (see [`Key`]).
pub fn key_at(keys: &FixedSizeBinaryArray, row: usize) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&keys.value(row)[..16]);
    k
}

/// Adds every row of a partition to an index.
pub fn index_rows(
    index: &mut KeyIndex,
    rows: &RecordBatch,
    partition: u32,
) -> Result<(), ArrowError> {
    let keys = keys(rows)?;
    let hashes = row_hashes(rows)?;
    for (row, &hash) in hashes.iter().enumerate() {
        index.insert(key_at(keys, row), Entry { partition, hash });
    }
    Ok(())
}

/// Fingerprints of the published values (every column but `_key`) of each row.
///
/// Column by column: strings and fixed-width values are hashed where they
/// lie (xxh3, seeded with the column's position, NULL distinct from every
/// value), and folded into each row's fingerprint; other types go through
/// arrow's row format. Only ever compared with fingerprints made by the same
/// build on the same schema (the index is rebuilt from the state at start).
pub fn row_hashes(batch: &RecordBatch) -> Result<Vec<u64>, ArrowError> {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    let schema = batch.schema();
    let rows = batch.num_rows();
    let mut hashes = vec![0u64; rows];
    let fold =
        |h: &mut u64, v: u64| *h = (h.rotate_left(23) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut others: (Vec<SortField>, Vec<ArrayRef>) = (Vec::new(), Vec::new());
    let columns = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| f.name() != KEY_COLUMN);
    for (position, (field, column)) in columns.enumerate() {
        let seed = position as u64 + 1;
        let null = seed.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 0x5555_5555_5555_5555;
        let value_of = |r: usize, value: &[u8]| {
            if column.is_null(r) {
                null
            } else {
                xxh3_64_with_seed(value, seed)
            }
        };
        match column.data_type() {
            DataType::Utf8 => {
                let a = column
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| {
                        ArrowError::SchemaError(format!("{} is not text", field.name()))
                    })?;
                for (r, h) in hashes.iter_mut().enumerate() {
                    fold(h, value_of(r, a.value(r).as_bytes()));
                }
            }
            t if t.primitive_width().is_some_and(|w| w > 0) => {
                let width = t.primitive_width().unwrap_or(1);
                let data = column.to_data();
                let bytes = &data.buffers()[0].as_slice()[data.offset() * width..];
                for (r, h) in hashes.iter_mut().enumerate() {
                    fold(h, value_of(r, &bytes[r * width..(r + 1) * width]));
                }
            }
            _ => {
                others.0.push(SortField::new(field.data_type().clone()));
                others.1.push(column.clone());
            }
        }
    }
    if !others.1.is_empty() {
        let converter = RowConverter::new(others.0)?;
        let converted = converter.convert_columns(&others.1)?;
        for (h, row) in hashes.iter_mut().zip(converted.iter()) {
            fold(h, xxhash_rust::xxh3::xxh3_64(row.as_ref()));
        }
    }
    Ok(hashes)
}

/// The partition of every row, as ids in `names`. Dates and timestamps map to
/// their year, month or day; other values to themselves (made path-safe).
pub fn partition_ids(
    batch: &RecordBatch,
    by: Option<&(String, PartitionGrain)>,
    single: &str,
    names: &mut Partitions,
) -> Result<Vec<u32>, ArrowError> {
    let Some((column, grain)) = by else {
        return Ok(vec![names.id(single); batch.num_rows()]);
    };
    let array = batch.column_by_name(column).ok_or_else(|| {
        ArrowError::SchemaError(format!("partition column `{column}` is not published"))
    })?;
    let temporal = matches!(
        array.data_type(),
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
    );
    if temporal && *grain != PartitionGrain::Value {
        // Rows of one day share a partition: convert each distinct day once.
        let days = cast(array, &DataType::Date32)?;
        let days = days
            .as_any()
            .downcast_ref::<arrow::array::Date32Array>()
            .ok_or_else(|| ArrowError::CastError("date".into()))?;
        let mut by_day: HashMap<Option<i32>, u32> = HashMap::new();
        return Ok(days
            .iter()
            .map(|day| {
                *by_day.entry(day).or_insert_with(|| {
                    let date =
                        day.and_then(|d| chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163));
                    let name = match date {
                        None => NULL_PARTITION.to_string(),
                        Some(t) => match grain {
                            PartitionGrain::Year => format!("{:04}", t.year()),
                            PartitionGrain::Month => format!("{:04}-{:02}", t.year(), t.month()),
                            _ => format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
                        },
                    };
                    names.id(&name)
                })
            })
            .collect());
    }
    let text = cast(array, &DataType::Utf8)?;
    let text = text
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ArrowError::CastError("text".into()))?;
    let mut by_value: HashMap<Option<&str>, u32> = HashMap::new();
    Ok(text
        .iter()
        .map(|v| {
            *by_value.entry(v).or_insert_with(|| {
                names.id(&v.map_or_else(|| NULL_PARTITION.to_string(), sanitize))
            })
        })
        .collect())
}

/// The partition of rows whose partition value is NULL.
pub const NULL_PARTITION: &str = "unknown";

/// A value made safe as a path segment.
fn sanitize(value: &str) -> String {
    let s: String = value
        .trim()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

/// A batch with exactly `target`'s columns: same-named columns cast to the target
/// type, missing ones NULL. Used when the published schema changes.
pub fn align(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema().as_ref() == target.as_ref() {
        return Ok(batch.clone());
    }
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(target.clone(), columns)
}

/// zstd level 1 for the private state, not the library's 3: the state is
/// written for every part of every version and read only by oppen, and
/// level 1 encodes it much faster for a tenth more bytes (`cargo bench
/// --bench encode`). Published Parquet keeps level 3: consumers download it.
const STATE_ZSTD_LEVEL: i32 = 1;

/// Rows per record batch of a state file. The IPC writer compresses a whole
/// batch into one buffer before writing it: in slices, a part's state is never
/// whole in memory twice.
const STATE_BATCH_ROWS: usize = 32 * 1024;

/// Encodes a state batch as Arrow IPC (zstd): fast to read back, and small on
/// remote stores and disks, where bytes cost more than the compression.
pub fn encode_state(batch: &RecordBatch) -> Result<Bytes, ArrowError> {
    let mut out = Vec::new();
    encode_state_to(batch, &mut out)?;
    Ok(Bytes::from(out))
}

/// [`encode_state`] into `out` as it goes, in slices of [`STATE_BATCH_ROWS`].
pub fn encode_state_to(
    batch: &RecordBatch,
    out: &mut impl std::io::Write,
) -> Result<(), ArrowError> {
    encode_state_stream(&batch.schema(), std::iter::once(batch.clone()), out)
}

/// Encodes batches of `schema` into one state file as they come.
pub fn encode_state_stream(
    schema: &SchemaRef,
    batches: impl Iterator<Item = RecordBatch>,
    out: &mut impl std::io::Write,
) -> Result<(), ArrowError> {
    let options = arrow::ipc::writer::IpcWriteOptions::default()
        .try_with_compression(Some(arrow::ipc::CompressionType::ZSTD))?
        .try_with_compression_level(Some(STATE_ZSTD_LEVEL))?;
    let mut writer = arrow::ipc::writer::FileWriter::try_new_with_options(out, schema, options)?;
    let mut empty = true;
    for batch in batches {
        let mut start = 0;
        while start < batch.num_rows() {
            let len = STATE_BATCH_ROWS.min(batch.num_rows() - start);
            writer.write(&batch.slice(start, len))?;
            start += len;
            empty = false;
        }
    }
    if empty {
        // One empty batch, as a state of no rows always had.
        writer.write(&RecordBatch::new_empty(schema.clone()))?;
    }
    writer.finish()
}

/// Decodes a state file.
pub fn decode_state(bytes: Bytes) -> Result<RecordBatch, ArrowError> {
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    narrow_keys(concat_owned(&schema, batches)?)
}

/// Concatenates batches of `schema` that are not needed afterwards, one
/// column at a time, each column's pieces dropped once copied: the peak is
/// the batches and one column more, not twice the batches (as with
/// `concat_batches`, which keeps every piece until it is done). Empty
/// batches are left out, so one batch with rows is returned as it is, not
/// copied (a new part's rows joined to its no committed rows).
pub fn concat_owned(
    schema: &SchemaRef,
    mut batches: Vec<RecordBatch>,
) -> Result<RecordBatch, ArrowError> {
    batches.retain(|b| b.num_rows() > 0);
    match batches.len() {
        0 => return Ok(RecordBatch::new_empty(schema.clone())),
        1 => return Ok(batches.into_iter().next().expect("one batch")),
        _ => {}
    }
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    let mut pieces: Vec<Vec<ArrayRef>> =
        vec![Vec::with_capacity(batches.len()); schema.fields().len()];
    for batch in batches {
        for (column, array) in pieces.iter_mut().zip(batch.columns()) {
            column.push(array.clone());
        }
    }
    let columns = pieces
        .into_iter()
        .map(|column| {
            let arrays: Vec<&dyn Array> = column.iter().map(|a| a.as_ref()).collect();
            arrow::compute::concat(&arrays)
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
    )
}

/// Removes `_key` for publishing.
pub fn without_key(batch: &RecordBatch) -> RecordBatch {
    match batch.schema().index_of(KEY_COLUMN) {
        Ok(i) => {
            let mut b = batch.clone();
            b.remove_column(i);
            b
        }
        Err(_) => batch.clone(),
    }
}

/// Adds an `op` column in front (for change files).
pub fn with_ops(batch: &RecordBatch, ops: Vec<&'static str>) -> Result<RecordBatch, ArrowError> {
    let mut fields = vec![Arc::new(Field::new("op", DataType::Utf8, false))];
    fields.extend(batch.schema().fields().iter().cloned());
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(ops))];
    columns.extend(batch.columns().iter().cloned());
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The column of an update file that names the row of the state file.
pub const ROW_COLUMN: &str = "_row";

/// An update file's rows: `_row` (rows of the state file) and the new
/// values there of the columns that changed.
pub fn update_batch(
    rows: UInt32Array,
    changed: Vec<(FieldRef, ArrayRef)>,
) -> Result<RecordBatch, ArrowError> {
    let (mut fields, mut columns): (Vec<FieldRef>, Vec<ArrayRef>) = changed.into_iter().unzip();
    fields.insert(0, Arc::new(Field::new(ROW_COLUMN, DataType::UInt32, false)));
    columns.insert(0, Arc::new(rows));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The rows of the state file an update file names.
pub fn updated_rows(update: &RecordBatch) -> Result<&UInt32Array, ArrowError> {
    update
        .column_by_name(ROW_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        .ok_or_else(|| ArrowError::SchemaError(format!("update file has no {ROW_COLUMN} column")))
}

/// [`apply_update`] to a part read with some of its columns only: the update
/// file's other columns are left out.
pub fn apply_update_within(
    base: &RecordBatch,
    update: &RecordBatch,
) -> Result<RecordBatch, ArrowError> {
    let base_schema = base.schema();
    let keep: Vec<usize> = update
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name() == ROW_COLUMN || base_schema.column_with_name(f.name()).is_some())
        .map(|(i, _)| i)
        .collect();
    apply_update(base, &update.project(&keep)?)
}

/// A state file's rows with an update file laid over them.
pub fn apply_update(base: &RecordBatch, update: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let rows = updated_rows(update)?;
    if rows.null_count() > 0 || rows.values().iter().any(|&r| r as usize >= base.num_rows()) {
        return Err(ArrowError::InvalidArgumentError(format!(
            "update file names rows beyond the {} of its state file",
            base.num_rows()
        )));
    }
    // The base row, or the n-th updated row; the last update of a row wins.
    let mut picks: Vec<(usize, usize)> = (0..base.num_rows()).map(|r| (0, r)).collect();
    for (n, &r) in rows.values().iter().enumerate() {
        picks[r as usize] = (1, n);
    }
    let mut columns = base.columns().to_vec();
    for (field, values) in update.schema().fields().iter().zip(update.columns()) {
        if field.name() == ROW_COLUMN {
            continue;
        }
        let (i, target) = base
            .schema()
            .column_with_name(field.name())
            .map(|(i, f)| (i, f.clone()))
            .ok_or_else(|| {
                ArrowError::SchemaError(format!(
                    "update file has column {} the state lacks",
                    field.name()
                ))
            })?;
        if target.data_type() != field.data_type() {
            return Err(ArrowError::SchemaError(format!(
                "update file has {} as {}, the state as {}",
                field.name(),
                field.data_type(),
                target.data_type()
            )));
        }
        columns[i] = arrow::compute::interleave(&[columns[i].as_ref(), values.as_ref()], &picks)?;
    }
    RecordBatch::try_new(base.schema(), columns)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, BooleanArray, Date32Array, Decimal128Array, Int64Array, RecordBatch, StringArray,
    };

    /// Concatenated column by column, batches give what `concat_batches`
    /// gives; empty ones are left out, so a single batch with rows comes
    /// back as it is (its buffers shared, not copied).
    #[test]
    fn concat_owned_equals_concat_batches_and_keeps_a_lone_batch() {
        let a = batch(vec![Some("a"), None], vec![Some(1), Some(2)]);
        let b = batch(vec![Some("bb")], vec![Some(3)]);
        let empty = a.slice(0, 0);
        let schema = a.schema();
        let mixes = [
            vec![],
            vec![empty.clone()],
            vec![a.clone(), b.clone()],
            vec![empty.clone(), a.clone(), empty.clone(), b],
        ];
        for batches in mixes {
            let want = arrow::compute::concat_batches(&schema, &batches).unwrap();
            assert_eq!(super::concat_owned(&schema, batches).unwrap(), want);
        }
        let lone = super::concat_owned(&schema, vec![empty, a.clone()]).unwrap();
        assert_eq!(lone, a);
        assert_eq!(
            lone.column(0).to_data().buffers()[1].as_ptr(),
            a.column(0).to_data().buffers()[1].as_ptr(),
            "not copied"
        );
    }

    fn batch(texts: Vec<Option<&str>>, ints: Vec<Option<i64>>) -> RecordBatch {
        let n = texts.len();
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("t", Arc::new(StringArray::from(texts))),
            ("i", Arc::new(Int64Array::from(ints))),
            (
                "d",
                Arc::new(
                    Decimal128Array::from((0..n as i128).map(|v| v * 7).collect::<Vec<_>>())
                        .with_precision_and_scale(18, 2)
                        .unwrap(),
                ),
            ),
            ("day", Arc::new(Date32Array::from(vec![Some(19_000); n]))),
            // Booleans take arrow's row format.
            ("b", Arc::new(BooleanArray::from(vec![Some(true); n]))),
        ];
        RecordBatch::try_from_iter(columns).unwrap()
    }

    #[test]
    fn fingerprints_tell_rows_apart_and_ignore_slicing() {
        let b = batch(
            vec![Some("a"), Some(""), None, Some("a"), Some("b")],
            vec![Some(1), Some(1), Some(1), None, Some(1)],
        );
        let h = super::row_hashes(&b).unwrap();
        // Empty text, NULL text and NULL number all differ from one another.
        let distinct: std::collections::HashSet<_> = h.iter().collect();
        assert_eq!(distinct.len(), h.len(), "{h:?}");
        // The same values give the same fingerprint wherever the slice starts.
        let sliced = super::row_hashes(&b.slice(2, 3)).unwrap();
        assert_eq!(sliced, h[2..].to_vec());
        // Values swapped between columns are different rows.
        let x = batch(vec![Some("1")], vec![Some(2)]);
        let y = batch(vec![Some("2")], vec![Some(1)]);
        assert_ne!(
            super::row_hashes(&x).unwrap(),
            super::row_hashes(&y).unwrap()
        );
    }

    /// An update file laid over the rows it was made from gives the updated
    /// rows; one that names rows the state file lacks is refused.
    #[test]
    fn update_files_lay_changed_columns_over_the_state() {
        use arrow::array::{Int64Array, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
            Field::new("w", DataType::Utf8, true),
        ]));
        let batch = |v: &dyn Fn(i64) -> Option<String>| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from_iter_values(0..100)),
                Arc::new(StringArray::from_iter((0..100).map(v))),
                Arc::new(StringArray::from_iter_values(
                    (0..100).map(|i| format!("w{i}")),
                )),
            ];
            RecordBatch::try_new(schema.clone(), columns).unwrap_or_else(|e| panic!("{e}"))
        };
        let base = batch(&|i| Some(format!("v{i}")));
        let changed = [0u32, 7, 99];
        let new = batch(&|i| match i {
            0 | 99 => None,
            7 => Some("seven".into()),
            _ => Some(format!("v{i}")),
        });
        let positions = super::UInt32Array::from(changed.to_vec());
        let values = arrow::compute::take(new.column(1).as_ref(), &positions, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let update = super::update_batch(positions, vec![(schema.fields()[1].clone(), values)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(update.num_columns(), 2);
        let stored =
            super::decode_state(super::encode_state(&update).unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            super::apply_update(&base, &stored).unwrap_or_else(|e| panic!("{e}")),
            new
        );
        let short = base.slice(0, 50);
        assert!(super::apply_update(&short, &stored).is_err());
    }

    /// Keys of 32 bytes are cut to their first 16 (what the index always
    /// used), the other columns untouched; narrow keys and batches without
    /// keys come back as they are; keys too short or not binary are refused.
    #[test]
    fn wide_keys_are_cut_to_the_index_bytes() {
        use arrow::array::{AsArray, FixedSizeBinaryArray};
        use arrow::datatypes::DataType;
        let with_keys = |width: i32| {
            let keys: Vec<Vec<u8>> = (0..3u8)
                .map(|r| (0..width as u8).map(|i| i.wrapping_mul(7) ^ r).collect())
                .collect();
            let rest = batch(
                vec![Some("a"), None, Some("c")],
                vec![Some(1), None, Some(3)],
            );
            let keys = FixedSizeBinaryArray::try_from_iter(keys.into_iter()).unwrap();
            let schema = rest.schema();
            let names = schema.fields().iter().map(|f| f.name().as_str());
            let columns = [(super::KEY_COLUMN, Arc::new(keys) as ArrayRef)]
                .into_iter()
                .chain(names.zip(rest.columns().iter().cloned()));
            RecordBatch::try_from_iter(columns).unwrap()
        };
        let wide = with_keys(32);
        let narrow = super::narrow_keys(wide.clone()).unwrap();
        assert_eq!(
            narrow.schema().field(0).data_type(),
            &DataType::FixedSizeBinary(super::KEY_BYTES as i32)
        );
        let (w, n) = (
            wide.column(0).as_fixed_size_binary(),
            narrow.column(0).as_fixed_size_binary(),
        );
        for r in 0..3 {
            assert_eq!(n.value(r), &w.value(r)[..super::KEY_BYTES]);
            assert_eq!(super::key_at(n, r), super::key_at(w, r));
        }
        assert_eq!(narrow.columns()[1..], wide.columns()[1..]);
        let same = with_keys(super::KEY_BYTES as i32);
        assert_eq!(super::narrow_keys(same.clone()).unwrap(), same);
        let keyless = batch(vec![Some("a")], vec![Some(1)]);
        assert_eq!(super::narrow_keys(keyless.clone()).unwrap(), keyless);
        assert!(super::narrow_keys(with_keys(8)).is_err());
        let text = RecordBatch::try_from_iter([(
            super::KEY_COLUMN,
            Arc::new(StringArray::from(vec!["k"])) as ArrayRef,
        )])
        .unwrap();
        assert!(super::narrow_keys(text).is_err());
        // A state file of wide keys reads back narrow.
        let read = super::decode_state(super::encode_state(&wide).unwrap()).unwrap();
        assert_eq!(read, narrow);
    }

    /// A state file is written in slices and reads back as the one batch it
    /// was, for an empty part, a part within one slice and one across several.
    #[test]
    fn state_files_in_slices_read_back_whole() {
        for rows in [0, 5, 2 * super::STATE_BATCH_ROWS + 17] {
            let b = batch(
                (0..rows).map(|i| (i % 3 != 0).then_some("rad")).collect(),
                (0..rows as i64).map(Some).collect(),
            );
            let bytes = super::encode_state(&b).unwrap();
            let reader =
                arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes.clone()), None)
                    .unwrap();
            assert_eq!(
                reader.num_batches(),
                rows.div_ceil(super::STATE_BATCH_ROWS).max(1),
                "{rows} rows"
            );
            assert_eq!(super::decode_state(bytes).unwrap(), b, "{rows} rows");
        }
    }
}
