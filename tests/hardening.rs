//! Hardening regressions that need a whole worker but a fault moto cannot
//! produce: slow or refusing answers at exact moments. The worker runs in
//! process (`App::build_with`) against wiremock standing in for both SQS
//! (AWS JSON 1.0) and Cognito; each test names the defect it pins down
//! (issue "Hardening", items #1, #2, #5, #7, #10, #12).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::{Credentials, SharedCredentialsProvider};
use reset_worker::app::{App, Clients};
use reset_worker::aws::{cognito, sqs};
use reset_worker::config::Settings;
use reset_worker::worker::outcome::Summary;
use reset_worker::worker::{RunOptions, WorkerError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const SQS_JSON: &str = "application/x-amz-json-1.0";
const COGNITO_JSON: &str = "application/x-amz-json-1.1";

/// One message SQS hands out: (message ID, receipt handle, body).
type Message = (&'static str, &'static str, &'static str);

/// What the fake SQS saw, with arrival times.
#[derive(Default)]
struct Seen {
    /// (arrival, receipt handle, VisibilityTimeout)
    visibility: Vec<(Instant, String, i64)>,
    deleted: Vec<String>,
}

/// A wiremock SQS: the messages on the first receive, empty receives after,
/// visibility changes answered after `visibility_delay`.
struct FakeSqs {
    server: MockServer,
    seen: Arc<Mutex<Seen>>,
}

struct Receive(Mutex<Option<Vec<Message>>>);

impl Respond for Receive {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let batch = self.0.lock().unwrap().take();
        let body = match batch {
            Some(messages) => json!({"Messages": messages.iter().map(|(id, handle, body)| json!({
                "MessageId": id,
                "ReceiptHandle": handle,
                "Body": body,
                "Attributes": {"ApproximateReceiveCount": "1"},
            })).collect::<Vec<_>>()}),
            // An empty long poll, shortened.
            None => return sqs_ok(json!({})).set_delay(Duration::from_millis(200)),
        };
        sqs_ok(body)
    }
}

struct Visibility(Arc<Mutex<Seen>>, Duration);

impl Respond for Visibility {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        self.0.lock().unwrap().visibility.push((
            Instant::now(),
            body["ReceiptHandle"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            body["VisibilityTimeout"].as_i64().unwrap_or(-1),
        ));
        sqs_ok(json!({})).set_delay(self.1)
    }
}

struct DeleteBatch(Arc<Mutex<Seen>>);

impl Respond for DeleteBatch {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let entries = body["Entries"].as_array().cloned().unwrap_or_default();
        let mut seen = self.0.lock().unwrap();
        let ok: Vec<Value> = entries
            .iter()
            .map(|e| {
                seen.deleted
                    .push(e["ReceiptHandle"].as_str().unwrap_or_default().to_owned());
                json!({"Id": e["Id"]})
            })
            .collect();
        sqs_ok(json!({"Successful": ok, "Failed": []}))
    }
}

fn sqs_ok(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), SQS_JSON)
}

fn target(op: &str) -> wiremock::matchers::HeaderExactMatcher {
    header("x-amz-target", format!("AmazonSQS.{op}").as_str())
}

impl FakeSqs {
    async fn start(messages: Vec<Message>, visibility_delay: Duration) -> Self {
        let server = MockServer::start().await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        Mock::given(method("POST"))
            .and(target("GetQueueAttributes"))
            .respond_with(sqs_ok(json!({"Attributes": {
                "RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:us-east-1:123456789012:dlq\",\"maxReceiveCount\":5}"
            }})))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(target("ReceiveMessage"))
            .respond_with(Receive(Mutex::new(Some(messages))))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(target("ChangeMessageVisibility"))
            .respond_with(Visibility(seen.clone(), visibility_delay))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(target("DeleteMessageBatch"))
            .respond_with(DeleteBatch(seen.clone()))
            .mount(&server)
            .await;
        Self { server, seen }
    }

    /// A fake SQS whose receives never answer.
    async fn black_hole() -> Self {
        let fake = Self::start(Vec::new(), Duration::ZERO).await;
        fake.server.reset().await;
        Mock::given(method("POST"))
            .and(target("GetQueueAttributes"))
            .respond_with(sqs_ok(json!({"Attributes": {"RedrivePolicy": "{}"}})))
            .mount(&fake.server)
            .await;
        Mock::given(method("POST"))
            .and(target("ReceiveMessage"))
            .respond_with(sqs_ok(json!({})).set_delay(Duration::from_secs(3600)))
            .mount(&fake.server)
            .await;
        fake
    }
}

/// A wiremock Cognito answering every ForgotPassword with `answer`.
async fn fake_cognito(answer: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header(
            "x-amz-target",
            "AWSCognitoIdentityProviderService.ForgotPassword",
        ))
        .respond_with(answer)
        .mount(&server)
        .await;
    server
}

fn delivered() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(
        json!({"CodeDeliveryDetails": {"DeliveryMedium": "EMAIL", "AttributeName": "email", "Destination": "a***@e***"}})
            .to_string(),
        COGNITO_JSON,
    )
}

fn cognito_error(code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(400).set_body_raw(
        json!({"__type": code, "message": message}).to_string(),
        COGNITO_JSON,
    )
}

fn sdk(endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test", "test", None, None, "test",
        )))
        .endpoint_url(endpoint)
        .build()
}

/// The worker's settings against the two fakes; `overrides` are merged
/// into the sections they name.
fn settings(sqs: &FakeSqs, overrides: Value) -> Settings {
    let mut base = json!({
        "sqs": {
            "queue_url": format!("{}/123456789012/jobs", sqs.server.uri()),
            "wait_time_seconds": 1,
            "visibility_timeout_seconds": 30,
            "delete_flush_interval_ms": 50,
        },
        "cognito": {"client_id": "client-1", "request_timeout_seconds": 10},
        "limits": {"concurrency": 4, "max_rps": 100, "burst": 10},
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown": {"grace_seconds": 20},
        // The SQS fake here is wiremock; the ledger is not under test.
        "ledger": {"backend": "memory"},
    });
    for (section, values) in overrides.as_object().into_iter().flatten() {
        for (key, value) in values.as_object().into_iter().flatten() {
            base[section][key] = value.clone();
        }
    }
    serde_json::from_value(base).expect("test settings")
}

async fn build(settings: Settings, sqs: &FakeSqs, cognito: &MockServer) -> App {
    let clients = Clients {
        sqs: sqs::build_client(&sdk(&sqs.server.uri())),
        cognito: cognito::build_client(&sdk(&cognito.uri()), &settings.cognito),
        dynamodb: reset_worker::ledger::dynamodb::build_client(&sdk(&sqs.server.uri())),
    };
    App::build_with(settings, None, clients)
        .await
        .expect("app builds")
}

/// Runs the app until the queue is drained (60 s at most).
async fn run_until_drained(app: App) -> anyhow::Result<Summary> {
    let options = RunOptions {
        until_empty_polls: Some(2),
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        app.run_until_stopped(CancellationToken::new(), options),
    )
    .await
    .expect("the worker drains the queue within 60 s")
}

async fn forgot_password_calls(cognito: &MockServer) -> usize {
    cognito.received_requests().await.unwrap_or_default().len()
}

const ALICE: &str = r#"{"username":"alice@example.com","campaign_id":"hardening"}"#;

/// #1: a second copy of a message seen while the first copy's call is in
/// flight used to be skipped *and deleted*; it must be deferred instead.
#[tokio::test]
async fn a_copy_seen_while_the_first_is_in_flight_is_deferred_not_deleted() {
    let sqs = FakeSqs::start(
        vec![("m1", "first", ALICE), ("m1", "second", ALICE)],
        Duration::ZERO,
    )
    .await;
    let cognito = fake_cognito(delivered().set_delay(Duration::from_millis(800))).await;
    let app = build(settings(&sqs, json!({})), &sqs, &cognito).await;
    let summary = run_until_drained(app).await.expect("run ends cleanly");

    assert_eq!(
        forgot_password_calls(&cognito).await,
        1,
        "one call for one user"
    );
    assert_eq!((summary.sent, summary.deferred, summary.skipped), (1, 1, 0));
    let seen = sqs.seen.lock().unwrap();
    assert_eq!(
        seen.deleted.len(),
        1,
        "only one copy deleted: {:?}",
        seen.deleted
    );
    let deferred: Vec<_> = seen
        .visibility
        .iter()
        .filter(|(_, _, vt)| *vt == 30)
        .collect();
    assert_eq!(
        deferred.len(),
        1,
        "the other copy deferred by the visibility timeout"
    );
    assert_ne!(
        deferred[0].1, seen.deleted[0],
        "the deferred copy is not the deleted one"
    );
}

/// #10: a missing IAM permission used to be retried as transient until the
/// campaign drained into the redrive DLQ; it halts at the first answer.
#[tokio::test]
async fn access_denied_halts_the_campaign_at_once() {
    let sqs = FakeSqs::start(vec![("m1", "r1", ALICE)], Duration::ZERO).await;
    let cognito = fake_cognito(cognito_error(
        "AccessDeniedException",
        "not authorized to perform: cognito-idp:ForgotPassword",
    ))
    .await;
    let app = build(settings(&sqs, json!({})), &sqs, &cognito).await;
    let err = run_until_drained(app)
        .await
        .expect_err("the campaign halts");

    match err.downcast_ref::<WorkerError>() {
        Some(WorkerError::Fatal { code, .. }) => assert_eq!(code, "AccessDeniedException"),
        other => panic!("expected a fatal halt, got {other:?}: {err:#}"),
    }
    assert_eq!(forgot_password_calls(&cognito).await, 1, "no retry");
    let seen = sqs.seen.lock().unwrap();
    assert!(
        seen.deleted.is_empty(),
        "nothing deleted: {:?}",
        seen.deleted
    );
    assert!(
        seen.visibility
            .iter()
            .any(|(_, h, vt)| h == "r1" && *vt == 0),
        "the message is released"
    );
}

/// #5: a call cut off by the request timeout may have sent the email; it
/// used to be retried at once (5–7 emails). One call, then `uncertain`.
#[tokio::test]
async fn a_timed_out_call_is_not_retried_in_process() {
    let sqs = FakeSqs::start(vec![("m1", "r1", ALICE)], Duration::ZERO).await;
    let cognito = fake_cognito(delivered().set_delay(Duration::from_secs(3))).await;
    let overrides = json!({"cognito": {"request_timeout_seconds": 1}});
    let app = build(settings(&sqs, overrides), &sqs, &cognito).await;
    let summary = run_until_drained(app).await.expect("run ends cleanly");

    assert_eq!(
        forgot_password_calls(&cognito).await,
        1,
        "never called twice"
    );
    assert_eq!(summary.deferred, 1);
    let seen = sqs.seen.lock().unwrap();
    assert!(seen.deleted.is_empty());
    assert!(
        seen.visibility
            .iter()
            .any(|(_, h, vt)| h == "r1" && *vt == 300),
        "deferred by retry.uncertain_delay_seconds: {:?}",
        seen.visibility
    );
}

/// #12: a heartbeat already on the wire when the job decides used to be
/// dropped mid-call and could land after `apply`, cutting a one-hour
/// deferral to one visibility timeout. `apply` now waits for it.
#[tokio::test]
async fn apply_waits_for_a_heartbeat_in_flight() {
    let answer_delay = Duration::from_millis(1500);
    let sqs = FakeSqs::start(vec![("m1", "r1", ALICE)], Duration::from_secs(1)).await;
    let cognito = fake_cognito(
        cognito_error("LimitExceededException", "Attempt limit exceeded").set_delay(answer_delay),
    )
    .await;
    // Heartbeat every 1 s; the answer comes at 1.5 s, while the first
    // heartbeat's call (answered after 1 s) is still in flight.
    let overrides = json!({"sqs": {"visibility_timeout_seconds": 2}});
    let app = build(settings(&sqs, overrides), &sqs, &cognito).await;
    run_until_drained(app).await.expect("run ends cleanly");

    let seen = sqs.seen.lock().unwrap();
    let heartbeat = seen.visibility.iter().find(|(_, _, vt)| *vt == 2);
    let deferral = seen.visibility.iter().find(|(_, _, vt)| *vt == 3600);
    let (Some(heartbeat), Some(deferral)) = (heartbeat, deferral) else {
        panic!("expected a heartbeat and a deferral: {:?}", seen.visibility);
    };
    // Lower bound only: a slow machine makes the gap longer, never shorter.
    assert!(
        deferral.0 >= heartbeat.0 + Duration::from_secs(1),
        "the deferral went out {:?} after the heartbeat, before its answer",
        deferral.0 - heartbeat.0
    );
    assert_eq!(
        seen.visibility.last().map(|(_, _, vt)| *vt),
        Some(3600),
        "the deferral is the last word"
    );
}

/// #2: a black-holed receive used to hang forever with `/readyz` at 200.
#[tokio::test]
async fn a_hung_receive_turns_readiness_off() {
    let sqs = FakeSqs::black_hole().await;
    let cognito = fake_cognito(delivered()).await;
    let app = build(settings(&sqs, json!({})), &sqs, &cognito).await;
    let readyz = format!("http://{}/readyz", app.metrics_addr());
    let stop = CancellationToken::new();
    let run = tokio::spawn(app.run_until_stopped(stop.clone(), RunOptions::default()));

    let client = reqwest::Client::new();
    let status = || async {
        let got = client.get(&readyz).send().await;
        got.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    // Wait for `want`, 30 s at most; true when seen.
    let wait_for = |want: u16| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if status().await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    };
    let became_ready = wait_for(200).await;
    let became_unready = became_ready && wait_for(503).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
    assert!(became_ready, "ready after the start-up check");
    assert!(
        became_unready,
        "readiness must turn off once the receive times out (wait 1 s + 5 s)"
    );
}

/// Accepts every entry of a SendMessageBatch, after `delay`.
struct AcceptBatch(Duration);

impl Respond for AcceptBatch {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let ok: Vec<Value> = body["Entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| json!({"Id": e["Id"], "MessageId": "m", "MD5OfMessageBody": "x"}))
            .collect();
        sqs_ok(json!({"Successful": ok, "Failed": []})).set_delay(self.0)
    }
}

/// #7: Ctrl-C used to kill `enqueue` between a batch and its checkpoint
/// write, so a resume sent those batches again. Now it sends no new batch,
/// lets those in flight finish, records them and exits non-zero.
#[tokio::test]
async fn sigint_lets_enqueue_finish_and_record_the_batches_in_flight() {
    let sqs = FakeSqs::start(Vec::new(), Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(target("SendMessageBatch"))
        .respond_with(AcceptBatch(Duration::from_millis(1500)))
        .mount(&sqs.server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    let users: Vec<String> = (0..100).map(|i| format!("s{i}@example.com")).collect();
    std::fs::write(&file, users.join("\n")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RESET_WORKER_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(["enqueue", "--campaign", "c-sigint"])
        .arg(&file)
        .env("AWS_ENDPOINT_URL_SQS", sqs.server.uri())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env(
            "RESET_WORKER_SQS__QUEUE_URL",
            format!("{}/123456789012/jobs", sqs.server.uri()),
        )
        .env("RESET_WORKER_COGNITO__CLIENT_ID", "client-1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn reset-worker enqueue");
    let batches = || async {
        sqs.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| {
                r.headers
                    .get("x-amz-target")
                    .is_some_and(|v| v == "AmazonSQS.SendMessageBatch")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while batches().await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(kill.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("wait for enqueue");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exits non-zero by itself: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    let sent_batches = batches().await;
    assert!(
        (1..=4).contains(&sent_batches),
        "only the batches in flight at the signal went out: {sent_batches}"
    );
    let checkpoint: Value = serde_json::from_slice(
        &std::fs::read(format!("{}.checkpoint", file.display())).expect("a checkpoint"),
    )
    .unwrap();
    let recorded = checkpoint["sent"].as_array().map_or(0, Vec::len);
    assert_eq!(
        recorded,
        10 * sent_batches,
        "every entry SQS accepted is recorded"
    );
}
