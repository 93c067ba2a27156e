//! The worker: take permits, receive at most that many messages, run one
//! task per message, and account for every message exactly once.
//!
//! - this file: the receive loop ([`Worker::run`]) and the state every job
//!   task shares ([`Shared`]);
//! - [`task`]: one message, decide → call → apply;
//! - [`policy`]: what a call's result means and what happens next;
//! - [`outcome`]: the outcome of a message, logged and counted once;
//! - [`dedup`]: the in-process duplicate suppression;
//! - [`reload`]: the settings that change without a restart.

pub mod dedup;
pub mod outcome;
pub mod policy;
pub mod reload;
mod task;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::aws::cognito::{CallError, Cognito, SharedSecret};
use crate::aws::deleter::{Batcher, Deleter};
use crate::aws::sqs::{MAX_BATCH, Queue, QueueError, ReceivedMessage};
use crate::backoff::Backoff;
use crate::config::{RetrySettings, Settings, is_fifo};
use crate::health::Health;
use crate::job::UserHasher;
use crate::rate::RateLimiter;
use dedup::Dedup;
use outcome::{Summary, Tally};

/// On shutdown, how long an in-flight receive may still deliver messages.
const RECEIVE_DRAIN: Duration = Duration::from_secs(2);

/// Longest wait for more free permits before a receive.
const MAX_FILL_WAIT_SECONDS: f64 = 1.0;

/// Time left for the final delete flush after the in-flight grace period.
const DELETE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// On a FIFO queue the next message of a group is not delivered until the
/// previous one is deleted, so waiting for a fuller delete batch would stall
/// every group: flush within this there.
const FIFO_DELETE_FLUSH: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The campaign is misconfigured; nothing was deleted because of it.
    #[error(
        "campaign halted: {service} answered {code}{} — check the app client ID, client secret, \
         user pool and its email/SMS roles, the worker's IAM permissions and credentials; \
         no message was deleted because of this error",
        message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Fatal {
        /// `Cognito` or `SQS`.
        service: &'static str,
        code: String,
        message: Option<String>,
    },
    #[error("start-up check failed: {0}")]
    Startup(#[from] QueueError),
}

/// Handles to the settings that apply without a restart.
#[derive(Clone)]
pub struct Live {
    pub limiter: Arc<RateLimiter>,
    pub secret: SharedSecret,
}

/// How the run ends besides a signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Exit once this many receives in a row came back empty while no job
    /// was in flight (Kubernetes Job mode). `None`: run until a signal.
    pub until_empty_polls: Option<u32>,
}

/// State shared by the receive loop and every job task.
struct Shared {
    queue: Arc<Queue>,
    /// Hands finished messages to the delete batcher.
    deleter: Deleter,
    cognito: Cognito,
    /// Process-wide cap on Cognito calls; every attempt waits here first.
    /// Shared with the config watcher, which changes its limits live.
    limiter: Arc<RateLimiter>,
    hasher: UserHasher,
    /// Pairs sent recently, to skip SQS redeliveries (bounded TTL cache).
    dedup: Dedup,
    /// Readiness, read by `/readyz`.
    health: Arc<Health>,
    /// Outcome counts of this run.
    tally: Tally,
    /// Visibility requested on receive and renewed by the heartbeat.
    visibility: Duration,
    retry: RetrySettings,
    /// Cancelled on shutdown or halt. Job tasks that are waiting (for the
    /// rate limiter or a backoff sleep) release their message when it fires;
    /// a call already sent to Cognito is always let finish.
    stop: CancellationToken,
    /// The first fatal error. Set once; later fatal errors only release
    /// their message, so the operator sees one clear cause.
    fatal: OnceLock<Halt>,
    /// A FIFO queue: deferrals re-send the job instead of hiding it.
    fifo: bool,
    /// FIFO deferrals made in this run whose job has not come back yet:
    /// `run --until-empty` is not drained while there are any.
    deferred_by_resend: Deferrals,
}

/// The IDs of this run's FIFO deferrals still out. A std mutex: held for a
/// set operation, never across an await.
#[derive(Default)]
struct Deferrals(std::sync::Mutex<std::collections::HashSet<String>>);

impl Deferrals {
    fn started(&self, id: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    fn finished(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn outstanding(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Why the campaign was halted: the service, its error code and message.
#[derive(Debug, Clone)]
struct Halt {
    service: &'static str,
    code: String,
    message: Option<String>,
}

impl Shared {
    /// Halts the campaign on a fatal Cognito answer.
    fn halt(&self, err: &CallError) {
        self.halt_with(Halt {
            service: "Cognito",
            code: err.code.as_str().to_owned(),
            message: err.server_message.clone(),
        });
    }

    fn halt_with(&self, err: Halt) {
        if self.fatal.set(err).is_ok() {
            self.health.halt();
            self.stop.cancel();
        }
    }

    fn release_reason(&self) -> &'static str {
        if self.fatal.get().is_some() {
            "halted"
        } else {
            "shutdown"
        }
    }
}

/// A configured worker, ready to [`run`](Worker::run).
pub struct Worker {
    listener: Listener,
    /// The delete batcher, spawned by `run`.
    batcher: Batcher,
}

/// The receive loop's own state (as mini-redis's `Listener`): it takes
/// permits, receives, and hands each message to a task.
struct Listener {
    shared: Arc<Shared>,
    /// Jobs at once: the number of semaphore permits.
    concurrency: usize,
    /// Long-poll wait per receive.
    wait: Duration,
    /// How long in-flight calls may finish after a stop.
    grace: Duration,
}

impl Worker {
    pub fn new(
        settings: &Settings,
        sqs: aws_sdk_sqs::Client,
        cognito: aws_sdk_cognitoidentityprovider::Client,
        health: Arc<Health>,
    ) -> Self {
        let queue = Arc::new(Queue::new(
            sqs,
            settings.sqs.queue_url.clone(),
            settings.sqs.dead_letter_queue_url.clone(),
        ));
        let (deleter, batcher) = Deleter::new(queue.clone(), delete_flush_interval(settings));
        let hasher = UserHasher::new(settings.logging.username_hash_key.clone());
        let shared = Shared {
            queue,
            deleter,
            cognito: Cognito::new(cognito, &settings.cognito),
            limiter: Arc::new(RateLimiter::new((&settings.limits).into())),
            dedup: Dedup::new(&settings.dedup, hasher.clone()),
            hasher,
            health,
            tally: Tally::new(settings.metrics.max_campaign_labels),
            visibility: settings.visibility_timeout(),
            retry: settings.retry.clone(),
            stop: CancellationToken::new(),
            fatal: OnceLock::new(),
            fifo: is_fifo(&settings.sqs.queue_url),
            deferred_by_resend: Deferrals::default(),
        };
        Self {
            listener: Listener {
                shared: Arc::new(shared),
                concurrency: settings.limits.concurrency,
                wait: Duration::from_secs(settings.sqs.wait_time_seconds),
                grace: Duration::from_secs(settings.shutdown.grace_seconds),
            },
            batcher,
        }
    }

    /// What the config watcher may change while the worker runs.
    pub fn live(&self) -> Live {
        let shared = &self.listener.shared;
        Live {
            limiter: shared.limiter.clone(),
            secret: shared.cognito.secret(),
        }
    }

    /// Checks that the queues are reachable, so a wrong URL or missing
    /// permission fails start-up with a clear message.
    pub async fn preflight(&self) -> Result<(), WorkerError> {
        let queue = &self.listener.shared.queue;
        let attrs = queue.attributes(queue.url()).await?;
        if let Some(dlq) = queue.dead_letter_url() {
            let dlq_attributes = queue.attributes(dlq).await?;
            queue.set_dead_letter_limit(&dlq_attributes);
        } else if !attrs.contains_key("RedrivePolicy") {
            tracing::warn!(
                "no `sqs.dead_letter_queue_url` and the queue has no redrive policy: \
                 rejected messages will be received again and again"
            );
        }
        self.listener.shared.health.set_polling(true);
        Ok(())
    }

    /// Runs until `shutdown` fires, a fatal error halts the campaign, or
    /// (with `until_empty_polls`) the queue is drained.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        options: RunOptions,
    ) -> Result<Summary, WorkerError> {
        self.preflight().await?;
        let Worker { listener, batcher } = self;
        let shared = listener.shared.clone();
        let stop_on_shutdown = tokio::spawn({
            let stop = shared.stop.clone();
            async move {
                shutdown.cancelled().await;
                stop.cancel();
            }
        });
        let close_deleter = CancellationToken::new();
        let batcher = tokio::spawn(batcher.run(close_deleter.clone()));
        // Concurrency permits. The loop takes permits *before* receiving and
        // asks SQS for no more messages than it holds, so a received message
        // never waits for a slot while its visibility runs out.
        let permits = Arc::new(Semaphore::new(listener.concurrency));
        // Tracks job tasks so shutdown can wait for them.
        let tasks = TaskTracker::new();
        let mut receive_backoff = new_receive_backoff();
        let mut empty_polls = 0u32;

        loop {
            if shared.limiter.is_paused() {
                tracing::info!("campaign paused (limits.max_rps = 0); holding no messages");
                tokio::select! {
                    _ = shared.stop.cancelled() => break,
                    _ = shared.limiter.wait_unpaused() => {
                        tracing::info!("campaign resumed");
                        continue;
                    }
                }
            }
            let Some(held) = listener.take_permits(&permits).await else {
                break;
            };
            // Paused while waiting for permits: receive nothing, or the
            // messages would be released at once with one more receive count
            // (which brings them closer to the dead-letter queue).
            if shared.limiter.is_paused() {
                drop(held);
                continue;
            }
            let (received, stopping) = listener.receive(held.len()).await;
            let messages = match received {
                Some(Ok(m)) => {
                    shared.health.set_polling(true);
                    receive_backoff = new_receive_backoff();
                    m
                }
                // An idle long poll cut short by the stop.
                None => break,
                Some(Err(err)) if policy::queue_error_is_fatal(&err) => {
                    tracing::error!(error = %err, "SQS refused the worker; halting the campaign");
                    shared.halt_with(Halt {
                        service: "SQS",
                        code: err.code.clone().unwrap_or_default(),
                        message: Some(err.detail.clone()),
                    });
                    break;
                }
                Some(Err(err)) => {
                    shared.health.set_polling(false);
                    drop(held);
                    let delay = receive_backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "receive failed; backing off");
                    tokio::select! {
                        _ = shared.stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if messages.is_empty() {
                if stopping {
                    break;
                }
                if let Some(limit) = options.until_empty_polls
                    && tasks.is_empty()
                    && shared.deleter.outstanding() == 0
                {
                    empty_polls += 1;
                    let deferred = shared.deferred_by_resend.outstanding();
                    if empty_polls >= limit && deferred == 0 {
                        tracing::info!(empty_polls, "queue drained");
                        break;
                    }
                    if empty_polls == limit {
                        tracing::info!(
                            deferred,
                            "queue empty, but jobs deferred in this run are still to come back; waiting for them"
                        );
                    }
                }
                continue;
            }
            empty_polls = 0;
            // Extra permits (fewer messages than asked for) drop here.
            for (msg, permit) in messages.into_iter().zip(held) {
                tasks.spawn(task::run(shared.clone(), msg, permit));
            }
            if stopping {
                break;
            }
        }

        listener.finish(tasks, close_deleter, batcher).await;
        stop_on_shutdown.abort();
        let summary = shared.tally.snapshot();
        tracing::info!(
            sent = summary.sent,
            skipped = summary.skipped,
            rejected = summary.rejected,
            deferred = summary.deferred,
            released = summary.released,
            "worker stopped"
        );
        match shared.fatal.get().cloned() {
            Some(Halt {
                service,
                code,
                message,
            }) => Err(WorkerError::Fatal {
                service,
                code,
                message,
            }),
            None => Ok(summary),
        }
    }
}

impl Listener {
    /// Takes one permit, then gathers more for a fuller receive, but only
    /// for as long as the rate cap would make those jobs wait anyway: a job
    /// that waits here waits in SQS, not on a received message's visibility.
    /// Under a low cap this turns one receive per job into one per batch.
    /// `None` when the worker is stopping.
    async fn take_permits(&self, permits: &Arc<Semaphore>) -> Option<Vec<OwnedSemaphorePermit>> {
        let stop = &self.shared.stop;
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            permit = permits.clone().acquire_owned() => permit.ok()?,
        };
        let want = MAX_BATCH.min(self.concurrency);
        let rate = self.shared.limiter.effective_rate().max(1.0);
        let fill_until = tokio::time::Instant::now()
            + Duration::from_secs_f64((want as f64 / rate).min(MAX_FILL_WAIT_SECONDS));
        let mut held = vec![first];
        while held.len() < want {
            match permits.clone().try_acquire_owned() {
                Ok(p) => held.push(p),
                Err(_) => tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => held.push(p),
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep_until(fill_until) => break,
                },
            }
        }
        Some(held)
    }

    /// One receive of up to `max` messages. Returns the result (`None` when
    /// a stop cut an idle long poll short) and whether the worker is
    /// stopping.
    async fn receive(
        &self,
        max: usize,
    ) -> (Option<Result<Vec<ReceivedMessage>, QueueError>>, bool) {
        let shared = &self.shared;
        let receive = shared.queue.receive(max, self.wait, shared.visibility);
        tokio::pin!(receive);
        tokio::select! {
            biased;
            r = &mut receive => (Some(r), false),
            _ = shared.stop.cancelled() => {
                // A receive that found messages answers at once: wait a
                // moment for it, so those messages are released (their
                // tasks see the stop) instead of left invisible. An idle
                // long poll is dropped after that moment; only a message
                // arriving in that very instant then waits out its
                // visibility timeout.
                (tokio::time::timeout(RECEIVE_DRAIN, &mut receive).await.ok(), true)
            }
        }
    }

    /// Stops accepting (readiness off; waiting tasks release their
    /// messages), lets calls already sent finish within the grace period,
    /// then flushes the pending deletes.
    async fn finish(
        &self,
        tasks: TaskTracker,
        close_deleter: CancellationToken,
        batcher: tokio::task::JoinHandle<()>,
    ) {
        self.shared.health.halt();
        self.shared.stop.cancel();
        tasks.close();
        if tokio::time::timeout(self.grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = tasks.len(),
                "grace period over with calls still running; their messages reappear after the visibility timeout"
            );
        }
        close_deleter.cancel();
        if tokio::time::timeout(DELETE_FLUSH_TIMEOUT, batcher)
            .await
            .is_err()
        {
            tracing::warn!("final delete flush timed out; those messages will be redelivered");
        }
    }
}

fn delete_flush_interval(settings: &Settings) -> Duration {
    let configured = Duration::from_millis(settings.sqs.delete_flush_interval_ms);
    if is_fifo(&settings.sqs.queue_url) {
        configured.min(FIFO_DELETE_FLUSH)
    } else {
        configured
    }
}

/// Backoff for a failing ReceiveMessage: 1 s doubling to 30 s, full jitter.
fn new_receive_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
}
