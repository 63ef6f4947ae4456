//! Opening a pipeline: its stores, its pseudonym key, its publisher and the
//! description of its dataset.

use oppen_connector_api::Position;
use sha2::{Digest, Sha256};

use super::{RunError, RunOptions};
use crate::classify::{Keyer, PseudonymKey};
use crate::config::Pipeline;
use crate::config::pipeline::KeySource;
use crate::ops::telemetry::PipelineTelemetry;
use crate::publish::catalog::DatasetMeta;
use crate::publish::{self, Publisher, Settings};
use crate::store::Store;

/// The file in the state location that holds a generated pseudonym key.
pub const GENERATED_KEY_FILE: &str = "pseudonym.key";

/// SHA-256 of a file's bytes, hex.
pub fn digest_file(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| hex::encode(Sha256::digest(b)))
        .unwrap_or_default()
}

/// Loads the pseudonym key: from the environment or a file when the pipeline
/// names one, else the key generated once in the state location.
pub async fn pseudonym_key(pipeline: &Pipeline, state: &Store) -> Result<PseudonymKey, RunError> {
    match pipeline.spec.pseudonym_key.as_ref().map(|k| &k.value) {
        Some(KeySource::Env(name)) => {
            let value = std::env::var(name).map_err(|_| {
                RunError::PseudonymKey(format!(
                    "environment variable {name} (pseudonym_key) is not set"
                ))
            })?;
            PseudonymKey::from_text(&value)
                .map_err(|e| RunError::PseudonymKey(format!("{name}: {e}")))
        }
        Some(KeySource::File(path)) => {
            let path = pipeline
                .file
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                RunError::PseudonymKey(format!("pseudonym key file {}: {e}", path.display()))
            })?;
            PseudonymKey::from_text(&text)
                .map_err(|e| RunError::PseudonymKey(format!("{}: {e}", path.display())))
        }
        None => {
            if let Some(bytes) = state.get(GENERATED_KEY_FILE).await? {
                return PseudonymKey::from_text(&String::from_utf8_lossy(&bytes))
                    .map_err(RunError::PseudonymKey);
            }
            let key = PseudonymKey::generate().map_err(RunError::PseudonymKey)?;
            // Two pipelines sharing a state location may race here: the first wins,
            // the other reads the winner's key.
            match state
                .create(GENERATED_KEY_FILE, key.to_hex().into_bytes().into())
                .await?
            {
                Ok(()) => {
                    tracing::info!(location = %state.location(), "generated a pseudonym key in the state location; back it up with the state");
                    Ok(key)
                }
                Err(_) => {
                    let bytes = state.get(GENERATED_KEY_FILE).await?.unwrap_or_default();
                    PseudonymKey::from_text(&String::from_utf8_lossy(&bytes))
                        .map_err(RunError::PseudonymKey)
                }
            }
        }
    }
}

/// The publisher settings of a pipeline.
pub fn settings(pipeline: &Pipeline, keyer: &Keyer) -> Settings {
    let publish = &pipeline.spec.publish;
    let partition_by = publish.partition_by.as_ref().map(|p| {
        let column = &p.value.column;
        let published = pipeline
            .rule(column)
            .and_then(|r| r.rename.clone())
            .unwrap_or_else(|| column.clone());
        (published, p.value.by)
    });
    Settings {
        dataset: pipeline.id().to_string(),
        formats: publish.formats.value.clone(),
        partition_by,
        keep_versions: publish.keep_versions.value,
        max_file_rows: publish.max_file_rows.value,
        row_cache_bytes: publish.cache_mb << 20,
        rules_digest: digest_file(&pipeline.rules_file),
        key_fingerprint: keyer.fingerprint(),
        catalog: Some((dataset_meta(pipeline), public_url(pipeline))),
    }
}

/// Where consumers reach the store: `publish.public_url`, else the store itself.
pub fn public_url(pipeline: &Pipeline) -> String {
    match &pipeline.spec.publish.public_url {
        Some(url) => url.value.trim_end_matches('/').to_string(),
        None => pipeline.store.to_string(),
    }
}

/// The catalog description of a pipeline's dataset.
pub fn dataset_meta(pipeline: &Pipeline) -> DatasetMeta {
    let d = &pipeline.spec.dataset;
    let accrual = d.accrual.map(|a| a.eu_code().to_string());
    let access = match d.access.value {
        crate::config::Access::Open => "PUBLIC",
        crate::config::Access::Shared => "RESTRICTED",
        crate::config::Access::Internal => "NON_PUBLIC",
    };
    DatasetMeta {
        id: pipeline.id().to_string(),
        title: d.title.clone(),
        description: d.description.clone(),
        publisher: d.publisher.name.clone(),
        org_nr: d
            .publisher
            .org_nr
            .value
            .chars()
            .filter(char::is_ascii_digit)
            .collect(),
        contact: d.contact.clone(),
        license: d.license.clone(),
        conforms_to: d.conforms_to.clone(),
        accrual,
        access: access.to_string(),
        keywords: d.keywords.clone(),
        themes: d.themes.clone(),
        primary_key: published_key(pipeline, crate::config::source_key(pipeline)),
        issued: None,
        modified: None,
        temporal: None,
        files: Default::default(),
        columns: Vec::new(),
        rows: 0,
    }
}

/// The source key as consumers see it: a primary key only if every key column
/// is published as is (under its published name); else none.
pub fn published_key(pipeline: &Pipeline, key: &[String]) -> Vec<String> {
    key.iter()
        .map(|k| {
            let rule = pipeline.rule(k)?;
            (rule.action == crate::config::Action::Keep)
                .then(|| rule.rename.clone().unwrap_or_else(|| k.clone()))
        })
        .collect::<Option<Vec<String>>>()
        .unwrap_or_default()
}

/// Opens the stores, the pseudonym key and the publisher of a pipeline.
pub async fn open(
    pipeline: &Pipeline,
) -> Result<(Publisher, publish::Recovered, Keyer, PseudonymKey), RunError> {
    let store = pipeline.store.open()?;
    let state = pipeline.state.open()?;
    let key = pseudonym_key(pipeline, &state).await?;
    let keyer = Keyer::new(&key);
    let settings = settings(pipeline, &keyer);
    let (publisher, recovered) = Publisher::open(settings, store, state).await?;
    Ok((publisher, recovered, keyer, key))
}

/// [`open`], and the dataset described to the telemetry (accrual period,
/// newest version).
pub(crate) async fn open_described(
    pipeline: &Pipeline,
    tel: &mut PipelineTelemetry,
) -> Result<(Publisher, publish::Recovered, Keyer, PseudonymKey), RunError> {
    let opened = open(pipeline).await?;
    let recovered = &opened.1;
    tel.describe(
        pipeline
            .spec
            .dataset
            .accrual
            .and_then(|a| a.period_seconds()),
        recovered.created.map(|t| (recovered.version, t)),
    );
    Ok(opened)
}

/// Where the source starts: at `committed`, or with `--resnapshot` afresh.
pub(crate) fn resume_at(options: &RunOptions, committed: Option<Position>) -> Option<Position> {
    if options.resnapshot {
        tracing::warn!("--resnapshot: reading the source from a fresh snapshot");
        return None;
    }
    committed
}
