//! Campaign files for `enqueue`: CSV, JSONL or one username per line,
//! validated row by row exactly as the worker validates a message (the same
//! [`ResetJob::parse`]) and de-duplicated by username.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use super::enqueue::EnqueueError;
use crate::job::ResetJob;

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

impl Format {
    /// The name `--format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Lines => "lines",
        }
    }
}

/// One valid row, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// 1-based line of the input it came from.
    pub line: usize,
    pub username: String,
    /// The message body, in the job format.
    pub body: String,
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
    /// The valid jobs, in input order.
    pub jobs: Vec<Job>,
    pub rejects: Vec<Reject>,
    pub duplicates: usize,
    /// The format read: the given one, or the guess for `auto`.
    pub format: Option<Format>,
}

/// Reads and validates every row.
pub fn load(
    input: &mut dyn BufRead,
    name: &str,
    format: Format,
    campaign: &str,
) -> Result<Loaded, EnqueueError> {
    load_for_pool(input, name, format, campaign, None)
}

/// Reads and validates every row; with `pool` (`enqueue --pool`), stamps
/// it on every row, and a row that names another pool is invalid.
pub fn load_for_pool(
    input: &mut dyn BufRead,
    name: &str,
    format: Format,
    campaign: &str,
    pool: Option<&str>,
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
    let mut loaded = Loaded {
        format: Some(format),
        ..Loaded::default()
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
        if let Some(pool) = pool {
            match object.get("pool") {
                None => {
                    object.insert("pool".into(), pool.into());
                }
                Some(serde_json::Value::String(p)) if p == pool => {}
                Some(_) => {
                    loaded.rejects.push(Reject {
                        line,
                        reason: "`pool` differs from --pool".into(),
                    });
                    continue;
                }
            }
        }
        let body = serde_json::Value::Object(object).to_string();
        match ResetJob::parse(&body) {
            Ok(job) => {
                let username = job.username.expose().to_owned();
                if seen.insert(username.clone()) {
                    loaded.jobs.push(Job {
                        line,
                        username,
                        body,
                    });
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
    // A first line that is a header naming the `username` column means CSV,
    // also with that one column only: as a plain list, the header would be
    // sent a reset as the user `username`.
    if first.trim_start().starts_with('{') {
        Format::Jsonl
    } else if first
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

/// Writes `line,reason` rows for the invalid input rows.
pub fn write_rejects(path: &Path, rejects: &[Reject]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "line,reason")?;
    for r in rejects {
        writeln!(out, "{},\"{}\"", r.line, r.reason.replace('"', "'"))?;
    }
    out.flush()
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
        let alice: serde_json::Value = serde_json::from_str(&loaded.jobs[0].body).unwrap();
        assert_eq!(alice["client_metadata"]["reason"], "breach");
        assert_eq!(alice["client_metadata"]["ticket"], "T-1");
        assert_eq!(alice["campaign_id"], "c1");
        let bob: serde_json::Value = serde_json::from_str(&loaded.jobs[1].body).unwrap();
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
        assert_eq!(loaded.jobs[1].username, "b@example.com");
        assert_eq!(loaded.format, Some(Format::Lines));
    }

    #[test]
    fn pool_is_stamped_on_every_row_and_a_different_one_is_invalid() {
        let text = "{\"username\":\"a@x.com\"}\n{\"username\":\"b@x.com\",\"pool\":\"b\"}\n{\"username\":\"c@x.com\",\"pool\":\"other\"}\n";
        let loaded =
            load_for_pool(&mut text.as_bytes(), "-", Format::Auto, "c1", Some("b")).unwrap();
        let pools: Vec<String> = loaded
            .jobs
            .iter()
            .map(|j| {
                let body: serde_json::Value = serde_json::from_str(&j.body).unwrap();
                body["pool"].as_str().unwrap_or("-").to_owned()
            })
            .collect();
        assert_eq!(pools, vec!["b", "b"]);
        assert_eq!(loaded.rejects.len(), 1);
        assert_eq!(loaded.rejects[0].line, 3);
        assert!(loaded.rejects[0].reason.contains("--pool"));
        // Without --pool, rows keep their own (or none).
        let loaded = load_str("-", text);
        assert_eq!(loaded.jobs.len(), 3);
        assert!(!loaded.jobs[0].body.contains("pool"));
    }

    #[test]
    fn a_one_column_csv_on_stdin_is_not_a_list_with_a_user_called_username() {
        // Hardening #15: `printf 'username\na@x.com\n' | reset-worker enqueue -`
        // sent a reset to the user `username`.
        let loaded = load_str("-", "username\na@x.com\n");
        assert_eq!(loaded.format, Some(Format::Csv));
        let users: Vec<&str> = loaded.jobs.iter().map(|j| j.username.as_str()).collect();
        assert_eq!(users, vec!["a@x.com"]);
        let loaded = load_str("-", "\"Username\"\nb@x.com\n");
        assert_eq!(loaded.jobs.len(), 1);
    }
}
