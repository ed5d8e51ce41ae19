//! Timer index: held timer messages filed on disk by deliver-time bucket; only buckets that are
//! due soon are loaded into an in-memory heap (24 bytes per loaded timer; nothing per timer in
//! buckets further out, one map entry per non-empty bucket).
//!
//! Bucket width depends on how far ahead a timer was when stored (its tier): one bucket per
//! `bucket_ms` for near timers, one per hour within three days, one per day beyond. Far timers
//! thus share few files, so a checkpoint fsyncs a bounded number of files even when inserts are
//! spread over weeks. The tier is a function of the record (deliver time minus store time), so
//! replaying the log files every timer exactly where it was filed before.
//!
//! Per bucket there are two append-only files, `{start}.{tier}.tmr` with 24-byte entries
//! (deliver ms u64 | message position u64 | record size u32 | magic u32) and `{start}.{tier}.done`
//! with 16-byte entries (message position u64 | marker position u64). Both are in log order, so
//! recovery trims their tails to the index checkpoint and replays the log from there. A bucket's
//! files are deleted once every timer in it is finished and the markers are durable.
//!
//! When retention copies a pending timer message forward (a moved record, see `record`), the
//! copy is filed as a new timer (same deliver time and tier, so the same bucket) and its done
//! entry finishes the old one with the copy's position as the marker: the copy itself is the
//! marker, so replaying the log from the checkpoint does both again, never one without the other.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{get_u32, get_u64};

const TMR: u64 = 24;
const DONE: u64 = 16;
const TMR_MAGIC: u32 = 0x524D_4954; // "TIMR"
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

/// A pending timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    /// Deliver time (ms).
    pub deliver: u64,
    /// Position of the message record.
    pub pos: u64,
    /// Size of the message record.
    pub size: u32,
    /// Bucket tier it is filed under.
    pub tier: u8,
}

/// Tier of a timer due at `deliver_ms`, stored at `stored_ms`.
pub fn tier_for(deliver_ms: u64, stored_ms: u64) -> u8 {
    let ahead = deliver_ms.saturating_sub(stored_ms);
    if ahead < 2 * HOUR {
        0
    } else if ahead < 3 * DAY {
        1
    } else {
        2
    }
}

/// Bucket key: (start ms, tier).
pub type BucketId = (u64, u8);

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    pending: u64,
    loaded: bool,
}

/// The timer index (owned by the writer thread).
#[derive(Debug)]
pub struct TimerIndex {
    dir: PathBuf,
    bucket_ms: u64,
    prefetch_ms: u64,
    buckets: BTreeMap<BucketId, Bucket>,
    heap: BinaryHeap<Reverse<Timer>>,
    tmr_buf: HashMap<BucketId, Vec<u8>>,
    done_buf: HashMap<BucketId, Vec<u8>>,
    dirty: HashSet<BucketId>,
    deferred_deletes: Vec<BucketId>,
    pending: u64,
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn parse_name(name: &str) -> Option<BucketId> {
    let stem = name
        .strip_suffix(".tmr")
        .or_else(|| name.strip_suffix(".done"))?;
    let (start, tier) = stem.split_once('.')?;
    Some((start.parse().ok()?, tier.parse().ok()?))
}

impl TimerIndex {
    /// Opens the index, dropping entries made by records at/after `keep_below`.
    pub fn open(
        dir: &Path,
        bucket_ms: u64,
        prefetch_ms: u64,
        keep_below: u64,
    ) -> io::Result<TimerIndex> {
        fs::create_dir_all(dir)?;
        let mut ids = HashSet::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(parse_name) {
                ids.insert(id);
            }
        }
        let mut t = TimerIndex {
            dir: dir.to_path_buf(),
            bucket_ms: bucket_ms.max(1),
            prefetch_ms,
            buckets: BTreeMap::new(),
            heap: BinaryHeap::new(),
            tmr_buf: HashMap::new(),
            done_buf: HashMap::new(),
            dirty: HashSet::new(),
            deferred_deletes: Vec::new(),
            pending: 0,
        };
        for id in ids {
            let timers = trim(&t.tmr_path(id), TMR, |e| {
                get_u32(e, 20) == TMR_MAGIC && get_u64(e, 8) < keep_below
            })?;
            let done = trim(&t.done_path(id), DONE, |e| get_u64(e, 8) < keep_below)?;
            let n = timers.saturating_sub(done);
            if n == 0 {
                t.delete_bucket_files(id)?;
            } else {
                t.buckets.insert(
                    id,
                    Bucket {
                        pending: n,
                        loaded: false,
                    },
                );
                t.pending += n;
            }
        }
        Ok(t)
    }

    fn width(&self, tier: u8) -> u64 {
        match tier {
            0 => self.bucket_ms,
            1 => HOUR,
            _ => DAY,
        }
    }

    fn bucket_of(&self, t: &Timer) -> BucketId {
        let w = self.width(t.tier);
        (t.deliver - t.deliver % w, t.tier)
    }

    fn tmr_path(&self, id: BucketId) -> PathBuf {
        self.dir.join(format!("{:015}.{}.tmr", id.0, id.1))
    }

    fn done_path(&self, id: BucketId) -> PathBuf {
        self.dir.join(format!("{:015}.{}.done", id.0, id.1))
    }

    fn delete_bucket_files(&self, id: BucketId) -> io::Result<()> {
        for p in [self.tmr_path(id), self.done_path(id)] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Timers held in memory (the loaded window).
    pub fn loaded(&self) -> u64 {
        self.heap.len() as u64
    }

    /// Timers not yet revealed.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Files a held timer.
    pub fn add(&mut self, t: Timer) {
        let id = self.bucket_of(&t);
        let b = self.tmr_buf.entry(id).or_default();
        b.extend_from_slice(&t.deliver.to_le_bytes());
        b.extend_from_slice(&t.pos.to_le_bytes());
        b.extend_from_slice(&t.size.to_le_bytes());
        b.extend_from_slice(&TMR_MAGIC.to_le_bytes());
        let bucket = self.buckets.entry(id).or_default();
        bucket.pending += 1;
        self.pending += 1;
        if bucket.loaded {
            self.heap.push(Reverse(t));
        }
    }

    /// Records that a timer is finished: revealed by the marker at `marker_pos`, or dropped
    /// because its message is unreadable (then `marker_pos` is the log end at that moment,
    /// keeping done entries in log order).
    pub fn mark_done(&mut self, t: Timer, marker_pos: u64) {
        let id = self.bucket_of(&t);
        let Some(b) = self.buckets.get_mut(&id) else {
            return;
        };
        b.pending -= 1;
        self.pending = self.pending.saturating_sub(1);
        if b.pending == 0 {
            self.buckets.remove(&id);
            self.deferred_deletes.push(id);
        }
        let buf = self.done_buf.entry(id).or_default();
        buf.extend_from_slice(&t.pos.to_le_bytes());
        buf.extend_from_slice(&marker_pos.to_le_bytes());
    }

    /// Writes buffered entries to their bucket files (no fsync).
    pub fn flush_buffers(&mut self) -> io::Result<()> {
        let tmr: Vec<(BucketId, Vec<u8>)> = self.tmr_buf.drain().collect();
        for (id, b) in tmr {
            append(&self.tmr_path(id), &b)?;
            self.dirty.insert(id);
        }
        let done: Vec<(BucketId, Vec<u8>)> = self.done_buf.drain().collect();
        for (id, b) in done {
            append(&self.done_path(id), &b)?;
            self.dirty.insert(id);
        }
        Ok(())
    }

    /// Loads buckets into memory: the earliest one whenever nothing is loaded, any bucket that
    /// starts within the prefetch window of `now_ms`, and any bucket that could hold a timer due
    /// before the earliest loaded one (so `next_due` is exact).
    pub fn ensure_loaded(&mut self, now_ms: u64) -> io::Result<()> {
        loop {
            let next = self
                .buckets
                .iter()
                .find(|(_, b)| !b.loaded)
                .map(|(id, _)| *id);
            let Some(id) = next else { return Ok(()) };
            let top = self.heap.peek().map(|Reverse(t)| t.deliver);
            let soon = id.0 <= now_ms.saturating_add(self.prefetch_ms);
            let before_top = top.is_some_and(|d| id.0 <= d);
            if !(top.is_none() || soon || before_top) {
                return Ok(());
            }
            self.load(id)?;
        }
    }

    fn load(&mut self, id: BucketId) -> io::Result<()> {
        self.flush_buffers()?;
        let pending = self.read_pending(id)?;
        self.heap.extend(pending.into_iter().map(Reverse));
        if let Some(b) = self.buckets.get_mut(&id) {
            b.loaded = true;
        }
        Ok(())
    }

    /// The timers of bucket `id` on disk that are not finished (buffers flushed by the caller).
    fn read_pending(&self, id: BucketId) -> io::Result<Vec<Timer>> {
        let done_bytes = read_all(&self.done_path(id))?;
        let done: HashSet<u64> = done_bytes
            .as_chunks::<{ DONE as usize }>()
            .0
            .iter()
            .map(|e| get_u64(e, 0))
            .collect();
        let bytes = read_all(&self.tmr_path(id))?;
        Ok(bytes
            .as_chunks::<{ TMR as usize }>()
            .0
            .iter()
            .filter(|e| {
                get_u32(e.as_slice(), 20) == TMR_MAGIC && !done.contains(&get_u64(e.as_slice(), 8))
            })
            .map(|e| Timer {
                deliver: get_u64(e, 0),
                pos: get_u64(e, 8),
                size: get_u32(e, 16),
                tier: id.1,
            })
            .collect())
    }

    /// Deliver time of the earliest pending timer (exact once `ensure_loaded` ran).
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(t)| t.deliver)
    }

    /// Takes up to `max` timers due at or before `now_ms`, earliest first.
    pub fn pop_due(&mut self, now_ms: u64, max: usize) -> io::Result<Vec<Timer>> {
        self.ensure_loaded(now_ms)?;
        let mut out = Vec::new();
        while out.len() < max {
            match self.heap.peek() {
                Some(Reverse(t)) if t.deliver <= now_ms => {
                    out.push(*t);
                    self.heap.pop();
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Every pending timer whose message position satisfies `wanted`, in log order. Reads the
    /// files of every non-empty bucket (24 bytes per timer, 16 per finished one): retention
    /// calls it only for segments that still hold pending timers.
    pub fn pending_where(&mut self, wanted: impl Fn(u64) -> bool) -> io::Result<Vec<Timer>> {
        self.flush_buffers()?;
        let mut out = Vec::new();
        let ids: Vec<BucketId> = self.buckets.keys().copied().collect();
        for id in ids {
            out.extend(self.read_pending(id)?.into_iter().filter(|t| wanted(t.pos)));
        }
        out.sort_unstable_by_key(|t| t.pos);
        Ok(out)
    }

    /// Drops the in-memory copies of timers that were finished without being popped (moved
    /// forward by retention), so they are never popped again.
    pub fn forget_loaded(&mut self, positions: &HashSet<u64>) {
        if !positions.is_empty() {
            self.heap.retain(|Reverse(t)| !positions.contains(&t.pos));
        }
    }

    /// Puts timers back after a failed reveal.
    pub fn unpop(&mut self, timers: &[Timer]) {
        for t in timers {
            self.heap.push(Reverse(*t));
        }
    }

    /// Hands over the work of a checkpoint: files to fsync, and finished buckets to delete once
    /// the checkpoint is durable (via [`TimerIndex::finish_deletes`]).
    pub fn take_sync_work(&mut self) -> io::Result<(Vec<PathBuf>, Vec<BucketId>)> {
        self.flush_buffers()?;
        let mut files = Vec::new();
        for id in self.dirty.drain() {
            files.push(self.dir.join(format!("{:015}.{}.tmr", id.0, id.1)));
            files.push(self.dir.join(format!("{:015}.{}.done", id.0, id.1)));
        }
        Ok((files, std::mem::take(&mut self.deferred_deletes)))
    }

    /// Deletes the files of finished buckets that are still empty.
    pub fn finish_deletes(&mut self, ids: Vec<BucketId>) -> io::Result<()> {
        for id in ids {
            if !self.buckets.contains_key(&id) {
                self.delete_bucket_files(id)?;
            }
        }
        Ok(())
    }

    /// fsyncs bucket files written since the last call, then deletes finished buckets (their
    /// markers are durable by now: the caller synced the log first).
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush_buffers()?;
        let dirty: Vec<BucketId> = self.dirty.drain().collect();
        for id in &dirty {
            for p in [self.tmr_path(*id), self.done_path(*id)] {
                match File::open(&p) {
                    Ok(f) => f.sync_data()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if !dirty.is_empty() {
            // Bucket files may be new: make their names durable with their contents.
            super::log::sync_dir(&self.dir)?;
        }
        for id in std::mem::take(&mut self.deferred_deletes) {
            if !self.buckets.contains_key(&id) {
                self.delete_bucket_files(id)?;
            }
        }
        Ok(())
    }
}

fn append(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(bytes)
}

/// Truncates `path` to whole entries and drops tail entries failing `keep`; returns the count.
fn trim(path: &Path, entry: u64, keep: impl Fn(&[u8]) -> bool) -> io::Result<u64> {
    let f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = f.metadata()?.len() / entry;
    let mut b = vec![0u8; entry as usize];
    while n > 0 {
        f.read_exact_at(&mut b, (n - 1) * entry)?;
        if keep(&b) {
            break;
        }
        n -= 1;
    }
    f.set_len(n * entry)?;
    Ok(n)
}
