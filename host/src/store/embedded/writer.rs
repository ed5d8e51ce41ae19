//! The single writer thread: group commit, index maintenance, checkpoints, retention.
//!
//! Callers encode their batch on their own task and queue it; the writer drains everything
//! queued, copies the records into one buffer (patching position, store time, queue offset and
//! CRC), issues one write per segment touched and one fsync (sync mode), then updates the
//! derived indexes (page-cache writes only) and answers every request of the round.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::Shared;
use super::cq::{ConsumeQueue, CqEntry};
use super::files::{Checkpoint, INDEX_FORMAT, SegmentInfo};
use super::flusher::{CheckpointJob, Flusher, flush_offsets};
use super::log::{self, Segment};
use super::record::{self, EncodedBatch, Header};
use super::timers::{Timer, TimerIndex, tier_for};
use crate::error::{Result, WharfError};
use crate::model::{Appended, MessageId};
use crate::store::{FlushMode, RetentionReport};

/// How often (store time) the writer runs a retention pass by itself.
pub const RETENTION_EVERY_MS: u64 = 60_000;
/// How long the writer polls an empty inbox before it sleeps on it.
const SPIN_FOR_WORK: Duration = Duration::from_micros(50);
/// Rounds of at most this many appends are followed by a spin (see `spin_for_work`).
const SPIN_ROUND_APPENDS: usize = 2;
/// Queued appends past which a sender leaves the round to the writer thread, which then
/// writes it while the sender's thread goes on decoding and answering.
const INLINE_MAX_APPENDS: usize = 1;
/// Step in which a sync writer grows an append-mode segment ahead of its data (see
/// `zero_ahead`).
const ZERO_AHEAD: u64 = 1 << 20;

/// Work for the writer thread.
pub enum Request {
    /// Append an encoded batch.
    Append {
        batch: EncodedBatch,
        started: Instant,
        reply: oneshot::Sender<Result<Vec<Appended>>>,
        /// Given back just before the reply, so a caller that has its answer sees the budget free.
        permit: crate::store::QueuePermit,
    },
    /// Reveal due timers.
    Reveal {
        now_ms: u64,
        max: usize,
        reply: oneshot::Sender<Result<usize>>,
    },
    /// Delete expired segments.
    Retention {
        now_ms: u64,
        reply: oneshot::Sender<Result<RetentionReport>>,
    },
    /// Flush everything and stop.
    Close { reply: oneshot::Sender<Result<()>> },
    /// Stop at once without flushing (crash simulation in tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Halt { reply: oneshot::Sender<()> },
}

enum Outcome {
    Appended(Vec<Appended>),
    Revealed(usize),
}

/// Writer-thread state.
pub struct Writer {
    sh: Arc<Shared>,
    active: Arc<Segment>,
    /// Bytes written to `active` (published or not).
    written: u64,
    wbuf: Vec<u8>,
    pub(super) timers: TimerIndex,
    pub(super) seg_info: BTreeMap<u64, SegmentInfo>,
    last_stored_ms: u64,
    unsynced: bool,
    last_fsync: Instant,
    last_checkpoint: Instant,
    checkpoint_pos: u64,
    index_broken: bool,
    spare: Option<std::thread::JoinHandle<io::Result<std::path::PathBuf>>>,
    spare_cancel: Arc<std::sync::atomic::AtomicBool>,
    flusher: Option<Flusher>,
    checkpoint_in_flight: bool,
    force_checkpoint: bool,
    active_prealloc: bool,
    /// Length of the active segment's file: its data, then zeros ahead of it.
    file_len: u64,
    last_round_appends: usize,
    last_reply_at: Instant,
    /// Store time of the last retention pass (0: none yet).
    last_retention_ms: u64,
    /// A segment was sealed since the last retention pass.
    rolled: bool,
    /// Free bytes of the data dir's file system at the last reading, when it was taken and
    /// what the log has taken since (see `check_free_space`).
    free_at_reading: u64,
    free_read_at: Instant,
    appended_since_reading: u64,
    // Per-round scratch, reused.
    cq_ops: Vec<(Arc<ConsumeQueue>, u64, CqEntry)>,
    key_ops: Vec<(u32, u64)>,
    timer_adds: Vec<(Timer, u64)>,
    timer_dones: Vec<(Timer, u64)>,
    popped: Vec<Timer>,
    touched: Vec<(Arc<Segment>, u64, bool)>,
    queue_undo: Vec<(Arc<ConsumeQueue>, u64)>,
    max_ms_updates: Vec<(u64, u64)>,
    /// Moved timer copies placed in this round (counted once the round is durable).
    moved_copies: u64,
    /// Held-queue entries of a full rebuild, while it reads the log.
    held_rebuild: Option<HeldRebuild>,
}

/// The held-queue entries of a full index rebuild, numbered only once the whole log is read.
/// A moved timer copy whose first segment is gone stands in for its origin, at its original
/// store time: older than anything still in the log, so it sorts before the entries read
/// earlier, and a time query still lists it where it was stored.
#[derive(Default)]
struct HeldRebuild {
    by_topic: HashMap<String, Vec<CqEntry>>,
    origins: HashSet<u64>,
}

/// The held-queue entry of the timer message first stored at `pos` (its record's header `h`;
/// a moved copy keeps the original store time).
fn held_entry(pos: u64, h: &Header) -> CqEntry {
    CqEntry {
        pos,
        src_pos: pos,
        size: h.len,
        tag_hash: h.tag_hash,
        visible_ms: h.stored_ms,
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Abandon the spare before the thread ends; its file is unused either way.
        self.spare_cancel.store(true, Ordering::Relaxed);
        if let Some(h) = self.spare.take()
            && let Ok(Ok(path)) = h.join()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whatever ends the writer (close, halt, a panic), later requests must fail instead of hanging.
struct ExitGuard(Arc<Shared>, Arc<Mutex<Option<Writer>>>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.release_lock();
        if std::thread::panicking() {
            error!("the store writer thread panicked; the store no longer takes writes");
            self.0.set_writable(false);
        }
        // Senders must not run rounds on a writer whose thread is gone.
        drop(self.1.lock().take());
        // Dropping queued requests drops their reply senders: callers get an error at once.
        drop(std::mem::take(&mut *self.0.inbox.lock()));
    }
}

/// Polls the inbox for a moment before sleeping on it: a sender that has just had its answer
/// usually sends again within tens of µs, and waking a sleeping thread costs about as much (a
/// futex wake and, on a virtual machine, an IPI to a halted vCPU). Only after small rounds:
/// under load the next round comes soon anyway and the CPU is wanted by the threads that feed
/// it.
fn spin_for_work(sh: &Shared) {
    let until = Instant::now() + SPIN_FOR_WORK;
    while Instant::now() < until {
        if !sh.inbox.lock().is_empty() {
            return;
        }
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
}

/// Runs what is queued on the calling thread when the writer is free and the round is small.
/// This saves the two thread hand-offs a round through the writer thread costs: its wake-up,
/// and the wake-up of the sender's thread by the reply. With sync flush the sender also waits
/// out the round's fsync here, which its caller allows only under light load on a fast disk
/// (see `Arrivals::light`). Anything else, or a busy writer, is left to the writer thread.
pub(super) fn run_inline(sh: &Shared, core: &Mutex<Option<Writer>>) {
    #[cfg(test)]
    if sh.stall.is_locked() {
        sh.inbox_cv.notify_one();
        return;
    }
    let Some(mut guard) = core.try_lock() else {
        // Whoever holds the writer has the thread look at the inbox once it lets go.
        sh.inbox_cv.notify_one();
        return;
    };
    let Some(w) = guard.as_mut() else {
        // The writer stopped: the thread's exit guard fails whatever is still queued.
        drop(std::mem::take(&mut *sh.inbox.lock()));
        return;
    };
    let reqs = {
        let mut inbox = sh.inbox.lock();
        if inbox.is_empty() {
            return;
        }
        if !w.fits_inline(&inbox) {
            drop(inbox);
            sh.inbox_cv.notify_one();
            return;
        }
        std::mem::take(&mut *inbox)
    };
    let _stop = StopOnPanic(sh);
    sh.inline_rounds.fetch_add(1, Ordering::Relaxed);
    w.round(reqs);
}

/// A round that panics on a sender's thread stops the store, as a panicking writer thread does.
struct StopOnPanic<'a>(&'a Shared);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail("an append round panicked; the store no longer takes writes".into());
        }
    }
}

/// Answers every request of a round that stored nothing with `err`.
fn fail_all(reqs: Vec<Request>, err: &WharfError) {
    for r in reqs {
        match r {
            Request::Append { reply, permit, .. } => {
                drop(permit);
                let _ = reply.send(Err(err.clone()));
            }
            Request::Reveal { reply, .. } => {
                let _ = reply.send(Err(err.clone()));
            }
            _ => {}
        }
    }
}

fn io_unavailable(sh: &Shared, what: &str, e: &io::Error) -> WharfError {
    WharfError::unavailable(format!(
        "the store cannot {what} in data directory {}: {e}; nothing of this request was stored \
         — free disk space or fix permissions, then retry",
        sh.dir.display()
    ))
}

impl Writer {
    /// A writer appending to `active` (already validated, `written` = its length).
    pub fn new(
        sh: Arc<Shared>,
        active: Arc<Segment>,
        timers: TimerIndex,
        seg_info: BTreeMap<u64, SegmentInfo>,
        checkpoint_pos: u64,
    ) -> Writer {
        let written = active.len.load(Ordering::Acquire);
        let file_len = active.file.metadata().map_or(written, |m| m.len());
        Writer {
            sh,
            active,
            written,
            wbuf: Vec::with_capacity(1 << 20),
            timers,
            seg_info,
            last_stored_ms: 0,
            unsynced: false,
            last_fsync: Instant::now(),
            last_checkpoint: Instant::now(),
            checkpoint_pos,
            index_broken: false,
            spare: None,
            spare_cancel: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            flusher: None,
            checkpoint_in_flight: false,
            force_checkpoint: false,
            active_prealloc: false,
            file_len,
            last_round_appends: 0,
            last_reply_at: Instant::now(),
            last_retention_ms: 0,
            rolled: false,
            free_at_reading: 0,
            free_read_at: Instant::now(),
            appended_since_reading: 0,
            cq_ops: Vec::new(),
            key_ops: Vec::new(),
            timer_adds: Vec::new(),
            timer_dones: Vec::new(),
            popped: Vec::new(),
            touched: Vec::new(),
            queue_undo: Vec::new(),
            max_ms_updates: Vec::new(),
            moved_copies: 0,
            held_rebuild: None,
        }
    }

    fn end_pos(&self) -> u64 {
        self.active.base + self.written + self.wbuf.len() as u64
    }

    // ------------------------------------------------------------------ recovery replay

    /// Rebuilds every index from the records in `[from, end)` of the log. `indexed` says the
    /// indexes already cover the log before `from` (false when they are rebuilt from scratch).
    pub fn replay(&mut self, from: u64, indexed: bool) -> io::Result<()> {
        // Timers of records before `from` are in the timer index only if it was kept.
        let known_below = if indexed { from } else { 0 };
        self.held_rebuild = (!indexed).then(HeldRebuild::default);
        let segs = self.sh.log.segments();
        let mut count = 0u64;
        for seg in segs {
            if seg.end() <= from && !(seg.base == from && seg.end() == from) {
                continue;
            }
            let start = from.saturating_sub(seg.base);
            let mut err = None;
            log::scan(&seg, start, |pos, rec| {
                if err.is_some() {
                    return;
                }
                if let Err(e) = self.replay_record(seg.base, pos, rec, known_below) {
                    err = Some(e);
                }
                count += 1;
                if self.cq_ops.len() + self.key_ops.len() > 65536
                    && let Err(e) = self.apply_indexes()
                {
                    err = Some(e);
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        if let Some(rebuilt) = self.held_rebuild.take() {
            for (topic, mut entries) in rebuilt.by_topic {
                entries.sort_by_key(|e| (e.visible_ms, e.pos));
                let hq = self.sh.queues.held_or_create(&topic)?;
                for e in entries {
                    self.push_held(&hq, e);
                    if self.cq_ops.len() > 65536 {
                        self.apply_indexes()?;
                    }
                }
            }
        }
        self.apply_indexes()?;
        self.timers.ensure_loaded(self.sh.clock.now_ms())?;
        self.publish_timer_state();
        if count > 0 {
            info!(records = count, from, "store indexes rebuilt from the log");
        }
        Ok(())
    }

    fn replay_record(
        &mut self,
        seg_base: u64,
        pos: u64,
        rec: &[u8],
        known_below: u64,
    ) -> io::Result<()> {
        let h = Header::parse(rec);
        let Some(topic) = record::topic_of(rec) else {
            return Ok(());
        };
        self.last_stored_ms = self.last_stored_ms.max(h.stored_ms);
        self.max_ms_updates.push((seg_base, h.stored_ms));
        match h.kind {
            record::KIND_MESSAGE => {
                let moved = record::moved_of(rec);
                if let Some(m) = moved {
                    // A moved copy keeps its original store time; its segment holds it from the
                    // move on.
                    self.max_ms_updates.push((seg_base, m.moved_ms));
                }
                if h.held() {
                    let t = Timer {
                        deliver: h.deliver_ms,
                        pos,
                        size: h.len,
                        tier: tier_for(h.deliver_ms, h.stored_ms),
                    };
                    self.timer_adds.push((t, seg_base));
                    // A moved copy has no held entry of its own: its origin's entry names it.
                    if moved.is_none() {
                        self.replay_held(topic, pos, &h)?;
                    }
                } else if h.queue_offset != record::NO_OFFSET {
                    // A copy revealed as it moved became visible at the move.
                    let visible = moved.map_or(h.stored_ms, |m| m.moved_ms);
                    self.replay_visible(topic, &h, pos, pos, h.len, visible)?;
                }
                for k in record::keys_of(rec) {
                    self.key_ops.push((record::key_hash(topic, k), pos));
                }
                if let Some(m) = moved {
                    self.key_ops.push((record::moved_hash(m.origin), pos));
                    // The origin's held entry went with its segment: the copy takes its place
                    // (once, however many copies of it the log still holds).
                    if let Some(r) = self.held_rebuild.as_mut()
                        && self.sh.log.segment_of(m.origin).is_none()
                        && r.origins.insert(m.origin)
                    {
                        r.by_topic
                            .entry(topic.to_string())
                            .or_default()
                            .push(held_entry(m.origin, &h));
                    }
                    // The copy is the done marker of the timer it was copied from, which the
                    // index holds if it was indexed before `from` or replayed just now.
                    if m.source < known_below || self.sh.log.segment_of(m.source).is_some() {
                        let t = Timer {
                            deliver: h.deliver_ms,
                            pos: m.source,
                            size: 0,
                            tier: tier_for(h.deliver_ms, h.stored_ms),
                        };
                        self.timer_dones.push((t, pos));
                    }
                }
            }
            record::KIND_SEGMENT => {}
            _ => {
                // A reveal marker: its consume-queue entry points at the timer message it reveals.
                let target = h.born_ms;
                if let Some(seg) = self.sh.log.segment_of(target) {
                    self.max_ms_updates.push((seg.base, h.stored_ms));
                }
                self.replay_visible(topic, &h, target, pos, h.reconsume, h.stored_ms)?;
                let t = Timer {
                    deliver: h.deliver_ms,
                    pos: target,
                    size: h.reconsume,
                    tier: h.flags,
                };
                self.timer_dones.push((t, pos));
            }
        }
        Ok(())
    }

    /// Files the held-queue entry of the replayed timer message at `pos`: numbered in log
    /// order as the writer numbered it, or kept for numbering at the end of a full rebuild.
    fn replay_held(&mut self, topic: &str, pos: u64, h: &Header) -> io::Result<()> {
        let e = held_entry(pos, h);
        if let Some(r) = self.held_rebuild.as_mut() {
            r.by_topic.entry(topic.to_string()).or_default().push(e);
            return Ok(());
        }
        let hq = self.sh.queues.held_or_create(topic)?;
        self.push_held(&hq, e);
        Ok(())
    }

    /// Queues `e` as the next entry of the held queue `hq`.
    fn push_held(&mut self, hq: &Arc<ConsumeQueue>, e: CqEntry) {
        let off = hq.next_assign.fetch_add(1, Ordering::Relaxed);
        hq.last_visible_ms
            .fetch_max(e.visible_ms, Ordering::Relaxed);
        self.cq_ops.push((hq.clone(), off, e));
    }

    /// Queues the consume-queue entry a replayed record made visible at `h.queue_offset` at
    /// `visible_ms`: the message at `target` (`size` bytes), created by the record at `src`.
    fn replay_visible(
        &mut self,
        topic: &str,
        h: &Header,
        target: u64,
        src: u64,
        size: u32,
        visible_ms: u64,
    ) -> io::Result<()> {
        let q = self.sh.queues.get_or_create(topic, h.queue_id)?;
        q.next_assign
            .fetch_max(h.queue_offset + 1, Ordering::Relaxed);
        q.last_visible_ms.fetch_max(visible_ms, Ordering::Relaxed);
        self.cq_ops.push((
            q,
            h.queue_offset,
            CqEntry {
                pos: target,
                src_pos: src,
                size,
                tag_hash: h.tag_hash,
                visible_ms,
            },
        ));
        Ok(())
    }

    // ------------------------------------------------------------------ main loop

    /// Serves requests until closed. The writer sits in `core` so that under light load a
    /// sender can run a small round itself (see [`run_inline`]); this thread does everything
    /// else: rounds under load, rounds that roll a segment, reveals, control requests,
    /// maintenance.
    pub fn run(core: Arc<Mutex<Option<Writer>>>) {
        let sh = {
            let mut guard = core.lock();
            let Some(w) = guard.as_mut() else { return };
            match Flusher::start(w.sh.clone()) {
                Ok(f) => w.flusher = Some(f),
                Err(e) => {
                    error!(error = %e, "starting the store flusher failed; checkpoints run inline")
                }
            }
            *w.sh.active.lock() = Some(w.active.clone());
            w.sh.clone()
        };
        let _guard = ExitGuard(sh.clone(), core.clone());
        let tick = Duration::from_millis(20);
        // Under load senders come back within an fsync; only a sync writer polls for them.
        let mut spin = false;
        loop {
            {
                let mut inbox = sh.inbox.lock();
                if inbox.is_empty() && spin {
                    drop(inbox);
                    spin_for_work(&sh);
                    inbox = sh.inbox.lock();
                }
                if inbox.is_empty() {
                    sh.inbox_cv.wait_for(&mut inbox, tick);
                }
            }
            let mut guard = core.lock();
            let Some(w) = guard.as_mut() else { return };
            // Taken under the writer lock, as senders take it, so the log keeps inbox order.
            let reqs = std::mem::take(&mut *sh.inbox.lock());
            let mut data = Vec::with_capacity(reqs.len());
            let mut control = Vec::new();
            for r in reqs {
                match r {
                    Request::Append { .. } | Request::Reveal { .. } => data.push(r),
                    other => control.push(other),
                }
            }
            if !data.is_empty() && control.is_empty() {
                w.linger(&mut data, &mut control);
            }
            if !data.is_empty() {
                w.round(data);
            }
            for c in control {
                match c {
                    Request::Retention { now_ms, reply } => {
                        let _ = reply.send(w.retention(now_ms));
                    }
                    Request::Close { reply } => {
                        let r = w.shutdown();
                        sh.release_lock();
                        // The writer (and its spare segment) goes with the thread.
                        drop(guard.take());
                        let _ = reply.send(r);
                        return;
                    }
                    Request::Halt { reply } => {
                        if let Some(mut f) = w.flusher.take() {
                            f.stop();
                        }
                        sh.release_lock();
                        drop(guard.take());
                        let _ = reply.send(());
                        return;
                    }
                    _ => {}
                }
            }
            w.maintenance(false);
            spin = sh.config.flush == FlushMode::Sync && w.last_round_appends <= SPIN_ROUND_APPENDS;
        }
    }

    /// Whether the queued `reqs` may be written by a sender on its own thread: appends only,
    /// few enough that the writer thread would not do them faster alongside the sender, and
    /// none that rolls a segment (a roll fsyncs the old one and sets up the next, longer than a
    /// sender's runtime thread may be held).
    fn fits_inline(&self, reqs: &[Request]) -> bool {
        if reqs.len() > INLINE_MAX_APPENDS {
            return false;
        }
        let mut bytes = 0u64;
        for r in reqs {
            match r {
                Request::Append { batch, .. } => bytes += batch.buf.len() as u64,
                _ => return false,
            }
        }
        let used = self.written + self.wbuf.len() as u64;
        let rolls = used + bytes > self.sh.config.segment_bytes || self.upgrade_ready();
        !rolls
    }

    /// The active segment is an append-mode one and a zero-filled spare is ready to take over.
    fn upgrade_ready(&self) -> bool {
        !self.active_prealloc && self.spare.as_ref().is_some_and(|h| h.is_finished())
    }

    fn shutdown(&mut self) -> Result<()> {
        self.sh.closed.store(true, Ordering::Release);
        // Answer anything that raced with close.
        let late = std::mem::take(&mut *self.sh.inbox.lock());
        if !late.is_empty() {
            let data: Vec<Request> = late
                .into_iter()
                .filter(|r| matches!(r, Request::Append { .. } | Request::Reveal { .. }))
                .collect();
            if !data.is_empty() {
                self.round(data);
            }
        }
        if let Some(mut f) = self.flusher.take() {
            let done = f.stop();
            self.absorb_checkpoint(done);
        }
        self.maintenance(true);
        flush_offsets(&self.sh)
            .map_err(|e| io_unavailable(&self.sh, "save consumer offsets", &e))?;
        if self.index_broken {
            return Err(WharfError::internal(
                "store indexes could not be written; they will be rebuilt from the log on restart",
            ));
        }
        Ok(())
    }

    /// Periodic work: index checkpoint (handed to the flusher), timer window. With `force`
    /// (shutdown, flusher stopped) everything is made durable inline.
    fn maintenance(&mut self, force: bool) {
        if let Some(done) = self.flusher.as_ref().and_then(|f| f.take_done()) {
            self.absorb_checkpoint(Some(done));
        }
        let end = self.active.base + self.written;
        if force {
            if self.unsynced
                && let Err(e) = self.fsync_active()
            {
                error!(error = %e, "store fsync failed");
                self.sh.set_writable(false);
            }
            if let Err(e) = self.checkpoint() {
                error!(error = %e, "store index checkpoint failed");
            }
        } else {
            let due = self.force_checkpoint
                || (self.last_checkpoint.elapsed() >= self.sh.tuning.checkpoint_interval()
                    && end != self.checkpoint_pos);
            if due && !self.checkpoint_in_flight && !self.index_broken {
                self.start_checkpoint();
            }
        }
        if !force {
            self.scheduled_retention();
        }
        if let Err(e) = self.timers.ensure_loaded(self.sh.clock.now_ms()) {
            error!(error = %e, "loading timer bucket failed");
        }
        self.publish_timer_state();
    }

    /// Runs the retention pass every [`RETENTION_EVERY_MS`] of store time and after every
    /// segment roll, so `retention_hours` holds within a minute plus one segment's lifetime.
    fn scheduled_retention(&mut self) {
        let now = self.sh.clock.now_ms();
        let due = self.last_retention_ms == 0
            || now.saturating_sub(self.last_retention_ms) >= RETENTION_EVERY_MS
            || self.rolled;
        if !due || self.sh.failure().is_some() {
            return;
        }
        self.last_retention_ms = now.max(1);
        self.rolled = false;
        if let Err(e) = self.retention(now) {
            warn!(error = %e, "retention pass failed; the next one retries");
        }
    }

    fn start_checkpoint(&mut self) {
        let Some(flusher) = self.flusher.as_ref() else {
            if let Err(e) = self.checkpoint() {
                error!(error = %e, "store index checkpoint failed");
            }
            return;
        };
        let (timer_files, deletes) = match self.timers.take_sync_work() {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "writing timer index failed; indexes will be rebuilt on restart");
                self.index_broken = true;
                return;
            }
        };
        let existing: Vec<u64> = self.sh.log.segments().iter().map(|s| s.base).collect();
        self.seg_info.retain(|b, _| existing.contains(b));
        flusher.checkpoint(CheckpointJob {
            pos: self.active.base + self.written,
            segments: self.seg_info.clone(),
            segment: self.active.clone(),
            timer_files,
            deletes,
        });
        self.checkpoint_in_flight = true;
        self.force_checkpoint = false;
        self.last_checkpoint = Instant::now();
    }

    fn absorb_checkpoint(&mut self, done: Option<super::flusher::Done>) {
        let Some(done) = done else { return };
        self.checkpoint_in_flight = false;
        match done {
            Ok((pos, deletes)) => {
                self.checkpoint_pos = pos;
                if let Err(e) = self.timers.finish_deletes(deletes) {
                    warn!(error = %e, "deleting finished timer buckets failed");
                }
            }
            Err(_) => {
                // fsync errors may have dropped index pages: never claim coverage again in
                // this process; the next start replays the log from the last good checkpoint.
                self.index_broken = true;
            }
        }
    }

    fn publish_timer_state(&self) {
        self.sh.next_timer.store(
            self.timers.next_due().unwrap_or(u64::MAX),
            Ordering::Release,
        );
        self.sh
            .pending_timers
            .store(self.timers.pending(), Ordering::Release);
        self.sh
            .loaded_timers
            .store(self.timers.loaded(), Ordering::Release);
    }

    /// Senders answered by the previous round usually come straight back; when only some of
    /// them are here yet, waiting a fraction of an fsync for the rest lets one fsync cover them
    /// all instead of splitting the senders into two alternating half-size rounds.
    fn linger(&mut self, data: &mut Vec<Request>, control: &mut Vec<Request>) {
        if self.sh.config.flush != FlushMode::Sync || self.last_round_appends < 2 {
            return;
        }
        let since = self.last_reply_at;
        let returned =
            |r: &Request| matches!(r, Request::Append { started, .. } if *started >= since);
        let mut back = data.iter().filter(|r| returned(r)).count();
        if back >= self.last_round_appends {
            return;
        }
        let fsync_ema = Duration::from_nanos(self.sh.fsync_ema_ns.load(Ordering::Relaxed));
        let budget = (fsync_ema / 4).min(Duration::from_micros(250));
        let deadline = Instant::now() + budget;
        let mut inbox = self.sh.inbox.lock();
        loop {
            for r in inbox.drain(..) {
                match r {
                    Request::Append { .. } | Request::Reveal { .. } => {
                        back += usize::from(returned(&r));
                        data.push(r);
                    }
                    other => control.push(other),
                }
            }
            if back >= self.last_round_appends || !control.is_empty() || Instant::now() >= deadline
            {
                return;
            }
            self.sh.inbox_cv.wait_until(&mut inbox, deadline);
        }
    }

    fn fsync_active(&mut self) -> io::Result<()> {
        let t = Instant::now();
        self.sh.sync_log(&self.active.file, false)?;
        let took = t.elapsed();
        let ema = &self.sh.fsync_ema_ns;
        let ns = took.as_nanos().min(u128::from(u64::MAX / 8)) as u64;
        ema.store(
            (ema.load(Ordering::Relaxed) * 7 + ns) / 8,
            Ordering::Relaxed,
        );
        self.sh.stats.fsync_latency.record(took.as_micros() as u64);
        self.unsynced = false;
        self.last_fsync = Instant::now();
        Ok(())
    }

    /// Makes every index durable and records the log position they cover.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        if self.index_broken {
            return Ok(());
        }
        if self.unsynced {
            self.fsync_active()?;
        }
        for q in self.sh.queues.all() {
            q.sync()?;
        }
        self.sh.keys.sync()?;
        self.timers.sync()?;
        let pos = self.active.base + self.written;
        let existing: Vec<u64> = self.sh.log.segments().iter().map(|s| s.base).collect();
        self.seg_info.retain(|b, _| existing.contains(b));
        let ck = Checkpoint {
            format: INDEX_FORMAT,
            log_pos: pos,
            segments: self.seg_info.clone(),
        };
        ck.save(&self.sh.dir.join("checkpoint"))?;
        self.checkpoint_pos = pos;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    // ------------------------------------------------------------------ one group-commit round

    fn round(&mut self, reqs: Vec<Request>) {
        #[cfg(test)]
        drop(self.sh.stall.lock());
        if let Some(err) = self.sh.failed_error() {
            fail_all(reqs, &err);
            return;
        }
        let appending: u64 = reqs
            .iter()
            .map(|r| match r {
                Request::Append { batch, .. } => batch.buf.len() as u64,
                _ => 0,
            })
            .sum();
        if appending > 0
            && let Err(err) = self.check_free_space(appending)
        {
            warn!(error = %err, "append round refused: the disk is nearly full");
            self.sh.set_writable(false);
            fail_all(reqs, &err);
            return;
        }
        let now = self.sh.clock.now_ms().max(self.last_stored_ms);
        let pre_written = self.written;
        let pre_active = self.active.clone();
        let mut outcomes: Vec<std::result::Result<Outcome, WharfError>> =
            Vec::with_capacity(reqs.len());
        let mut failure: Option<WharfError> = None;
        for r in &reqs {
            if failure.is_some() {
                break;
            }
            let res = match r {
                Request::Append { batch, .. } => {
                    self.place_batch(batch, now).map(Outcome::Appended)
                }
                Request::Reveal { now_ms, max, .. } => self
                    .place_reveals(*now_ms, *max, now)
                    .map(Outcome::Revealed),
                _ => continue,
            };
            match res {
                Ok(o) => outcomes.push(Ok(o)),
                Err(e) => failure = Some(io_unavailable(&self.sh, "write the message log", &e)),
            }
        }
        if failure.is_none()
            && let Err(e) = self.commit()
        {
            failure = Some(io_unavailable(&self.sh, "write the message log", &e));
        }
        if let Some(err) = failure {
            self.rollback(pre_active, pre_written);
            // After a failed fsync, say so rather than what the round was doing.
            let err = self.sh.failed_error().unwrap_or(err);
            error!(error = %err, "append round failed; nothing of it was acknowledged");
            self.sh.set_writable(false);
            fail_all(reqs, &err);
            return;
        }
        self.sh.set_writable(true);
        self.last_stored_ms = now;
        if let Err(e) = self.apply_indexes() {
            // The round is durable in the log but its queue entries are not all written: a
            // later round publishing past them would leave holes consumers skip. Stop taking
            // writes instead; the next start rebuilds the indexes from the log.
            self.index_broken = true;
            self.sh.fail(format!(
                "writing the store indexes in {} failed: {e}",
                self.sh.dir.display()
            ));
        }
        self.touched.clear();
        self.queue_undo.clear();
        self.popped.clear();
        if self.wbuf.capacity() > 16 << 20 {
            // One huge round must not pin its buffer for the life of the process.
            self.wbuf = Vec::with_capacity(1 << 20);
        }
        // Publish timer state before answering so a caller sees its own held timer.
        if let Err(e) = self.timers.ensure_loaded(now) {
            error!(error = %e, "loading timer bucket failed");
        }
        self.publish_timer_state();
        self.last_round_appends = reqs
            .iter()
            .filter(|r| matches!(r, Request::Append { .. }))
            .count();
        self.last_reply_at = Instant::now();
        for (r, o) in reqs.into_iter().zip(outcomes) {
            match (r, o) {
                (
                    Request::Append {
                        reply,
                        started,
                        permit,
                        ..
                    },
                    Ok(Outcome::Appended(a)),
                ) => {
                    drop(permit);
                    self.sh
                        .stats
                        .appended_messages
                        .fetch_add(a.len() as u64, Ordering::Relaxed);
                    self.sh
                        .stats
                        .append_latency
                        .record(started.elapsed().as_micros() as u64);
                    let _ = reply.send(Ok(a));
                }
                (Request::Reveal { reply, .. }, Ok(Outcome::Revealed(n))) => {
                    let _ = reply.send(Ok(n));
                }
                _ => {}
            }
        }
    }

    /// Refuses a round of `bytes` when the data dir's file system would keep less than
    /// `[store] min_free_bytes` free. The log stops short of a full disk so that the index writes
    /// that follow a durable round (which can no longer be refused) always find room, and sends
    /// resume by themselves once space is freed. The file system is asked again once a second,
    /// or sooner when what the log wrote since could have used up the margin.
    fn check_free_space(&mut self, bytes: u64) -> Result<()> {
        let min = self.sh.config.min_free_bytes;
        if min == 0 {
            return Ok(());
        }
        let taken = self.appended_since_reading + bytes;
        let fresh = self.free_read_at.elapsed() < Duration::from_secs(1);
        if fresh && self.free_at_reading.saturating_sub(taken) >= min.saturating_mul(2) {
            self.appended_since_reading = taken;
            return Ok(());
        }
        let free = super::files::available_bytes(&self.sh.dir)
            .map_err(|e| io_unavailable(&self.sh, "read the free space of the data dir", &e))?;
        self.free_at_reading = free;
        self.free_read_at = Instant::now();
        self.appended_since_reading = 0;
        if free < min.saturating_add(bytes) {
            return Err(WharfError::unavailable(format!(
                "the disk holding {} has {free} bytes free, under [store] min_free_bytes = {min}; nothing of this send was stored — free space (or lower retention_hours) and sends resume without a restart",
                self.sh.dir.display()
            )));
        }
        self.appended_since_reading = bytes;
        Ok(())
    }

    /// Makes room for a record of `len` bytes, rolling to a new segment when the active one is
    /// full, and starts an empty segment with its header record (stamped `now`). Returns the
    /// position the record will get.
    fn reserve(&mut self, len: usize, now: u64) -> io::Result<u64> {
        let used = self.written + self.wbuf.len() as u64;
        let full = used > 0 && used + len as u64 > self.sh.config.segment_bytes;
        // An append-mode segment (fresh start) asks for a spare only once real traffic shows
        // up, so idle hosts and short-lived test stores never zero-fill a whole segment.
        if !self.active_prealloc
            && self.spare.is_none()
            && used >= (self.sh.config.segment_bytes / 16).min(16 << 20)
        {
            self.start_spare();
        }
        // Move off an append-mode segment as soon as a zero-filled spare is ready.
        let upgrade = used > 0 && self.upgrade_ready();
        let spare = if full || upgrade {
            self.take_spare()
        } else {
            None
        };
        // A failed spare (e.g. disk full) is no reason to roll early.
        if full || spare.is_some() {
            let seg = self.roll(spare)?;
            self.touched.push((seg, 0, true));
        }
        if self.written == 0 && self.wbuf.is_empty() {
            record::encode_segment_header(&mut self.wbuf, self.active.base, now);
        }
        Ok(self.end_pos())
    }

    /// Seals the active segment (cut to its data, fsynced) and makes a new, empty one active at
    /// the log end (the spare, if one is ready). The new segment gets its header record with
    /// its first append. Returns the new segment.
    fn roll(&mut self, spare: Option<std::path::PathBuf>) -> io::Result<Arc<Segment>> {
        self.write_out()?;
        // A spare segment was zero-filled beyond the data: cut it to the data before sealing.
        if self.active.file.metadata()?.len() != self.written {
            self.active.file.set_len(self.written)?;
            self.sh.sync_log(&self.active.file, true)?;
        }
        if self.sh.config.flush == FlushMode::Sync {
            self.fsync_active()?;
        } else {
            // The old segment gets no further periodic fsync: do it now.
            self.sh.sync_log(&self.active.file, false)?;
            self.unsynced = false;
        }
        let base = self.active.base + self.written;
        let installed = match spare {
            Some(spare) => match self.sh.log.install(base, &spare) {
                Ok(seg) => Some(seg),
                Err(e) => {
                    debug!(error = %e, "installing a spare segment failed; creating one");
                    None
                }
            },
            None => None,
        };
        self.active_prealloc = installed.is_some();
        let seg = match installed {
            Some(seg) => seg,
            None => self.sh.log.create(base)?,
        };
        self.start_spare();
        self.seg_info.entry(base).or_default();
        *self.sh.active.lock() = Some(seg.clone());
        self.file_len = seg.file.metadata().map_or(0, |m| m.len());
        self.active = seg.clone();
        self.written = 0;
        self.rolled = true;
        crate::crashpoint::reached(crate::crashpoint::SEGMENT_ROLL);
        Ok(seg)
    }

    /// Starts zero-filling the next segment in the background (when enabled and not running).
    pub fn start_spare(&mut self) {
        if !self.sh.tuning.preallocate_segments || self.spare.is_some() {
            return;
        }
        let dir = self.sh.log.dir.clone();
        let bytes = self.sh.config.segment_bytes;
        let cancel = self.spare_cancel.clone();
        let zero_fill = self.sh.config.flush == FlushMode::Sync;
        self.spare = std::thread::Builder::new()
            .name("wharf-store-prealloc".into())
            .spawn(move || log::preallocate(&dir, bytes, zero_fill, &cancel))
            .ok();
    }

    /// The spare segment if it is ready (never waits for it).
    fn take_spare(&mut self) -> Option<std::path::PathBuf> {
        if !self.spare.as_ref()?.is_finished() {
            return None;
        }
        match self.spare.take()?.join() {
            Ok(Ok(path)) => Some(path),
            Ok(Err(e)) => {
                debug!(error = %e, "preallocating a segment failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Writes the buffer to the active segment (one write call).
    fn write_out(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        if !self
            .touched
            .iter()
            .any(|(s, _, _)| Arc::ptr_eq(s, &self.active))
        {
            self.touched
                .push((self.active.clone(), self.written, false));
        }
        self.sh.fault_check()?;
        self.active.file.write_all_at(&self.wbuf, self.written)?;
        let end = self.written + self.wbuf.len() as u64;
        if self.sh.config.flush == FlushMode::Sync && !self.active_prealloc && end > self.file_len {
            self.zero_ahead(end)?;
        }
        self.written = end;
        self.sh
            .stats
            .appended_bytes
            .fetch_add(self.wbuf.len() as u64, Ordering::Relaxed);
        self.wbuf.clear();
        if self.sh.config.flush == FlushMode::Async {
            self.active.len.store(self.written, Ordering::Release);
        }
        self.unsynced = true;
        Ok(())
    }

    /// Grows an append-mode segment (a fresh store's first one, before a spare is ready) with
    /// zeros past `end`, the data's new end, to the next [`ZERO_AHEAD`] step. The fdatasync of
    /// a write that grows the file must also commit its new size (a journal commit, which about
    /// doubles it); the rounds that follow write inside the zeros and commit their data only.
    /// Recovery reads zeros after the data as the log's end, as in a preallocated segment.
    fn zero_ahead(&mut self, end: u64) -> io::Result<()> {
        let to = end
            .div_ceil(ZERO_AHEAD)
            .saturating_mul(ZERO_AHEAD)
            .min(self.sh.config.segment_bytes)
            .max(end);
        if to > end {
            let zeros = vec![0u8; (to - end) as usize];
            self.active.file.write_all_at(&zeros, end)?;
        }
        self.file_len = to;
        Ok(())
    }

    /// Writes and (sync mode) fsyncs the round, then publishes the new log end.
    fn commit(&mut self) -> io::Result<()> {
        self.write_out()?;
        if self.sh.config.flush == FlushMode::Sync && self.unsynced {
            self.sh.fault_check()?;
            self.fsync_active()?;
        }
        for (seg, _, _) in &self.touched {
            if !Arc::ptr_eq(seg, &self.active) {
                seg.len.store(
                    seg.file.metadata().map(|m| m.len()).unwrap_or(0),
                    Ordering::Release,
                );
            }
        }
        self.active.len.store(self.written, Ordering::Release);
        Ok(())
    }

    fn rollback(&mut self, pre_active: Arc<Segment>, pre_written: u64) {
        self.wbuf.clear();
        for (seg, pre_len, created) in std::mem::take(&mut self.touched) {
            if created {
                if let Err(e) = self.sh.log.remove(seg.base) {
                    warn!(error = %e, "removing a segment of a failed round");
                }
                self.seg_info.remove(&seg.base);
            } else {
                let _ = seg.file.set_len(pre_len);
                seg.len.store(pre_len, Ordering::Release);
            }
        }
        *self.sh.active.lock() = Some(pre_active.clone());
        self.active = pre_active;
        self.written = pre_written;
        // Truncation dropped any zero-filled space: the segment appends from here on.
        self.active_prealloc = false;
        self.file_len = self.active.file.metadata().map_or(pre_written, |m| m.len());
        self.active.len.store(pre_written, Ordering::Release);
        for (q, next) in std::mem::take(&mut self.queue_undo) {
            q.next_assign.store(next, Ordering::Relaxed);
        }
        let popped = std::mem::take(&mut self.popped);
        self.timers.unpop(&popped);
        self.cq_ops.clear();
        self.key_ops.clear();
        self.timer_adds.clear();
        self.timer_dones.clear();
        self.max_ms_updates.clear();
        self.moved_copies = 0;
    }

    fn assign_offset(&mut self, q: &Arc<ConsumeQueue>) -> u64 {
        let off = q.next_assign.fetch_add(1, Ordering::Relaxed);
        if !self.queue_undo.iter().any(|(u, _)| Arc::ptr_eq(u, q)) {
            self.queue_undo.push((q.clone(), off));
        }
        off
    }

    fn place_batch(&mut self, batch: &EncodedBatch, now: u64) -> io::Result<Vec<Appended>> {
        let mut out = Vec::with_capacity(batch.recs.len());
        let mut last_q: Option<(std::ops::Range<usize>, u32, Arc<ConsumeQueue>)> = None;
        for r in &batch.recs {
            let len = r.len as usize;
            let pos = self.reserve(len, now)?;
            // Per record: a batch may fill a segment and roll, and every segment it touched
            // must know its newest store time, or retention would see it as ancient.
            self.note_stored(self.active.base, now);
            let held = r.deliver_at.is_some_and(|d| d > now);
            let topic_bytes = &batch.buf[r.topic.clone()];
            let topic = std::str::from_utf8(topic_bytes).map_err(io::Error::other)?;
            let qoff = if held {
                record::NO_OFFSET
            } else {
                let q = match &last_q {
                    Some((range, id, q))
                        if *id == r.queue_id && &batch.buf[range.clone()] == topic_bytes =>
                    {
                        q.clone()
                    }
                    _ => {
                        let q = self.sh.queues.get_or_create(topic, r.queue_id)?;
                        last_q = Some((r.topic.clone(), r.queue_id, q.clone()));
                        q
                    }
                };
                let off = self.assign_offset(&q);
                let visible = now.max(q.last_visible_ms.load(Ordering::Relaxed));
                q.last_visible_ms.store(visible, Ordering::Relaxed);
                self.cq_ops.push((
                    q,
                    off,
                    CqEntry {
                        pos,
                        src_pos: pos,
                        size: r.len,
                        tag_hash: r.tag_hash,
                        visible_ms: visible,
                    },
                ));
                off
            };
            let at = self.wbuf.len();
            self.wbuf
                .extend_from_slice(&batch.buf[r.start..r.start + len]);
            record::finish(&mut self.wbuf[at..at + len], pos, now, qoff, held);
            for h in &batch.key_hashes[r.keys.clone()] {
                self.key_ops.push((*h, pos));
            }
            if held {
                let deliver = r.deliver_at.unwrap_or(now);
                let t = Timer {
                    deliver,
                    pos,
                    size: r.len,
                    tier: tier_for(deliver, now),
                };
                self.timer_adds.push((t, self.active.base));
                let hq = self.sh.queues.held_or_create(topic)?;
                let off = self.assign_offset(&hq);
                hq.last_visible_ms.fetch_max(now, Ordering::Relaxed);
                self.cq_ops.push((
                    hq,
                    off,
                    CqEntry {
                        pos,
                        src_pos: pos,
                        size: r.len,
                        tag_hash: r.tag_hash,
                        visible_ms: now,
                    },
                ));
            }
            out.push(Appended {
                id: MessageId::new(now, self.sh.node, pos),
                queue_id: r.queue_id,
                queue_offset: (!held).then_some(qoff),
                stored_ms: now,
            });
        }
        Ok(out)
    }

    /// Records that the segment at `base` holds data of store time `ms` (applied with the
    /// round's indexes).
    fn note_stored(&mut self, base: u64, ms: u64) {
        if self.max_ms_updates.last() != Some(&(base, ms)) {
            self.max_ms_updates.push((base, ms));
        }
    }

    /// The record of timer `t` if it is still the held message the index says; otherwise
    /// finishes the timer (it can never fire) and returns `None`.
    fn timer_record(&mut self, t: Timer) -> Option<(bytes::Bytes, Header)> {
        let usable = self
            .sh
            .log
            .read_record(t.pos, Some(t.size))
            .and_then(|rec| {
                let h = Header::parse(&rec);
                let ok = h.kind == record::KIND_MESSAGE
                    && h.held()
                    && h.deliver_ms == t.deliver
                    && record::topic_of(&rec).is_some_and(|topic| !topic.is_empty());
                ok.then_some((rec, h))
            });
        if usable.is_none() {
            warn!(
                position = t.pos,
                "timer message is unreadable or does not match its index entry; dropping the timer"
            );
            let marker = self.end_pos();
            self.timer_dones.push((t, marker));
        }
        usable
    }

    /// Appends at `rpos` (already reserved) the moved copy of the timer message `rec` that sits
    /// at `src`: still held (`qoff` = None) or visible at `qoff`. Queues its key-index entries
    /// (its keys and the relocation entry of its origin). Returns the copy's length.
    fn write_moved(
        &mut self,
        rec: &[u8],
        src: u64,
        rpos: u64,
        now: u64,
        qoff: Option<u64>,
    ) -> io::Result<u32> {
        let h = Header::parse(rec);
        let at = self.wbuf.len();
        let len = record::encode_moved(&mut self.wbuf, rec, src, now)
            .ok_or_else(|| io::Error::other("a timer message record is malformed"))?;
        let copy = &mut self.wbuf[at..at + len];
        record::finish(
            copy,
            rpos,
            h.stored_ms,
            qoff.unwrap_or(record::NO_OFFSET),
            qoff.is_none(),
        );
        let topic = record::topic_of(copy).unwrap_or("");
        for k in record::keys_of(copy) {
            self.key_ops.push((record::key_hash(topic, k), rpos));
        }
        let origin = record::moved_of(copy).map_or(src, |m| m.origin);
        self.key_ops.push((record::moved_hash(origin), rpos));
        self.moved_copies += 1;
        Ok(len as u32)
    }

    fn place_reveals(&mut self, due_ms: u64, max: usize, now: u64) -> io::Result<usize> {
        let due = self.timers.pop_due(due_ms, max)?;
        let mut n = 0;
        for t in due {
            self.popped.push(t);
            let Timer {
                deliver, pos, size, ..
            } = t;
            let Some((rec, h)) = self.timer_record(t) else {
                continue;
            };
            let topic = record::topic_of(&rec).unwrap_or("");
            let q = self.sh.queues.get_or_create(topic, h.queue_id)?;
            let marker_len = record::HEADER + topic.len();
            let copy_len = record::moved_len(&rec);
            // Room for either: which one is written depends on the segment the message is in
            // once the reservation has (maybe) rolled the log.
            let rpos = self.reserve(marker_len.max(copy_len), now)?;
            self.note_stored(self.active.base, now);
            let qoff = self.assign_offset(&q);
            let visible = now.max(q.last_visible_ms.load(Ordering::Relaxed));
            q.last_visible_ms.store(visible, Ordering::Relaxed);
            // A revealed message must stay consumable for a retention period from now. In the
            // active segment it does (the marker stamps it now); an older segment must not be
            // kept alive for it, so the message is copied forward, visible, instead.
            let entry = if pos >= self.active.base {
                record::encode_reveal(
                    &mut self.wbuf,
                    rpos,
                    now,
                    topic,
                    h.queue_id,
                    qoff,
                    h.tag_hash,
                    pos,
                    deliver,
                    size,
                    t.tier,
                );
                CqEntry {
                    pos,
                    src_pos: rpos,
                    size,
                    tag_hash: h.tag_hash,
                    visible_ms: visible,
                }
            } else {
                let len = self.write_moved(&rec, pos, rpos, now, Some(qoff))?;
                CqEntry {
                    pos: rpos,
                    src_pos: rpos,
                    size: len,
                    tag_hash: h.tag_hash,
                    visible_ms: visible,
                }
            };
            self.cq_ops.push((q, qoff, entry));
            self.timer_dones.push((t, rpos));
            n += 1;
        }
        Ok(n)
    }

    /// Writes queued index updates (page cache only; the checkpoint fsyncs them).
    fn apply_indexes(&mut self) -> io::Result<()> {
        let mut ops = std::mem::take(&mut self.cq_ops);
        ops.sort_unstable_by(|a, b| {
            (Arc::as_ptr(&a.0) as usize, a.1).cmp(&(Arc::as_ptr(&b.0) as usize, b.1))
        });
        let mut buf = Vec::new();
        let mut i = 0;
        let mut result = Ok(());
        while i < ops.len() {
            let q = ops[i].0.clone();
            let first = ops[i].1;
            let mut j = i;
            buf.clear();
            while j < ops.len() && Arc::ptr_eq(&ops[j].0, &q) && ops[j].1 == first + (j - i) as u64
            {
                ops[j].2.write(&mut buf);
                j += 1;
            }
            if let Err(e) = q.write_run(first, &buf) {
                result = Err(e);
                break;
            }
            q.publish(first + (j - i) as u64);
            q.notify_waiters();
            i = j;
        }
        ops.clear();
        self.cq_ops = ops;
        result?;
        if !self.key_ops.is_empty() {
            let keys = std::mem::take(&mut self.key_ops);
            let r = self.sh.keys.append(&keys);
            self.key_ops = keys;
            self.key_ops.clear();
            r?;
        }
        for (t, seg) in std::mem::take(&mut self.timer_adds) {
            self.timers.add(t);
            self.seg_info.entry(seg).or_default().pending_timers += 1;
        }
        for (t, marker) in std::mem::take(&mut self.timer_dones) {
            self.timers.mark_done(t, marker);
            if let Some(seg) = self.sh.log.segment_of(t.pos)
                && let Some(info) = self.seg_info.get_mut(&seg.base)
            {
                info.pending_timers = info.pending_timers.saturating_sub(1);
            }
        }
        self.sh
            .stats
            .moved_timers
            .fetch_add(std::mem::take(&mut self.moved_copies), Ordering::Relaxed);
        for (seg, ms) in self.max_ms_updates.drain(..) {
            let info = self.seg_info.entry(seg).or_default();
            info.max_stored_ms = info.max_stored_ms.max(ms);
        }
        self.timers.flush_buffers()?;
        Ok(())
    }

    // ------------------------------------------------------------------ retention

    /// Copies every pending timer message of `doomed` into the active segment as a held moved
    /// record, files its timer there and finishes the old one, in one durable round (fsynced
    /// before anything is deleted). The copy is what finishes the old timer on replay, so a
    /// crash anywhere leaves each timer pending exactly once. Returns how many moved.
    fn move_timers(&mut self, doomed: &[Arc<Segment>], now_ms: u64) -> Result<u64> {
        let ranges: Vec<(u64, u64)> = doomed
            .iter()
            .filter(|s| {
                self.seg_info
                    .get(&s.base)
                    .is_some_and(|i| i.pending_timers > 0)
            })
            .map(|s| (s.base, s.end()))
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let unavailable = |sh: &Shared, e: io::Error| io_unavailable(sh, "move timers forward", &e);
        let due = self
            .timers
            .pending_where(|p| ranges.iter().any(|(b, e)| (*b..*e).contains(&p)))
            .map_err(|e| unavailable(&self.sh, e))?;
        if due.is_empty() {
            return Ok(0);
        }
        // The copies keep their store time; their segment holds them from now on.
        let now = self.sh.clock.now_ms().max(self.last_stored_ms).max(now_ms);
        let pre_active = self.active.clone();
        let pre_written = self.written;
        let mut moved = HashSet::new();
        let mut copies = 0;
        let placed = (|| -> io::Result<()> {
            for t in due {
                moved.insert(t.pos);
                let Some((rec, _)) = self.timer_record(t) else {
                    continue;
                };
                let rpos = self.reserve(record::moved_len(&rec), now)?;
                self.note_stored(self.active.base, now);
                let size = self.write_moved(&rec, t.pos, rpos, now, None)?;
                let copy = Timer {
                    pos: rpos,
                    size,
                    ..t
                };
                self.timer_adds.push((copy, self.active.base));
                self.timer_dones.push((t, rpos));
                copies += 1;
            }
            self.commit()?;
            // Async mode does not fsync rounds: the originals go only once the copies are safe.
            if self.unsynced {
                self.fsync_active()?;
            }
            Ok(())
        })();
        if let Err(e) = placed {
            self.rollback(pre_active, pre_written);
            return Err(unavailable(&self.sh, e));
        }
        self.touched.clear();
        self.queue_undo.clear();
        if let Err(e) = self.apply_indexes() {
            self.index_broken = true;
            self.sh.fail(format!(
                "writing the store indexes in {} failed: {e}",
                self.sh.dir.display()
            ));
            return Err(unavailable(&self.sh, e));
        }
        self.timers.forget_loaded(&moved);
        self.publish_timer_state();
        info!(timers = copies, "retention moved pending timers forward");
        Ok(copies)
    }

    fn retention(&mut self, now_ms: u64) -> Result<RetentionReport> {
        let keep_ms = self.sh.config.retention_hours.saturating_mul(3_600_000);
        let mut report = RetentionReport::default();
        // A quiet topic's data sits in the active segment: once even its newest record is past
        // retention, seal it so it can go like any other (the next append starts a new one;
        // its pending timers move on into that one).
        let active_info = self.seg_info.get(&self.active.base).copied();
        if self.written > 0
            && active_info.is_some_and(|i| i.max_stored_ms.saturating_add(keep_ms) <= now_ms)
        {
            let spare = self.take_spare();
            self.roll(spare)
                .map_err(|e| io_unavailable(&self.sh, "seal an expired log segment", &e))?;
            self.rolled = false;
            self.force_checkpoint = true;
        }
        let doomed: Vec<_> =
            self.sh
                .log
                .segments()
                .into_iter()
                .filter(|seg| {
                    seg.base != self.active.base
                        && self.seg_info.get(&seg.base).is_some_and(|info| {
                            info.max_stored_ms.saturating_add(keep_ms) <= now_ms
                        })
                })
                .collect();
        if !doomed.is_empty() {
            // Timers still pending in them go forward first, durably, so no segment waits
            // for a timer and no timer is lost with its segment.
            report.timers_moved = self.move_timers(&doomed, now_ms)?;
            let log = &self.sh.log;
            // Queue minimums move first, so no reader is ever told an offset is there whose
            // record is already gone.
            let kept = |pos: u64| {
                log.segment_of(pos)
                    .is_some_and(|s| doomed.iter().all(|d| d.base != s.base))
            };
            self.sh.advance_mins(kept).map_err(|e| {
                WharfError::internal(format!("moving a consume queue's min offset: {e}"))
            })?;
            for seg in &doomed {
                let bytes = seg.len.load(Ordering::Acquire);
                log.remove(seg.base).map_err(|e| {
                    WharfError::internal(format!("deleting segment {}: {e}", seg.path.display()))
                })?;
                self.seg_info.remove(&seg.base);
                report.segments_deleted += 1;
                report.bytes_freed += bytes;
                debug!(segment = seg.base, bytes, "retention deleted a segment");
                crate::crashpoint::reached(crate::crashpoint::RETENTION);
            }
            self.sh
                .keys
                .drop_before(log.start())
                .map_err(|e| WharfError::internal(format!("deleting key index files: {e}")))?;
            // The next checkpoint records the smaller segment set.
            self.force_checkpoint = true;
            info!(
                segments = report.segments_deleted,
                bytes = report.bytes_freed,
                "retention pass"
            );
        }
        Ok(report)
    }
}
