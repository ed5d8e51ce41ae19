//! JSON request bodies to typed values, with errors that say where and what went wrong. No
//! HTTP types here, so the send-body parser is fuzzed on its own (`fuzz/`).

use serde::de::DeserializeOwned;

use crate::error::WharfError;

/// Which error code a body that does not parse gets.
#[derive(Debug, Clone, Copy)]
pub enum BodyKind {
    /// A message to send: MESSAGE_ILLEGAL (13).
    Message,
    /// Any other request: SYSTEM_ERROR (1), 400.
    Request,
}

/// Parses a JSON body, turning serde errors into a 400 that says where and what.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8], kind: BodyKind) -> Result<T, WharfError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(bad_body(
            kind,
            "request body is empty; send a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "malformed JSON",
            Category::Data => "invalid request",
        };
        bad_body(kind, format!("{what}: {e}"))
    })
}

/// Like [`parse_json`], but the body must be a JSON object (serde would also take an array for
/// a struct, which is never what the caller meant).
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8], kind: BodyKind) -> Result<T, WharfError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => parse_json(bytes, kind),
        Some(_) => Err(bad_body(
            kind,
            "request body must be a JSON object ({...})".into(),
        )),
    }
}

fn bad_body(kind: BodyKind, message: String) -> WharfError {
    match kind {
        BodyKind::Message => WharfError::illegal(message),
        BodyKind::Request => WharfError::bad_request(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Req {
        name: String,
        queues: Option<u32>,
    }

    #[test]
    fn malformed_json_says_where() {
        let e = parse_json::<Req>(b"{\"name\": \"a\",\n  \"queues\": }", BodyKind::Request)
            .unwrap_err();
        assert_eq!(e.http_status(), 400);
        assert_eq!(e.code, ErrorCode::SystemError);
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        assert!(e.message.contains("line 2 column"), "{}", e.message);
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_named() {
        let e = parse_json::<Req>(br#"{"name":"a","colour":1}"#, BodyKind::Request).unwrap_err();
        assert!(
            e.message.contains("unknown field `colour`"),
            "{}",
            e.message
        );
        let e = parse_json::<Req>(br#"{"name":"a","queues":"8"}"#, BodyKind::Message).unwrap_err();
        assert_eq!(e.code, ErrorCode::MessageIllegal);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        assert!(e.message.contains("column"), "{}", e.message);
        let e = parse_json::<Req>(b"  ", BodyKind::Request).unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse_object::<Req>(br#"["a", 1]"#, BodyKind::Request).unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        assert!(parse_object::<Req>(br#" {"name":"a"}"#, BodyKind::Request).is_ok());
    }
}
