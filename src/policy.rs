//! The outcome policy: [`classify`] is the one place that decides what a
//! Cognito failure means, and [`Backoff`] the one retry schedule.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::cognito::{CallError, ErrorCode};
use crate::config::RetrySettings;

/// What a failed call means for the job and the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Transient (throttling, 5xx, timeout, connection): retry in process with
    /// backoff, then defer the message.
    Retryable,
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

/// Classifies a failed call. Every module asks this function; none matches
/// on error codes itself.
pub fn classify(err: &CallError) -> Class {
    use ErrorCode::*;
    if err.is_user_state() {
        // One user's state (disabled, no password yet): reject that job.
        return Class::Permanent;
    }
    match err.code {
        TooManyRequests | InternalError | Timeout | Connection | ServerError => Class::Retryable,
        LimitExceeded => Class::UserLimited,
        UserNotFound => Class::UserNotFound,
        InvalidParameter | UserLambdaValidation => Class::Permanent,
        CodeDeliveryFailure | InvalidLambdaResponse | UnexpectedLambda => Class::RetryThenReject,
        NotAuthorized
        | ResourceNotFound
        | InvalidEmailRoleAccessPolicy
        | InvalidSmsRoleAccessPolicy
        | InvalidSmsRoleTrustRelationship
        | Forbidden => Class::Fatal,
        // An unknown code is treated as transient: the message is retried and
        // eventually deferred, so it reaches the redrive policy's dead-letter
        // queue after maxReceiveCount rather than being dead-lettered (or the
        // campaign halted) on a guess.
        Other => Class::Retryable,
    }
}

/// Exponential backoff with full jitter for one job.
///
/// `backon` supplies the capped exponential ceilings (its own jitter adds
/// up to one extra delay, which is not full jitter); each sleep is then drawn
/// uniformly from `[0, ceiling]`, as in AWS's "Exponential Backoff and
/// Jitter" analysis.
pub struct Backoff {
    ceilings: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(settings: &RetrySettings) -> Self {
        Self::with_bounds(
            Duration::from_millis(settings.initial_delay_ms),
            Duration::from_millis(settings.max_delay_ms),
        )
    }

    /// Ceilings from `initial`, doubling, capped at `max`.
    pub fn with_bounds(initial: Duration, max: Duration) -> Self {
        let ceilings = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times()
            .build();
        Self { ceilings, max }
    }

    /// The next ceiling, without jitter.
    pub fn next_ceiling(&mut self) -> Duration {
        self.ceilings.next().unwrap_or(self.max)
    }

    /// The next sleep: uniform in `[0, ceiling]`.
    pub fn next_delay(&mut self) -> Duration {
        full_jitter(self.next_ceiling())
    }
}

pub fn full_jitter(ceiling: Duration) -> Duration {
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
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
        }
    }

    #[test]
    fn ceilings_double_and_cap() {
        let mut b = Backoff::new(&settings());
        let got: Vec<u128> = (0..6).map(|_| b.next_ceiling().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_under_ceiling_and_varies() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = full_jitter(Duration::from_millis(1000));
            assert!(d <= Duration::from_millis(1000));
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 50, "jitter should spread, got {}", seen.len());
    }

    #[test]
    fn classification_matches_outcome_table() {
        use ErrorCode::*;
        let table = [
            (TooManyRequests, Class::Retryable),
            (InternalError, Class::Retryable),
            (Timeout, Class::Retryable),
            (Connection, Class::Retryable),
            (ServerError, Class::Retryable),
            (LimitExceeded, Class::UserLimited),
            (UserNotFound, Class::UserNotFound),
            (InvalidParameter, Class::Permanent),
            (UserLambdaValidation, Class::Permanent),
            (CodeDeliveryFailure, Class::RetryThenReject),
            (InvalidLambdaResponse, Class::RetryThenReject),
            (UnexpectedLambda, Class::RetryThenReject),
            (NotAuthorized, Class::Fatal),
            (ResourceNotFound, Class::Fatal),
            (InvalidEmailRoleAccessPolicy, Class::Fatal),
            (InvalidSmsRoleAccessPolicy, Class::Fatal),
            (InvalidSmsRoleTrustRelationship, Class::Fatal),
            (Forbidden, Class::Fatal),
            (Other, Class::Retryable),
        ];
        for (code, class) in table {
            let err = CallError {
                code,
                http_status: Some(400),
                server_message: Some("Some message".into()),
            };
            assert_eq!(classify(&err), class, "{code:?}");
        }
    }

    #[test]
    fn not_authorized_for_one_users_state_is_not_fatal() {
        let err = |m: &str| CallError {
            code: ErrorCode::NotAuthorized,
            http_status: Some(400),
            server_message: Some(m.into()),
        };
        assert_eq!(classify(&err("User is disabled.")), Class::Permanent);
        assert_eq!(
            classify(&err("User password cannot be reset in the current state.")),
            Class::Permanent
        );
        assert_eq!(
            classify(&err("Unable to verify secret hash for client abc")),
            Class::Fatal
        );
    }
}
