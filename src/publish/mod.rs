//! The publisher: keyed state, partitions, versions, Parquet/CSV files, manifests,
//! `latest/`, retention, and recovery from the newest committed version.
//!
//! Commit order (DESIGN.md "Guarantees"): private state files and the state
//! manifest, then immutable data and change files under unique names, then the
//! version manifest with a conditional create (the commit point), then the
//! `manifest.json` pointer and `latest/`. A crash before the commit point leaves
//! only unreferenced files, which retention removes; a crash after it is repaired
//! on the next start.

pub mod catalog;
mod csv;
pub mod index;
pub mod manifest;
pub mod sink;
pub mod state;
mod stream;
#[cfg(test)]
mod tests;
pub mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use oppen_connector_api::{BatchKind, ColumnType, Op, Position};

use crate::classify::{Classified, KEY_COLUMN};
use crate::config::{OutputFormat, PartitionGrain};
use crate::store::Store;
use index::KeyIndex;
use manifest::{
    ChangeSummary, ColumnInfo, FileRef, PartitionFiles, State, StateManifest, Version,
    VersionManifest, parse_version_path, version_name,
};
use state::{Entry, Key, KeyHash, KeyMap, KeyScope, KeySet, Partitions};

/// Files written to a store at once.
const UPLOAD_CONCURRENCY: usize = 8;

/// Errors while publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store failed (retryable where the store says so).
    #[error("store {store}: {source}")]
    Store {
        store: String,
        #[source]
        source: object_store::Error,
    },
    /// Another publisher committed this version first.
    #[error("version {version} of {dataset} was committed by another publisher")]
    Conflict { dataset: String, version: u64 },
    /// Encoding or a kernel failed.
    #[error("{0}")]
    Arrow(#[from] ArrowError),
    /// A file could not be encoded.
    #[error("{0}")]
    Encode(#[from] writer::EncodeError),
    /// A manifest or state file is unreadable.
    #[error("{path}: {message}")]
    Corrupt { path: String, message: String },
    /// The private state for the newest version is missing or made with another key.
    #[error("{0}")]
    State(String),
    /// A part of a first version written while it was staged failed, and its
    /// rows are not in memory to write again: the version must be read from
    /// the source again (the runtime does so after a pause).
    #[error(
        "{dataset}: writing part {part} failed ({reason}); the version is read from the source again"
    )]
    PartLost {
        dataset: String,
        part: String,
        reason: String,
    },
}

impl PublishError {
    /// Whether retrying may help (a lost part: after reading the source again).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PublishError::Store { .. }
                | PublishError::Conflict { .. }
                | PublishError::PartLost { .. }
        )
    }
}

type Result<T, E = PublishError> = std::result::Result<T, E>;

/// How a dataset is published.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Dataset id: the folder in the store and the state location.
    pub dataset: String,
    /// Which files to write.
    pub formats: Vec<OutputFormat>,
    /// The published column and grain to partition by.
    pub partition_by: Option<(String, PartitionGrain)>,
    /// Versions to keep.
    pub keep_versions: u32,
    /// Most rows in one published file: a larger partition is split into
    /// parts, and a version rewrites only the parts its changes touch.
    pub max_file_rows: usize,
    /// Bytes of committed rows kept in memory. A version reads the parts it
    /// touches from the private state; the most recently used stay cached
    /// (the last part of a table that grows, the parts a stream keeps updating).
    pub row_cache_bytes: usize,
    /// SHA-256 of the rules file.
    pub rules_digest: String,
    /// Identifies the pseudonym key.
    pub key_fingerprint: String,
    /// The dataset's catalog description, and the URL the store is served at.
    pub catalog: Option<(catalog::DatasetMeta, String)>,
}

/// A committed part.
#[derive(Debug, Clone)]
struct Partition {
    /// Its rows, while cached; read from `state` when a version needs them.
    rows: Option<RecordBatch>,
    /// First and last day of its first date or timestamp column.
    dates: Option<(i32, i32)>,
    /// The version that last wrote or read it (the cache keeps the newest).
    used: u64,
    state: StateFiles,
    files: PartitionFiles,
}

/// A part's private state: its state file and the updates in place laid
/// over it, oldest first (see [`State::updates`]).
#[derive(Debug, Clone, PartialEq)]
struct StateFiles {
    file: FileRef,
    updates: Vec<FileRef>,
}

/// Update files a part's state may carry before they are folded into a new
/// state file; each holds at most 1/[`UPDATE_SHARE`] of the part's rows.
/// Reading a part then costs at most twice its rows.
const MAX_STATE_UPDATES: usize = 8;
/// An update in place of more than 1/8 of a part's rows writes a new state
/// file rather than an update file.
const UPDATE_SHARE: usize = 8;

/// The files of one written part.
#[derive(Debug, Clone)]
struct PartFiles {
    state: StateFiles,
    data: BTreeMap<OutputFormat, FileRef>,
    rows: u64,
    dates: Option<(i32, i32)>,
    /// The schema of the rows written.
    schema: SchemaRef,
}

/// Changes staged for the next version.
#[derive(Debug, Default)]
struct Pending {
    batches: Vec<RecordBatch>,
    /// The newest staged change of each key: (batch, row, is delete).
    latest: KeyMap<(u32, u32, bool)>,
    /// Keys seen in the snapshot under way (full export or re-snapshot).
    snapshot_seen: Option<KeySet>,
    /// The keys of each complete image (full export or re-snapshot) that
    /// ended, by the keys it covers: committed keys of its scope it lacks are
    /// deleted at the next commit. A newer image of a scope replaces the older.
    complete_images: BTreeMap<KeyScope, KeySet>,
    /// Inside a source transaction (a version must not end here).
    open_transaction: bool,
    /// The kind of the newest staged batch.
    last_kind: Option<BatchKind>,
    position: Option<Position>,
    source_time: Option<DateTime<Utc>>,
    rows: usize,
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The new version number.
    pub version: u64,
    /// Rows in the dataset.
    pub rows: u64,
    /// What changed.
    pub inserts: u64,
    /// What changed.
    pub updates: u64,
    /// What changed.
    pub deletes: u64,
    /// Partitions rewritten.
    pub partitions_written: usize,
    /// Bytes written per format.
    pub bytes: BTreeMap<OutputFormat, u64>,
    /// The source position the version holds.
    pub position: Option<Position>,
}

/// What recovery found.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The newest committed version, 0 when none.
    pub version: u64,
    /// Where the source resumes.
    pub position: Option<Position>,
    /// Source column types recorded with the version.
    pub source_types: BTreeMap<String, ColumnType>,
    /// Rows in the dataset.
    pub rows: u64,
    /// When the newest version was committed.
    pub created: Option<DateTime<Utc>>,
    /// How far publishers on a Kafka transport have read (publisher role).
    pub transport: Option<manifest::TransportProgress>,
}

/// Publishes versions of one dataset.
#[derive(Debug)]
pub struct Publisher {
    settings: Settings,
    store: Store,
    state_store: Store,
    schema: Option<SchemaRef>,
    partitions: BTreeMap<String, Partition>,
    index: KeyIndex,
    names: Partitions,
    version: u64,
    pending: Pending,
    unclassified: Vec<String>,
    source_types: BTreeMap<String, ColumnType>,
    /// Files each kept version references: (public, private), full paths.
    references: BTreeMap<u64, (Vec<String>, Vec<String>)>,
    /// The highest version named by an unreferenced file newer than the newest
    /// version (left by a crashed commit), to remove once that version exists.
    orphans_up_to: Option<u64>,
    /// The keys an image staged next covers.
    image_scope: KeyScope,
    /// Transport progress recorded with the next version (publisher role).
    transport: Option<manifest::TransportProgress>,
    /// Whether a first version is written while its image is read (see `stream`).
    stream_images: bool,
    /// The first version under way, written as it is staged.
    streamed: Option<stream::Streamed>,
    /// What updates in place changed lately (see [`InPlaceColumns`]).
    in_place: std::sync::Arc<InPlaceColumns>,
}

fn store_err(store: &Store) -> impl Fn(object_store::Error) -> PublishError + '_ {
    move |source| PublishError::Store {
        store: store.location().to_string(),
        source,
    }
}

impl Publisher {
    /// Opens the dataset: reads the newest committed version and its private
    /// state, repairs a stale pointer, and removes files a crash left behind.
    pub async fn open(
        settings: Settings,
        store: Store,
        state_store: Store,
    ) -> Result<(Self, Recovered)> {
        let mut publisher = Self {
            settings,
            store,
            state_store,
            schema: None,
            partitions: BTreeMap::new(),
            index: KeyIndex::default(),
            names: Partitions::default(),
            version: 0,
            pending: Pending::default(),
            unclassified: Vec::new(),
            source_types: BTreeMap::new(),
            references: BTreeMap::new(),
            orphans_up_to: None,
            image_scope: KeyScope::All,
            transport: None,
            stream_images: false,
            streamed: None,
            in_place: std::sync::Arc::default(),
        };
        let recovered = publisher.recover().await?;
        Ok((publisher, recovered))
    }

    fn path(&self, rest: &str) -> String {
        format!("{}/{rest}", self.settings.dataset)
    }

    /// Committed version numbers, ascending.
    pub async fn versions(&self) -> Result<Vec<u64>> {
        let mut versions: Vec<u64> = self
            .store
            .list(&self.path("versions"))
            .await
            .map_err(store_err(&self.store))?
            .iter()
            .filter_map(|p| parse_version_path(p))
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    /// Reads a committed version's manifest.
    pub async fn read_version(&self, version: u64) -> Result<Version> {
        read_version(&self.store, &self.settings.dataset, version).await
    }

    async fn recover(&mut self) -> Result<Recovered> {
        let Some(&newest) = self.versions().await?.last() else {
            self.collect_garbage().await?;
            return Ok(Recovered::default());
        };
        let version = self.read_version(newest).await?;
        let state_path = self.path(&manifest::state_manifest_path(&version));
        let state_bytes = self.state_store.get(&state_path).await.map_err(store_err(&self.state_store))?.ok_or_else(|| {
            PublishError::State(format!(
                "version {newest} of {} is published, but its private state ({} in {}) is missing. The \
                 state location was lost or changed: restore it, or publish to a new store location \
                 so the dataset is rebuilt from the source",
                self.settings.dataset,
                state_path,
                self.state_store.location()
            ))
        })?;
        let state = serde_json::from_slice::<StateManifest>(&state_bytes)
            .map_err(|e| PublishError::Corrupt {
                path: state_path.clone(),
                message: e.to_string(),
            })?
            .into_state();
        if state.key_fingerprint != self.settings.key_fingerprint {
            return Err(PublishError::State(format!(
                "the pseudonym key differs from the one that built {}'s state; use the original key \
                 (pseudonym_key in the pipeline, or {}/pseudonym.key in the state location)",
                self.settings.dataset,
                self.state_store.location()
            )));
        }
        // Every part is read once to index its keys; the rows stay cached
        // only while they fit the cache (versions read the parts they touch).
        let loads: Vec<_> = state
            .partitions
            .iter()
            .map(|(name, file)| {
                let store = self.state_store.clone();
                let files = StateFiles {
                    file: file.clone(),
                    updates: state.updates.get(name).cloned().unwrap_or_default(),
                };
                let dataset = self.settings.dataset.clone();
                let name = name.clone();
                async move {
                    let rows = read_part(&store, &dataset, &files).await?;
                    Ok::<_, PublishError>((name, files, rows))
                }
            })
            .collect();
        let mut loaded = futures::stream::iter(loads).buffered(UPLOAD_CONCURRENCY);
        let mut cached = 0;
        while let Some((name, state_file, rows)) = loaded.try_next().await? {
            let id = self.names.id(&name);
            state::index_rows(&mut self.index, &rows, id)?;
            self.schema.get_or_insert_with(|| rows.schema());
            let dates = date_range(&rows);
            cached += rows.get_array_memory_size();
            let rows = (cached <= self.settings.row_cache_bytes).then_some(rows);
            let files =
                version
                    .partitions
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| PublishError::Corrupt {
                        path: state_path.clone(),
                        message: format!("partition {name} is in the state but not in the version"),
                    })?;
            self.partitions.insert(
                name,
                Partition {
                    rows,
                    dates,
                    used: newest,
                    state: state_file,
                    files,
                },
            );
        }
        drop(loaded);
        self.version = newest;
        self.unclassified = state.unclassified.clone();
        self.source_types = state.source_types.clone();
        self.repair_pointer(&version).await?;
        let kept = self.kept_versions().await?;
        self.load_references(&kept).await?;
        self.collect_garbage().await?;
        Ok(Recovered {
            version: newest,
            position: version.source_position.clone(),
            source_types: state.source_types,
            rows: version.rows,
            created: Some(version.created),
            transport: version.transport.clone(),
        })
    }

    /// Rewrites `manifest.json` and `latest/` if a crash came between the commit
    /// point and their update.
    async fn repair_pointer(&self, version: &Version) -> Result<()> {
        // An unreadable pointer is repaired like a stale one.
        match read_pointer(&self.store, &self.settings.dataset).await {
            Ok(Some(current)) if current.version == version.version => return Ok(()),
            Ok(_) | Err(PublishError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        tracing::warn!(dataset = %self.settings.dataset, version = version.version, "repairing manifest.json and latest/ after an interrupted commit");
        self.write_pointer(version).await
    }

    /// Writes `latest/` and `manifest.json` from a version's manifest.
    async fn write_pointer(&self, version: &Version) -> Result<()> {
        for (name, files) in &version.partitions {
            for (format, file) in &files.files {
                let latest = self.path(&format!("latest/{name}.{}", format.extension()));
                self.store
                    .copy(&self.path(&file.path), &latest)
                    .await
                    .map_err(store_err(&self.store))?;
            }
        }
        let bytes = Bytes::from(
            serde_json::to_vec_pretty(&VersionManifest::V1(version.clone())).unwrap_or_default(),
        );
        self.store
            .put(&self.path("manifest.json"), bytes)
            .await
            .map_err(store_err(&self.store))
    }

    /// Forgets the in-memory state and reads the newest committed version again
    /// (after another publisher committed first). Staged changes are kept.
    pub async fn reload(&mut self) -> Result<Recovered> {
        self.schema = None;
        self.partitions.clear();
        self.index.clear();
        self.version = 0;
        self.references.clear();
        self.orphans_up_to = None;
        self.recover().await
    }

    /// The source position of the staged changes, if any are staged.
    pub fn pending_position(&self) -> Option<&Position> {
        self.pending.position.as_ref()
    }

    /// The newest committed version (0 before the first).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Staged changes waiting for a version.
    pub fn pending_rows(&self) -> usize {
        self.pending.rows
    }

    /// Whether a version may end now (not inside a source transaction or snapshot).
    pub fn at_boundary(&self) -> bool {
        !self.pending.open_transaction && self.pending.snapshot_seen.is_none()
    }

    /// Whether staged changes are whole (not inside a transaction or
    /// snapshot) and there are any: a version may be committed now.
    pub fn holds_whole_changes(&self) -> bool {
        self.pending.rows > 0 && self.at_boundary()
    }

    /// Whether a complete snapshot is staged (a version should end after it).
    pub fn snapshot_complete(&self) -> bool {
        !self.pending.complete_images.is_empty()
    }

    /// Sets the primary key the catalog describes (a source may know its key
    /// only once it has started).
    pub fn set_primary_key(&mut self, key: Vec<String>) {
        if let Some((meta, _)) = &mut self.settings.catalog {
            meta.primary_key = key;
        }
    }

    /// Records the source's column types and unclassified columns for the next version.
    pub fn set_source_info(
        &mut self,
        source_types: BTreeMap<String, ColumnType>,
        unclassified: Vec<String>,
    ) {
        self.source_types = source_types;
        self.unclassified = unclassified;
    }

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
    fn note_staged(
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
    fn may_stream(&self) -> bool {
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
    fn stage_streamed(
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
    fn stage_parts(
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

    /// Whether staged changes are partly written already (a first version
    /// streamed): they cannot be committed on top of another publisher's
    /// version, only read again from the source.
    pub fn is_streaming(&self) -> bool {
        self.streamed.is_some()
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
    fn parts_in_flight(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        if self.store.location().local_root().is_some() {
            cores
        } else {
            cores * 2
        }
    }

    fn job_context(&self) -> JobContext {
        JobContext {
            store: self.store.clone(),
            state_store: self.state_store.clone(),
            dataset: self.settings.dataset.clone(),
            in_place: self.in_place.clone(),
        }
    }

    /// Sets the keys the images staged from now on cover (see [`KeyScope`]).
    pub fn set_image_scope(&mut self, scope: KeyScope) {
        self.image_scope = scope;
    }

    /// Sets the transport progress the next version records.
    pub fn set_transport(&mut self, progress: Option<manifest::TransportProgress>) {
        self.transport = progress;
    }

    /// Drops staged changes (after a failed commit that will be retried from the source).
    pub fn discard_pending(&mut self) {
        self.pending = Pending::default();
        // Parts written for it are unreferenced; the next garbage collection removes them.
        self.streamed = None;
    }

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

    async fn commit_pending(
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
    async fn commit_streamed(
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
    async fn write_streamed(
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
        let outcome = Outcome {
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
        self.finish(outcome, position, source_time, target)
            .await
            .map(Some)
    }

    /// Every committed part's rows aligned to a new schema, and the key index
    /// with the fingerprints of the aligned rows. (A schema change rewrites
    /// every part, so all of them are in memory at once here.)
    async fn realign(&mut self, target: &SchemaRef) -> Result<Realigned> {
        let dataset = &self.settings.dataset;
        let loads: Vec<_> = self
            .partitions
            .iter_mut()
            .map(|(name, p)| {
                let (cached, files) = (p.rows.take(), p.state.clone());
                let (store, dataset, name) =
                    (self.state_store.clone(), dataset.clone(), name.clone());
                async move {
                    let rows = match cached {
                        Some(rows) => rows,
                        None => read_part(&store, &dataset, &files).await?,
                    };
                    Ok::<_, PublishError>((name, rows))
                }
            })
            .collect();
        let loaded: Vec<(String, RecordBatch)> = futures::stream::iter(loads)
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .try_collect()
            .await?;
        let mut realigned = Realigned {
            rows: BTreeMap::new(),
            index: KeyIndex::default(),
        };
        for (name, rows) in loaded {
            let id = self.names.id(&name);
            let rows = state::align(&rows, target)?;
            state::index_rows(&mut realigned.index, &rows, id)?;
            realigned.rows.insert(id, rows);
        }
        Ok(realigned)
    }

    /// Drops the cached rows of the least recently used parts until the
    /// cache holds at most `budget` bytes.
    fn trim_cache(&mut self, budget: usize) {
        let mut cached: Vec<(u64, &String, usize)> = self
            .partitions
            .iter()
            .filter_map(|(name, p)| {
                p.rows
                    .as_ref()
                    .map(|r| (p.used, name, r.get_array_memory_size()))
            })
            .collect();
        let mut total: usize = cached.iter().map(|c| c.2).sum();
        if total <= budget {
            return;
        }
        cached.sort_unstable();
        let mut evict = Vec::new();
        for (_, name, bytes) in cached {
            if total <= budget {
                break;
            }
            total -= bytes;
            evict.push(name.clone());
        }
        for name in evict {
            if let Some(p) = self.partitions.get_mut(&name) {
                p.rows = None;
            }
        }
    }
}

/// Reads a part's rows from its state file and the updates laid over it.
async fn read_part(store: &Store, dataset: &str, files: &StateFiles) -> Result<RecordBatch> {
    let (base, updates) = read_state_files(store, dataset, files).await?;
    let path = files.file.path.clone();
    tokio::task::spawn_blocking(move || -> Result<RecordBatch> {
        let mut rows = state::decode_state(base)?;
        for update in updates {
            rows = state::apply_update(&rows, &state::decode_state(update)?)
                .map_err(|e| PublishError::State(format!("updates of state file {path}: {e}")))?;
        }
        Ok(rows)
    })
    .await
    .map_err(|e| PublishError::State(e.to_string()))?
}

/// A part's state file and its update files, oldest first, each checked
/// against what was written.
async fn read_state_files(
    store: &Store,
    dataset: &str,
    files: &StateFiles,
) -> Result<(Bytes, Vec<Bytes>)> {
    let read = |file: &FileRef| {
        let path = format!("{dataset}/{}", file.path);
        async move {
            store
                .get(&path)
                .await
                .map_err(store_err(store))?
                .ok_or_else(|| {
                    PublishError::State(format!(
                        "state file {path} is missing in {}; restore the state location",
                        store.location()
                    ))
                })
        }
    };
    let (base, updates) = futures::future::try_join(
        read(&files.file),
        futures::future::try_join_all(files.updates.iter().map(read)),
    )
    .await?;
    let files = files.clone();
    let dataset = dataset.to_string();
    let location = store.location().to_string();
    tokio::task::spawn_blocking(move || -> Result<(Bytes, Vec<Bytes>)> {
        // A state file that is not what was written (a torn copy, a disk
        // fault, a hand edit) must not become the rows the next version
        // builds on: decoding alone would not catch every such change.
        let checked = |file: &FileRef, bytes: Bytes| {
            file.check(&bytes)
                .map(|()| bytes)
                .map_err(|e| PublishError::Corrupt {
                    path: format!("{location}/{dataset}/{}", file.path),
                    message: format!(
                        "this private state file is damaged ({e}); restore the state location \
                     from a backup, or publish to a new store location so the dataset is \
                     rebuilt from the source"
                    ),
                })
        };
        let base = checked(&files.file, base)?;
        let updates = files
            .updates
            .iter()
            .zip(updates)
            .map(|(file, bytes)| checked(file, bytes))
            .collect::<Result<Vec<_>>>()?;
        Ok((base, updates))
    })
    .await
    .map_err(|e| PublishError::State(e.to_string()))?
}

/// First and last day in a batch's first date or timestamp column.
fn date_range(rows: &RecordBatch) -> Option<(i32, i32)> {
    let i = dates_column(&rows.schema())?;
    let days = arrow::compute::cast(rows.column(i), &arrow::datatypes::DataType::Date32).ok()?;
    let days = days.as_any().downcast_ref::<arrow::array::Date32Array>()?;
    Some((arrow::compute::min(days)?, arrow::compute::max(days)?))
}

/// The column a part's date range is of: its first date or timestamp column.
fn dates_column(schema: &arrow::datatypes::Schema) -> Option<usize> {
    schema.fields().iter().position(|f| {
        matches!(
            f.data_type(),
            arrow::datatypes::DataType::Date32 | arrow::datatypes::DataType::Timestamp(_, _)
        )
    })
}

/// The days two ranges of days cover together.
fn span((first, last): (i32, i32), (lo, hi): (i32, i32)) -> (i32, i32) {
    (first.min(lo), last.max(hi))
}

/// Encodes and writes one part: its private state and one file per format,
/// named for `version` and unique.
async fn write_part(
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
fn spawn_part(
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
/// the slowest encoder is done with it, so every batch of depth is memory;
/// one more queued was no faster (BENCHMARKS.md, issue 7).
const STREAM_DEPTH: usize = 1;

/// Opens a part's files and writes the rows sent to the returned stream as
/// they come: one encoder per file, each on a blocking thread, and the row
/// count and date range gathered beside them.
fn stream_part(
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
fn part_jobs(
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
fn part_files(
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
async fn finish_part(dataset: &str, part: &mut stream::StreamedPart) -> Result<()> {
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

/// One independent write of the tidy-up after a commit.
enum StoreOp<'a> {
    Put(String, Bytes),
    Copy(&'a str, &'a str),
    Delete(&'a str),
}

impl StoreOp<'_> {
    async fn apply(self, store: &Store) -> object_store::Result<()> {
        match self {
            Self::Put(path, bytes) => store.put(&path, bytes).await,
            Self::Copy(from, to) => store.copy(from, to).await,
            Self::Delete(path) => store.delete(path).await,
        }
    }
}

/// What a file of a version holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileRole {
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
enum JobRows {
    Whole(RecordBatch),
    Stream(tokio::sync::mpsc::Receiver<RecordBatch>, SchemaRef),
    /// A data file of a part updated in place, read back in part (see
    /// [`in_place_projected`]): only what its previous file lacks.
    InPlace(std::sync::Arc<writer::InPlaceRows>),
}

/// A part's data file of the version before, to copy what did not change
/// from: named (read when its job runs), or already read and checked.
enum PreviousFile {
    Named(FileRef),
    Read(Bytes),
}

/// One file to encode and write.
struct FileJob {
    role: FileRole,
    /// Path relative to the dataset folder.
    path: String,
    rows: JobRows,
    /// For a part's data file after an update in place: what changed, and
    /// the part's file of the version before (copied where unchanged).
    previous: Option<(InPlace, PreviousFile)>,
}

/// Where and how file jobs write; cheap to clone.
#[derive(Clone)]
struct JobContext {
    store: Store,
    state_store: Store,
    dataset: String,
    in_place: std::sync::Arc<InPlaceColumns>,
}

/// The columns the newest update in place of a part changed: a guess at
/// what the next one changes. A part updated in place is read back with
/// only its keys and these columns when the guess is proven right for every
/// changed row (see [`in_place_projected`]); the rest of the part, most of
/// its bytes, is never decompressed.
#[derive(Debug, Default)]
struct InPlaceColumns {
    changed: std::sync::Mutex<Option<Vec<String>>>,
    /// Parts written from such a partial read (for tests and the debug log).
    projected: std::sync::atomic::AtomicU64,
}

impl InPlaceColumns {
    fn guess(&self) -> Option<Vec<String>> {
        self.changed.lock().ok()?.clone()
    }

    /// Remembers the columns of an update file (its `_row` left out).
    fn remember(&self, update: &RecordBatch) {
        let names = update
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != state::ROW_COLUMN)
            .collect();
        if let Ok(mut changed) = self.changed.lock() {
            *changed = Some(names);
        }
    }
}

/// The previous file of a part updated in place, to copy what did not change
/// from. Any doubt (the file is gone, unreadable, or not the size and hash
/// its manifest says) means encoding the part whole: never an error.
async fn previous_file(store: &Store, dataset: &str, file: &FileRef) -> Option<Bytes> {
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
fn encode_data(
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
    fn batches(self) -> Result<(SchemaRef, Box<dyn Iterator<Item = RecordBatch> + Send>)> {
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
    async fn write_changes(
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
    async fn run(self, job: FileJob) -> Result<(FileRole, FileRef)> {
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

/// What a version changes, worked out from the key index.
struct Plan {
    /// The parts it rewrites, by id, and what changes in each.
    touched: BTreeMap<u32, PartChanges>,
    /// Keys deleted (their old rows go to the change files).
    deleted: KeySet,
    /// Staged rows inserted or updated, with their ops, in source order.
    change_rows: Vec<(usize, usize, &'static str)>,
    summary: (u64, u64, u64),
    /// The first version of an empty dataset: its data files are its changes.
    initial: bool,
    /// Parts this version starts with inserted rows only: their data files
    /// are changes too, and their rows are not in the change files.
    inserted: Vec<String>,
    /// Index changes to apply after the commit: keys deleted, and keys
    /// inserted or moved (an insert replaces an older entry).
    removed: Vec<Key>,
    added: Vec<(Key, Entry)>,
}

/// One part a version rewrites (see [`Publisher::write`]).
struct PartJob {
    name: String,
    /// Its rows after the version, about: the largest jobs start first.
    size: usize,
    from: OldRows,
    /// Its committed files, which an update in place writes the new ones from.
    previous: Option<(BTreeMap<OutputFormat, FileRef>, StateFiles)>,
    /// Its committed row count and date range.
    before: (u64, Option<(i32, i32)>),
    changes: PartChanges,
}

/// A part job's outcome: the part's name, its files and rows (none when the
/// version empties it), and the rows deleted from it (for the change files).
type PartDone = (
    String,
    Option<(PartFiles, Option<RecordBatch>)>,
    Option<RecordBatch>,
);

impl PartJob {
    /// Takes the part's committed rows (read from the state unless given),
    /// builds its new rows on a blocking thread, and writes its files.
    async fn run(
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
                    (&changes.in_place, &previous, context.in_place.guess())
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

/// What a version changes in one part.
struct PartChanges {
    /// Keys that leave it (deleted, updated, or moved to another part).
    removed: KeySet,
    /// Staged rows `(batch, row)` that join it, in source order.
    added: Vec<(usize, usize)>,
    /// When its only changes are rows updated where they stand: key to the
    /// staged row. The part then keeps its order.
    /// (Each with the fingerprint of the row it replaces.)
    in_place: Option<KeyMap<(usize, usize, u64)>>,
}

/// The staged rows a version's part jobs build from.
struct StagedRows {
    batches: Vec<RecordBatch>,
    deleted: KeySet,
    target: SchemaRef,
}

/// Where a touched part's committed rows come from.
enum OldRows {
    /// In memory: cached, or realigned to a new schema.
    Rows(RecordBatch),
    /// Read from the state when its job runs.
    Read(StateFiles),
    /// A part this version starts.
    New,
}

/// Committed rows realigned to a new schema (see [`Publisher::realign`]).
struct Realigned {
    rows: BTreeMap<u32, RecordBatch>,
    index: KeyIndex,
}

impl PartChanges {
    /// The part's new rows from its committed ones `old`; with them, for an
    /// update in place, what changed (its files are rewritten from the
    /// previous ones), and the rows deleted from it (for the change files).
    fn apply(
        &self,
        old: &RecordBatch,
        staged: &StagedRows,
    ) -> Result<(RecordBatch, Option<InPlace>, Option<RecordBatch>)> {
        let batches: Vec<&RecordBatch> = staged.batches.iter().collect();
        let target = &staged.target;
        if let Some(updates) = &self.in_place
            && let Some((rows, change)) = update_in_place(old, updates, &batches, target)?
        {
            return Ok((rows, Some(change), None));
        }
        let mut dropped = None;
        let kept = if self.removed.is_empty() {
            old.clone()
        } else {
            let keys = state::keys(old)?;
            let mut keep = arrow::array::BooleanBuilder::with_capacity(old.num_rows());
            let mut deleted = arrow::array::BooleanBuilder::with_capacity(old.num_rows());
            for row in 0..old.num_rows() {
                let key = state::key_at(keys, row);
                keep.append_value(!self.removed.contains(&key));
                deleted.append_value(staged.deleted.contains(&key));
            }
            let (keep, deleted) = (keep.finish(), deleted.finish());
            if deleted.true_count() > 0 {
                dropped = Some(arrow::compute::filter_record_batch(old, &deleted)?);
            }
            arrow::compute::filter_record_batch(old, &keep)?
        };
        let rows = if self.added.is_empty() {
            kept
        } else {
            let new = take_rows(&batches, &self.added, target)?;
            state::concat_owned(target, vec![kept, new])?
        };
        Ok((rows, None, dropped))
    }
}

/// The change files' rows: the staged rows inserted or updated, then the
/// rows deleted (by part name, so the same input gives the same bytes).
/// None for the first version of an empty dataset, whose data files are its
/// changes.
fn change_rows_batch(
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

/// What a version wrote, ready to commit.
struct Outcome<'a> {
    /// Parts written: their files, and their rows to keep cached.
    written: BTreeMap<String, (PartFiles, Option<RecordBatch>)>,
    /// Parts the version empties.
    emptied: Vec<String>,
    change_files: BTreeMap<OutputFormat, FileRef>,
    /// Inserts, updates, deletes.
    summary: (u64, u64, u64),
    /// The first version of an empty dataset: its data files are its changes.
    initial: bool,
    /// See [`Plan::inserted`].
    inserted: Vec<String>,
    index: IndexUpdate<'a>,
}

/// How the key index follows a committed version.
enum IndexUpdate<'a> {
    /// Keys deleted, and keys inserted or moved.
    Delta {
        removed: Vec<Key>,
        added: Vec<(Key, Entry)>,
    },
    /// The streamed version's keys.
    Replace(&'a mut KeyIndex),
}

/// Staged batches aligned to the version's schema, with every row's
/// partition and fingerprint.
struct Prepared {
    batches: Vec<RecordBatch>,
    part_of: Vec<Vec<u32>>,
    hash_of: Vec<Vec<u64>>,
    schema_changed: bool,
}

/// The parts partitions are split into, for placing rows during a plan.
struct Parts<'a> {
    names: &'a mut Partitions,
    /// The partition (the id of its first part) of every part.
    base: HashMap<u32, u32>,
    /// The last part of every partition.
    last: HashMap<u32, LastPart>,
}

/// A partition's last part, where new rows go.
#[derive(Clone, Copy)]
struct LastPart {
    id: u32,
    number: u32,
    /// Rows committed, plus those this plan placed.
    rows: usize,
}

impl<'a> Parts<'a> {
    fn new(committed: &BTreeMap<String, Partition>, names: &'a mut Partitions) -> Self {
        let mut base = HashMap::new();
        let mut last: HashMap<u32, LastPart> = HashMap::new();
        for (name, p) in committed {
            let (partition, number) = split_part_name(name);
            let (id, base_id) = (names.id(name), names.id(partition));
            base.insert(id, base_id);
            let part = LastPart {
                id,
                number,
                rows: p.files.rows as usize,
            };
            let tail = last.entry(base_id).or_insert(part);
            if number > tail.number {
                *tail = part;
            }
        }
        Self { names, base, last }
    }

    /// The partition a part belongs to.
    fn base(&self, part: u32) -> u32 {
        self.base.get(&part).copied().unwrap_or(part)
    }

    /// The part of partition `base` a new row goes to.
    fn place(&mut self, base: u32, max_rows: usize) -> u32 {
        let tail = self.last.entry(base).or_insert(LastPart {
            id: base,
            number: 0,
            rows: 0,
        });
        if tail.rows >= max_rows.max(1) {
            self.start_next(base);
        }
        let tail = self
            .last
            .get_mut(&base)
            .expect("the last part was just made");
        tail.rows += 1;
        tail.id
    }

    /// Makes a new part the last of partition `base`, where its next rows go.
    fn start_next(&mut self, base: u32) {
        let Some(tail) = self.last.get(&base).copied() else {
            return;
        };
        let number = tail.number + 1;
        let id = self.names.id(&part_name(self.names.name(base), number));
        self.base.insert(id, base);
        self.last.insert(
            base,
            LastPart {
                id,
                number,
                rows: 0,
            },
        );
    }

    /// Before a plan places `adding` new rows in partition `base`: a large
    /// append (a catch-up's, a bulk load's) goes to a new part rather than
    /// filling the committed last part, when that part is large too, so the
    /// version does not encode again up to `max_rows` rows it did not change
    /// (a 1,000,000-change catch-up re-encoded a fifth as many old rows).
    /// Every part but the last then stays at least a quarter full.
    fn before_appending(&mut self, base: u32, adding: usize, max_rows: usize) {
        let quarter = max_rows / 4;
        if let Some(tail) = self.last.get(&base)
            && quarter > 0
            && tail.rows >= quarter
            && tail.rows < max_rows
            && adding >= quarter
        {
            self.start_next(base);
        }
    }
}

/// The name of part `number` of a partition: the partition's own name for the
/// first, `<partition>@0001` and on for the next (`@` never occurs in a
/// partition name, object stores keep it as it is in keys and file names,
/// and the padding keeps parts in order when listed).
fn part_name(partition: &str, number: u32) -> String {
    if number == 0 {
        partition.to_string()
    } else {
        format!("{partition}@{number:04}")
    }
}

/// A part's partition and number.
fn split_part_name(name: &str) -> (&str, u32) {
    match name.rsplit_once('@') {
        Some((partition, n)) => match n.parse() {
            Ok(number) => (partition, number),
            Err(_) => (name, 0),
        },
        None => (name, 0),
    }
}

impl Publisher {
    /// Aligns the staged batches to the version's schema and works out every
    /// row's partition and fingerprint.
    fn prepare(&mut self, pending: &Pending, target: &SchemaRef) -> Result<Prepared> {
        let schema_changed = self.schema.as_ref().is_some_and(|s| s != target);
        let batches = pending
            .batches
            .iter()
            .map(|b| state::align(b, target))
            .collect::<Result<Vec<_>, _>>()?;
        let single = self.settings.dataset.clone();
        let mut part_of: Vec<Vec<u32>> = Vec::with_capacity(batches.len());
        let mut hash_of: Vec<Vec<u64>> = Vec::with_capacity(batches.len());
        for b in &batches {
            part_of.push(state::partition_ids(
                b,
                self.settings.partition_by.as_ref(),
                &single,
                &mut self.names,
            )?);
        }
        hash_of.extend(
            parallel_map(&batches, state::row_hashes)
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?,
        );
        Ok(Prepared {
            batches,
            part_of,
            hash_of,
            schema_changed,
        })
    }

    /// Works out from the key index alone what the version changes: the keys
    /// leaving each part, the staged rows joining each, the rows updated in
    /// place, and the index changes. `realigned` is the index of a new
    /// schema's fingerprints.
    fn plan(
        &mut self,
        pending: &Pending,
        prepared: &Prepared,
        realigned: Option<&KeyIndex>,
    ) -> Result<Option<Plan>> {
        let Prepared {
            part_of,
            hash_of,
            schema_changed,
            ..
        } = prepared;
        let schema_changed = *schema_changed;
        let index = realigned.unwrap_or(&self.index);

        // A partition is stored as parts of at most `max_file_rows` rows (the
        // first part carries the partition's name): an updated row stays in its
        // part, a new row (or one that moved partition) goes to the partition's
        // last part, and a full last part starts the next. Appends then rewrite
        // one part, not the partition.
        let mut parts = Parts::new(&self.partitions, &mut self.names);

        let mut removed_from: HashMap<u32, KeySet> = HashMap::new();
        let mut added_to: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
        let mut deleted = KeySet::default();
        // Sized for every staged key at once: a large version's lists grew
        // by doubling, each step a copy into freshly faulted pages (BENCHMARKS.md,
        // issue 3).
        let staged = pending.latest.len();
        let mut change_rows: Vec<(usize, usize, &'static str)> = Vec::with_capacity(staged);
        let (mut inserts, mut updates, mut deletes) = (0u64, 0u64, 0u64);
        let mut removed = Vec::new();
        let mut added = Vec::with_capacity(staged);
        // Rows that need a place in their partition's last part, and whether
        // each is an insert.
        let mut placed_last: Vec<(usize, usize, Key, Entry, bool)> = Vec::with_capacity(staged);
        // Rows updated in place, by part: a part whose only changes these are
        // keeps its rows in order, and its files can be rewritten from the
        // previous ones (see `in_place`).
        let mut in_place: HashMap<u32, KeyMap<(usize, usize, u64)>> = HashMap::new();
        // Deletes first; the other staged rows are then visited in source
        // order, so every list below fills in that order and needs no sort
        // (a large version's sorts and the table's hash order took most of
        // its plan: BENCHMARKS.md, issue 3).
        let mut order: Vec<u64> = Vec::with_capacity(staged);
        for (key, &(b, r, delete)) in &pending.latest {
            if !delete {
                order.push(u64::from(b) << 32 | u64::from(r));
            } else if let Some(e) = index.get(key) {
                removed_from.entry(e.partition).or_default().insert(*key);
                deleted.insert(*key);
                removed.push(*key);
                deletes += 1;
            }
        }
        order.sort_unstable();
        let keys_of = prepared
            .batches
            .iter()
            .map(state::keys)
            .collect::<Result<Vec<_>, _>>()?;
        for packed in order {
            let (b, r) = (
                (packed >> 32) as usize,
                (packed & u64::from(u32::MAX)) as usize,
            );
            let key = &state::key_at(keys_of[b], r);
            let previous = index.get(key);
            let entry = Entry {
                partition: part_of[b][r],
                hash: hash_of[b][r],
            };
            match previous {
                Some(e) if parts.base(e.partition) == entry.partition => {
                    if e.hash == entry.hash {
                        continue;
                    }
                    // Updated in place: its part is rewritten.
                    removed_from.entry(e.partition).or_default().insert(*key);
                    updates += 1;
                    change_rows.push((b, r, "update"));
                    let entry = Entry {
                        partition: e.partition,
                        hash: entry.hash,
                    };
                    added_to.entry(entry.partition).or_default().push((b, r));
                    in_place
                        .entry(entry.partition)
                        .or_default()
                        .insert(*key, (b, r, e.hash));
                    added.push((*key, entry));
                }
                Some(e) => {
                    removed_from.entry(e.partition).or_default().insert(*key);
                    updates += 1;
                    change_rows.push((b, r, "update"));
                    placed_last.push((b, r, *key, entry, false));
                }
                None => {
                    inserts += 1;
                    change_rows.push((b, r, "insert"));
                    placed_last.push((b, r, *key, entry, true));
                }
            }
        }
        // In source order (as visited), so parts fill in the order rows arrived.
        debug_assert!(placed_last.is_sorted_by_key(|&(b, r, _, _, _)| (b, r)));
        let mut adding: BTreeMap<u32, usize> = BTreeMap::new();
        for &(_, _, _, entry, _) in &placed_last {
            *adding.entry(entry.partition).or_default() += 1;
        }
        for (base, rows) in adding {
            parts.before_appending(base, rows, self.settings.max_file_rows);
        }
        // Parts that get a row other than an insert.
        let mut not_only_inserts: HashSet<u32> = HashSet::new();
        for (b, r, key, entry, insert) in placed_last {
            let part = parts.place(entry.partition, self.settings.max_file_rows);
            if !insert {
                not_only_inserts.insert(part);
            }
            added_to.entry(part).or_default().push((b, r));
            added.push((
                key,
                Entry {
                    partition: part,
                    hash: entry.hash,
                },
            ));
        }
        for (scope, seen) in &pending.complete_images {
            for (key, e) in index.iter() {
                if scope.contains(key) && !seen.contains(key) && !pending.latest.contains_key(key) {
                    removed_from.entry(e.partition).or_default().insert(*key);
                    deleted.insert(*key);
                    removed.push(*key);
                    deletes += 1;
                }
            }
        }
        if inserts + updates + deletes == 0 && !schema_changed {
            // Nothing published changes, but the source moved on.
            return Ok(None);
        }
        // Deterministic order in files (the same input gives the same bytes): new
        // rows in source order, as visited, unless a part has both rows updated
        // in place and rows placed after them.
        for rows in added_to.values_mut() {
            if !rows.is_sorted() {
                rows.sort_unstable();
            }
        }
        debug_assert!(change_rows.is_sorted_by_key(|&(b, r, _)| (b, r)));
        // The first version of an empty dataset inserts every row: its data files
        // are its changes, so they are not written twice (the manifest says
        // `initial`). Later, a part the version starts with inserts only (a
        // large append, a catch-up) is named in the manifest as inserted rows,
        // and its rows stay out of the change files: a catch-up wrote each of
        // them twice, its change files as large as its data files.
        let initial = self.partitions.is_empty() && updates == 0 && deletes == 0 && !schema_changed;
        let inserted: Vec<u32> = if initial {
            Vec::new()
        } else {
            added_to
                .keys()
                .copied()
                .filter(|id| {
                    !not_only_inserts.contains(id)
                        && !removed_from.contains_key(id)
                        && !self.partitions.contains_key(self.names.name(*id))
                })
                .collect()
        };
        if !inserted.is_empty() {
            let mut skip: Vec<(usize, usize)> = inserted
                .iter()
                .flat_map(|id| added_to[id].iter().copied())
                .collect();
            // Parts fill in source order, so this is mostly sorted already.
            if !skip.is_sorted() {
                skip.sort_unstable();
            }
            // Both in source order: one walk.
            let mut next = 0;
            change_rows.retain(|&(b, r, _)| {
                while next < skip.len() && skip[next] < (b, r) {
                    next += 1;
                }
                skip.get(next) != Some(&(b, r))
            });
        }
        let mut inserted: Vec<String> = inserted
            .into_iter()
            .map(|id| self.names.name(id).to_string())
            .collect();
        inserted.sort_unstable();
        // With a new schema every part is rewritten; otherwise those that lose
        // or gain a row.
        let mut touched: BTreeMap<u32, PartChanges> = BTreeMap::new();
        let ids: Vec<u32> = if schema_changed {
            let all = self.partitions.keys().map(|name| self.names.id(name));
            all.chain(added_to.keys().copied()).collect()
        } else {
            removed_from
                .keys()
                .chain(added_to.keys())
                .copied()
                .collect()
        };
        for id in ids {
            touched.entry(id).or_insert_with(|| {
                let removed = removed_from.remove(&id).unwrap_or_default();
                let added = added_to.remove(&id).unwrap_or_default();
                // Only rows updated in place: the part keeps its order.
                let in_place = in_place.remove(&id).filter(|u| {
                    !schema_changed && removed.len() == u.len() && added.len() == u.len()
                });
                PartChanges {
                    removed,
                    added,
                    in_place,
                }
            });
        }
        Ok(Some(Plan {
            touched,
            deleted,
            change_rows,
            summary: (inserts, updates, deletes),
            initial,
            inserted,
            removed,
            added,
        }))
    }

    /// The jobs of a version's touched parts, their committed rows given
    /// (`realigned` to a new schema), taken out of the cache, or to read.
    fn rewrite_jobs(
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

    async fn write(
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
        let outcome = Outcome {
            written,
            emptied,
            change_files,
            summary,
            initial,
            inserted,
            index,
        };
        self.finish(
            outcome,
            pending.position.clone(),
            pending.source_time,
            target,
        )
        .await
    }

    /// Commits a version whose files are written: the state manifest, the
    /// version manifest (the commit point), then the in-memory state and the
    /// tidy-up.
    async fn finish(
        &mut self,
        outcome: Outcome<'_>,
        position: Option<Position>,
        source_time: Option<DateTime<Utc>>,
        target: SchemaRef,
    ) -> Result<Committed> {
        let version = self.version + 1;
        let vname = version_name(version);
        let Outcome {
            written,
            emptied,
            change_files,
            summary,
            initial,
            inserted,
            index,
        } = outcome;
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
    async fn newer_version(&self) -> Result<Option<u64>> {
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

    async fn after_commit(
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
    async fn update_pointer(
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
    async fn describe(&self, version: &Version) -> Result<Option<(catalog::DatasetMeta, String)>> {
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
    fn temporal_coverage(&self) -> Option<(chrono::NaiveDate, chrono::NaiveDate)> {
        let range = self
            .partitions
            .values()
            .filter_map(|p| p.dates)
            .reduce(span)?;
        let date = |d: i32| chrono::NaiveDate::from_num_days_from_ce_opt(d + 719_163);
        Some((date(range.0)?, date(range.1)?))
    }

    async fn kept_versions(&self) -> Result<Vec<u64>> {
        let versions = self.versions().await?;
        let keep = self.settings.keep_versions as usize;
        Ok(versions[versions.len().saturating_sub(keep)..].to_vec())
    }

    /// Remembers which files kept versions reference, reading their manifests.
    async fn load_references(&mut self, kept: &[u64]) -> Result<()> {
        for v in kept {
            let version = self.read_version(*v).await?;
            let public = version.files().map(|f| self.path(&f.path)).collect();
            let path = self.path(&manifest::state_manifest_path(&version));
            let mut private = vec![path.clone()];
            if let Some(bytes) = self
                .state_store
                .get(&path)
                .await
                .map_err(store_err(&self.state_store))?
                && let Ok(s) =
                    serde_json::from_slice::<StateManifest>(&bytes).map(StateManifest::into_state)
            {
                private.extend(
                    s.partitions
                        .values()
                        .chain(s.updates.values().flatten())
                        .map(|f| self.path(&f.path)),
                );
            }
            self.references.insert(*v, (public, private));
        }
        Ok(())
    }

    /// Deletes versions beyond `keep_versions`. Returns whether any went.
    async fn apply_retention(&mut self) -> Result<bool> {
        let keep = self.settings.keep_versions as usize;
        // Every version this publisher kept or committed is in `references`;
        // while they fit, there is nothing to delete that it knows of, and the
        // listing is saved. Versions other publishers committed are counted
        // once this one's own pass the limit: retention is deferred, never lost.
        if self.references.len() <= keep {
            return Ok(false);
        }
        let versions = self.versions().await?;
        if versions.len() <= keep {
            return Ok(false);
        }
        let (old, _) = versions.split_at(versions.len() - keep);
        for v in old {
            let name = format!("versions/{}.json", version_name(*v));
            self.store
                .delete(&self.path(&name))
                .await
                .map_err(store_err(&self.store))?;
            self.state_store
                .delete(&self.path(&name))
                .await
                .map_err(store_err(&self.state_store))?;
            self.references.remove(v);
        }
        Ok(true)
    }

    /// Deletes data, change and state files that no kept version references,
    /// sparing any named for a version after the newest (a commit may be under
    /// way); those are remembered and removed once that version is committed.
    async fn collect_garbage(&mut self) -> Result<()> {
        let public: HashSet<&String> = self.references.values().flat_map(|(p, _)| p).collect();
        let private: HashSet<&String> = self.references.values().flat_map(|(_, p)| p).collect();
        let newest = self.version;
        let places = [
            (&self.store, self.path("data"), &public),
            (&self.store, self.path("changes"), &public),
            (&self.state_store, self.path("partitions"), &private),
            (&self.state_store, self.path("versions"), &private),
        ];
        // One rule for every unreferenced file, by the version its name
        // begins with: up to the newest version it is garbage; a later one
        // may belong to a version still being written, so it is only noted.
        let mut later: Option<u64> = None;
        let mut garbage = |file: &str| match file.get(..20).and_then(|v| v.parse::<u64>().ok()) {
            Some(v) if v <= newest => true,
            Some(v) => {
                later = later.max(Some(v));
                false
            }
            None => false,
        };
        // Staging files of writes a crash stopped (local stores), named
        // after the file they were to become.
        for (store, prefix, _) in &places {
            for (name, path) in store.staged_leftovers(prefix) {
                if garbage(&name) {
                    tracing::debug!(path = %path.display(), "removing the staging file of an interrupted write");
                    if let Err(e) = tokio::fs::remove_file(&path).await {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a staging file");
                    }
                }
            }
        }
        // The four listings are independent round trips on a remote store.
        let listings = places.iter().map(|(store, prefix, referenced)| async move {
            let paths = store.list(prefix).await.map_err(store_err(store))?;
            Ok::<_, PublishError>((*store, paths, *referenced))
        });
        for (store, paths, referenced) in futures::future::try_join_all(listings).await? {
            for path in paths {
                if !referenced.contains(&path)
                    && garbage(path.rsplit('/').next().unwrap_or_default())
                {
                    tracing::debug!(path, "removing unreferenced file");
                    store.delete(&path).await.map_err(store_err(store))?;
                }
            }
        }
        self.orphans_up_to = later;
        Ok(())
    }
}

/// `f` over `items` on every core, results in order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = parallel_threads();
    if threads < 2 || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// `f` on each of `items` on every core, each thread taking a run of them.
fn parallel_for_each<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let threads = parallel_threads();
    if threads < 2 || items.len() < 2 {
        items.iter_mut().for_each(f);
        return;
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        for part in items.chunks_mut(chunk) {
            scope.spawn(move || part.iter_mut().for_each(f));
        }
    });
}

/// Threads for [`parallel_map`] and [`parallel_for_each`]: one per core.
fn parallel_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A part updated in place, as committed before: its files, to write the
/// new ones from.
struct PreviousPart {
    change: InPlace,
    files: BTreeMap<OutputFormat, FileRef>,
    state: StateFiles,
}

/// What an update in place changed in a part: its files are written again
/// from the previous ones (see [`writer::encode_reusing`]), and its state
/// gets `update` as an update file.
#[derive(Debug, Clone)]
struct InPlace {
    /// The rows that changed (ascending) and the new values of the columns
    /// that changed (see [`state::update_batch`]).
    update: RecordBatch,
}

impl InPlace {
    /// What a previous data file of the part is reused for when rows of the
    /// `published` schema (the new rows without `_key`) are encoded.
    fn previous(
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
fn update_in_place(
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
struct Located {
    /// Their rows in the part, ascending.
    positions: arrow::array::UInt32Array,
    /// Their new values, in that order.
    new: RecordBatch,
    /// The fingerprints the index holds for them.
    was: Vec<u64>,
    /// What they were, in the version's schema: a column the part was read
    /// with from the part, any other as staged (taken not to change).
    before: RecordBatch,
}

impl Located {
    /// Where `updates` (key to its staged row, with the replaced row's
    /// fingerprint) stand in `old`, a part's rows read whole or with some of
    /// their columns; `None` if a key is not in it.
    fn find(
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
    fn update(&self) -> Result<RecordBatch> {
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
struct InPlacePart<'a> {
    name: &'a str,
    files: &'a StateFiles,
    data: &'a BTreeMap<OutputFormat, FileRef>,
    /// Its committed row count and date range.
    before: (u64, Option<(i32, i32)>),
    /// Key to the staged row that replaces it, with the replaced row's
    /// fingerprint.
    updates: &'a KeyMap<(usize, usize, u64)>,
}

impl InPlacePart<'_> {
    /// Writes the part from its keys and the `guess`ed columns alone (see
    /// [`in_place_projected`]): its previous data files with the changed
    /// columns and rows laid over them, and an update file for its state.
    /// `None` (and nothing written) when that cannot be done: the part is
    /// then read whole.
    async fn write_projected(
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
struct Projected {
    /// Its state's update file.
    change: InPlace,
    /// What its data files are written from.
    rows: writer::InPlaceRows,
    dates: Option<(i32, i32)>,
    /// Its previous data files, by format, each checked to line up.
    previous: BTreeMap<OutputFormat, Bytes>,
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
fn in_place_projected(
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
fn take_rows(
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

/// Reads `versions/<v>.json` of a dataset.
pub async fn read_version(store: &Store, dataset: &str, version: u64) -> Result<Version> {
    let path = format!("{dataset}/versions/{}.json", version_name(version));
    let bytes = store
        .get(&path)
        .await
        .map_err(store_err(store))?
        .ok_or_else(|| PublishError::Corrupt {
            path: path.clone(),
            message: "version manifest not found".into(),
        })?;
    let manifest: VersionManifest =
        serde_json::from_slice(&bytes).map_err(|e| PublishError::Corrupt {
            path,
            message: e.to_string(),
        })?;
    Ok(manifest.version().clone())
}

/// Reads the version a dataset's pointer (`manifest.json`) names: the newest
/// committed, or an older one while a commit's tidy-up is under way.
pub async fn read_pointer(store: &Store, dataset: &str) -> Result<Option<Version>> {
    let path = format!("{dataset}/manifest.json");
    let Some(bytes) = store.get(&path).await.map_err(store_err(store))? else {
        return Ok(None);
    };
    let manifest: VersionManifest =
        serde_json::from_slice(&bytes).map_err(|e| PublishError::Corrupt {
            path,
            message: e.to_string(),
        })?;
    let VersionManifest::V1(version) = manifest;
    Ok(Some(version))
}

/// Reads the newest version of a dataset (by listing, not trusting the pointer).
pub async fn newest_version(store: &Store, dataset: &str) -> Result<Option<Version>> {
    let listed = store
        .list(&format!("{dataset}/versions"))
        .await
        .map_err(store_err(store))?;
    match listed.iter().filter_map(|p| parse_version_path(p)).max() {
        Some(v) => read_version(store, dataset, v).await.map(Some),
        None => Ok(None),
    }
}
