//! The one retry schedule: capped exponential ceilings with full jitter.
//!
//! Used by every retry in the crate: a job's Cognito calls, a failing
//! ReceiveMessage, a failed DeleteMessageBatch and `enqueue`'s batches.
//! `backon` supplies the ceilings (its own jitter adds up to one extra delay,
//! which is not full jitter); each sleep is then drawn uniformly from
//! `[0, ceiling]`, as in AWS's "Exponential Backoff and Jitter" analysis.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetrySettings;

/// Exponential backoff with full jitter. One per retried thing; reset by
/// building a new one after a success.
pub struct Backoff {
    ceilings: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Ceilings from `initial`, doubling, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let ceilings = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times()
            .build();
        Self { ceilings, max }
    }

    /// The job schedule: `retry.initial_delay_ms` doubling to `retry.max_delay_ms`.
    pub fn for_jobs(settings: &RetrySettings) -> Self {
        Self::new(
            Duration::from_millis(settings.initial_delay_ms),
            Duration::from_millis(settings.max_delay_ms),
        )
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

fn full_jitter(ceiling: Duration) -> Duration {
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_and_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
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
}
