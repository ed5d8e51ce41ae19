//! Storage behind one trait: the embedded segment log (default) and, later, PostgreSQL.
//!
//! The trait assumes nothing about which process owns a queue: queue offsets, timers and consumer
//! offsets are all assigned and kept by the store, so several hosts could share one backend.
//! Callers (the broker) never touch files; front ends never touch the store.

pub mod embedded;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::error::{Result, WharfError};
use crate::metrics::HistogramSnapshot;
use crate::model::{Appended, MessageId, NewMessage, StoredMessage};

/// When a send is acknowledged relative to fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Acknowledge after fsync; concurrent appends share one fsync (group commit).
    #[default]
    Sync,
    /// Acknowledge after the write; fsync every `flush_interval_ms`.
    Async,
}

/// Which backend holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Segment log and index files in `data_dir`.
    #[default]
    Embedded,
    /// PostgreSQL via sqlx (`[store.postgres] url`).
    Postgres,
}

/// `[store]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `backend = "embedded"`
    pub backend: Backend,
    /// `data_dir = "./data"`
    pub data_dir: PathBuf,
    /// `flush = "sync"`
    pub flush: FlushMode,
    /// `flush_interval_ms = 100` (async mode only)
    pub flush_interval_ms: u64,
    /// `segment_bytes = 268435456` (256 MiB per log segment)
    pub segment_bytes: u64,
    /// `retention_hours = 72`
    pub retention_hours: u64,
    /// `[store.postgres]`
    pub postgres: PostgresConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Embedded,
            data_dir: PathBuf::from("./data"),
            flush: FlushMode::Sync,
            flush_interval_ms: 100,
            segment_bytes: 256 * 1024 * 1024,
            retention_hours: 72,
            postgres: PostgresConfig::default(),
        }
    }
}

/// `[store.postgres]` config section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `url = "postgres://user:pass@host/db"`
    pub url: String,
}

/// Opens the backend `config.backend` names (the embedded store unless configured otherwise).
pub async fn open_store(config: &StoreConfig, clock: SharedClock) -> Result<Arc<dyn Store>> {
    match config.backend {
        Backend::Embedded => {
            let s: Arc<dyn Store> = embedded::EmbeddedStore::open(config, clock).await?;
            Ok(s)
        }
        Backend::Postgres => Err(WharfError::bad_request(
            "[store] backend = \"postgres\" is not available in this build yet (the PostgreSQL \
             backend is planned); use backend = \"embedded\"",
        )),
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

/// The storage API every backend implements.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- durable metadata (topics, groups, plugin registry, ...): small values by namespace + key.

    /// Creates or replaces `namespace/key`; durable on return.
    async fn meta_put(&self, namespace: &str, key: &str, value: Vec<u8>) -> Result<()>;
    /// Deletes `namespace/key` (no error if absent); durable on return.
    async fn meta_delete(&self, namespace: &str, key: &str) -> Result<()>;
    /// Lists every key and value in `namespace`, sorted by key.
    async fn meta_list(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>>;

    // ---- the message log

    /// Appends a batch; returns once durable per the flush mode, in input order.
    /// Messages with `deliver_at_ms` in the future are held as timers, invisible until revealed.
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>>;
    /// Finds a message by id without scanning.
    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>>;
    /// The newest `limit` messages of `topic` carrying `key`, newest first.
    async fn by_key(&self, topic: &str, key: &str, limit: usize) -> Result<Vec<StoredMessage>>;
    /// Messages of `topic` stored in `[begin_ms, end_ms]`, paged.
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

    // ---- housekeeping

    /// Deletes whole segments whose newest message is older than the retention period.
    async fn enforce_retention(&self, now_ms: u64) -> Result<RetentionReport>;
    /// A counter bumped after every append or reveal; long polls wait on it.
    fn changes(&self) -> watch::Receiver<u64>;
    /// Counters for `/metrics`.
    fn stats(&self) -> StoreStats;
    /// True when writes can be taken now (disk writable, not failed).
    fn writable(&self) -> bool;
    /// Flushes everything (clean shutdown).
    async fn close(&self) -> Result<()>;
}
