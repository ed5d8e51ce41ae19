//! Issue 3, end to end: resources, send, query, errors, auth, metrics, CLI, shutdown, retention.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::harness::{Api, Server, ServerOpts, create_group, create_topic, wait_for};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The list inside a list answer: a bare array, or the array under `key`.
pub fn items(v: &Value, key: &str) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(|| panic!("no '{key}' list in {v}")),
        _ => panic!("not a list answer: {v}"),
    }
}

/// Sends one message object (or a batch array) and asserts success.
pub fn send(api: &Api, topic: &str, msg: &Value) -> Value {
    let r = api.post_json(&format!("/v1/topics/{topic}/messages"), msg);
    assert!(
        r.status == 200 || r.status == 201,
        "send to {topic} failed: {} {}",
        r.status,
        r.text
    );
    r.body
}

/// Reads a message by id and asserts 200.
pub fn get_message(api: &Api, id: &str) -> Value {
    api.get(&format!("/v1/messages/{id}")).expect(200)
}

/// Every message of `topic` stored in `[begin, end]`, following page tokens; asserts page sizes.
pub fn range_all(api: &Api, topic: &str, begin: u64, end: u64, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..100_000 {
        let mut path =
            format!("/v1/topics/{topic}/messages?begin_ms={begin}&end_ms={end}&limit={limit}");
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={t}"));
        }
        let page = api.get(&path).expect(200);
        let msgs = items(&page, "messages");
        assert!(
            msgs.len() <= limit,
            "page of {} > limit {limit}",
            msgs.len()
        );
        out.extend(msgs);
        match page.get("next_page_token").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => return out,
        }
    }
    panic!("range query never ended");
}

pub fn id_of(v: &Value) -> String {
    v["message_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no message_id in {v}"))
        .to_string()
}

fn assert_receipt(r: &Value, queues: u64) {
    let id = id_of(r);
    assert_eq!(id.len(), 32, "message id is 32 hex chars: {id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert!(r["queue_id"].as_u64().unwrap() < queues, "{r}");
    assert!(r["queue_offset"].is_u64(), "{r}");
}

#[test]
fn topics_crud() {
    let s = Server::start_default();
    let api = s.api();
    let t = create_topic(api, "Trade", 4);
    assert_eq!(t["name"], "Trade");
    assert_eq!(t["queues"], 4);
    assert_eq!(t["type"], "normal");

    api.post_json("/v1/topics", &json!({"name": "Delayed", "type": "delay"}))
        .expect(201);
    let d = api.get("/v1/topics/Delayed").expect(200);
    assert_eq!(d["type"], "delay");
    assert_eq!(d["queues"], 8, "default queue count is 8");

    let dup = api.post_json("/v1/topics", &json!({"name": "Trade", "queues": 2}));
    assert_eq!(dup.status, 409, "{}", dup.text);
    assert!(dup.body["error"]["name"].is_string(), "{}", dup.text);

    let names: BTreeSet<String> = items(&api.get("/v1/topics").expect(200), "topics")
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains("Trade") && names.contains("Delayed"),
        "{names:?}"
    );
    assert_eq!(api.get("/v1/topics/Trade").expect(200)["queues"], 4);

    api.get("/v1/topics/Nope")
        .expect_error(404, 17, "TOPIC_NOT_EXIST");
    api.delete("/v1/topics/Nope")
        .expect_error(404, 17, "TOPIC_NOT_EXIST");

    let del = api.delete("/v1/topics/Trade");
    assert!(del.status == 200 || del.status == 204, "{}", del.text);
    api.get("/v1/topics/Trade")
        .expect_error(404, 17, "TOPIC_NOT_EXIST");
    api.post_json("/v1/topics/Trade/messages", &json!({"body": "x"}))
        .expect_error(404, 17, "TOPIC_NOT_EXIST");
    // A deleted name can be created again.
    create_topic(api, "Trade", 1);
}

#[test]
fn topic_input_is_checked() {
    let s = Server::start_default();
    let api = s.api();
    for bad in [
        json!({"name": "ab"}),
        json!({"name": "a b c"}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "%SYS_TOPIC"}),
        json!({"name": "Trade", "queues": 0}),
        json!({"name": "Trade", "queues": 100000}),
        json!({"name": "Trade", "type": "weird"}),
        json!({"name": "Trade", "queues": "four"}),
        json!({"name": "Trade", "colour": "red"}),
        json!({"queues": 4}),
        json!(["Trade"]),
    ] {
        let r = api.post_json("/v1/topics", &bad);
        assert_eq!(r.status, 400, "{bad} → {} {}", r.status, r.text);
        assert!(r.body["error"]["code"].is_i64(), "{bad} → {}", r.text);
        assert!(r.body["error"]["message"].is_string(), "{bad} → {}", r.text);
    }
    let r = s.post_raw("/v1/topics", "application/json", b"{\"name\":".to_vec());
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.body["error"]["name"].is_string(), "{}", r.text);
    // Nothing half-created by the failures.
    assert!(items(&api.get("/v1/topics").expect(200), "topics").is_empty());
}

#[test]
fn groups_crud() {
    let s = Server::start_default();
    let api = s.api();
    let g = create_group(api, "GID_orders");
    assert_eq!(g["name"], "GID_orders");
    api.post_json(
        "/v1/groups",
        &json!({"name": "PID_orders", "kind": "producer"}),
    )
    .expect(201);
    api.post_json("/v1/groups", &json!({"name": "GID_dev_1", "kind": "mqtt"}))
        .expect(201);

    let dup = api.post_json("/v1/groups", &json!({"name": "GID_orders"}));
    assert_eq!(dup.status, 409, "{}", dup.text);

    let names: BTreeSet<String> = items(&api.get("/v1/groups").expect(200), "groups")
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["GID_dev_1", "GID_orders", "PID_orders"]
            .map(String::from)
            .into()
    );
    let shown = api.get("/v1/groups/GID_orders").expect(200);
    assert_eq!(shown["name"], "GID_orders");
    assert_eq!(shown["kind"], "consumer");

    api.get("/v1/groups/GID_nope")
        .expect_error(404, 26, "SUBSCRIPTION_GROUP_NOT_EXIST");
    api.delete("/v1/groups/GID_nope")
        .expect_error(404, 26, "SUBSCRIPTION_GROUP_NOT_EXIST");
    let del = api.delete("/v1/groups/GID_orders");
    assert!(del.status == 200 || del.status == 204, "{}", del.text);
    api.get("/v1/groups/GID_orders")
        .expect_error(404, 26, "SUBSCRIPTION_GROUP_NOT_EXIST");

    for bad in [
        json!({"name": "g"}),
        json!({"name": "bad name"}),
        json!({"name": "GID_x", "kind": "nobody"}),
        json!({"name": "GID_x", "flavour": 1}),
        json!({"name": "GID_x", "max_reconsume_times": "many"}),
        // MQTT groups are GID_ + letters/digits/_ , 7-32 characters.
        json!({"name": "GID_AB", "kind": "mqtt"}),
        json!({"name": "XID_ABCDEF", "kind": "mqtt"}),
        json!({"name": "GID_ABC-1", "kind": "mqtt"}),
    ] {
        let r = api.post_json("/v1/groups", &bad);
        assert_eq!(r.status, 400, "{bad} → {} {}", r.status, r.text);
        assert!(r.body["error"]["name"].is_string(), "{}", r.text);
    }
}

#[test]
fn send_single_and_batch_then_read_by_id() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Trade", 4);
    let before = now_ms();
    let r = send(
        api,
        "Trade",
        &json!({"tag": "order", "keys": ["o-1", "c-9"], "properties": {"region": "eu", "n": "1"},
                "body": "hello wharf"}),
    );
    assert_receipt(&r, 4);
    let id = id_of(&r);
    let m = get_message(api, &id);
    assert_eq!(m["message_id"], id.as_str());
    assert_eq!(m["topic"], "Trade");
    assert_eq!(m["tag"], "order");
    assert_eq!(m["keys"], json!(["o-1", "c-9"]));
    assert_eq!(m["properties"]["region"], "eu");
    assert_eq!(m["properties"]["n"], "1");
    assert_eq!(m["body"], "hello wharf");
    assert!(m.get("body_base64").is_none_or(Value::is_null), "{m}");
    assert_eq!(m["queue_id"], r["queue_id"]);
    assert_eq!(m["queue_offset"], r["queue_offset"]);
    assert_eq!(m["reconsume_times"], 0);
    let born = m["born_ms"].as_u64().unwrap();
    let stored = m["stored_ms"].as_u64().unwrap();
    assert!(born >= before - 1000 && born <= now_ms() + 1000, "{m}");
    assert!(stored >= born && stored <= now_ms() + 1000, "{m}");
    assert!(m["deliveries"].is_array(), "deliveries listed: {m}");

    // Batch: answers in input order, one receipt per message.
    let batch: Vec<Value> = (0..10)
        .map(|i| json!({"tag": "pay", "keys": [format!("b-{i}")], "body": format!("batch {i}")}))
        .collect();
    let rs = send(api, "Trade", &Value::Array(batch));
    let rs = rs.as_array().expect("batch answers an array").clone();
    assert_eq!(rs.len(), 10);
    let mut ids = BTreeSet::new();
    for (i, r) in rs.iter().enumerate() {
        assert_receipt(r, 4);
        ids.insert(id_of(r));
        let m = get_message(api, &id_of(r));
        assert_eq!(m["body"], format!("batch {i}"));
        assert_eq!(m["keys"], json!([format!("b-{i}")]));
    }
    assert_eq!(ids.len(), 10, "ids are unique");
    assert!(!ids.contains(&id));

    // Offsets within one queue grow without gaps.
    let mut per_queue: HashMap<u64, Vec<u64>> = HashMap::new();
    for r in rs.iter().chain([&r]) {
        per_queue
            .entry(r["queue_id"].as_u64().unwrap())
            .or_default()
            .push(r["queue_offset"].as_u64().unwrap());
    }
    for (q, mut offs) in per_queue {
        offs.sort();
        let n = offs.len() as u64;
        assert_eq!(
            offs,
            (offs[0]..offs[0] + n).collect::<Vec<_>>(),
            "queue {q}"
        );
    }
}

#[test]
fn binary_body_round_trips_as_base64() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Bin", 1);
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0xff, 0xfe, 0xc3]).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let r = send(api, "Bin", &json!({"body_base64": b64}));
    let m = get_message(api, &id_of(&r));
    assert_eq!(m["body_base64"], b64.as_str(), "{m}");
    assert!(m.get("body").is_none_or(Value::is_null), "{m}");
    // Invalid base64 is illegal input, not a 500.
    let bad = api.post_json(
        "/v1/topics/Bin/messages",
        &json!({"body_base64": "%%%not base64"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.text);
    // Both forms at once is ambiguous.
    let both = api.post_json(
        "/v1/topics/Bin/messages",
        &json!({"body": "a", "body_base64": "YQ=="}),
    );
    assert_eq!(both.status, 400, "{}", both.text);
}

#[test]
fn send_errors_are_exact_and_store_nothing() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Trade", 2);
    let t0 = now_ms();
    let path = "/v1/topics/Trade/messages";

    api.post_json("/v1/topics/Nope/messages", &json!({"body": "x"}))
        .expect_error(404, 17, "TOPIC_NOT_EXIST");
    api.post_json(path, &json!({"body": ""}))
        .expect_error(400, 13, "MESSAGE_ILLEGAL");
    api.post_json(path, &json!({"body_base64": ""}))
        .expect_error(400, 13, "MESSAGE_ILLEGAL");
    // Properties are capped at 32,767 bytes encoded.
    api.post_json(
        path,
        &json!({"body": "x", "properties": {"big": "v".repeat(32_767)}}),
    )
    .expect_error(400, 13, "MESSAGE_ILLEGAL");
    // Body cap: 256 KiB by default; exactly the cap is fine.
    send(api, "Trade", &json!({"body": "a".repeat(256 * 1024)}));
    api.post_json(path, &json!({"body": "a".repeat(256 * 1024 + 1)}))
        .expect_error(400, 13, "MESSAGE_ILLEGAL");
    // Start-deliver time more than 40 days ahead.
    let day = 86_400_000u64;
    api.post_json(
        path,
        &json!({"body": "x", "deliver_at_ms": now_ms() + 41 * day}),
    )
    .expect_error(400, 13, "MESSAGE_ILLEGAL");
    api.post_json(path, &json!({"body": "x", "delay_ms": 41 * day}))
        .expect_error(400, 13, "MESSAGE_ILLEGAL");
    // An empty batch and a batch with one bad message are rejected whole.
    api.post_json(path, &json!([]))
        .expect_error(400, 13, "MESSAGE_ILLEGAL");
    api.post_json(
        path,
        &json!([{"body": "ok-1", "keys": ["whole"]}, {"body": ""}, {"body": "ok-3", "keys": ["whole"]}]),
    )
    .expect_error(400, 13, "MESSAGE_ILLEGAL");

    // Malformed input of other kinds: a clear 400 with the error shape.
    for (ct, raw) in [
        ("application/json", &b"{\"body\": \"unterminated"[..]),
        ("application/json", b"not json at all"),
        ("application/json", b""),
        ("application/json", b"42"),
    ] {
        let r = s.post_raw(path, ct, raw.to_vec());
        assert_eq!(r.status, 400, "{:?} → {} {}", raw, r.status, r.text);
        assert!(r.body["error"]["code"].is_i64(), "{}", r.text);
        assert!(r.body["error"]["name"].is_string(), "{}", r.text);
    }
    for bad in [
        json!({"body": "x", "colour": "red"}),
        json!({"body": 5}),
        json!({"body": "x", "keys": "k1"}),
        json!({"body": "x", "keys": [1, 2]}),
        json!({"body": "x", "properties": {"a": 1}}),
        json!({"body": "x", "properties": ["a"]}),
        json!({"body": "x", "tag": ["t"]}),
        json!({"body": "x", "deliver_at_ms": "soon"}),
        json!({"body": "x", "delay_ms": -5}),
    ] {
        let r = api.post_json(path, &bad);
        assert_eq!(r.status, 400, "{bad} → {} {}", r.status, r.text);
        assert!(r.body["error"]["name"].is_string(), "{bad} → {}", r.text);
        assert!(r.body["error"]["message"].is_string(), "{bad} → {}", r.text);
    }

    // Only the one legal 256 KiB message was stored.
    let all = range_all(
        api,
        "Trade",
        t0.saturating_sub(60_000),
        now_ms() + 60_000,
        100,
    );
    assert_eq!(all.len(), 1, "failed sends must store nothing");
    let by_key = api.get("/v1/topics/Trade/messages?key=whole").expect(200);
    assert!(items(&by_key, "messages").is_empty(), "{by_key}");
}

#[test]
fn deliver_at_within_40_days_is_accepted() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Timed", 1);
    let at = now_ms() + 39 * 86_400_000;
    let r = send(api, "Timed", &json!({"body": "later", "deliver_at_ms": at}));
    let m = get_message(api, &id_of(&r));
    assert_eq!(m["deliver_at_ms"], at, "{m}");
    assert_eq!(m["body"], "later");
    // A time in the past means deliver now: accepted like a normal message.
    let r = send(
        api,
        "Timed",
        &json!({"body": "past", "deliver_at_ms": now_ms() - 10_000}),
    );
    assert!(
        r["queue_offset"].is_u64(),
        "past start time is visible at once: {r}"
    );
}

#[test]
fn query_by_key_returns_newest_64() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Keyed", 3);
    let mut ids = Vec::new();
    for i in 0..70 {
        let r = send(
            api,
            "Keyed",
            &json!({"keys": ["order-1", format!("item-{i}")], "body": format!("m{i}")}),
        );
        ids.push(id_of(&r));
    }
    send(api, "Keyed", &json!({"keys": ["order-2"], "body": "other"}));

    let found = items(
        &api.get("/v1/topics/Keyed/messages?key=order-1").expect(200),
        "messages",
    );
    assert_eq!(found.len(), 64, "at most 64, the newest");
    let found_ids: BTreeSet<String> = found.iter().map(id_of).collect();
    let newest: BTreeSet<String> = ids[6..].iter().cloned().collect();
    assert_eq!(found_ids, newest);
    for m in &found {
        assert!(
            m["keys"].as_array().unwrap().contains(&json!("order-1")),
            "{m}"
        );
        assert_eq!(m["topic"], "Keyed");
    }

    let one = items(
        &api.get("/v1/topics/Keyed/messages?key=item-3").expect(200),
        "messages",
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["body"], "m3");
    let none = api.get("/v1/topics/Keyed/messages?key=nobody").expect(200);
    assert!(items(&none, "messages").is_empty());
    api.get("/v1/topics/Nope/messages?key=order-1")
        .expect_error(404, 17, "TOPIC_NOT_EXIST");
}

#[test]
fn query_by_time_range_is_paged_and_complete() {
    let s = Server::start_default();
    let api = s.api();
    create_topic(api, "Ranged", 4);
    create_topic(api, "Elsewhere", 1);
    let t0 = now_ms();
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(id_of(&send(
            api,
            "Ranged",
            &json!({"body": format!("r{i}")}),
        )));
        if i % 5 == 0 {
            send(api, "Elsewhere", &json!({"body": "noise"}));
        }
    }
    let t1 = now_ms();

    for limit in [1, 7, 25, 1000] {
        let got = range_all(api, "Ranged", t0 - 1000, t1 + 1000, limit);
        let got_ids: Vec<String> = got.iter().map(id_of).collect();
        let uniq: BTreeSet<&String> = got_ids.iter().collect();
        assert_eq!(
            uniq.len(),
            got_ids.len(),
            "no duplicates across pages (limit {limit})"
        );
        assert_eq!(
            uniq,
            ids.iter().collect::<BTreeSet<_>>(),
            "exactly the topic's messages (limit {limit})"
        );
        let stored: Vec<u64> = got
            .iter()
            .map(|m| m["stored_ms"].as_u64().unwrap())
            .collect();
        assert!(stored.windows(2).all(|w| w[0] <= w[1]), "store-time order");
        assert!(got.iter().all(|m| m["topic"] == "Ranged"));
    }

    // The range bounds are honoured.
    let empty = api
        .get(&format!(
            "/v1/topics/Ranged/messages?begin_ms=0&end_ms={}",
            t0 - 60_000
        ))
        .expect(200);
    assert!(items(&empty, "messages").is_empty());
    assert!(
        empty
            .get("next_page_token")
            .is_none_or(|t| t.is_null() || t == ""),
        "{empty}"
    );
    let r = api.get(&format!(
        "/v1/topics/Ranged/messages?begin_ms={}&end_ms={}",
        t1, t0
    ));
    assert_eq!(r.status, 400, "begin after end: {}", r.text);
    let r = api.get("/v1/topics/Ranged/messages?begin_ms=abc&end_ms=5");
    assert_eq!(r.status, 400, "{}", r.text);
    let r = api.get(&format!(
        "/v1/topics/Ranged/messages?begin_ms=0&end_ms={}&page_token=garbage!!",
        t1 + 1000
    ));
    assert_eq!(r.status, 400, "bad page token: {}", r.text);
    api.get("/v1/topics/Nope/messages?begin_ms=0&end_ms=10")
        .expect_error(404, 17, "TOPIC_NOT_EXIST");
}

#[test]
fn query_by_id_errors() {
    let s = Server::start_default();
    let api = s.api();
    let r = api.get("/v1/messages/not-an-id");
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.body["error"]["message"].is_string());
    let r = api.get("/v1/messages/0123456789ABCDEF0123456789ABCDEF");
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.body["error"]["message"].is_string());
}

#[test]
fn healthz_and_metrics() {
    let s = Server::start_default();
    let api = s.api();
    assert_eq!(api.get("/healthz").status, 200);
    create_topic(api, "Metered", 2);
    let before = api.get("/metrics");
    assert_eq!(before.status, 200, "{}", before.text);
    assert!(
        before
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/plain")),
        "Prometheus text format: {:?}",
        before.content_type
    );
    for i in 0..5 {
        send(api, "Metered", &json!({"body": format!("m{i}")}));
    }
    send(api, "Metered", &json!([{"body": "a"}, {"body": "b"}]));
    let after = api.get("/metrics");
    assert_eq!(after.status, 200);
    let after = after.text;
    let b = parse_prom(&before.text);
    let a = parse_prom(&after);

    // A counter of sent/stored messages grew by exactly 7.
    let counters = families(&after, "counter");
    let grew: Vec<&String> = counters
        .iter()
        .filter(|name| {
            let sum = |m: &HashMap<String, f64>| -> f64 {
                m.iter()
                    .filter(|(k, _)| series_name(k) == name.as_str())
                    .map(|(_, v)| v)
                    .sum()
            };
            (name.contains("message") || name.contains("send") || name.contains("append"))
                && (sum(&a) - sum(&b) - 7.0).abs() < 0.5
        })
        .collect();
    assert!(
        !grew.is_empty(),
        "a message/send counter should grow by 7; counters: {counters:?}\n{after}"
    );
    // Latency histograms are exported and recorded the sends.
    let hists = families(&after, "histogram");
    assert!(!hists.is_empty(), "histograms exported:\n{after}");
    assert!(
        hists.iter().any(|h| {
            a.iter()
                .filter(|(k, _)| series_name(k) == format!("{h}_count"))
                .map(|(_, v)| v)
                .sum::<f64>()
                > 0.0
        }),
        "some histogram has observations:\n{after}"
    );
    assert!(after.contains("le=\"+Inf\""), "{after}");
}

fn parse_prom(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn series_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

fn families(text: &str, kind: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, k) = l.split_once(' ')?;
            (k.trim() == kind).then(|| name.to_string())
        })
        .collect()
}

const AUTH_CONFIG: &str = r#"
[[auth.keys]]
access_key = "AK_ADMIN"
secret_key = "admin-secret"
allow_publish = ["*"]
allow_subscribe = ["*"]
admin = true

[[auth.keys]]
access_key = "AK_PUB"
secret_key = "pub-secret"
allow_publish = ["Trade"]
allow_subscribe = []
admin = false
"#;

#[test]
fn signed_requests_and_permissions() {
    let s = Server::start(ServerOpts::with_config(AUTH_CONFIG));
    let admin = s.signed("AK_ADMIN", "admin-secret");
    let publisher = s.signed("AK_PUB", "pub-secret");

    // Health checks stay open for load balancers.
    assert_eq!(s.api().get("/healthz").status, 200);
    // Unsigned, wrong secret, unknown key, stale or future Date: 401.
    let unsigned = s.api().get("/v1/topics");
    assert_eq!(unsigned.status, 401, "{}", unsigned.text);
    assert!(unsigned.body["error"]["message"].is_string());
    for (who, api) in [
        ("wrong secret", s.signed("AK_ADMIN", "nope")),
        ("unknown key", s.signed("AK_WHO", "admin-secret")),
        (
            "stale date",
            s.signed("AK_ADMIN", "admin-secret")
                .with_date_skew(-20 * 60),
        ),
        (
            "future date",
            s.signed("AK_ADMIN", "admin-secret").with_date_skew(20 * 60),
        ),
    ] {
        let r = api.get("/v1/topics");
        assert_eq!(r.status, 401, "{who}: {}", r.text);
        assert!(r.body["error"]["message"].is_string(), "{who}");
    }
    let r = s.api().get("/metrics");
    assert_eq!(
        r.status, 401,
        "metrics are signed unless metrics_open: {}",
        r.text
    );
    // A Date a few minutes off is within the 15-minute window.
    admin
        .clone()
        .with_date_skew(-5 * 60)
        .get("/v1/topics")
        .expect(200);

    create_topic(&admin, "Trade", 2);
    create_topic(&admin, "Ledger", 2);
    let r = admin.post_json("/v1/topics/Ledger/messages", &json!({"body": "by admin"}));
    assert!(r.status == 200 || r.status == 201, "{}", r.text);

    // The publisher may send to Trade (single and batch, so Content-MD5 is exercised) …
    let r = publisher.post_json("/v1/topics/Trade/messages", &json!({"body": "ok"}));
    assert!(r.status == 200 || r.status == 201, "{}", r.text);
    let r = publisher.post_json(
        "/v1/topics/Trade/messages?x=1",
        &json!([{"body": "b1"}, {"body": "b2"}]),
    );
    assert!(
        r.status == 200 || r.status == 201,
        "query string is signed too: {}",
        r.text
    );
    // … but not to Ledger, and it may not manage resources.
    publisher
        .post_json("/v1/topics/Ledger/messages", &json!({"body": "nope"}))
        .expect_error(403, 16, "NO_PERMISSION");
    publisher
        .post_json("/v1/topics", &json!({"name": "Mine"}))
        .expect_error(403, 16, "NO_PERMISSION");
    // A body changed after signing fails the check (Content-MD5 no longer matches the signature).
    let tampered = tamper_send(&s, "AK_PUB", "pub-secret");
    assert_eq!(tampered, 401);
    assert_eq!(tamper_body(&s, "AK_PUB", "pub-secret"), 401);
    // Nothing the publisher was refused got stored.
    // The CLI signs too.
    let out = s.wharf(&["topic", "list", "--json"]);
    assert_ne!(out.code, 0, "unsigned CLI call is refused");
    assert!(
        out.stderr.contains("NO_PERMISSION") || out.stderr.contains("401"),
        "{}",
        out.stderr
    );
    let out = s
        .wharf(&[
            "send",
            "Trade",
            "--access-key",
            "AK_PUB",
            "--secret-key",
            "pub-secret",
            "--json",
            "signed by the cli",
        ])
        .ok();
    assert!(out.json()["message_id"].is_string(), "{}", out.stdout);
    let out = s.wharf(&[
        "send",
        "Ledger",
        "--access-key",
        "AK_PUB",
        "--secret-key",
        "pub-secret",
        "nope",
    ]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("16") && out.stderr.contains("NO_PERMISSION"),
        "{}",
        out.stderr
    );
    let ledger = items(
        &admin
            .get(&format!(
                "/v1/topics/Ledger/messages?begin_ms=0&end_ms={}",
                now_ms() + 60_000
            ))
            .expect(200),
        "messages",
    );
    assert_eq!(ledger.len(), 1);
}

/// Signs a send with the Content-MD5 of one body and sends another; returns the status.
fn tamper_body(s: &Server, ak: &str, sk: &str) -> u16 {
    use md5::{Digest, Md5};
    let signed_body = br#"{"body":"small"}"#;
    let sent_body = br#"{"body":"SMALL"}"#;
    let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(signed_body));
    let date = httpdate::fmt_http_date(SystemTime::now());
    let path = "/v1/topics/Trade/messages";
    let sts = crate::harness::string_to_sign("POST", &md5, "application/json", &date, path);
    let sig = crate::harness::sign(sk, &sts);
    reqwest::blocking::Client::new()
        .post(s.url(path))
        .header("Content-Type", "application/json")
        .header("Content-MD5", md5)
        .header("Date", date)
        .header("Authorization", format!("WHARF {ak}:{sig}"))
        .body(sent_body.to_vec())
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// Signs a send for one path and sends it to another; returns the status.
fn tamper_send(s: &Server, ak: &str, sk: &str) -> u16 {
    let date = httpdate::fmt_http_date(SystemTime::now());
    let sts = crate::harness::string_to_sign(
        "POST",
        "",
        "application/json",
        &date,
        "/v1/topics/Trade/messages",
    );
    let sig = crate::harness::sign(sk, &sts);
    reqwest::blocking::Client::new()
        .post(s.url("/v1/topics/Ledger/messages"))
        .header("Content-Type", "application/json")
        .header("Date", date)
        .header("Authorization", format!("WHARF {ak}:{sig}"))
        .body(r#"{"body":"x"}"#)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn cli_commands() {
    let s = Server::start_default();
    let out = s.wharf(&["topic", "create", "Trade", "--json"]).ok();
    assert_eq!(out.json()["name"], "Trade");
    s.wharf(&["group", "create", "GID_cli", "--json"]).ok();
    let topics = s.wharf(&["topic", "list", "--json"]).ok().json();
    assert!(
        items(&topics, "topics")
            .iter()
            .any(|t| t["name"] == "Trade"),
        "{topics}"
    );
    let human = s.wharf(&["topic", "list"]).ok();
    assert!(human.stdout.contains("Trade"), "{}", human.stdout);
    let groups = s.wharf(&["group", "list", "--json"]).ok().json();
    assert!(
        items(&groups, "groups")
            .iter()
            .any(|g| g["name"] == "GID_cli")
    );

    let sent = s
        .wharf(&[
            "send",
            "Trade",
            "--tag",
            "order",
            "--key",
            "k1",
            "--key",
            "k2",
            "--prop",
            "a=b",
            "--json",
            "hello from cli",
        ])
        .ok()
        .json();
    let id = id_of(&sent);
    let m = s.wharf(&["query", "id", &id, "--json"]).ok().json();
    assert_eq!(m["body"], "hello from cli");
    assert_eq!(m["tag"], "order");
    assert_eq!(m["keys"], json!(["k1", "k2"]));
    assert_eq!(m["properties"]["a"], "b");
    // The same message over HTTP.
    assert_eq!(get_message(s.api(), &id)["body"], "hello from cli");

    let by_key = s
        .wharf(&["query", "key", "Trade", "k2", "--json"])
        .ok()
        .json();
    assert_eq!(items(&by_key, "messages").len(), 1);
    let end = (now_ms() + 60_000).to_string();
    let range = s
        .wharf(&["query", "range", "Trade", "0", &end, "--json"])
        .ok()
        .json();
    assert_eq!(items(&range, "messages").len(), 1);
    let human = s.wharf(&["query", "id", &id]).ok();
    assert!(human.stdout.contains(&id), "{}", human.stdout);

    let delayed = s
        .wharf(&["send", "Trade", "--delay", "60000", "--json", "later"])
        .ok()
        .json();
    let m = get_message(s.api(), &id_of(&delayed));
    assert!(
        m["deliver_at_ms"].as_u64().unwrap() > now_ms() + 30_000,
        "{m}"
    );

    // Errors: non-zero exit, the code and name on stderr.
    for (args, code, name) in [
        (vec!["topic", "delete", "Nope"], "17", "TOPIC_NOT_EXIST"),
        (vec!["send", "Nope", "x"], "17", "TOPIC_NOT_EXIST"),
        (vec!["send", "Trade", ""], "13", "MESSAGE_ILLEGAL"),
        (
            vec!["group", "delete", "GID_none"],
            "26",
            "SUBSCRIPTION_GROUP_NOT_EXIST",
        ),
    ] {
        let out = s.wharf(&args);
        assert_ne!(out.code, 0, "{args:?} should fail");
        assert!(
            out.stderr.contains(code) && out.stderr.contains(name),
            "{args:?}: stderr should name {code} {name}: {}",
            out.stderr
        );
    }
    let out = s.wharf(&["topic", "create", "Trade"]);
    assert_ne!(out.code, 0, "duplicate topic");
    s.wharf(&["topic", "delete", "Trade"]).ok();
    let topics = s.wharf(&["topic", "list", "--json"]).ok().json();
    assert!(
        !items(&topics, "topics")
            .iter()
            .any(|t| t["name"] == "Trade")
    );

    // An unreachable server is an error too.
    let out = s.wharf(&["topic", "list", "--server", "http://127.0.0.1:1"]);
    assert_ne!(out.code, 0);
    assert!(!out.stderr.trim().is_empty());
}

#[test]
fn sigterm_exits_zero_and_restart_keeps_everything() {
    let mut s = Server::start_default();
    create_topic(s.api(), "Durable", 3);
    create_group(s.api(), "GID_durable");
    let t0 = now_ms();
    let mut sent = Vec::new();
    for i in 0..30 {
        let r = send(
            s.api(),
            "Durable",
            &json!({"keys": ["dk"], "tag": "t", "body": format!("d{i}")}),
        );
        sent.push((id_of(&r), format!("d{i}"), r));
    }
    s.stop(); // asserts exit 0
    s.restart();
    let api = s.api();
    assert_eq!(api.get("/v1/topics/Durable").expect(200)["queues"], 3);
    api.get("/v1/groups/GID_durable").expect(200);
    for (id, body, _) in &sent {
        assert_eq!(&get_message(api, id)["body"], body.as_str());
    }
    let all = range_all(api, "Durable", t0 - 1000, now_ms() + 1000, 10);
    assert_eq!(all.len(), 30);
    let keyed = items(
        &api.get("/v1/topics/Durable/messages?key=dk").expect(200),
        "messages",
    );
    assert_eq!(keyed.len(), 30);

    // New sends continue each queue's offsets and never reuse an id.
    let mut next: HashMap<u64, u64> = HashMap::new();
    for (_, _, r) in &sent {
        let q = r["queue_id"].as_u64().unwrap();
        let o = r["queue_offset"].as_u64().unwrap();
        let e = next.entry(q).or_insert(0);
        *e = (*e).max(o + 1);
    }
    for i in 0..6 {
        let r = send(api, "Durable", &json!({"body": format!("after {i}")}));
        assert!(!sent.iter().any(|(id, _, _)| *id == id_of(&r)), "id reused");
        let q = r["queue_id"].as_u64().unwrap();
        let o = r["queue_offset"].as_u64().unwrap();
        let want = next.get(&q).copied().unwrap_or(0);
        assert_eq!(o, want, "queue {q} continues at {want}");
        next.insert(q, o + 1);
    }
    s.stop();
}

#[test]
fn retention_deletes_messages_past_three_days() {
    // Small segments so old messages sit in closed segments retention may delete.
    let base = "[store]\nsegment_bytes = 65536\n";
    let mut s = Server::start(ServerOpts::with_config(base));
    create_topic(s.api(), "Aging", 1);
    let mut old = Vec::new();
    for i in 0..40 {
        old.push(id_of(&send(
            s.api(),
            "Aging",
            &json!({"keys": ["old"], "body": format!("{i}:{}", "x".repeat(4000))}),
        )));
    }
    // 71 hours later nothing is gone yet (default retention is 72 hours) …
    s.restart_with_config(format!(
        "{base}\n[testing]\nclock_offset_ms = {}\n",
        71 * 3_600_000
    ));
    for id in &old {
        get_message(s.api(), id);
    }
    // … 73 hours later the old segments are.
    s.restart_with_config(format!(
        "{base}\n[testing]\nclock_offset_ms = {}\n",
        73 * 3_600_000
    ));
    let api = s.api();
    // New messages fill fresh segments so the old ones are all closed.
    let mut new = Vec::new();
    for i in 0..40 {
        new.push(id_of(&send(
            api,
            "Aging",
            &json!({"keys": ["new"], "body": format!("{i}:{}", "y".repeat(4000))}),
        )));
    }
    wait_for(
        "retention to delete the oldest message",
        Duration::from_secs(90),
        || (api.get(&format!("/v1/messages/{}", old[0])).status == 404).then_some(()),
    );
    for id in &old[..20] {
        assert_eq!(
            api.get(&format!("/v1/messages/{id}")).status,
            404,
            "{id} is past retention"
        );
    }
    for id in &new {
        get_message(api, id);
    }
    let keyed_old = items(
        &api.get("/v1/topics/Aging/messages?key=old").expect(200),
        "messages",
    );
    assert!(keyed_old.len() < 40, "key index forgets deleted messages");
    let range = range_all(api, "Aging", 0, now_ms() + 100 * 3_600_000, 50);
    let ids: BTreeSet<String> = range.iter().map(id_of).collect();
    assert!(new.iter().all(|id| ids.contains(id)));
    assert!(!ids.contains(&old[0]));
    // The topic itself stays.
    api.get("/v1/topics/Aging").expect(200);
}

#[test]
fn one_data_dir_one_host() {
    let s = Server::start_default();
    let out = std::process::Command::new(crate::harness::wharf_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(s.data_dir())
        .args(["--http", "127.0.0.1:0", "--mqtt", "", "--remoting", ""])
        .current_dir(s.work_dir())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second host on the same data dir must refuse to start"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "says why: {err}");
    // The first host is unharmed.
    assert_eq!(s.api().get("/healthz").status, 200);
}

#[test]
fn oversized_requests_and_unknown_routes_get_json_errors() {
    let s = Server::start(ServerOpts::with_config("[http]\nmax_body_bytes = 65536\n"));
    create_topic(s.api(), "Big", 1);
    let r = s.post_json(
        "/v1/topics/Big/messages",
        &json!({"body": "x".repeat(70_000)}),
    );
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(r.body["error"]["message"].is_string(), "{}", r.text);
    let r = s.get("/v1/nothing/here");
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.body["error"]["message"].is_string(), "{}", r.text);
    let r = s.delete("/v1/messages/0123456789ABCDEF0123456789ABCDEF");
    assert_eq!(r.status, 405, "{}", r.text);
    assert!(r.body["error"]["message"].is_string(), "{}", r.text);
    // Nothing was stored by the refused send.
    let all = range_all(s.api(), "Big", 0, now_ms() + 60_000, 100);
    assert!(all.is_empty());
}

#[test]
fn cli_sends_binary_stdin() {
    let s = Server::start_default();
    create_topic(s.api(), "Blobs", 1);
    let bytes: Vec<u8> = (0..=255u8).rev().chain([0xff, 0x00, 0xc0]).collect();
    let out = s
        .wharf_with_stdin(&["send", "Blobs", "--key", "blob", "--json", "-"], &bytes)
        .ok();
    let m = get_message(s.api(), &id_of(&out.json()));
    assert_eq!(
        m["body_base64"],
        base64::engine::general_purpose::STANDARD.encode(&bytes),
        "{m}"
    );
    let out = s
        .wharf_with_stdin(
            &["send", "Blobs", "--json", "-"],
            "text from stdin".as_bytes(),
        )
        .ok();
    assert_eq!(
        get_message(s.api(), &id_of(&out.json()))["body"],
        "text from stdin"
    );
}

#[test]
fn bad_config_is_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("wharf.toml");
    std::fs::write(
        &cfg,
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[store]\n  segmnt_bytes = 5\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::harness::wharf_bin())
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--mqtt", "", "--remoting", ""])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a typo in the config must stop the host"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wharf.toml:5:3") && err.contains("segmnt_bytes"),
        "names file, line, column and key: {err}"
    );
    assert!(
        !dir.path().join("data").join("log").exists(),
        "nothing is written before the config is valid"
    );
}
