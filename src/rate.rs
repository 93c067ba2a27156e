//! The request-rate cap on Cognito calls: hard, adaptive and live.
//!
//! Concurrency does not bound a rate (8 permits at 50 ms latency would be 160
//! calls/s), so every ForgotPassword attempt, first tries and retries alike,
//! first waits here. Retries sharing the cap is what keeps a throttling storm
//! from amplifying itself.
//!
//! Two `governor` (GCRA) limiters gate each call:
//! - the **hard cap** at `limits.max_rps` with `limits.burst`, rebuilt only
//!   when the operator changes those values. GCRA guarantees any one-second
//!   window holds at most `max_rps + burst` calls;
//! - the **adaptive gate** at the effective rate, present only while the
//!   worker is slowed down. Cognito's TooManyRequestsException cuts the
//!   effective rate multiplicatively (AIMD); it climbs back additively, over
//!   seconds, to `max_rps`. Rebuilding the gate can at most let one extra
//!   call through, and the hard cap still bounds every window.
//!
//! `max_rps = 0` pauses the campaign: waiting calls give up (their messages
//! are released) and nothing new starts until the cap is raised again.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter as Gcra};
use tokio::sync::watch;

use crate::config::LimitSettings;
use crate::telemetry;

/// Multiplicative decrease on throttling. Gentle, because cuts come once per
/// round trip (see [`Aimd::throttled`]): a steep descent from far above the
/// available rate still takes only a handful of round trips, and near it the
/// sawtooth stays within 15 % of the available rate.
const DECREASE_FACTOR: f64 = 0.85;
/// A steeper cut when the previous one was less than
/// [`STEEP_WITHIN`] ago: throttling that persists across round trips means
/// the rate is still far above what is available, so descend faster.
const STEEP_DECREASE_FACTOR: f64 = 0.6;
const STEEP_WITHIN: std::time::Duration = std::time::Duration::from_millis(500);
/// Additive increase per second, as a share of `max_rps` (at least 0.5/s):
/// back to full speed in about 10 s after a single decrease.
const INCREASE_SHARE_PER_SECOND: f64 = 0.02;
/// The adaptive rate never goes below this many calls per second.
const MIN_RATE: f64 = 1.0;

/// The operator's limits, as configured (and live-reloaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_rps: u32,
    pub burst: u32,
}

impl From<&LimitSettings> for Limits {
    fn from(settings: &LimitSettings) -> Self {
        Self {
            max_rps: settings.max_rps,
            burst: settings.burst,
        }
    }
}

/// Why [`RateLimiter::acquire`] did not grant a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paused;

/// Additive-increase/multiplicative-decrease state, kept apart from the
/// limiters and clocked by its caller so it can be tested deterministically.
#[derive(Debug, Clone)]
pub struct Aimd {
    max: f64,
    effective: f64,
    last_update: Instant,
    last_decrease: Option<Instant>,
}

impl Aimd {
    pub fn new(max_rps: u32, now: Instant) -> Self {
        Self {
            max: f64::from(max_rps),
            effective: f64::from(max_rps),
            last_update: now,
            last_decrease: None,
        }
    }

    /// The effective rate at `now`, after additive recovery.
    pub fn rate(&mut self, now: Instant) -> f64 {
        let elapsed = now
            .saturating_duration_since(self.last_update)
            .as_secs_f64();
        let step = (self.max * INCREASE_SHARE_PER_SECOND).max(0.5);
        self.effective = (self.effective + step * elapsed).min(self.max);
        self.last_update = now;
        self.effective
    }

    /// A throttled answer at `now` to a call that started at `call_started`.
    /// Returns true when the rate was cut. A call that was already in flight
    /// at the last cut reports congestion that cut already answered, so it
    /// is ignored: at most one cut per round trip, however many calls were
    /// in flight together.
    pub fn throttled(&mut self, now: Instant, call_started: Instant) -> bool {
        if self.last_decrease.is_some_and(|t| call_started < t) {
            return false;
        }
        let current = self.rate(now);
        let factor = match self.last_decrease {
            Some(t) if now.saturating_duration_since(t) < STEEP_WITHIN => STEEP_DECREASE_FACTOR,
            _ => DECREASE_FACTOR,
        };
        self.effective = (current * factor).max(MIN_RATE.min(self.max));
        self.last_decrease = Some(now);
        true
    }

    /// A new configured maximum; the effective rate never exceeds it.
    pub fn set_max(&mut self, max_rps: u32, now: Instant) {
        self.rate(now);
        self.max = f64::from(max_rps);
        self.effective = self.effective.min(self.max);
        if self.last_decrease.is_none() {
            // Not slowed down: follow the new maximum straight away.
            self.effective = self.max;
        }
    }
}

struct Adaptive {
    aimd: Aimd,
    /// The gate's whole-number rate; `None` while running at full speed.
    gate_rate: Option<u32>,
    gate: Option<Arc<DefaultDirectRateLimiter>>,
    /// The value last written to the rate gauge.
    shown: f64,
}

/// The process-wide limiter. Shared by every job task through `Arc`.
pub struct RateLimiter {
    /// Current limits; job tasks and the receive loop watch it for pauses.
    limits: watch::Sender<Limits>,
    /// The hard cap. Replaced (never mutated) when the limits change; a task
    /// already waiting on the old one finishes its wait there.
    hard: RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
    /// AIMD state and its gate. A std mutex: held for microseconds, never
    /// across an await.
    adaptive: Mutex<Adaptive>,
}

fn gcra(rps: u32, burst: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rps = NonZeroU32::new(rps)?;
    let burst = NonZeroU32::new(burst.max(1))?;
    Some(Arc::new(Gcra::direct(
        Quota::per_second(rps).allow_burst(burst),
    )))
}

/// A limiter for a live change: it starts with its burst spent. A fresh
/// GCRA holds a full burst, and calls granted by the limiter it replaces
/// are still in the current one-second window, so a full burst on top could
/// take that window past the cap.
fn gcra_spent(rps: u32, burst: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    let limiter = gcra(rps, burst)?;
    if let Some(n) = NonZeroU32::new(burst.max(1)) {
        // Cannot fail: `n` is the burst the limiter was built with.
        let _ = limiter.check_n(n);
    }
    Some(limiter)
}

impl RateLimiter {
    pub fn new(limits: Limits) -> Self {
        telemetry::rate_limit(f64::from(limits.max_rps));
        Self {
            limits: watch::Sender::new(limits),
            hard: RwLock::new(gcra(limits.max_rps, limits.burst)),
            adaptive: Mutex::new(Adaptive {
                aimd: Aimd::new(limits.max_rps, Instant::now()),
                gate_rate: None,
                gate: None,
                shown: f64::from(limits.max_rps),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        *self.limits.borrow()
    }

    pub fn is_paused(&self) -> bool {
        self.limits().max_rps == 0
    }

    /// Applies new limits at once (live reload).
    pub fn set_limits(&self, limits: Limits) {
        if let Ok(mut hard) = self.hard.write() {
            *hard = gcra_spent(limits.max_rps, limits.burst);
        }
        self.with_adaptive(|a| a.aimd.set_max(limits.max_rps, Instant::now()));
        self.limits.send_replace(limits);
    }

    /// Tells the limiter Cognito answered TooManyRequestsException to a call
    /// that started at `call_started`.
    pub fn on_throttled(&self, call_started: Instant) {
        self.with_adaptive(|a| {
            if a.aimd.throttled(Instant::now(), call_started) {
                tracing::info!(
                    effective_rps = format!("{:.1}", a.aimd.effective),
                    "throttled by Cognito; slowing down"
                );
            }
        });
    }

    /// Updates the gate after recovery or a decrease; returns it.
    fn with_adaptive<R>(&self, f: impl FnOnce(&mut Adaptive) -> R) -> R {
        // A poisoned lock only means another task panicked mid-update; the
        // state is still a valid rate.
        let mut guard = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut guard);
        let now = Instant::now();
        let rate = guard.aimd.rate(now);
        let max = guard.aimd.max;
        let wanted = (rate < max).then(|| rate.floor().max(1.0) as u32);
        if wanted != guard.gate_rate {
            guard.gate_rate = wanted;
            guard.gate = wanted.and_then(|r| gcra(r, 1));
        }
        let shown = wanted.map_or(max, f64::from);
        if shown != guard.shown {
            guard.shown = shown;
            telemetry::rate_limit(shown);
        }
        out
    }

    /// The effective rate now (for the gauge and tests).
    pub fn effective_rate(&self) -> f64 {
        self.with_adaptive(|a| a.aimd.rate(Instant::now()))
    }

    /// Waits until one more call may start, or returns `Err(Paused)` as soon
    /// as the campaign is paused.
    pub async fn acquire(&self) -> Result<(), Paused> {
        let mut limits = self.limits.subscribe();
        loop {
            if limits.borrow_and_update().max_rps == 0 {
                return Err(Paused);
            }
            let hard = self.hard.read().ok().and_then(|h| h.clone());
            let wait = async {
                // Wait on the adaptive gate until the gate we passed is still
                // the current one: a task that waited on a gate replaced
                // meanwhile (a cut, or recovery) would otherwise pass at the
                // old rate alongside the new gate's traffic.
                loop {
                    let Some(gate) = self.with_adaptive(|a| a.gate.clone()) else {
                        break;
                    };
                    gate.until_ready().await;
                    let current = self.with_adaptive(|a| a.gate.clone());
                    if current.is_some_and(|c| Arc::ptr_eq(&c, &gate)) {
                        break;
                    }
                }
                if let Some(hard) = hard {
                    hard.until_ready().await;
                }
            };
            tokio::select! {
                _ = wait => return Ok(()),
                // Limits changed while waiting: re-check for a pause, then
                // wait on the new limiters.
                changed = limits.changed() => if changed.is_err() { return Err(Paused) },
            }
        }
    }

    /// Resolves when the campaign is not paused.
    pub async fn wait_unpaused(&self) {
        let mut limits = self.limits.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we
        // borrow `self`.
        let _ = limits.wait_for(|l| l.max_rps > 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn aimd_cuts_once_per_round_trip_and_recovers_additively() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new(100, t0);
        assert_eq!(aimd.rate(t0), 100.0);

        assert!(aimd.throttled(t0, t0));
        assert!((aimd.rate(t0) - 85.0).abs() < 1e-9);
        // Answers to calls that were in flight at the cut are the same
        // congestion signal: no second cut.
        let ms = Duration::from_millis;
        assert!(!aimd.throttled(t0 + ms(50), t0 - ms(10)));
        assert!(aimd.rate(t0 + ms(50)) < 85.5);

        // A call started after the cut and still throttled: cut again,
        // steeply (×0.6) since the last cut was under 500 ms ago; a second
        // later, gently (×0.85) again.
        assert!(aimd.throttled(t0 + ms(100), t0 + ms(60)));
        assert!(aimd.throttled(t0 + ms(2000), t0 + ms(1900)));
        let low = aimd.rate(t0 + Duration::from_secs(2));
        assert!((low - 46.682).abs() < 0.01, "{low}");

        // +2/s (2 % of 100): not instant, but full speed within ~25 s.
        let after_5s = aimd.rate(t0 + Duration::from_secs(7));
        assert!((after_5s - (low + 10.0)).abs() < 1e-6, "{after_5s}");
        assert_eq!(aimd.rate(t0 + Duration::from_secs(40)), 100.0);
    }

    #[test]
    fn aimd_never_goes_below_the_floor_or_above_max() {
        let t0 = Instant::now();
        // Throttled every second, recovery (+0.5/s) hits the maximum of 3
        // before each cut: the rate cycles 3 -> 2.55.
        let mut aimd = Aimd::new(3, t0);
        for i in 0..40 {
            let now = t0 + Duration::from_secs(i);
            aimd.throttled(now, now);
        }
        let settled = aimd.rate(t0 + Duration::from_secs(39));
        assert!((settled - 2.55).abs() < 0.01, "{settled}");
        // Lowering the maximum caps the effective rate at once.
        aimd.set_max(1, t0 + Duration::from_secs(30));
        assert_eq!(aimd.rate(t0 + Duration::from_secs(30)), 1.0);
        // At 1/s the floor holds.
        let now = t0 + Duration::from_secs(31);
        aimd.throttled(now, now);
        assert_eq!(aimd.rate(t0 + Duration::from_secs(31)), 1.0);
        assert_eq!(aimd.rate(t0 + Duration::from_secs(99)), 1.0);
    }

    /// Real clock: governor runs on its own clock, so tokio's paused time
    /// does not apply. Only upper bounds are asserted, and a slow machine
    /// can only make calls later, never earlier, so this cannot flake.
    #[tokio::test]
    async fn hard_cap_holds_over_every_one_second_window() {
        let limiter = RateLimiter::new(Limits {
            max_rps: 40,
            burst: 4,
        });
        let start = Instant::now();
        let mut grants = Vec::new();
        for _ in 0..90 {
            limiter.acquire().await.unwrap();
            grants.push(start.elapsed());
        }
        let max_in_window = grants
            .iter()
            .map(|&t| {
                grants
                    .iter()
                    .filter(|&&u| u >= t && u < t + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap();
        assert!(
            max_in_window <= 44,
            "{max_in_window} calls in one second, cap 40 + burst 4"
        );
        // 90 calls at 40/s after a burst of 4 need at least (90-4)/40 s.
        assert!(
            grants[89] >= Duration::from_millis(2100),
            "{:?}",
            grants[89]
        );
    }

    /// Hardening #13: a limiter built for a live change started with a full
    /// burst, on top of the calls the old one granted in the same second.
    /// Only an upper bound on grants in a time span is asserted: a slow
    /// machine can only make grants later.
    #[tokio::test]
    async fn a_live_change_does_not_add_a_fresh_burst() {
        let limiter = RateLimiter::new(Limits {
            max_rps: 1000,
            burst: 20,
        });
        for _ in 0..20 {
            limiter.acquire().await.unwrap();
        }
        limiter.set_limits(Limits {
            max_rps: 10,
            burst: 10,
        });
        let changed = Instant::now();
        let mut grants = 0;
        while changed.elapsed() < Duration::from_millis(150) {
            if tokio::time::timeout(Duration::from_millis(10), limiter.acquire())
                .await
                .is_ok()
            {
                grants += 1;
            }
        }
        // At 10/s with the burst spent: at most the one call due 100 ms on
        // (and one more for timer slack), not a burst of 10.
        assert!(grants <= 2, "{grants} calls in 150 ms after the change");
    }

    #[tokio::test]
    async fn throttling_engages_the_gate_and_the_gauge_value() {
        let limiter = RateLimiter::new(Limits {
            max_rps: 50,
            burst: 1,
        });
        limiter.on_throttled(Instant::now());
        let rate = limiter.effective_rate();
        assert!((42.0..=43.0).contains(&rate), "{rate}");
        assert!(limiter.with_adaptive(|a| a.gate.is_some()));
        assert_eq!(limiter.with_adaptive(|a| a.gate_rate), Some(42));
    }

    #[tokio::test]
    async fn pause_releases_waiters_and_resume_unblocks() {
        let limiter = Arc::new(RateLimiter::new(Limits {
            max_rps: 1,
            burst: 1,
        }));
        limiter.acquire().await.unwrap();
        // The next call must wait ~1 s; pausing ends that wait at once.
        let waiter = tokio::spawn({
            let l = limiter.clone();
            async move { l.acquire().await }
        });
        tokio::task::yield_now().await;
        limiter.set_limits(Limits {
            max_rps: 0,
            burst: 1,
        });
        assert_eq!(waiter.await.unwrap(), Err(Paused));
        assert!(limiter.is_paused());
        assert_eq!(limiter.acquire().await, Err(Paused));

        let unpaused = tokio::spawn({
            let l = limiter.clone();
            async move { l.wait_unpaused().await }
        });
        limiter.set_limits(Limits {
            max_rps: 5,
            burst: 1,
        });
        unpaused.await.unwrap();
        assert_eq!(limiter.acquire().await, Ok(()));
    }
}
