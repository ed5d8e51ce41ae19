//! Message payloads: the stored-message record layout pulled messages travel in, batch send
//! bodies, offset message ids, and zlib bodies (sysFlag bit 0).
//!
//! Record layout (all big-endian): `TOTALSIZE i32 | MAGIC i32 | BODYCRC i32 | QUEUEID i32 |
//! FLAG i32 | QUEUEOFFSET i64 | PHYSICALOFFSET i64 | SYSFLAG i32 | BORNTIMESTAMP i64 |
//! BORNHOST (IPv4 + i32 port) | STORETIMESTAMP i64 | STOREHOST (IPv4 + i32 port) |
//! RECONSUMETIMES i32 | PREPAREDTRANSACTIONOFFSET i64 | i32 len + BODY | u8 len + TOPIC |
//! i16 len + PROPERTIES`. Wharf writes V1 with IPv4 hosts, which every client reads; it reads
//! V2 (hosts of 16 bytes when sysFlag bits 0x10 / 0x20 say IPv6) as well.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use super::{CodecError, Reader};

/// V1 record magic.
pub const MAGIC_V1: u32 = 0xDAA3_20A7;
/// V2 record magic (RocketMQ 5: topic length as i16).
pub const MAGIC_V2: u32 = 0xDAA3_20A6;
/// sysFlag bit 0: the body is zlib-compressed.
pub const SYSFLAG_COMPRESSED: i32 = 0x1;
/// sysFlag bit 4: the born host is IPv6 (16 bytes).
pub const SYSFLAG_BORNHOST_V6: i32 = 0x10;
/// sysFlag bit 5: the store host is IPv6 (16 bytes).
pub const SYSFLAG_STOREHOST_V6: i32 = 0x20;
/// Largest body a zlib payload may inflate to (Wharf's 4 MiB message cap).
pub const MAX_INFLATED_BYTES: usize = 4 * 1024 * 1024;

/// One message in the record layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Queue id.
    pub queue_id: i32,
    /// The producer's flag.
    pub flag: i32,
    /// Offset within the queue.
    pub queue_offset: i64,
    /// Log position (what send-back and offset message ids carry).
    pub physical_offset: i64,
    /// System flags (compression; the IPv6 bits are derived from the hosts on encode).
    pub sys_flag: i32,
    /// Producer time (ms).
    pub born_ms: i64,
    /// Producer address.
    pub born_host: SocketAddr,
    /// Store time (ms).
    pub store_ms: i64,
    /// Broker address.
    pub store_host: SocketAddr,
    /// Redelivery count.
    pub reconsume_times: i32,
    /// Transaction prepare offset (0).
    pub prepared_tx_offset: i64,
    /// Body as on the wire (compressed when sysFlag bit 0 is set).
    pub body: Vec<u8>,
    /// Topic.
    pub topic: String,
    /// Encoded properties (`k\x01v\x02…`).
    pub properties: Vec<u8>,
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(
            a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            a.port(),
        ),
    }
}

fn put_host(out: &mut Vec<u8>, addr: SocketAddrV4) {
    out.extend_from_slice(&addr.ip().octets());
    out.extend_from_slice(&i32::from(addr.port()).to_be_bytes());
}

/// Bytes [`encode_record`] writes for `r`.
pub fn record_len(r: &MessageRecord) -> usize {
    4 + 4
        + 4
        + 4
        + 4
        + 8
        + 8
        + 4
        + 8
        + 8
        + 8
        + 8
        + 4
        + 8
        + 4
        + r.body.len()
        + 1
        + r.topic.len()
        + 2
        + r.properties.len()
}

/// Appends `r` as a V1 record (IPv4 hosts; an IPv6 host is written as its mapped IPv4 address or
/// 0.0.0.0) with an exact TOTALSIZE and the body's CRC32.
pub fn encode_record(r: &MessageRecord, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let topic_len = u8::try_from(r.topic.len()).map_err(|_| CodecError::TooLong("topic"))?;
    let props_len =
        i16::try_from(r.properties.len()).map_err(|_| CodecError::TooLong("properties"))?;
    let body_len = i32::try_from(r.body.len()).map_err(|_| CodecError::TooLong("body"))?;
    let total = i32::try_from(record_len(r)).map_err(|_| CodecError::TooLong("record"))?;
    let mut crc = flate2::Crc::new();
    crc.update(&r.body);
    let sys_flag = r.sys_flag & !(SYSFLAG_BORNHOST_V6 | SYSFLAG_STOREHOST_V6);
    out.reserve(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&MAGIC_V1.to_be_bytes());
    out.extend_from_slice(&crc.sum().to_be_bytes());
    out.extend_from_slice(&r.queue_id.to_be_bytes());
    out.extend_from_slice(&r.flag.to_be_bytes());
    out.extend_from_slice(&r.queue_offset.to_be_bytes());
    out.extend_from_slice(&r.physical_offset.to_be_bytes());
    out.extend_from_slice(&sys_flag.to_be_bytes());
    out.extend_from_slice(&r.born_ms.to_be_bytes());
    put_host(out, v4(r.born_host));
    out.extend_from_slice(&r.store_ms.to_be_bytes());
    put_host(out, v4(r.store_host));
    out.extend_from_slice(&r.reconsume_times.to_be_bytes());
    out.extend_from_slice(&r.prepared_tx_offset.to_be_bytes());
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&r.body);
    out.push(topic_len);
    out.extend_from_slice(r.topic.as_bytes());
    out.extend_from_slice(&props_len.to_be_bytes());
    out.extend_from_slice(&r.properties);
    Ok(())
}

fn get_host(r: &mut Reader<'_>, v6: bool, what: &'static str) -> Result<SocketAddr, CodecError> {
    let ip: std::net::IpAddr = if v6 {
        let mut b = [0u8; 16];
        b.copy_from_slice(r.bytes(16, what)?);
        Ipv6Addr::from(b).into()
    } else {
        let b = r.bytes(4, what)?;
        Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
    };
    let port = r.i32(what)?;
    Ok(SocketAddr::new(ip, port as u16))
}

/// Decodes one record at the start of `buf`; returns it and its TOTALSIZE.
pub fn decode_record(buf: &[u8]) -> Result<(MessageRecord, usize), CodecError> {
    let mut head = Reader::new(buf);
    let total = head.i32("TOTALSIZE")?;
    if total < 4 || total as usize > buf.len() {
        return Err(CodecError::BadLength {
            what: "record",
            len: i64::from(total),
            min: 4,
            max: buf.len() as i64,
        });
    }
    let mut r = Reader::new(&buf[4..total as usize]);
    let magic = r.i32("MAGIC")? as u32;
    if magic != MAGIC_V1 && magic != MAGIC_V2 {
        return Err(CodecError::Magic(magic));
    }
    let _crc = r.i32("BODYCRC")?;
    let queue_id = r.i32("QUEUEID")?;
    let flag = r.i32("FLAG")?;
    let queue_offset = r.i64("QUEUEOFFSET")?;
    let physical_offset = r.i64("PHYSICALOFFSET")?;
    let sys_flag = r.i32("SYSFLAG")?;
    let born_ms = r.i64("BORNTIMESTAMP")?;
    let born_host = get_host(&mut r, sys_flag & SYSFLAG_BORNHOST_V6 != 0, "BORNHOST")?;
    let store_ms = r.i64("STORETIMESTAMP")?;
    let store_host = get_host(&mut r, sys_flag & SYSFLAG_STOREHOST_V6 != 0, "STOREHOST")?;
    let reconsume_times = r.i32("RECONSUMETIMES")?;
    let prepared_tx_offset = r.i64("PREPAREDTRANSACTIONOFFSET")?;
    let body_len = r.len_i32("BODY")?;
    let body = r.bytes(body_len, "BODY")?.to_vec();
    let topic_len = if magic == MAGIC_V2 {
        r.len_i16("TOPIC")?
    } else {
        usize::from(r.u8("TOPIC")?)
    };
    let topic = r.text(topic_len, "TOPIC")?.to_string();
    let props_len = r.len_i16("PROPERTIES")?;
    let properties = r.bytes(props_len, "PROPERTIES")?.to_vec();
    Ok((
        MessageRecord {
            queue_id,
            flag,
            queue_offset,
            physical_offset,
            sys_flag,
            born_ms,
            born_host,
            store_ms,
            store_host,
            reconsume_times,
            prepared_tx_offset,
            body,
            topic,
            properties,
        },
        total as usize,
    ))
}

/// Decodes a pull reply body: concatenated records.
pub fn decode_records(mut buf: &[u8]) -> Result<Vec<MessageRecord>, CodecError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (rec, used) = decode_record(buf)?;
        out.push(rec);
        buf = &buf[used..];
    }
    Ok(out)
}

/// One message of a SEND_BATCH_MESSAGE body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry<'a> {
    /// The producer's flag.
    pub flag: i32,
    /// Body.
    pub body: &'a [u8],
    /// Encoded properties.
    pub properties: &'a [u8],
}

/// Decodes a batch body: repeated `i32 total | i32 magic | i32 body crc | i32 flag |
/// i32 len + body | i16 len + properties`, each entry exactly `total` bytes long.
pub fn decode_batch(buf: &[u8]) -> Result<Vec<BatchEntry<'_>>, CodecError> {
    let mut out = Vec::new();
    let mut r = Reader::new(buf);
    while r.remaining() > 0 {
        let start = r.pos();
        let total = r.i32("batch entry size")?;
        let max = (r.remaining() + 4) as i64;
        if i64::from(total) < 22 || i64::from(total) > max {
            return Err(CodecError::BadLength {
                what: "batch entry",
                len: i64::from(total),
                min: 22,
                max,
            });
        }
        let _magic = r.i32("batch entry magic")?;
        let _crc = r.i32("batch entry body crc")?;
        let flag = r.i32("batch entry flag")?;
        let body_len = r.len_i32("batch entry body")?;
        let body = r.bytes(body_len, "batch entry body")?;
        let props_len = r.len_i16("batch entry properties")?;
        let properties = r.bytes(props_len, "batch entry properties")?;
        if r.pos() - start != total as usize {
            return Err(CodecError::BadLength {
                what: "batch entry",
                len: i64::from(total),
                min: (r.pos() - start) as i64,
                max: (r.pos() - start) as i64,
            });
        }
        out.push(BatchEntry {
            flag,
            body,
            properties,
        });
    }
    Ok(out)
}

/// Appends one batch entry (what a producer sends; for tests and the bench).
pub fn encode_batch_entry(e: &BatchEntry<'_>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let props_len =
        i16::try_from(e.properties.len()).map_err(|_| CodecError::TooLong("properties"))?;
    let total = i32::try_from(22 + e.body.len() + e.properties.len())
        .map_err(|_| CodecError::TooLong("batch entry"))?;
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&e.flag.to_be_bytes());
    out.extend_from_slice(&(e.body.len() as i32).to_be_bytes());
    out.extend_from_slice(e.body);
    out.extend_from_slice(&props_len.to_be_bytes());
    out.extend_from_slice(e.properties);
    Ok(())
}

/// The offset message id of the record at `offset` stored by `store_host`: 32 upper-case hex
/// characters of the IPv4 address, the port as i32 and the offset as i64.
pub fn encode_offset_msg_id(store_host: SocketAddr, offset: u64) -> String {
    let a = v4(store_host);
    // Address, port as a 4-byte int, offset: big-endian bytes in upper-case hex, which is
    // each number printed in upper-case hex at its full width.
    format!(
        "{:08X}{:08X}{:016X}",
        u32::from(*a.ip()),
        u32::from(a.port()),
        offset
    )
}

/// Splits an offset message id into store host and offset.
pub fn decode_offset_msg_id(id: &str) -> Result<(SocketAddrV4, u64), CodecError> {
    let bad = || CodecError::MessageId(id.chars().take(64).collect());
    if id.len() != 32 {
        return Err(bad());
    }
    let v = hex::decode(id).map_err(|_| bad())?;
    let ip = Ipv4Addr::new(v[0], v[1], v[2], v[3]);
    let port = i32::from_be_bytes([v[4], v[5], v[6], v[7]]);
    let port = u16::try_from(port).map_err(|_| bad())?;
    let mut off = [0u8; 8];
    off.copy_from_slice(&v[8..16]);
    Ok((SocketAddrV4::new(ip, port), u64::from_be_bytes(off)))
}

/// Inflates a zlib body, refusing to grow past `limit` bytes (a small frame must not become a
/// huge allocation).
pub fn inflate(body: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    let mut d = flate2::read::ZlibDecoder::new(body).take(limit as u64 + 1);
    d.read_to_end(&mut out)
        .map_err(|e| CodecError::Zlib(format!("not a zlib stream: {e}")))?;
    if out.len() > limit {
        return Err(CodecError::Zlib(format!(
            "inflates past {limit} bytes; send it uncompressed or smaller"
        )));
    }
    Ok(out)
}

/// Compresses a body with zlib (what sysFlag bit 0 means to every client).
pub fn deflate(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(body.len() / 2),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = e.write_all(body);
    e.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> MessageRecord {
        MessageRecord {
            queue_id: 3,
            flag: 0,
            queue_offset: 17,
            physical_offset: 123_456,
            sys_flag: 0,
            born_ms: 1_700_000_000_000,
            born_host: "10.0.0.2:50000".parse().unwrap(),
            store_ms: 1_700_000_000_005,
            store_host: "127.0.0.1:9876".parse().unwrap(),
            reconsume_times: 1,
            prepared_tx_offset: 0,
            body: b"hello".to_vec(),
            topic: "Trade".into(),
            properties: b"TAGS\x01order\x02KEYS\x01k1\x02".to_vec(),
        }
    }

    #[test]
    fn record_layout_and_exact_totalsize() {
        let r = sample();
        let mut out = Vec::new();
        encode_record(&r, &mut out).unwrap();
        assert_eq!(out.len(), record_len(&r));
        assert_eq!(
            i32::from_be_bytes(out[0..4].try_into().unwrap()) as usize,
            out.len()
        );
        assert_eq!(&out[4..8], &MAGIC_V1.to_be_bytes());
        // BODYCRC = CRC32 of "hello".
        assert_eq!(&out[8..12], &0x3610_a686u32.to_be_bytes());
        // Born host starts after 4*5 + 8*2 + 4 + 8 = 48 bytes.
        assert_eq!(&out[48..52], &[10, 0, 0, 2]);
        assert_eq!(&out[52..56], &50000i32.to_be_bytes());
        let (back, used) = decode_record(&out).unwrap();
        assert_eq!((back, used), (r, out.len()));
    }

    #[test]
    fn truncated_or_bad_records_fail_cleanly() {
        let mut out = Vec::new();
        encode_record(&sample(), &mut out).unwrap();
        for cut in 0..out.len() {
            assert!(decode_record(&out[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = out.clone();
        bad[4] = 0;
        assert!(matches!(decode_record(&bad), Err(CodecError::Magic(_))));
    }

    #[test]
    fn offset_message_ids_are_32_upper_hex() {
        let id = encode_offset_msg_id("127.0.0.1:9876".parse().unwrap(), 0x1234);
        assert_eq!(id, "7F000001000026940000000000001234");
        let (host, off) = decode_offset_msg_id(&id).unwrap();
        assert_eq!(host.to_string(), "127.0.0.1:9876");
        assert_eq!(off, 0x1234);
        assert!(decode_offset_msg_id("xyz").is_err());
        assert!(decode_offset_msg_id(&"G".repeat(32)).is_err());
    }

    #[test]
    fn batch_bodies_decode_and_reject_bad_sizes() {
        let mut buf = Vec::new();
        for (b, p) in [(&b"one"[..], &b"TAGS\x01a\x02"[..]), (b"two", b"")] {
            encode_batch_entry(
                &BatchEntry {
                    flag: 0,
                    body: b,
                    properties: p,
                },
                &mut buf,
            )
            .unwrap();
        }
        let got = decode_batch(&buf).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].body, got[1].body), (&b"one"[..], &b"two"[..]));
        assert_eq!(got[0].properties, b"TAGS\x01a\x02");
        let mut bad = buf.clone();
        bad[3] += 1;
        assert!(decode_batch(&bad).is_err());
        assert!(decode_batch(&buf[..buf.len() - 1]).is_err());
    }

    #[test]
    fn zlib_round_trips_and_caps_inflation() {
        let body = vec![b'x'; 100_000];
        let z = deflate(&body);
        assert!(z.len() < 1000);
        assert_eq!(inflate(&z, MAX_INFLATED_BYTES).unwrap(), body);
        assert!(matches!(inflate(&z, 1000), Err(CodecError::Zlib(_))));
        assert!(matches!(
            inflate(b"not zlib", 1000),
            Err(CodecError::Zlib(_))
        ));
    }

    fn arb_record() -> impl Strategy<Value = MessageRecord> {
        (
            (
                any::<i32>(),
                any::<i32>(),
                any::<i64>(),
                any::<i64>(),
                0i32..16,
            ),
            (any::<i64>(), any::<[u8; 4]>(), any::<u16>(), any::<i64>()),
            (any::<i32>(), prop::collection::vec(any::<u8>(), 0..200)),
            (
                "[A-Za-z%_-]{0,80}",
                prop::collection::vec(any::<u8>(), 0..100),
            ),
        )
            .prop_map(|(a, b, c, d)| MessageRecord {
                queue_id: a.0,
                flag: a.1,
                queue_offset: a.2,
                physical_offset: a.3,
                sys_flag: a.4,
                born_ms: b.0,
                born_host: SocketAddr::new(Ipv4Addr::from(b.1).into(), b.2),
                store_ms: b.3,
                store_host: SocketAddr::new(Ipv4Addr::from(b.1).into(), b.2.wrapping_add(1)),
                reconsume_times: c.0,
                prepared_tx_offset: 0,
                body: c.1,
                topic: d.0,
                properties: d.1,
            })
    }

    proptest! {
        #[test]
        fn records_round_trip(recs in prop::collection::vec(arb_record(), 0..4)) {
            let mut out = Vec::new();
            for r in &recs {
                encode_record(r, &mut out).unwrap();
            }
            prop_assert_eq!(decode_records(&out).unwrap(), recs);
        }

        #[test]
        fn offset_ids_round_trip(ip in any::<[u8; 4]>(), port in any::<u16>(), off in any::<u64>()) {
            let host = SocketAddr::new(Ipv4Addr::from(ip).into(), port);
            let (h, o) = decode_offset_msg_id(&encode_offset_msg_id(host, off)).unwrap();
            prop_assert_eq!((SocketAddr::V4(h), o), (host, off));
        }

        #[test]
        fn batches_round_trip(entries in prop::collection::vec(
            (any::<i32>(), prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..32)),
            0..5,
        )) {
            let mut buf = Vec::new();
            for (flag, body, props) in &entries {
                encode_batch_entry(&BatchEntry { flag: *flag, body, properties: props }, &mut buf).unwrap();
            }
            let got = decode_batch(&buf).unwrap();
            prop_assert_eq!(got.len(), entries.len());
            for (g, (flag, body, props)) in got.iter().zip(&entries) {
                prop_assert_eq!((g.flag, g.body, g.properties), (*flag, &body[..], &props[..]));
            }
        }

        #[test]
        fn arbitrary_payloads_never_panic(buf in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_records(&buf);
            let _ = decode_batch(&buf);
            let _ = inflate(&buf, 4096);
        }
    }
}
