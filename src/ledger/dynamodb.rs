//! The shared ledger: a DynamoDB table, partition key `campaign` (S), sort
//! key `username` (S), TTL attribute `expires_at` (epoch seconds).
//!
//! A claim is one conditional `UpdateItem` whose condition is
//! [`super::decide_claim`]'s rules written as an expression; `ALL_OLD` on
//! success and `ReturnValuesOnConditionCheckFailure = ALL_OLD` on failure
//! return the row it was decided on, so the same function names the answer
//! and no read is needed: two writes per job on the happy path (claim,
//! finish).
//!
//! The SDK's standard retries stay on here (unlike Cognito's): a retried
//! claim whose first write had landed finds its own owner token and is
//! granted, so a retry can never make a user look taken by someone else.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use tokio::sync::mpsc;

use super::{
    Backend, Checked, Claim, Entry, Final, Key, LedgerError, MEMBERS, Member, Owner, State, Stored,
    decide_claim,
};
use crate::backoff::Backoff;

/// Items per report page (`Query`'s `Limit`): the report holds at most
/// this many (plus the channel's buffer) at a time.
const PAGE: i32 = 1000;

/// The claim condition: exactly the rows for which `decide_claim` grants or
/// takes over.
const CLAIM_CONDITION: &str = "attribute_not_exists(username) OR expires_at < :now_s \
     OR #state IN (:skipped, :rejected, :deferred, :uncertain) \
     OR (#state = :in_progress AND (lease_until < :now OR #owner = :owner))";

/// The client for the ledger: the default chain and Region,
/// `AWS_ENDPOINT_URL_DYNAMODB`, and time limits so an outage is noticed in
/// seconds, not minutes.
pub fn build_client(sdk: &SdkConfig) -> Client {
    let conf = aws_sdk_dynamodb::config::Builder::from(sdk)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(3))
                .operation_timeout(Duration::from_secs(10))
                .build(),
        )
        .build();
    Client::from_conf(conf)
}

pub struct Dynamo {
    client: Client,
    table: String,
}

impl Dynamo {
    pub fn new(client: Client, table: String) -> Self {
        Self { client, table }
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn key_item(key: Key<'_>) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("campaign".to_owned(), s(key.campaign)),
        ("username".to_owned(), s(key.username)),
    ])
}

fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> u64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A number attribute that may be absent (`None`, not 0).
fn get_opt_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn stored(item: &HashMap<String, AttributeValue>) -> Option<Stored<'_>> {
    Some(Stored {
        state: State::parse(get_s(item, "state")?)?,
        owner: get_s(item, "owner"),
        lease_until_ms: get_n(item, "lease_until"),
        attempts: get_n(item, "attempts") as u32,
        expires_at_s: get_n(item, "expires_at"),
        reset_at_ms: get_opt_n(item, "reset_at"),
    })
}

/// Whether a conditional `UpdateItem` was applied: `false` when its
/// condition failed (the entry is someone else's now), an error otherwise.
fn applied<T, R: std::fmt::Debug>(
    result: Result<T, SdkError<UpdateItemError, R>>,
) -> Result<bool, LedgerError> {
    match result {
        Ok(_) => Ok(true),
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
        {
            Ok(false)
        }
        Err(err) => Err(classify(&err)),
    }
}

/// What a failed request means: a wait, or a misconfiguration that halts.
fn classify<E, R>(err: &SdkError<E, R>) -> LedgerError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    // Without a service message, the cause says what went wrong: a refused
    // connection, a timeout, or credentials the SDK could not find.
    let message = err.message().map(str::to_owned).unwrap_or_else(|| {
        let mut message = aws_smithy_error_kind(err).to_owned();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        message
    });
    match err {
        SdkError::ConstructionFailure(_) => LedgerError::Fatal {
            code: "construction".into(),
            message,
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            LedgerError::Unavailable(message)
        }
        _ => match err.code() {
            Some(
                code @ ("ResourceNotFoundException"
                | "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "MissingAuthenticationTokenException"
                | "ValidationException"),
            ) => LedgerError::Fatal {
                code: code.to_owned(),
                message,
            },
            _ => LedgerError::Unavailable(message),
        },
    }
}

/// A short name for an SDK error without a service message.
fn aws_smithy_error_kind<E, R>(err: &SdkError<E, R>) -> &'static str {
    match err {
        SdkError::ConstructionFailure(_) => "request could not be built",
        SdkError::TimeoutError(_) => "timed out",
        SdkError::DispatchFailure(_) => "could not connect",
        SdkError::ResponseError(_) => "unreadable response",
        SdkError::ServiceError(_) => "service error",
        _ => "error",
    }
}

impl Dynamo {
    /// Drops an outdated `reset_at` (and `signed_out_at`) from a claim
    /// `owner` holds.
    async fn forget_reset(&self, key: Key<'_>, owner: &Owner) -> Result<(), LedgerError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(key)))
            .update_expression("REMOVE reset_at, signed_out_at")
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner.as_str()))
            .send()
            .await;
        applied(result).map(|_| ())
    }
}

#[async_trait]
impl Backend for Dynamo {
    async fn claim(
        &self,
        key: Key<'_>,
        owner: &Owner,
        now_ms: u64,
        lease_until_ms: u64,
        expires_at_s: u64,
    ) -> Result<Claim, LedgerError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(key)))
            .update_expression(
                "SET #state = :in_progress, reason = :empty, #owner = :owner, \
                 lease_until = :lease, updated_at = :now, expires_at = :expires, \
                 attempts = if_not_exists(attempts, :zero)",
            )
            .condition_expression(CLAIM_CONDITION)
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":in_progress", s(State::InProgress.as_str()))
            .expression_attribute_values(":skipped", s(State::Skipped.as_str()))
            .expression_attribute_values(":rejected", s(State::Rejected.as_str()))
            .expression_attribute_values(":deferred", s(State::Deferred.as_str()))
            .expression_attribute_values(":uncertain", s(State::Uncertain.as_str()))
            .expression_attribute_values(":empty", s(""))
            .expression_attribute_values(":owner", s(owner.as_str()))
            .expression_attribute_values(":lease", n(lease_until_ms))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":now_s", n(now_ms / 1000))
            .expression_attribute_values(":expires", n(expires_at_s))
            .expression_attribute_values(":zero", n(0))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(out) => {
                let old = out.attributes.unwrap_or_default();
                let claim = decide_claim(stored(&old), owner, now_ms);
                // One conditional UpdateItem cannot choose what to keep:
                // it left `reset_at` as it was. An entry past its retention
                // (not yet removed by TTL) must not pass an old reset on to
                // this new claim.
                if matches!(
                    claim,
                    Claim::Granted {
                        reset_at_ms: None,
                        ..
                    }
                ) && old.contains_key("reset_at")
                {
                    self.forget_reset(key, owner).await?;
                }
                Ok(claim)
            }
            Err(err) => {
                let old = match err.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(e)) => e.item.as_ref(),
                    _ => None,
                };
                let Some(old) = old else {
                    return Err(classify(&err));
                };
                match decide_claim(stored(old), owner, now_ms) {
                    refused @ (Claim::AlreadySent | Claim::Held { .. }) => Ok(refused),
                    // The row changed between the condition and its copy:
                    // ask again later.
                    Claim::Granted { .. } | Claim::TakenOver { .. } => Err(
                        LedgerError::Unavailable("the entry changed during the claim".into()),
                    ),
                }
            }
        }
    }

    async fn renew(
        &self,
        key: Key<'_>,
        owner: &Owner,
        lease_until_ms: u64,
    ) -> Result<bool, LedgerError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(key)))
            .update_expression("SET lease_until = :lease")
            .condition_expression("#owner = :owner AND #state = :in_progress")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner.as_str()))
            .expression_attribute_values(":in_progress", s(State::InProgress.as_str()))
            .expression_attribute_values(":lease", n(lease_until_ms))
            .send()
            .await;
        applied(result)
    }

    async fn finish(
        &self,
        key: Key<'_>,
        owner: &Owner,
        done: Final<'_>,
        now_ms: u64,
        expires_at_s: u64,
    ) -> Result<bool, LedgerError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(key)))
            // A new reset makes an earlier `report --refresh-status` check
            // stale: it is dropped.
            .update_expression(format!(
                "SET #state = :state, reason = :reason, attempts = :attempts, \
                 lease_until = :zero, updated_at = :now, expires_at = :expires{}{} \
                 REMOVE user_status, user_modified_at, checked_at, completed_at{}",
                if done.signed_out {
                    ", signed_out_at = :now"
                } else {
                    ""
                },
                if done.reset {
                    ", reset_at = if_not_exists(reset_at, :now)"
                } else {
                    ""
                },
                if done.signed_out {
                    ""
                } else {
                    ", signed_out_at"
                },
            ))
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":state", s(done.state.as_str()))
            .expression_attribute_values(":reason", s(done.reason))
            .expression_attribute_values(":attempts", n(done.attempts))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":expires", n(expires_at_s));
        // `sent` is written whoever holds the entry: an email went out.
        if done.state != State::Sent {
            request = request
                .condition_expression("#owner = :owner")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":owner", s(owner.as_str()));
        }
        applied(request.send().await)
    }

    async fn record_reset(&self, key: Key<'_>, now_ms: u64) -> Result<bool, LedgerError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(key)))
            .update_expression("SET reset_at = :now")
            // Never creates a partial entry.
            .condition_expression("attribute_exists(#state)")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await;
        applied(result)
    }

    async fn record_status(&self, key: Key<'_>, checked: Checked<'_>) -> Result<bool, LedgerError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(key)))
            // `#state = :sent` also fails when the item does not exist: a
            // check never creates an entry.
            .condition_expression("#state = :sent")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":sent", s(State::Sent.as_str()))
            .expression_attribute_values(":status", s(checked.user_status))
            .expression_attribute_values(":checked", n(checked.checked_at_ms));
        let completed = if checked.completed {
            ", completed_at = if_not_exists(completed_at, :checked)"
        } else {
            ""
        };
        request = match checked.modified_at_ms {
            Some(modified) => request
                .update_expression(format!(
                    "SET user_status = :status, checked_at = :checked, \
                     user_modified_at = :modified{completed}"
                ))
                .expression_attribute_values(":modified", n(modified)),
            None => request.update_expression(format!(
                "SET user_status = :status, checked_at = :checked{completed} \
                 REMOVE user_modified_at"
            )),
        };
        applied(request.send().await)
    }

    async fn sent_among(
        &self,
        campaign: &str,
        usernames: &[String],
        now_s: u64,
    ) -> Result<HashSet<String>, LedgerError> {
        let keys: Vec<_> = usernames
            .iter()
            .map(|u| {
                key_item(Key {
                    campaign,
                    username: u,
                })
            })
            .collect();
        let mut pending = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .projection_expression("username, #state, expires_at")
                .expression_attribute_names("#state", "state")
                .build()
                .map_err(|e| LedgerError::Unavailable(e.to_string()))?,
        );
        let mut sent = HashSet::new();
        // Unprocessed keys (throttling) are asked again after a backoff.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut rounds = 0;
        while let Some(request) = pending.take() {
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| classify(&e))?;
            for item in out
                .responses
                .unwrap_or_default()
                .remove(&self.table)
                .unwrap_or_default()
            {
                if get_s(&item, "state") == Some(State::Sent.as_str())
                    && get_n(&item, "expires_at") > now_s
                    && let Some(u) = get_s(&item, "username")
                {
                    sent.insert(u.to_owned());
                }
            }
            pending = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .filter(|k| !k.keys.is_empty());
            if pending.is_some() {
                rounds += 1;
                if rounds > 10 {
                    return Err(LedgerError::Unavailable(
                        "BatchGetItem left keys unprocessed ten times".into(),
                    ));
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        Ok(sent)
    }

    async fn entries(
        &self,
        campaign: &str,
        now_s: u64,
        out: mpsc::Sender<Result<Entry, LedgerError>>,
    ) -> Result<(), LedgerError> {
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("campaign = :c")
                .expression_attribute_values(":c", s(campaign))
                .projection_expression(
                    "username, #state, reason, attempts, updated_at, expires_at, \
                     user_status, user_modified_at, checked_at, signed_out_at, completed_at",
                )
                .expression_attribute_names("#state", "state")
                .limit(PAGE)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify(&e))?;
            for item in page.items.unwrap_or_default() {
                if get_n(&item, "expires_at") <= now_s {
                    continue;
                }
                let entry = Entry {
                    username: get_s(&item, "username").unwrap_or_default().to_owned(),
                    state: get_s(&item, "state")
                        .and_then(State::parse)
                        .unwrap_or(State::Uncertain),
                    reason: get_s(&item, "reason").unwrap_or_default().to_owned(),
                    attempts: get_n(&item, "attempts") as u32,
                    updated_at_ms: get_n(&item, "updated_at"),
                    user_status: get_s(&item, "user_status").map(str::to_owned),
                    user_modified_at_ms: get_opt_n(&item, "user_modified_at"),
                    checked_at_ms: get_opt_n(&item, "checked_at"),
                    signed_out_at_ms: get_opt_n(&item, "signed_out_at"),
                    completed_at_ms: get_opt_n(&item, "completed_at"),
                };
                if out.send(Ok(entry)).await.is_err() {
                    return Ok(());
                }
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(()),
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
        let key = key_item(Key {
            campaign: MEMBERS,
            username: worker,
        });
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(
                "SET seen_until = :until, expires_at = :expires, \
                 joined_at = if_not_exists(joined_at, :now)",
            )
            .expression_attribute_values(":until", n(seen_until_ms))
            .expression_attribute_values(":expires", n(expires_at_s))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let mut members = Vec::new();
        let mut start = None;
        loop {
            // Consistent: a member that registered a moment ago must be seen.
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("campaign = :c")
                .filter_expression("seen_until > :now")
                .expression_attribute_values(":c", s(MEMBERS))
                .expression_attribute_values(":now", n(now_ms))
                .projection_expression("username, joined_at")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify(&e))?;
            members.extend(page.items.unwrap_or_default().iter().filter_map(|item| {
                Some(Member {
                    worker: get_s(item, "username")?.to_owned(),
                    joined_at_ms: get_n(item, "joined_at"),
                })
            }));
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(members),
            }
        }
    }

    async fn leave(&self, worker: &str) -> Result<(), LedgerError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key_item(Key {
                campaign: MEMBERS,
                username: worker,
            })))
            .send()
            .await
            .map_err(|e| classify(&e))?;
        Ok(())
    }

    async fn check(&self) -> Result<(), LedgerError> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| match classify(&e) {
                LedgerError::Fatal { code, .. } if code == "ResourceNotFoundException" => {
                    LedgerError::Fatal {
                        code,
                        message: format!(
                            "table `{}` does not exist; create it with `reset-worker ledger init`",
                            self.table
                        ),
                    }
                }
                other => other,
            })?;
        let keys: Vec<(String, KeyType)> = out
            .table()
            .map(|t| t.key_schema())
            .unwrap_or_default()
            .iter()
            .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
            .collect();
        let expected = vec![
            ("campaign".to_owned(), KeyType::Hash),
            ("username".to_owned(), KeyType::Range),
        ];
        if keys != expected {
            return Err(LedgerError::Fatal {
                code: "key_schema".into(),
                message: format!(
                    "table `{}` must have partition key `campaign` (S) and sort key `username` (S)",
                    self.table
                ),
            });
        }
        Ok(())
    }

    async fn init(&self) -> Result<Vec<String>, LedgerError> {
        let mut did = Vec::new();
        let exists = match self.check().await {
            Ok(()) => true,
            Err(LedgerError::Fatal { code, .. }) if code == "ResourceNotFoundException" => false,
            Err(other) => return Err(other),
        };
        if exists {
            did.push(format!("table `{}` exists with the right keys", self.table));
        } else {
            let attr = |name: &str| {
                AttributeDefinition::builder()
                    .attribute_name(name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
            };
            let key = |name: &str, kind| {
                KeySchemaElement::builder()
                    .attribute_name(name)
                    .key_type(kind)
                    .build()
            };
            let built = (|| {
                Ok::<_, aws_sdk_dynamodb::error::BuildError>(
                    self.client
                        .create_table()
                        .table_name(&self.table)
                        .billing_mode(BillingMode::PayPerRequest)
                        .attribute_definitions(attr("campaign")?)
                        .attribute_definitions(attr("username")?)
                        .key_schema(key("campaign", KeyType::Hash)?)
                        .key_schema(key("username", KeyType::Range)?),
                )
            })()
            .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
            built.send().await.map_err(|e| classify(&e))?;
            did.push(format!("created table `{}` (on-demand)", self.table));
            self.wait_active().await?;
        }
        let ttl = self
            .client
            .describe_time_to_live()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let enabled = ttl.time_to_live_description().is_some_and(|d| {
            matches!(
                d.time_to_live_status(),
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            ) && d.attribute_name() == Some("expires_at")
        });
        if enabled {
            did.push("TTL on `expires_at` already enabled".into());
        } else {
            let spec = TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name("expires_at")
                .build()
                .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
            self.client
                .update_time_to_live()
                .table_name(&self.table)
                .time_to_live_specification(spec)
                .send()
                .await
                .map_err(|e| classify(&e))?;
            did.push("enabled TTL on `expires_at`".into());
        }
        Ok(did)
    }
}

impl Dynamo {
    /// A new table takes a few seconds to become usable.
    async fn wait_active(&self) -> Result<(), LedgerError> {
        for _ in 0..120 {
            let out = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| classify(&e))?;
            if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(LedgerError::Unavailable(format!(
            "table `{}` did not become ACTIVE within a minute",
            self.table
        )))
    }
}
