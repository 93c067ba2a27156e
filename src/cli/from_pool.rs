//! `reset-worker enqueue --from-user-pool`: selects the campaign's users
//! from the pool itself (`ListUsers`, with Cognito's own filter) instead of
//! a file.
//!
//! The listing streams: one page (at most 60 users) is listed, validated,
//! checked against the ledger and sent with the same batches as a file's
//! jobs before the next page is asked for, so a pool of millions needs no
//! more memory than one page. The checkpoint records the `PaginationToken`
//! of the page being sent and which of its jobs SQS accepted, so `--resume`
//! after an interruption continues where the last run stopped and enqueues
//! each user once.

use std::collections::{BTreeSet, HashSet};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};

use super::checkpoint::{Checkpoint, digest};
use super::enqueue::{EnqueueArgs, EnqueueError, queue_max_bytes, send_pending, sent_in};
use super::estimate;
use super::input::Job;
use super::paced::{ReadError, paced};
use super::progress::Progress;
use crate::aws::cognito::{self, CallError, Cognito, ErrorCode, ListedUser, Pools, UsersPage};
use crate::config::{Action, Settings};
use crate::job::ResetJob;

/// Why listing the pool stopped.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// Cognito refused the filter: the operator's input.
    #[error(
        "Cognito refused the filter: {}{} - see Cognito's ListUsers filter syntax \
         (e.g. `email ^= \"leak\"`)",
        .0.code.as_str(),
        .0.server_message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    BadFilter(CallError),
    /// The setup is wrong (IAM, pool ID, credentials): nothing can be listed.
    #[error(
        "listing halted: ListUsers answered {}{} - check the pool's `user_pool_id`, its \
         Region, the credentials and `cognito-idp:ListUsers` in the IAM policy",
        .0.code.as_str(),
        .0.server_message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Misconfigured(CallError),
    /// The checkpoint's pagination token was refused (Cognito's tokens
    /// expire): the run cannot continue where it stopped.
    #[error(
        "cannot resume: ListUsers refused the checkpoint's pagination token ({}{}); Cognito's \
         tokens expire. Delete {} to list the pool from the first page again (users already \
         sent in the campaign are still skipped through the ledger)",
        .error.code.as_str(),
        .error.server_message.as_deref().map(|m| format!(": {m}")).unwrap_or_default(),
        .checkpoint.display()
    )]
    TokenRejected {
        error: CallError,
        checkpoint: PathBuf,
    },
    /// A page could not be listed after retries.
    #[error(
        "listing stopped: ListUsers failed with {0} after retries; what was enqueued is \
         recorded, re-run with --resume"
    )]
    Failed(CallError),
}

impl ListError {
    /// A misconfiguration: the command exits as halted (3).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ListError::Misconfigured(_))
    }

    /// A filter Cognito refused: the command exits as a configuration
    /// error (2).
    pub fn is_operator_input(&self) -> bool {
        matches!(self, ListError::BadFilter(_))
    }
}

/// What a run saw and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Pages listed by this run.
    pub pages: u64,
    /// Users ListUsers returned (they match the filter).
    pub listed: u64,
    /// Disabled users left out.
    pub disabled: u64,
    /// Users with neither a verified email nor a verified phone number
    /// (`forgot_password` only), left out.
    pub unverified: u64,
    /// Users whose job fails validation or does not fit a message.
    pub invalid: u64,
    /// Users listed twice within a page.
    pub duplicate: u64,
    /// Users the ledger has as `sent` in the campaign.
    pub already_sent: u64,
    /// Jobs enqueued (a dry run: that would be).
    pub enqueued: u64,
}

/// Why a user cannot receive a code, if they cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// `Enabled = false`: Cognito refuses every reset.
    Disabled,
    /// `forgot_password` sends the code to a verified email or phone
    /// number; the user has neither.
    Unverified,
}

/// Whether `user` can receive a code with `action`.
pub fn unreachable(user: &ListedUser, action: Action) -> Option<Unreachable> {
    if !user.enabled {
        return Some(Unreachable::Disabled);
    }
    if action == Action::ForgotPassword && !user.verified_email && !user.verified_phone {
        return Some(Unreachable::Unverified);
    }
    None
}

/// SHA-256, hex, of (user pool ID, filter, campaign): the listing a
/// checkpoint follows.
pub fn source_key(user_pool_id: &str, filter: Option<&str>, campaign: &str) -> String {
    let hash = Sha256::new()
        .chain_update(user_pool_id.as_bytes())
        .chain_update([0u8])
        // A missing filter and an empty one list the same users.
        .chain_update(filter.unwrap_or_default().as_bytes())
        .chain_update([0u8])
        .chain_update(campaign.as_bytes())
        .finalize();
    hex::encode(hash)
}

/// The validated jobs of one page, in the page's order; the unreachable,
/// invalid and duplicate users counted in `counts`.
fn page_jobs(
    page: &UsersPage,
    action: Action,
    include_unreachable: bool,
    campaign: &str,
    pool: Option<&str>,
    max_bytes: usize,
    counts: &mut Counts,
) -> Vec<Job> {
    let mut seen = HashSet::new();
    let mut jobs = Vec::with_capacity(page.users.len());
    for (i, user) in page.users.iter().enumerate() {
        let cannot = unreachable(user, action);
        match cannot {
            Some(Unreachable::Disabled) => counts.disabled += 1,
            Some(Unreachable::Unverified) => counts.unverified += 1,
            None => {}
        }
        if cannot.is_some() && !include_unreachable {
            continue;
        }
        if !seen.insert(user.username.as_str()) {
            counts.duplicate += 1;
            continue;
        }
        let mut object = serde_json::Map::new();
        object.insert("username".into(), user.username.as_str().into());
        object.insert("campaign_id".into(), campaign.into());
        if let Some(pool) = pool {
            object.insert("pool".into(), pool.into());
        }
        let body = serde_json::Value::Object(object).to_string();
        // The worker's own validation: a username it would reject is not sent.
        if ResetJob::parse(&body).is_err() || body.len() > max_bytes {
            counts.invalid += 1;
            continue;
        }
        jobs.push(Job {
            line: i + 1,
            username: user.username.clone(),
            body,
        });
    }
    jobs
}

/// One page of `ListUsers`, paced by `limiter`, retried with jitter on
/// throttling and transient errors. `resuming`: the token comes from a
/// checkpoint, so a refusal means it expired.
async fn list_page(
    pool: &Cognito,
    limiter: &governor::DefaultDirectRateLimiter,
    filter: Option<&str>,
    token: Option<&str>,
    resuming: Option<&Path>,
) -> Result<UsersPage, ListError> {
    let read = || pool.list_users(filter, token);
    match paced(limiter, "ListUsers", read).await {
        Ok(page) => Ok(page),
        Err(ReadError::Misconfigured(err)) => Err(ListError::Misconfigured(err)),
        // The filter worked on the run that wrote the checkpoint, so a
        // refusal of the resumed request is the token's.
        Err(ReadError::Failed(err))
            if resuming.is_some()
                && matches!(err.code, ErrorCode::InvalidParameter | ErrorCode::Other) =>
        {
            Err(ListError::TokenRejected {
                error: err,
                checkpoint: resuming.map(Path::to_owned).unwrap_or_default(),
            })
        }
        Err(ReadError::Failed(err)) if err.code == ErrorCode::InvalidParameter => {
            Err(ListError::BadFilter(err))
        }
        Err(ReadError::Failed(err)) => Err(ListError::Failed(err)),
    }
}

/// The checkpoint to continue, or a new one; refuses one from an earlier
/// run without `--resume`, or one of another listing.
fn open_checkpoint(
    path: &Path,
    resume: bool,
    campaign: &str,
    source: &str,
) -> Result<Checkpoint, EnqueueError> {
    match Checkpoint::load(path)? {
        Some(_) if !resume => Err(EnqueueError::CheckpointExists(path.to_owned())),
        Some(cp) if cp.campaign != campaign => Err(EnqueueError::CheckpointCampaign {
            path: path.to_owned(),
            found: cp.campaign,
            expected: campaign.to_owned(),
        }),
        Some(cp) if cp.source.as_deref() != Some(source) => Err(EnqueueError::Checkpoint {
            path: path.to_owned(),
            detail: "it was written for another pool or filter (or for a file); the pool, \
                     the filter and the campaign must not change between runs"
                .to_owned(),
        }),
        Some(cp) => Ok(cp),
        None => Ok(Checkpoint {
            campaign: campaign.to_owned(),
            source: Some(source.to_owned()),
            ..Checkpoint::default()
        }),
    }
}

/// Runs `reset-worker enqueue --from-user-pool`.
pub async fn run(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let pool_name = args
        .from_user_pool()
        .unwrap_or(crate::config::DEFAULT_POOL)
        .to_owned();
    let sdk = crate::aws::load_sdk_config().await;
    let pools = Pools::new(
        &cognito::build_client(&sdk, &settings.cognito),
        &settings.cognito,
    );
    // `Cli::run` checked the pool and its ID before anything ran.
    let pool = pools
        .get(Some(&pool_name))
        .with_context(|| format!("no pool named `{pool_name}` is configured"))?;
    let user_pool_id = pool
        .user_pool_id()
        .with_context(|| format!("the pool `{pool_name}` has no user_pool_id"))?;
    let filter = args.filter.as_deref().filter(|f| !f.trim().is_empty());
    let campaign = args.campaign.as_str();
    let source = source_key(user_pool_id, filter, campaign);
    let checkpoint_path = args.checkpoint.clone().unwrap_or_else(|| {
        PathBuf::from(format!("enqueue-from-pool-{}.checkpoint", &source[..16]))
    });

    let queue = Arc::new(super::queue(settings).await);
    let max_bytes = queue_max_bytes(&queue, args.dry_run).await?;
    let ledger = if args.include_sent {
        None
    } else {
        Some(super::report::open(settings).await?)
    };
    let mut checkpoint = if args.dry_run {
        Checkpoint::default()
    } else {
        open_checkpoint(&checkpoint_path, args.resume, campaign, &source)?
    };
    if checkpoint.finished {
        println!(
            "nothing to resume: {} says the listing was enqueued to its last page ({} jobs in \
             {} pages); delete it to list the pool again",
            checkpoint_path.display(),
            checkpoint.enqueued,
            checkpoint.pages
        );
        return Ok(());
    }
    let enqueued_before = checkpoint.enqueued + checkpoint.sent.len() as u64;
    if enqueued_before > 0 || checkpoint.pagination_token.is_some() {
        eprintln!(
            "resuming from {}: {} pages done, {enqueued_before} jobs enqueued before",
            checkpoint_path.display(),
            checkpoint.pages,
        );
    }

    // Burst 1: pages evenly spaced, never a burst against the account's
    // ListUsers quota, which the applications share.
    let rps = NonZeroU32::new(args.list_rps.max(1)).unwrap_or(NonZeroU32::MIN);
    let limiter = RateLimiter::direct(Quota::per_second(rps).allow_burst(NonZeroU32::MIN));
    let interrupted = crate::shutdown::on_signal().context("cannot install signal handlers")?;
    let mut progress = (!args.dry_run).then(Progress::unbounded);
    if let Some(progress) = progress.as_mut() {
        progress.set(enqueued_before as usize);
    }
    let stamp = args.pool.as_deref();
    let action = pool.action();
    let mut counts = Counts::default();
    let mut token = checkpoint.pagination_token.clone();
    loop {
        // Only this run's first request can carry the checkpoint's token.
        let resumed_token =
            (counts.pages == 0 && token.is_some()).then_some(checkpoint_path.as_path());
        let page = list_page(pool, &limiter, filter, token.as_deref(), resumed_token).await?;
        counts.pages += 1;
        counts.listed += page.users.len() as u64;
        let jobs = page_jobs(
            &page,
            action,
            args.include_unreachable,
            campaign,
            stamp,
            max_bytes,
            &mut counts,
        );
        let skip = match &ledger {
            Some(ledger) => sent_in(ledger, campaign, &jobs).await?,
            None => HashSet::new(),
        };
        counts.already_sent += skip.len() as u64;
        if args.dry_run {
            counts.enqueued += (jobs.len() - skip.len()) as u64;
        } else {
            // Within the page, keep what an interrupted run got accepted,
            // as long as the page still lists the same jobs.
            let page_digest = digest(&jobs);
            let same_page = checkpoint.digest == page_digest && checkpoint.total_jobs == jobs.len();
            if !same_page && !checkpoint.sent.is_empty() {
                eprintln!(
                    "the page the last run stopped in has changed since; sending it whole \
                     (the worker skips any user already sent)"
                );
            }
            if !same_page {
                checkpoint.sent = BTreeSet::new();
            }
            checkpoint.digest = page_digest;
            checkpoint.total_jobs = jobs.len();
            let pending: Vec<usize> = (0..jobs.len())
                .filter(|i| !checkpoint.sent.contains(i) && !skip.contains(i))
                .collect();
            let before = checkpoint.sent.len();
            let base = checkpoint.enqueued;
            let failed = send_pending(
                &queue,
                campaign,
                &jobs,
                &pending,
                max_bytes,
                &interrupted,
                |accepted| {
                    checkpoint.sent.extend(accepted);
                    if let Some(progress) = progress.as_mut() {
                        progress.set((base + checkpoint.sent.len() as u64) as usize);
                    }
                    checkpoint.save(&checkpoint_path)
                },
            )
            .await?;
            let sent_now = checkpoint.sent.len() - before;
            counts.enqueued += sent_now as u64;
            if failed > 0 {
                return Err(EnqueueError::Incomplete { failed }.into());
            }
            if sent_now < pending.len() {
                return Err(EnqueueError::InterruptedListing {
                    enqueued: enqueued_before + counts.enqueued,
                    pages: checkpoint.pages,
                }
                .into());
            }
            // The page is done: the checkpoint moves on to the next one.
            checkpoint.enqueued += checkpoint.sent.len() as u64;
            checkpoint.pages += 1;
            checkpoint.pagination_token = page.next.clone();
            checkpoint.finished = page.next.is_none();
            checkpoint.digest = String::new();
            checkpoint.total_jobs = 0;
            checkpoint.sent = BTreeSet::new();
            checkpoint.save(&checkpoint_path)?;
        }
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
        if interrupted.is_cancelled() {
            return Err(EnqueueError::InterruptedListing {
                enqueued: enqueued_before + counts.enqueued,
                pages: checkpoint.pages,
            }
            .into());
        }
    }
    if let Some(progress) = progress.as_ref() {
        progress.finish();
    }
    report(settings, &args, &counts, enqueued_before);
    Ok(())
}

/// The exclusion line and the summary: counts only, never a username.
fn report(settings: &Settings, args: &EnqueueArgs, counts: &Counts, enqueued_before: u64) {
    let unreachable = counts.disabled + counts.unverified;
    if unreachable > 0 {
        if args.include_unreachable {
            eprintln!(
                "including {unreachable} users who cannot receive a code (disabled {}, no \
                 verified email or phone {}) as --include-unreachable asks",
                counts.disabled, counts.unverified
            );
        } else {
            eprintln!(
                "excluding {unreachable} users who cannot receive a code: disabled {}, no \
                 verified email or phone {} (--include-unreachable enqueues them)",
                counts.disabled, counts.unverified
            );
        }
    }
    if counts.already_sent > 0 {
        eprintln!(
            "skipping {} users already sent in campaign `{}` (the ledger says so; \
             --include-sent sends them again)",
            counts.already_sent, args.campaign
        );
    }
    let estimate = estimate(counts.enqueued, settings.limits.max_rps);
    let excluded = if args.include_unreachable {
        String::new()
    } else {
        format!(
            ", excluded disabled {}, excluded unverified {}",
            counts.disabled, counts.unverified
        )
    };
    let listed = format!(
        "listed {} in {} pages{excluded}, invalid {}, duplicate {}, already sent {}",
        counts.listed, counts.pages, counts.invalid, counts.duplicate, counts.already_sent
    );
    if args.dry_run {
        println!(
            "dry run: would enqueue {}; {listed}; about {estimate} at limits.max_rps {}",
            counts.enqueued, settings.limits.max_rps
        );
    } else {
        println!(
            "enqueued {}, already enqueued {enqueued_before}; {listed}; about {estimate} at \
             limits.max_rps {}",
            counts.enqueued, settings.limits.max_rps
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, enabled: bool, email: bool, phone: bool) -> ListedUser {
        ListedUser {
            username: name.to_owned(),
            enabled,
            verified_email: email,
            verified_phone: phone,
        }
    }

    #[test]
    fn disabled_users_never_and_unverified_ones_only_for_forgot_password() {
        let fp = Action::ForgotPassword;
        let admin = Action::AdminResetUserPassword;
        assert_eq!(unreachable(&user("a", true, true, false), fp), None);
        assert_eq!(unreachable(&user("a", true, false, true), fp), None);
        assert_eq!(
            unreachable(&user("a", true, false, false), fp),
            Some(Unreachable::Unverified)
        );
        assert_eq!(unreachable(&user("a", true, false, false), admin), None);
        for action in [fp, admin] {
            assert_eq!(
                unreachable(&user("a", false, true, true), action),
                Some(Unreachable::Disabled)
            );
        }
    }

    #[test]
    fn a_page_is_validated_deduplicated_stamped_and_counted() {
        let page = UsersPage {
            users: vec![
                user("a@x.com", true, true, false),
                user("off@x.com", false, true, false),
                user("nomail@x.com", true, false, false),
                user("a@x.com", true, true, false),
                user(&"x".repeat(200), true, true, false),
            ],
            next: None,
        };
        let mut counts = Counts::default();
        let jobs = page_jobs(
            &page,
            Action::ForgotPassword,
            false,
            "c",
            Some("b"),
            256 * 1024,
            &mut counts,
        );
        let users: Vec<&str> = jobs.iter().map(|j| j.username.as_str()).collect();
        assert_eq!(users, vec!["a@x.com"]);
        assert_eq!(
            (
                counts.disabled,
                counts.unverified,
                counts.duplicate,
                counts.invalid
            ),
            (1, 1, 1, 1)
        );
        let body: serde_json::Value = serde_json::from_str(&jobs[0].body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"username": "a@x.com", "campaign_id": "c", "pool": "b"})
        );
        // --include-unreachable keeps them, still counted.
        let mut counts = Counts::default();
        let jobs = page_jobs(
            &page,
            Action::ForgotPassword,
            true,
            "c",
            None,
            256 * 1024,
            &mut counts,
        );
        assert_eq!(jobs.len(), 3);
        assert_eq!((counts.disabled, counts.unverified), (1, 1));
        assert!(!jobs[0].body.contains("pool"));
    }

    #[test]
    fn the_source_key_tells_pool_filter_and_campaign_apart() {
        let k = source_key("p", Some("email ^= \"a\""), "c");
        assert_eq!(k, source_key("p", Some("email ^= \"a\""), "c"));
        assert_ne!(k, source_key("p2", Some("email ^= \"a\""), "c"));
        assert_ne!(k, source_key("p", Some("email ^= \"b\""), "c"));
        assert_ne!(k, source_key("p", Some("email ^= \"a\""), "c2"));
        assert_eq!(source_key("p", None, "c"), source_key("p", Some(""), "c"));
    }
}
