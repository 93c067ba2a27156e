//! `report --refresh-status` end to end, on moto: users reset with
//! AdminResetUserPassword are pending until they set a new password; a
//! re-run reads only the users still pending; an old SQLite ledger file is
//! migrated; the DynamoDB ledger records the statuses too; a pool without an
//! ID, or a wrong one, stops the refresh.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::json;
use support::app::{app_settings, spawn_app};
use support::*;

const ADMIN_GET_USER: &str = "AWSCognitoIdentityProviderService.AdminGetUser";

/// The report's header with `--refresh-status`.
const STATUS_HEADER: &str =
    "username,state,reason,attempts,updated_at,signed_out_at,user_status,checked_at,completion";

/// The usernames of the AdminGetUser calls moto recorded for `pool`, oldest
/// first.
fn admin_get_users(stack: &Stack) -> Vec<String> {
    recorded_requests(&stack.moto)
        .iter()
        .filter(|e| recorded_header(e, "X-Amz-Target") == Some(ADMIN_GET_USER))
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(&recorded_body(e)).ok())
        .filter(|b| b["UserPoolId"] == stack.user_pool_id.as_str())
        .filter_map(|b| b["Username"].as_str().map(str::to_owned))
        .collect()
}

/// `report --refresh-status` as rows by username (header checked), and
/// stderr.
fn refresh(
    stack: &Stack,
    env: &[(&str, &str)],
    campaign: &str,
) -> (BTreeMap<String, Vec<String>>, String) {
    let (code, out, err) = run_cli(
        stack,
        env,
        &[
            "report",
            "--campaign",
            campaign,
            "--refresh-status",
            "--status-rps",
            "50",
        ],
        None,
    );
    assert_eq!(code, 0, "report --refresh-status failed: {err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(STATUS_HEADER));
    let rows = lines
        .map(|l| {
            let row: Vec<String> = l.split(',').map(str::to_owned).collect();
            assert_eq!(row.len(), 9, "{l}");
            (row[0].clone(), row)
        })
        .collect();
    (rows, err)
}

/// The users whose row says `completion`.
fn with_completion(rows: &BTreeMap<String, Vec<String>>, completion: &str) -> BTreeSet<String> {
    rows.iter()
        .filter(|(_, r)| r[8] == completion)
        .map(|(u, _)| u.clone())
        .collect()
}

async fn set_password(stack: &Stack, user: &str) {
    stack
        .cognito
        .admin_set_user_password()
        .user_pool_id(&stack.user_pool_id)
        .username(user)
        .password("Correct-Horse-1-Battery")
        .permanent(true)
        .send()
        .await
        .expect("AdminSetUserPassword on moto");
}

/// A user's new password, as Cognito shows it: CONFIRMED and modified.
/// moto's AdminSetUserPassword changes the status but not
/// `UserLastModifiedDate` (only attribute updates do), so an attribute
/// update stands in for the modification Cognito records.
async fn completes(stack: &Stack, user: &str) {
    set_password(stack, user).await;
    stack
        .cognito
        .admin_update_user_attributes()
        .user_pool_id(&stack.user_pool_id)
        .username(user)
        .user_attributes(
            aws_sdk_cognitoidentityprovider::types::AttributeType::builder()
                .name("name")
                .value("changed")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("AdminUpdateUserAttributes on moto");
}

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|u| (*u).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_resets_are_pending_until_the_users_set_a_password_and_reruns_skip_the_done() {
    let users = [
        "track-a@example.com",
        "track-b@example.com",
        "track-c@example.com",
        "track-d@example.com",
        "track-e@example.com",
    ];
    let stack = Stack::new(false, &users).await;
    // A reset needs a user with a password.
    for user in users {
        set_password(&stack, user).await;
    }
    let bodies: Vec<String> = users
        .iter()
        .map(|u| json!({"username": u, "campaign_id": "track"}).to_string())
        .collect();
    send_jobs(&stack, &bodies).await;
    let settings = app_settings(
        &stack,
        json!({"cognito": {"action": "admin_reset_user_password", "user_pool_id": stack.user_pool_id}}),
    );
    let summary = spawn_app(settings, None, true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.sent, 5, "{summary:?}");
    let env = [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )];

    // Right after the campaign: everyone RESET_REQUIRED, pending.
    let (rows, err) = refresh(&stack, &env, "track");
    assert!(err.contains("checked 5 users"), "{err}");
    assert!(
        err.contains("5 users: sent 5; completed 0, pending 5, not found 0"),
        "{err}"
    );
    assert_eq!(with_completion(&rows, "pending"), set(&users));
    for row in rows.values() {
        assert_eq!(row[6], "RESET_REQUIRED", "{row:?}");
        assert!(row[7].ends_with('Z') && row[7].len() == 20, "{row:?}");
        // Not signed out: `cognito.sign_out` is off.
        assert_eq!(row[5], "", "{row:?}");
    }
    // `status --campaign` shows the same split.
    let (code, out, err) = run_cli(&stack, &env, &["status", "--campaign", "track"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("of the sent: completed 0, pending 5, not found 0 (checked 5"),
        "{out}"
    );

    // Two users set a new password, one is deleted. The ledger's clock is
    // in ms, moto's dates may be whole seconds: make "after" unambiguous.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // One sets it the way moto records it (status only, no new date): seen
    // RESET_REQUIRED before, CONFIRMED now, so done whatever the date.
    set_password(&stack, users[0]).await;
    completes(&stack, users[1]).await;
    stack
        .cognito
        .admin_delete_user()
        .user_pool_id(&stack.user_pool_id)
        .username(users[4])
        .send()
        .await
        .expect("AdminDeleteUser on moto");
    let (rows, err) = refresh(&stack, &env, "track");
    assert!(err.contains("checked 5 users"), "{err}");
    assert!(err.contains("completed 2, pending 2, not found 1"), "{err}");
    assert_eq!(with_completion(&rows, "completed"), set(&users[..2]));
    assert_eq!(with_completion(&rows, "pending"), set(&users[2..4]));
    assert_eq!(with_completion(&rows, "not_found"), set(&users[4..]));
    assert_eq!(rows[users[0]][6], "CONFIRMED");
    assert_eq!(rows[users[4]][6], "NOT_FOUND");

    // A re-run reads only the two still pending.
    let before = admin_get_users(&stack).len();
    let (rows, err) = refresh(&stack, &env, "track");
    let asked: BTreeSet<String> = admin_get_users(&stack)[before..].iter().cloned().collect();
    assert_eq!(asked, set(&users[2..4]), "AdminGetUser for done users");
    assert_eq!(admin_get_users(&stack).len() - before, 2);
    assert!(
        err.contains("checked 2 users with AdminGetUser, skipped 3"),
        "{err}"
    );
    assert!(err.contains("completed 2, pending 2, not found 1"), "{err}");
    assert_eq!(with_completion(&rows, "completed"), set(&users[..2]));

    // JSON lines carry the same columns.
    let (code, out, err) = run_cli(
        &stack,
        &env,
        &[
            "report",
            "--campaign",
            "track",
            "--refresh-status",
            "--format",
            "jsonl",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["username"], users[0]);
    assert_eq!(first["user_status"], "CONFIRMED");
    assert_eq!(first["completion"], "completed");
    // Without the flag the report keeps its columns.
    let (code, out, _) = run_cli(&stack, &env, &["report", "--campaign", "track"], None);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().next(),
        Some("username,state,reason,attempts,updated_at,signed_out_at")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_file_from_before_the_status_columns_is_migrated_and_refreshed() {
    let stack = Stack::new(false, &["legacy@example.com"]).await;
    // The schema as earlier versions created it.
    {
        let conn = rusqlite::Connection::open(&stack.ledger_path).unwrap();
        conn.execute_batch(
            "CREATE TABLE ledger (
                campaign    TEXT    NOT NULL,
                username    TEXT    NOT NULL,
                state       TEXT    NOT NULL,
                reason      TEXT    NOT NULL DEFAULT '',
                attempts    INTEGER NOT NULL DEFAULT 0,
                owner       TEXT,
                lease_until INTEGER NOT NULL DEFAULT 0,
                updated_at  INTEGER NOT NULL,
                expires_at  INTEGER NOT NULL,
                PRIMARY KEY (campaign, username)
            ) WITHOUT ROWID;",
        )
        .unwrap();
        let now = reset_worker::ledger::now_ms() as i64;
        for user in ["legacy@example.com", "ghost@example.com"] {
            conn.execute(
                "INSERT INTO ledger (campaign, username, state, reason, attempts, owner,
                                     lease_until, updated_at, expires_at)
                 VALUES ('old', ?1, 'sent', 'ok', 1, 'w#1', 0, ?2, ?3)",
                rusqlite::params![user, now, now / 1000 + 86_400],
            )
            .unwrap();
        }
    }
    let env = [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )];
    let (rows, err) = refresh(&stack, &env, "old");
    // local_stack.py's users never set a password.
    assert_eq!(rows["legacy@example.com"][6], "FORCE_CHANGE_PASSWORD");
    assert_eq!(rows["legacy@example.com"][8], "pending");
    assert_eq!(rows["ghost@example.com"][6], "NOT_FOUND");
    assert!(err.contains("completed 0, pending 1, not found 1"), "{err}");
    let conn = rusqlite::Connection::open(&stack.ledger_path).unwrap();
    let checked: i64 = conn
        .query_row(
            "SELECT count(*) FROM ledger WHERE checked_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(checked, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dynamodb_ledger_records_statuses_only_on_sent_entries() {
    let stack = Stack::new(false, &["dyn-a@example.com", "dyn-b@example.com"]).await;
    let table = format!("ledger-{}", random_suffix());
    let env = [
        ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
        ("RESET_WORKER_LEDGER__TABLE", table.as_str()),
        (
            "RESET_WORKER_COGNITO__USER_POOL_ID",
            stack.user_pool_id.as_str(),
        ),
    ];
    assert_eq!(run_cli(&stack, &env, &["ledger", "init"], None).0, 0);
    let client = aws_sdk_dynamodb::Client::new(&sdk_config(&stack.moto));
    let now = reset_worker::ledger::now_ms();
    for (user, state) in [
        ("dyn-a@example.com", "sent"),
        ("dyn-b@example.com", "skipped"),
    ] {
        client
            .put_item()
            .table_name(&table)
            .item("campaign", AttributeValue::S("dyn".into()))
            .item("username", AttributeValue::S(user.into()))
            .item("state", AttributeValue::S(state.into()))
            .item("reason", AttributeValue::S("ok".into()))
            .item("attempts", AttributeValue::N("1".into()))
            .item("updated_at", AttributeValue::N((now - 60_000).to_string()))
            .item(
                "expires_at",
                AttributeValue::N((now / 1000 + 86_400).to_string()),
            )
            .send()
            .await
            .expect("PutItem");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    completes(&stack, "dyn-a@example.com").await;
    let (rows, err) = refresh(&stack, &env, "dyn");
    assert!(err.contains("checked 1 users"), "{err}");
    assert_eq!(rows["dyn-a@example.com"][8], "completed");
    // Not `sent`: never read, no status.
    assert_eq!(rows["dyn-b@example.com"][6], "");
    let item = client
        .get_item()
        .table_name(&table)
        .key("campaign", AttributeValue::S("dyn".into()))
        .key("username", AttributeValue::S("dyn-a@example.com".into()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(
        item.get("user_status").and_then(|v| v.as_s().ok()),
        Some(&"CONFIRMED".to_owned())
    );
    assert!(item.contains_key("checked_at") && item.contains_key("user_modified_at"));
    // Completed: a re-run reads nobody.
    let (_, err) = refresh(&stack, &env, "dyn");
    assert!(err.contains("checked 0 users"), "{err}");
    assert!(err.contains("completed 1, pending 0, not found 0"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_without_an_id_is_a_config_error_and_a_wrong_id_halts() {
    let stack = Stack::new(false, &["cfg@example.com"]).await;
    let args = ["report", "--campaign", "c", "--refresh-status"];
    let (code, _, err) = run_cli(&stack, &[], &args, None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cognito.user_pool_id"), "{err}");
    let env = [("RESET_WORKER_COGNITO__POOLS__EU__CLIENT_ID", "c-eu")];
    let (code, _, err) = run_cli(
        &stack,
        &env,
        &[
            "report",
            "--campaign",
            "c",
            "--refresh-status",
            "--pool",
            "eu",
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cognito.pools.eu.user_pool_id"), "{err}");
    let (code, _, err) = run_cli(
        &stack,
        &[],
        &["report", "--campaign", "c", "--pool", "eu"],
        None,
    );
    assert_ne!(code, 0, "--pool without --refresh-status: {err}");

    // A pool ID Cognito does not know: halted (exit 3), after one call.
    let now = reset_worker::ledger::now_ms() as i64;
    {
        let ledger =
            reset_worker::ledger::sqlite::Sqlite::open(std::path::Path::new(&stack.ledger_path))
                .unwrap();
        drop(ledger);
        let conn = rusqlite::Connection::open(&stack.ledger_path).unwrap();
        conn.execute(
            "INSERT INTO ledger (campaign, username, state, reason, attempts, updated_at, expires_at)
             VALUES ('c', 'cfg@example.com', 'sent', 'ok', 1, ?1, ?2)",
            rusqlite::params![now, now / 1000 + 86_400],
        )
        .unwrap();
    }
    let wrong = [("RESET_WORKER_COGNITO__USER_POOL_ID", "us-east-1_nosuchpool")];
    let (code, _, err) = run_cli(&stack, &wrong, &args, None);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("refresh halted: AdminGetUser answered ResourceNotFoundException"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_refresh_keeps_what_it_read_and_the_rerun_reads_the_rest() {
    let stack = Stack::new(false, &[]).await;
    // Six `sent` users the pool does not have: each becomes NOT_FOUND, which
    // a re-run does not read again.
    reset_worker::ledger::sqlite::Sqlite::open(std::path::Path::new(&stack.ledger_path)).unwrap();
    let now = reset_worker::ledger::now_ms() as i64;
    let conn = rusqlite::Connection::open(&stack.ledger_path).unwrap();
    for i in 0..6 {
        conn.execute(
            "INSERT INTO ledger (campaign, username, state, reason, attempts, updated_at, expires_at)
             VALUES ('kill', ?1, 'sent', 'ok', 1, ?2, ?3)",
            rusqlite::params![format!("gone{i}@example.com"), now, now / 1000 + 86_400],
        )
        .unwrap();
    }
    // One call a second, killed (SIGKILL, as a crash) after about three.
    let pool_id = [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )];
    let args = [
        "report",
        "--campaign",
        "kill",
        "--refresh-status",
        "--status-rps",
        "1",
    ];
    let mut child = cli_command(&stack, &pool_id, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn reset-worker");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    let recorded: i64 = conn
        .query_row(
            "SELECT count(*) FROM ledger WHERE campaign = 'kill' AND user_status = 'NOT_FOUND'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        (1..6).contains(&recorded),
        "recorded {recorded} before the kill"
    );
    let env = [(
        "RESET_WORKER_COGNITO__USER_POOL_ID",
        stack.user_pool_id.as_str(),
    )];
    let (rows, err) = refresh(&stack, &env, "kill");
    assert!(
        err.contains(&format!(
            "checked {} users with AdminGetUser, skipped {recorded}",
            6 - recorded
        )),
        "{err}"
    );
    assert_eq!(with_completion(&rows, "not_found").len(), 6);
}
