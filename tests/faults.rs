//! Faults: SQS unreachable for a while, long jobs and the visibility
//! heartbeat, Cognito 5xx bursts and throttling storms. SQS is moto (behind a
//! cuttable TCP proxy where needed); Cognito is wiremock where faults are
//! needed. Every job must end accounted for, and none may be sent twice.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::cognito_mock::{cognito_error, forgot_password, received_calls, success, usernames};
use support::proxy::Proxy;
use support::*;
use wiremock::{MockServer, ResponseTemplate};

/// An injected Cognito error.
fn error(status: u16, code: &str) -> ResponseTemplate {
    cognito_error(status, code, "injected")
}

/// Usernames of the calls wiremock answered with 200 (all but the first
/// `failures_first`), with their counts.
async fn successful_calls(server: &MockServer, failures_first: usize) -> HashMap<String, usize> {
    let calls = received_calls(server).await;
    let mut counts = HashMap::new();
    for user in usernames(&calls).into_iter().skip(failures_first) {
        *counts.entry(user).or_insert(0) += 1;
    }
    counts
}

fn jobs(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| serde_json::json!({"username": format!("{prefix}{i}@example.com")}).to_string())
        .collect()
}

fn env_with(stack: &Stack, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = stack_env(stack);
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn sqs_outage_backs_off_goes_unready_and_recovers() {
    let stack = Stack::new(false, &[]).await;
    let proxy = Proxy::start(stack.moto.trim_start_matches("http://").to_owned()).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(success())
        .mount(&cognito)
        .await;

    let env = env_with(
        &stack,
        &[
            ("AWS_ENDPOINT_URL_SQS", &proxy.url()),
            ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &cognito.uri()),
            ("RESET_WORKER_LIMITS__MAX_RPS", "100"),
        ],
    );
    // The queue URL still names moto; the SDK sends to the endpoint (proxy).
    let worker = spawn_worker(&env, &[]);
    assert!(eventually(Duration::from_secs(20), || async { worker.ready() == 200 }).await);

    proxy.down();
    let unready = eventually(Duration::from_secs(30), || async { worker.ready() == 503 }).await;
    assert!(unready, "readiness must drop while SQS is unreachable");
    let errors_at_cut = metric_value(
        &worker.metrics(),
        "reset_worker_sqs_requests_total",
        &[("operation", "ReceiveMessage"), ("result", "error")],
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = worker.metrics();
    let errors = metric_value(
        &m,
        "reset_worker_sqs_requests_total",
        &[("operation", "ReceiveMessage"), ("result", "error")],
    );
    // Backoff starts at 1 s and doubles (full jitter, up to 30 s): a busy
    // loop would fail hundreds of times in 6 s.
    assert!(
        errors - errors_at_cut <= 8.0,
        "{} failed receives in 6 s: not backing off",
        errors - errors_at_cut
    );
    let refused = proxy.refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused < 60, "{refused} connection attempts in the outage");

    // Jobs queued during the outage are processed once SQS is back.
    send_jobs(&stack, &jobs("outage", 5)).await;
    proxy.up();
    let done = eventually(Duration::from_secs(60), || async {
        metric_value(
            &worker.metrics(),
            "reset_worker_jobs_total",
            &[("outcome", "sent")],
        ) == 5.0
    })
    .await;
    assert!(done, "{}", worker.logs());
    assert_eq!(worker.ready(), 200, "readiness recovers");
    assert!(worker.logs().contains("receive failed; backing off"));
    let calls = successful_calls(&cognito, 0).await;
    assert_eq!(calls.len(), 5);
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
    let empty = eventually(Duration::from_secs(10), || async {
        queue_counts(&stack.sqs, &stack.queue_url).await == (0, 0)
    })
    .await;
    assert!(empty);

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_keeps_a_long_job_from_being_redelivered() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    // Four slow failures, then success: the job runs ~4 s plus backoff,
    // well past the 2 s visibility timeout.
    forgot_password()
        .respond_with(error(500, "InternalErrorException").set_delay(Duration::from_millis(900)))
        .up_to_n_times(4)
        .with_priority(1)
        .mount(&cognito)
        .await;
    forgot_password()
        .respond_with(success())
        .with_priority(2)
        .mount(&cognito)
        .await;
    send_jobs(&stack, &jobs("long", 1)).await;

    let env = env_with(
        &stack,
        &[
            ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &cognito.uri()),
            ("RESET_WORKER_SQS__VISIBILITY_TIMEOUT_SECONDS", "2"),
            ("RESET_WORKER_COGNITO__REQUEST_TIMEOUT_SECONDS", "1"),
            ("RESET_WORKER_RETRY__MAX_ATTEMPTS", "5"),
            ("RESET_WORKER_RETRY__INITIAL_DELAY_MS", "100"),
            ("RESET_WORKER_RETRY__MAX_DELAY_MS", "200"),
            ("RESET_WORKER_LIMITS__MAX_RPS", "100"),
        ],
    );
    let worker = spawn_worker(&env, &[]);
    let done = eventually(Duration::from_secs(40), || async {
        metric_value(&worker.metrics(), "reset_worker_jobs_total", &[]) >= 1.0
    })
    .await;
    assert!(done);
    // Give a redelivery every chance to show up before judging.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = worker.metrics();
    assert_eq!(
        metric_value(&m, "reset_worker_jobs_total", &[("outcome", "sent")]),
        1.0
    );
    assert_eq!(
        metric_value(&m, "reset_worker_jobs_total", &[]),
        1.0,
        "one outcome only"
    );
    assert_eq!(cognito.received_requests().await.unwrap().len(), 5);
    assert!(
        metric_value(
            &m,
            "reset_worker_sqs_requests_total",
            &[("operation", "ChangeMessageVisibility"), ("result", "ok")]
        ) >= 2.0,
        "the heartbeat must have extended the visibility"
    );
    let logs = worker.logs();
    assert!(logs.contains(r#""receive_count":1"#) && !logs.contains(r#""receive_count":2"#));

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn five_xx_bursts_and_throttling_storms_lose_and_duplicate_nothing() {
    const JOBS: usize = 20;
    const FAILURES: u64 = 30;
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    // The first 30 calls fail: a 5xx burst, then a throttling storm.
    forgot_password()
        .respond_with(error(503, "ServiceUnavailable"))
        .up_to_n_times(15)
        .with_priority(1)
        .mount(&cognito)
        .await;
    forgot_password()
        .respond_with(error(400, "TooManyRequestsException"))
        .up_to_n_times(15)
        .with_priority(2)
        .mount(&cognito)
        .await;
    forgot_password()
        .respond_with(success())
        .with_priority(3)
        .mount(&cognito)
        .await;
    send_jobs(&stack, &jobs("storm", JOBS)).await;

    let env = env_with(
        &stack,
        &[
            ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &cognito.uri()),
            ("RESET_WORKER_RETRY__MAX_ATTEMPTS", "3"),
            ("RESET_WORKER_RETRY__INITIAL_DELAY_MS", "20"),
            ("RESET_WORKER_RETRY__MAX_DELAY_MS", "200"),
            ("RESET_WORKER_LIMITS__MAX_RPS", "200"),
            ("RESET_WORKER_LIMITS__BURST", "10"),
            ("RESET_WORKER_SQS__VISIBILITY_TIMEOUT_SECONDS", "15"),
        ],
    );
    let worker = spawn_worker(&env, &[]);
    // Deferred jobs come back after their backoff delay (≥ 1 s), so all
    // 20 end sent.
    let done = eventually(Duration::from_secs(90), || async {
        metric_value(
            &worker.metrics(),
            "reset_worker_jobs_total",
            &[("outcome", "sent")],
        ) == JOBS as f64
    })
    .await;
    assert!(done, "{}", worker.logs());
    let m = worker.metrics();
    assert_eq!(metric_value(&m, "reset_worker_throttled_total", &[]), 15.0);
    assert_eq!(
        metric_value(
            &m,
            "reset_worker_cognito_requests_total",
            &[("code", "server_error")]
        ),
        15.0
    );
    let calls = successful_calls(&cognito, FAILURES as usize).await;
    assert_eq!(calls.len(), JOBS, "every user got a code");
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");
    // The storm slowed the adaptive rate down.
    assert!(worker.logs().contains("throttled by Cognito; slowing down"));
    let empty = eventually(Duration::from_secs(10), || async {
        queue_counts(&stack.sqs, &stack.queue_url).await == (0, 0)
    })
    .await;
    assert!(empty);
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
}
