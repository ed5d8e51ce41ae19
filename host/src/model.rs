//! Plain data shared by the store, the broker and the front ends.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ErrorKind, WharfError};

/// A broker-generated message id: 16 bytes, shown as 32 upper-case hex characters.
///
/// Layout (big-endian): `stored_ms: 48 bits | node: 16 bits | log position: 64 bits`.
/// Leading with time makes ids roughly time-ordered; the node id (random per data dir, persisted)
/// makes them unique across hosts; the log position never repeats within one store (positions
/// only grow, even across retention) and lets the embedded store find the record in O(1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Builds an id from its parts.
    pub fn new(stored_ms: u64, node: u16, position: u64) -> Self {
        let mut b = [0u8; 16];
        b[0..6].copy_from_slice(&stored_ms.to_be_bytes()[2..8]);
        b[6..8].copy_from_slice(&node.to_be_bytes());
        b[8..16].copy_from_slice(&position.to_be_bytes());
        MessageId(b)
    }

    /// Store time encoded in the id (ms).
    pub fn stored_ms(&self) -> u64 {
        let mut t = [0u8; 8];
        t[2..8].copy_from_slice(&self.0[0..6]);
        u64::from_be_bytes(t)
    }

    /// Node id encoded in the id.
    pub fn node(&self) -> u16 {
        u16::from_be_bytes([self.0[6], self.0[7]])
    }

    /// Store-specific position encoded in the id (embedded: the global log position).
    pub fn position(&self) -> u64 {
        let mut p = [0u8; 8];
        p.copy_from_slice(&self.0[8..16]);
        u64::from_be_bytes(p)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode_upper(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = WharfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            WharfError::new(
                ErrorCode::SystemError,
                ErrorKind::Invalid,
                format!("'{s}' is not a message id; ids are 32 hex characters as returned by send"),
            )
        };
        if s.len() != 32 {
            return Err(bad());
        }
        let v = hex::decode(s).map_err(|_| bad())?;
        let mut b = [0u8; 16];
        b.copy_from_slice(&v);
        Ok(MessageId(b))
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A message handed to the store for appending. The broker has validated it and chosen the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Topic it is stored under (may be a system topic such as `%RETRY%group`).
    pub topic: String,
    /// Queue within the topic.
    pub queue_id: u32,
    /// Optional tag (second-level type).
    pub tag: Option<String>,
    /// Business keys, for query by key.
    pub keys: Vec<String>,
    /// User and system properties.
    pub properties: BTreeMap<String, String>,
    /// Opaque body.
    pub body: Bytes,
    /// When the producer created it (ms).
    pub born_ms: u64,
    /// When it becomes visible to consumers (ms); `None` = now.
    pub deliver_at_ms: Option<u64>,
    /// How many times it has been redelivered already.
    pub reconsume_times: u32,
    /// RocketMQ wire fields, kept for the remoting front end.
    pub wire: WireInfo,
}

/// RocketMQ wire fields of a message that the broker itself does not interpret; the remoting
/// front end sets them on send and returns them on pull. All default to "not set".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireInfo {
    /// The producer's `flag` (opaque to the broker).
    pub flag: i32,
    /// The producer's `sysFlag` (compression, transaction type, ...).
    pub sys_flag: i32,
    /// Address of the producer that sent it.
    pub born_host: Option<SocketAddr>,
    /// Address of the broker that stored it.
    pub store_host: Option<SocketAddr>,
}

/// A message as stored, with its system fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Broker-generated id.
    pub id: MessageId,
    /// Topic.
    pub topic: String,
    /// Queue within the topic.
    pub queue_id: u32,
    /// Offset within the queue; `None` while a timer message is not yet visible.
    pub queue_offset: Option<u64>,
    /// Optional tag.
    pub tag: Option<String>,
    /// Business keys.
    pub keys: Vec<String>,
    /// Properties.
    pub properties: BTreeMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// Producer time (ms).
    pub born_ms: u64,
    /// Store time (ms).
    pub stored_ms: u64,
    /// Start-deliver time, when set.
    pub deliver_at_ms: Option<u64>,
    /// Redelivery count.
    pub reconsume_times: u32,
    /// RocketMQ wire fields, as sent.
    pub wire: WireInfo,
}

/// Where an appended message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Appended {
    /// Its id.
    pub id: MessageId,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset; `None` for a timer message not yet visible.
    pub queue_offset: Option<u64>,
    /// Store time (ms).
    pub stored_ms: u64,
}

/// 32-bit hash of a tag kept in consume-index entries so filtering needs no body read.
/// Untagged messages hash as the empty string.
pub fn tag_hash(tag: Option<&str>) -> u32 {
    crc32c::crc32c(tag.unwrap_or("").as_bytes())
}

/// Checks a topic or group name: letters, digits, `_`, `-`, length 3–64.
///
/// `%` is refused with a message of its own: it marks system names (`%RETRY%<group>`,
/// `%DLQ%<group>`, broadcasting offset keys), and a user name holding it could collide with them.
pub fn validate_name(what: &str, name: &str) -> Result<(), WharfError> {
    if name.contains('%') {
        return Err(WharfError::bad_request(format!(
            "invalid {what} name '{name}': it contains '%', which is reserved for system names \
             such as %RETRY%<group> and %DLQ%<group>; use letters, digits, '_' and '-'"
        )));
    }
    let ok_len = (3..=64).contains(&name.len());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(WharfError::bad_request(format!(
            "invalid {what} name '{name}': use 3-64 characters from letters, digits, '_', '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_round_trips() {
        let id = MessageId::new(1_700_000_000_123, 0xBEEF, 987_654_321);
        assert_eq!(id.stored_ms(), 1_700_000_000_123);
        assert_eq!(id.node(), 0xBEEF);
        assert_eq!(id.position(), 987_654_321);
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<MessageId>().unwrap(), id);
        assert!("xyz".parse::<MessageId>().is_err());
    }

    #[test]
    fn ids_sort_by_time() {
        let a = MessageId::new(1000, 9, 500);
        let b = MessageId::new(1001, 1, 1);
        assert!(a < b);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("topic", "Trade").is_ok());
        assert!(validate_name("topic", "GID_a-b").is_ok());
        let e = validate_name("group", "G%1x").unwrap_err();
        assert!(e.message.contains("contains '%'"), "{}", e.message);
        assert!(validate_name("topic", "%RETRY%GID_a").is_err());
        assert!(validate_name("topic", "ab").is_err());
        assert!(validate_name("topic", &"a".repeat(65)).is_err());
        assert!(validate_name("topic", "a b c").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_id_prints_and_parses_back(ms in 0u64..(1 << 48), node: u16, pos: u64) {
            let id = MessageId::new(ms, node, pos);
            let back: MessageId = id.to_string().parse().unwrap();
            proptest::prop_assert_eq!(back, id);
            proptest::prop_assert_eq!(
                (back.stored_ms(), back.node(), back.position()),
                (ms, node, pos)
            );
            let lower: MessageId = id.to_string().to_lowercase().parse().unwrap();
            proptest::prop_assert_eq!(lower, id);
        }
    }
}
