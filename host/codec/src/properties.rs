//! RocketMQ's message property encoding: `name \x01 value \x02` for every pair.
//!
//! One encoding serves three jobs: the spec's 32,767-byte property limit is measured in it (tag
//! under `TAGS` and keys under `KEYS` included), plugins receive keys and properties packed in it
//! (one buffer crosses into the guest instead of one allocation per string), and the RocketMQ
//! remoting front end reads and writes it on the wire.
//!
//! Encoding appends to a caller's buffer, so a hot path reuses one buffer and allocates nothing
//! per pair. Decoding borrows from the input ([`decode`]) or builds an owned map
//! ([`decode_map`]). A name or value must not contain the separator bytes: [`check_pair`] says so
//! before anything is encoded, because the format has no escaping.

use std::collections::BTreeMap;
use std::fmt;

/// Ends a name (between name and value).
pub const NAME_END: u8 = 0x01;
/// Ends a pair.
pub const PAIR_END: u8 = 0x02;
/// Name under which a message's keys travel, joined by [`KEY_SEPARATOR`].
pub const KEYS: &str = "KEYS";
/// Name under which a message's tag travels.
pub const TAGS: &str = "TAGS";
/// Joins keys inside the [`KEYS`] value (so a key cannot contain it).
pub const KEY_SEPARATOR: char = ' ';

/// Why properties could not be encoded or decoded; offsets are bytes into the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertiesError {
    /// A pair has no name/value separator (0x01).
    MissingSeparator {
        /// Where the pair starts.
        at: usize,
    },
    /// A pair has a second 0x01, which no encoder writes (values cannot contain it).
    ExtraSeparator {
        /// Where the extra separator is.
        at: usize,
    },
    /// A pair's name is empty.
    EmptyName {
        /// Where the pair starts.
        at: usize,
    },
    /// A name or value is not UTF-8.
    NotUtf8 {
        /// Where the offending name or value starts.
        at: usize,
    },
    /// A name or value to encode contains a separator byte (0x01 or 0x02).
    SeparatorInPair {
        /// The property's name (escaped when shown).
        name: String,
    },
    /// A name to encode is empty.
    EmptyNameToEncode,
}

impl fmt::Display for PropertiesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertiesError::MissingSeparator { at } => write!(
                f,
                "malformed properties: the pair at byte {at} has no name/value separator (0x01)"
            ),
            PropertiesError::ExtraSeparator { at } => write!(
                f,
                "malformed properties: a second name/value separator (0x01) at byte {at}"
            ),
            PropertiesError::EmptyName { at } => {
                write!(
                    f,
                    "malformed properties: the pair at byte {at} has an empty name"
                )
            }
            PropertiesError::NotUtf8 { at } => {
                write!(
                    f,
                    "malformed properties: the text at byte {at} is not UTF-8"
                )
            }
            PropertiesError::SeparatorInPair { name } => write!(
                f,
                "property '{}' contains a control byte 0x01 or 0x02, which the property encoding reserves; remove it",
                name.escape_debug()
            ),
            PropertiesError::EmptyNameToEncode => {
                write!(f, "a property name is empty; give every property a name")
            }
        }
    }
}

impl std::error::Error for PropertiesError {}

/// Bytes one pair takes: the name, the value and both separators.
pub fn pair_len(name: &str, value_len: usize) -> usize {
    name.len() + value_len + 2
}

/// Bytes of the [`KEYS`] value for these keys (0 when there are none).
pub fn keys_value_len<'a>(keys: impl IntoIterator<Item = &'a str>) -> usize {
    let (n, bytes) = keys
        .into_iter()
        .fold((0usize, 0usize), |(n, b), k| (n + 1, b + k.len()));
    (bytes + n).saturating_sub(1)
}

/// Bytes the pairs take encoded.
pub fn encoded_len<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    pairs.into_iter().map(|(k, v)| pair_len(k, v.len())).sum()
}

/// Checks that a pair can be encoded and decoded back unchanged.
pub fn check_pair(name: &str, value: &str) -> Result<(), PropertiesError> {
    if name.is_empty() {
        return Err(PropertiesError::EmptyNameToEncode);
    }
    let reserved = |s: &str| s.bytes().any(|b| b == NAME_END || b == PAIR_END);
    if reserved(name) || reserved(value) {
        return Err(PropertiesError::SeparatorInPair {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Appends one pair (callers check it with [`check_pair`] where the input is untrusted).
pub fn encode_pair(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(NAME_END);
    out.extend_from_slice(value.as_bytes());
    out.push(PAIR_END);
}

/// Appends every pair, in order.
pub fn encode<'a>(out: &mut Vec<u8>, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
    for (name, value) in pairs {
        encode_pair(out, name, value);
    }
}

/// Appends the [`KEYS`] pair for these keys, joined without building the joined string; nothing
/// when there are no keys.
pub fn encode_keys<'a>(out: &mut Vec<u8>, keys: impl IntoIterator<Item = &'a str>) {
    let mut keys = keys.into_iter();
    let Some(first) = keys.next() else {
        return;
    };
    out.extend_from_slice(KEYS.as_bytes());
    out.push(NAME_END);
    out.extend_from_slice(first.as_bytes());
    for k in keys {
        let mut sep = [0u8; 4];
        out.extend_from_slice(KEY_SEPARATOR.encode_utf8(&mut sep).as_bytes());
        out.extend_from_slice(k.as_bytes());
    }
    out.push(PAIR_END);
}

/// Bytes a message's properties take as RocketMQ carries them: the user properties, the tag
/// under [`TAGS`] and the keys under [`KEYS`].
pub fn message_len<'a>(
    tag: Option<&str>,
    keys: impl IntoIterator<Item = &'a str>,
    properties: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> usize {
    let mut keys = keys.into_iter().peekable();
    let keys_len = match keys.peek() {
        Some(_) => pair_len(KEYS, keys_value_len(keys)),
        None => 0,
    };
    encoded_len(properties) + tag.map_or(0, |t| pair_len(TAGS, t.len())) + keys_len
}

/// Appends a message's properties (user properties, then [`TAGS`] when a tag is given, then
/// [`KEYS`] when there are keys); [`message_len`] bytes.
pub fn encode_message<'a>(
    out: &mut Vec<u8>,
    tag: Option<&str>,
    keys: impl IntoIterator<Item = &'a str>,
    properties: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    encode(out, properties);
    if let Some(tag) = tag {
        encode_pair(out, TAGS, tag);
    }
    encode_keys(out, keys);
}

/// The keys inside a [`KEYS`] value.
pub fn split_keys(value: &str) -> impl Iterator<Item = &str> {
    value.split(KEY_SEPARATOR).filter(|k| !k.is_empty())
}

/// Borrowed pairs of an encoded buffer, in order; see [`decode`].
#[derive(Debug, Clone)]
pub struct Pairs<'a> {
    input: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Reads the pairs of `input` without copying. The last pair may omit its closing 0x02 (older
/// RocketMQ clients write it so). After the first error the iterator ends.
pub fn decode(input: &[u8]) -> Pairs<'_> {
    Pairs {
        input,
        pos: 0,
        failed: false,
    }
}

fn text(bytes: &[u8], at: usize) -> Result<&str, PropertiesError> {
    std::str::from_utf8(bytes).map_err(|_| PropertiesError::NotUtf8 { at })
}

impl<'a> Pairs<'a> {
    fn pair(&mut self) -> Result<(&'a str, &'a str), PropertiesError> {
        let start = self.pos;
        let rest = &self.input[start..];
        let len = rest
            .iter()
            .position(|b| *b == PAIR_END)
            .unwrap_or(rest.len());
        let pair = &rest[..len];
        self.pos = (start + len + 1).min(self.input.len());
        let Some(sep) = pair.iter().position(|b| *b == NAME_END) else {
            return Err(PropertiesError::MissingSeparator { at: start });
        };
        let (name, value) = (&pair[..sep], &pair[sep + 1..]);
        if let Some(extra) = value.iter().position(|b| *b == NAME_END) {
            return Err(PropertiesError::ExtraSeparator {
                at: start + sep + 1 + extra,
            });
        }
        if name.is_empty() {
            return Err(PropertiesError::EmptyName { at: start });
        }
        Ok((text(name, start)?, text(value, start + sep + 1)?))
    }
}

impl<'a> Iterator for Pairs<'a> {
    type Item = Result<(&'a str, &'a str), PropertiesError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.input.len() {
            return None;
        }
        let item = self.pair();
        self.failed = item.is_err();
        Some(item)
    }
}

impl std::iter::FusedIterator for Pairs<'_> {}

/// Decodes into an owned map; a name given twice keeps its last value.
pub fn decode_map(input: &[u8]) -> Result<BTreeMap<String, String>, PropertiesError> {
    decode(input)
        .map(|pair| pair.map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, pairs.iter().copied());
        out
    }

    #[test]
    fn encodes_the_rocketmq_way() {
        assert_eq!(encoded(&[("a", "1"), ("bc", "")]), b"a\x011\x02bc\x01\x02");
        assert_eq!(encoded(&[]), b"");
        assert_eq!(encoded_len([("a", "1"), ("bc", "")]), 8);
    }

    #[test]
    fn keys_are_joined_without_a_joined_string() {
        let mut out = b"x\x01y\x02".to_vec();
        encode_keys(&mut out, ["k1", "key-2"]);
        assert_eq!(out, b"x\x01y\x02KEYS\x01k1 key-2\x02");
        assert_eq!(keys_value_len(["k1", "key-2"]), "k1 key-2".len());
        let mut none = Vec::new();
        encode_keys(&mut none, std::iter::empty());
        assert!(none.is_empty());
        assert_eq!(keys_value_len(std::iter::empty()), 0);
        assert_eq!(split_keys("k1 key-2").collect::<Vec<_>>(), ["k1", "key-2"]);
    }

    #[test]
    fn a_message_encodes_properties_then_tag_then_keys() {
        let props = [("color", "blue")];
        let mut out = Vec::new();
        encode_message(&mut out, Some("pay"), ["k1", "k2"], props);
        assert_eq!(out, b"color\x01blue\x02TAGS\x01pay\x02KEYS\x01k1 k2\x02");
        assert_eq!(message_len(Some("pay"), ["k1", "k2"], props), out.len());
        assert_eq!(message_len(None, [], []), 0);
    }

    #[test]
    fn decodes_borrowed_and_owned() {
        let bytes = b"TAGS\x01pay\x02KEYS\x01a b\x02color\x01blue\x02";
        let pairs: Vec<_> = decode(bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(pairs, [("TAGS", "pay"), ("KEYS", "a b"), ("color", "blue")]);
        let map = decode_map(b"a\x011\x02a\x012\x02").unwrap();
        assert_eq!(map["a"], "2", "the last value of a name wins");
    }

    #[test]
    fn last_pair_may_omit_its_terminator() {
        let pairs: Vec<_> = decode(b"a\x011\x02b\x012")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(pairs, [("a", "1"), ("b", "2")]);
    }

    #[test]
    fn malformed_input_is_located() {
        let first_err = |b: &[u8]| decode(b).find_map(Result::err).unwrap();
        assert_eq!(
            first_err(b"a\x011\x02oops\x02"),
            PropertiesError::MissingSeparator { at: 4 }
        );
        assert_eq!(
            first_err(b"a\x011\x01x\x02"),
            PropertiesError::ExtraSeparator { at: 3 }
        );
        assert_eq!(
            first_err(b"\x01v\x02"),
            PropertiesError::EmptyName { at: 0 }
        );
        assert_eq!(
            first_err(b"a\x01\xff\x02"),
            PropertiesError::NotUtf8 { at: 2 }
        );
        assert_eq!(
            first_err(b"a\x011\x02\x02"),
            PropertiesError::MissingSeparator { at: 4 }
        );
        let e = decode_map(b"a\x011\x02oops").unwrap_err();
        assert!(e.to_string().contains("byte 4"), "{e}");
        // The iterator stops at the first error.
        assert_eq!(decode(b"oops\x02a\x011\x02").count(), 1);
    }

    #[test]
    fn reserved_bytes_are_refused_before_encoding() {
        assert!(check_pair("color", "blue").is_ok());
        assert!(check_pair("color", "").is_ok());
        assert_eq!(check_pair("", "v"), Err(PropertiesError::EmptyNameToEncode));
        let e = check_pair("co\x01lor", "v").unwrap_err();
        assert!(e.to_string().contains("co\\u{1}lor"), "{e}");
        assert!(check_pair("color", "b\x02").is_err());
    }

    fn name() -> impl Strategy<Value = String> {
        "[^\\x01\\x02]{1,12}"
    }
    fn value() -> impl Strategy<Value = String> {
        "[^\\x01\\x02]{0,24}"
    }

    proptest! {
        #[test]
        fn round_trip(map in proptest::collection::btree_map(name(), value(), 0..12)) {
            let pairs = map.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            for (k, v) in pairs.clone() {
                prop_assert!(check_pair(k, v).is_ok());
            }
            let mut out = Vec::new();
            encode(&mut out, pairs.clone());
            prop_assert_eq!(out.len(), encoded_len(pairs));
            prop_assert_eq!(decode_map(&out).unwrap(), map);
        }

        #[test]
        fn message_length_is_the_encoded_length(
            tag in proptest::option::of("[a-z]{1,8}"),
            keys in proptest::collection::vec("[a-z0-9]{1,6}", 0..4),
            map in proptest::collection::btree_map(name(), value(), 0..6),
        ) {
            let no_keys = keys.is_empty();
            let keys = || keys.iter().map(String::as_str);
            let props = || map.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            let mut out = Vec::new();
            encode_message(&mut out, tag.as_deref(), keys(), props());
            prop_assert_eq!(out.len(), message_len(tag.as_deref(), keys(), props()));
            let decoded = decode_map(&out).unwrap();
            prop_assert_eq!(decoded.get(TAGS), tag.as_ref());
            let joined = keys().collect::<Vec<_>>().join(" ");
            prop_assert_eq!(decoded.get(KEYS).cloned(), (!no_keys).then_some(joined));
        }

        #[test]
        fn keys_round_trip(keys in proptest::collection::vec("[^\\x01\\x02 ]{1,10}", 1..6)) {
            let mut out = Vec::new();
            encode_keys(&mut out, keys.iter().map(String::as_str));
            prop_assert_eq!(
                out.len(),
                pair_len(KEYS, keys_value_len(keys.iter().map(String::as_str)))
            );
            let (name, value) = decode(&out).next().unwrap().unwrap();
            prop_assert_eq!(name, KEYS);
            prop_assert_eq!(split_keys(value).collect::<Vec<_>>(), keys);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Never panics; whatever decodes re-encodes to a prefix-equivalent map.
            if let Ok(map) = decode_map(&bytes) {
                let mut out = Vec::new();
                encode(&mut out, map.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                prop_assert_eq!(decode_map(&out).unwrap(), map);
            }
        }
    }
}
