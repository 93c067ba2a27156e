//! Sending a received message again: a copy to the dead-letter queue (sized
//! to fit it), or, on a FIFO queue, the job to its group's tail as a
//! deferral.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::MessageAttributeValue;

use super::sqs::{
    DEFAULT_MAX_MESSAGE_BYTES, DEFERRAL_ATTRIBUTE, MAX_MESSAGE_ATTRIBUTES, NOT_BEFORE_ATTRIBUTE,
    Queue, QueueError, ReceivedMessage, max_message_bytes,
};
use crate::config::is_fifo;
use crate::telemetry;

/// The `reset_worker_detail` attribute is cut to this many characters.
const MAX_DETAIL_CHARS: usize = 1024;

/// What became of a dead-letter copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLettered {
    Copied,
    /// The body with the reason attributes exceeds the dead-letter queue's
    /// `MaximumMessageSize` (bytes): no copy can ever succeed.
    TooLarge {
        limit: usize,
    },
}

/// How SQS counts an attribute toward the message size: its name, its data
/// type and its value.
fn attribute_bytes(name: &str, value: &MessageAttributeValue) -> usize {
    name.len()
        + value.data_type().len()
        + value.string_value().map_or(0, str::len)
        + value.binary_value().map_or(0, |b| b.as_ref().len())
}

/// The attributes of a dead-letter copy of a `body_bytes` body under
/// `limit` bytes: all of `ours` (the reason is never dropped), then the
/// original attributes, by name, as far as the size and SQS's 10 allow.
/// `None` when even the body and `ours` do not fit.
fn fit_dead_letter(
    body_bytes: usize,
    limit: usize,
    ours: Vec<(String, MessageAttributeValue)>,
    originals: &HashMap<String, MessageAttributeValue>,
) -> Option<HashMap<String, MessageAttributeValue>> {
    let mut size = body_bytes
        + ours
            .iter()
            .map(|(k, v)| attribute_bytes(k, v))
            .sum::<usize>();
    if size > limit {
        return None;
    }
    let mut attributes: HashMap<String, MessageAttributeValue> = ours.into_iter().collect();
    let mut originals: Vec<_> = originals.iter().collect();
    originals.sort_by(|a, b| a.0.cmp(b.0));
    for (name, value) in originals {
        let bytes = attribute_bytes(name, value);
        if attributes.len() >= MAX_MESSAGE_ATTRIBUTES
            || attributes.contains_key(name)
            || size + bytes > limit
        {
            continue;
        }
        size += bytes;
        attributes.insert(name.clone(), value.clone());
    }
    Some(attributes)
}

impl Queue {
    /// Records the dead-letter queue's `MaximumMessageSize` attribute.
    pub fn set_dead_letter_limit(&self, attributes: &HashMap<String, String>) {
        let _ = self.dlq_max_bytes.set(max_message_bytes(attributes));
    }

    fn dead_letter_max_bytes(&self) -> usize {
        self.dlq_max_bytes
            .get()
            .copied()
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// Copies a rejected message to the dead-letter queue with its original
    /// body and attributes, plus attributes that say why.
    pub async fn dead_letter(
        &self,
        dlq_url: &str,
        msg: &ReceivedMessage,
        reason: &str,
        detail: &str,
    ) -> Result<DeadLettered, QueueError> {
        let string = |value: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .ok()
        };
        let detail: String = if detail.is_empty() { "-" } else { detail }
            .chars()
            .take(MAX_DETAIL_CHARS)
            .collect();
        let ours: Vec<(String, MessageAttributeValue)> = [
            ("reset_worker_reason", reason.to_owned()),
            ("reset_worker_detail", detail),
            ("reset_worker_source_message_id", msg.message_id.clone()),
            ("reset_worker_receive_count", msg.receive_count.to_string()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_owned(), string(&value)?)))
        .collect();
        let body = if msg.body.is_empty() { " " } else { &msg.body };
        let limit = self.dead_letter_max_bytes();
        let Some(attributes) = fit_dead_letter(body.len(), limit, ours, &msg.attributes) else {
            return Ok(DeadLettered::TooLarge { limit });
        };

        let mut request = self
            .client
            .send_message()
            .queue_url(dlq_url)
            .message_body(body)
            .set_message_attributes(Some(attributes));
        if is_fifo(dlq_url) {
            request = request
                .message_group_id(msg.group_id.as_deref().unwrap_or("rejected"))
                .message_deduplication_id(&msg.message_id);
        }
        request
            .send()
            .await
            .map_err(|e| self.error("SendMessage", dlq_url, e))?;
        telemetry::sqs_request("SendMessage", true);
        Ok(DeadLettered::Copied)
    }

    /// FIFO deferral: sends the job again to the tail of its message group,
    /// not to be processed before `not_before`, with a deduplication ID of
    /// its own, so the original can be deleted and the group go on. The
    /// attribute `reset_worker_deferral` carries `deferral_id`.
    pub async fn defer_by_resend(
        &self,
        msg: &ReceivedMessage,
        not_before: SystemTime,
        deferral_id: &str,
    ) -> Result<(), QueueError> {
        let unix = not_before
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut attributes: HashMap<String, MessageAttributeValue> = msg
            .attributes
            .iter()
            .filter(|(k, _)| !k.starts_with("reset_worker_"))
            .take(MAX_MESSAGE_ATTRIBUTES - 2)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, data_type, value) in [
            (NOT_BEFORE_ATTRIBUTE, "Number", unix.to_string()),
            (DEFERRAL_ATTRIBUTE, "String", deferral_id.to_owned()),
        ] {
            if let Ok(v) = MessageAttributeValue::builder()
                .data_type(data_type)
                .string_value(value)
                .build()
            {
                attributes.insert(name.to_owned(), v);
            }
        }
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(&msg.body)
            .set_message_attributes(Some(attributes))
            .set_message_group_id(msg.group_id.clone())
            .message_deduplication_id(deferral_id)
            .send()
            .await
            .map_err(|e| self.error("SendMessage", &self.url, e))?;
        telemetry::sqs_request("SendMessage", true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(value: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .unwrap()
    }

    /// Hardening #11: a body near the dead-letter queue's limit plus its
    /// attributes and ours was refused by SQS on every try.
    #[test]
    fn dead_letter_copies_fit_the_limit_dropping_originals_first() {
        let ours = || vec![("reset_worker_reason".to_owned(), string("invalid_json"))];
        let ours_bytes = "reset_worker_reason".len() + "String".len() + "invalid_json".len();
        let originals: HashMap<_, _> = [("a", "x".repeat(40)), ("b", "y".repeat(40))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), string(&v)))
            .collect();
        let one_original = 1 + "String".len() + 40;

        // Room for everything.
        let all = fit_dead_letter(100, 1000, ours(), &originals).unwrap();
        assert_eq!(all.len(), 3);
        // Room for one original: `a` (by name) is kept, `b` dropped.
        let limit = 100 + ours_bytes + one_original;
        let some = fit_dead_letter(100, limit, ours(), &originals).unwrap();
        assert!(some.contains_key("reset_worker_reason") && some.contains_key("a"));
        assert_eq!(some.len(), 2);
        // No room for originals: the reason stays.
        let none = fit_dead_letter(100, 100 + ours_bytes, ours(), &originals).unwrap();
        assert_eq!(none.keys().collect::<Vec<_>>(), vec!["reset_worker_reason"]);
        // Not even the reason fits: no copy can succeed.
        assert!(fit_dead_letter(100, 100 + ours_bytes - 1, ours(), &originals).is_none());
    }
}
