//! Start-up: the publication and the slot, the snapshot copied inside the
//! slot's exported snapshot, and the stream started at a position.

use super::*;

impl PostgresSource {
    /// Creates the publication if missing; a pipeline sharing its slot adds
    /// its table to the publication if it lacks it.
    pub(super) async fn ensure_publication(&mut self, inspection: &Inspection) -> Result<()> {
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
    pub(super) async fn drop_slot(&mut self) -> Result<()> {
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
    pub(super) async fn ensure_shared_slot(&mut self) -> Result<()> {
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

    pub(super) async fn begin_snapshot(&mut self) -> Result<()> {
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

    pub(super) async fn start_stream(&mut self, from: u64) -> Result<()> {
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

    /// The next snapshot event.
    pub(super) async fn next_snapshot(&mut self) -> Result<SourceEvent> {
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
}
