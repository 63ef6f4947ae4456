//! Decoder for the pgoutput logical replication protocol (version 1).
//!
//! Every read is bounds-checked: a malformed or truncated message is an error,
//! never a panic (a property test feeds it arbitrary bytes).

use std::fmt;

/// A decoding failure: what was expected where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The message type byte.
    pub message: u8,
    /// Byte offset in the message.
    pub offset: usize,
    /// What went wrong.
    pub what: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pgoutput message '{}' at byte {}: {}",
            self.message.escape_ascii(),
            self.offset,
            self.what
        )
    }
}

impl std::error::Error for DecodeError {}

/// One column value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (UPDATE only); its value is not sent.
    UnchangedToast,
    /// The value in its text form.
    Text(&'a [u8]),
    /// The value in its binary form (only when binary mode is asked for).
    Binary(&'a [u8]),
}

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub key: bool,
    /// The column name.
    pub name: String,
    /// Its type OID.
    pub type_oid: u32,
    /// Its type modifier.
    pub type_modifier: i32,
}

/// A relation (table) description, sent before its first change in a session
/// and again after its schema changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin,
    Relation(Relation),
    Type {
        oid: u32,
    },
    Insert {
        relation: u32,
        new: Vec<Value<'a>>,
    },
    Update {
        relation: u32,
        /// The old key (`K`, when the key changed) or the whole old row (`O`,
        /// REPLICA IDENTITY FULL).
        old: Option<(u8, Vec<Value<'a>>)>,
        new: Vec<Value<'a>>,
    },
    Delete {
        relation: u32,
        /// `K` (key columns only) or `O` (whole row).
        old: (u8, Vec<Value<'a>>),
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Where the message is in the WAL.
        lsn: u64,
        prefix: String,
    },
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    fn fail(&self, what: &'static str) -> DecodeError {
        DecodeError {
            message: self.tag,
            offset: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.fail(what))?;
        let slice = self
            .data
            .get(self.pos..end)
            .ok_or_else(|| self.fail(what))?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.fail(what))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Value<'a>>, DecodeError> {
        let n = self.u16("column count")?;
        // A column takes at least one byte: refuse counts the message cannot hold.
        if n as usize > self.data.len().saturating_sub(self.pos) {
            return Err(self.fail("column count larger than the message"));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.u32("value length")? as usize;
                    Value::Text(self.take(len, "value bytes")?)
                }
                b'b' => {
                    let len = self.u32("value length")? as usize;
                    Value::Binary(self.take(len, "value bytes")?)
                }
                _ => return Err(self.fail("unknown column kind")),
            });
        }
        Ok(values)
    }

    fn done(&self) -> Result<(), DecodeError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(self.fail("trailing bytes"))
        }
    }
}

/// A protocol-2 message that frames a transaction the server streams before
/// it commits (`streaming 'on'`): the server sends such a transaction in
/// blocks as it decodes it, instead of spilling it to disk until the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamControl {
    /// A block of the transaction `xid` follows.
    Start { xid: u32 },
    /// The block ends.
    Stop,
    /// The streamed transaction committed.
    Commit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
    },
    /// The transaction (`subxid == xid`) or one of its subtransactions aborted.
    Abort { xid: u32, subxid: u32 },
}

/// Reads a stream control message (`S`, `E`, `c`, `A`); `None` for any other.
pub fn decode_stream_control(data: &[u8]) -> Result<Option<StreamControl>, DecodeError> {
    let Some(&tag) = data.first() else {
        return Ok(None);
    };
    if !matches!(tag, b'S' | b'E' | b'c' | b'A') {
        return Ok(None);
    }
    let mut r = Reader { data, pos: 1, tag };
    let control = match tag {
        b'S' => {
            let xid = r.u32("xid")?;
            r.u8("first segment")?;
            StreamControl::Start { xid }
        }
        b'E' => StreamControl::Stop,
        b'c' => {
            let xid = r.u32("xid")?;
            r.u8("flags")?;
            StreamControl::Commit {
                xid,
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_time: r.u64("commit time")? as i64,
            }
        }
        _ => StreamControl::Abort {
            xid: r.u32("xid")?,
            subxid: r.u32("subtransaction xid")?,
        },
    };
    r.done()?;
    Ok(Some(control))
}

/// A message inside a stream block carries its (sub)transaction's xid after
/// its type byte: returns that xid and the message in protocol-1 form.
pub fn unwrap_streamed(data: &[u8]) -> Result<(u32, Vec<u8>), DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError {
            message: 0,
            offset: 0,
            what: "empty message",
        });
    };
    let mut r = Reader { data, pos: 1, tag };
    let xid = r.u32("streamed xid")?;
    let mut plain = Vec::with_capacity(data.len() - 4);
    plain.push(tag);
    plain.extend_from_slice(&data[5..]);
    Ok((xid, plain))
}

/// A protocol-1 Begin message (to replay a streamed transaction).
pub fn begin_message(final_lsn: u64, commit_time: i64, xid: u32) -> Vec<u8> {
    let mut m = vec![b'B'];
    m.extend_from_slice(&final_lsn.to_be_bytes());
    m.extend_from_slice(&commit_time.to_be_bytes());
    m.extend_from_slice(&xid.to_be_bytes());
    m
}

/// A protocol-1 Commit message (to replay a streamed transaction).
pub fn commit_message(commit_lsn: u64, end_lsn: u64, commit_time: i64) -> Vec<u8> {
    let mut m = vec![b'C', 0];
    m.extend_from_slice(&commit_lsn.to_be_bytes());
    m.extend_from_slice(&end_lsn.to_be_bytes());
    m.extend_from_slice(&commit_time.to_be_bytes());
    m
}

/// Decodes one pgoutput message.
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let Some((&tag, _)) = data.split_first() else {
        return Err(DecodeError {
            message: 0,
            offset: 0,
            what: "empty message",
        });
    };
    let mut r = Reader { data, pos: 1, tag };
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time: r.u64("commit time")? as i64,
            xid: r.u32("xid")?,
        },
        b'C' => {
            r.u8("flags")?;
            Message::Commit {
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_time: r.u64("commit time")? as i64,
            }
        }
        b'O' => {
            r.u64("origin LSN")?;
            r.cstr("origin name")?;
            Message::Origin
        }
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.u16("column count")?;
            let mut columns = Vec::with_capacity((n as usize).min(1600));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("type oid")?,
                    type_modifier: r.u32("type modifier")? as i32,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => {
            let oid = r.u32("type oid")?;
            r.cstr("type namespace")?;
            r.cstr("type name")?;
            Message::Type { oid }
        }
        b'I' => {
            let relation = r.u32("relation oid")?;
            if r.u8("tuple marker")? != b'N' {
                return Err(r.fail("expected N"));
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let mut marker = r.u8("tuple marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                old = Some((marker, r.tuple()?));
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(r.fail("expected N"));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let marker = r.u8("tuple marker")?;
            if marker != b'K' && marker != b'O' {
                return Err(r.fail("expected K or O"));
            }
            Message::Delete {
                relation,
                old: (marker, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            let options = r.u8("options")?;
            if n as usize > data.len() / 4 {
                return Err(r.fail("relation count larger than the message"));
            }
            let mut relations = Vec::with_capacity(n as usize);
            for _ in 0..n {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate {
                relations,
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
            }
        }
        b'M' => {
            r.u8("flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.cstr("prefix")?;
            let len = r.u32("content length")? as usize;
            r.take(len, "content")?;
            Message::Message { lsn, prefix }
        }
        _ => return Err(r.fail("unknown message type")),
    };
    r.done()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(s) => {
                    out.push(b't');
                    out.extend((s.len() as u32).to_be_bytes());
                    out.extend(s.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn decodes_relation_and_changes() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0invoices\0d");
        rel.extend(2u16.to_be_bytes());
        rel.push(1);
        rel.extend(b"id\0");
        rel.extend(23u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.push(0);
        rel.extend(b"note\0");
        rel.extend(25u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.name, "invoices");
        assert!(r.columns[0].key);
        assert_eq!(r.columns[1].type_oid, 25);

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("7"), None]));
        assert_eq!(
            decode(&ins).unwrap(),
            Message::Insert {
                relation: 16384,
                new: vec![Value::Text(b"7"), Value::Null]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("7"), None]));
        upd.push(b'N');
        let mut new = tuple(&[Some("8")]);
        new[1] = 2;
        new.push(b'u');
        upd.extend(new);
        let Message::Update { old, new, .. } = decode(&upd).unwrap() else {
            panic!("not an update")
        };
        assert_eq!(old.unwrap().0, b'K');
        assert_eq!(new, vec![Value::Text(b"8"), Value::UnchangedToast]);
    }

    #[test]
    fn stream_framing_round_trips() {
        let mut start = vec![b'S'];
        start.extend_from_slice(&7u32.to_be_bytes());
        start.push(1);
        assert_eq!(
            decode_stream_control(&start).unwrap(),
            Some(StreamControl::Start { xid: 7 })
        );
        let mut commit = vec![b'c'];
        commit.extend_from_slice(&7u32.to_be_bytes());
        commit.extend_from_slice(&commit_message(100, 200, 300)[1..]);
        assert_eq!(
            decode_stream_control(&commit).unwrap(),
            Some(StreamControl::Commit {
                xid: 7,
                commit_lsn: 100,
                end_lsn: 200,
                commit_time: 300
            })
        );
        assert_eq!(decode_stream_control(b"I").unwrap(), None);
        let mut insert = vec![b'I'];
        insert.extend_from_slice(&9u32.to_be_bytes());
        insert.extend_from_slice(&16384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend_from_slice(&tuple(&[Some("1")]));
        let (xid, plain) = unwrap_streamed(&insert).unwrap();
        assert_eq!(xid, 9);
        assert!(matches!(
            decode(&plain).unwrap(),
            Message::Insert {
                relation: 16384,
                ..
            }
        ));
        assert!(matches!(
            decode(&begin_message(1, 2, 3)).unwrap(),
            Message::Begin {
                final_lsn: 1,
                commit_time: 2,
                xid: 3
            }
        ));
    }

    #[test]
    fn rejects_truncated_messages() {
        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("12345")]));
        for cut in 0..ins.len() {
            assert!(decode(&ins[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = ins.clone();
        long.push(0);
        assert_eq!(decode(&long).unwrap_err().what, "trailing bytes");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// Fuzz: any bytes decode to a message or an error, never a panic.
        #[test]
        fn stream_decoding_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_stream_control(&data);
            if let Ok((_, plain)) = unwrap_streamed(&data) {
                let _ = decode(&plain);
            }
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data);
        }

        /// Fuzz with a valid message type first, so decoding goes deep.
        #[test]
        fn never_panics_on_typed(tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
                                 data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut m = vec![tag];
            m.extend(data);
            let _ = decode(&m);
        }
    }
}
