//! `oppen serve` over a store with the example datasets: the page, the catalog,
//! conditional GET, ranges, gzip, CORS, content types, changes, and no way out
//! of the published paths.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// A plain HTTP/1.1 GET (no client library: the request is exactly what is sent).
fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_published_files_to_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oppen"))
        .args(["demo", "--once", "--dir", demo.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = oppen::publish::store::StoreLocation::local(demo.join("published"))
        .open()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, oppen::ops::serve::router(store)).await });

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
