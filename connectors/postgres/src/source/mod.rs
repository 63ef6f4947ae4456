//! The source: the snapshot/stream state machine of one table and the
//! [`Source`] contract it keeps.

mod begin;
mod changes;
mod stream;

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
use tokio::sync::{mpsc, watch};

use crate::catalog::{
    ColumnInfo, Inspection, connect_sql, inspect_with, on_this_machine, publication_has, sql_error,
    type_kind,
};
use crate::config::{PostgresConfig, Table};
use crate::pgoutput::{Message, StreamControl, Value};
use crate::types::{ColumnBuilder, Kind};
use crate::wire::{SESSION_OPTIONS, STATUS_INTERVAL};
use crate::wire::{StreamMessage, WireConnection, quote_ident, quote_literal, transient};
use crate::{pgoutput, shared, snapshot, tls, wire};

/// Rows per emitted batch.
pub const BATCH_ROWS: usize = 64 * 1024;

/// Rows per batch of a snapshot's COPY. The publisher streams a first
/// version's batches to its encoders, and every batch queued or being
/// encoded stays whole in memory until the slowest encoder is done with it:
/// smaller batches lower a snapshot's peak memory, at a cost in time too small
/// to measure here.
pub const SNAPSHOT_BATCH_ROWS: usize = 8 * 1024;

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
/// every few messages, it would spend much of a catch-up's CPU in wake-ups and
/// socket reads of a few hundred bytes each. Small
/// next to a socket's receive buffer (128 KB to start with on Linux), so the
/// server is never held back by a full buffer while the mark is not reached.
const CATCH_UP_WAKE_BYTES: usize = 32 * 1024;

/// A backlog of less WAL than this is read as it comes.
const CATCH_UP_GATHER_MIN: u64 = 4 << 20;

/// How long a gathering read waits for [`CATCH_UP_WAKE_BYTES`] before it
/// reads the fewer bytes that came (a pause of the server's decoding, or the
/// backlog's end, with the heartbeat that ends the catch-up).
const CATCH_UP_WAKE_WAIT: Duration = Duration::from_millis(10);

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

    pub(crate) fn schema_of(columns: &[ColumnInfo]) -> SchemaRef {
        Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.kind.arrow_type(), true))
                .collect::<Vec<_>>(),
        ))
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
