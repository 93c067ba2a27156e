//! Hostile message bodies: each must end `rejected` in the dead-letter queue
//! with its original body and a reason, while the worker stays healthy and
//! keeps sending valid jobs.

mod support;

use std::time::Duration;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use support::*;

fn hostile_bodies() -> Vec<(String, &'static str)> {
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let huge_meta: serde_json::Map<String, serde_json::Value> = (0..51)
        .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
        .collect();
    let near_max = format!(
        r#"{{"username":"big@example.com","client_metadata":{{"pad":"{}"}}}}"#,
        "x".repeat(250 * 1024)
    );
    vec![
        ("not json".into(), "invalid_json"),
        ("   ".into(), "invalid_json"),
        ("{".into(), "invalid_json"),
        ("[]".into(), "invalid_shape"),
        (r#"["username","a@example.com"]"#.into(), "invalid_shape"),
        ("null".into(), "invalid_shape"),
        ("42".into(), "invalid_shape"),
        (r#""a string""#.into(), "invalid_shape"),
        ("{}".into(), "invalid_shape"),
        (r#"{"username":null}"#.into(), "invalid_shape"),
        (r#"{"username":123}"#.into(), "invalid_shape"),
        (r#"{"username":["a"]}"#.into(), "invalid_shape"),
        (r#"{"username":""}"#.into(), "invalid_field"),
        (r#"{"username":"   \t "}"#.into(), "invalid_field"),
        (
            format!(r#"{{"username":"{}"}}"#, "a".repeat(129)),
            "invalid_field",
        ),
        (
            format!(r#"{{"username":"{}"}}"#, "é".repeat(200)),
            "invalid_field",
        ),
        (r#"{"username":"a\u0000b"}"#.into(), "invalid_field"),
        (
            r#"{"username":"line\nbreak@example.com"}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"username":"esc\u001b[31m@example.com"}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"user_name":"typo@example.com"}"#.into(),
            "invalid_shape",
        ),
        (
            r#"{"username":"a@example.com","admin":true}"#.into(),
            "invalid_shape",
        ),
        (
            r#"{"username":"a@example.com","username":"b@example.com"}"#.into(),
            "invalid_shape",
        ),
        (
            r#"{"username":"a@example.com","client_metadata":{"n":1}}"#.into(),
            "invalid_shape",
        ),
        (
            r#"{"username":"a@example.com","client_metadata":"x"}"#.into(),
            "invalid_shape",
        ),
        (
            serde_json::json!({"username": "a@example.com", "client_metadata": huge_meta})
                .to_string(),
            "invalid_field",
        ),
        (
            r#"{"username":"a@example.com","user_context_data":{"ip_address":"999.1.1.1"}}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"username":"a@example.com","user_context_data":{"ip":"1.2.3.4"}}"#.into(),
            "invalid_shape",
        ),
        (
            r#"{"username":"a@example.com","campaign_id":"\u0007"}"#.into(),
            "invalid_field",
        ),
        (deep, "invalid_json"),
        (near_max, "invalid_field"),
        (
            r#"{"Type":"Notification","Message":"garbage"}"#.into(),
            "invalid_json",
        ),
        (
            r#"{"Type":"Notification","Message":{"username":"x"}}"#.into(),
            "invalid_envelope",
        ),
        (
            serde_json::json!({"Type":"Notification","Message": r#"{"username":""}"#}).to_string(),
            "invalid_field",
        ),
    ]
}

#[tokio::test]
async fn hostile_bodies_are_dead_lettered_with_reasons_and_the_worker_stays_healthy() {
    let stack = Stack::new(false, &["good@example.com"]).await;
    let cases = hostile_bodies();
    assert!(cases.len() >= 25);
    for (body, _) in &cases {
        stack
            .sqs
            .send_message()
            .queue_url(&stack.queue_url)
            .message_body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("enqueue {} bytes: {e:?}", body.len()));
    }
    // A binary attribute that is not UTF-8 must survive the copy.
    stack
        .sqs
        .send_message()
        .queue_url(&stack.queue_url)
        .message_body("also not json")
        .message_attributes(
            "raw",
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(vec![0xff, 0xfe, 0x00, 0xc3]))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    send_jobs(&stack, &[r#"{"username":"good@example.com"}"#.to_string()]).await;
    let total = cases.len() + 2;

    let worker = spawn_worker(&stack_env(&stack), &[]);
    let done = eventually(Duration::from_secs(90), || async {
        metric_value(&worker.metrics(), "reset_worker_jobs_total", &[]) >= total as f64
    })
    .await;
    assert!(done, "not every message was accounted for");
    let m = worker.metrics();
    assert_eq!(
        metric_value(&m, "reset_worker_jobs_total", &[("outcome", "rejected")]),
        (total - 1) as f64
    );
    assert_eq!(
        metric_value(&m, "reset_worker_jobs_total", &[("outcome", "sent")]),
        1.0
    );
    assert_eq!(worker.ready(), 200, "the worker stays ready");

    let dead = drain_all(&stack.sqs, &stack.dlq_url).await;
    assert_eq!(dead.len(), total - 1);
    for (body, reason) in &cases {
        let m = dead
            .iter()
            .find(|m| m.body() == Some(body.as_str()))
            .unwrap_or_else(|| panic!("body of {} bytes missing from the DLQ", body.len()));
        let got = m.message_attributes().unwrap()["reset_worker_reason"].string_value();
        assert_eq!(
            got,
            Some(*reason),
            "body starting {:?}",
            &body[..body.len().min(60)]
        );
    }
    let binary = dead
        .iter()
        .find(|m| m.body() == Some("also not json"))
        .unwrap();
    assert_eq!(
        binary.message_attributes().unwrap()["raw"]
            .binary_value()
            .map(|b| b.as_ref().to_vec()),
        Some(vec![0xff, 0xfe, 0x00, 0xc3])
    );
    assert_eq!(
        forgot_password_calls(&stack.moto, &stack.client_id).len(),
        1
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    let logs = worker.logs();
    assert!(!logs.contains("typo@example.com") && !logs.contains("big@example.com"));

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(20)), Some(0));
}
