//! `wharf bench remoting`: the RocketMQ remoting protocol against a running host, from Rust.
//!
//! - Sends: for each producer count in `--producers` (default 1, 16, 64), that many synchronous
//!   producers, each on its own connection, send `--size`-byte messages (SEND_MESSAGE_V2, one at
//!   a time, waiting for each answer) for `--duration-secs`; prints msgs/s and latency.
//! - Pull: `--messages` are preloaded into a fresh topic with batch sends, then one pull consumer
//!   per queue drains its queue (PULL_MESSAGE, `--pull-batch` per request) from offset 0; prints
//!   msgs/s.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::send::LatencySummary;
use crate::remoting::codec::record::{BatchEntry, decode_records, encode_batch_entry};
use crate::remoting::codec::{Command, decode_frame, encode_frame};
use crate::remoting::codes;

/// Options of `wharf bench remoting`.
#[derive(Debug, clap::Args)]
pub struct RemotingArgs {
    /// Base URL of the running host's HTTP API (topics are created through it).
    #[arg(long, env = "WHARF_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The host's remoting listener.
    #[arg(long, default_value = "127.0.0.1:9876")]
    pub remoting: String,
    /// Producer counts to run, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub producers: Vec<usize>,
    /// Body size of each message, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// How long each send run measures, in seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Queues of the bench topics.
    #[arg(long, default_value_t = 8)]
    pub queues: u32,
    /// Messages preloaded and drained by the pull run (0 skips it).
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Messages per PULL_MESSAGE.
    #[arg(long, default_value_t = 32)]
    pub pull_batch: u32,
}

/// One connection speaking the protocol, one request at a time.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    opaque: i32,
    out: Vec<u8>,
}

impl Client {
    async fn connect(addr: &str) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the remoting listener {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: BytesMut::with_capacity(256 * 1024),
            opaque: 0,
            out: Vec::with_capacity(4096),
        })
    }

    async fn call(&mut self, mut cmd: Command) -> anyhow::Result<Command> {
        self.opaque = self.opaque.wrapping_add(1);
        cmd.opaque = self.opaque;
        self.out.clear();
        encode_frame(&cmd, &mut self.out)?;
        self.stream.write_all(&self.out).await?;
        loop {
            if let Some((reply, used)) = decode_frame(&self.buf)? {
                let _ = self.buf.split_to(used);
                if reply.is_response() && reply.opaque == self.opaque {
                    return Ok(reply);
                }
                continue;
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the host closed the connection");
            }
        }
    }
}

fn send_request(topic: &str, queue: u32, body: &Bytes) -> Command {
    let mut cmd = Command::request(codes::SEND_MESSAGE_V2, 0);
    cmd.set("a", "PID_bench")
        .set("b", topic)
        .set("c", "TBW102")
        .set("d", 4)
        .set("e", queue)
        .set("f", 0)
        .set("g", 0)
        .set("h", 0)
        .set("i", "TAGS\u{1}bench\u{2}")
        .set("j", 0)
        .set("k", false);
    cmd.body = body.clone();
    cmd
}

async fn ensure_topic(server: &str, name: &str, queues: u32) -> anyhow::Result<()> {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/topics", server.trim_end_matches('/')))
        .json(&serde_json::json!({"name": name, "type": "normal", "queues": queues}))
        .send()
        .await
        .with_context(|| format!("creating topic {name} over {server}"))?;
    if !(r.status().is_success() || r.status().as_u16() == 409) {
        bail!("creating topic {name}: HTTP {}", r.status());
    }
    Ok(())
}

/// Runs the bench and prints one line per measurement.
pub async fn run(args: RemotingArgs) -> anyhow::Result<()> {
    let topic = "BenchRemoting";
    ensure_topic(&args.server, topic, args.queues).await?;
    let body = Bytes::from(vec![b'x'; args.size]);
    for &n in &args.producers {
        let measure = Duration::from_secs(args.duration_secs);
        let warmup = Duration::from_secs(1);
        let start = Instant::now() + warmup;
        let end = start + measure;
        let mut tasks = Vec::new();
        for p in 0..n {
            let (addr, body) = (args.remoting.clone(), body.clone());
            let queues = args.queues;
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(&addr).await?;
                let mut lat: Vec<u32> = Vec::new();
                let mut i = p as u32;
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let reply = c.call(send_request(topic, i % queues, &body)).await?;
                    if reply.code != codes::SUCCESS {
                        bail!("send failed: {} {:?}", reply.code, reply.remark);
                    }
                    if t >= start {
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    i = i.wrapping_add(1);
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let rate = all.len() as f64 / measure.as_secs_f64();
        let lat = LatencySummary::from_micros(&mut all);
        println!(
            "remoting send: producers={n} size={} msgs/s={rate:.0} latency {lat}",
            args.size
        );
    }
    if args.messages > 0 {
        pull_run(&args, &body).await?;
    }
    Ok(())
}

async fn pull_run(args: &RemotingArgs, body: &Bytes) -> anyhow::Result<()> {
    let topic = format!("BenchPull{}", std::process::id());
    ensure_topic(&args.server, &topic, args.queues).await?;
    // Preload with batch sends of 64, spread over the queues by several connections.
    let per_queue = args.messages.div_ceil(u64::from(args.queues));
    let mut loaders = Vec::new();
    for q in 0..args.queues {
        let (addr, topic, body) = (args.remoting.clone(), topic.clone(), body.clone());
        loaders.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await?;
            let mut left = per_queue;
            while left > 0 {
                let k = left.min(64);
                let mut batch = Vec::new();
                for _ in 0..k {
                    encode_batch_entry(
                        &BatchEntry {
                            flag: 0,
                            body: &body,
                            properties: b"TAGS\x01bench\x02",
                        },
                        &mut batch,
                    )?;
                }
                let mut cmd = send_request(&topic, q, &Bytes::new());
                cmd.code = codes::SEND_BATCH_MESSAGE;
                cmd.body = Bytes::from(batch);
                let reply = c.call(cmd).await?;
                if reply.code != codes::SUCCESS {
                    bail!("batch send failed: {} {:?}", reply.code, reply.remark);
                }
                left -= k;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for l in loaders {
        l.await??;
    }
    let group = format!("GID_bench_pull{}", std::process::id());
    let r = reqwest::Client::new()
        .post(format!("{}/v1/groups", args.server.trim_end_matches('/')))
        .json(&serde_json::json!({"name": group, "kind": "consumer"}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("creating group {group}: HTTP {}", r.status());
    }
    let started = Instant::now();
    let mut pullers = Vec::new();
    for q in 0..args.queues {
        let (addr, topic, group) = (args.remoting.clone(), topic.clone(), group.clone());
        let batch = args.pull_batch;
        pullers.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await?;
            let (mut offset, mut got) = (0u64, 0u64);
            while got < per_queue {
                let mut cmd = Command::request(codes::PULL_MESSAGE, 0);
                cmd.set("consumerGroup", &group)
                    .set("topic", &topic)
                    .set("queueId", q)
                    .set("queueOffset", offset)
                    .set("maxMsgNums", batch)
                    .set("sysFlag", 4)
                    .set("commitOffset", 0)
                    .set("suspendTimeoutMillis", 1000)
                    .set("subscription", "*")
                    .set("subVersion", 0);
                let reply = c.call(cmd).await?;
                match reply.code {
                    codes::SUCCESS => {
                        got += decode_records(&reply.body)?.len() as u64;
                    }
                    codes::PULL_NOT_FOUND | codes::PULL_RETRY_IMMEDIATELY => {}
                    other => bail!("pull failed: {other} {:?}", reply.remark),
                }
                offset = reply
                    .field("nextBeginOffset")
                    .and_then(|o| o.parse().ok())
                    .unwrap_or(offset);
            }
            Ok::<_, anyhow::Error>(got)
        }));
    }
    let mut total = 0;
    for p in pullers {
        total += p.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "remoting pull: queues={} batch={} messages={total} msgs/s={:.0}",
        args.queues,
        args.pull_batch,
        total as f64 / secs
    );
    Ok(())
}
