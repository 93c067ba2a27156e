//! `reset-worker ledger init` and `reset-worker report`: set the ledger up,
//! and write the campaign's audit artefact, one row per user.
//!
//! The report streams: entries come from the ledger a page at a time
//! through a bounded channel and go straight to the writer, so a campaign of
//! a million users needs no more memory than one of a hundred.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::config::Settings;
use crate::ledger::{Entry, Ledger, State, dynamodb, rfc3339};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The campaign to report (a job without `campaign_id` is in `default`).
    #[arg(long)]
    pub campaign: String,
    /// Row format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Write here instead of stdout (the summary always goes to stderr).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// One report row. Columns in this order: `username,state,reason,attempts,updated_at`.
#[derive(Debug, Serialize)]
struct Row<'a> {
    username: &'a str,
    state: &'static str,
    reason: &'a str,
    attempts: u32,
    /// RFC 3339, UTC.
    updated_at: String,
}

impl<'a> From<&'a Entry> for Row<'a> {
    fn from(e: &'a Entry) -> Self {
        Row {
            username: &e.username,
            state: e.state.as_str(),
            reason: &e.reason,
            attempts: e.attempts,
            updated_at: rfc3339(e.updated_at_ms),
        }
    }
}

/// Users per state, in the states' order.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts(pub BTreeMap<&'static str, u64>);

impl Counts {
    fn add(&mut self, state: State) {
        *self.0.entry(state.as_str()).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, state: State) -> u64 {
        self.0.get(state.as_str()).copied().unwrap_or(0)
    }

    /// `sent 290, skipped 3, …` in the states' order; states with no user left out.
    pub fn line(&self) -> String {
        let parts: Vec<String> = State::ALL
            .iter()
            .filter_map(|s| {
                self.0
                    .get(s.as_str())
                    .map(|n| format!("{} {n}", s.as_str()))
            })
            .collect();
        if parts.is_empty() {
            "no users".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The ledger of `settings`, with the default AWS config for DynamoDB.
pub async fn open(settings: &Settings) -> anyhow::Result<Ledger> {
    let sdk = crate::aws::load_sdk_config().await;
    Ledger::open(&settings.ledger, || dynamodb::build_client(&sdk))
        .context("Failed to open the ledger")
}

/// Refuses what the memory ledger cannot do outside the worker.
fn needs_durable(ledger: &Ledger, what: &str) -> anyhow::Result<()> {
    if !ledger.outlives_process() {
        bail!(
            "`ledger.backend = \"memory\"` keeps nothing outside the worker process, so {what} \
             has nothing to read; use `sqlite` or `dynamodb`"
        );
    }
    Ok(())
}

/// Runs `reset-worker ledger init`.
pub async fn init(settings: &Settings) -> anyhow::Result<()> {
    let ledger = open(settings).await?;
    for line in ledger.init().await? {
        println!("{line}");
    }
    Ok(())
}

/// Counts the campaign's users per state (reads every entry).
pub async fn counts(ledger: &Ledger, campaign: &str) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut entries = ledger.entries(campaign);
    while let Some(entry) = entries.recv().await {
        counts.add(entry?.state);
    }
    Ok(counts)
}

/// Writes every entry of `campaign` to `out`; returns the counts.
pub async fn write_report(
    ledger: &Ledger,
    campaign: &str,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut entries = ledger.entries(campaign);
    match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            let mut header_written = false;
            while let Some(entry) = entries.recv().await {
                let entry = entry?;
                counts.add(entry.state);
                w.serialize(Row::from(&entry))?;
                header_written = true;
            }
            if !header_written {
                w.write_record(["username", "state", "reason", "attempts", "updated_at"])?;
            }
            w.flush()?;
        }
        Format::Jsonl => {
            while let Some(entry) = entries.recv().await {
                let entry = entry?;
                counts.add(entry.state);
                serde_json::to_writer(&mut *out, &Row::from(&entry))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
    }
    Ok(counts)
}

/// Runs `reset-worker report`.
pub async fn run(settings: &Settings, args: ReportArgs) -> anyhow::Result<()> {
    let ledger = open(settings).await?;
    needs_durable(&ledger, "`report`")?;
    let counts = match &args.output {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("Failed to create {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            write_report(&ledger, &args.campaign, args.format, &mut out).await?
        }
        None => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            write_report(&ledger, &args.campaign, args.format, &mut out).await?
        }
    };
    eprintln!(
        "campaign {}: {} users: {}",
        args.campaign,
        counts.total(),
        counts.line()
    );
    Ok(())
}

/// The campaign's counts for `status --campaign`, or why there are none.
pub async fn status_counts(settings: &Settings, campaign: &str) -> anyhow::Result<Counts> {
    let ledger = open(settings).await?;
    needs_durable(&ledger, "`status --campaign`")?;
    counts(&ledger, campaign).await
}
