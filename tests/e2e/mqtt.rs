//! The MQTT gateway against the real binary with rumqttc (and raw sockets for what a
//! well-behaved client never does): QoS both ways, the broker seeing MQTT messages and feeding
//! them, retained messages, wills, keep-alive, persistent sessions across graceful and kill -9
//! restarts, takeover, strict-mode auth and permissions, P2P, subscription limits, presence
//! events, malformed input, slow readers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{
    Client, Connection, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use serde_json::{Value, json};

use crate::harness::{Server, ServerOpts, create_topic, sign};

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// What the test sees from one client.
#[derive(Debug)]
pub(crate) enum Ev {
    ConnAck { present: bool },
    SubAck(Vec<SubscribeReasonCode>),
    Msg(rumqttc::Publish),
    Closed(String),
}

/// A rumqttc client whose events arrive on a channel; it never reconnects by itself.
pub(crate) struct Mq {
    pub(crate) client: Client,
    rx: Receiver<Ev>,
}

pub(crate) fn opts(addr: &str, id: &str) -> MqttOptions {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut o = MqttOptions::new(id, host, port.parse::<u16>().expect("port"));
    o.set_keep_alive(Duration::from_secs(30));
    o
}

impl Mq {
    pub(crate) fn start(o: MqttOptions) -> Mq {
        let (client, connection) = Client::new(o, 256);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || pump(connection, tx));
        Mq { client, rx }
    }

    /// Connects and waits for CONNACK; returns the client and session-present.
    pub(crate) fn connect(o: MqttOptions) -> (Mq, bool) {
        let m = Mq::start(o);
        match m.next() {
            Ev::ConnAck { present } => (m, present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub(crate) fn next(&self) -> Ev {
        match self.rx.recv_timeout(WAIT) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => panic!("no MQTT event within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => Ev::Closed("event thread ended".into()),
        }
    }

    pub(crate) fn subscribe(&self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client.subscribe(filter, qos).expect("subscribe");
        loop {
            match self.next() {
                Ev::SubAck(codes) => return codes,
                Ev::Msg(_) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// The next PUBLISH (skipping nothing else: anything but a message fails the test).
    pub(crate) fn msg(&self) -> rumqttc::Publish {
        match self.next() {
            Ev::Msg(p) => p,
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    pub(crate) fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .expect("publish");
    }

    /// The next PUBLISH if one comes within `d` (other events are skipped).
    pub(crate) fn msg_within(&self, d: Duration) -> Option<rumqttc::Publish> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(Ev::Msg(p)) => return Some(p),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits until the connection is closed by the host.
    pub(crate) fn closed(&self) -> String {
        loop {
            match self.next() {
                Ev::Closed(why) => return why,
                _ => continue,
            }
        }
    }
}

fn pump(mut connection: Connection, tx: mpsc::Sender<Ev>) {
    for ev in connection.iter() {
        let out = match ev {
            Ok(Event::Incoming(Packet::ConnAck(c))) => Ev::ConnAck {
                present: c.session_present,
            },
            Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
            Ok(Event::Incoming(Packet::Publish(p))) => Ev::Msg(p),
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Ev::Closed(describe(&e)));
                return;
            }
        };
        if tx.send(out).is_err() {
            return;
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
        other => other.to_string(),
    }
}

fn mqtt_server(extra: &str) -> Server {
    Server::start(ServerOpts::with_config(format!(
        "[mqtt]\nconnect_timeout_ms = 500\n{extra}\n"
    )))
}

pub(crate) fn addr(s: &Server) -> String {
    s.listener("mqtt").expect("mqtt listener").to_string()
}

pub(crate) fn messages_of(s: &Server, topic: &str) -> Vec<Value> {
    let v = s
        .get(&format!(
            "/v1/topics/{topic}/messages?begin_ms=0&end_ms=99999999999999&limit=1000"
        ))
        .expect(200);
    v["messages"].as_array().cloned().unwrap_or_default()
}

#[test]
fn qos_round_trips_through_broker_topics_and_mq2mqtt() {
    let s = mqtt_server("");
    create_topic(s.api(), "Parent", 4);
    let a = addr(&s);
    let (sub, present) = Mq::connect(opts(&a, "sub-1"));
    assert!(!present);
    assert_eq!(
        sub.subscribe("Parent/#", QoS::ExactlyOnce),
        vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    assert_eq!(
        sub.subscribe("local/+", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let (publ, _) = Mq::connect(opts(&a, "pub-1"));
    publ.publish("Parent/a/b", QoS::AtMostOnce, false, b"q0");
    publ.publish("Parent/a/b", QoS::AtLeastOnce, false, b"q1");
    publ.publish("Parent/a/b", QoS::ExactlyOnce, false, b"q2");
    // Granted QoS 1 caps a QoS 2 publish; a non-broker first level stays MQTT-to-MQTT.
    publ.publish("local/x", QoS::ExactlyOnce, false, b"local");
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = sub.msg();
        got.push((
            m.topic.clone(),
            m.qos,
            String::from_utf8_lossy(&m.payload).into_owned(),
        ));
    }
    // One topic keeps its order; the two topics may interleave.
    let parent: Vec<_> = got
        .iter()
        .filter(|g| g.0 == "Parent/a/b")
        .cloned()
        .collect();
    assert_eq!(
        parent,
        vec![
            ("Parent/a/b".into(), QoS::AtMostOnce, "q0".into()),
            ("Parent/a/b".into(), QoS::AtLeastOnce, "q1".into()),
            ("Parent/a/b".into(), QoS::ExactlyOnce, "q2".into()),
        ]
    );
    assert!(
        got.contains(&("local/x".into(), QoS::AtLeastOnce, "local".into())),
        "{got:?}"
    );

    // The broker topic holds the MQTT messages, sub-topic and QoS kept as properties.
    let stored = messages_of(&s, "Parent");
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert_eq!(stored[1]["properties"]["mqttSecondTopic"], "/a/b");
    assert_eq!(stored[1]["properties"]["qoslevel"], "1");
    assert_eq!(stored[1]["body"], "q1");

    // A broker producer reaches MQTT subscribers with MQ2MQTT and mqttSecondTopic.
    s.post_json(
        "/v1/topics/Parent/messages",
        &json!({"tag": "MQ2MQTT", "properties": {"mqttSecondTopic": "/notice/"}, "body": "from broker"}),
    )
    .expect(200);
    let m = sub.msg();
    assert_eq!(m.topic, "Parent/notice/");
    assert_eq!(&m.payload[..], b"from broker");
    // A plain broker message (no MQ2MQTT tag) is for broker consumers only.
    s.post_json("/v1/topics/Parent/messages", &json!({"body": "plain"}))
        .expect(200);
    s.post_json(
        "/v1/topics/Parent/messages",
        &json!({"tag": "MQ2MQTT", "body": "to the parent itself"}),
    )
    .expect(200);
    let m = sub.msg();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("Parent", &b"to the parent itself"[..])
    );

    // Inspection: the device, its subscriptions, the topic's counters.
    let d = s.get("/v1/mqtt/devices/sub-1").expect(200);
    assert_eq!(d["online"], true);
    assert_eq!(d["subscriptions"].as_array().map(Vec::len), Some(2));
    let t = s.get("/v1/mqtt/topics/Parent").expect(200);
    assert_eq!(t["subscribers"], 1);
    assert!(t["published_total"].as_u64() >= Some(3), "{t}");
    let cli = s.wharf(&["mqtt", "device", "sub-1", "--json"]);
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    assert!(cli.stdout.contains("Parent/#"), "{}", cli.stdout);
    let metrics = s.get("/metrics").text;
    assert!(
        metrics.contains("wharf_mqtt_packets_in_total{type=\"PUBLISH\"}"),
        "metrics lack MQTT counters"
    );
}

#[test]
fn retained_messages_wills_and_keep_alive() {
    let s = mqtt_server("");
    let a = addr(&s);
    let (p, _) = Mq::connect(opts(&a, "retainer"));
    p.publish("r/a", QoS::AtLeastOnce, true, b"A");
    p.publish("r/b", QoS::AtLeastOnce, true, b"B");
    // An empty retained payload deletes r/a's retained message.
    p.publish("r/a", QoS::AtLeastOnce, true, b"");
    p.publish("r/c", QoS::AtLeastOnce, true, b"C");
    // A PUBACK goes out once its message is stored and retained, and so the count of PUBACKs,
    // not the count of retained messages (two already after r/a and r/b), says all four are.
    crate::harness::wait_for("four publishes acknowledged", WAIT, || {
        let m = s.get("/metrics").text;
        (metric(&m, "wharf_mqtt_packets_out_total{type=\"PUBACK\"}") == 4).then_some(())
    });
    assert_eq!(
        metric(&s.get("/metrics").text, "wharf_mqtt_retained_messages"),
        2
    );
    // Back-to-back retained publishes store concurrently; the last one published is kept.
    for i in 1..=40 {
        p.publish("order/x", QoS::AtLeastOnce, true, i.to_string().as_bytes());
    }
    crate::harness::wait_for("forty more publishes acknowledged", WAIT, || {
        let m = s.get("/metrics").text;
        (metric(&m, "wharf_mqtt_packets_out_total{type=\"PUBACK\"}") == 44).then_some(())
    });
    let (last, _) = Mq::connect(opts(&a, "last"));
    last.subscribe("order/x", QoS::AtLeastOnce);
    assert_eq!(&last.msg().payload[..], b"40");
    let (w, _) = Mq::connect(opts(&a, "watcher"));
    w.subscribe("r/c", QoS::AtLeastOnce);
    let m = w.msg();
    assert!(m.retain && &m.payload[..] == b"C", "{m:?}");
    let (late, _) = Mq::connect(opts(&a, "late"));
    late.subscribe("r/#", QoS::AtLeastOnce);
    // Retained messages come in topic order: r/a would come before r/b.
    let first = late.msg();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..], first.retain),
        ("r/b", &b"B"[..], true)
    );
    assert_eq!(late.msg().topic, "r/c");

    // A will is published when a client vanishes without DISCONNECT.
    let (wsub, _) = Mq::connect(opts(&a, "will-watcher"));
    wsub.subscribe("wills/#", QoS::AtLeastOnce);
    let mut o = opts(&a, "doomed");
    o.set_last_will(LastWill::new(
        "wills/doomed",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut raw = RawClient::connect(&a, "doomed", 30, Some(("wills/doomed", b"gone")));
    raw.close_abruptly();
    let m = wsub.msg();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("wills/doomed", &b"gone"[..])
    );
    let _ = o;

    // Keep-alive 1 s and then silence: closed after 1.5 s, will published.
    let mut silent = RawClient::connect(&a, "silent", 1, Some(("wills/silent", b"timed out")));
    let started = Instant::now();
    assert!(
        silent.wait_closed(Duration::from_secs(10)),
        "a silent client must be closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed too early: {:?}",
        started.elapsed()
    );
    let m = wsub.msg();
    assert_eq!(m.topic, "wills/silent");
    // Retained messages survive a restart.
    let mut s = s;
    s.restart();
    let (after, _) = Mq::connect(opts(&addr(&s), "after-restart"));
    after.subscribe("r/b", QoS::AtLeastOnce);
    assert_eq!(&after.msg().payload[..], b"B");
}

#[test]
fn persistent_sessions_queue_offline_messages_across_restarts_and_kill9() {
    let mut s = mqtt_server("");
    create_topic(s.api(), "Dev", 2);
    let mut o = opts(&addr(&s), "keeper");
    o.set_clean_session(false);
    let (c, present) = Mq::connect(o.clone());
    assert!(!present);
    c.subscribe("Dev/q/#", QoS::AtLeastOnce);
    c.client.disconnect().expect("disconnect");
    c.closed();
    // Offline: QoS 1 messages are kept for it.
    let (p, _) = Mq::connect(opts(&addr(&s), "producer"));
    for i in 0..10 {
        p.publish(
            &format!("Dev/q/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        );
    }
    p.client.disconnect().expect("disconnect");
    p.closed();
    wait_stored(&s, "Dev", 10);
    s.restart();
    let mut o = opts(&addr(&s), "keeper");
    o.set_clean_session(false);
    o.set_manual_acks(true);
    let (c, present) = Mq::connect(o.clone());
    assert!(present, "the session must survive a graceful restart");
    let mut seen: Vec<String> = (0..10)
        .map(|_| String::from_utf8_lossy(&c.msg().payload).into_owned())
        .collect();
    seen.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(seen, want);
    // None acknowledged; a reconnect gets them again with DUP and their packet ids [MQTT-4.4.0-1].
    c.client.disconnect().expect("disconnect");
    c.closed();
    let (c, present) = Mq::connect(o.clone());
    assert!(present);
    for _ in 0..10 {
        let m = c.msg();
        assert!(
            m.dup && m.pkid != 0,
            "an in-flight message is re-sent with DUP: {m:?}"
        );
    }
    // kill -9: they come again, whether the last session snapshot holds them
    // in flight (re-sent with DUP) or predates them (replayed from the queue positions).
    s.kill9();
    drop(c);
    s.restart();
    let mut o = opts(&addr(&s), "keeper");
    o.set_clean_session(false);
    o.set_manual_acks(true);
    let (c, present) = Mq::connect(o);
    assert!(present, "the session must survive kill -9");
    let mut again: Vec<String> = (0..10)
        .map(|_| String::from_utf8_lossy(&c.msg().payload).into_owned())
        .collect();
    again.sort();
    again.dedup();
    assert_eq!(
        again, want,
        "every unacknowledged message comes back after kill -9"
    );

    // clean-session=true discards it, for good: not back after a restart...
    drop(c);
    let mut o = opts(&addr(&s), "keeper");
    o.set_clean_session(true);
    let (c, present) = Mq::connect(o);
    assert!(!present);
    drop(c);
    s.restart();
    let mut o = opts(&addr(&s), "keeper");
    o.set_clean_session(false);
    let (c, present) = Mq::connect(o);
    assert!(!present, "a cleared session stays cleared across a restart");
    assert!(!s.logs().contains("unreadable"), "{}", s.logs());
    // ...and a new stored session takes its place.
    drop(c);
    s.restart();
    let mut o = opts(&addr(&s), "keeper");
    o.set_clean_session(false);
    let (_c, present) = Mq::connect(o);
    assert!(present, "the new session was stored over the cleared one");
}

pub(crate) fn wait_stored(s: &Server, topic: &str, n: usize) {
    crate::harness::wait_for(&format!("{n} messages in {topic}"), WAIT, || {
        (messages_of(s, topic).len() >= n).then_some(())
    });
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_over() {
    let s = mqtt_server("");
    let a = addr(&s);
    let (first, _) = Mq::connect(opts(&a, "twin"));
    let (second, _) = Mq::connect(opts(&a, "twin"));
    let why = first.closed();
    assert!(!why.is_empty());
    second.subscribe("x/y", QoS::AtMostOnce);
    assert!(
        s.logs().contains("taken over"),
        "the host says why the first was closed"
    );
}

#[test]
fn strict_mode_checks_client_ids_signatures_and_permissions() {
    let s = Server::start(ServerOpts::with_config(
        r#"
[[auth.keys]]
access_key = "admin"
secret_key = "admin-secret"
admin = true
allow_publish = ["*"]
allow_subscribe = ["*"]

[[auth.keys]]
access_key = "reader"
secret_key = "reader-secret"
allow_publish = []
allow_subscribe = ["Home"]
"#,
    ));
    let api = s.signed("admin", "admin-secret");
    create_topic(&api, "Home", 2);
    api.post_json("/v1/groups", &json!({"name": "GID_home", "kind": "mqtt"}))
        .expect(201);
    let a = addr(&s);
    let login = |id: &str, user: &str, secret: &str, group: &str| {
        let mut o = opts(&a, id);
        o.set_credentials(user, sign(secret, group));
        Mq::start(o)
    };
    // Right signature: accepted; publish and subscribe within the key's rights.
    let ok = login("GID_home@@@lamp", "admin", "admin-secret", "GID_home");
    assert!(matches!(ok.next(), Ev::ConnAck { .. }));
    assert_eq!(
        ok.subscribe("Home/+", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // A filter outside broker topics is refused with 0x80 in strict mode.
    assert_eq!(
        ok.subscribe("nowhere/x", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Failure]
    );
    // Wrong secret → not authorized; unknown group / no @@@ → identifier rejected.
    let bad = login("GID_home@@@lamp2", "admin", "wrong", "GID_home");
    assert!(bad.closed().contains("NotAuthorized"));
    let nogroup = login("GID_none@@@x", "admin", "admin-secret", "GID_none");
    assert!(nogroup.closed().contains("BadClientId"));
    let noid = login("plain-id", "admin", "admin-secret", "GID_home");
    assert!(noid.closed().contains("BadClientId"));
    // A key that may not publish to Home is disconnected when it tries.
    let reader = login("GID_home@@@ro", "reader", "reader-secret", "GID_home");
    assert!(matches!(reader.next(), Ev::ConnAck { .. }));
    reader.subscribe("Home/#", QoS::AtLeastOnce);
    reader.publish("Home/x", QoS::AtLeastOnce, false, b"nope");
    reader.closed();
    assert!(
        messages_of_signed(&api, "Home").is_empty(),
        "a refused publish stores nothing"
    );
    // The admin's publish reaches Home's subscriber.
    ok.publish("Home/kitchen", QoS::AtLeastOnce, false, b"on");
    assert_eq!(&ok.msg().payload[..], b"on");
    assert!(
        !s.logs().contains("admin-secret"),
        "secrets never reach the log"
    );
}

fn messages_of_signed(api: &crate::harness::Api, topic: &str) -> Vec<Value> {
    let v = api
        .get(&format!(
            "/v1/topics/{topic}/messages?begin_ms=0&end_ms=99999999999999"
        ))
        .expect(200);
    v["messages"].as_array().cloned().unwrap_or_default()
}

#[test]
fn p2p_subscription_limit_and_deny_list() {
    let s = mqtt_server("max_subscriptions = 3\ndeny_subscribe = [\"secret/#\"]");
    create_topic(s.api(), "Chat", 2);
    let a = addr(&s);
    let (target, _) = Mq::connect(opts(&a, "GID_chat@@@alice"));
    let (other, _) = Mq::connect(opts(&a, "GID_chat@@@bob"));
    other.subscribe("Chat/#", QoS::AtLeastOnce);
    let (sender, _) = Mq::connect(opts(&a, "GID_chat@@@carol"));
    sender.publish(
        "Chat/p2p/GID_chat@@@alice",
        QoS::AtLeastOnce,
        false,
        b"psst",
    );
    sender.publish("Chat/room", QoS::AtLeastOnce, false, b"all");
    // alice gets the P2P message without subscribing; bob only the room message.
    let m = target.msg();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("Chat/p2p/GID_chat@@@alice", &b"psst"[..])
    );
    assert_eq!(&other.msg().payload[..], b"all");
    // A broker producer's P2P message.
    s.post_json(
        "/v1/topics/Chat/messages",
        &json!({"tag": "MQ2MQTT", "properties": {"mqttSecondTopic": "/p2p/GID_chat@@@alice"}, "body": "direct"}),
    )
    .expect(200);
    assert_eq!(&target.msg().payload[..], b"direct");

    // Subscription limit 3: the 4th filter is refused, never dropped silently; deny list too.
    let (c, _) = Mq::connect(opts(&a, "many"));
    for f in ["a/1", "a/2", "a/3"] {
        assert_eq!(
            c.subscribe(f, QoS::AtMostOnce),
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
        );
    }
    assert_eq!(
        c.subscribe("a/4", QoS::AtMostOnce),
        vec![SubscribeReasonCode::Failure]
    );
    // Re-subscribing an existing filter is not a new one.
    assert_eq!(
        c.subscribe("a/1", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let (d, _) = Mq::connect(opts(&a, "nosy"));
    assert_eq!(
        d.subscribe("secret/x", QoS::AtMostOnce),
        vec![SubscribeReasonCode::Failure]
    );
    // A wider filter is granted; the denied topics never reach it.
    assert_eq!(
        d.subscribe("#", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    sender.publish("secret/plans", QoS::AtLeastOnce, false, b"hidden");
    sender.publish("open/news", QoS::AtLeastOnce, false, b"shown");
    let m = d.msg();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("open/news", &b"shown"[..])
    );
    // 10,000 filters from one client: refused past the limit, the host stays up.
    let mut raw = RawClient::connect(&a, "flood", 30, None);
    let codes = raw.subscribe_many(10_000);
    assert_eq!(codes.iter().filter(|c| **c != 0x80).count(), 3);
    assert_eq!(codes.len(), 10_000);
    s.get("/healthz").expect(200);
}

#[test]
fn presence_events_carry_increasing_event_indexes_across_restarts() {
    let mut s = mqtt_server("");
    create_topic(s.api(), "GID_dev_MQTT", 1);
    s.post_json("/v1/groups", &json!({"name": "GID_dev", "kind": "mqtt"}))
        .expect(201);
    let (c, _) = Mq::connect(opts(&addr(&s), "GID_dev@@@sensor"));
    c.client.disconnect().expect("disconnect");
    c.closed();
    let mut raw = RawClient::connect(&addr(&s), "GID_dev@@@sensor", 30, None);
    raw.close_abruptly();
    wait_stored(&s, "GID_dev_MQTT", 4);
    s.restart();
    let (c, _) = Mq::connect(opts(&addr(&s), "GID_dev@@@sensor"));
    wait_stored(&s, "GID_dev_MQTT", 5);
    drop(c);
    let events = messages_of(&s, "GID_dev_MQTT");
    let parsed: Vec<Value> = events
        .iter()
        .map(|m| serde_json::from_str(m["body"].as_str().unwrap_or("{}")).unwrap())
        .collect();
    let tags: Vec<&str> = events
        .iter()
        .map(|m| m["tag"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        &tags[..5],
        ["connect", "disconnect", "connect", "tcpclean", "connect"]
    );
    let idx: Vec<u64> = parsed
        .iter()
        .map(|b| b["eventIndex"].as_u64().unwrap())
        .collect();
    assert!(
        idx.windows(2).all(|w| w[0] < w[1]),
        "eventIndex strictly increases: {idx:?}"
    );
    for b in &parsed {
        assert_eq!(b["clientId"], "GID_dev@@@sensor");
        assert!(b["time"].as_u64().is_some() && b["channelId"].as_str().is_some());
    }
    assert_ne!(
        parsed[0]["channelId"], parsed[2]["channelId"],
        "each connection has its own channel"
    );
}

#[test]
fn malformed_packets_slowloris_and_slow_readers_hurt_only_themselves() {
    let s = mqtt_server("max_queued = 200");
    create_topic(s.api(), "Feed", 1);
    let a = addr(&s);
    // Garbage instead of CONNECT: closed.
    let mut g = TcpStream::connect(&a).unwrap();
    g.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap();
    assert!(wait_eof(&mut g, Duration::from_secs(5)));
    // An oversized length in a valid-looking PUBLISH after CONNECT: closed.
    let mut big = RawClient::connect(&a, "big", 30, None);
    big.stream
        .write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f])
        .unwrap();
    assert!(big.wait_closed(Duration::from_secs(5)));
    // No CONNECT at all: closed after connect_timeout_ms.
    let mut idle = TcpStream::connect(&a).unwrap();
    assert!(wait_eof(&mut idle, Duration::from_secs(5)));
    // A subscriber that never reads: QoS 0 overflow is dropped and counted…
    let mut lazy0 = RawClient::connect(&a, "lazy0", 60, None);
    lazy0.subscribe("Feed/#", 0);
    // …and a QoS 1 subscriber that never reads is disconnected with a log line.
    let mut lazy1 = RawClient::connect(&a, "lazy1", 60, None);
    lazy1.subscribe("Feed/#", 1);
    let (healthy, _) = Mq::connect(opts(&a, "healthy"));
    healthy.subscribe("Feed/#", QoS::AtMostOnce);
    let (p, _) = Mq::connect(opts(&a, "firehose"));
    // rumqttc caps its packets at 10 KiB by default. Rounds of 50 that the healthy client takes
    // in full before the next: it never has more than 50 waiting, the lazy ones fall behind.
    let payload = vec![b'x'; 8 * 1024];
    for _ in 0..20 {
        for _ in 0..50 {
            p.publish("Feed/x", QoS::AtLeastOnce, false, &payload);
        }
        for _ in 0..50 {
            let _ = healthy.msg();
        }
    }
    crate::harness::wait_for("the slow QoS 1 reader disconnected", WAIT, || {
        s.logs()
            .contains("the client reads too slowly")
            .then_some(())
    });
    let m = s.get("/metrics").text;
    let dropped = metric(&m, "wharf_mqtt_dropped_qos0_total");
    assert!(dropped > 0, "QoS 0 drops are counted:\n{m}");
    assert!(metric(&m, "wharf_mqtt_protocol_errors_total") >= 2);
    s.get("/healthz").expect(200);
    drop(lazy0);
}

#[test]
fn a_reader_that_falls_behind_is_fed_from_the_store_in_order_and_misses_nothing() {
    // An eighth of max_queued (375) waits in memory; the rest of what the reader is behind is
    // read back from the store as it drains.
    let s = mqtt_server("max_queued = 3000");
    create_topic(s.api(), "Feed", 1);
    let a = addr(&s);
    let mut slow = RawClient::connect(&a, "slow", 60, None);
    slow.subscribe("Feed/#", 0);
    let mut firehose = RawClient::connect(&a, "firehose", 60, None);
    // 32 MiB in all: far more than the socket buffers and the outbox hold, far less than
    // max_queued messages.
    const N: usize = 2000;
    let filler = vec![b'x'; 16 * 1024];
    for i in 0..N {
        let mut body = Vec::new();
        mqtt_string(&mut body, b"Feed/x");
        body.extend_from_slice(format!("{i:06}").as_bytes());
        body.extend_from_slice(&filler);
        firehose.stream.write_all(&frame(0x30, &body)).unwrap();
    }
    for i in 0..N {
        let (topic, body) = slow.read_publish();
        assert_eq!(topic, "Feed/x");
        assert_eq!(
            String::from_utf8_lossy(&body[..6]),
            format!("{i:06}"),
            "every message, in order"
        );
    }
    let m = s.get("/metrics").text;
    let lagged = metric(&m, "wharf_mqtt_lagged_deliveries_total");
    assert!(lagged > 0, "some came from the store:\n{m}");
    assert_eq!(metric(&m, "wharf_mqtt_dropped_qos0_total"), 0, "{m}");

    // A clean-session=false QoS 1 reader that falls behind, then goes away mid-way: its stored
    // session resumes where it had got to, the part it lagged on included.
    let (mut durable, _) = RawClient::connect_session(&a, "durable", 60, None, false);
    durable.subscribe("Feed/#", 1);
    // Published at QoS 1 (a stored session keeps QoS 1/2 messages, not QoS 0 ones); the
    // firehose never reads its PUBACKs, which fit in its socket buffer.
    for i in N..2 * N {
        let mut body = Vec::new();
        mqtt_string(&mut body, b"Feed/x");
        body.extend_from_slice(&((i % 60_000) as u16 + 1).to_be_bytes());
        body.extend_from_slice(format!("{i:06}").as_bytes());
        body.extend_from_slice(&filler);
        firehose.stream.write_all(&frame(0x32, &body)).unwrap();
    }
    const READ_FIRST: usize = N / 2;
    for i in N..N + READ_FIRST {
        let (_, body) = durable.read_publish();
        assert_eq!(String::from_utf8_lossy(&body[..6]), format!("{i:06}"));
    }
    // DISCONNECT, so every PUBACK written before it is read (an abrupt close can lose them,
    // and then at-least-once delivery sends those messages again).
    durable.stream.write_all(&[0xe0, 0]).unwrap();
    assert!(durable.wait_closed(WAIT));
    drop(durable);
    let (mut back, present) = RawClient::connect_session(&a, "durable", 60, None, false);
    assert!(present, "the session was kept");
    let mut got = Vec::new();
    for _ in N + READ_FIRST..2 * N {
        let Some((_, body)) = back.next_publish() else {
            break;
        };
        got.push(
            String::from_utf8_lossy(&body[..6])
                .parse::<usize>()
                .unwrap(),
        );
    }
    let want: Vec<usize> = (N + READ_FIRST..2 * N).collect();
    if got != want {
        let mut runs = Vec::new();
        let mut start = got[0];
        for w in got.windows(2) {
            if w[1] != w[0] + 1 {
                runs.push((start, w[0]));
                start = w[1];
            }
        }
        runs.push((start, *got.last().unwrap()));
        panic!("runs {runs:?}");
    }
    let m = s.get("/metrics").text;
    assert!(
        metric(&m, "wharf_mqtt_lagged_deliveries_total") > lagged,
        "{m}"
    );
}

pub(crate) fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn wait_eof(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// A hand-rolled MQTT client for what real clients never do (never read, vanish, flood).
struct RawClient {
    stream: TcpStream,
    next_id: u16,
}

pub(crate) fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub(crate) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

impl RawClient {
    pub(crate) fn connect(
        addr: &str,
        id: &str,
        keep_alive: u16,
        will: Option<(&str, &[u8])>,
    ) -> RawClient {
        Self::connect_session(addr, id, keep_alive, will, true).0
    }

    /// Connects with the given clean-session flag; returns the client and session-present.
    pub(crate) fn connect_session(
        addr: &str,
        id: &str,
        keep_alive: u16,
        will: Option<(&str, &[u8])>,
        clean: bool,
    ) -> (RawClient, bool) {
        let mut stream = TcpStream::connect(addr).unwrap();
        let mut body = Vec::new();
        mqtt_string(&mut body, b"MQTT");
        body.push(4);
        body.push(if clean { 0x02 } else { 0 } | if will.is_some() { 0x04 | 0x08 } else { 0 });
        body.extend_from_slice(&keep_alive.to_be_bytes());
        mqtt_string(&mut body, id.as_bytes());
        if let Some((t, p)) = will {
            mqtt_string(&mut body, t.as_bytes());
            mqtt_string(&mut body, p);
        }
        stream.write_all(&frame(0x10, &body)).unwrap();
        let mut ack = [0u8; 4];
        stream.read_exact(&mut ack).unwrap();
        assert_eq!([ack[0], ack[1], ack[3]], [0x20, 2, 0], "CONNACK accepted");
        (RawClient { stream, next_id: 1 }, ack[2] == 1)
    }

    pub(crate) fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut body = self.next_id.to_be_bytes().to_vec();
        self.next_id += 1;
        mqtt_string(&mut body, filter.as_bytes());
        body.push(qos);
        self.stream.write_all(&frame(0x82, &body)).unwrap();
        let mut ack = [0u8; 5];
        self.stream.read_exact(&mut ack).unwrap();
        assert_eq!(ack[0], 0x90);
    }

    /// SUBSCRIBEs `n` distinct filters in one packet; returns the SUBACK codes.
    fn subscribe_many(&mut self, n: usize) -> Vec<u8> {
        let mut body = self.next_id.to_be_bytes().to_vec();
        self.next_id += 1;
        for i in 0..n {
            mqtt_string(&mut body, format!("flood/{i}").as_bytes());
            body.push(0);
        }
        self.stream.write_all(&frame(0x82, &body)).unwrap();
        let (head, rest) = self.read_packet().expect("SUBACK");
        assert_eq!(head, 0x90);
        rest[2..].to_vec()
    }

    /// The next packet's first byte and body, or None when nothing comes within `WAIT`.
    fn read_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        self.stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut head = [0u8; 1];
        self.stream.read_exact(&mut head).ok()?;
        let mut len = 0usize;
        for i in 0..4 {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).unwrap();
            len |= usize::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).unwrap();
        Some((head[0], body))
    }

    /// Reads packets until a PUBLISH and acknowledges it (QoS 1); returns its topic and payload.
    fn read_publish(&mut self) -> (String, Vec<u8>) {
        self.next_publish()
            .unwrap_or_else(|| panic!("no PUBLISH within {WAIT:?}"))
    }

    /// [`RawClient::read_publish`], or None when nothing comes within `WAIT`.
    fn next_publish(&mut self) -> Option<(String, Vec<u8>)> {
        loop {
            let (head, body) = self.read_packet()?;
            if head >> 4 != 3 {
                continue;
            }
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).unwrap();
            let mut at = 2 + topic_len;
            match (head >> 1) & 3 {
                0 => {}
                1 => {
                    self.stream
                        .write_all(&[0x40, 2, body[at], body[at + 1]])
                        .unwrap();
                    at += 2;
                }
                q => panic!("read_publish handles QoS 0 and 1, got {q}"),
            }
            return Some((topic, body[at..].to_vec()));
        }
    }

    /// Closes the socket without DISCONNECT (RST on drop).
    fn close_abruptly(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn wait_closed(&mut self, within: Duration) -> bool {
        wait_eof(&mut self.stream, within)
    }
}

/// The device's newest state in `DeviceState`, as the device-presence plugin wrote it.
fn device_state(s: &Server, client_id: &str) -> Option<(String, String)> {
    let v = s
        .get(&format!(
            "/v1/topics/DeviceState/messages?key={}",
            client_id.replace('@', "%40")
        ))
        .expect(200);
    let newest = v["messages"].as_array()?.first()?.clone();
    Some((
        newest["tag"].as_str()?.to_string(),
        newest["properties"]["channelId"].as_str()?.to_string(),
    ))
}

#[test]
fn device_presence_plugin_keeps_the_state_right_under_takeover() {
    let s = mqtt_server("");
    create_topic(s.api(), "GID_iot_MQTT", 2);
    create_topic(s.api(), "DeviceState", 2);
    s.post_json("/v1/groups", &json!({"name": "GID_iot", "kind": "mqtt"}))
        .expect(201);
    let manifest = crate::plugins::example_manifest(&s, "device-presence", |t| t);
    let deployed = crate::plugins::deploy(&s, &manifest);
    assert_eq!(deployed["status"], "running", "{deployed}");
    let a = addr(&s);
    let id = "GID_iot@@@lamp";
    let (first, _) = Mq::connect(opts(&a, id));
    let (state, ch1) = crate::harness::wait_for("lamp online", WAIT, || {
        device_state(&s, id).filter(|(t, _)| t == "online")
    });
    assert_eq!(state, "online");
    // Takeover: the new connection's `connect` and the old one's `tcpclean` race; the old close
    // must not mark the device offline.
    let (second, _) = Mq::connect(opts(&a, id));
    first.closed();
    crate::harness::wait_for("lamp online on the new connection", WAIT, || {
        device_state(&s, id).filter(|(t, c)| t == "online" && *c != ch1)
    });
    crate::harness::wait_for("every presence event handled", WAIT, || {
        let st = s.get("/v1/groups/GID_device_presence/status").expect(200);
        (st["backlog"] == 0 && messages_of(&s, "GID_iot_MQTT").len() >= 3).then_some(())
    });
    let (state, _) = device_state(&s, id).expect("state");
    assert_eq!(
        state, "online",
        "a stale tcpclean must not win over the newer connect"
    );
    second.client.disconnect().expect("disconnect");
    second.closed();
    crate::harness::wait_for("lamp offline", WAIT, || {
        device_state(&s, id).filter(|(t, _)| t == "offline")
    });
}
