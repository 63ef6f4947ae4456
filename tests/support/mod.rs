//! Test harness: example pipelines copied into a temporary folder, helpers to run
//! them in process or as the `oppen` binary, and readers for what they publish.
#![allow(dead_code, clippy::unwrap_used)]

pub mod http;
pub mod kafka;
pub mod moto;
pub mod postgres;

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use oppen::publish::manifest::{Version, VersionManifest, parse_version_path};

/// The repository's `pipelines/` folder.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines")
}

/// A temporary copy of one example pipeline with its rules and an empty export
/// folder; exports are added with [`Workspace::drop_export`].
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub pipeline: PathBuf,
    pub inbox: PathBuf,
    pub dataset: String,
}

impl Workspace {
    /// Copies `<name>.yaml` and `<name>.rules.yaml`; the export folder is empty.
    pub fn new(name: &str, data_folder: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for file in [format!("{name}.yaml"), format!("{name}.rules.yaml")] {
            std::fs::copy(examples().join(&file), dir.path().join(&file)).unwrap();
        }
        let inbox = dir.path().join("data").join(data_folder);
        std::fs::create_dir_all(&inbox).unwrap();
        Self {
            pipeline: dir.path().join(format!("{name}.yaml")),
            inbox,
            dataset: name.to_string(),
            dir,
        }
    }

    /// Copies a sample export into the export folder.
    pub fn drop_export(&self, data_folder: &str, file: &str) {
        std::fs::copy(
            examples().join("data").join(data_folder).join(file),
            self.inbox.join(file),
        )
        .unwrap();
    }

    /// Writes an export with the given content.
    pub fn write_export(&self, file: &str, content: &[u8]) {
        std::fs::write(self.inbox.join(file), content).unwrap();
    }

    pub fn published(&self) -> PathBuf {
        self.dir.path().join("published").join(&self.dataset)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Replaces text in the pipeline file (which must contain `from`).
    pub fn edit_pipeline(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.pipeline).unwrap();
        assert!(
            text.contains(from),
            "the pipeline does not contain {from:?}"
        );
        std::fs::write(&self.pipeline, text.replace(from, to)).unwrap();
    }

    /// The invoice pipeline reading exports as soon as they appear (a running
    /// `oppen run` otherwise waits for files to settle).
    pub fn invoices_without_settling() -> Self {
        let ws = Self::new("leverantorsfakturor", "leverantorsfakturor");
        ws.edit_pipeline(
            "key: [verifikationsnummer]",
            "key: [verifikationsnummer]\n    settle_seconds: 0",
        );
        ws
    }

    /// Replaces text in the rules file.
    pub fn edit_rules(&self, from: &str, to: &str) {
        let path = self.dir.path().join(format!("{}.rules.yaml", self.dataset));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "rules do not contain {from:?}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
    }

    /// Runs the pipeline once in process.
    pub async fn run_once(&self) -> Result<oppen::runtime::RunSummary, oppen::runtime::RunError> {
        run_once(&self.pipeline).await
    }

    /// Runs `oppen` as a process in this folder.
    pub fn oppen(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut command = self.command(args, "warn");
        command.envs(env.iter().copied());
        command.output().unwrap()
    }

    /// `oppen ARGS` in this folder with a log level.
    pub fn command(&self, args: &[&str], log: &str) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_oppen"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", log)
            // Tests that scrape the endpoints set their own port.
            .env("OPPEN_METRICS_ADDR", "off");
        command
    }

    /// `oppen run --once` of this pipeline as one of two racing publishers
    /// (see [`race`]): output piped, stopped at `failpoint` where given.
    pub fn spawn_racer(
        &self,
        failpoint: Option<&str>,
        env: &[(&str, String)],
    ) -> std::process::Child {
        let mut command = self.command(&["run", "--once", self.pipeline.to_str().unwrap()], "info");
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        if let Some(f) = failpoint {
            command.env("OPPEN_FAILPOINT", f);
        }
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Committed version numbers.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(self.published().join("versions"))
            .map(|d| {
                d.filter_map(|e| parse_version_path(&e.ok()?.file_name().into_string().ok()?))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    pub fn version(&self, v: u64) -> Version {
        read_manifest(&self.published().join(format!("versions/{v:020}.json"))).unwrap()
    }

    /// Asserts that every data and change file in the store is named by a
    /// committed version (nothing left behind by crashes or retention).
    pub fn assert_only_referenced_files(&self) {
        let referenced: std::collections::HashSet<String> = self
            .versions()
            .into_iter()
            .flat_map(|v| {
                self.version(v)
                    .files()
                    .map(|f| f.path.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        for file in walk(&self.published().join("data"))
            .into_iter()
            .chain(walk(&self.published().join("changes")))
        {
            let relative = file
                .strip_prefix(self.published())
                .unwrap()
                .to_string_lossy()
                .to_string();
            assert!(
                referenced.contains(&relative),
                "{relative} is named by no version"
            );
        }
    }

    /// Every row of a version in one format, read back from the published files.
    pub fn rows(&self, v: u64, format: &str) -> RecordBatch {
        let version = self.version(v);
        let batches: Vec<RecordBatch> = version
            .partitions
            .values()
            .map(|p| {
                let file = p
                    .files
                    .iter()
                    .find(|(f, _)| format!("{f:?}").eq_ignore_ascii_case(format))
                    .unwrap()
                    .1;
                read_file(&self.published().join(&file.path))
            })
            .collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }

    /// All bytes of every published file, concatenated (to search for leaks).
    pub fn all_published_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in walk(&self.dir.path().join("published")) {
            out.extend(std::fs::read(entry).unwrap());
        }
        out
    }
}

/// The demo's first round (`oppen demo --once`) in a temporary folder: returns
/// the folder (keep it alive) and the demo folder in it.
pub fn demo_once() -> (tempfile::TempDir, PathBuf) {
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
    (dir, demo)
}

/// Two publishers race for the same versions: `spawn(failpoint)` starts one
/// `oppen run --once`. The slow one pauses just before its first version
/// manifest while the other commits; both must succeed, and the slow one must
/// notice that its changes are already published.
pub fn race(spawn: impl Fn(Option<&str>) -> std::process::Child) {
    race_between(
        || spawn(Some("before-version-manifest=sleep:4000")),
        || spawn(None),
        "another publisher committed these changes",
    );
}

/// [`race`] between two different runs: `slow()` must pause before its first
/// version manifest (the `before-version-manifest=sleep:4000` failpoint) while
/// `fast()` commits; both must succeed, and the slow one's log must say `noticed`.
pub fn race_between(
    slow: impl FnOnce() -> std::process::Child,
    fast: impl FnOnce() -> std::process::Child,
    noticed: &str,
) {
    let slow = slow();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let fast = fast().wait_with_output().unwrap();
    assert!(
        fast.status.success(),
        "{}",
        String::from_utf8_lossy(&fast.stderr)
    );
    let slow = slow.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&slow.stderr);
    assert!(slow.status.success(), "{log}");
    assert!(log.contains(noticed), "{log}");
}

/// Files below a folder.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

/// Runs the pipeline file at `path` once in process (`oppen run --once`).
pub async fn run_once(path: &Path) -> Result<oppen::runtime::RunSummary, oppen::runtime::RunError> {
    let pipeline = oppen::config::load(path).unwrap_or_else(|d| panic!("{d}"));
    let options = oppen::runtime::RunOptions {
        once: true,
        progress: false,
        settle: None,
        resnapshot: false,
        telemetry: Default::default(),
        role: Default::default(),
        shared_slots: Default::default(),
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    oppen::runtime::run(&pipeline, &options, rx).await
}

pub fn read_manifest(path: &Path) -> Option<Version> {
    let bytes = std::fs::read(path).ok()?;
    let m: VersionManifest = serde_json::from_slice(&bytes).ok()?;
    Some(m.version().clone())
}

/// Reads a published Parquet or CSV file.
pub fn read_file(path: &Path) -> RecordBatch {
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    if path.extension().is_some_and(|e| e == "parquet") {
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1 << 20)
                .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    } else {
        let format = arrow::csv::reader::Format::default().with_header(true);
        let (schema, _) = format
            .infer_schema(std::io::Cursor::new(&bytes), None)
            .unwrap();
        let schema = std::sync::Arc::new(schema);
        let reader = arrow::csv::ReaderBuilder::new(schema.clone())
            .with_header(true)
            .build(std::io::Cursor::new(bytes))
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        arrow::compute::concat_batches(&schema, &batches).unwrap()
    }
}

/// Every identifier planted in the sample data.
pub fn planted_identifiers() -> Vec<String> {
    let truth: serde_json::Value =
        serde_json::from_slice(&std::fs::read(examples().join("data/truth.json")).unwrap())
            .unwrap();
    let ids = truth
        .as_object()
        .unwrap()
        .values()
        .flat_map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
        })
        .collect::<Vec<String>>();
    // A check against no identifiers would pass whatever leaked.
    assert!(
        !ids.is_empty(),
        "data/truth.json names no planted identifiers"
    );
    ids
}

/// Checks that every visible version is whole: its manifest parses and every
/// file it names exists with the recorded size and checksum, and that
/// `manifest.json` names a whole version. Returns a description of the first
/// problem.
pub fn check_whole(published: &Path) -> Result<usize, String> {
    use sha2::Digest;
    let mut seen = 0;
    let Ok(entries) = std::fs::read_dir(published.join("versions")) else {
        return Ok(0);
    };
    for e in entries.flatten() {
        let path = e.path();
        // Only `<v>.json` names are versions (the local store stages writes under
        // other names, which its listing hides).
        if e.file_name()
            .to_str()
            .and_then(parse_version_path)
            .is_none()
        {
            continue;
        }
        let Some(version) = read_manifest(&path) else {
            return Err(format!("{} does not parse", path.display()));
        };
        for f in version.files() {
            let bytes = std::fs::read(published.join(&f.path))
                .map_err(|err| format!("version {} names {}: {err}", version.version, f.path))?;
            if bytes.len() as u64 != f.bytes
                || hex::encode(sha2::Sha256::digest(&bytes)) != f.sha256
            {
                return Err(format!(
                    "version {}: {} differs from its manifest",
                    version.version, f.path
                ));
            }
        }
        seen += 1;
    }
    if let Some(pointer) = read_manifest(&published.join("manifest.json"))
        && !published
            .join(format!("versions/{:020}.json", pointer.version))
            .exists()
    {
        return Err(format!(
            "manifest.json points to version {} which does not exist",
            pointer.version
        ));
    }
    Ok(seen)
}

/// Sends SIGTERM to a child process.
pub fn terminate(child: &mut std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A local port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `port`; fails with `what` and `detail()`.
pub fn wait_for_port(port: u16, what: &str, detail: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on port {port} within 30 s{}",
            detail()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Polls `done` every 100 ms; fails after `seconds` naming `what`.
pub fn wait_until(what: &str, seconds: u64, done: impl FnMut() -> bool) {
    wait_until_or(what, seconds, done, String::new);
}

/// [`wait_until`], adding `detail()` (say, the processes' logs) to the failure.
pub fn wait_until_or(
    what: &str,
    seconds: u64,
    mut done: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            detail()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits for a child to exit; fails after `seconds`.
pub fn wait_exit(child: &mut std::process::Child, seconds: u64) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not exit within {seconds} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The Parquet file of every partition of a dataset's newest version.
pub fn newest_parquet(published: &Path) -> Vec<RecordBatch> {
    let version = read_manifest(&published.join("manifest.json")).unwrap();
    version
        .partitions
        .values()
        .map(|partition| {
            let file = &partition.files[&oppen::config::OutputFormat::Parquet];
            read_file(&published.join(&file.path))
        })
        .collect()
}

/// Every row of a dataset's newest version, each formatted as one string, sorted.
pub fn newest_rows(published: &Path) -> (Vec<String>, Vec<String>) {
    let mut rows = Vec::new();
    let mut columns = Vec::new();
    for batch in newest_parquet(published) {
        columns = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let options = arrow::util::display::FormatOptions::default().with_null("∅");
        let formatters: Vec<arrow::util::display::ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for r in 0..batch.num_rows() {
            let cells: Vec<String> = formatters.iter().map(|f| f.value(r).to_string()).collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    (columns, rows)
}

/// A test pipeline file: dataset `id` read from `source` (the YAML under
/// `source:`, indented two spaces), rules in `<id>.rules.yaml`, published as
/// Parquet and CSV to `file://published` every second; `publish_extra` adds
/// lines under `publish:`.
pub fn pipeline_yaml(id: &str, source: &str, publish_extra: &str) -> String {
    format!(
        "dataset:
  id: {id}
  title: Leverantörsfakturor (test)
  description: Test
  publisher: {{ name: Testkommun, org_nr: \"212000-0000\" }}
  contact: test@exempel.se
  license: CC0-1.0
  accrual: continuous
  access: open
source:
{source}rules: {id}.rules.yaml
publish:
  store: file://published
  state: file://state
  formats: [parquet, csv]
  interval_seconds: 1
{publish_extra}"
    )
}
