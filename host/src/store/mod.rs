//! Storage behind one trait: the embedded segment log (default) and PostgreSQL (`postgres/`).
//!
//! The trait assumes nothing about which process owns a queue: queue offsets, timers and consumer
//! offsets are all assigned and kept by the store, so several hosts could share one backend.
//! Callers (the broker) never touch files; front ends never touch the store.

mod budget;
mod config;
#[cfg(test)]
pub(crate) mod conformance;
pub mod embedded;
pub mod postgres;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::error::Result;
use crate::metrics::HistogramSnapshot;
use crate::model::{Appended, MessageId, NewMessage, StoredMessage};

pub(crate) use budget::{QueueBudget, QueuePermit};
pub use config::{Backend, FlushMode, PostgresConfig, StoreConfig};

/// Opens the backend `config.backend` names (the embedded store unless configured otherwise).
pub async fn open_store(config: &StoreConfig, clock: SharedClock) -> Result<Arc<dyn Store>> {
    match config.backend {
        Backend::Embedded => {
            let s: Arc<dyn Store> = embedded::EmbeddedStore::open(config, clock).await?;
            Ok(s)
        }
        Backend::Postgres => {
            let s: Arc<dyn Store> = postgres::PostgresStore::open(config, clock).await?;
            Ok(s)
        }
    }
}

/// Longest a metadata change made by another host takes to move [`Store::watch_meta`].
pub const META_WATCH_MS: u64 = 500;

/// Per-namespace metadata change counters behind [`Store::watch_meta`] (shared by the backends).
#[derive(Debug, Default)]
pub struct MetaWatches {
    map: parking_lot::Mutex<std::collections::HashMap<String, watch::Sender<u64>>>,
    /// Namespaces that got a receiver since [`MetaWatches::take_fresh`] was last called.
    fresh: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl MetaWatches {
    /// A receiver of `namespace`'s counter.
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<u64> {
        self.fresh.lock().insert(namespace.to_string());
        self.map
            .lock()
            .entry(namespace.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Moves `namespace`'s counter, waking its receivers (nothing to do when nobody watches).
    pub fn bump(&self, namespace: &str) {
        if let Some(tx) = self.map.lock().get(namespace) {
            tx.send_modify(|v| *v += 1);
        }
    }

    /// Namespaces that got a receiver since the last call (a poller moves them next round).
    pub fn take_fresh(&self) -> Vec<String> {
        self.fresh.lock().drain().collect()
    }

    /// Namespaces somebody watches now.
    pub fn watched(&self) -> Vec<String> {
        self.map
            .lock()
            .iter()
            .filter(|(_, tx)| tx.receiver_count() > 0)
            .map(|(ns, _)| ns.clone())
            .collect()
    }
}

/// One page of a time-range query.
#[derive(Debug, Clone, Default)]
pub struct TimePage {
    /// Messages stored in the range, in store-time order.
    pub messages: Vec<StoredMessage>,
    /// Opaque token for the next page; `None` when the range is exhausted.
    pub next_page_token: Option<String>,
}

/// Offsets of one consume queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueBounds {
    /// Oldest offset still kept (retention moves it up).
    pub min: u64,
    /// Offset the next visible message will get (= count ever made visible).
    pub max: u64,
}

/// Result of reading a consume queue.
#[derive(Debug, Clone, Default)]
pub struct QueueRead {
    /// Messages whose tag hash passed the filter, each with `queue_offset` set, in offset order.
    pub messages: Vec<StoredMessage>,
    /// Offset after the last entry examined (matched or filtered out); where the next read starts.
    pub next_offset: u64,
    /// Queue bounds at the time of the read.
    pub bounds: QueueBounds,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Pending timer messages copied forward out of the deleted segments.
    pub timers_moved: u64,
}

/// Counters and latency histograms for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Messages appended since start.
    pub appended_messages: u64,
    /// Bytes appended since start (record bytes).
    pub appended_bytes: u64,
    /// Log segments on disk.
    pub segments: u64,
    /// Bytes the store uses on disk.
    pub disk_bytes: u64,
    /// Timer messages not yet visible.
    pub pending_timers: u64,
    /// Timer messages copied forward since start, so retention never waits for a timer.
    pub moved_timers: u64,
    /// Latency of one append call (write + fsync when sync), microseconds.
    pub append_latency_us: HistogramSnapshot,
    /// Latency of one fsync, microseconds.
    pub fsync_latency_us: HistogramSnapshot,
}

/// A consumer group's committed offset on one queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedOffset {
    /// Topic.
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// Next offset to consume.
    pub offset: u64,
}

/// A metadata value with its version (1 for the first write, +1 on every write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaEntry {
    /// The stored bytes.
    pub value: Vec<u8>,
    /// 1 for the first write of the key, +1 on every write after (a deleted key starts over).
    pub version: u64,
}

/// When a conditional metadata write may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutCondition {
    /// Always (create or replace).
    Any,
    /// Only when the key does not exist (create-if-absent).
    Absent,
    /// Only when the key exists at this version (compare-and-set).
    Version(u64),
}

/// Result of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The value was written (durably) and now has `version`.
    Written {
        /// The new version.
        version: u64,
    },
    /// The condition did not hold; nothing was written.
    Conflict {
        /// The key's version now (`None`: absent).
        current: Option<u64>,
    },
}

/// Who balances a member's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    /// The host assigns its queues (dispatchers of plugins and HTTP pull consumers).
    HostAssigned,
    /// The member splits queues itself from the member list (RocketMQ SDK consumers).
    SelfBalancing,
}

/// One live member of a consumer group (a host's dispatcher, an SDK client, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    /// Consumer group.
    pub group: String,
    /// Member id, unique in the group.
    pub member_id: String,
    /// Who balances its queues.
    pub kind: MemberKind,
    /// Opaque data the member published with its last heartbeat (e.g. its subscriptions).
    pub data: Vec<u8>,
    /// Store time (ms) at which the row expires unless renewed.
    pub expires_at_ms: u64,
}

/// A queue of a group that one holder may serve at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
}

/// A held lease: epoch grows by one every time the queue changes holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The queue.
    pub key: LeaseKey,
    /// Who holds it.
    pub holder: String,
    /// Fencing epoch: +1 each time the lease is taken anew (a new holder, or the same holder
    /// after expiry or release); unchanged by renewals. Never goes backwards for a queue.
    pub epoch: u64,
    /// Store time (ms) at which the lease expires unless renewed.
    pub expires_at_ms: u64,
}

/// The storage API every backend implements.
///
/// # Contract (every backend; `conformance.rs` checks each point through this trait alone)
/// - **Offsets** of a queue are gapless (0, 1, 2, ...) and become visible in offset order: a
///   reader never sees offset 11 before 10, however many appenders race. `QueueBounds::max`
///   only grows; `min` only grows (retention).
/// - **Append** returns once durable per the flush mode; a batch is all-or-nothing (a batch
///   with a message the store cannot take fails whole and stores none of it), and its
///   messages of one queue get consecutive offsets in input order.
/// - **Timers**: a message whose `deliver_at_ms` is in the future is stored at once (found by
///   id, key and time range) but enters its queue only when revealed, never before its deliver
///   time; a past deliver time means visible now.
/// - **Metadata** has get, list, delete and conditional put (create-if-absent, compare-and-set
///   on a version); versions start at 1, grow by one per write and survive restarts; a
///   conditional write is atomic, so of two racing creates exactly one wins.
/// - **Member and lease rows** expire by time the store compares (the injected clock, which
///   the PostgreSQL backend passes to the database with every statement, so hosts sharing a
///   database need synchronised clocks): a row is live while `now < expires_at_ms`. Lease
///   epochs never go backwards for a queue; a fenced commit lands only under the epoch of the
///   last lease taken on its queue.
/// - **Lookup by position**: the position inside a `MessageId` finds the message without the
///   rest of the id (remoting's send-back and offset message ids carry only it).
/// - **Time range** queries list every message stored in the range, timer messages included.
/// - **Format versions**: records and segments (or the backend's equivalent) carry a format
///   version; a new version reads every older one without migrating user data.
/// - **Metadata changes**: `watch_meta` moves after every write or delete in its namespace,
///   by this host at once, by another host sharing the store within [`META_WATCH_MS`].
/// - **Notifications**: `watch_queue` wakes when that queue's visible max moves, not for
///   other queues; updates are made per queue per write round, never per message.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- durable metadata (topics, groups, plugin registry, ...): small values by namespace + key.

    /// The value of `namespace/key` and its version, if present.
    async fn meta_get(&self, namespace: &str, key: &str) -> Result<Option<MetaEntry>>;
    /// Writes `namespace/key` if `cond` holds (atomically with the check); durable on return.
    async fn meta_put_if(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        cond: PutCondition,
    ) -> Result<PutOutcome>;
    /// Creates or replaces `namespace/key` (`meta_put_if` with [`PutCondition::Any`]).
    async fn meta_put(&self, namespace: &str, key: &str, value: Vec<u8>) -> Result<()>;
    /// Deletes `namespace/key` (no error if absent); durable on return.
    async fn meta_delete(&self, namespace: &str, key: &str) -> Result<()>;
    /// Lists every key of `namespace` with its value and version, sorted by key.
    async fn meta_entries(&self, namespace: &str) -> Result<Vec<(String, MetaEntry)>>;
    /// Lists every key and value in `namespace`, sorted by key.
    async fn meta_list(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .meta_entries(namespace)
            .await?
            .into_iter()
            .map(|(k, e)| (k, e.value))
            .collect())
    }
    /// Change feed of one namespace: the receiver's value moves after a key of `namespace` is
    /// written or deleted by any host sharing the store (this one at once; others within
    /// [`META_WATCH_MS`]), so caches of metadata can reload. It may also move without a change.
    fn watch_meta(&self, namespace: &str) -> watch::Receiver<u64>;

    // ---- the message log

    /// Appends a batch; returns once durable per the flush mode, in input order.
    /// Messages with `deliver_at_ms` in the future are held as timers, invisible until revealed.
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>>;
    /// Finds a message by id without scanning.
    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>>;
    /// The message stored at a log position (the position inside its MessageId; remoting's
    /// send-back and offset message ids carry only this).
    async fn get_by_position(&self, position: u64) -> Result<Option<StoredMessage>>;
    /// The newest `limit` messages of `topic` carrying `key`, newest first.
    async fn by_key(&self, topic: &str, key: &str, limit: usize) -> Result<Vec<StoredMessage>>;
    /// Every message of `topic` stored in `[begin_ms, end_ms]` (timer messages too, pending or
    /// revealed, with `deliver_at_ms` set), in store-time order, paged.
    async fn by_time(
        &self,
        topic: &str,
        begin_ms: u64,
        end_ms: u64,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage>;

    // ---- consume queues (per topic, per queue id; visible messages only)

    /// Min and max offsets of a queue (zeros for a queue never written).
    async fn queue_bounds(&self, topic: &str, queue_id: u32) -> Result<QueueBounds>;
    /// Reads up to `max` matching messages from `from`; `tag_hashes = None` matches all.
    /// Bodies of filtered-out entries are never read.
    async fn read_queue(
        &self,
        topic: &str,
        queue_id: u32,
        from: u64,
        max: usize,
        tag_hashes: Option<&[u32]>,
    ) -> Result<QueueRead>;
    /// The first offset whose store time is ≥ `timestamp_ms` (max if none).
    async fn offset_for_time(&self, topic: &str, queue_id: u32, timestamp_ms: u64) -> Result<u64>;
    /// Store time of the oldest kept message of `topic`, if any.
    async fn earliest_stored_ms(&self, topic: &str) -> Result<Option<u64>>;

    // ---- timers

    /// Makes visible every timer message due at or before `now_ms` (at most `max`); returns how many.
    async fn reveal_due(&self, now_ms: u64, max: usize) -> Result<usize>;
    /// Deliver time of the earliest pending timer, if any.
    fn next_timer_ms(&self) -> Option<u64>;

    // ---- consumer offsets

    /// Records committed offsets of `group` (at least durable at the next flush / clean shutdown).
    async fn commit_offsets(&self, group: &str, offsets: &[CommittedOffset]) -> Result<()>;
    /// Every committed offset of `group`.
    async fn load_offsets(&self, group: &str) -> Result<Vec<CommittedOffset>>;
    /// Forgets every offset of `group` (group deleted).
    async fn delete_offsets(&self, group: &str) -> Result<()>;
    /// Commits offsets, each fenced by the lease epoch it was read under: a commit whose epoch
    /// is not the queue's current lease epoch is refused (false at its index), the others are
    /// written. (Same durability as commit_offsets.)
    async fn commit_offsets_fenced(
        &self,
        group: &str,
        offsets: &[(CommittedOffset, u64)],
    ) -> Result<Vec<bool>>;

    // ---- members and leases (rows that expire by the store's time)

    /// Upserts a member whose row lives `ttl_ms` from the store's now; true when it was not
    /// live before.
    async fn member_heartbeat(
        &self,
        group: &str,
        member_id: &str,
        kind: MemberKind,
        data: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<bool>;
    /// Live (unexpired) members of `group`, sorted by member_id.
    async fn member_list(&self, group: &str) -> Result<Vec<MemberRow>>;
    /// Removes a member; true if it was live.
    async fn member_remove(&self, group: &str, member_id: &str) -> Result<bool>;
    /// Takes the lease if free, expired, or already held by `holder` (then renews it, same
    /// epoch); None when another holder's lease is live.
    async fn lease_acquire(
        &self,
        key: &LeaseKey,
        holder: &str,
        ttl_ms: u64,
    ) -> Result<Option<Lease>>;
    /// Extends a held lease; None when it was lost (taken by another holder / epoch moved on,
    /// or released). A lease past its expiry that nobody took since can still be renewed.
    async fn lease_renew(&self, lease: &Lease, ttl_ms: u64) -> Result<Option<Lease>>;
    /// Gives a lease up (no error if already lost). Its epoch stays the queue's fence until
    /// the next holder takes the lease, so commits made before giving up still land.
    async fn lease_release(&self, lease: &Lease) -> Result<()>;
    /// Every live lease of `group`, sorted by key.
    async fn lease_list(&self, group: &str) -> Result<Vec<Lease>>;

    // ---- housekeeping

    /// Deletes whole segments whose newest message is older than the retention period.
    async fn enforce_retention(&self, now_ms: u64) -> Result<RetentionReport>;
    /// Per-queue change notification replacing the global counter for waiters: the receiver's
    /// value is the queue's visible max offset (QueueBounds::max), updated when an append or
    /// timer reveal makes entries of THAT queue visible. Appends to other queues must not wake
    /// it. Cheap for 10,000+ idle waiters.
    fn watch_queue(&self, topic: &str, queue_id: u32) -> watch::Receiver<u64>;
    /// Counters for `/metrics`.
    fn stats(&self) -> StoreStats;
    /// True when writes can be taken now (disk writable, not failed).
    fn writable(&self) -> bool;
    /// Why the store refuses writes until restart (e.g. a failed fsync), if it does; `/healthz`
    /// shows it. Backends that recover by themselves keep the default.
    fn unwritable_reason(&self) -> Option<String> {
        None
    }
    /// Flushes everything (clean shutdown).
    async fn close(&self) -> Result<()>;
}
