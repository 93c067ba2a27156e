//! `reset-worker ledger init` and `reset-worker report`: set the ledger up,
//! and write the campaign's audit artefact, one row per user.
//!
//! The report streams: entries come from the ledger a page at a time
//! through a bounded channel and go straight to the writer, so a campaign of
//! a million users needs no more memory than one of a hundred.
//!
//! With `--refresh-status` a first pass, streamed the same way, reads each
//! pending `sent` user's Cognito status (one paced `AdminGetUser`) and
//! records it in the ledger at once, so an interrupted pass keeps what it
//! read and a re-run asks only about users still pending.

use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use governor::{Quota, RateLimiter};
use serde::Serialize;

use super::paced::{ReadError, paced};
use crate::aws::cognito::{self, CallError, Cognito, Pools};
use crate::config::{Action, DEFAULT_POOL, Settings};
use crate::ledger::{
    Checked, Completion, Entry, Key, Ledger, LedgerError, NOT_FOUND, State, completion, dynamodb,
    now_ms, rfc3339,
};

/// The refresh logs its progress at least this often...
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// ...or every this many users checked.
const PROGRESS_USERS: u64 = 1000;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The campaign to report (a job without `campaign_id` is in `default`).
    #[arg(long)]
    pub campaign: String,
    /// Row format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Write here instead of stdout (the summary always goes to stderr).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// First read the Cognito status of every `sent` user still pending
    /// (one AdminGetUser each, recorded in the ledger), then report with the
    /// extra columns `user_status,checked_at,completion`.
    #[arg(long)]
    pub refresh_status: bool,
    /// With --refresh-status: AdminGetUser calls per second, 1-50.
    #[arg(
        long,
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=50),
        requires = "refresh_status"
    )]
    pub status_rps: u32,
    /// With --refresh-status: the configured pool whose users these are
    /// (its `user_pool_id`, Region and endpoint); default `default`.
    #[arg(long, requires = "refresh_status")]
    pub pool: Option<String>,
}

impl ReportArgs {
    /// The pool `--refresh-status` reads (`--pool`, else `default`).
    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or(DEFAULT_POOL)
    }
}

/// Why `--refresh-status` stopped. What it recorded before stays recorded.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The setup is wrong (IAM, pool ID, credentials): no user can be read.
    #[error(
        "refresh halted: AdminGetUser answered {}{} - check the pool's `user_pool_id`, its \
         Region, the credentials and `cognito-idp:AdminGetUser` in the IAM policy; the \
         statuses read before this are kept in the ledger",
        .0.code.as_str(),
        .0.server_message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Misconfigured(CallError),
    /// One user could not be read after retries (throttling that does not
    /// let up, an outage, an unexpected error).
    #[error(
        "refresh stopped: AdminGetUser failed with {0} after retries; the statuses read \
         before this are kept in the ledger, and a re-run resumes with the users still pending"
    )]
    Failed(CallError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl RefreshError {
    /// A misconfiguration: the command exits as halted.
    pub fn is_fatal(&self) -> bool {
        match self {
            RefreshError::Misconfigured(_) => true,
            RefreshError::Failed(_) => false,
            RefreshError::Ledger(e) => e.is_fatal(),
        }
    }
}

/// What the refresh pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// Users read with AdminGetUser.
    pub checked: u64,
    /// `sent` users not read: already completed or not found.
    pub skipped: u64,
}

/// One report row. Columns in this order:
/// `username,state,reason,attempts,updated_at,signed_out_at`.
#[derive(Debug, Serialize)]
struct Row<'a> {
    username: &'a str,
    state: &'static str,
    reason: &'a str,
    attempts: u32,
    /// RFC 3339, UTC.
    updated_at: String,
    /// When the user's sessions were ended (`cognito.sign_out`); RFC 3339,
    /// UTC; empty when they were not.
    signed_out_at: String,
}

/// What `--refresh-status` adds after [`Row`]'s columns:
/// `user_status,checked_at,completion` (empty when never checked).
#[derive(Debug, Serialize)]
struct Status<'a> {
    /// Cognito's `UserStatus` at the last check, or `NOT_FOUND`.
    user_status: &'a str,
    /// RFC 3339, UTC.
    checked_at: String,
    /// `completed`, `pending` or `not_found` (checked `sent` users only).
    completion: &'static str,
}

impl<'a> From<&'a Entry> for Status<'a> {
    fn from(e: &'a Entry) -> Self {
        Status {
            user_status: e.user_status.as_deref().unwrap_or_default(),
            checked_at: e.checked_at_ms.map(rfc3339).unwrap_or_default(),
            completion: e.completion().map(Completion::as_str).unwrap_or_default(),
        }
    }
}

/// A JSONL line with `--refresh-status`: one object with both parts. (A
/// CSV record is the tuple `(Row, Status)`: the csv crate writes a tuple's
/// structs one after the other, and cannot write a flattened struct.)
#[derive(Debug, Serialize)]
struct StatusLine<'a> {
    #[serde(flatten)]
    row: Row<'a>,
    #[serde(flatten)]
    status: Status<'a>,
}

/// The CSV header without `--refresh-status`.
const HEADER: [&str; 6] = [
    "username",
    "state",
    "reason",
    "attempts",
    "updated_at",
    "signed_out_at",
];
/// The CSV header with `--refresh-status`.
const STATUS_HEADER: [&str; 9] = [
    "username",
    "state",
    "reason",
    "attempts",
    "updated_at",
    "signed_out_at",
    "user_status",
    "checked_at",
    "completion",
];

impl<'a> From<&'a Entry> for Row<'a> {
    fn from(e: &'a Entry) -> Self {
        Row {
            username: &e.username,
            state: e.state.as_str(),
            reason: &e.reason,
            attempts: e.attempts,
            updated_at: rfc3339(e.updated_at_ms),
            signed_out_at: e.signed_out_at_ms.map(rfc3339).unwrap_or_default(),
        }
    }
}

/// Users per state, in the states' order.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts(pub BTreeMap<&'static str, u64>);

impl Counts {
    fn add(&mut self, state: State) {
        *self.0.entry(state.as_str()).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, state: State) -> u64 {
        self.0.get(state.as_str()).copied().unwrap_or(0)
    }

    /// `sent 290, skipped 3, …` in the states' order; states with no user left out.
    pub fn line(&self) -> String {
        let parts: Vec<String> = State::ALL
            .iter()
            .filter_map(|s| {
                self.0
                    .get(s.as_str())
                    .map(|n| format!("{} {n}", s.as_str()))
            })
            .collect();
        if parts.is_empty() {
            "no users".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The `sent` users by completion, from the ledger's recorded checks.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct CompletionCounts {
    /// Set a new password after the reset.
    pub completed: u64,
    /// Not yet, or never checked.
    pub pending: u64,
    /// Cognito no longer has the user.
    pub not_found: u64,
    /// `sent` users with a recorded check.
    pub checked: u64,
    /// `sent` users whose sessions were ended (`cognito.sign_out`).
    pub signed_out: u64,
}

impl CompletionCounts {
    fn add(&mut self, entry: &Entry) {
        if entry.state != State::Sent {
            return;
        }
        if entry.checked_at_ms.is_some() {
            self.checked += 1;
        }
        if entry.signed_out_at_ms.is_some() {
            self.signed_out += 1;
        }
        match entry.completion() {
            Some(Completion::Completed) => self.completed += 1,
            Some(Completion::NotFound) => self.not_found += 1,
            Some(Completion::Pending) | None => self.pending += 1,
        }
    }

    /// `completed 2, pending 1, not found 0`.
    pub fn line(&self) -> String {
        format!(
            "completed {}, pending {}, not found {}",
            self.completed, self.pending, self.not_found
        )
    }
}

/// The ledger of `settings`, with the default AWS config for DynamoDB.
pub async fn open(settings: &Settings) -> anyhow::Result<Ledger> {
    let sdk = crate::aws::load_sdk_config().await;
    Ledger::open(&settings.ledger, || dynamodb::build_client(&sdk))
        .context("Failed to open the ledger")
}

/// Refuses what the memory ledger cannot do outside the worker.
fn needs_durable(ledger: &Ledger, what: &str) -> anyhow::Result<()> {
    if !ledger.outlives_process() {
        bail!(
            "`ledger.backend = \"memory\"` keeps nothing outside the worker process, so {what} \
             has nothing to read; use `sqlite` or `dynamodb`"
        );
    }
    Ok(())
}

/// Runs `reset-worker ledger init`.
pub async fn init(settings: &Settings) -> anyhow::Result<()> {
    let ledger = open(settings).await?;
    for line in ledger.init().await? {
        println!("{line}");
    }
    Ok(())
}

/// Counts the campaign's users per state, and the `sent` ones by
/// completion (reads every entry).
pub async fn counts(ledger: &Ledger, campaign: &str) -> anyhow::Result<(Counts, CompletionCounts)> {
    let mut counts = Counts::default();
    let mut completion = CompletionCounts::default();
    let mut entries = ledger.entries(campaign);
    while let Some(entry) = entries.recv().await {
        let entry = entry?;
        counts.add(entry.state);
        completion.add(&entry);
    }
    Ok((counts, completion))
}

/// Writes every entry of `campaign` to `out`, with the status columns when
/// `with_status`; returns the counts.
pub async fn write_report(
    ledger: &Ledger,
    campaign: &str,
    format: Format,
    with_status: bool,
    out: &mut dyn Write,
) -> anyhow::Result<(Counts, CompletionCounts)> {
    let mut counts = Counts::default();
    let mut completion = CompletionCounts::default();
    let mut entries = ledger.entries(campaign);
    match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            let mut header_written = false;
            while let Some(entry) = entries.recv().await {
                let entry = entry?;
                counts.add(entry.state);
                completion.add(&entry);
                if with_status {
                    w.serialize((Row::from(&entry), Status::from(&entry)))?;
                } else {
                    w.serialize(Row::from(&entry))?;
                }
                header_written = true;
            }
            if !header_written {
                if with_status {
                    w.write_record(STATUS_HEADER)?;
                } else {
                    w.write_record(HEADER)?;
                }
            }
            w.flush()?;
        }
        Format::Jsonl => {
            while let Some(entry) = entries.recv().await {
                let entry = entry?;
                counts.add(entry.state);
                completion.add(&entry);
                if with_status {
                    let line = StatusLine {
                        row: Row::from(&entry),
                        status: Status::from(&entry),
                    };
                    serde_json::to_writer(&mut *out, &line)?;
                } else {
                    serde_json::to_writer(&mut *out, &Row::from(&entry))?;
                }
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
    }
    Ok((counts, completion))
}

/// Whether a refresh still needs to read the user: `sent`, and not already
/// completed or gone by its last recorded check.
fn needs_check(entry: &Entry) -> bool {
    entry.state == State::Sent
        && !matches!(
            entry.completion(),
            Some(Completion::Completed | Completion::NotFound)
        )
}

/// The refresh pass: reads every pending `sent` user of `campaign` with
/// `AdminGetUser` on `pool`, at most `rps` a second, and records each answer
/// in the ledger as soon as it comes.
pub async fn refresh_status(
    ledger: &Ledger,
    pool: &Cognito,
    campaign: &str,
    rps: u32,
) -> Result<Refreshed, RefreshError> {
    // Burst 1: calls evenly spaced, never a burst against the pool's
    // user-read quota, which the pool's sign-ins share.
    let rps = NonZeroU32::new(rps.max(1)).unwrap_or(NonZeroU32::MIN);
    let limiter = RateLimiter::direct(Quota::per_second(rps).allow_burst(NonZeroU32::MIN));
    let mut done = Refreshed::default();
    let mut last_log = Instant::now();
    let mut logged_at = 0;
    let mut entries = ledger.entries(campaign);
    while let Some(entry) = entries.recv().await {
        let entry = entry?;
        if entry.state != State::Sent {
            continue;
        }
        if !needs_check(&entry) {
            done.skipped += 1;
            continue;
        }
        let state = read_user(pool, &limiter, &entry.username).await?;
        let user_status = state.as_ref().map_or(NOT_FOUND, |s| s.status.as_str());
        let modified_at_ms = state.as_ref().and_then(|s| s.modified_at_ms);
        // Known to have waited for a new password since the reset: an
        // earlier check saw it, or AdminResetUserPassword (the pool's
        // action) leaves every user so.
        let waited = entry.seen_waiting() || pool.action() == Action::AdminResetUserPassword;
        let completed = completion(user_status, modified_at_ms, entry.updated_at_ms, waited)
            == Completion::Completed;
        let checked = Checked {
            user_status,
            modified_at_ms,
            checked_at_ms: now_ms(),
            completed,
        };
        let key = Key {
            campaign,
            username: &entry.username,
        };
        // `false`: re-sent or expired since the read; nothing to record.
        ledger.record_status(key, checked).await?;
        done.checked += 1;
        if done.checked - logged_at >= PROGRESS_USERS || last_log.elapsed() >= PROGRESS_EVERY {
            tracing::info!(
                campaign,
                checked = done.checked,
                skipped = done.skipped,
                "refreshing user statuses"
            );
            last_log = Instant::now();
            logged_at = done.checked;
        }
    }
    Ok(done)
}

/// One user's `AdminGetUser`, paced by `limiter`, retried with jitter on
/// throttling and transient errors; `None` when the pool has no such user.
async fn read_user(
    pool: &Cognito,
    limiter: &governor::DefaultDirectRateLimiter,
    username: &str,
) -> Result<Option<cognito::UserState>, RefreshError> {
    match paced(limiter, "AdminGetUser", || pool.user_status(username)).await {
        Ok(state) => Ok(state),
        Err(ReadError::Misconfigured(err)) => Err(RefreshError::Misconfigured(err)),
        Err(ReadError::Failed(err)) => Err(RefreshError::Failed(err)),
    }
}

/// Runs `reset-worker report`.
pub async fn run(settings: &Settings, args: ReportArgs) -> anyhow::Result<()> {
    let ledger = open(settings).await?;
    needs_durable(&ledger, "`report`")?;
    let with_status = args.refresh_status;
    if with_status {
        let sdk = crate::aws::load_sdk_config().await;
        let pools = Pools::new(
            &cognito::build_client(&sdk, &settings.cognito),
            &settings.cognito,
        );
        // `Cli::run` checked the pool and its ID before anything ran.
        let pool = pools
            .get(Some(args.pool()))
            .with_context(|| format!("no pool named `{}` is configured", args.pool()))?;
        let refreshed = refresh_status(&ledger, pool, &args.campaign, args.status_rps).await?;
        eprintln!(
            "campaign {}: checked {} users with AdminGetUser, skipped {} already completed or \
             not found",
            args.campaign, refreshed.checked, refreshed.skipped
        );
    }
    let (counts, completion) = match &args.output {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("Failed to create {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            write_report(&ledger, &args.campaign, args.format, with_status, &mut out).await?
        }
        None => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            write_report(&ledger, &args.campaign, args.format, with_status, &mut out).await?
        }
    };
    let signed_out = if completion.signed_out > 0 {
        format!("; signed out {}", completion.signed_out)
    } else {
        String::new()
    };
    let completion = if with_status {
        format!("; {}", completion.line())
    } else {
        String::new()
    };
    eprintln!(
        "campaign {}: {} users: {}{signed_out}{completion}",
        args.campaign,
        counts.total(),
        counts.line()
    );
    Ok(())
}

/// The campaign's counts for `status --campaign`, or why there are none.
pub async fn status_counts(
    settings: &Settings,
    campaign: &str,
) -> anyhow::Result<(Counts, CompletionCounts)> {
    let ledger = open(settings).await?;
    needs_durable(&ledger, "`status --campaign`")?;
    counts(&ledger, campaign).await
}
