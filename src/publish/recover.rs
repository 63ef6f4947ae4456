//! Opening a dataset: the newest committed version, its keyed state rebuilt from
//! the private state files (each checked against its recorded size and hash),
//! and a pointer a crash left behind repaired.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::index::KeyIndex;
use super::manifest::{
    FileRef, StateManifest, Version, VersionManifest, parse_version_path, version_name,
};
use super::part::{Partition, StateFiles, date_range};
use super::stage::Pending;
use super::state::{KeyScope, Partitions};
use super::{
    PublishError, Publisher, Recovered, Result, Settings, UPLOAD_CONCURRENCY, manifest, state,
    store_err,
};
use crate::store::Store;

/// Reads a part's rows from its state file and the updates laid over it.
pub(super) async fn read_part(
    store: &Store,
    dataset: &str,
    files: &StateFiles,
) -> Result<RecordBatch> {
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
pub(super) async fn read_state_files(
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

    pub(super) fn path(&self, rest: &str) -> String {
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

    pub(super) async fn recover(&mut self) -> Result<Recovered> {
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
    pub(super) async fn repair_pointer(&self, version: &Version) -> Result<()> {
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
    pub(super) async fn write_pointer(&self, version: &Version) -> Result<()> {
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
}
