//! The replication stream: receiving, gathering a burst, status feedback to
//! the server, heartbeats, and the slot's health.

use super::*;

impl PostgresSource {
    /// Reads wake for any byte again (the backlog is read); a read waiting
    /// for fewer bytes is woken now.
    pub(super) fn stop_gathering(&mut self) {
        if std::mem::take(&mut self.gathering) {
            self.wake_after(1);
        }
    }

    /// See [`WireConnection::wake_after`].
    pub(super) fn wake_after(&self, bytes: usize) -> bool {
        self.repl.as_ref().is_some_and(|r| r.wake_after(bytes))
    }

    /// Sends a status update: `flush` is what a committed version holds, or,
    /// with nothing outstanding, everything the server has sent.
    pub(super) async fn send_status(&mut self) -> Result<()> {
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

    pub(super) async fn heartbeat(&mut self) {
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
    pub(super) async fn emit_heartbeat(&mut self) -> Option<u64> {
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

    pub(super) async fn next_stream(&mut self) -> Result<SourceEvent> {
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
    pub(super) fn note_received(&mut self, lsn: u64) {
        self.received = self.received.max(lsn);
        if self.received >= self.behind_lsn {
            self.health.behind_since = None;
        }
    }

    /// Reads the slot's retained WAL and the server's WAL end, now and then.
    /// WAL beyond what the stream has delivered marks the source as behind
    /// until the stream reaches it: a walsender that stopped sending is seen
    /// here, while the stream itself only goes quiet.
    pub(super) async fn poll_slot(&mut self) {
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
    pub(super) async fn recv_within(&mut self, wait: Duration) -> Result<Option<StreamMessage>> {
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
    pub(super) fn forget_partial(&mut self) {
        self.pending = None;
        self.relation = None;
        self.in_transaction = false;
        self.skipping = false;
        self.stream_xid = None;
        self.streamed.clear();
        self.known_relations.clear();
    }

    pub(super) async fn on_stream(&mut self, msg: StreamMessage) -> Result<()> {
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
