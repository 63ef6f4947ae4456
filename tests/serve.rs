//! `oppen serve` over a store with the example datasets: the page, the catalog,
//! conditional GET, ranges, gzip, CORS, content types, changes, and no way out
//! of the published paths.
#![allow(clippy::unwrap_used)]

mod support;

use support::http::get;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_published_files_to_consumers() {
    let (_dir, demo, port) = support::http::demo_server().await;
    tokio::task::spawn_blocking(move || {
        // The page lists every dataset with download links and a preview.
        let page = get(port, "/", &[]);
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let html = page.text();
        for title in ["Leverantörsfakturor", "Skolmat", "Badplatser"] {
            assert!(html.contains(title), "{title} missing");
        }
        assert!(html.contains("href=\"/datasets/leverantorsfakturor/latest/2025-01.csv\""));
        assert!(html.contains("<th>verifikationsnummer</th>"), "no preview");

        // A latest file: type, sha256 ETag from the manifest, open CORS.
        let path = "/datasets/leverantorsfakturor/latest/2025-01.csv";
        let file = get(port, path, &[]);
        assert_eq!(file.status, 200);
        assert_eq!(file.header("content-type"), Some("text/csv; charset=utf-8"));
        assert_eq!(file.header("access-control-allow-origin"), Some("*"));
        assert!(file.header("last-modified").is_some());
        let on_disk =
            std::fs::read(demo.join("published/leverantorsfakturor/latest/2025-01.csv")).unwrap();
        assert!(file.body == on_disk);
        let etag = file.header("etag").unwrap().to_string();
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&on_disk))
        };
        assert_eq!(etag, format!("\"{sha}\""));

        // Conditional GET, ranges, gzip.
        assert_eq!(get(port, path, &[("If-None-Match", &etag)]).status, 304);
        assert_eq!(
            get(port, path, &[("If-None-Match", "\"other\"")]).status,
            200
        );
        let part = get(port, path, &[("Range", "bytes=0-9")]);
        assert_eq!(part.status, 206);
        assert_eq!(part.body, on_disk[..10]);
        assert_eq!(
            part.header("content-range"),
            Some(format!("bytes 0-9/{}", on_disk.len()).as_str())
        );
        assert_eq!(get(port, path, &[("Range", "bytes=99999999-")]).status, 416);
        // RFC 9110: an empty suffix names no byte (416 with the size); several
        // ranges and other units may be answered whole (200); the last bytes
        // of a suffix longer than the file are the whole file (206).
        let size = on_disk.len();
        let empty = get(port, path, &[("Range", "bytes=-0")]);
        assert_eq!(empty.status, 416);
        assert_eq!(
            empty.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
        for whole in ["bytes=0-1,5-6", "items=0-5", "bytes=abc", "bytes=9-3"] {
            let answer = get(port, path, &[("Range", whole)]);
            assert_eq!((whole, answer.status), (whole, 200));
            assert_eq!(answer.body, on_disk);
        }
        let tail = get(port, path, &[("Range", "bytes=-99999999")]);
        assert_eq!(tail.status, 206);
        assert_eq!(tail.body, on_disk);
        assert_eq!(
            tail.header("content-range"),
            Some(format!("bytes 0-{}/{size}", size - 1).as_str())
        );
        // A name longer than any a store holds names nothing: 404, not the
        // store's error (clients retry a 502).
        let long = format!(
            "/datasets/leverantorsfakturor/latest/{}.csv",
            "x".repeat(300)
        );
        assert_eq!(get(port, &long, &[]).status, 404);
        // The change feed of a dataset that does not exist, and a format it
        // does not serve, are errors, not an empty feed.
        assert_eq!(
            get(port, "/datasets/no-such-dataset/changes", &[]).status,
            404
        );
        assert_eq!(
            get(
                port,
                "/datasets/leverantorsfakturor/changes?format=xml",
                &[]
            )
            .status,
            400
        );
        let gz = get(port, path, &[("Accept-Encoding", "gzip")]);
        assert_eq!(gz.header("content-encoding"), Some("gzip"));
        assert!(gz.body.len() < on_disk.len());
        let parquet = get(
            port,
            "/datasets/leverantorsfakturor/latest/2025-01.parquet",
            &[],
        );
        assert_eq!(
            parquet.header("content-type"),
            Some("application/vnd.apache.parquet")
        );

        // A kept version's file, by version number.
        let by_version = get(
            port,
            "/datasets/leverantorsfakturor/versions/1/2025-01.csv",
            &[],
        );
        assert_eq!(by_version.status, 200);
        assert!(by_version.body == on_disk);
        assert_eq!(
            get(
                port,
                "/datasets/leverantorsfakturor/versions/1/1999-01.csv",
                &[]
            )
            .status,
            404
        );
        assert_eq!(
            get(
                port,
                "/datasets/leverantorsfakturor/versions/00000000000000000001.json",
                &[]
            )
            .status,
            200
        );

        // The catalog, the manifest and the change list.
        assert_eq!(
            get(port, "/catalog.rdf", &[]).header("content-type"),
            Some("application/rdf+xml")
        );
        assert_eq!(
            get(port, "/datasets/skolmat/manifest.json", &[]).status,
            200
        );
        let changes: serde_json::Value = serde_json::from_slice(
            &get(port, "/datasets/leverantorsfakturor/changes?since=0", &[]).body,
        )
        .unwrap();
        assert_eq!(changes[0]["version"], 1);
        assert_eq!(changes[0]["initial"], true);
        let csv = get(
            port,
            "/datasets/leverantorsfakturor/changes?since=0&format=csv",
            &[],
        )
        .text();
        assert!(
            csv.starts_with("op,verifikationsnummer,"),
            "{}",
            &csv[..80.min(csv.len())]
        );
        assert_eq!(
            get(port, "/datasets/leverantorsfakturor/changes?since=x", &[]).status,
            400
        );

        // Nothing outside the published paths.
        for bad in [
            "/datasets/leverantorsfakturor/../../../etc/passwd",
            "/datasets/..%2F..%2Fetc/passwd",
            "/datasets/leverantorsfakturor/%2e%2e/%2e%2e/state/pseudonym.key",
            "/datasets/leverantorsfakturor/secret.txt",
            "/datasets/nosuch/manifest.json",
            "/state/pseudonym.key",
        ] {
            assert_eq!(get(port, bad, &[]).status, 404, "{bad}");
        }
    })
    .await
    .unwrap();
}

/// Changes that cannot be given whole are an error, never a list or CSV with
/// a gap: a file gone after the version was listed, and versions removed by
/// retention after the one a consumer asks from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_with_a_gap_are_an_error() {
    let (_dir, demo, port) = support::http::demo_server().await;
    tokio::task::spawn_blocking(move || {
        let root = demo.join("published/leverantorsfakturor");
        let csv = "/datasets/leverantorsfakturor/changes?since=0&format=csv";
        assert_eq!(get(port, csv, &[]).status, 200);

        // A change file (here an initial version's data file) gone.
        let first = root.join("versions/00000000000000000001.json");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&first).unwrap()).unwrap();
        let partitions = manifest["partitions"].as_object().unwrap();
        let path = partitions.values().next().unwrap()["files"]["csv"]["path"]
            .as_str()
            .unwrap()
            .to_string();
        let data = root.join(&path);
        let kept = std::fs::read(&data).unwrap();
        std::fs::remove_file(&data).unwrap();
        let gone = get(port, csv, &[]);
        assert_eq!(gone.status, 503);
        assert!(gone.text().contains(&path), "{}", gone.text());
        std::fs::write(&data, kept).unwrap();
        assert_eq!(get(port, csv, &[]).status, 200);

        // Version 1 removed, version 2 kept: from 0 there is a gap.
        std::fs::copy(&first, root.join("versions/00000000000000000002.json")).unwrap();
        std::fs::remove_file(&first).unwrap();
        for since in ["0", "0&format=csv"] {
            let list = get(
                port,
                &format!("/datasets/leverantorsfakturor/changes?since={since}"),
                &[],
            );
            assert_eq!(list.status, 410, "{}", list.text());
            assert!(list.text().contains("no longer kept"), "{}", list.text());
        }
        // From version 1 on, nothing is missing.
        assert_eq!(
            get(port, "/datasets/leverantorsfakturor/changes?since=1", &[]).status,
            200
        );
    })
    .await
    .unwrap();
}

/// A store that fails to answer is not a dataset that is gone: the page and
/// the changes answer 502 (ask again), never a page without the dataset or an
/// empty list of changes. The failure here is a name the store cannot read
/// (not UTF-8) in the listed folders, which fails its listings as a remote
/// store's error would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_are_not_answered_as_missing() {
    use std::os::unix::ffi::OsStrExt;
    let (_dir, demo, port) = support::http::demo_server().await;
    tokio::task::spawn_blocking(move || {
        let published = demo.join("published");
        let changes = "/datasets/leverantorsfakturor/changes?since=0";
        for (folder, path) in [
            (published.clone(), "/"),
            (published.join("leverantorsfakturor/versions"), changes),
        ] {
            assert_eq!(get(port, path, &[]).status, 200, "{path}");
            let bad = folder.join(std::ffi::OsStr::from_bytes(b"bad\xff"));
            std::fs::write(&bad, b"x").unwrap();
            let failed = get(port, path, &[]);
            assert_eq!(failed.status, 502, "{path}: {}", failed.text());
            assert!(
                failed.text().contains("did not answer"),
                "{}",
                failed.text()
            );
            std::fs::remove_file(&bad).unwrap();
            assert_eq!(get(port, path, &[]).status, 200, "{path}");
        }
    })
    .await
    .unwrap();
}
