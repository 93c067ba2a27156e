//! `cognito.sign_out`: after the reset, `AdminUserGlobalSignOut` ends the
//! user's sessions. On moto: every sent user is signed out once and their
//! refresh token stops working, on the DynamoDB ledger. On wiremock (faults
//! moto cannot make): a sign-out that fails twice is retried alone and the
//! user gets one email; a denied sign-out halts the campaign, and the re-run
//! after the fix signs out without emailing again; `preflight` tells a
//! denied sign-out from an allowed one.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::app::{app_settings, spawn_app};
use support::cognito_mock::*;
use support::*;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockBuilder, MockServer, ResponseTemplate};

const SIGN_OUT_TARGET: &str = "AWSCognitoIdentityProviderService.AdminUserGlobalSignOut";
const PASSWORD: &str = "Correct-Horse-1-Battery";

/// Per user, how many times moto recorded `target` for the stack's pool.
fn recorded_per_user(stack: &Stack, target: &str) -> BTreeMap<String, usize> {
    let mut per_user = BTreeMap::new();
    for entry in recorded_requests(&stack.moto) {
        if recorded_header(&entry, "X-Amz-Target") != Some(target) {
            continue;
        }
        let Ok(body) = serde_json::from_slice::<Value>(&recorded_body(&entry)) else {
            continue;
        };
        let ours = body["UserPoolId"] == stack.user_pool_id.as_str()
            || body["ClientId"] == stack.client_id.as_str();
        if let (true, Some(user)) = (ours, body["Username"].as_str()) {
            *per_user.entry(user.to_owned()).or_insert(0) += 1;
        }
    }
    per_user
}

/// Gives `user` a password and signs them in; returns their refresh token.
async fn sign_in(stack: &Stack, user: &str) -> String {
    stack
        .cognito
        .admin_set_user_password()
        .user_pool_id(&stack.user_pool_id)
        .username(user)
        .password(PASSWORD)
        .permanent(true)
        .send()
        .await
        .expect("AdminSetUserPassword on moto");
    let out = stack
        .cognito
        .admin_initiate_auth()
        .user_pool_id(&stack.user_pool_id)
        .client_id(&stack.client_id)
        .auth_flow(aws_sdk_cognitoidentityprovider::types::AuthFlowType::AdminUserPasswordAuth)
        .auth_parameters("USERNAME", user)
        .auth_parameters("PASSWORD", PASSWORD)
        .send()
        .await
        .expect("AdminInitiateAuth on moto");
    out.authentication_result()
        .and_then(|r| r.refresh_token())
        .expect("a refresh token")
        .to_owned()
}

/// Whether `refresh_token` still gets new tokens.
async fn session_alive(stack: &Stack, refresh_token: &str) -> bool {
    stack
        .cognito
        .admin_initiate_auth()
        .user_pool_id(&stack.user_pool_id)
        .client_id(&stack.client_id)
        .auth_flow(aws_sdk_cognitoidentityprovider::types::AuthFlowType::RefreshTokenAuth)
        .auth_parameters("REFRESH_TOKEN", refresh_token)
        .send()
        .await
        .is_ok()
}

fn jobs(campaign: &str, users: &[&str]) -> Vec<String> {
    users
        .iter()
        .map(|u| json!({"username": u, "campaign_id": campaign}).to_string())
        .collect()
}

/// `report --campaign` as rows by username: (state, reason, signed_out_at).
fn report(stack: &Stack, env: &[(&str, &str)], campaign: &str) -> BTreeMap<String, Vec<String>> {
    let (code, out, err) = run_cli(stack, env, &["report", "--campaign", campaign], None);
    assert_eq!(code, 0, "report failed: {err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("username,state,reason,attempts,updated_at,signed_out_at")
    );
    lines
        .map(|l| {
            let row: Vec<String> = l.split(',').map(str::to_owned).collect();
            (row[0].clone(), row)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sent_user_is_signed_out_once_and_their_session_ends() {
    let users = [
        "out-a@example.com",
        "out-b@example.com",
        "out-c@example.com",
        "out-d@example.com",
        "out-e@example.com",
    ];
    let stack = Stack::new(false, &users).await;
    let mut tokens = Vec::new();
    for user in users {
        tokens.push(sign_in(&stack, user).await);
    }
    // A reset alone leaves the session alive: the reason for the sign-out.
    assert!(session_alive(&stack, &tokens[0]).await);
    let table = format!("ledger-{}", random_suffix());
    init_dynamodb_ledger(&stack.moto, &table, &stack.queue_url);
    // Every user twice, as SQS duplicates would.
    let mut bodies = jobs("lockout", &users);
    bodies.extend(jobs("lockout", &users));
    send_jobs(&stack, &bodies).await;
    let settings = app_settings(
        &stack,
        json!({
            "cognito": {"sign_out": true, "user_pool_id": stack.user_pool_id},
            "ledger": {"backend": "dynamodb", "table": table},
            "limits": {"concurrency": 4, "max_rps": 100, "burst": 10},
        }),
    );
    let summary = spawn_app(settings, None, true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.sent, 5, "{summary:?}");
    assert_eq!(summary.skipped, 5, "the duplicates: {summary:?}");

    let one_each: BTreeMap<String, usize> = users.iter().map(|u| ((*u).to_owned(), 1)).collect();
    assert_eq!(
        recorded_per_user(&stack, FORGOT_PASSWORD_TARGET),
        one_each,
        "one reset each"
    );
    assert_eq!(
        recorded_per_user(&stack, SIGN_OUT_TARGET),
        one_each,
        "one sign-out each"
    );
    for (user, token) in users.iter().zip(&tokens) {
        assert!(
            !session_alive(&stack, token).await,
            "{user}'s refresh token still works"
        );
    }
    // The ledger records it, user by user.
    let env = [
        ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
        ("RESET_WORKER_LEDGER__TABLE", table.as_str()),
    ];
    let rows = report(&stack, &env, "lockout");
    assert_eq!(rows.len(), 5);
    for row in rows.values() {
        assert_eq!(
            (row[1].as_str(), row[2].as_str()),
            ("sent", "ok"),
            "{row:?}"
        );
        assert!(row[5].ends_with('Z') && row[5].len() == 20, "{row:?}");
    }
    let (code, out, err) = run_cli(&stack, &env, &["status", "--campaign", "lockout"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("signed out: 5"), "{out}");
    // preflight on moto: the dry call answers UserNotFoundException.
    let env = [
        (
            "RESET_WORKER_COGNITO__USER_POOL_ID",
            stack.user_pool_id.as_str(),
        ),
        ("RESET_WORKER_COGNITO__SIGN_OUT", "true"),
    ];
    let (_, out, _) = run_cli(&stack, &env, &["preflight"], None);
    assert!(
        out.lines()
            .any(|l| l.starts_with("PASS") && l.contains("sign-out") && l.contains("UserNotFound")),
        "{out}"
    );
}

/// Matches an AdminUserGlobalSignOut call.
fn sign_out_call() -> MockBuilder {
    Mock::given(method("POST"))
        .and(path("/"))
        .and(header("x-amz-target", SIGN_OUT_TARGET))
}

fn signed_out() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw("{}", AMZ_JSON)
}

/// How many calls of `target` wiremock received.
async fn calls(cognito: &MockServer, target: &str) -> usize {
    cognito
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.headers.get("x-amz-target").and_then(|v| v.to_str().ok()) == Some(target))
        .count()
}

/// Settings for one user on wiremock's Cognito: one attempt per delivery,
/// so each failed sign-out ends the delivery and the job comes back (after
/// the 1 s minimum deferral) through the ledger.
fn one_attempt(stack: &Stack) -> reset_worker::config::Settings {
    app_settings(
        stack,
        json!({
            "cognito": {"sign_out": true, "user_pool_id": "us-east-1_wiremock"},
            "retry": {"initial_delay_ms": 10, "max_delay_ms": 50, "max_attempts": 1},
            "limits": {"concurrency": 1, "max_rps": 1000, "burst": 100},
        }),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sign_out_failing_twice_is_retried_alone_and_the_user_gets_one_email() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(success())
        .mount(&cognito)
        .await;
    sign_out_call()
        .respond_with(cognito_error(500, "InternalErrorException", "try again"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&cognito)
        .await;
    sign_out_call()
        .respond_with(signed_out())
        .with_priority(2)
        .mount(&cognito)
        .await;
    send_jobs(&stack, &jobs("flaky", &["flaky@example.com"])).await;
    let app = spawn_app(one_attempt(&stack), Some(&cognito.uri()), false).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            app.campaign_jobs("flaky", "sent") == 1.0
        })
        .await,
        "the job was never sent"
    );
    // The recorder is shared by this binary's tests: at least this test's.
    let metrics = app.metrics();
    let sign_outs = |result| {
        metric_value(
            &metrics,
            "reset_worker_sign_outs_total",
            &[("result", result)],
        )
    };
    assert!(
        sign_outs("error") >= 2.0 && sign_outs("ok") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "reset_worker_cognito_requests_total",
            &[("operation", "AdminUserGlobalSignOut"), ("result", "error")]
        ) >= 2.0,
        "{metrics}"
    );
    let summary = app.stop().await.unwrap();

    assert_eq!(
        calls(&cognito, FORGOT_PASSWORD_TARGET).await,
        1,
        "one email"
    );
    assert_eq!(calls(&cognito, SIGN_OUT_TARGET).await, 3);
    // Two deliveries deferred (sign_out_failed), the third sent.
    assert_eq!((summary.deferred, summary.sent), (2, 1), "{summary:?}");
    let rows = report(&stack, &[], "flaky");
    let row = &rows["flaky@example.com"];
    assert_eq!(
        (row[1].as_str(), row[2].as_str()),
        ("sent", "ok"),
        "{row:?}"
    );
    assert_eq!(row[3], "1", "one reset call on record: {row:?}");
    assert!(!row[5].is_empty(), "signed out: {row:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_sign_out_halts_and_the_rerun_signs_out_without_a_second_email() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(success())
        .mount(&cognito)
        .await;
    let denied = sign_out_call()
        .respond_with(cognito_error(
            400,
            "AccessDeniedException",
            "not authorized to perform: cognito-idp:AdminUserGlobalSignOut",
        ))
        .mount_as_scoped(&cognito)
        .await;
    send_jobs(
        &stack,
        &jobs("denied", &["first@example.com", "second@example.com"]),
    )
    .await;
    let err = spawn_app(one_attempt(&stack), Some(&cognito.uri()), true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a denied sign-out halts the campaign");
    assert!(
        format!("{err:#}").contains("AccessDeniedException"),
        "{err:#}"
    );
    // Halted at the first denial: one user reset, the other never called.
    assert_eq!(calls(&cognito, FORGOT_PASSWORD_TARGET).await, 1);
    assert_eq!(calls(&cognito, SIGN_OUT_TARGET).await, 1);
    let rows = report(&stack, &[], "denied");
    let halted: Vec<&Vec<String>> = rows.values().filter(|r| r[3] == "1").collect();
    assert_eq!(halted.len(), 1, "{rows:?}");
    assert_eq!(
        (
            halted[0][1].as_str(),
            halted[0][2].as_str(),
            halted[0][5].as_str()
        ),
        ("deferred", "halted", ""),
        "reset, not signed out: {rows:?}"
    );

    // The permission granted, the campaign runs again: the user already
    // reset is signed out only; the other gets their one email.
    drop(denied);
    sign_out_call()
        .respond_with(signed_out())
        .mount(&cognito)
        .await;
    let summary = spawn_app(one_attempt(&stack), Some(&cognito.uri()), true)
        .await
        .finished(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.sent, 2, "{summary:?}");
    assert_eq!(
        calls(&cognito, FORGOT_PASSWORD_TARGET).await,
        2,
        "one email per user, none again"
    );
    assert_eq!(calls(&cognito, SIGN_OUT_TARGET).await, 3);
    for row in report(&stack, &[], "denied").values() {
        assert_eq!(row[1], "sent", "{row:?}");
        assert_eq!(row[3], "1", "{row:?}");
        assert!(!row[5].is_empty(), "{row:?}");
    }

    // preflight names the missing permission before a campaign starts.
    let _denied = sign_out_call()
        .respond_with(cognito_error(
            400,
            "AccessDeniedException",
            "not authorized to perform: cognito-idp:AdminUserGlobalSignOut",
        ))
        .with_priority(1)
        .mount_as_scoped(&cognito)
        .await;
    let uri = cognito.uri();
    let env = [
        ("RESET_WORKER_COGNITO__USER_POOL_ID", "us-east-1_wiremock"),
        ("RESET_WORKER_COGNITO__SIGN_OUT", "true"),
        ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", uri.as_str()),
    ];
    let (code, out, _) = run_cli(&stack, &env, &["preflight"], None);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("sign-out")
            && l.contains("cognito-idp:AdminUserGlobalSignOut")),
        "{out}"
    );
}
