//! Progress of one consume queue for one consumer (a clustering group, or one broadcasting
//! instance): how far it has read, and which read messages are not yet settled.
//!
//! The committed offset is the lowest offset still pending (or the read position when nothing
//! is), so committing never skips a message that was delivered but not acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::StoredMessage;

/// A (topic, queue id) pair.
pub type QueueKey = (String, u32);

/// A read message not yet settled.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Handed to `instance`; expires at `deadline_ms` (consume timeout).
    InFlight {
        /// Instance holding it.
        instance: String,
        /// Delivery number the receipt carries.
        delivery: u64,
        /// When the consume timeout ends.
        deadline_ms: u64,
        /// The message as stored.
        message: Arc<StoredMessage>,
    },
    /// To be handed out again (its holder left or the queue moved).
    Ready {
        /// The message as stored.
        message: Arc<StoredMessage>,
    },
    /// Its retry copy is being written; removed once durable.
    Settling {
        /// The message as stored.
        message: Arc<StoredMessage>,
    },
}

impl Entry {
    /// The stored message.
    pub fn message(&self) -> &Arc<StoredMessage> {
        match self {
            Entry::InFlight { message, .. }
            | Entry::Ready { message }
            | Entry::Settling { message } => message,
        }
    }
}

/// Flow-control weight of a message.
pub fn weight(m: &StoredMessage) -> usize {
    m.body.len()
}

/// One queue's progress.
#[derive(Debug, Clone)]
pub struct QueueState {
    /// Instance that may read it now (clustering); always the instance itself when broadcasting.
    pub owner: Option<String>,
    /// Bumped whenever ownership changes or the offset is reset; receipts carry it.
    pub epoch: u64,
    /// Next offset to read from the store.
    pub next_read: u64,
    /// Read but not settled, by offset.
    pub pending: BTreeMap<u64, Entry>,
    /// Last committed offset written to the store.
    pub persisted: Option<u64>,
    /// A store read is under way (others skip the queue meanwhile).
    pub reading: bool,
}

impl QueueState {
    /// Progress starting at `offset` (already committed there when `persisted`).
    pub fn new(offset: u64, persisted: bool) -> QueueState {
        QueueState {
            owner: None,
            epoch: 0,
            next_read: offset,
            pending: BTreeMap::new(),
            persisted: persisted.then_some(offset),
            reading: false,
        }
    }

    /// The offset to commit: lowest pending, else the read position.
    pub fn committed(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_read)
    }

    /// True when `offset` is behind the committed position or was read and settled.
    pub fn is_consumed(&self, offset: u64) -> bool {
        offset < self.next_read && !self.pending.contains_key(&offset)
    }

    /// Turns `holder`'s in-flight entries back into ready ones (it left on purpose, handing its
    /// work back); returns their weights so the caller can release flow-control credit.
    pub fn recall_from(&mut self, holder: &str) -> Vec<usize> {
        let mut released = Vec::new();
        for entry in self.pending.values_mut() {
            if let Entry::InFlight {
                instance, message, ..
            } = entry
                && instance == holder
            {
                released.push(weight(message));
                *entry = Entry::Ready {
                    message: message.clone(),
                };
            }
        }
        released
    }

    /// Moves the read position to `offset`, forgetting everything pending (operator reset).
    pub fn reset_to(&mut self, offset: u64) -> Vec<(String, usize)> {
        let released = self
            .pending
            .values()
            .filter_map(|e| match e {
                Entry::InFlight {
                    instance, message, ..
                } => Some((instance.clone(), weight(message))),
                _ => None,
            })
            .collect();
        self.pending.clear();
        self.next_read = offset;
        self.epoch += 1;
        released
    }

    /// Earliest consume-timeout deadline among in-flight entries.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending
            .values()
            .filter_map(|e| match e {
                Entry::InFlight { deadline_ms, .. } => Some(*deadline_ms),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MessageId;

    fn msg(offset: u64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            id: MessageId::new(1, 1, offset),
            topic: "T".into(),
            queue_id: 0,
            queue_offset: Some(offset),
            tag: None,
            keys: vec![],
            properties: Default::default(),
            body: bytes::Bytes::from_static(b"abcd"),
            born_ms: 1,
            stored_ms: 1,
            deliver_at_ms: None,
            reconsume_times: 0,
            wire: Default::default(),
        })
    }

    fn in_flight(q: &mut QueueState, offset: u64, who: &str) {
        q.pending.insert(
            offset,
            Entry::InFlight {
                instance: who.into(),
                delivery: offset,
                deadline_ms: 100 + offset,
                message: msg(offset),
            },
        );
    }

    #[test]
    fn committed_offset_never_skips_an_unacked_message() {
        let mut q = QueueState::new(10, true);
        assert_eq!(q.committed(), 10);
        for o in 10..15 {
            in_flight(&mut q, o, "a");
        }
        q.next_read = 20; // 15..20 were filtered out by tag
        assert_eq!(q.committed(), 10);
        for o in 11..15 {
            q.pending.remove(&o);
        }
        assert_eq!(q.committed(), 10, "10 is still un-acked");
        assert!(q.is_consumed(12));
        assert!(!q.is_consumed(10));
        assert!(!q.is_consumed(20));
        q.pending.remove(&10);
        assert_eq!(q.committed(), 20);
    }

    #[test]
    fn recall_hands_one_holders_deliveries_back() {
        let mut q = QueueState::new(0, false);
        in_flight(&mut q, 0, "a");
        in_flight(&mut q, 1, "b");
        assert_eq!(q.next_deadline(), Some(100));
        assert_eq!(q.recall_from("a"), vec![4]);
        assert!(matches!(q.pending[&0], Entry::Ready { .. }));
        assert!(
            matches!(q.pending[&1], Entry::InFlight { .. }),
            "b's delivery stays b's"
        );
        assert_eq!(q.recall_from("b"), vec![4]);
        assert!(q.pending.values().all(|e| matches!(e, Entry::Ready { .. })));
        assert_eq!(q.next_deadline(), None);
        assert_eq!(q.committed(), 0);
        let released = q.reset_to(7);
        assert!(released.is_empty());
        assert_eq!((q.committed(), q.epoch), (7, 1));
    }
}
