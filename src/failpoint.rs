//! Failpoints: named points in a commit where a test can stop or pause the
//! process. A leaf: it imports nothing from the crate, and anything may call it.
//!
//! It stays in the release binary because the crash tests run that binary (a
//! failpoint costs one read of a value set once per process); nothing happens
//! unless `OPPEN_FAILPOINT` is set.

use std::sync::OnceLock;
use std::time::Duration;

/// Test hook at a named point of a commit. `OPPEN_FAILPOINT=<name>` aborts the
/// process there (the crash tests kill a publisher between two steps of a commit);
/// `OPPEN_FAILPOINT=<name>=sleep:<ms>` pauses it (the race tests let another
/// publisher commit first).
pub fn hit(name: &str) {
    static FAILPOINT: OnceLock<Option<String>> = OnceLock::new();
    let Some(spec) = FAILPOINT
        .get_or_init(|| std::env::var("OPPEN_FAILPOINT").ok())
        .as_deref()
    else {
        return;
    };
    let (point, action) = spec.split_once('=').unwrap_or((spec, "abort"));
    if point != name {
        return;
    }
    match action
        .strip_prefix("sleep:")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        Some(ms) => {
            eprintln!("failpoint {name}: sleeping {ms} ms");
            std::thread::sleep(Duration::from_millis(ms));
        }
        None => {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}
