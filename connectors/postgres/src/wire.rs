//! A small client for PostgreSQL's replication protocol.
//!
//! tokio-postgres cannot open a `replication=database` connection or speak the
//! CopyBoth sub-protocol that logical replication streams over, so this module
//! does: startup and authentication (trust, password, MD5, SCRAM-SHA-256, built on
//! `postgres-protocol`), simple queries (replication commands such as
//! `CREATE_REPLICATION_SLOT`, plus plain SQL, which a `replication=database`
//! connection accepts), and the stream itself: XLogData and keepalives in,
//! standby status updates out.
//!
//! The same client opens plain sessions for the snapshot's `COPY`, whose rows
//! (one CopyData message each) are handed to the decoder straight from the
//! read buffer: tokio-postgres makes a `Bytes` of every row and passes it
//! between tasks, a few percent of a snapshot's CPU.
//!
//! Reads are cancellation-safe: all state lives in `self.buf`, so a read raced
//! against a timer and dropped loses nothing.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use oppen_connector_api::Error;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{Host, SslMode};

/// Server settings for both connections, so values arrive in the forms decoded here.
pub(crate) const SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c intervalstyle=iso_8601 -c timezone=UTC -c extra_float_digits=3";
/// How often a status update goes to the server even when it does not ask.
pub(crate) const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open socket: the stream (TLS or not) and, for TCP, a duplicate of the
/// socket's descriptor for its options.
type Socket = (Pin<Box<dyn Stream>>, Option<OwnedFd>);

/// Socket options nix does not name, defined with its macro for those.
mod sockopt {
    use nix::{setsockopt_impl, sockopt_impl};
    sockopt_impl!(
        /// `SO_RCVLOWAT`: how many bytes must wait in the socket before a
        /// reader is woken.
        WakeBytes,
        SetOnly,
        libc::SOL_SOCKET,
        libc::SO_RCVLOWAT,
        usize
    );
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// An error the server reported.
#[derive(Debug, Clone)]
pub struct ServerError {
    /// SQLSTATE, e.g. `42704`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// DETAIL and HINT, where given.
    pub detail: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl ServerError {
    /// Whether retrying cannot help: bad credentials, missing privileges or
    /// objects, syntax. Everything else (shutdown, resource limits, an active
    /// slot) is worth retrying.
    pub fn is_fatal(&self) -> bool {
        is_fatal_sqlstate(&self.code)
    }

    fn into_error(self, what: &str) -> Error {
        if self.is_fatal() {
            Error::Config(format!("{what}: {self}"))
        } else {
            transient(format!("{what}: {self}"))
        }
    }
}

/// Whether an SQLSTATE means retrying cannot help: invalid authorization (28),
/// syntax or access rule violations (42), invalid catalog name (3D), feature
/// not supported (0A), data exceptions (22).
pub fn is_fatal_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("28" | "42" | "3D" | "0A" | "22"))
}

/// A transient error with a message.
pub fn transient(message: impl Into<String>) -> Error {
    Error::Transient {
        message: message.into(),
        source: None,
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Transient {
        message: format!("{what}: {e}"),
        source: Some(Box::new(e)),
    }
}

/// One message of the replication stream.
#[derive(Debug, Clone)]
pub enum StreamMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// The WAL position the data starts at.
        start: u64,
        /// The server's current end of WAL.
        end: u64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// The server's keepalive; `reply` asks for a status update at once.
    Keepalive { end: u64, reply: bool },
    /// The server ended the stream.
    Done,
    /// A shared slot's stream started again from the slot's confirmed
    /// position (see [`crate::shared`]): what follows may repeat transactions
    /// already read, and a transaction under way is not continued.
    Restarted,
}

/// What `CREATE_REPLICATION_SLOT` returns.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// The LSN from which streaming yields exactly the changes after the snapshot.
    pub consistent_point: u64,
    /// The exported snapshot, for `SET TRANSACTION SNAPSHOT`.
    pub snapshot: Option<String>,
}

/// A connection: a `replication=database` one for the stream, or a plain
/// session for the snapshot's copy.
pub struct WireConnection {
    stream: Pin<Box<dyn Stream>>,
    /// The TCP socket under `stream` (a duplicate of its descriptor, as TLS
    /// wraps the stream), for socket options; none over a Unix socket.
    tcp: Option<OwnedFd>,
    buf: BytesMut,
    out: BytesMut,
}

impl fmt::Debug for WireConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireConnection").finish_non_exhaustive()
    }
}

/// A message from the server: its type byte and body.
type RawMessage = (u8, Bytes);

impl WireConnection {
    /// Opens a `replication=database` connection. `options` are server
    /// settings sent at startup (`-c name=value ...`): the connector pins
    /// DateStyle, IntervalStyle and TimeZone so values stream in the forms it
    /// decodes.
    pub async fn replication(db: &crate::tls::DbConfig, options: &str) -> Result<Self, Error> {
        Self::connect(db, options, true).await
    }

    /// Opens a plain SQL session, with the same `options`.
    pub async fn session(db: &crate::tls::DbConfig, options: &str) -> Result<Self, Error> {
        Self::connect(db, options, false).await
    }

    /// Connects and authenticates.
    async fn connect(
        db: &crate::tls::DbConfig,
        options: &str,
        replication: bool,
    ) -> Result<Self, Error> {
        let config = &db.sql;
        let user = config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("PGUSER").ok())
            .unwrap_or_else(|| "postgres".into());
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        // As libpq's `connect_timeout`, which the connector sets.
        let (stream, tcp) = match config.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, Self::open_socket(db))
                .await
                .map_err(|_| {
                    transient(format!(
                        "cannot connect to PostgreSQL: no answer within {} s",
                        limit.as_secs_f64()
                    ))
                })??,
            None => Self::open_socket(db).await?,
        };
        let mut conn = WireConnection {
            stream,
            tcp,
            buf: BytesMut::with_capacity(1 << 20),
            out: BytesMut::with_capacity(256),
        };
        let mut params = vec![
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("application_name", "oppen"),
            ("options", options),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params.iter().copied(), &mut conn.out)
            .map_err(|e| io_error("startup message", e))?;
        conn.flush().await?;
        conn.authenticate(&user, config.get_password()).await?;
        Ok(conn)
    }

    async fn open_socket(db: &crate::tls::DbConfig) -> Result<Socket, Error> {
        let config = &db.sql;
        let hosts = config.get_hosts();
        let ports = config.get_ports();
        // `hostaddr` (as in libpq): connect to that address, but verify the
        // server's certificate against `host`.
        let addrs = config.get_hostaddrs();
        let mut last = None;
        let candidates: Vec<Host> = match (hosts.is_empty(), addrs.is_empty()) {
            (false, _) => hosts.to_vec(),
            (true, false) => addrs.iter().map(|a| Host::Tcp(a.to_string())).collect(),
            (true, true) => vec![Host::Tcp("localhost".into())],
        };
        for (i, host) in candidates.iter().enumerate() {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            let result: std::io::Result<Socket> = match host {
                Host::Tcp(h) => match match addrs.get(i) {
                    Some(addr) => tokio::net::TcpStream::connect((*addr, port)).await,
                    None => tokio::net::TcpStream::connect((h.as_str(), port)).await,
                } {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let tcp = s.as_fd().try_clone_to_owned().ok();
                        return Self::negotiate_tls(s, h, config.get_ssl_mode(), db.tls.as_ref())
                            .await
                            .map(|s| (s, tcp));
                    }
                    Err(e) => Err(e),
                },
                Host::Unix(dir) => {
                    tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                        .await
                        .map(|s| (Box::pin(s) as Pin<Box<dyn Stream>>, None))
                }
            };
            match result {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(format!("{host:?}:{port}: {e}")),
            }
        }
        Err(transient(format!(
            "cannot connect to PostgreSQL: {}",
            last.unwrap_or_default()
        )))
    }

    /// Asks the server for TLS (SSLRequest) where `sslmode` wants it, and
    /// wraps the socket. Unix sockets never use TLS (as in libpq).
    async fn negotiate_tls(
        mut tcp: tokio::net::TcpStream,
        host: &str,
        mode: SslMode,
        tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Pin<Box<dyn Stream>>, Error> {
        let Some(tls) = tls.filter(|_| mode != SslMode::Disable) else {
            return Ok(Box::pin(tcp));
        };
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.write_all(&request)
            .await
            .map_err(|e| transient(format!("TLS request to {host}: {e}")))?;
        let answer = tcp
            .read_u8()
            .await
            .map_err(|e| transient(format!("TLS request to {host}: {e}")))?;
        match answer {
            b'S' => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| Error::Config(format!("host {host} as a TLS name: {e}")))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        crate::tls::certificate_error(&e)
                            .unwrap_or_else(|| transient(format!("TLS handshake with {host}: {e}")))
                    })?;
                Ok(Box::pin(stream))
            }
            b'N' if mode == SslMode::Prefer => Ok(Box::pin(tcp)),
            b'N' => Err(Error::Config(format!(
                "{host} does not accept TLS connections, and sslmode asks for TLS; enable ssl \
                 on the server, or use sslmode=prefer"
            ))),
            other => Err(transient(format!(
                "unexpected answer {other:#x} to the TLS request from {host}"
            ))),
        }
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), Error> {
        let need_password = || {
            Error::Config(
                "the server asks for a password and the connection URL has none".to_string(),
            )
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = self.read_message().await?;
            match tag {
                b'R' => {
                    let code = body.get_i32();
                    match code {
                        0 => {}
                        3 => {
                            let p = password.ok_or_else(need_password)?;
                            let mut cstr = p.to_vec();
                            cstr.push(0);
                            frontend::password_message(&cstr, &mut self.out)
                                .map_err(|e| io_error("password", e))?;
                            self.flush().await?;
                        }
                        5 => {
                            let p = password.ok_or_else(need_password)?;
                            let mut salt = [0u8; 4];
                            body.copy_to_slice(&mut salt);
                            let mut hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                p,
                                salt,
                            )
                            .into_bytes();
                            hash.push(0);
                            frontend::password_message(&hash, &mut self.out)
                                .map_err(|e| io_error("password", e))?;
                            self.flush().await?;
                        }
                        10 => {
                            let p = password.ok_or_else(need_password)?;
                            let mechanisms: Vec<&[u8]> =
                                body.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                            if !mechanisms.contains(&SCRAM_SHA_256.as_bytes()) {
                                return Err(Error::Config(
                                    "the server offers no SASL mechanism oppen supports (SCRAM-SHA-256)"
                                        .into(),
                                ));
                            }
                            let s = ScramSha256::new(p, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                SCRAM_SHA_256,
                                s.message(),
                                &mut self.out,
                            )
                            .map_err(|e| io_error("SASL", e))?;
                            scram = Some(s);
                            self.flush().await?;
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| transient("unexpected SASL continue"))?;
                            s.update(&body)
                                .map_err(|e| Error::Config(format!("SCRAM authentication: {e}")))?;
                            frontend::sasl_response(s.message(), &mut self.out)
                                .map_err(|e| io_error("SASL", e))?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| transient("unexpected SASL final"))?;
                            s.finish(&body)
                                .map_err(|e| Error::Config(format!("SCRAM authentication: {e}")))?;
                        }
                        other => {
                            return Err(Error::Config(format!(
                                "the server asks for an authentication method oppen does not support (code {other})"
                            )));
                        }
                    }
                }
                b'E' => return Err(parse_error(&body).into_error("connect")),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Error> {
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| io_error("write to PostgreSQL", e))?;
        self.out.clear();
        self.stream
            .flush()
            .await
            .map_err(|e| io_error("write to PostgreSQL", e))
    }

    /// Reads one whole message. Cancellation-safe.
    async fn read_message(&mut self) -> Result<RawMessage, Error> {
        loop {
            if let Some(message) = self.take_buffered()? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    /// Reads what the socket has, into room for at least the rest of the
    /// message begun in the buffer. Cancellation-safe.
    async fn fill(&mut self) -> Result<(), Error> {
        let begun = declared_end(&self.buf).unwrap_or(0);
        let room = begun.saturating_sub(self.buf.len()).max(64 * 1024);
        if self.buf.capacity() - self.buf.len() < room {
            self.buf.reserve(room.max(1 << 20));
        }
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| io_error("read from PostgreSQL", e))?;
        if n == 0 {
            return Err(transient("PostgreSQL closed the connection"));
        }
        Ok(())
    }

    /// Takes one whole message from the read buffer, if there is one.
    fn take_buffered(&mut self) -> Result<Option<RawMessage>, Error> {
        let Some((tag, end)) = whole_message(&self.buf)? else {
            return Ok(None);
        };
        let mut whole = self.buf.split_to(end);
        whole.advance(HEADER);
        Ok(Some((tag, whole.freeze())))
    }

    /// Runs one simple query; returns the rows of its (last) result as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        frontend::query(sql, &mut self.out).map_err(|e| io_error("query", e))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, mut body) = self.read_message().await?;
            match tag {
                b'T' => rows.clear(),
                b'D' => {
                    let n = body.get_i16();
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        let len = body.get_i32();
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v = body.split_to(len as usize);
                            row.push(Some(String::from_utf8_lossy(&v).into_owned()));
                        }
                    }
                    rows.push(row);
                }
                b'E' => error = Some(parse_error(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => {
                let what = sql.split_whitespace().next().unwrap_or("query").to_string();
                Err(e.into_error(&what))
            }
            None => Ok(rows),
        }
    }

    /// Starts `sql`, a `COPY ... TO STDOUT`; its data comes from
    /// [`Self::copy_out_read`].
    pub async fn copy_out_start(&mut self, sql: &str) -> Result<(), Error> {
        self.start_copy(sql, "COPY", b'H').await
    }

    /// Sends `sql` and waits for the server's answer that starts a copy
    /// sub-protocol (`answer`: CopyOutResponse or CopyBothResponse).
    async fn start_copy(&mut self, sql: &str, what: &str, answer: u8) -> Result<(), Error> {
        frontend::query(sql, &mut self.out).map_err(|e| io_error(what, e))?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                t if t == answer => return Ok(()),
                b'E' => return Err(parse_error(&body).into_error(what)),
                b'Z' => return Err(transient(format!("{what} started no copy"))),
                _ => {}
            }
        }
    }

    /// Hands the body of every CopyData message buffered whole to `each`, in
    /// order and without copying, reading from the socket first if none is.
    /// Returns `false` once the copy has ended and the session is ready for
    /// the next query.
    pub async fn copy_out_read(
        &mut self,
        mut each: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        loop {
            let mut pos = 0;
            let mut ended = false;
            while let Some((tag, end)) = whole_message(&self.buf[pos..])? {
                let body = &self.buf[pos + HEADER..pos + end];
                match tag {
                    b'd' => each(body)?,
                    b'E' => return Err(parse_error(body).into_error("COPY")),
                    b'Z' => ended = true,
                    // CopyDone, CommandComplete, notices.
                    _ => {}
                }
                pos += end;
                if ended {
                    break;
                }
            }
            self.buf.advance(pos);
            if ended || pos > 0 {
                return Ok(!ended);
            }
            self.fill().await?;
        }
    }

    /// `CREATE_REPLICATION_SLOT slot LOGICAL pgoutput`, exporting a snapshot;
    /// a `temporary` slot ends with the session.
    pub async fn create_slot(&mut self, slot: &str, temporary: bool) -> Result<CreatedSlot, Error> {
        let rows = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(slot),
                if temporary { " TEMPORARY" } else { "" }
            ))
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| transient("CREATE_REPLICATION_SLOT returned no row"))?;
        let consistent_point = row
            .get(1)
            .and_then(|v| v.as_deref())
            .and_then(parse_lsn)
            .ok_or_else(|| transient("CREATE_REPLICATION_SLOT returned no consistent point"))?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot: row.get(2).cloned().flatten(),
        })
    }

    /// Starts streaming the slot from `lsn` with pgoutput over `publications`.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        lsn: u64,
        publications: &[String],
    ) -> Result<(), Error> {
        let names = publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            // Protocol 2 with streaming: a large transaction arrives while it is
            // decoded instead of being spilled to disk on the server until it
            // commits (PostgreSQL 14 and newer, which the connector requires).
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '2', streaming 'on', \
             publication_names {}, messages 'true')",
            quote_ident(slot),
            format_lsn(lsn),
            quote_literal(&names),
        );
        self.start_copy(&sql, "START_REPLICATION", b'W').await
    }

    /// The next message of the stream. Cancellation-safe.
    pub async fn recv(&mut self) -> Result<StreamMessage, Error> {
        loop {
            let (tag, body) = self.read_message().await?;
            if let Some(message) = stream_message(tag, body)? {
                return Ok(message);
            }
        }
    }

    /// The next stream message if one is already buffered whole; never waits
    /// (the stream loop reads buffered messages without arming a timer).
    pub fn try_recv(&mut self) -> Result<Option<StreamMessage>, Error> {
        while let Some((tag, body)) = self.take_buffered()? {
            if let Some(message) = stream_message(tag, body)? {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// Sends a standby status update: everything up to `flush` is durable here.
    pub async fn send_status(&mut self, received: u64, flush: u64) -> Result<(), Error> {
        let now = chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_US;
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(received);
        msg.put_u64(flush);
        msg.put_u64(flush);
        msg.put_i64(now);
        msg.put_u8(0);
        self.out.put_u8(b'd');
        self.out.put_u32(4 + msg.len() as u32);
        self.out.put_slice(&msg);
        self.flush().await
    }

    /// Wakes this connection's reads only once `bytes` wait in the socket
    /// (1: as soon as any do), so that a stream read while it flows fast is
    /// read in large pieces instead of one wake-up and one read per few
    /// messages. Lowering it wakes a waiting read at once if bytes wait
    /// (Linux checks on the change). False where it cannot be set (a Unix
    /// socket, or the system refused).
    pub fn wake_after(&self, bytes: usize) -> bool {
        self.tcp.as_ref().is_some_and(|tcp| wake_after(tcp, bytes))
    }

    /// Ends the session cleanly.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.out);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// Sets a socket's `SO_RCVLOWAT` (see [`WireConnection::wake_after`]).
fn wake_after(socket: &impl AsFd, bytes: usize) -> bool {
    match nix::sys::socket::setsockopt(socket, sockopt::WakeBytes, &bytes.max(1)) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, bytes, "could not set SO_RCVLOWAT");
            false
        }
    }
}

/// A message's header: its type byte and its length (which counts itself).
const HEADER: usize = 5;

/// Where the message at the front of `buf` ends, as its header says, once the
/// header is there.
fn declared_end(buf: &[u8]) -> Option<usize> {
    let h = buf.first_chunk::<HEADER>()?;
    Some(u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize + 1)
}

/// The message at the front of `buf`, once whole: its type byte and where it
/// ends (its body is `HEADER..end`).
fn whole_message(buf: &[u8]) -> Result<Option<(u8, usize)>, Error> {
    let Some(end) = declared_end(buf) else {
        return Ok(None);
    };
    if end < HEADER {
        return Err(transient("malformed message from PostgreSQL"));
    }
    Ok((buf.len() >= end).then_some((buf[0], end)))
}

/// A stream message from a raw one; `None` for messages the stream ignores.
fn stream_message(tag: u8, mut body: Bytes) -> Result<Option<StreamMessage>, Error> {
    Ok(Some(match tag {
        b'd' if body.first() == Some(&b'w') && body.len() >= 25 => {
            body.advance(1);
            let start = body.get_u64();
            let end = body.get_u64();
            body.advance(8);
            StreamMessage::XLogData {
                start,
                end,
                data: body,
            }
        }
        b'd' if body.first() == Some(&b'k') && body.len() >= 18 => {
            body.advance(1);
            let end = body.get_u64();
            body.advance(8);
            StreamMessage::Keepalive {
                end,
                reply: body.get_u8() == 1,
            }
        }
        b'c' | b'C' | b'Z' => StreamMessage::Done,
        b'E' => return Err(parse_error(&body).into_error("replication stream")),
        _ => return Ok(None),
    }))
}

fn parse_error(body: &[u8]) -> ServerError {
    let mut e = ServerError {
        code: String::new(),
        message: String::new(),
        detail: None,
    };
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' | b'H' => {
                e.detail = Some(match e.detail.take() {
                    Some(d) => format!("{d}; {value}"),
                    None => value,
                })
            }
            _ => {}
        }
    }
    e
}

/// Parses `X/Y` (hex halves) into an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Formats an LSN as `X/Y`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the catch-up's gathered reads rely on: below the mark a read is
    /// not woken, and lowering the mark wakes it for the bytes already there.
    #[tokio::test]
    async fn a_read_wakes_for_the_mark_or_when_it_is_lowered() {
        use std::time::Duration;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert!(wake_after(&client, 4096));
        server.write_all(&[7; 100]).await.unwrap();
        let mut buf = BytesMut::with_capacity(8192);
        let early = tokio::time::timeout(Duration::from_millis(200), client.read_buf(&mut buf));
        assert!(early.await.is_err(), "woken with 100 of 4,096 bytes");
        assert!(wake_after(&client, 1));
        let n = tokio::time::timeout(Duration::from_secs(10), client.read_buf(&mut buf))
            .await
            .expect("lowering the mark wakes the read")
            .unwrap();
        assert_eq!(n, 100);
        // At the mark, a read is woken without lowering it.
        assert!(wake_after(&client, 4096));
        server.write_all(&[7; 4096]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), client.read_buf(&mut buf))
            .await
            .expect("woken at the mark")
            .unwrap();
        assert!(n > 0);
    }

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        let e = parse_error(body);
        assert_eq!(e.code, "42704");
        assert!(e.is_fatal());
        assert!(e.to_string().contains("does not exist"));
    }

    /// A message is taken only when whole, wherever a read ended; a length
    /// below its own four bytes is an error, not a loop.
    #[test]
    fn messages_are_taken_whole() {
        let mut stream = vec![b'd', 0, 0, 0, 7, 1, 2, 3];
        stream.extend([b'c', 0, 0, 0, 4]);
        assert_eq!(whole_message(&stream).unwrap(), Some((b'd', 8)));
        assert_eq!(whole_message(&stream[8..]).unwrap(), Some((b'c', 5)));
        for end in 0..8 {
            assert_eq!(whole_message(&stream[..end]).unwrap(), None, "{end} bytes");
        }
        assert!(whole_message(&[b'd', 0, 0, 0, 3]).is_err());
    }
}
