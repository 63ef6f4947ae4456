//! Crash recovery: a publisher killed between writing data files and creating the
//! version manifest (and just after creating it), then restarted, publishes every
//! change exactly once, and a reader never sees a partial version.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use support::Workspace;

const EXPORTS: [&str; 3] = [
    "export-2025-01.csv",
    "export-2025-02.csv",
    "export-2025-03.csv",
];

/// Polls the store while a test runs and records the first partial version seen.
struct Reader {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(usize, Option<String>)>,
}

impl Reader {
    fn start(published: std::path::PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut checks = 0;
            while !flag.load(Ordering::Relaxed) {
                if let Err(e) = support::check_whole(&published) {
                    return (checks, Some(e));
                }
                checks += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            (checks, None)
        });
        Self { stop, handle }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (checks, problem) = self.handle.join().unwrap();
        assert_eq!(problem, None, "a reader saw a partial version");
        checks
    }
}

/// (version, inserts, updates, deletes, rows) of every version.
type History = Vec<(u64, u64, u64, u64, u64)>;

fn history(ws: &Workspace) -> History {
    ws.versions()
        .into_iter()
        .map(|v| {
            let m = ws.version(v);
            (
                v,
                m.changes.inserts,
                m.changes.updates,
                m.changes.deletes,
                m.rows,
            )
        })
        .collect()
}

fn clean_history() -> (History, Vec<u8>) {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    for f in EXPORTS {
        ws.drop_export("leverantorsfakturor", f);
    }
    let out = ws.oppen(&["run", "--once", "leverantorsfakturor.yaml"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        history(&ws),
        std::fs::read(ws.published().join("latest/2025-03.csv")).unwrap(),
    )
}

fn crash_and_recover(failpoint: &str) {
    let (expected, expected_latest) = clean_history();
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    // Same pseudonym key as nothing else matters for published content.
    for f in EXPORTS {
        ws.drop_export("leverantorsfakturor", f);
    }
    let reader = Reader::start(ws.published());
    let mut crashes = 0;
    // Each run crashes at its first commit; with the failpoint off, the rest goes through.
    for _ in 0..3 {
        let out = ws.oppen(
            &["run", "--once", "leverantorsfakturor.yaml"],
            &[("OPPEN_FAILPOINT", failpoint)],
        );
        assert!(!out.status.success(), "the failpoint did not fire");
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint {failpoint}")));
        crashes += 1;
        assert!(support::check_whole(&ws.published()).is_ok());
    }
    let out = ws.oppen(&["run", "--once", "leverantorsfakturor.yaml"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reader.finish() > 0);
    assert_eq!(crashes, 3);
    // Exactly the versions and changes of a run that never crashed.
    assert_eq!(history(&ws), expected);
    let latest = std::fs::read(ws.published().join("latest/2025-03.csv")).unwrap();
    assert!(
        latest == expected_latest,
        "latest/2025-03.csv differs from a run without crashes"
    );
    // The pointer names the newest version, and no file is left unreferenced.
    let pointer = support::read_manifest(&ws.published().join("manifest.json")).unwrap();
    assert_eq!(pointer.version, 3);
    ws.assert_only_referenced_files();
}

#[test]
fn killed_before_the_version_manifest() {
    crash_and_recover("before-version-manifest");
}

#[test]
fn killed_after_the_version_manifest() {
    crash_and_recover("after-version-manifest");
}

#[test]
fn two_publishers_racing_for_a_version_publish_each_change_once() {
    let (expected, _) = clean_history();
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    for f in EXPORTS {
        ws.drop_export("leverantorsfakturor", f);
    }
    let oppen = |failpoint: Option<&str>| ws.spawn_racer(failpoint, &[]);
    // The slow publisher stops just before creating version 1; the other commits
    // all three versions meanwhile.
    support::race(oppen);
    // Each change once: the history of a single publisher.
    assert_eq!(history(&ws), expected);
    assert!(support::check_whole(&ws.published()).is_ok());
}

/// A first version written while its export is read cannot be put on top of
/// another publisher's version. When another publisher commits first with less
/// (an older export, read from another folder), the streamed one reads its
/// source again from that version's position and publishes on top of it.
#[test]
fn a_streamed_first_version_that_loses_the_race_reads_the_source_again() {
    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    ws.drop_export("leverantorsfakturor", EXPORTS[1]);
    let older = ws.dir.path().join("data/older");
    std::fs::create_dir_all(&older).unwrap();
    std::fs::copy(
        support::examples()
            .join("data/leverantorsfakturor")
            .join(EXPORTS[0]),
        older.join(EXPORTS[0]),
    )
    .unwrap();
    let text = std::fs::read_to_string(&ws.pipeline).unwrap();
    let other = ws.dir.path().join("older.yaml");
    std::fs::write(
        &other,
        text.replace("path: data/leverantorsfakturor", "path: data/older"),
    )
    .unwrap();

    // The slow publisher stops before creating version 1 (its export, written
    // as it was read); meanwhile the other commits version 1 from the older export.
    support::race_between(
        || ws.spawn_racer(Some("before-version-manifest=sleep:4000"), &[]),
        || {
            ws.command(&["run", "--once", other.to_str().unwrap()], "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        },
        "reading the source again",
    );

    // Version 1 is the older export, version 2 the newer one, whole.
    assert_eq!(ws.versions(), vec![1, 2]);
    let alone = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    alone.drop_export("leverantorsfakturor", EXPORTS[1]);
    let out = alone.oppen(&["run", "--once", "leverantorsfakturor.yaml"], &[]);
    assert!(out.status.success());
    assert_eq!(
        support::newest_rows(&ws.published()),
        support::newest_rows(&alone.published())
    );
    assert!(support::check_whole(&ws.published()).is_ok());
    ws.assert_only_referenced_files();
}

/// A first version killed while its parts are being written (the image is
/// still read) publishes nothing; the next run publishes the same as a run
/// that was never killed, and no file of the killed one is left.
#[test]
fn killed_while_a_streamed_first_version_writes_its_parts() {
    let small_parts = |ws: &Workspace| {
        ws.edit_pipeline("publish:\n", "publish:\n  max_file_rows: 50\n");
        ws.drop_export("leverantorsfakturor", EXPORTS[0]);
    };
    let clean = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    small_parts(&clean);
    assert!(
        clean
            .oppen(&["run", "--once", "leverantorsfakturor.yaml"], &[])
            .status
            .success()
    );

    let ws = Workspace::new("leverantorsfakturor", "leverantorsfakturor");
    small_parts(&ws);
    let out = ws.oppen(
        &["run", "--once", "leverantorsfakturor.yaml"],
        &[("OPPEN_FAILPOINT", "streamed-part-written")],
    );
    assert!(!out.status.success(), "the failpoint did not fire");
    assert!(ws.versions().is_empty(), "a version was committed");
    let written = support::walk(&ws.published().join("data")).len();
    assert!(written > 0, "no part was written before the kill");
    // A write the kill stopped midway leaves its staging file (`<name>#<n>`,
    // which listings do not show); make sure there is one.
    let staging = ws.published().join("data/2025-01");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(
        staging.join("00000000000000000001-00000000-0000-0000-0000-000000000000.csv#3"),
        b"half a file",
    )
    .unwrap();

    let out = ws.oppen(&["run", "--once", "leverantorsfakturor.yaml"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ws.versions(), vec![1]);
    assert!(
        ws.version(1).partitions.len() > 1,
        "the export was not split"
    );
    assert_eq!(
        support::newest_rows(&ws.published()),
        support::newest_rows(&clean.published())
    );
    ws.assert_only_referenced_files();
}
