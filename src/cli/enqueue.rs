//! `reset-worker enqueue`: loads a campaign file into the queue.
//!
//! The rows are read and validated by [`super::input`]; this module sends
//! them in batches, and a checkpoint records which batches were sent, so a
//! re-run with `--resume` after an interruption never enqueues a row twice.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::estimate;
use super::input::{self, Format};
use crate::aws::sqs::{FifoIds, MAX_BATCH, Outgoing, Queue, QueueError};
use crate::backoff::Backoff;
use crate::config::{Settings, is_fifo};

/// SendMessageBatch calls in flight at once.
const IN_FLIGHT_BATCHES: usize = 4;
/// Attempts per batch for entries SQS refused or a failed call.
const BATCH_ATTEMPTS: u32 = 5;
/// FIFO queues: jobs are spread over this many message groups, so the
/// worker can process that many in parallel while each group stays ordered.
const FIFO_GROUPS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the CSV input has no `username` column")]
    NoUsernameColumn,
    #[error("invalid CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error(
        "checkpoint {0} exists from an earlier run: pass --resume to continue it, or delete it to start over"
    )]
    CheckpointExists(PathBuf),
    #[error("checkpoint {path} is for campaign `{found}`, not `{expected}`")]
    CheckpointCampaign {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot use checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error(
        "{failed} batches could not be sent after {BATCH_ATTEMPTS} attempts; re-run with --resume"
    )]
    Incomplete { failed: usize },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Which batches of a campaign file were sent. Batches are consecutive runs
/// of [`MAX_BATCH`] jobs over the validated, de-duplicated input, so the same
/// input always yields the same batches.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub campaign: String,
    pub total_jobs: usize,
    pub completed: BTreeSet<usize>,
}

impl Checkpoint {
    fn load(path: &Path) -> Result<Option<Self>, EnqueueError> {
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
    fn save(&self, path: &Path) -> Result<(), EnqueueError> {
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

/// `MessageDeduplicationId` for FIFO queues: SQS drops a second message with
/// the same ID within five minutes, whoever sends it.
pub fn fifo_ids(campaign: &str, username: &str) -> FifoIds {
    let digest = Sha256::new()
        .chain_update(campaign.as_bytes())
        .chain_update([0u8])
        .chain_update(username.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let group = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8])) % FIFO_GROUPS;
    FifoIds {
        group_id: format!("reset-{group:02}"),
        deduplication_id: hex,
    }
}

/// What a run sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub enqueued: usize,
    pub already_enqueued: usize,
}

/// Progress reporting: a bar on a terminal, plain lines otherwise.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: usize,
        last: Instant,
        started: Instant,
    },
}

impl Progress {
    fn new(total: usize) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} jobs  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total,
                last: Instant::now(),
                started: Instant::now(),
            }
        }
    }

    fn set(&mut self, done: usize) {
        match self {
            Progress::Bar(bar) => bar.set_position(done as u64),
            Progress::Lines {
                total,
                last,
                started,
            } => {
                if last.elapsed() >= Duration::from_secs(2) || done == *total {
                    *last = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                    eprintln!("enqueued {done}/{total} ({rate:.0}/s)");
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Sends the jobs, skipping batches the checkpoint records as sent.
pub async fn send(
    queue: Arc<Queue>,
    campaign: &str,
    jobs: &[(String, String)],
    checkpoint_path: Option<&Path>,
    resume: bool,
) -> Result<Sent, EnqueueError> {
    let mut checkpoint = match checkpoint_path {
        Some(path) => match Checkpoint::load(path)? {
            Some(_) if !resume => return Err(EnqueueError::CheckpointExists(path.to_owned())),
            Some(cp) if cp.campaign != campaign => {
                return Err(EnqueueError::CheckpointCampaign {
                    path: path.to_owned(),
                    found: cp.campaign,
                    expected: campaign.to_owned(),
                });
            }
            Some(cp) if cp.total_jobs != jobs.len() => {
                return Err(EnqueueError::Checkpoint {
                    path: path.to_owned(),
                    detail: format!(
                        "it was written for {} jobs but the input now has {}; the input must not change between runs",
                        cp.total_jobs,
                        jobs.len()
                    ),
                });
            }
            Some(cp) => cp,
            None => Checkpoint {
                campaign: campaign.to_owned(),
                total_jobs: jobs.len(),
                completed: BTreeSet::new(),
            },
        },
        None => Checkpoint::default(),
    };
    let fifo = is_fifo(queue.url());
    let batches: Vec<&[(String, String)]> = jobs.chunks(MAX_BATCH).collect();
    let already: usize = checkpoint
        .completed
        .iter()
        .filter_map(|&i| batches.get(i).map(|b| b.len()))
        .sum();
    let mut progress = Progress::new(jobs.len());
    let mut done = already;
    progress.set(done);

    let todo: Vec<usize> = (0..batches.len())
        .filter(|i| !checkpoint.completed.contains(i))
        .collect();
    let mut pending = todo
        .into_iter()
        .filter_map(|i| batches.get(i).map(|b| (i, *b)));
    let mut in_flight = JoinSet::new();
    let mut failed = 0usize;
    loop {
        while in_flight.len() < IN_FLIGHT_BATCHES {
            let Some((index, batch)) = pending.next() else {
                break;
            };
            let entries: Vec<Outgoing> = batch
                .iter()
                .enumerate()
                .map(|(i, (username, body))| Outgoing {
                    id: i.to_string(),
                    body: body.clone(),
                    fifo: fifo.then(|| fifo_ids(campaign, username)),
                })
                .collect();
            let queue = queue.clone();
            in_flight.spawn(async move { (index, send_with_retries(&queue, entries).await) });
        }
        let Some(joined) = in_flight.join_next().await else {
            break;
        };
        match joined {
            Ok((index, Ok(()))) => {
                checkpoint.completed.insert(index);
                done += batches.get(index).map_or(0, |b| b.len());
                progress.set(done);
                if let Some(path) = checkpoint_path {
                    checkpoint.save(path)?;
                }
            }
            Ok((index, Err(err))) => {
                failed += 1;
                tracing::error!(batch = index, error = %err, "batch not sent");
            }
            Err(join_error) => {
                failed += 1;
                tracing::error!(error = %join_error, "batch task failed");
            }
        }
    }
    progress.finish();
    if failed > 0 {
        return Err(EnqueueError::Incomplete { failed });
    }
    Ok(Sent {
        enqueued: done - already,
        already_enqueued: already,
    })
}

async fn send_with_retries(queue: &Queue, mut entries: Vec<Outgoing>) -> Result<(), QueueError> {
    // 400 ms doubling to 12.8 s, full jitter.
    let mut backoff = Backoff::new(Duration::from_millis(400), Duration::from_millis(12_800));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = queue.send_batch(&entries).await;
        match result {
            Ok(failed) if failed.is_empty() => return Ok(()),
            Ok(failed) => {
                let failed_ids: HashSet<String> = failed.into_iter().map(|(id, _)| id).collect();
                entries.retain(|m| failed_ids.contains(&m.id));
                if attempt >= BATCH_ATTEMPTS {
                    return Err(QueueError {
                        operation: "SendMessageBatch",
                        queue: queue.url().to_owned(),
                        code: None,
                        detail: format!("{} entries still refused", entries.len()),
                    });
                }
            }
            Err(err) if attempt >= BATCH_ATTEMPTS => return Err(err),
            Err(_) => {}
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// `reset-worker enqueue` arguments.
#[derive(clap::Args)]
pub struct EnqueueArgs {
    /// Campaign ID put on every job.
    #[arg(long)]
    campaign: String,
    /// Input format.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    format: Format,
    /// Validate and estimate only; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Checkpoint file (default: FILE.checkpoint; none for stdin unless given).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where invalid rows are listed (default: FILE.rejects.csv, or
    /// enqueue-rejects.csv for stdin).
    #[arg(long)]
    rejects: Option<PathBuf>,
    /// The campaign file; `-` reads stdin.
    file: String,
}

/// Runs `reset-worker enqueue`.
pub async fn run(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let stdin = args.file == "-";
    let mut reader: Box<dyn BufRead> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.file)
            .with_context(|| format!("Failed to open {}", args.file))?;
        Box::new(std::io::BufReader::new(file))
    };
    let loaded = input::load(&mut *reader, &args.file, args.format, &args.campaign)?;
    if args.format == Format::Auto
        && let Some(format) = loaded.format
    {
        eprintln!(
            "reading {} as {} (guessed; --format sets it)",
            args.file,
            format.name()
        );
    }
    let rejects_path = args.rejects.clone().unwrap_or_else(|| {
        if stdin {
            PathBuf::from("enqueue-rejects.csv")
        } else {
            PathBuf::from(format!("{}.rejects.csv", args.file))
        }
    });
    if !loaded.rejects.is_empty() {
        input::write_rejects(&rejects_path, &loaded.rejects)
            .with_context(|| format!("Failed to write {}", rejects_path.display()))?;
    }
    let valid = loaded.jobs.len();
    let estimate = estimate(valid as u64, settings.limits.max_rps);
    let rejects_note = || {
        if !loaded.rejects.is_empty() {
            println!("invalid rows listed in {}", rejects_path.display());
        }
    };
    if args.dry_run {
        println!(
            "dry run: {valid} valid jobs, {} invalid, {} duplicate; about {estimate} at limits.max_rps {}",
            loaded.rejects.len(),
            loaded.duplicates,
            settings.limits.max_rps
        );
        rejects_note();
        return Ok(());
    }
    let checkpoint = args
        .checkpoint
        .clone()
        .or_else(|| (!stdin).then(|| PathBuf::from(format!("{}.checkpoint", args.file))));
    let queue = Arc::new(super::queue(settings).await);
    let sent = send(
        queue,
        &args.campaign,
        &loaded.jobs,
        checkpoint.as_deref(),
        args.resume,
    )
    .await?;
    println!(
        "enqueued {}, already enqueued {}, invalid {}, duplicate {}; about {estimate} at limits.max_rps {}",
        sent.enqueued,
        sent.already_enqueued,
        loaded.rejects.len(),
        loaded.duplicates,
        settings.limits.max_rps
    );
    rejects_note();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_ids_are_stable_and_spread() {
        let a = fifo_ids("c", "alice");
        assert_eq!(a, fifo_ids("c", "alice"));
        assert_eq!(a.deduplication_id.len(), 64);
        assert_ne!(fifo_ids("c2", "alice").deduplication_id, a.deduplication_id);
        let groups: HashSet<String> = (0..500)
            .map(|i| fifo_ids("c", &format!("u{i}")).group_id)
            .collect();
        assert!(groups.len() > 32, "{}", groups.len());
    }
}
