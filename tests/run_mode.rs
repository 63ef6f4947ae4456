//! `oppen run` without --once: exports are picked up as they arrive, and SIGTERM
//! commits what is held and exits 0.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::Workspace;

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn new_exports_are_picked_up_and_sigterm_stops_cleanly() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    let text = std::fs::read_to_string(&ws.pipeline).unwrap().replace(
        "key: [verifikationsnummer]",
        "key: [verifikationsnummer]\n    settle_seconds: 0",
    );
    std::fs::write(&ws.pipeline, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_oppen"))
        .args(["run", "leverantorsfakturor.yaml"])
        .env("OPPEN_METRICS_ADDR", "off")
        .current_dir(ws.dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ws.drop_export("leverantorsfakturor", "export-2025-01.csv");
    wait_for("version 1", || ws.versions() == vec![1]);
    ws.drop_export("leverantorsfakturor", "export-2025-02.csv");
    wait_for("version 2", || ws.versions() == vec![1, 2]);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "oppen did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    assert!(
        exit.success(),
        "exit {exit:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("2 versions published"));
    assert_eq!(support::check_whole(&ws.published()), Ok(2));
}
