//! Byte layout of log records: a fixed 80-byte header followed by variable fields.
//!
//! Format versions: byte `O_VERSION` of the header holds the record format. Format 1 records
//! (written before the byte existed) have a zero there, because the header's tail was padding;
//! they are read unchanged. Format 2 (written now) adds the optional RocketMQ wire block
//! (`F_WIRE`) and the segment header record (`KIND_SEGMENT`). Format 3 adds the moved record
//! (`F_MOVED`): a timer message copied forward out of a segment retention deletes, carrying its
//! origin position (and the time of the move) in a block between properties and wire block, so
//! it reads back with its original id. A record of a newer format than
//! [`RECORD_FORMAT`] is never decoded as something else: it reads as absent.
//!
//! Every record starts with its total length and a CRC32C over everything after the CRC, so a
//! torn or corrupted record is detected wherever it is read (recovery scan, `get`, queue reads).
//! The header also repeats the record's own global position, which lets a reader reject a valid
//! record that merely happens to sit at a reused position after a crash truncated the log.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;

use crate::error::{Result, WharfError};
use crate::model::{MessageId, NewMessage, StoredMessage, WireInfo, tag_hash};

/// Fixed header size of every record.
pub const HEADER: usize = 80;
/// Sanity bound: a length field above this is corruption, not a record.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

/// A producer message.
pub const KIND_MESSAGE: u8 = 1;
/// A marker that makes a held timer message visible in its consume queue.
pub const KIND_REVEAL: u8 = 2;
/// The first record of a segment (format 2 on): names the segment format in `O_FLAGS`.
pub const KIND_SEGMENT: u8 = 3;

/// Record format written now.
pub const RECORD_FORMAT: u8 = 3;
/// Segment format written now: segments start with a `KIND_SEGMENT` record. Format 1 segments
/// (no header record) are read unchanged.
pub const SEGMENT_FORMAT: u8 = 2;

/// `deliver_at_ms` is present.
pub const F_DELIVER: u8 = 1;
/// `tag` is present.
pub const F_TAG: u8 = 2;
/// The message was held as a timer when stored (no consume-queue entry at append).
pub const F_HELD: u8 = 4;
/// A wire block (flag, sys flag, born and store host) sits between properties and body
/// (format 2 on; absent when every wire field is unset, so plain messages cost nothing).
pub const F_WIRE: u8 = 8;
/// A moved timer message (format 3 on): a move block (origin position u64 | source position
/// u64 | move time u64) sits between properties and wire block. The origin is where the message
/// was first stored (its id names it), the source the record it was copied from (the origin,
/// or an earlier move).
pub const F_MOVED: u8 = 16;
/// Bytes of the move block.
pub const MOVE_BLOCK: usize = 24;

/// Topic under which a moved record is filed in the key index, keyed by its origin position.
/// It contains '%' and no system prefix, so no real topic (user or `%RETRY%`/`%DLQ%`) has it.
pub const MOVED_TOPIC: &str = "%MOVED%";

/// Key-index hash of the moves of the record that was at `origin`.
pub fn moved_hash(origin: u64) -> u32 {
    key_hash(MOVED_TOPIC, &origin.to_string())
}

/// Offset of the total record length (u32).
pub const O_LEN: usize = 0;
/// Offset of the CRC32C of bytes from `O_KIND` to the end (u32).
pub const O_CRC: usize = 4;
/// Offset of the record kind (u8).
pub const O_KIND: usize = 8;
/// Offset of the flags (u8; for a reveal marker: the timer's bucket tier).
pub const O_FLAGS: usize = 9;
/// Offset of the topic length (u16).
pub const O_TOPIC_LEN: usize = 10;
/// Offset of the queue id (u32).
pub const O_QUEUE: usize = 12;
/// Offset of the record's own global position (u64).
pub const O_POS: usize = 16;
/// Offset of the store time (u64).
pub const O_STORED: usize = 24;
/// Offset of the queue offset (u64; `NO_OFFSET` for a held timer).
pub const O_QOFF: usize = 32;
/// Message: born time. Reveal: position of the revealed message.
pub const O_BORN: usize = 40;
/// Message: deliver time. Reveal: deliver time of the revealed message.
pub const O_DELIVER: usize = 48;
/// Message: reconsume count. Reveal: size of the revealed message record.
pub const O_RECONSUME: usize = 56;
/// Offset of the tag hash (u32).
pub const O_TAG_HASH: usize = 60;
/// Offset of the tag length (u16).
pub const O_TAG_LEN: usize = 64;
/// Offset of the key count (u16).
pub const O_KEYS: usize = 66;
/// Offset of the property count (u16).
pub const O_PROPS: usize = 68;
/// Offset of the body length (u32).
pub const O_BODY_LEN: usize = 72;
/// Offset of the record format (u8; 0 means format 1). Bytes after it are reserved (zero).
pub const O_VERSION: usize = 76;

/// Queue offset stored for a message that has none yet (held timer).
pub const NO_OFFSET: u64 = u64::MAX;

/// Little-endian u16 at `o`.
pub fn get_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

/// Little-endian u32 at `o`.
pub fn get_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Little-endian u64 at `o`.
pub fn get_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Writes a little-endian u16 at `o`.
pub fn put_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 at `o`.
pub fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u64 at `o`.
pub fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Where one encoded (not yet positioned) message sits inside a caller's batch buffer.
#[derive(Debug, Clone)]
pub struct EncodedRecord {
    /// Byte offset in the batch buffer.
    pub start: usize,
    /// Record length.
    pub len: u32,
    /// Queue id.
    pub queue_id: u32,
    /// Tag hash for the consume queue.
    pub tag_hash: u32,
    /// Requested deliver time.
    pub deliver_at: Option<u64>,
    /// Topic bytes inside the buffer.
    pub topic: std::ops::Range<usize>,
    /// Range into the batch's key-hash list.
    pub keys: std::ops::Range<usize>,
}

/// A whole append request encoded by the caller, so the writer thread only copies and patches.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    /// All records back to back.
    pub buf: Vec<u8>,
    /// One entry per message.
    pub recs: Vec<EncodedRecord>,
    /// Key hashes of all messages, ranges in `recs`.
    pub key_hashes: Vec<u32>,
}

/// Hash under which `(topic, key)` is filed in the key index.
pub fn key_hash(topic: &str, key: &str) -> u32 {
    let h = crc32c::crc32c(topic.as_bytes());
    let h = crc32c::crc32c_append(h, &[0]);
    crc32c::crc32c_append(h, key.as_bytes())
}

fn len16(what: &str, n: usize) -> Result<u16> {
    u16::try_from(n).map_err(|_| {
        WharfError::illegal(format!(
            "{what} is {n} bytes; the store accepts at most 65535 bytes"
        ))
    })
}

impl EncodedBatch {
    /// Encodes `msgs`; position, store time, queue offset and CRC are filled in by the writer.
    pub fn encode(msgs: &[NewMessage]) -> Result<EncodedBatch> {
        let total: usize = msgs
            .iter()
            .map(|m| {
                HEADER
                    + m.topic.len()
                    + m.tag.as_ref().map_or(0, |t| t.len())
                    + m.keys.iter().map(|k| k.len() + 2).sum::<usize>()
                    + m.properties
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 4)
                        .sum::<usize>()
                    + m.body.len()
                    + wire_len(&m.wire)
            })
            .sum();
        let mut b = EncodedBatch {
            buf: Vec::with_capacity(total),
            recs: Vec::with_capacity(msgs.len()),
            key_hashes: Vec::new(),
        };
        for m in msgs {
            b.push(m)?;
        }
        Ok(b)
    }

    fn push(&mut self, m: &NewMessage) -> Result<()> {
        if m.topic.is_empty() {
            return Err(WharfError::illegal("a message needs a topic"));
        }
        let start = self.buf.len();
        let topic_len = len16("topic", m.topic.len())?;
        let tag_len = len16("tag", m.tag.as_ref().map_or(0, |t| t.len()))?;
        let keys_n = len16("key list", m.keys.len())?;
        let props_n = len16("property list", m.properties.len())?;
        let body_len = u32::try_from(m.body.len())
            .map_err(|_| WharfError::illegal("message body is larger than 4 GiB"))?;
        let mut flags = 0u8;
        if m.deliver_at_ms.is_some() {
            flags |= F_DELIVER;
        }
        if m.tag.is_some() {
            flags |= F_TAG;
        }
        let wire = m.wire != WireInfo::default();
        if wire {
            flags |= F_WIRE;
        }
        let th = tag_hash(m.tag.as_deref());
        let mut h = [0u8; HEADER];
        h[O_KIND] = KIND_MESSAGE;
        h[O_FLAGS] = flags;
        h[O_VERSION] = RECORD_FORMAT;
        put_u16(&mut h, O_TOPIC_LEN, topic_len);
        put_u32(&mut h, O_QUEUE, m.queue_id);
        put_u64(&mut h, O_QOFF, NO_OFFSET);
        put_u64(&mut h, O_BORN, m.born_ms);
        put_u64(&mut h, O_DELIVER, m.deliver_at_ms.unwrap_or(0));
        put_u32(&mut h, O_RECONSUME, m.reconsume_times);
        put_u32(&mut h, O_TAG_HASH, th);
        put_u16(&mut h, O_TAG_LEN, tag_len);
        put_u16(&mut h, O_KEYS, keys_n);
        put_u16(&mut h, O_PROPS, props_n);
        put_u32(&mut h, O_BODY_LEN, body_len);
        self.buf.extend_from_slice(&h);
        let topic_start = self.buf.len();
        self.buf.extend_from_slice(m.topic.as_bytes());
        if let Some(t) = &m.tag {
            self.buf.extend_from_slice(t.as_bytes());
        }
        let keys_start = self.key_hashes.len();
        for k in &m.keys {
            let n = len16("key", k.len())?;
            self.buf.extend_from_slice(&n.to_le_bytes());
            self.buf.extend_from_slice(k.as_bytes());
            self.key_hashes.push(key_hash(&m.topic, k));
        }
        for (k, v) in &m.properties {
            let kn = len16("property name", k.len())?;
            let vn = len16("property value", v.len())?;
            self.buf.extend_from_slice(&kn.to_le_bytes());
            self.buf.extend_from_slice(k.as_bytes());
            self.buf.extend_from_slice(&vn.to_le_bytes());
            self.buf.extend_from_slice(v.as_bytes());
        }
        if wire {
            put_wire(&mut self.buf, &m.wire);
        }
        self.buf.extend_from_slice(&m.body);
        let len = self.buf.len() - start;
        if len > MAX_RECORD {
            self.buf.truncate(start);
            return Err(WharfError::illegal(format!(
                "message is {len} bytes encoded; the store accepts at most {MAX_RECORD}"
            )));
        }
        put_u32(&mut self.buf[start..], O_LEN, len as u32);
        self.recs.push(EncodedRecord {
            start,
            len: len as u32,
            queue_id: m.queue_id,
            tag_hash: th,
            deliver_at: m.deliver_at_ms,
            topic: topic_start..topic_start + m.topic.len(),
            keys: keys_start..self.key_hashes.len(),
        });
        Ok(())
    }
}

/// Fills in the writer-assigned fields of a record and seals it with its CRC.
pub fn finish(rec: &mut [u8], pos: u64, stored_ms: u64, queue_offset: u64, held: bool) {
    put_u64(rec, O_POS, pos);
    put_u64(rec, O_STORED, stored_ms);
    put_u64(rec, O_QOFF, queue_offset);
    if held {
        rec[O_FLAGS] |= F_HELD;
    }
    seal(rec);
}

/// Writes the CRC of `rec[8..]` into the header.
pub fn seal(rec: &mut [u8]) {
    let crc = crc32c::crc32c(&rec[O_KIND..]);
    put_u32(rec, O_CRC, crc);
}

/// Builds a reveal marker into `out`: it makes the message at `target_pos` visible at `queue_offset`.
#[allow(clippy::too_many_arguments)]
pub fn encode_reveal(
    out: &mut Vec<u8>,
    pos: u64,
    stored_ms: u64,
    topic: &str,
    queue_id: u32,
    queue_offset: u64,
    tag_hash: u32,
    target_pos: u64,
    target_deliver_ms: u64,
    target_size: u32,
    target_tier: u8,
) {
    let start = out.len();
    let len = HEADER + topic.len();
    out.resize(start + HEADER, 0);
    out.extend_from_slice(topic.as_bytes());
    let r = &mut out[start..];
    put_u32(r, O_LEN, len as u32);
    r[O_KIND] = KIND_REVEAL;
    // Reveal markers carry the timer's bucket tier in the flags byte.
    r[O_FLAGS] = target_tier;
    r[O_VERSION] = RECORD_FORMAT;
    put_u16(r, O_TOPIC_LEN, topic.len() as u16);
    put_u32(r, O_QUEUE, queue_id);
    put_u64(r, O_POS, pos);
    put_u64(r, O_STORED, stored_ms);
    put_u64(r, O_QOFF, queue_offset);
    put_u64(r, O_BORN, target_pos);
    put_u64(r, O_DELIVER, target_deliver_ms);
    put_u32(r, O_RECONSUME, target_size);
    put_u32(r, O_TAG_HASH, tag_hash);
    seal(r);
}

/// Builds the header record that starts a segment at `pos` into `out`.
pub fn encode_segment_header(out: &mut Vec<u8>, pos: u64, stored_ms: u64) {
    let start = out.len();
    out.resize(start + HEADER, 0);
    let r = &mut out[start..];
    put_u32(r, O_LEN, HEADER as u32);
    r[O_KIND] = KIND_SEGMENT;
    r[O_FLAGS] = SEGMENT_FORMAT;
    r[O_VERSION] = RECORD_FORMAT;
    put_u64(r, O_POS, pos);
    put_u64(r, O_STORED, stored_ms);
    put_u64(r, O_QOFF, NO_OFFSET);
    seal(r);
}

/// Bytes the wire block of `w` takes (0 when every field is unset: no block is written).
fn wire_len(w: &WireInfo) -> usize {
    if *w == WireInfo::default() {
        return 0;
    }
    8 + addr_len(w.born_host) + addr_len(w.store_host)
}

fn addr_len(a: Option<SocketAddr>) -> usize {
    match a {
        None => 1,
        Some(SocketAddr::V4(_)) => 1 + 4 + 2,
        Some(SocketAddr::V6(_)) => 1 + 16 + 2,
    }
}

/// Wire block: flag i32 | sys flag i32 | born host | store host, each host as family u8
/// (0 none, 4, 6) then the address bytes and port u16.
fn put_wire(out: &mut Vec<u8>, w: &WireInfo) {
    out.extend_from_slice(&w.flag.to_le_bytes());
    out.extend_from_slice(&w.sys_flag.to_le_bytes());
    for a in [w.born_host, w.store_host] {
        match a {
            None => out.push(0),
            Some(SocketAddr::V4(v4)) => {
                out.push(4);
                out.extend_from_slice(&v4.ip().octets());
                out.extend_from_slice(&v4.port().to_le_bytes());
            }
            Some(SocketAddr::V6(v6)) => {
                out.push(6);
                out.extend_from_slice(&v6.ip().octets());
                out.extend_from_slice(&v6.port().to_le_bytes());
            }
        }
    }
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Fewer bytes than the header or the length field says: a torn write.
    Short,
    /// Length field out of range, CRC mismatch, or position mismatch.
    Corrupt,
}

/// Checks the record at the start of `buf`, expected at global `pos`; returns its length.
pub fn validate(buf: &[u8], pos: u64) -> std::result::Result<usize, Invalid> {
    if buf.len() < HEADER {
        return Err(Invalid::Short);
    }
    let len = get_u32(buf, O_LEN) as usize;
    if !(HEADER..=MAX_RECORD).contains(&len) {
        return Err(Invalid::Corrupt);
    }
    if buf.len() < len {
        return Err(Invalid::Short);
    }
    let r = &buf[..len];
    if crc32c::crc32c(&r[O_KIND..]) != get_u32(r, O_CRC) || get_u64(r, O_POS) != pos {
        return Err(Invalid::Corrupt);
    }
    let kind = r[O_KIND];
    if !matches!(kind, KIND_MESSAGE | KIND_REVEAL | KIND_SEGMENT) {
        return Err(Invalid::Corrupt);
    }
    if HEADER + get_u16(r, O_TOPIC_LEN) as usize > len {
        return Err(Invalid::Corrupt);
    }
    Ok(len)
}

/// The fixed fields of a validated record.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Total length.
    pub len: u32,
    /// `KIND_MESSAGE`, `KIND_REVEAL` or `KIND_SEGMENT`.
    pub kind: u8,
    /// Record format (1 for records written before formats were numbered).
    pub format: u8,
    /// Flags (`F_*`; a reveal marker's tier).
    pub flags: u8,
    /// Queue id.
    pub queue_id: u32,
    /// Own global position.
    pub pos: u64,
    /// Store time.
    pub stored_ms: u64,
    /// Queue offset (`NO_OFFSET` when held).
    pub queue_offset: u64,
    /// Message: born time. Reveal: position of the revealed message.
    pub born_ms: u64,
    /// Message: deliver time. Reveal: the revealed message's deliver time.
    pub deliver_ms: u64,
    /// Message: reconsume count. Reveal: the revealed message's record size.
    pub reconsume: u32,
    /// Tag hash.
    pub tag_hash: u32,
}

impl Header {
    /// Reads the header of a validated record.
    pub fn parse(r: &[u8]) -> Header {
        Header {
            len: get_u32(r, O_LEN),
            kind: r[O_KIND],
            format: r[O_VERSION].max(1),
            flags: r[O_FLAGS],
            queue_id: get_u32(r, O_QUEUE),
            pos: get_u64(r, O_POS),
            stored_ms: get_u64(r, O_STORED),
            queue_offset: get_u64(r, O_QOFF),
            born_ms: get_u64(r, O_BORN),
            deliver_ms: get_u64(r, O_DELIVER),
            reconsume: get_u32(r, O_RECONSUME),
            tag_hash: get_u32(r, O_TAG_HASH),
        }
    }

    /// True for a message that waited as a timer.
    pub fn held(&self) -> bool {
        self.flags & F_HELD != 0
    }
}

/// The topic of a validated record.
pub fn topic_of(r: &[u8]) -> Option<&str> {
    let n = get_u16(r, O_TOPIC_LEN) as usize;
    std::str::from_utf8(r.get(HEADER..HEADER + n)?).ok()
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn str(&mut self, n: usize) -> Option<String> {
        self.take(n)
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(str::to_owned)
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn addr(&mut self) -> Option<Option<SocketAddr>> {
        let ip = match self.take(1)?[0] {
            0 => return Some(None),
            4 => {
                let b: [u8; 4] = self.take(4)?.try_into().ok()?;
                IpAddr::V4(Ipv4Addr::from(b))
            }
            6 => {
                let b: [u8; 16] = self.take(16)?.try_into().ok()?;
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return None,
        };
        let port = self.u16()? as u16;
        Some(Some(SocketAddr::new(ip, port)))
    }

    fn wire(&mut self) -> Option<WireInfo> {
        Some(WireInfo {
            flag: self.i32()?,
            sys_flag: self.i32()?,
            born_host: self.addr()?,
            store_host: self.addr()?,
        })
    }
}

/// Offset just past the property list of a message record (where the move block or the wire
/// block starts), or `None` when the record is malformed.
fn props_end(r: &[u8]) -> Option<usize> {
    let mut c = Cursor { b: r, at: HEADER };
    c.take(get_u16(r, O_TOPIC_LEN) as usize + get_u16(r, O_TAG_LEN) as usize)?;
    for _ in 0..get_u16(r, O_KEYS) {
        let n = c.u16()?;
        c.take(n)?;
    }
    for _ in 0..get_u16(r, O_PROPS) {
        let kn = c.u16()?;
        c.take(kn)?;
        let vn = c.u16()?;
        c.take(vn)?;
    }
    Some(c.at)
}

/// The move block of a moved message record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Position the message was first stored at (part of its id).
    pub origin: u64,
    /// Position of the record this one was copied from.
    pub source: u64,
    /// When it was copied.
    pub moved_ms: u64,
}

/// The move block of a validated record; `None` for anything but a moved message record
/// (every record of format 1 or 2).
pub fn moved_of(r: &[u8]) -> Option<Moved> {
    let h = Header::parse(r);
    if h.kind != KIND_MESSAGE || h.format < 3 || h.flags & F_MOVED == 0 {
        return None;
    }
    let at = props_end(r)?;
    let b = r.get(at..at + MOVE_BLOCK)?;
    Some(Moved {
        origin: get_u64(b, 0),
        source: get_u64(b, 8),
        moved_ms: get_u64(b, 16),
    })
}

/// Appends to `out` the moved copy of the validated message record `rec` (which sits at
/// `rec_pos`), moved at `moved_ms`: same fields, origin kept when `rec` is itself a move. The
/// copy is in the current format and unsealed; the caller positions it with [`finish`] (held
/// flag cleared here, set again by `finish` when the copy stays held). Returns its length.
pub fn encode_moved(out: &mut Vec<u8>, rec: &[u8], rec_pos: u64, moved_ms: u64) -> Option<usize> {
    let at = props_end(rec)?;
    let (origin, rest) = match moved_of(rec) {
        Some(m) => (m.origin, at + MOVE_BLOCK),
        None => (rec_pos, at),
    };
    let start = out.len();
    out.extend_from_slice(&rec[..at]);
    out.extend_from_slice(&origin.to_le_bytes());
    out.extend_from_slice(&rec_pos.to_le_bytes());
    out.extend_from_slice(&moved_ms.to_le_bytes());
    out.extend_from_slice(rec.get(rest..)?);
    let len = out.len() - start;
    let r = &mut out[start..];
    put_u32(r, O_LEN, len as u32);
    r[O_FLAGS] = (r[O_FLAGS] | F_MOVED) & !F_HELD;
    r[O_VERSION] = RECORD_FORMAT;
    Some(len)
}

/// Length of the moved copy [`encode_moved`] makes of `rec`.
pub fn moved_len(rec: &[u8]) -> usize {
    if moved_of(rec).is_some() {
        rec.len()
    } else {
        rec.len() + MOVE_BLOCK
    }
}

/// Key strings of a validated message record (for rebuilding the key index).
pub fn keys_of(r: &[u8]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut at = HEADER + get_u16(r, O_TOPIC_LEN) as usize + get_u16(r, O_TAG_LEN) as usize;
    for _ in 0..get_u16(r, O_KEYS) {
        let Some(n) = r
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        else {
            break;
        };
        let Some(k) = r
            .get(at + 2..at + 2 + n)
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            break;
        };
        out.push(k);
        at += 2 + n;
    }
    out
}

/// Decodes a validated message record of format 1 to 3 (owned bytes, so the body is shared,
/// not copied). Returns `None` for any other kind, a newer format, or a malformed body. A moved
/// record decodes with the id of its origin.
pub fn decode_message(rec: Bytes, node: u16) -> Option<StoredMessage> {
    let r = &rec[..];
    let h = Header::parse(r);
    if h.kind != KIND_MESSAGE || h.format > RECORD_FORMAT {
        return None;
    }
    let mut c = Cursor { b: r, at: HEADER };
    let topic = c.str(get_u16(r, O_TOPIC_LEN) as usize)?;
    let tag_len = get_u16(r, O_TAG_LEN) as usize;
    let tag_s = c.str(tag_len)?;
    let tag = (h.flags & F_TAG != 0).then_some(tag_s);
    let nkeys = get_u16(r, O_KEYS) as usize;
    let mut keys = Vec::with_capacity(nkeys);
    for _ in 0..nkeys {
        let n = c.u16()?;
        keys.push(c.str(n)?);
    }
    let nprops = get_u16(r, O_PROPS) as usize;
    let mut properties = BTreeMap::new();
    for _ in 0..nprops {
        let kn = c.u16()?;
        let k = c.str(kn)?;
        let vn = c.u16()?;
        let v = c.str(vn)?;
        properties.insert(k, v);
    }
    let mut id_pos = h.pos;
    if h.format >= 3 && h.flags & F_MOVED != 0 {
        let b = c.take(MOVE_BLOCK)?;
        id_pos = get_u64(b, 0);
    }
    let wire = if h.flags & F_WIRE != 0 {
        c.wire()?
    } else {
        WireInfo::default()
    };
    let body_len = get_u32(r, O_BODY_LEN) as usize;
    let body_start = c.at;
    if body_start + body_len != r.len() {
        return None;
    }
    let body = rec.slice(body_start..body_start + body_len);
    Some(StoredMessage {
        id: MessageId::new(h.stored_ms, node, id_pos),
        topic,
        queue_id: h.queue_id,
        queue_offset: (h.queue_offset != NO_OFFSET).then_some(h.queue_offset),
        tag,
        keys,
        properties,
        body,
        born_ms: h.born_ms,
        stored_ms: h.stored_ms,
        deliver_at_ms: (h.flags & F_DELIVER != 0).then_some(h.deliver_ms),
        reconsume_times: h.reconsume,
        wire,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> NewMessage {
        NewMessage {
            topic: "TopicA".into(),
            queue_id: 3,
            tag: Some("TagA".into()),
            keys: vec!["k1".into(), "k2".into()],
            properties: [("a".to_string(), "b".to_string())].into_iter().collect(),
            body: Bytes::from_static(b"hello"),
            born_ms: 10,
            deliver_at_ms: Some(99),
            reconsume_times: 2,
            wire: WireInfo::default(),
        }
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let b = EncodedBatch::encode(&[msg()]).unwrap();
        let mut rec = b.buf.clone();
        finish(&mut rec, 4096, 77, 5, false);
        assert_eq!(validate(&rec, 4096), Ok(rec.len()));
        assert_eq!(validate(&rec, 4097), Err(Invalid::Corrupt));
        assert_eq!(validate(&rec[..rec.len() - 1], 4096), Err(Invalid::Short));
        let m = decode_message(Bytes::from(rec.clone()), 7).unwrap();
        assert_eq!(m.topic, "TopicA");
        assert_eq!(m.tag.as_deref(), Some("TagA"));
        assert_eq!(m.keys, vec!["k1", "k2"]);
        assert_eq!(m.properties["a"], "b");
        assert_eq!(&m.body[..], b"hello");
        assert_eq!(m.queue_offset, Some(5));
        assert_eq!(m.deliver_at_ms, Some(99));
        assert_eq!(m.id, MessageId::new(77, 7, 4096));
        rec[HEADER + 2] ^= 1;
        assert_eq!(validate(&rec, 4096), Err(Invalid::Corrupt));
    }

    #[test]
    fn wire_fields_round_trip_only_when_set() {
        let plain = EncodedBatch::encode(&[msg()]).unwrap();
        assert_eq!(
            plain.buf[O_FLAGS] & F_WIRE,
            0,
            "unset wire fields cost no bytes"
        );
        assert_eq!(plain.buf[O_VERSION], RECORD_FORMAT);
        for (born, store) in [
            (Some("10.0.0.1:123"), None),
            (None, Some("[::1]:10911")),
            (Some("[fe80::1]:1"), Some("192.168.1.9:10911")),
        ] {
            let wire = WireInfo {
                flag: i32::MIN,
                sys_flag: 7,
                born_host: born.map(|a| a.parse().unwrap()),
                store_host: store.map(|a| a.parse().unwrap()),
            };
            let b = EncodedBatch::encode(&[NewMessage { wire, ..msg() }]).unwrap();
            assert_eq!(b.buf.len(), plain.buf.len() + wire_len(&wire));
            let mut rec = b.buf.clone();
            finish(&mut rec, 0, 1, 0, false);
            assert_eq!(validate(&rec, 0), Ok(rec.len()));
            let m = decode_message(Bytes::from(rec), 1).unwrap();
            assert_eq!(m.wire, wire);
            assert_eq!(&m.body[..], b"hello");
            assert_eq!(m.properties["a"], "b");
        }
    }

    #[test]
    fn format1_records_read_and_newer_formats_do_not() {
        let b = EncodedBatch::encode(&[msg()]).unwrap();
        let mut rec = b.buf.clone();
        rec[O_VERSION] = 0;
        finish(&mut rec, 8, 2, 1, false);
        let m = decode_message(Bytes::from(rec.clone()), 1).unwrap();
        assert_eq!(Header::parse(&rec).format, 1);
        assert_eq!((m.topic.as_str(), m.wire), ("TopicA", WireInfo::default()));
        rec[O_VERSION] = RECORD_FORMAT + 1;
        seal(&mut rec);
        assert_eq!(validate(&rec, 8), Ok(rec.len()));
        assert!(decode_message(Bytes::from(rec), 1).is_none());
        let mut seg = Vec::new();
        encode_segment_header(&mut seg, 4096, 3);
        assert_eq!(validate(&seg, 4096), Ok(HEADER));
        assert!(decode_message(Bytes::from(seg), 1).is_none());
    }

    #[test]
    fn a_moved_record_reads_back_with_its_origin_id() {
        let wire = WireInfo {
            flag: 3,
            sys_flag: 1,
            born_host: Some("10.0.0.1:5".parse().unwrap()),
            store_host: None,
        };
        let b = EncodedBatch::encode(&[NewMessage { wire, ..msg() }]).unwrap();
        let mut orig = b.buf.clone();
        finish(&mut orig, 4096, 77, NO_OFFSET, true);
        assert!(moved_of(&orig).is_none());
        let mut out = Vec::new();
        let len = encode_moved(&mut out, &orig, 4096, 500).unwrap();
        assert_eq!(len, moved_len(&orig));
        finish(&mut out, 90_000, 77, NO_OFFSET, true);
        assert_eq!(validate(&out, 90_000), Ok(len));
        let h = Header::parse(&out);
        assert!(h.held() && h.format == RECORD_FORMAT);
        let mv = moved_of(&out).unwrap();
        assert_eq!((mv.origin, mv.source, mv.moved_ms), (4096, 4096, 500));
        assert_eq!(keys_of(&out), vec!["k1", "k2"]);
        let m = decode_message(Bytes::from(out.clone()), 7).unwrap();
        let o = decode_message(Bytes::from(orig), 7).unwrap();
        assert_eq!(m, o, "a moved copy is the same message, id included");
        assert_eq!(m.id, MessageId::new(77, 7, 4096));
        // Moved again (revealed as it moves): the origin stays, the source is the copy.
        let mut again = Vec::new();
        encode_moved(&mut again, &out, 90_000, 900).unwrap();
        finish(&mut again, 200_000, 77, 4, false);
        let mv = moved_of(&again).unwrap();
        assert_eq!((mv.origin, mv.source, mv.moved_ms), (4096, 90_000, 900));
        assert!(!Header::parse(&again).held());
        let m2 = decode_message(Bytes::from(again), 7).unwrap();
        assert_eq!((m2.id, m2.queue_offset), (m.id, Some(4)));
        // The flag means nothing in older formats: such a record is never read as moved.
        let mut old = b.buf.clone();
        old[O_VERSION] = 2;
        old[O_FLAGS] |= F_MOVED;
        finish(&mut old, 8, 2, 1, false);
        assert!(moved_of(&old).is_none());
    }

    fn any_message() -> impl proptest::strategy::Strategy<Value = NewMessage> {
        use proptest::prelude::*;
        // The record keeps address and port, as RocketMQ's wire does; no IPv6 flow or scope.
        let addr = proptest::option::of(
            (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port)),
        );
        (
            "[A-Za-z0-9%_-]{1,64}",
            any::<u32>(),
            proptest::option::of("\\PC{0,16}"),
            proptest::collection::vec("\\PC{0,12}", 0..4),
            proptest::collection::btree_map("\\PC{1,8}", "\\PC{0,16}", 0..4),
            proptest::collection::vec(any::<u8>(), 0..256),
            (
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                any::<u32>(),
            ),
            (any::<i32>(), any::<i32>(), addr.clone(), addr),
        )
            .prop_map(
                |(topic, queue_id, tag, keys, properties, body, (born, deliver, re), wire)| {
                    NewMessage {
                        topic,
                        queue_id,
                        tag,
                        keys,
                        properties,
                        body: Bytes::from(body),
                        born_ms: born,
                        deliver_at_ms: deliver,
                        reconsume_times: re,
                        wire: WireInfo {
                            flag: wire.0,
                            sys_flag: wire.1,
                            born_host: wire.2,
                            store_host: wire.3,
                        },
                    }
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn any_message_round_trips(
            msgs in proptest::collection::vec(any_message(), 1..4),
            pos in 0u64..(1 << 40),
            stored in 0u64..(1 << 48),
            queue_offset: u64,
            held: bool,
        ) {
            let b = EncodedBatch::encode(&msgs).unwrap();
            proptest::prop_assert_eq!(b.recs.len(), msgs.len());
            let mut at = pos;
            for (m, r) in msgs.iter().zip(&b.recs) {
                let mut rec = b.buf[r.start..r.start + r.len as usize].to_vec();
                finish(&mut rec, at, stored, queue_offset, held);
                proptest::prop_assert_eq!(validate(&rec, at), Ok(rec.len()));
                let h = Header::parse(&rec);
                proptest::prop_assert_eq!(h.held(), held);
                proptest::prop_assert_eq!(h.tag_hash, r.tag_hash);
                proptest::prop_assert_eq!(topic_of(&rec), Some(m.topic.as_str()));
                proptest::prop_assert_eq!(
                    keys_of(&rec),
                    m.keys.iter().map(String::as_str).collect::<Vec<_>>()
                );
                let d = decode_message(Bytes::from(rec), 9).unwrap();
                proptest::prop_assert_eq!(d.id, MessageId::new(stored, 9, at));
                proptest::prop_assert_eq!(&d.topic, &m.topic);
                proptest::prop_assert_eq!(d.queue_id, m.queue_id);
                proptest::prop_assert_eq!(&d.tag, &m.tag);
                proptest::prop_assert_eq!(&d.keys, &m.keys);
                proptest::prop_assert_eq!(&d.properties, &m.properties);
                proptest::prop_assert_eq!(&d.body, &m.body);
                proptest::prop_assert_eq!(d.born_ms, m.born_ms);
                proptest::prop_assert_eq!(d.deliver_at_ms, m.deliver_at_ms);
                proptest::prop_assert_eq!(d.reconsume_times, m.reconsume_times);
                proptest::prop_assert_eq!(d.wire, m.wire);
                proptest::prop_assert_eq!(
                    d.queue_offset,
                    (queue_offset != NO_OFFSET).then_some(queue_offset)
                );
                at += u64::from(r.len);
            }
        }
    }
}
