//! The embedded ledger: one SQLite file, WAL mode, `synchronous = FULL`
//! (a claim or a `sent` is on disk before the worker acts on it, so even a
//! power cut does not lose one). Several processes on one host may share the
//! file: a claim is one `BEGIN IMMEDIATE` transaction, so two never both
//! win.
//!
//! SQLite is blocking: every request runs on tokio's blocking pool with the
//! one connection behind a mutex (held for one statement or transaction).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::{
    Backend, Checked, Claim, Entry, Final, Key, LedgerError, MEMBERS, Member, Owner, State, Stored,
    decide_claim,
};

/// Rows read per report page: the report holds at most this many (plus the
/// channel's buffer) at a time.
const PAGE: usize = 1000;

/// How long a writer waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger (
    campaign    TEXT    NOT NULL,
    username    TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    reason      TEXT    NOT NULL DEFAULT '',
    attempts    INTEGER NOT NULL DEFAULT 0,
    owner       TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    user_status TEXT,
    user_modified_at INTEGER,
    checked_at  INTEGER,
    completed_at INTEGER,
    reset_at    INTEGER,
    signed_out_at INTEGER,
    PRIMARY KEY (campaign, username)
) WITHOUT ROWID;
";

/// Columns added after the first schema (`report --refresh-status`, then
/// `cognito.sign_out`), with their types: a file written by an older
/// version lacks them, and [`migrate`] adds them. All nullable, so old rows
/// read as never checked and never signed out.
const ADDED_COLUMNS: [(&str, &str); 6] = [
    ("user_status", "TEXT"),
    ("user_modified_at", "INTEGER"),
    ("checked_at", "INTEGER"),
    ("completed_at", "INTEGER"),
    ("reset_at", "INTEGER"),
    ("signed_out_at", "INTEGER"),
];

/// Adds the [`ADDED_COLUMNS`] a file from an older version lacks. Another
/// process opening the same file may add one first: a failed `ALTER` is
/// fine if the column is there now.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare("SELECT 1 FROM pragma_table_info('ledger') WHERE name = ?1")?;
        stmt.exists(params![column])
    };
    for (column, kind) in ADDED_COLUMNS {
        if has(column)? {
            continue;
        }
        if let Err(err) =
            conn.execute_batch(&format!("ALTER TABLE ledger ADD COLUMN {column} {kind}"))
            && !has(column)?
        {
            return Err(err);
        }
    }
    Ok(())
}

pub struct Sqlite {
    /// The one connection; a std mutex, held for one statement or
    /// transaction on a blocking thread, never across an await.
    conn: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Opens (creating) the file and its schema, and drops entries past
    /// their retention.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open(path).map_err(|e| fatal_at(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| fatal_at(path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| fatal_at(path, e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| fatal_at(path, e))?;
        conn.execute_batch(SCHEMA).map_err(|e| fatal_at(path, e))?;
        migrate(&conn).map_err(|e| fatal_at(path, e))?;
        conn.execute(
            "DELETE FROM ledger WHERE expires_at < ?1",
            params![(super::now_ms() / 1000) as i64],
        )
        .map_err(|e| fatal_at(path, e))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| LedgerError::Unavailable(format!("ledger thread failed: {e}")))?
        .map_err(classify)
    }
}

fn fatal_at(path: &Path, err: rusqlite::Error) -> LedgerError {
    LedgerError::Fatal {
        code: "sqlite_open".into(),
        message: format!("cannot use `ledger.path` {}: {err}", path.display()),
    }
}

/// A busy or locked file is a wait; anything else (full disk, read-only
/// file, corruption) needs the operator.
fn classify(err: rusqlite::Error) -> LedgerError {
    use rusqlite::ErrorCode as C;
    match err.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked) => LedgerError::Unavailable(err.to_string()),
        _ => LedgerError::Fatal {
            code: "sqlite".into(),
            message: err.to_string(),
        },
    }
}

#[async_trait]
impl Backend for Sqlite {
    async fn claim(
        &self,
        key: Key<'_>,
        owner: &Owner,
        now_ms: u64,
        lease_until_ms: u64,
        expires_at_s: u64,
    ) -> Result<Claim, LedgerError> {
        let (campaign, username) = (key.campaign.to_owned(), key.username.to_owned());
        let owner = owner.clone();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row = tx
                .query_row(
                    "SELECT state, owner, lease_until, attempts, expires_at, reset_at FROM ledger
                     WHERE campaign = ?1 AND username = ?2",
                    params![campaign, username],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, i64>(2)? as u64,
                            r.get::<_, u32>(3)?,
                            r.get::<_, i64>(4)? as u64,
                            r.get::<_, Option<i64>>(5)?.map(|t| t as u64),
                        ))
                    },
                )
                .optional()?;
            let stored =
                row.as_ref()
                    .and_then(|(state, row_owner, lease, attempts, expires, reset_at)| {
                        Some(Stored {
                            state: State::parse(state)?,
                            owner: row_owner.as_deref(),
                            lease_until_ms: *lease,
                            attempts: *attempts,
                            expires_at_s: *expires,
                            reset_at_ms: *reset_at,
                        })
                    });
            let claim = decide_claim(stored, &owner, now_ms);
            let granted = match &claim {
                Claim::Granted {
                    prior_attempts,
                    reset_at_ms,
                    ..
                } => Some((*prior_attempts, *reset_at_ms)),
                Claim::TakenOver { prior_attempts, .. } => Some((*prior_attempts, None)),
                Claim::AlreadySent | Claim::Held { .. } => None,
            };
            if let Some((prior_attempts, reset_at_ms)) = granted {
                // `reset_at` as decided: kept while its sign-out is to do,
                // cleared with an entry past its retention.
                tx.execute(
                    "INSERT INTO ledger (campaign, username, state, reason, attempts, owner,
                                         lease_until, updated_at, expires_at, reset_at)
                     VALUES (?1, ?2, 'in_progress', '', ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (campaign, username) DO UPDATE SET
                       state = 'in_progress', reason = '', attempts = ?3, owner = ?4,
                       lease_until = ?5, updated_at = ?6, expires_at = ?7, reset_at = ?8,
                       signed_out_at = NULL",
                    params![
                        campaign,
                        username,
                        prior_attempts,
                        owner.as_str(),
                        lease_until_ms as i64,
                        now_ms as i64,
                        expires_at_s as i64,
                        reset_at_ms.map(|t| t as i64)
                    ],
                )?;
            }
            tx.commit()?;
            Ok(claim)
        })
        .await
    }

    async fn renew(
        &self,
        key: Key<'_>,
        owner: &Owner,
        lease_until_ms: u64,
    ) -> Result<bool, LedgerError> {
        let (campaign, username) = (key.campaign.to_owned(), key.username.to_owned());
        let owner = owner.clone();
        self.with(move |conn| {
            let changed = conn.execute(
                "UPDATE ledger SET lease_until = ?4
                 WHERE campaign = ?1 AND username = ?2 AND owner = ?3 AND state = 'in_progress'",
                params![campaign, username, owner.as_str(), lease_until_ms as i64],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn finish(
        &self,
        key: Key<'_>,
        owner: &Owner,
        done: Final<'_>,
        now_ms: u64,
        expires_at_s: u64,
    ) -> Result<bool, LedgerError> {
        let (campaign, username) = (key.campaign.to_owned(), key.username.to_owned());
        let owner = owner.clone();
        let (state, reason, attempts) = (done.state, done.reason.to_owned(), done.attempts);
        let signed_out_at = done.signed_out.then_some(now_ms as i64);
        let reset = done.reset;
        self.with(move |conn| {
            let changed = conn.execute(
                "INSERT INTO ledger (campaign, username, state, reason, attempts, owner,
                                     lease_until, updated_at, expires_at, signed_out_at,
                                     reset_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, CASE WHEN ?10 THEN ?7 END)
                 ON CONFLICT (campaign, username) DO UPDATE SET
                   state = ?3, reason = ?4, attempts = ?5, lease_until = 0,
                   updated_at = ?7, expires_at = ?8, signed_out_at = ?9,
                   reset_at = CASE WHEN ?10 THEN coalesce(reset_at, ?7) ELSE reset_at END,
                   user_status = NULL, user_modified_at = NULL, checked_at = NULL,
                   completed_at = NULL
                 WHERE ?3 = 'sent' OR ledger.owner = ?6",
                params![
                    campaign,
                    username,
                    state.as_str(),
                    reason,
                    attempts,
                    owner.as_str(),
                    now_ms as i64,
                    expires_at_s as i64,
                    signed_out_at,
                    reset
                ],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn record_reset(&self, key: Key<'_>, now_ms: u64) -> Result<bool, LedgerError> {
        let (campaign, username) = (key.campaign.to_owned(), key.username.to_owned());
        self.with(move |conn| {
            let changed = conn.execute(
                "UPDATE ledger SET reset_at = ?3 WHERE campaign = ?1 AND username = ?2",
                params![campaign, username, now_ms as i64],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn record_status(&self, key: Key<'_>, checked: Checked<'_>) -> Result<bool, LedgerError> {
        let (campaign, username) = (key.campaign.to_owned(), key.username.to_owned());
        let status = checked.user_status.to_owned();
        let modified = checked.modified_at_ms.map(|m| m as i64);
        let at = checked.checked_at_ms as i64;
        let completed = checked.completed;
        self.with(move |conn| {
            let changed = conn.execute(
                "UPDATE ledger SET user_status = ?3, user_modified_at = ?4, checked_at = ?5,
                   completed_at = CASE WHEN ?6 THEN coalesce(completed_at, ?5) ELSE completed_at END
                 WHERE campaign = ?1 AND username = ?2 AND state = 'sent'",
                params![campaign, username, status, modified, at, completed],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn sent_among(
        &self,
        campaign: &str,
        usernames: &[String],
        now_s: u64,
    ) -> Result<HashSet<String>, LedgerError> {
        let campaign = campaign.to_owned();
        let usernames = usernames.to_vec();
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT 1 FROM ledger WHERE campaign = ?1 AND username = ?2
                 AND state = 'sent' AND expires_at > ?3",
            )?;
            let mut sent = HashSet::new();
            for username in usernames {
                if stmt.exists(params![campaign, username, now_s as i64])? {
                    sent.insert(username);
                }
            }
            Ok(sent)
        })
        .await
    }

    async fn entries(
        &self,
        campaign: &str,
        now_s: u64,
        out: mpsc::Sender<Result<Entry, LedgerError>>,
    ) -> Result<(), LedgerError> {
        // Keyset pagination: each page is one short read, so the report
        // never holds the connection (or memory) for the whole campaign.
        let mut after: Option<String> = None;
        loop {
            let campaign = campaign.to_owned();
            let from = after.clone();
            let page: Vec<Entry> = self
                .with(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "SELECT username, state, reason, attempts, updated_at,
                                user_status, user_modified_at, checked_at, signed_out_at,
                                completed_at
                         FROM ledger
                         WHERE campaign = ?1 AND (?2 IS NULL OR username > ?2) AND expires_at > ?3
                         ORDER BY username LIMIT ?4",
                    )?;
                    let rows =
                        stmt.query_map(params![campaign, from, now_s as i64, PAGE as i64], |r| {
                            let state: String = r.get(1)?;
                            Ok(Entry {
                                username: r.get(0)?,
                                state: State::parse(&state).unwrap_or(State::Uncertain),
                                reason: r.get(2)?,
                                attempts: r.get(3)?,
                                updated_at_ms: r.get::<_, i64>(4)? as u64,
                                user_status: r.get(5)?,
                                user_modified_at_ms: r.get::<_, Option<i64>>(6)?.map(|m| m as u64),
                                checked_at_ms: r.get::<_, Option<i64>>(7)?.map(|m| m as u64),
                                signed_out_at_ms: r.get::<_, Option<i64>>(8)?.map(|m| m as u64),
                                completed_at_ms: r.get::<_, Option<i64>>(9)?.map(|m| m as u64),
                            })
                        })?;
                    rows.collect()
                })
                .await?;
            let last = page.len() < PAGE;
            after = page.last().map(|e| e.username.clone());
            for entry in page {
                if out.send(Ok(entry)).await.is_err() {
                    return Ok(());
                }
            }
            if last {
                return Ok(());
            }
        }
    }

    async fn heartbeat(
        &self,
        worker: &str,
        now_ms: u64,
        seen_until_ms: u64,
        expires_at_s: u64,
    ) -> Result<Vec<Member>, LedgerError> {
        let worker = worker.to_owned();
        self.with(move |conn| {
            // Members use the ledger's own columns: `lease_until` is how long
            // the member counts as alive, `updated_at` when it joined.
            conn.execute(
                "INSERT INTO ledger (campaign, username, state, lease_until, updated_at, expires_at)
                 VALUES (?1, ?2, 'in_progress', ?3, ?4, ?5)
                 ON CONFLICT (campaign, username) DO UPDATE SET lease_until = ?3, expires_at = ?5",
                params![
                    MEMBERS,
                    worker,
                    seen_until_ms as i64,
                    now_ms as i64,
                    expires_at_s as i64
                ],
            )?;
            let mut stmt = conn.prepare_cached(
                "SELECT username, updated_at FROM ledger WHERE campaign = ?1 AND lease_until > ?2",
            )?;
            let rows = stmt.query_map(params![MEMBERS, now_ms as i64], |r| {
                Ok(Member {
                    worker: r.get(0)?,
                    joined_at_ms: r.get::<_, i64>(1)? as u64,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn leave(&self, worker: &str) -> Result<(), LedgerError> {
        let worker = worker.to_owned();
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM ledger WHERE campaign = ?1 AND username = ?2",
                params![MEMBERS, worker],
            )?;
            Ok(())
        })
        .await
    }

    async fn check(&self) -> Result<(), LedgerError> {
        self.with(|conn| conn.query_row("SELECT count(*) FROM ledger LIMIT 1", [], |_| Ok(())))
            .await
    }

    async fn init(&self) -> Result<Vec<String>, LedgerError> {
        // `open` created the file and schema; say so.
        self.with(|conn| {
            let path = conn.path().unwrap_or("(memory)").to_owned();
            Ok(vec![format!(
                "SQLite ledger ready at {path} (table `ledger`, WAL mode)"
            )])
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::now_ms;

    fn key<'a>(user: &'a str) -> Key<'a> {
        Key {
            campaign: "c1",
            username: user,
        }
    }

    #[tokio::test]
    async fn two_processes_sharing_a_file_never_both_claim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        // Two connections to one file stand for two processes.
        let a = Sqlite::open(&path).unwrap();
        let b = Sqlite::open(&path).unwrap();
        let (wa, wb) = (Owner("a#1".into()), Owner("b#1".into()));
        let now = now_ms();
        let first = a
            .claim(key("u"), &wa, now, now + 60_000, now / 1000 + 86_400)
            .await
            .unwrap();
        assert!(matches!(first, Claim::Granted { .. }));
        let second = b
            .claim(key("u"), &wb, now, now + 60_000, now / 1000 + 86_400)
            .await
            .unwrap();
        assert!(matches!(second, Claim::Held { .. }), "{second:?}");
        // b cannot finish a's claim with anything but `sent`.
        let deferred = Final {
            state: State::Deferred,
            reason: "x",
            attempts: 1,
            signed_out: false,
            reset: false,
        };
        assert!(
            !b.finish(key("u"), &wb, deferred, now, now / 1000 + 86_400)
                .await
                .unwrap()
        );
        let sent = Final {
            state: State::Sent,
            reason: "ok",
            attempts: 1,
            signed_out: false,
            reset: true,
        };
        assert!(
            a.finish(key("u"), &wa, sent, now, now / 1000 + 86_400)
                .await
                .unwrap()
        );
        let again = b
            .claim(key("u"), &wb, now, now + 60_000, now / 1000 + 86_400)
            .await
            .unwrap();
        assert_eq!(again, Claim::AlreadySent);
        let found = b
            .sent_among("c1", &["u".to_owned(), "v".to_owned()], now / 1000)
            .await
            .unwrap();
        assert_eq!(found, HashSet::from(["u".to_owned()]));
    }

    async fn first_entry(ledger: &Sqlite, now_s: u64) -> Entry {
        let (tx, mut rx) = mpsc::channel(10);
        ledger.entries("c1", now_s, tx).await.unwrap();
        rx.recv().await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_status_is_recorded_on_sent_entries_only_and_a_new_sent_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Sqlite::open(&dir.path().join("l.sqlite3")).unwrap();
        let w = Owner("w#1".into());
        let now = now_ms();
        let exp = now / 1000 + 86_400;
        let checked = Checked {
            user_status: "CONFIRMED",
            modified_at_ms: Some(now + 5),
            checked_at_ms: now + 10,
            completed: true,
        };
        // No entry: nothing written, none created.
        assert!(!ledger.record_status(key("u"), checked).await.unwrap());
        ledger
            .claim(key("u"), &w, now, now + 60_000, exp)
            .await
            .unwrap();
        assert!(!ledger.record_status(key("u"), checked).await.unwrap());
        let sent = Final {
            state: State::Sent,
            reason: "ok",
            attempts: 1,
            signed_out: false,
            reset: true,
        };
        ledger.finish(key("u"), &w, sent, now, exp).await.unwrap();
        assert!(ledger.record_status(key("u"), checked).await.unwrap());
        let entry = first_entry(&ledger, now / 1000).await;
        assert_eq!(entry.user_status.as_deref(), Some("CONFIRMED"));
        assert_eq!(entry.user_modified_at_ms, Some(now + 5));
        assert_eq!(entry.checked_at_ms, Some(now + 10));
        assert_eq!(entry.completed_at_ms, Some(now + 10));
        // A new reset makes the old check meaningless.
        ledger
            .finish(key("u"), &w, sent, now + 20, exp)
            .await
            .unwrap();
        let entry = first_entry(&ledger, now / 1000).await;
        assert_eq!(
            (
                entry.user_status,
                entry.checked_at_ms,
                entry.completed_at_ms
            ),
            (None, None, None),
            "cleared"
        );
    }

    #[tokio::test]
    async fn a_reset_whose_sign_out_failed_is_granted_for_the_sign_out_only() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Sqlite::open(&dir.path().join("l.sqlite3")).unwrap();
        let (w1, w2, w3) = (
            Owner("w#1".into()),
            Owner("w#2".into()),
            Owner("w#3".into()),
        );
        let now = now_ms();
        let exp = now / 1000 + 86_400;
        ledger
            .claim(key("u"), &w1, now, now + 60_000, exp)
            .await
            .unwrap();
        // No entry, nothing recorded.
        assert!(!ledger.record_reset(key("v"), now).await.unwrap());
        assert!(ledger.record_reset(key("u"), now + 1).await.unwrap());
        // The sign-out failed: deferred, the reset kept.
        let deferred = Final {
            state: State::Deferred,
            reason: "sign_out_failed",
            attempts: 1,
            signed_out: false,
            reset: true,
        };
        assert!(
            ledger
                .finish(key("u"), &w1, deferred, now + 2, exp)
                .await
                .unwrap()
        );
        let again = ledger
            .claim(key("u"), &w2, now + 3, now + 60_000, exp)
            .await
            .unwrap();
        assert_eq!(
            again,
            Claim::Granted {
                owner: w2.clone(),
                prior_attempts: 1,
                reset_at_ms: Some(now + 1),
            }
        );
        // The worker died signing out: its expired claim still knows.
        let taken = ledger
            .claim(key("u"), &w3, now + 70_000, now + 130_000, exp)
            .await
            .unwrap();
        assert!(
            matches!(taken, Claim::Granted { reset_at_ms: Some(t), .. } if t == now + 1),
            "{taken:?}"
        );
        let sent = Final {
            state: State::Sent,
            reason: "ok",
            attempts: 1,
            signed_out: true,
            reset: true,
        };
        ledger
            .finish(key("u"), &w3, sent, now + 70_001, exp)
            .await
            .unwrap();
        let entry = first_entry(&ledger, now / 1000).await;
        assert_eq!(
            (entry.state, entry.signed_out_at_ms),
            (State::Sent, Some(now + 70_001))
        );
        // Without a recorded reset, the final write is the backstop.
        ledger
            .claim(key("w"), &w1, now, now + 60_000, exp)
            .await
            .unwrap();
        ledger
            .finish(key("w"), &w1, deferred, now + 5, exp)
            .await
            .unwrap();
        let next = ledger
            .claim(key("w"), &w2, now + 6, now + 60_000, exp)
            .await
            .unwrap();
        assert!(
            matches!(next, Claim::Granted { reset_at_ms: Some(t), .. } if t == now + 5),
            "{next:?}"
        );
    }
}
