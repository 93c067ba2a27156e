//! `enqueue --from-user-pool` end to end, on moto: the filter selects
//! exactly its users, a dry run sends nothing, users who cannot receive a
//! code are left out and counted, users already sent are skipped, a killed
//! run resumed enqueues each user once, and a bad filter or an expired
//! resume token stops the command.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_sdk_cognitoidentityprovider::types::{AttributeType, MessageActionType};
use support::*;

/// The usernames in the stack's queue (drained), with the campaign and
/// pool of every body checked.
async fn usernames_in_queue(stack: &Stack, campaign: &str) -> Vec<String> {
    drain_all(&stack.sqs, &stack.queue_url)
        .await
        .iter()
        .map(|m| {
            let body: serde_json::Value = serde_json::from_str(m.body().unwrap_or("null")).unwrap();
            assert_eq!(body["campaign_id"], campaign, "{body}");
            body["username"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn pool_env(stack: &Stack) -> [(&'static str, &str); 1] {
    [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )]
}

/// A user with an email that is not verified (and no phone number).
async fn create_unverified(stack: &Stack, user: &str) {
    stack
        .cognito
        .admin_create_user()
        .user_pool_id(&stack.user_pool_id)
        .username(user)
        .user_attributes(
            AttributeType::builder()
                .name("email")
                .value(user)
                .build()
                .unwrap(),
        )
        .message_action(MessageActionType::Suppress)
        .send()
        .await
        .expect("AdminCreateUser on moto");
}

/// Marks `users` as `sent` in `campaign` in the stack's SQLite ledger.
fn mark_sent(stack: &Stack, campaign: &str, users: &[String]) {
    reset_worker::ledger::sqlite::Sqlite::open(std::path::Path::new(&stack.ledger_path)).unwrap();
    let now = reset_worker::ledger::now_ms() as i64;
    let conn = rusqlite::Connection::open(&stack.ledger_path).unwrap();
    for user in users {
        conn.execute(
            "INSERT INTO ledger (campaign, username, state, reason, attempts, updated_at, expires_at)
             VALUES (?1, ?2, 'sent', 'ok', 1, ?3, ?4)",
            rusqlite::params![campaign, user, now, now / 1000 + 86_400],
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_filter_selects_exactly_its_users_and_a_dry_run_sends_nothing() {
    let leak: Vec<String> = (0..20).map(|i| format!("leak{i:02}@example.com")).collect();
    let other: Vec<String> = (0..40).map(|i| format!("user{i:02}@example.com")).collect();
    let all: Vec<&str> = leak.iter().chain(&other).map(String::as_str).collect();
    let stack = Stack::new(false, &all).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("pool.checkpoint");
    let checkpoint = checkpoint.to_str().unwrap();
    let env = pool_env(&stack);
    let args = |campaign: &'static str, extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec![
            "enqueue",
            "--campaign",
            campaign,
            "--from-user-pool",
            "--filter",
            "email ^= \"leak\"",
            "--list-rps",
            "20",
            "--checkpoint",
            checkpoint,
        ];
        args.extend_from_slice(extra);
        args
    };

    let (code, out, err) = run_cli(&stack, &env, &args("leak", &["--dry-run"]), None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dry run: would enqueue 20; listed 20 in 1 pages"),
        "{out}"
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    assert!(
        !std::path::Path::new(checkpoint).exists(),
        "a dry run writes no checkpoint"
    );

    let (code, out, err) = run_cli(&stack, &env, &args("leak", &[]), None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enqueued 20, already enqueued 0; listed 20"),
        "{out}"
    );
    let got: BTreeSet<String> = usernames_in_queue(&stack, "leak")
        .await
        .into_iter()
        .collect();
    assert_eq!(got, leak.iter().cloned().collect::<BTreeSet<_>>());
    // No username in what the command printed.
    assert!(
        !err.contains("leak0") && !out.contains("leak0"),
        "{out}\n{err}"
    );
    // Done: a --resume finds nothing left.
    let (code, out, err) = run_cli(&stack, &env, &args("leak", &["--resume"]), None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to resume"), "{out}");
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));

    // Users already sent in the campaign are skipped; --pool is stamped.
    std::fs::remove_file(checkpoint).unwrap();
    mark_sent(&stack, "leak2", &leak[..3]);
    let (code, out, err) = run_cli(&stack, &env, &args("leak2", &["--pool", "default"]), None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enqueued 17,") && out.contains("already sent 3"),
        "{out}"
    );
    assert!(err.contains("skipping 3 users already sent"), "{err}");
    let bodies = drain_all(&stack.sqs, &stack.queue_url).await;
    assert_eq!(bodies.len(), 17);
    assert!(
        bodies
            .iter()
            .all(|m| m.body().unwrap_or("").contains("\"pool\":\"default\""))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn users_who_cannot_receive_a_code_are_excluded_and_counted() {
    let users: Vec<String> = (0..5).map(|i| format!("reach{i}@example.com")).collect();
    let all: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &all).await;
    stack
        .cognito
        .admin_disable_user()
        .user_pool_id(&stack.user_pool_id)
        .username(&users[0])
        .send()
        .await
        .expect("AdminDisableUser on moto");
    create_unverified(&stack, "reach-unverified@example.com").await;
    let dir = tempfile::tempdir().unwrap();
    let env = pool_env(&stack);
    let run = |campaign: &'static str, extra: Option<&'static str>| {
        let checkpoint = dir.path().join(campaign);
        let mut args = vec![
            "enqueue".to_owned(),
            "--campaign".to_owned(),
            campaign.to_owned(),
            "--from-user-pool".to_owned(),
            "--filter".to_owned(),
            "email ^= \"reach\"".to_owned(),
            "--checkpoint".to_owned(),
            checkpoint.to_string_lossy().into_owned(),
        ];
        args.extend(extra.map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&stack, &env, &args, None)
    };
    let (code, out, err) = run("reach", None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("enqueued 4,")
            && out.contains("listed 6 in 1 pages, excluded disabled 1, excluded unverified 1"),
        "{out}"
    );
    assert!(
        err.contains(
            "excluding 2 users who cannot receive a code: disabled 1, no verified email or phone 1"
        ),
        "{err}"
    );
    let got: BTreeSet<String> = usernames_in_queue(&stack, "reach")
        .await
        .into_iter()
        .collect();
    assert_eq!(got, users[1..].iter().cloned().collect::<BTreeSet<_>>());

    let (code, out, err) = run("reach-all", Some("--include-unreachable"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enqueued 6,"), "{out}");
    assert!(
        err.contains("including 2 users who cannot receive a code"),
        "{err}"
    );
    assert_eq!(usernames_in_queue(&stack, "reach-all").await.len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_run_resumed_enqueues_each_user_once() {
    // 150 matching users: three pages of 60, 60 and 30.
    let users: Vec<String> = (0..150).map(|i| format!("res{i:03}@example.com")).collect();
    let all: Vec<&str> = users.iter().map(String::as_str).collect();
    let stack = Stack::new(false, &all).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("pool.checkpoint");
    let args = [
        "enqueue",
        "--campaign",
        "res",
        "--from-user-pool",
        "--filter",
        "email ^= \"res\"",
        "--list-rps",
        "1",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
    ];
    // One page a second, killed (SIGKILL, as a crash) once the first page
    // is recorded.
    let pool_id = [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )];
    let mut child = cli_command(&stack, &pool_id, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn reset-worker");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&checkpoint).unwrap_or_default();
        if text.contains("\"pages\":1") {
            break;
        }
        assert!(Instant::now() < deadline, "no page recorded: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    let first = usernames_in_queue(&stack, "res").await;
    assert!(
        (60..150).contains(&first.len()),
        "{} enqueued before the kill",
        first.len()
    );

    let env = pool_env(&stack);
    let mut resumed: Vec<&str> = args.to_vec();
    resumed.push("--resume");
    let (code, out, err) = run_cli(&stack, &env, &resumed, None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert!(
        out.contains(&format!(
            "enqueued {}, already enqueued {}",
            150 - first.len(),
            first.len()
        )),
        "{out}"
    );
    let rest = usernames_in_queue(&stack, "res").await;
    let mut every: Vec<String> = first.into_iter().chain(rest).collect();
    every.sort();
    assert_eq!(every, users, "each user exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_filter_a_missing_pool_id_and_an_expired_token_stop_the_command() {
    let stack = Stack::new(false, &["stop@example.com"]).await;
    let env = pool_env(&stack);
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("pool.checkpoint");
    let checkpoint = checkpoint.to_str().unwrap();
    let base = [
        "enqueue",
        "--campaign",
        "stop",
        "--from-user-pool",
        "--checkpoint",
        checkpoint,
    ];

    // Cognito's own error for the operator's filter: exit 2, its message.
    let mut args = base.to_vec();
    args.extend(["--filter", "not a filter"]);
    let (code, _, err) = run_cli(&stack, &env, &args, None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("Cognito refused the filter: InvalidParameterException"),
        "{err}"
    );

    // No user_pool_id: exit 2, naming the key.
    let (code, _, err) = run_cli(&stack, &[], &base, None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cognito.user_pool_id"), "{err}");

    // A file and --from-user-pool together: refused by the parser.
    let mut args = base.to_vec();
    args.push("users.txt");
    let (code, _, err) = run_cli(&stack, &env, &args, None);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");

    // A resume token the pool no longer takes: said so, non-zero, nothing
    // enqueued, no silent restart from the first page.
    let key = reset_worker::cli::from_pool::source_key(&stack.user_pool_id, None, "stop");
    let written = serde_json::json!({
        "campaign": "stop",
        "digest": "",
        "total_jobs": 0,
        "sent": [],
        "source": key,
        "pagination_token": "expired-token",
        "pages": 1,
        "enqueued": 60,
    });
    std::fs::write(checkpoint, written.to_string()).unwrap();
    let mut args = base.to_vec();
    args.push("--resume");
    let (code, _, err) = run_cli(&stack, &env, &args, None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot resume: ListUsers refused the checkpoint's pagination token"),
        "{err}"
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    // Without --resume the checkpoint is refused, as for a file.
    let (code, _, err) = run_cli(&stack, &env, &base, None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("pass --resume"), "{err}");
}
