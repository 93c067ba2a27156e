//! Several user pools in one deployment (`[cognito.pools.NAME]`, a job's
//! `pool` field), end to end on the fast fake of SQS and Cognito
//! (tests/support/fake_aws.rs), which records every accepted call's
//! `ClientId` and `SecretHash`:
//!
//! * the worker in process: each job reaches its own pool's endpoint with
//!   that pool's app client ID and a `SecretHash` made with that pool's
//!   secret; a job naming a pool that is not configured is dead-lettered
//!   with reason `unknown_pool`, and Cognito never hears of it;
//! * `enqueue --pool b` (the binary) stamps the pool on every row, and
//!   `--pool nope` exits with code 2 and sends nothing;
//! * `preflight` (the binary, on moto: DescribeUserPoolClient) checks every
//!   pool's app client, and a failing pool fails it.
//!
//! The fake rather than moto for the calls: the fake records exactly what
//! each call carried (moto's recording would do too, but two fakes give two
//! endpoints, which shows a pool's `endpoint_url` is what routes its calls).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use reset_worker::app::{App, Clients};
use reset_worker::aws::cognito::secret_hash;
use reset_worker::config::Settings;
use reset_worker::worker::RunOptions;
use serde_json::{Value, json};
use support::fake_aws::{AcceptedCall, DEAD_LETTER_QUEUE, FakeAws, FakeConfig, MAIN_QUEUE};
use support::{metric_value, sdk_config};
use tokio_util::sync::CancellationToken;

const DEFAULT_CLIENT: &str = "client-default";
const DEFAULT_SECRET: &str = "secret-default";
const B_CLIENT: &str = "client-b";
const B_SECRET: &str = "secret-b";

/// What the fake should have recorded for a call to `client_id` with
/// `secret` for `username`: the hash made with the crate's own function.
fn expected_call(username: &str, client_id: &str, secret: &str) -> AcceptedCall {
    AcceptedCall {
        username: username.to_owned(),
        client_id: client_id.to_owned(),
        secret_hash: Some(secret_hash(secret, username, client_id)),
    }
}

fn sorted(mut calls: Vec<AcceptedCall>) -> Vec<AcceptedCall> {
    calls.sort_by(|a, b| a.username.cmp(&b.username));
    calls
}

#[tokio::test(flavor = "multi_thread")]
async fn each_job_reaches_its_own_pool_and_an_unknown_pool_is_dead_lettered() {
    let fast = FakeConfig {
        cognito_latency: Duration::from_millis(1),
        ..FakeConfig::default()
    };
    // SQS and the `default` pool's Cognito on one fake; pool `b` on an
    // endpoint of its own (another fake), so a call can only land there
    // through `cognito.pools.b.endpoint_url`.
    let fake = FakeAws::start(fast.clone());
    let b_endpoint = FakeAws::start(fast);
    let settings: Settings = serde_json::from_value(json!({
        "sqs": {
            "queue_url": fake.queue_url(),
            "dead_letter_queue_url": fake.dead_letter_queue_url(),
            "wait_time_seconds": 1,
        },
        "cognito": {
            "client_id": DEFAULT_CLIENT,
            "client_secret": DEFAULT_SECRET,
            "pools": {
                "b": {
                    "client_id": B_CLIENT,
                    "client_secret": B_SECRET,
                    "region": "eu-west-1",
                    "endpoint_url": b_endpoint.url(),
                },
            },
        },
        "limits": {"max_rps": 1000, "burst": 100, "concurrency": 4},
        "metrics": {"listen": "127.0.0.1:0"},
        "ledger": {"backend": "memory"},
    }))
    .expect("valid test settings");
    let job = |user: &str, pool: Option<&str>| {
        let mut job = json!({"username": user, "campaign_id": "pools-it"});
        if let Some(pool) = pool {
            job["pool"] = pool.into();
        }
        job.to_string()
    };
    fake.enqueue([
        job("alice@example.com", None),
        job("bob@example.com", Some("default")),
        job("carol@example.com", Some("b")),
        job("dave@example.com", Some("b")),
        job("eve@example.com", Some("nope")),
    ]);

    let sdk = sdk_config(&fake.url());
    let clients = Clients::from_sdk(&sdk, &settings);
    let app = App::build_with(settings, None, clients)
        .await
        .expect("build the worker app");
    let run = app.run_until_stopped(
        CancellationToken::new(),
        RunOptions {
            until_empty_polls: Some(2),
        },
    );
    let summary = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the queue drains within a minute")
        .expect("the run ends without an error");
    assert_eq!(summary.sent, 4, "{summary:?}");
    assert_eq!(summary.rejected, 1, "{summary:?}");
    assert_eq!(summary.total(), 5, "{summary:?}");

    // The `default` pool's jobs (no field, and `"pool":"default"`) on the
    // SDK's endpoint, with its client and secret; `b`'s on its own.
    assert_eq!(
        sorted(fake.accepted_calls()),
        vec![
            expected_call("alice@example.com", DEFAULT_CLIENT, DEFAULT_SECRET),
            expected_call("bob@example.com", DEFAULT_CLIENT, DEFAULT_SECRET),
        ]
    );
    assert_eq!(
        sorted(b_endpoint.accepted_calls()),
        vec![
            expected_call("carol@example.com", B_CLIENT, B_SECRET),
            expected_call("dave@example.com", B_CLIENT, B_SECRET),
        ]
    );
    // The hashes really differ per pool: the same user under the other
    // pool's secret would not match.
    assert_ne!(
        secret_hash(B_SECRET, "carol@example.com", B_CLIENT),
        secret_hash(DEFAULT_SECRET, "carol@example.com", B_CLIENT)
    );
    // `nope` was never called anywhere (nor throttled, nor refused).
    for f in [&fake, &b_endpoint] {
        assert!(
            f.accepted_usernames()
                .iter()
                .all(|u| u != "eve@example.com"),
            "{:?}",
            f.accepted_usernames()
        );
        assert_eq!(f.throttled_count() + f.cognito_rejected_count(), 0);
    }

    // Dead-lettered with its reason; the job queue is empty.
    let dead = fake.messages(DEAD_LETTER_QUEUE);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let body: Value = serde_json::from_str(&dead[0].body).expect("the job's body, unchanged");
    assert_eq!(body["username"], "eve@example.com");
    assert_eq!(body["pool"], "nope");
    let reason = dead[0]
        .attributes
        .as_ref()
        .and_then(|a| a["reset_worker_reason"]["StringValue"].as_str());
    assert_eq!(reason, Some("unknown_pool"), "{:?}", dead[0].attributes);
    assert_eq!(fake.queue_depth(), 0);

    // The outcomes per pool: configured names, and `unknown` (never the
    // job's own text) for the rest.
    let text = reset_worker::telemetry::install_recorder()
        .expect("the app installed the recorder")
        .render();
    let count = |pool: &str, outcome: &str| {
        metric_value(
            &text,
            "reset_worker_campaign_jobs_total",
            &[
                ("campaign", "pools-it"),
                ("pool", pool),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(count("default", "sent"), 2.0, "{text}");
    assert_eq!(count("b", "sent"), 2.0, "{text}");
    assert_eq!(count("unknown", "rejected"), 1.0, "{text}");
    assert!(!text.contains("pool=\"nope\""), "{text}");
}

/// Runs `reset-worker ARGS` against `fake`'s SQS with `config`, returns
/// (exit code, stdout, stderr).
fn run_cli(fake: &FakeAws, config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    cmd.args(args).arg("--config").arg(config);
    for (key, _) in std::env::vars() {
        if key.starts_with("RESET_WORKER_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .env("AWS_ENDPOINT_URL_SQS", fake.url())
        .env("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", fake.url())
        .env("AWS_REGION", support::REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run reset-worker");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn enqueue_with_pool_stamps_every_row_and_an_unknown_pool_exits_2() {
    let fake = FakeAws::start(FakeConfig::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("reset-worker.toml");
    std::fs::write(
        &config,
        format!(
            "[sqs]\nqueue_url = \"{}\"\n\
             [cognito]\nclient_id = \"{DEFAULT_CLIENT}\"\n\
             [cognito.pools.b]\nclient_id = \"{B_CLIENT}\"\n\
             [ledger]\nbackend = \"memory\"\n",
            fake.queue_url()
        ),
    )
    .expect("write config");
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "u1@example.com\nu2@example.com\nu3@example.com\n").expect("users");
    let users = users.to_str().expect("utf-8 path");

    // Not configured: a configuration error, before anything is sent.
    let (code, _, stderr) = run_cli(
        &fake,
        &config,
        &["enqueue", "--campaign", "c-pools", "--pool", "nope", users],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--pool"), "{stderr}");
    assert_eq!(fake.queue_depth(), 0);

    let (code, stdout, stderr) = run_cli(
        &fake,
        &config,
        &["enqueue", "--campaign", "c-pools", "--pool", "b", users],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("enqueued 3"), "{stdout}");
    let bodies: Vec<Value> = fake
        .messages(MAIN_QUEUE)
        .iter()
        .map(|m| serde_json::from_str(&m.body).expect("a job body"))
        .collect();
    assert_eq!(bodies.len(), 3);
    for body in &bodies {
        assert_eq!(body["pool"], "b", "{body}");
        assert_eq!(body["campaign_id"], "c-pools", "{body}");
    }
}

/// `preflight` checks every pool, each on its own client: here both on
/// moto, `b` with an app client of its own (without a secret) and its own
/// endpoint setting.
#[tokio::test]
async fn preflight_checks_every_pool() {
    let stack = support::Stack::new(false, &[]).await;
    let b_client = stack
        .cognito
        .create_user_pool_client()
        .user_pool_id(&stack.user_pool_id)
        .client_name("pool-b-no-secret")
        .send()
        .await
        .expect("create pool b's app client")
        .user_pool_client
        .and_then(|c| c.client_id)
        .expect("a client id");
    let mut env = vec![
        (
            "RESET_WORKER_COGNITO__USER_POOL_ID",
            stack.user_pool_id.as_str(),
        ),
        (
            "RESET_WORKER_COGNITO__POOLS__B__CLIENT_ID",
            b_client.as_str(),
        ),
        (
            "RESET_WORKER_COGNITO__POOLS__B__USER_POOL_ID",
            stack.user_pool_id.as_str(),
        ),
        (
            "RESET_WORKER_COGNITO__POOLS__B__ENDPOINT_URL",
            stack.moto.as_str(),
        ),
    ];
    let (code, out, err) = support::run_cli(&stack, &env, &["preflight"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("PASS  app client             pool `default`: exists, has a secret"),
        "{out}"
    );
    assert!(
        out.contains("PASS  app client             pool `b`: exists, without a secret"),
        "{out}"
    );
    assert!(
        out.contains("pool `b`: unknown users are reported"),
        "{out}"
    );

    // A secret configured for `b`, whose client has none: that pool fails,
    // the default pool still passes.
    env.push((
        "RESET_WORKER_COGNITO__POOLS__B__CLIENT_SECRET",
        "not-the-secret",
    ));
    let (code, out, err) = support::run_cli(&stack, &env, &["preflight"], None);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAIL  app client             pool `b`: a client secret is configured but the client has none"),
        "{out}"
    );
    assert!(
        out.contains("PASS  app client             pool `default`"),
        "{out}"
    );
    assert!(!out.contains("not-the-secret") && !err.contains("not-the-secret"));
}
