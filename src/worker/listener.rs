//! The receive loop (as mini-redis's `Listener`): take permits, receive at
//! most that many messages, hand each to a task, and at the end let the
//! tasks finish and flush the deletes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::outcome::Summary;
use super::{Halt, RunOptions, Shared, WorkerError, policy, task};
use crate::aws::deleter::Batcher;
use crate::aws::sqs::{MAX_BATCH, QueueError, ReceivedMessage};
use crate::backoff::Backoff;

/// On shutdown, how long an in-flight receive may still deliver messages.
const RECEIVE_DRAIN: Duration = Duration::from_secs(2);

/// Longest wait for more free permits before a receive.
const MAX_FILL_WAIT_SECONDS: f64 = 1.0;

/// Time left for the final delete flush after the in-flight grace period.
const DELETE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The receive loop's own state (as mini-redis's `Listener`): it takes
/// permits, receives, and hands each message to a task.
pub(super) struct Listener {
    pub(super) shared: Arc<Shared>,
    /// Jobs at once: the number of semaphore permits.
    pub(super) concurrency: usize,
    /// Long-poll wait per receive.
    pub(super) wait: Duration,
    /// How long in-flight calls may finish after a stop.
    pub(super) grace: Duration,
}

impl Listener {
    /// The receive loop: runs until `shutdown` fires, a fatal error halts
    /// the campaign, or (with `until_empty_polls`) the queue is drained.
    pub(super) async fn run(
        self,
        batcher: Batcher,
        shutdown: CancellationToken,
        options: RunOptions,
    ) -> Result<Summary, WorkerError> {
        let shared = self.shared.clone();
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
        let permits = Arc::new(Semaphore::new(self.concurrency));
        // Tracks job tasks so shutdown can wait for them.
        let tasks = TaskTracker::new();
        let mut receive_backoff = new_receive_backoff();
        let mut empty_polls = 0u32;

        loop {
            if shared.limiters.is_paused() {
                if shared
                    .limiters
                    .configured()
                    .iter()
                    .all(|(_, l)| l.max_rps == 0)
                {
                    tracing::info!("campaign paused (limits.max_rps = 0); holding no messages");
                } else {
                    tracing::info!(
                        "waiting for this worker's share of the cluster rate budget; holding no messages"
                    );
                }
                tokio::select! {
                    _ = shared.stop.cancelled() => break,
                    _ = shared.limiters.wait_unpaused() => {
                        tracing::info!("campaign resumed");
                        continue;
                    }
                }
            }
            if !shared.health.ledger_up() && !self.wait_for_ledger().await {
                break;
            }
            let Some(held) = self.take_permits(&permits).await else {
                break;
            };
            // Paused while waiting for permits: receive nothing, or the
            // messages would be released at once with one more receive count
            // (which brings them closer to the dead-letter queue).
            if shared.limiters.is_paused() {
                drop(held);
                continue;
            }
            let (received, stopping) = self.receive(held.len()).await;
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

        self.finish(tasks, close_deleter, batcher).await;
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

    /// The ledger failed: receive nothing (every job would be released
    /// uncalled) and check it with the receive backoff until it answers.
    /// `false` when the worker is stopping or the ledger proved misconfigured.
    async fn wait_for_ledger(&self) -> bool {
        let shared = &self.shared;
        let mut backoff = new_receive_backoff();
        loop {
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shared.stop.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            match shared.ledger.check().await {
                Ok(()) => {
                    shared.health.set_ledger_up(true);
                    tracing::info!("ledger answers again; resuming");
                    return true;
                }
                Err(err) if err.is_fatal() => {
                    shared.ledger_failed(&err);
                    return false;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "ledger still unavailable");
                }
            }
        }
    }

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
        // Slots held by a Region at its share of them free at that Region's
        // (slow) pace: waiting for them would hold the other Regions back.
        let stuck = self.shared.limiters.held_by_busy_regions();
        let want = MAX_BATCH.min(self.concurrency.saturating_sub(stuck)).max(1);
        // The cap counts calls; a job that also signs the user out makes
        // two, so slots free at half the rate.
        let rate =
            (self.shared.limiters.effective_rate() / self.shared.pools.calls_per_job()).max(1.0);
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

/// Backoff for a failing ReceiveMessage: 1 s doubling to 30 s, full jitter.
fn new_receive_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
}
