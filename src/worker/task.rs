//! One message, start to end: decide (parse, claim the user in the ledger,
//! the call loop, the ledger's final state) while a heartbeat keeps the
//! message hidden and the claim alive, then apply the outcome on SQS and
//! record it. What each result means is [`super::policy`]'s to say.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::outcome::{Outcome, Report};
use super::policy::{self, SignOutStep, Step};
use crate::aws::cognito::{CallError, Cognito, Delivery, ErrorCode};
use crate::aws::resend::DeadLettered;
use crate::aws::sqs::ReceivedMessage;
use crate::backoff::Backoff;
use crate::config::{DEFAULT_POOL, OnUncertain};
use crate::job::ResetJob;
use crate::ledger::{Claim, DEFAULT_CAMPAIGN, Final, Key, LedgerError, Owner};
use crate::rate::{Entry, RateLimiter};
use crate::telemetry;

/// Runs one message to its outcome. The permit is held until the end, so
/// the receive loop never holds more messages than it has slots.
pub(super) async fn run(shared: Arc<Shared>, msg: ReceivedMessage, _permit: OwnedSemaphorePermit) {
    let _in_flight = InFlight::enter();
    // The heartbeat stops when the job is decided, but a visibility change
    // it already sent is let finish first: landing after `apply` it would
    // re-hide a released message or cut a long deferral short.
    let decided_token = CancellationToken::new();
    let held = OnceLock::new();
    let (decided, ()) = tokio::join!(
        async {
            let decided = decide(&shared, &msg, &held).await;
            decided_token.cancel();
            decided
        },
        heartbeat(&shared, &msg, &held, &decided_token),
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
        pool: decided.pool.as_deref(),
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
    /// The job's pool (`default` without the field); `None` when the body
    /// did not parse or names a pool that is not configured.
    pool: Option<String>,
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

impl Called {
    fn without_call(outcome: Outcome) -> Self {
        Self {
            outcome,
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

/// The ledger claim a task holds: (campaign, username, owner).
type Held = OnceLock<(String, String, Owner)>;

/// Keeps a running job's message invisible and its ledger claim alive: at
/// half the visibility timeout, extends both by a full one. Returns once
/// `decided` fires, never in the middle of a call or a ledger write.
async fn heartbeat(
    shared: &Shared,
    msg: &ReceivedMessage,
    held: &Held,
    decided: &CancellationToken,
) {
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
        if let Some((campaign, username, owner)) = held.get() {
            let key = Key { campaign, username };
            match shared.ledger.renew(key, owner, vt).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(message_id = %msg.message_id, "ledger claim lost to another worker while calling")
                }
                Err(err) => {
                    tracing::warn!(message_id = %msg.message_id, error = %err, "ledger lease renewal failed")
                }
            }
        }
    }
}

/// Parses the job, claims the user, calls until decided and writes the
/// ledger's final state. Touches no SQS state.
async fn decide(shared: &Shared, msg: &ReceivedMessage, held: &Held) -> Decided {
    let job = match ResetJob::parse(&msg.body) {
        Ok(job) => job,
        Err(err) => {
            return Decided {
                outcome: policy::unparsable(&err),
                campaign_id: None,
                pool: None,
                user: None,
                attempts: 0,
                last_error: None,
            };
        }
    };
    let user = Some(shared.hasher.user_ref(&job.username));
    // Logged only when configured: an unknown name is whatever text the
    // job's author put there, and logs carry no raw input.
    let pool = shared
        .pools
        .get(job.pool.as_deref())
        .map(|_| job.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_owned()));
    let decided = |called: Called| Decided {
        outcome: called.outcome,
        campaign_id: job.campaign_id.clone(),
        pool: pool.clone(),
        user: user.clone(),
        attempts: called.attempts,
        last_error: called.last_error,
    };
    if let Some(remaining) = msg
        .not_before()
        .and_then(|due| due.duration_since(SystemTime::now()).ok())
    {
        return decided(Called::without_call(policy::not_due(remaining)));
    }
    // Before the claim: a job for a pool this worker does not know can
    // never succeed here, and leaves no trace in the ledger.
    let Some(cognito) = shared.pools.get(job.pool.as_deref()) else {
        return decided(Called::without_call(policy::unknown_pool(
            job.pool.as_deref().unwrap_or_default(),
        )));
    };
    // Before the claim too: a job its Region cannot call soon goes back to
    // the queue rather than wait in a slot another Region could use.
    let (limiter, _held) = match shared.limiters.enter(cognito.region()) {
        Entry::In(limiter, held) => (limiter, held),
        Entry::Busy(delay) => return decided(Called::without_call(policy::region_busy(delay))),
    };
    let key = Key {
        campaign: job.campaign_id.as_deref().unwrap_or(DEFAULT_CAMPAIGN),
        username: job.username.expose(),
    };
    let (owner, prior_attempts, taken_over, reset_earlier) =
        match shared.ledger.claim(key, shared.visibility).await {
            Err(err) => return decided(Called::without_call(shared.ledger_failed(&err))),
            Ok(Claim::AlreadySent) => return decided(Called::without_call(policy::already_sent())),
            Ok(Claim::Held { remaining }) => {
                return decided(Called::without_call(policy::claimed_elsewhere(remaining)));
            }
            Ok(Claim::Granted {
                owner,
                prior_attempts,
                reset_at_ms,
            }) => (owner, prior_attempts, false, reset_at_ms.is_some()),
            Ok(Claim::TakenOver {
                owner,
                prior_attempts,
            }) => (owner, prior_attempts, true, false),
        };
    let _ = held.set((
        key.campaign.to_owned(),
        key.username.to_owned(),
        owner.clone(),
    ));
    let called = if reset_earlier {
        // An earlier delivery's reset went out and its sign-out did not
        // finish: never a second reset (its code would void the first).
        Some(Called::without_call(policy::reset_earlier()))
    } else if taken_over {
        after_uncertain_claim(shared, cognito, &job, user.as_deref()).await
    } else {
        None
    };
    let mut called = match called {
        Some(called) => called,
        None => call_until_decided(shared, cognito, &limiter, &job).await,
    };
    // Whether the user's reset is done (now or earlier): the ledger keeps
    // it, so whatever happens to the sign-out, the reset is not repeated.
    let reset = reset_earlier
        || matches!(
            called.outcome,
            Outcome::Sent { .. }
                | Outcome::Skipped {
                    reason: "already_reset"
                }
        );
    let mut signed_out = false;
    if reset && cognito.signs_out() {
        if !reset_earlier {
            // Before the sign-out: if this worker dies during it, the next
            // delivery finds the reset recorded and signs out only.
            until_landed(shared, &msg.message_id, "reset", || {
                shared.ledger.record_reset(key)
            })
            .await;
        }
        let out = sign_out_until_decided(shared, cognito, &limiter, &job).await;
        match out.failed {
            None => signed_out = true,
            Some(outcome) => {
                called.outcome = outcome;
                called.last_error = out.last_error.or(called.last_error);
            }
        }
    }
    let (state, reason) = policy::ledger_state(&called.outcome);
    let done = Final {
        state,
        reason,
        attempts: prior_attempts + called.attempts,
        signed_out,
        reset,
    };
    record(shared, key, &owner, done, &msg.message_id).await;
    decided(called)
}

/// An earlier claim on the user expired in progress: a worker died
/// mid-call, and that call's fate is unknown. With
/// `admin_reset_user_password` the user's status can tell; otherwise
/// `ledger.on_uncertain` decides. `None`: call again.
async fn after_uncertain_claim(
    shared: &Shared,
    cognito: &Cognito,
    job: &ResetJob,
    user: Option<&str>,
) -> Option<Called> {
    if cognito.reset_already_done(job).await == Some(true) {
        tracing::info!(
            user,
            "earlier claim expired mid-call; the user is already RESET_REQUIRED, so not called again"
        );
        return Some(Called::without_call(policy::already_reset()));
    }
    match shared.on_uncertain {
        OnUncertain::Skip => {
            tracing::warn!(
                user,
                "earlier claim expired mid-call; not called again (ledger.on_uncertain = skip)"
            );
            Some(Called::without_call(policy::uncertain_skipped()))
        }
        OnUncertain::Resend => {
            tracing::warn!(
                user,
                "earlier claim expired mid-call; calling again (ledger.on_uncertain = resend)"
            );
            None
        }
    }
}

/// Writes a claim's final state. Retried until it lands: a `sent` that is
/// not recorded could be sent again by a re-run. After a stop it is retried
/// for most of the grace period at most; then the user is left
/// `in_progress`, which the next claim treats as uncertain.
async fn record(shared: &Shared, key: Key<'_>, owner: &Owner, done: Final<'_>, message_id: &str) {
    let written = until_landed(shared, message_id, done.state.as_str(), || {
        shared.ledger.finish(key, owner, done)
    })
    .await;
    if written == Some(false) {
        tracing::warn!(message_id, state = %done.state, "another worker took the user over; final state not written");
    }
}

/// Runs a ledger write that must land (`what` names it in the logs) until
/// it does: retried with backoff while the ledger is unavailable; after a
/// stop, for 3/4 of the grace period at most. `None`: it never landed (a
/// refusal, which halts the campaign, or the end of the grace period); the
/// user then stays `in_progress`, which the next claim treats as uncertain.
async fn until_landed<F, Fut>(
    shared: &Shared,
    message_id: &str,
    what: &str,
    mut write: F,
) -> Option<bool>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, LedgerError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut deadline = None;
    loop {
        match write().await {
            Ok(written) => return Some(written),
            Err(err) if err.is_fatal() => {
                tracing::error!(message_id, write = what, error = %err, "ledger write refused; the user stays in_progress (uncertain)");
                shared.ledger_failed(&err);
                return None;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(message_id, write = what, error = %err, retry_in_ms = delay.as_millis() as u64, "ledger write failed; retrying");
                if shared.stop.is_cancelled() {
                    let until =
                        *deadline.get_or_insert_with(|| Instant::now() + shared.grace * 3 / 4);
                    if Instant::now() + delay > until {
                        tracing::error!(
                            message_id,
                            write = what,
                            "ledger write still failing at the end of the grace period; the user stays in_progress and counts as uncertain"
                        );
                        return None;
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The reset: the pool's action until [`policy::after_call`] decides.
async fn call_until_decided(
    shared: &Shared,
    cognito: &Cognito,
    limiter: &RateLimiter,
    job: &ResetJob,
) -> Called {
    let call = || async {
        let result = cognito.reset(job).await;
        if let Ok(delivery) = &result {
            telemetry::code_delivered(delivery.medium);
        }
        result
    };
    let decide = |result: Result<&Delivery, &CallError>, attempts, backoff: &mut Backoff| {
        policy::after_call(result, attempts, &shared.retry, backoff)
    };
    let (outcome, attempts, last_error) =
        until_decided(shared, limiter, call, decide, |released| released).await;
    Called {
        outcome,
        attempts,
        last_error,
    }
}

/// The call loop of both steps: wait for the rate cap of the Region the
/// job's pool is in, `call`, tell the limiter what Cognito made of it, ask
/// the policy (`decide`), back off. A stop or a pause while waiting ends it
/// with the job released (`released` makes that a `D`). Returns the
/// decision, the calls made and the last error.
async fn until_decided<T, D, Fut>(
    shared: &Shared,
    limiter: &RateLimiter,
    mut call: impl FnMut() -> Fut,
    mut decide: impl FnMut(Result<&T, &CallError>, u32, &mut Backoff) -> Step<D>,
    released: impl Fn(Outcome) -> D,
) -> (D, u32, Option<ErrorCode>)
where
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut backoff = Backoff::for_jobs(&shared.retry);
    let mut attempts = 0;
    let mut last_error = None;
    let decided = loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break released(policy::released(shared.release_reason())),
            granted = limiter.acquire() => if granted.is_err() {
                break released(policy::released("paused"));
            },
        }
        attempts += 1;
        // Not cancellable: once sent, the call's result must be applied, or
        // a sent email could be followed by a redelivery and a second one.
        let started = Instant::now();
        let result = call().await;
        if let Err(err) = &result {
            last_error = Some(err.code);
        }
        adapt(limiter, started, result.as_ref().map(|_| ()));
        match decide(result.as_ref(), attempts, &mut backoff) {
            Step::Done(decided) => break decided,
            Step::Halt => {
                if let Err(err) = &result {
                    shared.halt(err);
                }
                break released(policy::released("halted"));
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
                    _ = shared.stop.cancelled() => break released(policy::released(shared.release_reason())),
                    _ = tokio::time::sleep(after) => {}
                }
            }
        }
    };
    (decided, attempts, last_error)
}

/// Tells the Region's limiter what Cognito made of a call sent at
/// `started`: a throttle cuts the rate; any other answer spent quota (it
/// was let through); a call that got no answer tells nothing.
fn adapt(limiter: &RateLimiter, started: Instant, result: Result<(), &CallError>) {
    match result {
        Err(err) if err.code == ErrorCode::TooManyRequests => limiter.on_throttled(started),
        Err(err) if err.http_status.is_none() => {}
        _ => limiter.on_admitted(),
    }
}

/// How the sign-out after a reset ended.
struct SignOut {
    /// `None`: the user is signed out (or gone). Otherwise the job's outcome.
    failed: Option<Outcome>,
    last_error: Option<ErrorCode>,
}

/// The sign-out (`cognito.sign_out`), after a reset that went out:
/// `AdminUserGlobalSignOut` on the same Region budget as the reset, until
/// [`policy::after_sign_out`] decides. It is safe to repeat, so unlike the
/// reset a stop or a lost answer costs nothing but a later retry.
async fn sign_out_until_decided(
    shared: &Shared,
    cognito: &Cognito,
    limiter: &RateLimiter,
    job: &ResetJob,
) -> SignOut {
    let call = || async {
        let result = cognito.sign_out(job.username.expose()).await;
        telemetry::sign_out(policy::sign_out_label(result.as_ref().copied()));
        result
    };
    let decide = |result: Result<&(), &CallError>, attempts, backoff: &mut Backoff| {
        let step = policy::after_sign_out(result.copied(), attempts, &shared.retry, backoff);
        if step == SignOutStep::Halt {
            tracing::error!(
                error_code = result.err().map_or("none", |e| e.code.as_str()),
                "AdminUserGlobalSignOut refused for the campaign (cognito-idp:AdminUserGlobalSignOut allowed?); halting"
            );
        }
        Step::from(step)
    };
    let (failed, _, last_error) = until_decided(shared, limiter, call, decide, Some).await;
    SignOut { failed, last_error }
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
