//! Object stores: where versions are published and where private state lives.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// A store location from a pipeline file: `file://relative/path`,
/// `file:///absolute/path`, or a plain path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    root: PathBuf,
}

impl StoreLocation {
    /// Parses a location; relative paths resolve from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let path = if let Some(rest) = text.strip_prefix("file://") {
            rest
        } else if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "stores with `{scheme}://` are not supported by this build; use a file:// location"
            ));
        } else {
            text
        };
        if path.is_empty() {
            return Err("the location is empty; write e.g. file://published".into());
        }
        let path = Path::new(path);
        let root = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        Ok(Self {
            root: normalize(&root),
        })
    }

    /// A local folder as a location.
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self {
            root: normalize(&root.into()),
        }
    }

    /// Whether one location lies inside the other (or they are the same).
    pub fn overlaps(&self, other: &StoreLocation) -> bool {
        self.root.starts_with(&other.root) || other.root.starts_with(&self.root)
    }

    /// The local folder, for messages and for tests.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the store, creating the folder if needed.
    pub fn open(&self) -> Result<Store, object_store::Error> {
        std::fs::create_dir_all(&self.root).map_err(|e| object_store::Error::Generic {
            store: "local",
            source: Box::new(e),
        })?;
        // fsync files and folders on write: a version acknowledged to a source
        // must survive a power cut, not only a crash. Empty folders left by
        // retention are removed.
        let local = LocalFileSystem::new_with_prefix(&self.root)?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(Store {
            inner: Arc::new(local),
            location: self.clone(),
        })
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file://{}", self.root.display())
    }
}

/// Removes `.` and `..` components without touching the disk.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// An open store with the operations versions need.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: StoreLocation,
}

/// A conditional create lost: the object exists.
#[derive(Debug, thiserror::Error)]
#[error("{path} already exists")]
pub struct Conflict {
    /// The object that exists.
    pub path: String,
}

impl Store {
    /// Where the store is.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Writes (or overwrites) an object.
    pub async fn put(&self, path: &str, bytes: Bytes) -> object_store::Result<()> {
        self.inner
            .put(&ObjectPath::from(path), PutPayload::from(bytes))
            .await
            .map(|_| ())
    }

    /// Creates an object only if it does not exist.
    pub async fn create(
        &self,
        path: &str,
        bytes: Bytes,
    ) -> Result<Result<(), Conflict>, object_store::Error> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&ObjectPath::from(path), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(Ok(())),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(Err(Conflict {
                path: path.to_string(),
            })),
            Err(e) => Err(e),
        }
    }

    /// Copies an object over another, atomically for readers of `to` (a hard link
    /// on local disks, a server-side copy elsewhere: no bytes travel).
    pub async fn copy(&self, from: &str, to: &str) -> object_store::Result<()> {
        self.inner
            .copy(&ObjectPath::from(from), &ObjectPath::from(to))
            .await
    }

    /// Reads an object; `None` if it does not exist.
    pub async fn get(&self, path: &str) -> object_store::Result<Option<Bytes>> {
        match self.inner.get(&ObjectPath::from(path)).await {
            Ok(result) => result.bytes().await.map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes an object; a missing one is fine.
    pub async fn delete(&self, path: &str) -> object_store::Result<()> {
        match self.inner.delete(&ObjectPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The folders at the store's root (one per dataset).
    pub async fn list_dirs(&self) -> object_store::Result<Vec<String>> {
        let listing = self.inner.list_with_delimiter(None).await?;
        Ok(listing
            .common_prefixes
            .into_iter()
            .map(|p| p.to_string())
            .collect())
    }

    /// Every object under `prefix`, as paths.
    pub async fn list(&self, prefix: &str) -> object_store::Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(prefix);
        let metas: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }
}
