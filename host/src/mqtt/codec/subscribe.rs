//! SUBSCRIBE (3.8), SUBACK (3.9) and UNSUBSCRIBE (3.10).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{DecodeError, malformed, put_binary, put_fixed_header, read_string, read_u16};

/// SUBACK return code for a refused filter.
pub const SUBACK_FAILURE: u8 = 0x80;

/// A client's SUBSCRIBE: filters with requested QoS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet id.
    pub packet_id: u16,
    /// (topic filter, requested QoS), at least one.
    pub filters: Vec<(String, u8)>,
}

/// The server's SUBACK: one code per filter, in order (granted QoS or 0x80).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet id of the SUBSCRIBE.
    pub packet_id: u16,
    /// Return codes.
    pub codes: Vec<u8>,
}

/// A client's UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet id.
    pub packet_id: u16,
    /// Topic filters, at least one.
    pub filters: Vec<String>,
}

fn packet_id(buf: &mut Bytes, packet: &'static str) -> Result<u16, DecodeError> {
    let id = read_u16(buf, packet, "packet identifier")?;
    if id == 0 {
        return Err(malformed(packet, "packet identifier 0 [MQTT-2.3.1-1]"));
    }
    Ok(id)
}

pub(super) fn decode_subscribe(mut buf: Bytes) -> Result<Subscribe, DecodeError> {
    const P: &str = "SUBSCRIBE";
    let packet_id = packet_id(&mut buf, P)?;
    let mut filters = Vec::new();
    while buf.has_remaining() {
        let filter = read_string(&mut buf, P, "topic filter")?;
        if !buf.has_remaining() {
            return Err(malformed(
                P,
                format!("filter '{filter}' has no requested QoS"),
            ));
        }
        let qos = buf.get_u8();
        if qos > 2 {
            return Err(malformed(
                P,
                format!(
                    "requested QoS byte {qos:#04x} for '{filter}' is not 0, 1 or 2 [MQTT-3.8.3-4]"
                ),
            ));
        }
        filters.push((filter, qos));
    }
    if filters.is_empty() {
        return Err(malformed(P, "no topic filter [MQTT-3.8.3-3]"));
    }
    Ok(Subscribe { packet_id, filters })
}

pub(super) fn encode_subscribe(s: &Subscribe, out: &mut BytesMut) {
    let remaining = 2 + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
    put_fixed_header(out, 0x82, remaining);
    out.put_u16(s.packet_id);
    for (f, q) in &s.filters {
        put_binary(out, f.as_bytes());
        out.put_u8(*q);
    }
}

pub(super) fn decode_suback(mut buf: Bytes) -> Result<SubAck, DecodeError> {
    const P: &str = "SUBACK";
    let packet_id = read_u16(&mut buf, P, "packet identifier")?;
    let codes = buf.to_vec();
    if let Some(c) = codes.iter().find(|&&c| c > 2 && c != SUBACK_FAILURE) {
        return Err(malformed(P, format!("return code {c:#04x} is reserved")));
    }
    Ok(SubAck { packet_id, codes })
}

pub(super) fn encode_suback(s: &SubAck, out: &mut BytesMut) {
    put_fixed_header(out, 0x90, 2 + s.codes.len());
    out.put_u16(s.packet_id);
    out.put_slice(&s.codes);
}

pub(super) fn decode_unsubscribe(mut buf: Bytes) -> Result<Unsubscribe, DecodeError> {
    const P: &str = "UNSUBSCRIBE";
    let packet_id = packet_id(&mut buf, P)?;
    let mut filters = Vec::new();
    while buf.has_remaining() {
        filters.push(read_string(&mut buf, P, "topic filter")?);
    }
    if filters.is_empty() {
        return Err(malformed(P, "no topic filter [MQTT-3.10.3-2]"));
    }
    Ok(Unsubscribe { packet_id, filters })
}

pub(super) fn encode_unsubscribe(u: &Unsubscribe, out: &mut BytesMut) {
    let remaining = 2 + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
    put_fixed_header(out, 0xa2, remaining);
    out.put_u16(u.packet_id);
    for f in &u.filters {
        put_binary(out, f.as_bytes());
    }
}
