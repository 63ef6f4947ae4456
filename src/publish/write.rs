//! Writing a version's parts: each touched part is a job that takes its rows,
//! builds its new rows and writes its files, a few at a time, largest first.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::{StreamExt, TryStreamExt};

use super::commit::{FilesWritten, IndexUpdate};
use super::in_place::{InPlace, InPlacePart, PreviousPart, take_rows};
use super::jobs::{FileJob, FileRole, JobContext, JobRows, PreviousFile};
use super::manifest::{FileRef, version_name};
use super::part::{MAX_STATE_UPDATES, PartFiles, StateFiles, UPDATE_SHARE, date_range, span};
use super::plan::{OldRows, PartChanges, Plan, Prepared, Realigned, StagedRows};
use super::recover::read_part;
use super::stage::Pending;
use super::{Committed, PublishError, Publisher, Result, state, stream};
use crate::config::OutputFormat;

/// Encodes and writes one part: its private state and one file per format,
/// named for `version` and unique.
pub(super) async fn write_part(
    context: &JobContext,
    formats: &[OutputFormat],
    version: u64,
    name: &str,
    rows: RecordBatch,
    previous: Option<PreviousPart>,
) -> Result<PartFiles> {
    // After an update in place of few rows, the state gets an update file
    // (the changed rows' changed columns) instead of a new state file.
    let update = previous.as_ref().filter(|p| {
        p.state.updates.len() < MAX_STATE_UPDATES
            && p.change.update.num_rows() * UPDATE_SHARE <= rows.num_rows()
    });
    let state_rows = update.map_or_else(|| rows.clone(), |p| p.change.update.clone());
    let jobs = part_jobs(
        name,
        version,
        (update.is_some(), JobRows::Whole(state_rows)),
        formats,
        |format| {
            let previous = previous.as_ref().and_then(|p| {
                let file = p.files.get(&format)?.clone();
                Some((p.change.clone(), PreviousFile::Named(file)))
            });
            (JobRows::Whole(rows.clone()), previous)
        },
    );
    let schema = rows.schema();
    let count = rows.num_rows() as u64;
    let (dates, written) = futures::join!(
        tokio::task::spawn_blocking(move || date_range(&rows)),
        futures::future::try_join_all(jobs.into_iter().map(|job| context.clone().run(job)))
    );
    let (written, data) = part_files(name, written?)?;
    let state = match update {
        Some(p) => {
            let mut files = p.state.clone();
            files.updates.push(written);
            files
        }
        None => StateFiles {
            file: written,
            updates: Vec::new(),
        },
    };
    Ok(PartFiles {
        state,
        data,
        rows: count,
        dates: dates.map_err(|e| PublishError::State(e.to_string()))?,
        schema,
    })
}

/// Encodes and writes a part on the runtime, giving its rows back if that fails.
pub(super) fn spawn_part(
    context: JobContext,
    formats: Vec<OutputFormat>,
    version: u64,
    name: String,
    rows: RecordBatch,
) -> stream::PartTask {
    tokio::spawn(async move {
        let written = write_part(&context, &formats, version, &name, rows.clone(), None).await;
        crate::failpoint::hit("streamed-part-written");
        written.map_err(|e| (e, Some(rows)))
    })
}

/// Batches waiting for each encoder of a streaming part. A batch lives until
/// the slowest encoder is done with it, so every batch of depth is memory,
/// and one more queued does not make the encoders faster.
pub(super) const STREAM_DEPTH: usize = 1;

/// Opens a part's files and writes the rows sent to the returned stream as
/// they come: one encoder per file, each on a blocking thread, and the row
/// count and date range gathered beside them.
pub(super) fn stream_part(
    context: JobContext,
    formats: &[OutputFormat],
    version: u64,
    name: String,
    schema: SchemaRef,
) -> stream::PartStream {
    let mut senders = Vec::new();
    let mut receiver = || {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_DEPTH);
        senders.push(tx);
        rx
    };
    let state = JobRows::Stream(receiver(), schema.clone());
    let jobs = part_jobs(&name, version, (false, state), formats, |_| {
        (JobRows::Stream(receiver(), schema.clone()), None)
    });
    let mut counted = receiver();
    let task = tokio::spawn(async move {
        let count = async move {
            let (mut rows, mut dates) = (0u64, None::<(i32, i32)>);
            while let Some(batch) = counted.recv().await {
                rows += batch.num_rows() as u64;
                dates = dates.into_iter().chain(date_range(&batch)).reduce(span);
            }
            (rows, dates)
        };
        let ((rows, dates), written) = futures::join!(
            count,
            futures::future::try_join_all(jobs.into_iter().map(|job| context.clone().run(job)))
        );
        let written = written.and_then(|written| {
            let (state, data) = part_files(&name, written)?;
            Ok(PartFiles {
                state: StateFiles {
                    file: state,
                    updates: Vec::new(),
                },
                data,
                rows,
                dates,
                schema,
            })
        });
        crate::failpoint::hit("streamed-part-written");
        written.map_err(|e| (e, None))
    });
    stream::PartStream::new(senders, task)
}

/// The files of a part written for `version`: its state file (an update file
/// if `state.0`) with the rows `state.1`, then one data file per format with
/// the rows (and the previous file to copy from) that `data` gives. All are
/// named for the version and unique.
pub(super) fn part_jobs(
    name: &str,
    version: u64,
    state: (bool, JobRows),
    formats: &[OutputFormat],
    mut data: impl FnMut(OutputFormat) -> (JobRows, Option<(InPlace, PreviousFile)>),
) -> Vec<FileJob> {
    let stem = format!("{}-{}", version_name(version), uuid::Uuid::new_v4());
    let (update, state_rows) = state;
    let suffix = if update { "-update" } else { "" };
    let mut jobs = vec![FileJob {
        role: FileRole::State {
            partition: name.to_string(),
        },
        path: format!("partitions/{name}/{stem}{suffix}.arrow"),
        rows: state_rows,
        previous: None,
    }];
    for &format in formats {
        let (rows, previous) = data(format);
        jobs.push(FileJob {
            role: FileRole::Data {
                partition: name.to_string(),
                format,
            },
            path: format!("data/{name}/{stem}.{}", format.extension()),
            rows,
            previous,
        });
    }
    jobs
}

/// A written part's state file and data files.
pub(super) fn part_files(
    name: &str,
    written: Vec<(FileRole, FileRef)>,
) -> Result<(FileRef, BTreeMap<OutputFormat, FileRef>)> {
    let mut state = None;
    let mut data = BTreeMap::new();
    for (role, file) in written {
        match role {
            FileRole::State { .. } => state = Some(file),
            FileRole::Data { format, .. } => {
                data.insert(format, file);
            }
            FileRole::Changes { .. } => {}
        }
    }
    let state =
        state.ok_or_else(|| PublishError::State(format!("part {name}: no state file written")))?;
    Ok((state, data))
}

/// Waits for a part being written (ending it first if it streams); a failed
/// write keeps its rows for the retry, or, streamed, says they are lost.
pub(super) async fn finish_part(dataset: &str, part: &mut stream::StreamedPart) -> Result<()> {
    stream::end(part).await;
    let lost = |reason: String| PublishError::PartLost {
        dataset: dataset.to_string(),
        part: part.name.clone(),
        reason,
    };
    let task = match &mut part.write {
        stream::PartWrite::Running(task) => task,
        stream::PartWrite::Lost => return Err(lost("failed earlier".into())),
        _ => return Ok(()),
    };
    match task.await {
        Ok(Ok(files)) => {
            part.write = stream::PartWrite::Written(files);
            Ok(())
        }
        Ok(Err((e, Some(rows)))) => {
            part.write = stream::PartWrite::Rows(vec![rows]);
            Err(e)
        }
        Ok(Err((e, None))) => {
            part.write = stream::PartWrite::Lost;
            Err(lost(e.to_string()))
        }
        Err(e) => {
            // The task's rows are gone with it: this version cannot be committed;
            // it is read from the source again.
            part.write = stream::PartWrite::Lost;
            Err(lost(e.to_string()))
        }
    }
}

/// One part a version rewrites (see [`Publisher::write`]).
pub(super) struct PartJob {
    pub(super) name: String,
    /// Its rows after the version, about: the largest jobs start first.
    pub(super) size: usize,
    pub(super) from: OldRows,
    /// Its committed files, which an update in place writes the new ones from.
    pub(super) previous: Option<(BTreeMap<OutputFormat, FileRef>, StateFiles)>,
    /// Its committed row count and date range.
    pub(super) before: (u64, Option<(i32, i32)>),
    pub(super) changes: PartChanges,
}

/// A part job's outcome: the part's name, its files and rows (none when the
/// version empties it), and the rows deleted from it (for the change files).
pub(super) type PartDone = (
    String,
    Option<(PartFiles, Option<RecordBatch>)>,
    Option<RecordBatch>,
);

impl PartJob {
    /// Takes the part's committed rows (read from the state unless given),
    /// builds its new rows on a blocking thread, and writes its files.
    pub(super) async fn run(
        self,
        context: JobContext,
        formats: Vec<OutputFormat>,
        version: u64,
        staged: std::sync::Arc<StagedRows>,
    ) -> Result<PartDone> {
        let Self {
            name,
            from,
            previous,
            before,
            changes,
            ..
        } = self;
        let old = match from {
            OldRows::Rows(rows) => rows,
            OldRows::Read(files) => {
                // Updated in place: read back only what changes, if the
                // columns the last update changed are the ones again.
                if let (Some(updates), Some((data, _)), Some(guess)) =
                    (&changes.in_place, &previous, context.guess.clone())
                {
                    let part = InPlacePart {
                        name: &name,
                        files: &files,
                        data,
                        before,
                        updates,
                    };
                    if let Some(written) = part
                        .write_projected(&context, &formats, version, &staged, guess)
                        .await?
                    {
                        return Ok((name, Some((written, None)), None));
                    }
                }
                read_part(&context.state_store, &context.dataset, &files).await?
            }
            OldRows::New => RecordBatch::new_empty(staged.target.clone()),
        };
        let (rows, in_place, dropped) =
            tokio::task::spawn_blocking(move || changes.apply(&old, &staged))
                .await
                .map_err(|e| PublishError::State(e.to_string()))??;
        if rows.num_rows() == 0 {
            return Ok((name, None, dropped));
        }
        if let Some(change) = &in_place {
            context.in_place.remember(&change.update);
        }
        // A part updated in place is written from its previous files.
        let previous = in_place
            .zip(previous)
            .map(|(change, (files, state))| PreviousPart {
                change,
                files,
                state,
            });
        let files = write_part(&context, &formats, version, &name, rows.clone(), previous).await?;
        Ok((name, Some((files, Some(rows))), dropped))
    }
}

/// The change files' rows: the staged rows inserted or updated, then the
/// rows deleted (by part name, so the same input gives the same bytes).
/// None for the first version of an empty dataset, whose data files are its
/// changes.
pub(super) fn change_rows_batch(
    staged: &StagedRows,
    change_rows: &[(usize, usize, &'static str)],
    initial: bool,
    deleted_rows: BTreeMap<String, RecordBatch>,
) -> Result<Option<RecordBatch>> {
    let mut change_parts = Vec::new();
    if !change_rows.is_empty() && !initial {
        let batches: Vec<&RecordBatch> = staged.batches.iter().collect();
        let indices: Vec<(usize, usize)> = change_rows.iter().map(|&(b, r, _)| (b, r)).collect();
        let rows = take_rows(&batches, &indices, &staged.target)?;
        change_parts.push(state::with_ops(
            &state::without_key(&rows),
            change_rows.iter().map(|c| c.2).collect(),
        )?);
    }
    for rows in deleted_rows.into_values() {
        let n = rows.num_rows();
        change_parts.push(state::with_ops(
            &state::without_key(&rows),
            vec!["delete"; n],
        )?);
    }
    Ok(match change_parts.first() {
        Some(first) => Some(arrow::compute::concat_batches(
            &first.schema(),
            &change_parts,
        )?),
        None => None,
    })
}

impl Publisher {
    pub(super) fn job_context(&self) -> JobContext {
        JobContext {
            store: self.store.clone(),
            state_store: self.state_store.clone(),
            dataset: self.settings.dataset.clone(),
            in_place: self.in_place.clone(),
            guess: self.in_place.start_version(),
        }
    }

    /// The jobs of a version's touched parts, their committed rows given
    /// (`realigned` to a new schema), taken out of the cache, or to read.
    pub(super) fn rewrite_jobs(
        &mut self,
        touched: BTreeMap<u32, PartChanges>,
        mut realigned: BTreeMap<u32, RecordBatch>,
    ) -> Vec<PartJob> {
        let mut jobs = Vec::with_capacity(touched.len());
        for (id, changes) in touched {
            let name = self.names.name(id).to_string();
            let committed = self.partitions.get_mut(&name);
            let rows = committed.as_ref().map_or(0, |p| p.files.rows as usize);
            let size = (rows + changes.added.len()).saturating_sub(changes.removed.len());
            let before = committed
                .as_ref()
                .map_or((0, None), |p| (p.files.rows, p.dates));
            let (from, previous) = match committed {
                Some(p) => (
                    match realigned.remove(&id).or_else(|| p.rows.take()) {
                        Some(rows) => OldRows::Rows(rows),
                        None => OldRows::Read(p.state.clone()),
                    },
                    Some((p.files.files.clone(), p.state.clone())),
                ),
                None => (OldRows::New, None),
            };
            jobs.push(PartJob {
                name,
                size,
                from,
                previous,
                before,
                changes,
            });
        }
        jobs
    }

    pub(super) async fn write(
        &mut self,
        plan: Plan,
        prepared: Prepared,
        realigned: Option<Realigned>,
        pending: &Pending,
        target: SchemaRef,
    ) -> Result<Committed> {
        let version = self.version + 1;
        let vname = version_name(version);
        let formats = self.settings.formats.clone();
        let context = self.job_context();
        let Plan {
            touched,
            deleted,
            change_rows,
            summary,
            initial,
            inserted,
            removed,
            added,
        } = plan;
        let (old, mut rebuilt) = match realigned {
            Some(r) => (r.rows, Some(r.index)),
            None => (BTreeMap::new(), None),
        };
        let shared = std::sync::Arc::new(StagedRows {
            batches: prepared.batches,
            deleted,
            target: target.clone(),
        });
        // Every touched part is a job that reads its committed rows (unless
        // cached), builds its new rows and writes its files, its state and each
        // format encoded at once. About as many run at once as there are
        // cores, largest first; a part's rows are dropped once written unless
        // the cache keeps them, so memory holds a few parts, not the version.
        let mut jobs = self.rewrite_jobs(touched, old);
        jobs.sort_by_key(|job| std::cmp::Reverse(job.size));
        // Locally, a part per core and a spare (while one waits for its fsync,
        // others encode). Remote stores answer in round trips, so more overlap.
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let parallel = if self.store.location().local_root().is_some() {
            cores + 1
        } else {
            cores * 2
        };
        let mut parts = futures::stream::iter(
            jobs.into_iter()
                .map(|job| job.run(context.clone(), formats.clone(), version, shared.clone())),
        )
        .buffer_unordered(parallel);
        let budget = self.settings.row_cache_bytes;
        let mut kept = 0;
        let mut written = BTreeMap::new();
        let mut emptied = Vec::new();
        let mut deleted_rows = BTreeMap::new();
        while let Some((name, files, dropped)) = parts.try_next().await? {
            if let Some(rows) = dropped {
                deleted_rows.insert(name.clone(), rows);
            }
            let Some((files, rows)) = files else {
                emptied.push(name);
                continue;
            };
            // The parts just written are the most recently used: their rows
            // stay cached while they fit, older cached parts making room (a
            // part read in part has no rows to keep).
            let rows = rows.and_then(|rows| {
                let bytes = rows.get_array_memory_size();
                (kept + bytes <= budget).then(|| {
                    kept += bytes;
                    rows
                })
            });
            if rows.is_some() {
                self.trim_cache(budget - kept);
            }
            written.insert(name, (files, rows));
        }
        emptied.sort_unstable();
        let changes = change_rows_batch(&shared, &change_rows, initial, deleted_rows)?;
        let change_files = match changes {
            Some(changes) => context.write_changes(&formats, &vname, &changes).await?,
            None => BTreeMap::new(),
        };
        let index = match &mut rebuilt {
            // A new schema: the refingerprinted index, with this version's changes.
            Some(index) => {
                index.apply(&removed, added);
                IndexUpdate::Replace(index)
            }
            None => IndexUpdate::Delta { removed, added },
        };
        let written_files = FilesWritten {
            written,
            emptied,
            change_files,
            summary,
            initial,
            inserted,
            index,
        };
        self.finish(
            written_files,
            pending.position.clone(),
            pending.source_time,
            target,
        )
        .await
    }
}
