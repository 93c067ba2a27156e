//! The campaign ledger: one durable entry per (campaign, username), so no
//! restart, replica or re-run emails anyone twice, and the campaign can be
//! reported user by user.
//!
//! - this file: the states, the claim rules every backend follows, and the
//!   [`Ledger`] handle that times and counts every request;
//! - [`sqlite`]: an embedded file (the default), WAL mode;
//! - [`dynamodb`]: a DynamoDB table shared by every replica;
//! - [`memory`]: this process only (moka, LRU), for tests and throw-away runs.
//!
//! A worker *claims* a user before its call (a conditional write: two
//! workers can never both hold one user), renews the claim's lease with the
//! message heartbeat, and *finishes* it with the final state after the call,
//! before it acts on SQS, so the ledger is never behind the queue.

pub mod dynamodb;
pub mod memory;
pub mod sqlite;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::config::{LedgerBackend, LedgerSettings};
use crate::telemetry;

/// The campaign of a job that names none.
pub const DEFAULT_CAMPAIGN: &str = "default";

/// Entries a report stream buffers ahead of its reader: bounds memory
/// whatever the campaign's size.
const REPORT_BUFFER: usize = 1024;

/// Keys per `sent_among` batch (DynamoDB's BatchGetItem takes 100).
pub const LOOKUP_BATCH: usize = 100;

/// The partition where workers sharing a cluster budget register. No job's
/// campaign can be this: campaign IDs never hold a control character.
pub const MEMBERS: &str = "\u{1}workers";

/// A worker registered in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub worker: String,
    /// When it first registered (its own clock), ms since the epoch.
    pub joined_at_ms: u64,
}

/// A user's state in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// A worker holds the user and is calling (or about to), until its lease
    /// runs out.
    InProgress,
    /// A code was sent (or the reset is confirmed). Never called again.
    Sent,
    /// Nothing to do (user not found, or an uncertain call not repeated).
    Skipped,
    /// The job can never succeed as it stands.
    Rejected,
    /// To be tried again (throttled, code limit, released at shutdown).
    Deferred,
    /// A call whose answer was lost: the email may have gone out.
    Uncertain,
}

impl State {
    pub const ALL: [State; 6] = [
        State::InProgress,
        State::Sent,
        State::Skipped,
        State::Rejected,
        State::Deferred,
        State::Uncertain,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::InProgress => "in_progress",
            State::Sent => "sent",
            State::Skipped => "skipped",
            State::Rejected => "rejected",
            State::Deferred => "deferred",
            State::Uncertain => "uncertain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        State::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user in one campaign.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    pub campaign: &'a str,
    pub username: &'a str,
}

/// A ledger entry, as `report` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub username: String,
    pub state: State,
    pub reason: String,
    /// Cognito calls made for the user over all deliveries.
    pub attempts: u32,
    /// Milliseconds since the Unix epoch. For a `sent` entry: when the reset
    /// was recorded, which [`completion`] compares Cognito's modification
    /// date with.
    pub updated_at_ms: u64,
    /// The user's Cognito `UserStatus` at the last `report --refresh-status`
    /// (or [`NOT_FOUND`]); `None` when never checked.
    pub user_status: Option<String>,
    /// Cognito's `UserLastModifiedDate` at that check, ms since the epoch.
    pub user_modified_at_ms: Option<u64>,
    /// When that check was made, ms since the epoch.
    pub checked_at_ms: Option<u64>,
    /// When a check first found the user done with their reset (by
    /// [`completion`]); it stays, whatever later checks say.
    pub completed_at_ms: Option<u64>,
    /// When the user's sessions were ended (`AdminUserGlobalSignOut`, with
    /// `cognito.sign_out`), ms since the epoch; `None` when they were not.
    pub signed_out_at_ms: Option<u64>,
}

impl Entry {
    /// Where the user stands after the reset, by [`completion`]; `None`
    /// when the entry is not `sent` or was never checked.
    pub fn completion(&self) -> Option<Completion> {
        if self.state != State::Sent {
            return None;
        }
        let status = self.user_status.as_deref()?;
        if self.completed_at_ms.is_some() {
            return Some(Completion::Completed);
        }
        Some(completion(
            status,
            self.user_modified_at_ms,
            self.updated_at_ms,
            false,
        ))
    }

    /// Whether the user is known to have been waiting for a new password
    /// since the reset: a check found them `RESET_REQUIRED` or
    /// `FORCE_CHANGE_PASSWORD`.
    pub fn seen_waiting(&self) -> bool {
        self.state == State::Sent && self.user_status.as_deref().is_some_and(waits_for_password)
    }
}

/// The `user_status` recorded for a user Cognito no longer has
/// (`UserNotFoundException`): not one of Cognito's own statuses.
pub const NOT_FOUND: &str = "NOT_FOUND";

/// Where a `sent` user stands after their reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// They set a new password after the reset.
    Completed,
    /// Not yet (or nothing shows it).
    Pending,
    /// Cognito no longer has the user.
    NotFound,
}

impl Completion {
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Completed => "completed",
            Completion::Pending => "pending",
            Completion::NotFound => "not_found",
        }
    }
}

/// The completion rule, one place for the refresh and the report: has a
/// user whose reset was recorded at `reset_at_ms` set a new password, given
/// their Cognito `user_status` and `UserLastModifiedDate` (`modified_at_ms`)?
/// `waited`: the user is known to have been waiting for a new password
/// since the reset (`AdminResetUserPassword` leaves them `RESET_REQUIRED`,
/// or an earlier check saw them so).
///
/// `RESET_REQUIRED` and `FORCE_CHANGE_PASSWORD` wait for a new password
/// whatever the date. A user who was waiting and no longer is has set one.
/// Otherwise Cognito has no "password changed at" field, so a modification
/// after the reset is the evidence: `forgot_password` leaves a user
/// `CONFIRMED` until they confirm a new password, so `CONFIRMED` alone
/// proves nothing.
pub fn completion(
    user_status: &str,
    modified_at_ms: Option<u64>,
    reset_at_ms: u64,
    waited: bool,
) -> Completion {
    match user_status {
        NOT_FOUND => Completion::NotFound,
        status if waits_for_password(status) => Completion::Pending,
        _ if waited => Completion::Completed,
        _ if modified_at_ms.is_some_and(|m| m > reset_at_ms) => Completion::Completed,
        _ => Completion::Pending,
    }
}

/// The statuses of a user who must set a new password before signing in.
fn waits_for_password(user_status: &str) -> bool {
    matches!(user_status, "RESET_REQUIRED" | "FORCE_CHANGE_PASSWORD")
}

/// What one `AdminGetUser` found, for [`Backend::record_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'a> {
    /// Cognito's `UserStatus`, or [`NOT_FOUND`].
    pub user_status: &'a str,
    /// Cognito's `UserLastModifiedDate`, ms since the epoch.
    pub modified_at_ms: Option<u64>,
    /// When the check was made, ms since the epoch.
    pub checked_at_ms: u64,
    /// The check found the user done ([`completion`]): recorded as
    /// `completed_at` (unless it is already), which later checks keep.
    pub completed: bool,
}

/// Who holds a claim: this worker and a number unique to the claim, so a
/// retried write that had in fact landed is recognised as our own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The user is ours: call. `prior_attempts` are earlier deliveries' calls.
    /// `reset_at_ms`: an earlier delivery's reset went out then (recorded by
    /// [`Ledger::record_reset`]) but its sign-out did not finish, so only
    /// the sign-out is left to do: never a second reset.
    Granted {
        owner: Owner,
        prior_attempts: u32,
        reset_at_ms: Option<u64>,
    },
    /// The user is ours, but an earlier claim ran out in progress (a worker
    /// died mid-call): that call's fate is unknown.
    TakenOver { owner: Owner, prior_attempts: u32 },
    /// A code was already sent to the user in this campaign.
    AlreadySent,
    /// Another task or worker holds the user for this long still.
    Held { remaining: Duration },
}

/// A claim's final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Final<'a> {
    pub state: State,
    pub reason: &'a str,
    pub attempts: u32,
    /// The user's sessions were ended (`AdminUserGlobalSignOut`): the entry
    /// records when.
    pub signed_out: bool,
    /// The user's reset went out in this delivery (or was found done): the
    /// entry keeps when (unless it has it already), so a job that ends
    /// before its sign-out finished comes back to sign out only. Backs up
    /// [`Ledger::record_reset`], which may not have landed.
    pub reset: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Not reachable right now (network, timeout, throttling, 5xx, busy
    /// file): the campaign waits and resumes by itself.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// Misconfigured (access denied, no such table, wrong key schema,
    /// unwritable file): the campaign halts.
    #[error("ledger misconfigured ({code}): {message}")]
    Fatal { code: String, message: String },
    /// The chosen backend cannot do this (the memory ledger outside the
    /// worker process).
    #[error("{0}")]
    Unsupported(String),
}

impl LedgerError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, LedgerError::Fatal { .. })
    }

    pub fn code(&self) -> &str {
        match self {
            LedgerError::Unavailable(_) => "unavailable",
            LedgerError::Fatal { code, .. } => code,
            LedgerError::Unsupported(_) => "unsupported",
        }
    }
}

/// What a backend stores. Every method is one request (or one transaction);
/// the rules of [`decide_claim`] are the same for all.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Claims the user for `owner` until `lease_until_ms`, following
    /// [`decide_claim`] atomically.
    async fn claim(
        &self,
        key: Key<'_>,
        owner: &Owner,
        now_ms: u64,
        lease_until_ms: u64,
        expires_at_s: u64,
    ) -> Result<Claim, LedgerError>;

    /// Extends `owner`'s claim. `false`: it is no longer `owner`'s.
    async fn renew(
        &self,
        key: Key<'_>,
        owner: &Owner,
        lease_until_ms: u64,
    ) -> Result<bool, LedgerError>;

    /// Records that the reset call for a claimed user succeeded, before the
    /// sign-out that follows it, so a retry after a failed sign-out does
    /// only the sign-out. Written whoever holds the entry (an email went
    /// out). `false`: there is no entry.
    async fn record_reset(&self, key: Key<'_>, now_ms: u64) -> Result<bool, LedgerError>;

    /// Writes the final state: if `owner` still holds the claim, or
    /// unconditionally for `sent` (an email went out; the ledger must say
    /// so). `false`: someone else holds it now and nothing was written.
    async fn finish(
        &self,
        key: Key<'_>,
        owner: &Owner,
        done: Final<'_>,
        now_ms: u64,
        expires_at_s: u64,
    ) -> Result<bool, LedgerError>;

    /// Records a `sent` user's Cognito status (`report --refresh-status`).
    /// `false`: the entry is gone or no longer `sent`, and nothing was
    /// written.
    async fn record_status(&self, key: Key<'_>, checked: Checked<'_>) -> Result<bool, LedgerError>;

    /// Which of `usernames` (at most [`LOOKUP_BATCH`]) are `sent` in the campaign.
    async fn sent_among(
        &self,
        campaign: &str,
        usernames: &[String],
        now_s: u64,
    ) -> Result<HashSet<String>, LedgerError>;

    /// Streams the campaign's entries sorted by username into `out`, a page
    /// at a time. Returns when done or when the receiver is dropped.
    async fn entries(
        &self,
        campaign: &str,
        now_s: u64,
        out: mpsc::Sender<Result<Entry, LedgerError>>,
    ) -> Result<(), LedgerError>;

    /// Registers `worker` as alive until `seen_until_ms` (on its first call:
    /// joined at `now_ms`) and returns every member alive at `now_ms`,
    /// itself included.
    async fn heartbeat(
        &self,
        worker: &str,
        now_ms: u64,
        seen_until_ms: u64,
        expires_at_s: u64,
    ) -> Result<Vec<Member>, LedgerError>;

    /// Removes `worker`'s registration (a clean exit), so the others take up
    /// its share at their next heartbeat instead of after the expiry.
    async fn leave(&self, worker: &str) -> Result<(), LedgerError>;

    /// One cheap request that proves the ledger is reachable and set up.
    async fn check(&self) -> Result<(), LedgerError>;

    /// Creates what is missing (table, TTL, schema); says what it did.
    async fn init(&self) -> Result<Vec<String>, LedgerError>;
}

/// What the stored row says, for [`decide_claim`].
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    pub state: State,
    pub owner: Option<&'a str>,
    pub lease_until_ms: u64,
    pub attempts: u32,
    pub expires_at_s: u64,
    /// When an earlier delivery's reset went out, if its sign-out is still
    /// to do.
    pub reset_at_ms: Option<u64>,
}

/// The claim rules, one place for every backend: what a stored row means
/// for a new claim at `now`. `None` for the row means no entry.
///
/// A row whose reset is recorded (`reset_at_ms`) carries it into the grant:
/// the reset is done, only the sign-out is left. Even an expired claim on
/// such a row is a plain grant, not a take-over: the one step whose fate is
/// unknown is the sign-out, and that one is safe to repeat.
pub fn decide_claim(stored: Option<Stored<'_>>, owner: &Owner, now_ms: u64) -> Claim {
    let granted = |prior_attempts, reset_at_ms| Claim::Granted {
        owner: owner.clone(),
        prior_attempts,
        reset_at_ms,
    };
    let Some(row) = stored.filter(|row| row.expires_at_s * 1000 > now_ms) else {
        return granted(0, None);
    };
    match row.state {
        State::Sent => Claim::AlreadySent,
        // Our own claim, landed by a write whose answer was lost.
        State::InProgress if row.owner == Some(owner.as_str()) => {
            granted(row.attempts, row.reset_at_ms)
        }
        State::InProgress if row.lease_until_ms > now_ms => Claim::Held {
            remaining: Duration::from_millis(row.lease_until_ms - now_ms),
        },
        State::InProgress if row.reset_at_ms.is_some() => granted(row.attempts, row.reset_at_ms),
        State::InProgress => Claim::TakenOver {
            owner: owner.clone(),
            prior_attempts: row.attempts,
        },
        State::Skipped | State::Rejected | State::Deferred | State::Uncertain => {
            granted(row.attempts, row.reset_at_ms)
        }
    }
}

/// The ledger as the rest of the crate sees it: a backend, this worker's
/// identity, the retention, and one timer and counter for every request.
#[derive(Clone)]
pub struct Ledger {
    backend: Arc<dyn Backend>,
    kind: LedgerBackend,
    /// `host-pid-random`: tells this worker's claims from other workers'.
    worker_id: Arc<str>,
    /// Numbers this worker's claims.
    claims: Arc<AtomicU64>,
    retention: Duration,
}

impl Ledger {
    /// Opens the configured backend. SQLite creates its file and schema;
    /// DynamoDB makes no request here (`check` and `init` do).
    pub fn open(
        settings: &LedgerSettings,
        dynamodb: impl FnOnce() -> aws_sdk_dynamodb::Client,
    ) -> Result<Self, LedgerError> {
        let backend: Arc<dyn Backend> = match settings.backend {
            LedgerBackend::Sqlite => Arc::new(sqlite::Sqlite::open(&settings.path)?),
            LedgerBackend::Dynamodb => {
                Arc::new(dynamodb::Dynamo::new(dynamodb(), settings.table.clone()))
            }
            LedgerBackend::Memory => Arc::new(memory::Memory::new(settings.max_entries)),
        };
        Ok(Self {
            backend,
            kind: settings.backend,
            worker_id: worker_id().into(),
            claims: Arc::new(AtomicU64::new(0)),
            retention: Duration::from_secs(settings.retention_days * 86_400),
        })
    }

    pub fn kind(&self) -> LedgerBackend {
        self.kind
    }

    /// The memory ledger lives and dies with its process: an operator command
    /// run beside the worker sees nothing of it.
    pub fn outlives_process(&self) -> bool {
        self.kind != LedgerBackend::Memory
    }

    pub async fn claim(&self, key: Key<'_>, lease: Duration) -> Result<Claim, LedgerError> {
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        let owner = Owner(format!("{}#{n}", self.worker_id));
        let now = now_ms();
        let lease_until = now + lease.as_millis() as u64;
        let expires = self.expires_at_s(now);
        let result = timed(
            "claim",
            self.backend.claim(key, &owner, now, lease_until, expires),
        )
        .await;
        if let Ok(claim) = &result {
            telemetry::ledger_claim(match claim {
                Claim::Granted { .. } => "granted",
                Claim::TakenOver { .. } => "taken_over",
                Claim::AlreadySent => "already_sent",
                Claim::Held { .. } => "held",
            });
        }
        result
    }

    pub async fn renew(
        &self,
        key: Key<'_>,
        owner: &Owner,
        lease: Duration,
    ) -> Result<bool, LedgerError> {
        let lease_until = now_ms() + lease.as_millis() as u64;
        timed("renew", self.backend.renew(key, owner, lease_until)).await
    }

    /// Records that the user's reset went out, before the sign-out.
    pub async fn record_reset(&self, key: Key<'_>) -> Result<bool, LedgerError> {
        timed("record_reset", self.backend.record_reset(key, now_ms())).await
    }

    pub async fn finish(
        &self,
        key: Key<'_>,
        owner: &Owner,
        done: Final<'_>,
    ) -> Result<bool, LedgerError> {
        let now = now_ms();
        let expires = self.expires_at_s(now);
        timed(
            "finish",
            self.backend.finish(key, owner, done, now, expires),
        )
        .await
    }

    /// Records what `AdminGetUser` said of a `sent` user; `false` when the
    /// entry is no longer `sent`.
    pub async fn record_status(
        &self,
        key: Key<'_>,
        checked: Checked<'_>,
    ) -> Result<bool, LedgerError> {
        timed("record_status", self.backend.record_status(key, checked)).await
    }

    pub async fn sent_among(
        &self,
        campaign: &str,
        usernames: &[String],
    ) -> Result<HashSet<String>, LedgerError> {
        let mut sent = HashSet::new();
        for chunk in usernames.chunks(LOOKUP_BATCH) {
            let found = timed(
                "lookup",
                self.backend.sent_among(campaign, chunk, now_ms() / 1000),
            )
            .await?;
            sent.extend(found);
        }
        Ok(sent)
    }

    /// The campaign's entries, sorted by username, streamed with bounded
    /// memory: the backend fills the channel a page at a time.
    pub fn entries(&self, campaign: &str) -> mpsc::Receiver<Result<Entry, LedgerError>> {
        let (tx, rx) = mpsc::channel(REPORT_BUFFER);
        let backend = self.backend.clone();
        let campaign = campaign.to_owned();
        tokio::spawn(async move {
            let now_s = now_ms() / 1000;
            if let Err(err) = backend.entries(&campaign, now_s, tx.clone()).await {
                let _ = tx.send(Err(err)).await;
            }
        });
        rx
    }

    pub async fn check(&self) -> Result<(), LedgerError> {
        timed("check", self.backend.check()).await
    }

    /// This worker's identity in claims and in the member list.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Registers this worker as alive for `alive_for`; returns the members
    /// alive now.
    pub async fn heartbeat(&self, alive_for: Duration) -> Result<Vec<Member>, LedgerError> {
        let now = now_ms();
        let until = now + alive_for.as_millis() as u64;
        // The registration outlives its liveness by an hour, then TTL drops it.
        let expires = until / 1000 + 3600;
        timed(
            "heartbeat",
            self.backend.heartbeat(&self.worker_id, now, until, expires),
        )
        .await
    }

    pub async fn leave(&self) -> Result<(), LedgerError> {
        timed("leave", self.backend.leave(&self.worker_id)).await
    }

    pub async fn init(&self) -> Result<Vec<String>, LedgerError> {
        self.backend.init().await
    }

    fn expires_at_s(&self, now_ms: u64) -> u64 {
        (now_ms / 1000) + self.retention.as_secs()
    }
}

/// Times and counts one ledger request.
async fn timed<T>(
    operation: &'static str,
    request: impl Future<Output = Result<T, LedgerError>>,
) -> Result<T, LedgerError> {
    let started = Instant::now();
    let result = request.await;
    telemetry::ledger_request(
        operation,
        match &result {
            Ok(_) => "ok",
            Err(err) if err.is_fatal() => "fatal",
            Err(_) => "error",
        },
        started.elapsed(),
    );
    result
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `host-pid-random`, for telling claims apart; never a secret.
fn worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// RFC 3339 UTC with seconds, for the report.
pub fn rfc3339(ms: u64) -> String {
    // Whole seconds: the report's column is second-precise.
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: State, owner: &str, lease_until_ms: u64) -> Stored<'_> {
        Stored {
            state,
            owner: Some(owner),
            lease_until_ms,
            attempts: 2,
            expires_at_s: 10_000,
            reset_at_ms: None,
        }
    }

    #[test]
    fn the_claim_rules() {
        let me = Owner("w1#1".into());
        let now = 1_000_000;
        assert_eq!(
            decide_claim(None, &me, now),
            Claim::Granted {
                owner: me.clone(),
                prior_attempts: 0,
                reset_at_ms: None,
            }
        );
        assert_eq!(
            decide_claim(Some(row(State::Sent, "w2#1", 0)), &me, now),
            Claim::AlreadySent
        );
        assert_eq!(
            decide_claim(Some(row(State::InProgress, "w2#1", now + 5000)), &me, now),
            Claim::Held {
                remaining: Duration::from_secs(5)
            }
        );
        assert_eq!(
            decide_claim(Some(row(State::InProgress, "w2#1", now - 1)), &me, now),
            Claim::TakenOver {
                owner: me.clone(),
                prior_attempts: 2
            }
        );
        // A retried claim that had landed is ours, not someone else's.
        assert!(matches!(
            decide_claim(Some(row(State::InProgress, "w1#1", now + 5000)), &me, now),
            Claim::Granted { .. }
        ));
        for again in [
            State::Skipped,
            State::Rejected,
            State::Deferred,
            State::Uncertain,
        ] {
            assert_eq!(
                decide_claim(Some(row(again, "w2#1", 0)), &me, now),
                Claim::Granted {
                    owner: me.clone(),
                    prior_attempts: 2,
                    reset_at_ms: None,
                },
                "{again}"
            );
        }
        // The reset went out but the sign-out did not finish: the grant
        // says so, so only the sign-out is done again; an expired claim on
        // it is not uncertain.
        let reset_at_ms = Some(now - 60_000);
        for (state, lease) in [
            (State::Deferred, 0),
            (State::InProgress, now - 1),
            (State::Rejected, 0),
        ] {
            let mut signing_out = row(state, "w2#1", lease);
            signing_out.reset_at_ms = reset_at_ms;
            assert_eq!(
                decide_claim(Some(signing_out), &me, now),
                Claim::Granted {
                    owner: me.clone(),
                    prior_attempts: 2,
                    reset_at_ms,
                },
                "{state}"
            );
        }
        // ... held while another worker's lease runs, like any claim.
        let mut held = row(State::InProgress, "w2#1", now + 5000);
        held.reset_at_ms = reset_at_ms;
        assert!(matches!(
            decide_claim(Some(held), &me, now),
            Claim::Held { .. }
        ));
        // ... and forgotten with the entry past its retention.
        let mut old = row(State::Deferred, "w2#1", 0);
        old.reset_at_ms = reset_at_ms;
        old.expires_at_s = now / 1000 - 1;
        assert!(matches!(
            decide_claim(Some(old), &me, now),
            Claim::Granted {
                reset_at_ms: None,
                ..
            }
        ));
        // Past its retention an entry counts as none, even `sent`.
        let mut old = row(State::Sent, "w2#1", 0);
        old.expires_at_s = now / 1000 - 1;
        assert!(matches!(
            decide_claim(Some(old), &me, now),
            Claim::Granted {
                prior_attempts: 0,
                ..
            }
        ));
    }

    #[test]
    fn the_completion_rule() {
        let reset = 1_000_000;
        // Reset by AdminResetUserPassword: waiting for a new password,
        // whatever the date says.
        assert_eq!(
            completion("RESET_REQUIRED", Some(reset + 5000), reset, false),
            Completion::Pending
        );
        assert_eq!(
            completion("FORCE_CHANGE_PASSWORD", Some(reset + 5000), reset, false),
            Completion::Pending
        );
        // A new password set after the reset.
        assert_eq!(
            completion("CONFIRMED", Some(reset + 1), reset, false),
            Completion::Completed
        );
        // ForgotPassword leaves the user CONFIRMED: not modified since the
        // reset (or at its very moment) is not done.
        assert_eq!(
            completion("CONFIRMED", Some(reset - 1), reset, false),
            Completion::Pending
        );
        assert_eq!(
            completion("CONFIRMED", Some(reset), reset, false),
            Completion::Pending
        );
        assert_eq!(
            completion("CONFIRMED", None, reset, false),
            Completion::Pending
        );
        // Any other status modified after the reset counts as done; not
        // modified, as pending.
        assert_eq!(
            completion("EXTERNAL_PROVIDER", Some(reset + 1), reset, false),
            Completion::Completed
        );
        assert_eq!(
            completion("UNCONFIRMED", Some(reset - 1), reset, false),
            Completion::Pending
        );
        // Known to have waited for a new password (AdminResetUserPassword,
        // or an earlier check): no longer waiting is done, whatever the date
        // says (Cognito may not move it for a new password).
        assert_eq!(
            completion("CONFIRMED", Some(reset - 1), reset, true),
            Completion::Completed
        );
        assert_eq!(
            completion("CONFIRMED", None, reset, true),
            Completion::Completed
        );
        assert_eq!(
            completion("RESET_REQUIRED", Some(reset + 1), reset, true),
            Completion::Pending
        );
        assert_eq!(
            completion(NOT_FOUND, None, reset, true),
            Completion::NotFound
        );
        // Gone from the pool: a bucket of its own, whatever the dates.
        assert_eq!(
            completion(NOT_FOUND, None, reset, false),
            Completion::NotFound
        );
        assert_eq!(
            completion(NOT_FOUND, Some(reset + 1), reset, false),
            Completion::NotFound
        );
    }

    #[test]
    fn only_checked_sent_entries_have_a_completion() {
        let mut entry = Entry {
            username: "u".into(),
            state: State::Sent,
            reason: "ok".into(),
            attempts: 1,
            updated_at_ms: 1000,
            user_status: None,
            user_modified_at_ms: None,
            checked_at_ms: None,
            completed_at_ms: None,
            signed_out_at_ms: None,
        };
        assert_eq!(entry.completion(), None);
        entry.user_status = Some("CONFIRMED".into());
        entry.user_modified_at_ms = Some(2000);
        assert_eq!(entry.completion(), Some(Completion::Completed));
        // A completion once found stays, whatever a later check read.
        entry.user_status = Some("RESET_REQUIRED".into());
        assert_eq!(entry.completion(), Some(Completion::Pending));
        assert!(entry.seen_waiting());
        entry.completed_at_ms = Some(3000);
        assert_eq!(entry.completion(), Some(Completion::Completed));
        entry.state = State::Skipped;
        assert_eq!(entry.completion(), None);
        assert!(!entry.seen_waiting());
    }

    #[test]
    fn rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_700_000_123), "2025-12-02T18:26:40Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
