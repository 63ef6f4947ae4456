//! `oppen run` without --once: exports are picked up as they arrive, and SIGTERM
//! commits what is held and exits 0.
#![allow(clippy::unwrap_used)]

mod support;

use support::{Workspace, wait_until};

#[test]
fn new_exports_are_picked_up_and_sigterm_stops_cleanly() {
    let ws = Workspace::invoices_without_settling();
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
    wait_until("version 1", 60, || ws.versions() == vec![1]);
    ws.drop_export("leverantorsfakturor", "export-2025-02.csv");
    wait_until("version 2", 60, || ws.versions() == vec![1, 2]);
    support::terminate(&mut child);
    let exit = support::wait_exit(&mut child, 30);
    let output = child.wait_with_output().unwrap();
    assert!(
        exit.success(),
        "exit {exit:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("2 versions published"));
    assert_eq!(support::check_whole(&ws.published()), Ok(2));
}
