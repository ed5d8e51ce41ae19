//! CONNACK (3.2): session present and the return code.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{DecodeError, malformed};

const PACKET: &str = "CONNACK";

/// CONNACK return codes (3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectCode {
    /// 0: connection accepted.
    Accepted = 0,
    /// 1: the server does not support the protocol level.
    UnacceptableProtocol = 1,
    /// 2: the client identifier is not allowed.
    IdentifierRejected = 2,
    /// 3: the service is unavailable.
    ServerUnavailable = 3,
    /// 4: malformed user name or password.
    BadCredentials = 4,
    /// 5: not authorized.
    NotAuthorized = 5,
}

impl ConnectCode {
    fn from_u8(b: u8) -> Option<ConnectCode> {
        Some(match b {
            0 => ConnectCode::Accepted,
            1 => ConnectCode::UnacceptableProtocol,
            2 => ConnectCode::IdentifierRejected,
            3 => ConnectCode::ServerUnavailable,
            4 => ConnectCode::BadCredentials,
            5 => ConnectCode::NotAuthorized,
            _ => return None,
        })
    }
}

/// The server's CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Session present flag (only with `Accepted`).
    pub session_present: bool,
    /// Return code.
    pub code: ConnectCode,
}

pub(super) fn decode(mut buf: Bytes) -> Result<ConnAck, DecodeError> {
    if buf.len() != 2 {
        return Err(malformed(
            PACKET,
            format!("has {} bytes, must have 2", buf.len()),
        ));
    }
    let flags = buf.get_u8();
    if flags & 0xfe != 0 {
        return Err(malformed(PACKET, "reserved acknowledge flags are set"));
    }
    let raw = buf.get_u8();
    let code = ConnectCode::from_u8(raw)
        .ok_or_else(|| malformed(PACKET, format!("return code {raw} is reserved")))?;
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        code,
    })
}

pub(super) fn encode(c: &ConnAck, out: &mut BytesMut) {
    out.put_slice(&[0x20, 2, u8::from(c.session_present), c.code as u8]);
}
