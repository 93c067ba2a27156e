//! Soak benchmark (not a test): 100,000 jobs through the fast fake, RSS
//! sampled across the run, every job accounted for, duplicates counted.
//!
//!   cargo test --release --test bench_soak -- --ignored --nocapture
//!
//! `SOAK_JOBS` changes the job count; `SOAK_LEDGER=memory` picks the
//! process-only ledger instead of the default SQLite file, to tell the
//! ledger's memory from the rest.

mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::fake_aws::{FakeAws, FakeConfig};
use support::*;

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn soak_100k_jobs_rss_stays_flat() {
    let jobs: usize = std::env::var("SOAK_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(20),
        ..FakeConfig::default()
    });
    fake.enqueue(
        (0..jobs).map(|i| format!(r#"{{"username":"soak{i}@example.com","campaign_id":"soak"}}"#)),
    );

    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let url = fake.url();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reset-worker"));
    for (key, _) in std::env::vars() {
        if key.starts_with("RESET_WORKER_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .args(["run", "--until-empty", "--empty-polls", "3"])
        .env("AWS_ENDPOINT_URL_SQS", &url)
        .env("AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER", &url)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RESET_WORKER_SQS__QUEUE_URL", fake.queue_url())
        .env("RESET_WORKER_COGNITO__CLIENT_ID", "bench")
        .env("RESET_WORKER_SQS__WAIT_TIME_SECONDS", "1")
        .env("RESET_WORKER_LIMITS__MAX_RPS", "10000")
        .env("RESET_WORKER_LIMITS__BURST", "1000")
        .env("RESET_WORKER_LIMITS__CONCURRENCY", "64")
        .env(
            "RESET_WORKER_METRICS__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("RUST_LOG", "warn")
        .env(
            "RESET_WORKER_LEDGER__PATH",
            dir.path().join("ledger.sqlite3"),
        )
        .envs(
            std::env::var("SOAK_LEDGER")
                .ok()
                .map(|backend| ("RESET_WORKER_LEDGER__BACKEND", backend)),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    let mut samples: Vec<(f64, usize, u64)> = Vec::new();
    let mut next_sample = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "soak timed out"
        );
        if Instant::now() >= next_sample {
            if let Some(rss) = vm_rss_kib(pid) {
                let done = fake.accepted_usernames().len();
                samples.push((started.elapsed().as_secs_f64(), done, rss));
            }
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().unwrap();
    let wall = started.elapsed().as_secs_f64();

    let mut per_user: HashMap<String, usize> = HashMap::new();
    for u in fake.accepted_usernames() {
        *per_user.entry(u).or_insert(0) += 1;
    }
    let duplicates: usize = per_user.values().map(|n| n - 1).sum();
    let at = |share: f64| {
        let target = (jobs as f64 * share) as usize;
        samples
            .iter()
            .find(|(_, done, _)| *done >= target)
            .or(samples.last())
            .map(|(t, done, rss)| {
                format!(
                    "{:>6.1} s {:>7} jobs {:>6.1} MiB",
                    t,
                    done,
                    *rss as f64 / 1024.0
                )
            })
            .unwrap_or_default()
    };
    println!(
        "\n## Soak: {jobs} jobs through the fast fake (20 ms Cognito, concurrency 64, no cap)\n"
    );
    println!("| point | time, jobs done, RSS |\n|---|---|");
    println!(
        "| start (first sample) | {} |",
        samples
            .first()
            .map(|(t, d, r)| format!("{t:.1} s {d} jobs {:.1} MiB", *r as f64 / 1024.0))
            .unwrap_or_default()
    );
    println!("| 10 % | {} |", at(0.10));
    println!("| 50 % | {} |", at(0.50));
    println!("| 90 % | {} |", at(0.90));
    println!("| end (last sample) | {} |", at(1.0));
    println!(
        "\nexit {:?} in {wall:.1} s ({:.0} jobs/s); users sent {} of {jobs}; duplicates {duplicates}; queue depth {}",
        status.code(),
        jobs as f64 / wall,
        per_user.len(),
        fake.queue_depth()
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(per_user.len(), jobs, "no job lost");
    assert_eq!(fake.queue_depth(), 0);
}
