//! The worker app in process, as zero-to-production's `spawn_app`: the
//! library's [`App::build_with`] (what `reset-worker run` builds) on clients
//! that point at moto, and optionally Cognito at a wiremock server, run by
//! [`App::run_until_stopped`] in a tokio task.
//!
//! The `metrics` recorder is global to the process: every in-process app of
//! one test binary counts into the same series. So in-process tests assert on
//! the returned [`Summary`], on their own campaign's series
//! ([`TestApp::campaign_jobs`], with a campaign id unique to the test), on
//! their own campaign's outcome lines ([`outcome_lines`]) or on what moto and
//! wiremock received, never on process-wide totals. Tests about the binary
//! itself (exit codes, signals, its stdout) spawn it with
//! [`super::spawn_worker`].
//!
//! Logs: the first [`spawn_app`] installs a process-wide tracing subscriber
//! that keeps every line as JSON in memory (and with `TEST_LOG=1` prints it).
//!
//! Needs `#[tokio::test(flavor = "multi_thread")]`: the app runs on the
//! runtime's workers while the blocking helpers ([`TestApp::metrics`],
//! [`TestApp::ready`]) wait on the test's own thread.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use reset_worker::app::{App, Clients};
use reset_worker::config::Settings;
use reset_worker::worker::RunOptions;
use reset_worker::worker::outcome::Summary;
use serde_json::{Value, json};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Stack, metric_value, moto_url, readyz, scrape_metrics, sdk_config};

/// Per-campaign outcome counter: the series in-process tests may assert on.
pub const CAMPAIGN_JOBS: &str = "reset_worker_campaign_jobs_total";

/// Merges `patch` into `base`: objects key by key, recursively; any other
/// value replaces what was there.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// The settings of a worker on `stack`: its queue, dead-letter queue and app
/// client (with secret), metrics on `127.0.0.1:0`, 1 s long polls; then
/// `patch` merged in, e.g. `json!({"limits": {"concurrency": 1}})`.
pub fn app_settings(stack: &Stack, patch: Value) -> Settings {
    let mut settings = json!({
        "sqs": {
            "queue_url": stack.queue_url,
            "dead_letter_queue_url": stack.dlq_url,
            "wait_time_seconds": 1,
        },
        "cognito": {"client_id": stack.client_id, "client_secret": stack.client_secret},
        "metrics": {"listen": "127.0.0.1:0"},
        "ledger": {"path": stack.ledger_path},
    });
    merge(&mut settings, patch);
    serde_json::from_value(settings).unwrap_or_else(|e| panic!("invalid test settings: {e}"))
}

/// Every log line of the in-process apps so far (JSON, one per line).
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Appends each formatted line to [`LOGS`] (and to stderr with `TEST_LOG=1`).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per process: JSON lines with the
/// event's fields at the top level, as the binary writes them.
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// The `job outcome` lines the in-process apps logged for `campaign`.
pub fn outcome_lines(campaign: &str) -> Vec<Value> {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|l| l["message"] == "job outcome" && l["campaign_id"] == campaign)
        .collect()
}

/// A worker app running in a task of the test's runtime. Dropping it stops
/// the app as SIGTERM would.
pub struct TestApp {
    /// `127.0.0.1:PORT` of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: String,
    shutdown: CancellationToken,
    run: JoinHandle<anyhow::Result<Summary>>,
}

/// Builds the app on `settings` (SQS on moto; Cognito on `cognito_url`, or
/// moto when `None`) and runs it: until stopped, or with `until_empty` until
/// the queue is drained (`run --until-empty`).
pub async fn spawn_app(
    settings: Settings,
    cognito_url: Option<&str>,
    until_empty: bool,
) -> TestApp {
    assert_eq!(
        Handle::current().runtime_flavor(),
        RuntimeFlavor::MultiThread,
        "spawn_app needs #[tokio::test(flavor = \"multi_thread\")]"
    );
    capture_logs();
    let moto = sdk_config(&moto_url());
    let clients = match cognito_url {
        None => Clients::from_sdk(&moto, &settings),
        Some(url) => Clients {
            sqs: reset_worker::aws::sqs::build_client(&moto),
            cognito: reset_worker::aws::cognito::build_client(&sdk_config(url), &settings.cognito),
            dynamodb: reset_worker::ledger::dynamodb::build_client(&moto),
        },
    };
    let app = App::build_with(settings, None, clients)
        .await
        .expect("build the worker app");
    let metrics_addr = app.metrics_addr().to_string();
    let shutdown = CancellationToken::new();
    let options = RunOptions {
        until_empty_polls: until_empty.then_some(2),
    };
    let run = tokio::spawn(app.run_until_stopped(shutdown.clone(), options));
    TestApp {
        metrics_addr,
        shutdown,
        run,
    }
}

impl TestApp {
    /// Body of `GET /metrics` (empty when it does not answer 200).
    pub fn metrics(&self) -> String {
        scrape_metrics(&self.metrics_addr)
    }

    /// Status of `GET /readyz`; 0 when nothing answers.
    pub fn ready(&self) -> u16 {
        readyz(&self.metrics_addr)
    }

    /// `reset_worker_campaign_jobs_total{campaign, outcome}` now.
    pub fn campaign_jobs(&self, campaign: &str, outcome: &str) -> f64 {
        metric_value(
            &self.metrics(),
            CAMPAIGN_JOBS,
            &[("campaign", campaign), ("outcome", outcome)],
        )
    }

    /// Stops the app as SIGTERM would and returns how its run ended.
    pub async fn stop(self) -> anyhow::Result<Summary> {
        self.shutdown.cancel();
        self.finished(Duration::from_secs(30)).await
    }

    /// Waits up to `timeout` for the run to end by itself (a drained queue
    /// with `until_empty`, or a halt) and returns how it ended.
    pub async fn finished(mut self, timeout: Duration) -> anyhow::Result<Summary> {
        match tokio::time::timeout(timeout, &mut self.run).await {
            Ok(joined) => joined.expect("the app's task panicked"),
            Err(_) => panic!("the app did not stop within {timeout:?}"),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
