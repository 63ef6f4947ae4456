//! Retention: keep N versions, delete the files no kept version references.

use std::collections::HashSet;

use super::manifest::{StateManifest, version_name};
use super::{PublishError, Publisher, Result, manifest, store_err};

impl Publisher {
    pub(super) async fn kept_versions(&self) -> Result<Vec<u64>> {
        let versions = self.versions().await?;
        let keep = self.settings.keep_versions as usize;
        Ok(versions[versions.len().saturating_sub(keep)..].to_vec())
    }

    /// Remembers which files kept versions reference, reading their manifests.
    pub(super) async fn load_references(&mut self, kept: &[u64]) -> Result<()> {
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
    pub(super) async fn apply_retention(&mut self) -> Result<bool> {
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
    pub(super) async fn collect_garbage(&mut self) -> Result<()> {
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
