//! The paced, retried Cognito reads of the operator commands
//! (`enqueue --from-user-pool`'s `ListUsers`, `report --refresh-status`'s
//! `AdminGetUser`): one place decides what a read's error means and what
//! happens next. The SDK clients retry nothing; this is the only policy.

use std::future::Future;
use std::time::Duration;

use governor::DefaultDirectRateLimiter;

use crate::aws::cognito::{CallError, ErrorCode};
use crate::backoff::Backoff;

/// Tries while Cognito throttles (with the backoff's 20 s cap: several
/// minutes) before giving up.
const THROTTLED_TRIES: u32 = 30;
/// Tries on a transient error (5xx, timeout, connection): a read, so
/// repeating it is harmless.
const TRANSIENT_TRIES: u32 = 5;

/// Why a paced read gave up.
#[derive(Debug)]
pub enum ReadError {
    /// AccessDenied, NotAuthorized, ResourceNotFound or no credentials: the
    /// setup is wrong, and no read can succeed.
    Misconfigured(CallError),
    /// Any other error that is not retried (the caller may know what it
    /// means, e.g. a refused filter), or a retried one that did not let up.
    Failed(CallError),
}

/// Runs `read` once `limiter` allows, retrying with jittered backoff while
/// Cognito throttles or fails transiently; `what` names the call in logs.
pub async fn paced<T, F, Fut>(
    limiter: &DefaultDirectRateLimiter,
    what: &'static str,
    mut read: F,
) -> Result<T, ReadError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(20));
    let mut tries = 0;
    loop {
        crate::rate::until_ready(limiter).await;
        tries += 1;
        let err = match read().await {
            Ok(out) => return Ok(out),
            Err(err) => err,
        };
        let retry_within = match err.code {
            ErrorCode::AccessDenied
            | ErrorCode::NotAuthorized
            | ErrorCode::ResourceNotFound
            | ErrorCode::Credentials => return Err(ReadError::Misconfigured(err)),
            ErrorCode::TooManyRequests => THROTTLED_TRIES,
            ErrorCode::InternalError
            | ErrorCode::ServerError
            | ErrorCode::Timeout
            | ErrorCode::Connection
            | ErrorCode::ConnectionLost => TRANSIENT_TRIES,
            _ => return Err(ReadError::Failed(err)),
        };
        if tries >= retry_within {
            return Err(ReadError::Failed(err));
        }
        tracing::warn!(
            call = what,
            code = err.code.as_str(),
            tries,
            "read failed; retrying"
        );
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
