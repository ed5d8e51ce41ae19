//! Standard MQTT clients, unchanged, over every listener of the gateway: Debian's
//! `mosquitto_pub`/`mosquitto_sub` (TCP, TLS), paho-mqtt from PyPI (TCP, TLS, WebSocket, secure
//! WebSocket) and MQTT.js from npm (TCP, TLS, WebSocket, secure WebSocket), plus the bridge to the
//! broker seen from a real client (MQTT publish read over HTTP, HTTP `MQ2MQTT` send reaching a
//! `mosquitto_sub`).
//!
//! The clients come from `.ci/run`: `mosquitto-clients` and `openssl` (apt), a venv at
//! `tests/mqtt-py/.venv` with `tests/mqtt-py/requirements.txt`, and `npm ci` in `tests/mqtt-js`.
//! A test whose client is missing fails and says how to install it.
//!
//! No test sleeps to synchronise: a subscriber is known to be ready when the inspection route
//! (`GET /v1/mqtt/devices/{client_id}`) lists its subscription, and every client process runs
//! under a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{SelfSignedCert as Cert, Server, ServerOpts, create_topic, wait_for};

/// Longest any one client process may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a subscriber may take to show up in the inspection route.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A server in open mode with all four MQTT listeners on free ports, plus its certificate.
fn start_all_listeners(extra: &str) -> (Server, Cert) {
    let cert = Cert::new();
    let config = format!(
        "[mqtt]\nmode = \"open\"\ntls_listen = \"127.0.0.1:0\"\nws_listen = \"127.0.0.1:0\"\n\
         wss_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n{extra}",
        cert.cert().display().to_string(),
        cert.key().display().to_string(),
    );
    let s = Server::start(ServerOpts::with_config(config));
    for name in ["mqtt", "mqtts", "mqtt-ws", "mqtt-wss"] {
        assert!(
            s.listener(name).is_some(),
            "no `{name}=` on the listening line; logs:\n{}",
            s.logs()
        );
    }
    (s, cert)
}

/// `(host, port)` of a listener.
fn host_port(s: &Server, name: &str) -> (String, String) {
    let addr = s
        .listener(name)
        .unwrap_or_else(|| panic!("no {name} listener"));
    let (h, p) = addr.rsplit_once(':').expect("addr is host:port");
    (h.trim_matches(['[', ']']).to_string(), p.to_string())
}

/// A unique suffix so tests running in parallel never share topics or client ids.
fn unique() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Output of a finished client process.
struct Finished {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Waits for `child` to exit (killing it past `timeout`) and collects its output.
fn finish(mut child: Child, what: &str, timeout: Duration) -> Finished {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for client") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if status.is_none() {
        panic!("{what} did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
    Finished {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    }
}

/// Runs a command to completion under the client deadline.
fn run(cmd: &mut Command, what: &str) -> Finished {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    finish(child, what, CLIENT_TIMEOUT)
}

/// Runs and asserts exit 0, returning stdout.
fn run_ok(cmd: &mut Command, what: &str, s: &Server) -> String {
    let f = run(cmd, what);
    assert!(
        f.ok,
        "{what} failed\nstdout:\n{}\nstderr:\n{}\nserver logs:\n{}",
        f.stdout,
        f.stderr,
        s.logs()
    );
    f.stdout
}

/// Blocks until the gateway lists `filter` among `client_id`'s subscriptions.
fn wait_subscribed(s: &Server, client_id: &str, filter: &str) {
    wait_for(
        &format!("{client_id} subscribed to {filter}"),
        READY_TIMEOUT,
        || {
            let r = s.get(&format!("/v1/mqtt/devices/{client_id}"));
            let subscribed = r.status == 200
                && r.body["online"] == json!(true)
                && r.body["subscriptions"]
                    .as_array()
                    .is_some_and(|subs| subs.iter().any(|x| x["filter"] == json!(filter)));
            subscribed.then_some(())
        },
    );
}

/// Blocks until `client_id` is connected.
fn wait_online(s: &Server, client_id: &str) {
    wait_for(&format!("{client_id} online"), READY_TIMEOUT, || {
        let r = s.get(&format!("/v1/mqtt/devices/{client_id}"));
        (r.status == 200 && r.body["online"] == json!(true)).then_some(())
    });
}

/// `mosquitto_sub`/`mosquitto_pub` with the connection arguments of one listener.
fn mosquitto(tool: &str, s: &Server, listener: &str, cert: &Cert) -> Command {
    let (host, port) = host_port(s, listener);
    let mut c = Command::new(tool);
    c.args(["-h", &host, "-p", &port, "-V", "mqttv311"]);
    if listener == "mqtts" {
        c.arg("--cafile").arg(cert.cert());
    }
    c
}

/// Panics with install instructions when the mosquitto clients are missing.
fn require_mosquitto() {
    let ok = Command::new("mosquitto_sub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "mosquitto_sub not found; install Debian's `mosquitto-clients` (.ci/run does)"
    );
}

/// Starts `mosquitto_sub` for `count` messages on `topic` and waits until it is subscribed.
fn spawn_sub(
    s: &Server,
    listener: &str,
    cert: &Cert,
    client_id: &str,
    topic: &str,
    qos: u8,
    count: usize,
) -> Child {
    let child = mosquitto("mosquitto_sub", s, listener, cert)
        .args(["-i", client_id, "-t", topic, "-q", &qos.to_string()])
        .args(["-C", &count.to_string(), "-W", "50", "-F", "%q %t %p"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mosquitto_sub");
    wait_subscribed(s, client_id, topic);
    child
}

/// QoS 0, 1 and 2 publish → subscribe with the mosquitto clients over one listener.
fn mosquitto_qos_matrix(s: &Server, cert: &Cert, listener: &str) {
    for qos in 0..=2u8 {
        let id = unique();
        let topic = format!("mosq/{listener}/q{qos}/{id}");
        let sub_id = format!("mosq-sub-{id}");
        let sub = spawn_sub(s, listener, cert, &sub_id, &topic, qos, 3);
        for i in 0..3 {
            run_ok(
                mosquitto("mosquitto_pub", s, listener, cert).args([
                    "-t",
                    &topic,
                    "-q",
                    &qos.to_string(),
                    "-m",
                    &format!("m{i}"),
                ]),
                "mosquitto_pub",
                s,
            );
        }
        let got = finish(sub, "mosquitto_sub", CLIENT_TIMEOUT);
        assert!(got.ok, "mosquitto_sub failed: {}", got.stderr);
        // Each message comes from its own publisher connection, and MQTT orders messages only
        // per publisher, so compare as a set.
        let mut lines: Vec<&str> = got.stdout.lines().collect();
        lines.sort_unstable();
        let want: Vec<String> = (0..3).map(|i| format!("{qos} {topic} m{i}")).collect();
        assert_eq!(
            lines, want,
            "{listener} QoS {qos}: what mosquitto_sub printed"
        );
    }
}

#[test]
fn mosquitto_qos_0_1_2_over_tcp_and_tls() {
    require_mosquitto();
    let (s, cert) = start_all_listeners("");
    mosquitto_qos_matrix(&s, &cert, "mqtt");
    mosquitto_qos_matrix(&s, &cert, "mqtts");
}

#[test]
fn mosquitto_retained_reaches_a_later_subscriber_over_tcp_and_tls() {
    require_mosquitto();
    let (s, cert) = start_all_listeners("");
    for listener in ["mqtt", "mqtts"] {
        let id = unique();
        let topic = format!("mosq/retained/{listener}/{id}");
        run_ok(
            mosquitto("mosquitto_pub", &s, listener, &cert)
                .args(["-t", &topic, "-q", "1", "-r", "-m", "kept"]),
            "mosquitto_pub -r",
            &s,
        );
        // Subscribed after the publish finished: only the retained copy can answer.
        let got = run_ok(
            mosquitto("mosquitto_sub", &s, listener, &cert).args([
                "-t", &topic, "-q", "1", "-C", "1", "-W", "30", "-F", "%r %t %p",
            ]),
            "mosquitto_sub of a retained topic",
            &s,
        );
        assert_eq!(
            got,
            format!("1 {topic} kept\n"),
            "{listener}: retained flag, topic, payload"
        );

        // An empty retained payload deletes it: a later subscriber's first message is a live
        // one published after its SUBACK (a retained copy would have come before it).
        run_ok(
            mosquitto("mosquitto_pub", &s, listener, &cert)
                .args(["-t", &topic, "-q", "1", "-r", "-n"]),
            "mosquitto_pub -r -n",
            &s,
        );
        let sub_id = format!("after-delete-{id}");
        let later = mosquitto("mosquitto_sub", &s, listener, &cert)
            .args([
                "-i", &sub_id, "-t", &topic, "-q", "1", "-C", "1", "-W", "50",
            ])
            .args(["-F", "%r %t %p"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mosquitto_sub");
        wait_subscribed(&s, &sub_id, &topic);
        run_ok(
            mosquitto("mosquitto_pub", &s, listener, &cert)
                .args(["-t", &topic, "-q", "1", "-m", "live"]),
            "mosquitto_pub live",
            &s,
        );
        let after = finish(later, "mosquitto_sub after the delete", CLIENT_TIMEOUT);
        assert_eq!(
            after.stdout,
            format!("0 {topic} live\n"),
            "{listener}: the deleted retained message must not come back"
        );
    }
}

#[test]
fn mosquitto_will_is_published_when_the_publisher_is_killed() {
    require_mosquitto();
    let (s, cert) = start_all_listeners("");
    for listener in ["mqtt", "mqtts"] {
        let id = unique();
        let will_topic = format!("mosq/will/{listener}/{id}");
        let watcher = spawn_sub(
            &s,
            listener,
            &cert,
            &format!("watch-{id}"),
            &will_topic,
            1,
            1,
        );

        // `mosquitto_pub -l` stays connected while its stdin is open.
        let dying_id = format!("dying-{id}");
        let mut dying = mosquitto("mosquitto_pub", &s, listener, &cert)
            .args(["-i", &dying_id, "-l", "-t", &format!("mosq/alive/{id}")])
            .args(["--will-topic", &will_topic, "--will-payload", "gone"])
            .args(["--will-qos", "1", "-k", "60"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_pub -l");
        wait_online(&s, &dying_id);
        dying.kill().expect("kill the will client");
        let _ = dying.wait();

        let got = finish(watcher, "mosquitto_sub of the will topic", CLIENT_TIMEOUT);
        assert_eq!(
            got.stdout,
            format!("1 {will_topic} gone\n"),
            "{listener}: the will after a kill; stderr: {}\nlogs:\n{}",
            got.stderr,
            s.logs()
        );
    }
}

#[test]
fn mqtt_publish_is_read_back_over_http_and_mq2mqtt_reaches_mosquitto_sub() {
    require_mosquitto();
    let (s, cert) = start_all_listeners("");
    create_topic(s.api(), "Parent", 2);
    let id = unique();

    // MQTT → broker: a QoS 1 publish to Parent/x is stored in broker topic Parent.
    let body = format!("from mqtt {id}");
    run_ok(
        mosquitto("mosquitto_pub", &s, "mqtt", &cert).args([
            "-i",
            &format!("pub-{id}"),
            "-t",
            "Parent/x",
            "-q",
            "1",
            "-m",
            &body,
        ]),
        "mosquitto_pub to Parent/x",
        &s,
    );
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 60_000;
    let found = s
        .get(&format!(
            "/v1/topics/Parent/messages?begin_ms=0&end_ms={end}&limit=100"
        ))
        .expect(200);
    let msgs = found["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array in {found}"));
    let m: &Value = msgs
        .iter()
        .find(|m| m["body"] == json!(body))
        .unwrap_or_else(|| panic!("{body:?} not among the stored messages: {found}"));
    assert_eq!(m["topic"], json!("Parent"));
    assert_eq!(m["properties"]["mqttSecondTopic"], json!("/x"), "{m}");

    // Broker → MQTT: an HTTP send tagged MQ2MQTT with mqttSecondTopic reaches Parent/notice/.
    let sub = spawn_sub(
        &s,
        "mqtt",
        &cert,
        &format!("notice-{id}"),
        "Parent/notice/",
        1,
        1,
    );
    let notice = format!("notice {id}");
    let r = s.post_json(
        "/v1/topics/Parent/messages",
        &json!({"tag": "MQ2MQTT", "properties": {"mqttSecondTopic": "/notice/"}, "body": notice}),
    );
    assert!(
        r.status == 200 || r.status == 201,
        "send: {} {}",
        r.status,
        r.text
    );
    let got = finish(sub, "mosquitto_sub of Parent/notice/", CLIENT_TIMEOUT);
    assert_eq!(
        got.stdout,
        format!("1 Parent/notice/ {notice}\n"),
        "stderr: {}\nlogs:\n{}",
        got.stderr,
        s.logs()
    );
}

/// The venv's interpreter with paho-mqtt (`WHARF_MQTT_PYTHON` overrides).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("WHARF_MQTT_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("mqtt-py/.venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: python3 -m venv tests/mqtt-py/.venv && tests/mqtt-py/.venv/bin/pip install \
         -r tests/mqtt-py/requirements.txt (.ci/run does)",
        p.display()
    );
    p
}

/// Runs one paho-mqtt scenario of `tests/mqtt-py/scenarios.py` against one listener.
fn paho(s: &Server, cert: &Cert, scenario: &str, listener: &str) {
    let (host, port) = host_port(s, listener);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mqtt-py/scenarios.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg(scenario)
        .args(["--host", &host, "--port", &port, "--prefix"])
        .arg(format!("py/{}", unique()));
    if listener == "mqtt-ws" || listener == "mqtt-wss" {
        cmd.args(["--transport", "websockets", "--ws-path", "/mqtt"]);
    }
    if listener == "mqtts" || listener == "mqtt-wss" {
        // The certificate names localhost; the listener is bound to 127.0.0.1, also in its SAN.
        cmd.arg("--cafile").arg(cert.cert());
    }
    let out = run_ok(
        &mut cmd,
        &format!("paho-mqtt {scenario} over {listener}"),
        s,
    );
    assert!(out.contains("ok "), "{out}");
}

#[test]
fn paho_qos_1_and_2_round_trips_over_every_listener() {
    let (s, cert) = start_all_listeners("");
    for listener in ["mqtt", "mqtts", "mqtt-ws", "mqtt-wss"] {
        paho(&s, &cert, "roundtrip", listener);
    }
}

#[test]
fn paho_persistent_session_queues_while_offline_over_tcp_tls_and_websocket() {
    let (s, cert) = start_all_listeners("");
    for listener in ["mqtt", "mqtts", "mqtt-ws"] {
        paho(&s, &cert, "offline-queue", listener);
    }
}

/// Runs `tests/mqtt-js/roundtrip.js` against a URL.
fn mqtt_js(s: &Server, cert: &Cert, url: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mqtt-js");
    assert!(
        dir.join("node_modules/mqtt").exists(),
        "MQTT.js missing: (cd tests/mqtt-js && npm ci) (.ci/run does)"
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir).arg("roundtrip.js").arg(url);
    if url.starts_with("wss:") || url.starts_with("mqtts:") {
        cmd.arg(cert.cert());
    }
    let out = run_ok(&mut cmd, &format!("MQTT.js {url}"), s);
    assert!(out.starts_with("ok "), "{out}");
}

#[test]
fn mqtt_js_over_websocket_secure_websocket_tcp_and_tls() {
    let (s, cert) = start_all_listeners("");
    let port = |name: &str| host_port(&s, name).1;
    // The certificate names localhost, so TLS URLs use that name.
    mqtt_js(
        &s,
        &cert,
        &format!("ws://127.0.0.1:{}/mqtt", port("mqtt-ws")),
    );
    mqtt_js(
        &s,
        &cert,
        &format!("wss://localhost:{}/mqtt", port("mqtt-wss")),
    );
    mqtt_js(&s, &cert, &format!("mqtt://127.0.0.1:{}", port("mqtt")));
    mqtt_js(&s, &cert, &format!("mqtts://localhost:{}", port("mqtts")));
}

/// The denied filter itself is refused, while wider filters are granted and simply never see
/// the denied topic (what Mosquitto's ACLs do, and what the Paho interoperability suite needs:
/// its subscribe-failure case wants 0x80 for `test/nosubscribe` while other cases subscribe
/// to `#` and `+/+` on the same broker).
#[test]
fn deny_subscribe_refuses_the_denied_filter_but_not_wider_ones() {
    require_mosquitto();
    let (s, cert) = start_all_listeners("deny_subscribe = [\"test/nosubscribe\"]\n");
    let denied = run(
        mosquitto("mosquitto_sub", &s, "mqtt", &cert).args([
            "-t",
            "test/nosubscribe",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "10",
        ]),
        "mosquitto_sub of the denied filter",
    );
    assert!(
        format!("{}{}", denied.stdout, denied.stderr)
            .contains("All subscription requests were denied"),
        "the denied filter must get SUBACK 0x80: {} {}",
        denied.stdout,
        denied.stderr
    );
    let id = unique();
    let sub_id = format!("wide-{id}");
    let wide = spawn_sub(&s, "mqtt", &cert, &sub_id, "+/+", 1, 1);
    for (topic, body) in [("test/nosubscribe", "hidden"), ("test/open", "shown")] {
        run_ok(
            mosquitto("mosquitto_pub", &s, "mqtt", &cert)
                .args(["-t", topic, "-q", "1", "-m", body]),
            "mosquitto_pub",
            &s,
        );
    }
    let got = finish(wide, "mosquitto_sub +/+", CLIENT_TIMEOUT);
    assert_eq!(got.stdout, "1 test/open shown\n", "stderr: {}", got.stderr);
}

/// The Eclipse Paho MQTT 3.1.1 interoperability suite, every case, against open mode. The suite
/// is on no package registry, so this runs only with a checkout named by
/// `WHARF_PAHO_TESTING=<checkout>/interoperability`:
/// `cargo nextest run -p wharf-e2e --run-ignored only paho_interoperability`.
#[test]
#[ignore = "needs a paho.mqtt.testing checkout (not on any registry) in WHARF_PAHO_TESTING"]
fn paho_interoperability_suite_passes_every_case_in_open_mode() {
    let suite = std::env::var_os("WHARF_PAHO_TESTING")
        .map(PathBuf::from)
        .expect("set WHARF_PAHO_TESTING to the suite's interoperability directory");
    assert!(
        suite.join("client_test.py").is_file(),
        "{} has no client_test.py",
        suite.display()
    );
    let (s, _cert) = start_all_listeners("deny_subscribe = [\"test/nosubscribe\"]\n");
    let (host, port) = host_port(&s, "mqtt");
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("mqtt-py/paho_interop.py");
    let f = run(
        Command::new(python())
            .current_dir(&suite)
            .arg(runner)
            .arg(&suite)
            .args([&host, &port]),
        "the Paho interoperability suite",
    );
    assert!(
        f.ok && f.stderr.contains("Ran 10 tests") && f.stderr.contains("\nOK"),
        "suite failed\nstdout:\n{}\nstderr:\n{}",
        f.stdout,
        f.stderr
    );
}
