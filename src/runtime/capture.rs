//! The capture half of a pipeline: source batches classified by the rules.

use std::time::Instant;

use oppen_connector_api::Source as _;

use super::open::published_key;
use super::source::PipelineSource;
use super::{RunError, RunSummary};
use crate::classify::{Classifier, PseudonymKey, SourceInfo};
use crate::config::Pipeline;
use crate::ops::telemetry::PipelineTelemetry;

/// The capture half of a pipeline: classifies source batches by the rules,
/// compiling the classifier again whenever the source's schema changes, and
/// keeps the run's counts. Shared by the embedded engine and the connector role.
pub(crate) struct Capture<'a> {
    pipeline: &'a Pipeline,
    key: PseudonymKey,
    classifier: Option<Classifier>,
    pub summary: RunSummary,
}

impl<'a> Capture<'a> {
    pub fn new(pipeline: &'a Pipeline, key: PseudonymKey) -> Self {
        Capture {
            pipeline,
            key,
            classifier: None,
            summary: RunSummary {
                suppressed: vec![0; pipeline.rules.rows.len()],
                ..RunSummary::default()
            },
        }
    }

    /// Whether a classifier has been compiled.
    pub fn compiled(&self) -> bool {
        self.classifier.is_some()
    }

    /// Whether `batch` comes with another schema than the classifier's.
    pub fn schema_changes(&self, batch: &oppen_connector_api::ChangeBatch) -> bool {
        self.classifier
            .as_ref()
            .is_none_or(|c| c.source_schema() != &batch.data.schema())
    }

    /// Classifies a batch, in the pieces it was split into for the cores
    /// (see [`Classifier::classify_pieces`]); with the source's description
    /// when the schema changed.
    pub fn classify(
        &mut self,
        batch: &oppen_connector_api::ChangeBatch,
        source: &PipelineSource,
        tel: &mut PipelineTelemetry,
    ) -> Result<(Vec<crate::classify::Classified>, Option<SourceInfo>), RunError> {
        let pipeline = self.pipeline;
        let dataset = pipeline.id();
        let mut info = None;
        let c = match self.classifier.take() {
            Some(c) if c.source_schema() == &batch.data.schema() => self.classifier.insert(c),
            _ => {
                let schema = batch.data.schema();
                let compiled = Classifier::compile_keyed(
                    pipeline,
                    schema.clone(),
                    &self.key,
                    source.key(),
                    matches!(source, PipelineSource::Files(_)),
                )
                .map_err(RunError::Rules)?;
                for column in &compiled.unclassified {
                    tracing::warn!(
                        dataset,
                        column,
                        "column has no rule and is not published (unclassified: drop)"
                    );
                }
                // The source's types and the unclassified columns change only
                // with its schema: reported here, not for every batch.
                self.summary.unclassified.clone_from(&compiled.unclassified);
                tel.unclassified(compiled.unclassified.len());
                info = Some(SourceInfo {
                    types: oppen_connector_api::known_types(&schema),
                    unclassified: compiled.unclassified.clone(),
                    primary_key: crate::config::source_key(pipeline)
                        .is_empty()
                        .then(|| published_key(pipeline, source.key())),
                });
                self.classifier.insert(compiled)
            }
        };
        let started = Instant::now();
        let pieces = tokio::task::block_in_place(|| c.classify_pieces(batch))?;
        tracing::trace!(
            dataset,
            rows = batch.num_rows(),
            us = started.elapsed().as_micros() as u64,
            "classified batch"
        );
        self.summary.rows_read += batch.num_rows() as u64;
        for classified in &pieces {
            let suppressed = classified.suppressed_counts(pipeline.rules.rows.len());
            tel.classified(&suppressed, classified.values_redacted);
            for (total, n) in self.summary.suppressed.iter_mut().zip(suppressed) {
                *total += n;
            }
            self.summary.values_redacted += classified.values_redacted;
        }
        Ok((pieces, info))
    }

    /// Counts and logs an input the source set aside.
    pub fn rejected(
        &mut self,
        rejection: &oppen_connector_api::Rejection,
        tel: &mut PipelineTelemetry,
    ) {
        self.summary.rejected += 1;
        tel.dead_letter();
        tracing::error!(
            dataset = self.pipeline.id(),
            what = rejection.what,
            moved_to = rejection.moved_to.as_deref().unwrap_or("-"),
            reason = rejection.reason,
            "input rejected; the pipeline goes on"
        );
    }
}
