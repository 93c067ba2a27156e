//! `reset-worker config`: every key, its effective value (secrets
//! redacted) and the layer it came from.

use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Serialize;

use super::{ENV_SECRETS, Settings, env_layer};

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
        flatten("", &value, &mut |key, value| {
            let from_env = ENV_SECRETS
                .iter()
                .find(|(k, var)| *k == key && std::env::var_os(var).is_some())
                .map(|(_, var)| format!("`{var}` environment variable"));
            let source = from_env
                .or_else(|| {
                    figment.find_metadata(key).map(|m| match &m.source {
                        Some(src) => format!("{} ({src})", m.name),
                        None => m.name.to_string(),
                    })
                })
                .unwrap_or_else(|| match &self.cognito.client_secret_file {
                    Some(path) if key == "cognito.client_secret" => {
                        format!("file {}", path.display())
                    }
                    _ => "default".to_owned(),
                });
            // An unset scope follows the ledger: show what is in force.
            let (value, source) = match key {
                "limits.scope" if value.is_null() => (
                    serde_json::to_value(self.rate_scope()).unwrap_or_default(),
                    format!("{source} (follows ledger.backend)"),
                ),
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
