//! Consumption engine end to end over HTTP: pull consumer, tag filters, retries, dead letters,
//! timers, group status, stale receipts, and recovery after `kill -9`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::harness::{Api, Server, ServerOpts, create_topic, wait_for};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A host whose retry back-offs are 10,000× shorter (10 s → 1 ms, 2 h → 720 ms).
fn fast_retry_server() -> Server {
    Server::start(ServerOpts::with_config(
        "[broker]\nretry_delay_scale = 0.0001\n",
    ))
}

fn group(api: &Api, name: &str, settings: Value) {
    let mut body = json!({"name": name, "kind": "consumer"});
    if let (Some(b), Some(s)) = (body.as_object_mut(), settings.as_object()) {
        b.extend(s.clone());
    }
    api.post_json("/v1/groups", &body).expect(201);
}

fn send(api: &Api, topic: &str, msg: Value) -> String {
    let r = api.post_json(&format!("/v1/topics/{topic}/messages"), &msg);
    assert!(
        r.status == 200 || r.status == 201,
        "{} {}",
        r.status,
        r.text
    );
    r.body["message_id"].as_str().unwrap().to_string()
}

fn receive(api: &Api, group: &str, req: Value) -> Vec<Value> {
    let r = api
        .post_json(&format!("/v1/groups/{group}/receive"), &req)
        .expect(200);
    r["messages"].as_array().cloned().unwrap_or_default()
}

/// Receives until `n` messages came (long polls of 500 ms), for at most 15 s.
fn receive_n(api: &Api, group: &str, topic: &str, expr: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    wait_for(
        &format!("{n} messages for {group}"),
        Duration::from_secs(15),
        || {
            out.extend(receive(
                api,
                group,
                json!({"topic": topic, "expression": expr, "max": 32, "wait_ms": 500, "instance_id": "e2e"}),
            ));
            (out.len() >= n).then_some(())
        },
    );
    out
}

fn settle(api: &Api, group: &str, verb: &str, msgs: &[&Value]) -> u16 {
    let receipts: Vec<&str> = msgs
        .iter()
        .map(|m| m["receipt"].as_str().unwrap())
        .collect();
    api.post_json(
        &format!("/v1/groups/{group}/{verb}"),
        &json!({ "receipts": receipts }),
    )
    .status
}

fn body(m: &Value) -> &str {
    m["body"].as_str().unwrap()
}

#[test]
fn pull_filter_ack_nack_retry_dead_letter_resend() {
    let s = fast_retry_server();
    let api = s.api();
    create_topic(api, "Orders", 4);
    group(api, "GID_pull", json!({"max_reconsume_times": 2}));
    for (i, tag) in ["order", "pay", "refund", "order"].iter().enumerate() {
        send(api, "Orders", json!({"tag": tag, "body": format!("m{i}")}));
    }
    let got = receive_n(api, "GID_pull", "Orders", "order||pay", 3);
    assert_eq!(got.len(), 3, "refund is filtered out: {got:?}");
    assert!(got.iter().all(|m| m["tag"] != "refund"));
    let fail = got.iter().find(|m| body(m) == "m1").unwrap();
    let ok: Vec<&Value> = got.iter().filter(|m| body(m) != "m1").collect();
    assert_eq!(settle(api, "GID_pull", "ack", &ok), 200);
    // Acking again is a clear error about a stale receipt.
    let again = api.post_json(
        "/v1/groups/GID_pull/ack",
        &json!({"receipts": [ok[0]["receipt"]]}),
    );
    assert_eq!(again.status, 400, "{}", again.text);
    assert!(again.text.contains("receipt expired"), "{}", again.text);

    // Fail m1 until it is dead-lettered: 2 retries, each presented with the original topic/id.
    let id = fail["message_id"].as_str().unwrap().to_string();
    let mut current = fail.clone();
    for attempt in 0..=2u64 {
        assert_eq!(current["reconsume_times"], attempt, "{current}");
        assert_eq!(current["topic"], "Orders");
        assert_eq!(current["message_id"], id.as_str());
        assert_eq!(settle(api, "GID_pull", "nack", &[&current]), 200);
        if attempt < 2 {
            current = receive_n(api, "GID_pull", "Orders", "order||pay", 1).remove(0);
        }
    }
    let dead = wait_for("a dead letter", Duration::from_secs(10), || {
        let page = api.get("/v1/groups/GID_pull/dead-letters").expect(200);
        page["messages"].as_array().and_then(|a| a.first().cloned())
    });
    assert_eq!(body(&dead), "m1");
    let dead_id = dead["message_id"].as_str().unwrap();
    let r = api
        .post_json(
            &format!("/v1/groups/GID_pull/dead-letters/{dead_id}/resend"),
            &json!({}),
        )
        .expect(200);
    let resent = receive_n(api, "GID_pull", "Orders", "order||pay", 1);
    assert_eq!(resent[0]["message_id"], r["message_id"]);
    assert_eq!(resent[0]["reconsume_times"], 0);
    assert_eq!(settle(api, "GID_pull", "ack", &[&resent[0]]), 200);

    let st = api.get("/v1/groups/GID_pull/status").expect(200);
    assert_eq!(st["online"], true, "{st}");
    assert_eq!(st["consistent"], true, "{st}");
    assert_eq!(st["backlog"], 0, "{st}");
    assert!(st["last_consume_ms"].as_u64().unwrap() > 0, "{st}");
    let inst = &st["instances"][0];
    assert_eq!(inst["instance_id"], "e2e");
    assert!(st["subscriptions"][0]["topic"] == "Orders", "{st}");

    let bad = api.post_json(
        "/v1/groups/GID_pull/receive",
        &json!({"topic": "Orders", "expression": "a||", "instance_id": "e2e"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert_eq!(bad.body["error"]["code"], 23, "{}", bad.text);
}

#[test]
fn timer_is_delivered_at_its_time_not_before() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Later", 2);
    group(api, "GID_timer", json!({}));
    // Register first, so the group starts before the timer is revealed.
    receive(
        api,
        "GID_timer",
        json!({"topic": "Later", "instance_id": "e2e"}),
    );
    let at = now_ms() + 1_500;
    send(api, "Later", json!({"body": "tick", "deliver_at_ms": at}));
    let got = receive_n(api, "GID_timer", "Later", "*", 1);
    let seen = now_ms();
    assert!(seen >= at, "delivered {} ms early", at - seen);
    assert_eq!(body(&got[0]), "tick");
    assert_eq!(got[0]["deliver_at_ms"], at);
}

#[test]
fn kill9_midway_redelivers_unacked_and_keeps_timers_and_retries() {
    let mut s = fast_retry_server();
    create_topic(s.api(), "Work", 2);
    group(s.api(), "GID_crash", json!({}));
    receive(
        s.api(),
        "GID_crash",
        json!({"topic": "Work", "instance_id": "e2e"}),
    );
    for i in 0..4 {
        send(s.api(), "Work", json!({"body": format!("w{i}")}));
    }
    let at = now_ms() + 4_000;
    send(
        s.api(),
        "Work",
        json!({"body": "timer", "deliver_at_ms": at}),
    );
    let got = receive_n(s.api(), "GID_crash", "Work", "*", 4);
    let acked: Vec<&Value> = got.iter().filter(|m| body(m) == "w0").collect();
    assert_eq!(settle(s.api(), "GID_crash", "ack", &acked), 200);
    let to_retry: Vec<&Value> = got.iter().filter(|m| body(m) == "w1").collect();
    assert_eq!(settle(s.api(), "GID_crash", "nack", &to_retry), 200);
    // No clean stop: whatever offsets were not yet saved are simply redelivered (at-least-once).
    s.kill9();
    s.restart();
    let api = s.api();
    // w2, w3 were never acknowledged; w1 comes back as a retry; the timer at its time.
    let mut bodies = BTreeSet::new();
    let mut timer_seen_at = None;
    let mut w1_retried = false;
    wait_for(
        "redeliveries after kill -9",
        Duration::from_secs(20),
        || {
            for m in receive(
                api,
                "GID_crash",
                json!({"topic": "Work", "max": 32, "wait_ms": 500, "instance_id": "e2e"}),
            ) {
                if body(&m) == "timer" {
                    timer_seen_at = Some(now_ms());
                }
                if body(&m) == "w1" && m["reconsume_times"].as_u64().unwrap() >= 1 {
                    w1_retried = true;
                }
                bodies.insert(body(&m).to_string());
                assert_eq!(settle(api, "GID_crash", "ack", &[&m]), 200);
            }
            (w1_retried && ["w2", "w3", "timer"].iter().all(|b| bodies.contains(*b))).then_some(())
        },
    );
    assert!(timer_seen_at.unwrap() >= at, "timer delivered early");
    // Receipts from before the crash are stale.
    let stale = settle(api, "GID_crash", "ack", &[&got[2]]);
    assert_eq!(stale, 400);
}
