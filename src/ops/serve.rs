//! `oppen serve`: an HTTP server for consumers over any store — a page listing
//! the datasets, the catalog, and every published file with conditional GET,
//! ranges, gzip and open CORS. Only published paths are served: nothing else in
//! the store, and never a path outside it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{Any, CorsLayer};

use crate::config::OutputFormat;
use crate::publish::catalog::DatasetMeta;
use crate::store::Store;

/// What a dataset folder may serve, by first path segment.
const PUBLIC: [&str; 7] = [
    "manifest.json",
    "datapackage.json",
    "dataset.json",
    "latest",
    "versions",
    "data",
    "changes",
];

/// The consumer-facing routes over a store.
pub fn router(store: Store) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([axum::http::Method::GET, axum::http::Method::HEAD]);
    Router::new()
        .route("/", get(index))
        .route("/catalog.rdf", get(|s: State<Store>, h: HeaderMap| async move { object(&s, "catalog.rdf", &h).await }))
        .route("/catalog.jsonld", get(|s: State<Store>, h: HeaderMap| async move { object(&s, "catalog.jsonld", &h).await }))
        .route("/datasets/{id}/changes", get(changes))
        .route("/datasets/{id}/{*path}", get(dataset_file))
        .layer(CompressionLayer::new())
        .layer(cors)
        .with_state(store)
}

/// Serves until the process is stopped.
pub async fn serve(store: Store, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, store = %store.location(), "serving published datasets");
    axum::serve(listener, router(store)).await
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// The store failed to answer (not: it has no such thing). A consumer must
/// not take this for a dataset or file that is gone: 502, ask again later.
fn store_failed(what: &str, error: &dyn std::fmt::Display) -> Response {
    tracing::warn!(what, error = %error, "serving failed");
    (StatusCode::BAD_GATEWAY, "the store did not answer\n").into_response()
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("csv") => "text/csv; charset=utf-8",
        Some("parquet") => "application/vnd.apache.parquet",
        Some("json") => "application/json",
        Some("jsonld") => "application/ld+json",
        Some("rdf") => "application/rdf+xml",
        _ => "application/octet-stream",
    }
}

/// Longest file or folder name a store holds (the limit of local file systems):
/// a longer segment names nothing, and asking a store for it is an error of the
/// store's own, not an answer.
const MAX_SEGMENT_BYTES: usize = 255;

/// A dataset id or path segment that can only name something inside the store.
fn safe(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && !segment.contains(['\\', '\0'])
        && segment.len() <= MAX_SEGMENT_BYTES
}

async fn dataset_file(
    State(store): State<Store>,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let segments: Vec<&str> = path.split('/').collect();
    if !safe(&id) || segments.iter().any(|s| !safe(s)) || !PUBLIC.contains(&segments[0]) {
        return not_found();
    }
    // `versions/<v>/<partition>.<ext>`: a file of a kept version, by its number.
    if let ["versions", v, file] = segments.as_slice()
        && let Ok(v) = v.parse::<u64>()
    {
        let Some((partition, extension)) = file.rsplit_once('.') else {
            return not_found();
        };
        let version = match crate::publish::read_version(&store, &id, v).await {
            Ok(version) => version,
            Err(e @ crate::publish::PublishError::Store { .. }) => {
                return store_failed(&format!("{id}/versions/{v}"), &e);
            }
            // No such version (or none that can be read): nothing to serve.
            Err(_) => return not_found(),
        };
        let found = version
            .partitions
            .get(partition)
            .and_then(|p| p.files.iter().find(|(f, _)| f.extension() == extension))
            .map(|(_, r)| r.path.clone());
        return match found {
            Some(path) => object(&store, &format!("{id}/{path}"), &headers).await,
            None => not_found(),
        };
    }
    object(&store, &format!("{id}/{path}"), &headers).await
}

/// How long a dataset's manifest is reused for ETags. A commit shows in ETags
/// within this time; in exchange a conditional GET costs one stat, not a read
/// and parse of the manifest.
const MANIFEST_TTL: std::time::Duration = std::time::Duration::from_secs(1);

type Cached = (
    std::time::Instant,
    Option<std::sync::Arc<crate::publish::manifest::Version>>,
);

fn manifest_cache() -> &'static std::sync::Mutex<HashMap<String, Cached>> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Cached>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The newest manifest of a dataset, from the cache while fresh.
async fn manifest(
    store: &Store,
    dataset: &str,
) -> Option<std::sync::Arc<crate::publish::manifest::Version>> {
    let key = format!("{}/{dataset}", store.location());
    if let Ok(cache) = manifest_cache().lock()
        && let Some((at, version)) = cache.get(&key)
        && at.elapsed() < MANIFEST_TTL
    {
        return version.clone();
    }
    let version = crate::publish::read_pointer(store, dataset)
        .await
        .ok()
        .flatten()
        .map(std::sync::Arc::new);
    if let Ok(mut cache) = manifest_cache().lock() {
        cache.insert(key, (std::time::Instant::now(), version.clone()));
    }
    version
}

/// The sha256 the newest manifest records for a published file, as an ETag.
async fn known_sha256(store: &Store, path: &str) -> Option<String> {
    let (dataset, rest) = path.split_once('/')?;
    let version = manifest(store, dataset).await?;
    if let Some(latest) = rest.strip_prefix("latest/") {
        let (partition, extension) = latest.rsplit_once('.')?;
        let files = version.partitions.get(partition)?;
        return files
            .files
            .iter()
            .find(|(f, _)| f.extension() == extension)
            .map(|(_, r)| r.sha256.clone());
    }
    version
        .files()
        .find(|f| f.path == rest)
        .map(|f| f.sha256.clone())
}

/// An object's size and time. On a local disk this is one `stat`, done right
/// here: handing it to a blocking thread (as the store API does) costs more than
/// the call, and conditional GETs are mostly this.
async fn head(
    store: &Store,
    location: &object_store::path::Path,
) -> object_store::Result<object_store::ObjectMeta> {
    let Some(root) = store.location().local_root() else {
        return store.object_store().head(location).await;
    };
    let file = root.join(location.as_ref());
    match std::fs::metadata(&file) {
        Ok(m) if m.is_file() => Ok(object_store::ObjectMeta {
            location: location.clone(),
            last_modified: m
                .modified()
                .map(chrono::DateTime::<chrono::Utc>::from)
                .unwrap_or_default(),
            size: m.len(),
            e_tag: None,
            version: None,
        }),
        Ok(_) => Err(object_store::Error::NotFound {
            path: location.to_string(),
            source: "not a file".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(object_store::Error::NotFound {
            path: location.to_string(),
            source: Box::new(e),
        }),
        Err(e) => Err(object_store::Error::Generic {
            store: "local",
            source: Box::new(e),
        }),
    }
}

/// What a `Range` header asks of an object of `size` bytes (RFC 9110,
/// section 14).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ranged {
    /// The whole object, 200: no range, a unit other than `bytes`, several
    /// ranges (a server may answer those whole), or a range that does not
    /// parse.
    Whole,
    /// These bytes, 206.
    Part(std::ops::Range<u64>),
    /// No byte of the object is in the range, 416.
    Unsatisfiable,
}

/// Resolves a `Range` header against an object of `size` bytes.
fn resolve_range(value: Option<&str>, size: u64) -> Ranged {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let number = |text: &str| {
        let text = text.trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse::<u64>().ok()
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // `-N`: the last N bytes; none asked, or none there, is unsatisfiable.
        return match number(last).map(|n| n.min(size)) {
            None => Ranged::Whole,
            Some(0) => Ranged::Unsatisfiable,
            Some(n) => Ranged::Part(size - n..size),
        };
    }
    let Some(start) = number(first) else {
        return Ranged::Whole;
    };
    let end = if last.is_empty() {
        size
    } else {
        match number(last) {
            Some(last) if last >= start => last.saturating_add(1).min(size),
            _ => return Ranged::Whole,
        }
    };
    // `N-` and `N-M`: from N to M or the end; N at or past the end is
    // unsatisfiable.
    if start >= size {
        Ranged::Unsatisfiable
    } else {
        Ranged::Part(start..end)
    }
}

/// Serves one object: ETag (sha256 where a manifest knows it), Last-Modified,
/// If-None-Match → 304, Range → 206, streamed without loading it into memory.
async fn object(store: &Store, path: &str, headers: &HeaderMap) -> Response {
    let inner = store.object_store();
    let location = object_store::path::Path::from(path);
    let meta = match head(store, &location).await {
        Ok(meta) => meta,
        Err(object_store::Error::NotFound { .. }) => return not_found(),
        Err(e) => return store_failed(path, &e),
    };
    let etag = match known_sha256(store, path).await {
        Some(sha) => format!("\"{sha}\""),
        None => format!(
            "\"{}\"",
            meta.e_tag
                .clone()
                .unwrap_or_else(|| meta.last_modified.timestamp_micros().to_string())
        ),
    };
    let last_modified = meta
        .last_modified
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let mut response_headers = HeaderMap::new();
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set(&mut response_headers, header::ETAG, &etag);
    set(&mut response_headers, header::LAST_MODIFIED, &last_modified);
    set(
        &mut response_headers,
        header::CONTENT_TYPE,
        content_type(path),
    );
    set(&mut response_headers, header::ACCEPT_RANGES, "bytes");
    set(&mut response_headers, header::CACHE_CONTROL, "no-cache");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return (StatusCode::NOT_MODIFIED, response_headers).into_response();
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, range) = match resolve_range(range, meta.size) {
        Ranged::Whole => (StatusCode::OK, None),
        Ranged::Part(bytes) => (StatusCode::PARTIAL_CONTENT, Some(GetRange::Bounded(bytes))),
        Ranged::Unsatisfiable => {
            set(
                &mut response_headers,
                header::CONTENT_RANGE,
                &format!("bytes */{}", meta.size),
            );
            return (StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response();
        }
    };
    let options = GetOptions {
        range,
        ..Default::default()
    };
    match inner.get_opts(&location, options).await {
        Ok(result) => {
            let served = result.range.clone();
            if status == StatusCode::PARTIAL_CONTENT {
                let content_range = format!(
                    "bytes {}-{}/{}",
                    served.start,
                    served.end.saturating_sub(1),
                    meta.size
                );
                set(&mut response_headers, header::CONTENT_RANGE, &content_range);
            }
            set(
                &mut response_headers,
                header::CONTENT_LENGTH,
                &(served.end - served.start).to_string(),
            );
            (
                status,
                response_headers,
                Body::from_stream(result.into_stream()),
            )
                .into_response()
        }
        Err(object_store::Error::NotFound { .. }) => not_found(),
        Err(_) if status == StatusCode::PARTIAL_CONTENT => {
            set(
                &mut response_headers,
                header::CONTENT_RANGE,
                &format!("bytes */{}", meta.size),
            );
            (StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response()
        }
        Err(e) => store_failed(path, &e),
    }
}

/// A data file whose rows are all inserts (an initial version's, an inserted
/// part's) for the `changes` CSV: read as CSV and written again with `insert`
/// before each record (a field may hold a line break, so lines are not
/// records); `header` writes its header row first, with `op` before it.
fn as_inserts(csv_bytes: &[u8], header: bool, out: &mut Vec<u8>) -> csv::Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(csv_bytes);
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(out);
    let mut record = csv::ByteRecord::new();
    let mut first = true;
    while reader.read_byte_record(&mut record)? {
        if std::mem::take(&mut first) {
            if header {
                writer.write_record(std::iter::once(&b"op"[..]).chain(record.iter()))?;
            }
            continue;
        }
        writer.write_record(std::iter::once(&b"insert"[..]).chain(record.iter()))?;
    }
    writer.flush()?;
    Ok(())
}

/// The changes cannot be given whole (a version removed or a file gone
/// while they were read, a store error): an error, never a list or CSV with
/// a gap that a consumer would take for every change.
fn incomplete(what: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what}; the changes cannot be given whole, ask again\n"),
    )
        .into_response()
}

/// `changes?since=v`: the change files after version v, as a JSON list, or with
/// `format=csv` concatenated into one CSV (one header). A version's inserted
/// parts (and an initial version's data files) are listed and concatenated
/// with its change files.
async fn changes(
    State(store): State<Store>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !safe(&id) {
        return not_found();
    }
    let csv = match query.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("format {other:?} is not served here; ask for format=json or format=csv\n"),
            )
                .into_response();
        }
    };
    let since: u64 = match query.get("since").map(|s| s.parse()) {
        None => 0,
        Some(Ok(v)) => v,
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "since must be a version number\n").into_response();
        }
    };
    // A dataset without versions lists nothing; a listing that fails is the
    // store's failure, not an empty dataset.
    let listed = match store.list(&format!("{id}/versions")).await {
        Ok(listed) => listed,
        Err(e) => return store_failed(&format!("{id}/versions"), &e),
    };
    // Retention keeps at least one version of a dataset: none is no dataset.
    if !listed
        .iter()
        .any(|p| crate::publish::manifest::parse_version_path(p).is_some())
    {
        return not_found();
    }
    let mut versions: Vec<u64> = listed
        .iter()
        .filter_map(|p| crate::publish::manifest::parse_version_path(p))
        .filter(|v| *v > since)
        .collect();
    versions.sort_unstable();
    // Versions older than `keep_versions` are removed: a consumer behind them
    // must start again from the latest files, not get the changes with a
    // gap in them.
    if let Some(&first) = versions.first()
        && first != since + 1
    {
        return (
            StatusCode::GONE,
            format!(
                "the versions after {since} up to {} are no longer kept; fetch the latest files \
                 (latest/; manifest.json names their version) and follow the changes since that \
                 version\n",
                first - 1
            ),
        )
            .into_response();
    }
    let mut entries = Vec::new();
    for v in versions {
        match crate::publish::read_version(&store, &id, v).await {
            Ok(version) => entries.push(version),
            Err(e) => return incomplete(&format!("version {v} cannot be read ({e})")),
        }
    }
    if csv {
        let mut out: Vec<u8> = Vec::new();
        for version in &entries {
            // Change files carry their `op` column; an initial version's data
            // files, and a later version's inserted parts, are inserts.
            for (file, inserts) in version.change_files(OutputFormat::Csv) {
                let path = &file.path;
                let bytes = match store.get(&format!("{id}/{path}")).await {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => return incomplete(&format!("{path} is gone")),
                    Err(e) => return incomplete(&format!("{path} cannot be read ({e})")),
                };
                let header = out.is_empty();
                if inserts {
                    if as_inserts(&bytes, header, &mut out).is_err() {
                        return (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("{path} is not valid CSV\n"),
                        )
                            .into_response();
                    }
                } else {
                    let body = match memchr::memchr(b'\n', &bytes) {
                        Some(end) if !header => &bytes[end + 1..],
                        Some(_) => &bytes[..],
                        None => &[][..],
                    };
                    out.extend_from_slice(body);
                }
            }
        }
        return ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response();
    }
    let list: Vec<serde_json::Value> = entries
        .iter()
        .map(|v| {
            let files: serde_json::Map<String, serde_json::Value> = v
                .changes
                .files
                .iter()
                .map(|(f, r)| {
                    (
                        f.extension().to_string(),
                        format!("/datasets/{id}/{}", r.path).into(),
                    )
                })
                .collect();
            // The inserted parts' files, by format (see `Version::change_files`;
            // an initial version says `initial` instead).
            let mut inserted: BTreeMap<String, Vec<String>> = BTreeMap::new();
            if !v.changes.initial {
                for format in [OutputFormat::Parquet, OutputFormat::Csv] {
                    for (r, _) in v.change_files(format).into_iter().filter(|(_, i)| *i) {
                        inserted
                            .entry(format.extension().to_string())
                            .or_default()
                            .push(format!("/datasets/{id}/{}", r.path));
                    }
                }
            }
            serde_json::json!({
                "version": v.version,
                "created": v.created,
                "inserts": v.changes.inserts,
                "updates": v.changes.updates,
                "deletes": v.changes.deletes,
                "initial": v.changes.initial,
                "files": files,
                "inserted": inserted,
            })
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&list).unwrap_or_default(),
    )
        .into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The first rows of a dataset's first CSV, as an HTML table.
async fn preview(store: &Store, meta: &DatasetMeta) -> String {
    let Some(path) = meta
        .files
        .values()
        .find_map(|f| f.get(&OutputFormat::Csv))
        .map(|(p, _)| p.clone())
    else {
        return String::new();
    };
    let location = object_store::path::Path::from(format!("{}/{path}", meta.id));
    let options = GetOptions {
        range: Some(GetRange::Bounded(0..16 * 1024)),
        ..Default::default()
    };
    let Ok(result) = store.object_store().get_opts(&location, options).await else {
        return String::new();
    };
    let Ok(bytes) = result.bytes().await else {
        return String::new();
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(bytes.as_ref());
    let mut html = String::from("<div class=\"scroll\"><table><tr>");
    for h in reader.headers().cloned().unwrap_or_default().iter() {
        let _ = write!(html, "<th>{}</th>", escape(h));
    }
    html.push_str("</tr>");
    for record in reader.records().take(5).filter_map(Result::ok) {
        html.push_str("<tr>");
        for field in record.iter() {
            let _ = write!(html, "<td>{}</td>", escape(field));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></div>");
    html
}

async fn index(State(store): State<Store>) -> Response {
    // A store that fails gives an error, not a page that lists fewer
    // datasets (or none) as if they were gone.
    let dirs = match store.list_dirs().await {
        Ok(dirs) => dirs,
        Err(e) => return store_failed("the datasets", &e),
    };
    let mut datasets = Vec::new();
    for dir in dirs {
        let path = format!("{dir}/dataset.json");
        match store.get(&path).await {
            Ok(Some(bytes)) => {
                if let Ok(meta) = serde_json::from_slice::<DatasetMeta>(&bytes) {
                    datasets.push(meta);
                }
            }
            // A folder that holds no dataset.
            Ok(None) => {}
            Err(e) => return store_failed(&path, &e),
        }
    }
    datasets.sort_by(|a, b| a.title.cmp(&b.title));
    let mut html = String::from(
        "<!doctype html><html lang=\"sv\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Öppna data</title><style>\
         body{font-family:system-ui,sans-serif;margin:1rem auto;max-width:60rem;padding:0 1rem;line-height:1.4}\
         article{border-top:1px solid #ccc;padding:.5rem 0 1rem}.meta{color:#555;font-size:.9rem}\
         .scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.8rem}td,th{border:1px solid #ddd;padding:.2rem .4rem;white-space:nowrap}\
         a{margin-right:.6rem}</style></head><body><h1>Öppna data</h1>\
         <p><a href=\"/catalog.rdf\">DCAT-katalog (RDF/XML)</a><a href=\"/catalog.jsonld\">JSON-LD</a></p>",
    );
    if datasets.is_empty() {
        html.push_str("<p>Inga datamängder är publicerade ännu.</p>");
    }
    for d in &datasets {
        let updated = d
            .modified
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        let _ = write!(
            html,
            "<article id=\"{id}\"><h2>{title}</h2><p>{description}</p>\
             <p class=\"meta\">Licens: {license} · Uppdaterad: {updated} · {rows} rader</p><p>",
            id = escape(&d.id),
            title = escape(&d.title),
            description = escape(&d.description),
            license = escape(&d.license),
            rows = d.rows,
        );
        for (partition, files) in &d.files {
            for format in files.keys() {
                let _ = write!(
                    html,
                    "<a href=\"/datasets/{id}/latest/{p}.{ext}\">{p}.{ext}</a>",
                    id = escape(&d.id),
                    p = escape(partition),
                    ext = format.extension()
                );
            }
        }
        let _ = write!(
            html,
            "</p><p class=\"meta\"><a href=\"/datasets/{id}/manifest.json\">manifest</a>\
             <a href=\"/datasets/{id}/datapackage.json\">datapackage.json</a>\
             <a href=\"/datasets/{id}/changes\">ändringar</a></p>{preview}</article>",
            id = escape(&d.id),
            preview = preview(&store, d).await
        );
    }
    html.push_str("</body></html>");
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{Ranged, resolve_range};

    #[test]
    fn ranges_resolve_as_rfc_9110_says() {
        let r = |v: &str, size| resolve_range(Some(v), size);
        assert_eq!(resolve_range(None, 10), Ranged::Whole);
        assert_eq!(r("bytes=0-9", 63), Ranged::Part(0..10));
        assert_eq!(r("bytes=60-99", 63), Ranged::Part(60..63));
        assert_eq!(r("bytes=10-", 63), Ranged::Part(10..63));
        assert_eq!(r("bytes=-5", 63), Ranged::Part(58..63));
        assert_eq!(r("bytes=-500", 63), Ranged::Part(0..63));
        assert_eq!(r("bytes=-0", 63), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=63-", 63), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Ranged::Unsatisfiable);
        assert_eq!(r("bytes=-5", 0), Ranged::Unsatisfiable);
        for whole in [
            "bytes=0-1,4-5",
            "items=0-5",
            "bytes=x-",
            "bytes=5-2",
            "bytes=5",
            "bytes=+1-2",
        ] {
            assert_eq!(r(whole, 63), Ranged::Whole, "{whole}");
        }
    }

    proptest! {
        /// Whatever a client sends, a part served lies inside the object and
        /// is not empty, and a range that starts inside the object is served.
        #[test]
        fn a_part_is_always_inside_the_object(
            size in 0u64..10_000,
            first in proptest::option::of(0u64..12_000),
            last in proptest::option::of(0u64..12_000),
            noise in "[ -~]{0,6}",
        ) {
            let spec = format!(
                "bytes={}-{}",
                first.map(|f| f.to_string()).unwrap_or_default(),
                last.map(|l| l.to_string()).unwrap_or_default(),
            );
            for value in [spec.clone(), format!("{spec}{noise}"), noise] {
                if let Ranged::Part(bytes) = resolve_range(Some(&value), size) {
                    prop_assert!(bytes.start < bytes.end && bytes.end <= size, "{value}: {bytes:?}");
                }
            }
            if let (Some(f), last) = (first, last)
                && f < size
                && last.is_none_or(|l| l >= f)
            {
                prop_assert!(matches!(resolve_range(Some(&spec), size), Ranged::Part(_)), "{spec}");
            }
        }
    }

    #[test]
    fn inserts_are_records_not_lines() {
        let data = b"id,note\n1,plain\n2,\"two\nlines, and \"\"quotes\"\"\"\n";
        let mut out = Vec::new();
        super::as_inserts(data, true, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "op,id,note\ninsert,1,plain\ninsert,2,\"two\nlines, and \"\"quotes\"\"\"\n"
        );
        // Without the header, after another file's rows.
        let mut out = b"op,id,note\n".to_vec();
        super::as_inserts(b"id,note\n3,x\n", false, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "op,id,note\ninsert,3,x\n");
    }
}
