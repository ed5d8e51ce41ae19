//! Key index: hash slots with chained entries in fixed-capacity files, newest file last.
//!
//! File layout: 16-byte header (magic, version, slot count, entry capacity), `slots` u32 heads
//! (1-based entry number, 0 = empty), then 16-byte entries: key hash u32 | prev u32 (bit 31 set
//! on every written entry, low bits = previous entry of the same slot) | record position u64.
//! The active (newest) file keeps its slot table in memory and rebuilds it from its entries on
//! open; a full file gets its slot table written and fsynced when it is sealed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use parking_lot::RwLock;

use super::record::{get_u32, get_u64};

const MAGIC: u32 = 0x5849_4B57; // "WKIX"
const HDR: u64 = 16;
const ENTRY: u64 = 16;
const VALID: u32 = 1 << 31;

/// One index file.
#[derive(Debug)]
pub struct KeyFile {
    /// Position of the first record indexed here.
    pub first_pos: u64,
    file: File,
    path: PathBuf,
    slots: u32,
    cap: u32,
    count: AtomicU32,
    mem_slots: RwLock<Option<Vec<u32>>>,
    dirty: AtomicBool,
}

impl KeyFile {
    fn entries_at(&self) -> u64 {
        HDR + self.slots as u64 * 4
    }

    fn head(&self, slot: u32) -> io::Result<u32> {
        if let Some(m) = self.mem_slots.read().as_ref() {
            return Ok(m[slot as usize]);
        }
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, HDR + slot as u64 * 4)?;
        Ok(u32::from_le_bytes(b))
    }

    fn entry(&self, n: u32) -> io::Result<(u32, u32, u64)> {
        let mut b = [0u8; ENTRY as usize];
        self.file
            .read_exact_at(&mut b, self.entries_at() + (n as u64 - 1) * ENTRY)?;
        Ok((get_u32(&b, 0), get_u32(&b, 4), get_u64(&b, 8)))
    }
}

/// All key index files.
#[derive(Debug)]
pub struct KeyIndex {
    dir: PathBuf,
    slots: u32,
    cap: u32,
    files: RwLock<Vec<Arc<KeyFile>>>,
}

fn path_of(dir: &Path, first_pos: u64) -> PathBuf {
    dir.join(format!("{first_pos:020}.idx"))
}

impl KeyIndex {
    /// Opens the index, dropping entries for records at/after `keep_below`.
    pub fn open(dir: &Path, slots: u32, cap: u32, keep_below: u64) -> io::Result<KeyIndex> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".idx")) else {
                continue;
            };
            let Ok(first) = stem.parse::<u64>() else {
                continue;
            };
            if first >= keep_below {
                fs::remove_file(e.path())?;
                continue;
            }
            found.push(first);
        }
        found.sort_unstable();
        let mut files = Vec::new();
        let n = found.len();
        for (i, first) in found.into_iter().enumerate() {
            let path = path_of(dir, first);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut h = [0u8; HDR as usize];
            let ok = file.read_exact_at(&mut h, 0).is_ok() && get_u32(&h, 0) == MAGIC;
            if !ok {
                // A header never made it to disk: the file holds nothing we can trust.
                drop(file);
                fs::remove_file(&path)?;
                continue;
            }
            let kf = KeyFile {
                first_pos: first,
                file,
                path,
                slots: get_u32(&h, 8),
                cap: get_u32(&h, 12),
                count: AtomicU32::new(0),
                mem_slots: RwLock::new(None),
                dirty: AtomicBool::new(false),
            };
            if i + 1 == n {
                Self::recover_active(&kf, keep_below)?;
            } else {
                kf.count.store(kf.cap, Ordering::Relaxed);
            }
            files.push(Arc::new(kf));
        }
        Ok(KeyIndex {
            dir: dir.to_path_buf(),
            slots,
            cap,
            files: RwLock::new(files),
        })
    }

    fn recover_active(kf: &KeyFile, keep_below: u64) -> io::Result<()> {
        let len = kf.file.metadata()?.len();
        let mut n = (len.saturating_sub(kf.entries_at()) / ENTRY).min(kf.cap as u64) as u32;
        while n > 0 {
            let (_, prev, pos) = kf.entry(n)?;
            if prev & VALID != 0 && pos < keep_below {
                break;
            }
            n -= 1;
        }
        kf.file.set_len(kf.entries_at() + n as u64 * ENTRY)?;
        let mut slots = vec![0u32; kf.slots as usize];
        let mut buf = vec![0u8; 64 * 1024 * ENTRY as usize];
        let mut done = 0u32;
        while done < n {
            let take = (n - done).min(64 * 1024);
            let bytes = &mut buf[..(take as u64 * ENTRY) as usize];
            kf.file
                .read_exact_at(bytes, kf.entries_at() + done as u64 * ENTRY)?;
            for (i, e) in bytes.as_chunks::<{ ENTRY as usize }>().0.iter().enumerate() {
                let hash = get_u32(e, 0);
                slots[(hash % kf.slots) as usize] = done + i as u32 + 1;
            }
            done += take;
        }
        kf.count.store(n, Ordering::Relaxed);
        *kf.mem_slots.write() = Some(slots);
        Ok(())
    }

    fn create(&self, first_pos: u64) -> io::Result<Arc<KeyFile>> {
        let path = path_of(&self.dir, first_pos);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let mut h = [0u8; HDR as usize];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&self.slots.to_le_bytes());
        h[12..16].copy_from_slice(&self.cap.to_le_bytes());
        file.write_all_at(&h, 0)?;
        file.set_len(HDR + self.slots as u64 * 4)?;
        super::log::sync_dir(&self.dir)?;
        let kf = Arc::new(KeyFile {
            first_pos,
            file,
            path,
            slots: self.slots,
            cap: self.cap,
            count: AtomicU32::new(0),
            mem_slots: RwLock::new(Some(vec![0; self.slots as usize])),
            dirty: AtomicBool::new(true),
        });
        self.files.write().push(kf.clone());
        Ok(kf)
    }

    fn seal(kf: &KeyFile) -> io::Result<()> {
        let slots = kf.mem_slots.read().clone();
        if let Some(slots) = slots {
            let mut b = Vec::with_capacity(slots.len() * 4);
            for s in &slots {
                b.extend_from_slice(&s.to_le_bytes());
            }
            kf.file.write_all_at(&b, HDR)?;
            kf.file.sync_data()?;
            *kf.mem_slots.write() = None;
        }
        Ok(())
    }

    /// Indexes `(hash, position)` pairs (in log order). Writer thread only.
    pub fn append(&self, entries: &[(u32, u64)]) -> io::Result<()> {
        let mut i = 0;
        let mut buf = Vec::with_capacity(entries.len() * ENTRY as usize);
        while i < entries.len() {
            let active = self.files.read().last().cloned();
            let kf = match active {
                Some(kf) if kf.count.load(Ordering::Relaxed) < kf.cap => kf,
                Some(kf) => {
                    Self::seal(&kf)?;
                    self.create(entries[i].1)?
                }
                None => self.create(entries[i].1)?,
            };
            let start = kf.count.load(Ordering::Relaxed);
            let room = (kf.cap - start) as usize;
            let take = room.min(entries.len() - i);
            buf.clear();
            {
                let mut guard = kf.mem_slots.write();
                let Some(slots) = guard.as_mut() else {
                    return Err(io::Error::other("key index file sealed while active"));
                };
                for (j, (hash, pos)) in entries[i..i + take].iter().enumerate() {
                    let n = start + j as u32 + 1;
                    let slot = (hash % kf.slots) as usize;
                    let prev = slots[slot];
                    buf.extend_from_slice(&hash.to_le_bytes());
                    buf.extend_from_slice(&(prev | VALID).to_le_bytes());
                    buf.extend_from_slice(&pos.to_le_bytes());
                    slots[slot] = n;
                }
                // Write before publishing the count so readers never follow an unwritten entry.
                kf.file
                    .write_all_at(&buf, kf.entries_at() + start as u64 * ENTRY)?;
                kf.count.store(start + take as u32, Ordering::Release);
            }
            kf.dirty.store(true, Ordering::Relaxed);
            i += take;
        }
        Ok(())
    }

    /// Positions filed under `hash`, newest first, until `visit` returns false.
    /// Walks at most `max_steps` chain links so a pathological collision chain stays bounded.
    pub fn lookup(
        &self,
        hash: u32,
        max_steps: usize,
        mut visit: impl FnMut(u64) -> bool,
    ) -> io::Result<()> {
        let files: Vec<Arc<KeyFile>> = self.files.read().iter().rev().cloned().collect();
        let mut steps = 0;
        for kf in files {
            // Head first: the writer publishes the count before releasing the slot table, so a
            // count read afterwards always covers the head.
            let mut n = kf.head(hash % kf.slots)?;
            let count = kf.count.load(Ordering::Acquire);
            while n != 0 && n <= count {
                steps += 1;
                if steps > max_steps {
                    return Ok(());
                }
                let (h, prev, pos) = kf.entry(n)?;
                if prev & VALID == 0 {
                    break;
                }
                if h == hash && !visit(pos) {
                    return Ok(());
                }
                let p = prev & !VALID;
                if p >= n {
                    break;
                }
                n = p;
            }
        }
        Ok(())
    }

    /// fsyncs the entries written since the last call.
    pub fn sync(&self) -> io::Result<()> {
        let last = self.files.read().last().cloned();
        if let Some(kf) = last
            && kf.dirty.swap(false, Ordering::AcqRel)
        {
            kf.file.sync_data()?;
        }
        Ok(())
    }

    /// Deletes files whose records all lie before `log_start`.
    pub fn drop_before(&self, log_start: u64) -> io::Result<()> {
        loop {
            let doomed = {
                let files = self.files.read();
                match (files.first(), files.get(1)) {
                    (Some(a), Some(b)) if b.first_pos <= log_start => Some(a.clone()),
                    _ => None,
                }
            };
            let Some(kf) = doomed else { return Ok(()) };
            self.files.write().retain(|f| f.first_pos != kf.first_pos);
            fs::remove_file(&kf.path)?;
        }
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.files
            .read()
            .iter()
            .map(|f| f.entries_at() + f.count.load(Ordering::Relaxed) as u64 * ENTRY)
            .sum()
    }
}
