//! Staging: classified changes gathered for the next version, keyed by `_key`;
//! a first version's parts streamed to their encoders as they fill.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use oppen_connector_api::{BatchKind, Op, Position};

use super::state::{KeyHash, KeyMap, KeyScope, KeySet};
use super::write::{finish_part, spawn_part, stream_part};
use super::{Publisher, Result, state, stream};
use crate::classify::Classified;

/// Changes staged for the next version.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) batches: Vec<RecordBatch>,
    /// The newest staged change of each key: (batch, row, is delete).
    pub(super) latest: KeyMap<(u32, u32, bool)>,
    /// Keys seen in the snapshot under way (full export or re-snapshot).
    pub(super) snapshot_seen: Option<KeySet>,
    /// The keys of each complete image (full export or re-snapshot) that
    /// ended, by the keys it covers: committed keys of its scope it lacks are
    /// deleted at the next commit. A newer image of a scope replaces the older.
    pub(super) complete_images: BTreeMap<KeyScope, KeySet>,
    /// Inside a source transaction (a version must not end here).
    pub(super) open_transaction: bool,
    /// The kind of the newest staged batch.
    pub(super) last_kind: Option<BatchKind>,
    pub(super) position: Option<Position>,
    pub(super) source_time: Option<DateTime<Utc>>,
    pub(super) rows: usize,
}

impl Publisher {
    /// Stages a classified batch.
    pub fn stage(
        &mut self,
        batch: Classified,
        kind: BatchKind,
        end_of_transaction: bool,
        position: Position,
        commit_time: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let Classified { data, ops, .. } = batch;
        let data = state::narrow_keys(data)?;
        // A snapshot batch after change batches starts a new image (a second
        // TRUNCATE before the first one's transaction boundary was seen): the
        // image under way is replaced, not extended.
        let new_image = kind == BatchKind::Snapshot
            && (self.pending.snapshot_seen.is_none()
                || self.pending.last_kind == Some(BatchKind::Changes));
        self.pending.last_kind = Some(kind);
        if new_image && self.may_stream() {
            self.streamed = Some(stream::Streamed::new(data.schema()));
        } else if new_image && let Some(streamed) = &mut self.streamed {
            streamed.start_image(self.image_scope);
        }
        if self.streamed.is_some() {
            return self.stage_streamed(
                &data,
                &ops,
                new_image,
                end_of_transaction,
                position,
                commit_time,
            );
        }
        let index = self.pending.batches.len() as u32;
        let keys = state::keys(&data)?;
        if new_image {
            self.pending.snapshot_seen = Some(KeySet::with_capacity_and_hasher(
                self.index.len(),
                KeyHash::default(),
            ));
        }
        for (row, op) in ops.iter().enumerate() {
            let key = state::key_at(keys, row);
            let delete = *op == Op::Delete;
            if !delete && let Some(seen) = &mut self.pending.snapshot_seen {
                seen.insert(key);
            }
            self.pending.latest.insert(key, (index, row as u32, delete));
        }
        self.note_staged(data.num_rows(), end_of_transaction, position, commit_time);
        self.pending.batches.push(data);
        // An image is whole at the end of its transaction. A TRUNCATE starts an
        // (empty) image mid-transaction; the changes after it join that image.
        if self.pending.snapshot_seen.is_some() && end_of_transaction {
            // The image is whole. Keys staged earlier but absent from it are
            // deletes now; committed keys absent from it become deletes when the
            // version is planned, against the state as it is then (another
            // publisher may have committed meanwhile).
            let seen = self.pending.snapshot_seen.take().unwrap_or_default();
            let scope = self.image_scope;
            for (key, change) in &mut self.pending.latest {
                if !change.2 && !seen.contains(key) && scope.contains(key) {
                    *change = (u32::MAX, 0, true);
                }
            }
            self.pending.complete_images.insert(scope, seen);
        }
        Ok(())
    }

    /// What every staged batch moves on, streamed or not: the count, the
    /// transaction boundary and the source position.
    pub(super) fn note_staged(
        &mut self,
        rows: usize,
        end_of_transaction: bool,
        position: Position,
        commit_time: Option<DateTime<Utc>>,
    ) {
        self.pending.rows += rows;
        self.pending.open_transaction = !end_of_transaction;
        self.pending.position = Some(position);
        self.pending.source_time = commit_time.or(self.pending.source_time);
    }

    /// Whether the image starting now may be written as it is staged: the
    /// first version of a dataset, nothing staged before it. (An image of a
    /// share of the keys, as a publisher on a transport stages per partition,
    /// is as good: with nothing committed, every row is an insert.)
    pub(super) fn may_stream(&self) -> bool {
        self.stream_images
            && self.streamed.is_none()
            && self.version == 0
            && self.partitions.is_empty()
            && self.index.is_empty()
            && self.pending.batches.is_empty()
            && self.pending.latest.is_empty()
            && self.pending.complete_images.is_empty()
    }

    /// [`Publisher::stage`] for a first version written while it is staged:
    /// rows go to parts, full parts to the encoders.
    pub(super) fn stage_streamed(
        &mut self,
        data: &RecordBatch,
        ops: &[Op],
        new_image: bool,
        end_of_transaction: bool,
        position: Position,
        commit_time: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let Some(mut streamed) = self.streamed.take() else {
            return Ok(());
        };
        let staged = self.stage_parts(&mut streamed, data, ops);
        let in_image = new_image || self.pending.snapshot_seen.is_some();
        if staged.is_ok() && in_image && end_of_transaction {
            streamed.end_image();
        }
        self.streamed = Some(streamed);
        staged?;
        // The image bookkeeping `at_boundary` and `snapshot_complete` read; the
        // keys themselves are in the streamed version.
        if new_image {
            self.pending.snapshot_seen = Some(KeySet::default());
        }
        self.note_staged(data.num_rows(), end_of_transaction, position, commit_time);
        if self.pending.snapshot_seen.is_some() && end_of_transaction {
            self.pending.snapshot_seen = None;
            self.pending
                .complete_images
                .insert(self.image_scope, KeySet::default());
        }
        Ok(())
    }

    /// Places a batch's rows in the streamed version's parts and starts
    /// writing the parts that filled.
    pub(super) fn stage_parts(
        &mut self,
        streamed: &mut stream::Streamed,
        data: &RecordBatch,
        ops: &[Op],
    ) -> Result<()> {
        let version = self.version + 1;
        let context = self.job_context();
        let open = |name: &str, schema: &SchemaRef| {
            stream_part(
                context.clone(),
                &self.settings.formats,
                version,
                name.to_string(),
                schema.clone(),
            )
        };
        let placement = stream::Placement {
            partition_by: self.settings.partition_by.as_ref(),
            single: &self.settings.dataset,
            max_rows: self.settings.max_file_rows,
            open: &open,
        };
        streamed.stage(data, ops, &mut self.names, &placement)?;
        for (i, rows) in streamed.take_full()? {
            let name = streamed.parts[i].name.clone();
            streamed.parts[i].write = stream::PartWrite::Running(spawn_part(
                context.clone(),
                self.settings.formats.clone(),
                version,
                name,
                rows,
            ));
        }
        Ok(())
    }

    /// Writes a dataset's first version while its image is staged. A
    /// streamed version cannot be committed on top of another publisher's:
    /// on a conflict its changes are read from the source again.
    pub fn stream_images(&mut self, on: bool) {
        self.stream_images = on;
    }

    /// Sizes the key index for an image of about `rows` rows (once per
    /// image; an estimate from the source), so it is not grown step by step.
    pub fn expect_image_rows(&mut self, rows: usize) {
        // Bounded: an estimate is not a promise.
        let rows = rows.min(1 << 28);
        match &mut self.streamed {
            Some(streamed) => streamed.reserve_keys(rows),
            None => {
                let more = rows.saturating_sub(self.pending.latest.len());
                if self.pending.latest.capacity() < rows {
                    self.pending.latest.reserve(more);
                }
            }
        }
    }

    /// Hands the rows staged for streaming parts to their encoders, and
    /// waits while they or more gathered parts than there are cores are being
    /// written, so a fast source cannot pile rows up in memory.
    pub async fn settle(&mut self) {
        let limit = self.parts_in_flight();
        let Some(streamed) = &mut self.streamed else {
            return;
        };
        for part in &mut streamed.parts {
            stream::flush(part).await;
        }
        let running = |p: &stream::StreamedPart| matches!(p.write, stream::PartWrite::Running(_));
        while streamed.parts.iter().filter(|p| running(p)).count() > limit {
            let Some(part) = streamed.parts.iter_mut().find(|p| running(p)) else {
                return;
            };
            if let Err(e) = finish_part(&self.settings.dataset, part).await {
                // Its rows are kept (or, if it was streamed, the commit says they are lost).
                tracing::warn!(dataset = %self.settings.dataset, part = %part.name, error = %e, "writing a part failed; retrying at the commit");
            }
        }
    }

    /// Parts of a streamed version encoded and written at once: one per core
    /// locally; more on a remote store, whose writes wait for round trips.
    pub(super) fn parts_in_flight(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        if self.store.location().local_root().is_some() {
            cores
        } else {
            cores * 2
        }
    }

    /// Drops staged changes (after a failed commit that will be retried from the source).
    pub fn discard_pending(&mut self) {
        self.pending = Pending::default();
        // Parts written for it are unreferenced; the next garbage collection removes them.
        self.streamed = None;
    }
}
