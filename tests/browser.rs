//! The consumer page in a real browser (headless Chromium from Debian's
//! `chromium` package, which scripts/test installs): the list renders, and a
//! download link from the rendered page returns the file.
#![allow(clippy::unwrap_used)]

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dataset_page_renders_in_chromium_and_its_links_download() {
    let (_dir, demo, port) = support::http::demo_server().await;
    let dom = tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--user-data-dir={}", profile.path().display()),
                "--dump-dom",
                &format!("http://127.0.0.1:{port}/"),
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run chromium ({e}): install it with `apt-get install chromium` (scripts/test does this)"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    })
    .await
    .unwrap();
    // The rendered list: every dataset, with its download links and preview.
    for title in [
        "<h2>Leverantörsfakturor</h2>",
        "<h2>Skolmat</h2>",
        "<h2>Badplatser</h2>",
    ] {
        assert!(dom.contains(title), "{title} not rendered");
    }
    assert!(dom.contains("<th>verifikationsnummer</th>"));
    // A download link taken from the rendered page returns the file.
    let start = dom.find("href=\"/datasets/badplatser/latest/").unwrap() + "href=\"".len();
    let href = &dom[start..start + dom[start..].find('"').unwrap()];
    let href = href.to_string();
    let reply = tokio::task::spawn_blocking(move || support::http::get(port, &href, &[]))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let name = reply.header("content-type").unwrap().to_string();
    let on_disk = std::fs::read(demo.join("published/badplatser/latest/badplatser.csv")).unwrap();
    if name.starts_with("text/csv") {
        assert!(reply.body == on_disk);
    } else {
        assert_eq!(name, "application/vnd.apache.parquet");
        assert!(reply.body.starts_with(b"PAR1"));
    }
}
