//! The delete batcher: finished messages are deleted in batches of up to 10
//! with DeleteMessageBatch, each refused entry retried, and a failed call
//! retried with backoff. Only a job whose outcome is known hands its message
//! here.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::sqs::{FailedDelete, MAX_BATCH, Queue, ReceivedMessage};
use crate::backoff::Backoff;
use crate::telemetry;

/// How often a failed delete entry is retried before it is given up on (the
/// message is then redelivered after its visibility timeout).
const DELETE_ATTEMPTS: u32 = 5;

#[derive(Debug)]
struct PendingDelete {
    message_id: String,
    receipt_handle: String,
    attempts: u32,
}

/// Hands finished messages to the delete batcher. Cloned into every job task.
#[derive(Clone)]
pub struct Deleter {
    /// Unbounded, because producers are already bounded by the concurrency
    /// permits, and a job must never block on bookkeeping after its outcome.
    tx: mpsc::UnboundedSender<PendingDelete>,
    /// Messages handed over whose delete is not finished (done or given up).
    /// `run --until-empty` must not call the queue drained while deletes are
    /// pending: on a FIFO queue they still block their message groups.
    outstanding: Arc<AtomicUsize>,
}

/// The batching task's half of a [`Deleter`]: not running until
/// [`Batcher::run`] is spawned.
pub struct Batcher {
    queue: Arc<Queue>,
    rx: mpsc::UnboundedReceiver<PendingDelete>,
    flush_interval: Duration,
    outstanding: Arc<AtomicUsize>,
}

impl Batcher {
    /// Deletes what it is handed until `close` fires; then it takes no new
    /// entries, flushes what it holds (or gives up on it), and returns.
    pub async fn run(self, close: CancellationToken) {
        run_deleter(
            self.queue,
            self.rx,
            self.flush_interval,
            close,
            self.outstanding,
        )
        .await
    }
}

impl Deleter {
    /// A deleter for `queue` and its batcher, which the caller spawns. A
    /// finished message waits at most `flush_interval` for nine others.
    pub fn new(queue: Arc<Queue>, flush_interval: Duration) -> (Self, Batcher) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher {
            queue,
            rx,
            flush_interval,
            outstanding: outstanding.clone(),
        };
        (Self { tx, outstanding }, batcher)
    }

    /// Deletes handed over and not yet finished.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    pub fn delete(&self, msg: &ReceivedMessage) {
        let pending = PendingDelete {
            message_id: msg.message_id.clone(),
            receipt_handle: msg.receipt_handle.clone(),
            attempts: 0,
        };
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(pending).is_err() {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            // Only possible if the batcher task panicked; the message will be
            // redelivered, so say so.
            telemetry::delete_failed(1);
            tracing::error!(message_id = %msg.message_id, "delete batcher is gone; message will be redelivered");
        }
    }
}

async fn run_deleter(
    queue: Arc<Queue>,
    mut rx: mpsc::UnboundedReceiver<PendingDelete>,
    flush_interval: Duration,
    close: CancellationToken,
    outstanding: Arc<AtomicUsize>,
) {
    let mut pending: Vec<PendingDelete> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut open = true;
    // Pause after a failed DeleteMessageBatch call (zero after a success):
    // the ceilings of `backoff`, without jitter, as one batcher has no herd
    // to spread. A success resets it.
    let mut failure_pause = Duration::ZERO;
    let mut backoff = new_failure_backoff();
    while open || !pending.is_empty() {
        let flush_at = oldest.map(|t| t + flush_interval.max(failure_pause));
        let full = pending.len() >= MAX_BATCH;
        if !full && open {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(p) => {
                        oldest.get_or_insert_with(Instant::now);
                        pending.push(p);
                        continue;
                    }
                    None => open = false,
                },
                _ = sleep_until_opt(flush_at) => {}
                // Closing: stop new sends, then keep receiving what is
                // already buffered until `recv` returns `None`.
                _ = close.cancelled(), if !rx.is_closed() => {
                    rx.close();
                    continue;
                }
            }
        } else if !open && !failure_pause.is_zero() {
            tokio::time::sleep(failure_pause).await;
        }
        if pending.is_empty() {
            oldest = None;
            continue;
        }
        let take = pending.len().min(MAX_BATCH);
        let batch: Vec<PendingDelete> = pending.drain(..take).collect();
        let waiting_before = pending.len();
        let handles: Vec<&str> = batch.iter().map(|p| p.receipt_handle.as_str()).collect();
        match queue.delete_batch(&handles).await {
            Ok(failed) => {
                failure_pause = Duration::ZERO;
                backoff = new_failure_backoff();
                let mut failed_idx: Vec<Option<FailedDelete>> =
                    batch.iter().map(|_| None).collect();
                for f in failed {
                    if let Some(slot) = failed_idx.get_mut(f.index) {
                        *slot = Some(f);
                    }
                }
                for (p, f) in batch.into_iter().zip(failed_idx) {
                    let Some(f) = f else { continue };
                    if f.sender_fault {
                        // e.g. ReceiptHandleIsInvalid: the message became
                        // visible again and was (or will be) redelivered.
                        telemetry::delete_failed(1);
                        tracing::warn!(message_id = %p.message_id, code = %f.code, "delete rejected by SQS; message will be redelivered");
                    } else {
                        requeue(&mut pending, p, &f.code);
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, entries = batch.len(), "DeleteMessageBatch failed; will retry");
                failure_pause = backoff.next_ceiling();
                for p in batch {
                    requeue(&mut pending, p, "call_failed");
                }
            }
        }
        // Entries not put back are finished: deleted, or given up on.
        let requeued = pending.len() - waiting_before;
        outstanding.fetch_sub(take - requeued, Ordering::SeqCst);
        oldest = (!pending.is_empty()).then(Instant::now);
    }
}

/// After a failed DeleteMessageBatch call: 200 ms doubling to 5 s.
fn new_failure_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
}

fn requeue(pending: &mut Vec<PendingDelete>, mut p: PendingDelete, code: &str) {
    p.attempts += 1;
    if p.attempts >= DELETE_ATTEMPTS {
        telemetry::delete_failed(1);
        tracing::error!(message_id = %p.message_id, code, "delete failed {DELETE_ATTEMPTS} times; message will be redelivered");
    } else {
        pending.push(p);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
