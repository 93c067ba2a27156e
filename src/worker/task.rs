//! One message, start to end: decide (parse, duplicate check, the call loop)
//! while a heartbeat keeps the message hidden, then apply the outcome on SQS
//! and record it. What each result means is [`super::policy`]'s to say.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::dedup::Claim;
use super::outcome::{Outcome, Report};
use super::policy::{self, Step};
use crate::aws::cognito::ErrorCode;
use crate::aws::resend::DeadLettered;
use crate::aws::sqs::ReceivedMessage;
use crate::backoff::Backoff;
use crate::job::ResetJob;
use crate::telemetry;

/// Runs one message to its outcome. The permit is held until the end, so
/// the receive loop never holds more messages than it has slots.
pub(super) async fn run(shared: Arc<Shared>, msg: ReceivedMessage, _permit: OwnedSemaphorePermit) {
    let _in_flight = InFlight::enter();
    // The heartbeat stops when the job is decided, but a visibility change
    // it already sent is let finish first: landing after `apply` it would
    // re-hide a released message or cut a long deferral short.
    let decided_token = CancellationToken::new();
    let (decided, ()) = tokio::join!(
        async {
            let decided = decide(&shared, &msg).await;
            decided_token.cancel();
            decided
        },
        heartbeat(&shared, &msg, &decided_token),
    );
    let outcome = apply(&shared, &msg, decided.outcome).await;
    if let Some(id) = msg.deferral_id()
        && outcome.reason() != "not_due"
    {
        // This run's earlier deferral of the job has come back and ended
        // (or was deferred anew, under a new ID).
        shared.deferred_by_resend.finished(id);
    }
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

/// A job's decision plus what its log line needs.
struct Decided {
    outcome: Outcome,
    campaign_id: Option<String>,
    /// Keyed hash of the username; `None` when the body did not parse.
    user: Option<String>,
    attempts: u32,
    last_error: Option<ErrorCode>,
}

/// What the call loop ended with.
struct Called {
    outcome: Outcome,
    attempts: u32,
    last_error: Option<ErrorCode>,
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

/// Keeps a running job's message invisible: at half the visibility timeout,
/// extends it by a full one. Returns once `decided` fires, never in the
/// middle of a call.
async fn heartbeat(shared: &Shared, msg: &ReceivedMessage, decided: &CancellationToken) {
    let vt = shared.visibility;
    loop {
        tokio::select! {
            _ = decided.cancelled() => return,
            _ = tokio::time::sleep(vt / 2) => {}
        }
        if let Err(err) = shared
            .queue
            .change_visibility(&msg.receipt_handle, vt)
            .await
        {
            tracing::warn!(message_id = %msg.message_id, error = %err, "visibility heartbeat failed");
        }
    }
}

/// Parses the job, suppresses duplicates, and calls until decided. Touches
/// no SQS state.
async fn decide(shared: &Shared, msg: &ReceivedMessage) -> Decided {
    let job = match ResetJob::parse(&msg.body) {
        Ok(job) => job,
        Err(err) => {
            return Decided {
                outcome: policy::unparsable(&err),
                campaign_id: None,
                user: None,
                attempts: 0,
                last_error: None,
            };
        }
    };
    let user = Some(shared.hasher.user_ref(&job.username));
    if let Some(remaining) = msg
        .not_before()
        .and_then(|due| due.duration_since(SystemTime::now()).ok())
    {
        return Decided {
            outcome: policy::not_due(remaining),
            campaign_id: job.campaign_id,
            user,
            attempts: 0,
            last_error: None,
        };
    }
    let without_call = |outcome| Called {
        outcome,
        attempts: 0,
        last_error: None,
    };
    let called = match shared.dedup.claim(&job) {
        Claim::Sent => without_call(policy::duplicate()),
        Claim::InProgress => without_call(policy::claimed_elsewhere(shared.visibility)),
        Claim::Granted(key) => {
            let called = call_until_decided(shared, &job).await;
            if matches!(called.outcome, Outcome::Sent { .. }) {
                shared.dedup.sent(key);
            } else {
                shared.dedup.forget(key);
            }
            called
        }
    };
    Decided {
        outcome: called.outcome,
        campaign_id: job.campaign_id,
        user,
        attempts: called.attempts,
        last_error: called.last_error,
    }
}

/// The call loop: wait for the rate cap, call, ask the policy, back off.
async fn call_until_decided(shared: &Shared, job: &ResetJob) -> Called {
    let mut backoff = Backoff::for_jobs(&shared.retry);
    let mut attempts = 0;
    let mut last_error = None;
    let outcome = loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break policy::released(shared.release_reason()),
            granted = shared.limiter.acquire() => if granted.is_err() {
                break policy::released("paused");
            },
        }
        attempts += 1;
        // Not cancellable: once sent, the call's result must be applied, or
        // a sent email could be followed by a redelivery and a second one.
        let call_started = Instant::now();
        let result = shared.cognito.reset(job).await;
        if let Err(err) = &result {
            last_error = Some(err.code);
            if err.code == ErrorCode::TooManyRequests {
                shared.limiter.on_throttled(call_started);
            }
        }
        match policy::after_call(result.as_ref(), attempts, &shared.retry, &mut backoff) {
            Step::Done(outcome) => break outcome,
            Step::Halt => {
                if let Err(err) = &result {
                    shared.halt(err);
                }
                break policy::released("halted");
            }
            Step::Retry { after } => {
                tracing::debug!(
                    error_code = last_error.map(ErrorCode::as_str).unwrap_or("none"),
                    attempt = attempts,
                    retry_in_ms = after.as_millis() as u64,
                    "retrying"
                );
                tokio::select! {
                    biased;
                    _ = shared.stop.cancelled() => break policy::released(shared.release_reason()),
                    _ = tokio::time::sleep(after) => {}
                }
            }
        }
    };
    Called {
        outcome,
        attempts,
        last_error,
    }
}

/// Carries the decision out on SQS. Returns the outcome that really
/// happened: a rejection whose dead-letter copy failed is not deleted.
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
                Ok(DeadLettered::Copied) => shared.deleter.delete(msg),
                Ok(DeadLettered::TooLarge { limit }) => {
                    // Retrying cannot help: leave it to the queue's redrive
                    // policy, as without a dead-letter queue.
                    tracing::error!(message_id = %msg.message_id, limit_bytes = limit, "message too large for a dead-letter copy; left for the redrive policy");
                }
                Err(err) => {
                    tracing::error!(message_id = %msg.message_id, error = %err, "dead-letter copy failed; message kept for redelivery");
                    return policy::dead_letter_failed(shared.visibility);
                }
            }
        }
        Outcome::Deferred { delay, reason } if shared.fifo && *reason != "not_due" => {
            // On a FIFO queue a hidden message holds back its whole group:
            // send the job again to the group's tail instead, due after
            // `delay`, and delete this copy.
            let due = SystemTime::now() + *delay;
            let id = deferral_id(msg);
            match shared.queue.defer_by_resend(msg, due, &id).await {
                Ok(()) => {
                    shared.deferred_by_resend.started(id);
                    shared.deleter.delete(msg);
                }
                Err(err) => {
                    tracing::warn!(message_id = %msg.message_id, error = %err, "FIFO deferral by re-send failed; hiding the message instead (its group waits)");
                    hide(shared, msg, *delay, reason).await;
                }
            }
        }
        Outcome::Deferred { delay, reason } => hide(shared, msg, *delay, reason).await,
        Outcome::Released { .. } => set_visibility(shared, msg, Duration::ZERO).await,
    }
    outcome
}

/// Defers by visibility, as long as SQS still allows: at most 12 hours from
/// the receive (the message is simply back sooner; logged).
async fn hide(shared: &Shared, msg: &ReceivedMessage, delay: Duration, reason: &str) {
    let left = msg.visibility_left();
    if delay > left {
        tracing::warn!(
            message_id = %msg.message_id,
            reason,
            wanted_seconds = delay.as_secs(),
            clamped_seconds = left.as_secs(),
            "deferral clamped to SQS's 12-hour limit from the receive"
        );
    }
    set_visibility(shared, msg, delay.min(left)).await
}

/// A deduplication ID for one FIFO deferral: new for every deferral of the
/// same message, at most 128 characters.
fn deferral_id(msg: &ReceivedMessage) -> String {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut id = format!("defer-{nanos}-{}", msg.message_id);
    id.truncate(128);
    id
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
