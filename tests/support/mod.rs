//! Shared integration-test harness: a moto server (SQS + Cognito), throwaway
//! stacks on it, the worker binary as a child process or the worker app in
//! process ([`app::spawn_app`]), Cognito on wiremock ([`cognito_mock`]), and
//! small HTTP/metrics helpers.
//!
//! Use it from a `tests/*.rs` file with `mod support;`.
//!
//! moto: `TEST_MOTO_URL` (set by scripts/test.sh) names a running server;
//! without it, the first call to [`moto_url`] starts one for this test process
//! (python from `TEST_MOTO_PYTHON`, else `.venv/bin/python`, else `python3`),
//! which exits when the test process does. These variables deliberately avoid
//! the `RESET_WORKER_` prefix: the config loader reads every `RESET_WORKER_*`
//! variable and rejects unknown keys, so e.g. `RESET_WORKER_TEST_MOTO_URL` in
//! the environment breaks the config unit tests. (That name is still honoured
//! here as a fallback.) Stacks are built by scripts/local_stack.py with the
//! same python, so the demo, the deploy check and the tests share one builder.
//!
//! Never points at real AWS: every client and the worker get dummy credentials
//! and an explicit loopback endpoint.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_cognitoidentityprovider as cognito;
use aws_sdk_sqs as sqs;
use base64::Engine as _;

pub const REGION: &str = "us-east-1";
pub const FORGOT_PASSWORD_TARGET: &str = "AWSCognitoIdentityProviderService.ForgotPassword";

// ---------------------------------------------------------------------------
// moto
// ---------------------------------------------------------------------------

static MOTO_URL: OnceLock<String> = OnceLock::new();
/// Keeps the write end of the self-started moto's stdin open for the life of the
/// test process; moto's watchdog thread exits when it closes.
static MOTO_KEEPALIVE: Mutex<Vec<(Child, ChildStdin)>> = Mutex::new(Vec::new());

/// URL (`http://127.0.0.1:PORT`, no trailing slash) of the moto server for this
/// test process, with request recording started.
pub fn moto_url() -> String {
    MOTO_URL
        .get_or_init(|| {
            let given = ["TEST_MOTO_URL", "RESET_WORKER_TEST_MOTO_URL"]
                .iter()
                .filter_map(|name| std::env::var(name).ok())
                .map(|url| url.trim().trim_end_matches('/').to_string())
                .find(|url| !url.is_empty());
            let url = given.unwrap_or_else(start_own_moto);
            // Recording is on already when moto runs with MOTO_ENABLE_RECORDING=True;
            // starting it again is harmless.
            let (status, body) = http_post(&url, "/moto-api/recorder/start-recording");
            assert_eq!(
                status, 200,
                "could not start moto's recorder at {url}: {body}"
            );
            url
        })
        .clone()
}

fn python() -> PathBuf {
    if let Some(py) = std::env::var_os("TEST_MOTO_PYTHON") {
        return PathBuf::from(py);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Starts `moto.server` on a free port. A watchdog thread in the Python process
/// removes moto's temp dir (log, recording) and exits as soon as its stdin
/// reaches EOF, i.e. when this test process ends.
fn start_own_moto() -> String {
    const LAUNCHER: &str = "import os, shutil, sys, threading\n\
        def watchdog():\n\
        \x20   sys.stdin.read()\n\
        \x20   shutil.rmtree(os.environ['TEST_MOTO_DIR'], ignore_errors=True)\n\
        \x20   os._exit(0)\n\
        threading.Thread(target=watchdog, daemon=True).start()\n\
        from moto.server import main\n\
        main(sys.argv[1:])\n";
    let port = free_port();
    let dir = tempfile::Builder::new()
        .prefix("reset-worker-moto.")
        .tempdir()
        .expect("temp dir for moto")
        .keep();
    let log_path = dir.join("moto.log");
    let log = File::create(&log_path).expect("moto log file");
    let mut child = Command::new(python())
        .args(["-c", LAUNCHER, "-H", "127.0.0.1", "-p", &port.to_string()])
        .env("TEST_MOTO_DIR", &dir)
        .env("MOTO_ENABLE_RECORDING", "True")
        .env("MOTO_RECORDER_FILEPATH", dir.join("recording.jsonl"))
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("dup moto log"))
        .stderr(log)
        .spawn()
        .expect("spawn python3 -m moto.server (is moto installed? run scripts/test.sh)");
    let stdin = child.stdin.take().expect("moto stdin");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http_get(&url, "/moto-api/data.json").0 == 200 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("moto exited ({status}) before answering on {url}:\n{log}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("moto did not answer on {url} within 30 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    MOTO_KEEPALIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((child, stdin));
    url
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------
// HTTP (blocking, ureq)
// ---------------------------------------------------------------------------

/// One agent for every helper: non-2xx answers are answers, not errors; no
/// proxy from the environment (loopback only); no pooled connections, so a
/// server that was stopped and another on the same port never get mixed up.
fn http_agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_idle_connections(0)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into()
    })
}

/// `http://…` for `addr` (`127.0.0.1:PORT` or `http://127.0.0.1:PORT`) and `path`.
fn http_url(addr: &str, path: &str) -> String {
    let base = addr.trim_end_matches('/');
    if base.starts_with("http://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    }
}

fn http_answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
    let mut response = match response {
        Ok(response) => response,
        Err(e) => return (0, e.to_string()),
    };
    let status = response.status().as_u16();
    // moto's recording can outgrow ureq's default 10 MB cap over a whole run.
    match response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
    {
        Ok(body) => (status, body),
        Err(e) => (0, e.to_string()),
    }
}

/// `GET path` on `addr`. Returns `(status, body)`; `(0, error text)` when
/// nothing answers. Blocking: from an async test, only where the server does
/// not need the test's own thread (another process, or a multi-thread runtime).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_answer(http_agent().get(http_url(addr, path)).call())
}

/// Like [`http_get`] with `POST` and an empty body.
pub fn http_post(addr: &str, path: &str) -> (u16, String) {
    http_answer(http_agent().post(http_url(addr, path)).send_empty())
}

// ---------------------------------------------------------------------------
// AWS SDK clients (moto only)
// ---------------------------------------------------------------------------

/// An AWS config for `url` (moto, wiremock or the fake): region us-east-1,
/// credentials test/test. Built by hand rather than loaded, so nothing from
/// the environment or a profile (`AWS_ENDPOINT_URL_SQS`, `AWS_PROFILE`, …)
/// can point a client anywhere else.
pub fn sdk_config(url: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(url)
        .credentials_provider(sqs::config::SharedCredentialsProvider::new(
            sqs::config::Credentials::new("test", "test", None, None, "test"),
        ))
        .build()
}

/// SQS client for `url` (a moto server or the fake).
pub async fn sqs_client(url: &str) -> sqs::Client {
    sqs::Client::new(&sdk_config(url))
}

/// Cognito user-pools client for `url` (a moto server, a wiremock server or the fake).
pub async fn cognito_client(url: &str) -> cognito::Client {
    cognito::Client::new(&sdk_config(url))
}

// ---------------------------------------------------------------------------
// Stacks
// ---------------------------------------------------------------------------

/// A throwaway queue + dead-letter queue + user pool + app client (with secret) on moto.
pub struct Stack {
    pub moto: String,
    pub fifo: bool,
    pub queue_url: String,
    pub dlq_url: String,
    pub user_pool_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// The stack's own SQLite ledger (a fresh file in the temp dir), shared
    /// by every worker and CLI run on the stack, as on one host.
    pub ledger_path: String,
    pub sqs: sqs::Client,
    pub cognito: cognito::Client,
}

pub fn random_suffix() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// What `scripts/local_stack.py --json` prints.
#[derive(serde::Deserialize)]
struct LocalStack {
    queue_url: String,
    dead_letter_queue_url: String,
    user_pool_id: String,
    client_id: String,
    client_secret: String,
}

impl Stack {
    /// Creates the stack with scripts/local_stack.py (the builder the demo
    /// and the deploy check use), with random names: a user pool (account
    /// recovery by verified email), an app client with a secret, each user
    /// (email = the username if it has an `@`, else `USERNAME@example.com`,
    /// verified, no invitation), a DLQ and a main queue (VisibilityTimeout 30,
    /// redrive to the DLQ after 5 receives). FIFO queues end in `.fifo`
    /// (ContentBasedDeduplication=false). Nothing is enqueued.
    pub async fn new(fifo: bool, users: &[&str]) -> Stack {
        let moto = moto_url();
        let mut cmd = Command::new(python());
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/local_stack.py"))
            .args(["--endpoint", &moto, "--json", "--no-campaign"]);
        if fifo {
            cmd.arg("--fifo");
        }
        // `--user=NAME`, so a name starting with `-` is not taken for an option.
        cmd.args(users.iter().map(|user| format!("--user={user}")));
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("AWS_")) {
                cmd.env_remove(key);
            }
        }
        let out = tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
            .await
            .expect("join local_stack.py")
            .expect("run scripts/local_stack.py (boto3 comes with moto; run scripts/test.sh)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "scripts/local_stack.py failed ({}):\n{stderr}",
            out.status
        );
        let built: LocalStack = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "scripts/local_stack.py printed no stack ({e}):\n{}\n{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        Stack {
            sqs: sqs_client(&moto).await,
            cognito: cognito_client(&moto).await,
            moto,
            fifo,
            queue_url: built.queue_url,
            dlq_url: built.dead_letter_queue_url,
            user_pool_id: built.user_pool_id,
            client_id: built.client_id,
            client_secret: built.client_secret,
            ledger_path: std::env::temp_dir()
                .join(format!("reset-worker-ledger-{}.sqlite3", random_suffix()))
                .to_string_lossy()
                .into_owned(),
        }
    }
}

/// The worker's env for `stack`: queue, DLQ, client id and client secret.
pub fn stack_env(stack: &Stack) -> Vec<(String, String)> {
    [
        ("RESET_WORKER_SQS__QUEUE_URL", &stack.queue_url),
        ("RESET_WORKER_SQS__DEAD_LETTER_QUEUE_URL", &stack.dlq_url),
        ("RESET_WORKER_COGNITO__CLIENT_ID", &stack.client_id),
        ("RESET_WORKER_COGNITO__CLIENT_SECRET", &stack.client_secret),
        ("RESET_WORKER_LEDGER__PATH", &stack.ledger_path),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect()
}

/// `settings` (JSON in the config file's shape) as the binary's environment:
/// `{"retry": {"max_attempts": 3}}` → `RESET_WORKER_RETRY__MAX_ATTEMPTS=3`.
pub fn settings_env(settings: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(key: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (name, value) in map {
                    let name = name.to_uppercase();
                    let key = if key.is_empty() {
                        name
                    } else {
                        format!("{key}__{name}")
                    };
                    walk(&key, value, out);
                }
            }
            serde_json::Value::String(s) => out.push((format!("RESET_WORKER_{key}"), s.clone())),
            other => out.push((format!("RESET_WORKER_{key}"), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", settings, &mut out);
    out
}

/// Cognito's SECRET_HASH, Base64(HMAC-SHA256(key = client secret, username +
/// client id)), from the library itself. Mind the order: this helper takes
/// `(username, client_id, client_secret)`, the library `(secret, username, client_id)`.
pub fn secret_hash(username: &str, client_id: &str, client_secret: &str) -> String {
    reset_worker::aws::cognito::secret_hash(client_secret, username, client_id)
}

// ---------------------------------------------------------------------------
// SQS helpers
// ---------------------------------------------------------------------------

/// Sends `bodies` to the stack's main queue with SendMessageBatch, 10 per call.
/// On FIFO queues message `i` gets MessageGroupId `g{i % 3}` and a deduplication
/// id unique to this call and index.
pub async fn send_jobs(stack: &Stack, bodies: &[String]) {
    use sqs::types::SendMessageBatchRequestEntry;
    let nonce = random_suffix();
    for (chunk_no, chunk) in bodies.chunks(10).enumerate() {
        let mut req = stack.sqs.send_message_batch().queue_url(&stack.queue_url);
        for (j, body) in chunk.iter().enumerate() {
            let i = chunk_no * 10 + j;
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(format!("m{i}"))
                .message_body(body);
            if stack.fifo {
                entry = entry
                    .message_group_id(format!("g{}", i % 3))
                    .message_deduplication_id(format!("{nonce}-{i}"));
            }
            req = req.entries(entry.build().expect("batch entry"));
        }
        let out = req.send().await.expect("SendMessageBatch");
        assert!(
            out.failed.is_empty(),
            "SendMessageBatch failed entries: {:?}",
            out.failed
        );
    }
}

/// `(ApproximateNumberOfMessages, ApproximateNumberOfMessagesNotVisible)`.
pub async fn queue_counts(client: &sqs::Client, url: &str) -> (u64, u64) {
    use sqs::types::QueueAttributeName as Q;
    let mut attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(Q::ApproximateNumberOfMessages)
        .attribute_names(Q::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .unwrap_or_default();
    let mut count = |name: Q| {
        attrs
            .remove(&name)
            .map(|v| v.parse::<u64>().expect("numeric queue attribute"))
            .unwrap_or(0)
    };
    let visible = count(Q::ApproximateNumberOfMessages);
    let not_visible = count(Q::ApproximateNumberOfMessagesNotVisible);
    (visible, not_visible)
}

/// Receives every visible message of `url` (all message attributes and system
/// attributes, visibility timeout 60 s) and deletes each one after receiving it,
/// until two receives in a row (1 s long poll) come back empty. Deleting is what
/// lets a FIFO queue hand out the next message of a group. Messages currently in
/// flight elsewhere are not returned.
pub async fn drain_all(client: &sqs::Client, url: &str) -> Vec<sqs::types::Message> {
    use sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
    let mut all = Vec::new();
    let mut empty_in_a_row = 0;
    while empty_in_a_row < 2 {
        let messages = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(60)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("ReceiveMessage")
            .messages
            .unwrap_or_default();
        if messages.is_empty() {
            empty_in_a_row += 1;
            continue;
        }
        empty_in_a_row = 0;
        let mut delete = client.delete_message_batch().queue_url(url);
        for (i, m) in messages.iter().enumerate() {
            delete = delete.entries(
                DeleteMessageBatchRequestEntry::builder()
                    .id(format!("d{i}"))
                    .receipt_handle(m.receipt_handle.clone().expect("receipt handle"))
                    .build()
                    .expect("delete entry"),
            );
        }
        let out = delete.send().await.expect("DeleteMessageBatch");
        assert!(
            out.failed.is_empty(),
            "DeleteMessageBatch failed: {:?}",
            out.failed
        );
        all.extend(messages);
    }
    all
}

// ---------------------------------------------------------------------------
// moto's request recording
// ---------------------------------------------------------------------------

/// Every request moto recorded, in order (one JSON object per line of
/// `GET /moto-api/recorder/download-recording`). Lines that do not parse (a line
/// still being written) are skipped.
pub fn recorded_requests(moto: &str) -> Vec<serde_json::Value> {
    let (status, body) = http_get(moto, "/moto-api/recorder/download-recording");
    assert_eq!(status, 200, "download moto recording: {body}");
    body.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Value of header `name` (case-insensitive) of a recorded request.
pub fn recorded_header<'a>(entry: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    entry
        .get("headers")?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

/// Request body of a recorded request: `body` is base64 when `body_encoded` is true.
pub fn recorded_body(entry: &serde_json::Value) -> Vec<u8> {
    let body = entry.get("body").and_then(|b| b.as_str()).unwrap_or("");
    if entry.get("body_encoded").and_then(|b| b.as_bool()) == Some(true) {
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("recorded body is base64")
    } else {
        body.as_bytes().to_vec()
    }
}

/// Parsed JSON bodies of the ForgotPassword requests moto received for `client_id`,
/// oldest first (`{"ClientId", "Username", "SecretHash", "ClientMetadata", ...}`).
pub fn forgot_password_calls(moto: &str, client_id: &str) -> Vec<serde_json::Value> {
    recorded_requests(moto)
        .iter()
        .filter(|e| recorded_header(e, "X-Amz-Target") == Some(FORGOT_PASSWORD_TARGET))
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(&recorded_body(e)).ok())
        .filter(|b| b.get("ClientId").and_then(|c| c.as_str()) == Some(client_id))
        .collect()
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

/// The binary with `args` and the stack's env (endpoints on moto, the
/// stack's queue, client and ledger), then `extra_env`; nothing of the
/// test's own `RESET_WORKER_*` and `AWS_*` environment.
pub fn cli_command(stack: &Stack, extra_env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("RESET_WORKER_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_ENDPOINT_URL_SQS", &stack.moto)
        .env("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &stack.moto)
        .env("AWS_ENDPOINT_URL_DYNAMODB", &stack.moto)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn");
    cmd.envs(stack_env(stack));
    cmd.envs(extra_env.iter().copied());
    cmd
}

/// Runs the binary as [`cli_command`] builds it; returns (exit code,
/// stdout, stderr).
pub fn run_cli(
    stack: &Stack,
    extra_env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> (i32, String, String) {
    let mut cmd = cli_command(stack, extra_env, args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn reset-worker");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut pipe, input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait reset-worker");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the `enqueue` checkpoint an interrupted run over `users` (one per
/// line, campaign `campaign`) would have left after SQS accepted the jobs at
/// the indices `sent`: the library's own digest of the validated input.
pub fn write_checkpoint(path: &str, campaign: &str, users: &[String], sent: &[usize]) {
    let text = users.join("\n");
    let loaded = reset_worker::cli::input::load(
        &mut text.as_bytes(),
        path,
        reset_worker::cli::input::Format::Auto,
        campaign,
    )
    .expect("the test's input is valid");
    let written = serde_json::json!({
        "campaign": campaign,
        "digest": reset_worker::cli::enqueue::digest(&loaded.jobs),
        "total_jobs": loaded.jobs.len(),
        "sent": sent,
    });
    std::fs::write(format!("{path}.checkpoint"), written.to_string()).expect("write checkpoint");
}

// ---------------------------------------------------------------------------
// The worker binary
// ---------------------------------------------------------------------------

/// A running `reset-worker run` child. Dropping it kills the child; its log is
/// printed on drop when the test is panicking or `TEST_LOG=1`.
pub struct Worker {
    pub child: Child,
    pub metrics_addr: String,
    pub log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

/// Starts `reset-worker run EXTRA_ARGS...` with stdout and stderr in a log file.
///
/// Env defaults: AWS_ENDPOINT_URL_SQS and AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER
/// = moto, AWS_REGION=us-east-1, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=test,
/// AWS_EC2_METADATA_DISABLED=true, RESET_WORKER_METRICS__LISTEN=127.0.0.1:<free port>,
/// RESET_WORKER_SQS__WAIT_TIME_SECONDS=1, RUST_LOG=info. Pairs in `env` override
/// these (e.g. point Cognito at a wiremock server). Inherited RESET_WORKER_* vars
/// not in `env` are removed.
pub fn spawn_worker(env: &[(String, String)], extra_args: &[&str]) -> Worker {
    let moto = moto_url();
    let given: HashSet<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    let metrics_addr = env
        .iter()
        .find(|(k, _)| k == "RESET_WORKER_METRICS__LISTEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));

    let log_dir = tempfile::Builder::new()
        .prefix("reset-worker-test.")
        .tempdir()
        .expect("temp dir for worker log");
    let log_path = log_dir.path().join("worker.log");
    let log = File::create(&log_path).expect("worker log file");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    cmd.arg("run").args(extra_args);
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && key.starts_with("RESET_WORKER_")
            && !given.contains(key)
        {
            cmd.env_remove(key);
        }
    }
    for key in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    ] {
        cmd.env_remove(key);
    }
    cmd.env("AWS_ENDPOINT_URL_SQS", &moto)
        .env("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &moto)
        .env("AWS_ENDPOINT_URL_DYNAMODB", &moto)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RESET_WORKER_METRICS__LISTEN", &metrics_addr)
        .env("RESET_WORKER_SQS__WAIT_TIME_SECONDS", "1")
        // A fresh ledger per worker unless the test shares one.
        .env(
            "RESET_WORKER_LEDGER__PATH",
            log_dir.path().join("ledger.sqlite3"),
        )
        .env("RUST_LOG", "info");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup worker log"))
        .stderr(log)
        .spawn()
        .expect("spawn reset-worker");
    Worker {
        child,
        metrics_addr,
        log_path,
        _log_dir: log_dir,
    }
}

impl Worker {
    /// Body of `GET /metrics` (empty when the endpoint does not answer 200).
    pub fn metrics(&self) -> String {
        scrape_metrics(&self.metrics_addr)
    }

    /// Status of `GET /readyz`; 0 when nothing answers.
    pub fn ready(&self) -> u16 {
        readyz(&self.metrics_addr)
    }

    /// Sends SIGTERM to the worker.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Waits up to `timeout` for the worker to exit. `Some(code)`, with
    /// `128 + signal` when a signal ended it; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait worker") {
                return status.code().or_else(|| status.signal().map(|s| 128 + s));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the worker wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
            eprintln!(
                "----- reset-worker log ({}) -----\n{}----- end of reset-worker log -----",
                self.log_path.display(),
                self.logs()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Metrics and polling
// ---------------------------------------------------------------------------

/// Body of `GET /metrics` on `addr` (empty when it does not answer 200).
pub fn scrape_metrics(addr: &str) -> String {
    match http_get(addr, "/metrics") {
        (200, body) => body,
        _ => String::new(),
    }
}

/// Status of `GET /readyz` on `addr`; 0 when nothing answers.
pub fn readyz(addr: &str) -> u16 {
    http_get(addr, "/readyz").0
}

/// Sum of the samples of metric `name` in a Prometheus text exposition whose
/// labels include every `(key, value)` in `labels`; 0.0 when there are none.
///
/// Parsed by `prometheus-parse`, which folds a histogram's `NAME_bucket` lines
/// into one sample `NAME` (its buckets, without the `le` label) and keeps
/// `NAME_sum` and `NAME_count` as plain samples. So `NAME_sum` and `NAME_count`
/// are found as they are, and `NAME_bucket` (with `("le", "0.5")` among
/// `labels`, or else every bucket) is looked up in the folded sample.
/// Summaries' quantiles likewise, by `quantile`. Its label parser splits on
/// `,` and `=` and drops quotes without unescaping, so label values asked for
/// here must hold none of `,`, `=`, `"` or `\` (the worker's labels do not).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::{Scrape, Value};
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("reading lines from a string cannot fail");
    let bucket_of = name.strip_suffix("_bucket");
    let wanted = |key: &str| labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let bound = |key: &str| {
        wanted(key).map(|v| match v {
            "+Inf" => f64::INFINITY,
            v => v.parse::<f64>().unwrap_or(f64::NAN),
        })
    };
    let labels_match = |sample: &prometheus_parse::Sample, skip: &str| {
        labels
            .iter()
            .filter(|(k, _)| *k != skip)
            .all(|(k, v)| sample.labels.get(k) == Some(v))
    };
    scrape
        .samples
        .iter()
        .map(|sample| match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                if sample.metric == name && labels_match(sample, "") {
                    *v
                } else {
                    0.0
                }
            }
            Value::Histogram(buckets) => {
                if bucket_of != Some(sample.metric.as_str()) || !labels_match(sample, "le") {
                    return 0.0;
                }
                let le = bound("le");
                buckets
                    .iter()
                    .filter(|b| le.is_none_or(|le| b.less_than == le))
                    .map(|b| b.count)
                    .sum()
            }
            Value::Summary(quantiles) => {
                if sample.metric != name || !labels_match(sample, "quantile") {
                    return 0.0;
                }
                let q = bound("quantile");
                quantiles
                    .iter()
                    .filter(|s| q.is_none_or(|q| s.quantile == q))
                    .map(|s| s.count)
                    .sum()
            }
        })
        .sum()
}

/// Polls `f` every 200 ms until it returns true (→ true) or `timeout` passes (→ false).
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
pub mod app;
pub mod cognito_mock;
pub mod fake_aws;
pub mod proxy;

/// The most events in any window `[t, t + 1 s)` of `times` (sorted): the
/// bound a rate cap must hold.
pub fn max_in_one_second(times: &[Instant]) -> usize {
    let mut best = 0;
    let mut end = 0;
    for (start, t) in times.iter().enumerate() {
        while end < times.len() && times[end].duration_since(*t) < Duration::from_secs(1) {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

/// `reset-worker ledger init` for the DynamoDB ledger `table` on `moto`
/// (with `queue_url` to make the config whole); panics with its stderr
/// when it fails.
pub fn init_dynamodb_ledger(moto: &str, table: &str, queue_url: &str) {
    let init = Command::new(env!("CARGO_BIN_EXE_reset-worker"))
        .args(["ledger", "init"])
        .env("RESET_WORKER_SQS__QUEUE_URL", queue_url)
        .env("RESET_WORKER_COGNITO__CLIENT_ID", "ledger-init")
        .env("RESET_WORKER_LEDGER__BACKEND", "dynamodb")
        .env("RESET_WORKER_LEDGER__TABLE", table)
        .env("AWS_ENDPOINT_URL_DYNAMODB", moto)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run reset-worker ledger init");
    assert!(
        init.status.success(),
        "ledger init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
}
