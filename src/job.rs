//! The job message: parsed once, here, into a typed [`ResetJob`].
//!
//! A body that does not parse is a permanent outcome for its message
//! (`rejected`), never a panic. Error texts never quote the body: it holds a
//! username, which is personal data, and these texts reach logs and the
//! dead-letter queue's attributes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::crypto::hmac_sha256;

/// Cognito's own limit for a username.
pub const MAX_USERNAME_CHARS: usize = 128;
/// Bounds that keep one message from blowing up a request or a log line.
pub const MAX_CLIENT_METADATA_ENTRIES: usize = 50;
pub const MAX_METADATA_KEY_CHARS: usize = 256;
pub const MAX_METADATA_VALUE_CHARS: usize = 2048;
pub const MAX_CAMPAIGN_ID_CHARS: usize = 128;
pub const MAX_ENCODED_DATA_CHARS: usize = 16 * 1024;
pub const MAX_ENDPOINT_ID_CHARS: usize = 256;
/// Pool names are at most 64 characters (`cognito.pools.NAME`): a longer
/// one can name no configured pool, and is refused as invalid instead.
pub const MAX_POOL_CHARS: usize = 64;

/// A username. Its `Debug` and `Display` never show it: use [`UserHasher`]
/// to refer to a user in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: String) -> Result<Self, JobError> {
        if raw.trim().is_empty() {
            return Err(JobError::Invalid {
                field: "username",
                problem: "is empty",
            });
        }
        if raw.chars().count() > MAX_USERNAME_CHARS {
            return Err(JobError::Invalid {
                field: "username",
                problem: "is longer than 128 characters",
            });
        }
        if raw.chars().any(char::is_control) {
            return Err(JobError::Invalid {
                field: "username",
                problem: "contains a control character",
            });
        }
        Ok(Self(raw))
    }

    /// The raw username, for the Cognito request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Username([redacted])")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserContext {
    pub ip_address: Option<String>,
    pub encoded_data: Option<String>,
}

/// One validated reset job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetJob {
    pub username: Username,
    pub campaign_id: Option<String>,
    /// The user pool, by its configured name; `None` is the `default`
    /// pool. Whether the name is configured is the worker's to say.
    pub pool: Option<String>,
    pub client_metadata: BTreeMap<String, String>,
    pub user_context: Option<UserContext>,
    pub analytics_endpoint_id: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    #[error("body is not valid JSON ({category} at line {line} column {column})")]
    Json {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("body does not match the job format: {0}")]
    Shape(String),
    #[error("SNS envelope `Message` is not a string")]
    Envelope,
    #[error("`{field}` {problem}")]
    Invalid {
        field: &'static str,
        problem: &'static str,
    },
}

impl JobError {
    /// A short, fixed reason code for metrics and dead-letter attributes.
    pub fn reason(&self) -> &'static str {
        match self {
            JobError::Json { .. } => "invalid_json",
            JobError::Shape(_) => "invalid_shape",
            JobError::Envelope => "invalid_envelope",
            JobError::Invalid { .. } => "invalid_field",
        }
    }

    fn from_serde(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                // serde's data errors quote offending *values* ("invalid type:
                // string \"alice@…\""), but its field errors only name keys.
                let text = e.to_string();
                let safe = ["unknown field", "missing field", "duplicate field"]
                    .iter()
                    .any(|p| text.starts_with(p));
                if safe {
                    let head = text.split(", expected").next().unwrap_or(&text);
                    let head = head.split(" at line").next().unwrap_or(head);
                    JobError::Shape(head.to_owned())
                } else {
                    JobError::Shape(format!(
                        "wrong type or value at line {} column {}",
                        e.line(),
                        e.column()
                    ))
                }
            }
            other => JobError::Json {
                category: match other {
                    Category::Eof => "unexpected end",
                    Category::Io => "io",
                    _ => "syntax error",
                },
                line: e.line(),
                column: e.column(),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    username: String,
    #[serde(default)]
    campaign_id: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    client_metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    user_context_data: Option<RawUserContext>,
    #[serde(default)]
    analytics_endpoint_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserContext {
    #[serde(default)]
    ip_address: Option<String>,
    #[serde(default)]
    encoded_data: Option<String>,
}

/// The parts of an SNS notification we need; SNS adds many more fields.
#[derive(Deserialize)]
struct SnsEnvelope {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Message")]
    message: serde_json::Value,
}

impl ResetJob {
    /// Parses a message body: a job object, or a job object inside an SNS
    /// notification's `Message` string.
    pub fn parse(body: &str) -> Result<Self, JobError> {
        let inner = match serde_json::from_str::<SnsEnvelope>(body) {
            Ok(env) if env.kind == "Notification" => match env.message {
                serde_json::Value::String(s) => Some(s),
                _ => return Err(JobError::Envelope),
            },
            _ => None,
        };
        let text = inner.as_deref().unwrap_or(body);
        // serde's derived structs also accept a JSON *array* of field values
        // (`["alice@…", "campaign"]`), which would silently misassign
        // fields. Only objects are jobs.
        let shape: serde_json::Value =
            serde_json::from_str(text).map_err(|e| JobError::from_serde(&e))?;
        let Some(object) = shape.as_object() else {
            return Err(JobError::Shape("the job is not a JSON object".into()));
        };
        if object
            .get("user_context_data")
            .is_some_and(|v| !v.is_object() && !v.is_null())
        {
            return Err(JobError::Shape(
                "`user_context_data` is not a JSON object".into(),
            ));
        }
        let raw: RawJob = serde_json::from_str(text).map_err(|e| JobError::from_serde(&e))?;
        Self::validate(raw)
    }

    fn validate(raw: RawJob) -> Result<Self, JobError> {
        let username = Username::parse(raw.username)?;
        if let Some(id) = &raw.campaign_id {
            check_text("campaign_id", id, MAX_CAMPAIGN_ID_CHARS)?;
            if id.trim().is_empty() {
                return Err(JobError::Invalid {
                    field: "campaign_id",
                    problem: "is empty",
                });
            }
        }
        if let Some(pool) = &raw.pool {
            check_text("pool", pool, MAX_POOL_CHARS)?;
            if pool.trim().is_empty() {
                return Err(JobError::Invalid {
                    field: "pool",
                    problem: "is empty",
                });
            }
        }
        let client_metadata = raw.client_metadata.unwrap_or_default();
        if client_metadata.len() > MAX_CLIENT_METADATA_ENTRIES {
            return Err(JobError::Invalid {
                field: "client_metadata",
                problem: "has more than 50 entries",
            });
        }
        for (k, v) in &client_metadata {
            check_text("client_metadata", k, MAX_METADATA_KEY_CHARS)?;
            if k.is_empty() {
                return Err(JobError::Invalid {
                    field: "client_metadata",
                    problem: "has an empty key",
                });
            }
            if v.chars().count() > MAX_METADATA_VALUE_CHARS {
                return Err(JobError::Invalid {
                    field: "client_metadata",
                    problem: "has a value longer than 2048 characters",
                });
            }
        }
        let user_context = match raw.user_context_data {
            None => None,
            Some(ctx) => {
                if let Some(ip) = &ctx.ip_address
                    && ip.parse::<IpAddr>().is_err()
                {
                    return Err(JobError::Invalid {
                        field: "user_context_data.ip_address",
                        problem: "is not an IP address",
                    });
                }
                if let Some(data) = &ctx.encoded_data {
                    check_text(
                        "user_context_data.encoded_data",
                        data,
                        MAX_ENCODED_DATA_CHARS,
                    )?;
                }
                Some(UserContext {
                    ip_address: ctx.ip_address,
                    encoded_data: ctx.encoded_data,
                })
            }
        };
        if let Some(id) = &raw.analytics_endpoint_id {
            check_text("analytics_endpoint_id", id, MAX_ENDPOINT_ID_CHARS)?;
        }
        Ok(ResetJob {
            username,
            campaign_id: raw.campaign_id,
            pool: raw.pool,
            client_metadata,
            user_context,
            analytics_endpoint_id: raw.analytics_endpoint_id,
        })
    }

    /// The `ClientMetadata` to send: campaign defaults, overridden key by key
    /// by the job's own values.
    pub fn merged_metadata(&self, defaults: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut merged = defaults.clone();
        merged.extend(self.client_metadata.clone());
        merged
    }
}

fn check_text(field: &'static str, value: &str, max_chars: usize) -> Result<(), JobError> {
    if value.chars().count() > max_chars {
        return Err(JobError::Invalid {
            field,
            problem: "is too long",
        });
    }
    if value.chars().any(char::is_control) {
        return Err(JobError::Invalid {
            field,
            problem: "contains a control character",
        });
    }
    Ok(())
}

/// Turns usernames into short keyed hashes for logs, so an operator can
/// follow one user through the log lines without the log holding the address.
/// Keyed, because a plain hash of an email address is easy to reverse by
/// hashing candidate addresses.
#[derive(Clone)]
pub struct UserHasher {
    key: SecretString,
}

impl UserHasher {
    /// Uses `key` when given, else a random per-process key.
    pub fn new(key: Option<SecretString>) -> Self {
        let key = key.unwrap_or_else(|| {
            let mut bytes = [0u8; 32];
            // With no OS randomness, fall back to a time-based key: still
            // keyed per process, which is all the logs need.
            if getrandom::fill(&mut bytes).is_err() {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                bytes[..16].copy_from_slice(&nanos.to_le_bytes());
            }
            SecretString::from(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                bytes,
            ))
        });
        Self { key }
    }

    /// 16 bytes of HMAC-SHA256(key, campaign || 0 || username): the
    /// duplicate-suppression key, which holds no username.
    pub fn pair_key(&self, campaign: &str, username: &Username) -> [u8; 16] {
        let digest = hmac_sha256(
            self.key.expose_secret().as_bytes(),
            &[campaign.as_bytes(), &[0], username.expose().as_bytes()],
        );
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }

    /// 16 hex characters of HMAC-SHA256(key, username).
    pub fn user_ref(&self, username: &Username) -> String {
        let digest = hmac_sha256(
            self.key.expose_secret().as_bytes(),
            &[username.expose().as_bytes()],
        );
        hex::encode(&digest[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_job() {
        let job = ResetJob::parse(
            r#"{"username":"alice@example.com","campaign_id":"c1",
                "client_metadata":{"reason":"breach"},
                "user_context_data":{"ip_address":"203.0.113.7","encoded_data":"abc"},
                "analytics_endpoint_id":"ep-1"}"#,
        )
        .unwrap();
        assert_eq!(job.username.expose(), "alice@example.com");
        assert_eq!(job.campaign_id.as_deref(), Some("c1"));
        assert_eq!(job.client_metadata["reason"], "breach");
        let ctx = job.user_context.unwrap();
        assert_eq!(ctx.ip_address.as_deref(), Some("203.0.113.7"));
        assert_eq!(ctx.encoded_data.as_deref(), Some("abc"));
        assert_eq!(job.analytics_endpoint_id.as_deref(), Some("ep-1"));
    }

    #[test]
    fn only_username_is_required() {
        let job = ResetJob::parse(r#"{"username":"bob"}"#).unwrap();
        assert_eq!(job.username.expose(), "bob");
        assert!(job.client_metadata.is_empty());
        assert!(job.user_context.is_none());
    }

    #[test]
    fn unwraps_sns_envelope() {
        let inner = r#"{"username":"carol@example.com","campaign_id":"c2"}"#;
        let body = serde_json::json!({
            "Type": "Notification", "MessageId": "x", "TopicArn": "arn:aws:sns:...",
            "Message": inner, "Timestamp": "2026-11-29T00:00:00Z"
        })
        .to_string();
        let job = ResetJob::parse(&body).unwrap();
        assert_eq!(job.username.expose(), "carol@example.com");
        assert_eq!(job.campaign_id.as_deref(), Some("c2"));
    }

    #[test]
    fn rejects_bad_bodies_without_quoting_them() {
        let cases: &[(&str, &str)] = &[
            ("not json", "invalid_json"),
            ("[]", "invalid_shape"),
            (r#"["alice@example.com","c1"]"#, "invalid_shape"),
            (
                r#"{"username":"a","user_context_data":["1.2.3.4","x"]}"#,
                "invalid_shape",
            ),
            ("null", "invalid_shape"),
            (r#"{"user_name":"alice@example.com"}"#, "invalid_shape"),
            (
                r#"{"username":"alice@example.com","extra":1}"#,
                "invalid_shape",
            ),
            (r#"{"username":42}"#, "invalid_shape"),
            (r#"{"username":""}"#, "invalid_field"),
            (r#"{"username":"   "}"#, "invalid_field"),
            (r#"{"username":"a\u0000b"}"#, "invalid_field"),
            (r#"{"username":"a\nb"}"#, "invalid_field"),
            (
                r#"{"username":"alice@example.com","client_metadata":{"k":1}}"#,
                "invalid_shape",
            ),
            (
                r#"{"username":"alice@example.com","user_context_data":{"ip_address":"nope"}}"#,
                "invalid_field",
            ),
            (
                r#"{"username":"alice@example.com","username":"eve@example.com"}"#,
                "invalid_shape",
            ),
            (
                r#"{"Type":"Notification","Message":{"username":"x"}}"#,
                "invalid_envelope",
            ),
            (
                r#"{"Type":"Notification","Message":"garbage"}"#,
                "invalid_json",
            ),
        ];
        for (body, reason) in cases {
            let err = ResetJob::parse(body).expect_err(body);
            assert_eq!(err.reason(), *reason, "{body}: {err}");
            let text = err.to_string();
            assert!(!text.contains("alice"), "{text}");
            assert!(!text.contains("eve@"), "{text}");
        }
    }

    #[test]
    fn the_pool_field_is_optional_and_validated() {
        let job = ResetJob::parse(r#"{"username":"a","pool":"eu-1"}"#).unwrap();
        assert_eq!(job.pool.as_deref(), Some("eu-1"));
        let job = ResetJob::parse(r#"{"username":"a"}"#).unwrap();
        assert_eq!(job.pool, None);
        // Null is the same as absent: the default pool.
        let job = ResetJob::parse(r#"{"username":"a","pool":null}"#).unwrap();
        assert_eq!(job.pool, None);
        // Any name that passes is the worker's to look up; an unknown one is
        // `unknown_pool` there, not an invalid body here.
        let job = ResetJob::parse(r#"{"username":"a","pool":"nope"}"#).unwrap();
        assert_eq!(job.pool.as_deref(), Some("nope"));
        let ok = "p".repeat(MAX_POOL_CHARS);
        assert!(ResetJob::parse(&format!(r#"{{"username":"a","pool":"{ok}"}}"#)).is_ok());
        let long = "p".repeat(MAX_POOL_CHARS + 1);
        let cases = [
            (r#"{"username":"a","pool":1}"#.to_owned(), "invalid_shape"),
            (
                r#"{"username":"a","pool":["b"]}"#.to_owned(),
                "invalid_shape",
            ),
            (
                r#"{"username":"a","pool":{"b":1}}"#.to_owned(),
                "invalid_shape",
            ),
            (r#"{"username":"a","pool":""}"#.to_owned(), "invalid_field"),
            (
                r#"{"username":"a","pool":"  "}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"username":"a","pool":"b\nc"}"#.to_owned(),
                "invalid_field",
            ),
            (
                r#"{"username":"a","pool":"b\u0000"}"#.to_owned(),
                "invalid_field",
            ),
            (
                format!(r#"{{"username":"a","pool":"{long}"}}"#),
                "invalid_field",
            ),
        ];
        for (body, reason) in cases {
            let err = ResetJob::parse(&body).expect_err(&body);
            assert_eq!(err.reason(), reason, "{body}: {err}");
            if reason == "invalid_field" {
                assert!(err.to_string().contains("`pool`"), "{err}");
            }
        }
    }

    #[test]
    fn username_length_limit_counts_characters() {
        let ok = "é".repeat(128);
        assert!(ResetJob::parse(&format!(r#"{{"username":"{ok}"}}"#)).is_ok());
        let long = "a".repeat(129);
        let err = ResetJob::parse(&format!(r#"{{"username":"{long}"}}"#)).unwrap_err();
        assert_eq!(err.reason(), "invalid_field");
    }

    #[test]
    fn job_metadata_wins_over_defaults() {
        let job =
            ResetJob::parse(r#"{"username":"a","client_metadata":{"reason":"breach","x":"1"}}"#)
                .unwrap();
        let defaults = BTreeMap::from([
            ("reason".to_owned(), "policy".to_owned()),
            ("team".to_owned(), "sec".to_owned()),
        ]);
        let merged = job.merged_metadata(&defaults);
        assert_eq!(merged["reason"], "breach");
        assert_eq!(merged["team"], "sec");
        assert_eq!(merged["x"], "1");
    }

    #[test]
    fn user_ref_is_keyed_and_stable() {
        let u = Username::parse("alice@example.com".into()).unwrap();
        let a = UserHasher::new(Some(SecretString::from("k1")));
        let b = UserHasher::new(Some(SecretString::from("k2")));
        assert_eq!(a.user_ref(&u), a.user_ref(&u));
        assert_ne!(a.user_ref(&u), b.user_ref(&u));
        assert_eq!(a.user_ref(&u).len(), 16);
        assert!(!format!("{u:?}").contains("alice"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The parser never panics, whatever the bytes.
        #[test]
        fn never_panics_on_arbitrary_text(body in ".{0,512}") {
            let _ = ResetJob::parse(&body);
        }

        /// Nor on JSON-shaped input, which reaches deeper code paths.
        #[test]
        fn never_panics_on_json_like_input(
            username in proptest::option::of(".{0,200}"),
            extra_key in "[a-z_]{1,12}",
            meta in proptest::collection::btree_map(".{0,20}", ".{0,40}", 0..60),
            ip in ".{0,40}",
        ) {
            let mut obj = serde_json::Map::new();
            if let Some(u) = &username {
                obj.insert("username".into(), u.clone().into());
            }
            obj.insert("client_metadata".into(), serde_json::to_value(&meta).unwrap());
            obj.insert("user_context_data".into(), serde_json::json!({"ip_address": ip}));
            if extra_key != "campaign_id" {
                obj.insert(extra_key, 1.into());
            }
            let body = serde_json::Value::Object(obj).to_string();
            let _ = ResetJob::parse(&body);
            let envelope = serde_json::json!({"Type": "Notification", "Message": body}).to_string();
            let _ = ResetJob::parse(&envelope);
        }

        /// Every accepted username obeys the documented rules, and valid ones
        /// round-trip unchanged.
        #[test]
        fn accepted_usernames_obey_the_rules(username in "\\PC{1,140}") {
            let body = serde_json::json!({"username": username}).to_string();
            match ResetJob::parse(&body) {
                Ok(job) => {
                    let u = job.username.expose();
                    prop_assert_eq!(u, username.as_str());
                    prop_assert!(u.chars().count() <= MAX_USERNAME_CHARS);
                    prop_assert!(!u.trim().is_empty());
                    prop_assert!(!u.chars().any(char::is_control));
                }
                Err(err) => {
                    prop_assert!(
                        username.chars().count() > MAX_USERNAME_CHARS
                            || username.trim().is_empty()
                            || username.chars().any(char::is_control),
                        "rejected a valid username: {}", err
                    );
                    // The error text never quotes the username.
                    prop_assert!(username.len() < 4 || !err.to_string().contains(&username));
                }
            }
        }
    }
}
