//! The worker: take permits, receive at most that many messages, run one
//! task per message, and account for every message exactly once.
//!
//! - this file: the [`Worker`] and the state every job task shares
//!   ([`Shared`]);
//! - `listener`: the receive loop, permits first, and the drain at the end;
//! - [`task`]: one message, decide → call → apply;
//! - [`policy`]: what a call's result means and what happens next;
//! - [`outcome`]: the outcome of a message, logged and counted once;
//! - [`reload`]: the settings that change without a restart;
//! - [`budget`]: the rate budget shared by every worker on one ledger.

pub mod budget;
mod listener;
pub mod outcome;
pub mod policy;
pub mod reload;
mod task;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::aws::cognito::{CallError, Pools, SharedSecret};
use crate::aws::deleter::{Batcher, Deleter};
use crate::aws::sqs::{Queue, QueueError};
use crate::config::{OnUncertain, RetrySettings, Scope, Settings, is_fifo};
use crate::health::Health;
use crate::job::UserHasher;
use crate::ledger::{Ledger, LedgerError};
use crate::rate::Limiters;
use listener::Listener;
use outcome::{Summary, Tally};

/// On a FIFO queue the next message of a group is not delivered until the
/// previous one is deleted, so waiting for a fuller delete batch would stall
/// every group: flush within this there.
const FIFO_DELETE_FLUSH: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The campaign is misconfigured; nothing was deleted because of it.
    #[error(
        "campaign halted: {service} answered {code}{} — check the app client ID, client secret, \
         user pool and its email/SMS roles, the ledger (`ledger.*`), the worker's IAM \
         permissions and credentials; no message was deleted because of this error",
        message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
    )]
    Fatal {
        /// `Cognito`, `SQS` or `ledger`.
        service: &'static str,
        code: String,
        message: Option<String>,
    },
    #[error("start-up check failed: {0}")]
    Startup(#[from] QueueError),
    #[error("start-up check failed: {0}")]
    Ledger(#[from] LedgerError),
}

/// Handles to the settings that apply without a restart.
#[derive(Clone)]
pub struct Live {
    pub limiters: Arc<Limiters>,
    /// Every pool's client secret, by pool name (`default` too).
    pub secrets: BTreeMap<String, SharedSecret>,
}

/// How the run ends besides a signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Exit once this many receives in a row came back empty while no job
    /// was in flight (Kubernetes Job mode). `None`: run until a signal.
    pub until_empty_polls: Option<u32>,
}

/// State shared by the receive loop and every job task.
struct Shared {
    queue: Arc<Queue>,
    /// Hands finished messages to the delete batcher.
    deleter: Deleter,
    /// Every configured user pool; a job names its own.
    pools: Pools,
    /// The cap on Cognito calls, one limiter per Region the pools call (the
    /// pools of a Region share it); every attempt waits on its Region's.
    /// Shared with the config watcher, which changes the limits live, and
    /// with the cluster budget, which sets this worker's share.
    limiters: Arc<Limiters>,
    hasher: UserHasher,
    /// Every user's state: claimed before a call, finished after it. Shared
    /// with other workers through its backend.
    ledger: Ledger,
    /// What to do with a user whose earlier claim expired mid-call.
    on_uncertain: OnUncertain,
    /// How long a final ledger write may still be retried after a stop.
    grace: Duration,
    /// Readiness, read by `/readyz`.
    health: Arc<Health>,
    /// Outcome counts of this run.
    tally: Tally,
    /// Visibility requested on receive and renewed by the heartbeat.
    visibility: Duration,
    retry: RetrySettings,
    /// Cancelled on shutdown or halt. Job tasks that are waiting (for the
    /// rate limiter or a backoff sleep) release their message when it fires;
    /// a call already sent to Cognito is always let finish.
    stop: CancellationToken,
    /// The first fatal error. Set once; later fatal errors only release
    /// their message, so the operator sees one clear cause.
    fatal: OnceLock<Halt>,
    /// A FIFO queue: deferrals re-send the job instead of hiding it.
    fifo: bool,
    /// FIFO deferrals made in this run whose job has not come back yet:
    /// `run --until-empty` is not drained while there are any.
    deferred_by_resend: Deferrals,
}

/// The IDs of this run's FIFO deferrals still out. A std mutex: held for a
/// set operation, never across an await.
#[derive(Default)]
struct Deferrals(std::sync::Mutex<std::collections::HashSet<String>>);

impl Deferrals {
    fn started(&self, id: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    fn finished(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn outstanding(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Why the campaign was halted: the service, its error code and message.
#[derive(Debug, Clone)]
struct Halt {
    service: &'static str,
    code: String,
    message: Option<String>,
}

impl Shared {
    /// Halts the campaign on a fatal Cognito answer.
    fn halt(&self, err: &CallError) {
        self.halt_with(Halt {
            service: "Cognito",
            code: err.code.as_str().to_owned(),
            message: err.server_message.clone(),
        });
    }

    fn halt_with(&self, err: Halt) {
        if self.fatal.set(err).is_ok() {
            self.health.halt();
            self.stop.cancel();
        }
    }

    /// A ledger request failed: a misconfiguration halts the campaign; an
    /// outage makes the worker wait (readiness off) until the ledger answers.
    /// Either way this job's message is released, uncalled.
    fn ledger_failed(&self, err: &LedgerError) -> outcome::Outcome {
        if err.is_fatal() {
            tracing::error!(error = %err, "the ledger refused the worker; halting the campaign");
            self.halt_with(Halt {
                service: "ledger",
                code: err.code().to_owned(),
                message: Some(err.to_string()),
            });
            return policy::released("halted");
        }
        if self.health.set_ledger_up(false) {
            tracing::warn!(error = %err, "ledger unavailable; calling nobody until it answers");
        }
        policy::ledger_unavailable()
    }

    fn release_reason(&self) -> &'static str {
        if self.fatal.get().is_some() {
            "halted"
        } else {
            "shutdown"
        }
    }
}

/// A configured worker, ready to [`run`](Worker::run).
pub struct Worker {
    listener: Listener,
    /// The delete batcher, spawned by `run`.
    batcher: Batcher,
    /// `limits.scope = "cluster"`: the budget is shared through the ledger.
    cluster: bool,
}

impl Worker {
    pub fn new(
        settings: &Settings,
        sqs: aws_sdk_sqs::Client,
        cognito: aws_sdk_cognitoidentityprovider::Client,
        ledger: Ledger,
        health: Arc<Health>,
    ) -> Self {
        let queue = Arc::new(Queue::new(
            sqs,
            settings.sqs.queue_url.clone(),
            settings.sqs.dead_letter_queue_url.clone(),
        ));
        let (deleter, batcher) = Deleter::new(queue.clone(), delete_flush_interval(settings));
        let hasher = UserHasher::new(settings.logging.username_hash_key.clone());
        let pools = Pools::new(&cognito, &settings.cognito);
        let regions = pools.regions();
        for region in settings.limits.regions.keys() {
            if !regions.contains(region) {
                // Most likely a typo (`eu-west-2` for `eu-west-1`): say so
                // rather than leave the Region it meant on the default.
                tracing::warn!(
                    region = %region,
                    pools_regions = ?regions,
                    "limits.regions names a Region no pool calls; it has no effect"
                );
            }
        }
        let limiters = Arc::new(Limiters::new(&settings.limits, regions));
        let shared = Shared {
            queue,
            deleter,
            pools,
            limiters,
            ledger,
            on_uncertain: settings.ledger.on_uncertain,
            grace: Duration::from_secs(settings.shutdown.grace_seconds),
            hasher,
            health,
            tally: Tally::new(settings.metrics.max_campaign_labels),
            visibility: settings.visibility_timeout(),
            retry: settings.retry.clone(),
            stop: CancellationToken::new(),
            fatal: OnceLock::new(),
            fifo: is_fifo(&settings.sqs.queue_url),
            deferred_by_resend: Deferrals::default(),
        };
        let cluster = settings.rate_scope() == Scope::Cluster;
        if cluster {
            // No share until the first heartbeat has counted the others.
            shared.limiters.set_share(0.0);
        }
        Self {
            cluster,
            listener: Listener {
                shared: Arc::new(shared),
                concurrency: settings.limits.concurrency,
                wait: Duration::from_secs(settings.sqs.wait_time_seconds),
                grace: Duration::from_secs(settings.shutdown.grace_seconds),
            },
            batcher,
        }
    }

    /// What the config watcher may change while the worker runs.
    pub fn live(&self) -> Live {
        let shared = &self.listener.shared;
        Live {
            limiters: shared.limiters.clone(),
            secrets: shared.pools.secrets(),
        }
    }

    /// Checks that the queues and the ledger are reachable, so a wrong URL,
    /// a missing table or a missing permission fails start-up with a clear
    /// message. A ledger that is only unreachable right now is waited for.
    pub async fn preflight(&self) -> Result<(), WorkerError> {
        let shared = &self.listener.shared;
        match shared.ledger.check().await {
            Ok(()) => {
                shared.health.set_ledger_up(true);
            }
            Err(err) if err.is_fatal() => return Err(err.into()),
            Err(err) => {
                shared.ledger_failed(&err);
            }
        }
        let queue = &shared.queue;
        let attrs = queue.attributes(queue.url()).await?;
        if let Some(dlq) = queue.dead_letter_url() {
            let dlq_attributes = queue.attributes(dlq).await?;
            queue.set_dead_letter_limit(&dlq_attributes);
        } else if !attrs.contains_key("RedrivePolicy") {
            tracing::warn!(
                "no `sqs.dead_letter_queue_url` and the queue has no redrive policy: \
                 rejected messages will be received again and again"
            );
        }
        self.listener.shared.health.set_polling(true);
        Ok(())
    }

    /// Runs until `shutdown` fires, a fatal error halts the campaign, or
    /// (with `until_empty_polls`) the queue is drained.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        options: RunOptions,
    ) -> Result<Summary, WorkerError> {
        self.preflight().await?;
        let Worker {
            listener,
            batcher,
            cluster,
        } = self;
        let budget_stop = CancellationToken::new();
        let budget = cluster
            .then(|| tokio::spawn(budget::run(listener.shared.clone(), budget_stop.clone())));
        let result = listener.run(batcher, shutdown, options).await;
        budget_stop.cancel();
        if let Some(budget) = budget {
            let _ = budget.await;
        }
        result
    }
}

fn delete_flush_interval(settings: &Settings) -> Duration {
    let configured = Duration::from_millis(settings.sqs.delete_flush_interval_ms);
    if is_fifo(&settings.sqs.queue_url) {
        configured.min(FIFO_DELETE_FLUSH)
    } else {
        configured
    }
}
