//! The PostgreSQL backend: every [`Store`] capability on one database that several hosts can
//! share.
//!
//! Schema: `host/migrations/*.sql`, applied at open by sqlx's migrator, which holds a
//! PostgreSQL advisory lock while it runs, so two hosts starting together never race; applied
//! migrations are checked by checksum and a database migrated by a newer build is refused.
//!
//! Where things live:
//! - `wharf_message`, partitioned by hour on `part_ms` (store time; for a revealed
//!   timer, its reveal time; for a pending one moved by retention, the time it was moved). Retention drops whole partitions whose newest row is older than the retention
//!   period (as the embedded store drops whole segments), after moving the timers still
//!   pending in them into the current partition, so a far timer keeps no old data; it never
//!   deletes row by row. Indexes: per queue by offset, by position (the id), by
//!   (topic, store time), by key (GIN over the key array), pending timers by deliver time.
//! - `wharf_queue`: one row per consume queue with its min/max offsets. An append takes its
//!   offsets by bumping `max_offset` in the same statement that inserts the rows; the row lock
//!   is held to commit, so offsets are gapless and commit in offset order on every host.
//! - `wharf_meta` (versions), `wharf_offset`, `wharf_member`, `wharf_lease` (epochs).
//!
//! Time: like the embedded store, this backend reads "now" from the injected host clock and
//! passes it to every statement (store times, member and lease expiry), so the broker's own
//! comparisons against `expires_at_ms` use the same time base. Hosts sharing a database must
//! therefore keep their clocks in sync (NTP); `open` measures the skew against the database
//! and warns when it exceeds [`MAX_SKEW_MS`].
//!
//! Appends are coalesced like the embedded store's group commit: concurrent `append` calls
//! queue up, and each writer task takes everything queued (up to a round limit) and stores it
//! with ONE statement (multi-row `INSERT ... SELECT FROM unnest(...)`) whose commit is the
//! durability point: `synchronous_commit` on for `flush = "sync"`, off for `"async"`.
//!
//! Notifications: the statement that makes entries visible also sends one `NOTIFY
//! wharf_queue` per queue it touched; each host's listener applies them to its per-queue
//! watches, and polls the watched queues' maxes every [`POLL_MS`] so a notification lost
//! with a dropped connection never stalls a waiter. The host's own appends update its watches
//! directly after commit.

mod notify;
mod secret;
#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
pub(crate) mod tests;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::secret::{Redactor, redacted_url};
use super::{
    CommittedOffset, FlushMode, Lease, LeaseKey, MemberKind, MemberRow, MetaEntry, MetaWatches,
    PutCondition, PutOutcome, QueueBounds, QueueRead, RetentionReport, Store, StoreConfig,
    StoreStats, TimePage,
};
use crate::clock::SharedClock;
use crate::error::{Result, WharfError};
use crate::metrics::Histogram;
use crate::model::{Appended, MessageId, NewMessage, StoredMessage, WireInfo, tag_hash};

/// Format of the message rows this build writes (the `format` column); rows of a newer
/// format are refused on read rather than misread.
pub const ROW_FORMAT: i16 = 1;
/// Width of one message partition (ms). Retention is at least an hour, so a partition whose
/// newest row is past retention can never receive another plain append.
pub const PARTITION_MS: u64 = 3_600_000;
/// How often each host polls its watched queues (in case a notification was lost) and the
/// watched metadata namespaces (ms).
pub const POLL_MS: u64 = super::META_WATCH_MS;
/// Clock skew against the database above which `open` warns (ms).
pub const MAX_SKEW_MS: i64 = 2_000;
/// Queue entries examined per `read_queue` call at most (as the embedded store).
const MAX_SCAN: i64 = 16_384;
/// Advisory lock key serialising partition DDL across hosts ("Wharf" in ASCII).
const PARTITION_LOCK: i64 = 0x0057_6861_7266;

/// The migrations, embedded so the binary needs no files beside it.
fn migrator() -> sqlx::migrate::Migrator {
    use sqlx::SqlSafeStr;
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let step = |version, name: &'static str, sql: &'static str| {
        Migration::new(
            version,
            name.into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    Migrator::with_migrations(vec![
        step(
            1,
            "schema",
            include_str!("../../../migrations/0001_schema.sql"),
        ),
        step(
            2,
            "meta stamp",
            include_str!("../../../migrations/0002_meta_stamp.sql"),
        ),
        step(
            3,
            "meta deletes",
            include_str!("../../../migrations/0003_meta_deletes.sql"),
        ),
    ])
}

/// The columns every message read selects, in the order [`decode_message`] reads them.
macro_rules! msg_cols {
    () => {
        "position, stored_ms, topic, queue_id, queue_offset, tag, keys, properties, body, \
         born_ms, deliver_at_ms, reconsume_times, flag, sys_flag, born_host, store_host, format"
    };
}

/// Clamps a u64 into PostgreSQL's bigint.
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads a bigint that the schema keeps non-negative.
fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// PostgreSQL text cannot hold NUL; such input can match nothing stored.
fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

fn no_nul(what: &str, s: &str) -> Result<()> {
    if has_nul(s) {
        return Err(WharfError::bad_request(format!(
            "{what} contains a NUL character, which the PostgreSQL backend cannot store; remove it"
        )));
    }
    Ok(())
}

/// Start of the partition holding `ms`.
fn partition_of(ms: u64) -> u64 {
    ms - ms % PARTITION_MS
}

fn partition_name(start: u64) -> String {
    format!("wharf_message_p{start}")
}

/// Pending timers as this host last saw them; `gen` moves with every local change so a
/// refresh that raced a change does not overwrite it.
#[derive(Debug, Default)]
struct TimerState {
    next: Option<u64>,
    pending: u64,
    generation: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended_messages: AtomicU64,
    appended_bytes: AtomicU64,
    partitions: AtomicU64,
    disk_bytes: AtomicU64,
    moved_timers: AtomicU64,
    append_latency: Histogram,
    commit_latency: Histogram,
}

/// Per-queue watches: one sender per queue this host has seen, holding its visible max.
#[derive(Debug, Default)]
struct Watches {
    map: Mutex<HashMap<String, HashMap<u32, watch::Sender<u64>>>>,
}

impl Watches {
    fn subscribe(&self, topic: &str, queue_id: u32) -> watch::Receiver<u64> {
        let mut map = self.map.lock();
        if !map.contains_key(topic) {
            map.insert(topic.to_string(), HashMap::new());
        }
        map.get_mut(topic)
            .map(|q| {
                q.entry(queue_id)
                    .or_insert_with(|| watch::channel(0).0)
                    .subscribe()
            })
            .unwrap_or_else(|| watch::channel(0).1)
    }

    /// Moves a queue's max up (never down); wakes its watchers only when it moved.
    fn advance(&self, topic: &str, queue_id: u32, max: u64) {
        let mut map = self.map.lock();
        if let Some(q) = map.get(topic).and_then(|t| t.get(&queue_id)) {
            q.send_if_modified(|v| {
                let moved = max > *v;
                if moved {
                    *v = max;
                }
                moved
            });
            return;
        }
        map.entry(topic.to_string())
            .or_default()
            .insert(queue_id, watch::channel(max).0);
    }

    /// Queues somebody waits on now.
    fn watched(&self) -> (Vec<String>, Vec<i32>) {
        let map = self.map.lock();
        let mut topics = Vec::new();
        let mut queues = Vec::new();
        for (t, qs) in map.iter() {
            for (q, tx) in qs {
                if tx.receiver_count() > 0 {
                    topics.push(t.clone());
                    queues.push(*q as i32);
                }
            }
        }
        (topics, queues)
    }
}

/// State shared by the store handle, its writer tasks and its listener.
pub(crate) struct Inner {
    pool: PgPool,
    clock: SharedClock,
    node: u16,
    keep_ms: u64,
    flush: FlushMode,
    redactor: Redactor,
    watches: Watches,
    /// Metadata change feeds, and each watched namespace's last seen print (see `notify`).
    meta_watches: MetaWatches,
    meta_prints: Mutex<HashMap<String, [i64; 4]>>,
    timers: Mutex<TimerState>,
    partitions: Mutex<HashSet<u64>>,
    stats: Counters,
    healthy: AtomicBool,
    closed: AtomicBool,
    inbox: mpsc::UnboundedSender<writer::Job>,
    /// Appends waiting in the inbox or in a round, against `[store] write_queue_*`.
    budget: Arc<crate::store::QueueBudget>,
}

impl Inner {
    /// Maps a driver error to what the user sees, password removed: an unreachable database
    /// is SERVICE_NOT_AVAILABLE (and marks the store unwritable until a query succeeds),
    /// lock conflicts and timeouts are SYSTEM_BUSY, the rest SYSTEM_ERROR.
    fn err(&self, what: &str, e: sqlx::Error) -> WharfError {
        let code = match &e {
            sqlx::Error::Database(d) => d.code().map(|c| c.to_string()),
            _ => None,
        };
        let unreachable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => true,
            _ => code.as_deref().is_some_and(|c| {
                c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
            }),
        };
        let text = self.redactor.redact(&e.to_string());
        if unreachable {
            self.healthy.store(false, Ordering::Release);
            return WharfError::unavailable(format!(
                "the PostgreSQL store is not reachable while {what}: {text}; writes fail until \
                 the database is back (check that it runs and [store.postgres] url)"
            ));
        }
        match code.as_deref() {
            Some("40001" | "40P01" | "55P03" | "57014") => WharfError::busy(format!(
                "the PostgreSQL store is busy while {what}: {text}; retry"
            )),
            _ => WharfError::internal(format!("the PostgreSQL store failed while {what}: {text}")),
        }
    }

    fn ok<T>(&self, what: &str, r: std::result::Result<T, sqlx::Error>) -> Result<T> {
        match r {
            Ok(v) => {
                self.healthy.store(true, Ordering::Release);
                Ok(v)
            }
            Err(e) => Err(self.err(what, e)),
        }
    }

    fn closed_error() -> WharfError {
        WharfError::unavailable(
            "the store is closed (the host is shutting down); retry against a running host",
        )
    }

    /// Creates the partition starting at `start` unless this host already knows it exists.
    async fn ensure_partition(&self, start: u64) -> Result<()> {
        if self.partitions.lock().contains(&start) {
            return Ok(());
        }
        let what = "creating a message partition";
        let mut tx = self.ok(what, self.pool.begin().await)?;
        // Two hosts creating the same partition would otherwise collide in the catalog.
        let r = sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PARTITION_LOCK)
            .execute(&mut *tx)
            .await;
        self.ok(what, r)?;
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF wharf_message FOR VALUES FROM ({start}) TO ({})",
            partition_name(start),
            start + PARTITION_MS
        );
        let r = sqlx::query(AssertSqlSafe(ddl)).execute(&mut *tx).await;
        self.ok(what, r)?;
        self.ok(what, tx.commit().await)?;
        let mut known = self.partitions.lock();
        known.insert(start);
        self.stats
            .partitions
            .store(known.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reloads the partition list from the catalog (after another host dropped or made one).
    async fn load_partitions(&self) -> Result<()> {
        let r = sqlx::query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'wharf_message'::regclass",
        )
        .fetch_all(&self.pool)
        .await;
        let rows = self.ok("listing message partitions", r)?;
        let mut found = HashSet::new();
        for row in rows {
            let name: String = row.try_get(0).unwrap_or_default();
            if let Some(start) = name
                .strip_prefix("wharf_message_p")
                .and_then(|s| s.parse::<u64>().ok())
            {
                found.insert(start);
            }
        }
        self.stats
            .partitions
            .store(found.len() as u64, Ordering::Relaxed);
        *self.partitions.lock() = found;
        Ok(())
    }

    /// Re-reads the earliest pending timer and the pending count, unless a local change
    /// happened meanwhile (then that change's view stands until the next refresh).
    async fn refresh_timers(&self, with_count: bool) -> Result<()> {
        let generation = self.timers.lock().generation;
        let sql = if with_count {
            "SELECT min(deliver_at_ms), count(*) FROM wharf_message WHERE queue_offset IS NULL"
        } else {
            "SELECT min(deliver_at_ms), NULL::int8 FROM wharf_message WHERE queue_offset IS NULL"
        };
        let r = sqlx::query(sql).fetch_one(&self.pool).await;
        let row = self.ok("reading pending timers", r)?;
        let next: Option<i64> = row.try_get(0).unwrap_or(None);
        let count: Option<i64> = row.try_get(1).unwrap_or(None);
        let mut t = self.timers.lock();
        if t.generation == generation {
            t.next = next.map(unbig);
            if let Some(c) = count {
                t.pending = unbig(c);
            }
        }
        Ok(())
    }
}

/// The PostgreSQL backend. Open with [`PostgresStore::open`]; shut down with [`Store::close`].
pub struct PostgresStore {
    inner: Arc<Inner>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("node", &self.inner.node)
            .finish()
    }
}

impl PostgresStore {
    /// Connects, applies the migrations (under sqlx's advisory lock) and starts the writer
    /// tasks and the notification listener. An unreachable database is SERVICE_NOT_AVAILABLE
    /// with the URL shown without its password.
    pub async fn open(config: &StoreConfig, clock: SharedClock) -> Result<Arc<PostgresStore>> {
        let pg = &config.postgres;
        let redactor = Redactor::for_url(&pg.url);
        let shown = redacted_url(&pg.url);
        let mut options = PgConnectOptions::from_str(&pg.url).map_err(|e| {
            WharfError::bad_request(format!(
                "[store.postgres] url = \"{shown}\" is not usable: {}; write \
                 postgres://user:password@host:port/database",
                redactor.redact(&e.to_string())
            ))
        })?;
        options = options.application_name("wharf");
        if pg.statement_timeout_ms > 0 {
            options = options.options([(
                "statement_timeout",
                format!("{}ms", pg.statement_timeout_ms),
            )]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(pg.pool_size.max(2))
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| {
                WharfError::unavailable(format!(
                    "cannot connect to PostgreSQL at {shown}: {}; start the database or fix \
                     [store.postgres] url",
                    redactor.redact(&e.to_string())
                ))
            })?;
        migrator().run(&pool).await.map_err(|e| {
            WharfError::unavailable(format!(
                "cannot migrate the PostgreSQL schema at {shown}: {}; a database migrated by a \
                 newer wharf needs that version or newer",
                redactor.redact(&e.to_string())
            ))
        })?;
        let row = sqlx::query(
            "SELECT node, (extract(epoch FROM clock_timestamp()) * 1000)::int8 FROM wharf_cluster",
        )
        .fetch_one(&pool)
        .await
        .map_err(|e| {
            WharfError::unavailable(format!(
                "cannot read wharf_cluster at {shown}: {}",
                redactor.redact(&e.to_string())
            ))
        })?;
        let node: i32 = row.try_get(0).unwrap_or(0);
        let db_now: i64 = row.try_get(1).unwrap_or(0);
        let skew = db_now - big(clock.now_ms());
        if skew.abs() > MAX_SKEW_MS {
            warn!(
                skew_ms = skew,
                "the host clock differs from the database's; hosts sharing a database need \
                 synchronised clocks (leases and member rows expire by the host clock)"
            );
        }
        let (inbox, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            pool,
            clock,
            node: u16::try_from(node).unwrap_or(0),
            keep_ms: config.retention_hours.saturating_mul(3_600_000),
            flush: config.flush,
            redactor,
            watches: Watches::default(),
            meta_watches: MetaWatches::default(),
            meta_prints: Mutex::new(HashMap::new()),
            timers: Mutex::new(TimerState::default()),
            partitions: Mutex::new(HashSet::new()),
            stats: Counters::default(),
            healthy: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            inbox,
            budget: crate::store::QueueBudget::new(config),
        });
        inner.load_partitions().await?;
        inner.refresh_timers(true).await?;
        let r = sqlx::query("SELECT topic, queue_id, max_offset FROM wharf_queue")
            .fetch_all(&inner.pool)
            .await;
        for row in inner.ok("loading queue bounds", r)? {
            let topic: String = row.try_get(0).unwrap_or_default();
            let q: i32 = row.try_get(1).unwrap_or(0);
            let max: i64 = row.try_get(2).unwrap_or(0);
            inner.watches.advance(&topic, q as u32, unbig(max));
        }
        let stop = CancellationToken::new();
        // One writer task per host. A round locks the rows of every queue it touches until it
        // commits, so concurrent rounds run one after another anyway: several writers sharing the
        // queues only made each round smaller (4: 10.5 messages per round and 3,580 msgs/s against
        // 1 writer's 33.7 and 7,116), and writers splitting the queues between them (2: 27.6 per
        // round, 5,185 msgs/s) lost to one writer that lingers for the senders it just answered
        // (63.9 per round, 8,600 msgs/s); all `wharf bench send --postgres`, 64 senders, one
        // server.
        let tasks = vec![
            tokio::spawn(writer::run(inner.clone(), rx, stop.clone())),
            tokio::spawn(notify::run(inner.clone(), stop.clone())),
        ];
        info!(url = %shown, node = inner.node, "PostgreSQL store open");
        Ok(Arc::new(PostgresStore {
            inner,
            stop,
            tasks: Mutex::new(tasks),
        }))
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    async fn fetch_messages(
        &self,
        what: &str,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<StoredMessage>> {
        let r = q.fetch_all(&self.inner.pool).await;
        let rows = self.inner.ok(what, r)?;
        rows.iter()
            .map(|row| decode_message(row, self.inner.node, 0))
            .collect()
    }
}

/// Builds a [`StoredMessage`] from the [`msg_cols`] columns starting at column `at`.
fn decode_message(row: &PgRow, node: u16, at: usize) -> Result<StoredMessage> {
    let bad =
        |e: sqlx::Error| WharfError::internal(format!("a stored message row is unreadable: {e}"));
    let format: i16 = row.try_get(at + 16).map_err(bad)?;
    if format > ROW_FORMAT {
        return Err(WharfError::internal(format!(
            "a message row has format {format}, newer than this build reads ({ROW_FORMAT}); run \
             a newer wharf on this database"
        )));
    }
    let position: i64 = row.try_get(at).map_err(bad)?;
    let stored_ms = unbig(row.try_get(at + 1).map_err(bad)?);
    let queue_id: i32 = row.try_get(at + 3).map_err(bad)?;
    let queue_offset: Option<i64> = row.try_get(at + 4).map_err(bad)?;
    let props: Vec<u8> = row.try_get(at + 7).map_err(bad)?;
    let properties = wharf_codec::properties::decode_map(&props).map_err(|e| {
        WharfError::internal(format!("a stored message's properties are unreadable: {e}"))
    })?;
    let body: Vec<u8> = row.try_get(at + 8).map_err(bad)?;
    let deliver: Option<i64> = row.try_get(at + 10).map_err(bad)?;
    let reconsume: i32 = row.try_get(at + 11).map_err(bad)?;
    let host = |i: usize| -> Result<Option<SocketAddr>> {
        let s: Option<String> = row.try_get(at + i).map_err(bad)?;
        Ok(s.and_then(|s| s.parse().ok()))
    };
    Ok(StoredMessage {
        id: MessageId::new(stored_ms, node, unbig(position)),
        topic: row.try_get(at + 2).map_err(bad)?,
        queue_id: queue_id as u32,
        queue_offset: queue_offset.map(unbig),
        tag: row.try_get(at + 5).map_err(bad)?,
        keys: row.try_get(at + 6).map_err(bad)?,
        properties,
        body: body.into(),
        born_ms: unbig(row.try_get(at + 9).map_err(bad)?),
        stored_ms,
        deliver_at_ms: deliver.map(unbig),
        reconsume_times: reconsume as u32,
        wire: WireInfo {
            flag: row.try_get(at + 12).map_err(bad)?,
            sys_flag: row.try_get(at + 13).map_err(bad)?,
            born_host: host(14)?,
            store_host: host(15)?,
        },
    })
}

/// A page token: the (store time, position) of the last message listed.
fn time_token(ms: u64, pos: u64) -> String {
    format!("{ms}.{pos}")
}

fn parse_time_token(s: &str) -> Result<(i64, i64)> {
    let bad = || {
        WharfError::bad_request(format!(
            "page_token '{s}' is not valid; pass the next_page_token of the previous page"
        ))
    };
    let (a, b) = s.split_once('.').ok_or_else(bad)?;
    let a: u64 = a.parse().map_err(|_| bad())?;
    let b: u64 = b.parse().map_err(|_| bad())?;
    Ok((big(a), big(b)))
}

fn kind_code(k: MemberKind) -> i16 {
    match k {
        MemberKind::HostAssigned => 0,
        MemberKind::SelfBalancing => 1,
    }
}

fn kind_of(code: i16) -> Option<MemberKind> {
    match code {
        0 => Some(MemberKind::HostAssigned),
        1 => Some(MemberKind::SelfBalancing),
        _ => None,
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn meta_get(&self, namespace: &str, key: &str) -> Result<Option<MetaEntry>> {
        if has_nul(namespace) || has_nul(key) {
            return Ok(None);
        }
        let r =
            sqlx::query("SELECT value, version FROM wharf_meta WHERE namespace = $1 AND key = $2")
                .bind(namespace)
                .bind(key)
                .fetch_optional(&self.inner.pool)
                .await;
        let row = self.inner.ok("reading metadata", r)?;
        Ok(row.map(|row| MetaEntry {
            value: row.try_get(0).unwrap_or_default(),
            version: unbig(row.try_get(1).unwrap_or(0)),
        }))
    }

    async fn meta_put_if(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        cond: PutCondition,
    ) -> Result<PutOutcome> {
        no_nul("a metadata namespace", namespace)?;
        no_nul("a metadata key", key)?;
        let sql = match cond {
            PutCondition::Any => {
                "INSERT INTO wharf_meta AS m (namespace, key, value, version) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT (namespace, key) DO UPDATE SET value = EXCLUDED.value, \
                 version = m.version + 1, stamp = nextval('wharf_meta_stamp') RETURNING version"
            }
            PutCondition::Absent => {
                "INSERT INTO wharf_meta (namespace, key, value, version) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT (namespace, key) DO NOTHING RETURNING version"
            }
            PutCondition::Version(_) => {
                "UPDATE wharf_meta SET value = $3, version = version + 1, \
                 stamp = nextval('wharf_meta_stamp') WHERE namespace = $1 AND key = $2 AND version = $4 RETURNING version"
            }
        };
        let mut q = sqlx::query(sql).bind(namespace).bind(key).bind(value);
        if let PutCondition::Version(v) = cond {
            q = q.bind(big(v));
        }
        let r = q.fetch_optional(&self.inner.pool).await;
        match self.inner.ok("writing metadata", r)? {
            Some(row) => {
                self.inner.meta_watches.bump(namespace);
                Ok(PutOutcome::Written {
                    version: unbig(row.try_get(0).unwrap_or(0)),
                })
            }
            None => {
                let current = self.meta_get(namespace, key).await?.map(|e| e.version);
                Ok(PutOutcome::Conflict { current })
            }
        }
    }

    async fn meta_put(&self, namespace: &str, key: &str, value: Vec<u8>) -> Result<()> {
        self.meta_put_if(namespace, key, value, PutCondition::Any)
            .await
            .map(|_| ())
    }

    async fn meta_delete(&self, namespace: &str, key: &str) -> Result<()> {
        if has_nul(namespace) || has_nul(key) {
            return Ok(());
        }
        // One statement: the delete and the row that makes other hosts' polls see it.
        let r = sqlx::query(
            "WITH d AS (DELETE FROM wharf_meta WHERE namespace = $1 AND key = $2 RETURNING 1) \
             INSERT INTO wharf_meta_deleted (namespace) SELECT $1 WHERE EXISTS (SELECT 1 FROM d)",
        )
        .bind(namespace)
        .bind(key)
        .execute(&self.inner.pool)
        .await;
        self.inner.ok("deleting metadata", r)?;
        self.inner.meta_watches.bump(namespace);
        Ok(())
    }

    fn watch_meta(&self, namespace: &str) -> watch::Receiver<u64> {
        self.inner.meta_watches.subscribe(namespace)
    }

    async fn meta_entries(&self, namespace: &str) -> Result<Vec<(String, MetaEntry)>> {
        if has_nul(namespace) {
            return Ok(Vec::new());
        }
        let r = sqlx::query(
            "SELECT key, value, version FROM wharf_meta WHERE namespace = $1 ORDER BY key",
        )
        .bind(namespace)
        .fetch_all(&self.inner.pool)
        .await;
        let rows = self.inner.ok("listing metadata", r)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.try_get(0).unwrap_or_default(),
                    MetaEntry {
                        value: row.try_get(1).unwrap_or_default(),
                        version: unbig(row.try_get(2).unwrap_or(0)),
                    },
                )
            })
            .collect())
    }

    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Inner::closed_error());
        }
        let job = writer::Job::prepare(batch)?;
        let permit = self.inner.budget.try_acquire(job.bytes())?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .inbox
            .send(job.with_reply(tx, permit))
            .map_err(|_| Inner::closed_error())?;
        rx.await.map_err(|_| Inner::closed_error())?
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        if id.node() != self.inner.node {
            return Ok(None);
        }
        Ok(self
            .get_by_position(id.position())
            .await?
            .filter(|m| m.stored_ms == id.stored_ms()))
    }

    async fn get_by_position(&self, position: u64) -> Result<Option<StoredMessage>> {
        let Ok(pos) = i64::try_from(position) else {
            return Ok(None);
        };
        let q = sqlx::query(concat!(
            "SELECT ",
            msg_cols!(),
            " FROM wharf_message WHERE position = $1 LIMIT 1"
        ))
        .bind(pos);
        Ok(self
            .fetch_messages("reading a message", q)
            .await?
            .into_iter()
            .next())
    }

    async fn by_key(&self, topic: &str, key: &str, limit: usize) -> Result<Vec<StoredMessage>> {
        if limit == 0 || has_nul(topic) || has_nul(key) {
            return Ok(Vec::new());
        }
        let q = sqlx::query(concat!(
            "SELECT ",
            msg_cols!(),
            " FROM wharf_message WHERE keys @> ARRAY[$2]::text[] AND keys <> '{}' AND topic = $1 \
             ORDER BY stored_ms DESC, position DESC LIMIT $3"
        ))
        .bind(topic)
        .bind(key)
        .bind(big(limit as u64));
        self.fetch_messages("querying by key", q).await
    }

    async fn by_time(
        &self,
        topic: &str,
        begin_ms: u64,
        end_ms: u64,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<TimePage> {
        let after = page_token.map(parse_time_token).transpose()?;
        if has_nul(topic) {
            return Ok(TimePage::default());
        }
        let limit = limit.max(1);
        let (after_ms, after_pos) = after.unwrap_or((-1, -1));
        // part_ms >= stored_ms always, so it bounds which partitions can hold the range.
        let q = sqlx::query(concat!(
            "SELECT ",
            msg_cols!(),
            " FROM wharf_message WHERE topic = $1 AND stored_ms >= $2 AND stored_ms <= $3 \
             AND part_ms >= $2 AND (stored_ms, position) > ($4, $5) \
             ORDER BY stored_ms, position LIMIT $6"
        ))
        .bind(topic)
        .bind(big(begin_ms))
        .bind(big(end_ms))
        .bind(after_ms)
        .bind(after_pos)
        .bind(big(limit as u64 + 1));
        let mut messages = self.fetch_messages("querying by time", q).await?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        let next_page_token = if more {
            messages
                .last()
                .map(|m| time_token(m.stored_ms, m.id.position()))
        } else {
            None
        };
        Ok(TimePage {
            messages,
            next_page_token,
        })
    }

    async fn queue_bounds(&self, topic: &str, queue_id: u32) -> Result<QueueBounds> {
        if has_nul(topic) {
            return Ok(QueueBounds::default());
        }
        let r = sqlx::query(
            "SELECT min_offset, max_offset FROM wharf_queue WHERE topic = $1 AND queue_id = $2",
        )
        .bind(topic)
        .bind(queue_id as i32)
        .fetch_optional(&self.inner.pool)
        .await;
        Ok(match self.inner.ok("reading queue bounds", r)? {
            Some(row) => QueueBounds {
                min: unbig(row.try_get(0).unwrap_or(0)),
                max: unbig(row.try_get(1).unwrap_or(0)),
            },
            None => QueueBounds::default(),
        })
    }

    async fn read_queue(
        &self,
        topic: &str,
        queue_id: u32,
        from: u64,
        max: usize,
        tag_hashes: Option<&[u32]>,
    ) -> Result<QueueRead> {
        if has_nul(topic) {
            return Ok(QueueRead::default());
        }
        let tags: Option<Vec<i32>> = tag_hashes.map(|t| t.iter().map(|h| *h as i32).collect());
        // One statement, so the bounds and the rows come from one snapshot: every offset
        // below the max read here is committed, so the rows below it have no gaps.
        let r = sqlx::query(concat!(
            "SELECT b.min_offset, b.max_offset, m.* FROM \
             (SELECT min_offset, max_offset FROM wharf_queue WHERE topic = $1 AND queue_id = $2) b \
             LEFT JOIN LATERAL (SELECT ",
            msg_cols!(),
            " FROM wharf_message WHERE topic = $1 AND queue_id = $2 \
               AND queue_offset >= greatest($3, b.min_offset) \
               AND queue_offset < least(b.max_offset, greatest($3, b.min_offset) + $6) \
               AND ($4::int4[] IS NULL OR tag_hash = ANY($4)) \
             ORDER BY queue_offset LIMIT $5) m ON true"
        ))
        .bind(topic)
        .bind(queue_id as i32)
        .bind(big(from))
        .bind(tags)
        .bind(big(max as u64))
        .bind(MAX_SCAN)
        .fetch_all(&self.inner.pool)
        .await;
        let rows = self.inner.ok("reading a queue", r)?;
        let Some(first) = rows.first() else {
            return Ok(QueueRead::default());
        };
        let bounds = QueueBounds {
            min: unbig(first.try_get(0).unwrap_or(0)),
            max: unbig(first.try_get(1).unwrap_or(0)),
        };
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let pos: Option<i64> = row.try_get(2).unwrap_or(None);
            if pos.is_some() {
                messages.push(decode_message(row, self.inner.node, 2)?);
            }
        }
        let start = from.clamp(bounds.min, bounds.max);
        let stop = bounds.max.min(start.saturating_add(MAX_SCAN as u64));
        let next_offset = match messages.last().and_then(|m| m.queue_offset) {
            Some(last) if max > 0 && messages.len() == max => last + 1,
            _ if max == 0 => start,
            _ => stop,
        };
        Ok(QueueRead {
            messages,
            next_offset,
            bounds,
        })
    }

    async fn offset_for_time(&self, topic: &str, queue_id: u32, timestamp_ms: u64) -> Result<u64> {
        if has_nul(topic) {
            return Ok(0);
        }
        let r = sqlx::query(
            "SELECT coalesce((SELECT queue_offset FROM wharf_message WHERE topic = $1 \
             AND queue_id = $2 AND queue_offset IS NOT NULL AND part_ms >= $3 \
             ORDER BY queue_offset LIMIT 1), \
             (SELECT max_offset FROM wharf_queue WHERE topic = $1 AND queue_id = $2), 0)",
        )
        .bind(topic)
        .bind(queue_id as i32)
        .bind(big(timestamp_ms))
        .fetch_one(&self.inner.pool)
        .await;
        let row = self.inner.ok("finding an offset by time", r)?;
        Ok(unbig(row.try_get(0).unwrap_or(0)))
    }

    async fn earliest_stored_ms(&self, topic: &str) -> Result<Option<u64>> {
        if has_nul(topic) {
            return Ok(None);
        }
        let r = sqlx::query(
            "SELECT min(m.stored_ms) FROM wharf_queue q CROSS JOIN LATERAL \
             (SELECT stored_ms FROM wharf_message WHERE topic = q.topic AND queue_id = q.queue_id \
              AND queue_offset >= q.min_offset ORDER BY queue_offset LIMIT 1) m \
             WHERE q.topic = $1",
        )
        .bind(topic)
        .fetch_one(&self.inner.pool)
        .await;
        let row = self.inner.ok("reading the oldest message", r)?;
        let v: Option<i64> = row.try_get(0).unwrap_or(None);
        Ok(v.map(unbig))
    }

    async fn reveal_due(&self, now_ms: u64, max: usize) -> Result<usize> {
        if max == 0 || self.next_timer_ms().is_none_or(|t| t > now_ms) {
            return Ok(0);
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Inner::closed_error());
        }
        writer::reveal(&self.inner, now_ms, max).await
    }

    fn next_timer_ms(&self) -> Option<u64> {
        self.inner.timers.lock().next
    }

    async fn commit_offsets(&self, group: &str, offsets: &[CommittedOffset]) -> Result<()> {
        no_nul("a group name", group)?;
        let mut last: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for c in offsets {
            no_nul("a topic name", &c.topic)?;
            last.insert((c.topic.as_str(), c.queue_id), c.offset);
        }
        if last.is_empty() {
            return Ok(());
        }
        let r = upsert_offsets(&self.inner.pool, group, &last).await;
        self.inner.ok("committing offsets", r)
    }

    async fn load_offsets(&self, group: &str) -> Result<Vec<CommittedOffset>> {
        if has_nul(group) {
            return Ok(Vec::new());
        }
        let r = sqlx::query(
            "SELECT topic, queue_id, next_offset FROM wharf_offset WHERE grp = $1 \
             ORDER BY topic, queue_id",
        )
        .bind(group)
        .fetch_all(&self.inner.pool)
        .await;
        let rows = self.inner.ok("loading offsets", r)?;
        Ok(rows
            .into_iter()
            .map(|row| CommittedOffset {
                topic: row.try_get(0).unwrap_or_default(),
                queue_id: row.try_get::<i32, _>(1).unwrap_or(0) as u32,
                offset: unbig(row.try_get(2).unwrap_or(0)),
            })
            .collect())
    }

    async fn delete_offsets(&self, group: &str) -> Result<()> {
        if has_nul(group) {
            return Ok(());
        }
        let r = sqlx::query("DELETE FROM wharf_offset WHERE grp = $1")
            .bind(group)
            .execute(&self.inner.pool)
            .await;
        self.inner.ok("deleting offsets", r).map(|_| ())
    }

    async fn commit_offsets_fenced(
        &self,
        group: &str,
        offsets: &[(CommittedOffset, u64)],
    ) -> Result<Vec<bool>> {
        if offsets.is_empty() || has_nul(group) {
            return Ok(vec![false; offsets.len()]);
        }
        let what = "committing fenced offsets";
        let topics: Vec<&str> = offsets.iter().map(|(c, _)| c.topic.as_str()).collect();
        let queues: Vec<i32> = offsets.iter().map(|(c, _)| c.queue_id as i32).collect();
        if topics.iter().any(|t| has_nul(t)) {
            return Err(WharfError::bad_request(
                "a topic name contains a NUL character, which the PostgreSQL backend cannot store",
            ));
        }
        let mut tx = self.inner.ok(what, self.inner.pool.begin().await)?;
        // FOR SHARE holds the lease rows until commit: a takeover cannot slip between the
        // epoch check and the write.
        let r = sqlx::query(
            "SELECT l.topic, l.queue_id, l.epoch FROM wharf_lease l \
             JOIN (SELECT DISTINCT t COLLATE \"C\" AS t, q FROM unnest($2::text[], $3::int4[]) AS u(t, q)) u \
               ON l.topic = u.t AND l.queue_id = u.q \
             WHERE l.grp = $1 ORDER BY l.topic, l.queue_id FOR SHARE OF l",
        )
        .bind(group)
        .bind(&topics)
        .bind(&queues)
        .fetch_all(&mut *tx)
        .await;
        let rows = self.inner.ok(what, r)?;
        let mut current: HashMap<(String, u32), u64> = HashMap::new();
        for row in rows {
            let t: String = row.try_get(0).unwrap_or_default();
            let q: i32 = row.try_get(1).unwrap_or(0);
            let e: i64 = row.try_get(2).unwrap_or(-1);
            current.insert((t, q as u32), unbig(e));
        }
        let ok: Vec<bool> = offsets
            .iter()
            .map(|(c, epoch)| {
                current
                    .get(&(c.topic.clone(), c.queue_id))
                    .is_some_and(|e| e == epoch)
            })
            .collect();
        let mut last: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for ((c, _), _) in offsets.iter().zip(&ok).filter(|(_, k)| **k) {
            last.insert((c.topic.as_str(), c.queue_id), c.offset);
        }
        if !last.is_empty() {
            let r = upsert_offsets(&mut *tx, group, &last).await;
            self.inner.ok(what, r)?;
        }
        self.inner.ok(what, tx.commit().await)?;
        Ok(ok)
    }

    async fn member_heartbeat(
        &self,
        group: &str,
        member_id: &str,
        kind: MemberKind,
        data: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<bool> {
        no_nul("a group name", group)?;
        no_nul("a member id", member_id)?;
        let now = self.now();
        // The CTEs share one snapshot: `old` sees the row as it was before the upsert.
        let r = sqlx::query(
            "WITH old AS (SELECT expires_at_ms FROM wharf_member WHERE grp = $1 AND member_id = $2), \
             up AS (INSERT INTO wharf_member (grp, member_id, kind, data, expires_at_ms) \
                    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (grp, member_id) DO UPDATE SET \
                    kind = EXCLUDED.kind, data = EXCLUDED.data, expires_at_ms = EXCLUDED.expires_at_ms \
                    RETURNING 1) \
             SELECT NOT EXISTS (SELECT 1 FROM old WHERE expires_at_ms > $6), (SELECT count(*) FROM up)",
        )
        .bind(group)
        .bind(member_id)
        .bind(kind_code(kind))
        .bind(data)
        .bind(big(now.saturating_add(ttl_ms)))
        .bind(big(now))
        .fetch_one(&self.inner.pool)
        .await;
        let row = self.inner.ok("recording a member heartbeat", r)?;
        Ok(row.try_get(0).unwrap_or(true))
    }

    async fn member_list(&self, group: &str) -> Result<Vec<MemberRow>> {
        if has_nul(group) {
            return Ok(Vec::new());
        }
        let r = sqlx::query(
            "SELECT member_id, kind, data, expires_at_ms FROM wharf_member \
             WHERE grp = $1 AND expires_at_ms > $2 ORDER BY member_id",
        )
        .bind(group)
        .bind(big(self.now()))
        .fetch_all(&self.inner.pool)
        .await;
        let rows = self.inner.ok("listing members", r)?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let kind = kind_of(row.try_get(1).unwrap_or(-1))?;
                Some(MemberRow {
                    group: group.to_string(),
                    member_id: row.try_get(0).unwrap_or_default(),
                    kind,
                    data: row.try_get(2).unwrap_or_default(),
                    expires_at_ms: unbig(row.try_get(3).unwrap_or(0)),
                })
            })
            .collect())
    }

    async fn member_remove(&self, group: &str, member_id: &str) -> Result<bool> {
        if has_nul(group) || has_nul(member_id) {
            return Ok(false);
        }
        let r = sqlx::query(
            "DELETE FROM wharf_member WHERE grp = $1 AND member_id = $2 RETURNING expires_at_ms > $3",
        )
        .bind(group)
        .bind(member_id)
        .bind(big(self.now()))
        .fetch_optional(&self.inner.pool)
        .await;
        let row = self.inner.ok("removing a member", r)?;
        Ok(row.is_some_and(|r| r.try_get(0).unwrap_or(false)))
    }

    async fn lease_acquire(
        &self,
        key: &LeaseKey,
        holder: &str,
        ttl_ms: u64,
    ) -> Result<Option<Lease>> {
        no_nul("a group name", &key.group)?;
        no_nul("a topic name", &key.topic)?;
        no_nul("a lease holder", holder)?;
        let now = self.now();
        let r = sqlx::query(
            "INSERT INTO wharf_lease AS l (grp, topic, queue_id, holder, epoch, expires_at_ms) \
             VALUES ($1, $2, $3, $4, 1, $5) ON CONFLICT (grp, topic, queue_id) DO UPDATE SET \
               epoch = CASE WHEN l.holder IS NOT NULL AND l.expires_at_ms > $6 THEN l.epoch \
                            ELSE l.epoch + 1 END, \
               holder = EXCLUDED.holder, expires_at_ms = EXCLUDED.expires_at_ms \
             WHERE l.holder IS NULL OR l.expires_at_ms <= $6 OR l.holder = EXCLUDED.holder \
             RETURNING epoch, expires_at_ms",
        )
        .bind(&key.group)
        .bind(&key.topic)
        .bind(key.queue_id as i32)
        .bind(holder)
        .bind(big(now.saturating_add(ttl_ms)))
        .bind(big(now))
        .fetch_optional(&self.inner.pool)
        .await;
        let row = self.inner.ok("acquiring a lease", r)?;
        Ok(row.map(|row| Lease {
            key: key.clone(),
            holder: holder.to_string(),
            epoch: unbig(row.try_get(0).unwrap_or(0)),
            expires_at_ms: unbig(row.try_get(1).unwrap_or(0)),
        }))
    }

    async fn lease_renew(&self, lease: &Lease, ttl_ms: u64) -> Result<Option<Lease>> {
        let k = &lease.key;
        if has_nul(&k.group) || has_nul(&k.topic) || has_nul(&lease.holder) {
            return Ok(None);
        }
        let r = sqlx::query(
            "UPDATE wharf_lease SET expires_at_ms = $5 WHERE grp = $1 AND topic = $2 \
             AND queue_id = $3 AND holder = $4 AND epoch = $6 RETURNING expires_at_ms",
        )
        .bind(&k.group)
        .bind(&k.topic)
        .bind(k.queue_id as i32)
        .bind(&lease.holder)
        .bind(big(self.now().saturating_add(ttl_ms)))
        .bind(big(lease.epoch))
        .fetch_optional(&self.inner.pool)
        .await;
        let row = self.inner.ok("renewing a lease", r)?;
        Ok(row.map(|row| Lease {
            expires_at_ms: unbig(row.try_get(0).unwrap_or(0)),
            ..lease.clone()
        }))
    }

    async fn lease_release(&self, lease: &Lease) -> Result<()> {
        let k = &lease.key;
        if has_nul(&k.group) || has_nul(&k.topic) || has_nul(&lease.holder) {
            return Ok(());
        }
        let r = sqlx::query(
            "UPDATE wharf_lease SET holder = NULL WHERE grp = $1 AND topic = $2 \
             AND queue_id = $3 AND holder = $4 AND epoch = $5",
        )
        .bind(&k.group)
        .bind(&k.topic)
        .bind(k.queue_id as i32)
        .bind(&lease.holder)
        .bind(big(lease.epoch))
        .execute(&self.inner.pool)
        .await;
        self.inner.ok("releasing a lease", r).map(|_| ())
    }

    async fn lease_list(&self, group: &str) -> Result<Vec<Lease>> {
        if has_nul(group) {
            return Ok(Vec::new());
        }
        let r = sqlx::query(
            "SELECT topic, queue_id, holder, epoch, expires_at_ms FROM wharf_lease \
             WHERE grp = $1 AND holder IS NOT NULL AND expires_at_ms > $2 ORDER BY topic, queue_id",
        )
        .bind(group)
        .bind(big(self.now()))
        .fetch_all(&self.inner.pool)
        .await;
        let rows = self.inner.ok("listing leases", r)?;
        Ok(rows
            .into_iter()
            .map(|row| Lease {
                key: LeaseKey {
                    group: group.to_string(),
                    topic: row.try_get(0).unwrap_or_default(),
                    queue_id: row.try_get::<i32, _>(1).unwrap_or(0) as u32,
                },
                holder: row.try_get(2).unwrap_or_default(),
                epoch: unbig(row.try_get(3).unwrap_or(0)),
                expires_at_ms: unbig(row.try_get(4).unwrap_or(0)),
            })
            .collect())
    }

    async fn enforce_retention(&self, now_ms: u64) -> Result<RetentionReport> {
        writer::retention(&self.inner, now_ms).await
    }

    fn watch_queue(&self, topic: &str, queue_id: u32) -> watch::Receiver<u64> {
        self.inner.watches.subscribe(topic, queue_id)
    }

    fn stats(&self) -> StoreStats {
        let s = &self.inner.stats;
        StoreStats {
            appended_messages: s.appended_messages.load(Ordering::Relaxed),
            appended_bytes: s.appended_bytes.load(Ordering::Relaxed),
            segments: s.partitions.load(Ordering::Relaxed),
            disk_bytes: s.disk_bytes.load(Ordering::Relaxed),
            pending_timers: self.inner.timers.lock().pending,
            moved_timers: s.moved_timers.load(Ordering::Relaxed),
            append_latency_us: s.append_latency.snapshot(),
            fsync_latency_us: s.commit_latency.snapshot(),
        }
    }

    fn writable(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire) && !self.inner.closed.load(Ordering::Acquire)
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Writers finish what is queued before they stop; then the pool closes.
        self.stop.cancel();
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        self.inner.pool.close().await;
        Ok(())
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // An owner that forgot close(): stop the background tasks with the handle.
        self.inner.closed.store(true, Ordering::Release);
        self.stop.cancel();
    }
}

/// Upserts the last offset per queue of `group`.
async fn upsert_offsets<'e, E>(
    exec: E,
    group: &str,
    last: &BTreeMap<(&str, u32), u64>,
) -> std::result::Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let topics: Vec<&str> = last.keys().map(|k| k.0).collect();
    let queues: Vec<i32> = last.keys().map(|k| k.1 as i32).collect();
    let offs: Vec<i64> = last.values().map(|o| big(*o)).collect();
    sqlx::query(
        "INSERT INTO wharf_offset (grp, topic, queue_id, next_offset) \
         SELECT $1, t, q, o FROM unnest($2::text[], $3::int4[], $4::int8[]) AS u(t, q, o) \
         ON CONFLICT (grp, topic, queue_id) DO UPDATE SET next_offset = EXCLUDED.next_offset",
    )
    .bind(group)
    .bind(&topics)
    .bind(&queues)
    .bind(&offs)
    .execute(exec)
    .await
    .map(|_| ())
}

/// A tag's hash as PostgreSQL's int4 holds it (the same 32 bits).
pub(crate) fn tag_hash_i32(tag: Option<&str>) -> i32 {
    tag_hash(tag) as i32
}
