//! The RocketMQ remoting wire format as pure functions over bytes: frames with JSON or binary
//! ("ROCKETMQ") headers ([`frame`]), and message payloads ([`record`]): the stored-message record
//! layout pulled messages travel in, batch send bodies, offset message ids and zlib bodies.
//! Message properties use the one shared codec, [`wharf_codec::properties`].
//!
//! Nothing here panics on input: every decoder returns a [`CodecError`] naming what is wrong.

pub mod fields;
pub mod frame;
pub mod record;

pub use fields::Fields;
pub use frame::{Command, SerializeType, decode_frame, encode_frame, frame_len};
pub use record::{
    BatchEntry, MessageRecord, decode_batch, decode_offset_msg_id, decode_record, decode_records,
    deflate, encode_batch_entry, encode_offset_msg_id, encode_record, inflate,
};

/// Largest frame accepted (RocketMQ's own default cap is 16 MiB).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Why bytes are not a valid remoting frame or payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A length field is out of range (negative, shorter than its own header, or over the cap).
    #[error("{what} length {len} is out of range (allowed {min}..={max})")]
    BadLength {
        /// Which length.
        what: &'static str,
        /// The value read.
        len: i64,
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
    },
    /// The input ended inside a field.
    #[error("{what} is cut short: needs {need} more bytes")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes missing.
        need: usize,
    },
    /// The header's serialize type is neither JSON (0) nor ROCKETMQ (1).
    #[error("unknown header serialize type {0}: expected 0 (JSON) or 1 (ROCKETMQ)")]
    SerializeType(u8),
    /// The JSON header is not what the protocol says.
    #[error("bad JSON header: {0}")]
    Json(String),
    /// A text field is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A stored-message record carries an unknown magic code.
    #[error("message record magic {0:#010x} is not V1 (0xdaa320a7) or V2 (0xdaa320a6)")]
    Magic(u32),
    /// A message id is not 32 hex characters.
    #[error("'{0}' is not an offset message id (32 hex characters: IPv4, port, offset)")]
    MessageId(String),
    /// A zlib body cannot be inflated, or inflates past the cap.
    #[error("compressed body: {0}")]
    Zlib(String),
    /// A value does not fit the field that carries it.
    #[error("{0} does not fit its field")]
    TooLong(&'static str),
}

/// Reads big-endian fields from a byte slice, failing cleanly on short input.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.remaining() < n {
            return Err(CodecError::Truncated {
                what,
                need: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, CodecError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, CodecError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, CodecError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// A length field as usize, checked against what is left of the input.
    pub(crate) fn len_i32(&mut self, what: &'static str) -> Result<usize, CodecError> {
        let n = self.i32(what)?;
        self.checked_len(what, i64::from(n))
    }

    pub(crate) fn len_i16(&mut self, what: &'static str) -> Result<usize, CodecError> {
        let n = self.i16(what)?;
        self.checked_len(what, i64::from(n))
    }

    fn checked_len(&self, what: &'static str, n: i64) -> Result<usize, CodecError> {
        let max = self.remaining() as i64;
        if n < 0 || n > max {
            return Err(CodecError::BadLength {
                what,
                len: n,
                min: 0,
                max,
            });
        }
        Ok(n as usize)
    }

    pub(crate) fn text(&mut self, n: usize, what: &'static str) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.bytes(n, what)?).map_err(|_| CodecError::NotUtf8(what))
    }
}
