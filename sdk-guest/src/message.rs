//! The typed message a plugin receives, decoding packed fields only when asked.

use wharf_codec::properties::{self, KEYS};

use crate::bindings::wharf::plugin::types;

/// A broker message id (16 bytes); `Display` gives the 32 hex characters the HTTP API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId {
    /// High 8 bytes (big-endian).
    pub hi: u64,
    /// Low 8 bytes (big-endian).
    pub lo: u64,
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}{:016X}", self.hi, self.lo)
    }
}

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Message {
    raw: types::Message,
}

impl Message {
    pub(crate) fn from_raw(raw: types::Message) -> Self {
        Message { raw }
    }

    /// Broker-generated id.
    pub fn id(&self) -> MessageId {
        MessageId {
            hi: self.raw.id.hi,
            lo: self.raw.id.lo,
        }
    }

    /// Topic it was sent to.
    pub fn topic(&self) -> &str {
        &self.raw.topic
    }

    /// Tag, if the producer set one.
    pub fn tag(&self) -> Option<&str> {
        self.raw.tag.as_deref()
    }

    /// Body bytes.
    pub fn body(&self) -> &[u8] {
        &self.raw.body
    }

    /// Body as UTF-8 text, if it is.
    pub fn body_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.raw.body).ok()
    }

    /// Keys and user properties as packed by the host; the host writes only what decodes, so
    /// a malformed buffer (never expected) simply ends the list.
    fn meta(&self) -> impl Iterator<Item = (&str, &str)> {
        properties::decode(&self.raw.meta).map_while(Result::ok)
    }

    /// User properties, in the order the broker stored them (sorted by name).
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.meta().filter(|(name, _)| *name != KEYS)
    }

    /// One user property.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Business keys.
    pub fn keys(&self) -> Vec<&str> {
        self.meta()
            .find(|(name, _)| *name == KEYS)
            .map(|(_, v)| properties::split_keys(v).collect())
            .unwrap_or_default()
    }

    /// When the producer created it (epoch ms).
    pub fn born_ms(&self) -> u64 {
        self.raw.born_ms
    }

    /// When the broker stored it (epoch ms).
    pub fn stored_ms(&self) -> u64 {
        self.raw.stored_ms
    }

    /// How many times it was delivered before this attempt.
    pub fn reconsume_times(&self) -> u32 {
        self.raw.reconsume_times
    }

    /// Queue within the topic.
    pub fn queue_id(&self) -> u32 {
        self.raw.queue_id
    }

    /// Offset within the queue.
    pub fn queue_offset(&self) -> u64 {
        self.raw.queue_offset
    }
}

/// Facts about the call that are not part of the message.
#[derive(Debug, Clone)]
pub struct Context {
    raw: types::Context,
}

impl Context {
    pub(crate) fn from_raw(raw: types::Context) -> Self {
        Context { raw }
    }

    /// The plugin's consumer group.
    pub fn group(&self) -> &str {
        &self.raw.group
    }

    /// 1 on the first delivery, then 2, 3, ...
    pub fn attempt(&self) -> u32 {
        self.raw.attempt
    }
}
