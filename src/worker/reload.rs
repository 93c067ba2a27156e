//! Live configuration: watches the config file (and the client secret file)
//! and applies what can change without a restart.
//!
//! In Kubernetes the config is a mounted ConfigMap, which is updated in place
//! by swapping a symlink. Inotify-style watchers miss or double-report such
//! swaps, so the watcher polls the files' contents instead: cheap at one read
//! every couple of seconds, and correct for every kind of update.
//!
//! Applied live: `limits.max_rps` (0 pauses), `limits.burst`,
//! `limits.regions`, and every
//! pool's client secret from its `client_secret_file`
//! (`cognito.client_secret_file`, `cognito.pools.NAME.client_secret_file`).
//! Any other change is logged as needing a restart. An invalid edit is rejected with one log line and the
//! old values stay in force.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Settings, same_secret};
use crate::rate::Limits;
use crate::worker::Live;

/// How often the files are read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The files that make up the configuration, and their last contents.
struct Watched {
    config: PathBuf,
    /// Every pool's secret file, as the worker started.
    secret_files: Vec<PathBuf>,
    last: Vec<Option<Vec<u8>>>,
}

impl Watched {
    fn read(&self) -> Vec<Option<Vec<u8>>> {
        std::iter::once(&self.config)
            .chain(&self.secret_files)
            .map(|p| std::fs::read(p).ok())
            .collect()
    }
}

/// Polls until `stop` fires. `current` is the configuration the worker
/// started with.
pub async fn watch(
    config: PathBuf,
    current: Settings,
    live: Live,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut watched = Watched {
        secret_files: current
            .cognito
            .all_pools()
            .into_iter()
            .filter_map(|p| p.client_secret_file)
            .collect(),
        config,
        last: Vec::new(),
    };
    watched.last = watched.read();
    let mut applied = Limits::from(&current.limits);
    let mut applied_regions = current.limits.regions.clone();
    let mut restart_needed_logged = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = watched.read();
        if now == watched.last {
            continue;
        }
        watched.last = now;
        match Settings::load(Some(&watched.config)) {
            Err(err) => {
                tracing::error!(
                    file = %watched.config.display(),
                    error = %err,
                    max_rps = applied.max_rps,
                    "config edit rejected; keeping the values in force"
                );
            }
            Ok(new) => {
                let limits = Limits::from(&new.limits);
                if limits != applied || new.limits.regions != applied_regions {
                    tracing::info!(
                        old_max_rps = applied.max_rps,
                        new_max_rps = limits.max_rps,
                        old_burst = applied.burst,
                        new_burst = limits.burst,
                        regions = new.limits.regions.len(),
                        paused = limits.max_rps == 0,
                        "rate limits changed"
                    );
                    live.limiters.set_limits(&new.limits);
                    applied = limits;
                    applied_regions = new.limits.regions.clone();
                }
                update_secret(&live, &new);
                if !restart_needed_logged && needs_restart(&current, &new) {
                    restart_needed_logged = true;
                    tracing::warn!(
                        "config file changed keys that apply only after a restart \
                         (anything but limits.max_rps, limits.burst, limits.regions and the \
                         secret files)"
                    );
                }
            }
        }
    }
}

/// Every running pool's secret, from the new settings. A pool added or
/// removed by the edit is left to the restart warning.
fn update_secret(live: &Live, new: &Settings) {
    for pool in new.cognito.all_pools() {
        let Some(secret) = live.secrets.get(&pool.name) else {
            continue;
        };
        let mut slot = secret.write().unwrap_or_else(|e| e.into_inner());
        if !same_secret(&slot, &pool.client_secret) {
            *slot = pool.client_secret.clone();
            tracing::info!(pool = %pool.name, "client secret reloaded");
        }
    }
}

/// True when something other than the live keys differs: the live values
/// (limits, and the client secret, however it is given) are copied over
/// from `old`, then the settings are compared field by field.
fn needs_restart(old: &Settings, new: &Settings) -> bool {
    let mut comparable = new.clone();
    comparable.limits.max_rps = old.limits.max_rps;
    comparable.limits.burst = old.limits.burst;
    comparable.limits.regions = old.limits.regions.clone();
    comparable.cognito.client_secret = old.cognito.client_secret.clone();
    for (name, pool) in &mut comparable.cognito.pools {
        if let Some(old_pool) = old.cognito.pools.get(name) {
            pool.client_secret = old_pool.client_secret.clone();
        }
    }
    *old != comparable
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn settings() -> Settings {
        serde_json::from_value(serde_json::json!({
            "sqs": {"queue_url": "http://127.0.0.1:1/q"},
            "cognito": {"client_id": "c", "client_secret_file": "/run/secret"},
        }))
        .unwrap()
    }

    #[test]
    fn only_restart_keys_need_a_restart() {
        let old = settings();
        let mut new = old.clone();
        new.limits.max_rps = 3;
        new.limits.burst = 1;
        new.cognito.client_secret = Some(SecretString::from("rotated"));
        assert!(!needs_restart(&old, &new), "live keys only");
        new.limits.concurrency += 1;
        assert!(needs_restart(&old, &new), "concurrency");
        // A pool's rotated secret is live; a new pool is not.
        let mut old = settings();
        old.cognito.pools.insert(
            "b".into(),
            serde_json::from_value(serde_json::json!({"client_id": "cb"})).unwrap(),
        );
        let mut new = old.clone();
        if let Some(b) = new.cognito.pools.get_mut("b") {
            b.client_secret = Some(SecretString::from("rotated-b"));
        }
        assert!(!needs_restart(&old, &new), "a pool's secret only");
        new.cognito.pools.insert(
            "c".into(),
            serde_json::from_value(serde_json::json!({"client_id": "cc"})).unwrap(),
        );
        assert!(needs_restart(&old, &new), "a new pool");
        let mut new = old.clone();
        new.logging.username_hash_key = Some(SecretString::from("other"));
        assert!(needs_restart(&old, &new), "hash key");
    }

    #[test]
    fn every_pools_secret_is_replaced_in_place() {
        use secrecy::ExposeSecret;
        use std::collections::BTreeMap;
        use std::sync::{Arc, RwLock};

        let mut old = settings();
        old.cognito.client_secret = Some(SecretString::from("top-1"));
        old.cognito.pools.insert(
            "b".into(),
            serde_json::from_value(serde_json::json!({"client_id": "cb", "client_secret": "b-1"}))
                .unwrap(),
        );
        // The slots the worker's calls read, as `Pools::secrets` hands them out.
        let secrets: BTreeMap<String, crate::aws::cognito::SharedSecret> = old
            .cognito
            .all_pools()
            .into_iter()
            .map(|p| (p.name, Arc::new(RwLock::new(p.client_secret))))
            .collect();
        let live = Live {
            limiters: Arc::new(crate::rate::Limiters::new(
                &old.limits,
                ["test-region-1".to_owned()],
            )),
            secrets: secrets.clone(),
        };
        let read = |name: &str| {
            secrets[name]
                .read()
                .unwrap()
                .as_ref()
                .map(|s| s.expose_secret().to_owned())
        };
        let mut new = old.clone();
        if let Some(b) = new.cognito.pools.get_mut("b") {
            b.client_secret = Some(SecretString::from("b-2"));
        }
        update_secret(&live, &new);
        assert_eq!(read("b").as_deref(), Some("b-2"));
        assert_eq!(read("default").as_deref(), Some("top-1"));
        new.cognito.client_secret = Some(SecretString::from("top-2"));
        update_secret(&live, &new);
        assert_eq!(read("default").as_deref(), Some("top-2"));
        assert_eq!(read("b").as_deref(), Some("b-2"));
    }
}
