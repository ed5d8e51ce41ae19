use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn roundtrip(p: &Packet) -> Packet {
    let bytes = to_bytes(p);
    let len = frame(&bytes, MAX_REMAINING_LENGTH + 5)
        .expect("frame")
        .expect("whole");
    assert_eq!(len, bytes.len(), "frame length of {p:?}");
    decode(bytes).expect("decode")
}

fn decode_hex(bytes: &[u8]) -> Result<Packet, DecodeError> {
    let b = Bytes::copy_from_slice(bytes);
    match frame(&b, 1 << 20)? {
        Some(n) if n == b.len() => decode(b),
        other => panic!("frame says {other:?} for {} bytes", b.len()),
    }
}

#[test]
fn connect_as_mosquitto_sends_it() {
    // mosquitto_sub -i c1 -u u -P p -k 60 (clean session), captured.
    let wire = [
        0x10, 0x14, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2, 0x00, 0x3c, 0x00, 0x02, b'c',
        b'1', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
    ];
    let Packet::Connect(c) = decode_hex(&wire).unwrap() else {
        panic!("not a connect")
    };
    assert_eq!(c.client_id, "c1");
    assert!(c.clean_session);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.username.as_deref(), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
    assert_eq!(to_bytes(&Packet::Connect(c)).as_ref(), &wire);
}

#[test]
fn connect_rules() {
    // MQTT 3.1 ("MQIsdp", level 3) is answered with CONNACK 1, not treated as garbage.
    let mut old = vec![0x10, 0x00, 0x00, 0x06];
    old.extend_from_slice(b"MQIsdp");
    old.extend_from_slice(&[3, 0x02, 0, 60, 0, 1, b'x']);
    old[1] = (old.len() - 2) as u8;
    assert!(matches!(
        decode_hex(&old),
        Err(DecodeError::UnsupportedProtocol { level: 3, .. })
    ));
    let base = |flags: u8| {
        let mut v = vec![
            0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 0, 0, 1, b'x',
        ];
        v[1] = (v.len() - 2) as u8;
        v
    };
    assert!(decode_hex(&base(0x02)).is_ok());
    for (flags, why) in [
        (0x03, "reserved"),
        (0x12, "will QoS"),
        (0x42, "password flag"),
        (0x1e, "QoS 3"),
    ] {
        let e = decode_hex(&base(flags)).unwrap_err().to_string();
        assert!(e.contains(why), "flags {flags:#x}: {e}");
    }
    // Trailing garbage after the last field.
    let mut v = base(0x02);
    v.push(0);
    v[1] += 1;
    assert!(decode_hex(&v).unwrap_err().to_string().contains("follow"));
}

#[test]
fn publish_vectors() {
    let p = Publish {
        dup: false,
        qos: 1,
        retain: true,
        topic: "a/b".into(),
        packet_id: Some(10),
        payload: Bytes::from_static(b"hi"),
    };
    let bytes = to_bytes(&Packet::Publish(p.clone()));
    assert_eq!(
        bytes.as_ref(),
        &[0x33, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']
    );
    assert_eq!(decode(bytes).unwrap(), Packet::Publish(p));
    // QoS 3, DUP on QoS 0, packet id 0, wildcard-free check is the session's job.
    assert!(decode_hex(&[0x36, 5, 0, 1, b'a', 0, 1]).is_err());
    assert!(decode_hex(&[0x38, 3, 0, 1, b'a']).is_err());
    assert!(decode_hex(&[0x32, 5, 0, 1, b'a', 0, 0]).is_err());
    // Topic length past the end of the packet.
    assert!(decode_hex(&[0x30, 3, 0, 9, b'a']).is_err());
    // Invalid UTF-8 and U+0000 in a topic [MQTT-1.5.3-1/2].
    assert!(decode_hex(&[0x30, 4, 0, 2, 0xc3, 0x28]).is_err());
    assert!(decode_hex(&[0x30, 4, 0, 2, b'a', 0]).is_err());
}

#[test]
fn acks_subscribe_and_empty_packets() {
    for kind in [
        AckKind::PubAck,
        AckKind::PubRec,
        AckKind::PubRel,
        AckKind::PubComp,
        AckKind::UnsubAck,
    ] {
        assert_eq!(roundtrip(&Packet::Ack(kind, 7)), Packet::Ack(kind, 7));
    }
    // PUBREL without its 0010 flags is malformed [MQTT-3.6.1-1].
    assert!(decode_hex(&[0x60, 2, 0, 1]).is_err());
    assert!(decode_hex(&[0x40, 3, 0, 1, 0]).is_err());
    let s = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("a/+".into(), 1), ("#".into(), 2)],
    });
    assert_eq!(roundtrip(&s), s);
    // SUBSCRIBE with flags 0000, with no filter, with QoS 3.
    assert!(decode_hex(&[0x80, 6, 0, 1, 0, 1, b'a', 0]).is_err());
    assert!(decode_hex(&[0x82, 2, 0, 1]).is_err());
    assert!(decode_hex(&[0x82, 6, 0, 1, 0, 1, b'a', 3]).is_err());
    let u = Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec!["a/b".into()],
    });
    assert_eq!(roundtrip(&u), u);
    let sa = Packet::SubAck(SubAck {
        packet_id: 1,
        codes: vec![0, 1, 2, SUBACK_FAILURE],
    });
    assert_eq!(roundtrip(&sa), sa);
    for p in [Packet::PingReq, Packet::PingResp, Packet::Disconnect] {
        assert_eq!(roundtrip(&p), p);
    }
    assert!(decode_hex(&[0xc0, 1, 0]).is_err(), "PINGREQ with a body");
    assert!(decode_hex(&[0x00, 0]).is_err(), "reserved type 0");
    assert!(decode_hex(&[0xf0, 0]).is_err(), "reserved type 15");
}

#[test]
fn frame_lengths() {
    assert_eq!(frame(&[], 100).unwrap(), None);
    assert_eq!(frame(&[0x30], 100).unwrap(), None);
    assert_eq!(frame(&[0x30, 0x80], 100).unwrap(), None);
    assert_eq!(frame(&[0xc0, 0], 100).unwrap(), Some(2));
    assert_eq!(frame(&[0x30, 3, 0, 1], 100).unwrap(), None);
    // 321 = 0xC1 0x02; refused from the header alone when over the limit.
    assert!(matches!(
        frame(&[0x30, 0xc1, 0x02], 100),
        Err(DecodeError::TooLarge {
            size: 324,
            max: 100
        })
    ));
    assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err());
    let mut out = BytesMut::new();
    put_fixed_header(&mut out, 0x30, MAX_REMAINING_LENGTH);
    assert_eq!(out.as_ref(), &[0x30, 0xff, 0xff, 0xff, 0x7f]);
}

fn topic() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9/+#$ é]{0,40}"
}

fn packet() -> impl Strategy<Value = Packet> {
    let publish = (
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        topic(),
        1u16..,
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(qos, dup, retain, topic, id, payload)| {
            Packet::Publish(Publish {
                dup: dup && qos > 0,
                qos,
                retain,
                topic,
                packet_id: (qos > 0).then_some(id),
                payload: Bytes::from(payload),
            })
        });
    let connect = (
        topic(),
        any::<bool>(),
        any::<u16>(),
        proptest::option::of((
            topic(),
            proptest::collection::vec(any::<u8>(), 0..50),
            0u8..3,
            any::<bool>(),
        )),
        proptest::option::of((
            topic(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
        )),
    )
        .prop_map(|(client_id, clean_session, keep_alive, will, creds)| {
            let (username, password) = match creds {
                Some((u, p)) => (Some(u), p.map(Bytes::from)),
                None => (None, None),
            };
            Packet::Connect(Connect {
                client_id,
                clean_session,
                keep_alive,
                will: will.map(|(topic, payload, qos, retain)| Will {
                    topic,
                    payload: Bytes::from(payload),
                    qos,
                    retain,
                }),
                username,
                password,
            })
        });
    let subscribe = (1u16.., proptest::collection::vec((topic(), 0u8..3), 1..8))
        .prop_map(|(packet_id, filters)| Packet::Subscribe(Subscribe { packet_id, filters }));
    let unsubscribe = (1u16.., proptest::collection::vec(topic(), 1..8))
        .prop_map(|(packet_id, filters)| Packet::Unsubscribe(Unsubscribe { packet_id, filters }));
    let suback = (
        any::<u16>(),
        proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)], 0..8),
    )
        .prop_map(|(packet_id, codes)| Packet::SubAck(SubAck { packet_id, codes }));
    let ack = (
        prop_oneof![
            Just(AckKind::PubAck),
            Just(AckKind::PubRec),
            Just(AckKind::PubRel),
            Just(AckKind::PubComp),
            Just(AckKind::UnsubAck)
        ],
        any::<u16>(),
    )
        .prop_map(|(k, id)| Packet::Ack(k, id));
    let connack = (any::<bool>(), 0u8..6).prop_map(|(sp, c)| {
        let code = [
            ConnectCode::Accepted,
            ConnectCode::UnacceptableProtocol,
            ConnectCode::IdentifierRejected,
            ConnectCode::ServerUnavailable,
            ConnectCode::BadCredentials,
            ConnectCode::NotAuthorized,
        ][usize::from(c)];
        Packet::ConnAck(ConnAck {
            session_present: sp,
            code,
        })
    });
    prop_oneof![
        publish,
        connect,
        subscribe,
        unsubscribe,
        suback,
        ack,
        connack,
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(p in packet()) {
        prop_assert_eq!(roundtrip(&p), p);
    }

    #[test]
    fn a_stream_splits_into_the_packets_it_was_made_of(ps in proptest::collection::vec(packet(), 1..6), cut in any::<prop::sample::Index>()) {
        let mut stream = BytesMut::new();
        for p in &ps {
            encode(p, &mut stream);
        }
        // Bytes arriving in two parts decode the same once whole.
        let split = cut.index(stream.len() + 1);
        let mut buf = BytesMut::from(&stream[..split]);
        let mut rest = &stream[split..];
        let mut out = Vec::new();
        loop {
            match frame(&buf, usize::MAX).expect("frame") {
                Some(n) => out.push(decode(buf.split_to(n).freeze()).expect("decode")),
                None if rest.is_empty() => break,
                None => {
                    buf.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
        prop_assert_eq!(out, ps);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(Some(n)) = frame(&bytes, 1 << 16) {
            let _ = decode(Bytes::copy_from_slice(&bytes[..n]));
        }
    }
}
