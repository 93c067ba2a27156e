//! The worker end to end against moto server (real SQS and Cognito
//! protocols): the happy path (in process, and the binary's metrics and
//! logs), parameter passthrough, malformed bodies, FIFO, configuration errors.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use reset_worker::worker::outcome::Summary;
use serde_json::{Value, json};
use support::app::{app_settings, outcome_lines, spawn_app};
use support::*;

const DRAIN: Duration = Duration::from_secs(60);

/// A rate cap that lets a dozen jobs through at once.
fn fast() -> Value {
    json!({"limits": {"max_rps": 200, "burst": 20}})
}

fn fast_env(stack: &Stack) -> Vec<(String, String)> {
    let mut env = stack_env(stack);
    env.extend(settings_env(&fast()));
    env
}

fn job(username: &str) -> String {
    json!({"username": username, "campaign_id": "it-happy"}).to_string()
}

/// A stack with `n` users and one job each (campaign `campaign`) queued.
async fn stack_with_jobs(n: usize, campaign: &str) -> (Stack, Vec<String>) {
    let users: Vec<String> = (0..n).map(|i| format!("user{i}@example.com")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &user_refs).await;
    let bodies: Vec<String> = users
        .iter()
        .map(|u| json!({"username": u, "campaign_id": campaign}).to_string())
        .collect();
    send_jobs(&stack, &bodies).await;
    (stack, users)
}

/// moto got exactly one ForgotPassword per user, and every message is gone
/// from the queue (deletes are batched: they get a moment) and none
/// dead-lettered.
async fn assert_sent_once_and_deleted(stack: &Stack, users: &[String]) {
    let calls = forgot_password_calls(&stack.moto, &stack.client_id);
    let called: Vec<&str> = calls
        .iter()
        .filter_map(|c| c["Username"].as_str())
        .collect();
    assert_eq!(called.len(), users.len(), "{called:?}");
    let distinct: BTreeSet<&str> = called.iter().copied().collect();
    assert_eq!(distinct, users.iter().map(String::as_str).collect());

    let empty = eventually(Duration::from_secs(10), || async {
        queue_counts(&stack.sqs, &stack.queue_url).await == (0, 0)
    })
    .await;
    assert!(
        empty,
        "queue not empty: {:?}",
        queue_counts(&stack.sqs, &stack.queue_url).await
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

/// In process: every job sent once and deleted; the run's summary, this
/// campaign's series and its outcome lines agree.
#[tokio::test(flavor = "multi_thread")]
async fn happy_path_sends_every_job_once_and_metrics_agree() {
    let campaign = format!("it-happy-{}", random_suffix());
    let (stack, users) = stack_with_jobs(12, &campaign).await;

    let app = spawn_app(app_settings(&stack, fast()), None, false).await;
    let drained = eventually(DRAIN, || async {
        app.campaign_jobs(&campaign, "sent") >= 12.0
    })
    .await;
    assert!(drained, "the app did not finish 12 jobs");
    assert_eq!(app.ready(), 200);
    assert_sent_once_and_deleted(&stack, &users).await;
    for other in ["skipped", "rejected", "deferred", "released"] {
        assert_eq!(app.campaign_jobs(&campaign, other), 0.0, "{other}");
    }

    let summary = app.stop().await.expect("a clean stop");
    let sent = Summary {
        sent: 12,
        ..Summary::default()
    };
    assert_eq!(summary, sent);
    let outcomes = outcome_lines(&campaign);
    assert_eq!(outcomes.len(), 12, "{outcomes:#?}");
    for line in &outcomes {
        assert_eq!(line["outcome"], "sent", "{line}");
        assert!(!line.to_string().contains("@example.com"), "{line}");
    }
}

/// The binary on the happy path: its process-wide metrics agree with moto
/// and the queue, no personal data or secret reaches its log, and SIGTERM
/// ends it cleanly.
#[tokio::test]
async fn binary_metrics_and_logs_agree_with_moto() {
    let (stack, users) = stack_with_jobs(12, "it-happy").await;

    let worker = spawn_worker(&fast_env(&stack), &[]);
    let drained = eventually(DRAIN, || async {
        metric_value(&worker.metrics(), "reset_worker_jobs_total", &[]) >= 12.0
    })
    .await;
    assert!(drained, "worker did not finish 12 jobs");
    assert_eq!(worker.ready(), 200);
    assert_sent_once_and_deleted(&stack, &users).await;

    // Metrics agree with both sides.
    let m = worker.metrics();
    assert_eq!(
        metric_value(&m, "reset_worker_jobs_total", &[("outcome", "sent")]),
        12.0
    );
    assert_eq!(
        metric_value(&m, "reset_worker_jobs_total", &[("outcome", "rejected")]),
        0.0
    );
    assert_eq!(
        metric_value(
            &m,
            "reset_worker_cognito_requests_total",
            &[("result", "ok")]
        ),
        12.0
    );
    assert_eq!(
        metric_value(&m, "reset_worker_code_deliveries_total", &[]),
        12.0
    );
    assert!(
        metric_value(
            &m,
            "reset_worker_sqs_requests_total",
            &[("operation", "DeleteMessageBatch"), ("result", "ok")]
        ) >= 2.0,
        "12 deletes need at least 2 batches"
    );
    assert_eq!(
        metric_value(&m, "reset_worker_job_age_seconds_count", &[]),
        12.0
    );
    assert_eq!(
        metric_value(&m, "reset_worker_job_age_seconds_bucket", &[("le", "+Inf")]),
        12.0
    );
    assert_eq!(metric_value(&m, "reset_worker_build_info", &[]), 1.0);
    assert_eq!(metric_value(&m, "reset_worker_in_flight_jobs", &[]), 0.0);

    // Personal data stays out of the logs.
    let logs = worker.logs();
    assert!(
        !logs.contains("@example.com"),
        "a username leaked into the logs"
    );
    assert!(
        !logs.contains(&stack.client_secret),
        "the client secret leaked"
    );
    assert_eq!(logs.matches("\"job outcome\"").count(), 12);

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn every_forgot_password_parameter_reaches_cognito() {
    let stack = Stack::new(false, &["alice@example.com", "bob@example.com"]).await;
    let full = json!({
        "username": "alice@example.com",
        "campaign_id": "breach-2026-11",
        "client_metadata": {"reason": "breach", "ticket": "SEC-1"},
        "user_context_data": {"ip_address": "203.0.113.7", "encoded_data": "ZW5jb2RlZA=="},
        "analytics_endpoint_id": "endpoint-42"
    })
    .to_string();
    // The same job through an SNS fan-out envelope.
    let inner =
        json!({"username": "bob@example.com", "client_metadata": {"team": "idp"}}).to_string();
    let sns = json!({
        "Type": "Notification", "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:resets", "Message": inner,
        "Timestamp": "2026-11-29T00:00:00.000Z", "SignatureVersion": "1"
    })
    .to_string();
    send_jobs(&stack, &[full, sns]).await;

    let mut env = fast_env(&stack);
    env.push((
        "RESET_WORKER_COGNITO__CLIENT_METADATA__REASON".into(),
        "policy".into(),
    ));
    env.push((
        "RESET_WORKER_COGNITO__CLIENT_METADATA__TEAM".into(),
        "security".into(),
    ));
    let mut worker = spawn_worker(&env, &["--until-empty"]);
    assert_eq!(
        worker.wait_exit(DRAIN),
        Some(0),
        "--until-empty must exit 0"
    );

    let calls = forgot_password_calls(&stack.moto, &stack.client_id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let by_user = |u: &str| {
        calls
            .iter()
            .find(|c| c["Username"] == u)
            .unwrap_or_else(|| panic!("no call for {u}"))
            .clone()
    };

    let alice = by_user("alice@example.com");
    assert_eq!(alice["ClientId"], stack.client_id.as_str());
    assert_eq!(
        alice["SecretHash"],
        secret_hash("alice@example.com", &stack.client_id, &stack.client_secret).as_str()
    );
    // Job values win over campaign defaults; defaults fill the rest.
    assert_eq!(
        alice["ClientMetadata"],
        json!({"reason": "breach", "ticket": "SEC-1", "team": "security"})
    );
    assert_eq!(
        alice["UserContextData"],
        json!({"IpAddress": "203.0.113.7", "EncodedData": "ZW5jb2RlZA=="})
    );
    assert_eq!(
        alice["AnalyticsMetadata"],
        json!({"AnalyticsEndpointId": "endpoint-42"})
    );

    let bob = by_user("bob@example.com");
    assert_eq!(
        bob["SecretHash"],
        secret_hash("bob@example.com", &stack.client_id, &stack.client_secret).as_str()
    );
    assert_eq!(
        bob["ClientMetadata"],
        json!({"reason": "policy", "team": "idp"})
    );
    assert!(bob.get("UserContextData").is_none());
    assert!(bob.get("AnalyticsMetadata").is_none());

    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    let logs = worker.logs();
    assert!(
        logs.contains("breach-2026-11"),
        "campaign id belongs in the outcome line"
    );
    assert!(!logs.contains("alice@example.com") && !logs.contains("bob@example.com"));
}

#[tokio::test]
async fn malformed_bodies_reach_the_dead_letter_queue_with_the_original_body() {
    let stack = Stack::new(false, &["ok@example.com"]).await;
    let bad = [
        ("not json at all".to_string(), "invalid_json"),
        ("[1,2,3]".to_string(), "invalid_shape"),
        (
            r#"{"user_name":"typo@example.com"}"#.to_string(),
            "invalid_shape",
        ),
        (r#"{"username":""}"#.to_string(), "invalid_field"),
        (
            format!(r#"{{"username":"{}"}}"#, "x".repeat(129)),
            "invalid_field",
        ),
        (r#"{"username":"a\u0007b"}"#.to_string(), "invalid_field"),
        (
            r#"{"username":"c@example.com","client_metadata":{"n":1}}"#.to_string(),
            "invalid_shape",
        ),
    ];
    let mut bodies: Vec<String> = bad.iter().map(|(b, _)| b.clone()).collect();
    bodies.push(job("ok@example.com"));
    send_jobs(&stack, &bodies).await;

    let mut worker = spawn_worker(&fast_env(&stack), &["--until-empty"]);
    assert_eq!(worker.wait_exit(DRAIN), Some(0));

    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    let dead = drain_all(&stack.sqs, &stack.dlq_url).await;
    assert_eq!(dead.len(), bad.len());
    for (body, reason) in &bad {
        let m = dead
            .iter()
            .find(|m| m.body() == Some(body.as_str()))
            .unwrap_or_else(|| panic!("{body} not in the dead-letter queue"));
        let attrs = m.message_attributes().expect("attributes");
        assert_eq!(
            attrs["reset_worker_reason"].string_value(),
            Some(*reason),
            "{body}"
        );
        assert!(attrs.contains_key("reset_worker_source_message_id"));
    }
    // Only the valid job was sent.
    let calls = forgot_password_calls(&stack.moto, &stack.client_id);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["Username"], "ok@example.com");
    let logs = worker.logs();
    assert!(!logs.contains("typo@example.com") && !logs.contains("c@example.com"));
    assert!(logs.contains(r#""sent":1"#) && logs.contains(&format!(r#""rejected":{}"#, bad.len())));
}

/// In process, until the queue is drained.
#[tokio::test(flavor = "multi_thread")]
async fn fifo_queue_is_processed_and_drained() {
    let users: Vec<String> = (0..9).map(|i| format!("fifo{i}@example.com")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(true, &user_refs).await;
    let mut bodies: Vec<String> = users.iter().map(|u| job(u)).collect();
    bodies.push("garbage".into());
    send_jobs(&stack, &bodies).await;

    let summary = spawn_app(app_settings(&stack, fast()), None, true)
        .await
        .finished(DRAIN)
        .await
        .expect("the drained run ends without an error");
    let expected = Summary {
        sent: 9,
        rejected: 1,
        ..Summary::default()
    };
    assert_eq!(summary, expected);

    let calls = forgot_password_calls(&stack.moto, &stack.client_id);
    let called: BTreeSet<String> = calls
        .iter()
        .filter_map(|c| c["Username"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(calls.len(), 9);
    assert_eq!(called, users.iter().cloned().collect());
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    // The rejected message went to the FIFO dead-letter queue, keeping its group.
    let dead = drain_all(&stack.sqs, &stack.dlq_url).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body(), Some("garbage"));
    let group = dead[0]
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId))
        .cloned();
    assert_eq!(group.as_deref(), Some("g0"), "index 9 was sent in group g0");
}

#[tokio::test]
async fn configuration_errors_name_the_key_and_exit_2() {
    let stack = Stack::new(false, &[]).await;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("RESET_WORKER_LIMITS__CONCURRENCY", "0")],
            "limits.concurrency",
        ),
        (vec![("RESET_WORKER_LIMITS__CONCURENCY", "4")], "concurency"),
        (
            vec![("RESET_WORKER_SQS__WAIT_TIME_SECONDS", "30")],
            "sqs.wait_time_seconds",
        ),
        (
            vec![("RESET_WORKER_SQS__QUEUE_URL", "not-a-url")],
            "sqs.queue_url",
        ),
        (
            vec![(
                "RESET_WORKER_COGNITO__CLIENT_SECRET_FILE",
                "/nonexistent/secret",
            )],
            "client_secret_file",
        ),
        (vec![("RESET_WORKER_METRICS__LISTEN", "nowhere")], "listen"),
    ];
    for (overrides, expected) in cases {
        let mut env = stack_env(&stack);
        for (k, v) in &overrides {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        if overrides.iter().any(|(k, _)| k.contains("SECRET_FILE")) {
            env.retain(|(k, _)| k != "RESET_WORKER_COGNITO__CLIENT_SECRET");
        }
        let mut worker = spawn_worker(&env, &[]);
        assert_eq!(
            worker.wait_exit(Duration::from_secs(20)),
            Some(2),
            "{overrides:?}"
        );
        let logs = worker.logs();
        assert!(
            logs.to_lowercase().contains(expected),
            "{overrides:?}: {logs}"
        );
        assert!(
            !logs.contains(&stack.client_secret),
            "secret in config error output"
        );
    }

    // Missing required key.
    let env: Vec<(String, String)> = stack_env(&stack)
        .into_iter()
        .filter(|(k, _)| k != "RESET_WORKER_COGNITO__CLIENT_ID")
        .collect();
    let mut worker = spawn_worker(&env, &[]);
    assert_eq!(worker.wait_exit(Duration::from_secs(20)), Some(2));
    assert!(worker.logs().contains("client_id"), "{}", worker.logs());

    // A queue that does not exist fails the start-up check (exit 1).
    let mut env = stack_env(&stack);
    env.retain(|(k, _)| k != "RESET_WORKER_SQS__QUEUE_URL");
    env.push((
        "RESET_WORKER_SQS__QUEUE_URL".into(),
        format!("{}/123456789012/no-such-queue", stack.moto),
    ));
    let mut worker = spawn_worker(&env, &[]);
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(1));
    assert!(
        worker.logs().contains("GetQueueAttributes"),
        "{}",
        worker.logs()
    );
}
