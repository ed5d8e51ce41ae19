//! The shared listener (keep-alive, client address, connection cap, graceful stop with a parked
//! long poll) and config validation, against the real binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Api, Server, ServerOpts, create_group, create_topic, wait_for, wharf_bin};

/// Runs `wharf serve --config <text>` in a temp dir; returns (success, stderr) once it exits.
pub(crate) fn serve_with_config(text: &str) -> (bool, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(wharf_bin())
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http", "127.0.0.1:0", "--mqtt", "", "--remoting", ""])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), err, dir)
}

/// Asserts the host refused `text`, naming `bad.toml:LINE:COL` and `key`, and wrote nothing.
fn assert_refused(text: &str, line: usize, col: usize, key: &str) -> String {
    let (ok, err, dir) = serve_with_config(text);
    assert!(
        !ok,
        "the host must refuse this config:\n{text}\nstderr: {err}"
    );
    let at = format!("bad.toml:{line}:{col}: ");
    assert!(
        err.contains(&at) && err.contains(key),
        "want {at}… naming {key}; stderr: {err}"
    );
    assert!(
        !Path::new(&dir.path().join("data").join("log")).exists(),
        "nothing is written before the config is valid"
    );
    err
}

#[test]
fn out_of_range_config_is_refused_with_file_line_and_column() {
    // Before, this started and then no receive ever handed out a message.
    let err = assert_refused(
        "[http]\nmax_wait_ms = 1000\n\n[broker]\ndefault_queues = 4\nmax_in_flight_messages = 0\n",
        6,
        1,
        "broker.max_in_flight_messages",
    );
    assert!(err.contains("allowed 1..="), "says what is allowed: {err}");
    assert_refused(
        "[http]\nmax_connections = 0\n",
        2,
        1,
        "http.max_connections",
    );
}

#[test]
fn a_bad_value_in_the_second_auth_key_points_into_the_second_entry() {
    let text = r#"[[auth.keys]]
access_key = "AK_FIRST"
secret_key = "first-secret"
allow_subscribe = ["Trade"]

[[auth.keys]]
access_key = "AK_SECOND"
secret_key = "second-secret"
allow_subscribe = ["Trade", "not a name"]
"#;
    let err = assert_refused(text, 9, 29, "allow_subscribe");
    assert!(err.contains("entry 2"), "{err}");
    // Same key name in both entries: the text scan used to find the first one.
    let dup = text.replace("AK_SECOND", "AK_FIRST");
    let err = assert_refused(&dup, 7, 1, "access_key");
    assert!(err.contains("already used by entry 1"), "{err}");
}

#[test]
fn an_unknown_key_is_refused_with_file_line_and_column() {
    let err = assert_refused(
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_conections = 5\n",
        3,
        1,
        "max_conections",
    );
    assert!(err.contains("max_connections"), "lists the keys: {err}");
}

/// Sends a `GET` on `stream` and reads one response; returns (status, body).
fn get(stream: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: wharf\r\n\r\n")?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn connect(s: &Server) -> TcpStream {
    TcpStream::connect(s.listener("http").unwrap()).unwrap()
}

#[test]
fn keep_alive_connections_serve_many_requests_and_see_the_client_address() {
    let s = Server::start_default();
    let mut c = connect(&s);
    for _ in 0..3 {
        assert_eq!(get(&mut c, "/healthz").unwrap().0, 200);
    }
    // Handlers still get the peer address: the default instance id is built from it.
    create_topic(s.api(), "Addr", 1);
    create_group(s.api(), "GID_addr");
    let r = s
        .post_json(
            "/v1/groups/GID_addr/receive",
            &json!({"topic": "Addr", "wait_ms": 0}),
        )
        .expect(200);
    assert_eq!(r["instance_id"], "http@127.0.0.1", "{r}");
}

#[test]
fn past_max_connections_a_client_waits_until_a_connection_closes() {
    let s = Server::start(ServerOpts::with_config("[http]\nmax_connections = 1\n"));
    let mut a = connect(&s);
    assert_eq!(get(&mut a, "/healthz").unwrap().0, 200);
    // `a` is idle but open, so it holds the only place; `b` is queued, not refused.
    let mut b = connect(&s);
    b.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let early = get(&mut b, "/healthz");
    assert!(
        early.is_err(),
        "a second connection was answered past max_connections = 1: {early:?}"
    );
    wait_for("the cap warning", Duration::from_secs(10), || {
        s.logs().contains("connection cap reached").then_some(())
    });
    drop(a);
    b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The request was written already; only the answer was outstanding.
    let mut rest = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&rest).contains("\r\n\r\n") {
        let n = b.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed without an answer");
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

#[test]
fn sigterm_ends_a_parked_long_poll_and_exits_zero() {
    let mut s = Server::start_default();
    create_topic(s.api(), "Park", 1);
    create_group(s.api(), "GID_park");
    let api = Api::new(s.base_url().to_string());
    // Longer than the 10 s grace: if shutdown did not cut it short, it would be cut off unanswered.
    let poll = thread::spawn(move || {
        api.post_json(
            "/v1/groups/GID_park/receive",
            &json!({"topic": "Park", "wait_ms": 25000, "instance_id": "parked"}),
        )
    });
    wait_for("the long poll to register", Duration::from_secs(10), || {
        let st = s.get("/v1/groups/GID_park/status").body;
        let ids: Vec<Value> = st["instances"]
            .as_array()
            .map(|a| a.iter().map(|i| i["instance_id"].clone()).collect())
            .unwrap_or_default();
        ids.contains(&json!("parked")).then_some(())
    });
    s.stop();
    let r = poll
        .join()
        .expect("the long poll got an answer")
        .expect(200);
    assert_eq!(r["messages"], json!([]), "{r}");
    let logs = s.logs();
    assert!(
        !logs.contains("did not finish in time"),
        "the long poll ended at once instead of running into the grace period:\n{logs}"
    );
    assert!(
        logs.contains("broker stopped; store flushed; bye"),
        "{logs}"
    );
}
