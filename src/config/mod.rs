//! Typed, validated configuration.
//!
//! Layers, later ones win: built-in defaults, the TOML file given with
//! `--config`, then environment variables `RESET_WORKER_<SECTION>__<KEY>`
//! (for example `RESET_WORKER_SQS__QUEUE_URL`). Unknown keys are errors in
//! every layer, so a typo fails start-up instead of silently using a default.
//!
//! - this file: the settings types, one doc comment per key, and defaults;
//! - [`load`](self::load): the layers and the validation;
//! - [`explain`](self::explain): `reset-worker config`, each key with its source.
//!
//! A leaf: it imports nothing of this crate.

mod explain;
mod load;

pub use explain::Explained;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Prefix of every environment variable that overrides a config key.
pub const ENV_PREFIX: &str = "RESET_WORKER_";

/// Environment variables that share the prefix but are not config keys.
const ENV_NOT_KEYS: &[&str] = &["config", "log_format"];

/// Secrets set through the environment: taken verbatim as strings, never
/// parsed. figment's `Env` reads values TOML-style, so a numeric secret
/// failed with an error that echoed it, and a quoted one lost its quotes.
/// (config key, environment variable)
const ENV_SECRETS: &[(&str, &str)] = &[
    (
        "cognito.client_secret",
        "RESET_WORKER_COGNITO__CLIENT_SECRET",
    ),
    (
        "logging.username_hash_key",
        "RESET_WORKER_LOGGING__USERNAME_HASH_KEY",
    ),
];

/// A named pool's secret in the environment:
/// `RESET_WORKER_COGNITO__POOLS__<NAME>__CLIENT_SECRET`, taken verbatim like
/// [`ENV_SECRETS`]. These two parts surround the name.
const ENV_POOL_SECRET: (&str, &str) = ("RESET_WORKER_COGNITO__POOLS__", "__CLIENT_SECRET");

/// The pool named by a `RESET_WORKER_COGNITO__POOLS__<NAME>__CLIENT_SECRET`
/// variable, lower-cased as figment lower-cases every other key; `None` for
/// any other variable.
fn env_pool_secret_name(var: &str) -> Option<String> {
    let name = var
        .strip_prefix(ENV_POOL_SECRET.0)?
        .strip_suffix(ENV_POOL_SECRET.1)?;
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// Every pool secret set through the environment: (pool name, variable).
fn env_pool_secrets() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(var, _)| var.into_string().ok())
        .filter_map(|var| env_pool_secret_name(&var).map(|name| (name, var)))
        .collect()
}

/// The `RESET_WORKER_*` layer, without the secrets (see [`ENV_SECRETS`] and
/// [`ENV_POOL_SECRET`]).
fn env_layer() -> figment::providers::Env {
    // `ignore` and `filter` run after `split`, on the dotted,
    // case-insensitive key.
    let ignored: Vec<&str> = ENV_NOT_KEYS
        .iter()
        .copied()
        .chain(ENV_SECRETS.iter().map(|(key, _)| *key))
        .collect();
    figment::providers::Env::prefixed(ENV_PREFIX)
        .split("__")
        .ignore(&ignored)
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            !(key.starts_with("cognito.pools.") && key.ends_with(".client_secret"))
        })
}

/// SQS names every FIFO queue (and so its URL) with the `.fifo` suffix.
pub fn is_fifo(queue_url: &str) -> bool {
    queue_url.ends_with(".fifo")
}

/// SQS allows at most 12 hours of visibility for a received message.
pub const MAX_VISIBILITY_SECONDS: u64 = 12 * 60 * 60;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
    /// A key whose full name is only known at run time
    /// (`limits.regions.<region>.<key>`).
    #[error("invalid configuration: `{key}` {problem}")]
    InvalidKey { key: String, problem: String },
    /// A key of one named pool, `cognito.pools.<pool>.<key>`: its name is
    /// only known at run time.
    #[error("invalid configuration: `cognito.pools.{pool}.{key}` {problem}")]
    InvalidPool {
        pool: String,
        key: &'static str,
        problem: String,
    },
    #[error("cannot read `{key}` {path}: {source}")]
    SecretFile {
        /// `cognito.client_secret_file` or `cognito.pools.<pool>.client_secret_file`.
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub sqs: SqsSettings,
    pub cognito: CognitoSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub shutdown: ShutdownSettings,
    #[serde(default)]
    pub logging: LoggingSettings,
    #[serde(default)]
    pub ledger: LedgerSettings,
}

/// Which Cognito call a job makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `ForgotPassword`: sends a code; the old password keeps working until
    /// the user sets a new one. Needs no IAM permission.
    #[default]
    ForgotPassword,
    /// `AdminResetUserPassword`: invalidates the password (status
    /// RESET_REQUIRED), then sends a code. The real forced reset after a
    /// breach. Needs `cognito.user_pool_id` and the IAM permission
    /// `cognito-idp:AdminResetUserPassword`.
    AdminResetUserPassword,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ForgotPassword => "forgot_password",
            Action::AdminResetUserPassword => "admin_reset_user_password",
        }
    }
}

/// Where the ledger lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerBackend {
    /// An embedded SQLite file at `ledger.path` (WAL mode). Survives
    /// restarts; shared by processes on one host only.
    #[default]
    Sqlite,
    /// A DynamoDB table, `ledger.table`: shared by every replica and re-run.
    Dynamodb,
    /// This process's memory only: lost on exit, not shared. For tests and
    /// throw-away runs.
    Memory,
}

impl LedgerBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerBackend::Sqlite => "sqlite",
            LedgerBackend::Dynamodb => "dynamodb",
            LedgerBackend::Memory => "memory",
        }
    }
}

/// What a worker does with a user whose earlier claim expired mid-call (a
/// worker died while calling): the email may or may not have gone out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUncertain {
    /// Call again: the user may get a second code (which voids the first),
    /// but nobody is left without one.
    #[default]
    Resend,
    /// Do not call: outcome `skipped`, reason `uncertain`; the user stays
    /// `uncertain` in the ledger for the report.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// `sqlite` (default), `dynamodb` or `memory`. See docs/ledger.md.
    #[serde(default)]
    pub backend: LedgerBackend,
    /// The SQLite file (backend `sqlite`), relative to the working directory.
    /// Created with its schema when missing. Keep it on a volume that
    /// outlives the pod.
    #[serde(default = "defaults::ledger_path")]
    pub path: PathBuf,
    /// The DynamoDB table (backend `dynamodb`): partition key `campaign` (S),
    /// sort key `username` (S), TTL attribute `expires_at`. Create it with
    /// `reset-worker ledger init`.
    #[serde(default = "defaults::ledger_table")]
    pub table: String,
    /// Days a user's entry is kept after its last change, 1–3650. After
    /// that a new job for the user is treated as never seen.
    #[serde(default = "defaults::retention_days")]
    pub retention_days: u64,
    /// `resend` (default) or `skip`: what to do with a user whose earlier
    /// claim expired in progress (a worker died mid-call).
    #[serde(default)]
    pub on_uncertain: OnUncertain,
    /// Backend `memory` only: most users remembered, 1000–10000000 (about
    /// 350 bytes each); least recently used go first.
    #[serde(default = "defaults::ledger_max_entries")]
    pub max_entries: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSettings {
    /// URL of the queue that holds one reset job per message. Required.
    /// A URL ending in `.fifo` is treated as a FIFO queue.
    pub queue_url: String,
    /// Where rejected messages (bad body, Cognito refused the parameters) are
    /// copied, with attributes that say why, before they are deleted. When
    /// unset, rejected messages are left alone and reach the queue's own
    /// redrive dead-letter queue after `maxReceiveCount` receives.
    #[serde(default)]
    pub dead_letter_queue_url: Option<String>,
    /// Long-poll wait per ReceiveMessage call, 0–20. 0 turns long polling off
    /// (more, emptier requests); 20 is the cheapest.
    #[serde(default = "defaults::wait_time_seconds")]
    pub wait_time_seconds: u64,
    /// Visibility timeout requested for received messages, 1–43200. A running
    /// job's visibility is extended by a heartbeat at half this interval, so
    /// it only bounds how long a crashed worker's messages stay hidden. It must
    /// exceed `cognito.request_timeout_seconds`.
    #[serde(default = "defaults::visibility_timeout_seconds")]
    pub visibility_timeout_seconds: u64,
    /// How long a finished message may wait for nine others before its
    /// DeleteMessageBatch is sent, 1–5000 ms; a full batch of 10 goes at
    /// once. So at most one batch (10 messages) or this long awaits its
    /// delete, which bounds the redeliveries (second emails) a crash can
    /// cause. At rates of 10/s and more the batch fills within the second,
    /// so the default costs no delay there and keeps SQS requests near 0.2
    /// per job; a lower value trades more DeleteMessageBatch calls for a
    /// smaller window.
    #[serde(default = "defaults::delete_flush_interval_ms")]
    pub delete_flush_interval_ms: u64,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CognitoSettings {
    /// App client ID passed as `ClientId`. Required.
    pub client_id: String,
    /// App client secret. When set (here or through `client_secret_file`),
    /// every call carries `SecretHash`. Never logged.
    #[serde(default, serialize_with = "redacted")]
    pub client_secret: Option<SecretString>,
    /// File holding the app client secret (e.g. a mounted Kubernetes Secret);
    /// trailing whitespace is ignored. Mutually exclusive with `client_secret`.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Campaign-wide `ClientMetadata` sent with every call; a job's own
    /// `client_metadata` wins on a key clash. At most 50 entries.
    #[serde(default)]
    pub client_metadata: BTreeMap<String, String>,
    /// `forgot_password` (default) or `admin_reset_user_password`; see
    /// docs/campaigns.md for when to choose each. Same outcome policy for both.
    #[serde(default)]
    pub action: Action,
    /// The user pool ID. Required for `admin_reset_user_password`; also used
    /// by `preflight` to inspect the pool and the app client.
    #[serde(default)]
    pub user_pool_id: Option<String>,
    /// Time limit for one ForgotPassword call, 1–300 s. A call that takes
    /// longer counts as a retryable error, so a hung call never holds a slot.
    /// For every pool.
    #[serde(default = "defaults::request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    /// End the user's sessions too: after a successful reset, call
    /// `AdminUserGlobalSignOut`, which revokes their refresh tokens (a reset
    /// alone leaves an attacker's session valid). The user is `sent` only
    /// once both steps succeeded; a failed sign-out is retried alone, never
    /// the reset. Needs `cognito.user_pool_id` and
    /// `cognito-idp:AdminUserGlobalSignOut`; each user then costs two
    /// requests of the Region's budget. Default `false`.
    #[serde(default)]
    pub sign_out: bool,
    /// Further user pools, by name (`[cognito.pools.NAME]`): a job names its
    /// pool in its `pool` field. The keys above are the pool named
    /// `default`, so that name is taken. Names: 1–64 characters of
    /// `a-z`, `0-9`, `_` and `-` (lower case: environment variables reach a
    /// pool by its name, and figment lower-cases them).
    #[serde(default)]
    pub pools: BTreeMap<String, PoolSettings>,
}

/// The name of the pool the top-level `cognito.*` keys define, and of the
/// pool a job without a `pool` field goes to.
pub const DEFAULT_POOL: &str = "default";

/// The longest pool name.
pub const MAX_POOL_NAME_CHARS: usize = 64;

/// One named user pool, `[cognito.pools.NAME]`. `client_metadata` and
/// `request_timeout_seconds` are the top level's, for every pool.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// This pool's app client ID, passed as `ClientId`. Required.
    pub client_id: String,
    /// This pool's app client secret; its calls carry a `SecretHash` made
    /// with it. Never logged.
    #[serde(default, serialize_with = "redacted")]
    pub client_secret: Option<SecretString>,
    /// File holding this pool's app client secret; trailing whitespace is
    /// ignored. Mutually exclusive with `client_secret`. Re-read when it
    /// changes, like the top level's.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// This pool's ID. Required when its action is
    /// `admin_reset_user_password`; used by `preflight`.
    #[serde(default)]
    pub user_pool_id: Option<String>,
    /// The pool's AWS Region, e.g. `eu-west-1`. Unset: the SDK's Region
    /// (`AWS_REGION`, the profile, …), as for the `default` pool.
    #[serde(default)]
    pub region: Option<String>,
    /// `forgot_password` or `admin_reset_user_password`. Unset:
    /// `cognito.action`.
    #[serde(default)]
    pub action: Option<Action>,
    /// Cognito endpoint for this pool only, e.g. an emulator. Unset: the
    /// SDK's (`AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER`, or AWS's own).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Sign this pool's users out after their reset (see
    /// `cognito.sign_out`); needs this pool's `user_pool_id`. Unset:
    /// `cognito.sign_out`.
    #[serde(default)]
    pub sign_out: Option<bool>,
}

impl PartialEq for PoolSettings {
    fn eq(&self, other: &Self) -> bool {
        same_secret(&self.client_secret, &other.client_secret)
            && self.client_id == other.client_id
            && self.client_secret_file == other.client_secret_file
            && self.user_pool_id == other.user_pool_id
            && self.region == other.region
            && self.action == other.action
            && self.endpoint_url == other.endpoint_url
            && self.sign_out == other.sign_out
    }
}

impl std::fmt::Debug for PoolSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSettings")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("user_pool_id", &self.user_pool_id)
            .field("region", &self.region)
            .field("action", &self.action)
            .field("endpoint_url", &self.endpoint_url)
            .field("sign_out", &self.sign_out)
            .finish()
    }
}

/// One pool with every default filled in: the `default` pool from the top
/// level, or a named one with what it inherits.
#[derive(Clone)]
pub struct Pool {
    pub name: String,
    pub client_id: String,
    /// Resolved: read from `client_secret_file` when that is set.
    pub client_secret: Option<SecretString>,
    pub client_secret_file: Option<PathBuf>,
    pub user_pool_id: Option<String>,
    /// `None`: the SDK's Region.
    pub region: Option<String>,
    pub action: Action,
    /// `None`: the SDK's endpoint.
    pub endpoint_url: Option<String>,
    /// Call `AdminUserGlobalSignOut` after each reset.
    pub sign_out: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("user_pool_id", &self.user_pool_id)
            .field("region", &self.region)
            .field("action", &self.action)
            .field("endpoint_url", &self.endpoint_url)
            .field("sign_out", &self.sign_out)
            .finish()
    }
}

impl CognitoSettings {
    /// Every configured pool, `default` first, then the named ones by name,
    /// with what they inherit filled in.
    pub fn all_pools(&self) -> Vec<Pool> {
        let default = Pool {
            name: DEFAULT_POOL.to_owned(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            client_secret_file: self.client_secret_file.clone(),
            user_pool_id: self.user_pool_id.clone(),
            region: None,
            action: self.action,
            endpoint_url: None,
            sign_out: self.sign_out,
        };
        let named = self.pools.iter().map(|(name, p)| Pool {
            name: name.clone(),
            client_id: p.client_id.clone(),
            client_secret: p.client_secret.clone(),
            client_secret_file: p.client_secret_file.clone(),
            user_pool_id: p.user_pool_id.clone(),
            region: p.region.clone(),
            action: p.action.unwrap_or(self.action),
            endpoint_url: p.endpoint_url.clone(),
            sign_out: p.sign_out.unwrap_or(self.sign_out),
        });
        std::iter::once(default).chain(named).collect()
    }

    /// True when `name` is a configured pool (`default` always is).
    pub fn has_pool(&self, name: &str) -> bool {
        name == DEFAULT_POOL || self.pools.contains_key(name)
    }
}

/// Secrets compare by value: a changed secret is a changed setting.
pub fn same_secret(a: &Option<SecretString>, b: &Option<SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}

impl PartialEq for CognitoSettings {
    fn eq(&self, other: &Self) -> bool {
        same_secret(&self.client_secret, &other.client_secret)
            && self.client_id == other.client_id
            && self.client_secret_file == other.client_secret_file
            && self.client_metadata == other.client_metadata
            && self.action == other.action
            && self.user_pool_id == other.user_pool_id
            && self.request_timeout_seconds == other.request_timeout_seconds
            && self.sign_out == other.sign_out
            && self.pools == other.pools
    }
}

impl PartialEq for LoggingSettings {
    fn eq(&self, other: &Self) -> bool {
        same_secret(&self.username_hash_key, &other.username_hash_key)
    }
}

impl std::fmt::Debug for CognitoSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CognitoSettings")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("client_metadata", &self.client_metadata)
            .field("action", &self.action)
            .field("user_pool_id", &self.user_pool_id)
            .field("request_timeout_seconds", &self.request_timeout_seconds)
            .field("sign_out", &self.sign_out)
            .field("pools", &self.pools)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Jobs processed at once (semaphore permits), 1–1024. Concurrency does
    /// not limit the request rate; `max_rps` does.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Hard cap on Cognito calls per second in **each Region** the pools
    /// use, 0–10000 (`limits.regions` overrides one Region). Cognito's
    /// UserAccountRecovery quota is 30/s per account and Region and is
    /// shared with real users, so the default of 10 leaves two thirds for
    /// them. With `scope = "cluster"` it is the budget of all the workers
    /// on the ledger together. 0 pauses the campaign in every Region.
    /// Applied live when the config file changes.
    #[serde(default = "defaults::max_rps")]
    pub max_rps: u32,
    /// Calls that may start back to back after an idle spell, 1–`max_rps`,
    /// in each Region. Any one-second window holds at most `max_rps + burst`
    /// calls to one Region. Applied live when the config file changes.
    #[serde(default = "defaults::burst")]
    pub burst: u32,
    /// One Region's own budget, by Region name (`[limits.regions.eu-west-1]`),
    /// in place of `max_rps` and `burst`; Regions not listed take those.
    /// Applied live when the config file changes.
    #[serde(default)]
    pub regions: BTreeMap<String, RegionLimitSettings>,
    /// `cluster` (the default with a shared ledger: `sqlite` or `dynamodb`):
    /// `max_rps` and `burst` are the budget of every worker sharing the
    /// ledger together, divided among the live ones. `process` (the default,
    /// and the only choice, with the `memory` ledger): each worker's own.
    #[serde(default)]
    pub scope: Option<Scope>,
}

/// `[limits.regions.REGION]`: one Region's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionLimitSettings {
    /// Calls per second to Cognito in this Region, 1–10000 (pause the whole
    /// campaign with `limits.max_rps = 0`: a paused Region alone would send
    /// its jobs round the queue until they dead-letter).
    pub max_rps: u32,
    /// Calls that may start back to back, 1–`max_rps`; default
    /// `limits.burst`, lowered to `max_rps` if above it.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Whose budget `limits.max_rps` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every worker sharing the ledger, together.
    Cluster,
    /// Each process on its own.
    Process,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// First in-process backoff ceiling, 1–60000 ms. Each retry doubles the
    /// ceiling and sleeps a uniformly random time below it (full jitter).
    #[serde(default = "defaults::initial_delay_ms")]
    pub initial_delay_ms: u64,
    /// Largest backoff ceiling, `initial_delay_ms`–600000 ms.
    #[serde(default = "defaults::max_delay_ms")]
    pub max_delay_ms: u64,
    /// Calls per job for throttling, 5xx, timeouts and connection errors,
    /// 1–20. After the last one the job is deferred: its message becomes
    /// visible again after the next backoff delay.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Calls per job when Cognito cannot deliver the code or a Lambda trigger
    /// misbehaves, 1–20; after the last one the job is rejected.
    #[serde(default = "defaults::delivery_failure_max_attempts")]
    pub delivery_failure_max_attempts: u32,
    /// How long a job that hit the per-user code limit (LimitExceeded) stays
    /// invisible before it is tried again, 1–43200 s (SQS maximum, 12 h).
    #[serde(default = "defaults::limit_exceeded_delay_seconds")]
    pub limit_exceeded_delay_seconds: u64,
    /// How long a job whose call's answer was lost after it was sent (the
    /// call timed out, or the connection broke mid-call) stays invisible
    /// before it is tried again, `sqs.visibility_timeout_seconds`–43200 s.
    /// Cognito may have sent the code already, so the job is not retried in
    /// process: a second code would void the first. Longer values give a
    /// user who did get the email more time to use it before a possible
    /// second one; shorter values finish the campaign sooner.
    #[serde(default = "defaults::uncertain_delay_seconds")]
    pub uncertain_delay_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address of the HTTP listener for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Distinct `campaign` label values on
    /// `reset_worker_campaign_jobs_total`, 1–1000; further campaigns are
    /// counted as `other`, which keeps the series count bounded.
    #[serde(default = "defaults::max_campaign_labels")]
    pub max_campaign_labels: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After SIGTERM, how long in-flight calls may run before the worker
    /// gives up on them, 1–3600 s. Keep Kubernetes'
    /// `terminationGracePeriodSeconds` above this plus a few seconds for the
    /// final delete flush.
    #[serde(default = "defaults::grace_seconds")]
    pub grace_seconds: u64,
}

#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSettings {
    /// Key for the keyed hash (HMAC-SHA256) that stands for a username in
    /// logs. Set it to correlate log lines across restarts and replicas; when
    /// unset, a random key is drawn at start-up. Never logged.
    #[serde(default, serialize_with = "redacted")]
    pub username_hash_key: Option<SecretString>,
}

impl std::fmt::Debug for LoggingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggingSettings")
            .field(
                "username_hash_key",
                &self.username_hash_key.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    pub const fn wait_time_seconds() -> u64 {
        20
    }
    pub const fn visibility_timeout_seconds() -> u64 {
        60
    }
    pub const fn delete_flush_interval_ms() -> u64 {
        1000
    }
    pub const fn request_timeout_seconds() -> u64 {
        10
    }
    pub const fn concurrency() -> usize {
        8
    }
    pub const fn max_rps() -> u32 {
        10
    }
    pub const fn burst() -> u32 {
        2
    }
    pub const fn initial_delay_ms() -> u64 {
        200
    }
    pub const fn max_delay_ms() -> u64 {
        20_000
    }
    pub const fn max_attempts() -> u32 {
        5
    }
    pub const fn delivery_failure_max_attempts() -> u32 {
        3
    }
    pub const fn limit_exceeded_delay_seconds() -> u64 {
        3600
    }
    pub const fn uncertain_delay_seconds() -> u64 {
        300
    }
    pub const fn listen() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9464)
    }
    pub const fn grace_seconds() -> u64 {
        25
    }
    pub fn ledger_path() -> std::path::PathBuf {
        "reset-worker-ledger.sqlite3".into()
    }
    pub fn ledger_table() -> String {
        "reset-worker-ledger".into()
    }
    pub const fn retention_days() -> u64 {
        30
    }
    pub const fn ledger_max_entries() -> u64 {
        100_000
    }
    pub const fn max_campaign_labels() -> usize {
        20
    }
}

macro_rules! impl_default_from_serde {
    ($($ty:ty),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                // Every field has a serde default, so an empty table is valid.
                figment::Figment::new()
                    .extract::<$ty>()
                    .unwrap_or_else(|e| unreachable!("defaults of {} must be valid: {e}", stringify!($ty)))
            }
        }
    )*};
}
impl_default_from_serde!(
    LimitSettings,
    RetrySettings,
    MetricsSettings,
    ShutdownSettings,
    LedgerSettings
);

fn redacted<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}
