//! `wharf bench remoting`: the RocketMQ remoting protocol against a running host, from Rust.
//!
//! - Sends: for each producer count in `--producers` (default 1, 16, 64), that many synchronous
//!   producers send `--size`-byte messages (SEND_MESSAGE_V2, one at a time, each waiting for its
//!   answer) for `--duration-secs`; prints msgs/s and latency. They share `--connections`
//!   connections (default 1), as the producers of one RocketMQ client process share its one
//!   connection per broker (the Java client's `MQClientInstance`, ali-ons' client): requests
//!   from several producers travel pipelined on it, each matched to its reply by opaque. The
//!   producers and their connections run on one thread of their own, so the client costs the
//!   machine it shares with the host little.
//! - Pull: `--messages` are preloaded into a fresh topic with batch sends, then one pull consumer
//!   per queue drains its queue (PULL_MESSAGE, `--pull-batch` per request) from offset 0; prints
//!   msgs/s.
//! - Fsync limit (`--fsync-dir`, a directory on the host's disk): before each send run, the
//!   bound `flush = "sync"` is judged against — N producers ÷ (one fdatasync of N messages +
//!   one round trip) — from fdatasyncs timed in that directory and no-op round trips timed on
//!   the listener; the run's line then says what share of it the run reached.

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
    /// Connections the producers of a send run share (at most one per producer): 1 is one
    /// client process, as a RocketMQ SDK connects once per broker; N = producers gives each
    /// producer its own.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// A directory on the host's disk: measure the fsync limit of each send run there (for
    /// hosts with `flush = "sync"`).
    #[arg(long)]
    pub fsync_dir: Option<std::path::PathBuf>,
}

/// A request waiting for its reply on a shared connection.
type Waiting = (
    Command,
    tokio::sync::oneshot::Sender<anyhow::Result<Command>>,
);

/// One connection shared by several synchronous producers: a writer task sends whatever
/// requests are queued in one write, a reader task hands each reply to the request with its
/// opaque.
#[derive(Clone)]
struct Shared {
    tx: tokio::sync::mpsc::UnboundedSender<Waiting>,
}

impl Shared {
    async fn connect(addr: &str) -> anyhow::Result<Shared> {
        use std::collections::HashMap;
        use std::sync::Arc;
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the remoting listener {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let pending: Arc<parking_lot::Mutex<HashMap<i32, tokio::sync::oneshot::Sender<_>>>> =
            Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Waiting>();
        let waiting = pending.clone();
        tokio::spawn(async move {
            let mut opaque = 0i32;
            let mut out = Vec::with_capacity(64 * 1024);
            while let Some(first) = rx.recv().await {
                out.clear();
                let mut next = Some(first);
                while let Some((mut cmd, reply)) = next.take() {
                    opaque = opaque.wrapping_add(1);
                    cmd.opaque = opaque;
                    match encode_frame(&cmd, &mut out) {
                        Ok(()) => {
                            waiting.lock().insert(opaque, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                    next = rx.try_recv().ok();
                }
                if wr.write_all(&out).await.is_err() {
                    // The reader sees the close and fails everyone waiting.
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(256 * 1024);
            let why = loop {
                match decode_frame(&buf) {
                    Ok(Some((reply, used))) => {
                        let _ = buf.split_to(used);
                        if let Some(w) = pending.lock().remove(&reply.opaque) {
                            let _ = w.send(Ok(reply));
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => break format!("undecodable reply: {e}"),
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => break "the host closed the connection".to_string(),
                    Ok(_) => {}
                    Err(e) => break format!("reading: {e}"),
                }
            };
            for (_, w) in pending.lock().drain() {
                let _ = w.send(Err(anyhow::anyhow!("{why}")));
            }
        });
        Ok(Shared { tx })
    }

    async fn call(&self, cmd: Command) -> anyhow::Result<Command> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((cmd, tx))
            .map_err(|_| anyhow::anyhow!("the connection is closed"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the connection closed before the reply"))?
    }
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
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let body = Bytes::from(vec![b'x'; args.size]);
    for &n in &args.producers {
        let conns = args.connections.min(n);
        let limit = match &args.fsync_dir {
            Some(dir) => Some(fsync_limit(&args.remoting, dir, n, args.size).await?),
            None => None,
        };
        let measure = Duration::from_secs(args.duration_secs);
        let (addr, queues, run_body) = (args.remoting.clone(), args.queues, body.clone());
        let mut all =
            on_own_thread(move || send_run(addr, topic, n, conns, run_body, queues, measure))
                .await?;
        let rate = all.len() as f64 / measure.as_secs_f64();
        let lat = LatencySummary::from_micros(&mut all);
        println!(
            "remoting send: producers={n} connections={conns} size={} msgs/s={rate:.0} latency {lat}",
            args.size
        );
        if let Some(l) = limit {
            println!(
                "  fsync limit: {n} ÷ (fdatasync of {} B p50 {:.3} ms + round trip p50 {:.3} ms) = {:.0} msgs/s; this run {:.0} % of it",
                n * args.size,
                l.fsync.as_secs_f64() * 1e3,
                l.round_trip.as_secs_f64() * 1e3,
                l.rate,
                rate / l.rate * 100.0
            );
        }
    }
    if args.messages > 0 {
        pull_run(&args, &body).await?;
    }
    Ok(())
}

/// One send run: `n` synchronous producers on `conns` shared connections for `measure` after a
/// warm-up; the latencies, in µs, of the sends inside the measured window.
async fn send_run(
    addr: String,
    topic: &'static str,
    n: usize,
    conns: usize,
    body: Bytes,
    queues: u32,
    measure: Duration,
) -> anyhow::Result<Vec<u32>> {
    let mut shared = Vec::with_capacity(conns);
    for _ in 0..conns {
        shared.push(Shared::connect(&addr).await?);
    }
    let warmup = Duration::from_secs(1);
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::new();
    for p in 0..n {
        let (c, body) = (shared[p % conns].clone(), body.clone());
        tasks.push(tokio::spawn(async move {
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
    Ok(all)
}

/// Runs a client workload on a thread of its own with a single-threaded runtime: its tasks
/// (producers, each connection's reader and writer) hand work to each other without waking
/// threads, so the client's cost per message stays small beside the host it measures on the
/// same machine.
async fn on_own_thread<T, F, Fut>(work: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the bench client runtime")
                .and_then(|rt| rt.block_on(work()));
            let _ = tx.send(r);
        })
        .context("starting the bench client thread")?;
    rx.await.context("the bench client thread failed")?
}

/// What bounds N synchronous producers on a host that fsyncs before it answers.
struct FsyncLimit {
    fsync: Duration,
    round_trip: Duration,
    rate: f64,
}

/// Times fdatasyncs of one round's bytes in `dir` and no-op round trips on the listener.
async fn fsync_limit(
    addr: &str,
    dir: &std::path::Path,
    producers: usize,
    size: usize,
) -> anyhow::Result<FsyncLimit> {
    const SAMPLES: usize = 200;
    let mut c = Client::connect(addr).await?;
    let mut rtts = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let mut cmd = Command::request(codes::GET_ROUTEINFO_BY_TOPIC, 0);
        cmd.set("topic", "BenchRemoting");
        let t = Instant::now();
        c.call(cmd).await?;
        rtts.push(t.elapsed());
    }
    let round = producers * size;
    let path = dir.join(format!("wharf-bench-fsync-{}", std::process::id()));
    let fsyncs = tokio::task::spawn_blocking(move || time_fdatasyncs(&path, round, SAMPLES))
        .await
        .context("the fsync timing thread failed")??;
    let (fsync, round_trip) = (median(fsyncs), median(rtts));
    let rate = producers as f64 / (fsync + round_trip).as_secs_f64();
    Ok(FsyncLimit {
        fsync,
        round_trip,
        rate,
    })
}

/// Writes `round` bytes and fdatasyncs, `samples` times, into a preallocated file (as the
/// store's log overwrites a zero-filled segment); the file is removed afterwards.
fn time_fdatasyncs(
    path: &std::path::Path,
    round: usize,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    use std::io::{Seek, SeekFrom, Write};
    let run = || -> anyhow::Result<Vec<Duration>> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0u8; round.max(1)];
        for _ in 0..samples {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        f.seek(SeekFrom::Start(0))?;
        let data = vec![b'x'; round.max(1)];
        let mut out = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            f.write_all(&data)?;
            f.sync_data()?;
            out.push(t.elapsed());
        }
        Ok(out)
    };
    let r = run();
    let _ = std::fs::remove_file(path);
    r
}

fn median(v: Vec<Duration>) -> Duration {
    let mut us: Vec<u32> = v
        .iter()
        .map(|d| d.as_micros().min(u128::from(u32::MAX)) as u32)
        .collect();
    Duration::from_micros(u64::from(LatencySummary::from_micros(&mut us).p50_us))
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
