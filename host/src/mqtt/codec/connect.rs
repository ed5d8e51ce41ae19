//! CONNECT (3.1): protocol name and level, flags, keep-alive, client id, will, credentials.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{DecodeError, malformed, put_binary, put_fixed_header, read_binary, read_string};

const PACKET: &str = "CONNECT";

/// A client's CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connect {
    /// Client identifier (may be empty when `clean_session`).
    pub client_id: String,
    /// Clean session flag.
    pub clean_session: bool,
    /// Keep-alive in seconds (0 = off).
    pub keep_alive: u16,
    /// Last will, if any.
    pub will: Option<Will>,
    /// User name, if any.
    pub username: Option<String>,
    /// Password bytes, if any.
    pub password: Option<Bytes>,
}

/// The message a server publishes when the client goes away without DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0..=2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

pub(super) fn decode(mut buf: Bytes) -> Result<Connect, DecodeError> {
    let name = read_string(&mut buf, PACKET, "protocol name")?;
    if !buf.has_remaining() {
        return Err(malformed(PACKET, "protocol level is missing"));
    }
    let level = buf.get_u8();
    if name != "MQTT" || level != 4 {
        return Err(DecodeError::UnsupportedProtocol { name, level });
    }
    if !buf.has_remaining() {
        return Err(malformed(PACKET, "connect flags are missing"));
    }
    let flags = buf.get_u8();
    if flags & 0x01 != 0 {
        return Err(malformed(
            PACKET,
            "reserved connect flag bit 0 is set [MQTT-3.1.2-3]",
        ));
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(malformed(
            PACKET,
            "will QoS or will retain set without the will flag [MQTT-3.1.2-13]",
        ));
    }
    if will_qos > 2 {
        return Err(malformed(PACKET, "will QoS 3 is not a QoS [MQTT-3.1.2-14]"));
    }
    if password_flag && !username_flag {
        return Err(malformed(
            PACKET,
            "password flag set without user name flag [MQTT-3.1.2-22]",
        ));
    }
    let keep_alive = super::read_u16(&mut buf, PACKET, "keep alive")?;
    let client_id = read_string(&mut buf, PACKET, "client identifier")?;
    let will = if will_flag {
        let topic = read_string(&mut buf, PACKET, "will topic")?;
        let payload = read_binary(&mut buf, PACKET, "will message")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(read_string(&mut buf, PACKET, "user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(read_binary(&mut buf, PACKET, "password")?)
    } else {
        None
    };
    if buf.has_remaining() {
        return Err(malformed(
            PACKET,
            format!("{} bytes follow the last field", buf.remaining()),
        ));
    }
    Ok(Connect {
        client_id,
        clean_session,
        keep_alive,
        will,
        username,
        password,
    })
}

pub(super) fn encode(c: &Connect, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    put_binary(&mut body, b"MQTT");
    body.put_u8(4);
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.min(2) << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    put_binary(&mut body, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        put_binary(&mut body, w.topic.as_bytes());
        put_binary(&mut body, &w.payload);
    }
    if let Some(u) = &c.username {
        put_binary(&mut body, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_binary(&mut body, p);
    }
    put_fixed_header(out, 0x10, body.len());
    out.put_slice(&body);
}
