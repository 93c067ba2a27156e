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

/// Attempts per message when the DeleteMessageBatch call itself fails (with
/// the backoff between calls, about 3 s in all), before it is given up on
/// (the message is then redelivered after its visibility timeout: a second
/// email).
const DELETE_ATTEMPTS: u32 = 5;
/// Attempts per message when SQS refuses its entry (`Failed`, not the
/// sender's fault) in a call that went through. Such retries ride along
/// with the next batches at no extra cost, so they get more: at 30 % of
/// entries refused, 5 attempts gave up one message in 400, 10 one in
/// 170,000.
const REFUSED_ENTRY_ATTEMPTS: u32 = 10;

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
    // After a failed DeleteMessageBatch call no flush, full batch or not,
    // goes out before `retry_at`: the ceilings of `backoff`, without jitter,
    // as one batcher has no herd to spread. A success resets both. (A full
    // batch used to skip the pause, so at 10/s and more every attempt burned
    // within a second and the deletes were given up.)
    let mut retry_at: Option<Instant> = None;
    let mut backoff = new_failure_backoff();
    while open || !pending.is_empty() {
        let due = (!pending.is_empty()).then(|| {
            let batch_due = if pending.len() >= MAX_BATCH || !open {
                Instant::now()
            } else {
                oldest.unwrap_or_else(Instant::now) + flush_interval
            };
            retry_at.map_or(batch_due, |r| batch_due.max(r))
        });
        if open {
            tokio::select! {
                biased;
                _ = sleep_until_opt(due) => {}
                item = rx.recv() => match item {
                    Some(p) => {
                        oldest.get_or_insert_with(Instant::now);
                        pending.push(p);
                        continue;
                    }
                    None => {
                        open = false;
                        continue;
                    }
                },
                // Closing: stop new sends, then keep receiving what is
                // already buffered until `recv` returns `None`.
                _ = close.cancelled(), if !rx.is_closed() => {
                    rx.close();
                    continue;
                }
            }
        } else {
            sleep_until_opt(due).await;
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
                // The call went through: refused entries are retried with
                // the next batches (up to REFUSED_ENTRY_ATTEMPTS times), with
                // no pause, as one bad entry must not slow every delete.
                retry_at = None;
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
                        requeue(&mut pending, p, &f.code, REFUSED_ENTRY_ATTEMPTS);
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, entries = batch.len(), "DeleteMessageBatch failed; will retry");
                retry_at = Some(Instant::now() + backoff.next_ceiling());
                for p in batch {
                    requeue(&mut pending, p, "call_failed", DELETE_ATTEMPTS);
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

fn requeue(pending: &mut Vec<PendingDelete>, mut p: PendingDelete, code: &str, limit: u32) {
    p.attempts += 1;
    if p.attempts >= limit {
        telemetry::delete_failed(1);
        tracing::error!(message_id = %p.message_id, code, attempts = p.attempts, "delete failed; message will be redelivered");
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

    /// Fails every call and records when each one arrived.
    struct FailAndRecord(Arc<Mutex<Vec<Instant>>>);

    impl Respond for FailAndRecord {
        fn respond(&self, _: &Request) -> ResponseTemplate {
            self.0.lock().unwrap().push(Instant::now());
            ResponseTemplate::new(400).set_body_raw(
                r#"{"__type":"com.amazonaws.sqs#InvalidAddress","message":"no"}"#,
                "application/x-amz-json-1.0",
            )
        }
    }

    fn message(i: usize) -> ReceivedMessage {
        ReceivedMessage {
            message_id: format!("m{i}"),
            receipt_handle: format!("r{i}"),
            body: String::new(),
            receive_count: 1,
            sent_at: None,
            group_id: None,
            attributes: Default::default(),
            received_at: Instant::now(),
        }
    }

    /// Hardening #3: with 10 or more deletes pending, a failed batch was
    /// retried at once, so every attempt burned within milliseconds. Only
    /// a lower bound on the gaps is asserted: a slow machine makes them
    /// longer, never shorter.
    #[tokio::test]
    async fn a_failed_full_batch_waits_before_its_retry() {
        let server = MockServer::start().await;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        Mock::given(method("POST"))
            .respond_with(FailAndRecord(arrivals.clone()))
            .mount(&server)
            .await;
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(server.uri())
            .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
            .build();
        let queue = Arc::new(Queue::new(
            aws_sdk_sqs::Client::from_conf(conf),
            format!("{}/123456789012/q", server.uri()),
            None,
        ));
        let (deleter, batcher) = Deleter::new(queue, Duration::from_secs(1));
        // One full batch.
        for i in 0..MAX_BATCH {
            deleter.delete(&message(i));
        }
        let close = CancellationToken::new();
        let task = tokio::spawn(batcher.run(close.clone()));
        // Tried DELETE_ATTEMPTS times, then given up.
        tokio::time::timeout(Duration::from_secs(30), async {
            while deleter.outstanding() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every delete finished (given up) within 30 s");
        close.cancel();
        task.await.unwrap();
        let arrivals = arrivals.lock().unwrap().clone();
        assert_eq!(arrivals.len(), DELETE_ATTEMPTS as usize);
        let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        // The first retry waits 200 ms; every later call follows a failure too.
        assert!(
            gaps.iter().all(|g| *g >= Duration::from_millis(190)),
            "a call followed a failure without a pause: {gaps:?}"
        );
    }
}
