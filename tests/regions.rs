//! One budget per Region (`limits.max_rps` for each Region the pools call,
//! `[limits.regions.REGION]` for one of them), end to end on two fakes of
//! Cognito: pool `default` in us-east-1 (the SDK's Region) and pool `b` in
//! eu-west-1 on an endpoint of its own.
//!
//! us-east-1's quota is nearly spent (the fake lets one call in two seconds
//! through), eu-west-1's is free. With one shared set of slots
//! (`limits.concurrency`), us-east-1's jobs, waiting for their Region's rate,
//! would fill every slot and hold eu-west-1 to us-east-1's pace
//! (head-of-line blocking). Each Region holds only about two seconds of its
//! own rate in jobs and defers the rest (`region_busy`), so eu-west-1 runs at
//! its own cap whatever the mix.
//!
//! A second test puts two pools in one Region (two endpoints) and one in
//! another: the two share their Region's budget, the third has its own.
//!
//! Only upper bounds and the order of events are asserted, never a rate
//! reached.

mod support;

use std::time::{Duration, Instant};

use reset_worker::app::{App, Clients};
use reset_worker::config::Settings;
use reset_worker::worker::RunOptions;
use serde_json::json;
use support::fake_aws::{FakeAws, FakeConfig};
use support::{max_in_one_second, metric_value, sdk_config};
use tokio_util::sync::CancellationToken;

const JOBS_PER_REGION: usize = 30;

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_region_does_not_hold_back_another() {
    // SQS and us-east-1's Cognito: one call in two seconds gets through.
    let east = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(5),
        throttle: Some((0.5, 1.0)),
        ..FakeConfig::default()
    });
    let west = FakeAws::start(FakeConfig {
        cognito_latency: Duration::from_millis(5),
        ..FakeConfig::default()
    });
    let settings: Settings = serde_json::from_value(json!({
        "sqs": {"queue_url": east.queue_url(), "wait_time_seconds": 1},
        "cognito": {
            "client_id": "client-east",
            "pools": {
                "b": {
                    "client_id": "client-west",
                    "region": "eu-west-1",
                    "endpoint_url": west.url(),
                },
            },
        },
        "limits": {
            "max_rps": 10,
            "burst": 2,
            "concurrency": 4,
            "regions": {"eu-west-1": {"max_rps": 5, "burst": 1}},
        },
        "retry": {"max_attempts": 20},
        "metrics": {"listen": "127.0.0.1:0"},
        "ledger": {"backend": "memory"},
    }))
    .expect("valid test settings");
    // Interleaved, as a campaign over two pools would be.
    east.enqueue((0..JOBS_PER_REGION).flat_map(|i| {
        [
            json!({"username": format!("east{i}@example.com"), "campaign_id": "regions-it"})
                .to_string(),
            json!({"username": format!("west{i}@example.com"), "campaign_id": "regions-it", "pool": "b"})
                .to_string(),
        ]
    }));

    let clients = Clients::from_sdk(&sdk_config(&east.url()), &settings);
    let app = App::build_with(settings, None, clients)
        .await
        .expect("build the worker app");
    let stop = CancellationToken::new();
    let run = tokio::spawn(app.run_until_stopped(
        stop.clone(),
        RunOptions {
            until_empty_polls: None,
        },
    ));

    let deadline = Instant::now() + Duration::from_secs(90);
    while west.accepted_usernames().len() < JOBS_PER_REGION {
        assert!(
            Instant::now() < deadline,
            "eu-west-1 stalled: {} of {JOBS_PER_REGION} calls",
            west.accepted_usernames().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let east_calls = east.accepted_usernames().len();
    let west_times = west.accepted_call_times();
    let span = west_times[west_times.len() - 1].duration_since(west_times[0]);
    eprintln!(
        "eu-west-1 done: {JOBS_PER_REGION} calls in {:.2} s; us-east-1 calls so far: {east_calls}",
        span.as_secs_f64()
    );
    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the worker stops within its grace period")
        .expect("the run task does not panic")
        .expect("the run ends without an error");
    eprintln!("{summary:?}");

    // eu-west-1 finished its 30 jobs (6 s at its own 5/s) while us-east-1
    // got a handful through: it did not go at us-east-1's pace (one call in
    // two seconds would have taken a minute for both Regions' 60 jobs).
    assert!(
        east_calls <= 12,
        "us-east-1 made {east_calls} calls before eu-west-1 finished 30"
    );
    // us-east-1's surplus jobs went back to the queue instead of waiting.
    assert!(summary.deferred > 0, "{summary:?}");
    // Each Region under its own cap: 5/s + burst 1 in eu-west-1 (the
    // us-east-1 fake itself lets no more than 1 in 2 s through).
    let worst = max_in_one_second(&west.accepted_call_times());
    assert!(worst <= 6, "{worst} calls to eu-west-1 in one second");
    // Nobody called twice, and no eu-west-1 job reached us-east-1.
    let mut west_users = west.accepted_usernames();
    west_users.sort();
    west_users.dedup();
    assert_eq!(west_users.len(), JOBS_PER_REGION);
    assert!(
        east.accepted_usernames()
            .iter()
            .all(|u| u.starts_with("east"))
    );

    // The gauge per Region: eu-west-1's own limit, untouched by us-east-1's
    // throttling, which cut us-east-1's below its 10/s.
    let text = reset_worker::telemetry::install_recorder()
        .expect("the app installed the recorder")
        .render();
    let gauge = |region: &str| {
        metric_value(
            &text,
            "reset_worker_rate_limit_per_second",
            &[("region", region)],
        )
    };
    assert_eq!(gauge("eu-west-1"), 5.0, "{text}");
    assert!(gauge("us-east-1") < 10.0, "{text}");
}

/// Pools `b` and `c` in ap-south-1 (two endpoints, one Region) share that
/// Region's budget; pool `d` in ca-central-1 has a budget of its own. The
/// fakes never throttle, so every bound below is the worker's own.
#[tokio::test(flavor = "multi_thread")]
async fn pools_in_one_region_share_its_budget_and_another_region_has_its_own() {
    let fake = |_| {
        FakeAws::start(FakeConfig {
            cognito_latency: Duration::from_millis(5),
            ..FakeConfig::default()
        })
    };
    let (sqs, b, c, d) = (fake(0), fake(1), fake(2), fake(3));
    let pool = |client: &str, region: &str, at: &FakeAws| json!({"client_id": client, "region": region, "endpoint_url": at.url()});
    let settings: Settings = serde_json::from_value(json!({
        "sqs": {"queue_url": sqs.queue_url(), "wait_time_seconds": 1},
        "cognito": {
            "client_id": "client-default",
            "pools": {
                "b": pool("client-b", "ap-south-1", &b),
                "c": pool("client-c", "ap-south-1", &c),
                "d": pool("client-d", "ca-central-1", &d),
            },
        },
        "limits": {"max_rps": 5, "burst": 1, "concurrency": 8},
        "metrics": {"listen": "127.0.0.1:0"},
        "ledger": {"backend": "memory"},
    }))
    .expect("valid test settings");
    let per_pool = 15;
    sqs.enqueue((0..per_pool).flat_map(|i| {
        ["b", "c", "d"].map(|p| {
            json!({"username": format!("{p}{i}@example.com"), "campaign_id": "regions-share", "pool": p})
                .to_string()
        })
    }));
    let clients = Clients::from_sdk(&sdk_config(&sqs.url()), &settings);
    let app = App::build_with(settings, None, clients)
        .await
        .expect("build the worker app");
    let summary = tokio::time::timeout(
        Duration::from_secs(90),
        app.run_until_stopped(
            CancellationToken::new(),
            RunOptions {
                until_empty_polls: Some(2),
            },
        ),
    )
    .await
    .expect("the queue drains within 90 s")
    .expect("the run ends without an error");
    assert_eq!(summary.sent, 3 * per_pool as u64, "{summary:?}");

    // ap-south-1: both pools' calls together within 5/s + burst 1; each
    // pool with a budget of its own could have made up to 12 in a second.
    let mut south = b.accepted_call_times();
    south.extend(c.accepted_call_times());
    south.sort();
    assert_eq!(south.len(), 2 * per_pool);
    let worst = max_in_one_second(&south);
    assert!(worst <= 6, "{worst} calls to ap-south-1 in one second");
    let worst = max_in_one_second(&d.accepted_call_times());
    assert!(worst <= 6, "{worst} calls to ca-central-1 in one second");
    assert!(
        sqs.accepted_call_times().is_empty(),
        "no job named `default`"
    );

    // One limiter per Region, each with the whole budget.
    let text = reset_worker::telemetry::install_recorder()
        .expect("the app installed the recorder")
        .render();
    for region in ["ap-south-1", "ca-central-1"] {
        let gauge = metric_value(
            &text,
            "reset_worker_rate_limit_per_second",
            &[("region", region)],
        );
        assert_eq!(gauge, 5.0, "{region}: {text}");
    }
}
