//! SIGKILL mid-run (no graceful shutdown at all), then a restart on the same
//! SQLite ledger: every job still completes, a user whose call completed
//! before the kill is never called again, and only the users in flight at
//! the kill are uncertain and follow `ledger.on_uncertain`. Runs against the
//! fast fake (moto is too slow for 500 jobs) with slow Cognito calls, and
//! fake deletes that sometimes fail.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::fake_aws::{FakeAws, FakeConfig, run_worker};
use support::*;

const JOBS: usize = 500;

/// What a kill and a restart left: calls per user, the second run's log and
/// the ledger's report.
struct AfterKill {
    per_user: HashMap<String, usize>,
    /// Claims the second run found expired in progress.
    taken_over: usize,
    /// `report` rows: (username, state, reason).
    report: Vec<(String, String, String)>,
}

fn kill_and_restart(on_uncertain: &str) -> AfterKill {
    let ledger_dir = tempfile::tempdir().unwrap();
    let ledger = ledger_dir.path().join("ledger.sqlite3");
    let ledger = ledger.to_str().unwrap();
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
        ("RESET_WORKER_LEDGER__PATH", ledger),
        ("RESET_WORKER_LEDGER__ON_UNCERTAIN", on_uncertain),
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

    assert_eq!(fake.queue_depth(), 0, "queue drained");
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for u in fake.accepted_usernames() {
        *per_user.entry(u).or_insert(0) += 1;
    }
    let taken_over = second.log.matches("earlier claim expired mid-call").count();
    eprintln!(
        "SIGKILL after {at_kill} calls: {} users called, {} calls, {taken_over} uncertain claims",
        per_user.len(),
        per_user.values().sum::<usize>()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reset-worker"))
        .args(["report", "--campaign", "default"])
        .env("RESET_WORKER_SQS__QUEUE_URL", &queue_url)
        .env("RESET_WORKER_COGNITO__CLIENT_ID", "bench")
        .env("RESET_WORKER_LEDGER__PATH", ledger)
        .output()
        .expect("run report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].to_owned())
        })
        .collect();
    AfterKill {
        per_user,
        taken_over,
        report,
    }
}

#[test]
fn sigkill_then_restart_calls_again_only_the_users_in_flight_at_the_kill() {
    let after = kill_and_restart("resend");
    assert_eq!(after.per_user.len(), JOBS, "every user got a code");
    let duplicates: usize = after.per_user.values().map(|n| n - 1).sum();
    // Without the ledger, the calls awaiting their delete flush at the kill
    // were repeated too (up to 72 here). Now a second call is only ever one
    // whose claim the kill left in progress: at most the concurrency (32).
    assert!(
        duplicates <= after.taken_over,
        "{duplicates} second calls, but only {} uncertain claims",
        after.taken_over
    );
    assert!(
        after.taken_over <= 32,
        "{} uncertain claims",
        after.taken_over
    );
    assert_eq!(after.report.len(), JOBS);
    assert!(after.report.iter().all(|(_, state, _)| state == "sent"));
}

#[test]
fn with_on_uncertain_skip_nobody_is_called_twice() {
    let after = kill_and_restart("skip");
    assert!(
        after.per_user.values().all(|&n| n == 1),
        "a user was called twice"
    );
    let uncertain: Vec<_> = after
        .report
        .iter()
        .filter(|(_, state, _)| state == "uncertain")
        .collect();
    assert_eq!(uncertain.len(), after.taken_over);
    assert!(after.taken_over <= 32);
    // Every user is either sent or uncertain; none is lost.
    assert_eq!(after.report.len(), JOBS);
    assert_eq!(
        after.report.iter().filter(|(_, s, _)| s == "sent").count() + uncertain.len(),
        JOBS
    );
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
