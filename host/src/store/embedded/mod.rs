//! The embedded store: segmented append-only log with checksums, consume queues, indexes.
//!
//! Layout of `data_dir`:
//! - `log/{position:020}.log` — message log segments (the source of truth);
//! - `cq/{topic}/{queue}/{offset:020}.cq` — consume queues (32-byte entries);
//! - `cq/{topic}/held/{offset:020}.cq` — every timer message of the topic, by store time;
//! - `keys/{position:020}.idx` — key index (hash slots + chained entries; a moved timer message is
//!   also filed under its origin position with the reserved topic `%MOVED%`, so its original id
//!   still finds it once the segment it was first stored in is gone);
//! - `timers/{bucket}.tmr|.done` — pending timers by deliver-time bucket;
//! - `checkpoint` — log position every index covers (replayed from on open), index format;
//! - `meta/{namespace-hex}.meta` (values with versions) and `.journal` (the changes since the
//!   `.meta` file was written whole), `offsets`, `node_id`, `boot`, `LOCK`.
//!
//! Format versions: every record carries its format (see `record`), every segment starts
//! with a header record naming the segment format (segments without one are format 1), and the
//! checkpoint names the index format. Data written by earlier versions is read unchanged;
//! indexes of another format are rebuilt from the log on open. A segment of a newer format than
//! this build knows makes open fail rather than misread it.
//!
//! One writer owns appends (group commit), reveals, checkpoints and retention; reads go straight
//! to the files with positional reads from the calling task. The writer's state sits behind a
//! lock: its thread runs every round but one kind, an async append under light load, which
//! the sender writes itself when the writer is free (see `Arrivals`).
//!
//! Durability: in `flush = "sync"` mode a round of requests is written with one write call per
//! segment and made durable with one fdatasync before any of them is answered. Derived indexes
//! are written to the page cache in the same round and fsynced only at the checkpoint (≤ 1 s);
//! after a crash they are trimmed to the checkpoint and rebuilt from the log. Segments are
//! zero-filled ahead of use by a background thread (`WHARF_STORE_PREALLOCATE=0` turns this
//! off), so the per-round fdatasync writes data only, not file-size metadata; until the first
//! spare is ready a fresh store's segment grows in zero-filled 1 MiB steps for the same reason.
//!
//! `offset_for_time` orders a queue's entries by the time they became visible (store time; for
//! a timer message, the time it was revealed). `by_time` lists messages by store time: plain
//! messages from the consume queues, timer messages (pending or revealed) from the topic's held
//! queue, so every message stored in the range is listed exactly once.
//!
//! Members and leases live in memory (`coord`); see there for why lease epochs still never go
//! backwards across restarts.

mod coord;
mod cq;
mod files;
mod flusher;
mod keyindex;
mod log;
mod record;
mod timers;
mod writer;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use self::coord::Coord;
use self::cq::Queues;
use self::files::{Checkpoint, INDEX_FORMAT, Namespace, Offsets};
use self::keyindex::KeyIndex;
use self::log::Log;
use self::record::EncodedBatch;
use self::timers::TimerIndex;
use self::writer::{Request, Writer};
use super::{
    CommittedOffset, Lease, LeaseKey, MemberKind, MemberRow, MetaEntry, PutCondition, PutOutcome,
    QueueBounds, QueueRead, RetentionReport, Store, StoreConfig, StoreStats, TimePage,
};
use crate::clock::SharedClock;
use crate::error::{Result, WharfError};
use crate::metrics::Histogram;
use crate::model::{Appended, MessageId, NewMessage, StoredMessage};
use crate::store::QueueBudget;

/// Internal sizes of the embedded store; the defaults suit production, tests shrink them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Entries per consume-queue file.
    pub cq_entries_per_file: u64,
    /// Hash slots per key-index file.
    pub key_slots: u32,
    /// Entries per key-index file.
    pub key_entries_per_file: u32,
    /// Width of a timer bucket file (ms).
    pub timer_bucket_ms: u64,
    /// Timer buckets starting within this window of now are kept in memory (ms).
    pub timer_prefetch_ms: u64,
    /// How often the index checkpoint is written (ms).
    pub checkpoint_interval_ms: u64,
    /// How often dirty consumer offsets are saved (ms; the contract says ≤ 1 s).
    pub offsets_flush_ms: u64,
    /// Zero-fill the next segment in the background so appends overwrite allocated blocks.
    pub preallocate_segments: bool,
    /// Slowest smoothed log fsync (µs) a lone sync sender waits out on its own thread: a
    /// slower disk would hold a runtime thread too long, so its rounds go to the writer thread.
    pub inline_fsync_max_us: u64,
    /// Test only: the Nth fsync of the message log (counted from open, 1-based) fails with EIO,
    /// as a failing disk's would; 0 = never. Set by `WHARF_TEST_FAIL_FSYNC_AT` for e2e tests.
    pub fail_fsync_at: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cq_entries_per_file: 300_000,
            key_slots: 1 << 19,
            key_entries_per_file: 2 << 20,
            timer_bucket_ms: 60_000,
            timer_prefetch_ms: 120_000,
            checkpoint_interval_ms: 1_000,
            offsets_flush_ms: 500,
            // Operators can turn zero-filling off (e.g. on copy-on-write file systems where it
            // buys nothing) with WHARF_STORE_PREALLOCATE=0.
            preallocate_segments: std::env::var("WHARF_STORE_PREALLOCATE")
                .map_or(true, |v| v != "0"),
            inline_fsync_max_us: 1_000,
            // Test-only fault injection (documented as such in the README); never set in
            // production, where it would only ever make the store refuse writes.
            fail_fsync_at: std::env::var("WHARF_TEST_FAIL_FSYNC_AT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }
}

impl Tuning {
    fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.checkpoint_interval_ms)
    }

    fn offsets_flush(&self) -> Duration {
        Duration::from_millis(self.offsets_flush_ms)
    }
}

#[derive(Debug, Default)]
struct Counters {
    appended_messages: AtomicU64,
    appended_bytes: AtomicU64,
    /// Timer messages copied forward (by retention, or when revealed from an older segment).
    moved_timers: AtomicU64,
    append_latency: Histogram,
    fsync_latency: Histogram,
}

/// State shared by the store handle and its writer thread.
pub(crate) struct Shared {
    dir: PathBuf,
    config: StoreConfig,
    tuning: Tuning,
    clock: SharedClock,
    node: u16,
    log: Log,
    queues: Queues,
    keys: KeyIndex,
    inbox: Mutex<Vec<Request>>,
    inbox_cv: Condvar,
    /// How busy appending is, which decides who writes a round (see [`Arrivals`]).
    arrivals: Arrivals,
    /// Rounds senders wrote themselves (tests check both ways are taken).
    inline_rounds: AtomicU64,
    /// Smoothed fsync time of the message log, in ns (written by whoever holds the writer).
    fsync_ema_ns: AtomicU64,
    /// Bounds what `inbox` (and the round being written) may hold.
    budget: Arc<QueueBudget>,
    next_timer: AtomicU64,
    pending_timers: AtomicU64,
    loaded_timers: AtomicU64,
    offsets: Mutex<(Offsets, bool)>,
    meta: Mutex<HashMap<String, MetaNs>>,
    /// Member and lease rows (memory only: see `coord`).
    coord: Mutex<Coord>,
    stats: Counters,
    writable: AtomicBool,
    /// Why the store stopped taking writes for good (a failed fsync), if it did.
    failed: Mutex<Option<String>>,
    /// fsyncs of the message log so far (for `Tuning::fail_fsync_at`).
    log_fsyncs: AtomicU64,
    closed: AtomicBool,
    lock: Mutex<Option<File>>,
    /// The segment being appended to (for the flusher's periodic async fsync).
    active: Mutex<Option<Arc<log::Segment>>>,
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicU32,
    /// Test hook: a write round waits while a test holds this.
    #[cfg(test)]
    stall: Mutex<()>,
}

impl Shared {
    /// Marks the store (un)writable after a round; a failed store stays unwritable.
    fn set_writable(&self, w: bool) {
        self.writable
            .store(w && self.failed.lock().is_none(), Ordering::Release);
    }

    /// Why the store refuses every write until restart, if it does.
    fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    /// The error every write gets once the store has failed.
    fn failed_error(&self) -> Option<WharfError> {
        self.failure().map(|why| {
            WharfError::unavailable(format!(
                "the store stopped taking writes: {why}; restart the host once the disk is \
                 checked — it recovers from the log, and nothing acknowledged is lost"
            ))
        })
    }

    /// fsyncs a log segment (`all`: metadata too). A failed fsync may have dropped dirty
    /// pages the kernel will never write again, so retrying it would report data as safe
    /// that is not: the store stops taking writes until a restart recovers from the log.
    fn sync_log(&self, file: &File, all: bool) -> io::Result<()> {
        let n = self.log_fsyncs.fetch_add(1, Ordering::AcqRel) + 1;
        let r = if self.tuning.fail_fsync_at != 0 && n == self.tuning.fail_fsync_at {
            Err(io::Error::other(
                "injected fsync failure (WHARF_TEST_FAIL_FSYNC_AT)",
            ))
        } else if all {
            file.sync_all()
        } else {
            file.sync_data()
        };
        if let Err(e) = &r {
            self.fail(format!(
                "fsync of the message log in {} failed: {e}",
                self.dir.display()
            ));
        }
        r
    }

    /// Stops taking writes until restart, for `why` (the first reason is kept).
    fn fail(&self, why: String) {
        tracing::error!(reason = %why, "the store stops taking writes until restart");
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(why);
        }
        drop(f);
        self.writable.store(false, Ordering::Release);
    }

    fn release_lock(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock.lock().take();
    }

    /// Test hook: fail the next N log writes as a full disk would.
    fn fault_check(&self) -> io::Result<()> {
        #[cfg(test)]
        {
            let n = self.fail_writes.load(Ordering::Acquire);
            if n > 0 {
                self.fail_writes.store(n - 1, Ordering::Release);
                return Err(io::Error::from_raw_os_error(28));
            }
        }
        Ok(())
    }

    /// Where the message first stored at `origin` is now that it was moved forward: the
    /// newest record the key index files under its relocation hash whose move block names
    /// `origin` (hash collisions and stale entries are skipped). Returns (position, record).
    fn relocated(&self, origin: u64) -> io::Result<Option<(u64, bytes::Bytes)>> {
        let mut found = None;
        self.keys
            .lookup(record::moved_hash(origin), MAX_KEY_STEPS, |pos| {
                if let Some(rec) = self.log.read_record(pos, None)
                    && record::moved_of(&rec).is_some_and(|m| m.origin == origin)
                {
                    found = Some((pos, rec));
                    return false;
                }
                true
            })?;
        Ok(found)
    }

    /// Moves every queue's min past the entries whose message is gone (`kept` says which
    /// positions stay). A held-queue entry stays while its timer's moved copy is kept, so a
    /// time query still lists a moved timer.
    fn advance_mins(&self, kept: impl Fn(u64) -> bool) -> io::Result<()> {
        for q in self.queues.consumable() {
            q.advance_min(&kept)?;
        }
        for q in self.queues.held_all() {
            q.advance_min(|pos| {
                kept(pos)
                    || self
                        .relocated(pos)
                        .ok()
                        .flatten()
                        .is_some_and(|(at, _)| kept(at))
            })?;
        }
        Ok(())
    }

    /// Queues `r` for the writer thread and wakes it.
    fn submit(&self, r: Request) -> Result<()> {
        self.enqueue(r)?;
        self.inbox_cv.notify_one();
        Ok(())
    }

    /// Queues `r` without waking the writer thread (the caller runs it or wakes the thread).
    fn enqueue(&self, r: Request) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(WharfError::unavailable(
                "the store is closed (the host is shutting down); retry against a running host",
            ));
        }
        self.inbox.lock().push(r);
        Ok(())
    }
}

/// The smoothed gap between appends, which decides who writes a round. Under light load a
/// sender writes its own round: the writer thread's wake-up and the reply's wake-up of the
/// sender cost more than the round. Under load the writer thread writes them: while it wakes,
/// more appends queue up and share the round, and it writes while the senders' threads go on
/// decoding and answering.
struct Arrivals {
    epoch: Instant,
    last_ns: AtomicU64,
    gap_ns: AtomicU64,
}

/// Async appends arriving further apart than this on average (under ~30,000 a second) are
/// light load.
const LIGHT_LOAD_GAP_NS: u64 = 33_000;
/// Longest gap one arrival counts as: an idle minute must not outweigh the next burst, yet a
/// lone sync sender's gaps, each longer than the fsync before it, must count in full to be
/// compared with the smoothed fsync (see `light`).
const MAX_GAP_NS: u64 = 100_000_000;

impl Default for Arrivals {
    fn default() -> Self {
        Arrivals {
            epoch: Instant::now(),
            last_ns: AtomicU64::new(0),
            gap_ns: AtomicU64::new(MAX_GAP_NS),
        }
    }
}

impl Arrivals {
    /// Notes one append arriving now; returns the smoothed gap between appends.
    fn note(&self) -> u64 {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let gap = now
            .saturating_sub(self.last_ns.swap(now, Ordering::Relaxed))
            .min(MAX_GAP_NS);
        // Racing updates may lose a sample; this only steers who writes, never what. Every
        // stored value is an average of gaps of at most MAX_GAP_NS, so the sum cannot overflow.
        let ewma = (self.gap_ns.load(Ordering::Relaxed) * 7 + gap) / 8;
        self.gap_ns.store(ewma, Ordering::Relaxed);
        ewma
    }

    /// Notes one append arriving now; true when its sender should write the round itself.
    /// An async round is a copy into the page cache. A sync round also waits for an fsync,
    /// so it is the sender's only when appends arrive further apart than one fsync takes (so
    /// that another append seldom comes while the sender waits, to be left for the next
    /// round instead of sharing this one's fsync) and the disk is fast.
    fn light(&self, flush: crate::store::FlushMode, fsync_ema_ns: u64, fsync_max_ns: u64) -> bool {
        let gap = self.note();
        match flush {
            crate::store::FlushMode::Async => gap >= LIGHT_LOAD_GAP_NS,
            crate::store::FlushMode::Sync => {
                fsync_ema_ns <= fsync_max_ns && gap >= fsync_ema_ns.max(LIGHT_LOAD_GAP_NS)
            }
        }
    }
}

fn writer_gone() -> WharfError {
    WharfError::unavailable("the store writer has stopped (the host is shutting down); retry later")
}

fn read_err(what: &str, e: io::Error) -> WharfError {
    WharfError::internal(format!("the store could not read {what}: {e}"))
}

/// The embedded backend. Open with [`EmbeddedStore::open`] (async; recovery runs on a blocking
/// thread) and shut down with [`Store::close`].
pub struct EmbeddedStore {
    sh: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The writer's state, shared by its thread and senders running small rounds themselves.
    core: Arc<Mutex<Option<Writer>>>,
    /// One host owns the data dir, so its own writes are the only metadata changes.
    meta_watches: super::MetaWatches,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.sh.dir)
            .finish()
    }
}

fn unwritable(dir: &Path, e: &io::Error) -> WharfError {
    WharfError::unavailable(format!(
        "data directory {} is not usable: {e}; create it or fix its permissions, or point \
         [store] data_dir elsewhere",
        dir.display()
    ))
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `config.data_dir`, recovering from any crash:
    /// truncates a torn log tail and replays the log into indexes that lag it.
    pub async fn open(config: &StoreConfig, clock: SharedClock) -> Result<Arc<EmbeddedStore>> {
        Self::open_with(config, clock, Tuning::default()).await
    }

    /// [`EmbeddedStore::open`] with explicit internal sizes.
    pub async fn open_with(
        config: &StoreConfig,
        clock: SharedClock,
        tuning: Tuning,
    ) -> Result<Arc<EmbeddedStore>> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(&config, clock, tuning))
            .await
            .map_err(|e| WharfError::internal(format!("store open task failed: {e}")))?
    }

    /// Synchronous open, for callers outside a runtime (tools, benches).
    pub fn open_blocking(
        config: &StoreConfig,
        clock: SharedClock,
        tuning: Tuning,
    ) -> Result<Arc<EmbeddedStore>> {
        let dir = config.data_dir.clone();
        if config.segment_bytes < 4096 {
            return Err(WharfError::bad_request(format!(
                "[store] segment_bytes = {} is too small; use at least 4096",
                config.segment_bytes
            )));
        }
        fs::create_dir_all(&dir).map_err(|e| unwritable(&dir, &e))?;
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))
            .map_err(|e| unwritable(&dir, &e))?;
        if lock.try_lock().is_err() {
            return Err(WharfError::unavailable(format!(
                "data directory {} is in use by another wharf process (it holds {}/LOCK); stop \
                 it or choose another [store] data_dir",
                dir.display(),
                dir.display()
            )));
        }
        let fail = |what: &str, e: io::Error| {
            WharfError::unavailable(format!(
                "opening the store in {} failed while {what}: {e}",
                dir.display()
            ))
        };
        let node = files::node_id(&dir).map_err(|e| unwritable(&dir, &e))?;
        let boot = files::next_boot(&dir).map_err(|e| unwritable(&dir, &e))?;
        let offsets = match files::read_atomic(&dir.join("offsets")) {
            Ok(Some(b)) => files::decode_offsets(&b).unwrap_or_else(|| {
                warn!("consumer offsets file is unreadable; starting with none");
                Offsets::new()
            }),
            Ok(None) => Offsets::new(),
            Err(e) => {
                warn!(error = %e, "consumer offsets file is damaged; starting with none");
                Offsets::new()
            }
        };
        let log = Log::open(&dir.join("log")).map_err(|e| fail("opening the log", e))?;
        check_segment_formats(&log)?;
        let ck = Checkpoint::load(&dir.join("checkpoint"));
        // Indexes of another layout are rebuilt from the log (the checkpoint still tells
        // where the log goes on if every segment is gone).
        let index_ck = ck.as_ref().filter(|c| c.format == INDEX_FORMAT);
        let (from, full) = recover_log(&log, index_ck).map_err(|e| fail("checking the log", e))?;
        let mut seg_info = BTreeMap::new();
        if full {
            for sub in ["cq", "keys", "timers"] {
                match fs::remove_dir_all(dir.join(sub)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(fail("clearing indexes", e));
                    }
                    _ => {}
                }
            }
            if index_ck.is_some() {
                warn!(dir = %dir.display(), "log is behind the index checkpoint; rebuilding every index");
            } else if ck.is_some() {
                info!(dir = %dir.display(), "indexes are of an earlier format; rebuilding them from the log");
            }
        } else if let Some(ck) = index_ck {
            seg_info = ck.segments.clone();
        }
        let queues = Queues::open(&dir.join("cq"), tuning.cq_entries_per_file, from)
            .map_err(|e| fail("opening consume queues", e))?;
        let keys = KeyIndex::open(
            &dir.join("keys"),
            tuning.key_slots,
            tuning.key_entries_per_file,
            from,
        )
        .map_err(|e| fail("opening the key index", e))?;
        let timers = TimerIndex::open(
            &dir.join("timers"),
            tuning.timer_bucket_ms,
            tuning.timer_prefetch_ms,
            from,
        )
        .map_err(|e| fail("opening the timer index", e))?;
        let active = match log.last() {
            Some(s) => s,
            None => {
                let base = ck.as_ref().map_or(0, |c| c.log_pos);
                log.create(base).map_err(|e| unwritable(&dir, &e))?
            }
        };
        let sh = Arc::new(Shared {
            dir: dir.clone(),
            config: config.clone(),
            tuning,
            clock,
            node,
            log,
            queues,
            keys,
            inbox: Mutex::new(Vec::new()),
            inbox_cv: Condvar::new(),
            arrivals: Arrivals::default(),
            inline_rounds: AtomicU64::new(0),
            fsync_ema_ns: AtomicU64::new(0),
            budget: QueueBudget::new(config),
            next_timer: AtomicU64::new(u64::MAX),
            pending_timers: AtomicU64::new(0),
            loaded_timers: AtomicU64::new(0),
            offsets: Mutex::new((offsets, false)),
            meta: Mutex::new(HashMap::new()),
            coord: Mutex::new(Coord::new(boot)),
            stats: Counters::default(),
            writable: AtomicBool::new(true),
            failed: Mutex::new(None),
            log_fsyncs: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            lock: Mutex::new(Some(lock)),
            active: Mutex::new(None),
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            stall: Mutex::new(()),
        });
        let mut w = Writer::new(sh.clone(), active, timers, seg_info, from);
        w.replay(from, !full)
            .map_err(|e| fail("rebuilding indexes", e))?;
        sh.advance_mins(|pos| sh.log.segment_of(pos).is_some())
            .map_err(|e| fail("reading consume queues", e))?;
        w.checkpoint()
            .map_err(|e| fail("writing the index checkpoint", e))?;
        let core = Arc::new(Mutex::new(Some(w)));
        let thread_core = core.clone();
        let handle = std::thread::Builder::new()
            .name("wharf-store-writer".into())
            .spawn(move || Writer::run(thread_core))
            .map_err(|e| WharfError::internal(format!("starting the store writer: {e}")))?;
        info!(dir = %dir.display(), node, boot, "embedded store open");
        Ok(Arc::new(EmbeddedStore {
            sh,
            writer: Mutex::new(Some(handle)),
            core,
            meta_watches: super::MetaWatches::default(),
        }))
    }

    /// Pending timers currently held in memory (the near-term window; the rest wait on disk).
    pub fn timers_in_memory(&self) -> u64 {
        self.sh.loaded_timers.load(Ordering::Acquire)
    }

    /// The node id of this data dir (part of every message id).
    pub fn node(&self) -> u16 {
        self.sh.node
    }

    /// Stops the writer at once without flushing anything, as a crash would (tests).
    #[cfg(test)]
    pub(crate) async fn halt(&self) {
        let (tx, rx) = oneshot::channel();
        if self.sh.submit(Request::Halt { reply: tx }).is_ok() {
            let _ = rx.await;
        }
        self.join_writer().await;
    }

    async fn join_writer(&self) {
        let h = self.writer.lock().take();
        if let Some(h) = h {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// Queue offset a timer message got when it was revealed, if it has been. Reveals happen at
    /// or after the deliver time and consume queues are in visibility order, so the entry lies
    /// at or shortly after the first one visible at `deliver_at_ms`; the scan is bounded so a
    /// huge backlog of reveals costs a `None`, never a long stall.
    fn revealed_offset(
        &self,
        topic: &str,
        queue_id: u32,
        deliver_at_ms: u64,
        pos: u64,
    ) -> io::Result<Option<u64>> {
        const CHUNK: usize = 512;
        const MAX_SCAN: u64 = 16 * CHUNK as u64;
        let Some(q) = self.sh.queues.get(topic, queue_id) else {
            return Ok(None);
        };
        let start = q.search_time(deliver_at_ms)?;
        let mut off = start;
        while off < start + MAX_SCAN {
            let entries = q.read(off, CHUNK)?;
            if entries.is_empty() {
                break;
            }
            if let Some(i) = entries.iter().position(|e| e.is_set() && e.pos == pos) {
                return Ok(Some(off + i as u64));
            }
            off += entries.len() as u64;
        }
        Ok(None)
    }

    fn read_message(&self, pos: u64, size: Option<u32>) -> Option<StoredMessage> {
        let rec = self.sh.log.read_record(pos, size)?;
        record::decode_message(rec, self.sh.node)
    }

    /// The message first stored at `pos`, read there or, once retention moved it forward, at
    /// its moved copy; with the position its record is read from.
    fn locate(&self, pos: u64) -> Result<Option<(u64, StoredMessage)>> {
        if let Some(m) = self.read_message(pos, None) {
            return Ok(Some((pos, m)));
        }
        let moved = self
            .sh
            .relocated(pos)
            .map_err(|e| read_err("the key index", e))?;
        Ok(moved.and_then(|(at, rec)| record::decode_message(rec, self.sh.node).map(|m| (at, m))))
    }

    /// Fills in the queue offset of a message stored as a timer (its record at `at`), once it
    /// has been revealed.
    fn with_revealed_offset(&self, mut m: StoredMessage, at: u64) -> Result<StoredMessage> {
        if m.queue_offset.is_none()
            && let Some(deliver) = m.deliver_at_ms
        {
            m.queue_offset = self
                .revealed_offset(&m.topic, m.queue_id, deliver, at)
                .map_err(|e| read_err("a consume queue", e))?;
        }
        Ok(m)
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Best effort when the owner forgot `close()`: flush and stop the writer thread.
        if !self.sh.closed.load(Ordering::Acquire) {
            let (tx, _rx) = oneshot::channel();
            let _ = self.sh.submit(Request::Close { reply: tx });
        }
    }
}

/// Refuses a log with a segment written in a newer format than this build reads; anything else
/// (format 1 segments without a header record, format 2 with one) is readable.
fn check_segment_formats(log: &Log) -> Result<()> {
    for seg in log.segments() {
        let Some(rec) = log.read_record(seg.base, None) else {
            continue;
        };
        let h = record::Header::parse(&rec);
        let newer_segment = h.kind == record::KIND_SEGMENT && h.flags > record::SEGMENT_FORMAT;
        if newer_segment || h.format > record::RECORD_FORMAT {
            return Err(WharfError::unavailable(format!(
                "log segment {} was written by a newer wharf (segment format {}, record format {}; this build reads up to {} and {}); run that version or newer on this data dir",
                seg.path.display(),
                if h.kind == record::KIND_SEGMENT {
                    h.flags
                } else {
                    1
                },
                h.format,
                record::SEGMENT_FORMAT,
                record::RECORD_FORMAT
            )));
        }
    }
    Ok(())
}

/// Validates the log from the checkpoint on, truncating a torn or corrupt tail. Returns the
/// position indexes must be replayed from, and whether every index must be rebuilt.
fn recover_log(log: &Log, ck: Option<&Checkpoint>) -> io::Result<(u64, bool)> {
    let start = log.start();
    let (mut from, mut full) = match ck {
        Some(c) if c.log_pos >= start => (c.log_pos, false),
        _ => (start, true),
    };
    if log.segments().is_empty() {
        return Ok((ck.map_or(0, |c| c.log_pos), full));
    }
    loop {
        let segs = log.segments();
        let last_base = segs.last().map_or(0, |s| s.base);
        for seg in segs {
            let len = seg.len.load(Ordering::Acquire);
            if seg.base + len < from {
                continue;
            }
            let off = from.saturating_sub(seg.base).min(len);
            let end = log::scan(&seg, off, |_, _| {})?;
            if !end.damaged {
                continue;
            }
            if seg.base == last_base {
                // Only the newest segment can have a torn tail from a crash: cut it off. Zeros
                // there are the unused part of a preallocated segment, not damage.
                let mut next = [0u8; 4];
                let zeros =
                    seg.file.read_exact_at(&mut next, end.valid_len).is_ok() && next == [0; 4];
                if zeros {
                    info!(segment = %seg.path.display(), offset = end.valid_len, "log ends here");
                } else {
                    warn!(
                        segment = %seg.path.display(),
                        offset = end.valid_len,
                        "torn or corrupt log tail; truncating it"
                    );
                }
                seg.file.set_len(end.valid_len)?;
                seg.file.sync_all()?;
                seg.len.store(end.valid_len, Ordering::Release);
            } else {
                // Older segments were fsynced before the log moved on, so this is media damage:
                // keep everything else; records past the damage are unreadable (reads verify).
                warn!(
                    segment = %seg.path.display(),
                    offset = end.valid_len,
                    "corrupt record in a sealed log segment; records after it in this segment are lost"
                );
            }
        }
        let end = log.end();
        if from > end && !full {
            from = log.start();
            full = true;
            continue;
        }
        return Ok((from, full));
    }
}

/// A page token: the (store time, log position) of the last message listed.
fn time_token(k: (u64, u64)) -> String {
    format!("{}.{}", k.0, k.1)
}

fn parse_time_token(s: &str) -> Result<(u64, u64)> {
    let bad = || {
        WharfError::bad_request(format!(
            "page_token '{s}' is not valid; pass the next_page_token of the previous page"
        ))
    };
    let mut it = s.split('.');
    let a = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let b = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    if it.next().is_some() {
        return Err(bad());
    }
    Ok((a, b))
}

/// Queue entries examined per `read_queue` call at most, so a filter that matches nothing
/// cannot turn one pull into a scan of the whole queue.
const MAX_SCAN: u64 = 16_384;
/// Chain links followed per key lookup at most.
const MAX_KEY_STEPS: usize = 100_000;

#[async_trait]
impl Store for EmbeddedStore {
    async fn meta_get(&self, namespace: &str, key: &str) -> Result<Option<MetaEntry>> {
        let sh = self.sh.clone();
        let (ns, key) = (namespace.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || {
            let mut meta = sh.meta.lock();
            Ok(meta_loaded(&sh, &mut meta, &ns)?.entries.get(&key).cloned())
        })
        .await
        .map_err(|e| WharfError::internal(format!("metadata task failed: {e}")))?
    }

    async fn meta_put_if(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        cond: PutCondition,
    ) -> Result<PutOutcome> {
        let sh = self.sh.clone();
        let (ns, key) = (namespace.to_string(), key.to_string());
        let out =
            tokio::task::spawn_blocking(move || meta_apply(&sh, &ns, &key, Some(value), cond))
                .await
                .map_err(|e| WharfError::internal(format!("metadata task failed: {e}")))??;
        if matches!(out, PutOutcome::Written { .. }) {
            self.meta_watches.bump(namespace);
        }
        Ok(out)
    }

    async fn meta_put(&self, namespace: &str, key: &str, value: Vec<u8>) -> Result<()> {
        self.meta_put_if(namespace, key, value, PutCondition::Any)
            .await
            .map(|_| ())
    }

    async fn meta_delete(&self, namespace: &str, key: &str) -> Result<()> {
        let sh = self.sh.clone();
        let (ns, key) = (namespace.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || meta_apply(&sh, &ns, &key, None, PutCondition::Any))
            .await
            .map_err(|e| WharfError::internal(format!("metadata task failed: {e}")))??;
        self.meta_watches.bump(namespace);
        Ok(())
    }

    fn watch_meta(&self, namespace: &str) -> watch::Receiver<u64> {
        self.meta_watches.subscribe(namespace)
    }

    async fn meta_entries(&self, namespace: &str) -> Result<Vec<(String, MetaEntry)>> {
        let sh = self.sh.clone();
        let ns = namespace.to_string();
        tokio::task::spawn_blocking(move || {
            let mut meta = sh.meta.lock();
            let m = meta_loaded(&sh, &mut meta, &ns)?;
            Ok(m.entries
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect())
        })
        .await
        .map_err(|e| WharfError::internal(format!("metadata task failed: {e}")))?
    }

    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        if let Some(e) = self.sh.failed_error() {
            return Err(e);
        }
        let encoded = EncodedBatch::encode(&batch)?;
        // Refused before queueing: a full queue costs the caller nothing but this error.
        let permit = self.sh.budget.try_acquire(encoded.buf.len() as u64)?;
        let (tx, rx) = oneshot::channel();
        let request = Request::Append {
            batch: encoded,
            started,
            reply: tx,
            permit,
        };
        let fsync_ema_ns = self.sh.fsync_ema_ns.load(Ordering::Relaxed);
        let fsync_max_ns = self.sh.tuning.inline_fsync_max_us.saturating_mul(1_000);
        if self
            .sh
            .arrivals
            .light(self.sh.config.flush, fsync_ema_ns, fsync_max_ns)
        {
            // Written at once, with no turn back to the caller's executor first: at this load
            // a second append seldom joins, and a task that wakes itself has the runtime wake
            // an idle worker thread to share work that is not there.
            self.sh.enqueue(request)?;
            writer::run_inline(&self.sh, &self.core);
        } else {
            self.sh.submit(request)?;
        }
        rx.await.map_err(|_| writer_gone())?
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        if id.node() != self.sh.node {
            return Ok(None);
        }
        match self.locate(id.position())? {
            Some((at, m)) if m.id == id => self.with_revealed_offset(m, at).map(Some),
            _ => Ok(None),
        }
    }

    async fn get_by_position(&self, position: u64) -> Result<Option<StoredMessage>> {
        match self.locate(position)? {
            Some((at, m)) => self.with_revealed_offset(m, at).map(Some),
            None => Ok(None),
        }
    }

    async fn by_key(&self, topic: &str, key: &str, limit: usize) -> Result<Vec<StoredMessage>> {
        let mut out: Vec<StoredMessage> = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // By id: a moved timer and the record it was copied from can both be in the log for a
        // moment (a retention pass deletes the old one right after).
        let mut seen = HashSet::new();
        let hash = record::key_hash(topic, key);
        self.sh
            .keys
            .lookup(hash, MAX_KEY_STEPS, |pos| {
                if let Some(m) = self.read_message(pos, None)
                    && m.topic == topic
                    && m.keys.iter().any(|k| k == key)
                    && seen.insert(m.id)
                {
                    out.push(m);
                }
                out.len() < limit
            })
            .map_err(|e| read_err("the key index", e))?;
        Ok(out)
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
        let limit = limit.max(1);
        let from_ms = after.map_or(begin_ms, |a| a.0.max(begin_ms));
        // Plain messages come from the consume queues (visible time = store time); timer
        // messages from the held queue, at their store time, revealed or not.
        let mut sources: Vec<(Option<u32>, Arc<cq::ConsumeQueue>)> = self
            .sh
            .queues
            .of_topic(topic)
            .into_iter()
            .map(|(qid, q)| (Some(qid), q))
            .collect();
        sources.extend(self.sh.queues.held(topic).map(|q| (None, q)));
        // (store time, position), record size, (queue id, offset) when read from a queue.
        let mut cands: Vec<((u64, u64), u32, Option<(u32, u64)>)> = Vec::new();
        let mut truncated = false;
        for (qid, q) in sources {
            let mut off = q
                .search_time(from_ms)
                .map_err(|e| read_err("a consume queue", e))?;
            let mut taken = 0;
            'queue: loop {
                let entries = q
                    .read(off, 256)
                    .map_err(|e| read_err("a consume queue", e))?;
                if entries.is_empty() {
                    break;
                }
                for e in entries {
                    let this = off;
                    off += 1;
                    // A revealed timer's queue entry: listed from the held queue instead.
                    if !e.is_set() || (qid.is_some() && e.src_pos != e.pos) {
                        continue;
                    }
                    if e.visible_ms > end_ms {
                        break 'queue;
                    }
                    let k = (e.visible_ms, e.pos);
                    if after.is_some_and(|a| k <= a) || e.visible_ms < begin_ms {
                        continue;
                    }
                    if taken == limit {
                        truncated = true;
                        break 'queue;
                    }
                    cands.push((k, e.size, qid.map(|id| (id, this))));
                    taken += 1;
                }
            }
        }
        cands.sort_by_key(|c| c.0);
        let mut messages = Vec::new();
        let mut last = None;
        let mut consumed = 0;
        for (k, size, at) in &cands {
            if messages.len() == limit {
                break;
            }
            consumed += 1;
            last = Some(*k);
            let found = match self.read_message(k.1, Some(*size)) {
                Some(m) => Some((k.1, m)),
                // A held entry of a timer that retention moved forward: read the copy.
                None if at.is_none() => self.locate(k.1)?,
                None => None,
            };
            let Some((rec_at, mut m)) = found else {
                continue;
            };
            if !(begin_ms..=end_ms).contains(&m.stored_ms) || m.topic != topic {
                continue;
            }
            match at {
                // A timer copied forward as it was revealed is listed from the held queue.
                Some(_) if m.id.position() != rec_at => continue,
                Some((qid, off)) if m.queue_id == *qid => m.queue_offset = Some(*off),
                Some(_) => continue,
                None => m = self.with_revealed_offset(m, rec_at)?,
            }
            messages.push(m);
        }
        let more = truncated || consumed < cands.len();
        Ok(TimePage {
            messages,
            next_page_token: if more { last.map(time_token) } else { None },
        })
    }

    async fn queue_bounds(&self, topic: &str, queue_id: u32) -> Result<QueueBounds> {
        Ok(match self.sh.queues.get(topic, queue_id) {
            Some(q) => QueueBounds {
                min: q.min.load(Ordering::Acquire),
                max: q.max.load(Ordering::Acquire),
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
        let Some(q) = self.sh.queues.get(topic, queue_id) else {
            return Ok(QueueRead {
                messages: Vec::new(),
                next_offset: 0,
                bounds: QueueBounds::default(),
            });
        };
        let bounds = QueueBounds {
            min: q.min.load(Ordering::Acquire),
            max: q.max.load(Ordering::Acquire),
        };
        let mut off = from.clamp(bounds.min, bounds.max);
        let stop = bounds.max.min(off.saturating_add(MAX_SCAN));
        let mut messages = Vec::new();
        while off < stop && messages.len() < max {
            let want = ((max - messages.len()).max(32) as u64)
                .min(stop - off)
                .min(1024);
            let entries = q
                .read(off, want as usize)
                .map_err(|e| read_err("a consume queue", e))?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                let this = off;
                off += 1;
                if !e.is_set() || tag_hashes.is_some_and(|t| !t.contains(&e.tag_hash)) {
                    continue;
                }
                // The entry is derived data: accept the record only if it really is this
                // queue's message (a revealed timer carries no offset of its own).
                if let Some(mut m) = self.read_message(e.pos, Some(e.size))
                    && m.queue_id == queue_id
                    && m.topic == topic
                    && m.queue_offset.is_none_or(|o| o == this)
                {
                    m.queue_offset = Some(this);
                    messages.push(m);
                    if messages.len() == max {
                        break;
                    }
                }
            }
        }
        Ok(QueueRead {
            messages,
            next_offset: off,
            bounds,
        })
    }

    async fn offset_for_time(&self, topic: &str, queue_id: u32, timestamp_ms: u64) -> Result<u64> {
        match self.sh.queues.get(topic, queue_id) {
            Some(q) => q
                .search_time(timestamp_ms)
                .map_err(|e| read_err("a consume queue", e)),
            None => Ok(0),
        }
    }

    async fn earliest_stored_ms(&self, topic: &str) -> Result<Option<u64>> {
        let mut best: Option<u64> = None;
        for (_, q) in self.sh.queues.of_topic(topic) {
            let min = q.min.load(Ordering::Acquire);
            let max = q.max.load(Ordering::Acquire);
            let entries = q
                .read(min, (max - min).min(64) as usize)
                .map_err(|e| read_err("a consume queue", e))?;
            if let Some(e) = entries.iter().find(|e| e.is_set()) {
                let t = self
                    .read_message(e.pos, Some(e.size))
                    .map_or(e.visible_ms, |m| m.stored_ms);
                best = Some(best.map_or(t, |b| b.min(t)));
            }
        }
        Ok(best)
    }

    async fn reveal_due(&self, now_ms: u64, max: usize) -> Result<usize> {
        // A failed store reveals nothing (that would be a write), quietly: healthz says why.
        if max == 0
            || self.sh.next_timer.load(Ordering::Acquire) > now_ms
            || self.sh.failure().is_some()
        {
            return Ok(0);
        }
        let (tx, rx) = oneshot::channel();
        self.sh.submit(Request::Reveal {
            now_ms,
            max,
            reply: tx,
        })?;
        rx.await.map_err(|_| writer_gone())?
    }

    fn next_timer_ms(&self) -> Option<u64> {
        let t = self.sh.next_timer.load(Ordering::Acquire);
        (t != u64::MAX).then_some(t)
    }

    async fn commit_offsets(&self, group: &str, offsets: &[CommittedOffset]) -> Result<()> {
        let mut o = self.sh.offsets.lock();
        let g = o.0.entry(group.to_string()).or_default();
        for c in offsets {
            g.insert((c.topic.clone(), c.queue_id), c.offset);
        }
        o.1 = true;
        Ok(())
    }

    async fn load_offsets(&self, group: &str) -> Result<Vec<CommittedOffset>> {
        let o = self.sh.offsets.lock();
        Ok(o.0.get(group).map_or_else(Vec::new, |g| {
            g.iter()
                .map(|((t, q), off)| CommittedOffset {
                    topic: t.clone(),
                    queue_id: *q,
                    offset: *off,
                })
                .collect()
        }))
    }

    async fn delete_offsets(&self, group: &str) -> Result<()> {
        let mut o = self.sh.offsets.lock();
        if o.0.remove(group).is_some() {
            o.1 = true;
        }
        Ok(())
    }

    async fn commit_offsets_fenced(
        &self,
        group: &str,
        offsets: &[(CommittedOffset, u64)],
    ) -> Result<Vec<bool>> {
        // Holding the lease rows while writing keeps a takeover from slipping between the
        // epoch check and the write.
        let coord = self.sh.coord.lock();
        let ok: Vec<bool> = offsets
            .iter()
            .map(|(c, epoch)| coord.is_current(group, &c.topic, c.queue_id, *epoch))
            .collect();
        if ok.iter().any(|k| *k) {
            let mut o = self.sh.offsets.lock();
            let g = o.0.entry(group.to_string()).or_default();
            for ((c, _), _) in offsets.iter().zip(&ok).filter(|(_, k)| **k) {
                g.insert((c.topic.clone(), c.queue_id), c.offset);
            }
            o.1 = true;
        }
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
        let now = self.sh.clock.now_ms();
        Ok(self
            .sh
            .coord
            .lock()
            .heartbeat(now, group, member_id, kind, data, ttl_ms))
    }

    async fn member_list(&self, group: &str) -> Result<Vec<MemberRow>> {
        let now = self.sh.clock.now_ms();
        Ok(self.sh.coord.lock().members(now, group))
    }

    async fn member_remove(&self, group: &str, member_id: &str) -> Result<bool> {
        let now = self.sh.clock.now_ms();
        Ok(self.sh.coord.lock().remove_member(now, group, member_id))
    }

    async fn lease_acquire(
        &self,
        key: &LeaseKey,
        holder: &str,
        ttl_ms: u64,
    ) -> Result<Option<Lease>> {
        let now = self.sh.clock.now_ms();
        Ok(self.sh.coord.lock().acquire(now, key, holder, ttl_ms))
    }

    async fn lease_renew(&self, lease: &Lease, ttl_ms: u64) -> Result<Option<Lease>> {
        let now = self.sh.clock.now_ms();
        Ok(self.sh.coord.lock().renew(now, lease, ttl_ms))
    }

    async fn lease_release(&self, lease: &Lease) -> Result<()> {
        self.sh.coord.lock().release(lease);
        Ok(())
    }

    async fn lease_list(&self, group: &str) -> Result<Vec<Lease>> {
        let now = self.sh.clock.now_ms();
        Ok(self.sh.coord.lock().leases(now, group))
    }

    async fn enforce_retention(&self, now_ms: u64) -> Result<RetentionReport> {
        let (tx, rx) = oneshot::channel();
        self.sh.submit(Request::Retention { now_ms, reply: tx })?;
        rx.await.map_err(|_| writer_gone())?
    }

    fn watch_queue(&self, topic: &str, queue_id: u32) -> watch::Receiver<u64> {
        self.sh.queues.watch(topic, queue_id)
    }

    fn stats(&self) -> StoreStats {
        let (segments, log_bytes) = self.sh.log.usage();
        let cq_bytes: u64 = self.sh.queues.all().iter().map(|q| q.disk_bytes()).sum();
        StoreStats {
            appended_messages: self.sh.stats.appended_messages.load(Ordering::Relaxed),
            appended_bytes: self.sh.stats.appended_bytes.load(Ordering::Relaxed),
            segments,
            disk_bytes: log_bytes + cq_bytes + self.sh.keys.disk_bytes(),
            pending_timers: self.sh.pending_timers.load(Ordering::Relaxed),
            moved_timers: self.sh.stats.moved_timers.load(Ordering::Relaxed),
            append_latency_us: self.sh.stats.append_latency.snapshot(),
            fsync_latency_us: self.sh.stats.fsync_latency.snapshot(),
        }
    }

    fn writable(&self) -> bool {
        self.sh.writable.load(Ordering::Acquire) && !self.sh.closed.load(Ordering::Acquire)
    }

    fn unwritable_reason(&self) -> Option<String> {
        self.sh.failure()
    }

    async fn close(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let r = match self.sh.submit(Request::Close { reply: tx }) {
            Ok(()) => rx.await.map_err(|_| writer_gone()).and_then(|r| r),
            Err(_) => Ok(()),
        };
        self.join_writer().await;
        r
    }
}

/// A metadata namespace in memory, with the size of its two files.
struct MetaNs {
    entries: Namespace,
    /// Bytes of the namespace as last written whole to the `.meta` file (checksum not counted).
    whole_bytes: u64,
    /// Bytes of the `.journal` file, every record readable; `None` while there is no file.
    journal_bytes: Option<u64>,
}

/// The journal is folded into the namespace file once it is this long and longer than that
/// file, so a write costs one append and, amortised, a constant share of one rewrite.
const JOURNAL_FOLD_MIN: u64 = 256 << 10;

fn damaged(path: &Path, e: impl std::fmt::Display) -> WharfError {
    WharfError::internal(format!(
        "metadata file {} is damaged: {e}; restore it from a backup",
        path.display()
    ))
}

fn meta_loaded<'a>(
    sh: &Shared,
    meta: &'a mut HashMap<String, MetaNs>,
    ns: &str,
) -> Result<&'a mut MetaNs> {
    if !meta.contains_key(ns) {
        let dir = sh.dir.join("meta");
        let path = files::namespace_path(&dir, ns);
        let (mut entries, whole_bytes) = match files::read_atomic(&path) {
            Ok(Some(b)) => (
                files::decode_namespace(&b).map_err(|e| {
                    WharfError::internal(format!("metadata file {}: {e}", path.display()))
                })?,
                b.len() as u64,
            ),
            Ok(None) => (Namespace::new(), 0),
            Err(e) => return Err(damaged(&path, e)),
        };
        let jpath = files::journal_path(&dir, ns);
        let journal_bytes = match fs::read(&jpath) {
            Ok(b) => {
                let good = files::replay_journal(&mut entries, &b);
                if good < b.len() {
                    // A write torn by a crash was never acknowledged: drop it, so the next
                    // record follows a readable one.
                    warn!(file = %jpath.display(), dropped = b.len() - good, "metadata journal ends in a torn record; dropping it");
                    files::truncate_journal(&jpath, good as u64).map_err(|e| damaged(&jpath, e))?;
                }
                Some(good as u64)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(damaged(&jpath, e)),
        };
        meta.insert(
            ns.to_string(),
            MetaNs {
                entries,
                whole_bytes,
                journal_bytes,
            },
        );
    }
    meta.get_mut(ns)
        .ok_or_else(|| WharfError::internal("metadata cache lost a namespace"))
}

/// Writes (`value` = Some) or deletes (None) `ns/key` when `cond` holds, durably, under the
/// metadata lock so the check and the write are one step: one journal record appended and
/// synced, and now and then the namespace written whole so the journal starts again.
fn meta_apply(
    sh: &Shared,
    ns: &str,
    key: &str,
    value: Option<Vec<u8>>,
    cond: PutCondition,
) -> Result<PutOutcome> {
    if let Some(e) = sh.failed_error() {
        return Err(e);
    }
    let mut meta = sh.meta.lock();
    let current = meta_loaded(sh, &mut meta, ns)?;
    let version = current.entries.get(key).map(|e| e.version);
    let allowed = match cond {
        PutCondition::Any => true,
        PutCondition::Absent => version.is_none(),
        PutCondition::Version(v) => version == Some(v),
    };
    if !allowed {
        return Ok(PutOutcome::Conflict { current: version });
    }
    let entry = match value {
        Some(value) => Some(MetaEntry {
            value,
            version: version.map_or(1, |v| v + 1),
        }),
        None if version.is_none() => return Ok(PutOutcome::Written { version: 0 }),
        None => None,
    };
    let written = entry.as_ref().map_or(0, |e| e.version);
    let dir = sh.dir.join("meta");
    let record = files::encode_change(key, entry.as_ref());
    let unavailable = |e: io::Error| {
        WharfError::unavailable(format!(
            "the store cannot save metadata in {}: {e}; free disk space or fix permissions",
            dir.display()
        ))
    };
    let jpath = files::journal_path(&dir, ns);
    fs::create_dir_all(&dir).map_err(unavailable)?;
    if current.journal_bytes.is_none() {
        // Before a journal exists its namespace file is of the format that says one may: a
        // build that knows no journals then refuses the namespace instead of missing changes.
        let whole = files::encode_namespace(&current.entries);
        files::write_atomic(&files::namespace_path(&dir, ns), &whole).map_err(unavailable)?;
        current.whole_bytes = whole.len() as u64;
    }
    // The record goes first even when the namespace is then written whole: a crash before
    // the journal is cut replays records the whole file already holds, which changes nothing.
    if let Err(e) = files::append_journal(&jpath, &record, current.journal_bytes.is_none()) {
        // A record written in part would hide every later one from a replay: cut it off, or
        // failing that read the namespace again (which cuts it) before the next write.
        let good = current.journal_bytes.unwrap_or(0);
        if files::truncate_journal(&jpath, good).is_err() {
            meta.remove(ns);
        }
        return Err(unavailable(e));
    }
    let journal = current.journal_bytes.unwrap_or(0) + record.len() as u64;
    current.journal_bytes = Some(journal);
    match entry {
        Some(e) => {
            current.entries.insert(key.to_string(), e);
        }
        None => {
            current.entries.remove(key);
        }
    }
    if journal >= JOURNAL_FOLD_MIN && journal > current.whole_bytes {
        let whole = files::encode_namespace(&current.entries);
        // The change is durable in the journal already; a failed fold only leaves it long.
        match files::write_atomic(&files::namespace_path(&dir, ns), &whole)
            .and_then(|()| files::truncate_journal(&jpath, 0))
        {
            Ok(()) => {
                current.whole_bytes = whole.len() as u64;
                current.journal_bytes = Some(0);
            }
            Err(e) => {
                warn!(namespace = ns, error = %e, "cannot fold the metadata journal into its namespace file; will try again on a later write")
            }
        }
    }
    Ok(PutOutcome::Written { version: written })
}
