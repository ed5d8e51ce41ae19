//! The MQTT codec on arbitrary bytes: framing then decoding never panics, and whatever decodes
//! encodes back to a packet that decodes to the same value.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

/// The host's MQTT codec, compiled from its own source.
#[path = "../../host/src/mqtt/codec/mod.rs"]
#[allow(dead_code, unused_imports)]
mod codec;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        match codec::frame(&buf, 1 << 20) {
            Ok(Some(n)) => {
                let frame: Bytes = buf.split_to(n).freeze();
                if let Ok(packet) = codec::decode(frame) {
                    let again = codec::to_bytes(&packet);
                    let len = codec::frame(&again, usize::MAX).ok().flatten();
                    assert_eq!(len, Some(again.len()), "re-encoded frame length");
                    assert_eq!(codec::decode(again).ok(), Some(packet), "round trip");
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
