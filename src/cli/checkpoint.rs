//! The `enqueue` checkpoint: which entries of a campaign file SQS accepted,
//! and a digest of the job list they index.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::enqueue::EnqueueError;
use super::input::Job;

/// Which jobs of a campaign file were sent, entry by entry, and a digest of
/// the validated job list they index, so `--resume` refuses an input that
/// changed (a reordered file of the same size would otherwise skip some
/// users and enqueue others twice).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub campaign: String,
    /// SHA-256 of the validated job bodies, in order.
    pub digest: String,
    pub total_jobs: usize,
    /// Indices of the jobs SQS accepted (`--from-user-pool`: of the page
    /// being sent).
    pub sent: BTreeSet<usize>,
    /// `--from-user-pool`: SHA-256 of (user pool ID, filter, campaign), the
    /// listing this checkpoint follows. Absent for a file's checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `--from-user-pool`: the `ListUsers` token of the page being sent
    /// (`None`: the first page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagination_token: Option<String>,
    /// `--from-user-pool`: pages fully enqueued.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: u64,
    /// `--from-user-pool`: jobs enqueued by those pages.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub enqueued: u64,
    /// `--from-user-pool`: the last page was enqueued.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// SHA-256, hex, of the job bodies in order (each followed by a newline).
pub fn digest(jobs: &[Job]) -> String {
    let mut hash = Sha256::new();
    for job in jobs {
        hash.update(job.body.as_bytes());
        hash.update(b"\n");
    }
    hex::encode(hash.finalize())
}

impl Checkpoint {
    pub(super) fn load(path: &Path) -> Result<Option<Self>, EnqueueError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| EnqueueError::Checkpoint {
                        path: path.to_owned(),
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EnqueueError::Checkpoint {
                path: path.to_owned(),
                detail: e.to_string(),
            }),
        }
    }

    /// Write-then-rename, so a crash mid-write leaves the old checkpoint.
    pub(super) fn save(&self, path: &Path) -> Result<(), EnqueueError> {
        let tmp = path.with_extension("tmp");
        let err = |e: std::io::Error| EnqueueError::Checkpoint {
            path: path.to_owned(),
            detail: e.to_string(),
        };
        let bytes = serde_json::to_vec(self).map_err(|e| EnqueueError::Checkpoint {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}
