//! Checks the test harness itself against moto: stacks, queue helpers and the
//! ForgotPassword recording. Needs no worker.

mod support;

use std::collections::BTreeMap;

use support::*;

fn job(username: &str, n: usize) -> String {
    serde_json::json!({
        "username": username,
        "campaign_id": "selfcheck",
        "client_metadata": {"n": n.to_string()},
    })
    .to_string()
}

#[tokio::test]
async fn standard_stack_queue_helpers_and_forgot_password_recording() {
    let stack = Stack::new(false, &["alice@example.com", "bob"]).await;
    assert!(!stack.queue_url.ends_with(".fifo"));

    let attrs = stack
        .sqs
        .get_queue_attributes()
        .queue_url(&stack.queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    let attr = |name: &str| attrs.get(&name.into()).cloned().unwrap_or_default();
    assert_eq!(attr("VisibilityTimeout"), "30");
    let redrive: serde_json::Value = serde_json::from_str(&attr("RedrivePolicy")).unwrap();
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "5"
    );
    assert!(
        redrive["deadLetterTargetArn"]
            .as_str()
            .unwrap()
            .ends_with(stack.dlq_url.rsplit('/').next().unwrap())
    );

    let user = stack
        .cognito
        .admin_get_user()
        .user_pool_id(&stack.user_pool_id)
        .username("bob")
        .send()
        .await
        .unwrap();
    let email = user
        .user_attributes()
        .iter()
        .find(|a| a.name() == "email")
        .and_then(|a| a.value());
    assert_eq!(email, Some("bob@example.com"));

    let bodies: Vec<String> = (0..12).map(|n| job("alice@example.com", n)).collect();
    send_jobs(&stack, &bodies).await;
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (12, 0));
    let env = stack_env(&stack);
    assert_eq!(env.len(), 5);
    assert!(env.contains(&(
        "RESET_WORKER_LEDGER__PATH".into(),
        stack.ledger_path.clone()
    )));
    assert!(env.contains(&(
        "RESET_WORKER_COGNITO__CLIENT_SECRET".into(),
        stack.client_secret.clone()
    )));

    let drained = drain_all(&stack.sqs, &stack.queue_url).await;
    let mut got: Vec<String> = drained
        .iter()
        .map(|m| m.body().unwrap().to_string())
        .collect();
    let mut want = bodies.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(drained.iter().all(|m| m.attributes().is_some_and(|a| {
        a.contains_key(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
    })));
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));

    // A ForgotPassword call made with the Rust SDK shows up in moto's recording.
    let hash = secret_hash("alice@example.com", &stack.client_id, &stack.client_secret);
    stack
        .cognito
        .forgot_password()
        .client_id(&stack.client_id)
        .username("alice@example.com")
        .secret_hash(&hash)
        .client_metadata("reason", "selfcheck")
        .send()
        .await
        .unwrap();
    let calls = forgot_password_calls(&stack.moto, &stack.client_id);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["ClientId"], stack.client_id.as_str());
    assert_eq!(calls[0]["Username"], "alice@example.com");
    assert_eq!(calls[0]["SecretHash"], hash.as_str());
    assert_eq!(calls[0]["ClientMetadata"]["reason"], "selfcheck");
    assert!(forgot_password_calls(&stack.moto, "some-other-client").is_empty());
}

#[tokio::test]
async fn fifo_stack_groups_and_unknown_user_forgot_password() {
    let stack = Stack::new(true, &["carol@example.com"]).await;
    assert!(stack.queue_url.ends_with(".fifo"));
    assert!(stack.dlq_url.ends_with(".fifo"));

    let bodies: Vec<String> = (0..7).map(|n| job("carol@example.com", n)).collect();
    send_jobs(&stack, &bodies).await;
    // Same bodies again: the deduplication ids differ per call, so all are kept.
    send_jobs(&stack, &bodies[..2]).await;
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (9, 0));

    let drained = drain_all(&stack.sqs, &stack.queue_url).await;
    assert_eq!(drained.len(), 9);
    let mut by_group: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &drained {
        let group = m
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId))
            .cloned()
            .expect("MessageGroupId");
        by_group
            .entry(group)
            .or_default()
            .push(m.body().unwrap().to_string());
    }
    assert_eq!(
        by_group.keys().cloned().collect::<Vec<_>>(),
        ["g0", "g1", "g2"]
    );
    // Order is kept within a group: message i of a call went to group g{i % 3}.
    let b = |i: usize| bodies[i].clone();
    assert_eq!(by_group["g0"], [b(0), b(3), b(6), b(0)]);
    assert_eq!(by_group["g1"], [b(1), b(4), b(1)]);
    assert_eq!(by_group["g2"], [b(2), b(5)]);
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));

    // moto answers 200 for a user that does not exist; the call is still recorded.
    stack
        .cognito
        .forgot_password()
        .client_id(&stack.client_id)
        .username("nobody@example.com")
        .send()
        .await
        .unwrap();
    let calls = forgot_password_calls(&stack.moto, &stack.client_id);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["Username"], "nobody@example.com");
    assert!(calls[0].get("SecretHash").is_none());
}

#[test]
fn metric_value_parses_prometheus_text() {
    let text = "\
# HELP reset_worker_jobs_total Jobs by outcome.
# TYPE reset_worker_jobs_total counter
reset_worker_jobs_total{outcome=\"sent\"} 4
reset_worker_jobs_total{outcome=\"skipped\"} 1
reset_worker_jobs_total_extra{outcome=\"sent\"} 100
# TYPE reset_worker_cognito_requests_total counter
reset_worker_cognito_requests_total{result=\"error\",code=\"LimitExceededException\"} 2
reset_worker_cognito_requests_total{result=\"ok\",code=\"none\"} 5
# HELP reset_worker_job_age_seconds Time from SentTimestamp to outcome.
# TYPE reset_worker_job_age_seconds histogram
reset_worker_job_age_seconds_bucket{le=\"1\"} 3
reset_worker_job_age_seconds_bucket{le=\"10\"} 5
reset_worker_job_age_seconds_bucket{le=\"+Inf\"} 6
reset_worker_job_age_seconds_sum 42.5
reset_worker_job_age_seconds_count 6
reset_worker_up 1
";
    assert_eq!(metric_value(text, "reset_worker_jobs_total", &[]), 5.0);
    assert_eq!(
        metric_value(text, "reset_worker_jobs_total", &[("outcome", "sent")]),
        4.0
    );
    assert_eq!(
        metric_value(text, "reset_worker_jobs_total", &[("outcome", "deferred")]),
        0.0
    );
    assert_eq!(
        metric_value(
            text,
            "reset_worker_cognito_requests_total",
            &[("result", "error"), ("code", "LimitExceededException")]
        ),
        2.0
    );
    assert_eq!(
        metric_value(text, "reset_worker_cognito_requests_total", &[]),
        7.0
    );
    // A histogram: `_count` and `_sum` as they are, `_bucket` by `le`.
    let age = "reset_worker_job_age_seconds";
    assert_eq!(metric_value(text, &format!("{age}_count"), &[]), 6.0);
    assert_eq!(metric_value(text, &format!("{age}_sum"), &[]), 42.5);
    assert_eq!(
        metric_value(text, &format!("{age}_bucket"), &[("le", "10")]),
        5.0
    );
    assert_eq!(
        metric_value(text, &format!("{age}_bucket"), &[("le", "+Inf")]),
        6.0
    );
    assert_eq!(
        metric_value(text, &format!("{age}_bucket"), &[("le", "2")]),
        0.0
    );
    assert_eq!(metric_value(text, "reset_worker_up", &[]), 1.0);
    assert_eq!(metric_value(text, "missing", &[]), 0.0);
    // A known vector, computed independently with Python.
    assert_eq!(
        secret_hash("alice@example.com", "client", "secret"),
        "VV/Kof4y6G9QerAHhtPWq5OPHTboXmdmMYR+JgibD0M="
    );
}
