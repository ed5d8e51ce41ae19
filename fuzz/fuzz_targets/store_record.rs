//! The embedded log's record format on arbitrary bytes: validation and decoding never panic,
//! also on bytes resealed with a right length, position and CRC (so the fuzzer reaches the body
//! decoder, not just the checksum), and a message that decodes encodes back to a record that
//! decodes to the same message (a moved timer copy with its origin's id, which the plain record
//! made again here does not carry).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wharf_fuzz::model::{MessageId, NewMessage, StoredMessage};
use wharf_fuzz::store::embedded::record::{
    EncodedBatch, HEADER, Header, MAX_RECORD, O_LEN, O_POS, decode_message, finish, keys_of,
    moved_of, put_u32, put_u64, seal, topic_of, validate,
};

const POS: u64 = 4096;
const NODE: u16 = 7;

fuzz_target!(|data: &[u8]| {
    // As read from disk: whatever validates is decoded without panicking.
    if let Ok(len) = validate(data, POS) {
        exercise(&data[..len]);
    }
    // Resealed, as a record the writer could have produced bit for bit.
    if (HEADER..=MAX_RECORD).contains(&data.len()) {
        let mut rec = data.to_vec();
        put_u32(&mut rec, O_LEN, data.len() as u32);
        put_u64(&mut rec, O_POS, POS);
        seal(&mut rec);
        if let Ok(len) = validate(&rec, POS) {
            assert_eq!(len, rec.len(), "a sealed record validates whole");
            exercise(&rec);
        }
    }
});

fn exercise(rec: &[u8]) {
    let h = Header::parse(rec);
    let _ = topic_of(rec);
    let _ = keys_of(rec);
    let Some(m) = decode_message(Bytes::copy_from_slice(rec), NODE) else {
        return;
    };
    let again = NewMessage {
        topic: m.topic.clone(),
        queue_id: m.queue_id,
        tag: m.tag.clone(),
        keys: m.keys.clone(),
        properties: m.properties.clone(),
        body: m.body.clone(),
        born_ms: m.born_ms,
        deliver_at_ms: m.deliver_at_ms,
        reconsume_times: m.reconsume_times,
        wire: m.wire,
    };
    // The encoder refuses what a writer never stores (an empty topic); the decoder may see it.
    let Ok(batch) = EncodedBatch::encode(std::slice::from_ref(&again)) else {
        return;
    };
    let one = &batch.recs[0];
    let mut rec2 = batch.buf[one.start..one.start + one.len as usize].to_vec();
    finish(&mut rec2, h.pos, h.stored_ms, h.queue_offset, h.held());
    assert_eq!(validate(&rec2, h.pos), Ok(rec2.len()), "re-encoded record validates");
    let decoded = decode_message(Bytes::from(rec2), NODE);
    // A moved copy reads back with its origin's id; the plain record made here sits at `h.pos`.
    let want = match moved_of(rec) {
        Some(_) => StoredMessage {
            id: MessageId::new(m.id.stored_ms(), NODE, h.pos),
            ..m
        },
        None => m,
    };
    assert_eq!(decoded.as_ref(), Some(&want), "round trip");
}
