//! The one commit loop every role goes through.
//!
//! A commit either lands, or meets one of two things a role settles its own
//! way: another publisher committed the version first (a conflict), or a part
//! of a first version streamed to the store was lost. The loop retries what a
//! retry can mend (a store that failed, a conflict settled by committing on
//! top) with backoff and jitter, and hands the rest to the role's [`Resolve`].

use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;

use super::RunError;
use super::source::retry_policy;
use crate::ops::telemetry::PipelineTelemetry;
use crate::publish::{Committed, PublishError, Publisher};

/// How a role settles a commit that cannot land as staged.
///
/// Both methods run after the publisher's state was found stale or
/// incomplete; what they leave staged is what the loop commits next.
pub(crate) trait Resolve {
    /// Called before every attempt (the transport publisher records the
    /// offsets the version reaches).
    fn before_attempt(&mut self, _publisher: &mut Publisher) {}

    /// Another publisher committed `version` first. Either what is staged can
    /// go on top of it ([`OnConflict::CommitOnTop`]), or it was dropped and the
    /// role reads its input again from the newest version's position.
    async fn conflict(
        &mut self,
        publisher: &mut Publisher,
        version: u64,
        tel: &mut PipelineTelemetry,
    ) -> Result<OnConflict, RunError>;

    /// A streamed part's rows are gone: drop what is staged and read the
    /// input again from the newest committed position.
    async fn reread(
        &mut self,
        publisher: &mut Publisher,
        tel: &mut PipelineTelemetry,
    ) -> Result<(), RunError>;
}

/// What a role decided about a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnConflict {
    /// Commit what is staged on top of the other publisher's version.
    CommitOnTop,
    /// What was staged is dropped; the role reads again.
    Dropped,
}

/// How a commit ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Committed (`None`: what was staged changed nothing published).
    Committed(Option<Committed>),
    /// What was staged was dropped, to be read again.
    Dropped,
}

/// Commits what `publisher` holds, retrying with backoff and jitter; a
/// conflict and a lost part go to `resolve`.
pub(crate) async fn commit(
    publisher: &mut Publisher,
    resolve: &mut impl Resolve,
    tel: &mut PipelineTelemetry,
) -> Result<Outcome, RunError> {
    tel.turned("committing a version");
    let started = Instant::now();
    let mut delays = retry_policy().build();
    loop {
        resolve.before_attempt(publisher);
        match publisher.commit().await {
            Ok(committed) => {
                if let Some(c) = &committed {
                    published(tel, c, started.elapsed());
                }
                return Ok(Outcome::Committed(committed));
            }
            Err(PublishError::Conflict { version, .. }) => {
                tel.error("conflict");
                if resolve.conflict(publisher, version, tel).await? == OnConflict::Dropped {
                    return Ok(Outcome::Dropped);
                }
                let Some(delay) = delays.next() else {
                    return Err(RunError::CommitConflict {
                        dataset: tel.dataset().to_string(),
                        version,
                    });
                };
                tel.retry("commit");
                // The other publisher has just committed: the version on top
                // of it is free now, so the pause is short.
                let pause = delay / 4;
                tracing::debug!(dataset = tel.dataset(), version, retry_in = ?pause, "another publisher committed first; committing on top of it");
                tokio::time::sleep(pause).await;
            }
            Err(e) if e.is_retryable() => {
                tel.error("publish");
                let Some(delay) = delays.next() else {
                    return Err(e.into());
                };
                tel.retry("commit");
                tracing::warn!(dataset = tel.dataset(), error = %e, retry_in = ?delay, "commit failed; retrying");
                tokio::time::sleep(delay).await;
                if matches!(e, PublishError::PartLost { .. }) {
                    resolve.reread(publisher, tel).await?;
                    return Ok(Outcome::Dropped);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Records and logs a committed version.
fn published(tel: &mut PipelineTelemetry, c: &Committed, took: Duration) {
    tel.committed(c, took);
    tracing::info!(
        dataset = tel.dataset(),
        version = c.version,
        rows = c.rows,
        inserts = c.inserts,
        updates = c.updates,
        deletes = c.deletes,
        partitions = c.partitions_written,
        ms = took.as_millis() as u64,
        "published version"
    );
}
