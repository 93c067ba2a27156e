//! The outcome of one delivery of one message, and the single place where it
//! is logged and counted, so logs, metrics and the run summary cannot drift.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::aws::cognito::ErrorCode;
use crate::telemetry;

/// What became of one received message. Every received message ends in
/// exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ForgotPassword succeeded; the message is deleted.
    Sent { medium: &'static str },
    /// Nothing to do (unknown user); the message is deleted.
    Skipped { reason: &'static str },
    /// The job can never succeed; copied to the dead-letter queue and
    /// deleted, or left for the queue's redrive policy.
    Rejected {
        reason: &'static str,
        /// For the dead-letter attribute only; may quote the body, so it is
        /// never logged.
        detail: String,
    },
    /// Try again later: the message stays, invisible for `delay`.
    Deferred {
        reason: &'static str,
        delay: Duration,
    },
    /// Not processed by this worker (shutdown or halt): visible again at once.
    Released { reason: &'static str },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Skipped { .. } => "skipped",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Deferred { .. } => "deferred",
            Outcome::Released { .. } => "released",
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "ok",
            Outcome::Skipped { reason }
            | Outcome::Rejected { reason, .. }
            | Outcome::Deferred { reason, .. }
            | Outcome::Released { reason } => reason,
        }
    }
}

/// Everything the outcome line needs to say about a job.
#[derive(Debug)]
pub struct Report<'a> {
    pub outcome: &'a Outcome,
    pub message_id: &'a str,
    pub campaign_id: Option<&'a str>,
    /// The job's user pool; `None` when the body did not parse.
    pub pool: Option<&'a str>,
    /// Keyed hash of the username; `None` when the body did not parse.
    pub user: Option<&'a str>,
    pub attempts: u32,
    pub receive_count: u32,
    pub last_error: Option<ErrorCode>,
    pub age: Option<Duration>,
}

/// Outcome counts of one run, for the summary line at exit. Atomics because
/// every job task records into it concurrently.
pub struct Tally {
    campaigns: telemetry::CampaignLabels,
    sent: AtomicU64,
    skipped: AtomicU64,
    rejected: AtomicU64,
    deferred: AtomicU64,
    released: AtomicU64,
}

/// A snapshot of [`Tally`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub sent: u64,
    pub skipped: u64,
    pub rejected: u64,
    pub deferred: u64,
    pub released: u64,
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.sent + self.skipped + self.rejected + self.deferred + self.released
    }
}

impl Tally {
    pub fn new(max_campaign_labels: usize) -> Self {
        Self {
            campaigns: telemetry::CampaignLabels::new(max_campaign_labels),
            sent: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }

    pub fn snapshot(&self) -> Summary {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Summary {
            sent: get(&self.sent),
            skipped: get(&self.skipped),
            rejected: get(&self.rejected),
            deferred: get(&self.deferred),
            released: get(&self.released),
        }
    }

    /// Logs the outcome line, counts the metric and the tally.
    pub fn record(&self, r: &Report<'_>) {
        // Codes delivered are counted at the call: a job can be `sent`
        // without a code going out now (its reset went out on an earlier
        // delivery, its sign-out now), and a code can go out in a delivery
        // that ends deferred (its sign-out failed).
        let slot = match r.outcome {
            Outcome::Sent { .. } => &self.sent,
            Outcome::Skipped { .. } => &self.skipped,
            Outcome::Rejected { .. } => &self.rejected,
            Outcome::Deferred { .. } => &self.deferred,
            Outcome::Released { .. } => &self.released,
        };
        slot.fetch_add(1, Ordering::Relaxed);
        let campaign = if r.user.is_none() {
            "unparsed".to_owned()
        } else {
            self.campaigns.label(r.campaign_id)
        };
        // Bounded: a configured pool's name, or one of two fixed words.
        let pool = match (r.user, r.pool) {
            (None, _) => "unparsed".to_owned(),
            (Some(_), Some(pool)) => pool.to_owned(),
            (Some(_), None) => "unknown".to_owned(),
        };
        telemetry::job_outcome(r.outcome.label(), campaign, pool, r.age);

        let delay_seconds = match r.outcome {
            Outcome::Deferred { delay, .. } => Some(delay.as_secs()),
            _ => None,
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    outcome = r.outcome.label(),
                    reason = r.outcome.reason(),
                    campaign_id = r.campaign_id.unwrap_or("-"),
                    pool = r.pool.unwrap_or("-"),
                    message_id = r.message_id,
                    user = r.user.unwrap_or("-"),
                    error_code = r.last_error.map(ErrorCode::as_str).unwrap_or("none"),
                    attempts = r.attempts,
                    receive_count = r.receive_count,
                    delay_seconds,
                    "job outcome"
                )
            };
        }
        match r.outcome {
            Outcome::Rejected { .. } => line!(warn),
            _ => line!(info),
        }
    }
}
