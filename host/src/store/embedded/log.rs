//! The segmented message log: files named by the global position of their first byte.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

use super::record::{self, Invalid};

/// One segment file. Readers see `[base, base + len)`; the writer only ever extends `len`.
#[derive(Debug)]
pub struct Segment {
    /// Global position of the first byte.
    pub base: u64,
    /// The file, opened read/write.
    pub file: File,
    /// Bytes readers may read (published after a write is acknowledged).
    pub len: AtomicU64,
    /// Its path.
    pub path: PathBuf,
}

impl Segment {
    /// Global position after the last published byte.
    pub fn end(&self) -> u64 {
        self.base + self.len.load(Ordering::Acquire)
    }
}

/// File name of the segment starting at `base`.
pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// The set of segments, oldest first.
#[derive(Debug)]
pub struct Log {
    /// Directory holding the segments.
    pub dir: PathBuf,
    segs: RwLock<BTreeMap<u64, Arc<Segment>>>,
}

impl Log {
    /// Opens every `*.log` in `dir` (creating `dir`), with lengths as found on disk.
    pub fn open(dir: &Path) -> io::Result<Log> {
        fs::create_dir_all(dir)?;
        let mut segs = BTreeMap::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(PREALLOC_SUFFIX) {
                // A zero-filled spare segment from the last run: cheap to make again.
                fs::remove_file(e.path())?;
                continue;
            }
            let Some(stem) = name.strip_suffix(".log") else {
                continue;
            };
            let Ok(base) = stem.parse::<u64>() else {
                continue;
            };
            let file = OpenOptions::new().read(true).write(true).open(e.path())?;
            let len = file.metadata()?.len();
            segs.insert(
                base,
                Arc::new(Segment {
                    base,
                    file,
                    len: AtomicU64::new(len),
                    path: e.path(),
                }),
            );
        }
        Ok(Log {
            dir: dir.to_path_buf(),
            segs: RwLock::new(segs),
        })
    }

    /// Creates an empty segment at `base` and makes it durable in the directory.
    pub fn create(&self, base: u64) -> io::Result<Arc<Segment>> {
        let path = segment_path(&self.dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        let seg = Arc::new(Segment {
            base,
            file,
            len: AtomicU64::new(0),
            path,
        });
        self.segs.write().insert(base, seg.clone());
        Ok(seg)
    }

    /// Turns a spare zero-filled file (from [`preallocate`]) into the segment starting at `base`.
    pub fn install(&self, base: u64, spare: &Path) -> io::Result<Arc<Segment>> {
        let path = segment_path(&self.dir, base);
        fs::rename(spare, &path)?;
        sync_dir(&self.dir)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let seg = Arc::new(Segment {
            base,
            file,
            len: AtomicU64::new(0),
            path,
        });
        self.segs.write().insert(base, seg.clone());
        Ok(seg)
    }

    /// Removes a segment from the set and deletes its file.
    pub fn remove(&self, base: u64) -> io::Result<()> {
        let seg = self.segs.write().remove(&base);
        if let Some(seg) = seg {
            fs::remove_file(&seg.path)?;
        }
        Ok(())
    }

    /// Every segment, oldest first.
    pub fn segments(&self) -> Vec<Arc<Segment>> {
        self.segs.read().values().cloned().collect()
    }

    /// The newest segment.
    pub fn last(&self) -> Option<Arc<Segment>> {
        self.segs.read().values().next_back().cloned()
    }

    /// Position of the oldest byte kept.
    pub fn start(&self) -> u64 {
        self.segs.read().keys().next().copied().unwrap_or(0)
    }

    /// Position after the newest published byte.
    pub fn end(&self) -> u64 {
        self.last().map_or(0, |s| s.end())
    }

    /// Segment count and total bytes.
    pub fn usage(&self) -> (u64, u64) {
        let segs = self.segs.read();
        let bytes = segs.values().map(|s| s.len.load(Ordering::Relaxed)).sum();
        (segs.len() as u64, bytes)
    }

    /// The segment holding `pos`.
    pub fn segment_of(&self, pos: u64) -> Option<Arc<Segment>> {
        let segs = self.segs.read();
        let (_, seg) = segs.range(..=pos).next_back()?;
        (pos < seg.end()).then(|| seg.clone())
    }

    /// Reads and validates the record at `pos`; `size_hint` (when known) saves a second read.
    /// Returns `None` for anything that is not an intact record written at `pos`.
    pub fn read_record(&self, pos: u64, size_hint: Option<u32>) -> Option<Bytes> {
        let seg = self.segment_of(pos)?;
        let avail = seg.end().saturating_sub(pos);
        let first = match size_hint {
            Some(n) => n as u64,
            None => 4096,
        }
        .min(avail);
        if first < record::HEADER as u64 {
            return None;
        }
        let mut buf = vec![0u8; first as usize];
        seg.file.read_exact_at(&mut buf, pos - seg.base).ok()?;
        let len = record::get_u32(&buf, record::O_LEN) as u64;
        if len > avail || !(record::HEADER as u64..=record::MAX_RECORD as u64).contains(&len) {
            return None;
        }
        if len > first {
            buf.resize(len as usize, 0);
            seg.file
                .read_exact_at(&mut buf[first as usize..], pos - seg.base + first)
                .ok()?;
        } else {
            buf.truncate(len as usize);
        }
        match record::validate(&buf, pos) {
            Ok(_) => Some(Bytes::from(buf)),
            Err(_) => None,
        }
    }
}

/// Allocates `bytes` to `f` (unwritten extents, reading as zeros) and sets its length.
fn reserve(f: &File, bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment size too large"))?;
    // SAFETY: the descriptor is open for writing for the whole call; fallocate reads no memory.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Name suffix of spare segment files.
pub const PREALLOC_SUFFIX: &str = ".prealloc";

/// Makes a spare segment of `bytes` that reads as zeros.
///
/// With `zero_fill` (sync flush) every block is written and fsynced: overwriting written
/// blocks changes no file metadata, so each later fdatasync is one data write instead of data
/// plus an inode (size/extent) update. Without it (async flush, no fdatasync per round) the
/// blocks are only reserved with `fallocate`, which costs no CPU: zero-filling took as much as
/// the appends' own writes. `cancel` stops it early (the partial file is removed).
pub fn preallocate(
    dir: &Path,
    bytes: u64,
    zero_fill: bool,
    cancel: &std::sync::atomic::AtomicBool,
) -> io::Result<PathBuf> {
    use std::io::Write;
    // A unique name: a spare still being written by a store instance that has since closed
    // must never be the file a newer instance installs.
    let nonce: u64 = rand::random();
    let path = dir.join(format!("next-{nonce:016x}{PREALLOC_SUFFIX}"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    if !zero_fill && reserve(&f, bytes).is_ok() {
        f.sync_all()?;
        return Ok(path);
    }
    let zeros = vec![0u8; 1 << 20];
    let mut left = bytes;
    let mut since_sync = 0u64;
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            drop(f);
            fs::remove_file(&path)?;
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "preallocation cancelled",
            ));
        }
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
        since_sync += n as u64;
        // Flush in small steps: one 256 MiB writeback burst would queue ahead of (and stall)
        // the appenders' fdatasyncs for a long moment.
        if since_sync >= 4 << 20 {
            f.sync_data()?;
            since_sync = 0;
        }
    }
    f.sync_all()?;
    Ok(path)
}

/// fsyncs a directory so created, renamed or removed entries survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Outcome of scanning a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanEnd {
    /// Offset within the segment after the last valid record.
    pub valid_len: u64,
    /// True when the scan stopped on bad bytes before the end of the file.
    pub damaged: bool,
}

/// Reads records of `seg` from segment offset `from`, calling `f(global_pos, record)` for each
/// valid one, and stops at the first torn or corrupt record.
pub fn scan(seg: &Segment, from: u64, mut f: impl FnMut(u64, &[u8])) -> io::Result<ScanEnd> {
    const CHUNK: usize = 4 << 20;
    let file_len = seg.file.metadata()?.len();
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut buf_at = from; // segment offset of buf[0]
    let mut at = from; // segment offset of the next record
    loop {
        let off = (at - buf_at) as usize;
        let rest = &buf[off..];
        match record::validate(rest, seg.base + at) {
            Ok(len) => {
                f(seg.base + at, &rest[..len]);
                at += len as u64;
            }
            Err(Invalid::Short) => {
                let have = rest.len();
                let need = if have >= record::HEADER {
                    (record::get_u32(rest, record::O_LEN) as usize).max(CHUNK)
                } else {
                    CHUNK
                };
                let remaining_in_file = file_len.saturating_sub(at);
                if remaining_in_file <= have as u64 {
                    return Ok(ScanEnd {
                        valid_len: at,
                        damaged: remaining_in_file > 0,
                    });
                }
                let want = (need as u64).min(remaining_in_file) as usize;
                let mut next = vec![0u8; want];
                next[..have].copy_from_slice(rest);
                seg.file
                    .read_exact_at(&mut next[have..], at + have as u64)?;
                buf = next;
                buf_at = at;
            }
            Err(Invalid::Corrupt) => {
                return Ok(ScanEnd {
                    valid_len: at,
                    damaged: true,
                });
            }
        }
    }
}
