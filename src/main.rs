//! The `oppen` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use oppen::commands;
use tracing_subscriber::EnvFilter;

/// Change-data pipeline that keeps municipal open data current: captures changes,
/// applies the data stewards' classification rules, and publishes versioned
/// Parquet and CSV files.
#[derive(Debug, Parser)]
#[command(name = "oppen", version, about, propagate_version = true)]
struct Cli {
    /// Log format: human-readable, or JSON lines for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run pipelines: capture, classify and publish until stopped (Ctrl-C or SIGTERM).
    Run {
        /// Pipeline files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
        /// Process what is available now, commit, and exit.
        #[arg(long)]
        once: bool,
        /// Read the source from a fresh snapshot instead of resuming (after a
        /// PostgreSQL replication slot was dropped); publishes the difference
        /// as a new version.
        #[arg(long)]
        resnapshot: bool,
        /// Address of the metrics and health endpoints (/metrics, /healthz,
        /// /readyz), or `off` [default: 127.0.0.1:9464].
        #[arg(long, env = "OPPEN_METRICS_ADDR")]
        metrics_addr: Option<String>,
        /// Seconds a stop signal may take to commit what is held before the
        /// process exits anyway.
        #[arg(long, default_value_t = 30.0, env = "OPPEN_SHUTDOWN_GRACE")]
        shutdown_grace: f64,
        /// Which part of the pipelines runs here: `all` (embedded), or with a
        /// Kafka transport `connector` (capture and classify, produce to the
        /// topic) or `publisher` (consume the topic, commit versions).
        #[arg(long, value_enum, default_value_t = oppen::runtime::Role::All, env = "OPPEN_ROLE")]
        role: oppen::runtime::Role,
    },
    /// Validate pipeline and rules files without connecting to any source.
    /// Exits 1 if anything is wrong; every problem is listed with file:line:column.
    Check {
        /// Pipeline files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
        /// Also connect to each source and check it: for PostgreSQL wal_level,
        /// replication permission, the table, its key and replica identity, and
        /// every column with its rule.
        #[arg(long)]
        connect: bool,
    },
    /// Show source rows beside their classified form, with what each rule did.
    Preview {
        /// The pipeline file.
        pipeline: PathBuf,
        /// How many rows to show.
        #[arg(long, default_value_t = 5)]
        rows: usize,
        /// Read this export file (name in the export folder) instead of the newest.
        #[arg(long)]
        file: Option<String>,
    },
    /// Show versions, rows, last commit, processed files and unclassified columns.
    Status {
        /// Pipeline files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Serve published datasets to consumers over HTTP: a page listing them, the
    /// catalog, and every published file (conditional GET, ranges, gzip, CORS).
    Serve {
        /// The store: file:// or a folder, s3://, gs:// or az:// (credentials and
        /// endpoint from the standard environment variables).
        store: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
    },
    /// Run the example pipelines on their sample data, with new exports arriving
    /// at a steady pace. No setup needed.
    Demo {
        /// Where the demo writes its files.
        #[arg(long, default_value = "oppen-demo")]
        dir: PathBuf,
        /// Stop after the first round of exports.
        #[arg(long)]
        once: bool,
        /// Seconds between new export drops.
        #[arg(long, default_value_t = 5.0)]
        pace: f64,
        /// Stop after this many drops (default: run until Ctrl-C).
        #[arg(long)]
        drops: Option<usize>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_target(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// glibc gives each thread that allocates its own arena, up to eight per
/// core, and keeps what they free there for reuse: the encoders' part buffers,
/// allocated and freed on the blocking pool's threads, then add up to a much
/// higher peak RSS. One arena per core keeps the peak down at no cost in
/// time. glibc reads `MALLOC_ARENA_MAX` only when a process
/// starts, so the process starts itself again with it set, unless the
/// environment sets it already.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn with_one_malloc_arena_per_core() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // `exec` returns only when it failed: then run on with glibc's default.
    let _ = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("MALLOC_ARENA_MAX", cores.to_string())
        .exec();
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    with_one_malloc_arena_per_core();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                pipelines,
                once,
                resnapshot,
                metrics_addr,
                shutdown_grace,
                role,
            } => {
                let ops = commands::OpsOptions {
                    role,
                    metrics_addr,
                    grace: std::time::Duration::from_secs_f64(shutdown_grace.max(0.0)),
                };
                commands::run(&pipelines, once, resnapshot, &ops).await
            }
            Command::Check { pipelines, connect } => commands::check(&pipelines, connect).await,
            Command::Preview {
                pipeline,
                rows,
                file,
            } => commands::preview(&pipeline, rows, file.as_deref()).await,
            Command::Status { pipelines } => commands::status(&pipelines).await,
            Command::Serve { store, addr } => commands::serve(&store, addr).await,
            Command::Demo {
                dir,
                once,
                pace,
                drops,
            } => oppen::demo::run(&dir, once, pace, drops).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
