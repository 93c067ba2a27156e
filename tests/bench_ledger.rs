//! Benchmark of the campaign ledger (not a test): the release worker against
//! the fast fake of SQS and Cognito, with each ledger backend: `memory`,
//! `sqlite` (a file in the temp dir) and `dynamodb` (moto server; started
//! here unless `TEST_MOTO_URL` names one).
//!
//!   cargo test --release --test bench_ledger -- --ignored --nocapture --test-threads 1
//!
//! (`scripts/bench.sh` runs it after `bench_rate`.) For each backend: the
//! goodput at a 30/s cap, raw throughput (64 × 50 ms calls, no cap), ledger
//! requests per job and the p99 claim latency, from the worker's own
//! metrics scraped until it exits. Prints a markdown report (also written to
//! `$BENCH_LEDGER_REPORT` when set). `BENCH_STRICT=1` fails on a missed goal.

mod support;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use support::fake_aws::{FakeAws, FakeConfig, WorkerRun, run_worker};
use support::{
    free_port, http_get, http_post, init_dynamodb_ledger, max_in_one_second, moto_url,
    random_suffix,
};

struct Run {
    backend: &'static str,
    scenario: &'static str,
    jobs: usize,
    max_rps: u32,
    run: WorkerRun,
    accepted: Vec<std::time::Instant>,
    distinct: usize,
    /// The worker's last `/metrics` before it exited.
    metrics: String,
    /// Every SQS request the fake served.
    sqs_requests: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        match (self.accepted.first(), self.accepted.last()) {
            (Some(a), Some(b)) if b > a => {
                (self.accepted.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    fn scrape(&self) -> Scrape {
        Scrape::parse(self.metrics.lines().map(|l| Ok(l.to_owned())))
            .expect("the worker's /metrics parses")
    }

    fn ledger_requests(&self) -> f64 {
        self.scrape()
            .samples
            .iter()
            .filter(|s| s.metric == "reset_worker_ledger_requests_total")
            .map(|s| match s.value {
                Value::Counter(v) | Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// The upper bound of the histogram bucket holding the 99th percentile
    /// of claim latency, in ms.
    fn claim_p99_ms(&self) -> Option<f64> {
        let scrape = self.scrape();
        let sample = scrape.samples.iter().find(|s| {
            s.metric == "reset_worker_ledger_request_duration_seconds"
                && s.labels.get("operation") == Some("claim")
        })?;
        let Value::Histogram(buckets) = &sample.value else {
            return None;
        };
        let total = buckets.last()?.count;
        buckets
            .iter()
            .find(|b| b.count >= 0.99 * total)
            .map(|b| b.less_than * 1000.0)
    }

    fn complete(&self) -> bool {
        self.run.exit_code == Some(0)
            && self.distinct == self.jobs
            && self.accepted.len() == self.jobs
    }
}

fn measure(backend: &'static str, scenario: &'static str, moto: Option<&str>) -> Run {
    let (jobs, latency, max_rps, burst, concurrency) = match scenario {
        "cap30" => (300, 20, 30, 2, 16),
        _ => (2000, 50, 10_000, 1000, 64),
    };
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(latency),
        ..FakeConfig::default()
    });
    fake.enqueue((0..jobs).map(|i| {
        serde_json::json!({"username": format!("user{i:05}@example.com"), "campaign_id": "bench"})
            .to_string()
    }));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let table = format!("bench-{}", random_suffix());
    let (rps, burst, conc) = (
        max_rps.to_string(),
        burst.to_string(),
        concurrency.to_string(),
    );
    let mut env: Vec<(&str, &str)> = vec![
        ("RESET_WORKER_LIMITS__MAX_RPS", &rps),
        ("RESET_WORKER_LIMITS__BURST", &burst),
        ("RESET_WORKER_LIMITS__CONCURRENCY", &conc),
        ("RESET_WORKER_METRICS__LISTEN", &listen),
        ("RESET_WORKER_LEDGER__BACKEND", backend),
    ];
    if let Some(moto) = moto {
        env.push(("AWS_ENDPOINT_URL_DYNAMODB", moto));
        env.push(("RESET_WORKER_LEDGER__TABLE", &table));
        init_dynamodb_ledger(moto, &table, &fake.queue_url());
    }
    // The last scrape before the worker exits: it drains, then polls an
    // empty queue twice (2 s), so that scrape holds every job's requests.
    let last = Arc::new(Mutex::new(String::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = std::thread::spawn({
        let (last, done, listen) = (last.clone(), done.clone(), listen.clone());
        move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = http_get(&listen, "/metrics");
                if status == 200 {
                    *last.lock().unwrap() = body;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    });
    let run = run_worker(
        &fake,
        &env,
        &["--until-empty"],
        Duration::from_secs(jobs as u64 / u64::from(max_rps).min(200) + 60),
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = scraper.join();
    let accepted = fake.accepted_call_times();
    let distinct = fake
        .accepted_usernames()
        .into_iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    let metrics = last.lock().unwrap().clone();
    let sqs_requests = fake.sqs_stats().total();
    Run {
        backend,
        scenario,
        jobs,
        max_rps,
        run,
        accepted,
        distinct,
        metrics,
        sqs_requests,
    }
}

/// `workers` processes on one DynamoDB ledger sharing a 30/s budget (burst
/// 3): (total rate first→last, worst 1-s window, CPU ms per job, peak RSS
/// MiB of the largest worker, every job once).
fn measure_cluster(workers: usize, moto: &str) -> (f64, usize, f64, f64, bool) {
    const JOBS: usize = 900;
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(20),
        ..FakeConfig::default()
    });
    fake.enqueue((0..JOBS).map(|i| {
        serde_json::json!({"username": format!("user{i:05}@example.com"), "campaign_id": "bench"})
            .to_string()
    }));
    let table = format!("bench-{}", random_suffix());
    init_dynamodb_ledger(moto, &table, &fake.queue_url());
    let runs: Vec<WorkerRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (fake, table) = (&fake, &table);
                scope.spawn(move || {
                    run_worker(
                        fake,
                        &[
                            ("RESET_WORKER_LIMITS__MAX_RPS", "30"),
                            ("RESET_WORKER_LIMITS__BURST", "3"),
                            ("RESET_WORKER_LIMITS__CONCURRENCY", "8"),
                            ("RESET_WORKER_LEDGER__BACKEND", "dynamodb"),
                            ("RESET_WORKER_LEDGER__TABLE", table),
                            ("AWS_ENDPOINT_URL_DYNAMODB", moto),
                        ],
                        &["--until-empty", "--empty-polls", "3"],
                        Duration::from_secs(120),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });
    let times = fake.accepted_call_times();
    let rate = match (times.first(), times.last()) {
        (Some(a), Some(b)) if b > a => {
            (times.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
        }
        _ => 0.0,
    };
    let cpu: f64 = runs.iter().map(|r| r.cpu.as_secs_f64()).sum();
    let rss = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    let distinct = fake
        .accepted_usernames()
        .into_iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    let ok = runs.iter().all(|r| r.exit_code == Some(0)) && distinct == JOBS && times.len() == JOBS;
    (
        rate,
        max_in_one_second(&times),
        cpu * 1000.0 / JOBS as f64,
        rss,
        ok,
    )
}

#[test]
#[ignore = "benchmark (about 4 min, release build): run scripts/bench.sh"]
fn bench_ledger() {
    let strict = std::env::var("BENCH_STRICT").is_ok_and(|v| v == "1");
    let moto = moto_url();
    // The recorder would keep every DynamoDB request in moto's memory.
    let _ = http_post(&moto, "/moto-api/recorder/stop-recording");
    let mut runs = Vec::new();
    for scenario in ["cap30", "raw"] {
        for backend in ["memory", "sqlite", "dynamodb"] {
            eprintln!("bench: {scenario} with the {backend} ledger...");
            let moto = (backend == "dynamodb").then_some(moto.as_str());
            runs.push(measure(backend, scenario, moto));
        }
    }

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "## Ledger benchmark (release build; fake SQS + Cognito; DynamoDB = moto server)\n"
    );
    let _ = writeln!(
        w,
        "| run | ledger | jobs | rate/s (first→last) | rate / cap | ledger requests / job | claim p99 (bucket) | SQS requests / job | worker CPU s | CPU ms / job | peak RSS MiB | every job once, exit 0 |"
    );
    let _ = writeln!(w, "|{}", "---|".repeat(12));
    let mut failed = Vec::new();
    for r in &runs {
        let ratio = (r.scenario == "cap30").then(|| r.rate() / f64::from(r.max_rps));
        if let Some(ratio) = ratio
            && ratio < 0.97
        {
            failed.push(format!(
                "{} {}: rate / cap {ratio:.3} < 0.97",
                r.scenario, r.backend
            ));
        }
        if !r.complete() {
            failed.push(format!(
                "{} {}: not every job sent once",
                r.scenario, r.backend
            ));
        }
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.1} | {} | {:.2} | {} | {:.3} | {:.2} | {:.2} | {:.1} | {} |",
            if r.scenario == "cap30" {
                "cap 30/s, 20 ms calls"
            } else {
                "raw: no cap, 64 × 50 ms"
            },
            r.backend,
            r.jobs,
            r.rate(),
            ratio.map_or("–".into(), |x| format!("{x:.3}")),
            r.ledger_requests() / r.jobs as f64,
            r.claim_p99_ms()
                .map_or("–".into(), |ms| format!("≤ {ms} ms")),
            r.sqs_requests as f64 / r.jobs as f64,
            r.run.cpu.as_secs_f64(),
            r.run.cpu.as_secs_f64() * 1000.0 / r.jobs as f64,
            r.run.peak_rss_kib as f64 / 1024.0,
            if r.complete() { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        w,
        "\n### One budget, several workers (DynamoDB on moto; max_rps 30, burst 3; 900 jobs, 20 ms calls)\n"
    );
    let _ = writeln!(
        w,
        "| workers | total rate/s (first→last) | rate / budget | most calls in 1 s | CPU ms / job (all workers) | peak RSS MiB (largest) | every job once, exit 0 |"
    );
    let _ = writeln!(w, "|{}", "---|".repeat(7));
    for workers in [1, 2, 4] {
        eprintln!("bench: {workers} workers sharing 30/s...");
        let (rate, worst, cpu, rss, ok) = measure_cluster(workers, &moto);
        if rate / 30.0 < 0.9 {
            failed.push(format!(
                "{workers} workers: rate / budget {:.3} < 0.9",
                rate / 30.0
            ));
        }
        if worst > 33 {
            failed.push(format!(
                "{workers} workers: {worst} calls in one second > 33"
            ));
        }
        if !ok {
            failed.push(format!("{workers} workers: not every job sent once"));
        }
        let _ = writeln!(
            w,
            "| {workers} | {rate:.1} | {:.3} | {worst} | {cpu:.2} | {rss:.1} | {} |",
            rate / 30.0,
            if ok { "yes" } else { "**no**" }
        );
    }
    println!("{out}");
    if let Ok(path) = std::env::var("BENCH_LEDGER_REPORT")
        && !path.is_empty()
    {
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
    if strict {
        assert!(failed.is_empty(), "missed: {failed:?}");
    } else if !failed.is_empty() {
        eprintln!("bench: missed goals: {failed:?}");
    }
}
