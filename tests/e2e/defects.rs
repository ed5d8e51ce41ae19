//! Defects found by trying Wharf as a new user would (issue 8), each checked against the real
//! binary: dead letters re-sent to their own group only, group deletion and reserved names,
//! changing a group's settings, and query by id checked before any work.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Api, Resp, Server, ServerOpts, create_topic, wait_for};

/// Retry back-offs 10,000× shorter (10 s → 1 ms).
const FAST_RETRIES: &str = "[broker]\nretry_delay_scale = 0.0001\n";

/// Access keys: `admin` may do everything; `reader` may read every topic and group but
/// publish nothing; `nosub` may publish but read nothing; `other` may read only topic `Other`.
const KEYS: &str = r#"
[[auth.keys]]
access_key = "admin"
secret_key = "admin-secret"
allow_publish = ["*"]
allow_subscribe = ["*"]
admin = true

[[auth.keys]]
access_key = "reader"
secret_key = "reader-secret"
allow_publish = []
allow_subscribe = ["*"]
admin = false

[[auth.keys]]
access_key = "nosub"
secret_key = "nosub-secret"
allow_publish = ["*"]
allow_subscribe = []
admin = false

[[auth.keys]]
access_key = "other"
secret_key = "other-secret"
allow_publish = ["*"]
allow_subscribe = ["Other"]
admin = false
"#;

pub(crate) fn group(api: &Api, name: &str, settings: Value) {
    let mut body = json!({"name": name, "kind": "consumer"});
    if let (Some(b), Some(s)) = (body.as_object_mut(), settings.as_object()) {
        b.extend(s.clone());
    }
    api.post_json("/v1/groups", &body).expect(201);
}

pub(crate) fn send(api: &Api, topic: &str, body: &str) -> String {
    let r = api
        .post_json(
            &format!("/v1/topics/{topic}/messages"),
            &json!({ "body": body }),
        )
        .expect(200);
    r["message_id"].as_str().unwrap().to_string()
}

/// One receive as instance `e2e`, long-polling up to `wait_ms`.
pub(crate) fn receive(api: &Api, group: &str, topic: &str, wait_ms: u64) -> Vec<Value> {
    let r = api
        .post_json(
            &format!("/v1/groups/{group}/receive"),
            &json!({"topic": topic, "max": 32, "wait_ms": wait_ms, "instance_id": "e2e"}),
        )
        .expect(200);
    r["messages"].as_array().cloned().unwrap_or_default()
}

/// Receives until one message came, for at most 15 s.
pub(crate) fn receive_one(api: &Api, group: &str, topic: &str) -> Value {
    wait_for(
        &format!("a message for {group}"),
        Duration::from_secs(15),
        || receive(api, group, topic, 500).into_iter().next(),
    )
}

pub(crate) fn settle(api: &Api, group: &str, verb: &str, m: &Value) {
    api.post_json(
        &format!("/v1/groups/{group}/{verb}"),
        &json!({"receipts": [m["receipt"]]}),
    )
    .expect(200);
}

fn patch(api: &Api, path: &str, body: &Value) -> Resp {
    api.request(
        "PATCH",
        path,
        Some("application/json"),
        serde_json::to_vec(body).unwrap(),
    )
}

fn status_for(api: &Api, id: &str, group: &str) -> Value {
    let v = api.get(&format!("/v1/messages/{id}")).expect(200);
    v["deliveries"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["group"] == group))
        .map(|d| d["status"].clone())
        .unwrap_or_else(|| panic!("no delivery entry for {group}: {v}"))
}

fn dead_letters(api: &Api, group: &str) -> Vec<Value> {
    api.get(&format!("/v1/groups/{group}/dead-letters"))
        .expect(200)["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_resent_dead_letter_reaches_only_its_own_group_under_the_original_id() {
    let s = Server::start(ServerOpts::with_config(FAST_RETRIES).config(KEYS));
    let admin = s.signed("admin", "admin-secret");
    let reader = s.signed("reader", "reader-secret");
    create_topic(&admin, "Orders", 1);
    group(&admin, "GID_fails", json!({"max_reconsume_times": 0}));
    group(&admin, "GID_fine", json!({}));
    // Both groups subscribe before the message exists.
    receive(&admin, "GID_fails", "Orders", 0);
    receive(&admin, "GID_fine", "Orders", 0);
    let id = send(&admin, "Orders", "order-1");

    let ok = receive_one(&admin, "GID_fine", "Orders");
    settle(&admin, "GID_fine", "ack", &ok);
    let bad = receive_one(&admin, "GID_fails", "Orders");
    assert_eq!(bad["message_id"], id.as_str());
    settle(&admin, "GID_fails", "nack", &bad);

    // Listed and queried under the id the producer got.
    let dead = wait_for("the dead letter", Duration::from_secs(10), || {
        dead_letters(&admin, "GID_fails").into_iter().next()
    });
    assert_eq!(dead["message_id"], id.as_str(), "{dead}");
    assert_eq!(dead["topic"], "Orders", "{dead}");
    assert_eq!(dead["body"], "order-1");
    assert_eq!(status_for(&admin, &id, "GID_fails"), "dead_letter");
    assert_eq!(status_for(&admin, &id, "GID_fine"), "consumed");

    // Reading the group is not enough to re-send into it.
    let path = format!("/v1/groups/GID_fails/dead-letters/{id}/resend");
    let denied = reader.post_json(&path, &json!({}));
    denied.expect_error(403, 16, "NO_PERMISSION");
    let why = denied.body["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("allow_publish") && why.contains("GID_fails"),
        "the error says which permission to add: {why}"
    );

    let r = admin.post_json(&path, &json!({})).expect(200);
    assert_eq!(r["message_id"], id.as_str());
    let again = receive_one(&admin, "GID_fails", "Orders");
    assert_eq!(again["message_id"], id.as_str());
    assert_eq!(again["topic"], "Orders");
    assert_eq!(again["body"], "order-1");
    assert_eq!(again["reconsume_times"], 0);
    assert!(
        receive(&admin, "GID_fine", "Orders", 700).is_empty(),
        "the topic's other group must not consume the re-sent dead letter again"
    );
    assert_eq!(status_for(&admin, &id, "GID_fails"), "pending");
    settle(&admin, "GID_fails", "ack", &again);
    assert_eq!(status_for(&admin, &id, "GID_fails"), "consumed");
    assert_eq!(status_for(&admin, &id, "GID_fine"), "consumed");
    // One re-send per dead letter.
    admin
        .post_json(&path, &json!({}))
        .expect_error(409, 1, "SYSTEM_ERROR");
}

#[test]
fn a_recreated_group_starts_clean_and_percent_names_are_refused() {
    let mut s = Server::start_default();
    create_topic(s.api(), "News", 1);
    group(s.api(), "GID_news", json!({"model": "broadcasting"}));
    receive(s.api(), "GID_news", "News", 0);
    send(s.api(), "News", "old-1");
    let m = receive_one(s.api(), "GID_news", "News");
    settle(s.api(), "GID_news", "ack", &m);
    // A clean restart writes the instance's offsets; then a message it never reads.
    s.restart();
    send(s.api(), "News", "old-2");

    s.delete("/v1/groups/GID_news").expect(200);
    group(s.api(), "GID_news", json!({"model": "broadcasting"}));
    // A new broadcasting instance starts at the newest message, not at the old offsets.
    assert!(
        receive(s.api(), "GID_news", "News", 300).is_empty(),
        "the re-created group resumed at the deleted group's offsets"
    );
    send(s.api(), "News", "new-1");
    let m = receive_one(s.api(), "GID_news", "News");
    assert_eq!(m["body"], "new-1");

    for (path, body) in [
        ("/v1/topics", json!({"name": "News%RETRY%x"})),
        ("/v1/groups", json!({"name": "GID_a%b", "kind": "consumer"})),
    ] {
        let r = s.post_json(path, &body);
        r.expect_error(400, 1, "SYSTEM_ERROR");
        assert!(
            r.text.contains("'%'"),
            "the error names the character: {}",
            r.text
        );
    }
    let r = s.post_json(
        "/v1/groups/GID_news/receive",
        &json!({"topic": "News", "instance_id": "i%BROADCAST%x"}),
    );
    r.expect_error(400, 1, "SYSTEM_ERROR");
    assert!(r.text.contains("'%'"), "{}", r.text);
}

#[test]
fn group_settings_change_over_http_and_cli_and_apply_to_live_consumers() {
    let s = Server::start(ServerOpts::with_config(FAST_RETRIES));
    let api = s.api();
    create_topic(api, "Jobs", 1);
    group(api, "GID_jobs", json!({"max_reconsume_times": 5}));
    receive(api, "GID_jobs", "Jobs", 0);

    // The consumer is live; the new maximum applies to it at once.
    let g = patch(
        api,
        "/v1/groups/GID_jobs",
        &json!({"max_reconsume_times": 1}),
    )
    .expect(200);
    assert_eq!(g["max_reconsume_times"], 1, "{g}");
    assert_eq!(g["model"], "clustering");
    let id = send(api, "Jobs", "job");
    let first = receive_one(api, "GID_jobs", "Jobs");
    settle(api, "GID_jobs", "nack", &first);
    let retry = receive_one(api, "GID_jobs", "Jobs");
    assert_eq!(retry["message_id"], id.as_str());
    assert_eq!(retry["reconsume_times"], 1);
    settle(api, "GID_jobs", "nack", &retry);
    wait_for("the dead letter", Duration::from_secs(10), || {
        (!dead_letters(api, "GID_jobs").is_empty()).then_some(())
    });
    assert!(
        receive(api, "GID_jobs", "Jobs", 500).is_empty(),
        "dead-lettered after the new count, not the old one"
    );
    assert_eq!(status_for(api, &id, "GID_jobs"), "dead_letter");

    // Refused: a model or kind change, unknown fields, bad values; each names the field.
    for (body, field) in [
        (json!({"model": "broadcasting"}), "model"),
        (json!({"kind": "producer"}), "kind"),
        (json!({"colour": "red"}), "colour"),
        (json!({"max_reconsume_times": "3"}), "max_reconsume_times"),
        (json!({"max_reconsume_times": 5000}), "max_reconsume_times"),
        (json!({"consume_timeout_ms": 0}), "consume_timeout_ms"),
    ] {
        let r = patch(api, "/v1/groups/GID_jobs", &body);
        r.expect_error(400, 1, "SYSTEM_ERROR");
        assert!(r.text.contains(field), "{body}: {}", r.text);
    }
    patch(
        api,
        "/v1/groups/GID_nope",
        &json!({"max_reconsume_times": 1}),
    )
    .expect_error(404, 26, "SUBSCRIPTION_GROUP_NOT_EXIST");
    let same = patch(api, "/v1/groups/GID_jobs", &json!({"model": "clustering"})).expect(200);
    assert_eq!(same["max_reconsume_times"], 1, "unnamed settings are kept");

    // The CLI: JSON and human output, and an update that names nothing is an error.
    let out = s
        .wharf(&[
            "group",
            "update",
            "GID_jobs",
            "--consume-timeout-ms",
            "5000",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(out["consume_timeout_ms"], 5000);
    assert_eq!(out["max_reconsume_times"], 1);
    let out = s
        .wharf(&["group", "update", "GID_jobs", "--max-reconsume-times", "4"])
        .ok();
    assert!(
        out.stdout.contains("updated group GID_jobs") && out.stdout.contains('4'),
        "{}",
        out.stdout
    );
    let shown = api.get("/v1/groups/GID_jobs").expect(200);
    assert_eq!(
        (&shown["max_reconsume_times"], &shown["consume_timeout_ms"]),
        (&json!(4), &json!(5000))
    );
    let out = s.wharf(&["group", "update", "GID_jobs"]);
    assert_ne!(out.code, 0, "nothing to update: {}", out.stdout);
    let out = s.wharf(&[
        "group",
        "update",
        "GID_jobs",
        "--max-reconsume-times",
        "5000",
    ]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("max_reconsume_times"), "{}", out.stderr);
}

#[test]
fn group_updates_need_admin_rights() {
    let s = Server::start(ServerOpts::with_config(KEYS));
    let admin = s.signed("admin", "admin-secret");
    group(&admin, "GID_locked", json!({}));
    let r = patch(
        &s.signed("reader", "reader-secret"),
        "/v1/groups/GID_locked",
        &json!({"max_reconsume_times": 1}),
    );
    r.expect_error(403, 16, "NO_PERMISSION");
    assert!(r.text.contains("admin"), "{}", r.text);
    patch(
        &admin,
        "/v1/groups/GID_locked",
        &json!({"max_reconsume_times": 1}),
    )
    .expect(200);
}

#[test]
fn query_by_id_checks_the_topic_right_first_and_leaks_nothing() {
    let s = Server::start(ServerOpts::with_config(KEYS));
    let admin = s.signed("admin", "admin-secret");
    create_topic(&admin, "Orders", 1);
    for i in 0..20 {
        group(&admin, &format!("GID_q{i}"), json!({}));
    }
    receive(&admin, "GID_q0", "Orders", 0);
    let id = send(&admin, "Orders", "secret");
    let missing = "0000000000000000000000000000ABCD";

    // A key that may read no topic is refused before any lookup: existing or not, the same 403.
    let nosub = s.signed("nosub", "nosub-secret");
    for probe in [id.as_str(), missing] {
        let r = nosub.get(&format!("/v1/messages/{probe}"));
        r.expect_error(403, 16, "NO_PERMISSION");
        assert!(r.text.contains("allow_subscribe"), "{}", r.text);
    }
    // A key limited to other topics learns nothing either: the same 404 for both.
    let other = s.signed("other", "other-secret");
    let found = other.get(&format!("/v1/messages/{id}"));
    let absent = other.get(&format!("/v1/messages/{missing}"));
    found.expect_error(404, 1, "SYSTEM_ERROR");
    absent.expect_error(404, 1, "SYSTEM_ERROR");
    assert_eq!(
        found.body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&id, "ID"),
        absent.body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(missing, "ID"),
    );
    // A key that may read the topic gets the message and one status per subscribed group.
    let v = s
        .signed("reader", "reader-secret")
        .get(&format!("/v1/messages/{id}"))
        .expect(200);
    assert_eq!(v["body"], "secret");
    let deliveries = v["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{v}");
    assert_eq!(deliveries[0]["group"], "GID_q0");
    assert_eq!(deliveries[0]["status"], "pending");
}
