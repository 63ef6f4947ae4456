//! Updates in place: a part whose only changes are rows updated where they
//! stand is written from its previous files (unchanged columns copied), and
//! read in part when the columns it changed can be proven.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use bytes::Bytes;

use super::jobs::{JobContext, JobRows, PreviousFile, previous_file};
use super::manifest::FileRef;
use super::part::{
    MAX_STATE_UPDATES, PartFiles, StateFiles, UPDATE_SHARE, date_range, dates_column,
};
use super::plan::StagedRows;
use super::recover::read_state_files;
use super::state::KeyMap;
use super::write::{part_files, part_jobs};
use super::{PublishError, Result, state, writer};
use crate::classify::KEY_COLUMN;
use crate::config::OutputFormat;

/// The columns the newest version's updates in place changed: a guess at
/// what the next version changes. A part updated in place is read back with
/// only its keys and these columns when the guess is proven right for every
/// changed row (see [`in_place_projected`]); the rest of the part, most of
/// its bytes, is never decompressed.
///
/// Every part of a version goes by the guess as the version started
/// ([`InPlaceColumns::start_version`]), and the columns its parts' update
/// files changed, all of them, are the next version's guess: what a part
/// reads never depends on which of the parts written at once ended first.
#[derive(Debug, Default)]
pub(super) struct InPlaceColumns {
    /// The guess of the version being written.
    pub(super) changed: std::sync::Mutex<Option<Vec<String>>>,
    /// The columns of the update files written since the version started.
    pub(super) gathered: std::sync::Mutex<BTreeSet<String>>,
    /// Parts written from such a partial read (for tests and the debug log).
    pub(super) projected: std::sync::atomic::AtomicU64,
}

impl InPlaceColumns {
    /// The guess for a version about to be written: the columns the update
    /// files of the newest version that wrote any changed.
    pub(super) fn start_version(&self) -> Option<Vec<String>> {
        let mut changed = self.changed.lock().ok()?;
        if let Ok(mut gathered) = self.gathered.lock()
            && !gathered.is_empty()
        {
            *changed = Some(std::mem::take(&mut *gathered).into_iter().collect());
        }
        changed.clone()
    }

    /// Gathers the columns of an update file (its `_row` left out).
    pub(super) fn remember(&self, update: &RecordBatch) {
        if let Ok(mut gathered) = self.gathered.lock() {
            gathered.extend(
                update
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .filter(|n| n != state::ROW_COLUMN),
            );
        }
    }
}

/// A part updated in place, as committed before: its files, to write the
/// new ones from.
pub(super) struct PreviousPart {
    pub(super) change: InPlace,
    pub(super) files: BTreeMap<OutputFormat, FileRef>,
    pub(super) state: StateFiles,
}

/// What an update in place changed in a part: its files are written again
/// from the previous ones (see [`writer::encode_reusing`]), and its state
/// gets `update` as an update file.
#[derive(Debug, Clone)]
pub(super) struct InPlace {
    /// The rows that changed (ascending) and the new values of the columns
    /// that changed (see [`state::update_batch`]).
    pub(super) update: RecordBatch,
}

impl InPlace {
    /// What a previous data file of the part is reused for when rows of the
    /// `published` schema (the new rows without `_key`) are encoded.
    pub(super) fn previous(
        &self,
        bytes: Bytes,
        published: &SchemaRef,
    ) -> Result<writer::Previous, ArrowError> {
        let changed = self.update.schema();
        Ok(writer::Previous {
            bytes,
            unchanged: published
                .fields()
                .iter()
                .map(|f| changed.column_with_name(f.name()).is_none())
                .collect(),
            changed_rows: state::updated_rows(&self.update)?.values().to_vec(),
        })
    }
}

/// A part's rows with `updates` (key to its new row among the staged
/// batches) applied where the keys stand, and what changed; `None` if a key
/// is not in the part. The rows are the old ones with the update laid over
/// them as a state update file is ([`state::apply_update`]): unchanged
/// columns stay the old arrays, so an update of a few columns copies only
/// those.
pub(super) fn update_in_place(
    old: &RecordBatch,
    updates: &KeyMap<(usize, usize, u64)>,
    batches: &[&RecordBatch],
    target: &SchemaRef,
) -> Result<Option<(RecordBatch, InPlace)>> {
    let Some(located) = Located::find(old, updates, batches, target)? else {
        return Ok(None);
    };
    let update = located.update()?;
    let rows = state::apply_update(old, &update)?;
    Ok(Some((rows, InPlace { update })))
}

/// The rows of a part that staged updates replace where they stand.
pub(super) struct Located {
    /// Their rows in the part, ascending.
    pub(super) positions: arrow::array::UInt32Array,
    /// Their new values, in that order.
    pub(super) new: RecordBatch,
    /// The fingerprints the index holds for them.
    pub(super) was: Vec<u64>,
    /// What they were, in the version's schema: a column the part was read
    /// with from the part, any other as staged (taken not to change).
    pub(super) before: RecordBatch,
}

impl Located {
    /// Where `updates` (key to its staged row, with the replaced row's
    /// fingerprint) stand in `old`, a part's rows read whole or with some of
    /// their columns; `None` if a key is not in it.
    pub(super) fn find(
        old: &RecordBatch,
        updates: &KeyMap<(usize, usize, u64)>,
        batches: &[&RecordBatch],
        target: &SchemaRef,
    ) -> Result<Option<Self>> {
        let keys = state::keys(old)?;
        let mut at = Vec::with_capacity(updates.len());
        let mut from = Vec::with_capacity(updates.len());
        let mut was = Vec::with_capacity(updates.len());
        for row in 0..old.num_rows() {
            if let Some(&(b, r, hash)) = updates.get(&state::key_at(keys, row)) {
                at.push(row as u32);
                from.push((b, r));
                was.push(hash);
            }
        }
        if at.len() != updates.len() {
            return Ok(None);
        }
        let new = take_rows(batches, &from, target)?;
        let positions = arrow::array::UInt32Array::from(at);
        let columns = target
            .fields()
            .iter()
            .zip(new.columns())
            .map(|(f, after)| match old.column_by_name(f.name()) {
                Some(before) => arrow::compute::take(before.as_ref(), &positions, None),
                None => Ok(after.clone()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let before = RecordBatch::try_new(target.clone(), columns)?;
        Ok(Some(Self {
            positions,
            new,
            was,
            before,
        }))
    }

    /// The state update file of the change: the rows' positions and the new
    /// values of the columns where one of them differs.
    pub(super) fn update(&self) -> Result<RecordBatch> {
        let mut changed = Vec::new();
        for ((field, before), after) in self
            .new
            .schema()
            .fields()
            .iter()
            .zip(self.before.columns())
            .zip(self.new.columns())
        {
            if before.to_data() != after.to_data() {
                changed.push((field.clone(), after.clone()));
            }
        }
        Ok(state::update_batch(self.positions.clone(), changed)?)
    }
}

/// A part whose only changes are rows updated in place, committed before:
/// what writing it from a partial read needs.
pub(super) struct InPlacePart<'a> {
    pub(super) name: &'a str,
    pub(super) files: &'a StateFiles,
    pub(super) data: &'a BTreeMap<OutputFormat, FileRef>,
    /// Its committed row count and date range.
    pub(super) before: (u64, Option<(i32, i32)>),
    /// Key to the staged row that replaces it, with the replaced row's
    /// fingerprint.
    pub(super) updates: &'a KeyMap<(usize, usize, u64)>,
}

impl InPlacePart<'_> {
    /// Writes the part from its keys and the `guess`ed columns alone (see
    /// [`in_place_projected`]): its previous data files with the changed
    /// columns and rows laid over them, and an update file for its state.
    /// `None` (and nothing written) when that cannot be done: the part is
    /// then read whole.
    pub(super) async fn write_projected(
        &self,
        context: &JobContext,
        formats: &[OutputFormat],
        version: u64,
        staged: &std::sync::Arc<StagedRows>,
        guess: Vec<String>,
    ) -> Result<Option<PartFiles>> {
        let (rows, dates) = self.before;
        // Only an update that goes to an update file: a new state file needs
        // every column.
        if self.files.updates.len() >= MAX_STATE_UPDATES
            || self.updates.len() * UPDATE_SHARE > rows as usize
        {
            return Ok(None);
        }
        let mut previous = BTreeMap::new();
        for &format in formats {
            let Some(file) = self.data.get(&format) else {
                return Ok(None);
            };
            let Some(bytes) = previous_file(&context.store, &context.dataset, file).await else {
                return Ok(None);
            };
            previous.insert(format, bytes);
        }
        let (base, update_files) =
            read_state_files(&context.state_store, &context.dataset, self.files).await?;
        let (updates, shared) = (self.updates.clone(), staged.clone());
        let projected = tokio::task::spawn_blocking(move || {
            in_place_projected(
                (base, update_files),
                &updates,
                &shared,
                &guess,
                dates,
                previous,
            )
        })
        .await
        .map_err(|e| PublishError::State(e.to_string()))??;
        let Some(Projected {
            change,
            rows: changed,
            dates,
            previous,
        }) = projected
        else {
            return Ok(None);
        };
        let changed = std::sync::Arc::new(changed);
        let jobs = part_jobs(
            self.name,
            version,
            (true, JobRows::Whole(change.update.clone())),
            formats,
            |format| {
                let previous = previous
                    .get(&format)
                    .map(|bytes| (change.clone(), PreviousFile::Read(bytes.clone())));
                (JobRows::InPlace(changed.clone()), previous)
            },
        );
        let written =
            futures::future::try_join_all(jobs.into_iter().map(|job| context.clone().run(job)))
                .await?;
        let (written, data) = part_files(self.name, written)?;
        let mut state = self.files.clone();
        state.updates.push(written);
        context.in_place.remember(&change.update);
        context
            .in_place
            .projected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(PartFiles {
            state,
            data,
            rows,
            dates,
            schema: staged.target.clone(),
        }))
    }
}

/// What a part updated in place and read in part writes.
pub(super) struct Projected {
    /// Its state's update file.
    pub(super) change: InPlace,
    /// What its data files are written from.
    pub(super) rows: writer::InPlaceRows,
    pub(super) dates: Option<(i32, i32)>,
    /// Its previous data files, by format, each checked to line up.
    pub(super) previous: BTreeMap<OutputFormat, Bytes>,
}

/// A part updated in place, read back from its state (`base` and its update
/// files) with only its keys and the columns `guess` names: the other
/// columns, most of its bytes, are never decompressed. The guess holds when
/// every updated row, with its guessed columns as they were and the rest as
/// staged, has the fingerprint the index records for the row it replaces:
/// then the other columns did not change (fingerprints already decide which
/// rows changed at all). `None` when the guess fails for a row, the state is
/// not of the version's schema, a key is not in the part, or a previous data
/// file does not line up: the part is then read whole.
pub(super) fn in_place_projected(
    (base, update_files): (Bytes, Vec<Bytes>),
    updates: &KeyMap<(usize, usize, u64)>,
    staged: &StagedRows,
    guess: &[String],
    dates: Option<(i32, i32)>,
    previous: BTreeMap<OutputFormat, Bytes>,
) -> Result<Option<Projected>> {
    let target = &staged.target;
    let whole = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(base.clone()), None)?;
    if whole.schema().fields() != target.fields() {
        return Ok(None);
    }
    drop(whole);
    let projection: Vec<usize> = target
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name() == KEY_COLUMN || guess.contains(f.name()))
        .map(|(i, _)| i)
        .collect();
    let reader =
        arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(base), Some(projection))?;
    let schema = reader.schema();
    let mut old = state::concat_owned(&schema, reader.collect::<Result<Vec<_>, _>>()?)?;
    for update in update_files {
        old = state::apply_update_within(&old, &state::decode_state(update)?)?;
    }
    let batches: Vec<&RecordBatch> = staged.batches.iter().collect();
    let Some(located) = Located::find(&old, updates, &batches, target)? else {
        return Ok(None);
    };
    // The rows as they were, had only the guessed columns changed, must be
    // the rows the index knows.
    if state::row_hashes(&located.before)? != located.was {
        return Ok(None);
    }
    let update = located.update()?;
    // Only `_row`: nothing changed after all (fingerprints that collided).
    if update.num_columns() < 2 {
        return Ok(None);
    }
    let updated = state::apply_update(&old, &update)?;
    let change = update.schema();
    let published = state::without_key(&RecordBatch::new_empty(target.clone())).schema();
    let rows = writer::InPlaceRows {
        rows: old.num_rows(),
        changed_columns: published
            .fields()
            .iter()
            .map(|f| {
                change
                    .column_with_name(f.name())
                    .and_then(|_| updated.column_by_name(f.name()).cloned())
            })
            .collect(),
        changed_rows: state::without_key(&located.new),
        schema: published.clone(),
    };
    // The date range is unchanged unless its column changed, and then that
    // column is among those read.
    let dates = match dates_column(target).map(|i| target.field(i).name()) {
        Some(name) if change.column_with_name(name).is_some() => {
            let column = updated.schema().index_of(name)?;
            date_range(&updated.project(&[column])?)
        }
        _ => dates,
    };
    let change = InPlace { update };
    for (&format, bytes) in &previous {
        let previous = change.previous(bytes.clone(), &published)?;
        if !writer::in_place_fits(format, &rows, &previous) {
            return Ok(None);
        }
    }
    Ok(Some(Projected {
        change,
        rows,
        dates,
        previous,
    }))
}

/// Gathers rows `(batch, row)` from several batches into one.
pub(super) fn take_rows(
    batches: &[&RecordBatch],
    indices: &[(usize, usize)],
    schema: &SchemaRef,
) -> Result<RecordBatch, ArrowError> {
    let columns = (0..schema.fields().len())
        .map(|c| {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            arrow::compute::interleave(&arrays, indices)
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}
