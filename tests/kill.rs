//! SIGKILL mid-run (no graceful shutdown at all), then a restart: every job
//! still completes. Runs against the fast fake (moto is too slow for 500
//! jobs) with slow Cognito calls, and fake deletes that sometimes fail.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::fake_aws::{FakeAws, FakeConfig, run_worker};
use support::*;

const JOBS: usize = 500;

#[test]
fn sigkill_mid_run_then_restart_completes_every_job() {
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(150),
        // Some DeleteMessageBatch entries fail: they must be retried, and a
        // retried delete must not turn into a second email.
        delete_failure_fraction: 0.1,
        default_visibility: Duration::from_secs(3),
        max_receive_count: 50,
        ..FakeConfig::default()
    });
    fake.enqueue((0..JOBS).map(|i| format!(r#"{{"username":"kill{i}@example.com"}}"#)));

    let url = fake.url();
    let queue_url = fake.queue_url();
    let env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL_SQS", url.as_str()),
        ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", url.as_str()),
        ("RESET_WORKER_SQS__QUEUE_URL", queue_url.as_str()),
        ("RESET_WORKER_COGNITO__CLIENT_ID", "bench"),
        ("RESET_WORKER_SQS__VISIBILITY_TIMEOUT_SECONDS", "3"),
        ("RESET_WORKER_COGNITO__REQUEST_TIMEOUT_SECONDS", "2"),
        ("RESET_WORKER_LIMITS__CONCURRENCY", "32"),
        ("RESET_WORKER_LIMITS__MAX_RPS", "400"),
        ("RESET_WORKER_LIMITS__BURST", "40"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();

    let mut first = spawn_worker(&env, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while fake.accepted_usernames().len() < JOBS / 3 {
        assert!(Instant::now() < deadline, "no progress: {}", first.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().expect("SIGKILL the worker");
    let _ = first.child.wait();
    let at_kill = fake.accepted_usernames().len();

    // Messages the killed worker held come back after 3 s.
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let second = run_worker(
        &fake,
        &env_refs,
        &["--until-empty", "--empty-polls", "5"],
        Duration::from_secs(120),
    );
    assert_eq!(second.exit_code, Some(0), "{}", second.log);

    let mut per_user: HashMap<String, usize> = HashMap::new();
    for u in fake.accepted_usernames() {
        *per_user.entry(u).or_insert(0) += 1;
    }
    assert_eq!(per_user.len(), JOBS, "every user got a code");
    let duplicates: usize = per_user.values().map(|n| n - 1).sum();
    eprintln!(
        "SIGKILL after {at_kill} calls: {JOBS} users, {} calls, {duplicates} duplicates \
         (calls in flight at the kill, or awaiting their delete)",
        JOBS + duplicates
    );
    // Only calls in flight or awaiting their delete flush at the kill can
    // repeat: at most the concurrency plus one flush interval's worth.
    assert!(duplicates <= 32 + 40, "{duplicates} duplicates");
    assert_eq!(fake.queue_depth(), 0, "queue drained");
}

#[test]
fn failed_deletes_are_retried_and_cause_no_second_send() {
    const N: usize = 120;
    let fake = FakeAws::start(FakeConfig {
        // Almost a third of DeleteMessageBatch entries come back `Failed`.
        delete_failure_fraction: 0.3,
        ..FakeConfig::default()
    });
    fake.enqueue((0..N).map(|i| format!(r#"{{"username":"del{i}@example.com"}}"#)));
    let run = run_worker(
        &fake,
        &[
            ("RESET_WORKER_LIMITS__MAX_RPS", "500"),
            ("RESET_WORKER_LIMITS__BURST", "50"),
            ("RESET_WORKER_SQS__DELETE_FLUSH_INTERVAL_MS", "50"),
        ],
        &["--until-empty"],
        Duration::from_secs(60),
    );
    assert_eq!(run.exit_code, Some(0), "{}", run.log);
    let stats = fake.sqs_stats();
    assert!(stats.injected_delete_failures > 0, "the fault was injected");
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for u in fake.accepted_usernames() {
        *per_user.entry(u).or_insert(0) += 1;
    }
    assert_eq!(per_user.len(), N);
    assert!(
        per_user.values().all(|&n| n == 1),
        "a failed delete led to a second send"
    );
    assert_eq!(fake.queue_depth(), 0, "every message was finally deleted");
    assert_eq!(stats.redeliveries, 0);
}
