//! `wharf bench http`: keep-alive HTTP sends against a running host, one connection per task.
//!
//! Each task owns one HTTP/1.1 connection (hyper's low-level client, so the load generator itself
//! costs as little CPU as possible on a machine it shares with the host) and sends one message per
//! request, waiting for the answer before the next, like a pool of synchronous producers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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
    /// Topic to send to; created (8 queues) if it does not exist.
    #[arg(long, default_value = "BenchHttp")]
    pub topic: String,
}

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
}

/// Runs the benchmark.
pub async fn run(args: HttpArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.size == 0 || args.duration_secs == 0 {
        bail!("--connections, --size and --duration-secs must be at least 1");
    }
    let addr = authority(&args.server)?;
    let path = format!("/v1/topics/{}/messages", args.topic);

    let mut admin = Conn::open(&addr).await?;
    let spec = serde_json::json!({"name": args.topic, "type": "normal", "queues": 8});
    let (status, body) = admin
        .call(
            "POST",
            "/v1/topics",
            Bytes::from(serde_json::to_vec(&spec)?),
        )
        .await?;
    if status != 201 && status != 409 {
        bail!(
            "cannot create topic '{}': HTTP {status} {}",
            args.topic,
            String::from_utf8_lossy(&body)
        );
    }

    // A body of the requested size: JSON-safe filler so no escaping inflates it.
    let payload = Bytes::from(serde_json::to_vec(
        &serde_json::json!({"tag": "bench", "body": "x".repeat(args.size)}),
    )?);

    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut conn = Conn::open(&addr).await?;
        let (path, payload) = (path.clone(), payload.clone());
        let (measuring, done, errors) = (measuring.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 16);
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                match conn.call("POST", &path, payload.clone()).await {
                    Ok((200..=201, _)) => {
                        if measuring.load(Ordering::Relaxed) {
                            lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Ok((status, body)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if errors.load(Ordering::Relaxed) == 1 {
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
    let sends = all.len() as f64;
    let secs = elapsed.as_secs_f64();
    let summary = LatencySummary::from_micros(&mut all);
    println!(
        "bench http: server={} topic={} connections={} size={} B duration={:.1}s",
        args.server, args.topic, args.connections, args.size, secs
    );
    println!(
        "  sends/s {:>10.0}   body MB/s {:>8.1}   errors {}",
        sends / secs,
        sends * args.size as f64 / secs / 1e6,
        errors.load(Ordering::Relaxed)
    );
    println!("  latency {summary}");
    if errors.load(Ordering::Relaxed) > 0 {
        bail!("{} requests failed", errors.load(Ordering::Relaxed));
    }
    Ok(())
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
