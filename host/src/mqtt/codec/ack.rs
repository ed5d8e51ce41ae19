//! The five packets that carry only a packet id: PUBACK, PUBREC, PUBREL, PUBCOMP (3.4–3.7) and
//! UNSUBACK (3.11).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{DecodeError, Packet, malformed};

/// Which of the packet-id-only packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckKind {
    /// PUBACK: QoS 1 done.
    PubAck,
    /// PUBREC: QoS 2 part 1.
    PubRec,
    /// PUBREL: QoS 2 part 2.
    PubRel,
    /// PUBCOMP: QoS 2 done.
    PubComp,
    /// UNSUBACK.
    UnsubAck,
}

impl AckKind {
    /// Packet name.
    pub fn name(self) -> &'static str {
        match self {
            AckKind::PubAck => "PUBACK",
            AckKind::PubRec => "PUBREC",
            AckKind::PubRel => "PUBREL",
            AckKind::PubComp => "PUBCOMP",
            AckKind::UnsubAck => "UNSUBACK",
        }
    }

    fn first_byte(self) -> u8 {
        match self {
            AckKind::PubAck => 0x40,
            AckKind::PubRec => 0x50,
            // PUBREL's fixed header flags are 0010 [MQTT-3.6.1-1].
            AckKind::PubRel => 0x62,
            AckKind::PubComp => 0x70,
            AckKind::UnsubAck => 0xb0,
        }
    }
}

pub(super) fn decode(kind: AckKind, flags: u8, mut buf: Bytes) -> Result<Packet, DecodeError> {
    let want = kind.first_byte() & 0x0f;
    if flags != want {
        return Err(malformed(
            kind.name(),
            format!("fixed header flags are {flags:#06b}, must be {want:#06b}"),
        ));
    }
    if buf.len() != 2 {
        return Err(malformed(
            kind.name(),
            format!(
                "has {} bytes after the fixed header, must have 2",
                buf.len()
            ),
        ));
    }
    Ok(Packet::Ack(kind, buf.get_u16()))
}

pub(super) fn encode(kind: AckKind, id: u16, out: &mut BytesMut) {
    out.put_u8(kind.first_byte());
    out.put_u8(2);
    out.put_u16(id);
}
