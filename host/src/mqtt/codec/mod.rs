//! MQTT 3.1.1 packets as pure functions over bytes: [`frame`] finds where a packet ends,
//! [`decode`] turns one whole frame into a [`Packet`], [`encode`] writes one out. Nothing here
//! does I/O or keeps state, so the connection task, the tests, the property tests and the fuzz
//! target all drive the same code.
//!
//! A frame is handed over as [`Bytes`] so a PUBLISH payload is a slice of the read buffer, not a
//! copy. Every length is checked before it is used: a malformed or oversized packet is an error,
//! never a panic, and the caller closes that one connection.

mod ack;
mod connack;
mod connect;
mod publish;
mod subscribe;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use ack::AckKind;
pub use connack::{ConnAck, ConnectCode};
pub use connect::{Connect, Will};
pub use publish::Publish;
pub use subscribe::{SUBACK_FAILURE, SubAck, Subscribe, Unsubscribe};

/// Largest remaining length the 4-byte variable length encoding can express (256 MiB - 1).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// One MQTT 3.1.1 control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client → server).
    Connect(Connect),
    /// CONNACK (server → client).
    ConnAck(ConnAck),
    /// PUBLISH (both ways).
    Publish(Publish),
    /// PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK: a packet id and nothing else.
    Ack(AckKind, u16),
    /// SUBSCRIBE (client → server).
    Subscribe(Subscribe),
    /// SUBACK (server → client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client → server).
    Unsubscribe(Unsubscribe),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (client → server).
    Disconnect,
}

impl Packet {
    /// The packet's name as the spec writes it, for logs and per-type counters.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::Ack(kind, _) => kind.name(),
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect => "DISCONNECT",
        }
    }
}

/// Why bytes are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet breaks the format; the text says where.
    #[error("malformed {packet} packet: {reason}")]
    Malformed {
        /// Packet type being decoded.
        packet: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The remaining length is over the limit this connection accepts.
    #[error("packet of {size} bytes is over the {max}-byte limit ([mqtt] max_packet_bytes)")]
    TooLarge {
        /// Declared size (fixed header included).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// CONNECT names a protocol this server does not speak (answered with CONNACK code 1).
    #[error(
        "unsupported protocol '{name}' level {level}; this server speaks MQTT 3.1.1 (\"MQTT\", level 4)"
    )]
    UnsupportedProtocol {
        /// Protocol name sent.
        name: String,
        /// Protocol level sent.
        level: u8,
    },
}

pub(crate) fn malformed(packet: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        packet,
        reason: reason.into(),
    }
}

/// Where the next packet in `buf` ends: `Ok(None)` while more bytes are needed, else the whole
/// frame's length (fixed header included). Checks the length against `max` before any of the
/// body has arrived, so an oversized packet is refused without buffering it.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len: usize = 0;
    let mut shift = 0;
    for i in 1..=4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            let total = 1 + i + len;
            if total > max {
                return Err(DecodeError::TooLarge { size: total, max });
            }
            return Ok((buf.len() >= total).then_some(total));
        }
        shift += 7;
    }
    Err(malformed(
        "fixed header",
        "remaining length takes more than 4 bytes",
    ))
}

/// Decodes one whole frame as [`frame`] delimited it.
pub fn decode(mut frame: Bytes) -> Result<Packet, DecodeError> {
    if frame.is_empty() {
        return Err(malformed("fixed header", "empty frame"));
    }
    let first = frame[0];
    frame.advance(1);
    let remaining = read_remaining_length(&mut frame)?;
    if remaining != frame.len() {
        return Err(malformed(
            "fixed header",
            format!(
                "remaining length {remaining} but the frame holds {} bytes",
                frame.len()
            ),
        ));
    }
    let (kind, flags) = (first >> 4, first & 0x0f);
    let body = frame;
    match kind {
        1 => {
            expect_flags("CONNECT", flags, 0)?;
            connect::decode(body).map(Packet::Connect)
        }
        2 => {
            expect_flags("CONNACK", flags, 0)?;
            connack::decode(body).map(Packet::ConnAck)
        }
        3 => publish::decode(flags, body).map(Packet::Publish),
        4 => ack::decode(AckKind::PubAck, flags, body),
        5 => ack::decode(AckKind::PubRec, flags, body),
        6 => ack::decode(AckKind::PubRel, flags, body),
        7 => ack::decode(AckKind::PubComp, flags, body),
        8 => {
            expect_flags("SUBSCRIBE", flags, 0b0010)?;
            subscribe::decode_subscribe(body).map(Packet::Subscribe)
        }
        9 => {
            expect_flags("SUBACK", flags, 0)?;
            subscribe::decode_suback(body).map(Packet::SubAck)
        }
        10 => {
            expect_flags("UNSUBSCRIBE", flags, 0b0010)?;
            subscribe::decode_unsubscribe(body).map(Packet::Unsubscribe)
        }
        11 => ack::decode(AckKind::UnsubAck, flags, body),
        12 => empty("PINGREQ", flags, &body).map(|()| Packet::PingReq),
        13 => empty("PINGRESP", flags, &body).map(|()| Packet::PingResp),
        14 => empty("DISCONNECT", flags, &body).map(|()| Packet::Disconnect),
        _ => Err(malformed(
            "fixed header",
            format!("packet type {kind} is reserved"),
        )),
    }
}

/// Appends `packet`'s encoding to `out`.
pub fn encode(packet: &Packet, out: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => connect::encode(c, out),
        Packet::ConnAck(c) => connack::encode(c, out),
        Packet::Publish(p) => publish::encode(p, out),
        Packet::Ack(kind, id) => ack::encode(*kind, *id, out),
        Packet::Subscribe(s) => subscribe::encode_subscribe(s, out),
        Packet::SubAck(s) => subscribe::encode_suback(s, out),
        Packet::Unsubscribe(u) => subscribe::encode_unsubscribe(u, out),
        Packet::PingReq => out.put_slice(&[0xc0, 0]),
        Packet::PingResp => out.put_slice(&[0xd0, 0]),
        Packet::Disconnect => out.put_slice(&[0xe0, 0]),
    }
}

/// `packet` encoded into a fresh buffer.
pub fn to_bytes(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    encode(packet, &mut out);
    out.freeze()
}

fn expect_flags(packet: &'static str, flags: u8, want: u8) -> Result<(), DecodeError> {
    if flags == want {
        Ok(())
    } else {
        Err(malformed(
            packet,
            format!("fixed header flags are {flags:#06b}, must be {want:#06b}"),
        ))
    }
}

fn empty(packet: &'static str, flags: u8, body: &Bytes) -> Result<(), DecodeError> {
    expect_flags(packet, flags, 0)?;
    if body.is_empty() {
        Ok(())
    } else {
        Err(malformed(packet, "has a body; it must be empty"))
    }
}

fn read_remaining_length(buf: &mut Bytes) -> Result<usize, DecodeError> {
    let mut len = 0usize;
    for i in 0..4 {
        if !buf.has_remaining() {
            return Err(malformed("fixed header", "remaining length is cut short"));
        }
        let b = buf.get_u8();
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(len);
        }
    }
    Err(malformed(
        "fixed header",
        "remaining length takes more than 4 bytes",
    ))
}

/// Writes the fixed header: type and flags, then the variable-length remaining length.
pub(crate) fn put_fixed_header(out: &mut BytesMut, first: u8, remaining: usize) {
    out.put_u8(first);
    let mut n = remaining;
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

/// Reads a big-endian u16, or says which field was cut short.
pub(crate) fn read_u16(
    buf: &mut Bytes,
    packet: &'static str,
    field: &str,
) -> Result<u16, DecodeError> {
    if buf.remaining() < 2 {
        return Err(malformed(packet, format!("{field} is cut short")));
    }
    Ok(buf.get_u16())
}

/// Reads a length-prefixed binary field.
pub(crate) fn read_binary(
    buf: &mut Bytes,
    packet: &'static str,
    field: &str,
) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(buf, packet, field)?);
    if buf.remaining() < len {
        return Err(malformed(
            packet,
            format!("{field} says {len} bytes but {} remain", buf.remaining()),
        ));
    }
    Ok(buf.split_to(len))
}

/// Reads a length-prefixed UTF-8 string; U+0000 is refused as [MQTT-1.5.3-2] requires.
pub(crate) fn read_string(
    buf: &mut Bytes,
    packet: &'static str,
    field: &str,
) -> Result<String, DecodeError> {
    let raw = read_binary(buf, packet, field)?;
    let s = std::str::from_utf8(&raw)
        .map_err(|_| malformed(packet, format!("{field} is not valid UTF-8")))?;
    if s.contains('\0') {
        return Err(malformed(packet, format!("{field} contains U+0000")));
    }
    Ok(s.to_owned())
}

/// Writes a length-prefixed field (callers keep it under 65,536 bytes).
pub(crate) fn put_binary(out: &mut BytesMut, data: &[u8]) {
    out.put_u16(data.len().min(usize::from(u16::MAX)) as u16);
    out.put_slice(&data[..data.len().min(usize::from(u16::MAX))]);
}

#[cfg(test)]
mod tests;
