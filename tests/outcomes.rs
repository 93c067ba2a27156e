//! The outcome table (docs/outcomes.md) end to end: SQS on moto, Cognito
//! `ForgotPassword` on a wiremock server that plays each answer the policy
//! distinguishes, and the worker as the real binary or in process.
//!
//! Three ways a run ends here:
//! * "drained" runs in process ([`support::app::spawn_app`] until the queue
//!   is empty, concurrency 1, short polls): the run's summary, its outcome
//!   lines, Cognito's calls and the queues. With one permit the loop does not
//!   poll while the job runs, and with short polls it ends milliseconds after
//!   the job's outcome, long before a message deferred by at least 1 s can
//!   come back and be processed a second time. (The binary refuses short
//!   polls with `--until-empty`: on real SQS a short poll samples only some
//!   servers. moto has one.)
//! * drained runs of the binary (`run --until-empty`, 1 s polls) where its
//!   own log matters, for outcomes that leave nothing to come back within
//!   the run (deleted, dead-lettered, or deferred for minutes);
//! * SIGTERM runs of the binary where metrics must be read while the worker
//!   is alive, or the exit code is the point.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_sqs::types::Message;
use reset_worker::job::{UserHasher, Username};
use reset_worker::worker::outcome::Summary;
use secrecy::SecretString;
use serde_json::{Value, json};
use support::app::{app_settings, merge, outcome_lines as app_outcome_lines, spawn_app};
use support::cognito_mock::*;
use support::*;
use wiremock::{Match, MockServer, Request, ResponseTemplate, Times};

const HASH_KEY: &str = "outcomes-test-username-hash-key";
const JOBS_TOTAL: &str = "reset_worker_jobs_total";
/// Upper bound for a drained run; each normally takes a few seconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The scene: a stack on moto, Cognito on wiremock, the worker's settings
// ---------------------------------------------------------------------------

/// Settings every run here starts from (then the test's own, merged in):
/// fast retries, a high rate cap, one permit, a fixed username-hash key,
/// 1 s long polls.
fn settings(patch: Value) -> Value {
    let mut settings = json!({
        "retry": {
            "initial_delay_ms": 10,
            "max_delay_ms": 50,
            "max_attempts": 3,
            "delivery_failure_max_attempts": 2,
            "limit_exceeded_delay_seconds": 600,
        },
        "limits": {"max_rps": 1000, "burst": 100, "concurrency": 1},
        "shutdown": {"grace_seconds": 10},
        "logging": {"username_hash_key": HASH_KEY},
        "sqs": {"wait_time_seconds": 1},
    });
    merge(&mut settings, patch);
    settings
}

/// A fresh stack on moto (no users: Cognito is the mock), a Cognito on
/// wiremock, and a campaign id of its own: the set-up of every test here.
struct Scene {
    stack: Stack,
    cognito: MockServer,
    campaign: String,
}

impl Scene {
    async fn new() -> Scene {
        Scene::with_fifo(false).await
    }

    async fn with_fifo(fifo: bool) -> Scene {
        Scene {
            stack: Stack::new(fifo, &[]).await,
            cognito: MockServer::start().await,
            campaign: format!("outcomes-{}", random_suffix()),
        }
    }

    /// A job of this scene's campaign.
    fn job(&self, username: &str) -> String {
        json!({"username": username, "campaign_id": self.campaign}).to_string()
    }

    /// `n` jobs for `user00@example.com`, `user01@example.com`, …
    fn jobs(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| self.job(&format!("user{i:02}@example.com")))
            .collect()
    }

    /// Cognito answers every call with `answer`, and must get `calls` calls
    /// (checked by `self.cognito.verify()`, and when the server is dropped).
    async fn answer(&self, answer: ResponseTemplate, calls: impl Into<Times>) {
        forgot_password()
            .respond_with(answer)
            .expect(calls)
            .mount(&self.cognito)
            .await;
    }

    /// The first `n` calls are answered with `first` (and there must be `n`),
    /// later ones with `then`.
    async fn answer_first(&self, n: u64, first: ResponseTemplate, then: ResponseTemplate) {
        forgot_password()
            .respond_with(first)
            .up_to_n_times(n)
            .with_priority(1)
            .expect(n)
            .named(format!("first {n} calls"))
            .mount(&self.cognito)
            .await;
        forgot_password()
            .respond_with(then)
            .with_priority(2)
            .named("later calls")
            .mount(&self.cognito)
            .await;
    }

    async fn send(&self, bodies: &[String]) {
        send_jobs(&self.stack, bodies).await;
    }

    /// The binary's env: the stack, Cognito on wiremock, JSON logs, and
    /// `settings` (see [`settings`]).
    fn env(&self, settings: &Value) -> Vec<(String, String)> {
        let mut env = stack_env(&self.stack);
        env.push((
            "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER".into(),
            self.cognito.uri(),
        ));
        env.push(("RESET_WORKER_LOG_FORMAT".into(), "json".into()));
        env.extend(settings_env(settings));
        env
    }

    /// Starts the binary without `--until-empty`.
    fn spawn(&self, patch: Value) -> Worker {
        spawn_worker(&self.env(&settings(patch)), &[])
    }

    /// Runs the binary with `--until-empty` and waits for it to exit 0 by
    /// itself. The returned worker keeps the log.
    fn run_drained(&self, patch: Value) -> Worker {
        let mut worker = spawn_worker(&self.env(&settings(patch)), &["--until-empty"]);
        let code = worker.wait_exit(RUN_TIMEOUT);
        assert_eq!(code, Some(0), "`run --until-empty` should drain and exit 0");
        worker
    }

    /// Runs the worker in process, with short polls, until the queue is drained.
    async fn run_in_process(&self, patch: Value) -> Summary {
        let mut patch = patch;
        merge(&mut patch, json!({"sqs": {"wait_time_seconds": 0}}));
        let settings = app_settings(&self.stack, settings(patch));
        spawn_app(settings, Some(&self.cognito.uri()), true)
            .await
            .finished(RUN_TIMEOUT)
            .await
            .expect("the drained run ends without an error")
    }

    /// Queues one job (`body`, for `username`) and checks, after `run`, that
    /// Cognito got the calls it expected, all for `username`; returns their
    /// number and what `run` returned.
    async fn one_job<T>(
        &self,
        username: &str,
        body: String,
        run: impl AsyncFnOnce() -> T,
    ) -> (usize, T) {
        self.send(&[body]).await;
        let ran = run().await;
        self.cognito.verify().await;
        let calls = usernames(&self.calls().await);
        assert!(calls.iter().all(|u| u == username), "{calls:?}");
        (calls.len(), ran)
    }

    /// [`Scene::one_job`] with the binary: returns the worker and its one
    /// outcome line (checked by [`Scene::only_outcome`]), after checking that
    /// the username appears nowhere in its log.
    async fn drain_one(&self, username: &str, body: String, patch: Value) -> (Worker, Value) {
        let (calls, worker) = self
            .one_job(username, body, async || self.run_drained(patch))
            .await;
        assert!(
            !worker.logs().contains(username),
            "the log must not contain the username"
        );
        let line = self.only_outcome(outcome_lines(&worker), username, calls);
        (worker, line)
    }

    /// [`Scene::one_job`] in process: returns the run's summary and its one
    /// outcome line (checked by [`Scene::only_outcome`]).
    async fn drain_one_in_process(
        &self,
        username: &str,
        body: String,
        patch: Value,
    ) -> (Summary, Value) {
        let (calls, summary) = self
            .one_job(username, body, async || self.run_in_process(patch).await)
            .await;
        let lines = app_outcome_lines(&self.campaign);
        (summary, self.only_outcome(lines, username, calls))
    }

    /// The one outcome line of a one-job run, checked for the fields every
    /// outcome line carries: this campaign, a keyed hash of the user (never
    /// the username itself), the attempts (one per call).
    fn only_outcome(&self, lines: Vec<Value>, username: &str, calls: usize) -> Value {
        assert_eq!(lines.len(), 1, "expected one outcome line: {lines:#?}");
        let line = lines.into_iter().next().unwrap_or_default();
        let hasher = UserHasher::new(Some(SecretString::from(HASH_KEY)));
        let user = Username::parse(username.to_string()).expect("valid username");
        assert_eq!(line["user"], hasher.user_ref(&user).as_str(), "{line}");
        assert_eq!(line["campaign_id"], self.campaign.as_str(), "{line}");
        assert_eq!(line["attempts"], calls, "{line}");
        assert!(!line.to_string().contains(username), "{line}");
        line
    }

    /// The calls Cognito received, oldest first.
    async fn calls(&self) -> Vec<Value> {
        received_calls(&self.cognito).await
    }

    /// `[main queue, dead-letter queue]`, each `(visible, in flight)`.
    async fn depths(&self) -> [(u64, u64); 2] {
        let sqs = &self.stack.sqs;
        [
            queue_counts(sqs, &self.stack.queue_url).await,
            queue_counts(sqs, &self.stack.dlq_url).await,
        ]
    }

    /// Receives and deletes everything in the dead-letter queue.
    async fn dead_letters(&self) -> Vec<Message> {
        drain_all(&self.stack.sqs, &self.stack.dlq_url).await
    }
}

// ---------------------------------------------------------------------------
// Metrics and logs of the binary
// ---------------------------------------------------------------------------

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

async fn wait_for_sent(worker: &Worker, at_least: f64) {
    let reached = eventually(Duration::from_secs(15), || async move {
        metric(worker, JOBS_TOTAL, &[("outcome", "sent")]) >= at_least
    })
    .await;
    assert!(
        reached,
        "{JOBS_TOTAL}{{outcome=sent}} never reached {at_least}; metrics:\n{}",
        worker.metrics()
    );
}

fn log_lines(worker: &Worker) -> Vec<Value> {
    worker
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .collect()
}

fn lines_where(worker: &Worker, key: &str, value: &str) -> Vec<Value> {
    log_lines(worker)
        .into_iter()
        .filter(|l| l[key] == value)
        .collect()
}

fn outcome_lines(worker: &Worker) -> Vec<Value> {
    lines_where(worker, "message", "job outcome")
}

/// Checks `line[key] == value` for each pair.
fn assert_fields(line: &Value, fields: &[(&str, &str)]) {
    for (key, value) in fields {
        assert_eq!(line[key], *value, "{key} in {line}");
    }
}

/// The `worker stopped` summary line.
fn summary(worker: &Worker) -> Value {
    let lines = lines_where(worker, "message", "worker stopped");
    assert_eq!(lines.len(), 1, "expected one `worker stopped` line");
    lines.into_iter().next().unwrap_or_default()
}

/// The one ERROR line of a halted worker, which names `code`.
fn the_error_line(worker: &Worker, code: &str) -> String {
    let errors = lines_where(worker, "level", "ERROR");
    assert_eq!(errors.len(), 1, "one clear error line: {errors:#?}");
    let error = errors[0].to_string();
    assert!(error.contains(code), "{error}");
    error
}

fn message_attribute(m: &Message, name: &str) -> Option<String> {
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
    let scene = Scene::new().await;
    scene
        .answer_first(
            2,
            cognito_error(400, "TooManyRequestsException", "Rate exceeded"),
            success(),
        )
        .await;
    let username = "alice@example.com";
    scene.send(&[scene.job(username)]).await;

    let mut worker = scene.spawn(json!({}));
    wait_for_sent(&worker, 1.0).await;
    let text = worker.metrics();
    let jobs = |outcome| metric_value(&text, JOBS_TOTAL, &[("outcome", outcome)]);
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

    scene.cognito.verify().await;
    assert_eq!(usernames(&scene.calls().await), [username; 3]);
    assert!(!worker.logs().contains(username), "a username in the log");
    let line = scene.only_outcome(outcome_lines(&worker), username, 3);
    assert_fields(&line, &[("outcome", "sent"), ("reason", "ok")]);
    assert_eq!(scene.depths().await, [(0, 0), (0, 0)]);
}

/// In process (the message comes back after 1 s): a transient error on
/// every call: `max_attempts` calls, then `deferred` with the message kept
/// (invisible for a while), nothing dead-lettered.
async fn retries_exhausted_then_deferred(answer: ResponseTemplate, error_code: &str) {
    let scene = Scene::new().await;
    scene.answer(answer, 3).await;
    let username = "bob@example.com";
    let patch = json!({"retry": {"max_attempts": 3}});
    let (summary, line) = scene
        .drain_one_in_process(username, scene.job(username), patch)
        .await;

    assert_fields(
        &line,
        &[
            ("outcome", "deferred"),
            ("reason", "retries_exhausted"),
            ("error_code", error_code),
        ],
    );
    assert!(line["delay_seconds"].as_u64() >= Some(1), "{line}");
    let deferred = Summary {
        deferred: 1,
        ..Summary::default()
    };
    assert_eq!(summary, deferred);
    let [(visible, not_visible), dead] = scene.depths().await;
    assert_eq!(
        visible + not_visible,
        1,
        "a deferred message stays in the queue"
    );
    assert_eq!(dead, (0, 0));
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
    let scene = Scene::new().await;
    let message = "Attempt limit exceeded, please try after some time.";
    scene
        .answer(cognito_error(400, "LimitExceededException", message), 1)
        .await;
    let username = "carol@example.com";
    let (_worker, line) = scene
        .drain_one(username, scene.job(username), json!({}))
        .await;

    assert_fields(
        &line,
        &[
            ("outcome", "deferred"),
            ("reason", "user_limit_exceeded"),
            ("error_code", "LimitExceededException"),
        ],
    );
    assert_eq!(line["delay_seconds"], 600, "{line}");
    // Hidden for retry.limit_exceeded_delay_seconds (600 s), not deleted.
    assert_eq!(scene.depths().await, [(0, 1), (0, 0)]);
}

/// In process: one call, `skipped`, the message deleted.
#[tokio::test(flavor = "multi_thread")]
async fn user_not_found_is_skipped_and_deleted() {
    let scene = Scene::new().await;
    let message = "Username/client id combination not found.";
    scene
        .answer(cognito_error(400, "UserNotFoundException", message), 1)
        .await;
    let username = "nobody@example.com";
    let (summary, line) = scene
        .drain_one_in_process(username, scene.job(username), json!({}))
        .await;

    assert_fields(
        &line,
        &[
            ("outcome", "skipped"),
            ("reason", "user_not_found"),
            ("error_code", "UserNotFoundException"),
        ],
    );
    let skipped = Summary {
        skipped: 1,
        ..Summary::default()
    };
    assert_eq!(summary, skipped);
    assert_eq!(scene.depths().await, [(0, 0), (0, 0)]);
}

/// A permanent error: one call, then the original body goes to the
/// dead-letter queue with the reason, and the source message is deleted.
async fn invalid_parameter_is_dead_lettered(fifo: bool) {
    let scene = Scene::with_fifo(fifo).await;
    let server_message = "Cannot reset password for the user as there is no registered/verified email or phone_number";
    scene
        .answer(
            cognito_error(400, "InvalidParameterException", server_message),
            1,
        )
        .await;
    let username = "dave@example.com";
    let body = json!({
        "username": username,
        "campaign_id": scene.campaign,
        "client_metadata": {"reason": "breach"},
    })
    .to_string();
    let (worker, line) = scene.drain_one(username, body.clone(), json!({})).await;

    assert_fields(
        &line,
        &[
            ("outcome", "rejected"),
            ("reason", "InvalidParameterException"),
            ("level", "WARN"),
        ],
    );
    assert!(
        !worker.logs().contains(server_message),
        "the rejection detail is for the dead-letter queue only"
    );
    assert_eq!(scene.depths().await[0], (0, 0));

    let dead = scene.dead_letters().await;
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

/// In process: `delivery_failure_max_attempts` calls, then `rejected` to
/// the dead-letter queue with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn code_delivery_failure_is_retried_then_rejected() {
    let scene = Scene::new().await;
    let message = "Unable to deliver the code";
    scene
        .answer(
            cognito_error(400, "CodeDeliveryFailureException", message),
            2,
        )
        .await;
    let username = "erin@example.com";
    let body = scene.job(username);
    let patch = json!({"retry": {"delivery_failure_max_attempts": 2}});
    let (summary, line) = scene
        .drain_one_in_process(username, body.clone(), patch)
        .await;
    assert_fields(
        &line,
        &[
            ("outcome", "rejected"),
            ("reason", "CodeDeliveryFailureException"),
        ],
    );

    let rejected = Summary {
        rejected: 1,
        ..Summary::default()
    };
    assert_eq!(summary, rejected);
    assert_eq!(scene.depths().await[0], (0, 0));
    let dead = scene.dead_letters().await;
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
    let scene = Scene::new().await;
    let server_message = "Unable to verify secret hash for client";
    let refused = cognito_error(400, "NotAuthorizedException", server_message);
    scene
        .answer_first(
            1,
            refused.clone().set_delay(Duration::from_secs(3)),
            refused,
        )
        .await;
    scene.send(&scene.jobs(5)).await;

    let mut worker = scene.spawn(json!({"limits": {"concurrency": 2}}));
    let mock = &scene.cognito;
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

    let calls = usernames(&scene.calls().await);
    assert_eq!(calls.len(), 2, "no call after the halt: {calls:?}");
    assert_ne!(calls[0], calls[1]);

    let error = the_error_line(&worker, "NotAuthorizedException");
    assert!(error.contains("campaign halted"), "{error}");
    assert!(error.contains(server_message), "{error}");
    let outcomes = outcome_lines(&worker);
    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    for line in &outcomes {
        assert_fields(
            line,
            &[
                ("outcome", "released"),
                ("reason", "halted"),
                ("error_code", "NotAuthorizedException"),
            ],
        );
    }

    // Nothing deleted or dead-lettered; the held messages were released (visibility 0).
    assert_eq!(scene.depths().await, [(5, 0), (0, 0)]);
}

/// The brief's plain case: one permit, so the first fatal answer is the only
/// call; the worker exits 3 by itself and the queue is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn not_authorized_with_one_permit_makes_one_call() {
    let scene = Scene::new().await;
    let message = "Incorrect username or password.";
    scene
        .answer(cognito_error(400, "NotAuthorizedException", message), 1)
        .await;
    scene.send(&scene.jobs(5)).await;

    let mut worker = scene.spawn(json!({}));
    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)),
        Some(3),
        "a fatal Cognito error should stop the worker with exit code 3"
    );

    scene.cognito.verify().await;
    the_error_line(&worker, "NotAuthorizedException");
    let outcomes = outcome_lines(&worker);
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    assert_eq!(outcomes[0]["outcome"], "released", "{}", outcomes[0]);
    assert_eq!(summary(&worker)["released"], 1);
    assert_eq!(scene.depths().await, [(5, 0), (0, 0)]);
}

/// In process: every call carries the stack's ClientId and a valid
/// SecretHash (anything else is refused and fails the run), and the job's
/// optional fields reach Cognito under their API names.
#[tokio::test(flavor = "multi_thread")]
async fn secret_hash_and_job_fields_are_sent() {
    let scene = Scene::new().await;
    forgot_password()
        .and(ValidSecretHash {
            client_id: scene.stack.client_id.clone(),
            client_secret: scene.stack.client_secret.clone(),
        })
        .respond_with(success())
        .with_priority(1)
        .expect(3)
        .named("valid ClientId and SecretHash")
        .mount(&scene.cognito)
        .await;
    let refused = "Unable to verify secret hash for client";
    forgot_password()
        .respond_with(cognito_error(400, "NotAuthorizedException", refused))
        .with_priority(2)
        .expect(0)
        .named("wrong ClientId or SecretHash")
        .mount(&scene.cognito)
        .await;
    let users = ["alice@example.com", "Zoë.Ünïcødé+tag@example.com", "carol"];
    let full = json!({
        "username": users[0],
        "campaign_id": scene.campaign,
        "client_metadata": {"reason": "breach"},
        "user_context_data": {"ip_address": "203.0.113.7", "encoded_data": "ZW5jb2RlZA=="},
        "analytics_endpoint_id": "endpoint-1",
    })
    .to_string();
    scene
        .send(&[full, scene.job(users[1]), scene.job(users[2])])
        .await;

    let summary = scene.run_in_process(json!({})).await;

    scene.cognito.verify().await;
    let calls = scene.calls().await;
    let called: BTreeSet<String> = usernames(&calls).into_iter().collect();
    let expected: BTreeSet<String> = users.iter().map(|u| u.to_string()).collect();
    assert_eq!(called, expected);
    for call in &calls {
        assert_eq!(call["ClientId"], scene.stack.client_id.as_str(), "{call}");
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
    let sent = Summary {
        sent: 3,
        ..Summary::default()
    };
    assert_eq!(summary, sent);
    let outcomes = app_outcome_lines(&scene.campaign);
    assert_eq!(outcomes.len(), 3, "{outcomes:#?}");
    assert!(
        outcomes.iter().all(|l| l["outcome"] == "sent"),
        "{outcomes:#?}"
    );
    assert_eq!(scene.depths().await, [(0, 0), (0, 0)]);
}

/// SIGTERM with calls in flight: they finish and are deleted, nothing else
/// is started, and every job is either called exactly once or still queued.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_slow_cognito_loses_and_duplicates_nothing() {
    const JOBS: usize = 20;
    let scene = Scene::new().await;
    scene
        .answer(success().set_delay(Duration::from_millis(1500)), ..)
        .await;
    scene.send(&scene.jobs(JOBS)).await;

    let mut worker = scene.spawn(json!({
        "limits": {"concurrency": 4},
        "shutdown": {"grace_seconds": 10},
        // Short, so a message whose receive was cut off by the shutdown
        // reappears within the test.
        "sqs": {"visibility_timeout_seconds": 5},
        "cognito": {"request_timeout_seconds": 4},
    }));
    wait_for_sent(&worker, 1.0).await;
    let sent_before = metric(&worker, JOBS_TOTAL, &[("outcome", "sent")]);
    stop(&mut worker);

    let calls = usernames(&scene.calls().await);
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

    let (visible, not_visible) = scene.depths().await[0];
    assert_eq!(visible + not_visible, (JOBS - n) as u64);
    // Released messages are visible again at once; waiting out any
    // in-flight visibility keeps this test about accounting, not timing.
    let (sqs, url) = (&scene.stack.sqs, scene.stack.queue_url.as_str());
    let settled = eventually(Duration::from_secs(15), || async move {
        queue_counts(sqs, url).await.1 == 0
    })
    .await;
    assert!(settled, "messages still in flight after the worker exited");
    // The queue holds exactly the jobs that were not called.
    let left: BTreeSet<String> = drain_all(sqs, url)
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
    let all: BTreeSet<String> = (0..JOBS)
        .map(|i| format!("user{i:02}@example.com"))
        .collect();
    assert_eq!(left.union(&called).cloned().collect::<BTreeSet<_>>(), all);
    assert_eq!(scene.depths().await[1], (0, 0));
}

/// A call that times out may have sent the code: one call, then `deferred`
/// (reason `uncertain`) for `retry.uncertain_delay_seconds`, never retried
/// in process (a second code would void the first).
#[tokio::test(flavor = "multi_thread")]
async fn slow_cognito_times_out_and_is_deferred() {
    let scene = Scene::new().await;
    scene
        .answer(success().set_delay(Duration::from_secs(3)), 1)
        .await;
    let username = "frank@example.com";
    let patch = json!({
        "cognito": {"request_timeout_seconds": 1},
        "retry": {"max_attempts": 2, "uncertain_delay_seconds": 600},
    });
    let (worker, line) = scene.drain_one(username, scene.job(username), patch).await;

    assert_fields(
        &line,
        &[
            ("outcome", "deferred"),
            ("reason", "uncertain"),
            ("error_code", "timeout"),
        ],
    );
    assert_eq!(line["delay_seconds"], 600, "{line}");
    assert_eq!(summary(&worker)["sent"], 0);
    // Hidden for retry.uncertain_delay_seconds, not deleted.
    assert_eq!(scene.depths().await, [(0, 1), (0, 0)]);
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
    // Known vector from src/aws/cognito.rs, computed independently with Python.
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
/// processed or released (docs/campaigns.md "Shutdown"), so right after a clean exit
/// nothing may be left invisible.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_receive_leaves_nothing_invisible() {
    const JOBS: usize = 40;
    let scene = Scene::new().await;
    scene
        .answer(success().set_delay(Duration::from_millis(50)), ..)
        .await;
    scene.send(&scene.jobs(JOBS)).await;

    let mut worker = scene.spawn(json!({"limits": {"concurrency": 4}}));
    // Short jobs keep the loop receiving most of the time.
    wait_for_sent(&worker, 4.0).await;
    stop(&mut worker);

    let n = scene.calls().await.len();
    assert!(n < JOBS, "the shutdown should stop the campaign early");
    let (visible, not_visible) = scene.depths().await[0];
    assert_eq!(
        (visible, not_visible),
        ((JOBS - n) as u64, 0),
        "received but neither processed nor released: {not_visible}; summary {}",
        summary(&worker)
    );
}
