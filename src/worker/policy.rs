//! The outcome policy: the one place that decides what becomes of a job.
//!
//! [`classify`] says what a Cognito failure means; [`after_call`] turns a
//! call's result and the attempt count into the next step (call again after
//! a backoff, halt the campaign, or a final [`Outcome`]); the few outcomes
//! decided without a call ([`unparsable`], [`unknown_pool`], [`already_sent`],
//! [`released`], [`dead_letter_failed`], …) are made here too, and
//! [`ledger_state`] says what the ledger records for each outcome. The
//! worker's task asks; it never matches on an error code itself. The docs'
//! outcome table (docs/outcomes.md) is the table-driven test at the bottom of
//! this file.

use std::time::Duration;

use crate::aws::cognito::{CallError, Delivery, ErrorCode};
use crate::aws::sqs::QueueError;
use crate::backoff::Backoff;
use crate::config::RetrySettings;
use crate::job::JobError;
use crate::ledger::State;
use crate::worker::outcome::Outcome;

/// What a failed call means for the job and the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Transient (throttling, 5xx, a connection never made): retry in
    /// process with backoff, then defer the message.
    Retryable,
    /// The call was sent but its answer was lost (timeout, connection broken
    /// mid-call): Cognito may have sent the code, and a second one would void
    /// it. Never retried in process: deferred by
    /// `retry.uncertain_delay_seconds`.
    Uncertain,
    /// The per-user code limit: retrying now cannot succeed and may extend
    /// the lock-out, so defer by `retry.limit_exceeded_delay_seconds`.
    UserLimited,
    /// No such user: nothing to do; delete and count.
    UserNotFound,
    /// Cognito refused this job's parameters: reject (dead-letter).
    Permanent,
    /// Delivery or a Lambda trigger failed: may be transient, so retry a few
    /// times, then reject.
    RetryThenReject,
    /// The campaign is misconfigured (credentials, client, roles): stop
    /// everything and touch no message.
    Fatal,
}

/// Classifies a failed call.
pub fn classify(err: &CallError) -> Class {
    use ErrorCode::*;
    if err.is_user_state() {
        // One user's state (disabled, no password yet): reject that job.
        return Class::Permanent;
    }
    match err.code {
        TooManyRequests | InternalError | Connection | ServerError => Class::Retryable,
        Timeout | ConnectionLost => Class::Uncertain,
        LimitExceeded => Class::UserLimited,
        UserNotFound => Class::UserNotFound,
        InvalidParameter | UserLambdaValidation => Class::Permanent,
        CodeDeliveryFailure | InvalidLambdaResponse | UnexpectedLambda => Class::RetryThenReject,
        NotAuthorized
        | ResourceNotFound
        | InvalidEmailRoleAccessPolicy
        | InvalidSmsRoleAccessPolicy
        | InvalidSmsRoleTrustRelationship
        | Forbidden
        | AccessDenied
        | Credentials => Class::Fatal,
        // An unknown code is treated as transient: the message is retried and
        // eventually deferred, so it reaches the redrive policy's dead-letter
        // queue after maxReceiveCount rather than being dead-lettered (or the
        // campaign halted) on a guess.
        Other => Class::Retryable,
    }
}

/// True when an SQS error means the campaign cannot go on (a missing IAM
/// permission, bad credentials, a queue that does not exist): the worker
/// halts instead of backing off forever with `/readyz` at 503.
pub fn queue_error_is_fatal(err: &QueueError) -> bool {
    let Some(code) = err.code.as_deref() else {
        return false;
    };
    matches!(
        ErrorCode::from_aws_code(code),
        ErrorCode::AccessDenied | ErrorCode::Credentials
    ) || matches!(
        code,
        "AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist"
    )
}

/// What the job does after one call. `D` is what a decided call loop
/// ends with: the job's [`Outcome`] for the reset; for the sign-out, `None`
/// (signed out) or the outcome it failed with ([`SignOutStep`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<D = Outcome> {
    /// Call again after this delay (the call waits for the rate cap too).
    Retry { after: Duration },
    /// The campaign is misconfigured: halt it. This job's message is
    /// released, like every other one still held.
    Halt,
    /// The job is decided.
    Done(D),
}

/// Decides the next step after call number `attempts` (1-based) ended in
/// `result`. `backoff` is the job's schedule: it supplies both the in-process
/// retry delay and, once the attempts are spent, the deferral.
pub fn after_call(
    result: Result<&Delivery, &CallError>,
    attempts: u32,
    retry: &RetrySettings,
    backoff: &mut Backoff,
) -> Step {
    let err = match result {
        Ok(delivery) => {
            return Step::Done(Outcome::Sent {
                medium: delivery.medium,
            });
        }
        Err(err) => err,
    };
    let reject = || Outcome::Rejected {
        reason: err.code.as_str(),
        detail: err.server_message.clone().unwrap_or_default(),
    };
    let class = classify(err);
    let limit = match class {
        Class::Retryable => retry.max_attempts,
        Class::RetryThenReject => retry.delivery_failure_max_attempts,
        _ => 0,
    };
    match class {
        Class::Retryable | Class::RetryThenReject if attempts < limit => Step::Retry {
            after: backoff.next_delay(),
        },
        Class::Retryable => Step::Done(Outcome::Deferred {
            reason: "retries_exhausted",
            delay: backoff.next_delay().max(Duration::from_secs(1)),
        }),
        Class::RetryThenReject => Step::Done(reject()),
        Class::Uncertain => Step::Done(Outcome::Deferred {
            reason: "uncertain",
            delay: Duration::from_secs(retry.uncertain_delay_seconds),
        }),
        Class::UserLimited => Step::Done(Outcome::Deferred {
            reason: "user_limit_exceeded",
            delay: Duration::from_secs(retry.limit_exceeded_delay_seconds),
        }),
        Class::UserNotFound => Step::Done(Outcome::Skipped {
            reason: "user_not_found",
        }),
        Class::Permanent => Step::Done(reject()),
        Class::Fatal => Step::Halt,
    }
}

/// What a job does after one `AdminUserGlobalSignOut` call (with
/// `cognito.sign_out`), which follows a reset that went out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignOutStep {
    /// Call again after this delay (the call waits for the rate cap too).
    Retry { after: Duration },
    /// The campaign is misconfigured (above all a missing
    /// `cognito-idp:AdminUserGlobalSignOut`): halt it.
    Halt,
    /// The user's sessions are ended, or there is no such user any more.
    SignedOut,
    /// Not signed out: the job ends in this outcome. The reset is recorded
    /// in the ledger, so the job's next delivery signs out only.
    Failed(Outcome),
}

impl From<SignOutStep> for Step<Option<Outcome>> {
    fn from(step: SignOutStep) -> Self {
        match step {
            SignOutStep::Retry { after } => Step::Retry { after },
            SignOutStep::Halt => Step::Halt,
            SignOutStep::SignedOut => Step::Done(None),
            SignOutStep::Failed(outcome) => Step::Done(Some(outcome)),
        }
    }
}

/// Decides the next step after sign-out call number `attempts` (1-based).
/// Unlike a reset, a sign-out sends nothing to the user and is idempotent:
/// a lost answer (timeout) or a per-user limit is simply retried, like
/// throttling, up to `retry.max_attempts`, then the job is deferred.
pub fn after_sign_out(
    result: Result<(), &CallError>,
    attempts: u32,
    retry: &RetrySettings,
    backoff: &mut Backoff,
) -> SignOutStep {
    let Err(err) = result else {
        return SignOutStep::SignedOut;
    };
    match classify(err) {
        // Deleted since the reset: nobody left to sign out.
        Class::UserNotFound => SignOutStep::SignedOut,
        Class::Fatal => SignOutStep::Halt,
        Class::Permanent => SignOutStep::Failed(Outcome::Rejected {
            reason: "sign_out_refused",
            detail: format!(
                "AdminUserGlobalSignOut refused after the reset: {}",
                err.code.as_str()
            ),
        }),
        Class::Retryable | Class::Uncertain | Class::UserLimited | Class::RetryThenReject
            if attempts < retry.max_attempts =>
        {
            SignOutStep::Retry {
                after: backoff.next_delay(),
            }
        }
        Class::Retryable | Class::Uncertain | Class::UserLimited | Class::RetryThenReject => {
            SignOutStep::Failed(Outcome::Deferred {
                reason: "sign_out_failed",
                delay: backoff.next_delay().max(Duration::from_secs(1)),
            })
        }
    }
}

/// The `reset_worker_sign_outs_total` result of one sign-out call.
pub fn sign_out_label(result: Result<(), &CallError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(err) => match err.code {
            ErrorCode::UserNotFound => "user_not_found",
            ErrorCode::TooManyRequests => "throttled",
            _ => "error",
        },
    }
}

/// The reset went out on an earlier delivery (the ledger recorded it) and
/// the pool no longer signs users out: nothing is left to do, and the user
/// is `sent`. No code went out now.
pub fn reset_earlier() -> Outcome {
    Outcome::Sent { medium: "none" }
}

/// A body that is not a valid job can never succeed: reject it.
pub fn unparsable(err: &JobError) -> Outcome {
    Outcome::Rejected {
        reason: err.reason(),
        detail: err.to_string(),
    }
}

/// The job names a pool that is not configured (`cognito.pools`): no
/// worker with this configuration can serve it, so it is rejected, uncalled
/// and unclaimed. The detail names the pool (a configured name, not personal
/// data) for the dead-letter attribute.
pub fn unknown_pool(name: &str) -> Outcome {
    Outcome::Rejected {
        reason: "unknown_pool",
        detail: format!("pool `{name}` is not configured"),
    }
}

/// The ledger says a code was already sent to the user in this campaign.
pub fn already_sent() -> Outcome {
    Outcome::Skipped {
        reason: "already_sent",
    }
}

/// Another task or worker holds the user's claim for `remaining` still. This
/// copy may be the very message that task holds (an SQS duplicate) and its
/// fate is not known yet, so it is never deleted: it comes back when the
/// lease ends, when the user is either sent (then skipped) or free.
pub fn claimed_elsewhere(remaining: Duration) -> Outcome {
    // SQS counts visibility in whole seconds: round up, so the copy never
    // comes back while the lease still runs.
    let whole = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
    Outcome::Deferred {
        reason: "claimed_elsewhere",
        delay: Duration::from_secs(whole.max(1)),
    }
}

/// The job's Region already holds as many jobs as it can call in the next
/// few seconds (it is throttled, or slower than the others): deferred,
/// uncalled and unclaimed, so it does not hold a slot other Regions' jobs
/// could use.
pub fn region_busy(delay: Duration) -> Outcome {
    let whole = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    Outcome::Deferred {
        reason: "region_busy",
        delay: Duration::from_secs(whole.max(1)),
    }
}

/// An earlier claim expired mid-call and `ledger.on_uncertain = "skip"`:
/// not called again.
pub fn uncertain_skipped() -> Outcome {
    Outcome::Skipped {
        reason: "uncertain",
    }
}

/// An earlier claim expired mid-call, and `AdminGetUser` shows the user in
/// `RESET_REQUIRED`: the reset happened; not called again.
pub fn already_reset() -> Outcome {
    Outcome::Skipped {
        reason: "already_reset",
    }
}

/// The ledger cannot be reached: no call without a claim. The message is
/// released and the worker waits for the ledger.
pub fn ledger_unavailable() -> Outcome {
    Outcome::Released {
        reason: "ledger_unavailable",
    }
}

/// What the ledger records when a claimed job ends in `outcome`: the final
/// state and its reason. A call whose answer was lost is `uncertain`; a job
/// released or deferred is `deferred` (processed again when it comes back).
pub fn ledger_state(outcome: &Outcome) -> (State, &'static str) {
    match outcome {
        Outcome::Sent { .. } => (State::Sent, "ok"),
        // The user's status shows the lost call did reset them.
        Outcome::Skipped {
            reason: "already_reset",
        } => (State::Sent, "already_reset"),
        // Not called again: the email may or may not have gone out.
        Outcome::Skipped {
            reason: "uncertain",
        } => (State::Uncertain, "uncertain"),
        Outcome::Skipped { reason } => (State::Skipped, reason),
        Outcome::Rejected { reason, .. } => (State::Rejected, reason),
        Outcome::Deferred {
            reason: "uncertain",
            ..
        } => (State::Uncertain, "uncertain"),
        Outcome::Deferred { reason, .. } | Outcome::Released { reason } => {
            (State::Deferred, reason)
        }
    }
}

/// A job deferred by re-sending (FIFO) arrived before it is due. It is the
/// last of its message group by then, so hiding it blocks nothing else.
pub fn not_due(remaining: Duration) -> Outcome {
    Outcome::Deferred {
        reason: "not_due",
        delay: remaining.max(Duration::from_secs(1)),
    }
}

/// The job was waiting (rate cap, backoff) when the worker stopped taking
/// work: `reason` is `shutdown`, `halted` or `paused`.
pub fn released(reason: &'static str) -> Outcome {
    Outcome::Released { reason }
}

/// A rejected message whose dead-letter copy failed is never deleted
/// without one: it stays, and comes back after `visibility`.
pub fn dead_letter_failed(visibility: Duration) -> Outcome {
    Outcome::Deferred {
        reason: "dead_letter_failed",
        delay: visibility,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RetrySettings {
        RetrySettings {
            initial_delay_ms: 100,
            max_delay_ms: 1000,
            max_attempts: 5,
            delivery_failure_max_attempts: 3,
            limit_exceeded_delay_seconds: 3600,
            uncertain_delay_seconds: 300,
        }
    }

    fn error(code: ErrorCode, message: &str) -> CallError {
        CallError {
            code,
            http_status: Some(400),
            server_message: Some(message.into()),
        }
    }

    /// What a row of the outcome table expects.
    #[derive(Debug)]
    enum Want {
        Retry,
        Halt,
        /// Outcome label and reason.
        Done(&'static str, &'static str),
    }

    fn matches(step: &Step, want: &Want) -> bool {
        match (step, want) {
            (Step::Retry { after }, Want::Retry) => *after <= Duration::from_millis(1000),
            (Step::Halt, Want::Halt) => true,
            (Step::Done(o), Want::Done(label, reason)) => {
                o.label() == *label && o.reason() == *reason
            }
            _ => false,
        }
    }

    /// docs/outcomes.md, row by row: (call result, attempt, expected step).
    #[test]
    fn outcome_table() {
        use ErrorCode::*;
        let msg = "Some message";
        let rows: Vec<(Option<CallError>, u32, Want)> = vec![
            // success → sent
            (None, 1, Want::Done("sent", "ok")),
            (None, 5, Want::Done("sent", "ok")),
            // transient: retried up to retry.max_attempts (5), then deferred
            (Some(error(TooManyRequests, msg)), 1, Want::Retry),
            (Some(error(InternalError, msg)), 4, Want::Retry),
            (Some(error(Connection, msg)), 3, Want::Retry),
            (Some(error(ServerError, msg)), 1, Want::Retry),
            (Some(error(Other, msg)), 1, Want::Retry),
            (
                Some(error(TooManyRequests, msg)),
                5,
                Want::Done("deferred", "retries_exhausted"),
            ),
            (
                Some(error(Other, msg)),
                5,
                Want::Done("deferred", "retries_exhausted"),
            ),
            // sent but the answer lost: deferred at once, never retried in
            // process (a second call could be a second email)
            (
                Some(error(Timeout, msg)),
                1,
                Want::Done("deferred", "uncertain"),
            ),
            (
                Some(error(ConnectionLost, msg)),
                1,
                Want::Done("deferred", "uncertain"),
            ),
            // per-user limit: deferred at once, never retried in process
            (
                Some(error(LimitExceeded, msg)),
                1,
                Want::Done("deferred", "user_limit_exceeded"),
            ),
            // unknown user: skipped
            (
                Some(error(UserNotFound, msg)),
                1,
                Want::Done("skipped", "user_not_found"),
            ),
            // refused parameters: rejected at once
            (
                Some(error(InvalidParameter, msg)),
                1,
                Want::Done("rejected", "InvalidParameterException"),
            ),
            (
                Some(error(UserLambdaValidation, msg)),
                1,
                Want::Done("rejected", "UserLambdaValidationException"),
            ),
            // delivery and Lambda failures: retried up to
            // retry.delivery_failure_max_attempts (3), then rejected
            (Some(error(CodeDeliveryFailure, msg)), 2, Want::Retry),
            (
                Some(error(CodeDeliveryFailure, msg)),
                3,
                Want::Done("rejected", "CodeDeliveryFailureException"),
            ),
            (Some(error(InvalidLambdaResponse, msg)), 1, Want::Retry),
            (
                Some(error(UnexpectedLambda, msg)),
                3,
                Want::Done("rejected", "UnexpectedLambdaException"),
            ),
            // misconfiguration: halt the campaign
            (Some(error(NotAuthorized, msg)), 1, Want::Halt),
            (
                Some(error(
                    NotAuthorized,
                    "Unable to verify secret hash for client abc",
                )),
                1,
                Want::Halt,
            ),
            (Some(error(ResourceNotFound, msg)), 1, Want::Halt),
            (
                Some(error(InvalidEmailRoleAccessPolicy, msg)),
                1,
                Want::Halt,
            ),
            (Some(error(InvalidSmsRoleAccessPolicy, msg)), 1, Want::Halt),
            (
                Some(error(InvalidSmsRoleTrustRelationship, msg)),
                1,
                Want::Halt,
            ),
            (Some(error(Forbidden, msg)), 1, Want::Halt),
            // missing IAM permission, bad or expired credentials
            (Some(error(AccessDenied, msg)), 1, Want::Halt),
            (Some(error(Credentials, msg)), 1, Want::Halt),
            // NotAuthorized about one user's state is that job's problem
            (
                Some(error(NotAuthorized, "User is disabled.")),
                1,
                Want::Done("rejected", "NotAuthorizedException"),
            ),
            (
                Some(error(
                    NotAuthorized,
                    "User password cannot be reset in the current state.",
                )),
                1,
                Want::Done("rejected", "NotAuthorizedException"),
            ),
        ];
        let delivery = Delivery { medium: "EMAIL" };
        for (err, attempt, want) in rows {
            let mut backoff = Backoff::for_jobs(&settings());
            let result = match &err {
                None => Ok(&delivery),
                Some(e) => Err(e),
            };
            let step = after_call(result, attempt, &settings(), &mut backoff);
            assert!(
                matches(&step, &want),
                "{:?} at attempt {attempt}: got {step:?}, want {want:?}",
                err.as_ref().map(|e| e.code)
            );
        }
    }

    /// The sign-out's own table (docs/outcomes.md, "Ending sessions").
    #[test]
    fn sign_out_table() {
        use ErrorCode::*;
        let step = |code: Option<ErrorCode>, message: &str, attempt: u32| {
            let mut backoff = Backoff::for_jobs(&settings());
            let err = code.map(|c| error(c, message));
            after_sign_out(
                err.as_ref().map_or(Ok(()), Err),
                attempt,
                &settings(),
                &mut backoff,
            )
        };
        assert_eq!(step(None, "", 1), SignOutStep::SignedOut);
        // Deleted since the reset: done, not an error.
        assert_eq!(step(Some(UserNotFound), "", 1), SignOutStep::SignedOut);
        // A missing permission, bad credentials, a wrong pool: halt.
        for code in [AccessDenied, Credentials, ResourceNotFound, NotAuthorized] {
            assert_eq!(step(Some(code), "", 1), SignOutStep::Halt, "{code:?}");
        }
        // Transient, and (unlike a reset) a lost answer or a per-user limit:
        // retried in process, then deferred.
        for code in [
            TooManyRequests,
            InternalError,
            Timeout,
            ConnectionLost,
            LimitExceeded,
            Other,
        ] {
            assert!(
                matches!(step(Some(code), "", 4), SignOutStep::Retry { .. }),
                "{code:?}"
            );
            assert!(
                matches!(
                    step(Some(code), "", 5),
                    SignOutStep::Failed(Outcome::Deferred { reason: "sign_out_failed", delay })
                        if delay >= Duration::from_secs(1)
                ),
                "{code:?}"
            );
        }
        // Refused for this user: rejected, with the reset on record.
        for (code, message) in [(InvalidParameter, ""), (NotAuthorized, "User is disabled.")] {
            let SignOutStep::Failed(outcome) = step(Some(code), message, 1) else {
                panic!("{code:?}: not failed");
            };
            assert_eq!(
                (outcome.label(), outcome.reason()),
                ("rejected", "sign_out_refused")
            );
            assert_eq!(
                ledger_state(&outcome),
                (State::Rejected, "sign_out_refused")
            );
        }
        let deferred = Outcome::Deferred {
            reason: "sign_out_failed",
            delay: Duration::from_secs(1),
        };
        assert_eq!(
            ledger_state(&deferred),
            (State::Deferred, "sign_out_failed")
        );
        assert_eq!(ledger_state(&reset_earlier()), (State::Sent, "ok"));
        assert_eq!(sign_out_label(Ok(())), "ok");
        assert_eq!(
            sign_out_label(Err(&error(UserNotFound, ""))),
            "user_not_found"
        );
        assert_eq!(
            sign_out_label(Err(&error(TooManyRequests, ""))),
            "throttled"
        );
        assert_eq!(sign_out_label(Err(&error(AccessDenied, ""))), "error");
    }

    #[test]
    fn iam_and_credential_errors_on_sqs_are_fatal() {
        let err = |code: Option<&str>| QueueError {
            operation: "ReceiveMessage",
            queue: "q".into(),
            code: code.map(str::to_owned),
            detail: String::new(),
        };
        for code in [
            "AccessDenied",
            "AccessDeniedException",
            "InvalidClientTokenId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "AWS.SimpleQueueService.NonExistentQueue",
            "QueueDoesNotExist",
        ] {
            assert!(queue_error_is_fatal(&err(Some(code))), "{code}");
        }
        for code in [Some("InternalError"), Some("ServiceUnavailable"), None] {
            assert!(!queue_error_is_fatal(&err(code)), "{code:?}");
        }
    }

    #[test]
    fn what_the_ledger_records_for_each_outcome() {
        let cases = [
            (Outcome::Sent { medium: "EMAIL" }, State::Sent, "ok"),
            (already_reset(), State::Sent, "already_reset"),
            (uncertain_skipped(), State::Uncertain, "uncertain"),
            (
                Outcome::Skipped {
                    reason: "user_not_found",
                },
                State::Skipped,
                "user_not_found",
            ),
            (
                Outcome::Rejected {
                    reason: "InvalidParameterException",
                    detail: String::new(),
                },
                State::Rejected,
                "InvalidParameterException",
            ),
            (
                Outcome::Deferred {
                    reason: "uncertain",
                    delay: Duration::from_secs(300),
                },
                State::Uncertain,
                "uncertain",
            ),
            (
                Outcome::Deferred {
                    reason: "user_limit_exceeded",
                    delay: Duration::from_secs(3600),
                },
                State::Deferred,
                "user_limit_exceeded",
            ),
            (released("shutdown"), State::Deferred, "shutdown"),
        ];
        for (outcome, state, reason) in cases {
            assert_eq!(ledger_state(&outcome), (state, reason), "{outcome:?}");
        }
        // Rounded up to whole seconds, never below the lease.
        assert_eq!(
            claimed_elsewhere(Duration::from_millis(29_001)),
            Outcome::Deferred {
                reason: "claimed_elsewhere",
                delay: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn deferrals_carry_their_delay() {
        let mut backoff = Backoff::for_jobs(&settings());
        let step = after_call(
            Err(&error(ErrorCode::LimitExceeded, "")),
            1,
            &settings(),
            &mut backoff,
        );
        assert_eq!(
            step,
            Step::Done(Outcome::Deferred {
                reason: "user_limit_exceeded",
                delay: Duration::from_secs(3600)
            })
        );
        // Retries exhausted: deferred by the next backoff delay, at least 1 s.
        let step = after_call(
            Err(&error(ErrorCode::TooManyRequests, "")),
            5,
            &settings(),
            &mut backoff,
        );
        assert!(
            matches!(step, Step::Done(Outcome::Deferred { delay, .. }) if delay >= Duration::from_secs(1)),
            "{step:?}"
        );
    }

    #[test]
    fn decisions_without_a_call() {
        let err = crate::job::ResetJob::parse("not json").unwrap_err();
        let o = unparsable(&err);
        assert_eq!((o.label(), o.reason()), ("rejected", "invalid_json"));
        assert_eq!(already_sent().label(), "skipped");
        let o = unknown_pool("nope");
        assert_eq!((o.label(), o.reason()), ("rejected", "unknown_pool"));
        assert_eq!(ledger_state(&o), (State::Rejected, "unknown_pool"));
        let o = region_busy(Duration::from_millis(5_200));
        assert_eq!((o.label(), o.reason()), ("deferred", "region_busy"));
        assert!(matches!(o, Outcome::Deferred { delay, .. } if delay == Duration::from_secs(6)));
        let o = claimed_elsewhere(Duration::from_secs(60));
        assert_eq!((o.label(), o.reason()), ("deferred", "claimed_elsewhere"));
        assert_eq!(released("paused").reason(), "paused");
        let o = dead_letter_failed(Duration::from_secs(60));
        assert_eq!((o.label(), o.reason()), ("deferred", "dead_letter_failed"));
    }
}
