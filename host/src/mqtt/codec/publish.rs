//! PUBLISH (3.3): flags (DUP, QoS, RETAIN), topic name, packet id for QoS > 0, payload.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, malformed, put_binary, put_fixed_header, read_string, read_u16};

const PACKET: &str = "PUBLISH";

/// An application message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag (a re-delivery).
    pub dup: bool,
    /// QoS 0..=2.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (no wildcards).
    pub topic: String,
    /// Packet id; present exactly when `qos > 0`.
    pub packet_id: Option<u16>,
    /// Payload (may be empty).
    pub payload: Bytes,
}

pub(super) fn decode(flags: u8, mut buf: Bytes) -> Result<Publish, DecodeError> {
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err(malformed(PACKET, "QoS 3 is not a QoS [MQTT-3.3.1-4]"));
    }
    let dup = flags & 0x08 != 0;
    if dup && qos == 0 {
        return Err(malformed(
            PACKET,
            "DUP set on a QoS 0 message [MQTT-3.3.1-2]",
        ));
    }
    let topic = read_string(&mut buf, PACKET, "topic name")?;
    let packet_id = if qos > 0 {
        let id = read_u16(&mut buf, PACKET, "packet identifier")?;
        if id == 0 {
            return Err(malformed(PACKET, "packet identifier 0 [MQTT-2.3.1-1]"));
        }
        Some(id)
    } else {
        None
    };
    Ok(Publish {
        dup,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        payload: buf,
    })
}

pub(super) fn encode(p: &Publish, out: &mut BytesMut) {
    let mut first = 0x30 | (p.qos.min(2) << 1);
    if p.dup {
        first |= 0x08;
    }
    if p.retain {
        first |= 0x01;
    }
    let id_len = if p.qos > 0 { 2 } else { 0 };
    let remaining = 2 + p.topic.len() + id_len + p.payload.len();
    out.reserve(remaining + 5);
    put_fixed_header(out, first, remaining);
    put_binary(out, p.topic.as_bytes());
    if p.qos > 0 {
        out.put_u16(p.packet_id.unwrap_or(1));
    }
    out.put_slice(&p.payload);
}
