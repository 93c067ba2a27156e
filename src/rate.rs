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
//!   effective rate; it climbs back on a cubic curve (TCP CUBIC's shape,
//!   [`Cubic`]): quickly to just under the rate of the last throttle, then
//!   slowly above it. Rebuilding the gate can at most let one extra call
//!   through, and the hard cap still bounds every window.
//!
//! `max_rps = 0` pauses the campaign: waiting calls give up (their messages
//! are released) and nothing new starts until the cap is raised again.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter as Gcra};
use tokio::sync::watch;

use crate::aws::cognito::UNKNOWN_REGION;
use crate::config::LimitSettings;
use crate::telemetry;

/// The cut on throttling: the rate drops to this share of the rate at
/// which Cognito throttled. Gentle, because cuts come once per round trip
/// (see [`Cubic::throttled`]) and the climb returns to just under the old
/// rate within [`RETURN_SECONDS`].
const DECREASE_FACTOR: f64 = 0.85;
/// A steeper cut when the previous one was less than [`STEEP_WITHIN`] ago:
/// throttling that persists across round trips means the rate is still far
/// above what is available, so descend faster.
const STEEP_DECREASE_FACTOR: f64 = 0.6;
const STEEP_WITHIN: std::time::Duration = std::time::Duration::from_millis(500);
/// After a cut, the rate climbs back to the rate of the last throttle in this
/// many seconds, fast at first and flattening out near it (TCP CUBIC's
/// concave part); beyond it, it probes slowly and then faster (the convex
/// part): +1 % one second after reaching it, +8 % after two, +15 % after
/// 2.5. The shape is scaled to the rate of the last throttle, never to
/// `max_rps`, so a cap far above the available rate does not make the
/// climb overshoot.
const RETURN_SECONDS: f64 = 2.5;
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

/// The adaptive rate, shaped like TCP CUBIC (RFC 9438) with rates in place
/// of windows. Kept apart from the limiters and clocked by its caller, so it
/// can be tested deterministically.
///
/// Cognito's quota is shared with real users and other campaigns, so what is
/// left for the campaign moves. The last throttle marks where it was
/// (`w_max`): after a cut the rate returns to just under that mark quickly,
/// lingers there, and only then probes above it, slowly at first. AIMD's
/// fixed climb (2 % of `max_rps` per second) made a deep sawtooth under a
/// low available rate and overshot it when `max_rps` was far above.
#[derive(Debug, Clone)]
pub struct Cubic {
    /// `limits.max_rps`, times this worker's share of a cluster budget.
    max: f64,
    /// The rate now, `≤ max`.
    effective: f64,
    /// Where the last throttle came (after fast convergence): the curve
    /// returns to it [`RETURN_SECONDS`] after the cut.
    w_max: f64,
    /// The rate right after the last cut: where the curve starts.
    origin: f64,
    /// When the last cut was made; `None` until the first throttle.
    last_decrease: Option<Instant>,
    /// When the calls of the last [`MEASURE_WINDOW`] were answered without
    /// throttling: what Cognito let through, the measure of what is
    /// available. At most the window's worth of answers.
    admitted: VecDeque<Instant>,
}

/// The window over which admitted calls are counted.
const MEASURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

impl Cubic {
    pub fn new(max: f64) -> Self {
        Self {
            max,
            effective: max,
            w_max: max,
            origin: max,
            last_decrease: None,
            admitted: VecDeque::new(),
        }
    }

    /// A call answered without throttling at `now`.
    pub fn admitted(&mut self, now: Instant) {
        self.admitted.push_back(now);
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .admitted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= MEASURE_WINDOW)
        {
            self.admitted.pop_front();
        }
    }

    /// Calls Cognito let through in the last second: the rate it allows
    /// now. `None` below [`MIN_RATE`] (nothing to go by).
    fn admitted_rate(&mut self, now: Instant) -> Option<f64> {
        self.trim(now);
        let n = self.admitted.len() as f64 / MEASURE_WINDOW.as_secs_f64();
        (n >= MIN_RATE).then_some(n)
    }

    /// The effective rate at `now`: on the cubic curve through the last cut,
    /// `W(t) = C (t − K)³ + W_max` with `W(0)` the cut rate and `K` =
    /// [`RETURN_SECONDS`], capped at `max_rps`.
    pub fn rate(&mut self, now: Instant) -> f64 {
        let Some(cut) = self.last_decrease else {
            self.effective = self.max;
            return self.effective;
        };
        let t = now.saturating_duration_since(cut).as_secs_f64();
        // At least a gentle cut's depth, so a rate cut to the floor (mark
        // and origin both there) still probes upward.
        let depth = (self.w_max - self.origin).max(self.w_max * (1.0 - DECREASE_FACTOR));
        let c = depth / RETURN_SECONDS.powi(3);
        let curve = c * (t - RETURN_SECONDS).powi(3) + self.w_max;
        self.effective = curve.max(self.origin).min(self.max).max(self.floor());
        self.effective
    }

    fn floor(&self) -> f64 {
        MIN_RATE.min(self.max)
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
        let steep = self
            .last_decrease
            .is_some_and(|t| now.saturating_duration_since(t) < STEEP_WITHIN);
        // The mark is what Cognito let through in the last second: the rate
        // it allows now, however far above it this worker was sending. A
        // cascade of cuts (the quota's bucket still empty) lowers the rate,
        // not the mark, so the climb returns to the available rate quickly.
        // Throttled before the curve got back to the mark: the mark was too
        // high, never raise it then. The last second's admissions can include
        // what the quota's bucket had stored (a burst), which the bucket
        // cannot sustain; only a throttle while probing above the mark may
        // raise it.
        let before_mark = self
            .last_decrease
            .is_some_and(|t| now.saturating_duration_since(t).as_secs_f64() < RETURN_SECONDS);
        self.w_max = match self.admitted_rate(now) {
            Some(measured) if before_mark => measured.min(self.w_max),
            Some(measured) => measured,
            // Nothing admitted to go by: the rate where it hurt, lowered a
            // little if it hurt below the previous mark (fast convergence,
            // RFC 9438 §4.7).
            None if current < self.w_max => current * (1.0 + DECREASE_FACTOR) / 2.0,
            None => current,
        };
        let factor = if steep {
            STEEP_DECREASE_FACTOR
        } else {
            DECREASE_FACTOR
        };
        self.origin = (current.min(self.w_max) * factor).max(self.floor());
        self.effective = self.origin;
        self.last_decrease = Some(now);
        true
    }

    /// A new maximum (the configured cap times this worker's share); the
    /// effective rate never exceeds it.
    pub fn set_max(&mut self, max: f64, now: Instant) {
        self.max = max;
        self.rate(now);
    }
}

struct Adaptive {
    cubic: Cubic,
    /// The gate's whole-number rate; `None` while running at full speed.
    gate_rate: Option<u32>,
    gate: Option<Arc<DefaultDirectRateLimiter>>,
    /// The value last written to the rate gauge.
    shown: f64,
}

/// What the limiter enforces: the operator's limits and this worker's share
/// of them (1 with `limits.scope = "process"`; `1 / live workers` with
/// `"cluster"`, 0 while a joining worker waits to be seen).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Budget {
    limits: Limits,
    share: f64,
}

impl Budget {
    fn rate(&self) -> f64 {
        f64::from(self.limits.max_rps) * self.share
    }

    /// The share of the burst, at least 1: the workers' bursts add up to at
    /// most `limits.burst` (when it is at least the number of workers).
    fn burst(&self) -> u32 {
        ((f64::from(self.limits.burst) * self.share).floor() as u32).max(1)
    }

    fn paused(&self) -> bool {
        self.rate() <= 0.0
    }
}

/// One Region's limiter. Shared by every job task for that Region through
/// `Arc`.
pub struct RateLimiter {
    /// The Region whose quota this limiter guards (the gauge's label).
    region: String,
    /// Jobs of this Region let in by [`Limiters::enter`] and not finished
    /// (claiming, waiting for the rate, calling, backing off).
    entered: Arc<AtomicUsize>,
    /// The budget in force; job tasks and the receive loop watch it for
    /// pauses.
    budget: watch::Sender<Budget>,
    /// The hard cap. Replaced (never mutated) when the budget changes; a task
    /// already waiting on the old one finishes its wait there.
    hard: RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
    /// The adaptive rate and its gate. A std mutex: held for microseconds,
    /// never across an await.
    adaptive: Mutex<Adaptive>,
}

/// A GCRA limiter at `rate` calls per second (fractional rates allowed: a
/// cluster share of 30/s among 4 workers is 7.5/s) with `burst`.
fn gcra(rate: f64, burst: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    if rate.is_nan() || rate <= 0.0 {
        return None;
    }
    let burst = NonZeroU32::new(burst.max(1))?;
    let quota = Quota::with_period(std::time::Duration::from_secs_f64(1.0 / rate))?;
    Some(Arc::new(Gcra::direct(quota.allow_burst(burst))))
}

/// Waits until `limiter` grants one call, on tokio's timer. governor's own
/// `until_ready` sleeps on futures-timer, whose helper thread wakes apart
/// from the runtime's: a second timer thread and a cross-thread wake-up for
/// every call at the cap.
pub(crate) async fn until_ready(limiter: &DefaultDirectRateLimiter) {
    loop {
        match limiter.check() {
            Ok(()) => return,
            Err(not_until) => {
                tokio::time::sleep(not_until.wait_time_from(limiter.clock().now())).await;
            }
        }
    }
}

/// A limiter for a live change: it starts with its burst spent. A fresh
/// GCRA holds a full burst, and calls granted by the limiter it replaces
/// are still in the current one-second window, so a full burst on top could
/// take that window past the cap.
fn gcra_spent(rate: f64, burst: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    let limiter = gcra(rate, burst)?;
    if let Some(n) = NonZeroU32::new(burst.max(1)) {
        // Cannot fail: `n` is the burst the limiter was built with.
        let _ = limiter.check_n(n);
    }
    Some(limiter)
}

impl RateLimiter {
    pub fn new(region: impl Into<String>, limits: Limits) -> Self {
        let region = region.into();
        let budget = Budget { limits, share: 1.0 };
        telemetry::rate_limit(&region, budget.rate());
        Self {
            region,
            entered: Arc::new(AtomicUsize::new(0)),
            budget: watch::Sender::new(budget),
            hard: RwLock::new(gcra(budget.rate(), budget.burst())),
            adaptive: Mutex::new(Adaptive {
                cubic: Cubic::new(budget.rate()),
                gate_rate: None,
                gate: None,
                shown: budget.rate(),
            }),
        }
    }

    /// The operator's limits (not this worker's share of them).
    pub fn limits(&self) -> Limits {
        self.budget.borrow().limits
    }

    /// Paused: `limits.max_rps = 0`, or a cluster share not granted yet.
    pub fn is_paused(&self) -> bool {
        self.budget.borrow().paused()
    }

    /// Applies new limits at once (live reload).
    pub fn set_limits(&self, limits: Limits) {
        let budget = Budget {
            limits,
            ..*self.budget.borrow()
        };
        self.apply(budget);
    }

    /// Applies this worker's share of a cluster budget, 0–1.
    pub fn set_share(&self, share: f64) {
        let budget = Budget {
            share: share.clamp(0.0, 1.0),
            ..*self.budget.borrow()
        };
        if budget != *self.budget.borrow() {
            self.apply(budget);
        }
    }

    fn apply(&self, budget: Budget) {
        if let Ok(mut hard) = self.hard.write() {
            *hard = gcra_spent(budget.rate(), budget.burst());
        }
        self.with_adaptive(|a| a.cubic.set_max(budget.rate(), Instant::now()));
        self.budget.send_replace(budget);
    }

    /// Tells the limiter Cognito answered TooManyRequestsException to a call
    /// that started at `call_started`.
    pub fn on_throttled(&self, call_started: Instant) {
        self.with_adaptive(|a| {
            if a.cubic.throttled(Instant::now(), call_started) {
                tracing::info!(
                    region = %self.region,
                    effective_rps = format!("{:.1}", a.cubic.effective),
                    "throttled by Cognito; slowing down"
                );
            }
        });
    }

    /// Tells the limiter Cognito answered a call without throttling.
    pub fn on_admitted(&self) {
        self.with_adaptive(|a| a.cubic.admitted(Instant::now()));
    }

    /// Updates the gate after recovery or a decrease; returns it.
    fn with_adaptive<R>(&self, f: impl FnOnce(&mut Adaptive) -> R) -> R {
        // A poisoned lock only means another task panicked mid-update; the
        // state is still a valid rate.
        let mut guard = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut guard);
        let now = Instant::now();
        let rate = guard.cubic.rate(now);
        let max = guard.cubic.max;
        let wanted = (rate < max).then(|| rate.floor().max(1.0) as u32);
        if wanted != guard.gate_rate {
            guard.gate_rate = wanted;
            guard.gate = wanted.and_then(|r| gcra(f64::from(r), 1));
        }
        let shown = wanted.map_or(max, f64::from);
        if shown != guard.shown {
            guard.shown = shown;
            telemetry::rate_limit(&self.region, shown);
        }
        out
    }

    /// The effective rate now (for the gauge and tests).
    pub fn effective_rate(&self) -> f64 {
        self.with_adaptive(|a| a.cubic.rate(Instant::now()))
    }

    /// Waits until one more call may start, or returns `Err(Paused)` as soon
    /// as the campaign is paused.
    pub async fn acquire(&self) -> Result<(), Paused> {
        let mut budget = self.budget.subscribe();
        loop {
            if budget.borrow_and_update().paused() {
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
                    until_ready(&gate).await;
                    let current = self.with_adaptive(|a| a.gate.clone());
                    if current.is_some_and(|c| Arc::ptr_eq(&c, &gate)) {
                        break;
                    }
                }
                if let Some(hard) = hard {
                    until_ready(&hard).await;
                }
            };
            tokio::select! {
                _ = wait => return Ok(()),
                // The budget changed while waiting: re-check for a pause,
                // then wait on the new limiters.
                changed = budget.changed() => if changed.is_err() { return Err(Paused) },
            }
        }
    }

    /// Resolves when the campaign is not paused.
    pub async fn wait_unpaused(&self) {
        let mut budget = self.budget.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we
        // borrow `self`.
        let _ = budget.wait_for(|b| !b.paused()).await;
    }
}

/// Every Region's limiter. Cognito's quota belongs to an account and
/// Region, across all its user pools: the pools of one Region draw on one
/// limiter, and a Region throttled (or slowed down) does not slow another.
pub struct Limiters {
    /// By Region name; fixed at start-up (pools and their Regions need a
    /// restart), so no lock.
    by_region: BTreeMap<String, Arc<RateLimiter>>,
}

/// One Region's limits: its `[limits.regions.REGION]`, else `limits.max_rps`
/// and `limits.burst`. `limits.max_rps = 0` pauses every Region.
pub fn limits_for(settings: &LimitSettings, region: &str) -> Limits {
    match settings.regions.get(region) {
        Some(own) if settings.max_rps > 0 => Limits {
            max_rps: own.max_rps,
            burst: own.burst.unwrap_or(settings.burst).min(own.max_rps).max(1),
        },
        _ => Limits::from(settings),
    }
}

/// With several Regions, a Region may hold jobs for this many seconds of
/// its effective rate (waiting for it, calling, backing off); more would
/// wait while holding slots (`limits.concurrency`) the other Regions' jobs
/// could use: head-of-line blocking.
const REGION_HOLD_SECONDS: f64 = 2.0;
/// ...but always at least this many, so a Region slowed to a crawl still
/// has a job waiting when its next call is due.
const REGION_MIN_HELD: usize = 2;
/// A job turned away comes back after about this many times the time its
/// Region needs for the jobs it holds, within [`REGION_BUSY_MIN`] and
/// [`REGION_BUSY_MAX`]: long enough not to come round again and again
/// (every receive counts towards the queue's `maxReceiveCount`).
const REGION_BUSY_FACTOR: f64 = 4.0;
const REGION_BUSY_MIN: Duration = Duration::from_secs(5);
const REGION_BUSY_MAX: Duration = Duration::from_secs(60);

/// How many jobs a Region may hold at once when there are several.
fn region_cap(limiter: &RateLimiter) -> usize {
    let rate = limiter.effective_rate().max(MIN_RATE);
    ((rate * REGION_HOLD_SECONDS).ceil() as usize).max(REGION_MIN_HELD)
}

/// A job's place among its Region's jobs; frees it when dropped.
pub struct Held {
    count: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Limiters::enter`] answers.
pub enum Entry {
    /// Go on, on this limiter; hold the [`Held`] until the job is decided.
    In(Arc<RateLimiter>, Held),
    /// The Region holds enough jobs: defer this one by the duration.
    Busy(Duration),
}

impl Limiters {
    /// A limiter for each of `regions` (one for [`UNKNOWN_REGION`] if
    /// there are none).
    pub fn new(settings: &LimitSettings, regions: impl IntoIterator<Item = String>) -> Self {
        let mut by_region: BTreeMap<String, Arc<RateLimiter>> = regions
            .into_iter()
            .map(|region| {
                let limiter = RateLimiter::new(region.clone(), limits_for(settings, &region));
                (region, Arc::new(limiter))
            })
            .collect();
        if by_region.is_empty() {
            let region = UNKNOWN_REGION.to_owned();
            let limiter = RateLimiter::new(region.clone(), limits_for(settings, &region));
            by_region.insert(region, Arc::new(limiter));
        }
        Self { by_region }
    }

    /// The jobs held by Regions that hold their full share of the slots
    /// (with several Regions; 0 with one).
    pub fn held_by_busy_regions(&self) -> usize {
        if self.by_region.len() < 2 {
            return 0;
        }
        self.by_region
            .values()
            .map(|l| {
                let held = l.entered.load(Ordering::Acquire);
                if held >= region_cap(l) { held } else { 0 }
            })
            .sum()
    }

    /// Lets a job for `region` in, or turns it away while that Region holds
    /// [`REGION_HOLD_SECONDS`] of its effective rate in jobs (with a single
    /// Region nobody else waits for the slots, so every job is let in).
    pub fn enter(&self, region: &str) -> Entry {
        let Some(limiter) = self
            .by_region
            .get(region)
            .or_else(|| self.by_region.values().next())
        else {
            // `new` always builds one; nothing to hold a job back with.
            return Entry::Busy(REGION_BUSY_MIN);
        };
        let before = limiter.entered.fetch_add(1, Ordering::AcqRel);
        let held = Held {
            count: limiter.entered.clone(),
        };
        if self.by_region.len() > 1 {
            let rate = limiter.effective_rate().max(MIN_RATE);
            if before >= region_cap(limiter) {
                drop(held);
                let drain = Duration::from_secs_f64(before as f64 / rate * REGION_BUSY_FACTOR);
                return Entry::Busy(drain.clamp(REGION_BUSY_MIN, REGION_BUSY_MAX));
            }
        }
        Entry::In(limiter.clone(), held)
    }

    /// Applies new limits to every Region at once (live reload).
    pub fn set_limits(&self, settings: &LimitSettings) {
        for (region, limiter) in &self.by_region {
            limiter.set_limits(limits_for(settings, region));
        }
    }

    /// This worker's share of a cluster budget, the same in every Region:
    /// the workers on one ledger divide each Region's budget alike.
    pub fn set_share(&self, share: f64) {
        for limiter in self.by_region.values() {
            limiter.set_share(share);
        }
    }

    /// Paused: every Region pauses together (`limits.max_rps = 0`, or no
    /// cluster share yet), since a Region's own `max_rps` is at least 1.
    pub fn is_paused(&self) -> bool {
        self.by_region.values().all(|l| l.is_paused())
    }

    /// Resolves when the campaign is not paused.
    pub async fn wait_unpaused(&self) {
        if let Some(first) = self.by_region.values().next() {
            first.wait_unpaused().await;
        }
    }

    /// The effective rates of every Region together: how fast this worker
    /// can start calls at most.
    pub fn effective_rate(&self) -> f64 {
        self.by_region.values().map(|l| l.effective_rate()).sum()
    }

    /// Each Region's configured (not effective) rate, for the logs.
    pub fn configured(&self) -> Vec<(&str, Limits)> {
        self.by_region
            .iter()
            .map(|(region, l)| (region.as_str(), l.limits()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, seconds: f64) -> Instant {
        t0 + Duration::from_secs_f64(seconds)
    }

    #[test]
    fn cubic_cuts_once_per_round_trip() {
        let t0 = Instant::now();
        let mut cubic = Cubic::new(100.0);
        assert_eq!(cubic.rate(t0), 100.0);
        assert!(cubic.throttled(t0, t0));
        assert!((cubic.rate(t0) - 85.0).abs() < 1e-9);
        // Answers to calls that were in flight at the cut are the same
        // congestion signal: no second cut.
        let ms = Duration::from_millis;
        assert!(!cubic.throttled(t0 + ms(50), t0 - ms(10)));
        // A call started after the cut and still throttled: cut again,
        // steeply (×0.6) since the last cut was under 500 ms ago, from a
        // mark lowered below the 86.7/s it had climbed back to in those
        // 100 ms (nothing admitted to measure by: fast convergence, ×0.925).
        assert!(cubic.throttled(t0 + ms(100), t0 + ms(60)));
        let steep = cubic.rate(t0 + ms(100));
        assert!((47.0..49.5).contains(&steep), "{steep}");
    }

    #[test]
    fn cubic_returns_to_just_under_the_last_throttle_then_probes_slowly() {
        let t0 = Instant::now();
        // max_rps far above what Cognito allows: the climb is scaled to the
        // rate of the last throttle (30), not to max_rps (1000).
        let mut cubic = Cubic::new(1000.0);
        cubic.last_decrease = Some(t0);
        cubic.throttled(at(t0, 1.0), at(t0, 1.0));
        cubic.w_max = 30.0;
        cubic.origin = 25.5;
        let r = |c: &mut Cubic, s: f64| c.rate(at(t0, 1.0 + s));
        assert!((r(&mut cubic, 0.0) - 25.5).abs() < 1e-9);
        // Concave: most of the way back within the first second...
        assert!(r(&mut cubic, 1.0) > 28.5, "{}", r(&mut cubic, 1.0));
        // ...at the mark after RETURN_SECONDS, and lingering near it...
        assert!((r(&mut cubic, 2.5) - 30.0).abs() < 1e-9);
        assert!(r(&mut cubic, 3.5) < 30.3, "{}", r(&mut cubic, 3.5));
        // ...then probing above it, faster the longer nothing throttles.
        let probe = r(&mut cubic, 5.0);
        assert!((32.0..36.0).contains(&probe), "{probe}");
        // The old AIMD climbed 2 % of max_rps per second: +20/s here.
    }

    #[test]
    fn cubic_fast_convergence_lowers_the_mark_when_the_quota_shrinks() {
        let t0 = Instant::now();
        let mut cubic = Cubic::new(100.0);
        cubic.throttled(t0, t0);
        // Throttled again at 2 s, before reaching the mark of 100: the
        // available rate shrank, so the new mark is below the rate it hurt at.
        let now = at(t0, 2.0);
        let current = cubic.rate(now);
        assert!(current < 100.0);
        cubic.throttled(now, now);
        assert!((cubic.w_max - current * 0.925).abs() < 1e-9);
        // The cut is taken from the lowered mark.
        assert!((cubic.rate(now) - cubic.w_max * 0.85).abs() < 1e-9);
    }

    #[test]
    fn the_mark_is_what_cognito_let_through_so_a_cascade_does_not_drag_it_down() {
        // Sending 30/s where real users leave 20/s: Cognito admits 20 a
        // second, and throttles the rest.
        let t0 = Instant::now();
        let mut cubic = Cubic::new(30.0);
        for i in 0..20 {
            cubic.admitted(at(t0, 0.025 + 0.05 * f64::from(i)));
        }
        cubic.throttled(at(t0, 1.0), at(t0, 1.0));
        assert!((cubic.w_max - 20.0).abs() < 1e-9, "{}", cubic.w_max);
        assert!((cubic.rate(at(t0, 1.0)) - 17.0).abs() < 1e-9);
        // The quota's bucket is still empty: throttled twice more, steeply.
        cubic.throttled(at(t0, 1.1), at(t0, 1.05));
        cubic.throttled(at(t0, 1.2), at(t0, 1.15));
        let low = cubic.rate(at(t0, 1.2));
        assert!(low < 8.0, "{low}");
        // The rate fell; the mark hardly did (the last second still holds
        // 16 of the 20 admitted), so the climb is back near 20 within 2.5 s.
        assert!(cubic.w_max > 15.0, "{}", cubic.w_max);
        assert!(cubic.rate(at(t0, 3.7)) >= cubic.w_max - 1e-9);
    }

    #[test]
    fn a_throttle_before_the_curve_is_back_at_the_mark_never_raises_it() {
        // A cap of 100 against a quota of 25/s whose bucket starts full: the
        // first second admits far more than the quota sustains.
        let t0 = Instant::now();
        let mut cubic = Cubic::new(100.0);
        for i in 0..33 {
            cubic.admitted(at(t0, 0.01 * f64::from(i)));
        }
        cubic.throttled(at(t0, 0.34), at(t0, 0.33));
        assert!((cubic.w_max - 33.0).abs() < 1e-9, "{}", cubic.w_max);
        // More admitted from what the bucket had left: the last second now
        // holds 48, but the throttle comes before the curve is back at 33.
        for i in 0..15 {
            cubic.admitted(at(t0, 0.35 + 0.01 * f64::from(i)));
        }
        cubic.throttled(at(t0, 0.7), at(t0, 0.65));
        assert!((cubic.w_max - 33.0).abs() < 1e-9, "{}", cubic.w_max);
        // Probing above the mark (after RETURN_SECONDS) and throttled at a
        // higher measured rate: the quota grew, the mark follows it.
        for i in 0..40 {
            cubic.admitted(at(t0, 3.5 + 0.02 * f64::from(i)));
        }
        cubic.throttled(at(t0, 4.45), at(t0, 4.4));
        assert!((cubic.w_max - 40.0).abs() < 1e-9, "{}", cubic.w_max);
    }

    #[test]
    fn cubic_never_goes_below_the_floor_or_above_max() {
        let t0 = Instant::now();
        let mut cubic = Cubic::new(3.0);
        for i in 0..40 {
            let now = at(t0, f64::from(i) * 0.2);
            cubic.throttled(now, now);
        }
        assert_eq!(cubic.rate(at(t0, 8.0)), 1.0);
        assert_eq!(cubic.rate(at(t0, 1000.0)), 3.0);
        // Lowering the maximum caps the effective rate at once.
        cubic.set_max(2.0, at(t0, 1000.0));
        assert_eq!(cubic.rate(at(t0, 1000.0)), 2.0);
    }

    fn limit_settings(json: serde_json::Value) -> LimitSettings {
        serde_json::from_value(json).expect("valid limits")
    }

    #[test]
    fn each_region_takes_its_own_limits_and_max_rps_0_pauses_them_all() {
        let settings = limit_settings(serde_json::json!({
            "max_rps": 10, "burst": 4,
            "regions": {
                "eu-west-1": {"max_rps": 20},
                "ap-south-1": {"max_rps": 3, "burst": 2},
            },
        }));
        let l = |region| limits_for(&settings, region);
        assert_eq!(
            l("us-east-1"),
            Limits {
                max_rps: 10,
                burst: 4
            }
        );
        assert_eq!(
            l("eu-west-1"),
            Limits {
                max_rps: 20,
                burst: 4
            }
        );
        assert_eq!(
            l("ap-south-1"),
            Limits {
                max_rps: 3,
                burst: 2
            }
        );
        let mut paused = settings.clone();
        paused.max_rps = 0;
        assert_eq!(limits_for(&paused, "eu-west-1").max_rps, 0);
        let limiters = Limiters::new(&paused, ["eu-west-1".into(), "us-east-1".into()]);
        assert!(limiters.is_paused());
        limiters.set_limits(&settings);
        assert!(!limiters.is_paused());
        assert_eq!(limiters.effective_rate(), 30.0);
    }

    #[test]
    fn a_slow_region_holds_a_few_jobs_and_turns_the_rest_away() {
        let settings = limit_settings(serde_json::json!({
            "max_rps": 100, "burst": 2,
            "regions": {"eu-west-1": {"max_rps": 1, "burst": 1}},
        }));
        let limiters = Limiters::new(&settings, ["eu-west-1".into(), "us-east-1".into()]);
        // eu-west-1 at 1/s holds at most 2 jobs (2 s of its rate).
        let a = limiters.enter("eu-west-1");
        let b = limiters.enter("eu-west-1");
        assert!(matches!(a, Entry::In(..)) && matches!(b, Entry::In(..)));
        // Its two slots free at its pace: the receive loop does not wait
        // for them.
        assert_eq!(limiters.held_by_busy_regions(), 2);
        let Entry::Busy(delay) = limiters.enter("eu-west-1") else {
            panic!("a third job for a 1/s Region is let in");
        };
        // 4 × the 2 s its two jobs take: 8 s, within 5-60 s.
        assert_eq!(delay, Duration::from_secs(8));
        // The other Region is not held back by it: 200 jobs (2 s at 100/s).
        let us: Vec<Entry> = (0..200).map(|_| limiters.enter("us-east-1")).collect();
        assert!(us.iter().all(|e| matches!(e, Entry::In(..))));
        assert!(matches!(limiters.enter("us-east-1"), Entry::Busy(_)));
        assert_eq!(limiters.held_by_busy_regions(), 202);
        // A job that ends makes room.
        drop(a);
        assert_eq!(limiters.held_by_busy_regions(), 200);
        assert!(matches!(limiters.enter("eu-west-1"), Entry::In(..)));
        // A single Region has nobody to make room for: every job goes in.
        let alone = Limiters::new(&settings, ["eu-west-1".into()]);
        let all: Vec<Entry> = (0..50).map(|_| alone.enter("eu-west-1")).collect();
        assert!(all.iter().all(|e| matches!(e, Entry::In(..))));
        assert_eq!(alone.held_by_busy_regions(), 0);
    }

    /// Real clock: governor runs on its own clock, so tokio's paused time
    /// does not apply. Only upper bounds are asserted, and a slow machine
    /// can only make calls later, never earlier, so this cannot flake.
    #[tokio::test]
    async fn hard_cap_holds_over_every_one_second_window() {
        let limiter = RateLimiter::new(
            "test-region-1",
            Limits {
                max_rps: 40,
                burst: 4,
            },
        );
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
        let limiter = RateLimiter::new(
            "test-region-1",
            Limits {
                max_rps: 1000,
                burst: 20,
            },
        );
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
        let limiter = RateLimiter::new(
            "test-region-1",
            Limits {
                max_rps: 50,
                burst: 1,
            },
        );
        limiter.on_throttled(Instant::now());
        let rate = limiter.effective_rate();
        assert!((42.0..=43.0).contains(&rate), "{rate}");
        assert!(limiter.with_adaptive(|a| a.gate.is_some()));
        assert_eq!(limiter.with_adaptive(|a| a.gate_rate), Some(42));
    }

    #[tokio::test]
    async fn pause_releases_waiters_and_resume_unblocks() {
        let limiter = Arc::new(RateLimiter::new(
            "test-region-1",
            Limits {
                max_rps: 1,
                burst: 1,
            },
        ));
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
