//! The CLI commands: run, check, preview, status.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use arrow::array::{Array, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use oppen_connector_api::{BatchKind, ChangeBatch, Op, Position};
use tokio::sync::watch;

use crate::classify::{Classifier, PseudonymKey};
use crate::config::rules::RowRule;
use crate::config::{self, Diagnostics, Pipeline};
use crate::publish::manifest::StateManifest;
use crate::runtime::{self, RunError, RunOptions};

/// Errors that end a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A pipeline failed.
    #[error("{0}")]
    Run(#[from] RunError),
    /// Configuration problems.
    #[error("{0}")]
    Config(#[from] Diagnostics),
    /// Anything else, said plainly.
    #[error("{0}")]
    Message(String),
}

type Result<T> = std::result::Result<T, CommandError>;

/// Whether a path names a rules file (`*.rules.yaml`), which is read through its
/// pipeline: `oppen run pipelines/*.yaml` then does the right thing.
pub fn is_rules_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".rules.yaml") || n.ends_with(".rules.yml"))
}

/// The pipeline files among `files`.
fn pipeline_files(files: &[PathBuf]) -> impl Iterator<Item = &PathBuf> {
    files.iter().filter(|f| !is_rules_file(f))
}

/// The paths with every folder replaced by the YAML files in it, sorted (so a
/// container or service can name one mounted folder).
pub fn expand_folders(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if !path.is_dir() {
            out.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path).map_err(|e| {
            CommandError::Message(format!("cannot read the folder {}: {e}", path.display()))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(CommandError::Message(format!(
                "{} holds no pipeline files (*.yaml)",
                path.display()
            )));
        }
        out.extend(files);
    }
    Ok(out)
}

/// Loads every pipeline, reporting all problems of all files at once.
pub fn load_all(files: &[PathBuf]) -> Result<Vec<Pipeline>> {
    let files = expand_folders(files)?;
    let mut pipelines = Vec::new();
    let mut problems = Diagnostics::default();
    for file in pipeline_files(&files) {
        match config::load(file) {
            Ok(p) => pipelines.push(p),
            Err(d) => problems.0.extend(d.0),
        }
    }
    problems
        .into_result(pipelines)
        .map_err(CommandError::Config)
}

/// Turns SIGINT/SIGTERM into a stop signal; a second signal exits at once
/// (safe: commits are atomic).
pub fn stop_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            wait_for_signal().await;
            signals += 1;
            if signals == 1 {
                tracing::info!("stopping: committing what is held; signal again to exit at once");
                let _ = tx.send(true);
            } else {
                tracing::warn!("second signal: exiting now (nothing partial is published)");
                std::process::exit(130);
            }
        }
    });
    rx
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The address of `/metrics`, `/healthz` and `/readyz` unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// How `oppen run` serves operators and stops.
#[derive(Debug, Clone)]
pub struct OpsOptions {
    /// `--metrics-addr`: an address, `off`, or `None` for [`DEFAULT_METRICS_ADDR`].
    pub metrics_addr: Option<String>,
    /// How long a stop signal may take before the process exits anyway.
    pub grace: std::time::Duration,
    /// Which part of the pipelines runs here.
    pub role: runtime::Role,
}

/// Starts the metrics and health endpoints. At the default address a port in
/// use (a second oppen on the host) is only warned about; an address given
/// explicitly must be bound. Returns the bound address.
pub async fn start_metrics(
    addr: Option<&str>,
    telemetry: &crate::ops::telemetry::Telemetry,
) -> Result<Option<std::net::SocketAddr>> {
    let explicit = addr.is_some();
    let addr = addr.unwrap_or(DEFAULT_METRICS_ADDR);
    if addr == "off" {
        return Ok(None);
    }
    let parsed: std::net::SocketAddr = addr.parse().map_err(|_| {
        CommandError::Message(format!(
            "--metrics-addr {addr}: not an address; use host:port (for example 0.0.0.0:9464) or off"
        ))
    })?;
    let listener = match tokio::net::TcpListener::bind(parsed).await {
        Ok(l) => l,
        Err(e) if !explicit => {
            tracing::warn!(%addr, error = %e, "metrics and health endpoints not started; pass --metrics-addr to choose another address");
            return Ok(None);
        }
        Err(e) => {
            return Err(CommandError::Message(format!(
                "--metrics-addr {addr}: cannot listen: {e}"
            )));
        }
    };
    let bound = listener.local_addr().unwrap_or(parsed);
    tracing::info!("metrics and health on http://{bound} (/metrics, /healthz, /readyz)");
    tokio::spawn(telemetry.clone().serve(listener));
    Ok(Some(bound))
}

/// `oppen run`: every pipeline runs on its own; one failing does not stop the others.
pub async fn run(
    files: &[PathBuf],
    once: bool,
    resnapshot: bool,
    ops: &OpsOptions,
) -> Result<ExitCode> {
    let pipelines = load_all(files)?;
    let telemetry = crate::ops::telemetry::Telemetry::new();
    // A `--once` run is a batch job: its endpoints start only when asked for.
    match (&ops.metrics_addr, once) {
        (None, true) => {}
        (addr, _) => {
            start_metrics(addr.as_deref(), &telemetry).await?;
        }
    }
    let stop = stop_on_signals();
    {
        // After a stop signal, committing what is held gets `grace`; then the
        // process exits anyway (safe: commits are atomic, the source resumes
        // from the last committed version).
        let mut stop = stop.clone();
        let grace = ops.grace;
        tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                tokio::time::sleep(grace).await;
                tracing::error!(
                    seconds = grace.as_secs_f64(),
                    "the shutdown grace period ran out; exiting without a last version (nothing partial is published)"
                );
                std::process::exit(1);
            }
        });
    }
    // Pipelines naming the same replication slot read it through one stream.
    let shared_slots = shared_slots(&pipelines)?;
    let options = RunOptions {
        once,
        progress: true,
        settle: None,
        resnapshot,
        telemetry,
        role: ops.role,
        shared_slots,
    };
    let tasks: Vec<_> = pipelines
        .into_iter()
        .map(|pipeline| {
            let (stop, options) = (stop.clone(), options.clone());
            tokio::spawn(async move {
                let result = runtime::run(&pipeline, &options, stop).await;
                (pipeline, result)
            })
        })
        .collect();
    let mut failed = false;
    for task in tasks {
        match task.await {
            Ok((pipeline, Ok(summary))) => {
                let newest = summary.versions.last().map_or_else(
                    || "no new version".to_string(),
                    |v| format!("version {}, {} rows", v.version, v.rows),
                );
                println!(
                    "{}: {} rows read, {} versions published ({newest}), {} inputs rejected; published in {}",
                    pipeline.id(),
                    summary.rows_read,
                    summary.versions.len(),
                    summary.rejected,
                    pipeline.store
                );
            }
            Ok((pipeline, Err(e))) => {
                failed = true;
                tracing::error!(dataset = pipeline.id(), error = %e, "pipeline stopped");
                eprintln!("{}: stopped: {e}", pipeline.id());
            }
            Err(e) => {
                failed = true;
                eprintln!("a pipeline task failed: {e}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The newest export file's columns, read without side effects.
fn peek_columns(pipeline: &Pipeline) -> Option<(String, std::result::Result<RecordBatch, String>)> {
    let mut source = runtime::files_source(pipeline, Default::default(), true).ok()?;
    let newest = source.files().ok()?.pop()?;
    let read = match source.read_file(&newest) {
        Ok(Ok((batch, _))) => Ok(batch),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.to_string()),
    };
    Some((newest, read))
}

/// `oppen check`: validates files; with export files present, checks the rules
/// against the newest file's columns too.
pub async fn check(files: &[PathBuf], connect: bool) -> Result<ExitCode> {
    let mut ok = true;
    let files = expand_folders(files)?;
    // Pipelines checked together that name one slot share it when run
    // together: each adds its table to the publication they share.
    let loaded: Vec<_> = pipeline_files(&files)
        .filter_map(|f| config::load(f).ok())
        .collect();
    let shared = shared_slots(&loaded)?;
    for file in pipeline_files(&files) {
        let pipeline = match config::load(file) {
            Ok(p) => p,
            Err(d) => {
                eprintln!("{d}");
                ok = false;
                continue;
            }
        };
        let mut line = format!("{}: ok, dataset {}", file.display(), pipeline.id());
        if connect && let config::SourceConfig::Postgres(pg) = &pipeline.spec.source.value {
            ok &= check_postgres(&pipeline, pg, shared.hub(pg).is_some()).await;
            continue;
        }
        if let Some((name, read)) = peek_columns(&pipeline) {
            match read {
                Ok(batch) => {
                    let columns: Vec<String> = batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect();
                    let problems = config::check_against_columns(&pipeline, &columns);
                    if !problems.is_empty() {
                        eprintln!("{problems}");
                        eprintln!("  (checked against the columns of {name})");
                        ok = false;
                        continue;
                    }
                    let unclassified: Vec<&String> = columns
                        .iter()
                        .filter(|c| pipeline.rule(c).is_none())
                        .collect();
                    let _ = write!(line, "; {} source columns in {name}", columns.len());
                    if !unclassified.is_empty() {
                        let names: Vec<&str> = unclassified.iter().map(|s| s.as_str()).collect();
                        let _ = write!(line, "; not published (no rule): {}", names.join(", "));
                    }
                }
                Err(e) => {
                    eprintln!(
                        "{}: warning: the newest export {name} cannot be read: {e}",
                        file.display()
                    );
                }
            }
        }
        println!("{line}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The replication slots that several of `pipelines` name (see
/// [`oppen_connector_postgres::shared`]).
fn shared_slots(pipelines: &[Pipeline]) -> Result<oppen_connector_postgres::shared::SharedSlots> {
    oppen_connector_postgres::shared::SharedSlots::for_sources(pipelines.iter().filter_map(|p| {
        match &p.spec.source.value {
            config::SourceConfig::Postgres(c) => Some(c),
            _ => None,
        }
    }))
    .map_err(|e| CommandError::Message(e.to_string()))
}

/// `check --connect` for a PostgreSQL source: prints what the connector needs
/// and finds, and every column with its rule. Returns whether all is well.
async fn check_postgres(
    pipeline: &Pipeline,
    pg: &oppen_connector_postgres::PostgresConfig,
    shares_slot: bool,
) -> bool {
    let file = pipeline.file.display();
    let i = match oppen_connector_postgres::inspect(pg, shares_slot).await {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{file}: cannot connect to the source: {e}");
            return false;
        }
    };
    let yes = |b: bool| if b { "yes" } else { "NO" };
    println!("{file}: dataset {}", pipeline.id());
    println!("  server            PostgreSQL {}", i.server_version);
    println!("  wal_level         {}", i.wal_level);
    println!("  may replicate     {}", yes(i.can_replicate));
    println!(
        "  table             {} ({})",
        pg.table(),
        if i.table_exists { "exists" } else { "MISSING" }
    );
    println!(
        "  key               {}",
        if i.key.is_empty() {
            "NONE".to_string()
        } else {
            i.key.join(", ")
        }
    );
    println!(
        "  replica identity  {} ({})",
        i.replica_identity,
        i.identity_columns.join(", ")
    );
    println!(
        "  publication       {} ({})",
        pg.publication,
        if !i.publication_exists {
            "will be created"
        } else if i.publication_has_table {
            "includes the table"
        } else {
            "LACKS the table"
        }
    );
    println!(
        "  slot              {} ({})",
        pg.slot,
        match (i.slot_exists, i.retained_wal_bytes) {
            (true, Some(b)) => format!("exists, retains {b} bytes of WAL"),
            (true, None) => "exists".into(),
            (false, _) => "will be created".into(),
        }
    );
    println!("  columns:");
    for c in &i.columns {
        let rule = match pipeline.rule(&c.name) {
            Some(r) => r.action.name().to_string(),
            None => "NO RULE: not published (unclassified)".into(),
        };
        println!("    {:<24} {:<28} {rule}", c.name, c.sql_type);
    }
    let mut ok = true;
    for problem in &i.problems {
        eprintln!("{file}: error: {problem}");
        ok = false;
    }
    if i.table_exists {
        let names: Vec<String> = i.columns.iter().map(|c| c.name.clone()).collect();
        let problems = config::check_against_columns(pipeline, &names);
        if !problems.is_empty() {
            eprintln!("{problems}");
            ok = false;
        }
    }
    if ok {
        println!("  ok");
    }
    ok
}

fn format_value(array: &dyn Array, row: usize) -> String {
    if array.is_null(row) {
        return "∅".into();
    }
    let options = FormatOptions::default();
    ArrayFormatter::try_new(array, &options)
        .map(|f| f.value(row).to_string())
        .unwrap_or_default()
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(width.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// `oppen preview`: source rows beside their classified form.
pub async fn preview(file: &Path, rows: usize, name: Option<&str>) -> Result<ExitCode> {
    let pipeline = config::load(file)?;
    let mut source = runtime::files_source(&pipeline, Default::default(), true)?;
    let name = match name {
        Some(n) => n.to_string(),
        None => source
            .files()
            .map_err(RunError::from)?
            .pop()
            .ok_or_else(|| {
                CommandError::Message("no export file in the folder to preview".into())
            })?,
    };
    let batch = match source.read_file(&name).map_err(RunError::from)? {
        Ok((batch, problems)) => {
            for p in problems.iter().take(5) {
                eprintln!("{name}:{}: {}", p.location, p.message);
            }
            batch
        }
        Err(e) => return Err(CommandError::Message(format!("{name}: {e}"))),
    };
    let key = preview_key(&pipeline).await;
    let classifier = Classifier::compile(&pipeline, batch.schema(), &key)?;
    let sample = batch.slice(0, rows.min(batch.num_rows()));
    let change = ChangeBatch {
        ops: vec![Op::Read; sample.num_rows()],
        data: sample.clone(),
        kind: BatchKind::Snapshot,
        position: Position::File {
            name: name.clone(),
            sha256: String::new(),
        },
        commit_time: None,
        end_of_transaction: true,
    };
    let classified = classifier.classify(&change).map_err(RunError::from)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} — {} of {} rows from {name}\n",
        pipeline.id(),
        sample.num_rows(),
        batch.num_rows()
    );
    let published = classified.data.schema();
    for row in 0..sample.num_rows() {
        let _ = writeln!(out, "row {}", row + 1);
        let _ = writeln!(
            out,
            "  {:<22} {:<34} {:<34} rule",
            "column", "source", "published"
        );
        for (i, field) in sample.schema().fields().iter().enumerate() {
            let source_value = format_value(sample.column(i).as_ref(), row);
            let (published_value, rule) = match classifier
                .column_actions()
                .find(|(s, _, _)| *s == field.name())
            {
                Some((_, out_name, action)) => {
                    let index = published.index_of(out_name).unwrap_or(0);
                    let value = format_value(classified.data.column(index).as_ref(), row);
                    let renamed = if out_name == field.name() {
                        String::new()
                    } else {
                        format!(" → {out_name}")
                    };
                    (value, format!("{}{renamed}", action.name()))
                }
                None => match pipeline.rule(field.name()) {
                    Some(_) => ("—".to_string(), "drop".to_string()),
                    None => ("—".to_string(), "no rule: not published".to_string()),
                },
            };
            let _ = writeln!(
                out,
                "  {:<22} {:<34} {:<34} {rule}",
                clip(field.name(), 22),
                clip(&source_value, 34),
                clip(&published_value, 34)
            );
        }
        if let Some(i) = classified.suppressed_by[row] {
            let RowRule::Suppress(s) = &pipeline.rules.rows[usize::from(i)].value;
            let _ = writeln!(
                out,
                "  → row suppressed by row rule {} (column {}): not published",
                usize::from(i) + 1,
                s.column
            );
        }
        out.push('\n');
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// The key preview shows pseudonyms with: the pipeline's, else the generated one
/// if it exists, else a throwaway key (preview writes nothing).
async fn preview_key(pipeline: &Pipeline) -> PseudonymKey {
    let generated_exists = match pipeline.state.local_root() {
        Some(root) => root.join(runtime::GENERATED_KEY_FILE).exists(),
        None => match pipeline.state.open() {
            Ok(state) => matches!(state.get(runtime::GENERATED_KEY_FILE).await, Ok(Some(_))),
            Err(_) => false,
        },
    };
    if (pipeline.spec.pseudonym_key.is_some() || generated_exists)
        && let Ok(state) = pipeline.state.open()
        && let Ok(key) = runtime::pseudonym_key(pipeline, &state).await
    {
        return key;
    }
    PseudonymKey::generate().unwrap_or_else(|_| {
        PseudonymKey::from_bytes(vec![0x5a; 32])
            .unwrap_or_else(|_| unreachable!("32 bytes is long enough"))
    })
}

/// `oppen status`: what is published and what is pending.
pub async fn status(files: &[PathBuf]) -> Result<ExitCode> {
    let pipelines = load_all(files)?;
    for pipeline in pipelines {
        let store = pipeline.store.open().map_err(RunError::from)?;
        let dataset = pipeline.id();
        println!("{dataset} ({})", pipeline.file.display());
        let newest = crate::publish::newest_version(&store, dataset)
            .await
            .map_err(RunError::from)?;
        let Some(version) = newest else {
            println!("  no version published yet in {}", pipeline.store);
            continue;
        };
        let versions = store
            .list(&format!("{dataset}/versions"))
            .await
            .map_err(|e| CommandError::Message(e.to_string()))?
            .len();
        println!("  version         {} ({versions} kept)", version.version);
        println!("  rows            {}", version.rows);
        println!("  last commit     {}", version.created.to_rfc3339());
        println!("  partitions      {}", version.partitions.len());
        println!(
            "  last changes    {} inserts, {} updates, {} deletes",
            version.changes.inserts, version.changes.updates, version.changes.deletes
        );
        if let Some(position) = &version.source_position {
            println!("  source position {position}");
        }
        if let Some(Position::File { name, .. }) = &version.source_position
            && let Ok(source) = runtime::files_source(&pipeline, Default::default(), true)
        {
            let files = source.files().unwrap_or_default();
            let (done, waiting): (Vec<&String>, Vec<&String>) =
                files.iter().partition(|f| f.as_str() <= name.as_str());
            println!(
                "  files processed {}",
                done.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if !waiting.is_empty() {
                println!(
                    "  files waiting   {}",
                    waiting
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let state = pipeline.state.open().map_err(RunError::from)?;
        let state_path = format!(
            "{dataset}/{}",
            crate::publish::manifest::state_manifest_path(&version)
        );
        if let Ok(Some(bytes)) = state.get(&state_path).await
            && let Ok(s) =
                serde_json::from_slice::<StateManifest>(&bytes).map(StateManifest::into_state)
        {
            if s.unclassified.is_empty() {
                println!("  unclassified    none");
            } else {
                println!(
                    "  unclassified    {} (not published; classify them in {})",
                    s.unclassified.join(", "),
                    pipeline.rules_file.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `oppen serve`: published datasets over HTTP until stopped.
pub async fn serve(store: &str, addr: std::net::SocketAddr) -> Result<ExitCode> {
    let cwd = std::env::current_dir().map_err(|e| CommandError::Message(e.to_string()))?;
    let location =
        crate::store::StoreLocation::parse(store, &cwd).map_err(CommandError::Message)?;
    let store = location.open().map_err(RunError::from)?;
    crate::ops::serve::serve(store, addr)
        .await
        .map_err(|e| CommandError::Message(format!("serving on {addr}: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
