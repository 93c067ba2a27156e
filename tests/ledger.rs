//! The campaign ledger end to end, on moto (SQS, Cognito and DynamoDB):
//! two workers sharing a table, a re-run with new users, expired claims and
//! `ledger.on_uncertain`, an outage of the ledger, and the report.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use reset_worker::app::{App, Clients};
use reset_worker::aws::{cognito, sqs};
use reset_worker::config::LedgerSettings;
use reset_worker::ledger::{Claim, Key, Ledger, dynamodb};
use reset_worker::worker::RunOptions;
use serde_json::json;
use support::app::{app_settings, spawn_app};
use support::proxy::Proxy;
use support::*;
use tokio_util::sync::CancellationToken;

/// ForgotPassword calls moto received for the stack's client, per username.
fn calls_per_user(stack: &Stack) -> BTreeMap<String, usize> {
    let mut per_user = BTreeMap::new();
    for call in forgot_password_calls(&stack.moto, &stack.client_id) {
        let user = call["Username"].as_str().unwrap_or_default().to_owned();
        *per_user.entry(user).or_insert(0) += 1;
    }
    per_user
}

fn unique_table() -> String {
    format!("ledger-{}", random_suffix())
}

/// `reset-worker report` as CSV rows (header dropped), via the binary.
fn report_rows(stack: &Stack, env: &[(&str, &str)], campaign: &str) -> (Vec<Vec<String>>, String) {
    let (code, out, err) = run_cli(stack, env, &["report", "--campaign", campaign], None);
    assert_eq!(code, 0, "report failed: {err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("username,state,reason,attempts,updated_at,signed_out_at")
    );
    let rows = lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    (rows, err)
}

fn jobs(campaign: &str, users: &[String]) -> Vec<String> {
    users
        .iter()
        .map(|u| json!({"username": u, "campaign_id": campaign}).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_on_one_dynamodb_table_call_each_user_once() {
    let users: Vec<String> = (0..20).map(|i| format!("twin{i}@example.com")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &user_refs).await;
    let table = unique_table();
    let env = [
        ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
        ("RESET_WORKER_LEDGER__TABLE", table.as_str()),
    ];
    // `ledger init` creates the table, and says so; a second run changes nothing.
    let (code, out, err) = run_cli(&stack, &env, &["ledger", "init"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created table"), "{out}");
    assert!(out.contains("enabled TTL on `expires_at`"), "{out}");
    let (code, out, _) = run_cli(&stack, &env, &["ledger", "init"], None);
    assert_eq!(code, 0);
    assert!(out.contains("exists with the right keys"), "{out}");
    assert!(out.contains("already enabled"), "{out}");
    let (code, out, _) = run_cli(&stack, &env, &["preflight"], None);
    assert!(
        out.lines()
            .any(|l| l.starts_with("PASS") && l.contains("ledger")),
        "{code} {out}"
    );

    // Every user twice, as a double load or SQS duplicates would do.
    let mut bodies = jobs("twins", &users);
    bodies.extend(jobs("twins", &users));
    send_jobs(&stack, &bodies).await;
    let settings = || {
        app_settings(
            &stack,
            json!({
                "ledger": {"backend": "dynamodb", "table": table},
                "limits": {"concurrency": 8, "max_rps": 200, "burst": 20},
                // A copy deferred while the other worker holds the user comes
                // back within this.
                "sqs": {"visibility_timeout_seconds": 5},
                "cognito": {"request_timeout_seconds": 2},
            }),
        )
    };
    let a = spawn_app(settings(), None, false).await;
    let b = spawn_app(settings(), None, false).await;
    assert!(
        eventually(Duration::from_secs(120), || async {
            queue_counts(&stack.sqs, &stack.queue_url).await == (0, 0)
        })
        .await,
        "the queue drains"
    );
    let (a, b) = tokio::join!(a.stop(), b.stop());
    let (a, b) = (a.expect("worker a"), b.expect("worker b"));

    let per_user = calls_per_user(&stack);
    assert_eq!(per_user.len(), 20, "every user called: {per_user:?}");
    assert!(
        per_user.values().all(|&n| n == 1),
        "a user was called twice: {per_user:?}"
    );
    assert_eq!(a.sent + b.sent, 20);
    // The other 20 copies were skipped, at once or (deferred while the
    // other worker held the user) on their return.
    assert_eq!(a.skipped + b.skipped, 20, "{a:?} {b:?}");

    let (rows, summary) = report_rows(&stack, &env, "twins");
    let reported: BTreeSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    let called: BTreeSet<&str> = per_user.keys().map(String::as_str).collect();
    assert_eq!(
        reported, called,
        "the report names exactly the users called"
    );
    assert!(
        rows.iter().all(|r| r[1] == "sent" && r[3] == "1"),
        "{rows:?}"
    );
    assert!(summary.contains("20 users: sent 20"), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_with_new_users_calls_only_the_new_ones() {
    let users: Vec<String> = (0..400)
        .map(|i| format!("rerun{i:03}@example.com"))
        .collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &user_refs).await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.txt");
    let all = dir.path().join("all.txt");
    std::fs::write(&first, users[..300].join("\n")).unwrap();
    std::fs::write(&all, users.join("\n")).unwrap();
    let settings = || {
        app_settings(
            &stack,
            json!({"limits": {"concurrency": 16, "max_rps": 500, "burst": 50}}),
        )
    };

    let (code, out, err) = run_cli(
        &stack,
        &[],
        &["enqueue", "--campaign", "rerun", first.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    let run = spawn_app(settings(), None, true).await;
    assert_eq!(
        run.finished(Duration::from_secs(180)).await.unwrap().sent,
        300
    );
    assert_eq!(calls_per_user(&stack).len(), 300);

    // The usual re-run: the list again, with 100 users added. `enqueue`
    // skips the 300 the ledger has as sent...
    let (code, out, err) = run_cli(
        &stack,
        &[],
        &[
            "enqueue",
            "--campaign",
            "rerun",
            "--dry-run",
            all.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run: 100 valid jobs"), "{out}");
    assert!(err.contains("skipping 300 users already sent"), "{err}");
    // ...and even with all 400 forced into the queue, the worker calls only
    // the 100 new users.
    let (code, out, err) = run_cli(
        &stack,
        &[],
        &[
            "enqueue",
            "--campaign",
            "rerun",
            "--include-sent",
            "--checkpoint",
            dir.path().join("cp").to_str().unwrap(),
            all.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enqueued 400"), "{out}");
    let run = spawn_app(settings(), None, true).await;
    let summary = run.finished(Duration::from_secs(180)).await.unwrap();
    assert_eq!((summary.sent, summary.skipped), (100, 300), "{summary:?}");
    let per_user = calls_per_user(&stack);
    assert_eq!(per_user.len(), 400);
    assert!(
        per_user.values().all(|&n| n == 1),
        "a second email was sent"
    );

    // The report is the moto recording, user by user, sorted by username.
    let (rows, summary) = report_rows(&stack, &[], "rerun");
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    let called: Vec<&str> = per_user.keys().map(String::as_str).collect();
    assert_eq!(names, called);
    assert!(
        rows.iter()
            .all(|r| r[1] == "sent" && r[2] == "ok" && r[3] == "1")
    );
    assert!(
        rows.iter().all(|r| r[4].ends_with('Z') && r[4].len() == 20),
        "{:?}",
        rows[0]
    );
    assert!(summary.contains("400 users: sent 400"), "{summary}");
}

/// Seeds what a worker killed mid-call leaves: the user `in_progress` under
/// a claim whose lease has run out.
async fn expired_claim(stack: &Stack, campaign: &str, user: &str) {
    let settings: LedgerSettings =
        serde_json::from_value(json!({"path": stack.ledger_path})).unwrap();
    let ledger = Ledger::open(&settings, || unreachable!("sqlite")).unwrap();
    let key = Key {
        campaign,
        username: user,
    };
    let claim = ledger.claim(key, Duration::ZERO).await.unwrap();
    assert!(matches!(claim, Claim::Granted { .. }), "{claim:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_claim_is_uncertain_and_follows_on_uncertain() {
    let stack = Stack::new(false, &["gone@example.com", "again@example.com"]).await;
    expired_claim(&stack, "unc", "gone@example.com").await;
    expired_claim(&stack, "unc", "again@example.com").await;

    // `skip`: not called; the user stays `uncertain` for the report.
    send_jobs(&stack, &jobs("unc", &["gone@example.com".into()])).await;
    let skip = app_settings(&stack, json!({"ledger": {"on_uncertain": "skip"}}));
    let summary = spawn_app(skip, None, true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.skipped), (0, 1));
    assert!(
        calls_per_user(&stack).is_empty(),
        "an uncertain user was called"
    );
    let lines = support::app::outcome_lines("unc");
    assert_eq!(lines[0]["reason"], "uncertain", "{lines:?}");

    // `resend` (the default): called again, once.
    send_jobs(&stack, &jobs("unc", &["again@example.com".into()])).await;
    let summary = spawn_app(app_settings(&stack, json!({})), None, true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.sent, 1);
    assert_eq!(
        calls_per_user(&stack),
        BTreeMap::from([("again@example.com".to_owned(), 1)])
    );

    let (rows, _) = report_rows(&stack, &[], "unc");
    let states: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("again@example.com", "sent", "ok"),
            ("gone@example.com", "uncertain", "uncertain"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_reset_whose_answer_was_lost_is_recognised_by_the_user_status() {
    let stack = Stack::new(false, &["was-reset@example.com"]).await;
    // A user who has a password (a reset needs one)...
    stack
        .cognito
        .admin_set_user_password()
        .user_pool_id(&stack.user_pool_id)
        .username("was-reset@example.com")
        .password("Correct-Horse-1-Battery")
        .permanent(true)
        .send()
        .await
        .expect("AdminSetUserPassword on moto");
    // ...and the killed worker's call did reach Cognito: RESET_REQUIRED.
    stack
        .cognito
        .admin_reset_user_password()
        .user_pool_id(&stack.user_pool_id)
        .username("was-reset@example.com")
        .send()
        .await
        .expect("AdminResetUserPassword on moto");
    expired_claim(&stack, "adm", "was-reset@example.com").await;
    send_jobs(&stack, &jobs("adm", &["was-reset@example.com".into()])).await;
    let settings = app_settings(
        &stack,
        json!({"cognito": {"action": "admin_reset_user_password", "user_pool_id": stack.user_pool_id}}),
    );
    let summary = spawn_app(settings, None, true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.skipped, 1, "{summary:?}");
    let resets = recorded_requests(&stack.moto)
        .iter()
        .filter(|e| {
            recorded_header(e, "X-Amz-Target")
                == Some("AWSCognitoIdentityProviderService.AdminResetUserPassword")
        })
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(&recorded_body(e)).ok())
        .filter(|b| b["UserPoolId"] == stack.user_pool_id.as_str())
        .count();
    assert_eq!(resets, 1, "only the test's own reset, no second one");
    let (rows, _) = report_rows(&stack, &[], "adm");
    assert_eq!(
        (rows[0][1].as_str(), rows[0][2].as_str()),
        ("sent", "already_reset")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_ledger_is_down_nobody_is_called_and_the_worker_resumes_by_itself() {
    let users: Vec<String> = (0..5).map(|i| format!("outage{i}@example.com")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &user_refs).await;
    let table = unique_table();
    let env = [
        ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
        ("RESET_WORKER_LEDGER__TABLE", table.as_str()),
    ];
    assert_eq!(run_cli(&stack, &env, &["ledger", "init"], None).0, 0);
    let proxy = Proxy::start(stack.moto.trim_start_matches("http://").to_owned()).await;
    let settings = app_settings(
        &stack,
        json!({"ledger": {"backend": "dynamodb", "table": table}}),
    );
    let moto = sdk_config(&stack.moto);
    let clients = Clients {
        sqs: sqs::build_client(&moto),
        cognito: cognito::build_client(&moto, &settings.cognito),
        dynamodb: dynamodb::build_client(&sdk_config(&proxy.url())),
    };
    let app = App::build_with(settings, None, clients).await.unwrap();
    let addr = app.metrics_addr().to_string();
    let stop = CancellationToken::new();
    let run = tokio::spawn(app.run_until_stopped(stop.clone(), RunOptions::default()));
    assert!(
        eventually(Duration::from_secs(20), || async { readyz(&addr) == 200 }).await,
        "ready with the ledger up"
    );

    proxy.down();
    send_jobs(&stack, &jobs("outage", &users)).await;
    assert!(
        eventually(Duration::from_secs(20), || async { readyz(&addr) == 503 }).await,
        "readiness off while the ledger is down"
    );
    // Long enough for every job to have been received at least once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        calls_per_user(&stack).is_empty(),
        "a user was called without a claim"
    );
    assert_eq!(readyz(&addr), 503);

    proxy.up();
    assert!(
        eventually(Duration::from_secs(60), || async {
            calls_per_user(&stack).len() == 5
        })
        .await,
        "every user called after the ledger came back"
    );
    assert!(
        eventually(Duration::from_secs(20), || async { readyz(&addr) == 200 }).await,
        "ready again"
    );
    assert!(calls_per_user(&stack).values().all(|&n| n == 1));
    stop.cancel();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.sent, 5);
    assert!(
        summary.released >= 1,
        "jobs were released during the outage: {summary:?}"
    );
}

/// Peak RSS (VmHWM, KiB) of `reset-worker report` over `campaign`, and its
/// output's line count, sampled until it exits.
fn report_peak_rss(stack: &Stack, campaign: &str, out: &std::path::Path) -> (u64, usize) {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RESET_WORKER_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in stack_env(stack) {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(["report", "--campaign", campaign, "--output"])
        .arg(out)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "report failed");
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let lines = std::fs::read_to_string(out).unwrap().lines().count();
    (peak, lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_streams_a_hundred_thousand_users_in_bounded_memory() {
    let stack = Stack::new(false, &[]).await;
    // The schema, as the worker creates it; then rows written directly, as
    // a finished campaign leaves them.
    let settings: LedgerSettings =
        serde_json::from_value(json!({"path": stack.ledger_path})).unwrap();
    drop(Ledger::open(&settings, || unreachable!("sqlite")).unwrap());
    let mut conn = rusqlite::Connection::open(&stack.ledger_path).unwrap();
    let tx = conn.transaction().unwrap();
    let far = (reset_worker::ledger::now_ms() / 1000 + 86_400) as i64;
    for (campaign, n) in [("small", 1_000), ("big", 100_000)] {
        let mut insert = tx
            .prepare(
                "INSERT INTO ledger (campaign, username, state, reason, attempts, updated_at, expires_at)
                 VALUES (?1, ?2, 'sent', 'ok', 1, 1764700000000, ?3)",
            )
            .unwrap();
        // Reverse order, so the report's sort is not the insertion order.
        for i in (0..n).rev() {
            let user = format!("a-rather-long-user-name-{i:06}@subsidiary.example.com");
            insert
                .execute(rusqlite::params![campaign, user, far])
                .unwrap();
        }
    }
    tx.commit().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (small_peak, small_lines) = report_peak_rss(&stack, "small", &dir.path().join("s.csv"));
    let (big_peak, big_lines) = report_peak_rss(&stack, "big", &dir.path().join("b.csv"));
    assert_eq!((small_lines, big_lines), (1_001, 100_001));
    let big = std::fs::read_to_string(dir.path().join("b.csv")).unwrap();
    let names: Vec<&str> = big
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by username");
    // Holding 100,000 rows of this size would take well over 10 MiB.
    eprintln!("report peak RSS: 1k users {small_peak} KiB, 100k users {big_peak} KiB");
    assert!(
        big_peak < small_peak + 6 * 1024,
        "report memory grows with the campaign: {small_peak} KiB for 1k users, {big_peak} KiB for 100k"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dynamodb_report_pages_through_the_campaign() {
    let stack = Stack::new(false, &[]).await;
    let table = unique_table();
    let env = [
        ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
        ("RESET_WORKER_LEDGER__TABLE", table.as_str()),
    ];
    assert_eq!(run_cli(&stack, &env, &["ledger", "init"], None).0, 0);
    let client = aws_sdk_dynamodb::Client::new(&sdk_config(&stack.moto));
    let far = (reset_worker::ledger::now_ms() / 1000 + 86_400).to_string();
    let n = 2_500;
    let writes: Vec<WriteRequest> = (0..n)
        .map(|i| {
            let item = [
                ("campaign", AttributeValue::S("paged".into())),
                ("username", AttributeValue::S(format!("p{i:05}"))),
                (
                    "state",
                    AttributeValue::S(if i % 10 == 0 { "skipped" } else { "sent" }.into()),
                ),
                ("reason", AttributeValue::S("ok".into())),
                ("attempts", AttributeValue::N("1".into())),
                ("updated_at", AttributeValue::N("1764700000000".into())),
                ("expires_at", AttributeValue::N(far.clone())),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            WriteRequest::builder()
                .put_request(PutRequest::builder().set_item(Some(item)).build().unwrap())
                .build()
        })
        .collect();
    for chunk in writes.chunks(25) {
        client
            .batch_write_item()
            .request_items(&table, chunk.to_vec())
            .send()
            .await
            .expect("BatchWriteItem");
    }
    let (rows, summary) = report_rows(&stack, &env, "paged");
    assert_eq!(rows.len(), n, "every page read");
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "sorted, no row twice"
    );
    assert!(summary.contains("sent 2250, skipped 250"), "{summary}");
    // `status --campaign` counts the same.
    let (code, out, err) = run_cli(&stack, &env, &["status", "--campaign", "paged"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("campaign paged: 2500 users"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_halts_the_worker_at_start_up() {
    let stack = Stack::new(false, &[]).await;
    let mut env = stack_env(&stack);
    env.push(("RESET_WORKER_LEDGER__BACKEND".into(), "dynamodb".into()));
    env.push(("RESET_WORKER_LEDGER__TABLE".into(), unique_table()));
    let mut worker = spawn_worker(&env, &["--until-empty"]);
    // Exit 3, as for any misconfiguration: retrying the pod cannot fix it.
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(3));
    assert!(
        worker
            .logs()
            .contains("create it with `reset-worker ledger init`"),
        "{}",
        worker.logs()
    );
}
