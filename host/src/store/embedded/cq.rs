//! Consume queues: per (topic, queue id), fixed 32-byte entries addressed by queue offset.
//!
//! Entry layout (little-endian): message position u64 | source position u64 (the record that
//! made it visible: the message itself, or its reveal marker) | record size u32 | tag hash u32 |
//! visible time u64 (store time, or reveal time for timers; never decreasing within a queue).
//! Entries are split over files of `entries_per_file` entries named by their first offset, so
//! retention can delete whole files. A zero size marks a hole (never written).
//!
//! Besides the consumable queues, each topic that ever held a timer message has a `held` queue
//! of the same entry layout: one entry per timer message, at append time, with its store time
//! as the visible time. It is the time index that lets a time-range query list timer messages
//! stored in the range whether they are revealed yet or not; nobody consumes from it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

/// Bytes per entry.
pub const ENTRY: usize = 32;

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CqEntry {
    /// Position of the message record.
    pub pos: u64,
    /// Position of the record that created this entry.
    pub src_pos: u64,
    /// Message record size.
    pub size: u32,
    /// Tag hash.
    pub tag_hash: u32,
    /// Time it became visible.
    pub visible_ms: u64,
}

impl CqEntry {
    /// Serialises into `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.src_pos.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.tag_hash.to_le_bytes());
        out.extend_from_slice(&self.visible_ms.to_le_bytes());
    }

    /// Parses one entry.
    pub fn read(b: &[u8]) -> CqEntry {
        use super::record::{get_u32, get_u64};
        CqEntry {
            pos: get_u64(b, 0),
            src_pos: get_u64(b, 8),
            size: get_u32(b, 16),
            tag_hash: get_u32(b, 20),
            visible_ms: get_u64(b, 24),
        }
    }

    /// False for a never-written slot.
    pub fn is_set(&self) -> bool {
        self.size != 0
    }
}

/// One consume queue.
#[derive(Debug)]
pub struct ConsumeQueue {
    dir: PathBuf,
    per_file: u64,
    files: RwLock<BTreeMap<u64, Arc<File>>>,
    /// Oldest offset kept.
    pub min: AtomicU64,
    /// Offset after the newest visible entry.
    pub max: AtomicU64,
    /// Next offset to assign (writer thread only; may run ahead of `max` within a batch).
    pub next_assign: AtomicU64,
    /// Visible time of the newest entry, to keep visible times non-decreasing.
    pub last_visible_ms: AtomicU64,
    /// Lowest offset written since the last checkpoint (`u64::MAX`: nothing).
    dirty_from: AtomicU64,
    /// Carries `max` to the queue's waiters; updated once per publish, never per entry.
    notify: watch::Sender<u64>,
}

fn file_name(first: u64) -> String {
    format!("{first:020}.cq")
}

impl ConsumeQueue {
    /// Opens (or creates) the queue in `dir`, dropping entries created by records at or after
    /// `keep_below` (they will be replayed from the log) and holes at the tail.
    pub fn open(dir: &Path, per_file: u64, keep_below: u64) -> io::Result<ConsumeQueue> {
        fs::create_dir_all(dir)?;
        let mut files = BTreeMap::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".cq")) else {
                continue;
            };
            let Ok(first) = stem.parse::<u64>() else {
                continue;
            };
            let f = OpenOptions::new().read(true).write(true).open(e.path())?;
            files.insert(first, Arc::new(f));
        }
        let q = ConsumeQueue {
            dir: dir.to_path_buf(),
            per_file,
            files: RwLock::new(files),
            min: AtomicU64::new(0),
            max: AtomicU64::new(0),
            next_assign: AtomicU64::new(0),
            last_visible_ms: AtomicU64::new(0),
            dirty_from: AtomicU64::new(u64::MAX),
            notify: watch::channel(0).0,
        };
        q.trim_tail(keep_below)?;
        q.notify_waiters();
        Ok(q)
    }

    /// Tells waiters the current `max` if it moved (no wake-up when nothing became visible).
    pub fn notify_waiters(&self) {
        self.notify.send_if_modified(|v| {
            let max = self.max.load(Ordering::Acquire);
            let moved = *v < max;
            if moved {
                *v = max;
            }
            moved
        });
    }

    /// Removes tail entries that are holes or were created at/after `keep_below`, and sets
    /// `max`, `next_assign` and `last_visible_ms` from what remains.
    fn trim_tail(&self, keep_below: u64) -> io::Result<()> {
        loop {
            let last = self
                .files
                .read()
                .iter()
                .next_back()
                .map(|(k, f)| (*k, f.clone()));
            let Some((first, f)) = last else {
                return Ok(());
            };
            let len = f.metadata()?.len();
            let mut n = (len / ENTRY as u64).min(self.per_file);
            let mut buf = [0u8; ENTRY];
            while n > 0 {
                f.read_exact_at(&mut buf, (n - 1) * ENTRY as u64)?;
                let e = CqEntry::read(&buf);
                if e.is_set() && e.src_pos < keep_below {
                    break;
                }
                n -= 1;
            }
            if n == 0 {
                drop(f);
                self.files.write().remove(&first);
                fs::remove_file(self.dir.join(file_name(first)))?;
                continue;
            }
            f.set_len(n * ENTRY as u64)?;
            f.read_exact_at(&mut buf, (n - 1) * ENTRY as u64)?;
            let max = first + n;
            self.max.store(max, Ordering::Release);
            self.next_assign.store(max, Ordering::Relaxed);
            self.last_visible_ms
                .store(CqEntry::read(&buf).visible_ms, Ordering::Relaxed);
            return Ok(());
        }
    }

    /// Moves `min` to the first entry whose message is still in the log (per `exists`), starting
    /// from the current `min`, and deletes files wholly below it. Returns the new min.
    pub fn advance_min(&self, exists: impl Fn(u64) -> bool) -> io::Result<u64> {
        let max = self.max.load(Ordering::Acquire);
        let mut at = self.min.load(Ordering::Acquire);
        'outer: while at < max {
            let n = (max - at).min(1024) as usize;
            let entries = self.read(at, n)?;
            for e in &entries {
                if e.is_set() && exists(e.pos) {
                    break 'outer;
                }
                at += 1;
            }
            if entries.is_empty() {
                break;
            }
        }
        self.min.store(at, Ordering::Release);
        let doomed: Vec<u64> = self
            .files
            .read()
            .keys()
            .copied()
            .filter(|first| first + self.per_file <= at)
            .collect();
        for first in doomed {
            self.files.write().remove(&first);
            fs::remove_file(self.dir.join(file_name(first)))?;
        }
        Ok(at)
    }

    fn file_for_write(&self, first: u64) -> io::Result<Arc<File>> {
        if let Some(f) = self.files.read().get(&first) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.dir.join(file_name(first)))?,
        );
        // The checkpoint fsyncs file contents; the new name must be durable too.
        super::log::sync_dir(&self.dir)?;
        self.files.write().insert(first, f.clone());
        Ok(f)
    }

    /// Writes serialised entries starting at `offset` (not yet published: see `publish`).
    pub fn write_run(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut off = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let first = off - off % self.per_file;
            let room = (first + self.per_file - off) as usize * ENTRY;
            let take = room.min(rest.len());
            let f = self.file_for_write(first)?;
            f.write_all_at(&rest[..take], (off - first) * ENTRY as u64)?;
            off += (take / ENTRY) as u64;
            rest = &rest[take..];
        }
        self.dirty_from.fetch_min(offset, Ordering::AcqRel);
        Ok(())
    }

    /// Makes entries below `max` visible to readers.
    pub fn publish(&self, max: u64) {
        self.max.fetch_max(max, Ordering::AcqRel);
    }

    /// Reads up to `n` entries from `from` (fewer at the end or at a missing file).
    pub fn read(&self, from: u64, n: usize) -> io::Result<Vec<CqEntry>> {
        let max = self.max.load(Ordering::Acquire);
        let end = max.min(from.saturating_add(n as u64));
        let mut out = Vec::with_capacity(end.saturating_sub(from) as usize);
        let mut off = from;
        let mut buf = Vec::new();
        while off < end {
            let first = off - off % self.per_file;
            let upto = end.min(first + self.per_file);
            let f = self.files.read().get(&first).cloned();
            let count = (upto - off) as usize;
            match f {
                Some(f) => {
                    buf.resize(count * ENTRY, 0);
                    let got = read_full_at(&f, &mut buf, (off - first) * ENTRY as u64)?;
                    for c in buf[..got - got % ENTRY].as_chunks::<ENTRY>().0 {
                        out.push(CqEntry::read(c));
                    }
                    if got < buf.len() {
                        break;
                    }
                }
                None => out.extend(std::iter::repeat_n(CqEntry::default(), count)),
            }
            off = upto;
        }
        Ok(out)
    }

    /// One entry.
    pub fn entry(&self, offset: u64) -> io::Result<Option<CqEntry>> {
        Ok(self.read(offset, 1)?.into_iter().next())
    }

    /// First offset in `[min, max)` whose visible time is ≥ `ms` (binary search), else `max`.
    pub fn search_time(&self, ms: u64) -> io::Result<u64> {
        let mut lo = self.min.load(Ordering::Acquire);
        let mut hi = self.max.load(Ordering::Acquire);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let t = self
                .entry(mid)?
                .map_or(u64::MAX, |e| if e.is_set() { e.visible_ms } else { 0 });
            if t < ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// fsyncs every file written since the last call.
    pub fn sync(&self) -> io::Result<()> {
        let from = self.dirty_from.swap(u64::MAX, Ordering::AcqRel);
        if from == u64::MAX {
            return Ok(());
        }
        let first = from - from % self.per_file;
        let files: Vec<Arc<File>> = self
            .files
            .read()
            .range(first..)
            .map(|(_, f)| f.clone())
            .collect();
        for f in files {
            if let Err(e) = f.sync_data() {
                self.dirty_from.fetch_min(from, Ordering::AcqRel);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Bytes on disk (approximate: entries written).
    pub fn disk_bytes(&self) -> u64 {
        (self.max.load(Ordering::Relaxed) - self.min.load(Ordering::Relaxed)) * ENTRY as u64
    }
}

fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read_at(&mut buf[got..], off)?;
        if n == 0 {
            break;
        }
        got += n;
        off += n as u64;
    }
    Ok(got)
}

/// Directory name for a topic: the name itself when it is file-system safe, else hex.
pub fn topic_dir_name(topic: &str) -> String {
    let safe = !topic.is_empty()
        && !topic.starts_with('.')
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '%');
    if safe {
        topic.to_string()
    } else {
        format!("~{}", hex::encode(topic))
    }
}

/// Inverse of [`topic_dir_name`].
pub fn topic_from_dir_name(name: &str) -> Option<String> {
    match name.strip_prefix('~') {
        Some(h) => String::from_utf8(hex::decode(h).ok()?).ok(),
        None => Some(name.to_string()),
    }
}

/// The queues of one topic by id.
type TopicQueues = RwLock<BTreeMap<u32, Arc<ConsumeQueue>>>;

/// Directory name of a topic's held-timer queue (never a number, so never a queue id).
const HELD_DIR: &str = "held";

/// All consume queues, by topic then queue id.
#[derive(Debug, Default)]
pub struct Queues {
    /// Root directory.
    pub dir: PathBuf,
    /// Entries per file.
    pub per_file: u64,
    topics: RwLock<HashMap<String, Arc<TopicQueues>>>,
    /// Held-timer queue per topic (see the module doc).
    held: RwLock<HashMap<String, Arc<ConsumeQueue>>>,
    /// Waiters' channels of queues that do not exist yet; a queue takes its channel when
    /// created. Lock order: `early`, then `topics`, then a topic's map.
    early: Mutex<HashMap<(String, u32), watch::Sender<u64>>>,
}

impl Queues {
    /// Opens every queue under `dir`, trimming entries created at/after `keep_below`.
    pub fn open(dir: &Path, per_file: u64, keep_below: u64) -> io::Result<Queues> {
        fs::create_dir_all(dir)?;
        let qs = Queues {
            dir: dir.to_path_buf(),
            per_file,
            topics: RwLock::new(HashMap::new()),
            held: RwLock::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
        };
        for t in fs::read_dir(dir)? {
            let t = t?;
            let name = t.file_name();
            let Some(topic) = name.to_str().and_then(topic_from_dir_name) else {
                continue;
            };
            if !t.file_type()?.is_dir() {
                continue;
            }
            let mut map = BTreeMap::new();
            for q in fs::read_dir(t.path())? {
                let q = q?;
                if q.file_name() == HELD_DIR {
                    let held = ConsumeQueue::open(&q.path(), per_file, keep_below)?;
                    qs.held.write().insert(topic.clone(), Arc::new(held));
                    continue;
                }
                let Some(id) = q.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                map.insert(
                    id,
                    Arc::new(ConsumeQueue::open(&q.path(), per_file, keep_below)?),
                );
            }
            qs.topics.write().insert(topic, Arc::new(RwLock::new(map)));
        }
        Ok(qs)
    }

    /// The queue if it exists.
    pub fn get(&self, topic: &str, queue_id: u32) -> Option<Arc<ConsumeQueue>> {
        self.topics
            .read()
            .get(topic)?
            .read()
            .get(&queue_id)
            .cloned()
    }

    /// The queue, created on first use.
    pub fn get_or_create(&self, topic: &str, queue_id: u32) -> io::Result<Arc<ConsumeQueue>> {
        if let Some(q) = self.get(topic, queue_id) {
            return Ok(q);
        }
        let mut early = self.early.lock();
        let t = {
            let mut topics = self.topics.write();
            topics
                .entry(topic.to_string())
                .or_insert_with(|| Arc::new(RwLock::new(BTreeMap::new())))
                .clone()
        };
        let mut t = t.write();
        if let Some(q) = t.get(&queue_id) {
            return Ok(q.clone());
        }
        let dir = self
            .dir
            .join(topic_dir_name(topic))
            .join(queue_id.to_string());
        let mut q = ConsumeQueue::open(&dir, self.per_file, u64::MAX)?;
        if let Some(tx) = early.remove(&(topic.to_string(), queue_id)) {
            q.notify = tx;
            q.notify_waiters();
        }
        let q = Arc::new(q);
        if let Some(topic_dir) = dir.parent() {
            super::log::sync_dir(topic_dir)?;
        }
        super::log::sync_dir(&self.dir)?;
        t.insert(queue_id, q.clone());
        Ok(q)
    }

    /// A receiver of the queue's visible max offset, woken only when that queue's max moves.
    /// Works for a queue not written yet (it gets the channel when created).
    pub fn watch(&self, topic: &str, queue_id: u32) -> watch::Receiver<u64> {
        if let Some(q) = self.get(topic, queue_id) {
            return q.notify.subscribe();
        }
        let mut early = self.early.lock();
        if let Some(q) = self.get(topic, queue_id) {
            return q.notify.subscribe();
        }
        // Channels nobody listens to any more are dropped now and then, so polls of queues
        // that are never written cannot grow this map without bound.
        if early.len() >= 1024 && early.len().is_power_of_two() {
            early.retain(|_, tx| tx.receiver_count() > 0);
        }
        early
            .entry((topic.to_string(), queue_id))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// The held-timer queue of `topic`, if it ever held a timer.
    pub fn held(&self, topic: &str) -> Option<Arc<ConsumeQueue>> {
        self.held.read().get(topic).cloned()
    }

    /// The held-timer queue of `topic`, created on first use.
    pub fn held_or_create(&self, topic: &str) -> io::Result<Arc<ConsumeQueue>> {
        if let Some(q) = self.held(topic) {
            return Ok(q);
        }
        let mut held = self.held.write();
        if let Some(q) = held.get(topic) {
            return Ok(q.clone());
        }
        let topic_dir = self.dir.join(topic_dir_name(topic));
        let q = Arc::new(ConsumeQueue::open(
            &topic_dir.join(HELD_DIR),
            self.per_file,
            u64::MAX,
        )?);
        super::log::sync_dir(&topic_dir)?;
        super::log::sync_dir(&self.dir)?;
        held.insert(topic.to_string(), q.clone());
        Ok(q)
    }

    /// Every queue of `topic`, by id.
    pub fn of_topic(&self, topic: &str) -> Vec<(u32, Arc<ConsumeQueue>)> {
        match self.topics.read().get(topic) {
            Some(t) => t.read().iter().map(|(k, v)| (*k, v.clone())).collect(),
            None => Vec::new(),
        }
    }

    /// Every queue, held-timer queues included.
    pub fn all(&self) -> Vec<Arc<ConsumeQueue>> {
        let mut all = self.consumable();
        all.extend(self.held_all());
        all
    }

    /// Every consumable queue (no held-timer queues).
    pub fn consumable(&self) -> Vec<Arc<ConsumeQueue>> {
        let topics: Vec<_> = self.topics.read().values().cloned().collect();
        topics
            .iter()
            .flat_map(|t| t.read().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Every held-timer queue.
    pub fn held_all(&self) -> Vec<Arc<ConsumeQueue>> {
        self.held.read().values().cloned().collect()
    }
}
