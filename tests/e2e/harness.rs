//! Starts the real `wharf` binary on a temp data dir and free ports, and talks to it.
//!
//! Everything here goes through the same doors a user has: the command line, the config file,
//! the HTTP API and signals. Nothing reaches into the host's internals, so these tests check
//! the external contract (/work/shared/contract.md) and nothing else.
//!
//! ```ignore
//! let mut s = Server::start(ServerOpts::with_config("[broker]\nretry_delay_scale = 0.001\n"));
//! create_topic(s.api(), "Trade", 4);
//! let receipt = s.post_json("/v1/topics/Trade/messages", &json!({"body": "hi"})).expect(200);
//! s.get("/v1/topics/Nope").expect_error(404, 17, "TOPIC_NOT_EXIST");
//! let out = s.wharf(&["topic", "list", "--json"]).ok().json();
//! s.kill9();      // crash
//! s.restart();    // same data dir, new port
//! s.stop();       // SIGTERM, asserts exit 0
//! ```

#![allow(dead_code)] // Each test file uses a different subset of the helpers.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use serde_json::Value;

/// How long a server may take from spawn to its `listening` line.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before the test fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request timeout for the HTTP helpers (long polls included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Path to the `wharf` binary: `$WHARF_BIN`, else next to the test executable's `deps/` dir.
pub fn wharf_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WHARF_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/wharf
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("wharf{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "wharf binary not found at {}; build it first with `cargo build -p wharf` \
         (same profile as the tests) or set WHARF_BIN",
        bin.display()
    );
    bin
}

/// A plugin component built by `cargo build --release --target wasm32-wasip2 -p <crate>`:
/// `$WHARF_WASM_DIR/<file>.wasm`, else `<target dir>/wasm32-wasip2/release/<file>.wasm` found from
/// the test executable's location (so a custom `CARGO_TARGET_DIR` works). `crate_name` may use
/// dashes; the file name uses underscores, as cargo writes it.
pub fn wasm_artifact(crate_name: &str) -> PathBuf {
    let file = format!("{}.wasm", crate_name.replace('-', "_"));
    if let Some(dir) = std::env::var_os("WHARF_WASM_DIR") {
        return PathBuf::from(dir).join(file);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/e2e-<hash> → target/
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test executable lives in target/<profile>/deps");
    let p = target.join("wasm32-wasip2/release").join(&file);
    assert!(
        p.exists(),
        "{} not found; build it with `cargo build --release --target wasm32-wasip2 -p {crate_name}` \
         (or set WHARF_WASM_DIR)",
        p.display()
    );
    p
}

/// Polls `f` until it returns `Some` or `timeout` passes; panics naming `what` on timeout.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    /// TOML written to the config file passed with `--config` (sections such as `[store]`,
    /// `[broker]`, `[auth]`, `[plugins]`, `[testing]`).
    pub config: String,
    /// Extra arguments after `serve` (besides `--data-dir`, `--http` and `--config`).
    pub extra_args: Vec<String>,
    /// Extra environment variables for the server process.
    pub env: Vec<(String, String)>,
    /// Deadline for the `wharf: listening http=…` line.
    pub start_timeout: Duration,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            config: String::new(),
            extra_args: Vec::new(),
            env: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }
}

impl ServerOpts {
    /// Options with this config text.
    pub fn with_config(config: impl Into<String>) -> Self {
        ServerOpts {
            config: config.into(),
            ..Default::default()
        }
    }

    /// Appends config text (a new section or keys).
    pub fn config(mut self, more: &str) -> Self {
        self.config.push('\n');
        self.config.push_str(more);
        self.config.push('\n');
        self
    }

    /// Adds an argument to `wharf serve`.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }

    /// Adds an environment variable for the server process.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A running (or stopped) `wharf serve` with its own data dir.
pub struct Server {
    bin: PathBuf,
    opts: ServerOpts,
    data: tempfile::TempDir,
    work: tempfile::TempDir,
    child: Option<Child>,
    listeners: BTreeMap<String, String>,
    logs: Arc<Mutex<String>>,
    api: Api,
    starts: u32,
}

impl Server {
    /// Starts a server with default options.
    pub fn start_default() -> Server {
        Server::start(ServerOpts::default())
    }

    /// Writes the config, spawns `wharf serve` and waits for its HTTP listener.
    pub fn start(opts: ServerOpts) -> Server {
        let data = tempfile::Builder::new()
            .prefix("wharf-data-")
            .tempdir()
            .expect("data tempdir");
        let work = tempfile::Builder::new()
            .prefix("wharf-work-")
            .tempdir()
            .expect("work tempdir");
        let mut s = Server {
            bin: wharf_bin(),
            opts,
            data,
            work,
            child: None,
            listeners: BTreeMap::new(),
            logs: Arc::new(Mutex::new(String::new())),
            api: Api::new(String::new()),
            starts: 0,
        };
        s.spawn();
        s
    }

    fn config_path(&self) -> PathBuf {
        self.work.path().join("wharf.toml")
    }

    /// Starts `wharf serve` with the current options; returns the child and the channel its
    /// `listening` lines arrive on.
    fn launch(&mut self) -> (Child, mpsc::Receiver<(String, String)>) {
        assert!(self.child.is_none(), "server already running");
        std::fs::write(self.config_path(), &self.opts.config).expect("write config");
        self.starts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--http")
            .arg("127.0.0.1:0")
            // Free ports for every listener, so tests can run in parallel.
            .arg("--mqtt")
            .arg("127.0.0.1:0")
            .arg("--remoting")
            .arg("127.0.0.1:0")
            .arg("--config")
            .arg(self.config_path())
            .args(&self.opts.extra_args)
            .env("NO_COLOR", "1")
            .env_remove("WHARF_SERVER")
            .current_dir(self.work.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let (tx, rx) = mpsc::channel::<(String, String)>();
        let start_no = self.starts;
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        drain(
            out,
            self.logs.clone(),
            format!("[{start_no} out] "),
            Some(tx),
        );
        drain(err, self.logs.clone(), format!("[{start_no} err] "), None);
        (child, rx)
    }

    fn spawn(&mut self) {
        let (mut child, rx) = self.launch();
        let deadline = Instant::now() + self.opts.start_timeout;
        self.listeners.clear();
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((name, addr)) => {
                    let is_http = name == "http";
                    self.listeners.insert(name, addr);
                    if is_http {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    panic!(
                        "wharf serve closed stdout before listening (exit {status:?}); logs:\n{}",
                        self.logs()
                    );
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Give the readers a moment to collect the last words for the message.
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "wharf serve exited with {status} before listening; logs:\n{}",
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "wharf serve did not print `wharf: listening http=…` within {:?}; logs:\n{}",
                    self.opts.start_timeout,
                    self.logs()
                );
            }
        }
        // Other listeners print their lines around the same moment; collect what is there.
        while let Ok((name, addr)) = rx.recv_timeout(Duration::from_millis(20)) {
            self.listeners.insert(name, addr);
        }
        self.child = Some(child);
        self.api = Api::new(format!("http://{}", self.listeners["http"]));
    }

    /// `http://ADDR` of the HTTP listener.
    pub fn base_url(&self) -> &str {
        &self.api.base
    }

    /// Full URL for a path such as `/v1/topics`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api.base)
    }

    /// The bound address of a listener by name (`http`, `mqtt`, …), from its `listening` line.
    pub fn listener(&self, name: &str) -> Option<&str> {
        self.listeners.get(name).map(String::as_str)
    }

    /// The data directory (kept across restarts; deleted when the server is dropped).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// A scratch directory beside the config (for plugin manifests and the like).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// Everything the server printed so far (all starts), stdout and stderr interleaved.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The unsigned HTTP client.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// A client that signs every request with this access key.
    pub fn signed(&self, access_key: &str, secret_key: &str) -> Api {
        Api::new(self.api.base.clone()).with_key(access_key, secret_key)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Resp {
        self.api.get(path)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.api.post_json(path, body)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Resp {
        self.api.delete(path)
    }

    /// `POST path` with raw bytes and a content type (for malformed bodies).
    pub fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Resp {
        self.api.request("POST", path, Some(content_type), body)
    }

    /// SIGKILL: no chance to flush; the next `restart` must recover.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for a server that is expected to kill itself (a `WHARF_TEST_CRASH_AT` crash point)
    /// and checks it died of SIGKILL, as a `kill -9` would have killed it.
    pub fn wait_killed(&mut self, timeout: Duration) {
        let c = self.child.take().expect("server not running");
        self.reap_killed(c, timeout);
    }

    /// Starts again with `config` and an armed `WHARF_TEST_CRASH_AT=point` (the host may die
    /// before it even listens, e.g. in the retention pass at open) and waits for its SIGKILL.
    /// The crash point is disarmed again for later starts.
    pub fn restart_until_killed(&mut self, config: impl Into<String>, point: &str) {
        if self.child.is_some() {
            self.stop();
        }
        self.opts.config = config.into();
        self.set_env("WHARF_TEST_CRASH_AT", point);
        let (child, _listening) = self.launch();
        self.remove_env("WHARF_TEST_CRASH_AT");
        self.reap_killed(child, Duration::from_secs(60));
    }

    fn reap_killed(&mut self, mut c: Child, timeout: Duration) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.wait_exit(&mut c, timeout, "to be killed");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "wharf serve exited with {status}, not SIGKILL; logs:\n{}",
            self.logs()
        );
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server not running");
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        self.wait_exit(&mut c, STOP_TIMEOUT, "to exit after SIGTERM")
    }

    /// Waits for `c` to exit; past `timeout` kills it and fails the test, saying what it was
    /// waiting for.
    fn wait_exit(&self, c: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "wharf serve waited {timeout:?} {what} and still ran; logs:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop: SIGTERM, and the contract says exit 0.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "wharf serve exited with {status} after SIGTERM (want 0); logs:\n{}",
            self.logs()
        );
    }

    /// Starts again on the same data dir (stopping gracefully first if still running).
    /// The HTTP port changes; use the new `base_url`.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
    }

    /// Sets an environment variable for the next start (replacing an earlier value).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.remove_env(key);
        self.opts.env.push((key.into(), value.into()));
    }

    /// Drops an environment variable for the next start (e.g. a test-only fault hook).
    pub fn remove_env(&mut self, key: &str) {
        self.opts.env.retain(|(k, _)| k != key);
    }

    /// Restarts with different config text (e.g. a clock offset), same data dir.
    pub fn restart_with_config(&mut self, config: impl Into<String>) {
        if self.child.is_some() {
            self.stop();
        }
        self.opts.config = config.into();
        self.spawn();
    }

    /// Runs the `wharf` CLI against this server (via `WHARF_SERVER`).
    pub fn wharf(&self, args: &[&str]) -> CliOutput {
        self.wharf_with_stdin(args, &[])
    }

    /// Runs the `wharf` CLI with `input` on its standard input (e.g. `wharf send T -`).
    pub fn wharf_with_stdin(&self, args: &[&str], input: &[u8]) -> CliOutput {
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("WHARF_SERVER", &self.api.base)
            .env_remove("WHARF_ACCESS_KEY")
            .env_remove("WHARF_SECRET_KEY")
            .env("NO_COLOR", "1")
            .current_dir(self.work.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run wharf {args:?}: {e}"));
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        // Written from a thread so a CLI that does not read stdin cannot block us.
        let writer = thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&input);
        });
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("run wharf {args:?}: {e}"));
        let _ = writer.join();
        CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!("---- wharf server logs ----\n{}", self.logs());
        }
    }
}

/// Copies a child's output into the shared log; reports `listening` lines on `tx`.
fn drain(
    stream: impl Read + Send + 'static,
    logs: Arc<Mutex<String>>,
    prefix: String,
    tx: Option<mpsc::Sender<(String, String)>>,
) {
    thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some(tx) = &tx {
                for (name, addr) in parse_listening(&line) {
                    let _ = tx.send((name, addr));
                }
            }
            if let Ok(mut l) = logs.lock() {
                l.push_str(&prefix);
                l.push_str(line.trim_end());
                l.push('\n');
            }
        }
    });
}

/// Parses `wharf: listening http=127.0.0.1:1234 [mqtt=…]` into (name, addr) pairs.
fn parse_listening(line: &str) -> Vec<(String, String)> {
    let Some(i) = line.find("wharf: listening ") else {
        return Vec::new();
    };
    line[i + "wharf: listening ".len()..]
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

/// Result of one CLI run.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Asserts exit 0 and returns self.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "wharf CLI failed: stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Stdout parsed as JSON (for `--json`).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "CLI stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Body parsed as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// Raw body text.
    pub text: String,
    /// `Content-Type` header, if any.
    pub content_type: Option<String>,
}

impl Resp {
    /// Asserts the status and returns the JSON body.
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "want HTTP {status}, got {}: {}",
            self.status, self.text
        );
        self.body
    }

    /// Asserts a contract error: status, spec code and name, and a non-empty message.
    pub fn expect_error(&self, status: u16, code: i64, name: &str) {
        assert_eq!(
            self.status, status,
            "want HTTP {status} {name}, got {}: {}",
            self.status, self.text
        );
        let e = &self.body["error"];
        assert_eq!(e["code"], code, "error code in {}", self.text);
        assert_eq!(e["name"], name, "error name in {}", self.text);
        assert!(
            e["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
            "error message must say what to do: {}",
            self.text
        );
    }
}

/// A small blocking HTTP client for the host's JSON API, optionally signing requests.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::blocking::Client,
    key: Option<(String, String)>,
    date_skew: i64,
}

impl Api {
    /// A client for `base` (e.g. `http://127.0.0.1:1234`).
    pub fn new(base: String) -> Api {
        let http = reqwest::blocking::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("reqwest client");
        Api {
            base,
            http,
            key: None,
            date_skew: 0,
        }
    }

    /// Signs every request with this key pair.
    pub fn with_key(mut self, access_key: &str, secret_key: &str) -> Api {
        self.key = Some((access_key.to_string(), secret_key.to_string()));
        self
    }

    /// Shifts the `Date` header by `secs` (to test stale signatures).
    pub fn with_date_skew(mut self, secs: i64) -> Api {
        self.date_skew = secs;
        self
    }

    /// Base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, None, Vec::new())
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        let bytes = serde_json::to_vec(body).expect("encode json");
        self.request("POST", path, Some("application/json"), bytes)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, None, Vec::new())
    }

    /// Any request; signs it when a key is set.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        self.try_request(method, path, content_type, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `POST path` with a JSON body; `Err` when the host does not answer at all (killed).
    pub fn try_post_json(&self, path: &str, body: &Value) -> Result<Resp, String> {
        let bytes = serde_json::to_vec(body).expect("encode JSON");
        self.try_request("POST", path, Some("application/json"), bytes)
    }

    /// [`Api::request`] that returns `Err` instead of panicking when no answer comes.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Resp, String> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(m, format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        if let Some((ak, sk)) = &self.key {
            let when = if self.date_skew >= 0 {
                SystemTime::now() + Duration::from_secs(self.date_skew as u64)
            } else {
                SystemTime::now() - Duration::from_secs(self.date_skew.unsigned_abs())
            };
            let date = httpdate::fmt_http_date(when);
            let md5 = if body.is_empty() {
                String::new()
            } else {
                base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body))
            };
            let sig = sign(
                sk,
                &string_to_sign(method, &md5, content_type.unwrap_or(""), &date, path),
            );
            req = req
                .header("Date", date)
                .header("Authorization", format!("WHARF {ak}:{sig}"));
            if !md5.is_empty() {
                req = req.header("Content-MD5", md5);
            }
        }
        let resp = req
            .body(body)
            .send()
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            body,
            text,
            content_type,
        })
    }
}

/// A throwaway self-signed certificate for `localhost` / `127.0.0.1` (it is its own CA).
pub struct SelfSignedCert {
    dir: tempfile::TempDir,
}

impl SelfSignedCert {
    /// Makes one with `openssl req` in a fresh temp dir (kept while this value lives).
    pub fn new() -> SelfSignedCert {
        SelfSignedCert::make(&[])
    }

    /// The same, marked `CA:FALSE`: rustls (webpki) refuses a CA certificate as the server's
    /// own, so this is the kind an HTTPS host presents to the CLI.
    pub fn leaf() -> SelfSignedCert {
        SelfSignedCert::make(&["-addext", "basicConstraints=critical,CA:FALSE"])
    }

    fn make(extra: &[&str]) -> SelfSignedCert {
        let dir = tempfile::Builder::new()
            .prefix("wharf-tls-")
            .tempdir()
            .expect("cert tempdir");
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ])
            .args(extra)
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .output()
            .unwrap_or_else(|e| {
                panic!("openssl not runnable ({e}); install Debian's `openssl` (.ci/run does)")
            });
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SelfSignedCert { dir }
    }

    /// The certificate (PEM); also the CA file a client trusts.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The private key (PEM).
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}

/// The contract's `StringToSign`.
pub fn string_to_sign(
    method: &str,
    content_md5: &str,
    content_type: &str,
    date: &str,
    path_and_query: &str,
) -> String {
    format!("{method}\n{content_md5}\n{content_type}\n{date}\n{path_and_query}")
}

/// `Base64(HMAC-SHA1(secret, data))`, the contract's signature (also MQTT passwords).
pub fn sign(secret: &str, data: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Creates a topic and asserts 201.
pub fn create_topic(api: &Api, name: &str, queues: u32) -> Value {
    api.post_json(
        "/v1/topics",
        &serde_json::json!({"name": name, "type": "normal", "queues": queues}),
    )
    .expect(201)
}

/// Creates a consumer group and asserts 201.
pub fn create_group(api: &Api, name: &str) -> Value {
    api.post_json(
        "/v1/groups",
        &serde_json::json!({"name": name, "kind": "consumer"}),
    )
    .expect(201)
}

/// Sends one text message and returns its receipt (asserts 200 or 201).
pub fn send_text(api: &Api, topic: &str, body: &str) -> Value {
    let r = api.post_json(
        &format!("/v1/topics/{topic}/messages"),
        &serde_json::json!({"body": body}),
    );
    assert!(
        r.status == 200 || r.status == 201,
        "send failed: {} {}",
        r.status,
        r.text
    );
    r.body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        assert_eq!(
            parse_listening("wharf: listening http=127.0.0.1:4000\n"),
            vec![("http".to_string(), "127.0.0.1:4000".to_string())]
        );
        assert_eq!(
            parse_listening("2026 INFO wharf: listening mqtt=[::1]:1883 tls=0.0.0.0:8883"),
            vec![
                ("mqtt".to_string(), "[::1]:1883".to_string()),
                ("tls".to_string(), "0.0.0.0:8883".to_string())
            ]
        );
        assert!(parse_listening("wharf: starting").is_empty());
    }

    #[test]
    fn signature_matches_known_hmac_sha1() {
        // RFC 2202 test case 2.
        assert_eq!(
            sign("Jefe", "what do ya want for nothing?"),
            base64::engine::general_purpose::STANDARD
                .encode(hex_bytes("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"))
        );
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
