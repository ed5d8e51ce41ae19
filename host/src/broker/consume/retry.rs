//! Failed messages: retry copies in `%RETRY%<group>` after the back-off, dead letters in
//! `%DLQ%<group>` after the last retry, and re-sending a dead letter.

use std::str::FromStr;

use tracing::{info, warn};

use super::schedule::{NextStep, next_step};
use super::{PROP_ORIGIN_MESSAGE_ID, PROP_RETRY_TOPIC, dlq_topic, retry_topic};
use crate::broker::{Broker, Group, OutgoingMessage, SendReceipt};
use crate::error::{Result, WharfError};
use crate::model::{MessageId, NewMessage, StoredMessage};

/// Starts the system key every retry and dead-letter copy carries, followed by the origin
/// message id. The key index then finds a message's copies without scanning (delivery status);
/// business keys cannot contain spaces, so no user key ever looks like one.
const ORIGIN_KEY_PREFIX: &str = "ORIGIN_MESSAGE_ID ";

/// The system key under which every retry and dead-letter copy of `origin_id` is indexed.
pub fn origin_key(origin_id: &str) -> String {
    format!("{ORIGIN_KEY_PREFIX}{origin_id}")
}

/// True for the system key [`origin_key`] builds (never a business key).
pub fn is_origin_key(key: &str) -> bool {
    key.starts_with(ORIGIN_KEY_PREFIX)
}

/// True when `topic` holds retry or dead-letter copies.
pub fn is_copy_topic(topic: &str) -> bool {
    topic.starts_with("%RETRY%") || topic.starts_with("%DLQ%")
}

/// Drops the system key from a copy, so consumers and operators see only business keys.
pub fn strip_origin_key(m: &mut StoredMessage) {
    m.keys.retain(|k| !is_origin_key(k));
}

/// The original topic and id of a message, looking through retry copies.
pub fn origin(m: &StoredMessage) -> (String, String) {
    let copy = is_copy_topic(&m.topic);
    let topic = copy
        .then(|| m.properties.get(PROP_RETRY_TOPIC).cloned())
        .flatten()
        .unwrap_or_else(|| m.topic.clone());
    let id = copy
        .then(|| m.properties.get(PROP_ORIGIN_MESSAGE_ID).cloned())
        .flatten()
        .unwrap_or_else(|| m.id.to_string());
    (topic, id)
}

/// The copy to append for a failed message: a delayed retry, or a dead letter.
pub fn failure_copy(
    group: &str,
    m: &StoredMessage,
    max_reconsume_times: u32,
    scale: f64,
    now_ms: u64,
) -> NewMessage {
    let (orig_topic, orig_id) = origin(m);
    // A copy of a copy is indexed under the very first id, like its ORIGIN_MESSAGE_ID.
    let mut keys: Vec<String> = m
        .keys
        .iter()
        .filter(|k| !is_origin_key(k))
        .cloned()
        .collect();
    keys.push(origin_key(&orig_id));
    let mut properties = m.properties.clone();
    properties.insert(PROP_RETRY_TOPIC.to_string(), orig_topic);
    properties.insert(PROP_ORIGIN_MESSAGE_ID.to_string(), orig_id);
    let (topic, deliver_at_ms, reconsume_times) =
        match next_step(m.reconsume_times, max_reconsume_times, scale) {
            NextStep::Retry { retry, delay_ms } => (
                retry_topic(group),
                (delay_ms > 0).then(|| now_ms.saturating_add(delay_ms)),
                retry,
            ),
            NextStep::DeadLetter => (dlq_topic(group), None, m.reconsume_times),
        };
    NewMessage {
        topic,
        queue_id: 0,
        tag: m.tag.clone(),
        keys,
        properties,
        body: m.body.clone(),
        born_ms: m.born_ms,
        deliver_at_ms,
        reconsume_times,
        wire: m.wire,
    }
}

impl Broker {
    /// Appends retry or dead-letter copies; the group's current `max_reconsume_times` decides.
    pub(super) async fn write_retries(&self, g: &Group, failed: &[&StoredMessage]) -> Result<()> {
        // The latest group setting wins, even for messages delivered before it changed.
        let max = self
            .group(&g.name)
            .map_or(g.max_reconsume_times, |latest| latest.max_reconsume_times);
        let now = self.clock.now_ms();
        let batch: Vec<NewMessage> = failed
            .iter()
            .map(|m| failure_copy(&g.name, m, max, self.config.retry_delay_scale, now))
            .collect();
        for (copy, m) in batch.iter().zip(failed) {
            if copy.topic.starts_with("%DLQ%") {
                warn!(group = %g.name, message_id = %m.id, reconsume_times = m.reconsume_times,
                    "message dead-lettered after its last retry");
            }
        }
        self.store.append(batch).await?;
        Ok(())
    }
}

/// Re-sends a dead letter to its original topic as a fresh message (reconsume count 0).
pub async fn resend_dead_letter(
    broker: &Broker,
    group: &str,
    message_id: &str,
) -> Result<SendReceipt> {
    broker.consumer_group(group)?;
    let id = MessageId::from_str(message_id)?;
    let dlq = dlq_topic(group);
    let m = broker
        .store
        .get(id)
        .await?
        .filter(|m| m.topic == dlq)
        .ok_or_else(|| {
            WharfError::not_found(format!(
                "message '{message_id}' is not a dead letter of group '{group}'; list them with GET /v1/groups/{group}/dead-letters"
            ))
        })?;
    let (topic, orig_id) = origin(&m);
    let mut properties = m.properties.clone();
    properties.remove(PROP_RETRY_TOPIC);
    properties.insert(PROP_ORIGIN_MESSAGE_ID.to_string(), orig_id);
    let out = OutgoingMessage {
        tag: m.tag.clone(),
        // The re-sent message starts a chain of its own: only the business keys go with it.
        keys: m
            .keys
            .iter()
            .filter(|k| !is_origin_key(k))
            .cloned()
            .collect(),
        properties,
        body: m.body.clone(),
        deliver_at_ms: None,
        delay_ms: None,
        born_ms: Some(m.born_ms),
    };
    let receipt = broker
        .send(&topic, vec![out])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| WharfError::internal("send returned no receipt"))?;
    info!(group, dead_letter = %message_id, new_id = %receipt.message_id, topic = %topic,
        "dead letter re-sent");
    Ok(receipt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(topic: &str, reconsume_times: u32) -> StoredMessage {
        StoredMessage {
            id: MessageId::new(5, 1, 77),
            topic: topic.into(),
            queue_id: 3,
            queue_offset: Some(9),
            tag: Some("order".into()),
            keys: vec!["k1".into()],
            properties: Default::default(),
            body: bytes::Bytes::from_static(b"hi"),
            born_ms: 4,
            stored_ms: 5,
            deliver_at_ms: None,
            reconsume_times,
            wire: Default::default(),
        }
    }

    #[test]
    fn first_failure_becomes_a_delayed_retry() {
        let m = stored("Trade", 0);
        let c = failure_copy("G1", &m, 16, 1.0, 1_000);
        assert_eq!(c.topic, "%RETRY%G1");
        assert_eq!(c.deliver_at_ms, Some(11_000));
        assert_eq!(c.reconsume_times, 1);
        assert_eq!(c.properties[PROP_RETRY_TOPIC], "Trade");
        assert_eq!(c.properties[PROP_ORIGIN_MESSAGE_ID], m.id.to_string());
        assert_eq!(c.tag.as_deref(), Some("order"));
        assert_eq!(
            c.keys,
            vec!["k1".to_string(), origin_key(&m.id.to_string())]
        );
    }

    #[test]
    fn a_retry_keeps_the_original_topic_and_id() {
        let first = stored("Trade", 0);
        let c = failure_copy("G1", &first, 16, 1.0, 0);
        let mut second = stored("%RETRY%G1", 1);
        second.properties = c.properties;
        second.keys = c.keys;
        second.id = MessageId::new(6, 1, 99);
        let c2 = failure_copy("G1", &second, 16, 1.0, 0);
        assert_eq!(c2.properties[PROP_ORIGIN_MESSAGE_ID], first.id.to_string());
        assert_eq!(
            c2.keys,
            vec!["k1".to_string(), origin_key(&first.id.to_string())],
            "one system key, naming the first id"
        );
        assert_eq!(c2.properties[PROP_RETRY_TOPIC], "Trade");
        assert_eq!(c2.deliver_at_ms, Some(30_000));
        assert_eq!(c2.reconsume_times, 2);
    }

    #[test]
    fn out_of_retries_goes_to_the_dead_letter_topic() {
        let mut m = stored("%RETRY%G1", 3);
        m.properties.insert(PROP_RETRY_TOPIC.into(), "Trade".into());
        let c = failure_copy("G1", &m, 3, 1.0, 0);
        assert_eq!(c.topic, "%DLQ%G1");
        assert_eq!(c.deliver_at_ms, None);
        assert_eq!(c.properties[PROP_RETRY_TOPIC], "Trade");
        assert!(
            c.keys.iter().any(|k| is_origin_key(k)),
            "dead letters are indexed too"
        );
    }

    #[test]
    fn the_system_key_is_stripped_and_never_a_business_key() {
        let first = stored("Trade", 0);
        let c = failure_copy("G1", &first, 16, 1.0, 0);
        let mut copy = stored("%RETRY%G1", 1);
        copy.keys = c.keys;
        strip_origin_key(&mut copy);
        assert_eq!(copy.keys, vec!["k1".to_string()]);
        // Business keys are refused when they hold a space; the system key always does.
        assert!(origin_key("X").contains(' '));
        assert!(!is_origin_key("ORIGIN_MESSAGE_ID"));
    }

    #[test]
    fn user_properties_named_like_system_ones_are_not_trusted_on_originals() {
        let mut m = stored("Trade", 0);
        m.properties
            .insert(PROP_RETRY_TOPIC.into(), "Elsewhere".into());
        assert_eq!(origin(&m).0, "Trade");
    }
}
