//! Live control through the config file: pause with `max_rps = 0`, reject an
//! invalid edit and keep the old value, resume with a new cap.

mod support;

use std::time::Duration;

use support::*;

const RATE_GAUGE: &str = "reset_worker_rate_limit_per_second";

fn write_limits(path: &std::path::Path, limits: &str) {
    // Write-then-rename, as a ConfigMap update swaps files atomically.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("[limits]\nconcurrency = 4\n{limits}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn pause_invalid_edit_and_resume_through_the_config_file() {
    let users: Vec<String> = (0..6).map(|i| format!("live{i}@example.com")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &refs).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reset-worker.toml");
    write_limits(&config, "max_rps = 0\nburst = 1");

    let config_arg = config.to_str().unwrap().to_owned();
    let worker = spawn_worker(&stack_env(&stack), &["--config", &config_arg]);
    let up = eventually(Duration::from_secs(20), || async { worker.ready() == 200 }).await;
    assert!(up, "a paused worker is still ready");
    assert_eq!(metric_value(&worker.metrics(), RATE_GAUGE, &[]), 0.0);

    let bodies: Vec<String> = users
        .iter()
        .map(|u| serde_json::json!({ "username": u }).to_string())
        .collect();
    send_jobs(&stack, &bodies).await;

    // Paused: nothing is received or sent while several receive periods pass.
    let logged = eventually(Duration::from_secs(10), || async {
        worker.logs().contains("campaign paused")
    })
    .await;
    assert!(logged);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        forgot_password_calls(&stack.moto, &stack.client_id).len(),
        0
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (6, 0));

    // An invalid edit is rejected with a log line; the pause stays.
    write_limits(&config, "max_rps = \"fast\"");
    let rejected = eventually(Duration::from_secs(10), || async {
        worker.logs().contains("config edit rejected")
    })
    .await;
    assert!(rejected, "{}", worker.logs());
    assert_eq!(metric_value(&worker.metrics(), RATE_GAUGE, &[]), 0.0);
    assert_eq!(
        forgot_password_calls(&stack.moto, &stack.client_id).len(),
        0
    );
    assert_eq!(worker.ready(), 200);

    // Resume with a new cap: every job is sent, once.
    write_limits(&config, "max_rps = 20\nburst = 2");
    let done = eventually(Duration::from_secs(30), || async {
        metric_value(
            &worker.metrics(),
            "reset_worker_jobs_total",
            &[("outcome", "sent")],
        ) == 6.0
    })
    .await;
    assert!(done, "{}", worker.logs());
    assert_eq!(metric_value(&worker.metrics(), RATE_GAUGE, &[]), 20.0);
    assert_eq!(
        forgot_password_calls(&stack.moto, &stack.client_id).len(),
        6
    );
    let logs = worker.logs();
    assert_eq!(logs.matches("rate limits changed").count(), 1, "{logs}");

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn a_rotated_secret_file_is_used_without_a_restart() {
    use support::cognito_mock::{ValidSecretHash, forgot_password, success};
    use wiremock::MockServer;

    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    // Only calls hashed with one of the two secrets are answered.
    for secret in ["old-secret", "new-secret"] {
        forgot_password()
            .and(ValidSecretHash {
                client_id: stack.client_id.clone(),
                client_secret: secret.into(),
            })
            .respond_with(success())
            .mount(&cognito)
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reset-worker.toml");
    write_limits(&config, "max_rps = 50");
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, "old-secret\n").unwrap();

    let mut env: Vec<(String, String)> = stack_env(&stack)
        .into_iter()
        .filter(|(k, _)| k != "RESET_WORKER_COGNITO__CLIENT_SECRET")
        .collect();
    env.push((
        "RESET_WORKER_COGNITO__CLIENT_SECRET_FILE".into(),
        secret_file.to_str().unwrap().into(),
    ));
    env.push((
        "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER".into(),
        cognito.uri(),
    ));
    let config_arg = config.to_str().unwrap().to_owned();
    let worker = spawn_worker(&env, &["--config", &config_arg]);

    send_jobs(&stack, &[r#"{"username":"first@example.com"}"#.to_string()]).await;
    let sent = |n: f64| {
        let worker = &worker;
        move || async move {
            metric_value(
                &worker.metrics(),
                "reset_worker_jobs_total",
                &[("outcome", "sent")],
            ) == n
        }
    };
    assert!(
        eventually(Duration::from_secs(30), sent(1.0)).await,
        "{}",
        worker.logs()
    );

    // Rotate the secret the way a Kubernetes Secret mount does.
    let tmp = dir.path().join("client-secret.tmp");
    std::fs::write(&tmp, "new-secret\n").unwrap();
    std::fs::rename(&tmp, &secret_file).unwrap();
    let reloaded = eventually(Duration::from_secs(10), || async {
        worker.logs().contains("client secret reloaded")
    })
    .await;
    assert!(reloaded, "{}", worker.logs());
    send_jobs(
        &stack,
        &[r#"{"username":"second@example.com"}"#.to_string()],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(30), sent(2.0)).await,
        "{}",
        worker.logs()
    );

    let requests = cognito.received_requests().await.unwrap();
    let hashes: Vec<(String, String)> = requests
        .iter()
        .map(|r| {
            let b: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            (
                b["Username"].as_str().unwrap().to_owned(),
                b["SecretHash"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(hashes.len(), 2, "no call was refused");
    assert_eq!(
        hashes[0].1,
        secret_hash("first@example.com", &stack.client_id, "old-secret")
    );
    assert_eq!(
        hashes[1].1,
        secret_hash("second@example.com", &stack.client_id, "new-secret")
    );
    let logs = worker.logs();
    assert!(!logs.contains("old-secret") && !logs.contains("new-secret"));

    worker.sigterm();
    let mut worker = worker;
    assert_eq!(worker.wait_exit(Duration::from_secs(20)), Some(0));
}
