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
//! still processed. While a claim is in progress, a concurrent duplicate is
//! skipped: the claiming message is never deleted without an outcome, so the
//! user is not lost.

use std::time::Duration;

use moka::sync::Cache;

use crate::config::DedupSettings;
use crate::job::{ResetJob, UserHasher};

pub type PairKey = [u8; 16];

pub struct Dedup {
    /// `None` when the window is 0 (suppression off).
    seen: Option<Cache<PairKey, ()>>,
    hasher: UserHasher,
}

impl Dedup {
    pub fn new(settings: &DedupSettings, hasher: UserHasher) -> Self {
        let seen = (settings.window_seconds > 0).then(|| {
            Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(Duration::from_secs(settings.window_seconds))
                .build()
        });
        Self { seen, hasher }
    }

    /// Claims the job's pair. `None`: the pair was sent (or is being sent)
    /// already. `Some(key)`: go ahead; pass the key to [`Dedup::forget`] if
    /// the job ends in anything but `sent`.
    pub fn claim(&self, job: &ResetJob) -> Option<Option<PairKey>> {
        let Some(seen) = &self.seen else {
            return Some(None);
        };
        let key = self
            .hasher
            .pair_key(job.campaign_id.as_deref().unwrap_or(""), &job.username);
        let entry = seen.entry(key).or_insert(());
        entry.is_fresh().then_some(Some(key))
    }

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

    fn dedup(window: u64) -> Dedup {
        Dedup::new(
            &DedupSettings {
                window_seconds: window,
                max_entries: 1000,
            },
            UserHasher::new(Some(SecretString::from("k"))),
        )
    }

    fn job(body: &str) -> ResetJob {
        ResetJob::parse(body).unwrap()
    }

    #[test]
    fn second_claim_of_a_pair_is_a_duplicate_until_forgotten() {
        let d = dedup(3600);
        let a = job(r#"{"username":"a@example.com","campaign_id":"c1"}"#);
        let key = d.claim(&a).expect("first claim");
        assert!(d.claim(&a).is_none(), "duplicate");
        // Same user, other campaign: not a duplicate.
        let other = job(r#"{"username":"a@example.com","campaign_id":"c2"}"#);
        assert!(d.claim(&other).is_some());
        // A failed attempt forgets its claim, so a later delivery proceeds.
        d.forget(key);
        assert!(d.claim(&a).is_some());
    }

    #[test]
    fn window_zero_turns_suppression_off() {
        let d = dedup(0);
        let a = job(r#"{"username":"a@example.com"}"#);
        assert_eq!(d.claim(&a), Some(None));
        assert_eq!(d.claim(&a), Some(None));
    }
}
