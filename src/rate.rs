//! The request-rate cap on Cognito calls.
//!
//! Concurrency does not bound a rate (8 permits at 50 ms latency would be 160
//! calls/s), so every ForgotPassword attempt, first tries and retries alike,
//! first waits here. Retries sharing the cap is what keeps a throttling storm
//! from amplifying itself.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter as Gcra};

use crate::config::LimitSettings;
use crate::telemetry;

/// Process-wide GCRA limiter (`governor`). Shared by every job task; GCRA
/// guarantees that any one-second window holds at most `max_rps + burst`
/// calls.
pub struct RateLimiter {
    inner: DefaultDirectRateLimiter,
}

impl RateLimiter {
    pub fn new(limits: &LimitSettings) -> Self {
        // Validation guarantees both are at least 1.
        let rps = NonZeroU32::new(limits.max_rps).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        telemetry::rate_limit(limits.max_rps);
        Self {
            inner: Gcra::direct(Quota::per_second(rps).allow_burst(burst)),
        }
    }

    /// Waits until one more call may start.
    pub async fn acquire(&self) {
        self.inner.until_ready().await;
    }
}
