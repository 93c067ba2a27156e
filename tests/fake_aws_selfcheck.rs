//! Checks the in-process fake of SQS + Cognito (tests/support/fake_aws.rs)
//! that the benchmark (tests/bench_rate.rs) runs against: its wire format
//! through the real AWS SDK clients, and the real worker binary draining a
//! queue through it (with and without `cognito.sign_out`). No moto, loopback
//! only, a few seconds.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use support::fake_aws::{
    DEAD_LETTER_QUEUE, FakeAws, FakeConfig, MAIN_QUEUE, SqsOp, WorkerRun, md5_hex, run_worker,
};

const SIGN_OUT_TARGET: &str = "AWSCognitoIdentityProviderService.AdminUserGlobalSignOut";

/// Our use of the `md-5` crate (lower-case hex of the digest) against the
/// RFC 1321 test suite.
#[test]
fn md5_matches_rfc1321_test_suite() {
    for (input, digest) in [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "abcdefghijklmnopqrstuvwxyz",
            "c3fcd3d76192e4007dfb496cca67e13b",
        ),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "d174ab98d277d9f5a5611c2c9f419d9f",
        ),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ] {
        assert_eq!(md5_hex(input.as_bytes()), digest, "MD5({input:?})");
    }
}

#[tokio::test]
async fn sqs_sdk_round_trip_through_the_fake() {
    let fake = FakeAws::start(FakeConfig::default());
    let sqs = support::sqs_client(&fake.url()).await;
    let url = fake.queue_url();

    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .unwrap_or_default();
    assert_eq!(
        attrs.get(&QueueAttributeName::QueueArn).map(String::as_str),
        Some("arn:aws:sqs:us-east-1:123456789012:bench")
    );
    assert!(attrs.contains_key(&QueueAttributeName::RedrivePolicy));
    let missing = sqs
        .get_queue_attributes()
        .queue_url(format!("{}/123456789012/nope", fake.url()))
        .send()
        .await
        .expect_err("unknown queue");
    assert!(
        missing.into_service_error().is_queue_does_not_exist(),
        "unknown queue maps to QueueDoesNotExist"
    );

    let mut batch = sqs.send_message_batch().queue_url(&url);
    for i in 0..3 {
        batch = batch.entries(
            SendMessageBatchRequestEntry::builder()
                .id(format!("e{i}"))
                .message_body(format!("body {i}"))
                .build()
                .expect("entry"),
        );
    }
    let sent = batch.send().await.expect("SendMessageBatch");
    assert_eq!(sent.successful.len(), 3);
    assert_eq!(sent.successful[0].md5_of_message_body, md5_hex(b"body 0"));

    let received = sqs
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .visibility_timeout(30)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
        .send()
        .await
        .expect("ReceiveMessage")
        .messages
        .unwrap_or_default();
    assert_eq!(received.len(), 3);
    for m in &received {
        let body = m.body.as_deref().expect("body");
        assert_eq!(
            m.md5_of_body.as_deref(),
            Some(md5_hex(body.as_bytes()).as_str())
        );
        let sys = m.attributes.as_ref().expect("system attributes");
        assert_eq!(
            sys.get(&MessageSystemAttributeName::ApproximateReceiveCount)
                .map(String::as_str),
            Some("1")
        );
        assert!(sys.contains_key(&MessageSystemAttributeName::SentTimestamp));
    }
    assert_eq!(fake.queue_counts(MAIN_QUEUE), (0, 3));

    // Release one at once: it is received again with receive count 2.
    let first = received[0].receipt_handle.clone().expect("receipt");
    sqs.change_message_visibility()
        .queue_url(&url)
        .receipt_handle(&first)
        .visibility_timeout(0)
        .send()
        .await
        .expect("ChangeMessageVisibility");
    let again = sqs
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .expect("ReceiveMessage again")
        .messages
        .unwrap_or_default();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].attributes.as_ref().and_then(|a| a
            .get(&MessageSystemAttributeName::ApproximateReceiveCount)
            .cloned()),
        Some("2".to_string())
    );

    // Delete all three: the outdated receipt of the first "succeeds" without
    // deleting, as in SQS; the current one deletes it.
    let mut delete = sqs.delete_message_batch().queue_url(&url);
    let handles = [
        first.clone(),
        received[1].receipt_handle.clone().expect("receipt"),
        received[2].receipt_handle.clone().expect("receipt"),
        again[0].receipt_handle.clone().expect("receipt"),
    ];
    for (i, h) in handles.iter().enumerate() {
        delete = delete.entries(
            DeleteMessageBatchRequestEntry::builder()
                .id(format!("d{i}"))
                .receipt_handle(h)
                .build()
                .expect("entry"),
        );
    }
    let deleted = delete.send().await.expect("DeleteMessageBatch");
    assert_eq!(deleted.successful.len(), 4);
    assert!(deleted.failed.is_empty());
    assert_eq!(fake.queue_depth(), 0);
    let stats = fake.sqs_stats();
    assert_eq!(stats.messages_deleted, 3);
    assert_eq!(stats.stale_deletes, 1);
    assert_eq!(stats.redeliveries, 1);
    assert_eq!(fake.sqs_requests(SqsOp::ReceiveMessage), 2);
    assert_eq!(fake.sqs_requests(SqsOp::DeleteMessageBatch), 1);
    assert_eq!(fake.unknown_operations(), 0);

    // A long poll on an empty queue waits, then answers with no messages.
    let started = std::time::Instant::now();
    let empty = sqs
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(1)
        .send()
        .await
        .expect("empty ReceiveMessage");
    assert!(empty.messages.unwrap_or_default().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(fake.sqs_stats().empty_receives, 1);
}

#[tokio::test]
async fn delete_failures_and_redrive_are_injected() {
    let fake = FakeAws::start(FakeConfig {
        delete_failure_fraction: 1.0,
        max_receive_count: 1,
        ..FakeConfig::default()
    });
    let sqs = support::sqs_client(&fake.url()).await;
    let url = fake.queue_url();
    fake.enqueue(["one"]);
    let m = sqs
        .receive_message()
        .queue_url(&url)
        .visibility_timeout(0)
        .send()
        .await
        .expect("ReceiveMessage")
        .messages
        .unwrap_or_default();
    assert_eq!(m.len(), 1);
    let out = sqs
        .delete_message_batch()
        .queue_url(&url)
        .entries(
            DeleteMessageBatchRequestEntry::builder()
                .id("x")
                .receipt_handle(m[0].receipt_handle.clone().expect("receipt"))
                .build()
                .expect("entry"),
        )
        .send()
        .await
        .expect("DeleteMessageBatch");
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].code, "InternalError");
    assert!(!out.failed[0].sender_fault);
    // Received once already (the limit): the next receive moves it to the DLQ.
    let none = sqs
        .receive_message()
        .queue_url(&url)
        .send()
        .await
        .expect("ReceiveMessage");
    assert!(none.messages.unwrap_or_default().is_empty());
    assert_eq!(fake.queue_depth(), 0);
    assert_eq!(fake.queue_counts(DEAD_LETTER_QUEUE), (1, 0));
}

#[tokio::test]
async fn cognito_sdk_sees_delivery_and_throttling() {
    use aws_sdk_cognitoidentityprovider::types::DeliveryMediumType;
    // A bucket of 1 that hardly refills: the first call passes, the second
    // is throttled (SDK retries off, as in the worker).
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::ZERO,
        throttle: Some((0.001, 1.0)),
        ..FakeConfig::default()
    });
    let cognito = aws_sdk_cognitoidentityprovider::Client::from_conf(
        support::cognito_client(&fake.url())
            .await
            .config()
            .to_builder()
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build(),
    );
    let ok = cognito
        .forgot_password()
        .client_id("bench")
        .username("alice@example.com")
        .send()
        .await
        .expect("ForgotPassword");
    let details = ok.code_delivery_details.expect("CodeDeliveryDetails");
    assert_eq!(details.delivery_medium, Some(DeliveryMediumType::Email));
    assert_eq!(details.attribute_name.as_deref(), Some("email"));
    assert_eq!(details.destination.as_deref(), Some("x***@e***"));

    let err = cognito
        .forgot_password()
        .client_id("bench")
        .username("bob@example.com")
        .send()
        .await
        .expect_err("throttled");
    assert!(
        err.into_service_error().is_too_many_requests_exception(),
        "TooManyRequestsException"
    );
    assert_eq!(fake.accepted_usernames(), vec!["alice@example.com"]);
    assert_eq!(fake.accepted_call_times().len(), 1);
    assert_eq!(fake.throttled_count(), 1);

    // An operation the fake does not implement.
    let unknown = cognito
        .admin_get_user()
        .user_pool_id("us-east-1_x")
        .username("alice")
        .send()
        .await
        .expect_err("unknown operation");
    assert_eq!(
        aws_sdk_cognitoidentityprovider::error::ProvideErrorMetadata::code(&unknown),
        Some("UnknownOperationException")
    );
    assert_eq!(fake.unknown_operations(), 1);
}

/// AdminUserGlobalSignOut answers `{}`, is recorded apart from
/// ForgotPassword, and draws on the same token bucket.
#[tokio::test]
async fn sign_out_shares_the_bucket_with_forgot_password() {
    // Two tokens that hardly refill: a reset and a sign-out pass, the next
    // sign-out finds the bucket empty.
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::ZERO,
        throttle: Some((0.001, 2.0)),
        ..FakeConfig::default()
    });
    let cognito = aws_sdk_cognitoidentityprovider::Client::from_conf(
        support::cognito_client(&fake.url())
            .await
            .config()
            .to_builder()
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build(),
    );
    cognito
        .forgot_password()
        .client_id("bench")
        .username("alice@example.com")
        .send()
        .await
        .expect("ForgotPassword");
    cognito
        .admin_user_global_sign_out()
        .user_pool_id("us-east-1_bench")
        .username("alice@example.com")
        .send()
        .await
        .expect("AdminUserGlobalSignOut");
    let err = cognito
        .admin_user_global_sign_out()
        .user_pool_id("us-east-1_bench")
        .username("bob@example.com")
        .send()
        .await
        .expect_err("throttled");
    assert!(
        err.into_service_error().is_too_many_requests_exception(),
        "TooManyRequestsException"
    );
    assert_eq!(fake.accepted_usernames(), vec!["alice@example.com"]);
    assert_eq!(
        fake.accepted_sign_out_usernames(),
        vec!["alice@example.com"]
    );
    assert_eq!(fake.accepted_sign_out_times().len(), 1);
    assert_eq!(fake.throttled_sign_out_times().len(), 1);
    assert_eq!(fake.throttled_sign_out_count(), 1);
    // The sign-out's throttle is its own, not ForgotPassword's.
    assert_eq!(fake.throttled_count(), 0);
    assert_eq!(fake.unknown_operations(), 0);

    // The pool is required, as in Cognito.
    let raw = reqwest::Client::new()
        .post(fake.url())
        .header("x-amz-target", SIGN_OUT_TARGET)
        .header("content-type", "application/x-amz-json-1.1")
        .body(r#"{"Username":"carol@example.com"}"#)
        .send()
        .await
        .expect("raw sign-out");
    assert_eq!(raw.status(), 400);
    assert_eq!(fake.cognito_rejected_count(), 1);
    assert_eq!(fake.accepted_sign_out_usernames().len(), 1);
}

/// With `cognito.sign_out` the worker signs every reset user out once, after
/// the reset, through the fake.
#[test]
fn worker_binary_signs_out_through_the_fake() {
    let (fake, users, run) = drain_through_the_fake(
        20,
        &[
            ("RESET_WORKER_LIMITS__CONCURRENCY", "8"),
            ("RESET_WORKER_COGNITO__SIGN_OUT", "true"),
            ("RESET_WORKER_COGNITO__USER_POOL_ID", "us-east-1_bench"),
        ],
    );
    let want: BTreeSet<&str> = users.iter().map(String::as_str).collect();
    let reset = fake.accepted_usernames();
    let signed_out = fake.accepted_sign_out_usernames();
    assert_eq!(reset.len(), 20, "worker log:\n{}", run.log);
    assert_eq!(signed_out.len(), 20, "worker log:\n{}", run.log);
    assert_eq!(
        reset.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        want
    );
    assert_eq!(
        signed_out
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        want
    );
    // Each user's sign-out arrives after their reset was answered.
    let resets: std::collections::HashMap<String, std::time::Instant> =
        fake.accepted_resets_by_user().into_iter().collect();
    for (user, signed_out_at) in fake.accepted_sign_outs_by_user() {
        let reset_at = resets[&user];
        assert!(
            signed_out_at >= reset_at + Duration::from_millis(2),
            "{user}: sign-out {:?} after the reset",
            signed_out_at.saturating_duration_since(reset_at)
        );
    }
    assert_eq!(fake.unknown_operations(), 0);
    assert_eq!(fake.cognito_rejected_count(), 0);
    assert_eq!(fake.queue_depth(), 0, "queue not empty");
    assert_eq!(
        run.summary_field("sent"),
        Some(20),
        "worker log:\n{}",
        run.log
    );
}

/// Starts the fake with `n` users' jobs queued and runs the worker binary
/// on them until the queue is empty, uncapped (1000/s), with `env` on top;
/// checks it exited 0.
fn drain_through_the_fake(n: usize, env: &[(&str, &str)]) -> (FakeAws, Vec<String>, WorkerRun) {
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(2),
        ..FakeConfig::default()
    });
    let users: Vec<String> = (0..n).map(|i| format!("user{i}@example.com")).collect();
    fake.enqueue(
        users
            .iter()
            .map(|u| serde_json::json!({"username": u, "campaign_id": "selfcheck"}).to_string()),
    );
    let mut all_env = vec![
        ("RESET_WORKER_LIMITS__MAX_RPS", "1000"),
        ("RESET_WORKER_LIMITS__BURST", "100"),
    ];
    all_env.extend_from_slice(env);
    let run = run_worker(
        &fake,
        &all_env,
        &["--until-empty", "--empty-polls", "1"],
        Duration::from_secs(20),
    );
    assert_eq!(run.exit_code, Some(0), "worker log:\n{}", run.log);
    (fake, users, run)
}

#[test]
fn worker_binary_drains_fifty_jobs_through_the_fake() {
    let (fake, users, run) =
        drain_through_the_fake(50, &[("RESET_WORKER_LIMITS__CONCURRENCY", "16")]);
    let called = fake.accepted_usernames();
    assert_eq!(called.len(), 50, "worker log:\n{}", run.log);
    let distinct: BTreeSet<&str> = called.iter().map(String::as_str).collect();
    assert_eq!(distinct, users.iter().map(String::as_str).collect());
    assert_eq!(fake.throttled_count(), 0);
    assert_eq!(fake.queue_depth(), 0, "queue not empty");
    assert_eq!(fake.unknown_operations(), 0);
    assert_eq!(fake.cognito_rejected_count(), 0);
    assert_eq!(
        run.summary_field("sent"),
        Some(50),
        "worker log:\n{}",
        run.log
    );
    assert!(run.peak_rss_kib > 0 && !run.cpu.is_zero(), "{run:?}");
}
