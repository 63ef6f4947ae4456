//! Object stores: where versions are published and where private state lives.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// Settings for S3-compatible stores (`publish.s3` in a pipeline file). Credentials
/// come from the standard AWS environment variables, never from the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// The endpoint, for S3-compatible servers (e.g. `http://127.0.0.1:9000`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region (default: `AWS_REGION`, else us-east-1).
    #[serde(default)]
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint`.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Allow plain HTTP (test servers only).
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Send unsigned requests (public buckets, read-only use).
    #[serde(default)]
    pub anonymous: Option<bool>,
}

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Where {
    /// A local folder.
    Local(PathBuf),
    /// An S3 bucket and a prefix inside it.
    S3 {
        bucket: String,
        prefix: String,
        options: S3Options,
    },
    /// A Google Cloud Storage bucket and a prefix (credentials from the
    /// standard GOOGLE_* variables).
    Gcs { bucket: String, prefix: String },
    /// An Azure Blob Storage container and a prefix (account and credentials
    /// from the standard AZURE_* variables).
    Azure { container: String, prefix: String },
}

/// `bucket/prefix` split, with the prefix's slashes trimmed.
fn bucket_and_prefix(rest: &str, scheme: &str) -> Result<(String, String), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "a {scheme}:// location needs a bucket: {scheme}://bucket/prefix"
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// A store location from a pipeline file: `file://relative/path`,
/// `file:///absolute/path`, a plain path, or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    place: Where,
}

impl StoreLocation {
    /// Parses a location; relative paths resolve from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        Self::parse_with(text, base, &S3Options::default())
    }

    /// Parses a location with the options S3 locations use.
    pub fn parse_with(text: &str, base: &Path, s3: &S3Options) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = bucket_and_prefix(rest, "s3")?;
            return Ok(Self {
                place: Where::S3 {
                    bucket,
                    prefix,
                    options: s3.clone(),
                },
            });
        }
        if let Some(rest) = text.strip_prefix("gs://") {
            let (bucket, prefix) = bucket_and_prefix(rest, "gs")?;
            return Ok(Self {
                place: Where::Gcs { bucket, prefix },
            });
        }
        if let Some(rest) = text.strip_prefix("az://") {
            let (container, prefix) = bucket_and_prefix(rest, "az")?;
            return Ok(Self {
                place: Where::Azure { container, prefix },
            });
        }
        let path = if let Some(rest) = text.strip_prefix("file://") {
            rest
        } else if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "stores with `{scheme}://` are not supported; use file://, s3://, gs:// or az://"
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
            place: Where::Local(normalize(&root)),
        })
    }

    /// A local folder as a location.
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self {
            place: Where::Local(normalize(&root.into())),
        }
    }

    /// Whether one location lies inside the other (or they are the same).
    pub fn overlaps(&self, other: &StoreLocation) -> bool {
        match (&self.place, &other.place) {
            (Where::Local(a), Where::Local(b)) => a.starts_with(b) || b.starts_with(a),
            (a, b) => match (a.remote(), b.remote()) {
                (Some((sa, a, pa)), Some((sb, b, pb))) => {
                    let inside = |x: &str, y: &str| {
                        y.is_empty() || x == y || x.starts_with(&format!("{y}/"))
                    };
                    sa == sb && a == b && (inside(pa, pb) || inside(pb, pa))
                }
                _ => false,
            },
        }
    }

    /// The local folder, for local stores.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.place {
            Where::Local(root) => Some(root),
            _ => None,
        }
    }

    /// Opens the store (creating a local folder if needed).
    pub fn open(&self) -> Result<Store, object_store::Error> {
        let inner: Arc<dyn ObjectStore> = match &self.place {
            Where::Local(root) => {
                std::fs::create_dir_all(root).map_err(|e| object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                })?;
                // fsync files and folders on write: a version acknowledged to a source
                // must survive a power cut, not only a crash. Empty folders left by
                // retention are removed.
                Arc::new(
                    LocalFileSystem::new_with_prefix(root)?
                        .with_fsync(true)
                        .with_automatic_cleanup(true),
                )
            }
            Where::S3 {
                bucket,
                prefix,
                options,
            } => {
                // Credentials and defaults from the standard AWS variables; the
                // pipeline's settings win. object_store retries transient errors
                // (5xx, timeouts, throttling) with exponential backoff and jitter.
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 10,
                        retry_timeout: std::time::Duration::from_secs(180),
                        ..Default::default()
                    });
                if let Some(endpoint) = &options.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &options.region {
                    builder = builder.with_region(region);
                }
                if let Some(path_style) = options.path_style {
                    builder = builder.with_virtual_hosted_style_request(!path_style);
                }
                if let Some(allow_http) = options.allow_http {
                    builder = builder.with_allow_http(allow_http);
                }
                if let Some(anonymous) = options.anonymous {
                    builder = builder.with_skip_signature(anonymous);
                }
                within(Arc::new(builder.build()?), prefix)
            }
            Where::Gcs { bucket, prefix } => {
                let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()?;
                within(Arc::new(gcs), prefix)
            }
            Where::Azure { container, prefix } => {
                let azure = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .build()?;
                within(Arc::new(azure), prefix)
            }
        };
        Ok(Store {
            inner,
            location: self.clone(),
        })
    }
}

/// A store seen through a prefix, when there is one.
fn within(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    }
}

impl Where {
    /// (scheme, bucket, prefix) of a remote store.
    fn remote(&self) -> Option<(&'static str, &str, &str)> {
        match self {
            Where::Local(_) => None,
            Where::S3 { bucket, prefix, .. } => Some(("s3", bucket, prefix)),
            Where::Gcs { bucket, prefix } => Some(("gs", bucket, prefix)),
            Where::Azure { container, prefix } => Some(("az", container, prefix)),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.place, self.place.remote()) {
            (Where::Local(root), _) => write!(f, "file://{}", root.display()),
            (_, Some((scheme, bucket, ""))) => write!(f, "{scheme}://{bucket}"),
            (_, Some((scheme, bucket, prefix))) => write!(f, "{scheme}://{bucket}/{prefix}"),
            (_, None) => Ok(()),
        }
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

/// Objects at least this big are uploaded in parts (remote stores).
const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Size of each part (S3 needs at least 5 MiB for all but the last).
const MULTIPART_PART: usize = 8 << 20;

/// Size of each staged write when a file is streamed to a local store. Up
/// to three are in memory per file being written (one filling, two being
/// written), so a smaller part is less memory per file in flight.
const LOCAL_PART: usize = 1 << 20;

/// A piece of an object written as it is produced (see [`Store::put_chunks`]).
#[derive(Debug)]
pub enum Chunk {
    /// The next bytes.
    Data(Bytes),
    /// The object is whole.
    End,
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
    /// The underlying object store, for streaming reads (serving consumers).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Where the store is.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Writes (or overwrites) an object. Large objects go to remote stores as
    /// multipart uploads (parts in parallel, each retried on its own); the object
    /// appears whole only when the upload completes.
    pub async fn put(&self, path: &str, bytes: Bytes) -> object_store::Result<()> {
        let location = ObjectPath::from(path);
        if bytes.len() < MULTIPART_THRESHOLD || self.location.local_root().is_some() {
            return self
                .inner
                .put(&location, PutPayload::from(bytes))
                .await
                .map(|_| ());
        }
        let upload = self.inner.put_multipart(&location).await?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART);
        writer.put(bytes);
        writer.finish().await.map(|_| ())
    }

    /// Writes an object from chunks as they are produced, so it is never
    /// whole in memory. It appears only at [`Chunk::End`]: a producer that
    /// stops without it leaves nothing (the upload is aborted) and an error.
    /// An object that ends within its first part (2 MB locally, the multipart
    /// threshold remotely) goes in one put; a larger one goes in parts: locally
    /// to a staged file renamed into place, remotely two uploading at a time.
    pub async fn put_chunks(
        &self,
        path: &str,
        mut chunks: tokio::sync::mpsc::Receiver<Chunk>,
    ) -> object_store::Result<()> {
        let unfinished = || object_store::Error::Generic {
            store: "oppen",
            source: format!("the writer of {path} stopped before its end").into(),
        };
        let location = ObjectPath::from(path);
        let local = self.location.local_root().is_some();
        let threshold = if local {
            LOCAL_PART
        } else {
            MULTIPART_THRESHOLD
        };
        let mut head = Vec::new();
        let mut held = 0;
        while held < threshold {
            match chunks.recv().await {
                Some(Chunk::Data(bytes)) => {
                    held += bytes.len();
                    head.push(bytes);
                }
                Some(Chunk::End) => {
                    let payload: PutPayload = head.into_iter().collect();
                    return self.inner.put(&location, payload).await.map(|_| ());
                }
                None => return Err(unfinished()),
            }
        }
        let upload = self.inner.put_multipart(&location).await?;
        let part = if local { LOCAL_PART } else { MULTIPART_PART };
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, part);
        for bytes in head {
            writer.put(bytes);
        }
        loop {
            match chunks.recv().await {
                Some(Chunk::Data(bytes)) => {
                    if let Err(e) = writer.wait_for_capacity(2).await {
                        let _ = writer.abort().await;
                        return Err(e);
                    }
                    writer.put(bytes);
                }
                Some(Chunk::End) => return writer.finish().await.map(|_| ()),
                None => {
                    let _ = writer.abort().await;
                    return Err(unfinished());
                }
            }
        }
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

    /// Whether an object exists (a HEAD request).
    pub async fn exists(&self, path: &str) -> object_store::Result<bool> {
        match self.inner.head(&ObjectPath::from(path)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
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

    /// Staging files under `prefix` of a local store: a write stopped by a
    /// crash leaves `<name>#<n>` behind, which listings do not show. Returned
    /// with the name they were to get (for its version) and their own path.
    pub fn staged_leftovers(&self, prefix: &str) -> Vec<(String, PathBuf)> {
        let Some(root) = self.location().local_root() else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut folders = vec![root.join(prefix)];
        while let Some(folder) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    folders.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some((base, n)) = name.rsplit_once('#')
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
                {
                    found.push((base.to_string(), path));
                }
            }
        }
        found
    }

    /// Every object under `prefix`, as paths.
    pub async fn list(&self, prefix: &str) -> object_store::Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(prefix);
        let metas: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]], end: bool) -> tokio::sync::mpsc::Receiver<Chunk> {
        let (tx, rx) = tokio::sync::mpsc::channel(parts.len() + 1);
        for part in parts {
            tx.try_send(Chunk::Data(Bytes::from_static(part))).unwrap();
        }
        if end {
            tx.try_send(Chunk::End).unwrap();
        }
        rx
    }

    /// A file streamed to a local store appears whole at its end, and not at
    /// all when its producer stops early.
    #[tokio::test]
    async fn streamed_files_appear_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreLocation::local(dir.path()).open().unwrap();
        store
            .put_chunks("d/whole.csv", chunks(&[b"a,b\n", b"1,2\n", b"3,4\n"], true))
            .await
            .unwrap();
        assert_eq!(
            store.get("d/whole.csv").await.unwrap().unwrap(),
            Bytes::from_static(b"a,b\n1,2\n3,4\n")
        );
        let cut = store
            .put_chunks("d/cut.csv", chunks(&[b"a,b\n", b"1,2\n"], false))
            .await;
        assert!(cut.is_err());
        assert!(!store.exists("d/cut.csv").await.unwrap());
        // Nothing staged is left behind either.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["whole.csv".to_string()]);
    }

    fn parse(text: &str) -> Result<StoreLocation, String> {
        StoreLocation::parse(text, Path::new("/srv/pipelines"))
    }

    #[test]
    fn parses_every_kind_of_location() {
        assert_eq!(
            parse("file://published").map(|l| l.to_string()),
            Ok("file:///srv/pipelines/published".into())
        );
        assert_eq!(
            parse("file:///data/x/../y").map(|l| l.to_string()),
            Ok("file:///data/y".into())
        );
        assert_eq!(
            parse("s3://bucket/open/data/").map(|l| l.to_string()),
            Ok("s3://bucket/open/data".into())
        );
        assert_eq!(parse("gs://b").map(|l| l.to_string()), Ok("gs://b".into()));
        assert_eq!(
            parse("az://container/p").map(|l| l.to_string()),
            Ok("az://container/p".into())
        );
        assert!(parse("s3:///nobucket").is_err());
        assert!(parse("ftp://x").unwrap_err().contains("not supported"));
        assert!(parse("").is_err());
    }

    #[test]
    fn overlapping_locations() {
        let l = |t: &str| parse(t).unwrap_or_else(|e| panic!("{e}"));
        assert!(l("file://a").overlaps(&l("file://a/state")));
        assert!(!l("file://a").overlaps(&l("file://b")));
        assert!(l("s3://b/pub").overlaps(&l("s3://b/pub/state")));
        assert!(l("s3://b").overlaps(&l("s3://b/state")));
        assert!(!l("s3://b/pub").overlaps(&l("s3://b/public")));
        assert!(!l("s3://b/pub").overlaps(&l("gs://b/pub")));
        assert!(!l("s3://b/pub").overlaps(&l("file://pub")));
        assert!(l("gs://b/pub").overlaps(&l("gs://b/pub/state")));
        assert!(l("az://c").overlaps(&l("az://c/x")));
    }
}
