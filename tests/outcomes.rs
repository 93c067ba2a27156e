//! The outcome table (README "Outcome policy") end to end: the real binary,
//! SQS on moto, Cognito `ForgotPassword` on a wiremock server that plays each
//! answer the policy distinguishes.
//!
//! Two ways a run ends here:
//! * "drained" runs (`--until-empty`, concurrency 1, short polls) for
//!   outcomes where the worker should exit by itself. With one permit the
//!   loop does not poll while the job runs, and with short polls it exits
//!   milliseconds after the job's outcome, long before a message deferred by
//!   at least 1 s can come back and be processed a second time;
//! * SIGTERM runs where metrics must be read while the worker is alive.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use reset_worker::job::{UserHasher, Username};
use secrecy::SecretString;
use serde_json::{Value, json};
use support::*;
use wiremock::matchers::{header, method, path};
use wiremock::{Match, Mock, MockBuilder, MockServer, Request, ResponseTemplate};

const AMZ_JSON: &str = "application/x-amz-json-1.1";
const HASH_KEY: &str = "outcomes-test-username-hash-key";
const CAMPAIGN: &str = "outcomes-test";
/// Upper bound for a drained run; each normally takes a few seconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Cognito on wiremock
// ---------------------------------------------------------------------------

/// Matches a well-formed ForgotPassword call of the AWS JSON 1.1 protocol.
fn forgot_password() -> MockBuilder {
    Mock::given(method("POST"))
        .and(path("/"))
        .and(header("x-amz-target", FORGOT_PASSWORD_TARGET))
        .and(header("content-type", AMZ_JSON))
}

fn success() -> ResponseTemplate {
    let body = json!({"CodeDeliveryDetails": {
        "Destination": "a***@e***",
        "DeliveryMedium": "EMAIL",
        "AttributeName": "email",
    }});
    ResponseTemplate::new(200).set_body_raw(body.to_string(), AMZ_JSON)
}

/// An error answer as Cognito sends it: the code in `x-amzn-errortype` and
/// in the body's `__type`.
fn cognito_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("x-amzn-errortype", code)
        .set_body_raw(
            json!({"__type": code, "message": message}).to_string(),
            AMZ_JSON,
        )
}

/// Parsed bodies of every request the mock received, after checking that
/// each one was a ForgotPassword call (nothing else may reach "Cognito").
async fn forgot_password_calls(cognito: &MockServer) -> Vec<Value> {
    let requests = cognito
        .received_requests()
        .await
        .expect("wiremock request recording is on");
    requests
        .iter()
        .map(|r| {
            let target = r.headers.get("x-amz-target").and_then(|v| v.to_str().ok());
            assert_eq!(
                target,
                Some(FORGOT_PASSWORD_TARGET),
                "unexpected request to Cognito: {}",
                describe(r)
            );
            r.body_json::<Value>().unwrap_or_else(|e| {
                panic!("ForgotPassword body is not JSON ({e}): {}", describe(r))
            })
        })
        .collect()
}

fn describe(r: &Request) -> String {
    format!(
        "{} {} {:?} {}",
        r.method,
        r.url,
        r.headers,
        String::from_utf8_lossy(&r.body)
    )
}

fn usernames(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            c["Username"]
                .as_str()
                .unwrap_or_else(|| panic!("call without Username: {c}"))
                .to_string()
        })
        .collect()
}

/// Answers only calls whose `ClientId` is the stack's and whose `SecretHash`
/// is Base64(HMAC-SHA256(secret, username + client id)) for their `Username`.
struct ValidSecretHash {
    client_id: String,
    client_secret: String,
}

impl Match for ValidSecretHash {
    fn matches(&self, request: &Request) -> bool {
        let Ok(body) = request.body_json::<Value>() else {
            return false;
        };
        let (Some(client_id), Some(username), Some(hash)) = (
            body["ClientId"].as_str(),
            body["Username"].as_str(),
            body["SecretHash"].as_str(),
        ) else {
            return false;
        };
        client_id == self.client_id
            && hash == secret_hash(username, &self.client_id, &self.client_secret)
    }
}

// ---------------------------------------------------------------------------
// Worker runs
// ---------------------------------------------------------------------------

fn job(username: &str) -> String {
    json!({"username": username, "campaign_id": CAMPAIGN}).to_string()
}

/// The worker's env: the stack, Cognito on `cognito`, fast retries, a high
/// rate cap, a fixed username-hash key; then `overrides` (which win).
fn worker_env(
    stack: &Stack,
    cognito: &MockServer,
    overrides: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = stack_env(stack);
    env.push((
        "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER".into(),
        cognito.uri(),
    ));
    let defaults = [
        ("RESET_WORKER_RETRY__INITIAL_DELAY_MS", "10"),
        ("RESET_WORKER_RETRY__MAX_DELAY_MS", "50"),
        ("RESET_WORKER_RETRY__MAX_ATTEMPTS", "3"),
        ("RESET_WORKER_RETRY__DELIVERY_FAILURE_MAX_ATTEMPTS", "2"),
        ("RESET_WORKER_RETRY__LIMIT_EXCEEDED_DELAY_SECONDS", "600"),
        ("RESET_WORKER_LIMITS__MAX_RPS", "1000"),
        ("RESET_WORKER_LIMITS__BURST", "100"),
        ("RESET_WORKER_LIMITS__CONCURRENCY", "1"),
        ("RESET_WORKER_SHUTDOWN__GRACE_SECONDS", "10"),
        ("RESET_WORKER_LOGGING__USERNAME_HASH_KEY", HASH_KEY),
        ("RESET_WORKER_LOG_FORMAT", "json"),
    ];
    for (key, value) in defaults.iter().chain(overrides) {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => env.push((key.to_string(), value.to_string())),
        }
    }
    env
}

/// Runs the worker with `--until-empty` (concurrency 1, short polls) and
/// waits for it to exit 0 by itself. The returned worker keeps the log.
fn run_drained(stack: &Stack, cognito: &MockServer, overrides: &[(&str, &str)]) -> Worker {
    let mut overrides = overrides.to_vec();
    overrides.push(("RESET_WORKER_SQS__WAIT_TIME_SECONDS", "0"));
    let mut worker = spawn_worker(&worker_env(stack, cognito, &overrides), &["--until-empty"]);
    let code = worker.wait_exit(RUN_TIMEOUT);
    assert_eq!(code, Some(0), "`run --until-empty` should drain and exit 0");
    worker
}

/// Stops a worker started without `--until-empty` and expects a clean exit.
fn stop(worker: &mut Worker) {
    worker.sigterm();
    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)),
        Some(0),
        "SIGTERM should end the worker cleanly within the grace period"
    );
}

fn metric(worker: &Worker, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&worker.metrics(), name, labels)
}

async fn wait_for_metric(worker: &Worker, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let reached = eventually(Duration::from_secs(15), || async move {
        metric(worker, name, labels) >= at_least
    })
    .await;
    assert!(
        reached,
        "{name}{labels:?} never reached {at_least}; metrics:\n{}",
        worker.metrics()
    );
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

fn log_lines(worker: &Worker) -> Vec<Value> {
    worker
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .collect()
}

fn outcome_lines(worker: &Worker) -> Vec<Value> {
    log_lines(worker)
        .into_iter()
        .filter(|l| l["message"] == "job outcome")
        .collect()
}

/// The one outcome line of a one-job run, checked for the fields every
/// outcome line carries: the campaign, a keyed hash of the user (never the
/// username itself, anywhere in the log), the attempts.
fn only_outcome(worker: &Worker, username: &str, attempts: u64) -> Value {
    let lines = outcome_lines(worker);
    assert_eq!(lines.len(), 1, "expected one outcome line: {lines:#?}");
    let line = lines.into_iter().next().unwrap_or_default();
    let hasher = UserHasher::new(Some(SecretString::from(HASH_KEY)));
    let user = Username::parse(username.to_string()).expect("valid username");
    assert_eq!(line["user"], hasher.user_ref(&user).as_str(), "{line}");
    assert_eq!(line["campaign_id"], CAMPAIGN, "{line}");
    assert_eq!(line["attempts"], attempts, "{line}");
    assert!(
        !worker.logs().contains(username),
        "the log must not contain the username"
    );
    line
}

/// The `worker stopped` summary line.
fn summary(worker: &Worker) -> Value {
    let lines: Vec<Value> = log_lines(worker)
        .into_iter()
        .filter(|l| l["message"] == "worker stopped")
        .collect();
    assert_eq!(lines.len(), 1, "expected one `worker stopped` line");
    lines.into_iter().next().unwrap_or_default()
}

fn message_attribute(m: &aws_sdk_sqs::types::Message, name: &str) -> Option<String> {
    m.message_attributes()?
        .get(name)?
        .string_value()
        .map(str::to_owned)
}

// ---------------------------------------------------------------------------
// The outcome table
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn throttled_twice_then_sent() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(cognito_error(
            400,
            "TooManyRequestsException",
            "Rate exceeded",
        ))
        .up_to_n_times(2)
        .with_priority(1)
        .expect(2)
        .named("first two calls throttled")
        .mount(&cognito)
        .await;
    forgot_password()
        .respond_with(success())
        .with_priority(2)
        .expect(1)
        .named("then success")
        .mount(&cognito)
        .await;
    let username = "alice@example.com";
    send_jobs(&stack, &[job(username)]).await;

    let mut worker = spawn_worker(&worker_env(&stack, &cognito, &[]), &[]);
    wait_for_metric(
        &worker,
        "reset_worker_jobs_total",
        &[("outcome", "sent")],
        1.0,
    )
    .await;
    let text = worker.metrics();
    let jobs = |outcome| metric_value(&text, "reset_worker_jobs_total", &[("outcome", outcome)]);
    assert_eq!(jobs("sent"), 1.0, "{text}");
    for other in ["skipped", "rejected", "deferred", "released"] {
        assert_eq!(jobs(other), 0.0, "{other}: {text}");
    }
    let requests = |labels: &[(&str, &str)]| {
        metric_value(&text, "reset_worker_cognito_requests_total", labels)
    };
    assert_eq!(
        requests(&[
            ("result", "throttled"),
            ("code", "TooManyRequestsException")
        ]),
        2.0,
        "{text}"
    );
    assert_eq!(requests(&[("result", "ok")]), 1.0, "{text}");
    assert_eq!(requests(&[("result", "error")]), 0.0, "{text}");
    assert_eq!(
        metric_value(&text, "reset_worker_throttled_total", &[]),
        2.0,
        "{text}"
    );
    stop(&mut worker);

    cognito.verify().await;
    assert_eq!(
        usernames(&forgot_password_calls(&cognito).await),
        [username; 3]
    );
    let line = only_outcome(&worker, username, 3);
    assert_eq!(line["outcome"], "sent", "{line}");
    assert_eq!(line["reason"], "ok", "{line}");
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

/// A transient error on every call: `max_attempts` calls, then `deferred`
/// with the message kept (invisible for a while), nothing dead-lettered.
async fn retries_exhausted_then_deferred(answer: ResponseTemplate, error_code: &str) {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(answer)
        .expect(3)
        .mount(&cognito)
        .await;
    let username = "bob@example.com";
    send_jobs(&stack, &[job(username)]).await;

    let worker = run_drained(
        &stack,
        &cognito,
        &[("RESET_WORKER_RETRY__MAX_ATTEMPTS", "3")],
    );

    cognito.verify().await;
    assert_eq!(
        usernames(&forgot_password_calls(&cognito).await),
        [username; 3]
    );
    let line = only_outcome(&worker, username, 3);
    assert_eq!(line["outcome"], "deferred", "{line}");
    assert_eq!(line["reason"], "retries_exhausted", "{line}");
    assert_eq!(line["error_code"], error_code, "{line}");
    assert!(line["delay_seconds"].as_u64() >= Some(1), "{line}");
    let (visible, not_visible) = queue_counts(&stack.sqs, &stack.queue_url).await;
    assert_eq!(
        visible + not_visible,
        1,
        "a deferred message stays in the queue"
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_error_is_retried_then_deferred() {
    retries_exhausted_then_deferred(
        cognito_error(500, "InternalErrorException", "Internal error"),
        "InternalErrorException",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_http_503_is_retried_then_deferred() {
    retries_exhausted_then_deferred(ResponseTemplate::new(503), "server_error").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_exceeded_is_deferred_without_retry() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(cognito_error(
            400,
            "LimitExceededException",
            "Attempt limit exceeded, please try after some time.",
        ))
        .expect(1)
        .mount(&cognito)
        .await;
    let username = "carol@example.com";
    send_jobs(&stack, &[job(username)]).await;

    let worker = run_drained(&stack, &cognito, &[]);

    cognito.verify().await;
    let line = only_outcome(&worker, username, 1);
    assert_eq!(line["outcome"], "deferred", "{line}");
    assert_eq!(line["reason"], "user_limit_exceeded", "{line}");
    assert_eq!(line["error_code"], "LimitExceededException", "{line}");
    assert_eq!(line["delay_seconds"], 600, "{line}");
    // Hidden for retry.limit_exceeded_delay_seconds (600 s), not deleted.
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 1));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn user_not_found_is_skipped_and_deleted() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(cognito_error(
            400,
            "UserNotFoundException",
            "Username/client id combination not found.",
        ))
        .expect(1)
        .mount(&cognito)
        .await;
    let username = "nobody@example.com";
    send_jobs(&stack, &[job(username)]).await;

    let worker = run_drained(&stack, &cognito, &[]);

    cognito.verify().await;
    let line = only_outcome(&worker, username, 1);
    assert_eq!(line["outcome"], "skipped", "{line}");
    assert_eq!(line["reason"], "user_not_found", "{line}");
    assert_eq!(line["error_code"], "UserNotFoundException", "{line}");
    assert_eq!(summary(&worker)["skipped"], 1);
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

/// A permanent error: one call, then the original body goes to the
/// dead-letter queue with the reason, and the source message is deleted.
async fn invalid_parameter_is_dead_lettered(fifo: bool) {
    let stack = Stack::new(fifo, &[]).await;
    let cognito = MockServer::start().await;
    let server_message = "Cannot reset password for the user as there is no registered/verified email or phone_number";
    forgot_password()
        .respond_with(cognito_error(
            400,
            "InvalidParameterException",
            server_message,
        ))
        .expect(1)
        .mount(&cognito)
        .await;
    let username = "dave@example.com";
    let body = json!({
        "username": username,
        "campaign_id": CAMPAIGN,
        "client_metadata": {"reason": "breach"},
    })
    .to_string();
    send_jobs(&stack, std::slice::from_ref(&body)).await;

    let worker = run_drained(&stack, &cognito, &[]);

    cognito.verify().await;
    let line = only_outcome(&worker, username, 1);
    assert_eq!(line["outcome"], "rejected", "{line}");
    assert_eq!(line["reason"], "InvalidParameterException", "{line}");
    assert_eq!(line["level"], "WARN", "{line}");
    assert!(
        !worker.logs().contains(server_message),
        "the rejection detail is for the dead-letter queue only"
    );
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));

    let dead = drain_all(&stack.sqs, &stack.dlq_url).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let m = &dead[0];
    assert_eq!(m.body(), Some(body.as_str()));
    let attr = |name| message_attribute(m, name);
    assert_eq!(
        attr("reset_worker_reason").as_deref(),
        Some("InvalidParameterException")
    );
    assert_eq!(attr("reset_worker_detail").as_deref(), Some(server_message));
    assert_eq!(attr("reset_worker_receive_count").as_deref(), Some("1"));
    assert_eq!(
        attr("reset_worker_source_message_id").as_deref(),
        line["message_id"].as_str()
    );
    if fifo {
        let group = m
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId))
            .map(String::as_str);
        assert_eq!(group, Some("g0"), "the DLQ copy keeps the message group");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_parameter_is_rejected_to_the_dead_letter_queue() {
    invalid_parameter_is_dead_lettered(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_parameter_is_rejected_to_a_fifo_dead_letter_queue() {
    invalid_parameter_is_dead_lettered(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn code_delivery_failure_is_retried_then_rejected() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(cognito_error(
            400,
            "CodeDeliveryFailureException",
            "Unable to deliver the code",
        ))
        .expect(2)
        .mount(&cognito)
        .await;
    let username = "erin@example.com";
    let body = job(username);
    send_jobs(&stack, std::slice::from_ref(&body)).await;

    let worker = run_drained(
        &stack,
        &cognito,
        &[("RESET_WORKER_RETRY__DELIVERY_FAILURE_MAX_ATTEMPTS", "2")],
    );

    cognito.verify().await;
    assert_eq!(
        usernames(&forgot_password_calls(&cognito).await),
        [username; 2]
    );
    let line = only_outcome(&worker, username, 2);
    assert_eq!(line["outcome"], "rejected", "{line}");
    assert_eq!(line["reason"], "CodeDeliveryFailureException", "{line}");
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    let dead = drain_all(&stack.sqs, &stack.dlq_url).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].body(), Some(body.as_str()));
    assert_eq!(
        message_attribute(&dead[0], "reset_worker_reason").as_deref(),
        Some("CodeDeliveryFailureException")
    );
}

/// A fatal error halts the campaign: exit code 3, one error line naming the
/// cause, `/readyz` 503, and every message left in the queue, visible.
///
/// Concurrency 2 with two calls in flight: the first call to arrive is held
/// for 3 s, the second is answered NotAuthorized at once. So the campaign is
/// halted while a call is still running, which keeps the halted worker
/// alive long enough to probe `/readyz`, and the held call's own fatal
/// answer must not produce a second error line.
#[tokio::test(flavor = "multi_thread")]
async fn not_authorized_halts_without_touching_messages() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    let server_message = "Unable to verify secret hash for client";
    forgot_password()
        .respond_with(
            cognito_error(400, "NotAuthorizedException", server_message)
                .set_delay(Duration::from_secs(3)),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .named("first call: held, then NotAuthorized")
        .mount(&cognito)
        .await;
    forgot_password()
        .respond_with(cognito_error(400, "NotAuthorizedException", server_message))
        .with_priority(2)
        .named("later calls: NotAuthorized at once")
        .mount(&cognito)
        .await;
    let jobs: Vec<String> = (0..5)
        .map(|i| job(&format!("user{i}@example.com")))
        .collect();
    send_jobs(&stack, &jobs).await;

    let mut worker = spawn_worker(
        &worker_env(
            &stack,
            &cognito,
            &[("RESET_WORKER_LIMITS__CONCURRENCY", "2")],
        ),
        &[],
    );
    let mock = &cognito;
    let both_in_flight = eventually(Duration::from_secs(15), || async move {
        mock.received_requests().await.map_or(0, |r| r.len()) >= 2
    })
    .await;
    assert!(both_in_flight, "the worker should start two calls");
    let w = &worker;
    let not_ready = eventually(Duration::from_secs(10), || async move { w.ready() == 503 }).await;
    assert!(
        not_ready,
        "/readyz should answer 503 once the campaign is halted"
    );

    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)),
        Some(3),
        "a fatal Cognito error should stop the worker with exit code 3"
    );

    let calls = usernames(&forgot_password_calls(&cognito).await);
    assert_eq!(calls.len(), 2, "no call after the halt: {calls:?}");
    assert!(calls.len() < jobs.len());
    assert_ne!(calls[0], calls[1]);

    let errors: Vec<Value> = log_lines(&worker)
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "one clear error line: {errors:#?}");
    let error = errors[0].to_string();
    assert!(
        error.contains("campaign halted") && error.contains("NotAuthorizedException"),
        "{error}"
    );
    assert!(error.contains(server_message), "{error}");
    let outcomes = outcome_lines(&worker);
    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    for line in &outcomes {
        assert_eq!(line["outcome"], "released", "{line}");
        assert_eq!(line["reason"], "halted", "{line}");
        assert_eq!(line["error_code"], "NotAuthorizedException", "{line}");
    }

    // Nothing deleted or dead-lettered; the held messages were released (visibility 0).
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (5, 0));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

/// The brief's plain case: one permit, so the first fatal answer is the only
/// call; the worker exits 3 by itself and the queue is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn not_authorized_with_one_permit_makes_one_call() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(cognito_error(
            400,
            "NotAuthorizedException",
            "Incorrect username or password.",
        ))
        .expect(1)
        .mount(&cognito)
        .await;
    let jobs: Vec<String> = (0..5)
        .map(|i| job(&format!("user{i}@example.com")))
        .collect();
    send_jobs(&stack, &jobs).await;

    let mut worker = spawn_worker(&worker_env(&stack, &cognito, &[]), &[]);
    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)),
        Some(3),
        "a fatal Cognito error should stop the worker with exit code 3"
    );

    cognito.verify().await;
    let errors: Vec<Value> = log_lines(&worker)
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "one clear error line: {errors:#?}");
    assert!(
        errors[0].to_string().contains("NotAuthorizedException"),
        "{}",
        errors[0]
    );
    let outcomes = outcome_lines(&worker);
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    assert_eq!(outcomes[0]["outcome"], "released", "{}", outcomes[0]);
    assert_eq!(summary(&worker)["released"], 1);
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (5, 0));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_hash_and_job_fields_are_sent() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .and(ValidSecretHash {
            client_id: stack.client_id.clone(),
            client_secret: stack.client_secret.clone(),
        })
        .respond_with(success())
        .with_priority(1)
        .expect(3)
        .named("valid ClientId and SecretHash")
        .mount(&cognito)
        .await;
    forgot_password()
        .respond_with(cognito_error(
            400,
            "NotAuthorizedException",
            "Unable to verify secret hash for client",
        ))
        .with_priority(2)
        .expect(0)
        .named("wrong ClientId or SecretHash")
        .mount(&cognito)
        .await;
    let users = ["alice@example.com", "Zoë.Ünïcødé+tag@example.com", "carol"];
    let full = json!({
        "username": users[0],
        "campaign_id": CAMPAIGN,
        "client_metadata": {"reason": "breach"},
        "user_context_data": {"ip_address": "203.0.113.7", "encoded_data": "ZW5jb2RlZA=="},
        "analytics_endpoint_id": "endpoint-1",
    })
    .to_string();
    send_jobs(&stack, &[full, job(users[1]), job(users[2])]).await;

    let worker = run_drained(&stack, &cognito, &[]);

    cognito.verify().await;
    let calls = forgot_password_calls(&cognito).await;
    let called: BTreeSet<String> = usernames(&calls).into_iter().collect();
    let expected: BTreeSet<String> = users.iter().map(|u| u.to_string()).collect();
    assert_eq!(called, expected);
    for call in &calls {
        assert_eq!(call["ClientId"], stack.client_id.as_str(), "{call}");
        if call["Username"] == users[0] {
            assert_eq!(
                call["ClientMetadata"],
                json!({"reason": "breach"}),
                "{call}"
            );
            assert_eq!(
                call["UserContextData"],
                json!({"IpAddress": "203.0.113.7", "EncodedData": "ZW5jb2RlZA=="}),
                "{call}"
            );
            assert_eq!(
                call["AnalyticsMetadata"],
                json!({"AnalyticsEndpointId": "endpoint-1"}),
                "{call}"
            );
        } else {
            for absent in ["ClientMetadata", "UserContextData", "AnalyticsMetadata"] {
                assert!(call.get(absent).is_none(), "{absent} in {call}");
            }
        }
    }
    let outcomes = outcome_lines(&worker);
    assert_eq!(outcomes.len(), 3, "{outcomes:#?}");
    assert!(
        outcomes.iter().all(|l| l["outcome"] == "sent"),
        "{outcomes:#?}"
    );
    assert_eq!(summary(&worker)["sent"], 3);
    assert_eq!(queue_counts(&stack.sqs, &stack.queue_url).await, (0, 0));
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

/// SIGTERM with calls in flight: they finish and are deleted, nothing else
/// is started, and every job is either called exactly once or still queued.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_slow_cognito_loses_and_duplicates_nothing() {
    const JOBS: usize = 20;
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(success().set_delay(Duration::from_millis(1500)))
        .mount(&cognito)
        .await;
    let users: Vec<String> = (0..JOBS)
        .map(|i| format!("user{i:02}@example.com"))
        .collect();
    let bodies: Vec<String> = users.iter().map(|u| job(u)).collect();
    send_jobs(&stack, &bodies).await;

    let mut worker = spawn_worker(
        &worker_env(
            &stack,
            &cognito,
            &[
                ("RESET_WORKER_LIMITS__CONCURRENCY", "4"),
                ("RESET_WORKER_SHUTDOWN__GRACE_SECONDS", "10"),
                // Short, so a message whose receive was cut off by the
                // shutdown reappears within the test.
                ("RESET_WORKER_SQS__VISIBILITY_TIMEOUT_SECONDS", "5"),
                ("RESET_WORKER_COGNITO__REQUEST_TIMEOUT_SECONDS", "4"),
            ],
        ),
        &[],
    );
    wait_for_metric(
        &worker,
        "reset_worker_jobs_total",
        &[("outcome", "sent")],
        1.0,
    )
    .await;
    let sent_before = metric(&worker, "reset_worker_jobs_total", &[("outcome", "sent")]);
    stop(&mut worker);

    let calls = usernames(&forgot_password_calls(&cognito).await);
    let called: BTreeSet<String> = calls.iter().cloned().collect();
    assert_eq!(
        called.len(),
        calls.len(),
        "a user was called twice (a second email): {calls:?}"
    );
    let n = calls.len();
    assert!(n as f64 >= sent_before, "{n} calls < {sent_before} sent");
    assert!(n < JOBS, "the shutdown should stop the campaign early");

    // Every call succeeded, so its outcome is `sent` and its message deleted;
    // every other message was released or never received.
    let stopped = summary(&worker);
    assert_eq!(stopped["sent"], n, "{stopped}");
    for zero in ["skipped", "rejected", "deferred"] {
        assert_eq!(stopped[zero], 0, "{stopped}");
    }
    let outcomes = outcome_lines(&worker);
    assert!(
        outcomes
            .iter()
            .all(|l| l["outcome"] == "sent"
                || (l["outcome"] == "released" && l["reason"] == "shutdown")),
        "{outcomes:#?}"
    );
    assert_eq!(
        outcomes.len() as u64,
        stopped["sent"].as_u64().unwrap_or(0) + stopped["released"].as_u64().unwrap_or(0)
    );

    let (visible, not_visible) = queue_counts(&stack.sqs, &stack.queue_url).await;
    assert_eq!(visible + not_visible, (JOBS - n) as u64);
    // Released messages are visible again at once; waiting out any
    // in-flight visibility keeps this test about accounting, not timing.
    let (sqs, url) = (&stack.sqs, stack.queue_url.as_str());
    let settled = eventually(Duration::from_secs(15), || async move {
        queue_counts(sqs, url).await.1 == 0
    })
    .await;
    assert!(settled, "messages still in flight after the worker exited");
    // The queue holds exactly the jobs that were not called.
    let left: BTreeSet<String> = drain_all(&stack.sqs, &stack.queue_url)
        .await
        .iter()
        .map(|m| {
            let body: Value = serde_json::from_str(m.body().unwrap_or_default()).expect("job body");
            body["username"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(left.len(), JOBS - n);
    assert!(
        left.is_disjoint(&called),
        "called and still queued: {:?}",
        left.intersection(&called).collect::<Vec<_>>()
    );
    let all: BTreeSet<String> = users.into_iter().collect();
    assert_eq!(left.union(&called).cloned().collect::<BTreeSet<_>>(), all);
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_cognito_times_out_and_is_deferred() {
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(success().set_delay(Duration::from_secs(3)))
        .expect(2)
        .mount(&cognito)
        .await;
    let username = "frank@example.com";
    send_jobs(&stack, &[job(username)]).await;

    let worker = run_drained(
        &stack,
        &cognito,
        &[
            ("RESET_WORKER_COGNITO__REQUEST_TIMEOUT_SECONDS", "1"),
            ("RESET_WORKER_RETRY__MAX_ATTEMPTS", "2"),
        ],
    );

    cognito.verify().await;
    let line = only_outcome(&worker, username, 2);
    assert_eq!(line["outcome"], "deferred", "{line}");
    assert_eq!(line["reason"], "retries_exhausted", "{line}");
    assert_eq!(line["error_code"], "timeout", "{line}");
    assert_eq!(summary(&worker)["sent"], 0);
    let (visible, not_visible) = queue_counts(&stack.sqs, &stack.queue_url).await;
    assert_eq!(visible + not_visible, 1, "a timed-out job is not deleted");
    assert_eq!(queue_counts(&stack.sqs, &stack.dlq_url).await, (0, 0));
}

/// The SecretHash matcher itself: it must refuse wrong hashes, or the test
/// above would prove nothing.
#[test]
fn secret_hash_matcher_accepts_only_the_right_hash() {
    let matcher = ValidSecretHash {
        client_id: "1example23456789".into(),
        client_secret: "client-secret-123".into(),
    };
    let request = |body: Value| Request {
        url: "http://localhost/".parse().expect("url"),
        method: wiremock::http::Method::POST,
        headers: Default::default(),
        body: body.to_string().into_bytes(),
    };
    // Known vector from src/cognito.rs, computed independently with Python.
    let good = "nAJ7KclaH3jOut0oytSx+0cN0BwVWPh2+xAk3bk1yvI=";
    let call = |client_id: &str, username: &str, hash: &str| {
        request(json!({"ClientId": client_id, "Username": username, "SecretHash": hash}))
    };
    assert!(matcher.matches(&call("1example23456789", "alice@example.com", good)));
    assert!(!matcher.matches(&call("1example23456789", "bob@example.com", good)));
    assert!(!matcher.matches(&call("other-client", "alice@example.com", good)));
    assert!(!matcher.matches(&call("1example23456789", "alice@example.com", "AAAA")));
    assert!(!matcher.matches(&request(
        json!({"ClientId": "1example23456789", "Username": "alice@example.com"})
    )));
    assert!(!matcher.matches(&Request {
        body: b"not json".to_vec(),
        ..request(json!({}))
    }));
}

/// SIGTERM while the loop is receiving: every message SQS handed out must be
/// processed or released (README "Shutdown"), so right after a clean exit
/// nothing may be left invisible.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_receive_leaves_nothing_invisible() {
    const JOBS: usize = 40;
    let stack = Stack::new(false, &[]).await;
    let cognito = MockServer::start().await;
    forgot_password()
        .respond_with(success().set_delay(Duration::from_millis(50)))
        .mount(&cognito)
        .await;
    let bodies: Vec<String> = (0..JOBS)
        .map(|i| job(&format!("user{i:02}@example.com")))
        .collect();
    send_jobs(&stack, &bodies).await;

    let mut worker = spawn_worker(
        &worker_env(
            &stack,
            &cognito,
            &[("RESET_WORKER_LIMITS__CONCURRENCY", "4")],
        ),
        &[],
    );
    // Short jobs keep the loop receiving most of the time.
    wait_for_metric(
        &worker,
        "reset_worker_jobs_total",
        &[("outcome", "sent")],
        4.0,
    )
    .await;
    stop(&mut worker);

    let n = forgot_password_calls(&cognito).await.len();
    assert!(n < JOBS, "the shutdown should stop the campaign early");
    let (visible, not_visible) = queue_counts(&stack.sqs, &stack.queue_url).await;
    assert_eq!(
        (visible, not_visible),
        ((JOBS - n) as u64, 0),
        "received but neither processed nor released: {not_visible}; summary {}",
        summary(&worker)
    );
}
