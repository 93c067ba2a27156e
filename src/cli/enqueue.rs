//! `reset-worker enqueue`: loads a campaign file into the queue.
//!
//! The rows are read and validated by [`super::input`]; this module sends
//! them in batches, and a checkpoint records which batches were sent, so a
//! re-run with `--resume` after an interruption never enqueues a row twice.

use std::collections::{BTreeSet, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use super::checkpoint::{Checkpoint, digest};
use super::estimate;
use super::input::{self, Format, Job};
use super::progress::Progress;
use crate::aws::sqs::{
    DEFAULT_MAX_MESSAGE_BYTES, FifoIds, MAX_BATCH, Outgoing, Queue, QueueError, max_message_bytes,
};
use crate::backoff::Backoff;
use crate::config::{Settings, is_fifo};
use crate::ledger::Ledger;

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
    #[error("interrupted: {sent} of {total} jobs sent and recorded; re-run with --resume")]
    Interrupted { sent: usize, total: usize },
    /// `--from-user-pool`: stopped by a signal; the total is not known.
    #[error(
        "interrupted: {enqueued} jobs enqueued and recorded ({pages} pages done); re-run with --resume"
    )]
    InterruptedListing { enqueued: u64, pages: u64 },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// `MessageDeduplicationId` for FIFO queues: SQS drops a second message with
/// the same ID within five minutes, whoever sends it.
pub fn fifo_ids(campaign: &str, username: &str) -> FifoIds {
    let digest = Sha256::new()
        .chain_update(campaign.as_bytes())
        .chain_update([0u8])
        .chain_update(username.as_bytes())
        .finalize();
    let group = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8])) % FIFO_GROUPS;
    FifoIds {
        group_id: format!("reset-{group:02}"),
        deduplication_id: hex::encode(digest),
    }
}

/// What a run sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub enqueued: usize,
    pub already_enqueued: usize,
}

/// Splits `pending` (indices into `jobs`) into SendMessageBatch calls of at
/// most 10 entries and `max_bytes` of bodies in all, in order.
pub fn pack(jobs: &[Job], pending: &[usize], max_bytes: usize) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for &i in pending {
        let size = jobs[i].body.len();
        match batches.last_mut() {
            Some(batch) if batch.len() < MAX_BATCH && bytes + size <= max_bytes => {
                batch.push(i);
                bytes += size;
            }
            _ => {
                batches.push(vec![i]);
                bytes = size;
            }
        }
    }
    batches
}

/// Sends the jobs the checkpoint does not record as sent, recording each
/// accepted entry. On SIGINT/SIGTERM it sends no new batch, lets the ones in
/// flight finish, writes the checkpoint and stops.
/// `skip` holds the jobs not to send (users the ledger has as `sent`); they
/// are not recorded in the checkpoint, so the input's digest stays the same
/// and `--resume` asks the ledger again.
pub async fn send(
    queue: Arc<Queue>,
    campaign: &str,
    jobs: &[Job],
    skip: &HashSet<usize>,
    max_bytes: usize,
    checkpoint_path: Option<&Path>,
    resume: bool,
) -> Result<Sent, EnqueueError> {
    let digest = digest(jobs);
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
            Some(cp) if cp.digest != digest || cp.total_jobs != jobs.len() => {
                return Err(EnqueueError::Checkpoint {
                    path: path.to_owned(),
                    detail: format!(
                        "it was written for another input ({} jobs, digest {}…; now {} jobs, digest {}…); \
                         the input must not change between runs",
                        cp.total_jobs,
                        &cp.digest.get(..12).unwrap_or(&cp.digest),
                        jobs.len(),
                        &digest[..12]
                    ),
                });
            }
            Some(cp) => cp,
            None => Checkpoint {
                campaign: campaign.to_owned(),
                digest: digest.clone(),
                total_jobs: jobs.len(),
                sent: BTreeSet::new(),
                ..Checkpoint::default()
            },
        },
        None => Checkpoint::default(),
    };
    let already = checkpoint.sent.len();
    let pending: Vec<usize> = (0..jobs.len())
        .filter(|i| !checkpoint.sent.contains(i) && !skip.contains(i))
        .collect();
    let mut progress = Progress::new(already + pending.len());
    progress.set(already);

    let interrupted = crate::shutdown::on_signal().map_err(|e| EnqueueError::Checkpoint {
        path: checkpoint_path.map(Path::to_owned).unwrap_or_default(),
        detail: format!("cannot install signal handlers: {e}"),
    })?;
    let total = already + pending.len();
    let failed = send_pending(
        &queue,
        campaign,
        jobs,
        &pending,
        max_bytes,
        &interrupted,
        |accepted| {
            checkpoint.sent.extend(accepted);
            progress.set(checkpoint.sent.len().min(total));
            match checkpoint_path {
                Some(path) => checkpoint.save(path),
                None => Ok(()),
            }
        },
    )
    .await?;
    progress.finish();
    let sent = checkpoint.sent.len() - already;
    if interrupted.is_cancelled() && sent < pending.len() {
        return Err(EnqueueError::Interrupted {
            sent: checkpoint.sent.len(),
            total: already + pending.len(),
        });
    }
    if failed > 0 {
        return Err(EnqueueError::Incomplete { failed });
    }
    Ok(Sent {
        enqueued: sent,
        already_enqueued: already,
    })
}

/// Sends `pending` (indices into `jobs`) in packed batches,
/// [`IN_FLIGHT_BATCHES`] at once, and hands each batch's accepted indices to
/// `record` (which writes the caller's checkpoint) as it finishes. Once
/// `interrupted` is cancelled it starts no new batch and lets those in
/// flight finish. Returns the number of batches not fully sent.
pub(super) async fn send_pending(
    queue: &Arc<Queue>,
    campaign: &str,
    jobs: &[Job],
    pending: &[usize],
    max_bytes: usize,
    interrupted: &CancellationToken,
    mut record: impl FnMut(Vec<usize>) -> Result<(), EnqueueError>,
) -> Result<usize, EnqueueError> {
    let fifo = is_fifo(queue.url());
    let mut batches = pack(jobs, pending, max_bytes).into_iter();
    let mut in_flight = JoinSet::new();
    let mut failed = 0usize;
    loop {
        while in_flight.len() < IN_FLIGHT_BATCHES && !interrupted.is_cancelled() {
            let Some(batch) = batches.next() else {
                break;
            };
            let entries: Vec<Outgoing> = batch
                .iter()
                .map(|&i| Outgoing {
                    id: i.to_string(),
                    body: jobs[i].body.clone(),
                    fifo: fifo.then(|| fifo_ids(campaign, &jobs[i].username)),
                })
                .collect();
            let queue = queue.clone();
            in_flight.spawn(async move { send_with_retries(&queue, entries).await });
        }
        let Some(joined) = in_flight.join_next().await else {
            break;
        };
        match joined {
            Ok(result) => {
                record(result.sent)?;
                if let Some(err) = result.error {
                    failed += 1;
                    tracing::error!(error = %err, "batch not fully sent");
                }
            }
            Err(join_error) => {
                failed += 1;
                tracing::error!(error = %join_error, "batch task failed");
            }
        }
    }
    Ok(failed)
}

/// What one batch achieved: the job indices SQS accepted, and the error
/// that stopped it, if any.
struct BatchResult {
    sent: Vec<usize>,
    error: Option<QueueError>,
}

/// Sends one batch, retrying only the entries SQS refused (or all, after a
/// failed call) up to [`BATCH_ATTEMPTS`] times.
async fn send_with_retries(queue: &Queue, mut entries: Vec<Outgoing>) -> BatchResult {
    // 400 ms doubling to 12.8 s, full jitter.
    let mut backoff = Backoff::new(Duration::from_millis(400), Duration::from_millis(12_800));
    let mut sent = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match queue.send_batch(&entries).await {
            Ok(failed) => {
                let failed_ids: HashSet<String> = failed.into_iter().map(|(id, _)| id).collect();
                let (refused, accepted): (Vec<Outgoing>, Vec<Outgoing>) = entries
                    .into_iter()
                    .partition(|m| failed_ids.contains(&m.id));
                sent.extend(accepted.iter().filter_map(|m| m.id.parse::<usize>().ok()));
                entries = refused;
                if entries.is_empty() {
                    return BatchResult { sent, error: None };
                }
                QueueError {
                    operation: "SendMessageBatch",
                    queue: queue.url().to_owned(),
                    code: None,
                    detail: format!("{} entries still refused", entries.len()),
                }
            }
            Err(err) => err,
        };
        if attempt >= BATCH_ATTEMPTS {
            return BatchResult {
                sent,
                error: Some(error),
            };
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// `reset-worker enqueue` arguments.
#[derive(clap::Args)]
pub struct EnqueueArgs {
    /// Campaign ID put on every job.
    #[arg(long)]
    pub(super) campaign: String,
    /// User pool put on every job (`default` or a `cognito.pools` name;
    /// without it, jobs go to the `default` pool unless a row names its
    /// own). A pool that is not configured exits with code 2. With
    /// --from-user-pool: the pool to list (default `default`).
    #[arg(long)]
    pub(super) pool: Option<String>,
    /// Input format.
    #[arg(long, value_enum, default_value_t = Format::Auto, conflicts_with = "from_user_pool")]
    format: Format,
    /// Validate and estimate only; send nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    pub(super) resume: bool,
    /// Checkpoint file (default: FILE.checkpoint; none for stdin unless
    /// given; with --from-user-pool, enqueue-from-pool-KEY.checkpoint).
    #[arg(long)]
    pub(super) checkpoint: Option<PathBuf>,
    /// Where invalid rows are listed (default: FILE.rejects.csv, or
    /// enqueue-rejects.csv for stdin).
    #[arg(long, conflicts_with = "from_user_pool")]
    rejects: Option<PathBuf>,
    /// Also enqueue users the ledger has as `sent` in this campaign
    /// (by default they are skipped and counted).
    #[arg(long)]
    pub(super) include_sent: bool,
    /// Select the users from the pool (`ListUsers` on its `user_pool_id`)
    /// instead of a file.
    #[arg(long, conflicts_with = "file")]
    pub(super) from_user_pool: bool,
    /// With --from-user-pool: Cognito's own ListUsers filter, passed as
    /// given, e.g. `email ^= "leak"` or `cognito:user_status = "CONFIRMED"`.
    #[arg(long, requires = "from_user_pool")]
    pub(super) filter: Option<String>,
    /// With --from-user-pool: ListUsers calls per second, 1-20 (ListUsers
    /// has its own account quota, shared with the applications).
    #[arg(
        long,
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=20),
        requires = "from_user_pool"
    )]
    pub(super) list_rps: u32,
    /// With --from-user-pool: also enqueue users who cannot receive a code
    /// (disabled, or no verified email or phone number).
    #[arg(long, requires = "from_user_pool")]
    pub(super) include_unreachable: bool,
    /// The campaign file; `-` reads stdin.
    #[arg(required_unless_present = "from_user_pool")]
    file: Option<String>,
}

impl EnqueueArgs {
    /// `--pool`, checked against the configuration before anything runs.
    pub fn pool(&self) -> Option<&str> {
        self.pool.as_deref()
    }

    /// `--from-user-pool`: the pool to list.
    pub fn from_user_pool(&self) -> Option<&str> {
        self.from_user_pool
            .then(|| self.pool.as_deref().unwrap_or(crate::config::DEFAULT_POOL))
    }
}

/// The queue's `MaximumMessageSize`; a dry run without access to it
/// assumes SQS's default.
pub(super) async fn queue_max_bytes(queue: &Queue, dry_run: bool) -> Result<usize, QueueError> {
    match queue.attributes(queue.url()).await {
        Ok(attributes) => Ok(max_message_bytes(&attributes)),
        Err(err) if dry_run => {
            eprintln!(
                "cannot read the queue's MaximumMessageSize ({err}); assuming {DEFAULT_MAX_MESSAGE_BYTES} bytes"
            );
            Ok(DEFAULT_MAX_MESSAGE_BYTES)
        }
        Err(err) => Err(err),
    }
}

/// The jobs whose user the ledger has as `sent` in `campaign`: one batched
/// read per 100 users. The memory ledger lives in the worker only, so it
/// knows of none here.
async fn already_sent(
    settings: &Settings,
    campaign: &str,
    jobs: &[Job],
) -> anyhow::Result<HashSet<usize>> {
    let ledger = super::report::open(settings).await?;
    sent_in(&ledger, campaign, jobs).await
}

/// The indices of `jobs` whose user `ledger` has as `sent` in `campaign`
/// (none for a ledger that dies with its process).
pub(super) async fn sent_in(
    ledger: &Ledger,
    campaign: &str,
    jobs: &[Job],
) -> anyhow::Result<HashSet<usize>> {
    if !ledger.outlives_process() || jobs.is_empty() {
        return Ok(HashSet::new());
    }
    let usernames: Vec<String> = jobs.iter().map(|j| j.username.clone()).collect();
    let sent = ledger
        .sent_among(campaign, &usernames)
        .await
        .context("Failed to ask the ledger which users were already sent")?;
    Ok(jobs
        .iter()
        .enumerate()
        .filter(|(_, j)| sent.contains(&j.username))
        .map(|(i, _)| i)
        .collect())
}

/// Runs `reset-worker enqueue`.
pub async fn run(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    // clap requires FILE unless --from-user-pool is given.
    let Some(file) = args.file.clone() else {
        return super::from_pool::run(settings, args).await;
    };
    let stdin = file == "-";
    let mut reader: Box<dyn BufRead> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let opened =
            std::fs::File::open(&file).with_context(|| format!("Failed to open {file}"))?;
        Box::new(std::io::BufReader::new(opened))
    };
    let mut loaded = input::load_for_pool(
        &mut *reader,
        &file,
        args.format,
        &args.campaign,
        args.pool.as_deref(),
    )?;
    if args.format == Format::Auto
        && let Some(format) = loaded.format
    {
        eprintln!(
            "reading {file} as {} (guessed; --format sets it)",
            format.name()
        );
    }
    let queue = Arc::new(super::queue(settings).await);
    let max_bytes = queue_max_bytes(&queue, args.dry_run).await?;
    // A row the queue cannot take is an invalid row, not a failed run.
    let (fit, too_large): (Vec<Job>, Vec<Job>) = std::mem::take(&mut loaded.jobs)
        .into_iter()
        .partition(|job| job.body.len() <= max_bytes);
    loaded.jobs = fit;
    loaded
        .rejects
        .extend(too_large.iter().map(|job| input::Reject {
            line: job.line,
            reason: format!(
                "the job is {} bytes; the queue takes at most {max_bytes} (MaximumMessageSize)",
                job.body.len()
            ),
        }));
    loaded.rejects.sort_by_key(|r| r.line);

    let rejects_path = args.rejects.clone().unwrap_or_else(|| {
        if stdin {
            PathBuf::from("enqueue-rejects.csv")
        } else {
            PathBuf::from(format!("{file}.rejects.csv"))
        }
    });
    if !loaded.rejects.is_empty() {
        input::write_rejects(&rejects_path, &loaded.rejects)
            .with_context(|| format!("Failed to write {}", rejects_path.display()))?;
    }
    let skip = if args.include_sent {
        HashSet::new()
    } else {
        already_sent(settings, &args.campaign, &loaded.jobs).await?
    };
    if !skip.is_empty() {
        eprintln!(
            "skipping {} users already sent in campaign `{}` (the ledger says so; --include-sent sends them again)",
            skip.len(),
            args.campaign
        );
    }
    let valid = loaded.jobs.len() - skip.len();
    let estimate = estimate(valid as u64, settings.limits.max_rps);
    let rejects_note = || {
        if !loaded.rejects.is_empty() {
            println!("invalid rows listed in {}", rejects_path.display());
        }
    };
    if args.dry_run {
        println!(
            "dry run: {valid} valid jobs, {} invalid, {} duplicate, {} already sent; about {estimate} at limits.max_rps {}",
            loaded.rejects.len(),
            loaded.duplicates,
            skip.len(),
            settings.limits.max_rps
        );
        rejects_note();
        return Ok(());
    }
    let checkpoint = args
        .checkpoint
        .clone()
        .or_else(|| (!stdin).then(|| PathBuf::from(format!("{file}.checkpoint"))));
    let sent = send(
        queue,
        &args.campaign,
        &loaded.jobs,
        &skip,
        max_bytes,
        checkpoint.as_deref(),
        args.resume,
    )
    .await?;
    println!(
        "enqueued {}, already enqueued {}, invalid {}, duplicate {}, already sent {}; about {estimate} at limits.max_rps {}",
        sent.enqueued,
        sent.already_enqueued,
        loaded.rejects.len(),
        loaded.duplicates,
        skip.len(),
        settings.limits.max_rps
    );
    rejects_note();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(line: usize, bytes: usize) -> Job {
        Job {
            line,
            username: format!("user{line}"),
            body: "x".repeat(bytes),
        }
    }

    /// Hardening #8: batches were cut by count only, so ten rows of 100 KB
    /// made a request SQS refuses (BatchRequestTooLong) on every try.
    #[test]
    fn batches_are_packed_by_bytes_and_count() {
        let big: Vec<Job> = (0..10).map(|i| job(i, 100_000)).collect();
        let all: Vec<usize> = (0..10).collect();
        let batches = pack(&big, &all, 256 * 1024);
        assert_eq!(batches.len(), 5);
        assert!(batches.iter().all(|b| b.len() == 2));
        let small: Vec<Job> = (0..25).map(|i| job(i, 100)).collect();
        let all: Vec<usize> = (0..25).collect();
        let sizes: Vec<usize> = pack(&small, &all, 256 * 1024)
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        // Order is kept, and a resume packs only what is left.
        assert_eq!(pack(&small, &[3, 7, 9], 1024), vec![vec![3, 7, 9]]);
    }

    /// Hardening #7: only the job count was compared, so a reordered file
    /// of the same size resumed against the wrong checkpoint.
    #[test]
    fn the_digest_tells_a_reordered_input_apart() {
        let a = vec![
            job(1, 10),
            Job {
                body: "other".into(),
                ..job(2, 0)
            },
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(a.len(), b.len());
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a), digest(&a.clone()));
    }

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
