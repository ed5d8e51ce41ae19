//! Small whole-file state: metadata namespaces, consumer offsets, node id, index checkpoint.
//! Each is rewritten atomically (write temp, fsync, rename, fsync directory) and carries a
//! CRC so a damaged file is reported instead of misread.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::log::sync_dir;
use super::record::get_u32;

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

/// One metadata namespace: key → value.
pub type Namespace = BTreeMap<String, Vec<u8>>;

/// File of a namespace (hex name, so any namespace string is a safe file name).
pub fn namespace_path(dir: &Path, ns: &str) -> PathBuf {
    dir.join(format!("{}.meta", hex::encode(ns)))
}

/// Serialises a namespace: count u32, then (key len u32, key, value len u32, value)*.
pub fn encode_namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(ns.len() as u32).to_le_bytes());
    for (k, v) in ns {
        b.extend_from_slice(&(k.len() as u32).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
        b.extend_from_slice(v);
    }
    b
}

/// Parses [`encode_namespace`] output.
pub fn decode_namespace(b: &[u8]) -> Option<Namespace> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let count = get_u32(take(4)?, 0);
    let mut ns = Namespace::new();
    for _ in 0..count {
        let kl = get_u32(take(4)?, 0) as usize;
        let k = String::from_utf8(take(kl)?.to_vec()).ok()?;
        let vl = get_u32(take(4)?, 0) as usize;
        let v = take(vl)?.to_vec();
        ns.insert(k, v);
    }
    Some(ns)
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

/// What the derived indexes cover, written after they are fsynced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
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
    /// Held timers whose message record is in the segment (blocks retention).
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
