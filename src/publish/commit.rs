//! The commit point: the version manifest created with a conditional put, then
//! the pointer, `latest/` and the catalog.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use oppen_connector_api::Position;

use super::index::KeyIndex;
use super::jobs::StoreOp;
use super::manifest::{
    ChangeSummary, ColumnInfo, FileRef, PartitionFiles, State, StateManifest, Version,
    VersionManifest, version_name,
};
use super::part::{PartFiles, Partition, StateFiles, span};
use super::recover::read_part;
use super::stage::Pending;
use super::state::{Entry, Key};
use super::write::{finish_part, spawn_part};
use super::{
    Committed, PublishError, Publisher, Result, UPLOAD_CONCURRENCY, catalog, manifest, store_err,
    stream,
};
use crate::classify::KEY_COLUMN;
use crate::config::OutputFormat;

/// What a version wrote, ready to commit.
pub(super) struct FilesWritten<'a> {
    /// Parts written: their files, and their rows to keep cached.
    pub(super) written: BTreeMap<String, (PartFiles, Option<RecordBatch>)>,
    /// Parts the version empties.
    pub(super) emptied: Vec<String>,
    pub(super) change_files: BTreeMap<OutputFormat, FileRef>,
    /// Inserts, updates, deletes.
    pub(super) summary: (u64, u64, u64),
    /// The first version of an empty dataset: its data files are its changes.
    pub(super) initial: bool,
    /// See [`Plan::inserted`].
    pub(super) inserted: Vec<String>,
    pub(super) index: IndexUpdate<'a>,
}

/// How the key index follows a committed version.
pub(super) enum IndexUpdate<'a> {
    /// Keys deleted, and keys inserted or moved.
    Delta {
        removed: Vec<Key>,
        added: Vec<(Key, Entry)>,
    },
    /// The streamed version's keys.
    Replace(&'a mut KeyIndex),
}

impl Publisher {
    /// Commits staged changes as a new version. Returns `None` (and commits
    /// nothing) when they change nothing published; the source position still
    /// moves on in memory.
    pub async fn commit(&mut self) -> Result<Option<Committed>> {
        if !self.at_boundary() {
            return Ok(None);
        }
        if let Some(mut streamed) = self.streamed.take() {
            let result = self.commit_streamed(&mut streamed).await;
            match &result {
                Ok(_) => self.pending = Pending::default(),
                // Keep what was written and staged, so a retry commits exactly the same.
                Err(_) => self.streamed = Some(streamed),
            }
            return result;
        }
        if self.pending.batches.is_empty() && self.pending.latest.is_empty() {
            return Ok(None);
        }
        let pending = std::mem::take(&mut self.pending);
        let target = pending
            .batches
            .last()
            .map(RecordBatch::schema)
            .or_else(|| self.schema.clone());
        let Some(target) = target else {
            return Ok(None);
        };
        let result = self.commit_pending(&pending, target).await;
        if result.is_err() {
            // Keep what was staged, so a retry commits exactly the same changes.
            self.pending = pending;
        }
        result
    }

    pub(super) async fn commit_pending(
        &mut self,
        pending: &Pending,
        target: SchemaRef,
    ) -> Result<Option<Committed>> {
        let started = std::time::Instant::now();
        let prepared = self.prepare(pending, &target)?;
        let prepared_ms = started.elapsed().as_millis() as u64;
        // A new schema refingerprints every committed row before the plan.
        // Otherwise the plan needs only the key index, and each part it
        // touches is read while it is written (`write`), so a version that
        // touches every part never holds them all.
        let realigned = if prepared.schema_changed {
            Some(self.realign(&target).await?)
        } else {
            None
        };
        let planned = self.plan(pending, &prepared, realigned.as_ref().map(|r| &r.index))?;
        tracing::debug!(dataset = %self.settings.dataset, prepared_ms, ms = started.elapsed().as_millis() as u64, "planned version");
        let Some(plan) = planned else {
            tracing::debug!(dataset = %self.settings.dataset, "staged changes publish nothing new; no version");
            return Ok(None);
        };
        self.write(plan, prepared, realigned, pending, target)
            .await
            .map(Some)
    }

    /// Commits a streamed first version: the parts still filling are written,
    /// written parts with replaced rows (or an older schema) are written again,
    /// then the version is committed like any other.
    pub(super) async fn commit_streamed(
        &mut self,
        streamed: &mut stream::Streamed,
    ) -> Result<Option<Committed>> {
        let committed = self.write_streamed(streamed).await;
        if committed.is_err() {
            // No write of a failed attempt outlives it: a part written after
            // the error would be a file that the garbage collection before the
            // retry (`reload`) did not see, and that no version names.
            for part in &mut streamed.parts {
                let _ = finish_part(&self.settings.dataset, part).await;
            }
        }
        committed
    }

    /// [`Publisher::commit_streamed`] until its first error.
    pub(super) async fn write_streamed(
        &mut self,
        streamed: &mut stream::Streamed,
    ) -> Result<Option<Committed>> {
        use stream::PartWrite;
        let target = streamed.schema.clone();
        let version = self.version + 1;
        streamed.close();
        let sorting = streamed.sort_keys();
        let mut finished = Ok(());
        for part in &mut streamed.parts {
            finished = finish_part(&self.settings.dataset, part).await;
            if finished.is_err() {
                break;
            }
        }
        // The keys come back before any error is reported: a retried commit needs them.
        streamed.keys_sorted(sorting).await?;
        finished?;
        for part in &mut streamed.parts {
            if let PartWrite::Written(files) = &part.write
                && (streamed.dirty.contains(&part.id) || files.schema != target)
            {
                let rows =
                    read_part(&self.state_store, &self.settings.dataset, &files.state).await?;
                part.write = PartWrite::Rows(vec![rows]);
            }
        }
        // Parts still to write (the last of each partition, those written
        // again) go out a few at a time: a dataset of many partitions has as
        // many parts filling, and encoding them all at once would hold every
        // file in memory.
        let context = self.job_context();
        let limit = self.parts_in_flight();
        let mut running = std::collections::VecDeque::new();
        for i in 0..streamed.parts.len() {
            if let Some(rows) = streamed.prepare(i, &target)? {
                let name = streamed.parts[i].name.clone();
                streamed.parts[i].write = PartWrite::Running(spawn_part(
                    context.clone(),
                    self.settings.formats.clone(),
                    version,
                    name,
                    rows,
                ));
                running.push_back(i);
                // Parts start one at a time, so at most one is over the limit.
                if running.len() > limit
                    && let Some(oldest) = running.pop_front()
                {
                    finish_part(&self.settings.dataset, &mut streamed.parts[oldest]).await?;
                }
            }
        }
        for part in &mut streamed.parts {
            finish_part(&self.settings.dataset, part).await?;
        }
        let written: BTreeMap<String, (PartFiles, Option<RecordBatch>)> = streamed
            .parts
            .iter()
            .filter_map(|p| match &p.write {
                PartWrite::Written(files) => Some((p.name.clone(), (files.clone(), None))),
                _ => None,
            })
            .collect();
        if written.is_empty() {
            // An empty image publishes nothing; the source still moved on.
            return Ok(None);
        }
        let written_files = FilesWritten {
            summary: (streamed.keys().len() as u64, 0, 0),
            written,
            emptied: Vec::new(),
            change_files: BTreeMap::new(),
            initial: true,
            inserted: Vec::new(),
            index: IndexUpdate::Replace(streamed.keys()),
        };
        let position = self.pending.position.clone();
        let source_time = self.pending.source_time;
        self.finish(written_files, position, source_time, target)
            .await
            .map(Some)
    }

    /// Commits a version whose files are written: the state manifest, the
    /// version manifest (the commit point), then the in-memory state and the
    /// tidy-up.
    pub(super) async fn finish(
        &mut self,
        written_files: FilesWritten<'_>,
        position: Option<Position>,
        source_time: Option<DateTime<Utc>>,
        target: SchemaRef,
    ) -> Result<Committed> {
        let version = self.version + 1;
        let vname = version_name(version);
        let FilesWritten {
            written,
            emptied,
            change_files,
            summary,
            initial,
            inserted,
            index,
        } = written_files;
        let mut bytes_by_format: BTreeMap<OutputFormat, u64> = BTreeMap::new();
        let mut latest_files = Vec::new();
        for (name, (files, _)) in &written {
            for (format, file) in &files.data {
                *bytes_by_format.entry(*format).or_default() += file.bytes;
                latest_files.push((
                    self.path(&file.path),
                    self.path(&format!("latest/{name}.{}", format.extension())),
                ));
            }
        }
        for (format, file) in &change_files {
            *bytes_by_format.entry(*format).or_default() += file.bytes;
        }
        // Parts after this version: untouched ones referenced again, not copied.
        let mut all: BTreeMap<String, (StateFiles, PartitionFiles)> = self
            .partitions
            .iter()
            .filter(|(name, _)| !written.contains_key(*name) && !emptied.contains(name))
            .map(|(name, p)| (name.clone(), (p.state.clone(), p.files.clone())))
            .collect();
        for (name, (files, _)) in &written {
            all.insert(
                name.clone(),
                (
                    files.state.clone(),
                    PartitionFiles {
                        rows: files.rows,
                        files: files.data.clone(),
                    },
                ),
            );
        }
        let partitions_written = written.len() + emptied.len();
        tracing::debug!(dataset = %self.settings.dataset, "wrote files");
        let state_manifest = StateManifest::new(State {
            dataset: self.settings.dataset.clone(),
            version,
            partitions: all
                .iter()
                .map(|(n, (s, _))| (n.clone(), s.file.clone()))
                .collect(),
            updates: all
                .iter()
                .filter(|(_, (s, _))| !s.updates.is_empty())
                .map(|(n, (s, _))| (n.clone(), s.updates.clone()))
                .collect(),
            key_fingerprint: self.settings.key_fingerprint.clone(),
            unclassified: self.unclassified.clone(),
            source_types: self.source_types.clone(),
        });
        let json = serde_json::to_vec_pretty(&state_manifest)
            .map_err(|e| PublishError::State(e.to_string()))?;
        let state_id = uuid::Uuid::new_v4().simple().to_string();
        self.state_store
            .put(
                &self.path(&format!("versions/{vname}-{state_id}.json")),
                Bytes::from(json),
            )
            .await
            .map_err(store_err(&self.state_store))?;
        crate::failpoint::hit("before-version-manifest");

        let (inserts, updates, deletes) = summary;
        let rows: u64 = all.values().map(|(_, p)| p.rows).sum();
        let manifest = Version {
            dataset: self.settings.dataset.clone(),
            version,
            created: Utc::now(),
            rows,
            schema: target
                .fields()
                .iter()
                .filter(|f| f.name() != KEY_COLUMN)
                .map(|f| ColumnInfo {
                    name: f.name().clone(),
                    type_: f.data_type().to_string(),
                })
                .collect(),
            partitions: all
                .iter()
                .map(|(n, (_, p))| (n.clone(), p.clone()))
                .collect(),
            changes: ChangeSummary {
                inserts,
                updates,
                deletes,
                files: change_files,
                initial,
                inserted,
            },
            rules_digest: self.settings.rules_digest.clone(),
            source_position: position.clone(),
            source_time,
            state_id: Some(state_id),
            transport: self.transport.clone(),
        };
        let json = Bytes::from(
            serde_json::to_vec_pretty(&VersionManifest::V1(manifest.clone()))
                .map_err(|e| PublishError::State(e.to_string()))?,
        );
        // The commit point.
        match self
            .store
            .create(&self.path(&format!("versions/{vname}.json")), json.clone())
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(PublishError::Conflict {
                    dataset: self.settings.dataset.clone(),
                    version,
                });
            }
            Err(e) => return Err(store_err(&self.store)(e)),
        }
        crate::failpoint::hit("after-version-manifest");

        // Committed: now the in-memory state follows.
        match index {
            IndexUpdate::Delta { removed, added } => self.index.apply(&removed, added),
            IndexUpdate::Replace(keys) => self.index = std::mem::take(keys),
        }
        for name in &emptied {
            self.partitions.remove(name);
        }
        for (name, (files, rows)) in written {
            self.partitions.insert(
                name,
                Partition {
                    rows,
                    dates: files.dates,
                    used: version,
                    state: files.state,
                    files: PartitionFiles {
                        rows: files.rows,
                        files: files.data,
                    },
                },
            );
        }
        self.trim_cache(self.settings.row_cache_bytes);
        self.schema = Some(target);
        self.version = version;
        let public_refs = manifest.files().map(|f| self.path(&f.path)).collect();
        let private_refs = all
            .values()
            .flat_map(|(state, _)| std::iter::once(&state.file).chain(&state.updates))
            .map(|file| self.path(&file.path))
            .chain([self.path(&manifest::state_manifest_path(&manifest))])
            .collect();
        self.references.insert(version, (public_refs, private_refs));

        // The version is committed: what follows only tidies up. A failure here is
        // repaired at the next start (pointer, latest/) or the next retention run.
        if let Err(e) = self
            .after_commit(&manifest, json, latest_files, emptied)
            .await
        {
            tracing::warn!(dataset = %self.settings.dataset, version, error = %e, "version committed, but updating manifest.json, latest/ or retention failed");
        }
        Ok(Committed {
            version,
            rows,
            inserts,
            updates,
            deletes,
            partitions_written,
            bytes: bytes_by_format,
            position,
        })
    }

    /// The newest committed version, when another publisher committed one
    /// after this publisher's newest.
    pub(super) async fn newer_version(&self) -> Result<Option<u64>> {
        // One HEAD in the usual case; a listing only when there is a newer one.
        let next = self.path(&format!("versions/{}.json", version_name(self.version + 1)));
        if !self
            .store
            .exists(&next)
            .await
            .map_err(store_err(&self.store))?
        {
            return Ok(None);
        }
        Ok(self
            .versions()
            .await?
            .last()
            .copied()
            .filter(|v| *v > self.version))
    }

    pub(super) async fn after_commit(
        &mut self,
        committed: &Version,
        pointer: Bytes,
        latest: Vec<(String, String)>,
        emptied: Vec<String>,
    ) -> Result<()> {
        // The pointer and the catalog are independent: on a remote store each is
        // a few round trips, so they overlap.
        let pointer = async {
            // Publishers sharing a dataset: the pointer and latest/ never go back
            // to an older version. A newer one committed already writes them; one
            // committed while these were written gets them written again.
            if self.newer_version().await?.is_none() {
                self.update_pointer(pointer, latest, emptied).await?;
                if let Some(newer) = self.newer_version().await? {
                    let version = self.read_version(newer).await?;
                    self.write_pointer(&version).await?;
                }
            }
            Ok::<_, PublishError>(())
        };
        let (pointer, described) = futures::join!(pointer, self.describe(committed));
        pointer?;
        if let Some(catalog) = described? {
            self.settings.catalog = Some(catalog);
        }
        let removed = self.apply_retention().await?;
        // Files of a crashed attempt at this version (or earlier) are garbage now.
        if removed || self.orphans_up_to.is_some_and(|v| v <= self.version) {
            self.collect_garbage().await?;
        }
        Ok(())
    }

    /// Writes this publisher's new version to `manifest.json` and `latest/`.
    pub(super) async fn update_pointer(
        &self,
        pointer: Bytes,
        latest: Vec<(String, String)>,
        emptied: Vec<String>,
    ) -> Result<()> {
        // Every write here is independent (the commit point is the version
        // manifest, already written): a remote store answers each in a round
        // trip, so they go out together.
        let deletes: Vec<String> = emptied
            .iter()
            .flat_map(|name| {
                self.settings
                    .formats
                    .iter()
                    .map(move |f| format!("latest/{name}.{}", f.extension()))
            })
            .map(|rest| self.path(&rest))
            .collect();
        let ops: Vec<_> = std::iter::once(StoreOp::Put(self.path("manifest.json"), pointer))
            .chain(latest.iter().map(|(from, to)| StoreOp::Copy(from, to)))
            .chain(deletes.iter().map(|path| StoreOp::Delete(path)))
            .map(|op| op.apply(&self.store))
            .collect();
        futures::stream::iter(ops)
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .map_err(store_err(&self.store))?;
        Ok(())
    }

    /// Refreshes the dataset's description from the version just committed and
    /// rebuilds the store's catalog; returns the description to keep.
    pub(super) async fn describe(
        &self,
        version: &Version,
    ) -> Result<Option<(catalog::DatasetMeta, String)>> {
        let Some((mut meta, base)) = self.settings.catalog.clone() else {
            return Ok(None);
        };
        if meta.issued.is_none() {
            // Keep the first version's time across restarts.
            let path = self.path("dataset.json");
            if let Some(bytes) = self
                .store
                .get(&path)
                .await
                .map_err(store_err(&self.store))?
            {
                meta.issued = serde_json::from_slice::<catalog::DatasetMeta>(&bytes)
                    .ok()
                    .and_then(|m| m.issued);
            }
        }
        catalog::refresh(&mut meta, version, self.temporal_coverage());
        catalog::publish(&self.store, &base, &meta)
            .await
            .map_err(store_err(&self.store))?;
        Ok(Some((meta, base)))
    }

    /// First and last day in the data's first date or timestamp column.
    pub(super) fn temporal_coverage(&self) -> Option<(chrono::NaiveDate, chrono::NaiveDate)> {
        let range = self
            .partitions
            .values()
            .filter_map(|p| p.dates)
            .reduce(span)?;
        let date = |d: i32| chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163);
        Some((date(range.0)?, date(range.1)?))
    }
}
