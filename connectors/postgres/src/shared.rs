//! Replication slots shared by several pipelines of one process.
//!
//! A slot streams to one connection at a time, so the pipelines of a process
//! that name the same slot (each its own table) read it through one [`Hub`]:
//! one replication connection whose messages go to the members, each keeping
//! the changes of its own table. A row change goes only to the members of its
//! table (the hub learns a table's members from the stream's relation
//! messages); everything else (transaction bounds, relations, truncates,
//! logical messages, keepalives) goes to all. The slot's confirmed position is the lowest
//! any member has made durable, so the slot never forgets a change one member
//! still needs because another committed past it.
//!
//! A member that joins (after its snapshot, or after a reconnect) restarts the
//! stream from that lowest position; every member then receives
//! [`StreamMessage::Restarted`] and, as after a reconnect of its own, skips the
//! transactions it has handed out already. A member copying its snapshot is
//! not subscribed (the others do not wait for it) but pins the slot where it
//! joined, so nothing after its snapshot's consistent point is confirmed away.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use oppen_connector_api::{Error, Result};
use tokio::sync::{Notify, mpsc};

use crate::config::{PostgresConfig, Table};
use crate::wire::{SESSION_OPTIONS, STATUS_INTERVAL};
use crate::wire::{StreamMessage, WireConnection, transient};
use crate::{pgoutput, tls};

/// Messages buffered per member: the stream goes at the pace of the slowest
/// member, which this much lets it run ahead of.
const MEMBER_BUFFER: usize = 4096;
/// How long a (re)start waits at most for every pipeline of the slot to
/// subscribe, so pipelines starting together join one session instead of
/// restarting it once each (every restart sends the slot's backlog again).
const JOIN_WAIT: Duration = Duration::from_secs(2);

/// The hubs of one process: one per (server, slot) that more than one
/// pipeline names.
#[derive(Clone, Default)]
pub struct SharedSlots {
    hubs: HashMap<(String, String), Arc<Hub>>,
}

impl fmt::Debug for SharedSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.hubs.values().map(|h| &h.slot))
            .finish()
    }
}

impl SharedSlots {
    /// A hub for every slot that several of `configs` name on the same server
    /// (the same `url`).
    pub fn for_sources<'a>(configs: impl IntoIterator<Item = &'a PostgresConfig>) -> Result<Self> {
        let mut named: BTreeMap<(String, String), Vec<&PostgresConfig>> = BTreeMap::new();
        for c in configs {
            named
                .entry((c.url.clone(), c.slot.clone()))
                .or_default()
                .push(c);
        }
        let mut hubs = HashMap::new();
        for (key, configs) in named {
            if configs.len() > 1 {
                let hub = Hub::new(configs[0], configs.len())?;
                tracing::info!(
                    slot = key.1,
                    pipelines = configs.len(),
                    "replication slot shared by several pipelines: one stream feeds them all"
                );
                hubs.insert(key, Arc::new(hub));
            }
        }
        Ok(SharedSlots { hubs })
    }

    /// The hub for `config`'s slot, when its slot is shared.
    pub fn hub(&self, config: &PostgresConfig) -> Option<Arc<Hub>> {
        self.hubs
            .get(&(config.url.clone(), config.slot.clone()))
            .cloned()
    }
}

/// One replication connection to a shared slot, fanned out to its members.
pub struct Hub {
    slot: String,
    /// How many pipelines name the slot.
    expected: usize,
    sql_config: tls::DbConfig,
    state: Mutex<State>,
    /// Wakes the stream's task: a member joined, or moved its position.
    wake: Notify,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    members: BTreeMap<u64, Member>,
    next_id: u64,
    /// The highest flush position sent to the server. Never lowered: older
    /// servers let a slot's confirmed position go backwards.
    sent_flush: u64,
    /// The highest WAL position the server has said it sent.
    received: u64,
    /// A member subscribed since the session started: it must restart.
    joined: bool,
    /// Whether the stream's task runs.
    running: bool,
}

struct Member {
    /// Everything up to here is durable for this member (or of no concern to it).
    flush: u64,
    publication: String,
    table: Table,
    tx: Option<mpsc::Sender<Result<StreamMessage>>>,
}

/// A member subscribed to a session.
struct Subscriber {
    table: Table,
    /// `None` once the member has gone.
    tx: Option<mpsc::Sender<Result<StreamMessage>>>,
}

impl Subscriber {
    async fn deliver(&mut self, message: StreamMessage) {
        if let Some(tx) = &self.tx
            && tx.send(Ok(message)).await.is_err()
        {
            self.tx = None;
        }
    }
}

/// Who a stream message is for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Every member.
    All,
    /// Every member; and the relation `oid` is the table `schema.name`.
    Relation(u32, Table),
    /// The members reading the relation `oid`.
    Rows(u32),
}

/// Routes a pgoutput message; `in_stream`: inside a streamed transaction's
/// block, where messages carry the transaction id before their body.
fn route(data: &[u8], in_stream: bool) -> Route {
    let body = if in_stream { 5 } else { 1 };
    match data.first() {
        Some(b'I' | b'U' | b'D') => match data.get(body..body + 4) {
            Some(oid) => Route::Rows(u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]])),
            // Let the members' decoder say what is wrong with it.
            None => Route::All,
        },
        Some(b'R') => {
            let plain = if in_stream {
                pgoutput::unwrap_streamed(data).map(|(_, plain)| plain)
            } else {
                Ok(data.to_vec())
            };
            match plain.as_deref().map(pgoutput::decode) {
                Ok(Ok(pgoutput::Message::Relation(r))) => Route::Relation(
                    r.oid,
                    Table {
                        schema: r.namespace,
                        name: r.name,
                    },
                ),
                _ => Route::All,
            }
        }
        _ => Route::All,
    }
}

impl Hub {
    fn new(config: &PostgresConfig, expected: usize) -> Result<Self> {
        Ok(Hub {
            slot: config.slot.clone(),
            expected,
            sql_config: config.sql_config()?,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain numbers behind: go on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Joins as a member that needs everything after `flush`; until it moves
    /// its position the slot is not confirmed past it.
    pub fn join(self: &Arc<Self>, flush: u64, publication: &str, table: &Table) -> Membership {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        state.members.insert(
            id,
            Member {
                flush,
                publication: publication.to_string(),
                table: table.clone(),
                tx: None,
            },
        );
        Membership {
            hub: self.clone(),
            id,
        }
    }

    /// The session loop: runs while members are subscribed.
    async fn run(self: Arc<Self>) {
        loop {
            self.gather().await;
            let (from, publications, subscribers) = {
                let mut state = self.state();
                if !state.members.values().any(|m| m.tx.is_some()) {
                    state.running = false;
                    return;
                }
                state.joined = false;
                let from = state.members.values().map(|m| m.flush).min().unwrap_or(0);
                let publications: BTreeSet<String> = state
                    .members
                    .values()
                    .filter(|m| m.tx.is_some())
                    .map(|m| m.publication.clone())
                    .collect();
                // Only the members subscribed now get this session's messages:
                // one subscribing later would see it from the middle, so it
                // waits for the next session (which its subscription starts).
                let subscribers = state
                    .members
                    .values()
                    .filter(|m| m.tx.is_some())
                    .map(|m| Subscriber {
                        table: m.table.clone(),
                        tx: m.tx.clone(),
                    })
                    .collect();
                (
                    from,
                    publications.into_iter().collect::<Vec<_>>(),
                    subscribers,
                )
            };
            if let Err(e) = self.session(from, &publications, subscribers).await {
                tracing::warn!(slot = self.slot, error = %e, "the shared replication stream failed; its pipelines reconnect");
                let subscribed: Vec<_> = self
                    .state()
                    .members
                    .values_mut()
                    .filter_map(|m| m.tx.take())
                    .collect();
                for tx in subscribed {
                    let copy = match &e {
                        Error::Config(m) => Error::Config(m.clone()),
                        other => transient(format!("shared replication stream: {other}")),
                    };
                    let _ = tx.send(Err(copy)).await;
                }
            }
        }
    }

    /// Waits until every pipeline of the slot has joined and subscribed (one
    /// copying its snapshot has joined, not subscribed), or [`JOIN_WAIT`].
    async fn gather(&self) {
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        loop {
            {
                let state = self.state();
                let subscribed = state.members.values().filter(|m| m.tx.is_some()).count();
                if subscribed == state.members.len() && subscribed >= self.expected {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, self.wake.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// One replication session from `from`; returns `Ok` when a member joined
    /// and the stream must start again.
    async fn session(
        &self,
        from: u64,
        publications: &[String],
        mut subscribers: Vec<Subscriber>,
    ) -> Result<()> {
        let mut repl = WireConnection::replication(&self.sql_config, SESSION_OPTIONS).await?;
        repl.start_replication(&self.slot, from.max(1), publications)
            .await?;
        tracing::debug!(slot = self.slot, from = %crate::wire::format_lsn(from), ?publications, "shared replication stream started");
        broadcast(&mut subscribers, StreamMessage::Restarted).await;
        // The subscribers reading each relation, by the relation messages seen.
        let mut readers: HashMap<u32, Vec<usize>> = HashMap::new();
        let mut in_stream = false;
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        loop {
            tokio::select! {
                message = repl.recv() => {
                    let message = message?;
                    let mut rows_of = None;
                    match &message {
                        StreamMessage::XLogData { start, data, .. } => {
                            self.note_received(*start);
                            match data.first() {
                                Some(b'S') => in_stream = true,
                                Some(b'E') => in_stream = false,
                                _ => {}
                            }
                            match route(data, in_stream) {
                                Route::All => {}
                                Route::Relation(oid, table) => {
                                    let of_table = subscribers
                                        .iter()
                                        .enumerate()
                                        .filter(|(_, s)| s.table == table)
                                        .map(|(i, _)| i)
                                        .collect();
                                    readers.insert(oid, of_table);
                                }
                                Route::Rows(oid) => rows_of = Some(oid),
                            }
                        }
                        StreamMessage::Keepalive { end, reply } => {
                            self.note_received(*end);
                            if *reply {
                                self.send_status(&mut repl, true).await?;
                            }
                        }
                        StreamMessage::Done => {
                            return Err(transient("the server ended the replication stream"));
                        }
                        StreamMessage::Restarted => {}
                    }
                    match rows_of {
                        // A relation no member reads (a publication may hold more).
                        Some(oid) => {
                            for &i in readers.get(&oid).map_or(&[][..], Vec::as_slice) {
                                subscribers[i].deliver(message.clone()).await;
                            }
                        }
                        None => broadcast(&mut subscribers, message).await,
                    }
                }
                () = self.wake.notified() => {
                    if self.state().joined {
                        repl.close().await;
                        return Ok(());
                    }
                    self.send_status(&mut repl, false).await?;
                }
                _ = tick.tick() => self.send_status(&mut repl, true).await?,
            }
        }
    }

    fn note_received(&self, lsn: u64) {
        let mut state = self.state();
        state.received = state.received.max(lsn);
    }

    /// Tells the server the lowest position every member has made durable;
    /// only when it moved, unless `always`.
    async fn send_status(&self, repl: &mut WireConnection, always: bool) -> Result<()> {
        let (received, flush, moved) = {
            let mut state = self.state();
            let lowest = state.members.values().map(|m| m.flush).min().unwrap_or(0);
            let flush = state.sent_flush.max(lowest);
            let moved = flush > state.sent_flush;
            state.sent_flush = flush;
            (state.received.max(flush), flush, moved)
        };
        if moved || always {
            repl.send_status(received, flush).await?;
        }
        Ok(())
    }
}

/// Hands `message` to every subscriber, waiting for room.
async fn broadcast(subscribers: &mut [Subscriber], message: StreamMessage) {
    for s in subscribers {
        s.deliver(message.clone()).await;
    }
}

/// A pipeline's place in a shared slot; leaving (drop) releases its pin.
pub struct Membership {
    hub: Arc<Hub>,
    id: u64,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership")
            .field("slot", &self.hub.slot)
            .field("id", &self.id)
            .finish()
    }
}

impl Membership {
    /// Everything up to `flush` is durable for this member (or of no concern
    /// to it); the slot may be confirmed that far once every member agrees.
    pub fn set_flush(&self, flush: u64) {
        let moved = {
            let mut state = self.hub.state();
            match state.members.get_mut(&self.id) {
                Some(m) if flush > m.flush => {
                    m.flush = flush;
                    true
                }
                _ => false,
            }
        };
        if moved {
            self.hub.wake.notify_one();
        }
    }

    /// Subscribes to the stream, which (re)starts from the lowest position of
    /// all members and begins with [`StreamMessage::Restarted`].
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::channel(MEMBER_BUFFER);
        let start = {
            let mut state = self.hub.state();
            if let Some(m) = state.members.get_mut(&self.id) {
                m.tx = Some(tx);
            }
            state.joined = true;
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            tokio::spawn(self.hub.clone().run());
        } else {
            self.hub.wake.notify_one();
        }
        Subscription {
            hub: self.hub.clone(),
            id: self.id,
            rx,
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.state().members.remove(&self.id);
        // The slot may move on now that this member does not pin it.
        self.hub.wake.notify_one();
    }
}

/// A member's feed of the shared stream; dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    rx: mpsc::Receiver<Result<StreamMessage>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("slot", &self.hub.slot)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next message; an error when the shared stream failed (the member
    /// subscribes again, as it would reconnect).
    pub async fn recv(&mut self) -> Result<StreamMessage> {
        match self.rx.recv().await {
            Some(message) => message,
            None => Err(transient("the shared replication stream ended")),
        }
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Result<Option<StreamMessage>> {
        match self.rx.try_recv() {
            Ok(message) => message.map(Some),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                Err(transient("the shared replication stream ended"))
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(m) = self.hub.state().members.get_mut(&self.id) {
            m.tx = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, table: &str, slot: &str) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            table: table.into(),
            slot: slot.into(),
            publication: "p".into(),
            key: None,
            heartbeat_seconds: 60,
            snapshot_workers: None,
        }
    }

    #[test]
    fn only_slots_named_twice_on_one_server_are_shared() {
        let a = config("postgres://db1/x", "public.a", "s");
        let b = config("postgres://db1/x", "public.b", "s");
        let c = config("postgres://db2/x", "public.c", "s");
        let d = config("postgres://db1/x", "public.d", "t");
        let slots = SharedSlots::for_sources([&a, &b, &c, &d]).unwrap();
        let (ha, hb) = (slots.hub(&a).unwrap(), slots.hub(&b).unwrap());
        assert!(Arc::ptr_eq(&ha, &hb));
        assert_eq!(ha.slot, "s");
        assert!(slots.hub(&c).is_none(), "the same name on another server");
        assert!(slots.hub(&d).is_none(), "a slot of its own");
    }

    #[test]
    fn the_slot_moves_only_as_far_as_every_member_and_never_back() {
        let a = config("postgres://db1/x", "public.a", "s");
        let slots = SharedSlots::for_sources([&a, &a]).unwrap();
        let hub = slots.hub(&a).unwrap();
        let lowest = |hub: &Hub| hub.state().members.values().map(|m| m.flush).min();
        let table = a.table();
        let streaming = hub.join(100, "p", &table);
        // A member copying its snapshot pins the slot where it joined.
        let copying = hub.join(0, "p", &table);
        streaming.set_flush(500);
        assert_eq!(lowest(&hub), Some(0));
        copying.set_flush(300);
        assert_eq!(lowest(&hub), Some(300));
        // A member's position never goes back.
        copying.set_flush(200);
        assert_eq!(lowest(&hub), Some(300));
        drop(copying);
        assert_eq!(lowest(&hub), Some(500));
        drop(streaming);
        assert_eq!(lowest(&hub), None);
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    fn relation(oid: u32, schema: &str, name: &str) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&oid.to_be_bytes());
        for s in [schema, name] {
            m.extend_from_slice(s.as_bytes());
            m.push(0);
        }
        m.push(b'd');
        m.extend_from_slice(&0u16.to_be_bytes());
        m
    }

    #[test]
    fn row_changes_go_to_their_table_and_the_rest_to_all() {
        let table = Table {
            schema: "public".into(),
            name: "a".into(),
        };
        assert_eq!(
            route(&relation(7, "public", "a"), false),
            Route::Relation(7, table.clone())
        );
        // Inside a streamed block the transaction id comes first.
        let mut streamed = relation(7, "public", "a");
        streamed.splice(1..1, 42u32.to_be_bytes());
        assert_eq!(route(&streamed, true), Route::Relation(7, table));
        let mut insert = vec![b'I'];
        insert.extend_from_slice(&7u32.to_be_bytes());
        insert.extend_from_slice(b"N\0\0");
        assert_eq!(route(&insert, false), Route::Rows(7));
        let mut update = vec![b'U'];
        update.extend_from_slice(&42u32.to_be_bytes());
        update.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(route(&update, true), Route::Rows(9));
        assert_eq!(
            route(b"D\0", false),
            Route::All,
            "too short: the members say why"
        );
        assert_eq!(route(b"B", false), Route::All);
        assert_eq!(route(b"T", false), Route::All);
        assert_eq!(route(b"", false), Route::All);
    }
}
