//! The write-queue budget both stores share: appends accepted but not yet answered, bounded
//! in requests and bytes by `[store] write_queue_*`, so a store that cannot keep up refuses
//! sends at once with SYSTEM_BUSY instead of queueing without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreConfig;
use crate::error::{Result, WharfError};

/// What appends accepted but not yet answered hold, against `[store] write_queue_*`.
#[derive(Debug)]
pub struct QueueBudget {
    max_requests: u64,
    max_bytes: u64,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl QueueBudget {
    /// The budget `[store] write_queue_*` of `config` sets.
    pub fn new(config: &StoreConfig) -> Arc<QueueBudget> {
        Arc::new(QueueBudget {
            max_requests: config.write_queue_requests.max(1),
            max_bytes: config.write_queue_bytes.max(1),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    /// A permit for an append of `bytes`, or SYSTEM_BUSY when the queue is full. A batch larger
    /// than the byte limit alone is still taken when nothing else waits, so it cannot starve.
    pub fn try_acquire(self: &Arc<Self>, bytes: u64) -> Result<QueuePermit> {
        let r = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let b = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if r > self.max_requests || (b > self.max_bytes && b != bytes) {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(WharfError::busy(format!(
                "the store's write queue is full ({} sends / {} bytes waiting to be stored; \
                 limits [store] write_queue_requests = {}, write_queue_bytes = {}); nothing of \
                 this send was stored — retry after a short pause",
                r - 1,
                b - bytes,
                self.max_requests,
                self.max_bytes
            )));
        }
        Ok(QueuePermit {
            budget: self.clone(),
            bytes,
        })
    }
}

/// An accepted append's share of the queue budget, returned when the request is dropped
/// (answered, failed, or discarded by a stopping writer).
pub struct QueuePermit {
    budget: Arc<QueueBudget>,
    bytes: u64,
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        self.budget.requests.fetch_sub(1, Ordering::AcqRel);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
impl QueueBudget {
    /// Appends and bytes holding the budget now.
    pub fn in_use(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Acquire),
            self.bytes.load(Ordering::Acquire),
        )
    }
}
