//! `reset-worker config`: every key, its effective value (secrets
//! redacted) and the layer it came from.

use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Serialize;

use super::{ENV_SECRETS, Settings, env_layer, env_pool_secrets};

/// One line of `reset-worker config`: a key, its effective value (secrets
/// redacted) and where the value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explained {
    pub key: String,
    pub value: String,
    pub source: String,
}

impl Settings {
    /// Every key with its effective value and source, for `reset-worker config`.
    pub fn explain(&self, file: Option<&Path>) -> Vec<Explained> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        let figment = figment.merge(env_layer());
        let mut out = Vec::new();
        let value = serde_json::to_value(self).unwrap_or_default();
        // Pool secrets from the environment, by their key.
        let pool_secrets: Vec<(String, String)> = env_pool_secrets()
            .into_iter()
            .map(|(pool, var)| (format!("cognito.pools.{pool}.client_secret"), var))
            .collect();
        flatten("", &value, &mut |key, value| {
            let from_env = ENV_SECRETS
                .iter()
                .map(|(k, var)| (*k, *var))
                .chain(
                    pool_secrets
                        .iter()
                        .map(|(k, var)| (k.as_str(), var.as_str())),
                )
                .find(|(k, var)| *k == key && std::env::var_os(var).is_some())
                .map(|(_, var)| format!("`{var}` environment variable"));
            let source = from_env
                .or_else(|| {
                    figment.find_metadata(key).map(|m| match &m.source {
                        Some(src) => format!("{} ({src})", m.name),
                        None => m.name.to_string(),
                    })
                })
                .unwrap_or_else(|| match self.secret_file_of(key) {
                    Some(path) => format!("file {}", path.display()),
                    None => "default".to_owned(),
                });
            // An unset scope follows the ledger: show what is in force.
            let (value, source) = match key {
                "limits.scope" if value.is_null() => (
                    serde_json::to_value(self.rate_scope()).unwrap_or_default(),
                    format!("{source} (follows ledger.backend)"),
                ),
                // A pool's unset action is the top level's: show it.
                k if value.is_null()
                    && k.starts_with("cognito.pools.")
                    && k.ends_with(".action") =>
                {
                    (
                        serde_json::to_value(self.cognito.action).unwrap_or_default(),
                        format!("{source} (follows cognito.action)"),
                    )
                }
                // Likewise its unset sign-out.
                k if value.is_null()
                    && k.starts_with("cognito.pools.")
                    && k.ends_with(".sign_out") =>
                {
                    (
                        serde_json::Value::Bool(self.cognito.sign_out),
                        format!("{source} (follows cognito.sign_out)"),
                    )
                }
                k if value.is_null()
                    && k.starts_with("cognito.pools.")
                    && (k.ends_with(".region") || k.ends_with(".endpoint_url")) =>
                {
                    (value.clone(), format!("{source} (the SDK's)"))
                }
                _ => (value.clone(), source),
            };
            out.push(Explained {
                key: key.to_owned(),
                value: value.to_string(),
                source,
            });
        });
        out
    }
}

impl Settings {
    /// The secret file a `*.client_secret` key was read from, if any.
    fn secret_file_of(&self, key: &str) -> Option<&Path> {
        if key == "cognito.client_secret" {
            return self.cognito.client_secret_file.as_deref();
        }
        let pool = key
            .strip_prefix("cognito.pools.")?
            .strip_suffix(".client_secret")?;
        self.cognito.pools.get(pool)?.client_secret_file.as_deref()
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, f: &mut dyn FnMut(&str, &serde_json::Value)) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, f);
            }
        }
        other => f(prefix, other),
    }
}
