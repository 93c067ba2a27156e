//! `reset-worker status`: queue depths, the ETA at the configured rate, and
//! (with `--metrics-url`) the worker's own counters.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Context;
use prometheus_parse::{Scrape, Value};
use serde::Serialize;

use super::estimate;
use super::preflight::count;
use super::report::{CompletionCounts, Counts};
use crate::aws::sqs::{Queue, QueueError};
use crate::config::Settings;

/// The counters and gauges `status` shows, with the label it sums by
/// (`None`: the value itself).
const SHOWN: &[(&str, Option<&str>)] = &[
    ("reset_worker_jobs_total", Some("outcome")),
    ("reset_worker_cognito_requests_total", Some("result")),
    ("reset_worker_rate_limit_per_second", Some("region")),
    ("reset_worker_in_flight_jobs", None),
];

#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub url: String,
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub queue: QueueStatus,
    pub dead_letter_queue: Option<QueueStatus>,
    /// `limits.max_rps`: each Region's budget.
    pub max_rps: u32,
    /// `limits.regions`: the Regions with a budget of their own.
    pub regions: BTreeMap<String, u32>,
    pub eta_seconds: Option<u64>,
    pub eta: String,
    /// `reset_worker_*` counters from `--metrics-url`, summed by name and
    /// outcome/result label.
    pub worker: Option<BTreeMap<String, f64>>,
    /// With `--campaign`: the campaign's users per ledger state.
    pub ledger: Option<CampaignCounts>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CampaignCounts {
    pub campaign: String,
    pub users: u64,
    pub states: Counts,
    /// The `sent` users by completion, when `report --refresh-status` has
    /// checked any.
    pub completion: Option<CompletionCounts>,
}

async fn queue_status(queue: &Queue, url: &str) -> Result<QueueStatus, QueueError> {
    let attrs = queue.attributes(url).await?;
    Ok(QueueStatus {
        url: url.to_owned(),
        visible: count(&attrs, "ApproximateNumberOfMessages"),
        in_flight: count(&attrs, "ApproximateNumberOfMessagesNotVisible"),
        delayed: count(&attrs, "ApproximateNumberOfMessagesDelayed"),
    })
}

pub async fn status(
    settings: &Settings,
    queue: &Queue,
    worker: Option<BTreeMap<String, f64>>,
) -> Result<Status, QueueError> {
    let main = queue_status(queue, queue.url()).await?;
    let dlq = match queue.dead_letter_url() {
        Some(url) => Some(queue_status(queue, url).await?),
        None => None,
    };
    let backlog = main.visible + main.in_flight + main.delayed;
    let rps = settings.limits.max_rps;
    Ok(Status {
        eta_seconds: (rps > 0).then(|| backlog / u64::from(rps)),
        eta: estimate(backlog, rps),
        queue: main,
        dead_letter_queue: dlq,
        max_rps: rps,
        regions: settings
            .limits
            .regions
            .iter()
            .map(|(region, r)| (region.clone(), r.max_rps))
            .collect(),
        worker,
        ledger: None,
    })
}

/// Sums the worker's job and request counters from Prometheus text, by
/// outcome / result label; gauges as they are.
pub fn summarize_metrics(text: &str) -> std::io::Result<BTreeMap<String, f64>> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    let mut out = BTreeMap::new();
    for sample in scrape.samples {
        let Some((_, by)) = SHOWN.iter().find(|(name, _)| *name == sample.metric) else {
            continue;
        };
        let value = match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => continue,
        };
        match by {
            Some(label) => {
                let key = sample.labels.get(label).unwrap_or("all");
                *out.entry(format!("{}{{{label}=\"{key}\"}}", sample.metric))
                    .or_insert(0.0) += value;
            }
            None => {
                out.insert(sample.metric, value);
            }
        }
    }
    Ok(out)
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = &self.queue;
        writeln!(f, "queue            {}", q.url)?;
        writeln!(
            f,
            "  visible {}   in flight {}   delayed {}",
            q.visible, q.in_flight, q.delayed
        )?;
        if let Some(d) = &self.dead_letter_queue {
            writeln!(f, "dead-letter      {}", d.url)?;
            writeln!(
                f,
                "  visible {}   in flight {}   delayed {}",
                d.visible, d.in_flight, d.delayed
            )?;
        }
        for (region, rps) in &self.regions {
            writeln!(f, "rate in {region:<8} {rps} calls/s (limits.regions)")?;
        }
        writeln!(
            f,
            "rate             {} calls/s{} (limits.max_rps)",
            self.max_rps,
            if self.regions.is_empty() {
                ""
            } else {
                " in every other Region"
            }
        )?;
        writeln!(f, "ETA              {} (jobs left in the queue)", self.eta)?;
        if let Some(l) = &self.ledger {
            writeln!(
                f,
                "ledger           campaign {}: {} users",
                l.campaign, l.users
            )?;
            writeln!(f, "  {}", l.states.line())?;
            if let Some(c) = &l.completion {
                if c.signed_out > 0 {
                    writeln!(f, "  signed out: {} (sessions ended)", c.signed_out)?;
                }
                if c.checked > 0 {
                    writeln!(
                        f,
                        "  of the sent: {} (checked {}; `report --refresh-status` updates)",
                        c.line(),
                        c.checked
                    )?;
                }
            }
        }
        if let Some(worker) = &self.worker {
            writeln!(f, "worker")?;
            for (k, v) in worker {
                writeln!(f, "  {k} {v}")?;
            }
        }
        Ok(())
    }
}

/// `GET` the worker's metrics (in-cluster or port-forwarded metrics are
/// plain HTTP).
async fn fetch_metrics(url: &str) -> anyhow::Result<String> {
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?
        .get(url)
        .send()
        .await?
        .error_for_status()?;
    Ok(response.text().await?)
}

/// Runs `reset-worker status`.
pub async fn run(
    settings: &Settings,
    metrics_url: Option<String>,
    campaign: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let worker = match &metrics_url {
        Some(url) => {
            let text = fetch_metrics(url)
                .await
                .with_context(|| format!("Failed to read {url}"))?;
            Some(summarize_metrics(&text).with_context(|| format!("Failed to parse {url}"))?)
        }
        None => None,
    };
    let queue = super::queue(settings).await;
    let mut status = status(settings, &queue, worker).await?;
    if let Some(campaign) = campaign {
        let (states, completion) = super::report::status_counts(settings, &campaign).await?;
        status.ledger = Some(CampaignCounts {
            campaign,
            users: states.total(),
            states,
            completion: (completion.checked > 0 || completion.signed_out > 0).then_some(completion),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_counters_by_outcome() {
        let text = "# HELP x\nreset_worker_jobs_total{outcome=\"sent\"} 3\nreset_worker_jobs_total{outcome=\"skipped\"} 1\nreset_worker_cognito_requests_total{result=\"ok\",code=\"none\"} 4\nreset_worker_cognito_requests_total{result=\"ok\",code=\"x\"} 1\nreset_worker_rate_limit_per_second{region=\"eu-west-1\"} 10\nreset_worker_rate_limit_per_second{region=\"us-east-1\"} 4.5\nother_total 5\n";
        let m = summarize_metrics(text).unwrap();
        assert_eq!(m["reset_worker_jobs_total{outcome=\"sent\"}"], 3.0);
        assert_eq!(m["reset_worker_cognito_requests_total{result=\"ok\"}"], 5.0);
        // One rate per Region.
        assert_eq!(
            m["reset_worker_rate_limit_per_second{region=\"eu-west-1\"}"],
            10.0
        );
        assert_eq!(
            m["reset_worker_rate_limit_per_second{region=\"us-east-1\"}"],
            4.5
        );
        assert_eq!(m.len(), 5, "{m:?}");
    }
}
