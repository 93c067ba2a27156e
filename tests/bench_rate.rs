//! Benchmark of the release worker binary against the in-process fake of SQS
//! and Cognito (tests/support/fake_aws.rs): rate-cap accuracy, adaptation to
//! a throttling Cognito, raw throughput, and cost (SQS requests, CPU, RSS).
//!
//! Ignored by default; run it with `scripts/bench.sh`, which is
//! `cargo test --release --test bench_rate -- --ignored --nocapture --test-threads 1`.
//! It prints a markdown report (also written to `$BENCH_REPORT` when set).
//!
//! `BENCH_ONLY=cap10,adapt,...` runs a subset (keys: cap10, cap30, cap100,
//! adapt, share20, over1000, raw, signout30). `BENCH_STRICT=1` fails the test when a goal is missed;
//! by default it only reports. `FAKE_AWS_WORKER_ENV="KEY=VALUE,..."` adds
//! worker settings to every run (e.g.
//! `RESET_WORKER_SQS__DELETE_FLUSH_INTERVAL_MS=1000`), for experiments.
//! `BENCH_LOG_DIR=DIR` keeps each run's worker log as `DIR/<key>.log`.
//!
//! Each run: a fresh fake with N jobs queued, then `reset-worker run
//! --until-empty` with 1 s long polls and the memory ledger (the ledger's
//! own cost is tests/bench_ledger.rs's), killed if it outlives its time limit.

mod support;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::fake_aws::{FakeAws, FakeConfig, SqsOp, SqsStats, WorkerRun, run_worker};

struct Scenario {
    key: &'static str,
    title: &'static str,
    jobs: usize,
    latency: Duration,
    /// The fake's Cognito bucket `(rate/s, burst)`.
    throttle: Option<(f64, f64)>,
    max_rps: u32,
    burst: u32,
    concurrency: u32,
    timeout: Duration,
    /// Worker settings of this scenario alone (added after the rate limits).
    env: &'static [(&'static str, &'static str)],
}

fn scenarios() -> Vec<Scenario> {
    let cap = |key, title, rps: u32, jobs| Scenario {
        key,
        title,
        jobs,
        latency: Duration::from_millis(20),
        throttle: None,
        max_rps: rps,
        burst: 2,
        concurrency: 16,
        timeout: Duration::from_secs(jobs as u64 / rps as u64 + 20),
        env: &[],
    };
    vec![
        cap("cap10", "1. cap 10/s", 10, 100),
        cap("cap30", "1. cap 30/s", 30, 300),
        cap("cap100", "1. cap 100/s", 100, 1000),
        Scenario {
            key: "adapt",
            title: "2. adapt: cap 100, Cognito 25/s",
            jobs: 300,
            latency: Duration::from_millis(20),
            throttle: Some((25.0, 25.0)),
            max_rps: 100,
            burst: 2,
            concurrency: 16,
            timeout: Duration::from_secs(60),
            env: &[],
        },
        // What real users leave of the quota moves; the campaign must keep
        // what is left busy without being throttled much (issue #13's two
        // cases, 900 jobs each).
        Scenario {
            key: "share20",
            title: "2. adapt: cap 30, 20/s left by real users",
            jobs: 900,
            latency: Duration::from_millis(20),
            throttle: Some((20.0, 20.0)),
            max_rps: 30,
            burst: 2,
            concurrency: 16,
            timeout: Duration::from_secs(90),
            env: &[],
        },
        Scenario {
            key: "over1000",
            title: "2. adapt: cap 1000, quota 30/s",
            jobs: 900,
            latency: Duration::from_millis(20),
            throttle: Some((30.0, 30.0)),
            max_rps: 1000,
            burst: 2,
            concurrency: 16,
            timeout: Duration::from_secs(90),
            env: &[],
        },
        Scenario {
            key: "raw",
            title: "3. raw: no cap, 64 × 50 ms",
            jobs: 6000,
            latency: Duration::from_millis(50),
            throttle: None,
            max_rps: 10_000,
            burst: 1000,
            concurrency: 64,
            timeout: Duration::from_secs(60),
            env: &[],
        },
        // `cognito.sign_out`: each user costs a reset and an
        // AdminUserGlobalSignOut, both on the Region's one limiter, so the
        // calls together must keep to the cap and users finish at half of it.
        Scenario {
            key: "signout30",
            title: "5. sign-out: cap 30, reset + AdminUserGlobalSignOut",
            jobs: 300,
            latency: Duration::from_millis(20),
            throttle: None,
            max_rps: 30,
            burst: 2,
            concurrency: 16,
            // Two calls per job at 30/s: 20 s of calls.
            timeout: Duration::from_secs(300 * 2 / 30 + 20),
            env: &[
                ("RESET_WORKER_COGNITO__SIGN_OUT", "true"),
                ("RESET_WORKER_COGNITO__USER_POOL_ID", "us-east-1_bench"),
            ],
        },
    ]
}

struct Measured {
    run: WorkerRun,
    /// Arrival times of accepted ForgotPassword calls, sorted.
    times: Vec<Instant>,
    /// Arrival times of throttled calls, sorted.
    throttled_times: Vec<Instant>,
    /// Accepted AdminUserGlobalSignOut calls, in the fake's order.
    sign_outs: Vec<(String, Instant)>,
    /// Every accepted Cognito call (ForgotPassword and sign-out), sorted.
    all_calls: Vec<Instant>,
    /// Accepted ForgotPassword calls by user, in the fake's order.
    resets: Vec<(String, Instant)>,
    throttled_sign_outs: u64,
    distinct_users: usize,
    throttled: u64,
    fake_cpu: Duration,
    /// Sum of the time calls spent inside the fake Cognito.
    cognito_busy: Duration,
    sqs: SqsStats,
    left_in_queue: usize,
}

impl Measured {
    fn accepted(&self) -> usize {
        self.times.len()
    }

    /// Accepted calls per second from the first to the last one.
    fn steady_rate(&self) -> f64 {
        match (self.times.first(), self.times.last()) {
            (Some(a), Some(b)) if self.times.len() > 1 && b > a => {
                (self.times.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// The most accepted calls in any window `[t, t + 1 s)`.
    fn max_in_one_second(&self) -> usize {
        support::max_in_one_second(&self.times)
    }

    /// Accepted calls per second net of a token bucket's initial `burst`:
    /// a client that keeps a bucket of `rate`/s busy from its first call on
    /// gets `burst + rate × span` calls, so this is `rate` for a perfect one.
    fn goodput_net_of_burst(&self, burst: f64) -> f64 {
        match (self.times.first(), self.times.last()) {
            (Some(a), Some(b)) if b > a => {
                (self.times.len() as f64 - burst).max(0.0) / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// All accepted Cognito calls (resets and sign-outs) per second, first
    /// to last.
    fn total_rate(&self) -> f64 {
        rate_first_to_last(&self.all_calls)
    }

    /// Users signed out (done, with sign-out on) per second, from the first
    /// sign-out to the last.
    fn users_per_second(&self) -> f64 {
        let mut times: Vec<Instant> = self.sign_outs.iter().map(|(_, t)| *t).collect();
        times.sort();
        rate_first_to_last(&times)
    }

    /// `(users reset with exactly one sign-out after their reset, users
    /// reset but never signed out, users signed out more than once, sign-outs
    /// of users never reset or before their reset)`.
    fn sign_out_pairing(&self) -> (usize, usize, usize, usize) {
        let mut reset_at: HashMap<&str, Instant> = HashMap::new();
        for (user, t) in &self.resets {
            reset_at.entry(user).or_insert(*t);
        }
        let mut sign_outs: HashMap<&str, Vec<Instant>> = HashMap::new();
        for (user, t) in &self.sign_outs {
            sign_outs.entry(user).or_default().push(*t);
        }
        let (mut once, mut never, mut twice) = (0, 0, 0);
        for user in reset_at.keys() {
            match sign_outs.get(user).map_or(0, Vec::len) {
                0 => never += 1,
                1 => once += 1,
                _ => twice += 1,
            }
        }
        let stray = self
            .sign_outs
            .iter()
            .filter(|(user, t)| reset_at.get(user.as_str()).is_none_or(|r| t <= r))
            .count();
        (once, never, twice, stray)
    }

    /// `resets/sign-outs` accepted per second since the first call.
    fn sign_out_timeline(&self) -> String {
        let Some(first) = self.all_calls.first() else {
            return String::new();
        };
        let second = |t: &Instant| t.duration_since(*first).as_secs() as usize;
        let last = self.all_calls.last().map_or(0, second);
        let mut bins = vec![(0u32, 0u32); last + 1];
        for t in &self.times {
            bins[second(t)].0 += 1;
        }
        for (_, t) in &self.sign_outs {
            bins[second(t)].1 += 1;
        }
        bins.iter()
            .map(|(r, o)| format!("{r}/{o}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn throttled_share(&self) -> f64 {
        share(self.throttled, self.accepted() as u64 + self.throttled)
    }

    /// Arrival of the first call, accepted or throttled.
    fn first_call(&self) -> Option<Instant> {
        [self.times.first(), self.throttled_times.first()]
            .into_iter()
            .flatten()
            .min()
            .copied()
    }

    /// Throttled share among calls arriving `skip` or later after the first
    /// call: the steady state, without the initial convergence.
    fn throttled_share_after(&self, skip: Duration) -> (f64, u64, u64) {
        let Some(first) = self.first_call() else {
            return (0.0, 0, 0);
        };
        let from = first + skip;
        let late = |v: &[Instant]| v.iter().filter(|t| **t >= from).count() as u64;
        let (t, a) = (late(&self.throttled_times), late(&self.times));
        (share(t, t + a), t, t + a)
    }

    fn sqs_per_job(&self, jobs: usize) -> f64 {
        self.sqs.total() as f64 / jobs as f64
    }

    fn cpu_per_10k(&self, jobs: usize) -> f64 {
        self.run.cpu.as_secs_f64() / jobs as f64 * 10_000.0
    }

    /// `(mean calls in flight at the fake over first→last call, mean
    /// latency it really served in ms)`.
    fn fake_concurrency(&self) -> (f64, f64) {
        let calls = self.accepted() as u64 + self.throttled;
        let span = match (self.times.first(), self.times.last()) {
            (Some(a), Some(b)) if b > a => b.duration_since(*a).as_secs_f64(),
            _ => return (0.0, 0.0),
        };
        let busy = self.cognito_busy.as_secs_f64();
        (busy / span, busy * 1000.0 / calls.max(1) as f64)
    }

    fn rss_mib(&self) -> f64 {
        self.run.peak_rss_kib as f64 / 1024.0
    }

    fn outcomes(&self) -> String {
        let parts: Vec<String> = ["sent", "skipped", "rejected", "deferred", "released"]
            .iter()
            .filter_map(|k| {
                self.run
                    .summary_field(k)
                    .filter(|n| *n > 0)
                    .map(|n| format!("{k} {n}"))
            })
            .collect();
        if parts.is_empty() {
            "(no summary)".into()
        } else {
            parts.join(", ")
        }
    }

    /// `accepted/throttled` per second since the first call.
    fn timeline(&self) -> String {
        let Some(first) = self.first_call() else {
            return String::new();
        };
        let second = |t: &Instant| t.duration_since(first).as_secs() as usize;
        let last = self
            .times
            .iter()
            .chain(&self.throttled_times)
            .map(second)
            .max()
            .unwrap_or(0);
        let mut bins = vec![(0u32, 0u32); last + 1];
        for t in &self.times {
            bins[second(t)].0 += 1;
        }
        for t in &self.throttled_times {
            bins[second(t)].1 += 1;
        }
        bins.iter()
            .map(|(a, t)| format!("{a}/{t}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn ended(&self) -> String {
        match (self.run.timed_out, self.run.exit_code) {
            (true, _) => format!("killed at {:.0} s", self.run.wall.as_secs_f64()),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "signal".into(),
        }
    }
}

/// Calls per second from the first to the last of `times` (sorted).
fn rate_first_to_last(times: &[Instant]) -> f64 {
    match (times.first(), times.last()) {
        (Some(a), Some(b)) if times.len() > 1 && b > a => {
            (times.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
        }
        _ => 0.0,
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn measure(s: &Scenario) -> Measured {
    let fake = FakeAws::start(FakeConfig {
        cognito_latency: s.latency,
        throttle: s.throttle,
        ..FakeConfig::default()
    });
    fake.enqueue((0..s.jobs).map(|i| {
        serde_json::json!({"username": format!("user{i:05}@example.com"), "campaign_id": "bench"})
            .to_string()
    }));
    let (rps, burst, conc) = (
        s.max_rps.to_string(),
        s.burst.to_string(),
        s.concurrency.to_string(),
    );
    let mut env: Vec<(&str, &str)> = vec![
        ("RESET_WORKER_LIMITS__MAX_RPS", &rps),
        ("RESET_WORKER_LIMITS__BURST", &burst),
        ("RESET_WORKER_LIMITS__CONCURRENCY", &conc),
        // The rate machinery alone; tests/bench_ledger.rs measures what
        // each ledger backend adds.
        ("RESET_WORKER_LEDGER__BACKEND", "memory"),
    ];
    env.extend_from_slice(s.env);
    let run = run_worker(&fake, &env, &["--until-empty"], s.timeout);
    let users = fake.accepted_usernames();
    let times = fake.accepted_call_times();
    let mut all_calls = times.clone();
    all_calls.extend(fake.accepted_sign_out_times());
    all_calls.sort();
    Measured {
        times,
        throttled_times: fake.throttled_call_times(),
        sign_outs: fake.accepted_sign_outs_by_user(),
        all_calls,
        resets: fake.accepted_resets_by_user(),
        throttled_sign_outs: fake.throttled_sign_out_count(),
        distinct_users: users.iter().collect::<HashSet<_>>().len(),
        throttled: fake.throttled_count(),
        fake_cpu: fake.cpu_time(),
        cognito_busy: fake.cognito_busy_time(),
        sqs: fake.sqs_stats(),
        left_in_queue: fake.queue_depth(),
        run,
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_string();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("?".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1048576.0)
        });
    format!(
        "nproc {nproc}, CPU {model}, RAM {mem}, Linux {}",
        kernel.trim()
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Goal {
    id: String,
    check: String,
    run: &'static str,
    measured: String,
    goal: String,
    pass: Option<bool>,
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "**FAIL**",
        None => "info",
    }
}

#[test]
#[ignore = "benchmark (about 1–2 min, release build): run scripts/bench.sh"]
fn bench_rate() {
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let strict = std::env::var("BENCH_STRICT").is_ok_and(|v| v == "1");
    let load_before = loadavg();
    let started = Instant::now();

    let mut results: Vec<(Scenario, Measured)> = Vec::new();
    for s in scenarios() {
        if only.as_ref().is_some_and(|o| !o.iter().any(|k| k == s.key)) {
            continue;
        }
        eprintln!("bench: running {} ({} jobs)...", s.title, s.jobs);
        let m = measure(&s);
        if let Ok(dir) = std::env::var("BENCH_LOG_DIR")
            && !dir.is_empty()
        {
            let path = std::path::Path::new(&dir).join(format!("{}.log", s.key));
            std::fs::write(&path, &m.run.log)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        eprintln!(
            "bench:   {} in {:.1} s: {} accepted, {} throttled, {:.1}/s",
            m.ended(),
            m.run.wall.as_secs_f64(),
            m.accepted(),
            m.throttled,
            m.steady_rate()
        );
        if !m.sign_outs.is_empty() {
            eprintln!(
                "bench:   {} sign-outs; all calls {:.1}/s; users {:.1}/s",
                m.sign_outs.len(),
                m.total_rate(),
                m.users_per_second()
            );
        }
        results.push((s, m));
    }

    let mut goals: Vec<Goal> = Vec::new();
    for (s, m) in &results {
        let mut goal = |id: &str, check: &str, measured: String, goal: String, pass| {
            goals.push(Goal {
                id: id.into(),
                check: check.into(),
                run: s.title,
                measured,
                goal,
                pass,
            })
        };
        match s.key {
            "cap10" | "cap30" | "cap100" => {
                let ratio = m.steady_rate() / f64::from(s.max_rps);
                goal(
                    "1a",
                    "achieved rate / cap (first→last accepted call)",
                    format!("{ratio:.4} ({:.2}/s)", m.steady_rate()),
                    "≥ 0.97".into(),
                    Some(ratio >= 0.97),
                );
                let bound = (s.max_rps + s.burst) as usize;
                goal(
                    "1b",
                    "most accepted calls in any 1 s window",
                    m.max_in_one_second().to_string(),
                    format!("≤ {bound} (cap + burst)"),
                    Some(m.max_in_one_second() <= bound),
                );
            }
            "adapt" | "share20" | "over1000" => {
                let (rate, burst) = s.throttle.unwrap_or((1.0, 1.0));
                let goodput = m.goodput_net_of_burst(burst);
                let ratio = goodput / rate;
                goal(
                    "2a",
                    "goodput / the available rate (accepted calls net of the bucket's initial burst, per s first→last)",
                    format!(
                        "{ratio:.4} ({goodput:.2}/s; {:.2}/s gross)",
                        m.steady_rate()
                    ),
                    "≥ 0.90".into(),
                    Some(ratio >= 0.90),
                );
                goal(
                    "2b",
                    "share of calls throttled",
                    format!(
                        "{:.1} % ({} of {})",
                        m.throttled_share() * 100.0,
                        m.throttled,
                        m.throttled + m.accepted() as u64
                    ),
                    "≤ 5 %".into(),
                    Some(m.throttled_share() <= 0.05),
                );
                let skip = Duration::from_secs(5);
                let (late, t, all) = m.throttled_share_after(skip);
                goal(
                    "2c",
                    "share throttled from 5 s after the first call on (steady state)",
                    format!("{:.1} % ({t} of {all})", late * 100.0),
                    "(diagnostic)".into(),
                    None,
                );
            }
            "signout30" => {
                let (once, never, twice, stray) = m.sign_out_pairing();
                goal(
                    "5a",
                    "users reset; sign-outs accepted; every reset user signed out exactly once, after the reset",
                    format!(
                        "{} reset, {} sign-outs ({} throttled); {once} once, {never} never, {twice} more than once, {stray} without a reset before",
                        m.accepted(),
                        m.sign_outs.len(),
                        m.throttled_sign_outs
                    ),
                    format!("all {} once", s.jobs),
                    Some(
                        once == s.jobs
                            && never == 0
                            && twice == 0
                            && stray == 0
                            && m.sign_outs.len() == s.jobs,
                    ),
                );
                let bound = (s.max_rps + s.burst) as usize;
                let worst = support::max_in_one_second(&m.all_calls);
                goal(
                    "5b",
                    "most Cognito calls (resets + sign-outs) in any 1 s window",
                    worst.to_string(),
                    format!("≤ {bound} (cap + burst)"),
                    Some(worst <= bound),
                );
                let ratio = m.total_rate() / f64::from(s.max_rps);
                goal(
                    "5c",
                    "total Cognito call rate / cap (resets + sign-outs, first→last call)",
                    format!(
                        "{ratio:.4} ({:.2}/s over {} calls)",
                        m.total_rate(),
                        m.all_calls.len()
                    ),
                    "≥ 0.97".into(),
                    Some(ratio >= 0.97),
                );
                let half = f64::from(s.max_rps) / 2.0;
                let users = m.users_per_second() / half;
                goal(
                    "5d",
                    "users completed (signed out) per s / (cap / 2), first→last sign-out",
                    format!("{users:.4} ({:.2}/s)", m.users_per_second()),
                    "0.97–1.03 (≈ cap / 2)".into(),
                    Some((0.97..=1.03).contains(&users)),
                );
            }
            "raw" => {
                let bound = f64::from(s.concurrency) / s.latency.as_secs_f64();
                let ratio = m.steady_rate() / bound;
                goal(
                    "3",
                    "jobs/s / (concurrency / latency)",
                    format!("{ratio:.4} ({:.0}/s of {bound:.0}/s)", m.steady_rate()),
                    "≥ 0.90".into(),
                    Some(ratio >= 0.90),
                );
                let (in_flight, served_ms) = m.fake_concurrency();
                goal(
                    "3i",
                    "mean calls in flight at the fake (vs concurrency); latency it served",
                    format!(
                        "{in_flight:.1} of {}; {served_ms:.2} ms, so the bound is {:.0}/s and the ratio to it {:.3}",
                        s.concurrency,
                        f64::from(s.concurrency) * 1000.0 / served_ms,
                        m.steady_rate() * served_ms / (1000.0 * f64::from(s.concurrency))
                    ),
                    "(diagnostic)".into(),
                    None,
                );
                goal(
                    "4b",
                    "worker CPU s per 10,000 jobs",
                    format!("{:.2}", m.cpu_per_10k(s.jobs)),
                    "(no goal)".into(),
                    None,
                );
            }
            _ => {}
        }
        let sqs = m.sqs_per_job(s.jobs);
        goal(
            "4a",
            "SQS requests per job",
            format!("{sqs:.3}"),
            "≤ 0.25".into(),
            Some(sqs <= 0.25),
        );
        goal(
            "4c",
            "worker peak RSS (VmHWM)",
            format!("{:.1} MiB", m.rss_mib()),
            "≤ 30 MiB".into(),
            Some(m.rss_mib() <= 30.0),
        );
        let complete = !m.run.timed_out
            && m.run.exit_code == Some(0)
            && m.distinct_users == s.jobs
            && m.accepted() == s.jobs
            && m.left_in_queue == 0;
        goal(
            "ok",
            "every job sent exactly once, queue empty, exit 0",
            format!(
                "{}; {} sent to {} users; {} left",
                m.ended(),
                m.accepted(),
                m.distinct_users,
                m.left_in_queue
            ),
            "all".into(),
            Some(complete),
        );
    }
    goals.sort_by(|a, b| a.id.cmp(&b.id));

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "## reset-worker benchmark (release build, fake SQS + Cognito on loopback)\n"
    );
    let _ = writeln!(w, "Machine: {}", machine());
    let _ = writeln!(
        w,
        "Load average before / after: {load_before} / {}; total {:.0} s.\n",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(w, "### Goals\n");
    let _ = writeln!(w, "| # | check | run | measured | goal | result |");
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for g in &goals {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            g.id,
            g.check,
            g.run,
            g.measured,
            g.goal,
            verdict(g.pass)
        );
    }
    let _ = writeln!(w, "\n### Runs\n");
    let _ = writeln!(
        w,
        "| run | jobs | max_rps / burst / concurrency | fake latency, throttle | ended | wall s | accepted | throttled | rate/s (first→last) | max in 1 s | SQS req/job | receives (empty) / msgs per receive | DeleteMessageBatch | ChangeVisibility | redelivered | worker CPU s | CPU s / 10k jobs | peak RSS MiB | fake CPU s | worker outcomes |"
    );
    let _ = writeln!(w, "|{}", "---|".repeat(20));
    for (s, m) in &results {
        let receives = m.sqs.get(SqsOp::ReceiveMessage);
        let nonempty = receives.saturating_sub(m.sqs.empty_receives);
        let per_receive = if nonempty == 0 {
            0.0
        } else {
            m.sqs.messages_received as f64 / nonempty as f64
        };
        let throttle = s
            .throttle
            .map_or("none".into(), |(r, b)| format!("{r}/s burst {b}"));
        let _ = writeln!(
            w,
            "| {} | {} | {} / {} / {} | {} ms, {} | {} | {:.1} | {} | {} | {:.2} | {} | {:.3} | {} ({}) / {:.2} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {} |",
            s.title,
            s.jobs,
            s.max_rps,
            s.burst,
            s.concurrency,
            s.latency.as_millis(),
            throttle,
            m.ended(),
            m.run.wall.as_secs_f64(),
            m.accepted(),
            m.throttled,
            m.steady_rate(),
            m.max_in_one_second(),
            m.sqs_per_job(s.jobs),
            receives,
            m.sqs.empty_receives,
            per_receive,
            m.sqs.get(SqsOp::DeleteMessageBatch),
            m.sqs.get(SqsOp::ChangeMessageVisibility),
            m.sqs.redeliveries,
            m.run.cpu.as_secs_f64(),
            m.cpu_per_10k(s.jobs),
            m.rss_mib(),
            m.fake_cpu.as_secs_f64(),
            m.outcomes()
        );
    }
    for (s, m) in &results {
        if !m.sign_outs.is_empty() {
            let _ = writeln!(
                w,
                "\n{}: the row's accepted calls, rate and max in 1 s are the resets alone; with the sign-outs, {} calls at {:.2}/s (first→last), at most {} in 1 s. Resets/sign-outs accepted per second since the first call: {}",
                s.title,
                m.all_calls.len(),
                m.total_rate(),
                support::max_in_one_second(&m.all_calls),
                m.sign_out_timeline()
            );
        }
        if s.throttle.is_some() {
            let _ = writeln!(
                w,
                "\n{}: accepted/throttled calls per second since the first call: {}",
                s.title,
                m.timeline()
            );
        }
    }
    println!("{out}");
    if let Ok(path) = std::env::var("BENCH_REPORT")
        && !path.is_empty()
    {
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
    if strict {
        let failed: Vec<String> = goals
            .iter()
            .filter(|g| g.pass == Some(false))
            .map(|g| format!("{} {} ({}): {}", g.id, g.check, g.run, g.measured))
            .collect();
        assert!(failed.is_empty(), "goals missed:\n{}", failed.join("\n"));
    }
}
