//! The pipeline file: what dataset, from which source, under which rules, published where.

use std::fmt;

use oppen_connector_debezium::DebeziumConfig;
use oppen_connector_files::FilesConfig;
use oppen_connector_postgres::PostgresConfig;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Versions kept when `keep_versions` is not set.
pub const DEFAULT_KEEP_VERSIONS: u32 = 30;
/// Longest time changes wait before a version is cut, when `interval_seconds` is not set.
pub const DEFAULT_INTERVAL_SECONDS: f64 = 1.0;
/// Most changes in one version, when `max_changes` is not set.
pub const DEFAULT_MAX_CHANGES: usize = 1_000_000;
/// Megabytes of committed rows cached in memory, when `cache_mb` is not set:
/// none, so that a running pipeline's memory is the key index and the few
/// parts being written, not the table. A cache makes a version that touches
/// many parts faster (it reads fewer of them back) for memory that stays
/// taken.
pub const DEFAULT_CACHE_MB: usize = 0;
/// Most rows in one published file, when `max_file_rows` is not set: a few
/// megabytes of CSV or Parquet for an invoice table. A version writes a
/// touched part whole and a few at once, so the part size bounds its memory,
/// and a tail part is rewritten in a few milliseconds.
pub const DEFAULT_MAX_FILE_ROWS: usize = 50_000;

/// A whole pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// What is published, for the catalog.
    pub dataset: Dataset,
    /// Where changes come from.
    pub source: Spanned<SourceConfig>,
    /// The steward's rules file, relative to this file.
    pub rules: Spanned<String>,
    /// Where and how versions are written.
    pub publish: Publish,
    /// The key for `_key` and `hash` pseudonyms; generated in the state location
    /// when absent.
    #[serde(default)]
    pub pseudonym_key: Option<Spanned<KeySource>>,
    /// Limits of the readiness check (`/readyz`).
    #[serde(default)]
    pub health: HealthLimits,
    /// A Kafka topic between connector and publishers (`oppen run --role`).
    #[serde(default)]
    pub transport: Option<Spanned<super::TransportConfig>>,
}

/// When `/readyz` reports a pipeline as not ready.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthLimits {
    /// Seconds without progress, while the source has changes waiting, after
    /// which the pipeline counts as stalled (also: a pipeline loop that has not
    /// turned for this long). At least three publish intervals.
    #[serde(default = "default_stall_after")]
    pub stall_after_seconds: f64,
    /// Largest acceptable source lag, in seconds (none by default).
    #[serde(default)]
    pub max_lag_seconds: Option<f64>,
    /// Largest acceptable WAL retained by a PostgreSQL replication slot, in MiB.
    #[serde(default = "default_max_retained_wal_mb")]
    pub max_retained_wal_mb: u64,
}

impl Default for HealthLimits {
    fn default() -> Self {
        HealthLimits {
            stall_after_seconds: default_stall_after(),
            max_lag_seconds: None,
            max_retained_wal_mb: default_max_retained_wal_mb(),
        }
    }
}

fn default_stall_after() -> f64 {
    300.0
}
fn default_max_retained_wal_mb() -> u64 {
    10 * 1024
}

/// The dataset's description (DCAT-AP-SE).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// Identifier: lowercase letters, digits, `-` and `_`; the folder name in the store.
    pub id: Spanned<String>,
    /// Title, in Swedish where the data is Swedish.
    pub title: String,
    /// What the data is, and what was removed.
    pub description: String,
    /// The publishing organisation.
    pub publisher: Publisher,
    /// Contact e-mail address.
    pub contact: String,
    /// Licence identifier (SPDX), e.g. CC0-1.0 or CC-BY-4.0.
    pub license: String,
    /// The specification the data follows.
    #[serde(default)]
    pub conforms_to: Option<String>,
    /// How often the data changes.
    #[serde(default)]
    pub accrual: Option<Accrual>,
    /// Who may have it.
    pub access: Spanned<Access>,
    /// Free keywords for the catalog.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// EU data themes (e.g. GOVE, ECON, EDUC).
    #[serde(default)]
    pub themes: Vec<String>,
}

/// The publishing organisation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publisher {
    /// The organisation's name.
    pub name: String,
    /// Swedish organisation number, e.g. 212000-0000.
    pub org_nr: Spanned<String>,
}

/// How often a dataset changes (EU frequency vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Accrual {
    Continuous,
    Daily,
    Weekly,
    Monthly,
    Quarterly,
    Annual,
    Irregular,
}

impl Accrual {
    /// The code in the EU frequency list (what the catalog links to).
    pub fn eu_code(self) -> &'static str {
        match self {
            Accrual::Continuous => "CONT",
            Accrual::Daily => "DAILY",
            Accrual::Weekly => "WEEKLY",
            Accrual::Monthly => "MONTHLY",
            Accrual::Quarterly => "QUARTERLY",
            Accrual::Annual => "ANNUAL",
            Accrual::Irregular => "IRREG",
        }
    }

    /// The longest time between two updates this promises, in seconds; none
    /// for continuous or irregular datasets.
    pub fn period_seconds(self) -> Option<u64> {
        const DAY: u64 = 86_400;
        match self {
            Accrual::Daily => Some(DAY),
            Accrual::Weekly => Some(7 * DAY),
            Accrual::Monthly => Some(31 * DAY),
            Accrual::Quarterly => Some(92 * DAY),
            Accrual::Annual => Some(366 * DAY),
            Accrual::Continuous | Accrual::Irregular => None,
        }
    }
}

/// Who may have the published data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Anyone: open data.
    Open,
    /// Named partners.
    Shared,
    /// Inside the organisation.
    Internal,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Open => "open",
            Access::Shared => "shared",
            Access::Internal => "internal",
        })
    }
}

/// Where changes come from; exactly one kind.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A folder of CSV/JSON export drops.
    Files(FilesConfig),
    /// A PostgreSQL table, by logical replication.
    Postgres(PostgresConfig),
    /// A Debezium change topic on Kafka.
    Debezium(DebeziumConfig),
}

/// Where a secret key comes from.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    /// The name of an environment variable holding the key (at least 32 bytes).
    Env(String),
    /// A file holding the key.
    File(String),
}

/// Where and how versions are written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The public store: an object_store URL (`file://published` resolves from the
    /// pipeline file's folder).
    pub store: Spanned<String>,
    /// The private state location; never the same as `store`.
    pub state: Spanned<String>,
    /// Which files to write.
    #[serde(default = "default_formats")]
    pub formats: Spanned<Vec<OutputFormat>>,
    /// Split the data into partitions by a column.
    #[serde(default)]
    pub partition_by: Option<Spanned<PartitionBy>>,
    /// How many versions to keep.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: Spanned<u32>,
    /// Most rows in one published file; a larger partition is split into
    /// parts (`<partition>@0001`, ...), and a version rewrites only the parts
    /// its changes touch (new rows go to the last part).
    #[serde(default = "default_max_file_rows")]
    pub max_file_rows: Spanned<usize>,
    /// Megabytes of committed rows kept in memory for the next versions to
    /// update (the most recently used parts); a version reads any other part
    /// it touches from the state location.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: usize,
    /// Longest time, in seconds, that changes wait before a version is cut.
    #[serde(default = "default_interval")]
    pub interval_seconds: f64,
    /// Most changes in one version.
    #[serde(default = "default_max_changes")]
    pub max_changes: usize,
    /// Settings for `s3://` store and state locations (credentials come from
    /// the standard AWS environment variables).
    #[serde(default)]
    pub s3: Option<crate::store::S3Options>,
    /// The absolute URL where the store is served to consumers (for the
    /// catalog's links); the store's own location when absent.
    #[serde(default)]
    pub public_url: Option<Spanned<String>>,
}

fn default_formats() -> Spanned<Vec<OutputFormat>> {
    Spanned::new(
        vec![OutputFormat::Parquet, OutputFormat::Csv],
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}
fn default_keep_versions() -> Spanned<u32> {
    Spanned::new(
        DEFAULT_KEEP_VERSIONS,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}
fn default_max_file_rows() -> Spanned<usize> {
    Spanned::new(
        DEFAULT_MAX_FILE_ROWS,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}
fn default_cache_mb() -> usize {
    DEFAULT_CACHE_MB
}
fn default_interval() -> f64 {
    DEFAULT_INTERVAL_SECONDS
}
fn default_max_changes() -> usize {
    DEFAULT_MAX_CHANGES
}

/// A published file format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// Apache Parquet, zstd-compressed, typed, with statistics.
    Parquet,
    /// RFC 4180 CSV, UTF-8, comma, header row.
    Csv,
}

impl OutputFormat {
    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Parquet => "parquet",
            OutputFormat::Csv => "csv",
        }
    }
}

/// How a dataset is split into partitions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionBy {
    /// The source column (a date, a timestamp, or any value).
    pub column: String,
    /// How values map to partitions.
    #[serde(default)]
    pub by: PartitionGrain,
}

/// How values map to partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionGrain {
    /// `2025` for a date or timestamp.
    Year,
    /// `2025-03` for a date or timestamp.
    #[default]
    Month,
    /// `2025-03-14` for a date or timestamp.
    Day,
    /// The value itself, for a column with few distinct values.
    Value,
}
