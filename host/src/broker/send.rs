//! The send path: validate, choose a queue, append through the store (group commit), answer.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;
use tracing::{debug, instrument};
use wharf_codec::{properties, tags};

use super::Broker;
use super::config::MAX_MESSAGE_BYTES;
use super::specs::OutgoingMessage;
use crate::error::{Result, WharfError};
use crate::model::{MessageId, NewMessage, WireInfo};

/// Answer to a successful send.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SendReceipt {
    /// Broker-generated id.
    pub message_id: MessageId,
    /// Queue the message went to.
    pub queue_id: u32,
    /// Offset in that queue; null for a timer message until it is delivered.
    pub queue_offset: Option<u64>,
}

/// Size of properties as RocketMQ encodes them (`k\x01v\x02`), tag and keys included.
/// Computed without building the encoding: this runs for every message sent.
pub fn encoded_properties_len(msg: &OutgoingMessage) -> usize {
    properties::message_len(
        msg.tag.as_deref(),
        msg.keys.iter().map(String::as_str),
        msg.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
}

fn with_no_wire(msgs: Vec<OutgoingMessage>) -> Vec<(OutgoingMessage, WireInfo)> {
    msgs.into_iter().map(|m| (m, WireInfo::default())).collect()
}

static ROUND_ROBIN: AtomicU32 = AtomicU32::new(0);

/// The MQTT gateway's own topic: messages to MQTT topics whose first level is no broker topic
/// (open mode). `%` keeps it out of every user's namespace.
pub const MQTT_LOCAL_TOPIC: &str = "%MQTT%";
/// Queues of [`MQTT_LOCAL_TOPIC`]; MQTT topics are spread over them by name, so one topic stays
/// in order.
pub const MQTT_LOCAL_QUEUES: u32 = 8;

impl Broker {
    /// Sends a batch to `topic`; returns once durably stored (per flush mode). All or nothing:
    /// one illegal message rejects the whole batch before anything is stored.
    #[instrument(level = "debug", skip_all, fields(topic = %topic, count = msgs.len()))]
    pub(in crate::broker) async fn send(
        &self,
        topic: &str,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<SendReceipt>> {
        let t = self.topic(topic)?;
        self.send_to(&t.name, t.queues, with_no_wire(msgs)).await
    }

    /// Like [`Broker::send`], each message with the RocketMQ wire fields the remoting front end
    /// received it with (flag, sysFlag, born and store hosts), kept for pulls.
    #[instrument(level = "debug", skip_all, fields(topic = %topic, count = msgs.len()))]
    pub(in crate::broker) async fn send_wire(
        &self,
        topic: &str,
        msgs: Vec<(OutgoingMessage, WireInfo)>,
    ) -> Result<Vec<SendReceipt>> {
        let t = self.topic(topic)?;
        self.send_to(&t.name, t.queues, msgs).await
    }

    /// Sends to the MQTT gateway's own topic (MQTT-to-MQTT traffic whose first level is no
    /// broker topic): the same validation, queue choice and durability as any send.
    pub(in crate::broker) async fn send_mqtt_local(
        &self,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<SendReceipt>> {
        self.send_to(MQTT_LOCAL_TOPIC, MQTT_LOCAL_QUEUES, with_no_wire(msgs))
            .await
    }

    async fn send_to(
        &self,
        topic: &str,
        queues: u32,
        msgs: Vec<(OutgoingMessage, WireInfo)>,
    ) -> Result<Vec<SendReceipt>> {
        if msgs.is_empty() {
            return Err(WharfError::illegal(
                "a batch must hold at least one message",
            ));
        }
        let now = self.clock.now_ms();
        let start = ROUND_ROBIN.fetch_add(1, Ordering::Relaxed);
        let mut batch = Vec::with_capacity(msgs.len());
        for (i, (m, wire)) in msgs.into_iter().enumerate() {
            let deliver_at_ms = self.validate(&m, now).map_err(|e| {
                if i == 0 {
                    e
                } else {
                    WharfError {
                        message: format!("message #{i}: {}", e.message),
                        ..e
                    }
                }
            })?;
            let queue_id = m.queue.pick(start, i, queues, topic)?;
            batch.push(NewMessage {
                topic: topic.to_owned(),
                queue_id,
                tag: m.tag,
                keys: m.keys,
                properties: m.properties,
                body: m.body,
                born_ms: m.born_ms.unwrap_or(now),
                deliver_at_ms,
                reconsume_times: 0,
                wire,
            });
        }
        let body_bytes: u64 = batch.iter().map(|m| m.body.len() as u64).sum();
        let appended = self.store.append(batch).await?;
        crate::metrics::send_counters().record(topic, appended.len() as u64, body_bytes);
        debug!(count = appended.len(), "stored");
        Ok(appended
            .into_iter()
            .map(|a| SendReceipt {
                message_id: a.id,
                queue_id: a.queue_id,
                queue_offset: a.queue_offset,
            })
            .collect())
    }

    /// Checks one message against the spec's limits; returns its start-deliver time if in the future.
    fn validate(&self, m: &OutgoingMessage, now: u64) -> Result<Option<u64>> {
        if m.body.is_empty() {
            return Err(WharfError::illegal(
                "message body is empty; send at least one byte",
            ));
        }
        let cap = self.config.max_body_bytes.min(MAX_MESSAGE_BYTES);
        if m.body.len() > cap {
            return Err(WharfError::illegal(format!(
                "message body is {} bytes, over the {cap}-byte cap; split it or raise [broker] max_body_bytes",
                m.body.len()
            )));
        }
        if let Some(tag) = &m.tag {
            tags::check_tag(tag)?;
        }
        if m.keys.iter().any(|k| k.is_empty() || k.contains(' ')) {
            return Err(WharfError::illegal(
                "keys must be non-empty and contain no spaces",
            ));
        }
        for (name, value) in &m.properties {
            properties::check_pair(name, value)?;
        }
        for key in &m.keys {
            properties::check_pair(properties::KEYS, key)?;
        }
        let props = encoded_properties_len(m);
        if props > self.config.max_properties_bytes {
            return Err(WharfError::illegal(format!(
                "properties take {props} bytes encoded, over the {}-byte limit; move data into the body",
                self.config.max_properties_bytes
            )));
        }
        if m.body.len() + props > MAX_MESSAGE_BYTES {
            return Err(WharfError::illegal(
                "message is over 4 MiB in total; make it smaller",
            ));
        }
        let at = match (m.deliver_at_ms, m.delay_ms) {
            (Some(at), _) => Some(at),
            (None, Some(d)) => Some(now.saturating_add(d)),
            (None, None) => None,
        };
        match at {
            Some(at) if at > now.saturating_add(self.config.max_delay_ms) => {
                Err(WharfError::illegal(format!(
                    "start-deliver time {at} is more than {} days ahead; choose a time within that",
                    self.config.max_delay_ms / 86_400_000
                )))
            }
            Some(at) if at > now => Ok(Some(at)),
            // A time in the past means deliver now.
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding itself, to check the length arithmetic against.
    fn encode(m: &OutgoingMessage) -> Vec<u8> {
        let mut out = Vec::new();
        properties::encode_message(
            &mut out,
            m.tag.as_deref(),
            m.keys.iter().map(String::as_str),
            m.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        out
    }

    #[test]
    fn properties_length_matches_the_encoding() {
        let mut m = OutgoingMessage::default();
        assert_eq!(encoded_properties_len(&m), 0);
        m.tag = Some("order".into());
        m.keys = vec!["k1".into()];
        assert_eq!(encoded_properties_len(&m), encode(&m).len());
        m.keys = vec!["k1".into(), "key-two".into(), "3".into()];
        m.properties.insert("region".into(), "eu-west".into());
        m.properties.insert("é".into(), String::new());
        assert_eq!(encoded_properties_len(&m), encode(&m).len());
    }
}
