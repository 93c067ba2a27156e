//! Duplicate suppression within one process.
//!
//! SQS delivers at least once, and every duplicate is a second email to a
//! real person. A (campaign, username) pair that this process sent within
//! `dedup.window_seconds` is skipped (reason `duplicate`) and its message
//! deleted. Pairs are remembered as 16-byte keyed hashes, never as
//! usernames, in a bounded TTL cache (`moka`).
//!
//! A pair is claimed before its call and forgotten again unless the call
//! succeeded, so a second message for a user whose first attempt failed is
//! still processed. While a claim is in progress, a concurrent copy is
//! deferred (reason `claimed_elsewhere`), never deleted: it may be the very
//! message the claiming task holds, and that task may still end deferred or
//! released. Only a pair already *sent* is skipped.

use std::time::Duration;

use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::config::DedupSettings;
use crate::job::{ResetJob, UserHasher};

pub type PairKey = [u8; 16];

/// What this process knows of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A task holds the claim and is calling (or about to).
    InProgress,
    /// A code was sent within the window.
    Sent,
}

/// The answer to [`Dedup::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Go ahead; pass the key to [`Dedup::sent`] or [`Dedup::forget`].
    /// `None` when suppression is off.
    Granted(Option<PairKey>),
    /// A code was sent for the pair within the window: skip and delete.
    Sent,
    /// Another task holds the claim right now. Its message may be this very
    /// message (an SQS duplicate), whose fate is not known yet: never delete,
    /// defer.
    InProgress,
}

pub struct Dedup {
    /// `None` when the window is 0 (suppression off). Least recently used
    /// pairs go first when full: redeliveries come within minutes, so the
    /// recent sends are the ones worth remembering (moka's default TinyLFU
    /// would refuse most new entries once full).
    seen: Option<Cache<PairKey, State>>,
    hasher: UserHasher,
}

impl Dedup {
    pub fn new(settings: &DedupSettings, hasher: UserHasher) -> Self {
        let seen = (settings.window_seconds > 0).then(|| {
            Cache::builder()
                .max_capacity(settings.max_entries)
                .eviction_policy(EvictionPolicy::lru())
                .time_to_live(Duration::from_secs(settings.window_seconds))
                .build()
        });
        Self { seen, hasher }
    }

    /// Claims the job's pair for a call.
    pub fn claim(&self, job: &ResetJob) -> Claim {
        let Some(seen) = &self.seen else {
            return Claim::Granted(None);
        };
        let key = self
            .hasher
            .pair_key(job.campaign_id.as_deref().unwrap_or(""), &job.username);
        let entry = seen.entry(key).or_insert(State::InProgress);
        if entry.is_fresh() {
            return Claim::Granted(Some(key));
        }
        match entry.into_value() {
            State::Sent => Claim::Sent,
            State::InProgress => Claim::InProgress,
        }
    }

    /// The claimed call succeeded: remember the pair as sent.
    pub fn sent(&self, key: Option<PairKey>) {
        if let (Some(seen), Some(key)) = (&self.seen, key) {
            seen.insert(key, State::Sent);
        }
    }

    /// The claimed job ended in anything but `sent`: a later delivery of the
    /// pair may go ahead.
    pub fn forget(&self, key: Option<PairKey>) {
        if let (Some(seen), Some(key)) = (&self.seen, key) {
            seen.invalidate(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn dedup(window: u64, max_entries: u64) -> Dedup {
        Dedup::new(
            &DedupSettings {
                window_seconds: window,
                max_entries,
            },
            UserHasher::new(Some(SecretString::from("k"))),
        )
    }

    fn job(body: &str) -> ResetJob {
        ResetJob::parse(body).unwrap()
    }

    #[test]
    fn a_claim_in_progress_is_not_a_sent_pair() {
        let d = dedup(3600, 1000);
        let a = job(r#"{"username":"a@example.com","campaign_id":"c1"}"#);
        let Claim::Granted(key) = d.claim(&a) else {
            panic!("first claim")
        };
        // While the first task calls, a copy must not be skipped (and
        // deleted): its fate is not known yet (hardening #1).
        assert_eq!(d.claim(&a), Claim::InProgress);
        d.sent(key);
        assert_eq!(d.claim(&a), Claim::Sent);
        // Same user, other campaign: not a duplicate.
        let other = job(r#"{"username":"a@example.com","campaign_id":"c2"}"#);
        assert!(matches!(d.claim(&other), Claim::Granted(Some(_))));
        // A failed attempt forgets its claim, so a later delivery proceeds.
        let Claim::Granted(key) = d.claim(&job(r#"{"username":"b"}"#)) else {
            panic!("claim b")
        };
        d.forget(key);
        assert!(matches!(
            d.claim(&job(r#"{"username":"b"}"#)),
            Claim::Granted(Some(_))
        ));
    }

    #[test]
    fn when_full_the_most_recent_sends_are_remembered() {
        // Hardening #4: with moka's default TinyLFU, a full cache refuses
        // most new entries, so the latest sends (the ones redeliveries hit)
        // were forgotten.
        let d = dedup(3600, 1000);
        let jobs: Vec<ResetJob> = (0..3000)
            .map(|i| job(&format!(r#"{{"username":"user{i}@example.com"}}"#)))
            .collect();
        for j in &jobs {
            let Claim::Granted(key) = d.claim(j) else {
                panic!("fresh pair")
            };
            d.sent(key);
        }
        if let Some(seen) = &d.seen {
            seen.run_pending_tasks();
        }
        let remembered = jobs[2500..]
            .iter()
            .filter(|j| d.claim(j) == Claim::Sent)
            .count();
        assert_eq!(remembered, 500, "the last 500 sends must all be remembered");
    }

    #[test]
    fn window_zero_turns_suppression_off() {
        let d = dedup(0, 1000);
        let a = job(r#"{"username":"a@example.com"}"#);
        assert_eq!(d.claim(&a), Claim::Granted(None));
        assert_eq!(d.claim(&a), Claim::Granted(None));
    }
}
