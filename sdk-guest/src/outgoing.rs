//! Sending messages and looking up stored ones through the host.

use crate::bindings::wharf::plugin::{host, types};

/// A message to send; build it with the chained setters.
#[derive(Debug, Clone)]
pub struct Outgoing {
    raw: types::Outgoing,
}

impl Outgoing {
    /// A message for `topic` (which must be in the manifest's `permissions.publish`).
    pub fn new(topic: &str, body: impl Into<Vec<u8>>) -> Self {
        Outgoing {
            raw: types::Outgoing {
                topic: topic.to_string(),
                tag: None,
                keys: Vec::new(),
                properties: Vec::new(),
                body: body.into(),
                delay_ms: None,
                deliver_at_ms: None,
            },
        }
    }

    /// Sets the tag.
    pub fn tag(mut self, tag: &str) -> Self {
        self.raw.tag = Some(tag.to_string());
        self
    }

    /// Adds a business key.
    pub fn key(mut self, key: &str) -> Self {
        self.raw.keys.push(key.to_string());
        self
    }

    /// Adds a user property.
    pub fn property(mut self, name: &str, value: &str) -> Self {
        self.raw
            .properties
            .push((name.to_string(), value.to_string()));
        self
    }

    /// Delivers it `ms` from now (a timer message).
    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.raw.delay_ms = Some(ms);
        self
    }

    /// Delivers it at an absolute epoch-ms time.
    pub fn deliver_at_ms(mut self, at: u64) -> Self {
        self.raw.deliver_at_ms = Some(at);
        self
    }
}

/// Where a sent message was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// 32 hex characters.
    pub message_id: String,
    /// Queue it went to.
    pub queue_id: u32,
}

/// A refusal from the host: broker error code, its name and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    /// Code, e.g. 16 for NO_PERMISSION.
    pub code: u32,
    /// Name, e.g. `NO_PERMISSION`.
    pub name: String,
    /// What went wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.name, self.code, self.message)
    }
}

impl std::error::Error for HostError {}

impl From<types::HostError> for HostError {
    fn from(e: types::HostError) -> Self {
        HostError {
            code: e.code,
            name: e.name,
            message: e.message,
        }
    }
}

/// Sends a message; refused with NO_PERMISSION unless its topic is in `permissions.publish`.
pub fn send(message: Outgoing) -> Result<SendReceipt, HostError> {
    host::send(&message.raw)
        .map(|r| SendReceipt {
            message_id: r.message_id,
            queue_id: r.queue_id,
        })
        .map_err(Into::into)
}

/// A stored message found by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// 32 hex characters.
    pub message_id: String,
    /// Its tag.
    pub tag: Option<String>,
    /// When it was stored (epoch ms).
    pub stored_ms: u64,
}

/// The newest (at most 64) messages of `topic` carrying `key`, newest first; allowed on topics the
/// plugin subscribes or may publish to.
pub fn find_by_key(topic: &str, key: &str) -> Result<Vec<Found>, HostError> {
    host::find_by_key(topic, key)
        .map(|found| {
            found
                .into_iter()
                .map(|f| Found {
                    message_id: f.message_id,
                    tag: f.tag,
                    stored_ms: f.stored_ms,
                })
                .collect()
        })
        .map_err(Into::into)
}
