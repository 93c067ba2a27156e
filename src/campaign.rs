//! Campaign checks and status: `reset-worker preflight` and `status`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use aws_sdk_cognitoidentityprovider::error::DisplayErrorContext;
use aws_sdk_cognitoidentityprovider::types::{
    EmailSendingAccountType, PreventUserExistenceErrorTypes,
};
use serde::Serialize;

use crate::config::Settings;
use crate::enqueue::human_duration;
use crate::queue::Queue;

/// The account-level cap of `ForgotPassword` (UserAccountRecovery), per
/// account and Region.
pub const ACCOUNT_RECOVERY_QUOTA_RPS: u32 = 30;
/// Cognito's own email service sends at most this many emails a day.
pub const COGNITO_DEFAULT_EMAILS_PER_DAY: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
    }
}

fn count(attrs: &HashMap<String, String>, key: &str) -> u64 {
    attrs.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Campaign duration at `rps` for `jobs` jobs.
pub fn estimate(jobs: u64, rps: u32) -> String {
    if rps == 0 {
        return "paused (limits.max_rps = 0)".to_owned();
    }
    human_duration(jobs as f64 / f64::from(rps))
}

/// Runs every check. The caller exits non-zero when any is `Fail`.
pub async fn preflight(
    settings: &Settings,
    queue: &Queue,
    cognito: &aws_sdk_cognitoidentityprovider::Client,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut backlog = 0;

    match queue.attributes(queue.url()).await {
        Err(err) => checks.push(check("queue", Level::Fail, err.to_string())),
        Ok(attrs) => {
            backlog = count(&attrs, "ApproximateNumberOfMessages")
                + count(&attrs, "ApproximateNumberOfMessagesDelayed")
                + count(&attrs, "ApproximateNumberOfMessagesNotVisible");
            checks.push(check(
                "queue",
                Level::Pass,
                format!("reachable; {backlog} messages"),
            ));
            match attrs.get("RedrivePolicy") {
                None => checks.push(check(
                    "redrive policy",
                    Level::Fail,
                    "the queue has no redrive policy: a message that keeps failing is received forever",
                )),
                Some(policy) => {
                    let max_receive = serde_json::from_str::<serde_json::Value>(policy)
                        .ok()
                        .and_then(|v| {
                            let m = &v["maxReceiveCount"];
                            m.as_u64().or_else(|| m.as_str().and_then(|s| s.parse().ok()))
                        })
                        .unwrap_or(0);
                    // Deferrals (throttling, per-user limits) use receives too.
                    if max_receive < 3 {
                        checks.push(check(
                            "redrive policy",
                            Level::Warn,
                            format!("maxReceiveCount is {max_receive}: deferred jobs (throttling, per-user limits) may reach the dead-letter queue early; use 5 or more"),
                        ));
                    } else {
                        checks.push(check(
                            "redrive policy",
                            Level::Pass,
                            format!("maxReceiveCount {max_receive}"),
                        ));
                    }
                }
            }
        }
    }

    // The heartbeat extends visibility at half the timeout, and a call can
    // take up to the request timeout: the first extension must come before
    // a message could reappear.
    let vt = settings.sqs.visibility_timeout_seconds;
    let call = settings.cognito.request_timeout_seconds;
    if vt < 2 * call {
        checks.push(check(
            "visibility timeout",
            Level::Warn,
            format!("sqs.visibility_timeout_seconds ({vt}) is under twice cognito.request_timeout_seconds ({call})"),
        ));
    } else {
        checks.push(check(
            "visibility timeout",
            Level::Pass,
            format!("{vt} s, heartbeat every {} s", vt / 2),
        ));
    }

    match queue.dead_letter_url() {
        None => checks.push(check(
            "dead-letter queue",
            Level::Warn,
            "sqs.dead_letter_queue_url is not set: rejected messages wait for the redrive policy",
        )),
        Some(dlq) => match queue.attributes(dlq).await {
            Ok(attrs) => checks.push(check(
                "dead-letter queue",
                Level::Pass,
                format!(
                    "reachable; {} messages",
                    count(&attrs, "ApproximateNumberOfMessages")
                ),
            )),
            Err(err) => checks.push(check("dead-letter queue", Level::Fail, err.to_string())),
        },
    }

    let c = &settings.cognito;
    match c.user_pool_id.as_deref() {
        None => checks.push(check(
            "app client",
            Level::Warn,
            "cognito.user_pool_id is not set: the app client and the pool cannot be checked",
        )),
        Some(pool_id) => {
            match cognito
                .describe_user_pool_client()
                .user_pool_id(pool_id)
                .client_id(&c.client_id)
                .send()
                .await
            {
                Err(err) => checks.push(check(
                    "app client",
                    Level::Fail,
                    format!("DescribeUserPoolClient: {}", DisplayErrorContext(&err)),
                )),
                Ok(out) => {
                    let client = out.user_pool_client();
                    let has_secret = client.and_then(|c| c.client_secret()).is_some();
                    let configured = c.client_secret.is_some();
                    let level = if has_secret == configured {
                        Level::Pass
                    } else {
                        Level::Fail
                    };
                    let detail = match (has_secret, configured) {
                        (true, true) => "exists, has a secret, and one is configured",
                        (false, false) => "exists, without a secret, and none is configured",
                        (true, false) => {
                            "the client has a secret but none is configured: every call would fail with NotAuthorizedException"
                        }
                        (false, true) => {
                            "a client secret is configured but the client has none: every call would fail"
                        }
                    };
                    checks.push(check("app client", level, detail));
                    let prevent = client.and_then(|c| c.prevent_user_existence_errors());
                    if prevent == Some(&PreventUserExistenceErrorTypes::Enabled) {
                        checks.push(check(
                            "user existence errors",
                            Level::Warn,
                            "PreventUserExistenceErrors is ENABLED: unknown users look like successes, so `skipped` (user not found) can never be observed",
                        ));
                    } else {
                        checks.push(check(
                            "user existence errors",
                            Level::Pass,
                            "unknown users are reported (outcome skipped)",
                        ));
                    }
                }
            }
            match cognito
                .describe_user_pool()
                .user_pool_id(pool_id)
                .send()
                .await
            {
                Err(err) => checks.push(check(
                    "user pool",
                    Level::Fail,
                    format!("DescribeUserPool: {}", DisplayErrorContext(&err)),
                )),
                Ok(out) => {
                    let pool = out.user_pool();
                    let mechanisms = pool
                        .and_then(|p| p.account_recovery_setting())
                        .map(|s| s.recovery_mechanisms().len())
                        .unwrap_or(0);
                    checks.push(if mechanisms > 0 {
                        check("account recovery", Level::Pass, format!("{mechanisms} recovery mechanisms"))
                    } else {
                        check(
                            "account recovery",
                            Level::Warn,
                            "the pool has no AccountRecoverySetting: Cognito falls back to its legacy choice of SMS or email",
                        )
                    });
                    let account = pool
                        .and_then(|p| p.email_configuration())
                        .and_then(|e| e.email_sending_account().cloned())
                        .unwrap_or(EmailSendingAccountType::CognitoDefault);
                    if account == EmailSendingAccountType::CognitoDefault
                        && backlog > COGNITO_DEFAULT_EMAILS_PER_DAY
                    {
                        checks.push(check(
                            "email sending",
                            Level::Warn,
                            format!("COGNITO_DEFAULT sends at most {COGNITO_DEFAULT_EMAILS_PER_DAY} emails a day; this campaign has {backlog} jobs. Configure Amazon SES (DEVELOPER)"),
                        ));
                    } else {
                        checks.push(check(
                            "email sending",
                            Level::Pass,
                            account.as_str().to_owned(),
                        ));
                    }
                }
            }
        }
    }

    let rps = settings.limits.max_rps;
    let level = if rps > ACCOUNT_RECOVERY_QUOTA_RPS {
        Level::Warn
    } else {
        Level::Pass
    };
    checks.push(check(
        "duration",
        level,
        format!(
            "{backlog} jobs at limits.max_rps {rps}: about {}{}",
            estimate(backlog, rps),
            if rps > ACCOUNT_RECOVERY_QUOTA_RPS {
                " (above the account's 30/s recovery quota: expect throttling)"
            } else {
                ""
            }
        ),
    ));
    checks
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub url: String,
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub queue: QueueStatus,
    pub dead_letter_queue: Option<QueueStatus>,
    pub max_rps: u32,
    pub eta_seconds: Option<u64>,
    pub eta: String,
    /// `reset_worker_*` counters from `--metrics-url`, summed by name and
    /// outcome/result label.
    pub worker: Option<BTreeMap<String, f64>>,
}

async fn queue_status(queue: &Queue, url: &str) -> Result<QueueStatus, crate::queue::QueueError> {
    let attrs = queue.attributes(url).await?;
    Ok(QueueStatus {
        url: url.to_owned(),
        visible: count(&attrs, "ApproximateNumberOfMessages"),
        in_flight: count(&attrs, "ApproximateNumberOfMessagesNotVisible"),
        delayed: count(&attrs, "ApproximateNumberOfMessagesDelayed"),
    })
}

pub async fn status(
    settings: &Settings,
    queue: &Queue,
    worker_metrics: Option<String>,
) -> Result<Status, crate::queue::QueueError> {
    let main = queue_status(queue, queue.url()).await?;
    let dlq = match queue.dead_letter_url() {
        Some(url) => Some(queue_status(queue, url).await?),
        None => None,
    };
    let backlog = main.visible + main.in_flight + main.delayed;
    let rps = settings.limits.max_rps;
    Ok(Status {
        eta_seconds: (rps > 0).then(|| backlog / u64::from(rps)),
        eta: estimate(backlog, rps),
        queue: main,
        dead_letter_queue: dlq,
        max_rps: rps,
        worker: worker_metrics.map(|text| summarize_metrics(&text)),
    })
}

/// Sums the worker's job and request counters from Prometheus text.
pub fn summarize_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let wanted = [
            ("reset_worker_jobs_total", "outcome"),
            ("reset_worker_cognito_requests_total", "result"),
        ];
        for (metric, label) in wanted {
            if name != metric {
                continue;
            }
            let key = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{label}=\"")))
                .map(|v| v.trim_end_matches(['}', '"']))
                .unwrap_or("all");
            *out.entry(format!("{metric}{{{label}=\"{key}\"}}"))
                .or_insert(0.0) += value;
        }
        if name == "reset_worker_rate_limit_per_second" || name == "reset_worker_in_flight_jobs" {
            out.insert(name.to_owned(), value);
        }
    }
    out
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = &self.queue;
        writeln!(f, "queue            {}", q.url)?;
        writeln!(
            f,
            "  visible {}   in flight {}   delayed {}",
            q.visible, q.in_flight, q.delayed
        )?;
        if let Some(d) = &self.dead_letter_queue {
            writeln!(f, "dead-letter      {}", d.url)?;
            writeln!(
                f,
                "  visible {}   in flight {}   delayed {}",
                d.visible, d.in_flight, d.delayed
            )?;
        }
        writeln!(
            f,
            "rate             {} calls/s (limits.max_rps)",
            self.max_rps
        )?;
        writeln!(f, "ETA              {}", self.eta)?;
        if let Some(worker) = &self.worker {
            writeln!(f, "worker")?;
            for (k, v) in worker {
                writeln!(f, "  {k} {v}")?;
            }
        }
        Ok(())
    }
}

/// A plain HTTP GET for `--metrics-url` (in-cluster or port-forwarded
/// metrics are plain HTTP; TLS is not supported here).
pub async fn http_get(url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "only http:// URLs are supported",
        )
    })?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(host),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut response),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "unexpected answer: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_counters_by_outcome() {
        let text = "# HELP x\nreset_worker_jobs_total{outcome=\"sent\"} 3\nreset_worker_jobs_total{outcome=\"skipped\"} 1\nreset_worker_cognito_requests_total{result=\"ok\",code=\"none\"} 4\nreset_worker_rate_limit_per_second 10\n";
        let m = summarize_metrics(text);
        assert_eq!(m["reset_worker_jobs_total{outcome=\"sent\"}"], 3.0);
        assert_eq!(m["reset_worker_cognito_requests_total{result=\"ok\"}"], 4.0);
        assert_eq!(m["reset_worker_rate_limit_per_second"], 10.0);
    }

    #[test]
    fn estimates() {
        assert_eq!(estimate(1_000_000, 30), "9 h 15 min");
        assert!(estimate(5, 0).contains("paused"));
    }
}
