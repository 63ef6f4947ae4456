//! The PostgreSQL connector: a consistent snapshot of one table, then its
//! committed changes by logical replication (pgoutput), exactly once.
//!
//! Start-up without a committed position creates the slot with an exported
//! snapshot, copies the table inside that snapshot (binary COPY, parallel block
//! ranges), and streams from the slot's consistent point: every transaction
//! committed before it is in the copy, every one after it in the stream. With a
//! committed position the stream resumes there. The slot's confirmed flush
//! position moves only when the engine acknowledges a committed version.
//!
//! Pipelines of one process that name the same slot share it (see
//! [`shared`]): one stream feeds them all, and each copies its snapshot
//! inside a temporary slot's exported snapshot instead of re-creating the
//! shared one.

pub mod pgoutput;
pub mod shared;
pub mod snapshot;
pub mod tls;
pub mod types;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use oppen_connector_api::{
    BatchKind, ChangeBatch, Error, Op, Position, Result, Source, SourceEvent, SourceHealth,
};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::pgoutput::{Message, StreamControl, Value};
use crate::types::{ColumnBuilder, Kind};
use crate::wire::{StreamMessage, WireConnection, quote_ident, quote_literal, transient};

/// Rows per emitted batch.
pub const BATCH_ROWS: usize = 64 * 1024;

/// Rows per batch of a snapshot's COPY. The publisher streams a first
/// version's batches to its encoders, and every batch queued or being
/// encoded stays whole in memory until the slowest encoder is done with it:
/// 2,000,000 rows took 251 MB at peak in batches of 65,536 rows, 178 MB in
/// batches of 16,384 and 164 MB in batches of 8,192, for Parquet and CSV; the
/// smaller batches' cost in time is within this machine's noise (from 0.05 s
/// faster to 0.3 s slower across sets; BENCHMARKS.md, issue 7).
pub const SNAPSHOT_BATCH_ROWS: usize = 8 * 1024;

/// Server settings for both connections, so values arrive in the forms decoded here.
const SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c intervalstyle=iso_8601 -c timezone=UTC -c extra_float_digits=3";
/// How often a status update goes to the server even when it does not ask.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How long whole transactions gather before they are handed out even while
/// more arrive, so that a busy stream still lets versions end on time.
const GATHER: Duration = Duration::from_millis(200);
/// How long `next` waits for the stream before reporting idle.
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// How long the stream must stay quiet after rows were handed out before
/// `next` reports idle (and the engine cuts a version): a burst of changes is
/// published 50 ms after its last transaction, not after the idle poll.
const QUIET_WAIT: Duration = Duration::from_millis(50);
/// The prefix of the logical messages the connector emits (heartbeats).
const HEARTBEAT_PREFIX: &str = "oppen-heartbeat";
/// How long a new stream may take to reach the heartbeat emitted at its start
/// before it reports idle anyway (a running pipeline; `run --once` waits).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// While a new stream catches up on a backlog, a read wakes only once this
/// many bytes wait in the socket. The server sends each message as it decodes
/// it, and the connector reads faster than the server decodes: woken for
/// every few messages, it spent a quarter of a catch-up's CPU in wake-ups and
/// socket reads of about 700 bytes each (BENCHMARKS.md, issue 3). Small
/// next to a socket's receive buffer (128 KB to start with on Linux), so the
/// server is never held back by a full buffer while the mark is not reached.
const CATCH_UP_WAKE_BYTES: usize = 32 * 1024;
/// A backlog of less WAL than this is read as it comes.
const CATCH_UP_GATHER_MIN: u64 = 4 << 20;
/// How long a gathering read waits for [`CATCH_UP_WAKE_BYTES`] before it
/// reads the fewer bytes that came (a pause of the server's decoding, or the
/// backlog's end, with the heartbeat that ends the catch-up).
const CATCH_UP_WAKE_WAIT: Duration = Duration::from_millis(10);

/// `source: postgres:` in a pipeline file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string; may hold a password, so never printed.
    pub url: String,
    /// `schema.table` (schema defaults to `public`).
    pub table: String,
    /// The replication slot; created if missing.
    pub slot: String,
    /// The publication; created for the table if missing.
    pub publication: String,
    /// The columns that identify a row; default: the primary key.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// Seconds between heartbeats that let an idle table's slot advance.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
    /// Connections copying the snapshot in parallel (default: the number of
    /// cores, at most 4, half of them when the server runs on this machine,
    /// and one for tables under 64 MB; when set, it holds for any table).
    #[serde(default)]
    pub snapshot_workers: Option<usize>,
}

fn default_heartbeat() -> u64 {
    60
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
    {
        let user = auth.split(':').next().unwrap_or("");
        return format!("{scheme}://{user}:***@{host}");
    }
    // key=value form
    url.split_whitespace()
        .map(|part| {
            if part.starts_with("password=") {
                "password=***"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl PostgresConfig {
    /// Problems found without connecting.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = tls::DbConfig::parse(&self.url) {
            problems.push(format!(
                "url is not a usable PostgreSQL connection string: {e}"
            ));
        }
        if self.table.trim().is_empty() || self.table.split('.').count() > 2 {
            problems.push(format!(
                "table `{}` must be `table` or `schema.table`",
                self.table
            ));
        }
        for (what, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                problems.push(format!(
                    "{what} `{name}` may hold only lowercase letters, digits and `_`"
                ));
            }
        }
        if self.key.as_ref().is_some_and(Vec::is_empty) {
            problems.push("key is empty; leave it out to use the primary key".into());
        }
        problems
    }

    /// The table as schema and name.
    pub fn table(&self) -> Table {
        match self.table.split_once('.') {
            Some((schema, name)) => Table {
                schema: schema.to_string(),
                name: name.to_string(),
            },
            None => Table {
                schema: "public".into(),
                name: self.table.clone(),
            },
        }
    }

    fn sql_config(&self) -> Result<tls::DbConfig> {
        let mut c = tls::DbConfig::parse(&self.url)?;
        c.sql.options(SESSION_OPTIONS);
        c.sql.application_name("oppen");
        c.sql.connect_timeout(Duration::from_secs(10));
        Ok(c)
    }
}

/// A table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
}

impl Table {
    /// `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A column as the connector decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// The SQL type as the catalog names it.
    pub sql_type: String,
    pub kind: Kind,
}

/// Whether every host of `config` is this machine (a loopback address,
/// `localhost` or a Unix socket).
fn on_this_machine(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        })
}

/// What `oppen check --connect` reports.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub server_version: String,
    pub wal_level: String,
    pub can_replicate: bool,
    pub table_exists: bool,
    pub primary_key: Vec<String>,
    pub key: Vec<String>,
    /// `default`, `full`, `index` or `nothing`.
    pub replica_identity: String,
    pub identity_columns: Vec<String>,
    pub columns: Vec<ColumnInfo>,
    pub publication_exists: bool,
    pub publication_has_table: bool,
    pub slot_exists: bool,
    /// Bytes of WAL the slot keeps on the server.
    pub retained_wal_bytes: Option<i64>,
    /// Problems that stop the connector, each with what to do.
    pub problems: Vec<String>,
}

pub(crate) fn sql_error(what: &str, e: &tokio_postgres::Error) -> Error {
    if let Some(untrusted) = tls::certificate_error(e) {
        return untrusted;
    }
    let fatal = e
        .as_db_error()
        .is_some_and(|db| wire::is_fatal_sqlstate(db.code().code()));
    let message = match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{what}: {} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        // The cause too: "error performing TLS handshake" alone says little.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{what}: {e}: {cause}"),
            None => format!("{what}: {e}"),
        },
    };
    if fatal {
        Error::Config(message)
    } else {
        transient(message)
    }
}

/// Connects a plain SQL session.
async fn connect_sql(config: &tls::DbConfig) -> Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect()
        .await
        .map_err(|e| sql_error("connect to PostgreSQL", &e))?;
    tokio::spawn(async move {
        if let Ok(Err(e)) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Looks up a type OID: its kind (domains resolved to their base) and SQL name.
async fn type_kind(
    client: &tokio_postgres::Client,
    oid: u32,
    typmod: i32,
) -> Result<(Kind, String)> {
    let row = client
        .query_opt(
            "WITH RECURSIVE d(oid, typmod, depth) AS ( \
               SELECT $1::oid, $2::int, 0 \
               UNION ALL SELECT t.typbasetype, t.typtypmod, d.depth + 1 FROM d JOIN pg_type t ON t.oid = d.oid \
               WHERE t.typtype = 'd' AND d.depth < 10) \
             SELECT d.oid::int8, d.typmod, t.typtype::text, format_type($1::oid, $2::int), \
               t.typcategory::text, t.typelem::int8 \
             FROM d JOIN pg_type t ON t.oid = d.oid ORDER BY d.depth DESC LIMIT 1",
            &[&oid, &typmod],
        )
        .await
        .map_err(|e| sql_error("reading a column type", &e))?;
    Ok(match row {
        Some(r) => {
            let base: i64 = r.get(0);
            let base_typmod: i32 = r.get(1);
            let typtype: String = r.get(2);
            let category: String = r.get(4);
            let element: i64 = r.get(5);
            let kind = if category == "A" {
                Kind::Array(match element {
                    20 | 21 | 23 | 700 | 701 | 1700 => types::Element::Number,
                    16 => types::Element::Bool,
                    _ => types::Element::Text,
                })
            } else {
                Kind::of(base as u32, base_typmod, typtype == "e")
            };
            (kind, r.get(3))
        }
        None => (Kind::Other, format!("oid {oid}")),
    })
}

/// Types the connector maps to their text form on purpose (no warning).
fn known_as_text(sql_type: &str) -> bool {
    sql_type.ends_with("[]")
        || [
            "interval", "time", "bytea", "numeric", "inet", "cidr", "macaddr", "money", "xml",
            "bit", "oid", "tsvector",
        ]
        .iter()
        .any(|t| sql_type.starts_with(t))
}

/// Connects and checks everything the connector needs.
pub async fn inspect(config: &PostgresConfig, shares_slot: bool) -> Result<Inspection> {
    let client = connect_sql(&config.sql_config()?).await?;
    inspect_with(&client, config, shares_slot).await
}

/// Whether `publication` publishes `table`.
async fn publication_has(
    client: &tokio_postgres::Client,
    publication: &str,
    table: &Table,
) -> Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await
        .map_err(|e| sql_error("reading the publication", &e))?
        .is_some())
}

/// `shared`: the pipeline shares its slot with others of its process, which
/// add their tables to the publication they share (so a publication without
/// the table is no problem).
async fn inspect_with(
    client: &tokio_postgres::Client,
    config: &PostgresConfig,
    shared: bool,
) -> Result<Inspection> {
    let q = |e: tokio_postgres::Error| sql_error("inspecting the source", &e);
    let table = config.table();
    let server = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('wal_level'), \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
             current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(q)?;
    let mut i = Inspection {
        server_version: server.get(0),
        wal_level: server.get(1),
        can_replicate: server.get::<_, Option<bool>>(2).unwrap_or(false),
        table_exists: false,
        primary_key: Vec::new(),
        key: Vec::new(),
        replica_identity: String::new(),
        identity_columns: Vec::new(),
        columns: Vec::new(),
        publication_exists: false,
        publication_has_table: false,
        slot_exists: false,
        retained_wal_bytes: None,
        problems: Vec::new(),
    };
    if server.get::<_, i32>(3) < 140_000 {
        i.problems.push(format!(
            "PostgreSQL {} is too old: the connector needs 14 or newer (logical messages, TID range scans)",
            i.server_version
        ));
    }
    if i.wal_level != "logical" {
        i.problems.push(format!(
            "wal_level is `{}`; logical replication needs `logical`: set wal_level = logical in postgresql.conf and restart the server",
            i.wal_level
        ));
    }
    if !i.can_replicate {
        i.problems.push(
            "the user may not replicate: ALTER ROLE <user> WITH REPLICATION (or connect as one that may)"
                .into(),
        );
    }
    let rel = client
        .query_opt(
            "SELECT c.oid::int8, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(q)?;
    let slot = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(q)?;
    i.slot_exists = slot.is_some();
    i.retained_wal_bytes = slot.and_then(|r| r.get(0));
    i.publication_exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(q)?
        .is_some();
    let Some(rel) = rel else {
        i.problems.push(format!(
            "table {table} does not exist (or the user cannot see it); check `table:` and the user's privileges"
        ));
        return Ok(i);
    };
    i.table_exists = true;
    let oid: i64 = rel.get(0);
    let identity: String = rel.get(1);
    i.replica_identity = match identity.as_str() {
        "d" => "default",
        "f" => "full",
        "i" => "index",
        _ => "nothing",
    }
    .into();
    if i.publication_exists {
        i.publication_has_table = publication_has(client, &config.publication, &table).await?;
        if !i.publication_has_table && !shared {
            i.problems.push(format!(
                "publication `{}` exists but does not include {table}: ALTER PUBLICATION {} ADD TABLE {} \
                 (pipelines that share a slot in one `oppen run` add their tables themselves)",
                config.publication,
                quote_ident(&config.publication),
                table.quoted()
            ));
        }
    }
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod FROM pg_attribute a \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(q)?;
    for c in columns {
        let type_oid: i64 = c.get(1);
        let (kind, sql_type) = type_kind(client, type_oid as u32, c.get(2)).await?;
        if kind == Kind::Other && !known_as_text(&sql_type) {
            tracing::warn!(table = %table, column = c.get::<_, String>(0), sql_type, "unknown column type; published as the server's text form");
        }
        i.columns.push(ColumnInfo {
            name: c.get(0),
            sql_type,
            kind,
        });
    }
    let index_columns = |flag: &'static str| {
        format!(
            "SELECT a.attname::text FROM pg_index x JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum \
             WHERE x.indrelid = $1::int8::oid AND x.{flag} ORDER BY k.ord"
        )
    };
    i.primary_key = client
        .query(&index_columns("indisprimary"), &[&oid])
        .await
        .map_err(q)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    i.identity_columns = match i.replica_identity.as_str() {
        "default" => i.primary_key.clone(),
        "index" => client
            .query(&index_columns("indisreplident"), &[&oid])
            .await
            .map_err(q)?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        "full" => i.columns.iter().map(|c| c.name.clone()).collect(),
        _ => Vec::new(),
    };
    i.key = config.key.clone().unwrap_or_else(|| i.primary_key.clone());
    if i.key.is_empty() {
        i.problems.push(format!(
            "{table} has no primary key and the pipeline names no `key:`; add `key: [column, ...]` \
             naming columns that identify a row (with REPLICA IDENTITY FULL or USING INDEX on them)"
        ));
    }
    for k in &i.key {
        if !i.columns.iter().any(|c| &c.name == k) {
            i.problems
                .push(format!("key column `{k}` is not a column of {table}"));
        }
    }
    if i.replica_identity == "nothing" {
        i.problems.push(format!(
            "{table} has REPLICA IDENTITY NOTHING: updates and deletes carry no key, so they cannot be published; \
             run ALTER TABLE {} REPLICA IDENTITY DEFAULT (or FULL)",
            table.quoted()
        ));
    } else if !i.key.is_empty() && !i.key.iter().all(|k| i.identity_columns.contains(k)) {
        i.problems.push(format!(
            "the key ({}) is not part of {table}'s replica identity ({}: {}), so deletes would not carry it; \
             use the primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
            i.key.join(", "),
            i.replica_identity,
            i.identity_columns.join(", "),
            table.quoted()
        ));
    }
    Ok(i)
}

/// The stream's view of the table.
#[derive(Debug)]
struct RelationState {
    oid: u32,
    columns: Vec<ColumnInfo>,
    schema: SchemaRef,
    key_index: Vec<usize>,
}

/// Rows being gathered into the next batch.
#[derive(Debug)]
struct Pending {
    builders: Vec<ColumnBuilder>,
    ops: Vec<Op>,
}

impl Pending {
    fn new(columns: &[ColumnInfo]) -> Self {
        Pending {
            builders: columns
                .iter()
                .map(|c| ColumnBuilder::new(c.kind, 1024))
                .collect(),
            ops: Vec::new(),
        }
    }
}

enum Phase {
    /// Not started.
    Idle,
    /// Copying the table.
    Snapshot {
        rx: mpsc::Receiver<snapshot::SnapshotItem>,
        consistent_point: u64,
        /// Held open until every copying connection has imported the
        /// exported snapshot.
        exporter: Option<WireConnection>,
        /// How many have not yet.
        importing: watch::Receiver<usize>,
    },
    /// Streaming changes.
    Streaming,
}

/// Where the replication stream comes from.
enum Stream {
    /// The slot's own connection.
    Own(WireConnection),
    /// A slot shared with other pipelines of the process.
    Shared(shared::Subscription),
}

impl Stream {
    /// See [`WireConnection::wake_after`]; a shared stream's reads are the
    /// shared reader's.
    fn wake_after(&self, bytes: usize) -> bool {
        match self {
            Stream::Own(repl) => repl.wake_after(bytes),
            Stream::Shared(_) => false,
        }
    }

    fn try_recv(&mut self) -> Result<Option<StreamMessage>> {
        match self {
            Stream::Own(repl) => repl.try_recv(),
            Stream::Shared(sub) => sub.try_recv(),
        }
    }

    async fn recv(&mut self) -> Result<StreamMessage> {
        match self {
            Stream::Own(repl) => repl.recv().await,
            Stream::Shared(sub) => sub.recv().await,
        }
    }

    async fn close(self) {
        match self {
            Stream::Own(repl) => repl.close().await,
            // Dropping the subscription leaves the shared stream.
            Stream::Shared(_) => {}
        }
    }
}

/// The error for a slot that is gone, with the recovery.
fn slot_gone(slot: &str, e: Error) -> Error {
    match e {
        Error::Config(m) if m.contains("does not exist") => Error::Config(format!(
            "{m}. The replication slot `{slot}` is gone, so changes since the last version cannot be read. \
             To recover, run `oppen run --resnapshot` on this pipeline once: it creates the slot again \
             and publishes a fresh snapshot of the table as a new version"
        )),
        other => other,
    }
}

/// The PostgreSQL source.
pub struct PostgresSource {
    config: PostgresConfig,
    sql_config: tls::DbConfig,
    table: Table,
    key: Vec<String>,
    client: Option<tokio_postgres::Client>,
    repl: Option<Stream>,
    /// The hub of the slot, when pipelines of this process share it.
    hub: Option<Arc<shared::Hub>>,
    /// This source's place in the shared slot, from start on.
    membership: Option<shared::Membership>,
    phase: Phase,
    relation: Option<RelationState>,
    pending: Option<Pending>,
    ready: VecDeque<ChangeBatch>,
    /// Relations described in this replication session.
    known_relations: std::collections::HashSet<u32>,
    /// Known type kinds by (oid, typmod).
    type_cache: HashMap<(u32, i32), Kind>,
    /// Acknowledged by the engine (a committed version holds everything up to it).
    acked: u64,
    /// The end of the newest transaction handed to the engine.
    emitted: u64,
    /// The end of the newest transaction read (emitted or pending) that
    /// touched this table. Other transactions do not count: a shared slot
    /// streams every table's transactions to every pipeline, and an idle
    /// pipeline must not hold the slot back waiting for versions that will
    /// never come.
    last_commit: u64,
    /// Whether the transaction under way changed this table.
    txn_touched: bool,
    /// The server's sent WAL position from its newest keepalive.
    received: u64,
    /// Transactions ending at or before this were handed out already.
    skip_through: u64,
    in_transaction: bool,
    skipping: bool,
    commit_time: Option<DateTime<Utc>>,
    last_status: Instant,
    last_heartbeat: Instant,
    columns: Vec<ColumnInfo>,
    /// Restart the snapshot from scratch on the next call.
    restart_snapshot: bool,
    /// Whether the stream has reached the heartbeat emitted when it started,
    /// i.e. everything committed before the start is read. Until then the
    /// source does not report idle (so `run --once` publishes it).
    caught_up: bool,
    /// Rows were handed out since the last idle (see [`QUIET_WAIT`]).
    handed_out: bool,
    /// Where the heartbeat emitted at the stream's start is.
    catch_up_target: Option<u64>,
    /// Reads wake only for [`CATCH_UP_WAKE_BYTES`] (a backlog is being read).
    gathering: bool,
    /// Whether idle waits for the start's heartbeat however long the backlog
    /// takes (`run --once`), instead of at most [`CATCH_UP_LIMIT`].
    whole_backlog: bool,
    stream_started: Instant,
    /// When the oldest pending row arrived.
    pending_since: Option<Instant>,
    /// What the engine's health checks see (see [`Source::health`]).
    health: SourceHealth,
    /// The server's WAL end seen by the poll that set `health.behind_since`.
    behind_lsn: u64,
    /// When the slot was last polled for its retained WAL.
    last_poll: Option<Instant>,
    /// The streamed transaction whose block is being read.
    stream_xid: Option<u32>,
    /// Transactions the server streams before they commit, kept until their
    /// commit (replayed then) or abort (dropped).
    streamed: HashMap<u32, Streamed>,
}

/// The messages of a transaction streamed before its commit, one buffer per
/// transaction (not one allocation per message: a million-row transaction
/// streams a million messages).
#[derive(Debug, Default)]
struct Streamed {
    bytes: Vec<u8>,
    /// (subtransaction xid, start, end) of each message in `bytes`.
    messages: Vec<(u32, usize, usize)>,
    /// Subtransactions rolled back (ROLLBACK TO SAVEPOINT): their messages are skipped.
    aborted: std::collections::HashSet<u32>,
}

impl fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSource")
            .field("table", &self.table)
            .field("slot", &self.config.slot)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

impl PostgresSource {
    /// Reports idle only once everything committed before the stream started
    /// is read, however long that takes (for `run --once`: a pause while the
    /// server decodes a large transaction is not the end of the backlog).
    #[must_use]
    pub fn reading_to_the_end(mut self) -> Self {
        self.whole_backlog = true;
        self
    }

    /// Reads the slot through `hub`, shared with other pipelines of the
    /// process (see [`shared`]).
    #[must_use]
    pub fn sharing(mut self, hub: Option<Arc<shared::Hub>>) -> Self {
        self.hub = hub;
        self
    }

    /// A source for `config`; nothing connects until [`Source::start`].
    pub fn new(config: PostgresConfig) -> Result<Self> {
        let sql_config = config.sql_config()?;
        Ok(PostgresSource {
            table: config.table(),
            key: config.key.clone().unwrap_or_default(),
            config,
            sql_config,
            client: None,
            repl: None,
            hub: None,
            membership: None,
            phase: Phase::Idle,
            relation: None,
            pending: None,
            ready: VecDeque::new(),
            type_cache: HashMap::new(),
            known_relations: Default::default(),
            acked: 0,
            emitted: 0,
            last_commit: 0,
            txn_touched: false,
            received: 0,
            skip_through: 0,
            in_transaction: false,
            skipping: false,
            commit_time: None,
            last_status: Instant::now(),
            last_heartbeat: Instant::now(),
            columns: Vec::new(),
            restart_snapshot: false,
            caught_up: false,
            handed_out: false,
            catch_up_target: None,
            gathering: false,
            whole_backlog: false,
            stream_started: Instant::now(),
            pending_since: None,
            health: SourceHealth::default(),
            behind_lsn: 0,
            last_poll: None,
            stream_xid: None,
            streamed: HashMap::new(),
        })
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        if self
            .client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            self.client = Some(connect_sql(&self.sql_config).await?);
        }
        self.client
            .as_ref()
            .ok_or_else(|| transient("no SQL connection"))
    }

    fn schema_of(columns: &[ColumnInfo]) -> SchemaRef {
        Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.kind.arrow_type(), true))
                .collect::<Vec<_>>(),
        ))
    }

    /// Creates the publication if missing; a pipeline sharing its slot adds
    /// its table to the publication if it lacks it.
    async fn ensure_publication(&mut self, inspection: &Inspection) -> Result<()> {
        if inspection.publication_has_table {
            return Ok(());
        }
        let (publication, table) = (quote_ident(&self.config.publication), self.table.quoted());
        let duplicate = |e: &tokio_postgres::Error| {
            e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT)
        };
        let as_owner = |sql: &str, e: &tokio_postgres::Error| match sql_error(sql, e) {
            Error::Config(m) => Error::Config(format!(
                "{m}. Either connect as the table's owner, or have the owner run `{sql}` \
                 and name that publication in `publication:`"
            )),
            other => other,
        };
        if !inspection.publication_exists {
            let sql = format!("CREATE PUBLICATION {publication} FOR TABLE {table}");
            match self.client().await?.batch_execute(&sql).await {
                Ok(()) => {
                    tracing::info!(publication = self.config.publication, table = %self.table, "created publication");
                    return Ok(());
                }
                // Another pipeline created it meanwhile, maybe for its own table.
                Err(e) if duplicate(&e) => {}
                Err(e) => return Err(as_owner(&sql, &e)),
            }
            let (name, ours) = (self.config.publication.clone(), self.table.clone());
            if publication_has(self.client().await?, &name, &ours).await? {
                return Ok(());
            }
        }
        if self.hub.is_none() {
            return Err(Error::Config(format!(
                "publication `{}` was created meanwhile without {}: ALTER PUBLICATION {publication} ADD TABLE {table}, \
                 or name a publication of this pipeline's own",
                self.config.publication, self.table
            )));
        }
        let sql = format!("ALTER PUBLICATION {publication} ADD TABLE {table}");
        match self.client().await?.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(publication = self.config.publication, table = %self.table, "added the table to the shared slot's publication");
                Ok(())
            }
            Err(e) if duplicate(&e) => Ok(()),
            Err(e) => Err(as_owner(&sql, &e)),
        }
    }

    /// Drops the slot (a snapshot interrupted earlier leaves one behind).
    async fn drop_slot(&mut self) -> Result<()> {
        let slot = self.config.slot.clone();
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| sql_error("reading replication slots", &e))?;
        let Some(row) = row else { return Ok(()) };
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            return Err(transient(format!(
                "replication slot `{slot}` is in use by server process {pid}; waiting for it to end"
            )));
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|e| sql_error("dropping the unfinished slot", &e))?;
        Ok(())
    }

    /// Creates the shared slot if it is missing: without a snapshot, as each
    /// member copies its table inside a temporary slot's own.
    async fn ensure_shared_slot(&mut self) -> Result<()> {
        let slot = self.config.slot.clone();
        let created = self
            .client()
            .await?
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await;
        match created {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(slot, "created the shared replication slot");
                }
                Ok(())
            }
            // Another member created it meanwhile.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {
                Ok(())
            }
            Err(e) => Err(sql_error("creating the replication slot", &e)),
        }
    }

    async fn begin_snapshot(&mut self) -> Result<()> {
        let mut repl;
        let created = if self.hub.is_some() {
            // The shared slot streams to the other members meanwhile: the copy
            // takes a temporary slot's snapshot, and this member later skips
            // the transactions before that slot's consistent point (they are
            // in the copy). Its membership pins the shared slot from before
            // the temporary one was made, so none after it is confirmed away.
            static TEMPORARY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            self.ensure_shared_slot().await?;
            let name = format!(
                "oppen_snapshot_{}_{}",
                std::process::id(),
                TEMPORARY.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            repl = WireConnection::replication(&self.sql_config, SESSION_OPTIONS).await?;
            repl.create_slot(&name, true).await?
        } else {
            self.drop_slot().await?;
            repl = WireConnection::replication(&self.sql_config, SESSION_OPTIONS).await?;
            repl.create_slot(&self.config.slot, false).await?
        };
        let name = created
            .snapshot
            .clone()
            .ok_or_else(|| transient("CREATE_REPLICATION_SLOT exported no snapshot"))?;
        let size_sql = format!(
            "SELECT relpages::int8, reltuples::int8 FROM pg_class WHERE oid = {}::regclass",
            quote_literal(&self.table.quoted())
        );
        let size = self
            .client()
            .await?
            .query_one(&size_sql, &[])
            .await
            .map_err(|e| sql_error("reading the table size", &e))?;
        let pages: i64 = size.get(0);
        // -1 when the table was never vacuumed or analyzed: no estimate.
        let estimate: i64 = size.get(1);
        self.health.image_rows = u64::try_from(estimate).ok();
        let workers = snapshot::connections(
            pages,
            self.config.snapshot_workers,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            on_this_machine(&self.sql_config.sql),
        );
        tracing::info!(table = %self.table, slot = self.config.slot, consistent_point = %wire::format_lsn(created.consistent_point), pages, workers, "copying snapshot");
        let (rx, importing) = snapshot::start(snapshot::SnapshotPlan {
            config: self.sql_config.clone(),
            table: self.table.clone(),
            columns: self.columns.clone(),
            schema: Self::schema_of(&self.columns),
            snapshot: name,
            pages,
            workers,
            batch_rows: SNAPSHOT_BATCH_ROWS,
        });
        self.relation = None;
        self.phase = Phase::Snapshot {
            rx,
            consistent_point: created.consistent_point,
            exporter: Some(repl),
            importing,
        };
        Ok(())
    }

    async fn start_stream(&mut self, from: u64) -> Result<()> {
        let stream = match &self.membership {
            // The shared stream restarts from the lowest position of its
            // members, which is at most `from`.
            Some(membership) => Stream::Shared(membership.subscribe()),
            None => {
                let mut repl =
                    WireConnection::replication(&self.sql_config, SESSION_OPTIONS).await?;
                repl.start_replication(
                    &self.config.slot,
                    from,
                    std::slice::from_ref(&self.config.publication),
                )
                .await
                .map_err(|e| slot_gone(&self.config.slot, e))?;
                Stream::Own(repl)
            }
        };
        self.repl = Some(stream);
        self.known_relations.clear();
        self.relation = None;
        self.pending = None;
        self.in_transaction = false;
        self.last_status = Instant::now();
        self.stream_started = Instant::now();
        self.catch_up_target = self.emit_heartbeat().await;
        if self.catch_up_target.is_none() && self.whole_backlog {
            // Without the mark a run that reads the backlog and stops could
            // stop at any pause of the stream, before the end: start again.
            self.repl = None;
            return Err(transient(format!(
                "cannot emit the heartbeat that marks the end of {}'s backlog (see the warning before)",
                self.table
            )));
        }
        self.caught_up = self.catch_up_target.is_none();
        let backlog = self.catch_up_target.map_or(0, |t| t.saturating_sub(from));
        self.gathering = backlog >= CATCH_UP_GATHER_MIN && self.wake_after(CATCH_UP_WAKE_BYTES);
        if self.gathering {
            tracing::debug!(table = %self.table, backlog_bytes = backlog, "catching up: reads gather the stream's bytes");
        }
        Ok(())
    }

    /// Reads wake for any byte again (the backlog is read); a read waiting
    /// for fewer bytes is woken now.
    fn stop_gathering(&mut self) {
        if std::mem::take(&mut self.gathering) {
            self.wake_after(1);
        }
    }

    /// See [`WireConnection::wake_after`].
    fn wake_after(&self, bytes: usize) -> bool {
        self.repl.as_ref().is_some_and(|r| r.wake_after(bytes))
    }

    /// The next snapshot event.
    async fn next_snapshot(&mut self) -> Result<SourceEvent> {
        let Phase::Snapshot {
            rx,
            consistent_point,
            exporter,
            importing,
        } = &mut self.phase
        else {
            return Ok(SourceEvent::Idle);
        };
        let consistent_point = *consistent_point;
        match rx.recv().await {
            Some(Ok(data)) => {
                // Once every connection has imported the snapshot, the
                // exporting session may end. (Rows flowing from one is not
                // enough: another may still be connecting.)
                if *importing.borrow() == 0
                    && let Some(repl) = exporter.take()
                {
                    repl.close().await;
                }
                let ops = vec![Op::Read; data.num_rows()];
                Ok(SourceEvent::Batch(ChangeBatch {
                    data,
                    ops,
                    kind: BatchKind::Snapshot,
                    position: Position::Lsn {
                        lsn: consistent_point,
                    },
                    commit_time: None,
                    end_of_transaction: false,
                }))
            }
            Some(Err(e)) => {
                // The staged part is harmless: a restarted snapshot re-emits every row.
                self.restart_snapshot = true;
                self.phase = Phase::Idle;
                Err(e)
            }
            None => {
                if let Some(repl) = exporter.take() {
                    repl.close().await;
                }
                tracing::info!(table = %self.table, "snapshot copied; streaming changes");
                self.health.image_rows = None;
                self.phase = Phase::Streaming;
                self.emitted = consistent_point;
                self.last_commit = consistent_point;
                self.skip_through = consistent_point;
                let schema = Self::schema_of(&self.columns);
                Ok(SourceEvent::Batch(ChangeBatch {
                    data: RecordBatch::new_empty(schema),
                    ops: Vec::new(),
                    kind: BatchKind::Snapshot,
                    position: Position::Lsn {
                        lsn: consistent_point,
                    },
                    commit_time: None,
                    end_of_transaction: true,
                }))
            }
        }
    }

    /// Moves the pending rows into the ready queue.
    fn flush(&mut self, end_of_transaction: bool) -> Result<()> {
        let Some(p) = self.pending.as_mut() else {
            return Ok(());
        };
        if p.ops.is_empty() && !end_of_transaction {
            return Ok(());
        }
        let Some(rel) = &self.relation else {
            return Ok(());
        };
        let columns = p.builders.iter_mut().map(ColumnBuilder::finish).collect();
        let data = RecordBatch::try_new(rel.schema.clone(), columns)
            .map_err(|e| transient(format!("building a change batch: {e}")))?;
        let ops = std::mem::take(&mut p.ops);
        self.pending_since = None;
        if end_of_transaction {
            self.emitted = self.last_commit;
        }
        self.ready.push_back(ChangeBatch {
            data,
            ops,
            kind: BatchKind::Changes,
            position: Position::Lsn {
                lsn: self.last_commit,
            },
            commit_time: self.commit_time,
            end_of_transaction,
        });
        Ok(())
    }

    async fn on_relation(&mut self, r: pgoutput::Relation) -> Result<()> {
        if r.namespace != self.table.schema || r.name != self.table.name {
            return Ok(());
        }
        let mut columns = Vec::with_capacity(r.columns.len());
        for c in &r.columns {
            let kind = match self.type_cache.get(&(c.type_oid, c.type_modifier)) {
                Some(k) => *k,
                None => {
                    let (kind, _) =
                        type_kind(self.client().await?, c.type_oid, c.type_modifier).await?;
                    self.type_cache.insert((c.type_oid, c.type_modifier), kind);
                    kind
                }
            };
            let sql_type = self
                .columns
                .iter()
                .find(|k| k.name == c.name)
                .map(|k| k.sql_type.clone())
                .unwrap_or_default();
            columns.push(ColumnInfo {
                name: c.name.clone(),
                sql_type,
                kind,
            });
        }
        let key_index: Vec<usize> = self
            .key
            .iter()
            .map(|k| {
                columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                    Error::Config(format!(
                        "key column `{k}` is no longer a column of {}",
                        self.table
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let same = self
            .relation
            .as_ref()
            .is_some_and(|old| old.columns == columns);
        if let Some(old) = &mut self.relation
            && same
        {
            old.oid = r.oid;
            return Ok(());
        }
        if self.relation.is_some() {
            tracing::info!(table = %self.table, columns = ?columns.iter().map(|c| &c.name).collect::<Vec<_>>(), "table schema changed");
            // Rows gathered so far are whole transactions unless this one already
            // touched the table (rows, or a truncate whose empty image is out
            // already): then they continue it, whatever the schema.
            self.flush(!self.txn_touched)?;
        }
        self.pending = Some(Pending::new(&columns));
        self.relation = Some(RelationState {
            oid: r.oid,
            schema: Self::schema_of(&columns),
            columns,
            key_index,
        });
        Ok(())
    }

    /// Appends one row image; unchanged TOAST values are filled from `old`
    /// (REPLICA IDENTITY FULL) or read from the table.
    async fn append(
        &mut self,
        op: Op,
        values: &[Value<'_>],
        old: Option<&[Value<'_>]>,
    ) -> Result<()> {
        let needs_fetch: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(i, v)| {
                **v == Value::UnchangedToast
                    && !old.is_some_and(|o| matches!(o.get(*i), Some(Value::Text(_))))
            })
            .map(|(i, _)| i)
            .collect();
        let fetched = if needs_fetch.is_empty() {
            Vec::new()
        } else {
            self.fetch_unchanged(values, &needs_fetch).await?
        };
        let (Some(p), Some(rel)) = (self.pending.as_mut(), self.relation.as_ref()) else {
            return Err(transient("a change arrived before its relation"));
        };
        if values.len() != p.builders.len() {
            return Err(transient(format!(
                "a change of {} has {} columns, its relation {}",
                self.table,
                values.len(),
                p.builders.len()
            )));
        }
        for (i, v) in values.iter().enumerate() {
            let kind = rel.columns[i].kind;
            let b = &mut p.builders[i];
            let result = match v {
                Value::Null => {
                    b.append_null();
                    Ok(())
                }
                Value::Text(t) => b.append_text(t),
                Value::Binary(t) => b.append_binary(kind, t),
                Value::UnchangedToast => match old.and_then(|o| o.get(i)) {
                    Some(Value::Text(t)) => b.append_text(t),
                    _ => match fetched.iter().find(|(c, _)| *c == i) {
                        Some((_, Some(t))) => b.append_text(t.as_bytes()),
                        _ => {
                            b.append_null();
                            Ok(())
                        }
                    },
                },
            };
            if let Err(e) = result {
                return Err(Error::Config(format!(
                    "{}, column {}: cannot decode a streamed value: {e}",
                    self.table, rel.columns[i].name
                )));
            }
        }
        p.ops.push(op);
        self.pending_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Reads the current values of unchanged TOASTed columns by key. The value
    /// read may be newer than the change; a newer change follows in the stream.
    async fn fetch_unchanged(
        &mut self,
        values: &[Value<'_>],
        columns: &[usize],
    ) -> Result<Vec<(usize, Option<String>)>> {
        let Some(rel) = &self.relation else {
            return Ok(Vec::new());
        };
        let mut keys = Vec::new();
        let mut filter = Vec::new();
        for (n, &k) in rel.key_index.iter().enumerate() {
            let Some(Value::Text(t)) = values.get(k) else {
                return Ok(Vec::new());
            };
            keys.push(String::from_utf8_lossy(t).into_owned());
            filter.push(format!(
                "{}::text = ${}",
                quote_ident(&rel.columns[k].name),
                n + 1
            ));
        }
        let select: Vec<String> = columns
            .iter()
            .map(|&c| format!("{}::text", quote_ident(&rel.columns[c].name)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            select.join(", "),
            self.table.quoted(),
            filter.join(" AND ")
        );
        let columns = columns.to_vec();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = keys
            .iter()
            .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let row = self
            .client()
            .await?
            .query_opt(&sql, &params)
            .await
            .map_err(|e| sql_error("reading unchanged TOAST values", &e))?;
        Ok(columns
            .iter()
            .enumerate()
            .map(|(n, &c)| (c, row.as_ref().and_then(|r| r.get::<_, Option<String>>(n))))
            .collect())
    }

    /// Handles one message of the stream: a streamed transaction's messages
    /// are kept until it commits, then replayed as one transaction.
    async fn on_wal(&mut self, data: &[u8]) -> Result<()> {
        let decode_error = |e: pgoutput::DecodeError| transient(e.to_string());
        match pgoutput::decode_stream_control(data).map_err(decode_error)? {
            Some(StreamControl::Start { xid }) => self.stream_xid = Some(xid),
            Some(StreamControl::Stop) => self.stream_xid = None,
            Some(StreamControl::Abort { xid, subxid }) => {
                if xid == subxid {
                    self.streamed.remove(&xid);
                } else if let Some(s) = self.streamed.get_mut(&xid) {
                    s.aborted.insert(subxid);
                }
            }
            Some(StreamControl::Commit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
            }) => {
                let s = self.streamed.remove(&xid).unwrap_or_default();
                self.on_message(&pgoutput::begin_message(commit_lsn, commit_time, xid))
                    .await?;
                for &(sub, start, end) in &s.messages {
                    if !s.aborted.contains(&sub) {
                        self.on_message(&s.bytes[start..end]).await?;
                    }
                }
                self.on_message(&pgoutput::commit_message(commit_lsn, end_lsn, commit_time))
                    .await?;
            }
            None => match self.stream_xid {
                Some(xid) => {
                    let (sub, plain) = pgoutput::unwrap_streamed(data).map_err(decode_error)?;
                    let s = self.streamed.entry(xid).or_default();
                    let start = s.bytes.len();
                    s.bytes.extend_from_slice(&plain);
                    s.messages.push((sub, start, s.bytes.len()));
                }
                None => self.on_message(data).await?,
            },
        }
        Ok(())
    }

    /// Handles one pgoutput message.
    async fn on_message(&mut self, data: &[u8]) -> Result<()> {
        let message = pgoutput::decode(data).map_err(|e| transient(e.to_string()))?;
        let ours =
            |oid: u32, rel: &Option<RelationState>| rel.as_ref().is_some_and(|r| r.oid == oid);
        match message {
            Message::Begin {
                final_lsn,
                commit_time,
                ..
            } => {
                self.in_transaction = true;
                self.txn_touched = false;
                self.skipping = final_lsn < self.skip_through;
                self.commit_time =
                    DateTime::from_timestamp_micros(commit_time + wire::PG_EPOCH_OFFSET_US);
            }
            Message::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                if !self.skipping {
                    if self.txn_touched {
                        self.last_commit = end_lsn;
                    }
                    let rows = self.pending.as_ref().map_or(0, |p| p.ops.len());
                    // `rows == 0` after touching the table: the transaction's
                    // batches went out unfinished (a truncate, or rows flushed
                    // in full batches), so close it now, or its version would
                    // wait for the table's next transaction.
                    if rows >= BATCH_ROWS
                        || (self.txn_touched && rows == 0)
                        || self.pending_since.is_some_and(|t| t.elapsed() >= GATHER)
                    {
                        self.flush(true)?;
                    }
                }
                self.skipping = false;
            }
            // Only the heartbeat this stream emitted counts: one from an earlier
            // session may still be ahead in the slot.
            Message::Message { lsn, prefix }
                if prefix == HEARTBEAT_PREFIX && self.catch_up_target.is_some_and(|t| lsn >= t) =>
            {
                self.caught_up = true;
                self.stop_gathering();
            }
            // Relations are described once per session: take every description,
            // also inside transactions skipped as already handed out.
            Message::Relation(r) => {
                self.known_relations.insert(r.oid);
                self.on_relation(r).await?;
            }
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. }
                if !self.known_relations.contains(&relation) =>
            {
                return Err(transient(format!(
                    "the stream sent a change of relation {relation} before describing it"
                )));
            }
            _ if self.skipping => {}
            Message::Insert { relation, new } if ours(relation, &self.relation) => {
                self.txn_touched = true;
                self.append(Op::Insert, &new, None).await?;
            }
            Message::Update { relation, old, new } if ours(relation, &self.relation) => {
                self.txn_touched = true;
                match &old {
                    // The key changed: the old key is gone.
                    Some((b'K', old_key)) => self.append(Op::Delete, old_key, None).await?,
                    Some((_, old_row)) if self.key_changed(old_row, &new) => {
                        let key_only = self.key_only(old_row);
                        self.append(Op::Delete, &key_only, None).await?;
                    }
                    _ => {}
                }
                let full_old = old
                    .as_ref()
                    .filter(|(m, _)| *m == b'O')
                    .map(|(_, v)| v.as_slice());
                self.append(Op::Update, &new, full_old).await?;
            }
            Message::Delete { relation, old } if ours(relation, &self.relation) => {
                self.txn_touched = true;
                self.append(Op::Delete, &old.1, None).await?;
            }
            Message::Truncate { relations, .. } => {
                tracing::debug!(table = %self.table, ?relations, "truncate");
                if self
                    .relation
                    .as_ref()
                    .is_some_and(|r| relations.contains(&r.oid))
                {
                    // Everything before is replaced by an empty image; rows
                    // inserted later in the same transaction join that image.
                    self.txn_touched = true;
                    self.flush(false)?;
                    if let Some(rel) = &self.relation {
                        self.ready.push_back(ChangeBatch {
                            data: RecordBatch::new_empty(rel.schema.clone()),
                            ops: Vec::new(),
                            kind: BatchKind::Snapshot,
                            position: Position::Lsn {
                                lsn: self.last_commit,
                            },
                            commit_time: self.commit_time,
                            end_of_transaction: false,
                        });
                    }
                }
            }
            _ => {}
        }
        if self.in_transaction
            && self
                .pending
                .as_ref()
                .is_some_and(|p| p.ops.len() >= BATCH_ROWS)
        {
            self.flush(false)?;
        }
        Ok(())
    }

    fn key_changed(&self, old: &[Value<'_>], new: &[Value<'_>]) -> bool {
        self.relation.as_ref().is_some_and(|rel| {
            rel.key_index
                .iter()
                .any(|&k| matches!((old.get(k), new.get(k)), (Some(a), Some(b)) if a != b && *b != Value::UnchangedToast))
        })
    }

    fn key_only<'a>(&self, row: &[Value<'a>]) -> Vec<Value<'a>> {
        let Some(rel) = &self.relation else {
            return row.to_vec();
        };
        row.iter()
            .enumerate()
            .map(|(i, v)| {
                if rel.key_index.contains(&i) {
                    *v
                } else {
                    Value::Null
                }
            })
            .collect()
    }

    /// Sends a status update: `flush` is what a committed version holds, or,
    /// with nothing outstanding, everything the server has sent.
    async fn send_status(&mut self) -> Result<()> {
        let outstanding = self.in_transaction
            || self.pending.as_ref().is_some_and(|p| !p.ops.is_empty())
            || !self.ready.is_empty()
            || self.last_commit > self.acked;
        let flush = if outstanding {
            self.acked
        } else {
            self.acked.max(self.received)
        };
        if let Some(Stream::Own(repl)) = self.repl.as_mut() {
            repl.send_status(self.received.max(flush), flush).await?;
        }
        if let Some(membership) = &self.membership {
            membership.set_flush(flush);
        }
        self.last_status = Instant::now();
        Ok(())
    }

    async fn heartbeat(&mut self) {
        if self.config.heartbeat_seconds == 0
            || self.last_heartbeat.elapsed() < Duration::from_secs(self.config.heartbeat_seconds)
        {
            return;
        }
        self.emit_heartbeat().await;
    }

    /// Writes a logical message into the WAL. It streams back to every slot on
    /// the database, so an idle table's slot still advances (the server keeps
    /// no WAL for it), and its arrival tells that the stream has caught up.
    /// Returns where it was written.
    ///
    /// The message is transactional and its transaction commits with
    /// `synchronous_commit` set to `local`, so the commit flushes the WAL
    /// and the server sends the message at once (without waiting for any
    /// synchronous standby, which a walsender does not need). A walsender
    /// sends only flushed WAL, and a non-transactional message (no commit)
    /// waits for the WAL writer, up to `wal_writer_delay` (200 ms by
    /// default), before any slot sees it: time every `run --once` spent
    /// waiting for its backlog's end.
    async fn emit_heartbeat(&mut self) -> Option<u64> {
        self.last_heartbeat = Instant::now();
        let result = match self.client().await {
            Ok(c) => c
                .query_one(
                    "SELECT pg_logical_emit_message(true, $1, '')::text \
                     FROM set_config('synchronous_commit', 'local', true)",
                    &[&HEARTBEAT_PREFIX],
                )
                .await
                .map(|row| row.get::<_, String>(0))
                .map_err(|e| sql_error("heartbeat", &e)),
            Err(e) => Err(e),
        };
        match result {
            Ok(lsn) => wire::parse_lsn(&lsn),
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "heartbeat failed");
                None
            }
        }
    }

    async fn next_stream(&mut self) -> Result<SourceEvent> {
        if self.repl.is_none() {
            let from = self.acked.max(1);
            self.skip_through = self.emitted;
            self.start_stream(from).await?;
        }
        let quiet = if self.handed_out {
            QUIET_WAIT
        } else {
            IDLE_WAIT
        };
        let deadline = Instant::now() + quiet;
        let was_caught_up = self.caught_up;
        loop {
            if let Some(batch) = self.ready.pop_front() {
                self.handed_out = true;
                return Ok(SourceEvent::Batch(batch));
            }
            let has_rows = self.pending.as_ref().is_some_and(|p| !p.ops.is_empty());
            if self.caught_up && !was_caught_up && !has_rows && !self.in_transaction {
                // The start's heartbeat just arrived: everything committed before
                // the stream started is read, so idle is known now, not after a
                // wait (a `run --once` ends here).
                break;
            }
            if has_rows && !self.in_transaction && !self.gathering {
                // Nothing more arriving right now: hand out whole transactions.
                match self.recv_within(Duration::from_millis(1)).await? {
                    Some(msg) => self.on_stream(msg).await?,
                    None => self.flush(true)?,
                }
                continue;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            let catching_up = !self.caught_up
                && (self.whole_backlog || self.stream_started.elapsed() < CATCH_UP_LIMIT);
            if !catching_up {
                self.stop_gathering();
            }
            if wait.is_zero() && !self.in_transaction && !catching_up {
                break;
            }
            let limit = if self.gathering {
                CATCH_UP_WAKE_WAIT
            } else {
                wait.max(Duration::from_millis(50))
            };
            match self.recv_within(limit).await? {
                Some(msg) => self.on_stream(msg).await?,
                None if self.gathering => {
                    // Fewer bytes than a wake-up's worth came: read them now
                    // (lowering the mark wakes the read at once), then gather
                    // again.
                    self.wake_after(1);
                    let msg = self.recv_within(Duration::from_millis(1)).await?;
                    self.wake_after(CATCH_UP_WAKE_BYTES);
                    if let Some(msg) = msg {
                        self.on_stream(msg).await?;
                    }
                }
                None if !self.in_transaction && !catching_up => break,
                None => {}
            }
        }
        if self.last_status.elapsed() >= STATUS_INTERVAL {
            self.send_status().await?;
        }
        self.heartbeat().await;
        self.poll_slot().await;
        self.handed_out = false;
        Ok(SourceEvent::Idle)
    }

    /// The server has sent WAL up to `lsn`.
    fn note_received(&mut self, lsn: u64) {
        self.received = self.received.max(lsn);
        if self.received >= self.behind_lsn {
            self.health.behind_since = None;
        }
    }

    /// Reads the slot's retained WAL and the server's WAL end, now and then.
    /// WAL beyond what the stream has delivered marks the source as behind
    /// until the stream reaches it: a walsender that stopped sending is seen
    /// here, while the stream itself only goes quiet.
    async fn poll_slot(&mut self) {
        let every = Duration::from_secs(self.config.heartbeat_seconds.clamp(1, 10));
        if self.last_poll.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_poll = Some(Instant::now());
        let slot = self.config.slot.clone();
        let result = match self.client().await {
            Ok(c) => c
                .query_opt(
                    "WITH server AS (SELECT CASE WHEN pg_is_in_recovery() \
                            THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS wal_end) \
                     SELECT wal_end::text, pg_wal_lsn_diff(wal_end, restart_lsn)::bigint \
                     FROM pg_replication_slots, server WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|e| sql_error("read the replication slot", &e)),
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(row)) => {
                let end = row
                    .get::<_, Option<String>>(0)
                    .and_then(|l| wire::parse_lsn(&l));
                let retained = row.get::<_, Option<i64>>(1);
                self.health.retained_bytes = retained.map(|b| b.max(0) as u64);
                if let Some(end) = end
                    && end > self.received
                    && self.health.behind_since.is_none()
                {
                    self.behind_lsn = end;
                    self.health.behind_since = Some(Instant::now());
                }
            }
            Ok(None) => self.health.retained_bytes = None,
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "could not read the replication slot's retained WAL")
            }
        }
    }

    /// The next stream message, waiting at most `wait` for one; a message
    /// already buffered is taken without arming a timer (the hot path). On an
    /// error the replication connection is dropped, so the next call reconnects.
    async fn recv_within(&mut self, wait: Duration) -> Result<Option<StreamMessage>> {
        let Some(repl) = self.repl.as_mut() else {
            return Err(transient("the replication connection is closed"));
        };
        let result = match repl.try_recv() {
            Ok(None) => match tokio::time::timeout(wait, repl.recv()).await {
                Ok(r) => r.map(Some),
                Err(_) => Ok(None),
            },
            other => other,
        };
        if let Err(e) = result {
            self.repl = None;
            self.forget_partial();
            return Err(slot_gone(&self.config.slot, e));
        }
        result
    }

    /// Forgets what was read of transactions not yet handed out: the stream
    /// sends them again after a reconnect or a shared stream's restart.
    fn forget_partial(&mut self) {
        self.pending = None;
        self.relation = None;
        self.in_transaction = false;
        self.skipping = false;
        self.stream_xid = None;
        self.streamed.clear();
        self.known_relations.clear();
    }

    async fn on_stream(&mut self, msg: StreamMessage) -> Result<()> {
        match msg {
            StreamMessage::XLogData { data, start, .. } => {
                self.health.last_data = Some(Instant::now());
                self.note_received(start);
                self.on_wal(&data).await
            }
            StreamMessage::Keepalive { end, reply } => {
                self.note_received(end);
                if reply {
                    self.send_status().await?;
                }
                Ok(())
            }
            StreamMessage::Done => {
                self.repl = None;
                Err(transient("the server ended the replication stream"))
            }
            StreamMessage::Restarted => {
                // As after a reconnect: what was handed out is skipped.
                self.forget_partial();
                self.skip_through = self.emitted;
                Ok(())
            }
        }
    }
}

impl Source for PostgresSource {
    fn key(&self) -> &[String] {
        &self.key
    }

    fn health(&self) -> SourceHealth {
        self.health.clone()
    }

    async fn start(&mut self, resume: Option<Position>) -> Result<()> {
        if let Some(repl) = self.repl.take() {
            repl.close().await;
        }
        // A new start takes a new place in a shared slot.
        self.membership = None;
        let client_config = self.config.clone();
        let shared = self.hub.is_some();
        let inspection = inspect_with(self.client().await?, &client_config, shared).await?;
        if !inspection.problems.is_empty() {
            return Err(Error::Config(inspection.problems.join("; ")));
        }
        self.key = inspection.key.clone();
        self.columns = inspection.columns.clone();
        self.ensure_publication(&inspection).await?;
        self.ready.clear();
        self.pending = None;
        self.relation = None;
        if let Some(hub) = &self.hub {
            // Joined before any snapshot is taken: the shared slot is not
            // confirmed past this member's position until it says so.
            let from = match &resume {
                Some(Position::Lsn { lsn }) => *lsn,
                _ => 0,
            };
            self.membership = Some(hub.join(from, &self.config.publication, &self.table));
        }
        match resume {
            Some(Position::Lsn { lsn }) => {
                if !inspection.slot_exists {
                    return Err(Error::Config(format!(
                        "replication slot `{}` does not exist, so changes since the last version (at {}) cannot be read. \
                         To recover, run `oppen run --resnapshot` on this pipeline once: it creates the slot again \
                         and publishes a fresh snapshot of the table as a new version",
                        self.config.slot,
                        wire::format_lsn(lsn)
                    )));
                }
                self.acked = lsn;
                self.emitted = lsn;
                self.last_commit = lsn;
                self.skip_through = lsn;
                self.phase = Phase::Streaming;
                self.start_stream(lsn).await?;
                self.send_status().await?;
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "the dataset's last version was published from another kind of source ({other}); \
                     a PostgreSQL pipeline needs its own dataset"
                )));
            }
            None => self.begin_snapshot().await?,
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<SourceEvent> {
        if self.restart_snapshot {
            self.restart_snapshot = false;
            tracing::warn!(table = %self.table, "restarting the snapshot from the beginning");
            self.begin_snapshot().await?;
        }
        match self.phase {
            Phase::Idle => Ok(SourceEvent::Idle),
            Phase::Snapshot { .. } => self.next_snapshot().await,
            Phase::Streaming => self.next_stream().await,
        }
    }

    async fn ack(&mut self, position: &Position) -> Result<()> {
        if let Position::Lsn { lsn } = position {
            self.acked = self.acked.max(*lsn);
            self.send_status().await?;
        }
        Ok(())
    }

    fn schema(&self) -> Option<SchemaRef> {
        match &self.relation {
            Some(r) => Some(r.schema.clone()),
            None if !self.columns.is_empty() => Some(Self::schema_of(&self.columns)),
            None => None,
        }
    }

    /// `next` waits for the stream itself (up to [`IDLE_WAIT`]).
    fn idle_pause(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_on_this_machine_gets_half_the_cores_for_the_snapshot() {
        let here = |url: &str| on_this_machine(&url.parse::<tokio_postgres::Config>().unwrap());
        assert!(here("postgres://u@127.0.0.1:5432/db"));
        assert!(here("postgres://u@localhost/db"));
        assert!(here("postgres://u@[::1]:5432/db"));
        assert!(here("host=/var/run/postgresql user=u dbname=db"));
        assert!(!here("postgres://u@db.kommun.se/db"));
        assert!(!here("postgres://u@10.0.0.5/db"));
        assert!(!here("host=127.0.0.1,db.kommun.se user=u"));
        let large = 100_000; // pages: 800 MB
        assert_eq!(snapshot::connections(large, None, 2, true), 1);
        assert_eq!(snapshot::connections(large, None, 1, true), 1);
        assert_eq!(snapshot::connections(large, None, 8, true), 4);
        assert_eq!(snapshot::connections(large, None, 6, true), 3);
        assert_eq!(snapshot::connections(large, None, 2, false), 2);
        assert_eq!(snapshot::connections(large, None, 16, false), 4);
        // Small tables: one connection unless the pipeline says otherwise,
        // at most one per 4,096 pages by default, one per page when set.
        assert_eq!(snapshot::connections(8_191, None, 16, false), 1);
        assert_eq!(snapshot::connections(12_288, None, 16, false), 3);
        assert_eq!(snapshot::connections(273, Some(3), 2, true), 3);
        assert_eq!(snapshot::connections(2, Some(3), 2, true), 2);
        assert_eq!(snapshot::connections(0, Some(0), 2, true), 1);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://oppen:s3cret@db:5432/econ"),
            "postgres://oppen:***@db:5432/econ"
        );
        assert_eq!(
            redact_url("host=db user=oppen password=s3cret"),
            "host=db user=oppen password=***"
        );
    }

    #[test]
    fn validates_config() {
        let c = PostgresConfig {
            url: "postgres://localhost/db".into(),
            table: "a.b.c".into(),
            slot: "Bad-Slot".into(),
            publication: "ok_pub".into(),
            key: Some(vec![]),
            heartbeat_seconds: 60,
            snapshot_workers: None,
        };
        let problems = c.validate();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(
            PostgresConfig {
                table: "invoices".into(),
                ..c
            }
            .table()
            .to_string(),
            "public.invoices"
        );
    }
}
