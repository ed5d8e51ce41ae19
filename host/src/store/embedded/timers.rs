//! Timer index: held timer messages filed on disk by deliver-time bucket; only buckets that are
//! due soon are loaded into an in-memory heap (24 bytes per loaded timer, nothing per timer in
//! buckets further out, one map entry per non-empty bucket).
//!
//! Per bucket `b` (deliver_ms / bucket_ms) there are two append-only files:
//! `{b}.tmr` — 24-byte entries: deliver ms u64 | message position u64 | record size u32 | magic u32;
//! `{b}.done` — 16-byte entries: message position u64 | reveal-marker position u64.
//! Both are in log order, so recovery trims their tails to the index checkpoint and replays the
//! log from there. A bucket's files are deleted once every timer in it is revealed and the reveal
//! markers are durable (at the next checkpoint).

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

/// A timer: (deliver ms, message position, record size).
pub type Timer = (u64, u64, u32);

/// The timer index (owned by the writer thread).
#[derive(Debug)]
pub struct TimerIndex {
    dir: PathBuf,
    bucket_ms: u64,
    prefetch_ms: u64,
    /// Pending timers per non-empty bucket.
    buckets: BTreeMap<u64, u64>,
    /// Buckets below this id are loaded into `heap`.
    loaded_upto: u64,
    heap: BinaryHeap<Reverse<Timer>>,
    tmr_buf: HashMap<u64, Vec<u8>>,
    done_buf: HashMap<u64, Vec<u8>>,
    dirty: HashSet<PathBuf>,
    deferred_deletes: Vec<u64>,
    pending: u64,
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
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
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let stem = name
                .strip_suffix(".tmr")
                .or_else(|| name.strip_suffix(".done"));
            if let Some(id) = stem.and_then(|s| s.parse::<u64>().ok()) {
                ids.insert(id);
            }
        }
        let mut t = TimerIndex {
            dir: dir.to_path_buf(),
            bucket_ms: bucket_ms.max(1),
            prefetch_ms,
            buckets: BTreeMap::new(),
            loaded_upto: 0,
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
                t.buckets.insert(id, n);
                t.pending += n;
            }
        }
        Ok(t)
    }

    fn tmr_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:012}.tmr"))
    }

    fn done_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:012}.done"))
    }

    fn delete_bucket_files(&self, id: u64) -> io::Result<()> {
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
        let id = t.0 / self.bucket_ms;
        let b = self.tmr_buf.entry(id).or_default();
        b.extend_from_slice(&t.0.to_le_bytes());
        b.extend_from_slice(&t.1.to_le_bytes());
        b.extend_from_slice(&t.2.to_le_bytes());
        b.extend_from_slice(&TMR_MAGIC.to_le_bytes());
        *self.buckets.entry(id).or_default() += 1;
        self.pending += 1;
        if id < self.loaded_upto {
            self.heap.push(Reverse(t));
        }
    }

    /// Records that the timer for the message at `pos` (due `deliver_ms`) is finished: revealed
    /// by the marker at `marker_pos`, or dropped because its message is unreadable (then
    /// `marker_pos` is the log end at that moment, keeping done entries in log order).
    pub fn mark_done(&mut self, deliver_ms: u64, pos: u64, marker_pos: u64) {
        let id = deliver_ms / self.bucket_ms;
        let Some(n) = self.buckets.get_mut(&id) else {
            return;
        };
        *n -= 1;
        self.pending = self.pending.saturating_sub(1);
        if *n == 0 {
            self.buckets.remove(&id);
            self.deferred_deletes.push(id);
        }
        let b = self.done_buf.entry(id).or_default();
        b.extend_from_slice(&pos.to_le_bytes());
        b.extend_from_slice(&marker_pos.to_le_bytes());
    }

    /// Writes buffered entries to their bucket files (no fsync).
    pub fn flush_buffers(&mut self) -> io::Result<()> {
        let tmr: Vec<(u64, Vec<u8>)> = self.tmr_buf.drain().collect();
        for (id, b) in tmr {
            let p = self.tmr_path(id);
            append(&p, &b)?;
            self.dirty.insert(p);
        }
        let done: Vec<(u64, Vec<u8>)> = self.done_buf.drain().collect();
        for (id, b) in done {
            let p = self.done_path(id);
            append(&p, &b)?;
            self.dirty.insert(p);
        }
        Ok(())
    }

    /// Loads buckets into memory: the next one whenever nothing is loaded, and every bucket
    /// starting within the prefetch window of `now_ms`.
    pub fn ensure_loaded(&mut self, now_ms: u64) -> io::Result<()> {
        loop {
            let Some((&id, _)) = self.buckets.range(self.loaded_upto..).next() else {
                return Ok(());
            };
            let soon = id.saturating_mul(self.bucket_ms) <= now_ms.saturating_add(self.prefetch_ms);
            if !(self.heap.is_empty() || soon) {
                return Ok(());
            }
            self.load(id)?;
            self.loaded_upto = id + 1;
        }
    }

    fn load(&mut self, id: u64) -> io::Result<()> {
        self.flush_buffers()?;
        let done_bytes = read_all(&self.done_path(id))?;
        let done: HashSet<u64> = done_bytes
            .as_chunks::<{ DONE as usize }>()
            .0
            .iter()
            .map(|e| get_u64(e, 0))
            .collect();
        let bytes = read_all(&self.tmr_path(id))?;
        for e in bytes.as_chunks::<{ TMR as usize }>().0 {
            if get_u32(e, 20) != TMR_MAGIC {
                continue;
            }
            let pos = get_u64(e, 8);
            if done.contains(&pos) {
                continue;
            }
            self.heap
                .push(Reverse((get_u64(e, 0), pos, get_u32(e, 16))));
        }
        Ok(())
    }

    /// Deliver time of the earliest pending timer (exact once `ensure_loaded` ran).
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(t)| t.0)
    }

    /// Takes up to `max` timers due at or before `now_ms`, earliest first.
    pub fn pop_due(&mut self, now_ms: u64, max: usize) -> io::Result<Vec<Timer>> {
        self.ensure_loaded(now_ms)?;
        let mut out = Vec::new();
        while out.len() < max {
            match self.heap.peek() {
                Some(Reverse(t)) if t.0 <= now_ms => {
                    out.push(*t);
                    self.heap.pop();
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Puts timers back after a failed reveal.
    pub fn unpop(&mut self, timers: &[Timer]) {
        for t in timers {
            self.heap.push(Reverse(*t));
        }
    }

    /// fsyncs bucket files written since the last call, then deletes fully revealed buckets
    /// (their reveal markers are durable by now: the caller synced the log first).
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush_buffers()?;
        for p in self.dirty.drain() {
            match File::open(&p) {
                Ok(f) => f.sync_data()?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
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
