//! A part: a run of at most `max_file_rows` rows of one partition, its files, its
//! name (`<partition>`, `<partition>@0001`, ...) and the dates it covers.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::manifest::{FileRef, PartitionFiles};
use crate::config::OutputFormat;

/// A committed part.
#[derive(Debug, Clone)]
pub(super) struct Partition {
    /// Its rows, while cached; read from `state` when a version needs them.
    pub(super) rows: Option<RecordBatch>,
    /// First and last day of its first date or timestamp column.
    pub(super) dates: Option<(i32, i32)>,
    /// The version that last wrote or read it (the cache keeps the newest).
    pub(super) used: u64,
    pub(super) state: StateFiles,
    pub(super) files: PartitionFiles,
}

/// A part's private state: its state file and the updates in place laid
/// over it, oldest first (see [`State::updates`]).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StateFiles {
    pub(super) file: FileRef,
    pub(super) updates: Vec<FileRef>,
}

/// Update files a part's state may carry before they are folded into a new
/// state file; each holds at most 1/[`UPDATE_SHARE`] of the part's rows.
/// Reading a part then costs at most twice its rows.
pub(super) const MAX_STATE_UPDATES: usize = 8;

/// An update in place of more than 1/8 of a part's rows writes a new state
/// file rather than an update file.
pub(super) const UPDATE_SHARE: usize = 8;

/// The files of one written part.
#[derive(Debug, Clone)]
pub(super) struct PartFiles {
    pub(super) state: StateFiles,
    pub(super) data: BTreeMap<OutputFormat, FileRef>,
    pub(super) rows: u64,
    pub(super) dates: Option<(i32, i32)>,
    /// The schema of the rows written.
    pub(super) schema: SchemaRef,
}

/// First and last day in a batch's first date or timestamp column.
pub(super) fn date_range(rows: &RecordBatch) -> Option<(i32, i32)> {
    let i = dates_column(&rows.schema())?;
    let days = arrow::compute::cast(rows.column(i), &arrow::datatypes::DataType::Date32).ok()?;
    let days = days.as_any().downcast_ref::<arrow::array::Date32Array>()?;
    Some((arrow::compute::min(days)?, arrow::compute::max(days)?))
}

/// The column a part's date range is of: its first date or timestamp column.
pub(super) fn dates_column(schema: &arrow::datatypes::Schema) -> Option<usize> {
    schema.fields().iter().position(|f| {
        matches!(
            f.data_type(),
            arrow::datatypes::DataType::Date32 | arrow::datatypes::DataType::Timestamp(_, _)
        )
    })
}

/// The days two ranges of days cover together.
pub(super) fn span((first, last): (i32, i32), (lo, hi): (i32, i32)) -> (i32, i32) {
    (first.min(lo), last.max(hi))
}

/// The name of part `number` of a partition: the partition's own name for the
/// first, `<partition>@0001` and on for the next (`@` never occurs in a
/// partition name, object stores keep it as it is in keys and file names,
/// and the padding keeps parts in order when listed).
pub(super) fn part_name(partition: &str, number: u32) -> String {
    if number == 0 {
        partition.to_string()
    } else {
        format!("{partition}@{number:04}")
    }
}

/// A part's partition and number.
pub(super) fn split_part_name(name: &str) -> (&str, u32) {
    match name.rsplit_once('@') {
        Some((partition, n)) => match n.parse() {
            Ok(number) => (partition, number),
            Err(_) => (name, 0),
        },
        None => (name, 0),
    }
}
