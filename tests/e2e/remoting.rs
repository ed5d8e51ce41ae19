//! The RocketMQ remoting front end driven by the unmodified ali-ons SDK (npm, pinned in
//! tests/package.json; `npm ci` in tests/ installs it) through the scripts in tests/remoting/,
//! plus raw-protocol checks that need no SDK.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::harness::{Server, ServerOpts, create_group, create_topic, wait_for, wasm_artifact};

/// Long enough for a debug host and Node on a loaded 2-core machine; never a spec duration.
const STEP: Duration = Duration::from_secs(60);

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One ali-ons script (`tests/remoting/<script>.js`) and the JSON lines it prints.
struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    name: String,
}

impl Node {
    fn spawn(script: &str, opts: Value) -> Node {
        let dir = tests_dir();
        assert!(
            dir.join("node_modules/ali-ons").is_dir(),
            "ali-ons is not installed: run `npm ci` in {} (.ci/run does)",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("remoting").join(format!("{script}.js")))
            .arg(opts.to_string())
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node (is Node.js installed?): {e}"));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let name = format!("{script}:{}", child.id());
        let tag = name.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("[{tag} out] {line}"),
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let tag = name.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[{tag} err] {line}");
            }
        });
        let stdin = child.stdin.take();
        Node {
            child,
            stdin,
            lines: rx,
            name,
        }
    }

    /// The next line whose `event` is `event`, skipping others (kept in `skipped`).
    fn until(&self, event: &str, skipped: &mut Vec<Value>) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == event => return v,
                Ok(v) if v["event"] == "error" => panic!("{} failed: {v}", self.name),
                Ok(v) => skipped.push(v),
                Err(_) => panic!(
                    "{}: no '{event}' line within {STEP:?}; saw {skipped:?}",
                    self.name
                ),
            }
        }
    }

    fn wait(&self, event: &str) -> Value {
        self.until(event, &mut Vec::new())
    }

    /// The next `n` `message` lines.
    fn messages(&self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        let mut other = Vec::new();
        while got.len() < n {
            got.push(self.until("message", &mut other));
        }
        got
    }

    /// Closes stdin: the consumer closes cleanly (unregisters) and exits.
    fn close(&mut self) -> Value {
        self.stdin.take();
        let closed = self.wait("closed");
        let _ = self.child.wait();
        closed
    }

    fn exit_ok(&mut self) {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "{} exited with {st}", self.name);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn name_srv(s: &Server) -> String {
    s.listener("remoting")
        .expect("the host prints remoting=ADDR on its listening line")
        .to_string()
}

fn produce(s: &Server, messages: Value) -> Vec<Value> {
    produce_with(s, json!({}), messages)
}

fn produce_with(s: &Server, extra: Value, messages: Value) -> Vec<Value> {
    let mut opts = json!({"nameSrv": name_srv(s), "messages": messages});
    if let (Some(o), Some(e)) = (opts.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let n = opts["messages"].as_array().map_or(0, Vec::len);
    let mut p = Node::spawn("producer", opts);
    let mut sent = Vec::new();
    for _ in 0..n {
        let v = p.wait_any(&["sent", "send_failed"]);
        sent.push(v);
    }
    p.wait("done");
    p.exit_ok();
    sent
}

impl Node {
    fn wait_any(&self, events: &[&str]) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if events.iter().any(|e| v["event"] == *e) => return v,
                Ok(v) if v["event"] == "error" => panic!("{} failed: {v}", self.name),
                Ok(_) => {}
                Err(_) => panic!("{}: none of {events:?} within {STEP:?}", self.name),
            }
        }
    }
}

fn consumer(s: &Server, opts: Value) -> Node {
    let mut o = json!({"nameSrv": name_srv(s)});
    if let (Some(a), Some(b)) = (o.as_object_mut(), opts.as_object()) {
        a.extend(b.clone());
    }
    Node::spawn("consumer", o)
}

/// Waits until the consumer holds `queues` queues of its topic.
fn rebalanced_to(c: &Node, queues: u64) {
    let mut skipped = Vec::new();
    loop {
        let v = c.until("rebalanced", &mut skipped);
        if v["queues"] == queues {
            return;
        }
    }
}

#[test]
fn ali_ons_send_with_tags_and_keys_consume_filtered_and_query_by_printed_id() {
    let s = Server::start_default();
    create_topic(s.api(), "OnsTrade", 4);
    let c = consumer(
        &s,
        json!({"group": "GID_ons_filter", "topic": "OnsTrade", "expression": "order||pay"}),
    );
    c.wait("ready");
    let sent = produce(
        &s,
        json!([
            {"topic": "OnsTrade", "tags": "order", "keys": ["order-1"], "body": "first"},
            {"topic": "OnsTrade", "tags": "logistics", "body": "filtered out"},
            {"topic": "OnsTrade", "tags": "pay", "keys": ["order-1", "pay-1"], "body": "second"},
            {"topic": "OnsTrade", "body": "untagged"},
        ]),
    );
    for v in &sent {
        assert_eq!(v["event"], "sent", "{v}");
        assert_eq!(v["sendStatus"], "SEND_OK", "{v}");
        assert_eq!(v["msgId"].as_str().unwrap().len(), 32, "{v}");
    }
    let mut got = c.messages(2);
    got.sort_by_key(|v| v["body"].as_str().unwrap().to_string());
    assert_eq!(got[0]["body"], "first");
    assert_eq!(got[0]["tags"], "order");
    assert_eq!(got[0]["keys"], "order-1");
    assert_eq!(got[1]["body"], "second");
    assert_eq!(got[1]["keys"], "order-1 pay-1");
    // The id the consumer computed from the record is the one the producer was given.
    assert_eq!(got[0]["msgId"], sent[0]["msgId"]);
    assert_eq!(got[0]["reconsumeTimes"], 0);

    // Query by the offset message id the SDK printed; by key; the message as HTTP sees it.
    let id = sent[0]["msgId"].as_str().unwrap();
    let m = s.get(&format!("/v1/messages/{id}")).expect(200);
    assert_eq!(m["body"], "first", "{m}");
    assert_eq!(m["tag"], "order");
    assert_eq!(m["keys"], json!(["order-1"]));
    let by_key = s.get("/v1/topics/OnsTrade/messages?key=pay-1").expect(200);
    assert_eq!(by_key["messages"][0]["body"], "second", "{by_key}");
    let untagged = s
        .get(&format!(
            "/v1/messages/{}",
            sent[3]["msgId"].as_str().unwrap()
        ))
        .expect(200);
    assert!(
        untagged["tag"].is_null(),
        "TAGS=null is untagged: {untagged}"
    );

    // A message sent with ali-ons is consumed over HTTP pull too.
    create_group(s.api(), "GID_http_reader");
    let r = s
        .post_json(
            "/v1/groups/GID_http_reader/receive",
            &json!({"topic": "OnsTrade", "expression": "order", "max": 8, "wait_ms": 5000}),
        )
        .expect(200);
    let bodies: Vec<&str> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["body"].as_str())
        .collect();
    assert_eq!(bodies, vec!["first"], "{r}");
    // The group exists (created on the consumer's first heartbeat) and lists the client with
    // its address and backlog (it consumed everything it was handed).
    let g = s.get("/v1/groups/GID_ons_filter").expect(200);
    assert_eq!(g["model"], "clustering", "{g}");
    let st = s.get("/v1/groups/GID_ons_filter/status").expect(200);
    assert_eq!(st["online"], true, "{st}");
    let inst = &st["instances"][0];
    assert!(inst["instance_id"].as_str().unwrap().contains('@'), "{st}");
    assert!(
        inst["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{st}"
    );
    assert!(inst["backlog"].is_u64(), "{st}");
    drop(c);
}

#[test]
fn http_sends_reach_ali_ons_consumers_and_timer_messages_wait() {
    let s = Server::start_default();
    create_topic(s.api(), "OnsTimer", 2);
    let c = consumer(&s, json!({"group": "GID_ons_timer", "topic": "OnsTimer"}));
    c.wait("ready");
    let r = s
        .post_json(
            "/v1/topics/OnsTimer/messages",
            &json!({"tag": "web", "keys": ["h-1"], "body": "from http"}),
        )
        .expect(200);
    let got = c.messages(1);
    assert_eq!(got[0]["body"], "from http");
    assert_eq!(got[0]["tags"], "web");
    // Wharf's own id for the same message also answers.
    let wharf_id = r["message_id"].as_str().unwrap();
    s.get(&format!("/v1/messages/{wharf_id}")).expect(200);
    let printed = got[0]["msgId"].as_str().unwrap();
    let m = s.get(&format!("/v1/messages/{printed}")).expect(200);
    assert_eq!(m["message_id"], wharf_id, "{m}");

    let at = now_ms() + 1500;
    let sent = produce(
        &s,
        json!([{"topic": "OnsTimer", "tags": "later", "body": "timer", "startDeliverTime": at}]),
    );
    assert_eq!(sent[0]["event"], "sent", "{sent:?}");
    let got = c.messages(1);
    let arrived = now_ms();
    assert_eq!(got[0]["body"], "timer");
    assert!(
        arrived >= at,
        "delivered at {arrived}, before its time {at}"
    );
    // Big bodies are compressed by the producer (zlib, 4 KiB and up) and come back whole.
    let big = "z".repeat(10_000);
    let sent = produce(&s, json!([{"topic": "OnsTimer", "body": big}]));
    assert_eq!(sent[0]["event"], "sent", "{sent:?}");
    let got = c.messages(1);
    assert_eq!(got[0]["bodyLength"], 10_000);
    let m = s
        .get(&format!(
            "/v1/messages/{}",
            sent[0]["msgId"].as_str().unwrap()
        ))
        .expect(200);
    assert_eq!(m["body"].as_str().map(str::len), Some(10_000));
}

#[test]
fn a_failed_message_comes_back_with_reconsume_times_one_then_dead_letters() {
    let s = Server::start(ServerOpts::with_config(
        "[broker]\nretry_delay_scale = 0.0001\n",
    ));
    create_topic(s.api(), "OnsRetry", 2);
    let c = consumer(
        &s,
        json!({"group": "GID_ons_retry", "topic": "OnsRetry", "failBodies": ["bad"], "failTimes": 1}),
    );
    c.wait("ready");
    produce(
        &s,
        json!([{"topic": "OnsRetry", "tags": "t", "body": "bad"}]),
    );
    let got = c.messages(2);
    assert_eq!(got[0]["reconsumeTimes"], 0);
    assert_eq!(got[0]["retrying"], true);
    assert_eq!(got[1]["body"], "bad");
    assert_eq!(got[1]["reconsumeTimes"], 1, "{:?}", got[1]);
    assert_eq!(got[1]["topic"], "OnsRetry", "shown under its own topic");
    assert_eq!(got[1]["retryTopic"], "OnsRetry");
    assert_eq!(got[1]["tags"], "t");

    // The client's maximum travels with the send-back: 0 dead-letters the first failure.
    // (ali-ons 3.12 ignores what its handler answers for a message redelivered from the retry
    // topic, so with it a message is never sent back twice; the broker's schedule is the same
    // for every consumer kind and is covered by the consumption engine's tests.)
    let d = consumer(
        &s,
        json!({"group": "GID_ons_dlq", "topic": "OnsRetry", "failBodies": ["doomed"],
               "failTimes": 99, "maxReconsumeTimes": 0}),
    );
    d.wait("ready");
    let sent = produce(&s, json!([{"topic": "OnsRetry", "body": "doomed"}]));
    // The new group starts at the topic's start (it is recent), so it sees "bad" too.
    let mut doomed = Vec::new();
    while doomed.is_empty() {
        doomed.extend(d.messages(1).into_iter().filter(|m| m["body"] == "doomed"));
    }
    assert_eq!(doomed[0]["reconsumeTimes"], 0, "{doomed:?}");
    let id = sent[0]["msgId"].as_str().unwrap();
    let m = s.get(&format!("/v1/messages/{id}")).expect(200);
    let wharf_id = m["message_id"].as_str().unwrap().to_string();
    let dl = wait_for("the dead letter", STEP, || {
        let v = s.get("/v1/groups/GID_ons_dlq/dead-letters").expect(200);
        let found = v["messages"]
            .as_array()?
            .iter()
            .any(|m| m["message_id"] == wharf_id.as_str());
        found.then_some(v)
    });
    assert_eq!(dl["messages"][0]["body"], "doomed", "{dl}");
}

#[test]
fn broadcasting_consumers_each_get_every_message() {
    let s = Server::start_default();
    create_topic(s.api(), "OnsNews", 2);
    let a = consumer(
        &s,
        json!({"group": "GID_ons_bcast", "topic": "OnsNews", "broadcast": true, "instanceName": "a"}),
    );
    let b = consumer(
        &s,
        json!({"group": "GID_ons_bcast", "topic": "OnsNews", "broadcast": true, "instanceName": "b"}),
    );
    // Broadcasting starts at the end of each queue: wait until both hold both queues.
    rebalanced_to(&a, 2);
    rebalanced_to(&b, 2);
    produce(
        &s,
        json!([{"topic": "OnsNews", "body": "n1"}, {"topic": "OnsNews", "body": "n2"},
               {"topic": "OnsNews", "body": "n3"}]),
    );
    for c in [&a, &b] {
        let mut bodies: Vec<String> = c
            .messages(3)
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect();
        bodies.sort();
        assert_eq!(bodies, vec!["n1", "n2", "n3"]);
    }
    let g = s.get("/v1/groups/GID_ons_bcast").expect(200);
    assert_eq!(g["model"], "broadcasting", "{g}");
}

#[test]
fn two_clustering_consumers_share_queues_and_rebalance_when_one_leaves() {
    let s = Server::start_default();
    create_topic(s.api(), "OnsShare", 4);
    let a = consumer(
        &s,
        json!({"group": "GID_ons_share", "topic": "OnsShare", "instanceName": "a"}),
    );
    rebalanced_to(&a, 4);
    let mut b = consumer(
        &s,
        json!({"group": "GID_ons_share", "topic": "OnsShare", "instanceName": "b"}),
    );
    rebalanced_to(&b, 2);
    rebalanced_to(&a, 2);
    b.close();
    rebalanced_to(&a, 4);
    let msgs: Vec<Value> = (0..8)
        .map(|i| json!({"topic": "OnsShare", "body": format!("m{i}")}))
        .collect();
    produce(&s, Value::Array(msgs));
    let got = a.messages(8);
    let queues: std::collections::BTreeSet<u64> =
        got.iter().filter_map(|m| m["queueId"].as_u64()).collect();
    assert_eq!(
        queues.len(),
        4,
        "the remaining consumer reads every queue: {got:?}"
    );
}

#[test]
fn signed_requests_pass_and_a_bad_secret_is_refused() {
    let cfg = r#"
[[auth.keys]]
access_key = "ons-ak"
secret_key = "ons-secret"
allow_publish = ["*"]
allow_subscribe = ["*"]
admin = true
"#;
    let s = Server::start(ServerOpts::with_config(cfg));
    let admin = s.signed("ons-ak", "ons-secret");
    create_topic(&admin, "OnsSigned", 2);
    create_group(&admin, "GID_ons_signed");
    let keys = json!({"accessKeyId": "ons-ak", "accessKeySecret": "ons-secret"});
    let mut opts = keys.clone();
    opts["group"] = json!("GID_ons_signed");
    opts["topic"] = json!("OnsSigned");
    let c = consumer(&s, opts);
    c.wait("ready");
    let sent = produce_with(&s, keys, json!([{"topic": "OnsSigned", "body": "signed"}]));
    assert_eq!(sent[0]["event"], "sent", "{sent:?}");
    assert_eq!(c.messages(1)[0]["body"], "signed");

    let bad = json!({"accessKeyId": "ons-ak", "accessKeySecret": "wrong"});
    let sent = produce_with(&s, bad, json!([{"topic": "OnsSigned", "body": "forged"}]));
    assert_eq!(sent[0]["event"], "send_failed", "{sent:?}");
    // Unsigned raw request: refused with a remark saying why.
    let reply = raw_call(&s, 105, json!({"topic": "OnsSigned"}), b"");
    assert_eq!(reply.0["code"], 1, "{:?}", reply.0);
    assert!(
        reply.0["remark"].as_str().unwrap().contains("signed"),
        "{:?}",
        reply.0
    );
}

/// Sends one JSON-header request on a fresh connection; returns the reply header and body.
pub(crate) fn raw_call(s: &Server, code: i32, ext: Value, body: &[u8]) -> (Value, Vec<u8>) {
    let mut t = TcpStream::connect(name_srv(s)).unwrap();
    t.set_read_timeout(Some(STEP)).unwrap();
    let header = json!({"code": code, "language": "JAVA", "version": 399, "opaque": 77,
                        "flag": 0, "extFields": ext})
    .to_string();
    let mut frame = Vec::new();
    frame.extend_from_slice(&((4 + header.len() + body.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
    frame.extend_from_slice(header.as_bytes());
    frame.extend_from_slice(body);
    t.write_all(&frame).unwrap();
    read_reply(&mut t)
}

fn read_reply(t: &mut TcpStream) -> (Value, Vec<u8>) {
    let mut len = [0u8; 4];
    t.read_exact(&mut len).unwrap();
    let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
    t.read_exact(&mut rest).unwrap();
    let hl = (u32::from_be_bytes(rest[0..4].try_into().unwrap()) & 0xFF_FFFF) as usize;
    let header: Value = serde_json::from_slice(&rest[4..4 + hl]).unwrap();
    (header, rest[4 + hl..].to_vec())
}

#[test]
fn raw_protocol_unknown_codes_bad_frames_and_routes() {
    let s = Server::start_default();
    create_topic(s.api(), "RawTopic", 3);
    let (h, _) = raw_call(&s, 9999, json!({}), b"");
    assert_eq!(h["code"], 3, "REQUEST_CODE_NOT_SUPPORTED: {h}");
    assert_eq!(h["opaque"], 77);
    assert_eq!(h["flag"], 1);
    assert_eq!(h["language"], "JAVA");
    assert_eq!(h["serializeTypeCurrentRPC"], "JSON");

    let (h, body) = raw_call(&s, 105, json!({"topic": "RawTopic"}), b"");
    assert_eq!(h["code"], 0, "{h}");
    let route: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(route["queueDatas"][0]["readQueueNums"], 3, "{route}");
    assert_eq!(
        route["brokerDatas"][0]["brokerAddrs"]["0"],
        name_srv(&s).as_str()
    );
    let (h, _) = raw_call(&s, 105, json!({"topic": "NoSuchTopic"}), b"");
    assert_eq!(h["code"], 17, "{h}");
    let (h, body) = raw_call(&s, 105, json!({"topic": "%RETRY%GID_not_yet"}), b"");
    assert_eq!(h["code"], 0, "retry topics always route: {h}");
    assert!(!body.is_empty());
    // A send to a missing topic is TOPIC_NOT_EXIST, never an implicit create.
    let (h, _) = raw_call(
        &s,
        310,
        json!({"a": "P", "b": "NoSuchTopic", "e": 0, "i": ""}),
        b"x",
    );
    assert_eq!(h["code"], 17, "{h}");

    // Garbage, an oversize length and a bad header each close only their own connection.
    for bad in [
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        vec![0x7f, 0, 0, 0],
        {
            let mut f = 12u32.to_be_bytes().to_vec();
            f.extend_from_slice(&8u32.to_be_bytes());
            f.extend_from_slice(b"notjson!");
            f
        },
    ] {
        let mut t = TcpStream::connect(name_srv(&s)).unwrap();
        t.set_read_timeout(Some(STEP)).unwrap();
        t.write_all(&bad).unwrap();
        let mut buf = [0u8; 16];
        let n = t.read(&mut buf).unwrap_or(0);
        assert_eq!(
            n, 0,
            "the host closes a connection that sent a malformed frame"
        );
    }
    s.get("/healthz").expect(200);
    let (h, _) = raw_call(&s, 30, json!({"topic": "RawTopic", "queueId": 1}), b"");
    assert_eq!(h["code"], 0, "{h}");
    assert_eq!(h["extFields"]["offset"], "0");
}

#[test]
fn ali_ons_messages_reach_a_plugin_and_the_plugins_messages_reach_ali_ons() {
    let s = Server::start_default();
    create_topic(s.api(), "OnsToPlugin", 2);
    create_topic(s.api(), "PluginToOns", 2);
    // The probe plugin answers tag `send` by sending the body to the topic named in `to`.
    let manifest = s.work_dir().join("relay.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"name = "relay"
version = "1.0.0"
component = {component:?}

[consumer]
group = "GID_relay"

[[subscription]]
topic = "OnsToPlugin"
expression = "send"

[permissions]
publish = ["PluginToOns"]
"#,
            component = wasm_artifact("probe").display().to_string()
        ),
    )
    .unwrap();
    s.wharf(&[
        "plugin",
        "deploy",
        &manifest.display().to_string(),
        "--json",
    ])
    .ok();
    let c = consumer(
        &s,
        json!({"group": "GID_ons_after_plugin", "topic": "PluginToOns"}),
    );
    c.wait("ready");
    let sent = produce(
        &s,
        json!([{"topic": "OnsToPlugin", "tags": "send", "body": "relayed",
                "props": {"to": "PluginToOns"}}]),
    );
    assert_eq!(sent[0]["event"], "sent", "{sent:?}");
    let got = c.messages(1);
    assert_eq!(got[0]["body"], "relayed");
    assert_eq!(
        got[0]["tags"], "probe",
        "written by the plugin: {:?}",
        got[0]
    );
    // The plugin's commit of the ali-ons message lands shortly after its send.
    wait_for("the plugin group's backlog to drain", STEP, || {
        let st = s.get("/v1/groups/GID_relay/status").expect(200);
        (st["backlog"] == 0).then_some(())
    });
}
