//! Campaign tooling against moto: enqueue (CSV, JSONL, stdin, invalid rows,
//! duplicates, resume), preflight, the admin action, duplicate suppression.

mod support;

use std::time::Duration;

use support::*;

async fn bodies_in_queue(stack: &Stack) -> Vec<serde_json::Value> {
    drain_all(&stack.sqs, &stack.queue_url)
        .await
        .iter()
        .map(|m| serde_json::from_str(m.body().unwrap_or("null")).unwrap())
        .collect()
}

#[tokio::test]
async fn enqueue_csv_validates_dedupes_and_writes_rejects() {
    let stack = Stack::new(false, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("users.csv");
    std::fs::write(
        &csv,
        "username,reason\n\
         a@example.com,breach\n\
         b@example.com,\n\
         ,missing\n\
         a@example.com,again\n\
         c@example.com,x\n",
    )
    .unwrap();
    let path = csv.to_str().unwrap();

    let (code, out, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-csv", "--dry-run", path],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("3 valid jobs, 1 invalid, 1 duplicate"),
        "{out}"
    );
    assert_eq!(
        queue_counts(&stack.sqs, &stack.queue_url).await,
        (0, 0),
        "dry run sends nothing"
    );

    let (code, out, err) = run_cli(&stack, &[], &["enqueue", "--campaign", "c-csv", path], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enqueued 3, already enqueued 0, invalid 1, duplicate 1"),
        "{out}"
    );
    let rejects = std::fs::read_to_string(format!("{path}.rejects.csv")).unwrap();
    assert!(rejects.starts_with("line,reason\n4,"), "{rejects}");

    let mut bodies = bodies_in_queue(&stack).await;
    bodies.sort_by_key(|b| b["username"].as_str().unwrap_or("").to_owned());
    assert_eq!(bodies.len(), 3);
    assert_eq!(
        bodies[0],
        serde_json::json!({"username": "a@example.com", "campaign_id": "c-csv",
                           "client_metadata": {"reason": "breach"}})
    );
    assert_eq!(
        bodies[1],
        serde_json::json!({"username": "b@example.com", "campaign_id": "c-csv"})
    );
}

#[tokio::test]
async fn enqueue_jsonl_from_stdin() {
    let stack = Stack::new(false, &[]).await;
    let input = "{\"username\":\"j1@example.com\",\"client_metadata\":{\"k\":\"v\"}}\n\
                 {\"username\":\"j2@example.com\",\"typo\":1}\n\
                 {\"username\":\"j3@example.com\",\"user_context_data\":{\"ip_address\":\"198.51.100.1\"}}\n";
    let dir = tempfile::tempdir().unwrap();
    let rejects = dir.path().join("rejects.csv");
    let (code, out, err) = run_cli(
        &stack,
        &[],
        &[
            "enqueue",
            "--campaign",
            "c-jsonl",
            "--format",
            "jsonl",
            "--rejects",
            rejects.to_str().unwrap(),
            "-",
        ],
        Some(input),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enqueued 2,") && out.contains("invalid 1"),
        "{out}"
    );
    let text = std::fs::read_to_string(&rejects).unwrap();
    assert!(text.contains("\n2,") && text.contains("typo"), "{text}");
    let bodies = bodies_in_queue(&stack).await;
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| b["campaign_id"] == "c-jsonl"));
}

#[tokio::test]
async fn resume_after_interruption_does_not_double_enqueue() {
    let stack = Stack::new(false, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("users.txt");
    let users: Vec<String> = (0..25).map(|i| format!("r{i}@example.com")).collect();
    std::fs::write(&list, users.join("\n")).unwrap();
    let path = list.to_str().unwrap();

    // An interrupted run that had got jobs 10..20 accepted only.
    write_checkpoint(path, "c-resume", &users, &(10..20).collect::<Vec<usize>>());
    let (code, _, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-resume", path],
        None,
    );
    assert_eq!(code, 1, "an existing checkpoint needs --resume");
    assert!(err.contains("--resume"), "{err}");

    let (code, out, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-resume", "--resume", path],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enqueued 15, already enqueued 10"), "{out}");
    let bodies = bodies_in_queue(&stack).await;
    let mut sent: Vec<String> = bodies
        .iter()
        .map(|b| b["username"].as_str().unwrap().to_owned())
        .collect();
    sent.sort();
    let mut expected: Vec<String> = users[..10].iter().chain(&users[20..]).cloned().collect();
    expected.sort();
    assert_eq!(sent, expected, "only the jobs the checkpoint lacked");

    // Running it again sends nothing.
    let (code, out, _) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-resume", "--resume", path],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.contains("enqueued 0, already enqueued 25"), "{out}");
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
}

#[tokio::test]
async fn fifo_enqueue_sets_deduplication_ids() {
    let stack = Stack::new(true, &[]).await;
    let (code, out, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-fifo", "-"],
        Some("f1@example.com\nf2@example.com\n"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enqueued 2"), "{out}");
    // Within SQS's 5-minute window a second load is dropped by the queue itself.
    let (code, _, _) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "c-fifo", "-"],
        Some("f1@example.com\n"),
    );
    assert_eq!(code, 0);
    let messages = drain_all(&stack.sqs, &stack.queue_url).await;
    assert_eq!(messages.len(), 2);
}

#[tokio::test]
async fn preflight_passes_a_good_setup_and_fails_a_bad_one() {
    let stack = Stack::new(false, &["p@example.com"]).await;
    let pool = [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )];
    let (code, out, err) = run_cli(&stack, &pool, &["preflight"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("PASS  app client"), "{out}");
    assert!(out.contains("PASS  redrive policy"), "{out}");

    // A client without a secret while one is configured, and a queue
    // without a redrive policy.
    let bare_client = stack
        .cognito
        .create_user_pool_client()
        .user_pool_id(&stack.user_pool_id)
        .client_name("no-secret")
        .send()
        .await
        .unwrap()
        .user_pool_client
        .unwrap()
        .client_id
        .unwrap();
    let bare_queue = stack
        .sqs
        .create_queue()
        .queue_name(format!("no-redrive-{}", fastrand::u32(..)))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let env = [
        (
            "RESET_WORKER_COGNITO__USER_POOL_ID",
            stack.user_pool_id.as_str(),
        ),
        ("RESET_WORKER_COGNITO__CLIENT_ID", bare_client.as_str()),
        ("RESET_WORKER_SQS__QUEUE_URL", bare_queue.as_str()),
    ];
    let (code, out, _) = run_cli(&stack, &env, &["preflight"], None);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("FAIL  redrive policy"), "{out}");
    assert!(out.contains("FAIL  app client"), "{out}");
}

#[tokio::test]
async fn status_reports_depths_and_eta() {
    let stack = Stack::new(false, &[]).await;
    send_jobs(
        &stack,
        &(0..4)
            .map(|i| format!("{{\"username\":\"s{i}\"}}"))
            .collect::<Vec<_>>(),
    )
    .await;
    let (code, out, err) = run_cli(
        &stack,
        &[("RESET_WORKER_LIMITS__MAX_RPS", "2")],
        &["status", "--json"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["queue"]["visible"], 4);
    assert_eq!(status["dead_letter_queue"]["visible"], 0);
    assert_eq!(status["eta_seconds"], 2);
}

#[tokio::test]
async fn admin_reset_user_password_sets_reset_required() {
    let stack = Stack::new(
        false,
        &[
            "adm1@example.com",
            "adm2@example.com",
            "never-logged-in@example.com",
        ],
    )
    .await;
    // AdminCreateUser leaves users in FORCE_CHANGE_PASSWORD; give two of them
    // a permanent password (CONFIRMED), as real users have.
    for user in ["adm1@example.com", "adm2@example.com"] {
        stack
            .cognito
            .admin_set_user_password()
            .user_pool_id(&stack.user_pool_id)
            .username(user)
            .password("Correct-Horse-9-battery")
            .permanent(true)
            .send()
            .await
            .unwrap();
    }
    let jobs: Vec<String> = [
        "adm1@example.com",
        "adm2@example.com",
        "never-logged-in@example.com",
    ]
    .iter()
    .map(|u| format!(r#"{{"username":"{u}","campaign_id":"breach"}}"#))
    .collect();
    send_jobs(&stack, &jobs).await;
    let mut env = stack_env(&stack);
    env.push((
        "RESET_WORKER_COGNITO__ACTION".into(),
        "admin_reset_user_password".into(),
    ));
    env.push((
        "RESET_WORKER_COGNITO__USER_POOL_ID".into(),
        stack.user_pool_id.clone(),
    ));
    let mut worker = spawn_worker(&env, &["--until-empty"]);
    assert_eq!(
        worker.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        worker.logs()
    );
    for user in ["adm1@example.com", "adm2@example.com"] {
        let status = stack
            .cognito
            .admin_get_user()
            .user_pool_id(&stack.user_pool_id)
            .username(user)
            .send()
            .await
            .unwrap()
            .user_status
            .unwrap();
        assert_eq!(status.as_str(), "RESET_REQUIRED", "{user}");
    }
    assert!(forgot_password_calls(&stack.moto, &stack.client_id).is_empty());
    // Cognito answers NotAuthorizedException for a user who never set a
    // password: that is the user's state, not a misconfiguration, so the
    // job is rejected and the campaign goes on.
    let logs = worker.logs();
    assert!(
        logs.contains(r#""sent":2"#) && logs.contains(r#""rejected":1"#),
        "{logs}"
    );
    let dead = drain_all(&stack.sqs, &stack.dlq_url).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .body()
            .unwrap()
            .contains("never-logged-in@example.com")
    );
}

#[tokio::test]
async fn a_redelivered_job_is_not_sent_twice() {
    let stack = Stack::new(false, &["dup@example.com"]).await;
    let body = r#"{"username":"dup@example.com","campaign_id":"c-dup"}"#.to_string();
    // Two messages for the same (campaign, user), as a duplicate delivery
    // or a double load would produce; plus the same user in another campaign.
    send_jobs(
        &stack,
        &[
            body.clone(),
            body,
            r#"{"username":"dup@example.com","campaign_id":"c-other"}"#.to_string(),
        ],
    )
    .await;
    let mut env = stack_env(&stack);
    env.push(("RESET_WORKER_LIMITS__CONCURRENCY".into(), "1".into()));
    let mut worker = spawn_worker(&env, &["--until-empty"]);
    assert_eq!(worker.wait_exit(Duration::from_secs(60)), Some(0));
    assert_eq!(
        forgot_password_calls(&stack.moto, &stack.client_id).len(),
        2
    );
    let logs = worker.logs();
    assert_eq!(
        logs.matches(r#""reason":"already_sent""#).count(),
        1,
        "{logs}"
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
}

#[tokio::test]
async fn config_shows_every_value_with_its_source_and_redacts_secrets() {
    let stack = Stack::new(false, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[limits]\nmax_rps = 7\n").unwrap();
    let (code, out, err) = run_cli(
        &stack,
        &[("RESET_WORKER_LIMITS__BURST", "3")],
        &["config", "--config", file.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing:\n{out}"))
            .to_owned()
    };
    assert!(line("limits.max_rps").contains("= 7") && line("limits.max_rps").contains("TOML file"));
    assert!(line("limits.burst").contains("= 3") && line("limits.burst").contains("RESET_WORKER_"));
    assert!(line("limits.concurrency").ends_with("# default"));
    assert!(line("cognito.client_secret").contains("[redacted]"));
    assert!(!out.contains(&stack.client_secret), "secret printed");
}
