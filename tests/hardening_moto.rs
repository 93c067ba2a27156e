//! Hardening regressions that need SQS's own semantics (FIFO message groups,
//! batch and message size limits), so they run against moto; Cognito is a
//! wiremock server where a test needs a per-user answer moto cannot give.
//! Each test names the defect it pins down (issue "Hardening", #6, #7, #8).

mod support;

use std::time::Duration;

use reset_worker::app::{App, Clients};
use reset_worker::aws::{cognito, sqs};
use reset_worker::worker::RunOptions;
use serde_json::json;
use support::*;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{body_partial_json, header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const COGNITO_JSON: &str = "application/x-amz-json-1.1";
const FORGOT_PASSWORD: &str = "AWSCognitoIdentityProviderService.ForgotPassword";

/// A JSONL row of about `kib` KiB, up to about 116 KiB (client metadata of
/// up to 50 × 2 KB and 16 KiB of encoded context data: the job format's own
/// limits).
fn big_row(user: &str, kib: usize) -> String {
    let context = kib.saturating_sub(100).min(16) * 1000;
    let metadata: serde_json::Map<String, serde_json::Value> = (0..(kib / 2).min(50))
        .map(|i| (format!("k{i:02}"), json!("x".repeat(2040))))
        .collect();
    json!({
        "username": user,
        "client_metadata": metadata,
        "user_context_data": {"encoded_data": "y".repeat(context)},
    })
    .to_string()
}

/// #8: batches were cut by count only; ten rows of ~116 KB exceed the
/// SendMessageBatch limit (1 MiB on moto, as on SQS) on every try, and a
/// `--resume` could never finish. A row over the queue's
/// MaximumMessageSize goes to the rejects file.
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_packs_batches_by_bytes_and_rejects_oversize_rows() {
    let stack = Stack::new(false, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.jsonl");
    let rows: Vec<String> = (0..10)
        .map(|i| big_row(&format!("big{i}@example.com"), 116))
        .collect();
    std::fs::write(&file, rows.join("\n")).unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = run_cli(&stack, &[], &["enqueue", "--campaign", "c-big", path], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("enqueued 10"), "{out}");
    assert_eq!(drain_all(&stack.sqs, &stack.queue_url).await.len(), 10);

    // The queue takes at most 60 KB a message: the ~100 KB row is rejected.
    stack
        .sqs
        .set_queue_attributes()
        .queue_url(&stack.queue_url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize,
            "60000",
        )
        .send()
        .await
        .unwrap();
    let file = dir.path().join("mixed.jsonl");
    let rows = [
        big_row("small@example.com", 2),
        big_row("huge@example.com", 100),
    ];
    std::fs::write(&file, rows.join("\n")).unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-mixed", path],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("enqueued 1") && out.contains("invalid 1"),
        "{out}"
    );
    let rejects = std::fs::read_to_string(format!("{path}.rejects.csv")).unwrap();
    assert!(rejects.contains("MaximumMessageSize"), "{rejects}");
    assert!(rejects.starts_with("line,reason\n2,"), "{rejects}");
}

/// #7: a checkpoint was matched to its input by job count only, so a
/// reordered file of the same size resumed against the wrong entries.
#[tokio::test(flavor = "multi_thread")]
async fn resume_refuses_a_reordered_input_and_sends_only_unrecorded_entries() {
    let stack = Stack::new(false, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    let users: Vec<String> = (0..12).map(|i| format!("o{i}@example.com")).collect();
    std::fs::write(&file, users.join("\n")).unwrap();
    let path = file.to_str().unwrap();

    // An interrupted run that got entries 0..5 of this input accepted.
    write_checkpoint(path, "c-order", &users, &[0, 1, 2, 3, 4]);

    // The same users in another order: refused, nothing sent.
    let mut reordered = users.clone();
    reordered.reverse();
    std::fs::write(&file, reordered.join("\n")).unwrap();
    let (code, _, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-order", "--resume", path],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another input"), "{err}");
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));

    // The original order: only the 7 unrecorded entries.
    std::fs::write(&file, users.join("\n")).unwrap();
    let (code, out, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-order", "--resume", path],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enqueued 7, already enqueued 5"), "{out}");
    let mut sent: Vec<String> = drain_all(&stack.sqs, &stack.queue_url)
        .await
        .iter()
        .map(|m| {
            let body: serde_json::Value = serde_json::from_str(m.body().unwrap_or("{}")).unwrap();
            body["username"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    sent.sort();
    let mut expected = users[5..].to_vec();
    expected.sort();
    assert_eq!(sent, expected);
}

/// #6: on a FIFO queue a deferred (hidden) message held back its whole
/// message group, and `--until-empty` exited 0 with the rest of the group
/// unprocessed. Now the deferred job goes to the group's tail and the run
/// waits for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_deferral_does_not_stall_its_group() {
    let users = [
        "a@example.com",
        "x1@example.com",
        "x2@example.com",
        "b@example.com",
    ];
    let stack = Stack::new(true, &users).await;
    // send_jobs puts job i in group g{i % 3}: a and b share g0, a first.
    let bodies: Vec<String> = users
        .iter()
        .map(|u| json!({"username": u, "campaign_id": "c-fifo-defer"}).to_string())
        .collect();
    send_jobs(&stack, &bodies).await;

    let cognito_mock = MockServer::start().await;
    let delivered = ResponseTemplate::new(200).set_body_raw(
        json!({"CodeDeliveryDetails": {"DeliveryMedium": "EMAIL"}}).to_string(),
        COGNITO_JSON,
    );
    // a: the per-user limit once, then a code.
    Mock::given(method("POST"))
        .and(header("x-amz-target", FORGOT_PASSWORD))
        .and(body_partial_json(json!({"Username": "a@example.com"})))
        .respond_with(
            ResponseTemplate::new(400).set_body_raw(
                json!({"__type": "LimitExceededException", "message": "Attempt limit exceeded"})
                    .to_string(),
                COGNITO_JSON,
            ),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&cognito_mock)
        .await;
    Mock::given(method("POST"))
        .and(header("x-amz-target", FORGOT_PASSWORD))
        .respond_with(delivered)
        .with_priority(2)
        .mount(&cognito_mock)
        .await;

    let settings = support::app::app_settings(
        &stack,
        json!({"retry": {"limit_exceeded_delay_seconds": 5}}),
    );
    let clients = Clients {
        sqs: sqs::build_client(&sdk_config(&stack.moto)),
        cognito: cognito::build_client(&sdk_config(&cognito_mock.uri()), &settings.cognito),
        dynamodb: reset_worker::ledger::dynamodb::build_client(&sdk_config(&stack.moto)),
    };
    let app = App::build_with(settings, None, clients).await.unwrap();
    let summary = tokio::time::timeout(
        Duration::from_secs(90),
        app.run_until_stopped(
            CancellationToken::new(),
            RunOptions {
                until_empty_polls: Some(2),
            },
        ),
    )
    .await
    .expect("drained within 90 s")
    .expect("run ends cleanly");

    let calls_for = |user: &str| {
        let user = user.to_owned();
        let mock = &cognito_mock;
        async move {
            mock.received_requests()
                .await
                .unwrap_or_default()
                .iter()
                .filter(|r| {
                    serde_json::from_slice::<serde_json::Value>(&r.body)
                        .is_ok_and(|b| b["Username"] == user.as_str())
                })
                .count()
        }
    };
    assert_eq!(
        summary.sent, 4,
        "every user sent before the run ends: {summary:?}"
    );
    assert_eq!(calls_for("b@example.com").await, 1);
    assert_eq!(
        calls_for("a@example.com").await,
        2,
        "limited once, then sent"
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
}
