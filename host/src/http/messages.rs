//! Message objects on the wire: what a send carries and what a read returns.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::body::{BodyKind, parse_json, parse_object};
use crate::broker::{OutgoingMessage, QueueChoice};
use crate::error::{Result, WharfError};
use crate::model::{MessageId, StoredMessage};

/// One message object in a send request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// Optional tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Business keys.
    #[serde(default)]
    pub keys: Vec<String>,
    /// User properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// UTF-8 body.
    #[serde(default)]
    pub body: Option<String>,
    /// Binary body, Base64 (standard alphabet, padded).
    #[serde(default)]
    pub body_base64: Option<String>,
    /// Absolute start-deliver time (epoch ms).
    #[serde(default)]
    pub deliver_at_ms: Option<u64>,
    /// Relative delay (ms).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Producer time (epoch ms); the host's now when absent.
    #[serde(default)]
    pub born_ms: Option<u64>,
    /// Messages with the same sharding key go to the same queue (ordered per key).
    #[serde(default)]
    pub sharding_key: Option<String>,
}

impl SendMessage {
    /// Checks the wire-level rules and converts to the broker's type.
    pub fn into_outgoing(self, index: Option<usize>) -> Result<OutgoingMessage> {
        let at = |m: String| match index {
            Some(i) => format!("message #{i}: {m}"),
            None => m,
        };
        let body = match (self.body, self.body_base64) {
            (Some(_), Some(_)) => {
                return Err(WharfError::illegal(at(
                    "give either `body` (UTF-8 text) or `body_base64` (binary), not both".into(),
                )));
            }
            (Some(text), None) => Bytes::from(text),
            (None, Some(b64)) => Bytes::from(B64.decode(b64.as_bytes()).map_err(|e| {
                WharfError::illegal(at(format!(
                    "`body_base64` is not valid Base64 ({e}); use the standard alphabet with padding"
                )))
            })?),
            (None, None) => {
                return Err(WharfError::illegal(at(
                    "message has no body; set `body` (UTF-8 text) or `body_base64` (binary)".into(),
                )));
            }
        };
        if self.deliver_at_ms.is_some() && self.delay_ms.is_some() {
            return Err(WharfError::illegal(at(
                "give either `deliver_at_ms` (absolute) or `delay_ms` (relative), not both".into(),
            )));
        }
        Ok(OutgoingMessage {
            tag: self.tag,
            keys: self.keys,
            properties: self.properties,
            body,
            deliver_at_ms: self.deliver_at_ms,
            delay_ms: self.delay_ms,
            born_ms: self.born_ms,
            queue: self
                .sharding_key
                .map_or(QueueChoice::RoundRobin, QueueChoice::ShardingKey),
        })
    }
}

/// A parsed send request: one object or a batch.
#[derive(Debug)]
pub struct SendRequest {
    /// The messages in order.
    pub messages: Vec<OutgoingMessage>,
    /// True when the body was a JSON array (the answer is then an array too).
    pub batch: bool,
}

/// Parses a send body: a message object, or an array of them.
pub fn parse_send(bytes: &[u8]) -> Result<SendRequest> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let raw: Vec<SendMessage> = parse_json(bytes, BodyKind::Message)?;
        if raw.is_empty() {
            return Err(WharfError::illegal(
                "the batch is empty; send at least one message",
            ));
        }
        let messages = raw
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_outgoing(Some(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(SendRequest {
            messages,
            batch: true,
        })
    } else {
        let m: SendMessage = parse_object(bytes, BodyKind::Message)?;
        Ok(SendRequest {
            messages: vec![m.into_outgoing(None)?],
            batch: false,
        })
    }
}

/// A stored message as the API shows it.
#[derive(Debug, Serialize)]
pub struct MessageJson<'a> {
    /// Id.
    pub message_id: MessageId,
    /// Topic.
    pub topic: &'a str,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset (null while a timer message is not yet visible).
    pub queue_offset: Option<u64>,
    /// Tag, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<&'a str>,
    /// Keys.
    pub keys: &'a [String],
    /// Properties.
    pub properties: &'a BTreeMap<String, String>,
    /// Body when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a str>,
    /// Body in Base64 when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// Producer time.
    pub born_ms: u64,
    /// Store time.
    pub stored_ms: u64,
    /// Redeliveries so far.
    pub reconsume_times: u32,
    /// Start-deliver time, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_at_ms: Option<u64>,
}

impl<'a> MessageJson<'a> {
    /// Borrows a stored message for output.
    pub fn new(m: &'a StoredMessage) -> MessageJson<'a> {
        let (body, body_base64) = match std::str::from_utf8(&m.body) {
            Ok(text) => (Some(text), None),
            Err(_) => (None, Some(B64.encode(&m.body))),
        };
        MessageJson {
            message_id: m.id,
            topic: &m.topic,
            queue_id: m.queue_id,
            queue_offset: m.queue_offset,
            tag: m.tag.as_deref(),
            keys: &m.keys,
            properties: &m.properties,
            body,
            body_base64,
            born_ms: m.born_ms,
            stored_ms: m.stored_ms,
            reconsume_times: m.reconsume_times,
            deliver_at_ms: m.deliver_at_ms,
        }
    }
}

/// A message handed to an HTTP pull consumer: the message plus the receipt to settle it with.
#[derive(Debug, Serialize)]
pub struct ReceivedJson<'a> {
    /// The message fields.
    #[serde(flatten)]
    pub message: MessageJson<'a>,
    /// Opaque handle for ack/nack.
    pub receipt: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_batch_bodies() {
        let r = parse_send(
            br#"{"tag":"t","keys":["k1"],"properties":{"a":"b"},"body":"hi","delay_ms":5}"#,
        )
        .unwrap();
        assert!(!r.batch);
        assert_eq!(r.messages[0].body, Bytes::from_static(b"hi"));
        assert_eq!(r.messages[0].delay_ms, Some(5));
        let r = parse_send(br#" [{"body":"a"},{"body_base64":"AP8="}]"#).unwrap();
        assert!(r.batch);
        assert_eq!(r.messages[1].body.as_ref(), &[0u8, 255]);
    }

    #[test]
    fn bad_messages_are_message_illegal() {
        for (body, needle) in [
            (&br#"{"body":"a","body_base64":"AA=="}"#[..], "not both"),
            (br#"{"tag":"x"}"#, "no body"),
            (br#"{"body_base64":"***"}"#, "Base64"),
            (
                br#"{"body":"a","deliver_at_ms":1,"delay_ms":2}"#,
                "not both",
            ),
            (br#"{"body":"a","colour":1}"#, "unknown field"),
            (br#"{"body":5}"#, "invalid type"),
            (br#"[]"#, "empty"),
            (br#"[{"body":"a"},{}]"#, "message #1"),
            (br#"{"body":"a""#, "malformed JSON"),
        ] {
            let e = parse_send(body).unwrap_err();
            assert_eq!(e.code.code(), 13, "{}", String::from_utf8_lossy(body));
            assert!(
                e.message.contains(needle),
                "{} -> {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }

    #[test]
    fn binary_bodies_read_back_as_base64() {
        let mut m = StoredMessage {
            id: MessageId::new(1, 2, 3),
            topic: "T".into(),
            queue_id: 0,
            queue_offset: Some(4),
            tag: None,
            keys: vec![],
            properties: BTreeMap::new(),
            body: Bytes::from_static(&[0xff, 0x00]),
            born_ms: 1,
            stored_ms: 2,
            deliver_at_ms: None,
            reconsume_times: 0,
            wire: Default::default(),
        };
        let v = serde_json::to_value(MessageJson::new(&m)).unwrap();
        assert_eq!(v["body_base64"], "/wA=");
        assert!(
            v.get("body").is_none() && v.get("tag").is_none() && v.get("deliver_at_ms").is_none()
        );
        m.body = Bytes::from_static(b"text");
        m.deliver_at_ms = Some(9);
        let v = serde_json::to_value(ReceivedJson {
            message: MessageJson::new(&m),
            receipt: "r1",
        })
        .unwrap();
        assert_eq!(v["body"], "text");
        assert_eq!(v["deliver_at_ms"], 9);
        assert_eq!(v["receipt"], "r1");
        assert_eq!(v["message_id"], m.id.to_string());
    }
}
