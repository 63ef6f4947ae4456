//! Persisted formats: the public version manifest and the private state manifest.
//! Both are versioned by a `format` tag so that later releases can read them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use oppen_connector_api::Position;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::OutputFormat;

/// One immutable file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Path relative to the dataset's folder.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the content, hex: what consumers check (and `oppen serve`'s
    /// ETag). Empty for a private state file, which has its XXH3.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// XXH3-64 of the content, hex: what oppen checks when it reads one of
    /// its own files back (a previous file reused by an update in place, a
    /// state file). Absent in manifests written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
}

impl FileRef {
    /// Whether `content` is this file as it was written: its size, and its
    /// XXH3-64, or its SHA-256 where no XXH3 was recorded. XXH3 catches a
    /// damaged or edited file as surely for this purpose (oppen's own reads
    /// of files it wrote; anyone able to forge a collision can rewrite the
    /// manifests too) at a small fraction of SHA-256's cost, which was the
    /// largest cost of a 1% update rewriting its parts from their previous
    /// files. Says what differs, for an error naming the file.
    pub fn check(&self, content: &[u8]) -> Result<(), String> {
        if content.len() as u64 != self.bytes {
            return Err(format!(
                "{} bytes where {} were written",
                content.len(),
                self.bytes
            ));
        }
        if let Some(xxh3) = &self.xxh3 {
            let found = xxh3_hex(xxhash_rust::xxh3::xxh3_64(content));
            if !found.eq_ignore_ascii_case(xxh3) {
                return Err(format!("XXH3 {found} where {xxh3} was written"));
            }
            return Ok(());
        }
        if self.sha256.is_empty() {
            return Err("no checksum was recorded".into());
        }
        let found = hex::encode(sha2::Sha256::digest(content));
        if !found.eq_ignore_ascii_case(&self.sha256) {
            return Err(format!("SHA-256 {found} where {} was written", self.sha256));
        }
        Ok(())
    }
}

/// An XXH3-64 as a [`FileRef`] records it: 16 hex digits.
pub fn xxh3_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// The files of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionFiles {
    /// Rows in the partition.
    pub rows: u64,
    /// One file per published format.
    pub files: BTreeMap<OutputFormat, FileRef>,
}

/// A published column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    /// Published name.
    pub name: String,
    /// Arrow type, as text (e.g. `Decimal128(18, 2)`, `Utf8`, `Date32`).
    #[serde(rename = "type")]
    pub type_: String,
}

/// What a version changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSummary {
    /// New rows.
    pub inserts: u64,
    /// Changed rows.
    pub updates: u64,
    /// Removed rows (deleted at the source, or newly suppressed).
    pub deletes: u64,
    /// The changed rows with an `op` column, one file per format.
    pub files: BTreeMap<OutputFormat, FileRef>,
    /// The first version of the dataset: every row is an insert, and the data
    /// files are the change files (none are written separately).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub initial: bool,
    /// Parts (keys of `partitions`) this version started with inserted rows
    /// only: their data files are changes too (every row an insert), and
    /// their rows are not in `files` (a large append is not written twice).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inserted: Vec<String>,
}

/// An immutable version manifest: `versions/<v:020>.json`. A version exists
/// exactly when this object does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format")]
pub enum VersionManifest {
    /// The first format.
    #[serde(rename = "oppen.version/1")]
    V1(Version),
}

impl VersionManifest {
    /// The version's content.
    pub fn version(&self) -> &Version {
        match self {
            VersionManifest::V1(v) => v,
        }
    }
}

/// The content of a version manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// The dataset id.
    pub dataset: String,
    /// The version number, counting from 1.
    pub version: u64,
    /// When the version was committed.
    pub created: DateTime<Utc>,
    /// Rows in the whole dataset.
    pub rows: u64,
    /// The published columns.
    pub schema: Vec<ColumnInfo>,
    /// Files per partition.
    pub partitions: BTreeMap<String, PartitionFiles>,
    /// What changed since the previous version.
    pub changes: ChangeSummary,
    /// SHA-256 of the rules file that classified this version.
    pub rules_digest: String,
    /// The source position the version holds every change up to.
    pub source_position: Option<Position>,
    /// When the source committed the newest change in the version.
    pub source_time: Option<DateTime<Utc>>,
    /// Names the private state manifest of this version
    /// (`versions/<v>-<state_id>.json` in the state location). Each commit
    /// attempt writes its own, so a publisher that loses a race for the
    /// version never overwrites the winner's. Absent: `versions/<v>.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_id: Option<String>,
    /// Publishers on a Kafka transport: how far each partition of the
    /// transport topic is in this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportProgress>,
}

/// How far the transport topic is published (DESIGN.md "Transport and scale").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransportProgress {
    /// The transport topic.
    pub topic: String,
    /// Every partition any publisher has committed, ascending.
    pub partitions: Vec<PartitionProgress>,
}

/// One partition of the transport topic in a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionProgress {
    /// The partition.
    pub partition: i32,
    /// The next offset to read: every message before it is in the version.
    pub next_offset: i64,
    /// The source position of the newest whole transaction read from this
    /// partition: a connector that restarted sends it again, and it is skipped.
    pub applied: Option<Position>,
}

impl TransportProgress {
    /// The progress of one partition.
    pub fn get(&self, partition: i32) -> Option<&PartitionProgress> {
        self.partitions.iter().find(|p| p.partition == partition)
    }

    /// Sets one partition's progress.
    pub fn set(&mut self, progress: PartitionProgress) {
        match self
            .partitions
            .binary_search_by_key(&progress.partition, |p| p.partition)
        {
            Ok(i) => self.partitions[i] = progress,
            Err(i) => self.partitions.insert(i, progress),
        }
    }
}

impl Version {
    /// The files that hold what the version changed, in one format, each with
    /// whether every row in it is an insert (a data file: no `op` column): an
    /// initial version's data files; a later version's change file, then its
    /// inserted parts' data files. How a consumer follows changes.
    pub fn change_files(&self, format: OutputFormat) -> Vec<(&FileRef, bool)> {
        fn data(part: &PartitionFiles, format: OutputFormat) -> Option<(&FileRef, bool)> {
            Some((part.files.get(&format)?, true))
        }
        if self.changes.initial {
            return self
                .partitions
                .values()
                .filter_map(|part| data(part, format))
                .collect();
        }
        let changes = self.changes.files.get(&format).map(|f| (f, false));
        let inserted = self
            .changes
            .inserted
            .iter()
            .filter_map(|part| data(self.partitions.get(part)?, format));
        changes.into_iter().chain(inserted).collect()
    }

    /// Every file the version references, relative to the dataset folder.
    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        self.partitions
            .values()
            .flat_map(|p| p.files.values())
            .chain(self.changes.files.values())
    }
}

/// The private state of a version: `<state>/<dataset>/versions/<v:020>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format")]
pub enum StateManifest {
    /// The first format.
    #[serde(rename = "oppen.state/1")]
    V1(State),
    /// A state with update files ([`State::updates`]). Its own tag, so an
    /// older oppen refuses it instead of reading parts without their updates.
    #[serde(rename = "oppen.state/2")]
    V2(State),
}

impl StateManifest {
    /// The manifest of `state`, in the oldest format that holds it.
    pub fn new(state: State) -> Self {
        if state.updates.is_empty() {
            Self::V1(state)
        } else {
            Self::V2(state)
        }
    }

    /// The state, whatever the format.
    pub fn into_state(self) -> State {
        match self {
            Self::V1(state) | Self::V2(state) => state,
        }
    }
}

/// The content of a state manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The dataset id.
    pub dataset: String,
    /// The version this state belongs to.
    pub version: u64,
    /// The state file (Arrow IPC, with `_key`) of every partition.
    pub partitions: BTreeMap<String, FileRef>,
    /// Updates in place laid over a partition's state file, oldest first:
    /// Arrow IPC files of `_row` (the row in the state file) and the columns
    /// that changed. Small next to rewriting the part's whole state for every
    /// version; folded into a new state file once they grow.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub updates: BTreeMap<String, Vec<FileRef>>,
    /// Identifies the pseudonym key that made the `_key`s (not the key itself).
    pub key_fingerprint: String,
    /// Source columns no rule classified when this version was made.
    pub unclassified: Vec<String>,
    /// The source's column types, to keep inferred types stable across restarts.
    pub source_types: BTreeMap<String, oppen_connector_api::ColumnType>,
}

/// The path of a version's private state manifest, relative to the dataset folder.
pub fn state_manifest_path(version: &Version) -> String {
    match &version.state_id {
        Some(id) => format!("versions/{}-{id}.json", version_name(version.version)),
        None => format!("versions/{}.json", version_name(version.version)),
    }
}

/// The zero-padded name of a version, so names sort by number.
pub fn version_name(version: u64) -> String {
    format!("{version:020}")
}

/// Parses the version number from `versions/<v>.json`.
pub fn parse_version_path(path: &str) -> Option<u64> {
    path.rsplit('/').next()?.strip_suffix(".json")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::FileRef;

    /// A file checks against its XXH3 where one was recorded, and against its
    /// SHA-256 in a manifest written before XXH3 was recorded; one changed
    /// byte or a different size fails either way, and the error says which.
    #[test]
    fn a_file_checks_against_its_xxh3_or_else_its_sha256() {
        let content = b"invoice_id;amount\n1;100,00\n".to_vec();
        let with = FileRef {
            path: "data/x.csv".into(),
            bytes: content.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(&content)),
            xxh3: Some(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&content))),
        };
        let older = FileRef {
            xxh3: None,
            ..with.clone()
        };
        let mut damaged = content.clone();
        damaged[20] ^= 1;
        for file in [&with, &older] {
            assert_eq!(file.check(&content), Ok(()));
            assert!(
                file.check(&content[1..])
                    .unwrap_err()
                    .contains("bytes where")
            );
        }
        assert!(with.check(&damaged).unwrap_err().starts_with("XXH3 "));
        assert!(older.check(&damaged).unwrap_err().starts_with("SHA-256 "));
        // The XXH3 alone decides where it is recorded (a wrong SHA-256 there is
        // not looked at), and older manifests read without the field.
        let wrong_sha = FileRef {
            sha256: "00".repeat(32),
            ..with
        };
        assert_eq!(wrong_sha.check(&content), Ok(()));
        let json = r#"{"path":"data/x.csv","bytes":1,"sha256":"ab"}"#;
        let read: FileRef = serde_json::from_str(json).unwrap();
        assert_eq!(read.xxh3, None);
        assert!(!serde_json::to_string(&read).unwrap().contains("xxh3"));
        // A private file has no SHA-256: written and read without the field,
        // checked by its XXH3; with neither there is nothing to trust.
        let private = FileRef {
            sha256: String::new(),
            ..wrong_sha
        };
        let json = serde_json::to_string(&private).unwrap();
        assert!(!json.contains("sha256"), "{json}");
        let read: FileRef = serde_json::from_str(&json).unwrap();
        assert_eq!(read, private);
        assert_eq!(read.check(&content), Ok(()));
        let unchecked = FileRef { xxh3: None, ..read };
        assert!(
            unchecked
                .check(&content)
                .unwrap_err()
                .contains("no checksum")
        );
    }
}
