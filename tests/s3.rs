//! The export-drop scenarios against a real S3-compatible server (moto): the
//! three monthly exports, and two publishers racing for the same version, with
//! conditional puts deciding the winner.
#![allow(clippy::unwrap_used)]

mod support;

use support::Workspace;
use support::moto::Moto;

const EXPORTS: [&str; 3] = [
    "export-2025-01.csv",
    "export-2025-02.csv",
    "export-2025-03.csv",
];

/// A workspace whose store and state are prefixes of a bucket on `moto`.
fn on_s3(moto: &Moto, bucket: &str) -> Workspace {
    on_s3_via(moto, &moto.endpoint, bucket)
}

/// The same, reaching moto at `endpoint` (a proxy, say).
fn on_s3_via(moto: &Moto, endpoint: &str, bucket: &str) -> Workspace {
    moto.create_bucket(bucket);
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    let text = std::fs::read_to_string(&ws.pipeline)
        .unwrap()
        .replace("store: file://published", &format!("store: s3://{bucket}/published"))
        .replace(
            "state: file://state",
            &format!("state: s3://{bucket}/state\n  s3: {{ endpoint: \"{endpoint}\", path_style: true, allow_http: true }}"),
        );
    std::fs::write(&ws.pipeline, text).unwrap();
    for f in EXPORTS {
        ws.drop_export("leverantorsfakturor", f);
    }
    ws
}

fn run(ws: &Workspace, moto: &Moto, failpoint: Option<&str>) -> std::process::Child {
    ws.spawn_racer(failpoint, &moto.env())
}

/// The version manifests in a bucket, read from moto directly.
async fn versions_in(moto: &Moto, bucket: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let s3 = moto.client(bucket);
    let prefix = object_store::path::Path::from("published/leverantorsfakturor/versions");
    let listed: Vec<_> = s3.list(Some(&prefix)).try_collect().await.unwrap();
    listed.into_iter().map(|m| m.location.to_string()).collect()
}

/// Versions in the bucket: (version, inserts, updates, deletes, rows), each checked
/// whole (every file it names exists with its size).
async fn history(moto: &Moto, bucket: &str) -> Vec<(u64, u64, u64, u64, u64)> {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let s3 = moto.client(bucket);
    let get = |path: String| {
        let s3 = &s3;
        async move {
            s3.get(&object_store::path::Path::from(path))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    };
    let prefix = object_store::path::Path::from("published/leverantorsfakturor/versions");
    let listed: Vec<_> = s3.list(Some(&prefix)).try_collect().await.unwrap();
    let mut versions: Vec<u64> = listed
        .iter()
        .filter_map(|m| oppen::publish::manifest::parse_version_path(m.location.as_ref()))
        .collect();
    versions.sort_unstable();
    let mut out = Vec::new();
    for v in versions {
        let bytes = get(format!(
            "published/leverantorsfakturor/versions/{v:020}.json"
        ))
        .await;
        let manifest: oppen::publish::manifest::VersionManifest =
            serde_json::from_slice(&bytes).unwrap();
        let m = manifest.version();
        for f in m.files() {
            let bytes = get(format!("published/leverantorsfakturor/{}", f.path)).await;
            assert_eq!(bytes.len() as u64, f.bytes, "{}", f.path);
        }
        out.push((
            v,
            m.changes.inserts,
            m.changes.updates,
            m.changes.deletes,
            m.rows,
        ));
    }
    assert!(
        !get("published/catalog.rdf".into()).await.is_empty(),
        "no catalog in the bucket"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_exports_publish_to_s3() {
    let moto = Moto::start();
    let ws = on_s3(&moto, "exports");
    let out = run(&ws, &moto, None).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = history(&moto, "exports").await;
    assert_eq!(h.iter().map(|v| v.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(h[2].4, 2657);
    // Nothing was written locally.
    assert!(!ws.dir.path().join("published").exists());
    assert!(!ws.dir.path().join("state").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_publishers_on_s3_publish_each_change_once() {
    let moto = Moto::start();
    let ws = on_s3(&moto, "race");
    support::race(|failpoint| run(&ws, &moto, failpoint));
    let h = history(&moto, "race").await;
    assert_eq!(h.iter().map(|v| v.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(h[2].4, 2657);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_going_away_mid_version_loses_nothing() {
    use std::io::BufRead;
    let moto = Moto::start();
    let proxy = support::moto::Proxy::start(moto.port());
    let ws = on_s3_via(&moto, &proxy.endpoint, "outage");
    // Every commit pauses just before its version manifest; during the first
    // pause the server goes away for three seconds.
    let mut child = run(&ws, &moto, Some("before-version-manifest=sleep:1000"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("failpoint before-version-manifest") {
                let _ = tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the first commit never reached its manifest");
    proxy.down();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // While it is away, no version is visible: the partial one has no manifest.
    assert!(versions_in(&moto, "outage").await.is_empty());
    proxy.up();
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "{log}");
    let h = history(&moto, "outage").await;
    assert_eq!(
        h.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{log}"
    );
    assert_eq!(h[2].4, 2657);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_go_up_in_parts() {
    let moto = Moto::start();
    moto.create_bucket("big");
    // moto takes unsigned requests, so the in-process store needs no credentials.
    let options = oppen::store::S3Options {
        endpoint: Some(moto.endpoint.clone()),
        region: Some("us-east-1".into()),
        path_style: Some(true),
        allow_http: Some(true),
        anonymous: Some(true),
    };
    let store =
        oppen::store::StoreLocation::parse_with("s3://big/p", std::path::Path::new("."), &options)
            .unwrap()
            .open()
            .unwrap();
    let data: Vec<u8> = (0..40u32 << 20).map(|i| (i % 251) as u8).collect();
    store
        .put("large.bin", bytes::Bytes::from(data.clone()))
        .await
        .unwrap();
    use object_store::ObjectStoreExt;
    let s3 = moto.client("big");
    let read_back = |name: &str| {
        let s3 = s3.clone();
        let path = object_store::path::Path::from(format!("p/{name}"));
        async move { s3.get(&path).await.unwrap().bytes().await.unwrap() }
    };
    let back = read_back("large.bin").await;
    assert!(
        back.as_ref() == data.as_slice(),
        "the uploaded parts do not add up to the file"
    );

    // The same bytes produced chunk by chunk (as CSV files are written): in
    // parts once past the threshold, in one put below it, and nothing at all
    // when the producer stops before the end.
    use oppen::store::Chunk;
    let streamed = |bytes: &[u8], end: bool| {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let chunks: Vec<bytes::Bytes> = bytes
            .chunks(1 << 20)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        tokio::spawn(async move {
            for chunk in chunks {
                tx.send(Chunk::Data(chunk)).await.unwrap();
            }
            if end {
                tx.send(Chunk::End).await.unwrap();
            }
        });
        rx
    };
    for (name, len) in [
        ("streamed-large.bin", data.len()),
        ("streamed-small.bin", 3 << 20),
    ] {
        store
            .put_chunks(name, streamed(&data[..len], true))
            .await
            .unwrap();
        let back = read_back(name).await;
        assert!(
            back.as_ref() == &data[..len],
            "{name} differs from what was sent"
        );
    }
    for (name, len) in [("cut-large.bin", data.len()), ("cut-small.bin", 3 << 20)] {
        let result = store.put_chunks(name, streamed(&data[..len], false)).await;
        assert!(
            result.is_err(),
            "{name}: a stream without its end was accepted"
        );
        assert!(
            !store.exists(name).await.unwrap(),
            "{name}: a stream without its end left an object"
        );
    }
}
