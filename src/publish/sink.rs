//! The chunked sink every encoder writes into: it hashes the bytes on the way
//! and hands chunks to the store's writer ([`Store::put_chunks`]), which
//! creates the object only when the file ends.

use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::store::Chunk;
#[cfg(doc)]
use crate::store::Store;

/// Bytes an encoder writes, gathered into chunks of about [`CHUNK_BYTES`]
/// and sent to [`Store::put_chunks`] as they fill, with the file's size and
/// hashes worked out on the way. Runs on a blocking thread (it blocks when
/// the store is behind).
pub struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    buffer: Vec<u8>,
    /// `None` for a private file (see [`ChunkWriter::private`]).
    hasher: Option<Sha256>,
    xxh3: Box<xxhash_rust::xxh3::Xxh3>,
    size: u64,
    /// The receiving writer went away (its error is the one to report).
    stopped: bool,
}

/// A file a [`ChunkWriter`] wrote: its size and hashes (hex); no SHA-256
/// (empty) for a private file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
    pub xxh3: String,
}

/// Chunk size of a [`ChunkWriter`]: large enough that sending costs nothing,
/// small next to a part's files (and to a local store's staged writes).
const CHUNK_BYTES: usize = 256 << 10;

impl fmt::Debug for ChunkWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkWriter")
            .field("size", &self.size)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl ChunkWriter {
    /// A writer sending to `tx`.
    pub fn new(tx: tokio::sync::mpsc::Sender<Chunk>) -> Self {
        Self {
            tx,
            buffer: Vec::new(),
            hasher: Some(Sha256::new()),
            xxh3: Box::default(),
            size: 0,
            stopped: false,
        }
    }

    /// A writer of a file only oppen reads back (the private state), which
    /// checks it by size and XXH3 alone ([`super::manifest::FileRef::check`]):
    /// no SHA-256, which consumers need of published files only.
    pub fn private(tx: tokio::sync::mpsc::Sender<Chunk>) -> Self {
        Self {
            hasher: None,
            ..Self::new(tx)
        }
    }

    fn send(&mut self, bytes: Bytes) -> std::io::Result<()> {
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&bytes);
        }
        self.xxh3.update(&bytes);
        self.size += bytes.len() as u64;
        if self.tx.blocking_send(Chunk::Data(bytes)).is_err() {
            self.stopped = true;
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the store writer stopped",
            ));
        }
        Ok(())
    }

    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.send(Bytes::from(full))
    }

    /// Whether the receiving writer went away: the error to report is its own.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Sends what is left and ends the object. Only a whole file is ended;
    /// a writer dropped without this leaves no object.
    pub fn finish(mut self) -> std::io::Result<Written> {
        self.send_buffer()?;
        if self.tx.blocking_send(Chunk::End).is_err() {
            self.stopped = true;
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(Written {
            bytes: self.size,
            sha256: self
                .hasher
                .map(|h| hex::encode(h.finalize()))
                .unwrap_or_default(),
            xxh3: super::manifest::xxh3_hex(self.xxh3.digest()),
        })
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Chunks go when they are full or the file ends; a flush of the
        // encoder's own buffers needs no store round trip.
        Ok(())
    }
}

impl super::writer::Sink for ChunkWriter {
    fn put(&mut self, bytes: Bytes) -> std::io::Result<()> {
        // A chunk the encoder made whole goes as it is, without a copy.
        self.send_buffer()?;
        self.send(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoder's writes and whole chunks arrive as one file with the size
    /// and hashes the writer worked out; a file cut after its first parts were
    /// staged leaves nothing; a writer whose store went away says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunk_writer_streams_whole_files_with_their_hash() {
        use std::io::Write;

        use crate::publish::writer::Sink;
        use crate::store::StoreLocation;

        let dir = tempfile::tempdir().unwrap();
        let store = StoreLocation::local(dir.path()).open().unwrap();
        // 5 MB in writes of odd sizes (across chunks and the local part size),
        // then a whole chunk handed over.
        let text: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let tail = Bytes::from_static(b"tail of the file\n");
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (data, end) = (text.clone(), tail.clone());
        let writing = tokio::task::spawn_blocking(move || {
            let mut sink = ChunkWriter::new(tx);
            for piece in data.chunks(77_777) {
                sink.write_all(piece)?;
            }
            sink.put(end)?;
            sink.finish()
        });
        let (written, hashed) = futures::join!(store.put_chunks("d/big.bin", rx), writing);
        written.unwrap();
        let hashed = hashed.unwrap().unwrap();
        let mut whole = text;
        whole.extend_from_slice(&tail);
        assert_eq!(hashed.bytes, whole.len() as u64);
        assert_eq!(hashed.sha256, hex::encode(Sha256::digest(&whole)));
        assert_eq!(
            hashed.xxh3,
            format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&whole))
        );
        assert_eq!(store.get("d/big.bin").await.unwrap().unwrap(), whole);

        // A private file: the same bytes and XXH3, no SHA-256.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let data = whole.clone();
        let writing = tokio::task::spawn_blocking(move || {
            let mut sink = ChunkWriter::private(tx);
            sink.write_all(&data)?;
            sink.finish()
        });
        let (written, private) = futures::join!(store.put_chunks("e/private.bin", rx), writing);
        written.unwrap();
        let private = private.unwrap().unwrap();
        assert_eq!((private.bytes, &private.xxh3), (hashed.bytes, &hashed.xxh3));
        assert_eq!(private.sha256, "");
        assert_eq!(store.get("e/private.bin").await.unwrap().unwrap(), whole);

        // Cut after 3 MB (past the first staged part): no file, nothing staged.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let writing = tokio::task::spawn_blocking(move || {
            let mut sink = ChunkWriter::new(tx);
            sink.write_all(&vec![7u8; 3 << 20])?;
            drop(sink);
            Ok::<_, std::io::Error>(())
        });
        let (cut, _) = futures::join!(store.put_chunks("d/cut.bin", rx), writing);
        assert!(cut.is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["big.bin".to_string()]);

        // The store side gone: the encoder's next chunk fails and says why.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let stopped = tokio::task::spawn_blocking(move || {
            let mut sink = ChunkWriter::new(tx);
            let err = sink.write_all(&vec![1u8; 2 << 20]).unwrap_err();
            (err.kind(), sink.stopped())
        })
        .await
        .unwrap();
        assert_eq!(stopped, (std::io::ErrorKind::BrokenPipe, true));
    }
}
