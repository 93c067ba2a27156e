//! Logs and metrics: subscriber set-up, the Prometheus recorder, and one
//! function per event so that every metric is named and labelled in one place.
//!
//! No label ever holds a username or a message ID; labels come from small
//! fixed sets (outcome, error code, operation, delivery medium).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

pub const JOBS_TOTAL: &str = "reset_worker_jobs_total";
pub const CAMPAIGN_JOBS_TOTAL: &str = "reset_worker_campaign_jobs_total";
pub const COGNITO_REQUESTS_TOTAL: &str = "reset_worker_cognito_requests_total";
pub const COGNITO_DURATION: &str = "reset_worker_cognito_request_duration_seconds";
pub const THROTTLED_TOTAL: &str = "reset_worker_throttled_total";
pub const CODE_DELIVERIES_TOTAL: &str = "reset_worker_code_deliveries_total";
pub const SIGN_OUTS_TOTAL: &str = "reset_worker_sign_outs_total";
pub const IN_FLIGHT: &str = "reset_worker_in_flight_jobs";
pub const SQS_REQUESTS_TOTAL: &str = "reset_worker_sqs_requests_total";
pub const DELETE_FAILURES_TOTAL: &str = "reset_worker_delete_failures_total";
pub const JOB_AGE: &str = "reset_worker_job_age_seconds";
pub const RATE_LIMIT: &str = "reset_worker_rate_limit_per_second";
pub const READY: &str = "reset_worker_ready";
pub const BUILD_INFO: &str = "reset_worker_build_info";
pub const LEDGER_REQUESTS_TOTAL: &str = "reset_worker_ledger_requests_total";
pub const LEDGER_DURATION: &str = "reset_worker_ledger_request_duration_seconds";
pub const LEDGER_CLAIMS_TOTAL: &str = "reset_worker_ledger_claims_total";
pub const LEDGER_UP: &str = "reset_worker_ledger_up";

/// The process-wide Prometheus recorder. `metrics` allows one global
/// recorder, so this is installed once and shared by every caller.
static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once) and describes every metric.
pub fn install_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    // Apps built concurrently (tests) must not both try to install one.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = RECORDER.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(COGNITO_DURATION.into()),
            &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full(LEDGER_DURATION.into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(JOB_AGE.into()),
            &[
                1.0,
                10.0,
                60.0,
                300.0,
                900.0,
                3600.0,
                4.0 * 3600.0,
                12.0 * 3600.0,
                86400.0,
                4.0 * 86400.0,
                14.0 * 86400.0,
            ],
        )?
        .install_recorder()?;
    let handle = RECORDER.get_or_init(|| handle).clone();
    describe();
    Ok(handle)
}

/// How often histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the recorder's pending histogram samples into their buckets every
/// [`UPKEEP_INTERVAL`] until `stop` fires. The exporter buffers every
/// observation until an upkeep or a scrape, so without this a worker nobody
/// scrapes grows by a few words per call (measured: about 75 bytes per job,
/// 20 MiB over 300,000 jobs).
pub async fn upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

fn describe() {
    describe_counter!(
        JOBS_TOTAL,
        "Jobs by final outcome of this delivery: sent, skipped, rejected, deferred, released."
    );
    describe_counter!(
        COGNITO_REQUESTS_TOTAL,
        "Cognito calls by Region, operation (ForgotPassword, AdminResetUserPassword, AdminUserGlobalSignOut, ...), result (ok, throttled, error) and error code."
    );
    describe_histogram!(
        COGNITO_DURATION,
        metrics::Unit::Seconds,
        "Latency of Cognito calls, by operation."
    );
    describe_counter!(
        THROTTLED_TOTAL,
        "Cognito calls answered with TooManyRequestsException, by Region."
    );
    describe_counter!(
        CODE_DELIVERIES_TOTAL,
        "Codes sent, by delivery medium reported by Cognito."
    );
    describe_counter!(
        SIGN_OUTS_TOTAL,
        "AdminUserGlobalSignOut calls after a reset (cognito.sign_out) by result: ok, user_not_found, throttled, error."
    );
    describe_gauge!(IN_FLIGHT, "Jobs holding a concurrency permit.");
    describe_counter!(SQS_REQUESTS_TOTAL, "SQS API calls by operation and result.");
    describe_counter!(
        DELETE_FAILURES_TOTAL,
        "Messages whose delete finally failed; SQS will redeliver them."
    );
    describe_histogram!(
        JOB_AGE,
        metrics::Unit::Seconds,
        "Time from the message's SentTimestamp to its outcome."
    );
    describe_gauge!(
        RATE_LIMIT,
        "Effective cap on ForgotPassword calls per second."
    );
    describe_counter!(
        LEDGER_REQUESTS_TOTAL,
        "Ledger requests by operation (claim, renew, finish, record_reset, lookup, check, ...) and result (ok, error, fatal)."
    );
    describe_histogram!(
        LEDGER_DURATION,
        metrics::Unit::Seconds,
        "Latency of ledger requests, by operation."
    );
    describe_counter!(
        LEDGER_CLAIMS_TOTAL,
        "Claims by answer: granted, taken_over (an earlier claim expired mid-call), already_sent, held."
    );
    describe_gauge!(
        LEDGER_UP,
        "1 while the ledger answers; 0 while the worker waits for it."
    );
    describe_gauge!(READY, "1 when polling works and the worker is not halted.");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels carry the build's version."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Pre-register the outcome series so dashboards see zeros, not gaps.
    for outcome in ["sent", "skipped", "rejected", "deferred", "released"] {
        counter!(JOBS_TOTAL, "outcome" => outcome).increment(0);
    }
}

/// Where log lines go: the worker logs to stdout (a container's log
/// stream); operator commands log to stderr, so what they print on stdout
/// (a report, a config listing) is never mixed with log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    Stderr,
}

/// JSON lines, or human-readable text when the stream is a terminal
/// (override with `RESET_WORKER_LOG_FORMAT=json|text`). `RUST_LOG` filters.
pub fn init_tracing(to: LogTo) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = match to {
        LogTo::Stdout => std::io::stdout().is_terminal(),
        LogTo::Stderr => std::io::stderr().is_terminal(),
    };
    let json = match std::env::var("RESET_WORKER_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !terminal,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests) is harmless; keep the first subscriber.
    let _ = match (to, json) {
        (LogTo::Stdout, true) => builder
            .with_writer(std::io::stdout)
            .json()
            .flatten_event(true)
            .try_init(),
        (LogTo::Stdout, false) => builder.with_writer(std::io::stdout).try_init(),
        (LogTo::Stderr, true) => builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .try_init(),
        (LogTo::Stderr, false) => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// How a Cognito call ended, for [`cognito_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    Ok,
    /// TooManyRequestsException.
    Throttled,
    /// Any other error, with its code label (a small fixed set).
    Error(&'static str),
}

/// One Cognito call to `region` (a Region the pools call: bounded) of
/// `operation` (an API name: bounded).
pub fn cognito_request(
    region: &str,
    operation: &'static str,
    result: CallResult,
    elapsed: Duration,
) {
    histogram!(COGNITO_DURATION, "operation" => operation).record(elapsed.as_secs_f64());
    let (result, code) = match result {
        CallResult::Ok => ("ok", "none"),
        CallResult::Throttled => {
            counter!(THROTTLED_TOTAL, "region" => region.to_owned()).increment(1);
            ("throttled", "TooManyRequestsException")
        }
        CallResult::Error(code) => ("error", code),
    };
    counter!(
        COGNITO_REQUESTS_TOTAL,
        "region" => region.to_owned(),
        "operation" => operation,
        "result" => result,
        "code" => code
    )
    .increment(1);
}

/// One `AdminUserGlobalSignOut` call's result: `ok`, `user_not_found`,
/// `throttled` or `error`.
pub fn sign_out(result: &'static str) {
    counter!(SIGN_OUTS_TOTAL, "result" => result).increment(1);
}

pub fn code_delivered(medium: &'static str) {
    counter!(CODE_DELIVERIES_TOTAL, "medium" => medium).increment(1);
}

pub fn sqs_request(operation: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(SQS_REQUESTS_TOTAL, "operation" => operation, "result" => result).increment(1);
}

pub fn delete_failed(count: usize) {
    counter!(DELETE_FAILURES_TOTAL).increment(count as u64);
}

pub fn job_outcome(outcome: &'static str, campaign: String, pool: String, age: Option<Duration>) {
    counter!(JOBS_TOTAL, "outcome" => outcome).increment(1);
    counter!(CAMPAIGN_JOBS_TOTAL, "campaign" => campaign, "pool" => pool, "outcome" => outcome)
        .increment(1);
    if let Some(age) = age {
        histogram!(JOB_AGE).record(age.as_secs_f64());
    }
}

/// Bounds the `campaign` label: the first `max` campaign IDs seen get their
/// own series, later ones share `other`. A std mutex: held for a set lookup.
pub struct CampaignLabels {
    max: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl CampaignLabels {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: Default::default(),
        }
    }

    /// The label for a job's campaign: `none` without one, `unparsed` when
    /// the body did not parse.
    pub fn label(&self, campaign: Option<&str>) -> String {
        let Some(campaign) = campaign else {
            return "none".to_owned();
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(campaign) {
            return campaign.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(campaign.to_owned());
            return campaign.to_owned();
        }
        "other".to_owned()
    }
}

pub fn in_flight(delta: f64) {
    gauge!(IN_FLIGHT).increment(delta);
}

/// One Region's effective cap (a configured Region: bounded).
pub fn rate_limit(region: &str, per_second: f64) {
    gauge!(RATE_LIMIT, "region" => region.to_owned()).set(per_second);
}

pub fn ledger_request(operation: &'static str, result: &'static str, elapsed: Duration) {
    histogram!(LEDGER_DURATION, "operation" => operation).record(elapsed.as_secs_f64());
    counter!(LEDGER_REQUESTS_TOTAL, "operation" => operation, "result" => result).increment(1);
}

pub fn ledger_claim(answer: &'static str) {
    counter!(LEDGER_CLAIMS_TOTAL, "answer" => answer).increment(1);
}

pub fn ledger_up(up: bool) {
    gauge!(LEDGER_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}
