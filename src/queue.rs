//! The SQS side: receive, change visibility, dead-letter, and batched deletes.
//!
//! The SQS client keeps the SDK's standard retry mode (3 attempts): SQS
//! calls do not spend the Cognito quota, and a quick retry of a dropped
//! DeleteMessageBatch narrows the window for a duplicate email. The receive
//! loop adds its own capped backoff on top, so a broken endpoint is never
//! polled in a tight loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::SdkConfig;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// SQS caps a receive and a delete batch at 10 messages.
pub const MAX_BATCH: usize = 10;
/// SQS allows at most 10 message attributes.
const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// How often a failed delete entry is retried before it is given up on (the
/// message is then redelivered after its visibility timeout).
const DELETE_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
#[error("SQS {operation} on {queue} failed: {detail}")]
pub struct QueueError {
    pub operation: &'static str,
    pub queue: String,
    pub detail: String,
}

pub fn build_client(sdk: &SdkConfig) -> Client {
    Client::new(sdk)
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
}

impl ReceivedMessage {
    pub fn age(&self) -> Option<Duration> {
        self.sent_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
    }
}

/// The job queue and its optional dead-letter queue.
pub struct Queue {
    client: Client,
    url: String,
    dlq_url: Option<String>,
}

impl Queue {
    pub fn new(client: Client, url: String, dlq_url: Option<String>) -> Self {
        Self {
            client,
            url,
            dlq_url,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn error(
        &self,
        operation: &'static str,
        queue: &str,
        err: impl std::error::Error,
    ) -> QueueError {
        telemetry::sqs_request(operation, false);
        QueueError {
            operation,
            queue: queue.to_owned(),
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
            .visibility_timeout(
                visibility
                    .as_secs()
                    .min(crate::config::MAX_VISIBILITY_SECONDS) as i32,
            )
            .send()
            .await
            .map_err(|e| self.error("ChangeMessageVisibility", &self.url, e))?;
        telemetry::sqs_request("ChangeMessageVisibility", true);
        Ok(())
    }

    /// Copies a rejected message to the dead-letter queue with its original
    /// body and attributes, plus attributes that say why.
    pub async fn dead_letter(
        &self,
        dlq_url: &str,
        msg: &ReceivedMessage,
        reason: &str,
        detail: &str,
    ) -> Result<(), QueueError> {
        let mut attributes = HashMap::new();
        let mut put = |name: &str, value: &str| {
            // Built from known-good strings; a failure here would be a bug.
            if let Ok(v) = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
            {
                attributes.insert(name.to_owned(), v);
            }
        };
        put("reset_worker_reason", reason);
        put(
            "reset_worker_detail",
            if detail.is_empty() { "-" } else { detail },
        );
        put("reset_worker_source_message_id", &msg.message_id);
        put("reset_worker_receive_count", &msg.receive_count.to_string());
        // Keep the original attributes too, as far as SQS's limit of 10 allows.
        let mut originals: Vec<_> = msg.attributes.iter().collect();
        originals.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in originals {
            if attributes.len() >= MAX_MESSAGE_ATTRIBUTES {
                break;
            }
            attributes.entry(k.clone()).or_insert_with(|| v.clone());
        }

        let mut request = self
            .client
            .send_message()
            .queue_url(dlq_url)
            .message_body(if msg.body.is_empty() { " " } else { &msg.body })
            .set_message_attributes(Some(attributes));
        if dlq_url.ends_with(".fifo") {
            request = request
                .message_group_id(msg.group_id.as_deref().unwrap_or("rejected"))
                .message_deduplication_id(&msg.message_id);
        }
        request
            .send()
            .await
            .map_err(|e| self.error("SendMessage", dlq_url, e))?;
        telemetry::sqs_request("SendMessage", true);
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

    async fn delete_batch(&self, batch: &[PendingDelete]) -> Result<Vec<FailedDelete>, QueueError> {
        let entries = batch
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&p.receipt_handle)
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

struct FailedDelete {
    index: usize,
    sender_fault: bool,
    code: String,
}

#[derive(Debug)]
struct PendingDelete {
    message_id: String,
    receipt_handle: String,
    attempts: u32,
}

/// Hands finished messages to the delete batcher. Cloned into every job task.
#[derive(Clone)]
pub struct Deleter {
    /// Unbounded, because producers are already bounded by the concurrency
    /// permits, and a job must never block on bookkeeping after its outcome.
    tx: mpsc::UnboundedSender<PendingDelete>,
    /// Messages handed over whose delete is not finished (done or given up).
    /// `run --until-empty` must not call the queue drained while deletes are
    /// pending: on a FIFO queue they still block their message groups.
    outstanding: Arc<AtomicUsize>,
}

impl Deleter {
    /// Starts the batcher. Cancelling the returned token closes it: it takes
    /// no new entries, flushes what it holds (or gives up on it), and ends.
    pub fn spawn(
        queue: Arc<Queue>,
        flush_interval: Duration,
    ) -> (Self, JoinHandle<()>, CancellationToken) {
        let (tx, rx) = mpsc::unbounded_channel();
        let close = CancellationToken::new();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let handle = tokio::spawn(run_deleter(
            queue,
            rx,
            flush_interval,
            close.clone(),
            outstanding.clone(),
        ));
        (Self { tx, outstanding }, handle, close)
    }

    /// Deletes handed over and not yet finished.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    pub fn delete(&self, msg: &ReceivedMessage) {
        let pending = PendingDelete {
            message_id: msg.message_id.clone(),
            receipt_handle: msg.receipt_handle.clone(),
            attempts: 0,
        };
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(pending).is_err() {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            // Only possible if the batcher task panicked; the message will be
            // redelivered, so say so.
            telemetry::delete_failed(1);
            tracing::error!(message_id = %msg.message_id, "delete batcher is gone; message will be redelivered");
        }
    }
}

async fn run_deleter(
    queue: Arc<Queue>,
    mut rx: mpsc::UnboundedReceiver<PendingDelete>,
    flush_interval: Duration,
    close: CancellationToken,
    outstanding: Arc<AtomicUsize>,
) {
    let mut pending: Vec<PendingDelete> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut open = true;
    // Backoff after a failed DeleteMessageBatch call, reset on success.
    let mut failure_pause = Duration::ZERO;
    while open || !pending.is_empty() {
        let flush_at = oldest.map(|t| t + flush_interval.max(failure_pause));
        let full = pending.len() >= MAX_BATCH;
        if !full && open {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(p) => {
                        oldest.get_or_insert_with(Instant::now);
                        pending.push(p);
                        continue;
                    }
                    None => open = false,
                },
                _ = sleep_until_opt(flush_at) => {}
                // Closing: stop new sends, then keep receiving what is
                // already buffered until `recv` returns `None`.
                _ = close.cancelled(), if !rx.is_closed() => {
                    rx.close();
                    continue;
                }
            }
        } else if !open && !failure_pause.is_zero() {
            tokio::time::sleep(failure_pause).await;
        }
        if pending.is_empty() {
            oldest = None;
            continue;
        }
        let take = pending.len().min(MAX_BATCH);
        let batch: Vec<PendingDelete> = pending.drain(..take).collect();
        let waiting_before = pending.len();
        match queue.delete_batch(&batch).await {
            Ok(failed) => {
                failure_pause = Duration::ZERO;
                let mut failed_idx: Vec<Option<FailedDelete>> =
                    batch.iter().map(|_| None).collect();
                for f in failed {
                    if let Some(slot) = failed_idx.get_mut(f.index) {
                        *slot = Some(f);
                    }
                }
                for (p, f) in batch.into_iter().zip(failed_idx) {
                    let Some(f) = f else { continue };
                    if f.sender_fault {
                        // e.g. ReceiptHandleIsInvalid: the message became
                        // visible again and was (or will be) redelivered.
                        telemetry::delete_failed(1);
                        tracing::warn!(message_id = %p.message_id, code = %f.code, "delete rejected by SQS; message will be redelivered");
                    } else {
                        requeue(&mut pending, p, &f.code);
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, entries = batch.len(), "DeleteMessageBatch failed; will retry");
                failure_pause =
                    (failure_pause * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
                for p in batch {
                    requeue(&mut pending, p, "call_failed");
                }
            }
        }
        // Entries not put back are finished: deleted, or given up on.
        let requeued = pending.len() - waiting_before;
        outstanding.fetch_sub(take - requeued, Ordering::SeqCst);
        oldest = (!pending.is_empty()).then(Instant::now);
    }
}

fn requeue(pending: &mut Vec<PendingDelete>, mut p: PendingDelete, code: &str) {
    p.attempts += 1;
    if p.attempts >= DELETE_ATTEMPTS {
        telemetry::delete_failed(1);
        tracing::error!(message_id = %p.message_id, code, "delete failed {DELETE_ATTEMPTS} times; message will be redelivered");
    } else {
        pending.push(p);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
