//! Loading the layers and validating the result: every key range-checked,
//! every problem reported with the key's name.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};

use super::{
    Action, ConfigError, DEFAULT_POOL, ENV_SECRETS, LedgerBackend, MAX_POOL_NAME_CHARS,
    MAX_VISIBILITY_SECONDS, Scope, Settings, env_layer, env_pool_secrets, invalid, is_fifo,
};

impl Settings {
    /// Loads the layers, then validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            // `Toml::file` silently skips a missing file; a path the operator
            // named must exist.
            if !path.is_file() {
                return Err(invalid(
                    "--config",
                    format!("names {} which is not a readable file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(env_layer());
        for (key, var) in ENV_SECRETS {
            if let Ok(value) = std::env::var(var) {
                // Verbatim: a string, never parsed.
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        for (pool, var) in env_pool_secrets() {
            if let Ok(value) = std::env::var(&var) {
                // Verbatim too. A name that is not a valid pool name fails
                // below (an unknown key, or the name check), naming the pool,
                // never the value.
                let key = format!("cognito.pools.{pool}.client_secret");
                figment = figment.merge(Serialized::default(&key, value));
            }
        }
        if figment.find_value("dedup").is_ok() {
            return Err(invalid(
                "dedup",
                "was replaced by `[ledger]`: the ledger now remembers every user \
                 (`ledger.backend = \"memory\"` with `ledger.max_entries` is the old \
                 in-process cache); see docs/ledger.md",
            ));
        }
        let mut settings: Settings = figment.extract().map_err(Box::new)?;
        settings.check_pool_names()?;
        settings.resolve_secret_file()?;
        settings.validate()?;
        Ok(settings)
    }

    fn resolve_secret_file(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = self.cognito.client_secret_file.clone() {
            if self.cognito.client_secret.is_some() {
                return Err(invalid(
                    "cognito.client_secret_file",
                    "cannot be used together with `cognito.client_secret`",
                ));
            }
            self.cognito.client_secret =
                Some(read_secret_file("cognito.client_secret_file".into(), path)?);
        }
        for (name, pool) in &mut self.cognito.pools {
            let Some(path) = pool.client_secret_file.clone() else {
                continue;
            };
            if pool.client_secret.is_some() {
                return Err(ConfigError::InvalidPool {
                    pool: name.clone(),
                    key: "client_secret_file",
                    problem: format!(
                        "cannot be used together with `cognito.pools.{name}.client_secret`"
                    ),
                });
            }
            let key = format!("cognito.pools.{name}.client_secret_file");
            pool.client_secret = Some(read_secret_file(key, path)?);
        }
        Ok(())
    }

    /// `enqueue --pool NAME`: the pool must be configured.
    pub fn check_pool(&self, name: &str) -> Result<(), ConfigError> {
        if self.cognito.has_pool(name) {
            return Ok(());
        }
        let configured: Vec<String> = self
            .cognito
            .all_pools()
            .into_iter()
            .map(|p| format!("`{}`", p.name))
            .collect();
        Err(invalid(
            "--pool",
            format!(
                "names a pool that is not configured; configured: {}",
                configured.join(", ")
            ),
        ))
    }

    /// `report --refresh-status --pool NAME`: the pool must be configured
    /// and have a `user_pool_id` (AdminGetUser needs it, whatever the
    /// pool's action).
    pub fn check_status_pool(&self, name: &str) -> Result<(), ConfigError> {
        self.check_pool_id(
            name,
            "is not set; `report --refresh-status` reads each user's status \
             with AdminGetUser, which needs the user pool ID",
        )
    }

    /// `enqueue --from-user-pool --pool NAME`: the pool must be configured
    /// and have a `user_pool_id` (ListUsers needs it).
    pub fn check_list_pool(&self, name: &str) -> Result<(), ConfigError> {
        self.check_pool_id(
            name,
            "is not set; `enqueue --from-user-pool` lists the pool's users \
             with ListUsers, which needs the user pool ID",
        )
    }

    /// The pool must be configured and have a `user_pool_id`; `problem`
    /// says which command needs it.
    fn check_pool_id(&self, name: &str, problem: &str) -> Result<(), ConfigError> {
        self.check_pool(name)?;
        let has_id = self
            .cognito
            .all_pools()
            .iter()
            .any(|p| p.name == name && p.user_pool_id.is_some());
        if has_id {
            return Ok(());
        }
        Err(if name == DEFAULT_POOL {
            invalid("cognito.user_pool_id", problem)
        } else {
            ConfigError::InvalidPool {
                pool: name.to_owned(),
                key: "user_pool_id",
                problem: problem.to_owned(),
            }
        })
    }

    /// `run --until-empty` needs long polls: a short poll (wait 0) samples
    /// only some of SQS's servers and can come back empty while messages
    /// wait, so the worker would report "drained" too early.
    pub fn check_until_empty(&self) -> Result<(), ConfigError> {
        if self.sqs.wait_time_seconds == 0 {
            return Err(invalid(
                "sqs.wait_time_seconds",
                "is 0; `run --until-empty` needs long polls (1-20): a short poll \
                 can come back empty while messages wait",
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url("sqs.queue_url", &self.sqs.queue_url)?;
        if let Some(dlq) = &self.sqs.dead_letter_queue_url {
            check_url("sqs.dead_letter_queue_url", dlq)?;
            if dlq == &self.sqs.queue_url {
                return Err(invalid(
                    "sqs.dead_letter_queue_url",
                    "must differ from `sqs.queue_url`",
                ));
            }
            if is_fifo(dlq) != is_fifo(&self.sqs.queue_url) {
                return Err(invalid(
                    "sqs.dead_letter_queue_url",
                    "must be a FIFO queue exactly when `sqs.queue_url` is one",
                ));
            }
        }
        in_range("sqs.wait_time_seconds", self.sqs.wait_time_seconds, 0, 20)?;
        in_range(
            "sqs.visibility_timeout_seconds",
            self.sqs.visibility_timeout_seconds,
            1,
            MAX_VISIBILITY_SECONDS,
        )?;
        in_range(
            "sqs.delete_flush_interval_ms",
            self.sqs.delete_flush_interval_ms,
            1,
            5000,
        )?;

        let c = &self.cognito;
        if c.client_id.trim().is_empty() {
            return Err(invalid("cognito.client_id", "must not be empty"));
        }
        if c.client_secret
            .as_ref()
            .is_some_and(|s| s.expose_secret().is_empty())
        {
            return Err(invalid(
                "cognito.client_secret",
                "must not be empty when set",
            ));
        }
        if c.client_metadata.len() > 50 {
            return Err(invalid(
                "cognito.client_metadata",
                "has more than 50 entries",
            ));
        }
        in_range(
            "cognito.request_timeout_seconds",
            c.request_timeout_seconds,
            1,
            300,
        )?;
        if self.sqs.visibility_timeout_seconds <= c.request_timeout_seconds {
            return Err(invalid(
                "sqs.visibility_timeout_seconds",
                "must be greater than `cognito.request_timeout_seconds`, or a message \
                 could reappear while its call is still running",
            ));
        }

        let l = &self.limits;
        in_range("limits.concurrency", l.concurrency as u64, 1, 1024)?;
        in_range("limits.max_rps", u64::from(l.max_rps), 0, 10_000)?;
        in_range(
            "limits.burst",
            u64::from(l.burst),
            1,
            u64::from(l.max_rps.max(1)).max(if l.max_rps == 0 { 10_000 } else { 1 }),
        )?;
        for (region, r) in &l.regions {
            if !is_region_name(region) {
                return Err(invalid(
                    "limits.regions",
                    format!(
                        "has a key that is not an AWS Region name (like `eu-west-1`): `{}`",
                        region.escape_debug()
                    ),
                ));
            }
            let key = |k: &str| format!("limits.regions.{region}.{k}");
            if !(1..=10_000).contains(&r.max_rps) {
                return Err(ConfigError::InvalidKey {
                    key: key("max_rps"),
                    problem: format!(
                        "is {}; it must be between 1 and 10000 (pause the campaign with \
                         `limits.max_rps = 0`)",
                        r.max_rps
                    ),
                });
            }
            if let Some(burst) = r.burst
                && !(1..=r.max_rps).contains(&burst)
            {
                return Err(ConfigError::InvalidKey {
                    key: key("burst"),
                    problem: format!("is {burst}; it must be between 1 and {}", r.max_rps),
                });
            }
        }

        let r = &self.retry;
        in_range("retry.initial_delay_ms", r.initial_delay_ms, 1, 60_000)?;
        in_range(
            "retry.max_delay_ms",
            r.max_delay_ms,
            r.initial_delay_ms,
            600_000,
        )?;
        in_range("retry.max_attempts", u64::from(r.max_attempts), 1, 20)?;
        in_range(
            "retry.delivery_failure_max_attempts",
            u64::from(r.delivery_failure_max_attempts),
            1,
            20,
        )?;
        in_range(
            "retry.limit_exceeded_delay_seconds",
            r.limit_exceeded_delay_seconds,
            1,
            MAX_VISIBILITY_SECONDS,
        )?;
        in_range(
            "retry.uncertain_delay_seconds",
            r.uncertain_delay_seconds,
            self.sqs.visibility_timeout_seconds,
            MAX_VISIBILITY_SECONDS,
        )?;
        in_range(
            "shutdown.grace_seconds",
            self.shutdown.grace_seconds,
            1,
            3600,
        )?;
        if self.shutdown.grace_seconds < c.request_timeout_seconds {
            return Err(invalid(
                "shutdown.grace_seconds",
                format!(
                    "is {}; it must be at least `cognito.request_timeout_seconds` ({}), \
                     or a call already sent could be cut off at shutdown and its \
                     message redelivered (a second email)",
                    self.shutdown.grace_seconds, c.request_timeout_seconds
                ),
            ));
        }
        let ledger = &self.ledger;
        if self.limits.scope == Some(Scope::Cluster) && ledger.backend == LedgerBackend::Memory {
            return Err(invalid(
                "limits.scope",
                "is `cluster`, which needs a ledger the workers share \
                 (`ledger.backend = \"sqlite\"` or `\"dynamodb\"`), not `memory`",
            ));
        }
        in_range("ledger.retention_days", ledger.retention_days, 1, 3650)?;
        in_range("ledger.max_entries", ledger.max_entries, 1000, 10_000_000)?;
        if ledger.table.trim().is_empty() {
            return Err(invalid("ledger.table", "must not be empty"));
        }
        if ledger.path.as_os_str().is_empty() {
            return Err(invalid("ledger.path", "must not be empty"));
        }
        in_range(
            "metrics.max_campaign_labels",
            self.metrics.max_campaign_labels as u64,
            1,
            1000,
        )?;
        let no_pool_id = self
            .cognito
            .user_pool_id
            .as_deref()
            .is_none_or(|p| p.trim().is_empty());
        if no_pool_id && self.cognito.action == Action::AdminResetUserPassword {
            return Err(invalid(
                "cognito.user_pool_id",
                "is required when `cognito.action` is `admin_reset_user_password`",
            ));
        }
        if no_pool_id && self.cognito.sign_out {
            return Err(invalid(
                "cognito.user_pool_id",
                "is required when `cognito.sign_out` is true (AdminUserGlobalSignOut names the pool)",
            ));
        }
        self.validate_pools()
    }

    /// The named pools' names, checked first: before a pool's secret file
    /// is read, and before an error could quote a name that is not one.
    fn check_pool_names(&self) -> Result<(), ConfigError> {
        for name in self.cognito.pools.keys() {
            if name == DEFAULT_POOL {
                return Err(invalid(
                    "cognito.pools.default",
                    "is not allowed: the top-level `cognito.*` keys are the pool named \
                     `default`; give this pool another name",
                ));
            }
            if !is_pool_name(name) {
                return Err(invalid(
                    "cognito.pools",
                    format!(
                        "has a pool whose name is not 1-{MAX_POOL_NAME_CHARS} characters \
                         of a-z, 0-9, `_` and `-`: `{}`",
                        name.escape_debug()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The named pools' keys, and what their action needs. The `default`
    /// pool is the top level, checked above.
    fn validate_pools(&self) -> Result<(), ConfigError> {
        for (name, p) in &self.cognito.pools {
            let pool_err = |key: &'static str, problem: &str| ConfigError::InvalidPool {
                pool: name.clone(),
                key,
                problem: problem.to_owned(),
            };
            if p.client_id.trim().is_empty() {
                return Err(pool_err("client_id", "must not be empty"));
            }
            if p.client_secret
                .as_ref()
                .is_some_and(|s| s.expose_secret().is_empty())
            {
                return Err(pool_err("client_secret", "must not be empty when set"));
            }
            if p.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
                return Err(pool_err("region", "must not be empty when set"));
            }
            if let Some(url) = &p.endpoint_url
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                return Err(pool_err("endpoint_url", "must be an http(s) URL"));
            }
            let action = p.action.unwrap_or(self.cognito.action);
            let no_pool_id = p
                .user_pool_id
                .as_deref()
                .is_none_or(|id| id.trim().is_empty());
            if no_pool_id && action == Action::AdminResetUserPassword {
                return Err(pool_err(
                    "user_pool_id",
                    "is required when the pool's action is `admin_reset_user_password`",
                ));
            }
            if no_pool_id && p.sign_out.unwrap_or(self.cognito.sign_out) {
                return Err(pool_err(
                    "user_pool_id",
                    "is required when the pool signs users out (`sign_out`, or `cognito.sign_out`)",
                ));
            }
        }
        Ok(())
    }

    /// Whose budget `limits.max_rps` is: as configured, else `cluster` with
    /// a shared ledger and `process` with the memory ledger.
    pub fn rate_scope(&self) -> Scope {
        self.limits.scope.unwrap_or(match self.ledger.backend {
            LedgerBackend::Memory => Scope::Process,
            LedgerBackend::Sqlite | LedgerBackend::Dynamodb => Scope::Cluster,
        })
    }

    pub fn visibility_timeout(&self) -> Duration {
        Duration::from_secs(self.sqs.visibility_timeout_seconds)
    }
}

/// Reads a client secret file; trailing whitespace (the newline an editor
/// or `kubectl create secret --from-file` leaves) is not part of the secret.
fn read_secret_file(key: String, path: std::path::PathBuf) -> Result<SecretString, ConfigError> {
    let raw = std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretFile {
        key,
        path,
        source,
    })?;
    Ok(SecretString::from(raw.trim_end().to_owned()))
}

/// A pool name: 1-64 characters of `a-z`, `0-9`, `_` and `-`. Lower case
/// only, because figment lower-cases environment keys: a pool named `EU`
/// could never be reached by `RESET_WORKER_COGNITO__POOLS__EU__*`.
fn is_pool_name(name: &str) -> bool {
    (1..=MAX_POOL_NAME_CHARS).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// An AWS Region name: lower-case words and a number, joined by `-`
/// (`eu-west-1`, `us-gov-west-1`, `ap-southeast-2`).
fn is_region_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    parts.len() >= 3
        && name.len() <= 32
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(invalid(key, "must be an http(s) queue URL"))
    }
}

fn in_range(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("is {value}; it must be between {min} and {max}"),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;
    use figment::Jail;

    const REQUIRED: &str = r#"
        [sqs]
        queue_url = "http://127.0.0.1:5000/123456789012/jobs"
        [cognito]
        client_id = "client-1"
    "#;

    fn load_err(jail: &mut Jail, toml: &str) -> String {
        jail.create_file("c.toml", toml).unwrap();
        Settings::load(Some(Path::new("c.toml")))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_file_plus_env_is_valid_and_env_wins() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("RESET_WORKER_SQS__QUEUE_URL", "https://sqs.example/1/q");
            jail.set_env("RESET_WORKER_COGNITO__CLIENT_ID", "abc");
            jail.set_env("RESET_WORKER_COGNITO__CLIENT_SECRET", "s3cr3t-value");
            jail.set_env("RESET_WORKER_LIMITS__CONCURRENCY", "3");
            jail.set_env("RESET_WORKER_COGNITO__CLIENT_METADATA__REASON", "breach");
            jail.set_env("RESET_WORKER_CONFIG", "ignored: not a key");
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/reset-worker.toml");
            let s = Settings::load(Some(&path)).unwrap();
            assert_eq!(s.sqs.queue_url, "https://sqs.example/1/q");
            assert_eq!(s.limits.concurrency, 3);
            assert_eq!(s.limits.max_rps, 10);
            assert_eq!(s.cognito.client_metadata["reason"], "breach");
            let debug = format!("{s:?}");
            assert!(!debug.contains("s3cr3t-value"), "{debug}");
            assert!(debug.contains("[redacted]"));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load_err(jail, &format!("{REQUIRED}\n[limits]\nconcurency = 3\n"));
            assert!(err.contains("concurency"), "{err}");
            jail.set_env("RESET_WORKER_SQS__QUEUE_URLL", "x");
            let err = load_err(jail, REQUIRED);
            assert!(err.contains("queue_urll"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_and_out_of_range_values_are_named() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load_err(jail, "[sqs]\nqueue_url = \"http://x/q\"\n");
            assert!(err.contains("cognito"), "{err}");
            let cases = [
                ("[limits]\nconcurrency = 0", "limits.concurrency"),
                ("[limits]\nmax_rps = 10001", "limits.max_rps"),
                ("[limits]\nburst = 50", "limits.burst"),
                (
                    "[limits.regions.eu-west-1]\nmax_rps = 0",
                    "limits.regions.eu-west-1.max_rps",
                ),
                (
                    "[limits.regions.eu-west-1]\nmax_rps = 5\nburst = 6",
                    "limits.regions.eu-west-1.burst",
                ),
                ("[limits.regions.Europe]\nmax_rps = 5", "limits.regions"),
                (
                    "[limits.regions.eu-west-1]\nmax_rps = 5\nbrust = 1",
                    "brust",
                ),
                (
                    "[retry]\nlimit_exceeded_delay_seconds = 50000",
                    "retry.limit_exceeded_delay_seconds",
                ),
                (
                    "[retry]\ninitial_delay_ms = 500\nmax_delay_ms = 100",
                    "retry.max_delay_ms",
                ),
                (
                    // Below the default visibility timeout (60 s).
                    "[retry]\nuncertain_delay_seconds = 30",
                    "retry.uncertain_delay_seconds",
                ),
                ("[sqs_extra]\nx = 1", "sqs_extra"),
            ];
            for (extra, key) in cases {
                let err = load_err(jail, &format!("{REQUIRED}\n{extra}\n"));
                assert!(err.contains(key), "{extra}: {err}");
            }
            let err = load_err(
                jail,
                "[sqs]\nqueue_url = \"http://x/q\"\nwait_time_seconds = 21\n[cognito]\nclient_id = \"c\"\n",
            );
            assert!(err.contains("sqs.wait_time_seconds"), "{err}");
            let err = load_err(
                jail,
                "[sqs]\nqueue_url = \"q\"\n[cognito]\nclient_id = \"c\"\n",
            );
            assert!(err.contains("sqs.queue_url"), "{err}");
            let err = load_err(
                jail,
                "[sqs]\nqueue_url = \"http://x/q\"\nvisibility_timeout_seconds = 5\n[cognito]\nclient_id = \"c\"\n",
            );
            assert!(err.contains("visibility_timeout_seconds"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secret_from_file_and_not_both() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("secret", "from-file\n")?;
            jail.set_env("RESET_WORKER_COGNITO__CLIENT_SECRET_FILE", "secret");
            jail.create_file("c.toml", REQUIRED)?;
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(
                s.cognito.client_secret.as_ref().unwrap().expose_secret(),
                "from-file"
            );
            jail.set_env("RESET_WORKER_COGNITO__CLIENT_SECRET", "inline");
            let err = load_err(jail, REQUIRED);
            assert!(err.contains("client_secret_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_from_env_are_verbatim_and_never_echoed() {
        // Hardening #14: a 19-digit secret failed to load, and the error
        // printed it; a quoted one was silently unquoted.
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", REQUIRED)?;
            for secret in ["1234567890123456789", "\"quoted\"", "true", "[1, 2]"] {
                jail.set_env("RESET_WORKER_COGNITO__CLIENT_SECRET", secret);
                jail.set_env("RESET_WORKER_LOGGING__USERNAME_HASH_KEY", secret);
                let s = Settings::load(Some(Path::new("c.toml")))
                    .map_err(|e| format!("{secret}: {e}"))?;
                let got = s.cognito.client_secret.as_ref().map(|s| s.expose_secret());
                assert_eq!(got, Some(secret));
                let key = s
                    .logging
                    .username_hash_key
                    .as_ref()
                    .map(|s| s.expose_secret());
                assert_eq!(key, Some(secret));
            }
            // An invalid config never quotes the secret it was given.
            jail.set_env("RESET_WORKER_COGNITO__CLIENT_SECRET", "9876543210987654321");
            jail.set_env("RESET_WORKER_LIMITS__CONCURRENCY", "0");
            let err = load_err(jail, REQUIRED);
            assert!(!err.contains("9876543210987654321"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn grace_period_must_cover_a_call() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load_err(
                jail,
                &format!("{REQUIRED}\n[shutdown]\ngrace_seconds = 5\n"),
            );
            assert!(err.contains("shutdown.grace_seconds"), "{err}");
            assert!(err.contains("request_timeout_seconds"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn until_empty_needs_long_polls() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                "[sqs]\nqueue_url = \"http://x/q\"\nwait_time_seconds = 0\n[cognito]\nclient_id = \"c\"\n",
            )?;
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            let err = s.check_until_empty().unwrap_err().to_string();
            assert!(err.contains("sqs.wait_time_seconds"), "{err}");
            jail.set_env("RESET_WORKER_SQS__WAIT_TIME_SECONDS", "1");
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert!(s.check_until_empty().is_ok());
            Ok(())
        });
    }

    #[test]
    fn the_rate_scope_follows_the_ledger_unless_set() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", REQUIRED)?;
            let load = || Settings::load(Some(Path::new("c.toml")));
            assert_eq!(load().unwrap().rate_scope(), Scope::Cluster);
            jail.set_env("RESET_WORKER_LEDGER__BACKEND", "memory");
            assert_eq!(load().unwrap().rate_scope(), Scope::Process);
            // A cluster budget needs a ledger the workers share.
            jail.set_env("RESET_WORKER_LIMITS__SCOPE", "cluster");
            let err = load().unwrap_err().to_string();
            assert!(err.contains("`limits.scope`"), "{err}");
            jail.set_env("RESET_WORKER_LEDGER__BACKEND", "dynamodb");
            jail.set_env("RESET_WORKER_LIMITS__SCOPE", "process");
            assert_eq!(load().unwrap().rate_scope(), Scope::Process);
            Ok(())
        });
    }

    #[test]
    fn the_old_dedup_section_points_to_the_ledger() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                &format!("{REQUIRED}\n[dedup]\nwindow_seconds = 60\n"),
            )?;
            let err = Settings::load(Some(Path::new("c.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("`dedup`") && err.contains("[ledger]"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_named_pool_inherits_action_and_region() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                &format!(
                    "{REQUIRED}action = \"admin_reset_user_password\"\nuser_pool_id = \"us-east-1_top\"\n\
                     [cognito.pools.b]\nclient_id = \"client-b\"\nuser_pool_id = \"eu-west-1_b\"\n\
                     [cognito.pools.eu-2]\nclient_id = \"client-eu\"\nregion = \"eu-west-2\"\n\
                     action = \"forgot_password\"\nendpoint_url = \"http://127.0.0.1:9\"\n"
                ),
            )?;
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            let pools = s.cognito.all_pools();
            let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["default", "b", "eu-2"]);
            assert_eq!(pools[0].client_id, "client-1");
            assert_eq!(pools[0].action, Action::AdminResetUserPassword);
            // `b` sets neither: the top level's action, the SDK's Region.
            assert_eq!(pools[1].client_id, "client-b");
            assert_eq!(pools[1].action, Action::AdminResetUserPassword);
            assert_eq!(pools[1].region, None);
            assert_eq!(pools[1].endpoint_url, None);
            assert_eq!(pools[1].user_pool_id.as_deref(), Some("eu-west-1_b"));
            assert!(pools[1].client_secret.is_none());
            assert_eq!(pools[2].action, Action::ForgotPassword);
            assert_eq!(pools[2].region.as_deref(), Some("eu-west-2"));
            assert_eq!(pools[2].endpoint_url.as_deref(), Some("http://127.0.0.1:9"));
            assert!(s.cognito.has_pool("b") && s.cognito.has_pool("default"));
            assert!(!s.cognito.has_pool("nope"));
            assert!(s.check_pool("b").is_ok());
            let err = s.check_pool("nope").unwrap_err().to_string();
            assert!(err.contains("--pool") && err.contains("`b`"), "{err}");
            // An inherited admin action needs the pool's own ID.
            let err = load_err(
                jail,
                &format!(
                    "{REQUIRED}action = \"admin_reset_user_password\"\nuser_pool_id = \"p\"\n\
                     [cognito.pools.b]\nclient_id = \"client-b\"\n"
                ),
            );
            assert!(err.contains("`cognito.pools.b.user_pool_id`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn sign_out_is_inherited_and_needs_the_pool_id() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            // Without the ID, the key that is missing is named.
            let err = load_err(jail, &format!("{REQUIRED}sign_out = true\n"));
            assert!(
                err.contains("`cognito.user_pool_id`") && err.contains("sign_out"),
                "{err}"
            );
            let err = load_err(
                jail,
                &format!(
                    "{REQUIRED}sign_out = true\nuser_pool_id = \"p\"\n\
                     [cognito.pools.b]\nclient_id = \"client-b\"\n"
                ),
            );
            assert!(err.contains("`cognito.pools.b.user_pool_id`"), "{err}");
            // A pool may opt out of an inherited sign-out, or in on its own.
            jail.create_file(
                "c.toml",
                &format!(
                    "{REQUIRED}sign_out = true\nuser_pool_id = \"p\"\n\
                     [cognito.pools.b]\nclient_id = \"client-b\"\nsign_out = false\n\
                     [cognito.pools.c]\nclient_id = \"client-c\"\nuser_pool_id = \"pc\"\n"
                ),
            )?;
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            let signs_out: Vec<bool> = s.cognito.all_pools().iter().map(|p| p.sign_out).collect();
            assert_eq!(signs_out, [true, false, true]);
            jail.set_env("RESET_WORKER_COGNITO__SIGN_OUT", "false");
            jail.set_env("RESET_WORKER_COGNITO__POOLS__C__SIGN_OUT", "false");
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert!(s.cognito.all_pools().iter().all(|p| !p.sign_out));
            Ok(())
        });
    }

    #[test]
    fn a_pool_named_default_or_badly_is_rejected() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load_err(
                jail,
                &format!("{REQUIRED}[cognito.pools.default]\nclient_id = \"x\"\n"),
            );
            assert!(err.contains("`cognito.pools.default`"), "{err}");
            for name in ["B", "\"a b\"", "\"a.b\"", "\"\"", &"p".repeat(65), "\"é\""] {
                let err = load_err(
                    jail,
                    &format!("{REQUIRED}[cognito.pools.{name}]\nclient_id = \"x\"\n"),
                );
                assert!(err.contains("`cognito.pools`"), "{name}: {err}");
            }
            let ok = "p".repeat(64);
            jail.create_file(
                "c.toml",
                &format!("{REQUIRED}[cognito.pools.{ok}]\nclient_id = \"x\"\n"),
            )?;
            assert!(Settings::load(Some(Path::new("c.toml"))).is_ok());
            // Unknown keys are errors in a pool too; client_id is required.
            let err = load_err(
                jail,
                &format!(
                    "{REQUIRED}[cognito.pools.b]\nclient_id = \"x\"\nclient_metadata = {{}}\n"
                ),
            );
            assert!(err.contains("client_metadata"), "{err}");
            let err = load_err(
                jail,
                &format!("{REQUIRED}[cognito.pools.b]\nregion = \"eu-west-1\"\n"),
            );
            assert!(err.contains("client_id"), "{err}");
            let err = load_err(
                jail,
                &format!(
                    "{REQUIRED}[cognito.pools.b]\nclient_id = \"x\"\nendpoint_url = \"localhost\"\n"
                ),
            );
            assert!(err.contains("`cognito.pools.b.endpoint_url`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_pool_secret_inline_or_from_a_file_not_both() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("b-secret", "secret-b\n")?;
            let pool = "[cognito.pools.b]\nclient_id = \"client-b\"\n";
            jail.create_file(
                "c.toml",
                &format!("{REQUIRED}{pool}client_secret_file = \"b-secret\"\n"),
            )?;
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            let b = &s.cognito.all_pools()[1];
            assert_eq!(
                b.client_secret.as_ref().map(|s| s.expose_secret()),
                Some("secret-b")
            );
            assert!(!format!("{s:?}").contains("secret-b"));
            let err = load_err(
                jail,
                &format!(
                    "{REQUIRED}{pool}client_secret = \"x\"\nclient_secret_file = \"b-secret\"\n"
                ),
            );
            assert!(
                err.contains("`cognito.pools.b.client_secret_file`"),
                "{err}"
            );
            // The env var's secret and the file's are both forms too.
            jail.set_env("RESET_WORKER_COGNITO__POOLS__B__CLIENT_SECRET", "inline");
            let err = load_err(
                jail,
                &format!("{REQUIRED}{pool}client_secret_file = \"b-secret\"\n"),
            );
            assert!(
                err.contains("`cognito.pools.b.client_secret_file`"),
                "{err}"
            );
            let err = load_err(
                jail,
                &format!("{REQUIRED}{pool}client_secret_file = \"missing\"\n"),
            );
            assert!(err.contains("cognito.pools.b.client_secret_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_pool_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", REQUIRED)?;
            jail.set_env("RESET_WORKER_COGNITO__POOLS__B__CLIENT_ID", "client-b-env");
            jail.set_env("RESET_WORKER_COGNITO__POOLS__B__REGION", "eu-west-1");
            // Verbatim, like the top level's: a numeric secret stays a string.
            jail.set_env(
                "RESET_WORKER_COGNITO__POOLS__B__CLIENT_SECRET",
                "1234567890123456789",
            );
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            let pools = s.cognito.all_pools();
            assert_eq!(pools.len(), 2);
            assert_eq!(pools[1].name, "b");
            assert_eq!(pools[1].client_id, "client-b-env");
            assert_eq!(pools[1].region.as_deref(), Some("eu-west-1"));
            assert_eq!(
                pools[1].client_secret.as_ref().map(|s| s.expose_secret()),
                Some("1234567890123456789")
            );
            // `reset-worker config` shows the pool, its secret redacted, and
            // where the secret came from.
            let lines = s.explain(Some(Path::new("c.toml")));
            let line = |key: &str| lines.iter().find(|l| l.key == key).cloned();
            let secret = line("cognito.pools.b.client_secret").unwrap();
            assert_eq!(secret.value, "\"[redacted]\"");
            assert!(
                secret
                    .source
                    .contains("RESET_WORKER_COGNITO__POOLS__B__CLIENT_SECRET")
            );
            assert_eq!(
                line("cognito.pools.b.client_id").unwrap().value,
                "\"client-b-env\""
            );
            assert!(!format!("{lines:?}").contains("1234567890123456789"));
            // An unset action shows the one in force.
            let action = line("cognito.pools.b.action").unwrap();
            assert_eq!(action.value, "\"forgot_password\"");
            assert!(
                action.source.contains("follows cognito.action"),
                "{action:?}"
            );
            let sign_out = line("cognito.pools.b.sign_out").unwrap();
            assert_eq!(sign_out.value, "false");
            assert!(
                sign_out.source.contains("follows cognito.sign_out"),
                "{sign_out:?}"
            );
            // A secret alone, for a pool with no client_id, never echoes it.
            jail.set_env("RESET_WORKER_COGNITO__POOLS__B__CLIENT_ID", "");
            jail.set_env(
                "RESET_WORKER_COGNITO__POOLS__C__CLIENT_SECRET",
                "9876543210987654321",
            );
            let err = load_err(jail, REQUIRED);
            assert!(!err.contains("9876543210987654321"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/reset-worker.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--config"), "{err}");
    }
}
