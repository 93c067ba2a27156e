//! The worker loop: take permits, receive at most that many messages, run one
//! task per message, and account for every message exactly once.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cognito::{CallError, Cognito, ErrorCode};
use crate::config::{RetrySettings, Settings};
use crate::dedup::Dedup;
use crate::health::Health;
use crate::job::{ResetJob, UserHasher};
use crate::outcome::{Outcome, Report, Summary, Tally};
use crate::policy::{Backoff, Class, classify, full_jitter};
use crate::queue::{Deleter, MAX_BATCH, Queue, QueueError, ReceivedMessage};
use crate::rate::RateLimiter;
use crate::telemetry;

/// On shutdown, how long an in-flight receive may still deliver messages.
const RECEIVE_DRAIN: Duration = Duration::from_secs(2);

/// Longest wait for more free permits before a receive.
const MAX_FILL_WAIT_SECONDS: f64 = 1.0;

/// Time left for the final delete flush after the in-flight grace period.
const DELETE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The campaign is misconfigured; nothing was deleted because of it.
    #[error(
        "campaign halted: Cognito answered {code}{} — check the app client ID, client secret, \
         user pool and its email/SMS roles; no message was deleted because of this error",
        message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Fatal {
        code: &'static str,
        message: Option<String>,
    },
    #[error("start-up check failed: {0}")]
    Startup(#[from] QueueError),
}

/// Handles to the settings that apply without a restart.
#[derive(Clone)]
pub struct Live {
    pub limiter: Arc<RateLimiter>,
    pub secret: crate::cognito::SharedSecret,
}

/// How the run ends besides a signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Exit once this many receives in a row came back empty while no job
    /// was in flight (Kubernetes Job mode). `None`: run until a signal.
    pub until_empty_polls: Option<u32>,
}

/// Settings the job tasks read, copied out of [`Settings`] once.
struct JobSettings {
    visibility: Duration,
    retry: RetrySettings,
}

/// State shared by the loop and every job task.
struct Shared {
    queue: Arc<Queue>,
    deleter: Deleter,
    cognito: Cognito,
    /// Process-wide cap on Cognito calls; every attempt waits here first.
    /// Shared with the config watcher, which changes its limits live.
    limiter: Arc<RateLimiter>,
    hasher: UserHasher,
    /// Pairs sent recently, to skip SQS redeliveries (bounded TTL cache).
    dedup: Dedup,
    health: Arc<Health>,
    tally: Tally,
    settings: JobSettings,
    /// Cancelled on shutdown or halt. Job tasks that are waiting (for the
    /// rate limiter or a backoff sleep) release their message when it fires;
    /// a call already sent to Cognito is always let finish.
    stop: CancellationToken,
    /// The first fatal error. Set once; later fatal errors only release
    /// their message, so the operator sees one clear cause.
    fatal: OnceLock<(ErrorCode, Option<String>)>,
}

impl Shared {
    fn halt(&self, err: &CallError) {
        if self
            .fatal
            .set((err.code, err.server_message.clone()))
            .is_ok()
        {
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
    queue: Arc<Queue>,
    cognito: Cognito,
    limiter: Arc<RateLimiter>,
    hasher: UserHasher,
    dedup: Dedup,
    max_campaign_labels: usize,
    health: Arc<Health>,
    concurrency: usize,
    wait: Duration,
    flush_interval: Duration,
    grace: Duration,
    job: JobSettings,
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
        let hasher = UserHasher::new(settings.logging.username_hash_key.clone());
        Self {
            queue,
            cognito: Cognito::new(cognito, &settings.cognito),
            limiter: Arc::new(RateLimiter::new(settings.limits.rate_limits())),
            hasher: hasher.clone(),
            dedup: Dedup::new(&settings.dedup, hasher),
            max_campaign_labels: settings.metrics.max_campaign_labels,
            health,
            concurrency: settings.limits.concurrency,
            wait: Duration::from_secs(settings.sqs.wait_time_seconds),
            flush_interval: delete_flush_interval(settings),
            grace: Duration::from_secs(settings.shutdown.grace_seconds),
            job: JobSettings {
                visibility: settings.visibility_timeout(),
                retry: settings.retry.clone(),
            },
        }
    }

    /// What the config watcher may change while the worker runs.
    pub fn live(&self) -> Live {
        Live {
            limiter: self.limiter.clone(),
            secret: self.cognito.secret(),
        }
    }

    /// Checks that the queues are reachable, so a wrong URL or missing
    /// permission fails start-up with a clear message.
    pub async fn preflight(&self) -> Result<(), WorkerError> {
        let attrs = self.queue.attributes(self.queue.url()).await?;
        if let Some(dlq) = self.queue.dead_letter_url() {
            self.queue.attributes(dlq).await?;
        } else if !attrs.contains_key("RedrivePolicy") {
            tracing::warn!(
                "no `sqs.dead_letter_queue_url` and the queue has no redrive policy: \
                 rejected messages will be received again and again"
            );
        }
        self.health.set_polling(true);
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
        let (deleter, deleter_task, deleter_close) =
            Deleter::spawn(self.queue.clone(), self.flush_interval);
        let shared = Arc::new(Shared {
            queue: self.queue.clone(),
            deleter,
            cognito: self.cognito,
            limiter: self.limiter,
            hasher: self.hasher,
            dedup: self.dedup,
            health: self.health.clone(),
            tally: Tally::new(self.max_campaign_labels),
            settings: self.job,
            stop: shutdown.child_token(),
            fatal: OnceLock::new(),
        });
        // Concurrency permits. The loop takes permits *before* receiving and
        // asks SQS for no more messages than it holds, so a received message
        // never waits for a slot while its visibility runs out.
        let permits = Arc::new(Semaphore::new(self.concurrency));
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
            let first = tokio::select! {
                biased;
                _ = shared.stop.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            // Gather more permits for a fuller receive, but only for as long
            // as the rate cap would make those jobs wait anyway: a job that
            // waits here waits in SQS, not on a received message's
            // visibility. Under a low cap this turns one receive per job into
            // one per batch.
            let want = MAX_BATCH.min(self.concurrency);
            let rate = shared.limiter.effective_rate().max(1.0);
            let fill_until = tokio::time::Instant::now()
                + Duration::from_secs_f64((want as f64 / rate).min(MAX_FILL_WAIT_SECONDS));
            let mut held: Vec<OwnedSemaphorePermit> = vec![first];
            while held.len() < want {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => tokio::select! {
                        biased;
                        _ = shared.stop.cancelled() => break,
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => held.push(p),
                            Err(_) => break,
                        },
                        _ = tokio::time::sleep_until(fill_until) => break,
                    },
                }
            }
            let receive = self
                .queue
                .receive(held.len(), self.wait, shared.settings.visibility);
            tokio::pin!(receive);
            let mut stopping = false;
            let received = tokio::select! {
                biased;
                r = &mut receive => r,
                _ = shared.stop.cancelled() => {
                    // A receive that found messages answers at once: wait a
                    // moment for it, so those messages are released (their
                    // tasks see the stop) instead of left invisible. An idle
                    // long poll is dropped after that moment; only a message
                    // arriving in that very instant then waits out its
                    // visibility timeout.
                    stopping = true;
                    match tokio::time::timeout(RECEIVE_DRAIN, &mut receive).await {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                }
            };
            let messages = match received {
                Ok(m) => {
                    shared.health.set_polling(true);
                    receive_backoff = new_receive_backoff();
                    m
                }
                Err(err) => {
                    shared.health.set_polling(false);
                    drop(held);
                    let delay = full_jitter(receive_backoff.next_ceiling());
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "receive failed; backing off");
                    tokio::select! {
                        _ = shared.stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if stopping {
                if messages.is_empty() {
                    break;
                }
            } else if messages.is_empty() {
                if let Some(limit) = options.until_empty_polls
                    && tasks.is_empty()
                    && shared.deleter.outstanding() == 0
                {
                    empty_polls += 1;
                    if empty_polls >= limit {
                        tracing::info!(empty_polls, "queue drained");
                        break;
                    }
                }
                continue;
            }
            empty_polls = 0;
            // Extra permits (fewer messages than asked for) drop here.
            for (msg, permit) in messages.into_iter().zip(held) {
                tasks.spawn(job_task(shared.clone(), msg, permit));
            }
            if stopping {
                break;
            }
        }

        // Stop accepting: readiness off, waiting tasks release their messages.
        shared.health.halt();
        shared.stop.cancel();
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
        deleter_close.cancel();
        if tokio::time::timeout(DELETE_FLUSH_TIMEOUT, deleter_task)
            .await
            .is_err()
        {
            tracing::warn!("final delete flush timed out; those messages will be redelivered");
        }

        let summary = shared.tally.snapshot();
        tracing::info!(
            sent = summary.sent,
            skipped = summary.skipped,
            rejected = summary.rejected,
            deferred = summary.deferred,
            released = summary.released,
            "worker stopped"
        );
        match shared.fatal.get() {
            Some((code, message)) => Err(WorkerError::Fatal {
                code: code.as_str(),
                message: message.clone(),
            }),
            None => Ok(summary),
        }
    }
}

/// On a FIFO queue the next message of a group is not delivered until the
/// previous one is deleted, so waiting for a fuller delete batch would stall
/// every group: flush within 50 ms there.
fn delete_flush_interval(settings: &Settings) -> Duration {
    let configured = Duration::from_millis(settings.sqs.delete_flush_interval_ms);
    if settings.sqs.queue_url.ends_with(".fifo") {
        configured.min(FIFO_DELETE_FLUSH)
    } else {
        configured
    }
}

const FIFO_DELETE_FLUSH: Duration = Duration::from_millis(50);

/// Backoff for a failing ReceiveMessage: 1 s doubling to 30 s, full jitter.
fn new_receive_backoff() -> Backoff {
    Backoff::with_bounds(Duration::from_secs(1), Duration::from_secs(30))
}

/// A job's decision plus what its log line needs.
struct Decided {
    outcome: Outcome,
    campaign_id: Option<String>,
    user: Option<String>,
    attempts: u32,
    last_error: Option<ErrorCode>,
}

impl Decided {
    fn early(outcome: Outcome) -> Self {
        Self {
            outcome,
            campaign_id: None,
            user: None,
            attempts: 0,
            last_error: None,
        }
    }
}

/// Decrements the in-flight gauge however the task ends.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        telemetry::in_flight(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        telemetry::in_flight(-1.0);
    }
}

async fn job_task(shared: Arc<Shared>, msg: ReceivedMessage, _permit: OwnedSemaphorePermit) {
    let _in_flight = InFlight::enter();
    let decided = tokio::select! {
        d = decide(&shared, &msg) => d,
        never = heartbeat(&shared, &msg) => match never {},
    };
    let outcome = apply(&shared, &msg, decided.outcome).await;
    shared.tally.record(&Report {
        outcome: &outcome,
        message_id: &msg.message_id,
        campaign_id: decided.campaign_id.as_deref(),
        user: decided.user.as_deref(),
        attempts: decided.attempts,
        receive_count: msg.receive_count,
        last_error: decided.last_error,
        age: msg.age(),
    });
}

/// Keeps a running job's message invisible: at half the visibility timeout,
/// extends it by a full one. Ends only when the job's future wins the select.
async fn heartbeat(shared: &Shared, msg: &ReceivedMessage) -> std::convert::Infallible {
    let vt = shared.settings.visibility;
    loop {
        tokio::time::sleep(vt / 2).await;
        if let Err(err) = shared
            .queue
            .change_visibility(&msg.receipt_handle, vt)
            .await
        {
            tracing::warn!(message_id = %msg.message_id, error = %err, "visibility heartbeat failed");
        }
    }
}

/// Parses the job, suppresses duplicates, and decides its outcome. Touches
/// no SQS state.
async fn decide(shared: &Shared, msg: &ReceivedMessage) -> Decided {
    let job = match ResetJob::parse(&msg.body) {
        Ok(job) => job,
        Err(err) => {
            return Decided::early(Outcome::Rejected {
                reason: err.reason(),
                detail: err.to_string(),
            });
        }
    };
    let mut decided = Decided {
        outcome: Outcome::Skipped {
            reason: "duplicate",
        },
        campaign_id: job.campaign_id.clone(),
        user: Some(shared.hasher.user_ref(&job.username)),
        attempts: 0,
        last_error: None,
    };
    let Some(claim) = shared.dedup.claim(&job) else {
        return decided;
    };
    call_until_decided(shared, msg, &job, &mut decided).await;
    if !matches!(decided.outcome, Outcome::Sent { .. }) {
        shared.dedup.forget(claim);
    }
    decided
}

/// The call loop: rate cap, call, classify, back off.
async fn call_until_decided(
    shared: &Shared,
    msg: &ReceivedMessage,
    job: &ResetJob,
    decided: &mut Decided,
) {
    let retry = &shared.settings.retry;
    let mut backoff = Backoff::new(retry);
    loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => {
                decided.outcome = Outcome::Released { reason: shared.release_reason() };
                return;
            }
            granted = shared.limiter.acquire() => if granted.is_err() {
                decided.outcome = Outcome::Released { reason: "paused" };
                return;
            },
        }
        decided.attempts += 1;
        // Not cancellable: once sent, the call's result must be applied, or
        // a sent email could be followed by a redelivery and a second one.
        let call_started = std::time::Instant::now();
        let err = match shared.cognito.reset(job).await {
            Ok(delivery) => {
                decided.outcome = Outcome::Sent {
                    medium: delivery.medium,
                };
                return;
            }
            Err(err) => err,
        };
        decided.last_error = Some(err.code);
        if err.code == ErrorCode::TooManyRequests {
            shared.limiter.on_throttled(call_started);
        }
        let give_up = match classify(&err) {
            Class::Retryable => {
                (decided.attempts >= retry.max_attempts).then(|| Outcome::Deferred {
                    reason: "retries_exhausted",
                    delay: backoff.next_delay().max(Duration::from_secs(1)),
                })
            }
            Class::RetryThenReject => (decided.attempts >= retry.delivery_failure_max_attempts)
                .then(|| Outcome::Rejected {
                    reason: err.code.as_str(),
                    detail: err.server_message.clone().unwrap_or_default(),
                }),
            Class::UserLimited => Some(Outcome::Deferred {
                reason: "user_limit_exceeded",
                delay: Duration::from_secs(retry.limit_exceeded_delay_seconds),
            }),
            Class::UserNotFound => Some(Outcome::Skipped {
                reason: "user_not_found",
            }),
            Class::Permanent => Some(Outcome::Rejected {
                reason: err.code.as_str(),
                detail: err.server_message.clone().unwrap_or_default(),
            }),
            Class::Fatal => {
                shared.halt(&err);
                Some(Outcome::Released { reason: "halted" })
            }
        };
        if let Some(outcome) = give_up {
            decided.outcome = outcome;
            return;
        }
        let delay = backoff.next_delay();
        tracing::debug!(
            message_id = %msg.message_id,
            error_code = err.code.as_str(),
            attempt = decided.attempts,
            retry_in_ms = delay.as_millis() as u64,
            "retrying"
        );
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => {
                decided.outcome = Outcome::Released { reason: shared.release_reason() };
                return;
            }
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Carries the decision out on SQS. Returns the outcome that really
/// happened: a rejection whose dead-letter copy failed is not deleted, and
/// counts as deferred.
async fn apply(shared: &Shared, msg: &ReceivedMessage, outcome: Outcome) -> Outcome {
    match &outcome {
        Outcome::Sent { .. } | Outcome::Skipped { .. } => shared.deleter.delete(msg),
        Outcome::Rejected { reason, detail } => {
            let Some(dlq) = shared.queue.dead_letter_url() else {
                // Left to the queue's redrive policy: it reappears after the
                // visibility timeout and moves after maxReceiveCount.
                return outcome;
            };
            match shared.queue.dead_letter(dlq, msg, reason, detail).await {
                Ok(()) => shared.deleter.delete(msg),
                Err(err) => {
                    tracing::error!(message_id = %msg.message_id, error = %err, "dead-letter copy failed; message kept for redelivery");
                    return Outcome::Deferred {
                        reason: "dead_letter_failed",
                        delay: shared.settings.visibility,
                    };
                }
            }
        }
        Outcome::Deferred { delay, .. } => set_visibility(shared, msg, *delay).await,
        Outcome::Released { .. } => set_visibility(shared, msg, Duration::ZERO).await,
    }
    outcome
}

async fn set_visibility(shared: &Shared, msg: &ReceivedMessage, visibility: Duration) {
    if let Err(err) = shared
        .queue
        .change_visibility(&msg.receipt_handle, visibility)
        .await
    {
        // The message still comes back, after the current visibility timeout.
        tracing::warn!(message_id = %msg.message_id, error = %err, "could not change visibility");
    }
}
