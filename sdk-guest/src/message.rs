//! The typed message a plugin receives, decoding packed fields only when asked.

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

/// Separators of the packed `meta` buffer (RocketMQ's property encoding).
const NAME_END: u8 = 0x01;
const PAIR_END: u8 = 0x02;
/// Name under which the keys travel in `meta`, space-separated.
const KEYS: &str = "KEYS";

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

    /// User properties, in the order the broker stored them (sorted by name).
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.raw
            .meta
            .split(|b| *b == PAIR_END)
            .filter_map(|pair| {
                let at = pair.iter().position(|b| *b == NAME_END)?;
                let name = std::str::from_utf8(&pair[..at]).ok()?;
                let value = std::str::from_utf8(&pair[at + 1..]).ok()?;
                Some((name, value))
            })
            .filter(|(name, _)| *name != KEYS)
    }

    /// One user property.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Business keys.
    pub fn keys(&self) -> Vec<&str> {
        self.raw
            .meta
            .split(|b| *b == PAIR_END)
            .find_map(|pair| pair.strip_prefix(b"KEYS\x01"))
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.split(' ').filter(|k| !k.is_empty()).collect())
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
