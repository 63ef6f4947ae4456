//! Changes: pgoutput messages turned into change batches of one table,
//! whole transactions at a time.

use super::*;

impl PostgresSource {
    /// Moves the pending rows into the ready queue.
    pub(super) fn flush(&mut self, end_of_transaction: bool) -> Result<()> {
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

    pub(super) async fn on_relation(&mut self, r: pgoutput::Relation) -> Result<()> {
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
    pub(super) async fn append(
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
    pub(super) async fn fetch_unchanged(
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
    pub(super) async fn on_wal(&mut self, data: &[u8]) -> Result<()> {
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
    pub(super) async fn on_message(&mut self, data: &[u8]) -> Result<()> {
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

    pub(super) fn key_changed(&self, old: &[Value<'_>], new: &[Value<'_>]) -> bool {
        self.relation.as_ref().is_some_and(|rel| {
            rel.key_index
                .iter()
                .any(|&k| matches!((old.get(k), new.get(k)), (Some(a), Some(b)) if a != b && *b != Value::UnchangedToast))
        })
    }

    pub(super) fn key_only<'a>(&self, row: &[Value<'a>]) -> Vec<Value<'a>> {
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
}
