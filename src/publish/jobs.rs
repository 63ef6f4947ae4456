//! File jobs: one file of a part (state, Parquet or CSV), encoded straight into
//! the store through a chunked sink.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;

use super::in_place::{InPlace, InPlaceColumns};
use super::manifest::FileRef;
use super::{PublishError, Result, sink, state, store_err, writer};
use crate::config::OutputFormat;
use crate::store::Store;

/// One independent write of the tidy-up after a commit.
pub(super) enum StoreOp<'a> {
    Put(String, Bytes),
    Copy(&'a str, &'a str),
    Delete(&'a str),
}

impl StoreOp<'_> {
    pub(super) async fn apply(self, store: &Store) -> object_store::Result<()> {
        match self {
            Self::Put(path, bytes) => store.put(&path, bytes).await,
            Self::Copy(from, to) => store.copy(from, to).await,
            Self::Delete(path) => store.delete(path).await,
        }
    }
}

/// What a file of a version holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FileRole {
    /// The private state of a partition (Arrow IPC with `_key`).
    State { partition: String },
    /// A published partition file.
    Data {
        partition: String,
        format: OutputFormat,
    },
    /// The version's changed rows, with ops.
    Changes { format: OutputFormat },
}

/// The rows of a file to write: all at once, or batches as they come (a
/// streamed part, see `stream`).
pub(super) enum JobRows {
    Whole(RecordBatch),
    Stream(tokio::sync::mpsc::Receiver<RecordBatch>, SchemaRef),
    /// A data file of a part updated in place, read back in part (see
    /// [`in_place_projected`]): only what its previous file lacks.
    InPlace(std::sync::Arc<writer::InPlaceRows>),
}

/// A part's data file of the version before, to copy what did not change
/// from: named (read when its job runs), or already read and checked.
pub(super) enum PreviousFile {
    Named(FileRef),
    Read(Bytes),
}

/// One file to encode and write.
pub(super) struct FileJob {
    pub(super) role: FileRole,
    /// Path relative to the dataset folder.
    pub(super) path: String,
    pub(super) rows: JobRows,
    /// For a part's data file after an update in place: what changed, and
    /// the part's file of the version before (copied where unchanged).
    pub(super) previous: Option<(InPlace, PreviousFile)>,
}

/// Where and how file jobs write; cheap to clone.
#[derive(Clone)]
pub(super) struct JobContext {
    pub(super) store: Store,
    pub(super) state_store: Store,
    pub(super) dataset: String,
    pub(super) in_place: std::sync::Arc<InPlaceColumns>,
    /// The guess of [`InPlaceColumns`] as the version started: every part of
    /// a version goes by the same guess, whichever of them is written first.
    pub(super) guess: Option<Vec<String>>,
}

/// The previous file of a part updated in place, to copy what did not change
/// from. Any doubt (the file is gone, unreadable, or not the size and hash
/// its manifest says) means encoding the part whole: never an error.
pub(super) async fn previous_file(store: &Store, dataset: &str, file: &FileRef) -> Option<Bytes> {
    let path = format!("{dataset}/{}", file.path);
    let bytes = match store.get(&path).await {
        Ok(Some(bytes)) => bytes,
        outcome => {
            tracing::debug!(
                path,
                ok = outcome.is_ok(),
                "previous file not usable; encoding the part whole"
            );
            return None;
        }
    };
    // Copying from a file that is not what its manifest says would carry the
    // damage into the new version. Hashing is CPU work.
    let file = file.clone();
    let checked = tokio::task::spawn_blocking(move || file.check(&bytes).map(|()| bytes)).await;
    match checked {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(problem)) => {
            tracing::warn!(
                path,
                problem,
                "a published file is not what its version's manifest says; encoding its part \
                 whole (the next version replaces it)"
            );
            None
        }
        Err(e) => {
            tracing::debug!(path, error = %e, "previous file not checked; encoding the part whole");
            None
        }
    }
}

/// Encodes a part's published file in `format` (its rows without `_key`),
/// from the part's previous file where an update in place gives one.
pub(super) fn encode_data(
    format: OutputFormat,
    rows: JobRows,
    previous: Option<(InPlace, Bytes)>,
    sink: &mut sink::ChunkWriter,
) -> Result<()> {
    // Only a whole part has a previous file (a streamed one is a first version).
    let (rows, (change, bytes)) = match (rows, previous) {
        (JobRows::Whole(rows), Some(previous)) => (state::without_key(&rows), previous),
        (JobRows::InPlace(rows), previous) => {
            // Checked to line up before the part was read in part: there
            // is no whole batch to fall back on.
            let written = match previous {
                Some((change, bytes)) => {
                    let previous = change.previous(bytes, &rows.schema)?;
                    writer::encode_in_place(format, &rows, &previous, sink)?
                }
                None => false,
            };
            return if written {
                Ok(())
            } else {
                Err(PublishError::State(
                    "a part read in part no longer lines up with its previous file".into(),
                ))
            };
        }
        (rows, _) => {
            let (schema, batches) = rows.batches()?;
            let schema = state::without_key(&RecordBatch::new_empty(schema)).schema();
            let batches = batches.map(|b| state::without_key(&b));
            return Ok(writer::encode_stream(format, &schema, batches, sink)?);
        }
    };
    let previous = change.previous(bytes, &rows.schema())?;
    if !writer::encode_reusing(format, &rows, &previous, sink)? {
        tracing::debug!(
            ?format,
            "the previous file does not line up; the part was encoded whole"
        );
    }
    Ok(())
}

impl JobRows {
    /// The rows' schema and their batches; a stream's wait for the next
    /// batch (on the blocking thread that encodes them).
    pub(super) fn batches(
        self,
    ) -> Result<(SchemaRef, Box<dyn Iterator<Item = RecordBatch> + Send>)> {
        Ok(match self {
            JobRows::Whole(rows) => (rows.schema(), Box::new(std::iter::once(rows))),
            JobRows::InPlace(_) => {
                return Err(PublishError::State(
                    "a part read in part has only its changes, not whole rows".into(),
                ));
            }
            JobRows::Stream(mut rx, schema) => (
                schema,
                Box::new(std::iter::from_fn(move || rx.blocking_recv())),
            ),
        })
    }
}

impl JobContext {
    /// Writes a version's change files, one per format.
    pub(super) async fn write_changes(
        &self,
        formats: &[OutputFormat],
        vname: &str,
        changes: &RecordBatch,
    ) -> Result<BTreeMap<OutputFormat, FileRef>> {
        let jobs = formats.iter().map(|&format| FileJob {
            role: FileRole::Changes { format },
            // Unique like every file a commit writes: a publisher that loses
            // the race for this version must not overwrite the winner's file.
            path: format!(
                "changes/{vname}-{}.{}",
                uuid::Uuid::new_v4().simple(),
                format.extension()
            ),
            rows: JobRows::Whole(changes.clone()),
            previous: None,
        });
        Ok(
            futures::future::try_join_all(jobs.map(|job| self.clone().run(job)))
                .await?
                .into_iter()
                .filter_map(|(role, file)| match role {
                    FileRole::Changes { format } => Some((format, file)),
                    _ => None,
                })
                .collect(),
        )
    }
}

impl JobContext {
    /// Encodes on a blocking thread and writes as the encoder goes, so a
    /// part's files are never whole in memory: CSV (text is bigger than the
    /// columns) whole was a quarter of the peak memory of a large first
    /// version, and its state and Parquet files another quarter.
    pub(super) async fn run(self, job: FileJob) -> Result<(FileRole, FileRef)> {
        let FileJob {
            role,
            path,
            rows,
            previous,
        } = job;
        let store = if matches!(role, FileRole::State { .. }) {
            self.state_store
        } else {
            self.store
        };
        let previous = match previous {
            Some((change, PreviousFile::Named(file))) => {
                previous_file(&store, &self.dataset, &file)
                    .await
                    .map(|bytes| (change, bytes))
            }
            Some((change, PreviousFile::Read(bytes))) => Some((change, bytes)),
            None => None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let encode_role = role.clone();
        let encoding = tokio::task::spawn_blocking(move || -> Result<Option<sink::Written>> {
            let mut sink = match encode_role {
                FileRole::State { .. } => sink::ChunkWriter::private(tx),
                _ => sink::ChunkWriter::new(tx),
            };
            let encoded = match encode_role {
                FileRole::State { .. } => rows.batches().and_then(|(schema, batches)| {
                    state::encode_state_stream(&schema, batches, &mut sink)
                        .map_err(PublishError::from)
                }),
                FileRole::Data { format, .. } => encode_data(format, rows, previous, &mut sink),
                FileRole::Changes { format } => rows.batches().and_then(|(schema, batches)| {
                    writer::encode_stream(format, &schema, batches, &mut sink)
                        .map_err(PublishError::from)
                }),
            };
            // The store writer went away: its error is the one to report.
            if sink.stopped() {
                return Ok(None);
            }
            encoded?;
            // Only a whole file is ended: if encoding failed, the writer sees
            // the channel close without an end and leaves nothing.
            Ok(sink.finish().ok())
        });
        let full = format!("{}/{path}", self.dataset);
        let (written, encoded) = futures::join!(store.put_chunks(&full, rx), encoding);
        let encoded =
            encoded.map_err(|e| PublishError::State(format!("encoder task failed: {e}")))??;
        written.map_err(store_err(&store))?;
        let written = encoded.ok_or_else(|| {
            PublishError::State(format!("the writer of {full} stopped before its end"))
        })?;
        Ok((
            role,
            FileRef {
                path,
                bytes: written.bytes,
                sha256: written.sha256,
                xxh3: Some(written.xxh3),
            },
        ))
    }
}
