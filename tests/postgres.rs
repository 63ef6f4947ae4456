//! The PostgreSQL connector against a real server (a private cluster started by
//! the harness): snapshot, streaming with a mixed workload, crashes, and the
//! hard cases.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oppen_connector_api::Position;
use support::postgres::Cluster;

const SCHEMA: &str = "
CREATE TYPE invoice_status AS ENUM ('open', 'paid', 'disputed');
CREATE DOMAIN money_amount AS numeric(18,2);
CREATE TABLE supplier_invoices (
  invoice_id bigint PRIMARY KEY,
  supplier text NOT NULL,
  supplier_orgnr varchar(11),
  amount numeric(18,2),
  vat money_amount,
  posted date,
  updated_at timestamptz,
  local_time timestamp,
  paid boolean,
  status invoice_status,
  ref uuid,
  meta jsonb,
  tags text[],
  ratio double precision,
  small smallint,
  period interval,
  attachment bytea,
  notes text,
  clerk_email text,
  obsolete integer
);";

const RULES: &str = "
columns:
  invoice_id: keep
  supplier: keep
  supplier_orgnr: keep
  amount: keep
  vat: keep
  posted: keep
  updated_at: keep
  local_time: keep
  paid: keep
  status: keep
  ref: keep
  meta: keep
  tags: keep
  ratio: keep
  small: keep
  period: keep
  attachment: keep
  notes: redact
  clerk_email: drop
  obsolete: keep
unclassified: drop
";

/// Rows `from..to` as one INSERT; every tenth row has a large, incompressible
/// note, stored out of line (TOAST).
fn insert_sql(from: i64, to: i64) -> String {
    insert_series_sql(&from.to_string(), &format!("{to} - 1"))
}

/// [`insert_sql`] of the rows from `first` to `last` (SQL expressions).
fn insert_series_sql(first: &str, last: &str) -> String {
    format!(
        "INSERT INTO supplier_invoices (invoice_id, supplier, supplier_orgnr, amount, vat, posted, updated_at, \
         local_time, paid, status, ref, meta, tags, ratio, small, period, attachment, notes, clerk_email, obsolete) \
         SELECT g, 'Leverantör ' || (g % 97), '556' || lpad((g % 1000000)::text, 6, '0'), (g * 37 % 100000) / 100.0, \
         (g % 5000) / 4.0, date '2024-01-01' + (g % 365), timestamptz '2024-01-01 12:00:00+01' + g * interval '1 minute', \
         timestamp '2024-02-01 08:30:00' + g * interval '1 second', g % 2 = 0, \
         (ARRAY['open','paid','disputed']::invoice_status[])[1 + g % 3], md5(g::text)::uuid, \
         jsonb_build_object('n', g, 'tag', 'x' || g), ARRAY['a' || g, 'b \"q\"'], g / 7.0, (g % 30000)::smallint, \
         make_interval(days => (g % 40)::int, secs => g % 3600), decode(md5(g::text), 'hex'), \
         CASE WHEN g % 10 = 0 THEN (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 300) i) \
              ELSE 'Faktura ' || g || ' ring 070-123 45 67' END, \
         'clerk' || g || '@exempel.se', g % 11 \
         FROM generate_series({first}, {last}) g"
    )
}

fn pipeline_yaml(dataset: &str, table: &str, slot: &str) -> String {
    support::pipeline_yaml(
        dataset,
        &format!(
            "  postgres:
    url: ${{TEST_PG_URL}}
    table: {table}
    slot: {slot}
    publication: {slot}_pub
    heartbeat_seconds: 2
"
        ),
        "  keep_versions: 1000\n",
    )
}

/// A running `oppen run`, killed when dropped (also when a test fails).
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `sig` (`-STOP`, `-CONT`) to process `pid`.
fn signal(pid: &str, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, pid])
            .status()
            .unwrap()
            .success()
    );
}

/// A folder with pipelines on one database.
struct Setup {
    dir: tempfile::TempDir,
    url: String,
    db: String,
}

impl Setup {
    fn new(db: &str) -> Self {
        let cluster = Cluster::get();
        let url = cluster.database(db);
        Setup {
            dir: tempfile::tempdir().unwrap(),
            url,
            db: db.into(),
        }
    }

    fn pipeline(&self, dataset: &str, table: &str, slot: &str, rules: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{dataset}.yaml"));
        std::fs::write(&path, pipeline_yaml(dataset, table, slot)).unwrap();
        std::fs::write(self.dir.path().join(format!("{dataset}.rules.yaml")), rules).unwrap();
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_oppen"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("TEST_PG_URL", &self.url)
            .env("OPPEN_METRICS_ADDR", "off")
            .env(
                "RUST_LOG",
                std::env::var("TEST_OPPEN_LOG").unwrap_or("warn".into()),
            );
        c
    }

    fn oppen(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }

    fn spawn(&self, pipeline: &Path) -> Running {
        self.spawn_with(&["run", pipeline.to_str().unwrap()])
    }

    fn spawn_with(&self, args: &[&str]) -> Running {
        Running(
            self.command(args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }

    /// `oppen run --once PIPELINE`, which must succeed.
    fn run_once(&self, pipeline: &str) {
        let out = self.oppen(&["run", "--once", pipeline]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `run --once` with the log at `level`; its log, once it succeeded.
    fn run_once_logged(&self, pipeline: &str, level: &str) -> String {
        let out = self
            .command(&["run", "--once", pipeline])
            .env("RUST_LOG", level)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        log
    }

    /// The pid of the walsender streaming `slot`, if one is.
    fn walsender(&self, slot: &str) -> Option<String> {
        let pid = self.psql(&format!(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ));
        Some(pid.trim().to_string()).filter(|p| !p.is_empty())
    }

    fn published(&self, dataset: &str) -> PathBuf {
        self.dir.path().join("published").join(dataset)
    }

    fn latest(&self, dataset: &str) -> Option<oppen::publish::manifest::Version> {
        support::read_manifest(&self.published(dataset).join("manifest.json"))
    }

    /// Every committed version of `dataset` with its row count, oldest first.
    fn version_rows(&self, dataset: &str) -> Vec<(u64, u64)> {
        let versions = self.published(dataset).join("versions");
        let mut counts: Vec<(u64, u64)> = std::fs::read_dir(versions)
            .unwrap()
            .filter_map(|e| support::read_manifest(&e.unwrap().path()))
            .map(|v| (v.version, v.rows))
            .collect();
        counts.sort();
        counts
    }

    /// Runs SQL as the pipelines' role (which then owns what it creates).
    fn psql(&self, sql: &str) -> String {
        Cluster::get().psql(
            &self.db,
            &format!("SET ROLE {}; {sql}", support::postgres::USER),
        )
    }

    /// Waits until the dataset's newest version holds the source up to `lsn`.
    fn wait_for(&self, dataset: &str, lsn: u64, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(v) = self.latest(dataset)
                && let Some(Position::Lsn { lsn: at }) = v.source_position
                && at >= lsn
            {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("oppen exited with {status} before publishing up to {lsn:X}");
            }
            assert!(
                Instant::now() < deadline,
                "{dataset} did not reach LSN {lsn:X} within 180 s (at {:?})",
                self.latest(dataset).and_then(|v| v.source_position)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the first version (the snapshot).
    fn wait_for_first(&self, dataset: &str, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.latest(dataset).is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("oppen exited with {status} before its first version");
            }
            assert!(Instant::now() < deadline, "no first version within 120 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `slot`'s confirmed position reaches `lsn`; fails after
    /// `within`, saying `why` it should have.
    fn wait_for_confirmed(&self, slot: &str, lsn: u64, within: Duration, why: &str) {
        let deadline = Instant::now() + within;
        loop {
            let confirmed = self.psql(&format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ));
            let confirmed = oppen_connector_postgres::wire::parse_lsn(confirmed.trim()).unwrap();
            if confirmed >= lsn {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{slot}: confirmed at {confirmed:X}, not at {lsn:X} after {within:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where the WAL ends now: every commit so far is before it. The insert
    /// position, not `pg_current_wal_lsn()` (the write position): with
    /// `synchronous_commit=off` that lags behind commits not yet written, so a
    /// version of an earlier transaction could seem to hold the next one.
    fn current_lsn(&self) -> u64 {
        oppen_connector_postgres::wire::parse_lsn(
            self.psql("SELECT pg_current_wal_insert_lsn()").trim(),
        )
        .unwrap()
    }
}

/// Publishes the table afresh (a new slot, snapshot only) and checks that
/// `dataset` equals it row for row.
fn assert_matches_fresh_snapshot(setup: &Setup, dataset: &str) {
    assert_matches_fresh_snapshot_of(setup, dataset, "public.supplier_invoices", RULES);
}

/// As [`assert_matches_fresh_snapshot`], for a dataset of `table` with `rules`.
fn assert_matches_fresh_snapshot_of(setup: &Setup, dataset: &str, table: &str, rules: &str) {
    let reference = format!("{dataset}_ref");
    let pipeline = setup.pipeline(&reference, table, &format!("{reference}_slot"), rules);
    let out = setup.oppen(&["run", "--once", pipeline.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (columns, expected) = support::newest_rows(&setup.published(&reference));
    let (got_columns, got) = support::newest_rows(&setup.published(dataset));
    assert_eq!(got_columns, columns, "published columns differ");
    let source_rows: usize = setup
        .psql(&format!("SELECT count(*) FROM {table}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(expected.len(), source_rows, "the reference misses rows");
    if got != expected {
        let missing: Vec<&String> = expected
            .iter()
            .filter(|r| !got.contains(r))
            .take(3)
            .collect();
        let extra: Vec<&String> = got
            .iter()
            .filter(|r| !expected.contains(r))
            .take(3)
            .collect();
        panic!(
            "{dataset} differs from the table: {} rows vs {}; missing e.g. {missing:#?}; unexpected e.g. {extra:#?}",
            got.len(),
            expected.len()
        );
    }
}

/// The mixed workload, in SQL steps, each its own transaction (or several).
fn workload(setup: &Setup, next_id: &mut i64) {
    let mut id = *next_id;
    // Small transactions of five rows, from two sessions at once.
    let a = {
        let db = setup.db.clone();
        let start = id;
        std::thread::spawn(move || {
            for t in 0..40 {
                let from = start + t * 5;
                Cluster::get().psql(&db, &insert_sql(from, from + 5));
            }
        })
    };
    id += 200;
    let b = {
        let db = setup.db.clone();
        let start = id;
        std::thread::spawn(move || {
            for t in 0..40 {
                let from = start + t * 5;
                Cluster::get().psql(
                    &db,
                    &format!(
                        "BEGIN; {}; UPDATE supplier_invoices SET amount = amount + 1, updated_at = now() WHERE invoice_id % 50 = {}; COMMIT",
                        insert_sql(from, from + 5),
                        t
                    ),
                );
            }
        })
    };
    id += 200;
    a.join().unwrap();
    b.join().unwrap();
    // TRUNCATE, then rows in the same transaction; the steps below work on these.
    let base = id;
    setup.psql(&format!(
        "BEGIN; TRUNCATE supplier_invoices; {}; COMMIT",
        insert_sql(id, id + 300)
    ));
    id += 300;
    // One larger transaction.
    setup.psql(&format!(
        "BEGIN; {}; DELETE FROM supplier_invoices WHERE invoice_id % 9 = 0; COMMIT",
        insert_sql(id, id + 20_000)
    ));
    id += 20_000;
    // Updates that leave the TOASTed notes unchanged.
    setup.psql("UPDATE supplier_invoices SET paid = NOT paid, status = 'disputed' WHERE invoice_id % 10 = 0");
    // Deletes.
    setup.psql("DELETE FROM supplier_invoices WHERE invoice_id % 17 = 3");
    // A key change, of a row with a TOASTed note among others.
    setup.psql(&format!(
        "UPDATE supplier_invoices SET invoice_id = invoice_id + 50000000 WHERE invoice_id IN ({}, {}, {})",
        base + 20,
        base + 21,
        base + 40
    ));
    // NULLs everywhere but the key and the supplier.
    setup.psql(&format!(
        "INSERT INTO supplier_invoices (invoice_id, supplier) VALUES ({id}, 'Tom rad')"
    ));
    id += 1;
    // Schema changes while streaming: a new (unclassified) column, a dropped
    // one, a type change.
    setup.psql("ALTER TABLE supplier_invoices ADD COLUMN IF NOT EXISTS extra text");
    setup.psql(&format!(
        "{}; UPDATE supplier_invoices SET extra = 'secret ' || invoice_id WHERE invoice_id >= {id}",
        insert_sql(id, id + 50)
    ));
    id += 50;
    setup.psql("ALTER TABLE supplier_invoices DROP COLUMN obsolete");
    setup.psql("UPDATE supplier_invoices SET ratio = ratio * 2 WHERE invoice_id % 7 = 1");
    setup.psql("ALTER TABLE supplier_invoices ALTER COLUMN small TYPE integer");
    setup.psql("UPDATE supplier_invoices SET small = 70000 WHERE invoice_id % 13 = 0");
    setup.psql(&format!(
        "{}; UPDATE supplier_invoices SET notes = notes || ' (ändrad)' WHERE invoice_id % 20 = 0",
        insert_sql(id, id + 100)
            .replace(", obsolete)", ")")
            .replace(", g % 11 ", " ")
    ));
    id += 100;
    *next_id = id;
}

/// Adds `line` to the pipeline file after `after`, which it must hold once.
fn add_after(pipeline: &Path, after: &str, line: &str) {
    let text = std::fs::read_to_string(pipeline).unwrap();
    assert_eq!(text.matches(after).count(), 1, "{after:?} in {text}");
    std::fs::write(pipeline, text.replace(after, &format!("{after}{line}"))).unwrap();
}

fn setup_table(setup: &Setup, rows: i64) {
    setup.psql(SCHEMA);
    setup.psql(&insert_sql(1, rows + 1));
}

#[test]
fn snapshot_then_streamed_changes_equal_the_table() {
    let setup = Setup::new("scenario");
    setup_table(&setup, 2000);
    let pipeline = setup.pipeline(
        "invoices",
        "public.supplier_invoices",
        "scenario_slot",
        RULES,
    );
    let mut child = setup.spawn(&pipeline);
    setup.wait_for_first("invoices", &mut child);
    let first = setup.latest("invoices").unwrap();
    assert_eq!(first.rows, 2000, "the snapshot holds every row");
    // The replication connection is cut before the workload: the connector
    // reconnects and goes on where it was.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Cluster::get()
        .psql(
            "scenario",
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'scenario_slot'",
        )
        .trim()
        != "t"
    {
        assert!(Instant::now() < deadline, "the stream never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut next_id = 10_000;
    workload(&setup, &mut next_id);
    let lsn = setup.current_lsn();
    setup.psql(&format!(
        "INSERT INTO supplier_invoices (invoice_id, supplier) VALUES ({next_id}, 'marker')"
    ));
    setup.wait_for("invoices", lsn, &mut child);
    assert!(child.try_wait().unwrap().is_none(), "the pipeline stopped");
    // The slot's confirmed position follows the committed versions. The
    // acknowledgement goes out just after the version is visible, so the
    // slot is polled before the pipeline is stopped.
    setup.wait_for_confirmed(
        "scenario_slot",
        lsn,
        Duration::from_secs(30),
        "the version holding it was published",
    );
    child.kill().unwrap();
    child.wait().unwrap();
    support::check_whole(&setup.published("invoices")).unwrap();
    assert_matches_fresh_snapshot(&setup, "invoices");
    // The unclassified new column never reached the store.
    let published = support::walk(&setup.dir.path().join("published"));
    for file in published {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(7).any(|w| w == b"secret "),
            "{} holds the unclassified column's values",
            file.display()
        );
        assert!(
            !bytes.windows(6).any(|w| w == b"clerk1"),
            "{} holds a dropped column's values",
            file.display()
        );
    }
}

/// Rows `from..to` of the invoice table in schema `archive`, in one transaction
/// with an update of some of its earlier rows.
fn archive_sql(from: i64, to: i64) -> String {
    format!(
        "SET search_path = archive, public; BEGIN; {}; \
         UPDATE supplier_invoices SET amount = amount + 1 WHERE invoice_id % 97 = {}; \
         DELETE FROM supplier_invoices WHERE invoice_id = {}; COMMIT",
        insert_sql(from, to),
        from % 97,
        from - 7
    )
}

/// Several pipelines of one process on one slot: one stream feeds them all,
/// each publishes its own table exactly, the slot is confirmed only as far as
/// all of them have committed, and a pipeline joining later copies its
/// snapshot while the others stream.
#[test]
fn pipelines_sharing_a_slot_each_publish_their_table() {
    let setup = Setup::new("sharing");
    setup_table(&setup, 1000);
    setup.psql(
        "CREATE SCHEMA archive; \
         CREATE TABLE archive.supplier_invoices (LIKE public.supplier_invoices INCLUDING ALL)",
    );
    setup.psql(&archive_sql(1, 600));
    // Both name the same slot and publication; the second adds its table.
    let invoices = setup.pipeline("invoices", "public.supplier_invoices", "shared_slot", RULES);
    let archive = setup.pipeline("archive", "archive.supplier_invoices", "shared_slot", RULES);
    let run = |paths: &[&PathBuf]| {
        let mut args = vec!["run"];
        args.extend(paths.iter().map(|p| p.to_str().unwrap()));
        setup.spawn_with(&args)
    };
    let mut child = run(&[&invoices, &archive]);
    setup.wait_for_first("invoices", &mut child);
    setup.wait_for_first("archive", &mut child);
    assert_eq!(setup.latest("archive").unwrap().rows, 599);

    // Both tables change at once, in shared transactions and on their own;
    // the shared stream's connection is cut halfway.
    let archive_writes = {
        let db = setup.db.clone();
        std::thread::spawn(move || {
            for t in 0..30 {
                let from = 1000 + t * 10;
                Cluster::get().psql(&db, &archive_sql(from, from + 10));
            }
        })
    };
    let mut next_id = 10_000;
    workload(&setup, &mut next_id);
    if let Some(pid) = setup.walsender("shared_slot") {
        setup.psql(&format!("SELECT pg_terminate_backend({pid})"));
    }
    archive_writes.join().unwrap();
    setup.psql(&format!(
        "BEGIN; INSERT INTO supplier_invoices (invoice_id, supplier) VALUES ({next_id}, 'both'); \
         INSERT INTO archive.supplier_invoices (invoice_id, supplier) VALUES ({next_id}, 'both'); COMMIT"
    ));
    next_id += 1;
    let lsn = setup.current_lsn();
    let marker = |id: i64| {
        setup.psql(&format!(
            "INSERT INTO supplier_invoices (invoice_id, supplier) VALUES ({id}, 'marker'); \
             INSERT INTO archive.supplier_invoices (invoice_id, supplier) VALUES ({id}, 'marker')"
        ));
    };
    marker(next_id);
    next_id += 1;
    setup.wait_for("invoices", lsn, &mut child);
    setup.wait_for("archive", lsn, &mut child);
    // The slot moves once both have committed; no temporary slot is left.
    setup.wait_for_confirmed(
        "shared_slot",
        lsn,
        Duration::from_secs(30),
        "both pipelines published it",
    );
    assert_eq!(
        setup
            .psql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots WHERE database = 'sharing'")
            .trim(),
        "shared_slot"
    );
    // A transaction that only truncates is a version of its own; then only
    // the other table changes, and the idle pipeline must not hold the slot
    // back (it sees those transactions' bounds too).
    let before_truncate = setup.current_lsn();
    setup.psql("TRUNCATE archive.supplier_invoices");
    let after_truncate = setup.current_lsn();
    for id in next_id..next_id + 3 {
        setup.psql(&format!(
            "INSERT INTO supplier_invoices (invoice_id, supplier) VALUES ({id}, 'only invoices')"
        ));
    }
    next_id += 3;
    setup.wait_for("archive", before_truncate, &mut child);
    assert_eq!(setup.latest("archive").unwrap().rows, 0);
    setup.wait_for("invoices", after_truncate, &mut child);
    setup.wait_for_confirmed(
        "shared_slot",
        after_truncate,
        Duration::from_secs(30),
        "the pipeline of the changed table published it and the other has nothing to publish",
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // A third pipeline joins the slot: it copies its table while the other
    // two resume, and writes go on meanwhile.
    let late = setup.pipeline("late", "archive.supplier_invoices", "shared_slot", RULES);
    let mut child = run(&[&invoices, &archive, &late]);
    let writes = {
        let db = setup.db.clone();
        std::thread::spawn(move || {
            for t in 0..20 {
                let from = 5000 + t * 10;
                Cluster::get().psql(&db, &archive_sql(from, from + 10));
                // (The workload dropped a column, so not `insert_sql` here.)
                Cluster::get().psql(
                    &db,
                    &format!(
                        "INSERT INTO supplier_invoices (invoice_id, supplier, amount) \
                         SELECT g, 'Ny', g / 3.0 FROM generate_series({}, {}) g; \
                         UPDATE supplier_invoices SET amount = amount + 1 WHERE invoice_id % 31 = {t}",
                        900_000 + from,
                        900_000 + from + 9
                    ),
                );
            }
        })
    };
    setup.wait_for_first("late", &mut child);
    writes.join().unwrap();
    let lsn = setup.current_lsn();
    marker(next_id);
    let id = next_id.to_string();
    for dataset in ["invoices", "archive", "late"] {
        setup.wait_for(dataset, lsn, &mut child);
        // The version that reaches `lsn` may be the writes' own; the marker
        // follows in the next.
        support::wait_until("the marker published", 60, || {
            let (_, rows) = support::newest_rows(&setup.published(dataset));
            rows.iter()
                .any(|r| r.contains("marker") && r.split('|').any(|cell| cell == id))
        });
    }
    assert!(child.try_wait().unwrap().is_none(), "the pipelines stopped");
    child.kill().unwrap();
    child.wait().unwrap();
    for (dataset, table) in [
        ("invoices", "public.supplier_invoices"),
        ("archive", "archive.supplier_invoices"),
        ("late", "archive.supplier_invoices"),
    ] {
        support::check_whole(&setup.published(dataset)).unwrap();
        assert_matches_fresh_snapshot_of(&setup, dataset, table, RULES);
    }
}

#[test]
fn killed_at_random_points_loses_and_doubles_nothing() {
    let setup = Setup::new("crashes");
    setup_table(&setup, 3000);
    let pipeline = setup.pipeline("crashing", "public.supplier_invoices", "crash_slot", RULES);
    // Small parts, so kills also land while parts fill, split, are rewritten
    // in place and emptied.
    add_after(
        &pipeline,
        "  keep_versions: 1000\n",
        "  max_file_rows: 400\n",
    );
    // The workload runs while the pipeline is killed and restarted.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let done = done.clone();
        let db = setup.db.clone();
        std::thread::spawn(move || {
            let setup = Setup {
                dir: tempfile::tempdir().unwrap(),
                url: Cluster::get().url(&db),
                db,
            };
            let mut next_id = 10_000;
            for _ in 0..2 {
                workload(&setup, &mut next_id);
                // Put the dropped column back for the next round.
                setup.psql(
                    "ALTER TABLE supplier_invoices ADD COLUMN IF NOT EXISTS obsolete integer",
                );
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut kills = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    while kills < 20 || !done.load(std::sync::atomic::Ordering::SeqCst) {
        let mut child = setup.spawn(&pipeline);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 2200));
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        support::check_whole(&setup.published("crashing"))
            .unwrap_or_else(|e| panic!("after kill {kills}: {e}"));
        assert!(kills < 200, "the workload did not finish");
    }
    worker.join().unwrap();
    let lsn = setup.current_lsn();
    setup.psql("INSERT INTO supplier_invoices (invoice_id, supplier) VALUES (99999999, 'marker')");
    let mut child = setup.spawn(&pipeline);
    setup.wait_for("crashing", lsn, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    support::check_whole(&setup.published("crashing")).unwrap();
    let parts = setup.latest("crashing").unwrap().partitions.len();
    assert!(parts > 1, "the table is in {parts} part(s), not split");
    assert_matches_fresh_snapshot(&setup, "crashing");
}

#[test]
fn a_million_row_transaction_is_published_whole() {
    let setup = Setup::new("bigtx");
    setup.psql("CREATE TABLE big (id bigint PRIMARY KEY, amount numeric(12,2), note text)");
    setup.psql("INSERT INTO big SELECT g, g / 100.0, 'rad ' || g FROM generate_series(1, 10) g");
    let rules = "columns:\n  id: keep\n  amount: keep\n  note: keep\n";
    let pipeline = setup.pipeline("big", "public.big", "big_slot", rules);
    let mut child = setup.spawn(&pipeline);
    setup.wait_for_first("big", &mut child);
    setup.psql(
        "INSERT INTO big SELECT g, g / 100.0, 'rad ' || g FROM generate_series(11, 1000010) g",
    );
    let lsn = setup.current_lsn();
    setup.psql("INSERT INTO big VALUES (0, 0, 'marker')");
    setup.wait_for("big", lsn, &mut child);
    // The version that reaches `lsn` may be the big transaction's own; the
    // marker follows in the next.
    support::wait_until("the marker row published", 60, || {
        setup.latest("big").is_some_and(|v| v.rows == 1_000_011)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // No version ever held part of the big transaction.
    support::check_whole(&setup.published("big")).unwrap();
    let counts = setup.version_rows("big");
    for (version, rows) in &counts {
        assert!(
            *rows == 10 || *rows >= 1_000_010,
            "version {version} holds {rows} rows: part of a transaction (all: {counts:?})"
        );
    }
    assert_eq!(setup.latest("big").unwrap().rows, 1_000_011);
}

/// A TRUNCATE followed in its transaction by a schema change and rows: the
/// emptied table and the rows after it are one transaction, so no version
/// may show the table empty. Nor may rows before a schema change be cut off
/// from those after it.
#[test]
fn schema_changes_inside_a_transaction_keep_it_whole() {
    let setup = Setup::new("midschema");
    setup.psql("CREATE TABLE menu (id bigint PRIMARY KEY, dish text)");
    setup.psql("INSERT INTO menu SELECT g, 'rätt ' || g FROM generate_series(1, 100) g");
    let rules = "columns:\n  id: keep\n  dish: keep\n  extra: keep\n";
    let pipeline = setup.pipeline("menu", "public.menu", "menu_slot", rules);
    let mut child = setup.spawn(&pipeline);
    setup.wait_for_first("menu", &mut child);
    setup.psql(
        "BEGIN; TRUNCATE menu; ALTER TABLE menu ADD COLUMN extra text; \
         INSERT INTO menu SELECT g, 'ny ' || g, 'x' || g FROM generate_series(1000, 1049) g; COMMIT",
    );
    // Rows on both sides of a dropped column, in one transaction.
    setup.psql(
        "BEGIN; INSERT INTO menu SELECT g, 'före ' || g, 'y' || g FROM generate_series(2000, 2009) g; \
         ALTER TABLE menu DROP COLUMN extra; \
         INSERT INTO menu SELECT g, 'efter ' || g FROM generate_series(3000, 3009) g; COMMIT",
    );
    let lsn = setup.current_lsn();
    setup.psql("INSERT INTO menu VALUES (0, 'marker')");
    setup.wait_for("menu", lsn, &mut child);
    support::wait_until("the marker row published", 60, || {
        setup.latest("menu").is_some_and(|v| v.rows == 71)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    support::check_whole(&setup.published("menu")).unwrap();
    let counts = setup.version_rows("menu");
    for (version, rows) in &counts {
        assert!(
            [100, 50, 70, 71].contains(rows),
            "version {version} holds {rows} rows: part of a transaction (all: {counts:?})"
        );
    }
    assert_matches_fresh_snapshot_of(&setup, "menu", "public.menu", rules);
}

/// A snapshot copied by several connections, each a range of the table's
/// pages (the last one open), equals one copied by a single connection.
#[test]
fn a_snapshot_copied_in_parallel_ranges_equals_the_table() {
    let setup = Setup::new("ranges");
    setup_table(&setup, 6000);
    // Rows moved by updates land on later pages, deletes leave gaps.
    setup.psql("UPDATE supplier_invoices SET amount = amount + 1 WHERE invoice_id % 7 = 0");
    setup.psql("DELETE FROM supplier_invoices WHERE invoice_id % 11 = 0");
    // relpages, which the ranges are cut from.
    setup.psql("ANALYZE supplier_invoices");
    let pipeline = setup.pipeline("ranged", "public.supplier_invoices", "ranged_slot", RULES);
    add_after(
        &pipeline,
        "    heartbeat_seconds: 2\n",
        "    snapshot_workers: 3\n",
    );
    let log = setup.run_once_logged(
        pipeline.to_str().unwrap(),
        "oppen=info,oppen_connector_postgres=info",
    );
    assert!(
        log.contains("workers=3"),
        "not copied by 3 connections: {log}"
    );
    assert_matches_fresh_snapshot(&setup, "ranged");
}

#[test]
fn check_connect_reports_what_the_connector_needs() {
    let setup = Setup::new("checks");
    setup.psql("CREATE TABLE nokey (a int, b text)");
    setup.psql("CREATE TABLE nothing (id int PRIMARY KEY, b text); ALTER TABLE nothing REPLICA IDENTITY NOTHING");
    setup.psql("CREATE TABLE fine (id int PRIMARY KEY, b text, c text)");
    let rules = "columns:\n  a: keep\n  b: keep\n";
    let nokey = setup.pipeline("nokey", "public.nokey", "nokey_slot", rules);
    let out = setup.oppen(&["check", "--connect", nokey.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("has no primary key"), "{stderr}");
    // Running it fails the same way, without retrying forever.
    let out = setup.oppen(&["run", "--once", nokey.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no primary key"));

    let rules = "columns:\n  id: keep\n  b: keep\n";
    let nothing = setup.pipeline("nothing", "public.nothing", "nothing_slot", rules);
    let out = setup.oppen(&["check", "--connect", nothing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("REPLICA IDENTITY NOTHING"), "{stderr}");

    let fine = setup.pipeline("fine", "public.fine", "fine_slot", rules);
    let out = setup.oppen(&["check", "--connect", fine.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("wal_level         logical"), "{stdout}");
    assert!(stdout.contains("may replicate     yes"), "{stdout}");
    assert!(
        stdout.contains("replica identity  default (id)"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" c ") && l.contains("NO RULE")),
        "{stdout}"
    );
    // The password never shows.
    assert!(!stdout.contains(support::postgres::PASSWORD));

    let missing = setup.pipeline("missing", "public.no_such_table", "missing_slot", rules);
    let out = setup.oppen(&["check", "--connect", missing.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

/// Transactions the server streams before they commit (the test cluster's
/// `logical_decoding_work_mem` is 64 kB): one with a subtransaction rolled
/// back to a savepoint publishes without the rolled-back rows, and one rolled
/// back whole publishes nothing.
#[test]
fn streamed_transactions_with_rollbacks_publish_what_committed() {
    let setup = Setup::new("streamed");
    setup.psql("CREATE TABLE s (id bigint PRIMARY KEY, note text)");
    setup.psql("INSERT INTO s SELECT g, 'rad ' || g FROM generate_series(1, 10) g");
    let rules = "columns:\n  id: keep\n  note: keep\n";
    let pipeline = setup.pipeline("s", "public.s", "s_slot", rules);
    let mut child = setup.spawn(&pipeline);
    setup.wait_for_first("s", &mut child);
    // Each part is far beyond 64 kB of decoded changes.
    setup.psql(
        "BEGIN; \
         INSERT INTO s SELECT g, repeat('x', 50) FROM generate_series(100, 20099) g; \
         SAVEPOINT a; \
         INSERT INTO s SELECT g, 'rolled back' FROM generate_series(30000, 49999) g; \
         UPDATE s SET note = 'rolled back' WHERE id <= 10; \
         ROLLBACK TO SAVEPOINT a; \
         UPDATE s SET note = 'kept' WHERE id <= 5; \
         INSERT INTO s SELECT g, repeat('y', 50) FROM generate_series(50000, 69999) g; \
         COMMIT;",
    );
    setup.psql(
        "BEGIN; INSERT INTO s SELECT g, 'never' FROM generate_series(100000, 129999) g; ROLLBACK;",
    );
    let lsn = setup.current_lsn();
    setup.psql("INSERT INTO s VALUES (1, 'marker') ON CONFLICT (id) DO UPDATE SET note = 'marker'");
    setup.wait_for("s", lsn, &mut child);
    support::wait_until("the marker published", 60, || {
        setup.latest("s").is_some_and(|v| v.rows == 40_010) && {
            let (_, rows) = support::newest_rows(&setup.published("s"));
            rows.iter().any(|r| r.contains("marker"))
        }
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, rows) = support::newest_rows(&setup.published("s"));
    assert!(
        !rows
            .iter()
            .any(|r| r.contains("rolled back") || r.contains("never"))
    );
    assert_eq!(
        rows.iter().filter(|r| r.contains("kept")).count(),
        4,
        "ids 2-5 kept, 1 is the marker"
    );
    assert_eq!(setup.psql("SELECT count(*) FROM s").trim(), "40010");
}

/// TLS on both kinds of connection: `verify-full` with the server's CA
/// publishes the table, without the CA the connection is refused with a clear
/// error, `verify-ca` trusts the chain but not the name (a server reached by
/// an address its certificate does not name), and with `require` every
/// session oppen opens is encrypted, the replication connection included.
#[test]
fn tls_connections_encrypt_and_verify_the_server() {
    let mut setup = Setup::new("tls");
    setup.psql(
        "CREATE TABLE t (id int PRIMARY KEY, b text); \
         INSERT INTO t SELECT i, 'rad ' || i FROM generate_series(1, 100) i",
    );
    let rules = "columns:\n  id: keep\n  b: keep\n";
    let plain = setup.url.clone();
    let ca = Cluster::get().ca_cert();

    setup.url = format!("{plain}?sslmode=verify-full&sslrootcert={}", ca.display());
    let full = setup.pipeline("tls_full", "public.t", "tls_full_slot", rules);
    setup.run_once(full.to_str().unwrap());
    assert_eq!(setup.latest("tls_full").map(|v| v.rows), Some(100));

    // The certificate names localhost and 127.0.0.1; `hostaddr` reaches the
    // server under a name it does not carry (as libpq: connect to the
    // address, verify against the host).
    let port = plain
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap()
        .to_string();
    let renamed = format!(
        "postgres://{}:{}@db.example.invalid:{port}/{}?hostaddr=127.0.0.1&sslrootcert={}",
        support::postgres::USER,
        support::postgres::PASSWORD,
        plain.rsplit('/').next().unwrap(),
        ca.display()
    );
    setup.url = format!("{renamed}&sslmode=verify-ca");
    let by_chain = setup.pipeline("tls_ca", "public.t", "tls_ca_slot", rules);
    let out = setup.oppen(&["run", "--once", by_chain.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "verify-ca refused a server whose certificate chains to the root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(setup.latest("tls_ca").map(|v| v.rows), Some(100));
    setup.url = format!("{renamed}&sslmode=verify-full");
    let misnamed = setup.pipeline("tls_misnamed", "public.t", "tls_misnamed_slot", rules);
    let out = setup.oppen(&["check", "--connect", misnamed.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "verify-full accepted a certificate for another name"
    );
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    setup.url = format!("{plain}?sslmode=verify-full");
    let untrusted = setup.pipeline("tls_untrusted", "public.t", "tls_untrusted_slot", rules);
    let out = setup.oppen(&["check", "--connect", untrusted.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    setup.url = format!("{plain}?sslmode=require");
    let required = setup.pipeline("tls_required", "public.t", "tls_required_slot", rules);
    let _running = setup.spawn(&required);
    let sessions = |ssl: bool| {
        setup
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.usename = '{}' AND a.backend_type = 'walsender' AND s.ssl = {ssl}",
                support::postgres::USER
            ))
            .trim()
            .to_string()
    };
    support::wait_until("an encrypted replication connection", 60, || {
        sessions(true) == "1"
    });
    assert_eq!(sessions(false), "0", "a replication connection without TLS");
    support::wait_until("the table published over TLS", 60, || {
        setup.latest("tls_required").is_some_and(|v| v.rows == 100)
    });
}

#[test]
fn a_dropped_slot_is_a_clear_error_and_resnapshot_recovers() {
    let setup = Setup::new("slotloss");
    setup.psql("CREATE TABLE t (id int PRIMARY KEY, b text)");
    setup.psql("INSERT INTO t SELECT g, 'x' || g FROM generate_series(1, 100) g");
    let rules = "columns:\n  id: keep\n  b: keep\n";
    let pipeline = setup.pipeline("t", "public.t", "lost_slot", rules);
    let p = pipeline.to_str().unwrap();
    setup.run_once(p);
    assert_eq!(setup.latest("t").unwrap().rows, 100);
    setup.psql("SELECT pg_drop_replication_slot('lost_slot')");
    setup.psql("DELETE FROM t WHERE id <= 10; INSERT INTO t VALUES (500, 'new')");
    let out = setup.oppen(&["run", "--once", p]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("lost_slot") && stderr.contains("--resnapshot"),
        "{stderr}"
    );
    let out = setup.oppen(&["run", "--once", "--resnapshot", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = setup.latest("t").unwrap();
    assert_eq!(v.rows, 91);
    assert_eq!((v.changes.inserts, v.changes.deletes), (1, 10));
    // Streaming goes on from the new slot.
    setup.psql("UPDATE t SET b = 'changed' WHERE id = 50");
    setup.run_once(p);
    assert_eq!(setup.latest("t").unwrap().changes.updates, 1);
}

#[test]
fn a_backlog_read_in_one_go_equals_the_table() {
    let setup = Setup::new("backlog");
    setup_table(&setup, 1000);
    let pipeline = setup.pipeline("backlog", "public.supplier_invoices", "backlog_slot", RULES);
    let p = pipeline.to_str().unwrap();
    setup.run_once(p);
    // Two rounds of the workload (two truncates, schema changes back and
    // forth) while the pipeline is down, then one catch-up run.
    let mut next_id = 10_000;
    for _ in 0..2 {
        workload(&setup, &mut next_id);
        setup.psql("ALTER TABLE supplier_invoices ADD COLUMN IF NOT EXISTS obsolete integer");
    }
    // And 16,000 rows in transactions of 5 (a tenth of them TOASTed): more
    // WAL than the connector reads as it comes, so the catch-up gathers its
    // bytes before each read.
    let rows = insert_series_sql("2000000 + t * 5", "2000000 + t * 5 + 4");
    // (Not as the pipelines' role: `SET ROLE` would make it one transaction.)
    Cluster::get().psql(
        &setup.db,
        &format!("DO $$ BEGIN FOR t IN 0..3199 LOOP {rows}; COMMIT; END LOOP; END $$"),
    );
    setup.psql("INSERT INTO supplier_invoices (invoice_id, supplier) VALUES (99999999, 'marker')");
    let log = setup.run_once_logged(p, "warn,oppen_connector_postgres=debug");
    assert!(
        log.contains("reads gather"),
        "the backlog was read as it came, not gathered: {log}"
    );
    support::check_whole(&setup.published("backlog")).unwrap();
    assert_matches_fresh_snapshot(&setup, "backlog");
}

/// `run --once` publishes everything committed before it started, also when
/// the server pauses longer than a running pipeline waits for a new stream
/// to catch up (a pause while it decodes a large transaction on a loaded
/// machine ended such a run early, with the rest of the backlog unread).
#[test]
fn a_once_run_reads_the_whole_backlog_through_a_pause_of_the_server() {
    let setup = Setup::new("pause");
    setup_table(&setup, 100);
    let pipeline = setup.pipeline("pause", "public.supplier_invoices", "pause_slot", RULES);
    let p = pipeline.to_str().unwrap();
    setup.run_once(p);
    // A backlog the server takes a while to decode.
    for t in 0..30 {
        let from = 1000 + t * 10_000;
        setup.psql(&insert_sql(from, from + 10_000));
    }
    setup.psql("UPDATE supplier_invoices SET status = 'disputed' WHERE invoice_id % 1000 = 7");
    let mut child = setup.spawn_with(&["run", "--once", p]);
    // Stop the walsender as soon as the run has one.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(pid) = setup.walsender("pause_slot") {
            break pid;
        }
        assert!(Instant::now() < deadline, "the run never started streaming");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it streamed"
        );
    };
    signal(&pid, "-STOP");
    // Longer than a running pipeline waits for a new stream to catch up.
    std::thread::sleep(Duration::from_secs(65));
    let still_running = child.try_wait().unwrap().is_none();
    signal(&pid, "-CONT");
    assert!(
        still_running,
        "the run ended while the server was paused, before the end of the backlog"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "the run failed: {status}");
    support::check_whole(&setup.published("pause")).unwrap();
    assert_matches_fresh_snapshot(&setup, "pause");
}

#[test]
fn changes_that_publish_nothing_still_let_the_slot_advance() {
    let setup = Setup::new("noop");
    setup.psql("CREATE TABLE t (id int PRIMARY KEY, b text, last_seen timestamptz)");
    setup.psql("INSERT INTO t SELECT g, 'x' || g, now() FROM generate_series(1, 100) g");
    // The often-changing column is not published: its changes make no version.
    let rules = "columns:\n  id: keep\n  b: keep\n  last_seen: drop\n";
    let pipeline = setup.pipeline("noop", "public.t", "noop_slot", rules);
    let mut child = setup.spawn(&pipeline);
    setup.wait_for_first("noop", &mut child);
    for _ in 0..5 {
        setup.psql("UPDATE t SET last_seen = now()");
    }
    let lsn = setup.current_lsn();
    setup.wait_for_confirmed(
        "noop_slot",
        lsn,
        Duration::from_secs(60),
        "the slot stays before the changes, so the server keeps their WAL",
    );
    assert_eq!(
        setup.latest("noop").unwrap().version,
        1,
        "no version for unpublished changes"
    );
    // The table's primary key, found by the connector, is described to consumers.
    let package: serde_json::Value = serde_json::from_slice(
        &std::fs::read(setup.published("noop").join("datapackage.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        package["resources"][0]["schema"]["primaryKey"],
        serde_json::json!(["id"]),
        "{package:#}"
    );
    assert!(child.try_wait().unwrap().is_none(), "the pipeline stopped");
}

/// Operations against a live stream: `/readyz` is green while changes flow,
/// turns red within the stall limit when the server's walsender stops sending
/// (new changes wait upstream), and green again when it resumes; the slot's
/// retained WAL is exported; SIGTERM commits the changes held back as a last
/// version and exits 0; neither the database password nor the pseudonym key
/// appears in any output, even at debug level.
#[test]
fn a_stalled_stream_turns_readiness_red_and_sigterm_commits_what_is_held() {
    use support::free_port;
    use support::http::{get, metrics, try_get};
    const HMAC_KEY: &str = "pg-hmac-Secret-0c4e8a2f6b1d3f5a7c9e0b2d4f6a8c1e";
    let setup = Setup::new("operations");
    setup_table(&setup, 500);
    let pipeline = setup.pipeline("drift", "public.supplier_invoices", "drift_slot", RULES);
    // Versions only on the snapshot, on SIGTERM or after an hour: what streams
    // in is held, so the last version at shutdown shows it was committed then.
    let yaml = std::fs::read_to_string(&pipeline)
        .unwrap()
        .replace("heartbeat_seconds: 2", "heartbeat_seconds: 1")
        .replace("interval_seconds: 1", "interval_seconds: 3600")
        + "health:\n  stall_after_seconds: 4\npseudonym_key: { env: TEST_HMAC_KEY }\n";
    std::fs::write(&pipeline, yaml).unwrap();
    let port = free_port();
    let log = setup.dir.path().join("oppen.log");
    let mut child = Running(
        setup
            .command(&["run", pipeline.to_str().unwrap()])
            .env("OPPEN_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "debug")
            .env("TEST_HMAC_KEY", HMAC_KEY)
            .stdout(std::fs::File::create(setup.dir.path().join("oppen.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    setup.wait_for_first("drift", &mut child);
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .filter(|l| !l.contains("DEBUG"))
                    .take(20)
                    .collect();
                panic!("timed out waiting for {what}; the log ends: {tail:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let readyz = || try_get(port, "/readyz").map(|r| (r.status, r.text()));
    wait("/readyz to turn green", &|| {
        readyz().is_some_and(|(s, _)| s == 200)
    });
    setup.psql(&insert_sql(501, 601));
    let d = "dataset=\"drift\"";
    let captured = format!("oppen_changes_captured_total{{{d},source=\"postgres\",op=\"insert\"}}");
    wait("the inserts to be captured", &|| {
        metrics(port).get(&captured).copied() == Some(100.0)
    });
    let retained = format!("oppen_replication_slot_retained_wal_bytes{{{d}}}");
    wait("the slot's retained WAL to be exported", &|| {
        metrics(port).get(&retained).is_some_and(|b| *b > 0.0)
    });
    let m = metrics(port);
    assert_eq!(
        m.get(&format!(
            "oppen_changes_captured_total{{{d},source=\"postgres\",op=\"read\"}}"
        )),
        Some(&500.0)
    );
    assert_eq!(readyz().unwrap().0, 200, "green while changes flow");

    // The walsender stops sending (as when the server is stuck), while new
    // changes are committed upstream.
    let pid = setup
        .walsender("drift_slot")
        .expect("the slot is not active");
    let stopped = Instant::now();
    signal(&pid, "-STOP");
    setup.psql(&insert_sql(601, 651));
    wait("/readyz to turn red", &|| {
        readyz().is_some_and(|(s, body)| s == 503 && body.contains("stalled"))
    });
    let took = stopped.elapsed();
    // Read while the stream is still stopped: once it goes on, readiness
    // turns green again within moments.
    let (_, body) = readyz().unwrap();
    let m = metrics(port);
    signal(&pid, "-CONT");
    assert!(body.contains("nothing has arrived"), "{body}");
    // The limit counts from the last message received, which the heartbeat
    // (every second) had sent at most a second before the stop.
    assert!(
        took >= Duration::from_secs(3),
        "red after {took:?}, before the limit"
    );
    assert_eq!(m.get(&format!("oppen_pipeline_ready{{{d}}}")), Some(&0.0));
    assert_eq!(m.get(&format!("oppen_pipeline_stalled{{{d}}}")), Some(&1.0));
    wait("/readyz to turn green again", &|| {
        readyz().is_some_and(|(s, _)| s == 200)
    });
    wait("the resumed inserts to be captured", &|| {
        metrics(port).get(&captured).copied() == Some(150.0)
    });
    // SIGTERM while a writer keeps the source busy (versions wait for the
    // hour-long interval, or for a pause in the stream): what is held becomes
    // the last version, then a clean exit.
    let db = setup.db.clone();
    let writer = std::thread::spawn(move || {
        Cluster::get().psql(
            &db,
            "DO $$ BEGIN FOR i IN 100000..101499 LOOP \
             INSERT INTO supplier_invoices (invoice_id, supplier) VALUES (i, 'Leverantör ' || i); \
             COMMIT; PERFORM pg_sleep(0.01); END LOOP; END $$",
        )
    });
    wait("the writer's rows to be captured", &|| {
        metrics(port).get(&captured).is_some_and(|n| *n >= 400.0)
    });
    let scraped = get(port, "/metrics", &[]).text() + &readyz().unwrap().1;
    let captured_at_signal = metrics(port)[&captured] as u64;
    support::terminate(&mut child);
    let status = support::wait_exit(&mut child, 30);
    assert!(status.success(), "exit {status:?}");
    let last = setup.latest("drift").unwrap();
    // What the stop guarantees: every row captured before the signal is in
    // the last version. Usually that version is the one committed at the
    // stop; but when the stream paused just before the signal (a loaded
    // machine), the source's idle moment commits what is held at once, and
    // the stop then finds nothing to commit (2026-12-06: the version was
    // older than the signal under the full test suite). Either way no row
    // captured before the signal may be missing.
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("stopping: committing what is held"),
        "the stop was not logged"
    );
    assert!(
        last.rows >= 500 + captured_at_signal,
        "the last version holds {} rows; {} were captured before the signal",
        last.rows,
        500 + captured_at_signal
    );
    writer.join().unwrap();

    assert!(
        try_get(port, "/healthz").is_none(),
        "the endpoints close with the process"
    );
    let outputs = [
        std::fs::read_to_string(&log).unwrap(),
        std::fs::read_to_string(setup.dir.path().join("oppen.out")).unwrap(),
        body,
        scraped,
    ];
    assert!(
        outputs[0].contains("DEBUG"),
        "the log was not at debug level"
    );
    for text in outputs {
        assert!(
            !text.contains(support::postgres::PASSWORD),
            "the database password was printed"
        );
        assert!(!text.contains(HMAC_KEY), "the pseudonym key was printed");
    }
}
