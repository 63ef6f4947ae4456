//! The publisher: keyed state, partitions, versions, Parquet/CSV files, manifests,
//! `latest/`, retention, and recovery from the newest committed version.
//!
//! A version goes through phases, each a file of this module and each handing
//! the next a type that only it makes, so no phase can be skipped:
//!
//! ```text
//!  stage         prepare + plan          write                finish             after_commit
//!  (stage.rs) ─► (plan.rs)        ─►     (write.rs,      ─►   (commit.rs)   ─►   (commit.rs),
//!                                         jobs.rs,                               retention.rs
//!                                         in_place.rs)
//!  Pending       Prepared, Plan          FilesWritten         Committed
//!  staged rows   which keys go where,    every part's files   the version manifest created:
//!  by `_key`     from the key index      written, unnamed     the commit point
//! ```
//!
//! A first version streams instead: its parts are written while they are
//! staged (`stream.rs`), and its commit writes what is left before `finish`.
//! Opening a dataset (`recover.rs`) rebuilds the key index from the newest
//! committed version.
//!
//! Commit order (DESIGN.md "Guarantees"): private state files and the state
//! manifest, then immutable data and change files under unique names, then the
//! version manifest with a conditional create (the commit point), then the
//! `manifest.json` pointer and `latest/`. A crash before the commit point leaves
//! only unreferenced files, which retention removes; a crash after it is repaired
//! on the next start.

pub mod catalog;
mod commit;
mod csv;
mod error;
mod in_place;
pub mod index;
mod jobs;
pub mod manifest;
mod parallel;
mod part;
mod plan;
mod recover;
mod retention;
pub mod sink;
mod stage;
pub mod state;
mod stream;
#[cfg(test)]
mod tests;
mod write;
pub mod writer;

use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use oppen_connector_api::{ColumnType, Position};

use crate::config::{OutputFormat, PartitionGrain};
use crate::store::Store;
use index::KeyIndex;
use state::{KeyScope, Partitions};

use self::in_place::InPlaceColumns;
use self::part::Partition;
use self::stage::Pending;

pub use self::error::PublishError;
pub use self::recover::{newest_version, read_pointer, read_version};

/// Files written to a store at once.
const UPLOAD_CONCURRENCY: usize = 8;

pub(crate) type Result<T, E = PublishError> = std::result::Result<T, E>;

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

    /// Whether staged changes are partly written already (a first version
    /// streamed): they cannot be committed on top of another publisher's
    /// version, only read again from the source.
    pub fn is_streaming(&self) -> bool {
        self.streamed.is_some()
    }

    /// Sets the keys the images staged from now on cover (see [`KeyScope`]).
    pub fn set_image_scope(&mut self, scope: KeyScope) {
        self.image_scope = scope;
    }

    /// Sets the transport progress the next version records.
    pub fn set_transport(&mut self, progress: Option<manifest::TransportProgress>) {
        self.transport = progress;
    }
}
