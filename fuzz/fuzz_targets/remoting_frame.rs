//! Feeds arbitrary bytes to every remoting decoder: frames (JSON and binary headers), stored
//! message records, batch bodies, offset message ids and zlib bodies. None may panic; a decoded
//! frame must encode and decode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The host's remoting codec, compiled from its own source.
#[path = "../../host/src/remoting/codec/mod.rs"]
#[allow(dead_code, unused_imports)]
mod codec;
use codec::record;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((cmd, used))) = codec::decode_frame(rest) {
        let mut out = Vec::new();
        if codec::encode_frame(&cmd, &mut out).is_ok() {
            let again = codec::decode_frame(&out);
            assert!(matches!(again, Ok(Some((ref c, n))) if *c == cmd && n == out.len()));
        }
        rest = &rest[used..];
    }
    let _ = codec::frame_len(data);
    let _ = codec::decode_records(data);
    let _ = codec::decode_batch(data);
    let _ = record::inflate(data, 1 << 16);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = codec::decode_offset_msg_id(s);
    }
});
