//! Metrics and health for operators: Prometheus metrics on `/metrics`,
//! liveness on `/healthz`, readiness on `/readyz`.
//!
//! Every pipeline gets a [`PipelineTelemetry`] handle; the run loop reports
//! what it does through it, and the health state it keeps is what `/readyz`
//! judges. Labels are the dataset id plus small fixed sets (operation, format,
//! retry edge, error kind, row rule index), so cardinality stays bounded by
//! the number of pipelines.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use oppen_connector_api::{Op, SourceHealth};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::pipeline::HealthLimits;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatasetLabels {
    dataset: String,
}

/// Every `kind` the errors counter is labelled with: the failures retried
/// (source, publish, conflict, transport) and the class of an error that
/// stopped a pipeline (`runtime::RunError::kind`). Each pipeline's series start
/// at 0.
pub const ERROR_KINDS: &[&str] = &[
    "config",
    "rules",
    "pseudonym_key",
    "source",
    "classify",
    "publish",
    "store",
    "transport",
    "conflict",
    "state",
    "system",
];

/// Every `edge` a retry is counted on.
pub const RETRY_EDGES: &[&str] = &["source_start", "source", "commit", "transport"];

/// The `op`s of published changes.
const PUBLISHED_OPS: [&str; 3] = ["insert", "update", "delete"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CapturedLabels {
    dataset: String,
    source: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    dataset: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    dataset: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FormatLabels {
    dataset: String,
    format: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EdgeLabels {
    dataset: String,
    edge: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    dataset: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn seconds_buckets() -> Histogram {
    // 5 ms .. ~164 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// Every metric family oppen exports.
#[derive(Debug, Clone)]
struct Families {
    captured: Family<CapturedLabels, Counter>,
    published: Family<OpLabels, Counter>,
    suppressed: Family<RuleLabels, Counter>,
    redacted: Family<DatasetLabels, Counter>,
    unclassified: Family<DatasetLabels, Gauge>,
    versions: Family<DatasetLabels, Counter>,
    bytes: Family<FormatLabels, Counter>,
    commit_duration: Family<DatasetLabels, Histogram, fn() -> Histogram>,
    freshness: Family<DatasetLabels, Histogram, fn() -> Histogram>,
    lag: Family<DatasetLabels, FloatGauge>,
    retained_wal: Family<DatasetLabels, Gauge>,
    kafka_lag: Family<DatasetLabels, Gauge>,
    dead_letters: Family<DatasetLabels, Counter>,
    retries: Family<EdgeLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    last_version_time: Family<DatasetLabels, Gauge>,
    accrual: Family<DatasetLabels, Gauge>,
    ready: Family<DatasetLabels, Gauge>,
    stalled: Family<DatasetLabels, Gauge>,
    build: Family<BuildLabels, Gauge>,
}

impl Families {
    fn new() -> Self {
        Families {
            captured: Family::default(),
            published: Family::default(),
            suppressed: Family::default(),
            redacted: Family::default(),
            unclassified: Family::default(),
            versions: Family::default(),
            bytes: Family::default(),
            commit_duration: Family::new_with_constructor(seconds_buckets),
            freshness: Family::new_with_constructor(seconds_buckets),
            lag: Family::default(),
            retained_wal: Family::default(),
            kafka_lag: Family::default(),
            dead_letters: Family::default(),
            retries: Family::default(),
            errors: Family::default(),
            last_version_time: Family::default(),
            accrual: Family::default(),
            ready: Family::default(),
            stalled: Family::default(),
            build: Family::default(),
        }
    }
}

/// The process's metrics registry and the health of its pipelines. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    /// The exported sample names (see [`metric_names`]).
    names: Vec<String>,
    m: Families,
    pipelines: Mutex<BTreeMap<String, Arc<Mutex<Health>>>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A registry with every oppen metric registered.
    pub fn new() -> Self {
        let m = Families::new();
        let mut r = Registry::default();
        let mut names = Vec::new();
        register(
            &mut r,
            &mut names,
            "oppen_changes_captured",
            "Changes read from the source, by operation",
            &m.captured,
        );
        register(
            &mut r,
            &mut names,
            "oppen_changes_published",
            "Changes published in committed versions, by operation",
            &m.published,
        );
        register(
            &mut r,
            &mut names,
            "oppen_rows_suppressed",
            "Rows withheld by a row rule (rule = its index in the rules file)",
            &m.suppressed,
        );
        register(
            &mut r,
            &mut names,
            "oppen_values_redacted",
            "Values changed by redact rules",
            &m.redacted,
        );
        register(
            &mut r,
            &mut names,
            "oppen_unclassified_columns",
            "Source columns not published because no rule names them",
            &m.unclassified,
        );
        register(
            &mut r,
            &mut names,
            "oppen_versions_committed",
            "Versions committed",
            &m.versions,
        );
        register(
            &mut r,
            &mut names,
            "oppen_written_bytes",
            "Bytes of published files written, by format",
            &m.bytes,
        );
        register(
            &mut r,
            &mut names,
            "oppen_commit_duration_seconds",
            "Time to write and commit a version",
            &m.commit_duration,
        );
        register(
            &mut r,
            &mut names,
            "oppen_freshness_seconds",
            "Time from the source's commit of a change to the version holding it becoming visible",
            &m.freshness,
        );
        register(
            &mut r,
            &mut names,
            "oppen_source_lag_seconds",
            "How far behind its source the pipeline reads (0 when caught up)",
            &m.lag,
        );
        register(
            &mut r,
            &mut names,
            "oppen_replication_slot_retained_wal_bytes",
            "WAL the PostgreSQL server retains for the pipeline's replication slot",
            &m.retained_wal,
        );
        register(
            &mut r,
            &mut names,
            "oppen_kafka_consumer_lag_messages",
            "Messages in the source's Kafka topic not read yet",
            &m.kafka_lag,
        );
        register(
            &mut r,
            &mut names,
            "oppen_dead_letters",
            "Source inputs set aside as undecodable (dead-lettered), with the reason beside them",
            &m.dead_letters,
        );
        register(
            &mut r,
            &mut names,
            "oppen_retries",
            "Retries after transient errors, by network edge",
            &m.retries,
        );
        register(
            &mut r,
            &mut names,
            "oppen_errors",
            "Errors, by kind (retried or fatal)",
            &m.errors,
        );
        register(
            &mut r,
            &mut names,
            "oppen_last_version_timestamp_seconds",
            "Unix time of the newest committed version",
            &m.last_version_time,
        );
        register(
            &mut r,
            &mut names,
            "oppen_accrual_period_seconds",
            "The dataset's promised update period (accrual periodicity), for the no-recent-version alert",
            &m.accrual,
        );
        register(
            &mut r,
            &mut names,
            "oppen_pipeline_ready",
            "1 when the pipeline passes its readiness check, else 0",
            &m.ready,
        );
        register(
            &mut r,
            &mut names,
            "oppen_pipeline_stalled",
            "1 when the pipeline has stalled: no progress while its source has changes waiting",
            &m.stalled,
        );
        register(
            &mut r,
            &mut names,
            "oppen_build_info",
            "The running oppen version (value is always 1)",
            &m.build,
        );
        m.build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        Telemetry {
            inner: Arc::new(Inner {
                registry: r,
                names,
                m,
                pipelines: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The handle a pipeline reports through.
    pub fn pipeline(
        &self,
        dataset: &str,
        source: &str,
        limits: &HealthLimits,
    ) -> PipelineTelemetry {
        let health = Arc::new(Mutex::new(Health::new(limits)));
        lock(&self.inner.pipelines).insert(dataset.to_string(), health.clone());
        self.zero_counters(dataset, source);
        PipelineTelemetry {
            inner: self.inner.clone(),
            dataset: DatasetLabels {
                dataset: dataset.to_string(),
            },
            source: source.to_string(),
            health,
            freshness_pending: Vec::new(),
        }
    }

    /// Creates a pipeline's counters at 0. A counter that first appears at 1
    /// has no earlier sample, and Prometheus's `increase()` sees no increase in
    /// it: the first dead letter or error after a start would raise no alert.
    fn zero_counters(&self, dataset: &str, source: &str) {
        let m = &self.inner.m;
        let labels = DatasetLabels {
            dataset: dataset.to_string(),
        };
        m.dead_letters.get_or_create(&labels).inc_by(0);
        m.versions.get_or_create(&labels).inc_by(0);
        m.redacted.get_or_create(&labels).inc_by(0);
        for kind in ERROR_KINDS {
            m.errors
                .get_or_create(&KindLabels {
                    dataset: dataset.to_string(),
                    kind: kind.to_string(),
                })
                .inc_by(0);
        }
        for edge in RETRY_EDGES {
            m.retries
                .get_or_create(&EdgeLabels {
                    dataset: dataset.to_string(),
                    edge: edge.to_string(),
                })
                .inc_by(0);
        }
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Read] {
            m.captured
                .get_or_create(&CapturedLabels {
                    dataset: dataset.to_string(),
                    source: source.to_string(),
                    op: op.as_str().to_string(),
                })
                .inc_by(0);
        }
        for op in PUBLISHED_OPS {
            m.published
                .get_or_create(&OpLabels {
                    dataset: dataset.to_string(),
                    op: op.to_string(),
                })
                .inc_by(0);
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        // Readiness is judged at scrape time, so the gauge is never stale.
        let _ = self.readiness();
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }

    /// Every pipeline's readiness, as the JSON `/readyz` returns, and whether all are ready.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let now = Instant::now();
        let mut all = true;
        let mut pipelines = serde_json::Map::new();
        for (dataset, health) in lock(&self.inner.pipelines).iter() {
            let h = lock(health);
            let reasons = h.problems(now);
            let ready = reasons.is_empty();
            all &= ready;
            let labels = DatasetLabels {
                dataset: dataset.clone(),
            };
            let stalled = reasons.iter().any(|r| r.starts_with("stalled"));
            self.inner
                .m
                .ready
                .get_or_create(&labels)
                .set(i64::from(ready));
            self.inner
                .m
                .stalled
                .get_or_create(&labels)
                .set(i64::from(stalled));
            pipelines.insert(
                dataset.clone(),
                serde_json::json!({
                    "ready": ready,
                    "reasons": reasons,
                    "state": h.state,
                    "last_version": h.last_version,
                    "lag_seconds": h.lag_seconds,
                    "retained_wal_bytes": h.source.retained_bytes,
                }),
            );
        }
        (
            all,
            serde_json::json!({ "ready": all, "pipelines": pipelines }),
        )
    }

    /// The HTTP routes: `/metrics`, `/healthz`, `/readyz`.
    pub fn router(&self) -> Router {
        let metrics = self.clone();
        let ready = self.clone();
        Router::new()
            .route(
                "/metrics",
                get(move || {
                    let body = metrics.encode();
                    async move {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let (ok, body) = ready.readiness();
                    async move {
                        let status = if ok {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        (
                            status,
                            [(header::CONTENT_TYPE, "application/json")],
                            format!("{body:#}\n"),
                        )
                            .into_response()
                    }
                }),
            )
            .fallback(|| async {
                Response::builder()
                    .status(404)
                    .body(axum::body::Body::from("not found\n"))
                    .unwrap_or_default()
            })
    }

    /// Serves the routes on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        if let Err(e) = axum::serve(listener, self.router()).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    }
}

/// The sample names oppen exports (`_total` on counters; `_bucket`, `_count`
/// and `_sum` on histograms), for checking dashboards and alert rules.
pub fn metric_names(telemetry: &Telemetry) -> Vec<String> {
    telemetry.inner.names.clone()
}

/// Registers a metric and records the names its samples carry.
fn register<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    metric: &M,
) {
    use prometheus_client::metrics::MetricType;
    let suffixes: &[&str] = match metric.metric_type() {
        MetricType::Counter => &["_total"],
        MetricType::Histogram => &["_bucket", "_count", "_sum"],
        _ => &[""],
    };
    names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    r.register(name, help, metric.clone());
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take metrics down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a pipeline is; shown in `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Connecting to the source.
    Starting,
    /// Reading and publishing.
    Running,
    /// Stopped after a fatal error.
    Failed,
    /// Stopped on request.
    Stopped,
}

#[derive(Debug)]
struct Health {
    stall_after: Duration,
    max_lag: Option<f64>,
    max_retained: u64,
    state: State,
    error: Option<String>,
    /// When the run loop last made progress (an event from the source, a commit).
    last_turn: Instant,
    /// What the loop was doing then.
    doing: &'static str,
    source: SourceHealth,
    lag_seconds: f64,
    last_version: Option<u64>,
}

impl Health {
    fn new(limits: &HealthLimits) -> Self {
        Health {
            stall_after: Duration::from_secs_f64(limits.stall_after_seconds.max(0.1)),
            max_lag: limits.max_lag_seconds,
            max_retained: limits.max_retained_wal_mb.saturating_mul(1024 * 1024),
            state: State::Starting,
            error: None,
            last_turn: Instant::now(),
            doing: "starting the source",
            source: SourceHealth::default(),
            lag_seconds: 0.0,
            last_version: None,
        }
    }

    /// Why the pipeline is not ready; empty when it is.
    fn problems(&self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let stall = self.stall_after;
        match self.state {
            State::Failed => out.push(format!(
                "stopped: {}",
                self.error.as_deref().unwrap_or("failed")
            )),
            State::Stopped => out.push("stopped".to_string()),
            State::Starting if now.duration_since(self.last_turn) > stall => out.push(format!(
                "the source has not started for {:.0} s (see the log for why)",
                now.duration_since(self.last_turn).as_secs_f64()
            )),
            State::Starting => out.push("starting the source".to_string()),
            State::Running => {
                let idle = now.duration_since(self.last_turn);
                if idle > stall {
                    out.push(format!(
                        "stalled: no progress for {:.0} s while {}",
                        idle.as_secs_f64(),
                        self.doing
                    ));
                }
                if let Some(since) = self.source.behind_since {
                    let quiet = self
                        .source
                        .last_data
                        .map_or(now.duration_since(since), |t| now.duration_since(t));
                    if now.duration_since(since) > stall && quiet > stall {
                        out.push(format!(
                            "stalled: the source has had new changes for {:.0} s but nothing has arrived for {:.0} s",
                            now.duration_since(since).as_secs_f64(),
                            quiet.as_secs_f64()
                        ));
                    }
                }
            }
        }
        if let Some(max) = self.max_lag
            && self.lag_seconds > max
        {
            out.push(format!(
                "source lag {:.0} s is above the limit of {max} s",
                self.lag_seconds
            ));
        }
        if let Some(retained) = self.source.retained_bytes
            && retained > self.max_retained
        {
            out.push(format!(
                "the replication slot retains {} MiB of WAL, above the limit of {} MiB",
                retained / (1024 * 1024),
                self.max_retained / (1024 * 1024)
            ));
        }
        out
    }
}

/// What one pipeline reports. Counters are updated as the run goes; health is
/// read by `/readyz`.
#[derive(Debug)]
pub struct PipelineTelemetry {
    inner: Arc<Inner>,
    dataset: DatasetLabels,
    source: String,
    health: Arc<Mutex<Health>>,
    /// Source commit times of the staged batches, for the freshness histogram.
    freshness_pending: Vec<DateTime<Utc>>,
}

/// Most commit times remembered per version for the freshness histogram:
/// beyond this the oldest and newest are what matter.
const FRESHNESS_SAMPLES: usize = 4096;

impl PipelineTelemetry {
    /// The dataset this handle reports for.
    pub fn dataset(&self) -> &str {
        &self.dataset.dataset
    }

    fn with_dataset<L>(&self, f: impl FnOnce(String) -> L) -> L {
        f(self.dataset.dataset.clone())
    }

    fn update(&self, f: impl FnOnce(&mut Health)) {
        f(&mut lock(&self.health));
    }

    /// The loop made progress; `doing` is what it does next.
    pub fn turned(&self, doing: &'static str) {
        self.update(|h| {
            h.last_turn = Instant::now();
            h.doing = doing;
        });
    }

    /// The dataset's promised update period, and when its newest version was
    /// committed (before this run).
    pub fn describe(
        &self,
        accrual_seconds: Option<u64>,
        last_version: Option<(u64, DateTime<Utc>)>,
    ) {
        if let Some(seconds) = accrual_seconds {
            self.inner
                .m
                .accrual
                .get_or_create(&self.dataset)
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
        if let Some((version, at)) = last_version {
            self.inner
                .m
                .last_version_time
                .get_or_create(&self.dataset)
                .set(at.timestamp());
            self.update(|h| h.last_version = Some(version));
        }
    }

    /// The source started: the pipeline runs.
    pub fn started(&self) {
        self.update(|h| {
            h.state = State::Running;
            h.last_turn = Instant::now();
            h.doing = "reading the source";
        });
    }

    /// The pipeline stopped, with the error that stopped it if any.
    pub fn stopped(&self, error: Option<String>) {
        self.update(|h| {
            h.state = if error.is_some() {
                State::Failed
            } else {
                State::Stopped
            };
            h.error = error;
        });
    }

    /// The source's own view of its upstream.
    pub fn source_health(&self, source: SourceHealth) {
        let retained = source.retained_bytes;
        if let Some(backlog) = source.backlog {
            self.inner
                .m
                .kafka_lag
                .get_or_create(&self.dataset)
                .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        }
        self.update(|h| h.source = source);
        if let Some(bytes) = retained {
            self.inner
                .m
                .retained_wal
                .get_or_create(&self.dataset)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// How far behind its source the pipeline reads.
    pub fn lag(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        self.update(|h| h.lag_seconds = seconds);
        self.inner.m.lag.get_or_create(&self.dataset).set(seconds);
    }

    /// A batch read from the source.
    pub fn captured(&mut self, ops: &[Op], commit_time: Option<DateTime<Utc>>) {
        let mut counts = [0u64; 4];
        for op in ops {
            counts[*op as usize] += 1;
        }
        for (op, n) in [Op::Insert, Op::Update, Op::Delete, Op::Read]
            .into_iter()
            .zip(counts)
        {
            if n > 0 {
                let labels = self.with_dataset(|dataset| CapturedLabels {
                    dataset,
                    source: self.source.clone(),
                    op: op.as_str().to_string(),
                });
                self.inner.m.captured.get_or_create(&labels).inc_by(n);
            }
        }
        if let Some(t) = commit_time {
            if self.freshness_pending.len() >= FRESHNESS_SAMPLES {
                // Keep the oldest; replace the newest so the tail is still seen.
                self.freshness_pending.pop();
            }
            self.freshness_pending.push(t);
        }
    }

    /// What classification did to a batch.
    pub fn classified(&self, suppressed: &[u64], redacted: u64) {
        for (i, n) in suppressed.iter().enumerate() {
            if *n > 0 {
                let labels = self.with_dataset(|dataset| RuleLabels {
                    dataset,
                    rule: i.to_string(),
                });
                self.inner.m.suppressed.get_or_create(&labels).inc_by(*n);
            }
        }
        if redacted > 0 {
            self.inner
                .m
                .redacted
                .get_or_create(&self.dataset)
                .inc_by(redacted);
        }
    }

    /// Columns dropped as unclassified under the current source schema.
    pub fn unclassified(&self, columns: usize) {
        self.inner
            .m
            .unclassified
            .get_or_create(&self.dataset)
            .set(i64::try_from(columns).unwrap_or(i64::MAX));
    }

    /// A version was committed.
    pub fn committed(&mut self, c: &crate::publish::Committed, took: Duration) {
        let m = &self.inner.m;
        m.versions.get_or_create(&self.dataset).inc();
        for (op, n) in [
            ("insert", c.inserts),
            ("update", c.updates),
            ("delete", c.deletes),
        ] {
            let labels = self.with_dataset(|dataset| OpLabels {
                dataset,
                op: op.to_string(),
            });
            m.published.get_or_create(&labels).inc_by(n);
        }
        for (format, n) in &c.bytes {
            let labels = self.with_dataset(|dataset| FormatLabels {
                dataset,
                format: format.extension().to_string(),
            });
            m.bytes.get_or_create(&labels).inc_by(*n);
        }
        m.commit_duration
            .get_or_create(&self.dataset)
            .observe(took.as_secs_f64());
        let now = Utc::now();
        let freshness = m.freshness.get_or_create(&self.dataset);
        for t in self.freshness_pending.drain(..) {
            freshness.observe(((now - t).num_milliseconds().max(0) as f64) / 1000.0);
        }
        m.last_version_time
            .get_or_create(&self.dataset)
            .set(now.timestamp());
        self.update(|h| {
            h.last_version = Some(c.version);
            h.last_turn = Instant::now();
        });
    }

    /// Staged changes were dropped (another publisher committed them).
    pub fn discarded(&mut self) {
        self.freshness_pending.clear();
    }

    /// Inputs the source set aside.
    pub fn dead_letter(&self) {
        self.inner.m.dead_letters.get_or_create(&self.dataset).inc();
    }

    /// A retry on a network edge (`source_start`, `source`, `commit`).
    pub fn retry(&self, edge: &str) {
        let labels = self.with_dataset(|dataset| EdgeLabels {
            dataset,
            edge: edge.to_string(),
        });
        self.inner.m.retries.get_or_create(&labels).inc();
    }

    /// An error of a kind (`source`, `publish`, `conflict`, `classify`, `config`).
    pub fn error(&self, kind: &str) {
        let labels = self.with_dataset(|dataset| KindLabels {
            dataset,
            kind: kind.to_string(),
        });
        self.inner.m.errors.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(stall: f64) -> HealthLimits {
        HealthLimits {
            stall_after_seconds: stall,
            max_lag_seconds: Some(60.0),
            max_retained_wal_mb: 1,
        }
    }

    #[test]
    fn metrics_follow_prometheus_conventions() {
        let t = Telemetry::new();
        let mut p = t.pipeline("skolmat", "files", &limits(300.0));
        p.captured(&[Op::Insert, Op::Insert, Op::Delete], Some(Utc::now()));
        p.retry("source");
        let text = t.encode();
        assert!(text.contains(
            "oppen_changes_captured_total{dataset=\"skolmat\",source=\"files\",op=\"insert\"} 2"
        ));
        assert!(text.contains("oppen_retries_total{dataset=\"skolmat\",edge=\"source\"} 1"));
        assert!(text.contains("oppen_build_info{version=\""));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("oppen_"), "{line}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// A new pipeline's counters are there at 0, so the first dead letter or
    /// error after a start is an increase Prometheus sees.
    #[test]
    fn every_counter_starts_at_zero() {
        let t = Telemetry::new();
        let _p = t.pipeline("skolmat", "files", &limits(300.0));
        let text = t.encode();
        for series in [
            "oppen_dead_letters_total{dataset=\"skolmat\"} 0",
            "oppen_versions_committed_total{dataset=\"skolmat\"} 0",
            "oppen_changes_captured_total{dataset=\"skolmat\",source=\"files\",op=\"update\"} 0",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        for kind in ERROR_KINDS {
            let series = format!("oppen_errors_total{{dataset=\"skolmat\",kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
        for edge in RETRY_EDGES {
            let series = format!("oppen_retries_total{{dataset=\"skolmat\",edge=\"{edge}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
    }

    #[test]
    fn readiness_names_every_problem() {
        let t = Telemetry::new();
        let p = t.pipeline("econ", "postgres", &limits(0.1));
        assert!(!t.readiness().0, "a pipeline still starting is not ready");
        p.started();
        assert!(t.readiness().0);
        p.lag(120.0);
        p.source_health(SourceHealth {
            behind_since: Some(Instant::now()),
            last_data: None,
            retained_bytes: Some(5 * 1024 * 1024),
            backlog: None,
            image_rows: None,
        });
        std::thread::sleep(Duration::from_millis(250));
        let (ok, body) = t.readiness();
        assert!(!ok);
        let reasons = body["pipelines"]["econ"]["reasons"].to_string();
        assert!(reasons.contains("no progress"), "{reasons}");
        assert!(reasons.contains("nothing has arrived"), "{reasons}");
        assert!(reasons.contains("lag 120 s"), "{reasons}");
        assert!(reasons.contains("retains 5 MiB"), "{reasons}");
        assert!(
            t.encode()
                .contains("oppen_pipeline_ready{dataset=\"econ\"} 0")
        );
        p.stopped(Some("bad credentials".into()));
        assert!(
            t.readiness().1["pipelines"]["econ"]["reasons"]
                .to_string()
                .contains("stopped: bad credentials")
        );
    }
}
