//! `wharf bench http`: keep-alive HTTP load against a running host, one connection per task.
//!
//! Each task owns one HTTP/1.1 connection (hyper's low-level client, so the load generator itself
//! costs as little CPU as possible on a machine it shares with the host) and waits for each answer
//! before the next request.
//! - `--mode send`: one message per request, like a pool of synchronous producers; with
//!   `--compare-nginx` the same client then drives a do-nothing nginx for the same time.
//! - `--mode consume`: the HTTP pull consumer; a preloaded backlog is drained with
//!   `receive` (max 32) + `ack` of every receipt.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::nginx::{self, Nginx};
use super::send::LatencySummary;

/// Options of `wharf bench http`.
#[derive(Debug, clap::Args)]
pub struct HttpArgs {
    /// Base URL of the running host.
    #[arg(long, env = "WHARF_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Concurrent keep-alive connections (one sending task each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Body size of each message, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// How long to measure, in seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Warm-up before measuring, in seconds (connections open, caches fill).
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Topic to send to (send mode); created (8 queues) if it does not exist.
    #[arg(long, default_value = "BenchHttp")]
    pub topic: String,
    /// `send`: sends for --duration-secs; `consume`: preload --messages into a fresh topic, then
    /// drain them with receive (max 32) + ack.
    #[arg(long, value_enum, default_value_t = Mode::Send)]
    pub mode: Mode,
    /// Send mode: afterwards start Debian's nginx answering every POST with a fixed receipt,
    /// drive it the same way, and print both rates and their ratio.
    #[arg(long)]
    pub compare_nginx: bool,
    /// Consume mode: messages to preload and drain.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Consume mode: every connection is its own consumer instance (default: all share one, as
    /// HTTP consumers on one host do when they pass no `instance_id`).
    #[arg(long)]
    pub own_instances: bool,
}

/// What `wharf bench http` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Keep-alive sends, one message per request.
    Send,
    /// The HTTP pull consumer: receive (max 32) + ack.
    Consume,
}

/// Messages one consume-mode receive asks for (the target shape).
const RECEIVE_MAX: usize = 32;
/// Messages per preload request (a JSON array).
const PRELOAD_BATCH: u64 = 32;
/// Long-poll wait of consume-mode receives, short so clients notice the end quickly.
const RECEIVE_WAIT_MS: u64 = 100;
/// Consume mode gives up when no ack lands for this long.
const STALL: Duration = Duration::from_secs(10);

/// Host and port of an `http://host:port` URL.
fn authority(server: &str) -> anyhow::Result<String> {
    let rest = server
        .strip_prefix("http://")
        .with_context(|| format!("--server must be an http:// URL, got '{server}'"))?;
    let auth = rest.split('/').next().unwrap_or(rest);
    if auth.is_empty() {
        bail!("--server '{server}' has no host");
    }
    Ok(if auth.contains(':') {
        auth.to_string()
    } else {
        format!("{auth}:80")
    })
}

/// One keep-alive connection.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: &str) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}; is `wharf serve` running?"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped or the host closes it.
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends one request; returns the status and the body.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// POSTs `body`; any answer but 200 is an error naming `what` failed.
    async fn post_ok(&mut self, path: &str, body: Bytes, what: &str) -> anyhow::Result<Bytes> {
        let (status, answer) = self.call("POST", path, body).await?;
        if status != 200 {
            bail!(
                "{what} failed: HTTP {status} {}",
                String::from_utf8_lossy(&answer)
            );
        }
        Ok(answer)
    }
}

/// Runs the benchmark.
pub async fn run(args: HttpArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.size == 0 || args.duration_secs == 0 {
        bail!("--connections, --size and --duration-secs must be at least 1");
    }
    let addr = authority(&args.server)?;
    match args.mode {
        Mode::Send => send(&args, &addr).await,
        Mode::Consume if args.compare_nginx => {
            bail!("--compare-nginx compares sends; use it with --mode send")
        }
        Mode::Consume => consume(&args, &addr).await,
    }
}

/// Creates a topic or group from `spec` at `path`; one that exists already is fine.
async fn create(conn: &mut Conn, path: &str, spec: serde_json::Value) -> anyhow::Result<()> {
    let (status, body) = conn
        .call("POST", path, Bytes::from(serde_json::to_vec(&spec)?))
        .await?;
    if status != 201 && status != 409 {
        bail!(
            "cannot create {spec} at {path}: HTTP {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// One message object of the requested body size: JSON-safe filler, so no escaping inflates it.
fn message_json(size: usize) -> String {
    serde_json::json!({"tag": "bench", "body": "x".repeat(size)}).to_string()
}

/// Figures of one timed send run against one server.
struct SendRun {
    sends: usize,
    secs: f64,
    errors: u64,
    latency: LatencySummary,
}

impl SendRun {
    fn rate(&self) -> f64 {
        self.sends as f64 / self.secs
    }

    fn print(&self, server: &str, size: usize) {
        println!(
            "  {server:<6} sends/s {:>10.0}   body MB/s {:>8.1}   errors {}",
            self.rate(),
            self.sends as f64 * size as f64 / self.secs / 1e6,
            self.errors
        );
        println!("  {:<6} latency {}", "", self.latency);
    }
}

/// Send mode: Wharf, then (with `--compare-nginx`) nginx with the same client and shape.
async fn send(args: &HttpArgs, addr: &str) -> anyhow::Result<()> {
    if args.compare_nginx {
        nginx::check_installed()?;
    }
    let mut admin = Conn::open(addr).await?;
    create(
        &mut admin,
        "/v1/topics",
        serde_json::json!({"name": args.topic, "type": "normal", "queues": 8}),
    )
    .await?;
    drop(admin);
    let path = format!("/v1/topics/{}/messages", args.topic);
    let payload = Bytes::from(message_json(args.size));

    let wharf = timed_sends(addr, &path, &payload, args).await?;
    println!(
        "bench http: server={} topic={} connections={} size={} B duration={:.1}s",
        args.server, args.topic, args.connections, args.size, wharf.secs
    );
    wharf.print("wharf", args.size);
    let mut errors = wharf.errors;
    if args.compare_nginx {
        let connections = args.connections;
        let server = tokio::task::spawn_blocking(move || Nginx::start(connections)).await??;
        let measured = timed_sends(&server.addr(), &path, &payload, args).await;
        // Stopped before looking at the result, so a failed run leaves no nginx behind.
        tokio::task::spawn_blocking(move || server.stop()).await??;
        let nginx = measured?;
        nginx.print("nginx", args.size);
        println!(
            "  wharf / nginx = {:.1} %   (nginx: {}, worker_processes auto, fixed receipt, same client, connections, body and duration)",
            100.0 * wharf.rate() / nginx.rate(),
            nginx::NGINX
        );
        errors += nginx.errors;
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

/// `--connections` tasks POST `payload` to `path` on `addr` for the warm-up, then for
/// `--duration-secs` measured.
async fn timed_sends(
    addr: &str,
    path: &str,
    payload: &Bytes,
    args: &HttpArgs,
) -> anyhow::Result<SendRun> {
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut conn = Conn::open(addr).await?;
        let (path, payload) = (path.to_string(), payload.clone());
        let (measuring, done, errors) = (measuring.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 16);
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                match conn.call("POST", &path, payload.clone()).await {
                    Ok((200..=201, _)) => {
                        if measuring.load(Ordering::Relaxed) {
                            lat_us.push(micros(t));
                        }
                    }
                    Ok((status, body)) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!(
                                "first error: HTTP {status} {}",
                                String::from_utf8_lossy(&body)
                            );
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("connection failed: {e:#}");
                        return lat_us;
                    }
                }
            }
            lat_us
        }));
    }

    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);

    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    Ok(SendRun {
        sends: all.len(),
        secs: elapsed.as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
        latency: LatencySummary::from_micros(&mut all),
    })
}

fn micros(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u32::MAX as u128) as u32
}

/// The part of a receive answer the bench needs.
#[derive(Debug, Deserialize)]
struct ReceiveAnswer {
    messages: Vec<ReceivedReceipt>,
}

/// One received message, reduced to its receipt.
#[derive(Debug, Deserialize)]
struct ReceivedReceipt {
    receipt: String,
}

/// Answer to an ack.
#[derive(Debug, Deserialize)]
struct AckAnswer {
    settled: u64,
}

/// Body of a consume-mode receive.
fn receive_body(topic: &str, instance: &str, wait_ms: u64) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "topic": topic,
            "max": RECEIVE_MAX,
            "wait_ms": wait_ms,
            "instance_id": instance,
        })
        .to_string(),
    )
}

/// Consume mode: a fresh topic and group, preload, drain, then delete both.
async fn consume(args: &HttpArgs, addr: &str) -> anyhow::Result<()> {
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let pid = std::process::id();
    // Fresh names per run: the drain then reads exactly the preloaded backlog (a new group on an
    // older topic would start from that topic's earliest message).
    let topic = format!("BenchHttpConsume-{pid}");
    let group = format!("GID_bench_consume_{pid}");
    let mut admin = Conn::open(addr).await?;
    create(
        &mut admin,
        "/v1/topics",
        serde_json::json!({"name": topic, "type": "normal", "queues": 8}),
    )
    .await?;
    create(
        &mut admin,
        "/v1/groups",
        serde_json::json!({"name": group, "kind": "consumer"}),
    )
    .await?;
    drop(admin);
    let result = drain(args, addr, &topic, &group).await;
    // A fresh connection: the admin one may have idled out during a long run.
    let mut admin = Conn::open(addr).await?;
    for path in [format!("/v1/groups/{group}"), format!("/v1/topics/{topic}")] {
        match admin.call("DELETE", &path, Bytes::new()).await {
            Ok((200..=204, _)) => {}
            Ok((status, body)) => eprintln!(
                "warning: could not clean up: DELETE {path}: HTTP {status} {}",
                String::from_utf8_lossy(&body)
            ),
            Err(e) => eprintln!("warning: could not clean up: DELETE {path}: {e:#}"),
        }
    }
    result
}

/// What one draining client saw.
#[derive(Default)]
struct DrainStats {
    receive_us: Vec<u32>,
    ack_us: Vec<u32>,
    empty: u64,
}

/// Shared progress of the draining clients.
struct Progress {
    total: u64,
    started: Instant,
    acked: AtomicU64,
    /// ms after `started` of the latest ack.
    last_ack_ms: AtomicU64,
    /// ns after `started` when the last message was acked; 0 until then.
    finished_ns: AtomicU64,
    failed: AtomicBool,
}

impl Progress {
    fn running(&self) -> bool {
        self.acked.load(Ordering::Acquire) < self.total && !self.failed.load(Ordering::Relaxed)
    }

    fn record_ack(&self, n: u64) {
        let now = self.started.elapsed();
        self.last_ack_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
        if self.acked.fetch_add(n, Ordering::AcqRel) + n >= self.total {
            let ns = (now.as_nanos() as u64).max(1);
            let _ = self
                .finished_ns
                .compare_exchange(0, ns, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn stalled(&self) -> bool {
        let last = Duration::from_millis(self.last_ack_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) > STALL
    }
}

async fn drain(args: &HttpArgs, addr: &str, topic: &str, group: &str) -> anyhow::Result<()> {
    let pid = std::process::id();
    let receive_path = format!("/v1/groups/{group}/receive");
    // Every instance joins while the topic is still empty, so queues are balanced once and not
    // while draining (a rebalance mid-drain would invalidate receipts in flight).
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let instance = if args.own_instances {
            format!("bench-{pid}-{i}")
        } else {
            format!("bench-{pid}")
        };
        let mut conn = Conn::open(addr).await?;
        conn.post_ok(&receive_path, receive_body(topic, &instance, 0), "receive")
            .await?;
        conns.push((conn, instance));
    }

    let preload_started = Instant::now();
    let conns = preload(conns, args, topic).await?;
    let preload_secs = preload_started.elapsed().as_secs_f64();

    let progress = Arc::new(Progress {
        total: args.messages,
        started: Instant::now(),
        acked: AtomicU64::new(0),
        last_ack_ms: AtomicU64::new(0),
        finished_ns: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });
    let mut tasks = Vec::with_capacity(conns.len());
    for (mut conn, instance) in conns {
        let progress = progress.clone();
        let (topic, group) = (topic.to_string(), group.to_string());
        tasks.push(tokio::spawn(async move {
            let r = drain_one(&mut conn, &topic, &group, &instance, &progress).await;
            if r.is_err() {
                progress.failed.store(true, Ordering::Relaxed);
            }
            r
        }));
    }
    let mut stats = DrainStats::default();
    let mut first_err = None;
    for t in tasks {
        match t.await? {
            Ok(s) => {
                stats.receive_us.extend(s.receive_us);
                stats.ack_us.extend(s.ack_us);
                stats.empty += s.empty;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.context(format!(
            "drained {} of {} messages",
            progress.acked.load(Ordering::Acquire),
            args.messages
        )));
    }
    let secs = progress.finished_ns.load(Ordering::Acquire) as f64 / 1e9;
    let n = args.messages as f64;
    let receives = stats.receive_us.len();
    let instances = if args.own_instances {
        format!("{} (one per connection)", args.connections)
    } else {
        "1 (shared by every connection)".into()
    };
    println!(
        "bench http consume: server={} topic={topic} group={group} connections={} instances={instances} size={} B receive max={RECEIVE_MAX}",
        args.server, args.connections, args.size
    );
    println!(
        "  preload  {:>10.0} msgs/s   ({} msgs in {preload_secs:.2}s, batches of {PRELOAD_BATCH})",
        n / preload_secs,
        args.messages
    );
    println!(
        "  drain    {:>10.0} msgs/s   ({} msgs received and acked in {secs:.2}s; {receives} receives, {:.1} msgs per receive, {} empty)",
        n / secs,
        args.messages,
        n / receives.max(1) as f64,
        stats.empty
    );
    println!(
        "  receive latency {}",
        LatencySummary::from_micros(&mut stats.receive_us)
    );
    println!(
        "  ack latency     {}",
        LatencySummary::from_micros(&mut stats.ack_us)
    );
    Ok(())
}

/// Sends `--messages` to `topic` in batches over the given connections, all at once; hands the
/// connections back.
async fn preload(
    conns: Vec<(Conn, String)>,
    args: &HttpArgs,
    topic: &str,
) -> anyhow::Result<Vec<(Conn, String)>> {
    let path = format!("/v1/topics/{topic}/messages");
    let one = message_json(args.size);
    let batch_of = |n: u64| Bytes::from(format!("[{}]", vec![one.as_str(); n as usize].join(",")));
    let full = batch_of(PRELOAD_BATCH);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns.len());
    for (mut conn, instance) in conns {
        let (path, next, total) = (path.clone(), next.clone(), args.messages);
        let (full, last) = (full.clone(), batch_of(total % PRELOAD_BATCH));
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(PRELOAD_BATCH, Ordering::Relaxed);
                if first >= total {
                    return Ok::<_, anyhow::Error>((conn, instance));
                }
                let body = if total - first >= PRELOAD_BATCH {
                    full.clone()
                } else {
                    last.clone()
                };
                conn.post_ok(&path, body, "preload send").await?;
            }
        }));
    }
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        back.push(t.await??);
    }
    Ok(back)
}

/// One client: receive (max 32) → ack every receipt, until the backlog is drained.
async fn drain_one(
    conn: &mut Conn,
    topic: &str,
    group: &str,
    instance: &str,
    progress: &Progress,
) -> anyhow::Result<DrainStats> {
    let receive_path = format!("/v1/groups/{group}/receive");
    let ack_path = format!("/v1/groups/{group}/ack");
    let receive = receive_body(topic, instance, RECEIVE_WAIT_MS);
    let mut stats = DrainStats::default();
    while progress.running() {
        let t = Instant::now();
        let body = conn
            .post_ok(&receive_path, receive.clone(), "receive")
            .await?;
        let got: ReceiveAnswer =
            serde_json::from_slice(&body).context("read the answer to a receive")?;
        if got.messages.is_empty() {
            stats.empty += 1;
            if progress.stalled() {
                bail!("no message was acked for {STALL:?}");
            }
            continue;
        }
        stats.receive_us.push(micros(t));
        let n = got.messages.len() as u64;
        let receipts: Vec<String> = got.messages.into_iter().map(|m| m.receipt).collect();
        let ack = Bytes::from(serde_json::to_vec(
            &serde_json::json!({ "receipts": receipts }),
        )?);
        let t = Instant::now();
        let body = conn.post_ok(&ack_path, ack, "ack").await?;
        let settled: AckAnswer =
            serde_json::from_slice(&body).context("read the answer to an ack")?;
        if settled.settled != n {
            bail!(
                "acked {n} receipts but the host settled {}",
                settled.settled
            );
        }
        stats.ack_us.push(micros(t));
        progress.record_ack(n);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_from_url() {
        assert_eq!(
            authority("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(authority("http://localhost/").unwrap(), "localhost:80");
        assert!(authority("https://x").is_err());
        assert!(authority("http://").is_err());
    }
}
