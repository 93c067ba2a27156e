//! The SQS side: receive, change visibility, send and delete batches. The
//! delete batcher that decides *when* to delete is [`super::deleter`]; sending
//! a received message again (a dead-letter copy, a FIFO deferral) is
//! [`super::resend`].
//!
//! The SQS client keeps the SDK's standard retry mode (3 attempts): SQS
//! calls do not spend the Cognito quota, and a quick retry of a dropped
//! DeleteMessageBatch narrows the window for a duplicate email. The receive
//! loop adds its own capped backoff on top, so a broken endpoint is never
//! polled in a tight loop.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::SdkConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName,
};

use crate::config::MAX_VISIBILITY_SECONDS;
use crate::telemetry;

/// SQS caps a receive and a delete batch at 10 messages.
pub const MAX_BATCH: usize = 10;
/// SQS's default `MaximumMessageSize`, for a queue whose attribute was not read.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// A queue's `MaximumMessageSize` from its attributes (bytes a message may
/// hold); SQS's default when absent.
pub fn max_message_bytes(attributes: &HashMap<String, String>) -> usize {
    attributes
        .get("MaximumMessageSize")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
}

/// SQS allows at most 10 message attributes.
pub(super) const MAX_MESSAGE_ATTRIBUTES: usize = 10;
#[derive(Debug, thiserror::Error)]
#[error("SQS {operation} on {queue} failed: {detail}")]
pub struct QueueError {
    pub operation: &'static str,
    pub queue: String,
    /// The service's error code, when it answered with one.
    pub code: Option<String>,
    pub detail: String,
}

/// Time limit for one SQS call but a receive, retries included: a
/// black-holed connection must not hang a heartbeat, a delete or a deferral.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A receive may take its long-poll wait plus this.
pub const RECEIVE_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);

/// The SQS client: the SDK's standard retries (3 attempts) within
/// [`CALL_TIMEOUT`] per call; a receive gets its own limit (see
/// [`Queue::receive`]).
pub fn build_client(sdk: &SdkConfig) -> Client {
    let conf = aws_sdk_sqs::config::Builder::from(sdk)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(CALL_TIMEOUT)
                .connect_timeout(Duration::from_secs(3))
                .build(),
        )
        .build();
    Client::from_conf(conf)
}

/// One received message, with what the worker needs from its attributes.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// `ApproximateReceiveCount`: 1 on the first delivery.
    pub receive_count: u32,
    /// `SentTimestamp`, for the job-age histogram.
    pub sent_at: Option<SystemTime>,
    /// FIFO only: copied to the dead-letter message.
    pub group_id: Option<String>,
    pub attributes: HashMap<String, MessageAttributeValue>,
    /// When this receive answered (taken just before the request went out,
    /// so it never runs late): SQS counts its 12-hour visibility limit from
    /// the receive.
    pub received_at: Instant,
}

/// Message attribute of a job deferred by re-sending: not before this
/// Unix time (seconds).
pub const NOT_BEFORE_ATTRIBUTE: &str = "reset_worker_not_before";
/// Message attribute of a job deferred by re-sending: the deferral's ID.
pub const DEFERRAL_ATTRIBUTE: &str = "reset_worker_deferral";

impl ReceivedMessage {
    /// For a job deferred by re-sending: when it is due.
    pub fn not_before(&self) -> Option<SystemTime> {
        let value = self.attributes.get(NOT_BEFORE_ATTRIBUTE)?.string_value()?;
        Some(UNIX_EPOCH + Duration::from_secs(value.parse().ok()?))
    }

    /// For a job deferred by re-sending: the deferral's ID.
    pub fn deferral_id(&self) -> Option<&str> {
        self.attributes.get(DEFERRAL_ATTRIBUTE)?.string_value()
    }

    pub fn age(&self) -> Option<Duration> {
        self.sent_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
    }

    /// The longest visibility SQS still accepts for this receive: 12 hours
    /// from the receive, less [`VISIBILITY_LIMIT_MARGIN`].
    pub fn visibility_left(&self) -> Duration {
        visibility_left(self.received_at.elapsed())
    }
}

/// Slack under SQS's 12-hour limit for clock and request latency.
pub const VISIBILITY_LIMIT_MARGIN: Duration = Duration::from_secs(60);

/// SQS refuses a ChangeMessageVisibility that would keep a message hidden
/// beyond 12 hours from its receive; what is left after `since_receive`.
pub fn visibility_left(since_receive: Duration) -> Duration {
    Duration::from_secs(MAX_VISIBILITY_SECONDS)
        .saturating_sub(since_receive)
        .saturating_sub(VISIBILITY_LIMIT_MARGIN)
}

/// The job queue and its optional dead-letter queue.
pub struct Queue {
    pub(super) client: Client,
    pub(super) url: String,
    dlq_url: Option<String>,
    /// The dead-letter queue's `MaximumMessageSize`, read at start-up;
    /// SQS's default (256 KiB) until then.
    pub(super) dlq_max_bytes: std::sync::OnceLock<usize>,
}

impl Queue {
    pub fn new(client: Client, url: String, dlq_url: Option<String>) -> Self {
        Self {
            client,
            url,
            dlq_url,
            dlq_max_bytes: std::sync::OnceLock::new(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub(super) fn error<E>(&self, operation: &'static str, queue: &str, err: E) -> QueueError
    where
        E: std::error::Error + ProvideErrorMetadata,
    {
        telemetry::sqs_request(operation, false);
        QueueError {
            operation,
            queue: queue.to_owned(),
            code: err.code().map(str::to_owned),
            detail: DisplayErrorContext(err).to_string(),
        }
    }

    /// Checks that a queue exists and is reachable; returns its attributes.
    pub async fn attributes(&self, url: &str) -> Result<HashMap<String, String>, QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| self.error("GetQueueAttributes", url, e))?;
        telemetry::sqs_request("GetQueueAttributes", true);
        Ok(out
            .attributes()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn dead_letter_url(&self) -> Option<&str> {
        self.dlq_url.as_deref()
    }

    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let received_at = Instant::now();
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, MAX_BATCH) as i32)
            .wait_time_seconds(wait.as_secs() as i32)
            .visibility_timeout(visibility.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::default().timeout_config(
                    TimeoutConfig::builder()
                        .operation_timeout(wait + RECEIVE_TIMEOUT_MARGIN)
                        .build(),
                ),
            )
            .send()
            .await
            .map_err(|e| self.error("ReceiveMessage", &self.url, e))?;
        telemetry::sqs_request("ReceiveMessage", true);
        let messages = out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let sys = m.attributes.unwrap_or_default();
                let get = |name: MessageSystemAttributeName| sys.get(&name).cloned();
                Some(ReceivedMessage {
                    message_id: m.message_id?,
                    receipt_handle: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                    receive_count: get(MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                    sent_at: get(MessageSystemAttributeName::SentTimestamp)
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                    group_id: get(MessageSystemAttributeName::MessageGroupId),
                    attributes: m.message_attributes.unwrap_or_default(),
                    received_at,
                })
            })
            .collect();
        Ok(messages)
    }

    /// Sets the message's remaining invisibility: 0 releases it at once, a
    /// longer value defers it or (heartbeat) keeps it hidden while it runs.
    pub async fn change_visibility(
        &self,
        receipt_handle: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(visibility.as_secs().min(MAX_VISIBILITY_SECONDS) as i32)
            .send()
            .await
            .map_err(|e| self.error("ChangeMessageVisibility", &self.url, e))?;
        telemetry::sqs_request("ChangeMessageVisibility", true);
        Ok(())
    }

    /// Sends up to 10 messages with SendMessageBatch. Returns the IDs of the
    /// entries SQS refused, with whether the fault was the sender's.
    pub async fn send_batch(
        &self,
        entries: &[Outgoing],
    ) -> Result<Vec<(String, bool)>, QueueError> {
        let built = entries
            .iter()
            .filter_map(|m| {
                let mut e = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(&m.id)
                    .message_body(&m.body);
                if let Some(fifo) = &m.fifo {
                    e = e
                        .message_group_id(&fifo.group_id)
                        .message_deduplication_id(&fifo.deduplication_id);
                }
                e.build().ok()
            })
            .collect();
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(built))
            .send()
            .await
            .map_err(|e| self.error("SendMessageBatch", &self.url, e))?;
        telemetry::sqs_request("SendMessageBatch", true);
        Ok(out
            .failed()
            .iter()
            .map(|f| (f.id().to_owned(), f.sender_fault()))
            .collect())
    }

    /// Deletes up to 10 messages; returns the entries SQS refused, by index.
    pub async fn delete_batch(
        &self,
        receipt_handles: &[&str],
    ) -> Result<Vec<FailedDelete>, QueueError> {
        let entries = receipt_handles
            .iter()
            .enumerate()
            .filter_map(|(i, handle)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*handle)
                    .build()
                    .ok()
            })
            .collect();
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| self.error("DeleteMessageBatch", &self.url, e))?;
        telemetry::sqs_request("DeleteMessageBatch", true);
        Ok(out
            .failed()
            .iter()
            .filter_map(|f| {
                Some(FailedDelete {
                    index: f.id().parse().ok()?,
                    sender_fault: f.sender_fault(),
                    code: f.code().to_owned(),
                })
            })
            .collect())
    }
}

/// One message to send with [`Queue::send_batch`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Batch entry ID, unique within the batch.
    pub id: String,
    pub body: String,
    /// Required on FIFO queues.
    pub fifo: Option<FifoIds>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FifoIds {
    pub group_id: String,
    pub deduplication_id: String,
}

/// One entry of a DeleteMessageBatch that SQS refused.
pub struct FailedDelete {
    /// Position in the batch.
    pub index: usize,
    /// True when retrying cannot help (e.g. an expired receipt handle).
    pub sender_fault: bool,
    pub code: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    use wiremock::matchers::{header, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    /// Hardening #2: a connection that never answers hung ReceiveMessage
    /// (and every other call) forever.
    #[tokio::test]
    async fn a_black_holed_receive_fails_after_its_wait_and_margin() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header("x-amz-target", "AmazonSQS.ReceiveMessage"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3600)))
            .mount(&server)
            .await;
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                Credentials::new("test", "test", None, None, "test"),
            ))
            .endpoint_url(server.uri())
            .build();
        let queue = Queue::new(build_client(&sdk), format!("{}/1/q", server.uri()), None);
        let wait = Duration::from_secs(1);
        let result = tokio::time::timeout(
            Duration::from_secs(60),
            queue.receive(1, wait, Duration::from_secs(30)),
        )
        .await
        .expect("the receive must end by itself, not hang");
        assert!(result.is_err(), "a receive that got no answer is an error");
    }

    #[test]
    fn deferrals_fit_in_the_12_hours_from_the_receive() {
        // Hardening #9: a deferral of 43200 s asked for after the receive
        // was refused by SQS every time.
        let h = |hours: u64| Duration::from_secs(hours * 3600);
        assert_eq!(
            visibility_left(Duration::ZERO),
            h(12) - VISIBILITY_LIMIT_MARGIN
        );
        assert_eq!(
            visibility_left(h(11)),
            h(1) - VISIBILITY_LIMIT_MARGIN,
            "an hour left"
        );
        assert_eq!(visibility_left(h(13)), Duration::ZERO);
    }
}
