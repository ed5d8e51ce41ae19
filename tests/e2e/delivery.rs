//! The consumption core end to end: HTTP pull consumers keep their deliveries while slow,
//! one instance reads several topics without rebalancing itself, receipts name the host boot
//! that issued them, and un-acked messages come back only after the consume timeout.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Api, Server, ServerOpts, create_topic, wait_for};

/// Instances silent for 1 s are dropped; retries wait 10,000× less than the real schedule.
const FAST: &str = "[broker]\nconsumer_heartbeat_timeout_ms = 1000\nretry_delay_scale = 0.0001\n";

fn group(api: &Api, name: &str, consume_timeout_ms: u64) {
    api.post_json(
        "/v1/groups",
        &json!({"name": name, "kind": "consumer", "consume_timeout_ms": consume_timeout_ms}),
    )
    .expect(201);
}

fn send(api: &Api, topic: &str, body: &str) -> String {
    let r = api.post_json(
        &format!("/v1/topics/{topic}/messages"),
        &json!({ "body": body }),
    );
    assert!(
        r.status == 200 || r.status == 201,
        "{} {}",
        r.status,
        r.text
    );
    r.body["message_id"].as_str().unwrap().to_string()
}

fn receive(api: &Api, group: &str, topic: &str, instance: &str, wait_ms: u64) -> Vec<Value> {
    let r = api
        .post_json(
            &format!("/v1/groups/{group}/receive"),
            &json!({"topic": topic, "max": 32, "wait_ms": wait_ms, "instance_id": instance}),
        )
        .expect(200);
    r["messages"].as_array().cloned().unwrap_or_default()
}

fn ack(api: &Api, group: &str, msgs: &[&Value]) -> crate::harness::Resp {
    let receipts: Vec<&str> = msgs
        .iter()
        .map(|m| m["receipt"].as_str().unwrap())
        .collect();
    api.post_json(
        &format!("/v1/groups/{group}/ack"),
        &json!({ "receipts": receipts }),
    )
}

fn bodies(msgs: &[Value]) -> Vec<String> {
    let mut b: Vec<String> = msgs
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    b.sort();
    b
}

#[test]
fn a_slow_http_consumer_keeps_its_batch_past_the_heartbeat_timeout() {
    let s = Server::start(ServerOpts::with_config(FAST));
    let api = s.api();
    create_topic(api, "Slow", 1);
    group(api, "GID_slow", 600_000);
    let id = send(api, "Slow", "work");
    let got = receive(api, "GID_slow", "Slow", "slow-1", 2_000);
    assert_eq!(bodies(&got), ["work"]);
    // The consumer works for longer than the heartbeat timeout: that is what it is testing.
    std::thread::sleep(Duration::from_millis(2_500));
    // Meanwhile another instance joins and takes the queue over: the held message stays held.
    assert!(receive(api, "GID_slow", "Slow", "other", 300).is_empty());
    let r = ack(api, "GID_slow", &[&got[0]]);
    assert_eq!(
        r.status, 200,
        "the slow consumer's ack must land: {}",
        r.text
    );
    // Nothing comes back: the message was consumed once, without a retry.
    assert!(receive(api, "GID_slow", "Slow", "other", 500).is_empty());
    let view = api.get(&format!("/v1/messages/{id}")).expect(200);
    let d = view["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["group"] == "GID_slow")
        .cloned()
        .unwrap();
    assert_eq!(d["status"], "consumed", "{view}");
}

#[test]
fn unacked_messages_come_back_after_the_consume_timeout_with_one_more_attempt() {
    let s = Server::start(ServerOpts::with_config(FAST));
    let api = s.api();
    create_topic(api, "Timeout", 1);
    group(api, "GID_timeout", 1_500);
    send(api, "Timeout", "late");
    let first = receive(api, "GID_timeout", "Timeout", "c", 2_000);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["reconsume_times"], 0);
    let again = wait_for("the redelivery", Duration::from_secs(15), || {
        let got = receive(api, "GID_timeout", "Timeout", "c", 1_000);
        (!got.is_empty()).then_some(got)
    });
    assert_eq!(bodies(&again), ["late"]);
    assert_eq!(again[0]["reconsume_times"], 1, "{}", again[0]);
    let stale = ack(api, "GID_timeout", &[&first[0]]);
    assert_eq!(stale.status, 400, "{}", stale.text);
    assert!(stale.text.contains("receipt expired"), "{}", stale.text);
    assert_eq!(ack(api, "GID_timeout", &[&again[0]]).status, 200);
}

#[test]
fn one_instance_reading_two_topics_is_one_consistent_member() {
    let s = Server::start(ServerOpts::with_config(FAST));
    let api = s.api();
    create_topic(api, "TopicA", 2);
    create_topic(api, "TopicB", 2);
    group(api, "GID_two", 600_000);
    for i in 0..4 {
        send(api, "TopicA", &format!("a{i}"));
        send(api, "TopicB", &format!("b{i}"));
    }
    let mut a = Vec::new();
    wait_for("TopicA's messages", Duration::from_secs(10), || {
        a.extend(receive(api, "GID_two", "TopicA", "reader", 500));
        (a.len() >= 4).then_some(())
    });
    assert_eq!(bodies(&a), ["a0", "a1", "a2", "a3"], "only TopicA's");
    let mut b = Vec::new();
    wait_for("TopicB's messages", Duration::from_secs(10), || {
        b.extend(receive(api, "GID_two", "TopicB", "reader", 500));
        (b.len() >= 4).then_some(())
    });
    assert_eq!(bodies(&b), ["b0", "b1", "b2", "b3"], "only TopicB's");
    // Reading TopicB did not rebalance TopicA away from the reader: its receipts still work.
    let refs: Vec<&Value> = a.iter().chain(&b).collect();
    let r = ack(api, "GID_two", &refs);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["settled"], 8);
    let st = api.get("/v1/groups/GID_two/status").expect(200);
    assert_eq!(st["instances"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["consistent"], true, "{st}");
    assert_eq!(st["subscriptions"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(st["backlog"], 0, "{st}");
}

#[test]
fn a_receipt_from_before_a_restart_says_so() {
    let mut s = Server::start(ServerOpts::with_config(FAST));
    create_topic(s.api(), "Boot", 1);
    group(s.api(), "GID_boot", 600_000);
    send(s.api(), "Boot", "x");
    let got = receive(s.api(), "GID_boot", "Boot", "c", 2_000);
    assert_eq!(got.len(), 1);
    s.restart();
    let r = ack(s.api(), "GID_boot", &[&got[0]]);
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("issued by host"), "{}", r.text);
    // The message itself is not lost: it is delivered again after the restart.
    let again = receive(s.api(), "GID_boot", "Boot", "c", 2_000);
    assert_eq!(bodies(&again), ["x"]);
}

#[test]
fn a_time_range_query_lists_timer_messages_stored_in_it_while_consumers_wait() {
    let s = Server::start(ServerOpts::with_config(FAST));
    let api = s.api();
    create_topic(api, "Later", 1);
    group(api, "GID_later", 600_000);
    // The consumer subscribes first, so the group starts before both messages.
    assert!(receive(api, "GID_later", "Later", "c", 0).is_empty());
    let begin = crate::foundation::now_ms();
    let r = api.post_json(
        "/v1/topics/Later/messages",
        &json!({"body": "in an hour", "delay_ms": 3_600_000}),
    );
    assert!(r.status == 200 || r.status == 201, "{}", r.text);
    let timer_id = r.body["message_id"].as_str().unwrap().to_string();
    let now_id = send(api, "Later", "now");
    let listed =
        crate::foundation::range_all(api, "Later", begin, crate::foundation::now_ms() + 1_000, 10);
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .collect();
    assert!(
        ids.contains(&timer_id.as_str()),
        "the timer message is listed: {listed:?}"
    );
    assert!(ids.contains(&now_id.as_str()), "{listed:?}");
    let timer = listed
        .iter()
        .find(|m| m["message_id"] == timer_id.as_str())
        .unwrap();
    assert!(timer["deliver_at_ms"].as_u64().is_some(), "{timer}");
    // Consumers still see only the due one.
    let got = receive(api, "GID_later", "Later", "c", 1_000);
    assert_eq!(bodies(&got), ["now"]);
}
