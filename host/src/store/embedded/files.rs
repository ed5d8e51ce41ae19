//! Small whole-file state: metadata namespaces, consumer offsets, node id, boot counter, index
//! checkpoint.
//! Each is rewritten atomically (write temp, fsync, rename, fsync directory) and carries a
//! CRC so a damaged file is reported instead of misread.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::log::sync_dir;
use super::record::{get_u32, get_u64};
use crate::store::MetaEntry;

/// Bytes an unprivileged writer may still use on the file system holding `dir` (statvfs).
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("the data dir's path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` is a properly sized out-parameter statvfs(3)
    // fills completely when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Replaces `path` with `bytes` (plus a CRC trailer) so that a crash leaves the old or the new
/// content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.write_all(&crc32c::crc32c(bytes).to_le_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Reads a file written by [`write_atomic`]; `Ok(None)` when absent, an error when damaged.
pub fn read_atomic(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if b.len() < 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is truncated", path.display()),
        ));
    }
    let n = b.len() - 4;
    if crc32c::crc32c(&b[..n]) != get_u32(&b, n) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} fails its checksum", path.display()),
        ));
    }
    b.truncate(n);
    Ok(Some(b))
}

/// One metadata namespace: key → value and version.
pub type Namespace = BTreeMap<String, MetaEntry>;

/// First u32 of a namespace file of format 2 (format 1 starts with the entry count instead).
const NAMESPACE_V2: u32 = u32::MAX;
/// First u32 of format 3: format 2's layout, with a journal of later changes beside the file.
/// A build that reads only formats 1 and 2 refuses it (as a malformed format 1 file) instead
/// of missing the journal.
const NAMESPACE_V3: u32 = u32::MAX - 1;
/// First u32 values from here up are format markers; a format 1 count never gets this high.
const NAMESPACE_MARKERS: u32 = 0xFFFF_0000;

/// File of a namespace (hex name, so any namespace string is a safe file name).
pub fn namespace_path(dir: &Path, ns: &str) -> PathBuf {
    dir.join(format!("{}.meta", hex::encode(ns)))
}

/// Serialises a namespace (format 3): `u32::MAX - 1`, count u32, then
/// (key len u32, key, value len u32, value, version u64)*.
pub fn encode_namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&NAMESPACE_V3.to_le_bytes());
    b.extend_from_slice(&(ns.len() as u32).to_le_bytes());
    for (k, e) in ns {
        b.extend_from_slice(&(k.len() as u32).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&(e.value.len() as u32).to_le_bytes());
        b.extend_from_slice(&e.value);
        b.extend_from_slice(&e.version.to_le_bytes());
    }
    b
}

/// Why a namespace file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    /// Cut short or inconsistent.
    #[error("it is malformed; restore it from a backup")]
    Malformed,
    /// Written by a newer build.
    #[error(
        "it was written by a newer wharf (namespace format marker {0:#x}); run that version or newer on this data dir"
    )]
    Newer(u32),
}

/// Parses [`encode_namespace`] output, format 2 (the same after `u32::MAX`), or format 1
/// (count u32, then (key len u32, key, value len u32, value)*, no versions: each entry reads
/// as version 1).
pub fn decode_namespace(b: &[u8]) -> Result<Namespace, NamespaceError> {
    let first = get_u32(b.get(..4).ok_or(NamespaceError::Malformed)?, 0);
    if first >= NAMESPACE_MARKERS && first != NAMESPACE_V2 && first != NAMESPACE_V3 {
        return Err(NamespaceError::Newer(first));
    }
    decode_entries(b).ok_or(NamespaceError::Malformed)
}

fn decode_entries(b: &[u8]) -> Option<Namespace> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let mut count = get_u32(take(4)?, 0);
    let versioned = count == NAMESPACE_V2 || count == NAMESPACE_V3;
    if versioned {
        count = get_u32(take(4)?, 0);
    }
    let mut ns = Namespace::new();
    for _ in 0..count {
        let kl = get_u32(take(4)?, 0) as usize;
        let k = String::from_utf8(take(kl)?.to_vec()).ok()?;
        let vl = get_u32(take(4)?, 0) as usize;
        let value = take(vl)?.to_vec();
        let version = if versioned { get_u64(take(8)?, 0) } else { 1 };
        ns.insert(k, MetaEntry { value, version });
    }
    Some(ns)
}

/// Journal of a namespace: the changes since its file was last written whole.
pub fn journal_path(dir: &Path, ns: &str) -> PathBuf {
    dir.join(format!("{}.journal", hex::encode(ns)))
}

/// One journal record: `len u32, crc32c u32, payload`, the payload being `1, key len u32, key,
/// value len u32, value, version u64` for a write or `0, key len u32, key` for a delete. A
/// record carries the version written, so replaying it over a namespace that already holds
/// it changes nothing.
pub fn encode_change(key: &str, entry: Option<&MetaEntry>) -> Vec<u8> {
    let mut payload = Vec::with_capacity(13 + key.len() + entry.map_or(0, |e| e.value.len() + 12));
    payload.push(u8::from(entry.is_some()));
    payload.extend_from_slice(&(key.len() as u32).to_le_bytes());
    payload.extend_from_slice(key.as_bytes());
    if let Some(e) = entry {
        payload.extend_from_slice(&(e.value.len() as u32).to_le_bytes());
        payload.extend_from_slice(&e.value);
        payload.extend_from_slice(&e.version.to_le_bytes());
    }
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    b.extend_from_slice(&payload);
    b
}

/// Applies the journal `b` to `ns` in order; returns the length of its readable prefix. What
/// follows it is a record torn by a crash while it was appended (never acknowledged).
pub fn replay_journal(ns: &mut Namespace, b: &[u8]) -> usize {
    let mut at = 0usize;
    while let Some(next) = replay_one(ns, b, at) {
        at = next;
    }
    at
}

fn replay_one(ns: &mut Namespace, b: &[u8], at: usize) -> Option<usize> {
    let len = get_u32(b.get(at..at + 4)?, 0) as usize;
    let crc = get_u32(b.get(at + 4..at + 8)?, 0);
    let end = (at + 8).checked_add(len)?;
    let p = b.get(at + 8..end)?;
    if crc32c::crc32c(p) != crc {
        return None;
    }
    let kl = get_u32(p.get(1..5)?, 0) as usize;
    let key = std::str::from_utf8(p.get(5..5usize.checked_add(kl)?)?).ok()?;
    let rest = &p[5 + kl..];
    match p[0] {
        0 => {
            ns.remove(key);
        }
        1 => {
            let vl = get_u32(rest.get(..4)?, 0) as usize;
            let value = rest.get(4..4usize.checked_add(vl)?)?.to_vec();
            let version = get_u64(rest.get(4 + vl..12 + vl)?, 0);
            ns.insert(key.to_owned(), MetaEntry { value, version });
        }
        _ => return None,
    }
    Some(end)
}

/// Appends `record` to the journal at `path` and syncs it; a journal created here also has
/// its directory entry synced.
pub fn append_journal(path: &Path, record: &[u8], created: bool) -> io::Result<()> {
    let mut f = OpenOptions::new().append(true).create(true).open(path)?;
    f.write_all(record)?;
    f.sync_data()?;
    if created {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Cuts the journal at `path` to `len` bytes, durably (a torn tail dropped, or everything
/// once the namespace file holds it).
pub fn truncate_journal(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

/// Every group's committed offsets: group → (topic, queue) → offset.
pub type Offsets = HashMap<String, BTreeMap<(String, u32), u64>>;

#[derive(Serialize, Deserialize)]
struct OffsetRow {
    group: String,
    topic: String,
    queue_id: u32,
    offset: u64,
}

/// Serialises offsets as JSON rows (readable when debugging a data dir).
pub fn encode_offsets(o: &Offsets) -> Vec<u8> {
    let rows: Vec<OffsetRow> = o
        .iter()
        .flat_map(|(g, m)| {
            m.iter().map(move |((t, q), off)| OffsetRow {
                group: g.clone(),
                topic: t.clone(),
                queue_id: *q,
                offset: *off,
            })
        })
        .collect();
    serde_json::to_vec(&rows).unwrap_or_default()
}

/// Parses [`encode_offsets`] output.
pub fn decode_offsets(b: &[u8]) -> Option<Offsets> {
    let rows: Vec<OffsetRow> = serde_json::from_slice(b).ok()?;
    let mut o = Offsets::new();
    for r in rows {
        o.entry(r.group)
            .or_default()
            .insert((r.topic, r.queue_id), r.offset);
    }
    Some(o)
}

/// Layout of the derived indexes (consume queues, held-timer queues, key index, timers). A
/// checkpoint of another format (checkpoints before numbering read as 0) makes the next open
/// rebuild every index from the log, which is how a data dir takes a new index layout.
pub const INDEX_FORMAT: u32 = 2;

/// What the derived indexes cover, written after they are fsynced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Index layout the files follow ([`INDEX_FORMAT`] when written by this version).
    #[serde(default)]
    pub format: u32,
    /// Every index reflects exactly the records before this log position.
    pub log_pos: u64,
    /// Per segment base: newest store time and pending timers whose message lives there.
    pub segments: BTreeMap<u64, SegmentInfo>,
}

/// Per-segment facts the log cannot answer without a scan.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Newest store time of a record in the segment.
    pub max_stored_ms: u64,
    /// Held timers whose message record is in the segment (retention moves them forward
    /// before it deletes the segment).
    pub pending_timers: u64,
}

impl Checkpoint {
    /// Reads the checkpoint; a missing or damaged one means "rebuild everything".
    pub fn load(path: &Path) -> Option<Checkpoint> {
        let b = read_atomic(path).ok()??;
        serde_json::from_slice(&b).ok()
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let b = serde_json::to_vec(self).map_err(io::Error::other)?;
        write_atomic(path, &b)
    }
}

/// Counts opens of a data dir: returns the previous count + 1, durably recorded.
pub fn next_boot(dir: &Path) -> io::Result<u64> {
    let path = dir.join("boot");
    let last = match read_atomic(&path)? {
        Some(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse::<u64>()
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} does not hold a boot count", path.display()),
                )
            })?,
        None => 0,
    };
    let boot = last + 1;
    write_atomic(&path, boot.to_string().as_bytes())?;
    Ok(boot)
}

/// Reads the node id of a data dir, creating a random one on first use.
pub fn node_id(dir: &Path) -> io::Result<u16> {
    let path = dir.join("node_id");
    if let Some(b) = read_atomic(&path)? {
        let s = String::from_utf8_lossy(&b);
        return s.trim().parse::<u16>().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a node id", path.display()),
            )
        });
    }
    let id: u16 = rand::random();
    write_atomic(&path, id.to_string().as_bytes())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_keep_versions_and_read_format1() {
        let mut ns = Namespace::new();
        ns.insert(
            "a".into(),
            MetaEntry {
                value: b"x".to_vec(),
                version: 9,
            },
        );
        ns.insert(
            "b".into(),
            MetaEntry {
                value: Vec::new(),
                version: 1,
            },
        );
        let whole = encode_namespace(&ns);
        assert_eq!(decode_namespace(&whole), Ok(ns.clone()));
        // Format 2: the same entries after u32::MAX.
        let mut v2 = whole.clone();
        v2[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_namespace(&v2), Ok(ns));
        // A marker this build does not know: refused as newer, never read as format 1.
        let mut v9 = whole;
        v9[..4].copy_from_slice(&(u32::MAX - 7).to_le_bytes());
        assert_eq!(
            decode_namespace(&v9),
            Err(NamespaceError::Newer(u32::MAX - 7))
        );
        // Format 1: count, then key and value only.
        let mut v1 = 1u32.to_le_bytes().to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(b"k");
        v1.extend_from_slice(&2u32.to_le_bytes());
        v1.extend_from_slice(b"vv");
        let old = decode_namespace(&v1).unwrap();
        assert_eq!(
            old["k"],
            MetaEntry {
                value: b"vv".to_vec(),
                version: 1
            }
        );
        assert_eq!(
            decode_namespace(&v1[..v1.len() - 1]),
            Err(NamespaceError::Malformed)
        );
        assert_eq!(decode_namespace(&[]), Err(NamespaceError::Malformed));
    }

    #[test]
    fn a_journal_replays_in_order_up_to_a_torn_record() {
        let e = |v: &[u8], version| MetaEntry {
            value: v.to_vec(),
            version,
        };
        let mut j = encode_change("a", Some(&e(b"1", 1)));
        j.extend(encode_change("b", Some(&e(b"", 1))));
        j.extend(encode_change("a", Some(&e(b"22", 2))));
        j.extend(encode_change("b", None));
        let whole = j.len();
        let mut ns = Namespace::new();
        assert_eq!(replay_journal(&mut ns, &j), whole);
        assert_eq!(
            ns.into_iter().collect::<Vec<_>>(),
            [("a".into(), e(b"22", 2))]
        );

        // Replaying over a namespace that already holds every change (a crash after the
        // namespace file was written whole, before the journal was cut) changes nothing.
        let mut done = Namespace::from([("a".to_string(), e(b"22", 2)), ("z".into(), e(b"z", 4))]);
        let before = done.clone();
        replay_journal(&mut done, &j);
        assert_eq!(done, before);

        // A record torn anywhere is dropped with everything after it.
        j.extend(encode_change("c", Some(&e(b"333", 1))));
        for cut in whole + 1..j.len() {
            let mut ns = Namespace::new();
            assert_eq!(replay_journal(&mut ns, &j[..cut]), whole, "cut at {cut}");
            assert!(!ns.contains_key("c"));
        }
        let mut flipped = j.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(replay_journal(&mut Namespace::new(), &flipped), whole);
    }
}
