//! Three `wharf serve` processes on one real PostgreSQL: a topic or plugin created on one host
//! is in force on the others, sends to every host reach one HTTP pull consumer group served by
//! all three, and a host killed with SIGKILL under load loses nothing that was acknowledged
//! (its queues move to the survivors when its leases expire). MQTT clients on two hosts see each
//! other's messages (subscriptions, P2P, MQ2MQTT, retained), a client id is taken over across
//! hosts with its stored session, and presence event indexes keep increasing across hosts, the
//! old connection's tcpclean coming before the new one's connect on a takeover.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use rumqttc::QoS;

use crate::harness::{Api, Server, ServerOpts, create_group, create_topic, wait_for};
use crate::mqtt::{Mq, addr, messages_of, opts, wait_stored};
use crate::plugins::{deploy, probe_manifest};
use crate::remoting::raw_call;
use crate::testdb::PgServer;

/// How long a change made on one host may take to be in force on the others.
const IN_FORCE: Duration = Duration::from_secs(2);

fn three_hosts(pg: &PgServer) -> Vec<Server> {
    hosts(pg, 3)
}

fn hosts(pg: &PgServer, n: usize) -> Vec<Server> {
    let config = format!(
        "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{}\"\npool_size = 8\n\
         [broker]\nretry_delay_scale = 0.0001\n",
        pg.url("postgres")
    );
    (0..n)
        .map(|_| Server::start(ServerOpts::with_config(config.clone())))
        .collect()
}

/// The remoting addresses a route answer from `s` names, master first.
fn route_addrs(s: &Server, topic: &str) -> Vec<String> {
    let (h, body) = raw_call(s, 105, json!({ "topic": topic }), b"");
    assert_eq!(h["code"], 0, "route: {h}");
    let route: serde_json::Value = serde_json::from_slice(&body).expect("route JSON");
    let addrs = route["brokerDatas"][0]["brokerAddrs"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut ids: Vec<(u64, String)> = addrs
        .into_iter()
        .filter_map(|(id, a)| Some((id.parse().ok()?, a.as_str()?.to_string())))
        .collect();
    ids.sort();
    ids.into_iter().map(|(_, a)| a).collect()
}

fn remoting(s: &Server) -> String {
    s.listener("remoting")
        .expect("remoting listener")
        .to_string()
}

/// Receives and acks on `api` until `stop`, adding every body to `seen`.
fn consume(api: Api, instance: String, seen: Arc<Mutex<BTreeSet<String>>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(r) = api.try_post_json(
            "/v1/groups/GID_multi/receive",
            &json!({"topic": "Multi", "expression": "*", "max": 64, "wait_ms": 300,
                    "instance_id": instance}),
        ) else {
            // The host is gone (killed): the survivors serve its queues.
            return;
        };
        if r.status != 200 {
            continue;
        }
        let messages = r.body["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        let receipts: Vec<&str> = messages
            .iter()
            .filter_map(|m| m["receipt"].as_str())
            .collect();
        let Ok(acked) =
            api.try_post_json("/v1/groups/GID_multi/ack", &json!({"receipts": receipts}))
        else {
            return;
        };
        if acked.status == 200 {
            let mut seen = seen.lock().unwrap();
            for m in &messages {
                if let Some(b) = m["body"].as_str() {
                    seen.insert(b.to_string());
                }
            }
        }
    }
}

#[test]
fn three_hosts_share_topics_and_lose_nothing_when_one_is_killed() {
    let pg = PgServer::private();
    let mut hosts = three_hosts(&pg);
    let apis: Vec<Api> = hosts.iter().map(|s| s.api().clone()).collect();

    // A topic created on host 0 takes sends on hosts 1 and 2 within 2 s.
    let created = Instant::now();
    apis[0]
        .post_json("/v1/topics", &json!({"name": "Multi", "queues": 8}))
        .expect(201);
    for api in &apis[1..] {
        wait_for("the new topic on another host", IN_FORCE, || {
            let r = api.post_json("/v1/topics/Multi/messages", &json!({"body": "probe"}));
            (r.status == 200).then_some(())
        });
    }
    assert!(created.elapsed() <= IN_FORCE + Duration::from_millis(500));
    // Creating it again on another host is a conflict there too: the store decides.
    apis[2]
        .post_json("/v1/topics", &json!({"name": "Multi", "queues": 8}))
        .expect_error(409, 1, "SYSTEM_ERROR");
    create_group(&apis[1], "GID_multi");
    wait_for("the new group on every host", IN_FORCE * 2, || {
        apis.iter()
            .all(|a| a.get("/v1/groups/GID_multi/status").status == 200)
            .then_some(())
    });

    // Remoting routes name the answering host first, then every other live host.
    let all: BTreeSet<String> = hosts.iter().map(remoting).collect();
    wait_for("routes naming every host", Duration::from_secs(10), || {
        let addrs = route_addrs(&hosts[0], "Multi");
        (addrs.first() == Some(&remoting(&hosts[0]))
            && addrs.iter().cloned().collect::<BTreeSet<_>>() == all)
            .then_some(())
    });

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = apis
        .iter()
        .enumerate()
        .map(|(i, api)| {
            let (api, seen, stop) = (api.clone(), seen.clone(), stop.clone());
            thread::spawn(move || consume(api, format!("c{i}"), seen, stop))
        })
        .collect();

    // Senders on every host; what a host acknowledged must be consumed.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let per_host = 400;
    let senders: Vec<_> = apis
        .iter()
        .enumerate()
        .map(|(h, api)| {
            let (api, acked) = (api.clone(), acked.clone());
            thread::spawn(move || {
                for n in 0..per_host {
                    let body = format!("h{h}-{n}");
                    match api.try_post_json("/v1/topics/Multi/messages", &json!({"body": body})) {
                        Ok(r) if r.status == 200 => acked.lock().unwrap().push(body),
                        Ok(_) => {}
                        Err(_) => return, // the host was killed
                    }
                }
            })
        })
        .collect();
    wait_for(
        "host 2 to acknowledge some sends",
        Duration::from_secs(30),
        || {
            let n = acked
                .lock()
                .unwrap()
                .iter()
                .filter(|b| b.starts_with("h2-"))
                .count();
            (n >= 50).then_some(())
        },
    );
    let killed = Instant::now();
    hosts[2].kill9();
    for s in senders {
        s.join().expect("sender");
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked.iter().filter(|b| b.starts_with("h0-")).count() == per_host,
        "the surviving hosts acknowledge every send"
    );
    // Host 2's queues (leases of 8 s) move to the survivors, which deliver what it held.
    wait_for(
        "every acknowledged message consumed",
        Duration::from_secs(60),
        || {
            let seen = seen.lock().unwrap();
            acked.iter().all(|b| seen.contains(b)).then_some(())
        },
    );
    let moved_in = killed.elapsed();
    // The killed host drops out of the routes once its membership row expires.
    let survivors: BTreeSet<String> = hosts[..2].iter().map(remoting).collect();
    wait_for(
        "routes without the killed host",
        Duration::from_secs(20),
        || {
            (route_addrs(&hosts[1], "Multi")
                .into_iter()
                .collect::<BTreeSet<_>>()
                == survivors)
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.join();
    }
    let missing: Vec<&String> = {
        let seen = seen.lock().unwrap();
        acked.iter().filter(|b| !seen.contains(*b)).collect()
    };
    assert!(missing.is_empty(), "lost: {missing:?}");
    eprintln!(
        "{} acknowledged sends all consumed; the killed host's queues were served again {:?} after the kill",
        acked.len(),
        moved_in
    );
    for h in hosts.iter_mut().take(2) {
        h.stop();
    }
}

#[test]
fn a_plugin_deployed_on_one_host_runs_on_every_host() {
    let pg = PgServer::private();
    let mut hosts = three_hosts(&pg);
    hosts[0]
        .api()
        .post_json("/v1/topics", &json!({"name": "Load", "queues": 4}))
        .expect(201);
    let v1 = probe_manifest(&hosts[0], "spread", "1.0.0", "");
    let v2 = probe_manifest(&hosts[1], "spread", "2.0.0", "");
    assert_eq!(deploy(&hosts[0], &v1)["version"], 1);
    // The other hosts run the same version from the bytes in the store (their data dirs never
    // saw the component); compiling it there is part of the wait.
    let running_everywhere = |version: u64, manifest_version: &str| {
        wait_for(
            &format!("v{version} running on every host"),
            Duration::from_secs(60),
            || {
                hosts
                    .iter()
                    .all(|h| {
                        let r = h.get("/v1/plugins/spread");
                        r.status == 200
                            && r.body["version"] == version
                            && r.body["manifest_version"] == manifest_version
                            && r.body["status"] == "running"
                    })
                    .then_some(())
            },
        )
    };
    running_everywhere(1, "1.0.0");
    assert_eq!(
        deploy(&hosts[1], &v2)["version"],
        2,
        "host 1 numbers after host 0's version"
    );
    running_everywhere(2, "2.0.0");
    let back = hosts[2]
        .wharf(&["plugin", "rollback", "spread", "--json"])
        .ok()
        .json();
    assert_eq!(back["version"], 1);
    running_everywhere(1, "1.0.0");
    // Messages sent to any host are committed by the plugin somewhere.
    for (i, h) in hosts.iter().enumerate() {
        for n in 0..20 {
            h.post_json(
                "/v1/topics/Load/messages",
                &json!({"tag": "commit", "body": format!("{i}-{n}")}),
            )
            .expect(200);
        }
    }
    // Each host's plugin commits the messages of the queues it holds; together, all 60.
    wait_for("every message committed", Duration::from_secs(60), || {
        let commits: u64 = hosts
            .iter()
            .map(|h| {
                h.get("/v1/plugins/spread").expect(200)["counters"]["commits"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        (commits >= 60).then_some(())
    });
    hosts[0]
        .wharf(&["plugin", "remove", "spread", "--json"])
        .ok();
    wait_for("removed on every host", Duration::from_secs(10), || {
        hosts
            .iter()
            .all(|h| h.get("/v1/plugins/spread").status == 404)
            .then_some(())
    });
    for h in &mut hosts {
        h.stop();
    }
}

/// Two hosts on one database with topic `topic` created on the first and in force on both.
fn two_mqtt_hosts(pg: &PgServer, topic: &str) -> Vec<Server> {
    let hosts = hosts(pg, 2);
    create_topic(hosts[0].api(), topic, 4);
    wait_for("the topic on the other host", IN_FORCE * 2, || {
        (hosts[1].get(&format!("/v1/topics/{topic}")).status == 200).then_some(())
    });
    hosts
}

fn text(p: &rumqttc::Publish) -> (String, QoS, String) {
    (
        p.topic.clone(),
        p.qos,
        String::from_utf8_lossy(&p.payload).into_owned(),
    )
}

#[test]
fn mqtt_clients_on_two_hosts_see_each_others_messages() {
    let pg = PgServer::private();
    let mut hosts = two_mqtt_hosts(&pg, "Parent");
    let (a, b) = (addr(&hosts[0]), addr(&hosts[1]));
    let (sub, _) = Mq::connect(opts(&a, "sub-a"));
    sub.subscribe("Parent/#", QoS::AtLeastOnce);
    sub.subscribe("local/+", QoS::AtLeastOnce);
    let (target, _) = Mq::connect(opts(&a, "target-a"));
    let (publ, _) = Mq::connect(opts(&b, "pub-b"));
    publ.publish("Parent/x/y", QoS::AtMostOnce, false, b"q0");
    publ.publish("Parent/x/y", QoS::AtLeastOnce, false, b"q1");
    publ.publish("local/z", QoS::AtLeastOnce, false, b"local");
    let mut got: Vec<_> = (0..3).map(|_| text(&sub.msg())).collect();
    got.sort_by(|x, y| x.2.cmp(&y.2));
    assert_eq!(
        got,
        vec![
            ("local/z".into(), QoS::AtLeastOnce, "local".into()),
            ("Parent/x/y".into(), QoS::AtMostOnce, "q0".into()),
            ("Parent/x/y".into(), QoS::AtLeastOnce, "q1".into()),
        ],
        "a wildcard subscriber on host 0 gets host 1's publishes at their QoS"
    );
    // P2P to a client connected to the other host, from an MQTT client and from a broker producer.
    publ.publish("Parent/p2p/target-a", QoS::AtLeastOnce, false, b"psst");
    let m = target.msg();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("Parent/p2p/target-a", &b"psst"[..])
    );
    hosts[1]
        .post_json(
            "/v1/topics/Parent/messages",
            &json!({"tag": "MQ2MQTT", "properties": {"mqttSecondTopic": "/p2p/target-a"}, "body": "direct"}),
        )
        .expect(200);
    assert_eq!(&target.msg().payload[..], b"direct");
    // MQ2MQTT sent over HTTP to the other host.
    hosts[1]
        .post_json(
            "/v1/topics/Parent/messages",
            &json!({"tag": "MQ2MQTT", "properties": {"mqttSecondTopic": "/notice"}, "body": "from broker"}),
        )
        .expect(200);
    let m = sub.msg();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("Parent/notice", &b"from broker"[..])
    );
    // The P2P messages went to their target only.
    assert!(sub.msg_within(Duration::from_millis(300)).is_none());

    // A retained message published on host 0 reaches a new subscriber on host 1.
    let (retainer, _) = Mq::connect(opts(&a, "retainer"));
    retainer.publish("Parent/state", QoS::AtLeastOnce, true, b"on");
    let m = wait_for("the retained message on host 1", IN_FORCE * 2, || {
        let (late, _) = Mq::connect(opts(&b, "late-b"));
        late.subscribe("Parent/state", QoS::AtLeastOnce);
        // The publish itself may also reach it live, without the retain flag.
        late.msg_within(Duration::from_millis(200))
            .filter(|m| m.retain)
    });
    assert!(m.retain, "{m:?}");
    assert_eq!(&m.payload[..], b"on");
    // Cleared on host 1: gone for new subscribers on host 0.
    let (clearer, _) = Mq::connect(opts(&b, "clearer"));
    clearer.publish("Parent/state", QoS::AtLeastOnce, true, b"");
    wait_for(
        "the retained message cleared on host 0",
        IN_FORCE * 2,
        || {
            let (late, _) = Mq::connect(opts(&a, "late-a"));
            late.subscribe("Parent/state", QoS::AtLeastOnce);
            late.msg_within(Duration::from_millis(200))
                .filter(|m| m.retain)
                .is_none()
                .then_some(())
        },
    );
    for h in &mut hosts {
        h.stop();
    }
}

#[test]
fn a_client_id_is_taken_over_across_hosts_with_its_queued_messages() {
    let pg = PgServer::private();
    let mut hosts = two_mqtt_hosts(&pg, "Dev");
    let (a, b) = (addr(&hosts[0]), addr(&hosts[1]));

    // Clean sessions: the connection on host 0 is closed when the id connects to host 1.
    let (first, _) = Mq::connect(opts(&a, "twin"));
    let (second, _) = Mq::connect(opts(&b, "twin"));
    let why = first.closed();
    assert!(!why.is_empty());
    second.subscribe("x/y", QoS::AtMostOnce);
    assert!(
        hosts[0].logs().contains("taken over"),
        "host 0 says why it closed the connection"
    );
    wait_for("host 1's device online on host 0", IN_FORCE * 2, || {
        let d = hosts[0].get("/v1/mqtt/devices/twin");
        (d.status == 200 && d.body["online"] == true && d.body["host"].is_string()).then_some(())
    });

    // clean-session=false with QoS 1 messages in flight on host 0 (never acknowledged) and
    // more queued while offline: a takeover on host 1 gets every one of them.
    let keeper = |at: &str| {
        let mut o = opts(at, "keeper");
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o
    };
    let (k, present) = Mq::connect(keeper(&a));
    assert!(!present);
    k.subscribe("Dev/q/#", QoS::AtLeastOnce);
    let (p, _) = Mq::connect(opts(&b, "producer"));
    for i in 0..10 {
        p.publish(
            &format!("Dev/q/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        );
    }
    let mut want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let mut seen: Vec<String> = (0..10).map(|_| text(&k.msg()).2).collect();
    seen.sort();
    want.sort();
    assert_eq!(seen, want, "host 0 delivers host 1's publishes");
    let (k2, present) = Mq::connect(keeper(&b));
    assert!(present, "host 1 resumes the session host 0 stored");
    k.closed();
    let mut again: Vec<String> = (0..10).map(|_| text(&k2.msg()).2).collect();
    again.sort();
    again.dedup();
    assert_eq!(
        again, want,
        "the unacknowledged messages come again on host 1"
    );
    // Offline, then back on host 0: what was published meanwhile (on host 1) is delivered.
    k2.client.disconnect().expect("disconnect");
    k2.closed();
    for i in 10..15 {
        p.publish(
            &format!("Dev/q/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        );
    }
    wait_stored(&hosts[1], "Dev", 15);
    let mut o = keeper(&a);
    o.set_manual_acks(false);
    let (k3, present) = Mq::connect(o);
    assert!(present);
    // The ten never acknowledged come again too; wait for the five new ones among them.
    let mut later = BTreeSet::new();
    while !(10..15).all(|i| later.contains(&format!("m{i}"))) {
        later.insert(text(&k3.msg()).2);
    }
    for h in &mut hosts {
        h.stop();
    }
}

/// `(tag, channelId, eventIndex)` of every presence event stored in `topic`, in store order.
fn presence_events(s: &Server, topic: &str) -> Vec<(String, String, u64)> {
    messages_of(s, topic)
        .iter()
        .map(|m| {
            let body: serde_json::Value =
                serde_json::from_str(m["body"].as_str().unwrap_or("{}")).expect("event JSON");
            (
                m["tag"].as_str().unwrap_or("").to_owned(),
                body["channelId"].as_str().expect("channelId").to_owned(),
                body["eventIndex"].as_u64().expect("eventIndex"),
            )
        })
        .collect()
}

fn strictly_increasing(events: &[(String, String, u64)]) -> bool {
    events.windows(2).all(|w| w[0].2 < w[1].2)
}

#[test]
fn presence_event_indexes_increase_across_hosts() {
    let pg = PgServer::private();
    let mut hosts = two_mqtt_hosts(&pg, "GID_dev_MQTT");
    let addrs = [addr(&hosts[0]), addr(&hosts[1])];
    for (n, at) in [0, 1, 0, 1].into_iter().enumerate() {
        let (c, _) = Mq::connect(opts(&addrs[at], "GID_dev@@@sensor"));
        c.client.disconnect().expect("disconnect");
        c.closed();
        wait_stored(&hosts[0], "GID_dev_MQTT", 2 * (n + 1));
    }
    let events = presence_events(&hosts[1], "GID_dev_MQTT");
    let tags: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(tags, ["connect", "disconnect"].repeat(4));
    assert!(
        strictly_increasing(&events),
        "eventIndex strictly increases across hosts: {events:?}"
    );
    for h in &mut hosts {
        h.stop();
    }
}

#[test]
fn a_clean_session_takeover_across_hosts_orders_presence_events() {
    let pg = PgServer::private();
    let mut hosts = two_mqtt_hosts(&pg, "GID_dev_MQTT");
    let addrs = [addr(&hosts[0]), addr(&hosts[1])];
    let id = "GID_dev@@@twin";
    let (mut holder, _) = Mq::connect(opts(&addrs[0], id));
    wait_stored(&hosts[0], "GID_dev_MQTT", 1);
    // Host 0 to host 1 and back, clean-session=true: the new connection's CONNACK comes once
    // the old host has closed the old connection and stored its tcpclean event.
    for (n, to) in [1, 0].into_iter().enumerate() {
        let (next, _) = Mq::connect(opts(&addrs[to], id));
        assert!(!holder.closed().is_empty(), "the old connection is closed");
        holder = next;
        wait_stored(&hosts[0], "GID_dev_MQTT", 3 + 2 * n);
    }
    for h in &hosts {
        assert!(
            h.logs()
                .contains("client id taken over by a new connection from"),
            "each host says why it closed its connection"
        );
    }
    let events = presence_events(&hosts[1], "GID_dev_MQTT");
    let tags: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        tags,
        ["connect", "tcpclean", "connect", "tcpclean", "connect"],
        "the old channel's tcpclean comes before the new channel's connect: {events:?}"
    );
    let channels: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(channels[0], channels[1], "{events:?}");
    assert_eq!(channels[2], channels[3], "{events:?}");
    assert!(
        channels[0] != channels[2] && channels[2] != channels[4] && channels[0] != channels[4],
        "each connection has its own channel: {events:?}"
    );
    assert!(
        strictly_increasing(&events),
        "eventIndex strictly increases: {events:?}"
    );
    // The last holder is still connected.
    holder.subscribe("x/y", QoS::AtMostOnce);
    for h in &mut hosts {
        h.stop();
    }
}

#[test]
fn a_client_id_taken_from_a_dead_host_leaves_no_notice_behind() {
    let pg = PgServer::private();
    let mut hosts = two_mqtt_hosts(&pg, "Parent");
    let (a, b) = (addr(&hosts[0]), addr(&hosts[1]));
    let (c, _) = Mq::connect(opts(&a, "wanderer"));
    hosts[0].kill9();
    drop(c);
    wait_for(
        "host 0's heartbeat expired",
        Duration::from_secs(60),
        || (route_addrs(&hosts[1], "Parent").len() == 1).then_some(()),
    );
    // Its owner record still names host 0's connection as online: nobody is left to read a
    // takeover notice there, so none is written.
    let (_c, present) = Mq::connect(opts(&b, "wanderer"));
    assert!(!present);
    let notices = "SELECT count(*) FROM wharf_meta WHERE namespace LIKE 'fe.mqtt.kick.%'";
    assert_eq!(psql(&pg, notices), "0");
}

/// Runs `sql` on the hosts' database (the `psql` client of the PostgreSQL package); its output.
fn psql(pg: &PgServer, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            pg.url("postgres").as_str(),
            "-v",
            "ON_ERROR_STOP=1",
            "-qtAc",
            sql,
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_session_taken_over_while_its_store_fails_is_handed_over_once_stored() {
    let pg = PgServer::private();
    let mut hosts = two_mqtt_hosts(&pg, "Dev");
    let (a, b) = (addr(&hosts[0]), addr(&hosts[1]));
    let keeper = |at: &str| {
        let mut o = opts(at, "keeper");
        o.set_clean_session(false);
        o
    };
    let (k, _) = Mq::connect(keeper(&a));
    k.subscribe("Dev/a/#", QoS::AtLeastOnce);
    let stored = "SELECT count(*) FROM wharf_meta WHERE namespace = 'fe.mqtt.session' \
                  AND key = 'keeper' AND convert_from(value, 'UTF8') LIKE '%Dev/a/#%'";
    wait_for("the session stored", Duration::from_secs(10), || {
        (psql(&pg, stored) == "1").then_some(())
    });
    // From here on the database refuses every write of an MQTT session.
    psql(
        &pg,
        "CREATE FUNCTION refuse_sessions() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.namespace = 'fe.mqtt.session' THEN RAISE EXCEPTION 'sessions refused'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_sessions BEFORE INSERT OR UPDATE ON wharf_meta \
         FOR EACH ROW EXECUTE FUNCTION refuse_sessions();",
    );
    k.subscribe("Dev/b/#", QoS::AtLeastOnce);
    // The same client id on host 1: host 0 closes its connection and cannot store the session.
    let o = keeper(&b);
    let taking_over = thread::spawn(move || Mq::connect(o));
    wait_for("host 0 retrying", Duration::from_secs(20), || {
        hosts[0]
            .logs()
            .contains("retrying before handing it over")
            .then_some(())
    });
    // The database recovers while host 1 waits for host 0 to let go.
    psql(&pg, "DROP TRIGGER refuse_sessions ON wharf_meta");
    let (k2, present) = taking_over.join().expect("host 1 connects");
    assert!(present, "host 1 resumes the session");
    k.closed();
    assert!(
        hosts[0]
            .logs()
            .contains("stored the MQTT session before handing it over"),
        "{}",
        hosts[0].logs()
    );
    // The subscription made while the store refused it came along.
    let (p, _) = Mq::connect(opts(&b, "producer"));
    p.publish("Dev/b/1", QoS::AtLeastOnce, false, b"late filter");
    assert_eq!(&k2.msg().payload[..], b"late filter");
    for h in &mut hosts {
        h.stop();
    }
}
