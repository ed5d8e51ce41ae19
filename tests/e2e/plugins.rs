//! Plugins end to end: deploy with the CLI, messages consumed by wasm components, retries and
//! dead letters, version swaps under load, refusals, HTTP triggers, restart from the cache.
//!
//! Needs the components built first:
//! `cargo build --release --target wasm32-wasip2 -p order-timeout -p logistics -p flaky -p probe`
//! (`.ci/run` does it; `plugins/build.sh` too).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Server, ServerOpts, create_topic, wait_for, wasm_artifact};

const WAIT: Duration = Duration::from_secs(30);

/// A server whose retries wait 10,000× less; `[plugins] dir` is left at `./plugins`, which does
/// not exist in the server's work dir, so nothing is deployed at start.
fn server() -> Server {
    Server::start(ServerOpts::with_config(
        "[broker]\nretry_delay_scale = 0.0001\n",
    ))
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Writes `<work>/<dir>/plugin.toml` from an example manifest, pointing at the built component.
pub(crate) fn example_manifest(
    s: &Server,
    example: &str,
    edit: impl Fn(String) -> String,
) -> PathBuf {
    let text = std::fs::read_to_string(
        repo_root()
            .join("plugins")
            .join(example)
            .join("plugin.toml"),
    )
    .expect("example manifest");
    let component = wasm_artifact(example);
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("component = ") {
            out.push_str(&format!(
                "component = {:?}\n",
                component.display().to_string()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    write_manifest(s, example, &edit(out))
}

fn write_manifest(s: &Server, dir: &str, text: &str) -> PathBuf {
    let d = s.work_dir().join(dir);
    std::fs::create_dir_all(&d).expect("manifest dir");
    let p = d.join("plugin.toml");
    std::fs::write(&p, text).expect("write manifest");
    p
}

/// A manifest for the `probe` test component (tag `commit` = read body, commit).
pub(crate) fn probe_manifest(s: &Server, name: &str, version: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
version = "{version}"
component = {component:?}

[consumer]
group = "GID_{group}"
max_reconsume_times = 2
consume_timeout_ms = 5000
concurrency = 4

[[subscription]]
topic = "Load"
expression = "commit"
{extra}"#,
        component = wasm_artifact("probe").display().to_string(),
        group = name.replace('-', "_"),
    );
    write_manifest(s, &format!("{name}-{version}"), &text)
}

pub(crate) fn deploy(s: &Server, manifest: &Path) -> Value {
    s.wharf(&[
        "plugin",
        "deploy",
        &manifest.display().to_string(),
        "--json",
    ])
    .ok()
    .json()
}

fn counter(s: &Server, plugin: &str, name: &str) -> u64 {
    s.get(&format!("/v1/plugins/{plugin}")).expect(200)["counters"][name]
        .as_u64()
        .unwrap_or(0)
}

fn send(s: &Server, topic: &str, msg: Value) -> String {
    let r = s.post_json(&format!("/v1/topics/{topic}/messages"), &msg);
    assert!(
        r.status == 200 || r.status == 201,
        "send: {} {}",
        r.status,
        r.text
    );
    r.body["message_id"]
        .as_str()
        .expect("message_id")
        .to_string()
}

fn by_key(s: &Server, topic: &str, key: &str) -> Vec<Value> {
    let v = s
        .get(&format!("/v1/topics/{topic}/messages?key={key}"))
        .expect(200);
    match v {
        Value::Array(a) => a,
        other => other["messages"].as_array().cloned().unwrap_or_default(),
    }
}

#[test]
fn order_timeout_plugin_closes_unpaid_orders() {
    let s = server();
    create_topic(s.api(), "Trade", 4);
    create_topic(s.api(), "Notify", 2);
    let m = example_manifest(&s, "order-timeout", |t| {
        t.replace("concurrency = 20", "concurrency = 2")
    });
    let d = deploy(&s, &m);
    assert_eq!(d["name"], "order-timeout");
    assert_eq!(d["version"], 1);
    assert_eq!(d["status"], "running");
    let order = |key: &str, tag: &str| json!({"tag": tag, "keys": [key], "properties": {"timeoutMs": "300"}, "body": "{}"});
    send(&s, "Trade", order("paid-1", "order"));
    send(&s, "Trade", order("paid-1", "pay"));
    send(&s, "Trade", order("late-2", "order"));
    let closed = wait_for("a close notice for the unpaid order", WAIT, || {
        let found = by_key(&s, "Notify", "late-2");
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(closed[0]["tag"], "close");
    wait_for("both checks handled", WAIT, || {
        (counter(&s, "order-timeout", "commits") >= 5).then_some(())
    });
    assert!(
        by_key(&s, "Notify", "paid-1").is_empty(),
        "a paid order is not closed"
    );
    let status = s.get("/v1/plugins/order-timeout").expect(200);
    assert_eq!(status["instances"], 2);
    assert_eq!(status["group"], "GID_order_timeout");
    let metrics = s.get("/metrics").text;
    assert!(
        metrics.contains("wharf_plugin_commits_total{plugin=\"order-timeout\"}"),
        "per-plugin metrics are exported"
    );
}

#[test]
fn logistics_sees_only_its_tag() {
    let s = server();
    create_topic(s.api(), "Trade", 2);
    let m = example_manifest(&s, "logistics", |t| t);
    deploy(&s, &m);
    send(
        &s,
        "Trade",
        json!({"tag": "order", "keys": ["o-1"], "body": "x"}),
    );
    let shipped = send(
        &s,
        "Trade",
        json!({"tag": "logistics", "keys": ["o-1"], "body": "truck 7"}),
    );
    wait_for("the logistics message consumed", WAIT, || {
        (counter(&s, "logistics", "commits") == 1).then_some(())
    });
    let v = s.get(&format!("/v1/messages/{shipped}")).expect(200);
    let deliveries = v["deliveries"].as_array().cloned().unwrap_or_default();
    assert!(
        deliveries
            .iter()
            .any(|d| d["group"] == "GID_logistics" && d["status"] == "consumed"),
        "{v}"
    );
    assert_eq!(
        counter(&s, "logistics", "invocations"),
        1,
        "the order was filtered out by the broker"
    );
}

#[test]
fn flaky_plugin_retries_then_dead_letters() {
    let s = server();
    create_topic(s.api(), "Flaky", 2);
    let m = example_manifest(&s, "flaky", |t| t);
    deploy(&s, &m);
    send(
        &s,
        "Flaky",
        json!({"properties": {"fail_times": "2"}, "body": "recovers"}),
    );
    let doomed = send(
        &s,
        "Flaky",
        json!({"properties": {"fail_times": "9"}, "body": "never"}),
    );
    wait_for("the recovering message to commit", WAIT, || {
        (counter(&s, "flaky", "commits") == 1).then_some(())
    });
    let dead = wait_for("the failing message in the dead letters", WAIT, || {
        let v = s.get("/v1/groups/GID_flaky/dead-letters").expect(200);
        let msgs = v["messages"].as_array().cloned().unwrap_or_default();
        (!msgs.is_empty()).then_some(msgs)
    });
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["body"], "never");
    let _ = doomed;
    // 3 attempts for the first, 1 + max_reconsume_times (3) for the second. A retry is
    // counted after its settle, so after the invocation: wait for the retries.
    wait_for("all retries counted", WAIT, || {
        (counter(&s, "flaky", "retries") >= 6).then_some(())
    });
    assert_eq!(counter(&s, "flaky", "invocations"), 7);
    assert_eq!(counter(&s, "flaky", "retries"), 6);
}

#[test]
fn version_swaps_and_remove_under_load_lose_nothing() {
    let s = server();
    create_topic(s.api(), "Load", 4);
    let v1 = probe_manifest(&s, "loader", "1.0.0", "");
    let v2 = probe_manifest(&s, "loader", "2.0.0", "");
    assert_eq!(deploy(&s, &v1)["version"], 1);
    let total = 300;
    let api = s.api().clone();
    let sender = std::thread::spawn(move || {
        for i in 0..total {
            let r = api.post_json(
                "/v1/topics/Load/messages",
                &json!({"tag": "commit", "body": format!("m{i}")}),
            );
            assert!(r.status == 200 || r.status == 201, "{}", r.text);
        }
    });
    assert_eq!(deploy(&s, &v2)["version"], 2);
    let back = s
        .wharf(&["plugin", "rollback", "loader", "--json"])
        .ok()
        .json();
    assert_eq!(back["version"], 1);
    assert_eq!(back["manifest_version"], "1.0.0");
    sender.join().expect("sender");
    wait_for("every message committed", WAIT, || {
        (counter(&s, "loader", "commits") >= total).then_some(())
    });
    let group = s.get("/v1/groups/GID_loader/status").expect(200);
    assert_eq!(group["backlog"], 0, "{group}");
    let status = s.get("/v1/plugins/loader").expect(200);
    assert_eq!(status["versions"].as_array().map(Vec::len), Some(2));
    // Remove while more messages arrive: nothing is lost, the rest waits in the group.
    let api = s.api().clone();
    let sender = std::thread::spawn(move || {
        for i in 0..50 {
            let r = api.post_json(
                "/v1/topics/Load/messages",
                &json!({"tag": "commit", "body": format!("r{i}")}),
            );
            assert!(r.status == 200 || r.status == 201, "{}", r.text);
        }
    });
    let removed = s
        .wharf(&["plugin", "remove", "loader", "--json"])
        .ok()
        .json();
    assert_eq!(removed["status"], "removed");
    sender.join().expect("sender");
    s.get("/v1/plugins/loader")
        .expect_error(404, 1, "SYSTEM_ERROR");
    // Deployed again, the plugin picks up whatever arrived after the removal.
    deploy(&s, &v2);
    wait_for("the backlog left by the removal consumed", WAIT, || {
        let g = s.get("/v1/groups/GID_loader/status").expect(200);
        (g["backlog"] == 0).then_some(())
    });
    let dead = s.get("/v1/groups/GID_loader/dead-letters").expect(200);
    assert_eq!(dead["messages"], json!([]), "nothing failed along the way");
}

#[test]
fn bad_deploys_are_refused_and_the_running_version_stays() {
    let s = server();
    create_topic(s.api(), "Load", 2);
    let good = probe_manifest(&s, "steady", "1.0.0", "");
    deploy(&s, &good);
    // Unknown key: error names the place and the allowed keys.
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("concurrency = 4", "concurrency = 4\ncolour = \"red\"");
    let bad = write_manifest(&s, "bad-key", &text);
    let out = s.wharf(&["plugin", "deploy", &bad.display().to_string()]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("plugin.toml:10:1"), "{}", out.stderr);
    assert!(
        out.stderr.contains("unknown field `colour`"),
        "{}",
        out.stderr
    );
    // Out of range.
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("concurrency = 4", "concurrency = 4\nbatch_max = 64");
    let out = s.wharf(&[
        "plugin",
        "deploy",
        &write_manifest(&s, "bad-batch", &text).display().to_string(),
    ]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("allowed 1..=32"), "{}", out.stderr);
    // Not a component.
    let junk = s.work_dir().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("component") {
                format!("component = {:?}", junk.display().to_string())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let out = s.wharf(&[
        "plugin",
        "deploy",
        &write_manifest(&s, "bad-wasm", &text).display().to_string(),
    ]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("does not compile"), "{}", out.stderr);
    // Unknown topic.
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("topic = \"Load\"", "topic = \"Nowhere\"");
    let out = s.wharf(&[
        "plugin",
        "deploy",
        &write_manifest(&s, "bad-topic", &text).display().to_string(),
    ]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("TOPIC_NOT_EXIST"), "{}", out.stderr);
    // The first version still runs and consumes.
    let status = s.get("/v1/plugins/steady").expect(200);
    assert_eq!(status["version"], 1);
    assert_eq!(status["status"], "running");
    send(&s, "Load", json!({"tag": "commit", "body": "still here"}));
    wait_for("the running version to consume", WAIT, || {
        (counter(&s, "steady", "commits") == 1).then_some(())
    });
}

#[test]
fn http_trigger_turns_a_post_into_a_message() {
    let s = server();
    create_topic(s.api(), "Load", 2);
    let route = "\n[[http]]\npath = \"/hooks/load\"\ntopic = \"Load\"\ntag = \"commit\"\nheaders = [\"x-request-id\"]\nkey_header = \"x-order-id\"\n";
    let m = probe_manifest(&s, "hooked", "1.0.0", route);
    deploy(&s, &m);
    let resp = reqwest::blocking::Client::new()
        .post(s.url("/t/hooks/load"))
        .header("x-request-id", "req-1")
        .header("x-order-id", "o-77")
        .body("{\"amount\":3}")
        .send()
        .expect("trigger");
    assert!(resp.status().is_success(), "{}", resp.status());
    let receipt: Value = resp.json().expect("json receipt");
    let id = receipt["message_id"]
        .as_str()
        .expect("message_id")
        .to_string();
    let msg = s.get(&format!("/v1/messages/{id}")).expect(200);
    assert_eq!(msg["tag"], "commit");
    assert_eq!(msg["keys"], json!(["o-77"]));
    assert_eq!(msg["properties"]["x-request-id"], "req-1");
    wait_for("the triggered message consumed", WAIT, || {
        (counter(&s, "hooked", "commits") == 1).then_some(())
    });
    let other = probe_manifest(&s, "thief", "1.0.0", route);
    let out = s.wharf(&["plugin", "deploy", &other.display().to_string()]);
    assert_ne!(out.code, 0, "a second plugin may not take the same path");
    assert!(out.stderr.contains("/hooks/load"), "{}", out.stderr);
    let r = s.post_raw("/t/hooks/nothing", "text/plain", b"x".to_vec());
    assert_eq!(r.status, 404);
}

#[test]
fn restart_restores_plugins_without_recompiling() {
    let mut s = server();
    create_topic(s.api(), "Load", 2);
    deploy(&s, &probe_manifest(&s, "durable", "1.0.0", ""));
    deploy(&s, &probe_manifest(&s, "durable", "1.1.0", ""));
    s.restart();
    let status = s.get("/v1/plugins/durable").expect(200);
    assert_eq!(status["version"], 2);
    assert_eq!(status["manifest_version"], "1.1.0");
    assert_eq!(status["artifact"]["cache_hit"], true, "{status}");
    send(
        &s,
        "Load",
        json!({"tag": "commit", "body": "after restart"}),
    );
    wait_for("consumption after restart", WAIT, || {
        (counter(&s, "durable", "commits") == 1).then_some(())
    });
    let back = s
        .wharf(&["plugin", "rollback", "durable", "--json"])
        .ok()
        .json();
    assert_eq!(back["version"], 1);
}

/// Deploys `manifest` on a host armed to kill itself at `point` inside the deploy, then starts
/// it again unarmed.
fn deploy_killed_at(s: &mut Server, manifest: &Path, point: &str) {
    s.set_env("WHARF_TEST_CRASH_AT", point);
    s.restart();
    let out = s.wharf(&["plugin", "deploy", &manifest.display().to_string()]);
    assert_ne!(out.code, 0, "a deploy the host died in cannot succeed");
    s.wait_killed(WAIT);
    assert!(
        s.logs()
            .contains(&format!("test crash point '{point}' reached")),
        "{}",
        s.logs()
    );
    s.remove_env("WHARF_TEST_CRASH_AT");
    s.restart();
}

/// After a restart `plugin` runs `manifest_version`, whole: its status says so and it consumes.
fn runs_whole(s: &Server, plugin: &str, manifest_version: &str, body: &str) {
    let status = s.get(&format!("/v1/plugins/{plugin}")).expect(200);
    assert_eq!(status["manifest_version"], manifest_version, "{status}");
    let before = counter(s, plugin, "commits");
    send(s, "Load", json!({"tag": "commit", "body": body}));
    wait_for("the running version to consume", WAIT, || {
        (counter(s, plugin, "commits") > before).then_some(())
    });
}

#[test]
fn kill9_inside_a_deploy_never_serves_a_half_deployed_version() {
    let mut s = server();
    create_topic(s.api(), "Load", 2);
    assert_eq!(
        deploy(&s, &probe_manifest(&s, "steady", "1.0.0", ""))["version"],
        1
    );
    // Killed after the new version's bytes are stored, before the record names them: the
    // old version runs, and the orphaned bytes go with the next deploy.
    let v2 = probe_manifest(&s, "steady", "2.0.0", "");
    deploy_killed_at(&mut s, &v2, "deploy-stored");
    runs_whole(&s, "steady", "1.0.0", "after a crash before the record");
    let d = deploy(&s, &v2);
    assert_eq!(d["version"], 3, "v2's number went to the dead deploy: {d}");
    runs_whole(&s, "steady", "2.0.0", "redeployed");
    // Killed after the record names the new version, before this host switched to it: the
    // restart runs the new version from the store.
    let v3 = probe_manifest(&s, "steady", "3.0.0", "");
    deploy_killed_at(&mut s, &v3, "deploy-recorded");
    runs_whole(&s, "steady", "3.0.0", "after a crash after the record");
    let status = s.get("/v1/plugins/steady").expect(200);
    assert_eq!(status["version"], 4, "{status}");
    // Rollback finds the earlier whole version's bytes.
    let back = s
        .wharf(&["plugin", "rollback", "steady", "--json"])
        .ok()
        .json();
    assert_eq!(back["version"], 3, "{back}");
    runs_whole(&s, "steady", "2.0.0", "rolled back");
}
