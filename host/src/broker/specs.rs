//! What users hand the broker and what it keeps of topics and groups: topic and group specs as
//! the API and manifests write them, and outgoing messages. Pure types and checks with no I/O,
//! so the config, manifest and HTTP body parsers that build them can be fuzzed on their own.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, WharfError};

/// Most queues a topic may have.
pub const MAX_QUEUES: u32 = 256;

/// A topic's message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TopicType {
    /// Ordinary messages.
    #[default]
    Normal,
    /// Timer/delay messages.
    Delay,
    /// Transactional messages.
    Transaction,
    /// Ordered messages.
    Order,
}

/// Body of `POST /v1/topics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Message type; default normal.
    #[serde(default, rename = "type")]
    pub topic_type: TopicType,
    /// Queue count; default from config (8).
    #[serde(default)]
    pub queues: Option<u32>,
}

/// A topic as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// Message type.
    #[serde(rename = "type")]
    pub topic_type: TopicType,
    /// Number of queues.
    pub queues: u32,
    /// Creation time (ms).
    pub created_ms: u64,
}

/// What a group is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupKind {
    /// Consumer group (Group ID).
    #[default]
    Consumer,
    /// Producer group.
    Producer,
    /// MQTT group (`GID_…`).
    Mqtt,
}

/// Consumption model of a consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsumeModel {
    /// Instances share the work (default).
    #[default]
    Clustering,
    /// Every instance gets every message.
    Broadcasting,
}

/// Default maximum retries.
pub const DEFAULT_MAX_RECONSUME_TIMES: u32 = 16;
/// Default consume timeout: 15 minutes.
pub const DEFAULT_CONSUME_TIMEOUT_MS: u64 = 15 * 60 * 1000;

/// Body of `POST /v1/groups`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Group name.
    pub name: String,
    /// Kind; default consumer.
    #[serde(default)]
    pub kind: GroupKind,
    /// Consumption model; default clustering.
    #[serde(default)]
    pub model: ConsumeModel,
    /// Retries before dead-lettering; default 16.
    #[serde(default)]
    pub max_reconsume_times: Option<u32>,
    /// Consume timeout; default 15 minutes.
    #[serde(default)]
    pub consume_timeout_ms: Option<u64>,
}

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: GroupKind,
    /// Consumption model.
    pub model: ConsumeModel,
    /// Retries before dead-lettering.
    pub max_reconsume_times: u32,
    /// Consume timeout (ms).
    pub consume_timeout_ms: u64,
    /// Creation time (ms).
    pub created_ms: u64,
}

/// Body of `PATCH /v1/groups/{group}`: the settings to change; absent ones keep their value.
/// `kind` and `model` are accepted only when they repeat the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPatch {
    /// Must equal the group's kind if given.
    pub kind: Option<GroupKind>,
    /// Must equal the group's model if given.
    pub model: Option<ConsumeModel>,
    /// New retry maximum (0..=1000).
    pub max_reconsume_times: Option<u32>,
    /// New consume timeout (1 ms..=24 h).
    pub consume_timeout_ms: Option<u64>,
}

impl GroupPatch {
    /// The fields a patch may name.
    pub const FIELDS: [&'static str; 4] =
        ["max_reconsume_times", "consume_timeout_ms", "model", "kind"];

    /// Parses a JSON object field by field, so an unknown field or a bad value is named in
    /// the error (serde alone reports only a line and column for a wrong type).
    pub fn from_json(body: &serde_json::Map<String, serde_json::Value>) -> Result<GroupPatch> {
        fn field<T: serde::de::DeserializeOwned>(
            name: &str,
            v: &serde_json::Value,
            expected: &str,
        ) -> Result<T> {
            serde_json::from_value(v.clone()).map_err(|_| {
                WharfError::bad_request(format!("{name}: expected {expected}, got {v}"))
            })
        }
        let mut p = GroupPatch::default();
        for (k, v) in body {
            match k.as_str() {
                "max_reconsume_times" => {
                    p.max_reconsume_times = Some(field(k, v, "a whole number 0..=1000")?)
                }
                "consume_timeout_ms" => {
                    p.consume_timeout_ms =
                        Some(field(k, v, "a whole number of milliseconds 1..=86400000")?)
                }
                "model" => p.model = Some(field(k, v, "\"clustering\" or \"broadcasting\"")?),
                "kind" => p.kind = Some(field(k, v, "\"consumer\", \"producer\" or \"mqtt\"")?),
                other => {
                    return Err(WharfError::bad_request(format!(
                        "unknown field `{other}`; a group update accepts {}",
                        GroupPatch::FIELDS.join(", ")
                    )));
                }
            }
        }
        Ok(p)
    }
}

/// A message as a producer hands it to the broker.
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    /// Optional tag.
    pub tag: Option<String>,
    /// Business keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: BTreeMap<String, String>,
    /// Body (non-empty).
    pub body: Bytes,
    /// Absolute start-deliver time (ms).
    pub deliver_at_ms: Option<u64>,
    /// Relative delay (ms); ignored when `deliver_at_ms` is set.
    pub delay_ms: Option<u64>,
    /// Producer time (ms); now when absent.
    pub born_ms: Option<u64>,
    /// Which queue of the topic it goes to.
    pub queue: QueueChoice,
}

/// How a send picks the queue of its topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QueueChoice {
    /// Spread over the queues in turn.
    #[default]
    RoundRobin,
    /// The same key always lands in the same queue (ordered per key while the queue count holds).
    ShardingKey(String),
    /// This queue id (RocketMQ SDK clients choose their queue themselves).
    Queue(u32),
}

impl QueueChoice {
    /// The queue id among `queues` for the `i`-th message of a batch whose round robin starts
    /// at `start`; an explicit id out of range is an error naming the valid ones.
    pub(crate) fn pick(&self, start: u32, i: usize, queues: u32, topic: &str) -> Result<u32> {
        match self {
            QueueChoice::RoundRobin => Ok(start.wrapping_add(i as u32) % queues),
            // FNV-1a: stable across hosts and releases, unlike the std hasher.
            QueueChoice::ShardingKey(key) => {
                let h = key.bytes().fold(0x811c_9dc5_u32, |h, b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                Ok(h % queues)
            }
            QueueChoice::Queue(q) if *q < queues => Ok(*q),
            QueueChoice::Queue(q) => Err(WharfError::bad_request(format!(
                "topic '{topic}' has queues 0..{queues}; queue {q} does not exist (refresh the route)"
            ))),
        }
    }
}

/// One (topic, tag expression) pair a consumer subscribes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Topic.
    pub topic: String,
    /// `*`, `TagA` or `TagA||TagB`.
    pub expression: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_choice_is_stable_and_checked() {
        let k = QueueChoice::ShardingKey("order-42".into());
        let q = k.pick(0, 0, 8, "T").unwrap();
        assert_eq!(k.pick(5, 3, 8, "T").unwrap(), q, "a key keeps its queue");
        assert!(q < 8);
        assert_eq!(QueueChoice::RoundRobin.pick(7, 2, 8, "T").unwrap(), 1);
        assert_eq!(QueueChoice::Queue(3).pick(0, 0, 8, "T").unwrap(), 3);
        let e = QueueChoice::Queue(8).pick(0, 0, 8, "T").unwrap_err();
        assert!(e.message.contains("queues 0..8"), "{}", e.message);
    }
}
