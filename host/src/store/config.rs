//! `[store]` and `[store.postgres]` config sections: plain data the config loader fills and
//! checks, kept apart from the backends so the config parser builds (and is fuzzed) without them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// `write_queue_requests = 10000`: appends accepted but not yet answered by the store's
    /// writer (either backend), at most; past it a send fails at once with SYSTEM_BUSY.
    pub write_queue_requests: u64,
    /// `write_queue_bytes = 67108864`: encoded bytes of those appends at most (64 MiB); past it
    /// a send fails at once with SYSTEM_BUSY (a single batch larger than this is still taken
    /// when nothing else waits).
    pub write_queue_bytes: u64,
    /// `min_free_bytes = 67108864`: the embedded store refuses sends (SERVICE_NOT_AVAILABLE)
    /// while its disk has less free than this (64 MiB), and resumes by itself once space is
    /// freed; 0 turns the check off (the disk may then fill while indexes are written, which
    /// stops writes until a restart).
    pub min_free_bytes: u64,
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
            write_queue_requests: 10_000,
            write_queue_bytes: 64 * 1024 * 1024,
            min_free_bytes: 64 * 1024 * 1024,
            postgres: PostgresConfig::default(),
        }
    }
}

/// `[store.postgres]` config section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `url = "postgres://user:pass@host/db"`
    pub url: String,
    /// `pool_size = 16`: connections per host (writers, readers and one listener share them).
    pub pool_size: u32,
    /// `statement_timeout_ms = 30000`: PostgreSQL's statement_timeout for every statement
    /// (0 = none).
    pub statement_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            pool_size: 16,
            statement_timeout_ms: 30_000,
        }
    }
}

/// Shows the URL without its password, so a logged config never leaks it.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &super::postgres::redacted_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}
