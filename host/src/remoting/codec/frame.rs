//! Frames: `i32 total (= 4 + header_len + body_len) | i32 (serialize_type << 24 | header_len) |
//! header | body`, with the header in JSON or in RocketMQ's binary layout.
//!
//! JSON `extFields` values arrive as strings from Java-derived clients and as JSON numbers and
//! booleans from ali-ons; all are kept as the strings the client would sign (a number as its
//! shortest decimal form, a boolean as `true`/`false`). Replies always carry every field strict
//! clients insist on (`code`, `language`, `version`, `opaque`, `flag`,
//! `serializeTypeCurrentRPC`) and string-valued `extFields`.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{CodecError, Fields, MAX_FRAME_BYTES, Reader};

/// `flag` bit 0: the command is a response.
pub const FLAG_RESPONSE: i32 = 1;
/// `flag` bit 1: the request wants no response.
pub const FLAG_ONEWAY: i32 = 2;

/// How a frame's header is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SerializeType {
    /// JSON text (type 0): what every client speaks.
    #[default]
    Json,
    /// RocketMQ's binary layout (type 1).
    RocketMq,
}

impl SerializeType {
    fn byte(self) -> u8 {
        match self {
            SerializeType::Json => 0,
            SerializeType::RocketMq => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SerializeType::Json => "JSON",
            SerializeType::RocketMq => "ROCKETMQ",
        }
    }
}

/// One remoting command, request or response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    /// Request code, or response code in a response.
    pub code: i32,
    /// Client language name (`JAVA`, `GO`, …).
    pub language: String,
    /// Client version.
    pub version: i32,
    /// Matches a response to its request.
    pub opaque: i32,
    /// Bit 0 response, bit 1 oneway.
    pub flag: i32,
    /// Human-readable remark (why a request failed).
    pub remark: Option<String>,
    /// Header fields, as strings.
    pub ext_fields: Fields,
    /// How the header was (or is to be) serialized.
    pub serialize: SerializeType,
    /// Payload.
    pub body: Bytes,
}

impl Command {
    /// A request with `code` and no fields.
    pub fn request(code: i32, opaque: i32) -> Command {
        Command {
            code,
            language: "JAVA".into(),
            version: VERSION,
            opaque,
            ..Command::default()
        }
    }

    /// The response to `req` with `code` (serialized like the request, echoing its opaque).
    pub fn response_to(req: &Command, code: i32, remark: Option<String>) -> Command {
        Command {
            code,
            language: "JAVA".into(),
            version: VERSION,
            opaque: req.opaque,
            flag: FLAG_RESPONSE,
            remark,
            ext_fields: Fields::new(),
            serialize: req.serialize,
            body: Bytes::new(),
        }
    }

    /// True for a response.
    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    /// True for a oneway request.
    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    /// One header field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.ext_fields.get(name)
    }

    /// Sets one header field.
    pub fn set(&mut self, name: &str, value: impl fmt::Display) -> &mut Self {
        self.ext_fields.insert_display(name, value);
        self
    }
}

/// The version replies claim (RocketMQ 4.9.x), which every client accepts.
pub const VERSION: i32 = 399;

/// Length of the complete frame at the start of `buf` (its 4-byte length prefix included) once
/// the prefix is in; `Ok(None)` while fewer than 4 bytes are buffered. A length outside
/// `4..=MAX_FRAME_BYTES` is an error: the connection cannot be resynchronised.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let total = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if total < 4 || total as usize > MAX_FRAME_BYTES {
        return Err(CodecError::BadLength {
            what: "frame",
            len: i64::from(total),
            min: 4,
            max: MAX_FRAME_BYTES as i64,
        });
    }
    Ok(Some(4 + total as usize))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` until it is complete, else the command
/// and how many bytes it took.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Command, usize)>, CodecError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < len {
        return Ok(None);
    }
    let mut r = Reader::new(&buf[4..len]);
    let word = r.i32("header length")? as u32;
    let kind = (word >> 24) as u8;
    let header_len = (word & 0x00FF_FFFF) as usize;
    if header_len > r.remaining() {
        return Err(CodecError::BadLength {
            what: "header",
            len: header_len as i64,
            min: 0,
            max: r.remaining() as i64,
        });
    }
    let header = r.bytes(header_len, "header")?;
    let body = Bytes::copy_from_slice(r.bytes(r.remaining(), "body")?);
    let mut cmd = match kind {
        0 => decode_json_header(header)?,
        1 => decode_binary_header(header)?,
        other => return Err(CodecError::SerializeType(other)),
    };
    cmd.body = body;
    Ok(Some((cmd, len)))
}

/// Appends `cmd` as one frame to `out`.
pub fn encode_frame(cmd: &Command, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    match cmd.serialize {
        SerializeType::Json => encode_json_header(cmd, out)?,
        SerializeType::RocketMq => encode_binary_header(cmd, out)?,
    }
    let header_len = out.len() - start - 8;
    out.extend_from_slice(&cmd.body);
    let total = out.len() - start - 4;
    if header_len > 0x00FF_FFFF || total > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(CodecError::TooLong("frame"));
    }
    let word = (u32::from(cmd.serialize.byte()) << 24) | header_len as u32;
    out[start..start + 4].copy_from_slice(&(total as u32).to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&word.to_be_bytes());
    Ok(())
}

fn decode_json_header(header: &[u8]) -> Result<Command, CodecError> {
    // Straight into a `Command` through a visitor: building a `serde_json::Value` tree first and
    // copying out of it was the front end's largest single cost per send.
    let mut de = serde_json::Deserializer::from_slice(header);
    let head = HeaderFields::deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
        .map_err(|e| CodecError::Json(format!("not a valid header: {e}")))?;
    Ok(Command {
        code: head
            .code
            .ok_or_else(|| CodecError::Json("'code' is missing or not a number".into()))?,
        language: head.language.unwrap_or_else(|| "JAVA".into()),
        version: head.version.unwrap_or(0),
        opaque: head.opaque.unwrap_or(0),
        flag: head.flag.unwrap_or(0),
        remark: head.remark,
        ext_fields: head.ext_fields,
        serialize: SerializeType::Json,
        body: Bytes::new(),
    })
}

/// The JSON header's fields; unknown ones are skipped.
#[derive(Default)]
struct HeaderFields {
    code: Option<i32>,
    language: Option<String>,
    version: Option<i32>,
    opaque: Option<i32>,
    flag: Option<i32>,
    remark: Option<String>,
    ext_fields: Fields,
}

impl<'de> Deserialize<'de> for HeaderFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderFields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderFields, A::Error> {
                let mut h = HeaderFields::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match key.as_str() {
                        "code" => h.code = map.next_value::<Int>()?.0,
                        "version" => h.version = map.next_value::<Int>()?.0,
                        "opaque" => h.opaque = map.next_value::<Int>()?.0,
                        "flag" => h.flag = map.next_value::<Int>()?.0,
                        "language" => h.language = map.next_value::<FieldValue>()?.string(),
                        "remark" => h.remark = map.next_value::<FieldValue>()?.string(),
                        "extFields" => h.ext_fields = map.next_value::<ExtFields>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// An object key, borrowed from the input unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl Key<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A 32-bit integer given as a JSON number or a numeric string; `None` when null.
struct Int(Option<i32>);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn fit<E: de::Error, N: TryInto<i32>>(n: N) -> Result<Int, E> {
                n.try_into()
                    .map(|n| Int(Some(n)))
                    .map_err(|_| E::custom("a header number is not a 32-bit integer"))
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a 32-bit integer")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Int, E> {
                V::fit(n)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Int, E> {
                V::fit(n)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Int, E> {
                s.parse()
                    .map(|n| Int(Some(n)))
                    .map_err(|_| E::custom(format!("'{s}' is not a 32-bit integer")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Int, E> {
                Ok(Int(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `extFields`: every value kept as the string the client signed; null ones left out, as
/// clients skip them when signing.
struct ExtFields(Fields);

impl<'de> Deserialize<'de> for ExtFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExtFields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings, numbers and booleans")
            }
            fn visit_unit<E: de::Error>(self) -> Result<ExtFields, E> {
                Ok(ExtFields(Fields::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ExtFields, A::Error> {
                let mut fields = Fields::new();
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    let k = k.as_str();
                    match map.next_value::<FieldValue<'de>>()? {
                        // Clients skip null fields when signing; so do we.
                        FieldValue::Null => {}
                        FieldValue::Text(v) => fields.insert(k, &v),
                        FieldValue::Int(n) => fields.insert_display(k, n),
                        FieldValue::UInt(n) => fields.insert_display(k, n),
                        FieldValue::Bool(b) => fields.insert_display(k, b),
                        FieldValue::Compound => {
                            return Err(de::Error::custom(format!(
                                "extFields '{k}' must be a string, number or boolean"
                            )));
                        }
                    }
                }
                Ok(ExtFields(fields))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `extFields` value: text borrowed from the input unless it had escapes; numbers and
/// booleans as read, to be printed as the client's JSON had them.
enum FieldValue<'de> {
    Null,
    Text(Cow<'de, str>),
    Int(i64),
    UInt(u64),
    Bool(bool),
    Compound,
}

impl FieldValue<'_> {
    /// The value if it was a JSON string; any other value counts as absent.
    fn string(self) -> Option<String> {
        match self {
            FieldValue::Text(s) => Some(s.into_owned()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for FieldValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Text(Cow::Owned(s.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Int(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::UInt(n))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<FieldValue<'de>, E> {
                // `serde_json` prints 1.0 as "1.0", as the client's JSON encoder did.
                Ok(
                    serde_json::Number::from_f64(n).map_or(FieldValue::Null, |n| {
                        FieldValue::Text(Cow::Owned(n.to_string()))
                    }),
                )
            }
            fn visit_unit<E: de::Error>(self) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FieldValue<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Compound)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FieldValue<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Compound)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonHeader<'a> {
    code: i32,
    language: &'a str,
    version: i32,
    opaque: i32,
    flag: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    remark: Option<&'a str>,
    ext_fields: &'a Fields,
    #[serde(rename = "serializeTypeCurrentRPC")]
    serialize_type_current_rpc: &'static str,
}

fn encode_json_header(cmd: &Command, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let h = JsonHeader {
        code: cmd.code,
        // Replies built by `response_to` say "JAVA", a name every strict client knows.
        language: &cmd.language,
        version: cmd.version,
        opaque: cmd.opaque,
        flag: cmd.flag,
        remark: cmd.remark.as_deref(),
        ext_fields: &cmd.ext_fields,
        serialize_type_current_rpc: SerializeType::Json.name(),
    };
    serde_json::to_writer(out, &h).map_err(|e| CodecError::Json(e.to_string()))
}

/// RocketMQ's `LanguageCode` ordinals, for binary headers.
const LANGUAGES: [&str; 13] = [
    "JAVA", "CPP", "DOTNET", "PYTHON", "DELPHI", "ERLANG", "RUBY", "OTHER", "HTTP", "GO", "PHP",
    "OMS", "RUST",
];

fn decode_binary_header(header: &[u8]) -> Result<Command, CodecError> {
    let mut r = Reader::new(header);
    let code = i32::from(r.i16("code")?);
    let language = LANGUAGES
        .get(usize::from(r.u8("language")?))
        .unwrap_or(&"OTHER")
        .to_string();
    let version = i32::from(r.i16("version")?);
    let opaque = r.i32("opaque")?;
    let flag = r.i32("flag")?;
    let remark_len = r.len_i32("remark")?;
    let remark = (remark_len > 0)
        .then(|| r.text(remark_len, "remark").map(str::to_string))
        .transpose()?;
    let fields_len = r.len_i32("extFields")?;
    let mut f = Reader::new(r.bytes(fields_len, "extFields")?);
    let mut ext_fields = Fields::new();
    while f.remaining() > 0 {
        let klen = f.len_i16("extFields key")?;
        let key = f.text(klen, "extFields key")?;
        let vlen = f.len_i32("extFields value")?;
        let value = f.text(vlen, "extFields value")?;
        ext_fields.insert(key, value);
    }
    Ok(Command {
        code,
        language,
        version,
        opaque,
        flag,
        remark,
        ext_fields,
        serialize: SerializeType::RocketMq,
        body: Bytes::new(),
    })
}

fn encode_binary_header(cmd: &Command, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let code = i16::try_from(cmd.code).map_err(|_| CodecError::TooLong("code"))?;
    let version = i16::try_from(cmd.version).unwrap_or(i16::MAX);
    let language = LANGUAGES
        .iter()
        .position(|l| *l == cmd.language)
        .unwrap_or(0) as u8;
    out.extend_from_slice(&code.to_be_bytes());
    out.push(language);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&cmd.opaque.to_be_bytes());
    out.extend_from_slice(&cmd.flag.to_be_bytes());
    let remark = cmd.remark.as_deref().unwrap_or("");
    out.extend_from_slice(&(remark.len() as u32).to_be_bytes());
    out.extend_from_slice(remark.as_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0u8; 4]);
    for (k, v) in cmd.ext_fields.iter() {
        let klen = i16::try_from(k.len()).map_err(|_| CodecError::TooLong("extFields key"))?;
        out.extend_from_slice(&klen.to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    let fields_len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&fields_len.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(header: &[u8], kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + header.len() + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(&((u32::from(kind) << 24) | header.len() as u32).to_be_bytes());
        out.extend_from_slice(header);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn decodes_an_ali_ons_request_with_numbers_and_booleans() {
        let header = br#"{"code":310,"language":"JAVA","opaque":7,"flag":0,"version":121,
            "extFields":{"a":"PID_x","b":"Trade","d":4,"e":2,"k":false,"g":1700000000123}}"#;
        let buf = frame(header, 0, b"hello");
        let (cmd, used) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!((cmd.code, cmd.opaque, cmd.version), (310, 7, 121));
        assert_eq!(cmd.field("d"), Some("4"));
        assert_eq!(cmd.field("k"), Some("false"));
        assert_eq!(cmd.field("g"), Some("1700000000123"));
        assert_eq!(&cmd.body[..], b"hello");
        assert_eq!(cmd.serialize, SerializeType::Json);
    }

    #[test]
    fn json_headers_take_strings_for_numbers_and_skip_what_they_do_not_know() {
        let header = br#"{"code":"34","opaque":null,"language":5,"remark":"a\"b","x":[1,{"y":2}],
            "extFields":{"n":null,"f":1.5,"e\u0041":"v\n"},"serializeTypeCurrentRPC":"JSON"}"#;
        let (cmd, _) = decode_frame(&frame(header, 0, b"")).unwrap().unwrap();
        assert_eq!((cmd.code, cmd.opaque), (34, 0));
        assert_eq!(
            cmd.language, "JAVA",
            "a language that is not a string counts as absent"
        );
        assert_eq!(cmd.remark.as_deref(), Some("a\"b"));
        assert_eq!(
            cmd.field("n"),
            None,
            "null fields are left out, as clients sign them"
        );
        assert_eq!(cmd.field("f"), Some("1.5"));
        assert_eq!(cmd.field("eA"), Some("v\n"));
        for bad in [
            &br#"{"code":4294967296}"#[..],
            br#"{"code":true}"#,
            br#"{"code":1,"extFields":[]}"#,
            br#"{"code":1} trailing"#,
        ] {
            assert!(
                matches!(decode_frame(&frame(bad, 0, b"")), Err(CodecError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn json_replies_carry_what_strict_clients_need() {
        let req = Command::request(105, 42);
        let mut resp = Command::response_to(&req, 0, None);
        resp.set("queueId", 3);
        let mut out = Vec::new();
        encode_frame(&resp, &mut out).unwrap();
        let header_len = u32::from_be_bytes(out[4..8].try_into().unwrap()) as usize;
        let v: serde_json::Value = serde_json::from_slice(&out[8..8 + header_len]).unwrap();
        for k in [
            "code",
            "language",
            "version",
            "opaque",
            "flag",
            "serializeTypeCurrentRPC",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert_eq!(v["opaque"], 42);
        assert_eq!(v["flag"], 1);
        assert_eq!(v["extFields"]["queueId"], "3");
        assert!(v.get("remark").is_none());
    }

    #[test]
    fn partial_frames_wait_and_bad_lengths_fail() {
        let buf = frame(br#"{"code":34}"#, 0, b"");
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(matches!(
            decode_frame(&[0, 0, 0, 2, 0, 0]),
            Err(CodecError::BadLength { what: "frame", .. })
        ));
        assert!(matches!(
            decode_frame(&0x7fff_ffffu32.to_be_bytes()),
            Err(CodecError::BadLength { what: "frame", .. })
        ));
        // Header longer than the frame.
        let mut bad = frame(br#"{"code":34}"#, 0, b"");
        bad[7] = 200;
        assert!(matches!(
            decode_frame(&bad),
            Err(CodecError::BadLength { what: "header", .. })
        ));
        assert!(matches!(
            decode_frame(&frame(b"{}", 7, b"")),
            Err(CodecError::SerializeType(7))
        ));
        assert!(matches!(
            decode_frame(&frame(b"[1]", 0, b"")),
            Err(CodecError::Json(_))
        ));
        assert!(matches!(
            decode_frame(&frame(br#"{"opaque":1}"#, 0, b"")),
            Err(CodecError::Json(_))
        ));
        assert!(matches!(
            decode_frame(&frame(br#"{"code":1,"extFields":{"a":[1]}}"#, 0, b"")),
            Err(CodecError::Json(_))
        ));
    }

    #[test]
    fn binary_header_matches_the_layout() {
        let mut cmd = Command::request(10, 9);
        cmd.serialize = SerializeType::RocketMq;
        cmd.language = "GO".into();
        cmd.remark = Some("r".into());
        cmd.set("topic", "T");
        let mut out = Vec::new();
        encode_frame(&cmd, &mut out).unwrap();
        assert_eq!(out[4], 1, "serialize type byte");
        // code i16, language u8 (GO = 9), version i16, opaque i32, flag i32.
        assert_eq!(&out[8..10], &10i16.to_be_bytes());
        assert_eq!(out[10], 9);
        assert_eq!(&out[13..17], &9i32.to_be_bytes());
        let (back, _) = decode_frame(&out).unwrap().unwrap();
        assert_eq!(back, cmd);
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        (
            any::<i16>(),
            prop::sample::select(LANGUAGES.to_vec()),
            any::<i16>(),
            any::<i32>(),
            0i32..4,
            prop::option::of("[ -~]{1,20}"),
            prop::collection::btree_map("[a-zA-Z]{1,8}", "\\PC{0,12}", 0..6)
                .prop_map(|m| m.into_iter().collect::<Fields>()),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(
                |(code, lang, version, opaque, flag, remark, ext_fields, binary, body)| Command {
                    code: i32::from(code),
                    language: lang.to_string(),
                    version: i32::from(version),
                    opaque,
                    flag,
                    remark,
                    ext_fields,
                    serialize: if binary {
                        SerializeType::RocketMq
                    } else {
                        SerializeType::Json
                    },
                    body: Bytes::from(body),
                },
            )
    }

    proptest! {
        #[test]
        fn frames_round_trip(cmd in arb_command()) {
            let mut out = Vec::new();
            encode_frame(&cmd, &mut out).unwrap();
            let (back, used) = decode_frame(&out).unwrap().unwrap();
            prop_assert_eq!(used, out.len());
            // JSON drops an empty remark only when it is None; both keep everything else.
            prop_assert_eq!(back, cmd);
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&buf);
        }

        #[test]
        fn two_frames_in_one_buffer(a in arb_command(), b in arb_command()) {
            let mut out = Vec::new();
            encode_frame(&a, &mut out).unwrap();
            encode_frame(&b, &mut out).unwrap();
            let (first, used) = decode_frame(&out).unwrap().unwrap();
            let (second, used2) = decode_frame(&out[used..]).unwrap().unwrap();
            prop_assert_eq!(first, a);
            prop_assert_eq!(second, b);
            prop_assert_eq!(used + used2, out.len());
        }
    }
}
