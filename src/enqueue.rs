//! `reset-worker enqueue`: loads a campaign file into the queue.
//!
//! Every row is validated exactly as the worker validates a message (the
//! same [`ResetJob::parse`]), usernames are de-duplicated within the file,
//! and a checkpoint records which batches were sent, so a re-run with
//! `--resume` after an interruption never enqueues a row twice.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::job::ResetJob;
use crate::queue::{FifoIds, MAX_BATCH, Outgoing, Queue, QueueError};

/// SendMessageBatch calls in flight at once.
const IN_FLIGHT_BATCHES: usize = 4;
/// Attempts per batch for entries SQS refused or a failed call.
const BATCH_ATTEMPTS: u32 = 5;
/// FIFO queues: jobs are spread over this many message groups, so the
/// worker can process that many in parallel while each group stays ordered.
const FIFO_GROUPS: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Guess from the extension, then from the first line.
    Auto,
    /// A header row with a `username` column; other columns become
    /// `client_metadata`.
    Csv,
    /// One job object per line, in the message format.
    Jsonl,
    /// One username per line.
    Lines,
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the CSV input has no `username` column")]
    NoUsernameColumn,
    #[error("invalid CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error(
        "checkpoint {0} exists from an earlier run: pass --resume to continue it, or delete it to start over"
    )]
    CheckpointExists(PathBuf),
    #[error("checkpoint {path} is for campaign `{found}`, not `{expected}`")]
    CheckpointCampaign {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot use checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error(
        "{failed} batches could not be sent after {BATCH_ATTEMPTS} attempts; re-run with --resume"
    )]
    Incomplete { failed: usize },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A row that failed validation: 1-based line number (data rows of a CSV
/// count from line 2) and the reason, which never quotes the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub line: usize,
    pub reason: String,
}

/// The validated, de-duplicated campaign, ready to send.
#[derive(Debug, Default)]
pub struct Loaded {
    /// (username, message body) in input order.
    pub jobs: Vec<(String, String)>,
    pub rejects: Vec<Reject>,
    pub duplicates: usize,
}

/// Reads and validates every row.
pub fn load(
    input: &mut dyn BufRead,
    name: &str,
    format: Format,
    campaign: &str,
) -> Result<Loaded, EnqueueError> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .map_err(|source| EnqueueError::Read {
            path: name.to_owned(),
            source,
        })?;
    let format = match format {
        Format::Auto => detect(name, &text),
        f => f,
    };
    let rows: Vec<Row> = match format {
        Format::Csv => csv_rows(&text)?,
        Format::Jsonl => jsonl_rows(&text),
        Format::Lines | Format::Auto => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let mut m = serde_json::Map::new();
                m.insert("username".into(), l.trim().into());
                (i + 1, Ok(m))
            })
            .collect(),
    };

    let mut loaded = Loaded::default();
    let mut seen = HashSet::new();
    for (line, row) in rows {
        let mut object = match row {
            Ok(o) => o,
            Err(reason) => {
                loaded.rejects.push(Reject { line, reason });
                continue;
            }
        };
        match object.get("campaign_id") {
            None => {
                object.insert("campaign_id".into(), campaign.into());
            }
            Some(serde_json::Value::String(c)) if c == campaign => {}
            Some(_) => {
                loaded.rejects.push(Reject {
                    line,
                    reason: "`campaign_id` differs from --campaign".into(),
                });
                continue;
            }
        }
        let body = serde_json::Value::Object(object).to_string();
        match ResetJob::parse(&body) {
            Ok(job) => {
                let username = job.username.expose().to_owned();
                if seen.insert(username.clone()) {
                    loaded.jobs.push((username, body));
                } else {
                    loaded.duplicates += 1;
                }
            }
            Err(err) => loaded.rejects.push(Reject {
                line,
                reason: err.to_string(),
            }),
        }
    }
    Ok(loaded)
}

fn detect(name: &str, text: &str) -> Format {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".csv") {
        return Format::Csv;
    }
    if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
        return Format::Jsonl;
    }
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if first.trim_start().starts_with('{') {
        Format::Jsonl
    } else if first.contains(',')
        && first
            .split(',')
            .any(|h| h.trim().trim_matches('"').eq_ignore_ascii_case("username"))
    {
        Format::Csv
    } else {
        Format::Lines
    }
}

type Row = (
    usize,
    Result<serde_json::Map<String, serde_json::Value>, String>,
);

fn csv_rows(text: &str) -> Result<Vec<Row>, EnqueueError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers()?.clone();
    let username_col = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case("username"))
        .ok_or(EnqueueError::NoUsernameColumn)?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(err) => {
                let line = err.position().map_or(0, |p| p.line() as usize);
                rows.push((line, Err("malformed CSV row".to_owned())));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line() as usize);
        let mut object = serde_json::Map::new();
        let mut metadata = serde_json::Map::new();
        for (i, (header, value)) in headers.iter().zip(record.iter()).enumerate() {
            if i == username_col {
                object.insert("username".into(), value.into());
            } else if !value.is_empty() && !header.is_empty() {
                metadata.insert(header.to_owned(), value.into());
            }
        }
        if !metadata.is_empty() {
            object.insert("client_metadata".into(), metadata.into());
        }
        rows.push((line, Ok(object)));
    }
    Ok(rows)
}

fn jsonl_rows(text: &str) -> Vec<Row> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let row = match serde_json::from_str::<serde_json::Value>(l) {
                Ok(serde_json::Value::Object(o)) => Ok(o),
                Ok(_) => Err("not a JSON object".to_owned()),
                Err(e) => Err(format!("not valid JSON (column {})", e.column())),
            };
            (i + 1, row)
        })
        .collect()
}

/// Which batches of a campaign file were sent. Batches are consecutive runs
/// of [`MAX_BATCH`] jobs over the validated, de-duplicated input, so the same
/// input always yields the same batches.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub campaign: String,
    pub total_jobs: usize,
    pub completed: BTreeSet<usize>,
}

impl Checkpoint {
    fn load(path: &Path) -> Result<Option<Self>, EnqueueError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| EnqueueError::Checkpoint {
                        path: path.to_owned(),
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EnqueueError::Checkpoint {
                path: path.to_owned(),
                detail: e.to_string(),
            }),
        }
    }

    /// Write-then-rename, so a crash mid-write leaves the old checkpoint.
    fn save(&self, path: &Path) -> Result<(), EnqueueError> {
        let tmp = path.with_extension("tmp");
        let err = |e: std::io::Error| EnqueueError::Checkpoint {
            path: path.to_owned(),
            detail: e.to_string(),
        };
        let bytes = serde_json::to_vec(self).map_err(|e| EnqueueError::Checkpoint {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// `MessageDeduplicationId` for FIFO queues: SQS drops a second message with
/// the same ID within five minutes, whoever sends it.
pub fn fifo_ids(campaign: &str, username: &str) -> FifoIds {
    let digest = Sha256::new()
        .chain_update(campaign.as_bytes())
        .chain_update([0u8])
        .chain_update(username.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let group = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8])) % FIFO_GROUPS;
    FifoIds {
        group_id: format!("reset-{group:02}"),
        deduplication_id: hex,
    }
}

/// What a run sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub enqueued: usize,
    pub already_enqueued: usize,
}

/// Progress reporting: a bar on a terminal, plain lines otherwise.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: usize,
        last: Instant,
        started: Instant,
    },
}

impl Progress {
    fn new(total: usize) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} jobs  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total,
                last: Instant::now(),
                started: Instant::now(),
            }
        }
    }

    fn set(&mut self, done: usize) {
        match self {
            Progress::Bar(bar) => bar.set_position(done as u64),
            Progress::Lines {
                total,
                last,
                started,
            } => {
                if last.elapsed() >= Duration::from_secs(2) || done == *total {
                    *last = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                    eprintln!("enqueued {done}/{total} ({rate:.0}/s)");
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Sends the jobs, skipping batches the checkpoint records as sent.
pub async fn send(
    queue: Arc<Queue>,
    campaign: &str,
    jobs: &[(String, String)],
    checkpoint_path: Option<&Path>,
    resume: bool,
) -> Result<Sent, EnqueueError> {
    let mut checkpoint = match checkpoint_path {
        Some(path) => match Checkpoint::load(path)? {
            Some(_) if !resume => return Err(EnqueueError::CheckpointExists(path.to_owned())),
            Some(cp) if cp.campaign != campaign => {
                return Err(EnqueueError::CheckpointCampaign {
                    path: path.to_owned(),
                    found: cp.campaign,
                    expected: campaign.to_owned(),
                });
            }
            Some(cp) if cp.total_jobs != jobs.len() => {
                return Err(EnqueueError::Checkpoint {
                    path: path.to_owned(),
                    detail: format!(
                        "it was written for {} jobs but the input now has {}; the input must not change between runs",
                        cp.total_jobs,
                        jobs.len()
                    ),
                });
            }
            Some(cp) => cp,
            None => Checkpoint {
                campaign: campaign.to_owned(),
                total_jobs: jobs.len(),
                completed: BTreeSet::new(),
            },
        },
        None => Checkpoint::default(),
    };
    let fifo = queue.url().ends_with(".fifo");
    let batches: Vec<&[(String, String)]> = jobs.chunks(MAX_BATCH).collect();
    let already: usize = checkpoint
        .completed
        .iter()
        .filter_map(|&i| batches.get(i).map(|b| b.len()))
        .sum();
    let mut progress = Progress::new(jobs.len());
    let mut done = already;
    progress.set(done);

    let todo: Vec<usize> = (0..batches.len())
        .filter(|i| !checkpoint.completed.contains(i))
        .collect();
    let mut pending = todo
        .into_iter()
        .filter_map(|i| batches.get(i).map(|b| (i, *b)));
    let mut in_flight = JoinSet::new();
    let mut failed = 0usize;
    loop {
        while in_flight.len() < IN_FLIGHT_BATCHES {
            let Some((index, batch)) = pending.next() else {
                break;
            };
            let entries: Vec<Outgoing> = batch
                .iter()
                .enumerate()
                .map(|(i, (username, body))| Outgoing {
                    id: i.to_string(),
                    body: body.clone(),
                    fifo: fifo.then(|| fifo_ids(campaign, username)),
                })
                .collect();
            let queue = queue.clone();
            in_flight.spawn(async move { (index, send_with_retries(&queue, entries).await) });
        }
        let Some(joined) = in_flight.join_next().await else {
            break;
        };
        match joined {
            Ok((index, Ok(()))) => {
                checkpoint.completed.insert(index);
                done += batches.get(index).map_or(0, |b| b.len());
                progress.set(done);
                if let Some(path) = checkpoint_path {
                    checkpoint.save(path)?;
                }
            }
            Ok((index, Err(err))) => {
                failed += 1;
                tracing::error!(batch = index, error = %err, "batch not sent");
            }
            Err(join_error) => {
                failed += 1;
                tracing::error!(error = %join_error, "batch task failed");
            }
        }
    }
    progress.finish();
    if failed > 0 {
        return Err(EnqueueError::Incomplete { failed });
    }
    Ok(Sent {
        enqueued: done - already,
        already_enqueued: already,
    })
}

async fn send_with_retries(queue: &Queue, mut entries: Vec<Outgoing>) -> Result<(), QueueError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = queue.send_batch(&entries).await;
        match result {
            Ok(failed) if failed.is_empty() => return Ok(()),
            Ok(failed) => {
                let failed_ids: HashSet<String> = failed.into_iter().map(|(id, _)| id).collect();
                entries.retain(|m| failed_ids.contains(&m.id));
                if attempt >= BATCH_ATTEMPTS {
                    return Err(QueueError {
                        operation: "SendMessageBatch",
                        queue: queue.url().to_owned(),
                        detail: format!("{} entries still refused", entries.len()),
                    });
                }
            }
            Err(err) if attempt >= BATCH_ATTEMPTS => return Err(err),
            Err(_) => {}
        }
        let ceiling = Duration::from_millis(200 * 2u64.pow(attempt.min(6)));
        tokio::time::sleep(crate::policy::full_jitter(ceiling)).await;
    }
}

/// Writes `line,reason` rows for the invalid input rows.
pub fn write_rejects(path: &Path, rejects: &[Reject]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "line,reason")?;
    for r in rejects {
        writeln!(out, "{},\"{}\"", r.line, r.reason.replace('"', "'"))?;
    }
    out.flush()
}

/// Human-readable duration for estimates.
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(name: &str, text: &str) -> Loaded {
        load(&mut text.as_bytes(), name, Format::Auto, "c1").unwrap()
    }

    #[test]
    fn csv_with_metadata_columns_invalid_rows_and_duplicates() {
        let loaded = load_str(
            "users.csv",
            "username,reason,ticket\nalice@example.com,breach,T-1\n,breach,\nbob@example.com,,\nalice@example.com,x,y\n",
        );
        assert_eq!(loaded.jobs.len(), 2);
        assert_eq!(loaded.duplicates, 1);
        assert_eq!(loaded.rejects.len(), 1);
        assert_eq!(loaded.rejects[0].line, 3);
        let alice: serde_json::Value = serde_json::from_str(&loaded.jobs[0].1).unwrap();
        assert_eq!(alice["client_metadata"]["reason"], "breach");
        assert_eq!(alice["client_metadata"]["ticket"], "T-1");
        assert_eq!(alice["campaign_id"], "c1");
        let bob: serde_json::Value = serde_json::from_str(&loaded.jobs[1].1).unwrap();
        assert!(bob.get("client_metadata").is_none());
    }

    #[test]
    fn jsonl_and_lines_are_detected_and_validated_like_the_worker() {
        let loaded = load_str(
            "-",
            "{\"username\":\"a@example.com\"}\n\n{\"user_name\":\"b\"}\nnot json\n{\"username\":\"c\",\"campaign_id\":\"other\"}\n",
        );
        assert_eq!(loaded.jobs.len(), 1);
        let lines: Vec<usize> = loaded.rejects.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3, 4, 5]);
        assert!(loaded.rejects.iter().all(|r| !r.reason.contains("b@")));

        let loaded = load_str(
            "list.txt",
            "a@example.com\n  b@example.com  \na@example.com\n",
        );
        assert_eq!(loaded.jobs.len(), 2);
        assert_eq!(loaded.duplicates, 1);
        assert_eq!(loaded.jobs[1].0, "b@example.com");
    }

    #[test]
    fn fifo_ids_are_stable_and_spread() {
        let a = fifo_ids("c", "alice");
        assert_eq!(a, fifo_ids("c", "alice"));
        assert_eq!(a.deduplication_id.len(), 64);
        assert_ne!(fifo_ids("c2", "alice").deduplication_id, a.deduplication_id);
        let groups: HashSet<String> = (0..500)
            .map(|i| fifo_ids("c", &format!("u{i}")).group_id)
            .collect();
        assert!(groups.len() > 32, "{}", groups.len());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(42.0), "42 s");
        assert_eq!(human_duration(125.0), "2 min 5 s");
        assert_eq!(human_duration(33_480.0), "9 h 18 min");
    }
}
