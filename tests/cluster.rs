//! One rate budget for every worker on one ledger (`limits.scope =
//! "cluster"`, the default with a shared ledger): three worker processes on
//! one DynamoDB table (moto) against the fast fake of SQS and Cognito, which
//! has no limit of its own. Whatever the workers do (join, die), the calls
//! they make together stay within `max_rps + burst` in every second. Rates
//! reached (the lower bounds) are the benchmark's (tests/bench_ledger.rs).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::fake_aws::{FakeAws, FakeConfig};
use support::*;

const JOBS: usize = 600;

#[test]
fn three_workers_share_one_budget_while_they_join_and_die() {
    let moto = moto_url();
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(20),
        ..FakeConfig::default()
    });
    fake.enqueue((0..JOBS).map(|i| format!(r#"{{"username":"share{i}@example.com"}}"#)));
    let table = format!("cluster-{}", random_suffix());
    let url = fake.url();
    let queue_url = fake.queue_url();
    let env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL_SQS", url.as_str()),
        ("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", url.as_str()),
        ("AWS_ENDPOINT_URL_DYNAMODB", moto.as_str()),
        ("RESET_WORKER_SQS__QUEUE_URL", queue_url.as_str()),
        ("RESET_WORKER_COGNITO__CLIENT_ID", "bench"),
        ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
        ("RESET_WORKER_LEDGER__TABLE", table.as_str()),
        ("RESET_WORKER_LIMITS__MAX_RPS", "30"),
        ("RESET_WORKER_LIMITS__BURST", "3"),
        ("RESET_WORKER_LIMITS__CONCURRENCY", "8"),
        // The dead worker's messages (and claims) come back within seconds.
        ("RESET_WORKER_SQS__VISIBILITY_TIMEOUT_SECONDS", "5"),
        ("RESET_WORKER_COGNITO__REQUEST_TIMEOUT_SECONDS", "2"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    init_dynamodb_ledger(&moto, &table, &queue_url);

    let mut a = spawn_worker(&env, &[]);
    let mut b = spawn_worker(&env, &[]);
    std::thread::sleep(Duration::from_secs(6));
    // A third joins mid-run...
    let mut c = spawn_worker(&env, &[]);
    std::thread::sleep(Duration::from_secs(6));
    // ...and one dies without a word.
    a.child.kill().expect("SIGKILL a");
    let _ = a.child.wait();
    let deadline = Instant::now() + Duration::from_secs(90);
    // Every user, not every call: a call `a` had in flight may be made
    // again (uncertain, resend), so 600 calls can come before 600 users.
    let distinct = || {
        fake.accepted_usernames()
            .into_iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    while distinct() < JOBS {
        assert!(Instant::now() < deadline, "no progress: {}", b.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    b.sigterm();
    c.sigterm();
    assert_eq!(b.wait_exit(Duration::from_secs(30)), Some(0));
    assert_eq!(c.wait_exit(Duration::from_secs(30)), Some(0));

    let times = fake.accepted_call_times();
    let worst = max_in_one_second(&times);
    eprintln!("{} calls; most in one second: {worst}", times.len());
    // 30/s + a burst of 3, whatever the number of live workers; one more
    // for a call delayed on loopback into its neighbour's second. Without
    // the shared budget three workers make up to 90 calls a second.
    assert!(
        worst <= 34,
        "{worst} calls in one second, budget 30 + burst 3"
    );
    // The budget was shared, not idle: each surviving worker took calls.
    let logs = [b.logs(), c.logs()];
    assert!(
        logs.iter()
            .all(|l| l.contains(r#""message":"cluster rate budget""#)),
        "{}",
        logs[1]
    );
    assert!(
        logs[1].contains(r#""workers":3"#),
        "c saw all three: {}",
        logs[1]
    );
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for u in fake.accepted_usernames() {
        *per_user.entry(u).or_insert(0) += 1;
    }
    assert_eq!(per_user.len(), JOBS, "every user called");
    // Only a call in flight when `a` died can be repeated (and it is then
    // recorded as uncertain); the concurrency bounds them.
    assert!(per_user.values().map(|n| n - 1).sum::<usize>() <= 8);
}
