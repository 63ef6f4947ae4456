//! `oppen demo`: the example pipelines on their sample data, with no setup.
//!
//! The demo writes the example pipelines into a folder, drops the first export of
//! each into an inbox, and publishes. Unless `--once`, it then drops a new export
//! at a steady pace (the real ones first, then made-up later months with some
//! corrected amounts, new postings and credited ones) so new versions appear.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::watch;

use crate::commands::{CommandError, stop_on_signals};
use crate::runtime::{self, RunOptions};

/// Marks a folder as the demo's own, so it may be cleared on the next run.
const MARKER: &str = ".oppen-demo";

struct Asset {
    path: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal) => {
        Asset {
            path: $path,
            bytes: include_bytes!(concat!("../pipelines/", $path)),
        }
    };
}

const PIPELINES: [Asset; 6] = [
    asset!("leverantorsfakturor.yaml"),
    asset!("leverantorsfakturor.rules.yaml"),
    asset!("skolmat.yaml"),
    asset!("skolmat.rules.yaml"),
    asset!("badplatser.yaml"),
    asset!("badplatser.rules.yaml"),
];

const INVOICES: [Asset; 3] = [
    asset!("data/leverantorsfakturor/export-2025-01.csv"),
    asset!("data/leverantorsfakturor/export-2025-02.csv"),
    asset!("data/leverantorsfakturor/export-2025-03.csv"),
];
const MENUS: [Asset; 2] = [
    asset!("data/skolmat/meals-2025-W10.json"),
    asset!("data/skolmat/meals-2025-W11.json"),
];
const BATHING_SITES: Asset = asset!("data/register/badplatser.csv");

/// One export arriving in an inbox folder.
struct Drop {
    folder: &'static str,
    name: String,
    bytes: Vec<u8>,
}

fn io_error(path: &Path, e: &std::io::Error) -> CommandError {
    CommandError::Message(format!("{}: {e}", path.display()))
}

/// Writes a file so that it appears whole: the source never sees half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CommandError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| io_error(&tmp, &e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, &e))
}

fn prepare(dir: &Path) -> Result<(), CommandError> {
    if dir.exists() {
        let ours = dir.join(MARKER).exists();
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !ours && !empty {
            return Err(CommandError::Message(format!(
                "{} exists and is not a demo folder; choose another with --dir",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir).map_err(|e| io_error(dir, &e))?;
    }
    for sub in [
        "pipelines",
        "inbox/leverantorsfakturor",
        "inbox/skolmat",
        "inbox/register",
    ] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| io_error(&path, &e))?;
    }
    std::fs::write(
        dir.join(MARKER),
        b"made by oppen demo; removed on the next run\n",
    )
    .map_err(|e| io_error(dir, &e))?;
    for asset in &PIPELINES {
        let text = String::from_utf8_lossy(asset.bytes)
            .replace("path: data/", "path: ../inbox/")
            .replace("file://published", "file://../published")
            .replace("file://state", "file://../state");
        let path = dir.join("pipelines").join(asset.path);
        std::fs::write(&path, text).map_err(|e| io_error(&path, &e))?;
    }
    Ok(())
}

fn file_name(asset: &Asset) -> String {
    asset
        .path
        .rsplit('/')
        .next()
        .unwrap_or(asset.path)
        .to_string()
}

impl Drop {
    /// One of the embedded sample exports, under its own name.
    fn real(folder: &'static str, asset: &Asset) -> Self {
        Drop {
            folder,
            name: file_name(asset),
            bytes: asset.bytes.to_vec(),
        }
    }
}

/// The exports dropped before the first run.
fn first_round() -> Vec<Drop> {
    vec![
        Drop::real("leverantorsfakturor", &INVOICES[0]),
        Drop::real("skolmat", &MENUS[0]),
        Drop {
            folder: "register",
            name: "badplatser-0001.csv".into(),
            bytes: BATHING_SITES.bytes.to_vec(),
        },
    ]
}

/// Made-up later exports, derived from the real ones.
struct Generator {
    invoices: Vec<Vec<String>>,
    invoice_header: Vec<String>,
    month: u32,
    next_id: u64,
    sites: Vec<Vec<String>>,
    sites_header: Vec<String>,
    round: u64,
}

fn read_rows(text: &str, separator: u8) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(separator)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map(|h| h.iter().map(str::to_string).collect())
        .unwrap_or_default();
    let rows = reader
        .records()
        .filter_map(Result::ok)
        .map(|r| r.iter().map(str::to_string).collect())
        .collect();
    (header, rows)
}

fn write_rows(header: &[String], rows: &[Vec<String>], separator: u8) -> Vec<u8> {
    let mut writer = csv::WriterBuilder::new()
        .delimiter(separator)
        .from_writer(Vec::new());
    let _ = writer.write_record(header);
    for row in rows {
        let _ = writer.write_record(row);
    }
    writer.into_inner().unwrap_or_default()
}

impl Generator {
    fn new() -> Self {
        let (latin1, _) = encoding_rs::WINDOWS_1252.decode_without_bom_handling(INVOICES[2].bytes);
        let (invoice_header, invoices) = read_rows(&latin1, b';');
        let next_id = invoices
            .iter()
            .filter_map(|r| r.first()?.parse::<u64>().ok())
            .max()
            .unwrap_or(9_000_000)
            + 1;
        let (sites_header, sites) = read_rows(&String::from_utf8_lossy(BATHING_SITES.bytes), b',');
        Self {
            invoices,
            invoice_header,
            month: 3,
            next_id,
            sites,
            sites_header,
            round: 1,
        }
    }

    /// A later monthly full dump: about 1% of amounts corrected, a few postings
    /// credited (gone), and new postings in the new month.
    fn next_invoices(&mut self) -> Drop {
        self.month += 1;
        let (year, month) = (2025 + (self.month - 1) / 12, (self.month - 1) % 12 + 1);
        let amount = self
            .invoice_header
            .iter()
            .position(|h| h == "belopp")
            .unwrap_or(8);
        let date = self
            .invoice_header
            .iter()
            .position(|h| h == "bokforingsdatum")
            .unwrap_or(2);
        let n = self.invoices.len();
        for i in (0..n).step_by(97) {
            if let Some(v) = self.invoices[i].get_mut(amount) {
                *v = format!("{},{:02}", 100 + (i * 37) % 9000, i % 100);
            }
        }
        let mut credited = 0;
        self.invoices.retain(|_| {
            credited += 1;
            credited % 211 != 0
        });
        let templates: Vec<Vec<String>> =
            self.invoices.iter().step_by(37).take(60).cloned().collect();
        for (i, mut row) in templates.into_iter().enumerate() {
            row[0] = self.next_id.to_string();
            self.next_id += 1;
            row[date] = format!("{year:04}-{month:02}-{:02}", 1 + i % 28);
            self.invoices.push(row);
        }
        Drop {
            folder: "leverantorsfakturor",
            name: format!("export-{year:04}-{month:02}.csv"),
            bytes: write_rows(&self.invoice_header, &self.invoices, b';'),
        }
    }

    /// A new registry export with fresh water temperatures at some sites.
    fn next_sites(&mut self) -> Drop {
        self.round += 1;
        let temp = self
            .sites_header
            .iter()
            .position(|h| h == "vattentemp_senast")
            .unwrap_or(5);
        let updated = self
            .sites_header
            .iter()
            .position(|h| h == "uppdaterad")
            .unwrap_or(6);
        let round = self.round as usize;
        for (i, row) in self.sites.iter_mut().enumerate() {
            if (i + round).is_multiple_of(5) {
                row[temp] = format!("{}.{}", 14 + (i + round) % 9, (i * round) % 10);
                row[updated] = format!("2025-07-{:02}", 1 + round % 28);
            }
        }
        Drop {
            folder: "register",
            name: format!("badplatser-{:04}.csv", self.round),
            bytes: write_rows(&self.sites_header, &self.sites, b','),
        }
    }
}

/// The drops after the first round, in order; endless.
fn later_drops() -> impl Iterator<Item = Drop> {
    let real = vec![
        Drop::real("leverantorsfakturor", &INVOICES[1]),
        Drop::real("skolmat", &MENUS[1]),
        Drop::real("leverantorsfakturor", &INVOICES[2]),
    ];
    let mut generator = Generator::new();
    let mut turn = 0u64;
    real.into_iter().chain(std::iter::from_fn(move || {
        turn += 1;
        Some(if turn % 2 == 1 {
            generator.next_invoices()
        } else {
            generator.next_sites()
        })
    }))
}

fn drop_file(dir: &Path, drop: &Drop) -> Result<(), CommandError> {
    write_atomically(
        &dir.join("inbox").join(drop.folder).join(&drop.name),
        &drop.bytes,
    )
}

fn pipeline_files(dir: &Path) -> Vec<PathBuf> {
    [
        "leverantorsfakturor.yaml",
        "skolmat.yaml",
        "badplatser.yaml",
    ]
    .iter()
    .map(|f| dir.join("pipelines").join(f))
    .collect()
}

/// Runs the demo.
pub async fn run(
    dir: &Path,
    once: bool,
    pace: f64,
    drops: Option<usize>,
) -> Result<ExitCode, CommandError> {
    prepare(dir)?;
    for drop in first_round() {
        drop_file(dir, &drop)?;
    }
    let pipelines = crate::commands::load_all(&pipeline_files(dir))?;
    println!(
        "oppen demo: {} pipelines in {}",
        pipelines.len(),
        dir.join("pipelines").display()
    );
    // One stop signal for the pipelines: Ctrl-C/SIGTERM, or the last drop published.
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    if !once {
        let mut signals = stop_on_signals();
        let tx = stop_tx.clone();
        tokio::spawn(async move {
            if signals.changed().await.is_ok() {
                let _ = tx.send(true);
            }
        });
    }
    let options = RunOptions {
        once,
        progress: false,
        settle: Some(Duration::ZERO),
        resnapshot: false,
        telemetry: Default::default(),
        role: Default::default(),
        shared_slots: Default::default(),
    };
    let mut tasks = Vec::new();
    for pipeline in pipelines {
        let (options, stop) = (options.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let result = runtime::run(&pipeline, &options, stop).await;
            (pipeline, result)
        }));
    }
    if !once {
        println!("publishing; a new export arrives every {pace} s (Ctrl-C to stop)");
        let dir = dir.to_path_buf();
        let mut stopped = stop.clone();
        let tx = stop_tx.clone();
        tokio::spawn(async move {
            for (i, drop) in later_drops().enumerate() {
                if drops.is_some_and(|n| i >= n) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(pace.max(0.1))) => {}
                    _ = stopped.changed() => return,
                }
                match drop_file(&dir, &drop) {
                    Ok(()) => println!("dropped {}/{}", drop.folder, drop.name),
                    Err(e) => eprintln!("{e}"),
                }
            }
            // Give the pipelines time to publish the last drop, then stop them.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let _ = tx.send(true);
        });
    }
    let mut failed = false;
    for task in tasks {
        match task.await {
            Ok((pipeline, Ok(summary))) => {
                println!(
                    "{}: {} versions published, {} rows read",
                    pipeline.id(),
                    summary.versions.len(),
                    summary.rows_read
                );
            }
            Ok((pipeline, Err(e))) => {
                failed = true;
                eprintln!("{}: {e}", pipeline.id());
            }
            Err(e) => {
                failed = true;
                eprintln!("{e}");
            }
        }
    }
    let published = dir.join("published");
    println!("\npublished files: {}", published.display());
    for dataset in ["leverantorsfakturor", "skolmat", "badplatser"] {
        println!(
            "  {dataset}: {}",
            published.join(dataset).join("latest").display()
        );
    }
    println!(
        "see what is published: oppen status {}",
        pipeline_files(dir)
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
