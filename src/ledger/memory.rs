//! The process-only ledger: the in-process cache the worker had before the
//! durable ledger (moka, least recently used first out). It follows the same
//! claim rules, but forgets everything on exit and is not shared: a restart,
//! a second replica or a re-run can email users a second time. For tests
//! and throw-away runs.

use std::collections::HashSet;

use async_trait::async_trait;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use tokio::sync::mpsc;

use super::{
    Backend, Checked, Claim, Entry, Final, Key, LedgerError, Member, Owner, State, Stored,
    decide_claim,
};

#[derive(Debug, Clone)]
struct Row {
    state: State,
    reason: String,
    owner: Option<String>,
    lease_until_ms: u64,
    attempts: u32,
    updated_at_ms: u64,
    expires_at_s: u64,
    /// What `report --refresh-status` found; the memory ledger is never
    /// reported outside its process, but it keeps the same fields.
    user_status: Option<String>,
    user_modified_at_ms: Option<u64>,
    checked_at_ms: Option<u64>,
    completed_at_ms: Option<u64>,
    /// When the reset went out, while its sign-out is still to do.
    reset_at_ms: Option<u64>,
    signed_out_at_ms: Option<u64>,
}

pub struct Memory {
    /// (campaign, username) → entry. Least recently used go first when full:
    /// redeliveries come within minutes, so the recent users are the ones
    /// worth remembering (moka's default TinyLFU would refuse most new
    /// entries once full).
    rows: Cache<(String, String), Row>,
}

impl Memory {
    pub fn new(max_entries: u64) -> Self {
        Self {
            rows: Cache::builder()
                .max_capacity(max_entries)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }
}

fn id(key: Key<'_>) -> (String, String) {
    (key.campaign.to_owned(), key.username.to_owned())
}

#[async_trait]
impl Backend for Memory {
    async fn claim(
        &self,
        key: Key<'_>,
        owner: &Owner,
        now_ms: u64,
        lease_until_ms: u64,
        expires_at_s: u64,
    ) -> Result<Claim, LedgerError> {
        let mut answer = None;
        // One atomic read-decide-write per key.
        self.rows.entry(id(key)).and_compute_with(|current| {
            let current = current.map(|e| e.into_value());
            let stored = current.as_ref().map(|row| Stored {
                state: row.state,
                owner: row.owner.as_deref(),
                lease_until_ms: row.lease_until_ms,
                attempts: row.attempts,
                expires_at_s: row.expires_at_s,
                reset_at_ms: row.reset_at_ms,
            });
            let claim = decide_claim(stored, owner, now_ms);
            let op = match &claim {
                Claim::Granted { prior_attempts, .. } | Claim::TakenOver { prior_attempts, .. } => {
                    let reset_at_ms = match &claim {
                        Claim::Granted { reset_at_ms, .. } => *reset_at_ms,
                        _ => None,
                    };
                    Op::Put(Row {
                        state: State::InProgress,
                        reason: String::new(),
                        owner: Some(owner.as_str().to_owned()),
                        lease_until_ms,
                        attempts: *prior_attempts,
                        updated_at_ms: now_ms,
                        expires_at_s,
                        user_status: None,
                        user_modified_at_ms: None,
                        checked_at_ms: None,
                        completed_at_ms: None,
                        reset_at_ms,
                        signed_out_at_ms: None,
                    })
                }
                Claim::AlreadySent | Claim::Held { .. } => Op::Nop,
            };
            answer = Some(claim);
            op
        });
        answer.ok_or_else(|| LedgerError::Unavailable("claim not computed".into()))
    }

    async fn renew(
        &self,
        key: Key<'_>,
        owner: &Owner,
        lease_until_ms: u64,
    ) -> Result<bool, LedgerError> {
        let mut renewed = false;
        self.rows
            .entry(id(key))
            .and_compute_with(|current| match current {
                Some(e)
                    if e.value().state == State::InProgress
                        && e.value().owner.as_deref() == Some(owner.as_str()) =>
                {
                    renewed = true;
                    let mut row = e.into_value();
                    row.lease_until_ms = lease_until_ms;
                    Op::Put(row)
                }
                _ => Op::Nop,
            });
        Ok(renewed)
    }

    async fn finish(
        &self,
        key: Key<'_>,
        owner: &Owner,
        done: Final<'_>,
        now_ms: u64,
        expires_at_s: u64,
    ) -> Result<bool, LedgerError> {
        let mut written = false;
        self.rows.entry(id(key)).and_compute_with(|current| {
            let ours = current
                .as_ref()
                .is_none_or(|e| e.value().owner.as_deref() == Some(owner.as_str()));
            if !(ours || done.state == State::Sent) {
                return Op::Nop;
            }
            written = true;
            let reset_at_ms = current
                .as_ref()
                .and_then(|e| e.value().reset_at_ms)
                .or(done.reset.then_some(now_ms));
            Op::Put(Row {
                state: done.state,
                reason: done.reason.to_owned(),
                owner: Some(owner.as_str().to_owned()),
                lease_until_ms: 0,
                attempts: done.attempts,
                updated_at_ms: now_ms,
                expires_at_s,
                user_status: None,
                user_modified_at_ms: None,
                checked_at_ms: None,
                completed_at_ms: None,
                reset_at_ms,
                signed_out_at_ms: done.signed_out.then_some(now_ms),
            })
        });
        Ok(written)
    }

    async fn record_reset(&self, key: Key<'_>, now_ms: u64) -> Result<bool, LedgerError> {
        let mut written = false;
        self.rows
            .entry(id(key))
            .and_compute_with(|current| match current {
                Some(e) => {
                    written = true;
                    let mut row = e.into_value();
                    row.reset_at_ms = Some(now_ms);
                    Op::Put(row)
                }
                None => Op::Nop,
            });
        Ok(written)
    }

    async fn record_status(&self, key: Key<'_>, checked: Checked<'_>) -> Result<bool, LedgerError> {
        let mut written = false;
        self.rows
            .entry(id(key))
            .and_compute_with(|current| match current {
                Some(e) if e.value().state == State::Sent => {
                    written = true;
                    let mut row = e.into_value();
                    row.user_status = Some(checked.user_status.to_owned());
                    row.user_modified_at_ms = checked.modified_at_ms;
                    row.checked_at_ms = Some(checked.checked_at_ms);
                    if checked.completed && row.completed_at_ms.is_none() {
                        row.completed_at_ms = Some(checked.checked_at_ms);
                    }
                    Op::Put(row)
                }
                _ => Op::Nop,
            });
        Ok(written)
    }

    async fn sent_among(
        &self,
        campaign: &str,
        usernames: &[String],
        now_s: u64,
    ) -> Result<HashSet<String>, LedgerError> {
        Ok(usernames
            .iter()
            .filter(|u| {
                self.rows
                    .get(&(campaign.to_owned(), (*u).clone()))
                    .is_some_and(|row| row.state == State::Sent && row.expires_at_s > now_s)
            })
            .cloned()
            .collect())
    }

    async fn entries(
        &self,
        campaign: &str,
        now_s: u64,
        out: mpsc::Sender<Result<Entry, LedgerError>>,
    ) -> Result<(), LedgerError> {
        // Bounded by `ledger.max_entries` already; sorted like the others.
        let mut rows: Vec<Entry> = self
            .rows
            .iter()
            .filter(|(k, row)| k.0 == campaign && row.expires_at_s > now_s)
            .map(|(k, row)| Entry {
                username: k.1.clone(),
                state: row.state,
                reason: row.reason.clone(),
                attempts: row.attempts,
                updated_at_ms: row.updated_at_ms,
                user_status: row.user_status.clone(),
                user_modified_at_ms: row.user_modified_at_ms,
                checked_at_ms: row.checked_at_ms,
                completed_at_ms: row.completed_at_ms,
                signed_out_at_ms: row.signed_out_at_ms,
            })
            .collect();
        rows.sort_by(|a, b| a.username.cmp(&b.username));
        for entry in rows {
            if out.send(Ok(entry)).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// The memory ledger is this process's alone: its only member is itself.
    async fn heartbeat(
        &self,
        worker: &str,
        now_ms: u64,
        _seen_until_ms: u64,
        _expires_at_s: u64,
    ) -> Result<Vec<Member>, LedgerError> {
        Ok(vec![Member {
            worker: worker.to_owned(),
            joined_at_ms: now_ms,
        }])
    }

    async fn leave(&self, _worker: &str) -> Result<(), LedgerError> {
        Ok(())
    }

    async fn check(&self) -> Result<(), LedgerError> {
        Ok(())
    }

    async fn init(&self) -> Result<Vec<String>, LedgerError> {
        Ok(vec![
            "memory ledger: nothing to create; it lives and dies with the worker process".into(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::now_ms;

    #[tokio::test]
    async fn when_full_the_most_recent_users_are_remembered() {
        let m = Memory::new(1000);
        let now = now_ms();
        let exp = now / 1000 + 3600;
        let w = Owner("w#1".into());
        let users: Vec<String> = (0..3000).map(|i| format!("user{i}@example.com")).collect();
        for u in &users {
            let key = Key {
                campaign: "c",
                username: u,
            };
            assert!(matches!(
                m.claim(key, &w, now, now + 1000, exp).await.unwrap(),
                Claim::Granted { .. }
            ));
            let sent = Final {
                state: State::Sent,
                reason: "ok",
                attempts: 1,
                signed_out: false,
                reset: true,
            };
            m.finish(key, &w, sent, now, exp).await.unwrap();
        }
        m.rows.run_pending_tasks();
        let remembered = m.sent_among("c", &users[2500..], now / 1000).await.unwrap();
        assert_eq!(
            remembered.len(),
            500,
            "the last 500 users must all be remembered"
        );
    }
}
