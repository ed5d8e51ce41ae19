//! Hardening, the security part and the HTTP limits (issue 12), against the real binary:
//! signed bodies (`Content-MD5` required), least privilege (`admin` off unless written; plugin
//! HTTP triggers and dead-letter re-sends need the right to publish to the topic), HTTPS with the
//! CLI's `--ca`, secrets kept out of logs, errors and `/metrics`, and the HTTP limits (header
//! and body read timeouts, the long-poll cap, the `wait_ms` maximum).
//!
//! Covered elsewhere and not repeated here: query by id checked before any work
//! (`defects.rs`), the per-listener connection cap (`listener.rs`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::defects::{group, receive, receive_one, send, settle};
use crate::harness::{
    Api, SelfSignedCert, Server, ServerOpts, create_group, create_topic, sign, string_to_sign,
    wait_for,
};
use crate::listener::serve_with_config;
use crate::mqtt::{frame, metric, mqtt_string, wait_eof};

/// `ops` may do everything (admin written out); `app` has no `admin` line, so it may only send
/// to and read `Orders` / `GID_orders`; `grp` may publish only "for the group" (the name of
/// `GID_orders` in allow_publish), which is not a right to any topic.
const KEYS: &str = r#"
[[auth.keys]]
access_key = "AK_ops"
secret_key = "ops-Secret-7Q2x"
allow_publish = ["*"]
allow_subscribe = ["*"]
admin = true

[[auth.keys]]
access_key = "AK_app"
secret_key = "app-Secret-9Zk4"
allow_publish = ["Orders"]
allow_subscribe = ["Orders", "GID_orders"]

[[auth.keys]]
access_key = "AK_grp"
secret_key = "grp-Secret-3Vb8"
allow_publish = ["GID_orders"]
allow_subscribe = ["Orders", "GID_orders"]
"#;

const OPS: (&str, &str) = ("AK_ops", "ops-Secret-7Q2x");
const APP: (&str, &str) = ("AK_app", "app-Secret-9Zk4");
const GRP: (&str, &str) = ("AK_grp", "grp-Secret-3Vb8");

/// Retry back-offs 10,000× shorter, so a nacked message is dead-lettered at once.
const FAST_RETRIES: &str = "[broker]\nretry_delay_scale = 0.0001\n";

/// A request signed correctly but sent without `Content-MD5` (what a hand-written client that
/// skips the header does); returns (status, JSON body).
fn signed_without_md5(s: &Server, key: (&str, &str), path: &str, body: &[u8]) -> (u16, Value) {
    let date = httpdate::fmt_http_date(SystemTime::now());
    let sig = sign(
        key.1,
        &string_to_sign("POST", "", "application/json", &date, path),
    );
    let resp = reqwest::blocking::Client::new()
        .post(s.url(path))
        .header("Content-Type", "application/json")
        .header("Date", date)
        .header("Authorization", format!("WHARF {}:{sig}", key.0))
        .body(body.to_vec())
        .send()
        .expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn stored(api: &Api, topic: &str) -> Vec<Value> {
    api.get(&format!(
        "/v1/topics/{topic}/messages?begin_ms=0&end_ms=99999999999999"
    ))
    .expect(200)["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_signed_request_with_a_body_must_sign_it_with_content_md5() {
    let s = Server::start(ServerOpts::with_config(KEYS));
    let ops = s.signed(OPS.0, OPS.1);
    create_topic(&ops, "Orders", 1);

    let (status, body) = signed_without_md5(
        &s,
        APP,
        "/v1/topics/Orders/messages",
        br#"{"body":"unsigned body"}"#,
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], 16, "{body}");
    assert_eq!(body["error"]["name"], "NO_PERMISSION", "{body}");
    let why = body["error"]["message"].as_str().unwrap_or_default();
    for needed in ["Content-MD5", "Base64", "MD5", "StringToSign"] {
        assert!(
            why.contains(needed),
            "the error says exactly what to send ({needed}): {why}"
        );
    }
    // Admin calls with a body are no exception.
    let (status, _) = signed_without_md5(&s, OPS, "/v1/topics", br#"{"name":"Ledger"}"#);
    assert_eq!(status, 401);
    assert_eq!(ops.get("/v1/topics/Ledger").status, 404, "nothing created");
    assert!(stored(&ops, "Orders").is_empty(), "nothing stored");

    // The same request with Content-MD5 (the harness and the CLI send it) is accepted, and a
    // request without a body needs none.
    let app = s.signed(APP.0, APP.1);
    send(&app, "Orders", "signed body");
    assert_eq!(stored(&app, "Orders").len(), 1);
    let out = s
        .wharf(&[
            "send",
            "Orders",
            "--access-key",
            APP.0,
            "--secret-key",
            APP.1,
            "--json",
            "from the cli",
        ])
        .ok();
    assert!(out.json()["message_id"].is_string(), "{}", out.stdout);
    // On an open host nothing is signed, so nothing changes there.
    let open = Server::start_default();
    create_topic(open.api(), "Orders", 1);
    send(open.api(), "Orders", "open");
}

#[test]
fn keys_get_only_the_rights_they_name_on_every_route() {
    let s = Server::start(ServerOpts::with_config(FAST_RETRIES).config(KEYS));
    let ops = s.signed(OPS.0, OPS.1);
    let app = s.signed(APP.0, APP.1);
    let grp = s.signed(GRP.0, GRP.1);

    // No `admin` line: no admin rights.
    let r = app.post_json("/v1/topics", &json!({"name": "Mine", "queues": 1}));
    r.expect_error(403, 16, "NO_PERMISSION");
    assert!(
        r.text.contains("admin = true"),
        "says what to set: {}",
        r.text
    );
    for topic in ["Orders", "Ledger", "Load"] {
        create_topic(&ops, topic, 1);
    }
    app.delete("/v1/topics/Ledger")
        .expect_error(403, 16, "NO_PERMISSION");

    // Plugin HTTP triggers publish to their route's topic, so they need that right.
    let routes = "\n[[http]]\npath = \"/hooks/orders\"\ntopic = \"Orders\"\n\n\
                  [[http]]\npath = \"/hooks/ledger\"\ntopic = \"Ledger\"\n";
    let manifest = crate::plugins::probe_manifest(&s, "hooks", "1.0.0", routes);
    let out = s.wharf(&[
        "plugin",
        "deploy",
        &manifest.display().to_string(),
        "--access-key",
        APP.0,
        "--secret-key",
        APP.1,
    ]);
    assert_ne!(out.code, 0, "deploying needs admin");
    assert!(out.stderr.contains("NO_PERMISSION"), "{}", out.stderr);
    s.wharf(&[
        "plugin",
        "deploy",
        &manifest.display().to_string(),
        "--access-key",
        OPS.0,
        "--secret-key",
        OPS.1,
    ])
    .ok();
    let r = app.request("POST", "/t/hooks/ledger", Some("text/plain"), b"x".to_vec());
    r.expect_error(403, 16, "NO_PERMISSION");
    assert!(
        r.text.contains("Ledger") && r.text.contains("allow_publish"),
        "{}",
        r.text
    );
    assert!(
        stored(&ops, "Ledger").is_empty(),
        "a refused trigger stores nothing"
    );
    let r = app.request("POST", "/t/hooks/orders", Some("text/plain"), b"y".to_vec());
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(stored(&ops, "Orders").len(), 1);
    assert_eq!(
        s.api()
            .request("POST", "/t/hooks/orders", Some("text/plain"), b"z".to_vec())
            .status,
        401,
        "unsigned triggers are refused on a host with keys"
    );

    // Re-sending a dead letter needs the right to publish to its topic.
    group(&ops, "GID_orders", json!({"max_reconsume_times": 0}));
    receive(&ops, "GID_orders", "Orders", 0);
    let id = send(&ops, "Orders", "will die");
    let m = wait_for("the new message", Duration::from_secs(15), || {
        receive(&ops, "GID_orders", "Orders", 500)
            .into_iter()
            .find(|m| m["message_id"] == id.as_str())
    });
    settle(&ops, "GID_orders", "nack", &m);
    wait_for("the dead letter", Duration::from_secs(10), || {
        ops.get("/v1/groups/GID_orders/dead-letters").expect(200)["messages"]
            .as_array()
            .filter(|a| !a.is_empty())
            .map(|_| ())
    });
    let path = format!("/v1/groups/GID_orders/dead-letters/{id}/resend");
    let r = grp.post_json(&path, &json!({}));
    r.expect_error(403, 16, "NO_PERMISSION");
    assert!(
        r.text.contains("\\\"Orders\\\"") && r.text.contains("allow_publish"),
        "names the topic to add: {}",
        r.text
    );
    let again = app.post_json(&path, &json!({})).expect(200);
    assert_eq!(again["message_id"], id.as_str());
    let back = receive_one(&app, "GID_orders", "Orders");
    assert_eq!(back["message_id"], id.as_str());
}

/// `https://127.0.0.1:PORT` of a server started with TLS.
fn https_url(s: &Server) -> String {
    format!("https://{}", s.listener("http").expect("http listener"))
}

#[test]
fn https_serves_the_cli_that_trusts_the_ca_and_nobody_else() {
    let cert = SelfSignedCert::leaf();
    let tls = format!(
        "[http]\ntls_cert = {:?}\ntls_key = {:?}\n",
        cert.cert().display().to_string(),
        cert.key().display().to_string()
    );
    let s = Server::start(ServerOpts::with_config(tls.clone()).config(KEYS));
    let url = https_url(&s);
    let ca = cert.cert().display().to_string();
    let cli = |args: &[&str], trust: bool| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--server",
            &url,
            "--access-key",
            OPS.0,
            "--secret-key",
            OPS.1,
        ]);
        if trust {
            all.extend(["--ca", &ca]);
        }
        s.wharf(&all)
    };
    cli(&["topic", "create", "Secure", "--queues", "1"], true).ok();
    let sent = cli(&["send", "Secure", "--json", "over tls"], true)
        .ok()
        .json();
    let id = sent["message_id"].as_str().expect("message_id").to_string();
    let got = cli(&["query", "id", &id, "--json"], true).ok().json();
    assert_eq!(got["body"], "over tls");

    // Without --ca the system roots do not know a self-signed certificate.
    let out = cli(&["topic", "list"], false);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("--ca") && out.stderr.contains("certificate"),
        "the error says the certificate is not trusted and what to pass: {}",
        out.stderr
    );
    // Plain HTTP on the HTTPS port is not served.
    let plain = format!("http://{}", s.listener("http").unwrap());
    let out = s.wharf(&["topic", "list", "--server", &plain]);
    assert_ne!(out.code, 0, "plain http must not be served: {}", out.stdout);
    // A --ca that is no certificate is a clear error, before any request.
    let junk = s.work_dir().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let junk = junk.display().to_string();
    let out = s.wharf(&["topic", "list", "--server", &url, "--ca", &junk]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--ca"), "{}", out.stderr);

    // A key file that does not exist stops the host at start, naming the setting.
    let broken = tls.replace(&cert.key().display().to_string(), "/nonexistent/key.pem");
    let (ok, err, _dir) = serve_with_config(&broken);
    assert!(!ok);
    assert!(
        err.contains("tls_key") && err.contains("/nonexistent/key.pem"),
        "{err}"
    );
    // Half a TLS setting is refused when the config loads.
    let (ok, err, _dir) = serve_with_config(&format!(
        "[http]\ntls_cert = {:?}\n",
        cert.cert().display().to_string()
    ));
    assert!(!ok);
    assert!(
        err.contains("bad.toml:2:1") && err.contains("tls_key"),
        "{err}"
    );
}

/// An MQTT 3.1.1 CONNECT with user name and password; returns the CONNACK return code.
fn mqtt_login(addr: &str, client_id: &str, user: &str, password: &str) -> u8 {
    let mut stream = TcpStream::connect(addr).expect("connect mqtt");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.push(4);
    body.push(0x80 | 0x40 | 0x02); // user name, password, clean session
    body.extend_from_slice(&30u16.to_be_bytes());
    mqtt_string(&mut body, client_id.as_bytes());
    mqtt_string(&mut body, user.as_bytes());
    mqtt_string(&mut body, password.as_bytes());
    stream.write_all(&frame(0x10, &body)).unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(&ack[..2], &[0x20, 2], "CONNACK");
    ack[3]
}

#[test]
fn secrets_never_reach_logs_errors_or_metrics() {
    let debug_logs = "[log]\nfilter = \"debug\"\n";
    let mut s = Server::start(ServerOpts::with_config(KEYS).config(debug_logs));
    let ops = s.signed(OPS.0, OPS.1);
    let mut seen = String::new();
    let mut note = |what: &str, text: &str| {
        seen.push_str(what);
        seen.push('\n');
        seen.push_str(text);
        seen.push('\n');
    };
    create_topic(&ops, "Orders", 1);
    ops.post_json("/v1/groups", &json!({"name": "GID_dev", "kind": "mqtt"}))
        .expect(201);
    send(&ops, "Orders", "hello");
    // Every way a request can fail authentication or rights.
    for (what, r) in [
        ("unsigned", s.api().get("/v1/topics")),
        ("wrong secret", s.signed(OPS.0, APP.1).get("/v1/topics")),
        (
            "unknown key",
            s.signed("AK_nobody", OPS.1).get("/v1/topics"),
        ),
        (
            "stale date",
            s.signed(APP.0, APP.1)
                .with_date_skew(-3600)
                .get("/v1/topics"),
        ),
        (
            "no right",
            s.signed(APP.0, APP.1)
                .post_json("/v1/topics/Ledger/messages", &json!({"body": "x"})),
        ),
        (
            "not admin",
            s.signed(GRP.0, GRP.1).delete("/v1/topics/Orders"),
        ),
    ] {
        assert!(r.status >= 400, "{what}: {}", r.text);
        note(what, &r.text);
    }
    let (status, body) = signed_without_md5(&s, APP, "/v1/topics/Orders/messages", b"{}");
    assert_eq!(status, 401);
    note("missing md5", &body.to_string());
    let cli = s.wharf(&[
        "topic",
        "list",
        "--access-key",
        OPS.0,
        "--secret-key",
        "cli-Wrong-Secret-4Tq",
    ]);
    assert_ne!(cli.code, 0);
    note("cli", &format!("{}{}", cli.stdout, cli.stderr));

    // MQTT strict mode: a wrong password, then the right one.
    let mqtt = s.listener("mqtt").expect("mqtt listener").to_string();
    let wrong = sign(APP.1, "GID_dev");
    assert_eq!(mqtt_login(&mqtt, "GID_dev@@@d1", OPS.0, &wrong), 5);
    let right = sign(OPS.1, "GID_dev");
    assert_eq!(mqtt_login(&mqtt, "GID_dev@@@d2", OPS.0, &right), 0);

    let metrics = ops.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metric(&metrics.text, "wharf_http_requests_total{class=\"4xx\"}") > 0);
    note("metrics", &metrics.text);
    s.stop();
    let logs = s.logs();
    assert!(
        logs.contains("DEBUG") && logs.contains("AK_app"),
        "the run logged at debug level, naming access keys: {logs}"
    );
    note("logs", &logs);

    // Config errors and an unreachable database say what is wrong without the secret.
    let (ok, err, _d) = serve_with_config(
        "[[auth.keys]]\naccess_key = \"bad key\"\nsecret_key = \"cfg-Secret-6Wd1\"\n",
    );
    assert!(!ok && err.contains("access_key"), "{err}");
    note("bad key config", &err);
    let (ok, err, _d) = serve_with_config(
        "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://wharf:pg-Secret-2Hn5@127.0.0.1:1/wharf\"\n",
    );
    assert!(!ok, "{err}");
    assert!(err.contains("127.0.0.1:1"), "says which database: {err}");
    note("unreachable database", &err);
    let (ok, err, _d) =
        serve_with_config("[store.postgres]\nurl = \"mysql://wharf:pg-Secret-2Hn5@db/wharf\"\n");
    assert!(!ok && err.contains("PostgreSQL URL"), "{err}");
    note("bad database url", &err);

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in [
        OPS.1,
        APP.1,
        GRP.1,
        "cli-Wrong-Secret-4Tq",
        "cfg-Secret-6Wd1",
        "pg-Secret-2Hn5",
        &right,
        &wrong,
    ] {
        for form in [secret.to_string(), b64(secret)] {
            assert!(
                !seen.contains(&form),
                "secret {form:?} leaked; everything seen:\n{seen}"
            );
        }
    }
}

/// Sends `head` (and `body`) on a raw connection and reads the whole answer until the host
/// closes the connection.
fn raw_exchange(s: &Server, head: &str, body: &[u8]) -> String {
    let mut c = TcpStream::connect(s.listener("http").unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn slow_headers_are_cut_off() {
    let s = Server::start(ServerOpts::with_config(
        "[http]\nheader_read_timeout_ms = 300\n",
    ));
    // Headers that never end: the connection is closed, not held open.
    let mut c = TcpStream::connect(s.listener("http").unwrap()).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n")
        .unwrap();
    assert!(
        wait_eof(&mut c, Duration::from_secs(20)),
        "a client trickling headers must be disconnected"
    );
    // A connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(s.listener("http").unwrap()).unwrap();
    assert!(wait_eof(&mut idle, Duration::from_secs(20)));
    // A prompt request is answered.
    let answer = raw_exchange(
        &s,
        "GET /healthz HTTP/1.1\r\nHost: wharf\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn slow_bodies_many_long_polls_and_long_waits_get_clear_errors() {
    let s = Server::start(ServerOpts::with_config(
        "[http]\nbody_read_timeout_ms = 300\nmax_long_polls = 1\nmax_wait_ms = 5000\n",
    ));
    let api = s.api();
    create_topic(api, "Orders", 1);
    create_group(api, "GID_park");
    create_group(api, "GID_other");

    // A body that stops half way: 408 with a JSON error, the connection closed, nothing created.
    let answer = raw_exchange(
        &s,
        "POST /v1/topics HTTP/1.1\r\nHost: wharf\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n",
        br#"{"name":"Half"#,
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("body_read_timeout_ms") && answer.contains("\"code\":1"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(api.get("/v1/topics/Half").status, 404);

    // wait_ms past the maximum: refused, naming the maximum.
    let r = api.post_json(
        "/v1/groups/GID_other/receive",
        &json!({"topic": "Orders", "wait_ms": 5001}),
    );
    r.expect_error(400, 1, "SYSTEM_ERROR");
    assert!(
        r.text.contains("5000") && r.text.contains("max_wait_ms"),
        "{}",
        r.text
    );

    // One long poll parks; a second one is refused with SYSTEM_BUSY and Retry-After.
    let parked_api = api.clone();
    let parked = thread::spawn(move || {
        parked_api
            .post_json(
                "/v1/groups/GID_park/receive",
                &json!({"topic": "Orders", "wait_ms": 5000, "instance_id": "parked"}),
            )
            .expect(200)
    });
    wait_for("the parked long poll", Duration::from_secs(20), || {
        (metric(&api.get("/metrics").text, "wharf_http_long_polls") == 1).then_some(())
    });
    let busy = reqwest::blocking::Client::new()
        .post(s.url("/v1/groups/GID_other/receive"))
        .header("Content-Type", "application/json")
        .body(r#"{"topic":"Orders","wait_ms":1000,"instance_id":"second"}"#)
        .send()
        .unwrap();
    assert_eq!(busy.status().as_u16(), 503);
    assert_eq!(
        busy.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = busy.json().unwrap();
    assert_eq!(body["error"]["code"], 2, "{body}");
    assert_eq!(body["error"]["name"], "SYSTEM_BUSY", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_long_polls")),
        "{body}"
    );
    // A receive that does not wait is never refused for this.
    api.post_json(
        "/v1/groups/GID_other/receive",
        &json!({"topic": "Orders", "wait_ms": 0, "instance_id": "second"}),
    )
    .expect(200);
    // The parked poll is answered by a new message, and its place is free again.
    send(api, "Orders", "wake up");
    let woke = parked.join().expect("parked poll");
    assert_eq!(woke["messages"][0]["body"], "wake up", "{woke}");
    let m = api.get("/metrics").text;
    assert_eq!(metric(&m, "wharf_http_long_polls"), 0);
    assert_eq!(metric(&m, "wharf_http_long_polls_refused_total"), 1);
    api.post_json(
        "/v1/groups/GID_other/receive",
        &json!({"topic": "Orders", "wait_ms": 100, "instance_id": "second"}),
    )
    .expect(200);
}
