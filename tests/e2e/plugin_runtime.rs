//! Plugin runtime fixes end to end: a component exporting only `consume` (the one export the
//! contract names) deploys and consumes, even with `batch_max > 1`; one tag and expression rule
//! with one wording, reported with the spec's codes.
//!
//! Needs the `consume-only` component built (`plugins/build.sh`, `.ci/run`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Server, ServerOpts, create_topic, wait_for, wasm_artifact};

const WAIT: Duration = Duration::from_secs(30);

fn server() -> Server {
    Server::start(ServerOpts::with_config(
        "[broker]\nretry_delay_scale = 0.0001\n",
    ))
}

/// A manifest for `consume-only` subscribing `Plain` with `expression`, written in the work dir.
fn manifest(s: &Server, expression: &str) -> PathBuf {
    let text = format!(
        r#"name = "consume-only"
version = "1.0.0"
component = {component:?}

[consumer]
group = "GID_consume_only"
max_reconsume_times = 1
consume_timeout_ms = 5000
concurrency = 2
batch_max = 8

[[subscription]]
topic = "Plain"
expression = {expression:?}
"#,
        component = wasm_artifact("consume-only").display().to_string(),
    );
    let dir = s.work_dir().join("consume-only");
    std::fs::create_dir_all(&dir).expect("manifest dir");
    let path = dir.join("plugin.toml");
    std::fs::write(&path, text).expect("write manifest");
    path
}

fn counter(s: &Server, name: &str) -> u64 {
    s.get("/v1/plugins/consume-only").expect(200)["counters"][name]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_component_exporting_only_consume_deploys_and_consumes() {
    let s = server();
    create_topic(s.api(), "Plain", 4);
    let m = manifest(&s, "order || pay");
    let d = s
        .wharf(&["plugin", "deploy", &m.display().to_string(), "--json"])
        .ok()
        .json();
    assert_eq!(d["status"], "running", "{d}");
    let batch: Vec<Value> = (0..6)
        .map(|i| json!({"tag": if i % 2 == 0 { "order" } else { "pay" }, "body": format!("m{i}")}))
        .chain([json!({"tag": "refund", "body": "filtered out"})])
        .collect();
    let sent = s.post_json("/v1/topics/Plain/messages", &Value::Array(batch));
    assert!(matches!(sent.status, 200 | 201), "send: {}", sent.text);
    wait_for("6 commits", WAIT, || {
        (counter(&s, "commits") == 6).then_some(())
    });
    let status = s.get("/v1/plugins/consume-only").expect(200);
    assert_eq!(status["counters"]["invocations"], 6, "{status}");
    assert_eq!(status["counters"]["retries"], 0, "{status}");
    assert_eq!(status["counters"]["host_errors"], 0, "{status}");
    assert_eq!(status["host_error"], Value::Null, "{status}");
    wait_for("the group's backlog to drain", WAIT, || {
        let g = s.get("/v1/groups/GID_consume_only/status").expect(200);
        (g["backlog"] == 0).then_some(())
    });
    assert!(
        s.logs().contains("consume-only: tag=order attempt=1"),
        "the guest's log line reaches the host log"
    );
}

#[test]
fn a_bad_expression_is_refused_with_code_23_and_one_wording() {
    let s = server();
    create_topic(s.api(), "Plain", 1);
    let m = manifest(&s, "order|pay");
    let out = s.wharf(&["plugin", "deploy", &m.display().to_string()]);
    assert_ne!(out.code, 0, "deploy must fail");
    assert!(
        out.stderr.contains("SUBSCRIPTION_PARSE_FAILED"),
        "{}",
        out.stderr
    );
    let wording = "tag expression 'order|pay' is invalid: tags are separated by '||', not a single '|'; use '*', 'TagA' or 'TagA||TagB'";
    assert!(out.stderr.contains(wording), "{}", out.stderr);
    // The HTTP pull consumer's parser says the same.
    s.post_json(
        "/v1/groups",
        &json!({"name": "GID_pull", "kind": "consumer"}),
    )
    .expect(201);
    let r = s.post_json(
        "/v1/groups/GID_pull/receive",
        &json!({"topic": "Plain", "expression": "order|pay", "max": 1, "wait_ms": 0}),
    );
    r.expect_error(400, 23, "SUBSCRIPTION_PARSE_FAILED");
    assert!(r.text.contains(wording), "{}", r.text);
}

#[test]
fn a_tag_no_expression_could_select_is_refused_on_send() {
    let s = server();
    create_topic(s.api(), "Plain", 1);
    for tag in ["a b", "a|b", "*"] {
        let r = s.post_json(
            "/v1/topics/Plain/messages",
            &json!({"tag": tag, "body": "x"}),
        );
        r.expect_error(400, 13, "MESSAGE_ILLEGAL");
        assert!(r.text.contains("is not allowed"), "{}", r.text);
    }
    let r = s.post_json(
        "/v1/topics/Plain/messages",
        &json!({"tag": "ok", "properties": {"bad\u{1}name": "v"}, "body": "x"}),
    );
    r.expect_error(400, 13, "MESSAGE_ILLEGAL");
    assert!(r.text.contains("0x01 or 0x02"), "{}", r.text);
}
