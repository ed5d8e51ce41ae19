//! `wharf bench e2e`: send → receive → settle through the consumption engine, in-process.
//!
//! Three phases over one fresh store (flush per `--flush`, sync by default):
//! 1. throughput: C producers and I clustering instances run together until every message is
//!    settled; prints msgs/s end to end;
//! 2. latency: one producer paced at `--rate` msgs/s; prints send-to-deliver percentiles (the
//!    send timestamp travels in the body's first 8 bytes);
//! 3. timers: inserts `--timers` delayed messages; prints insertions/s and resident memory per
//!    pending timer (VmRSS before and after).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;

use super::send::LatencySummary;
use super::util::{ScratchDir, create_consumer_group, open_broker, parse_flush, rss_bytes};
use crate::broker::api::BrokerApi;
use crate::broker::consume::{InstanceSpec, Outcome, Subscription};
use crate::broker::{OutgoingMessage, TopicSpec, TopicType};
use crate::clock::Clock;
use crate::store::FlushMode;

/// Options of `wharf bench e2e`.
#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    /// Messages in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Concurrent producers in the throughput phase.
    #[arg(long, default_value_t = 64)]
    pub producers: usize,
    /// Messages per send call in the throughput phase.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Clustering consumer instances.
    #[arg(long, default_value_t = 4)]
    pub instances: usize,
    /// Most messages one receive call returns.
    #[arg(long, default_value_t = 256)]
    pub receive_max: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Queues of the bench topic.
    #[arg(long, default_value_t = 8)]
    pub queues: u32,
    /// Paced rate of the latency phase (msgs/s).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 5)]
    pub latency_secs: u64,
    /// Timer messages to insert (use 10000000 for the spec's 10 M).
    #[arg(long, default_value_t = 1_000_000)]
    pub timers: u64,
    /// Earliest deliver time of timer messages, ms ahead of now.
    #[arg(long, default_value_t = 3_600_000)]
    pub timer_min_ahead_ms: u64,
    /// Deliver times are spread over this many ms after the earliest (default ≈ 7 days).
    #[arg(long, default_value_t = 7 * 24 * 3_600_000 - 3_600_000)]
    pub timer_span_ms: u64,
    /// Body size of timer messages, bytes.
    #[arg(long, default_value_t = 64)]
    pub timer_size: usize,
    /// `sync` (acknowledge after fsync) or `async`.
    #[arg(long, default_value = "sync", value_parser = parse_flush)]
    pub flush: FlushMode,
    /// Skip phases: any of `throughput`, `latency`, `timers`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Store directory; default a fresh `./wharf-bench-e2e-<pid>` on the current disk (not /tmp,
    /// often tmpfs where fsync is free), deleted afterwards.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

const TOPIC: &str = "BenchE2e";
const GROUP: &str = "GID_bench_e2e";

/// Runs the benchmark.
pub async fn run(args: E2eArgs) -> anyhow::Result<()> {
    if args.size < 8 || args.instances == 0 || args.producers == 0 || args.batch == 0 {
        bail!("--size must be at least 8; --instances, --producers and --batch at least 1");
    }
    let scratch = ScratchDir::new(args.data_dir.as_deref(), "wharf-bench-e2e")?;
    let dir = scratch.path();
    let (broker, _store, clock) = open_broker(dir, args.flush).await?;
    broker
        .create_topic(TopicSpec {
            name: TOPIC.into(),
            topic_type: TopicType::Normal,
            queues: Some(args.queues),
        })
        .await?;
    create_consumer_group(&broker, GROUP).await?;
    for i in 0..args.instances {
        broker
            .register_consumer(InstanceSpec {
                group: GROUP.into(),
                instance_id: format!("bench-{i}"),
                address: "in-process".into(),
                pid: Some(std::process::id()),
                subscriptions: vec![Subscription {
                    topic: TOPIC.into(),
                    expression: "*".into(),
                }],
            })
            .await?;
    }
    println!(
        "bench e2e: dir={} flush={:?} size={} B queues={} instances={} (clustering)",
        dir.display(),
        args.flush,
        args.size,
        args.queues,
        args.instances
    );
    let skip = |p: &str| args.skip.iter().any(|s| s == p);
    let epoch = Instant::now();
    if !skip("throughput") {
        throughput(&broker, &args, epoch).await?;
    }
    if !skip("latency") {
        latency(&broker, &args, epoch).await?;
    }
    if !skip("timers") {
        timers(&broker, &args, clock.as_ref()).await?;
    }
    broker.shutdown().await?;
    Ok(())
}

/// A body of `size` bytes whose first 8 carry the send time (ns since `epoch`).
fn stamped(size: usize, epoch: Instant) -> Bytes {
    let mut b = vec![b'x'; size];
    let ns = epoch.elapsed().as_nanos() as u64;
    b[..8].copy_from_slice(&ns.to_le_bytes());
    Bytes::from(b)
}

fn age_us(body: &[u8], epoch: Instant) -> u32 {
    let mut t = [0u8; 8];
    t.copy_from_slice(&body[..8]);
    let sent = u64::from_le_bytes(t);
    let now = epoch.elapsed().as_nanos() as u64;
    (now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32
}

/// Consumer instances that settle every message until `target` were settled in total.
fn spawn_consumers(
    broker: &BrokerApi,
    args: &E2eArgs,
    settled: &Arc<AtomicU64>,
    target: u64,
    epoch: Instant,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<Vec<u32>>>> {
    (0..args.instances)
        .map(|i| {
            let (broker, settled) = (broker.clone(), settled.clone());
            let max = args.receive_max;
            tokio::spawn(async move {
                let id = format!("bench-{i}");
                let mut lat = Vec::new();
                while settled.load(Ordering::Relaxed) < target {
                    let got = broker
                        .receive(GROUP, &id, max, Duration::from_millis(20))
                        .await?;
                    for d in &got {
                        lat.push(age_us(&d.message.body, epoch));
                    }
                    let batch: Vec<_> = got
                        .into_iter()
                        .map(|d| (d.token, Outcome::CommitMessage))
                        .collect();
                    for r in broker.settle_batch(GROUP, &batch).await? {
                        r?;
                        settled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(lat)
            })
        })
        .collect()
}

async fn throughput(broker: &BrokerApi, args: &E2eArgs, epoch: Instant) -> anyhow::Result<()> {
    let settled = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let consumers = spawn_consumers(broker, args, &settled, args.messages, epoch);
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        let (broker, next) = (broker.clone(), next.clone());
        let (total, batch, size) = (args.messages, args.batch as u64, args.size);
        producers.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let n = batch.min(total - first);
                let msgs = (0..n)
                    .map(|_| OutgoingMessage {
                        body: stamped(size, epoch),
                        ..OutgoingMessage::default()
                    })
                    .collect();
                broker.send(TOPIC, msgs).await?;
            }
        }));
    }
    for p in producers {
        p.await??;
    }
    let sent_secs = started.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for c in consumers {
        lat.extend(c.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let n = args.messages as f64;
    println!(
        "  throughput: {} msgs sent by {} producers (batch {}) and settled by {} instances",
        args.messages, args.producers, args.batch, args.instances
    );
    println!(
        "    end-to-end {:>9.0} msgs/s  (sending alone took {:.2}s = {:.0} msgs/s; all settled after {:.2}s)",
        n / secs,
        sent_secs,
        n / sent_secs,
        secs
    );
    println!(
        "    send-to-deliver under full load: {}",
        LatencySummary::from_micros(&mut lat)
    );
    Ok(())
}

async fn latency(broker: &BrokerApi, args: &E2eArgs, epoch: Instant) -> anyhow::Result<()> {
    let total = args.rate * args.latency_secs;
    if total == 0 {
        return Ok(());
    }
    let settled = Arc::new(AtomicU64::new(0));
    let consumers = spawn_consumers(broker, args, &settled, total, epoch);
    // One send per slot of 1/rate s; sends run concurrently so a slow fsync does not delay the
    // schedule (that would hide latency: coordinated omission).
    let fsync_before = broker.store_stats().fsync_latency_us;
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut send_lat = Vec::with_capacity(total as usize);
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * args.rate as f64) as u64).min(total);
        while sent < due {
            let broker = broker.clone();
            let size = args.size;
            sends.spawn(async move {
                let m = OutgoingMessage {
                    body: stamped(size, epoch),
                    ..OutgoingMessage::default()
                };
                let t = Instant::now();
                broker.send(TOPIC, vec![m]).await?;
                Ok::<u32, crate::error::WharfError>(
                    t.elapsed().as_micros().min(u32::MAX as u128) as u32
                )
            });
            sent += 1;
        }
        while let Some(r) = sends.try_join_next() {
            send_lat.push(r??);
        }
    }
    while let Some(r) = sends.join_next().await {
        send_lat.push(r??);
    }
    let send_secs = started.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for c in consumers {
        lat.extend(c.await??);
    }
    println!(
        "  latency: {} msgs paced at {} msgs/s (achieved {:.0} msgs/s)",
        total,
        args.rate,
        total as f64 / send_secs
    );
    println!(
        "    send-to-deliver: {}",
        LatencySummary::from_micros(&mut lat)
    );
    println!(
        "    send acknowledgement alone: {}",
        LatencySummary::from_micros(&mut send_lat)
    );
    let fsync = broker.store_stats().fsync_latency_us;
    let mut delta = fsync.clone();
    for (d, b) in delta.buckets.iter_mut().zip(&fsync_before.buckets) {
        *d = d.saturating_sub(*b);
    }
    delta.count = fsync.count.saturating_sub(fsync_before.count);
    delta.sum = fsync.sum.saturating_sub(fsync_before.sum);
    let slow: u64 = crate::metrics::LATENCY_BUCKETS_US
        .iter()
        .zip(&delta.buckets)
        .filter(|(bound, _)| **bound > 25_000)
        .map(|(_, n)| n)
        .sum::<u64>()
        + delta.buckets.last().copied().unwrap_or(0);
    if delta.count > 0 {
        println!(
            "    store fsyncs meanwhile: {} ({:.0}/s), p50 ≤ {} µs, p99 ≤ {} µs, p99.9 ≤ {} µs (bucket bounds); {} took over 25 ms",
            delta.count,
            delta.count as f64 / send_secs,
            delta.quantile(0.5),
            delta.quantile(0.99),
            delta.quantile(0.999),
            slow
        );
    }
    Ok(())
}

async fn timers(broker: &BrokerApi, args: &E2eArgs, clock: &dyn Clock) -> anyhow::Result<()> {
    if args.timers == 0 {
        return Ok(());
    }
    let topic = "BenchTimers";
    broker
        .create_topic(TopicSpec {
            name: topic.into(),
            topic_type: TopicType::Delay,
            queues: Some(args.queues),
        })
        .await?;
    let before_pending = broker.store_stats().pending_timers;
    let rss_before = rss_bytes();
    let body = Bytes::from(vec![b't'; args.timer_size.max(1)]);
    let now = clock.now_ms();
    // By default 1 h .. 7 days ahead, so no timer fires during the run.
    let (ahead, span) = (args.timer_min_ahead_ms, args.timer_span_ms.max(1));
    let next = Arc::new(AtomicU64::new(0));
    let batch = 256u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.producers.min(32) {
        let (broker, next, body) = (broker.clone(), next.clone(), body.clone());
        let total = args.timers;
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let msgs = (first..(first + batch).min(total))
                    .map(|i| OutgoingMessage {
                        body: body.clone(),
                        // A fixed stride scatters deliver times over the span.
                        deliver_at_ms: Some(now + ahead + (i * 7_919_993) % span),
                        ..OutgoingMessage::default()
                    })
                    .collect();
                broker.send(topic, msgs).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let pending = broker.store_stats().pending_timers - before_pending;
    println!(
        "  timers: {} inserted in {:.2}s = {:.0} timers/s (batches of {batch}, body {} B, due {}..{} ms ahead); store reports {} pending",
        args.timers,
        secs,
        args.timers as f64 / secs,
        args.timer_size,
        ahead,
        ahead + span,
        pending
    );
    match (rss_before, rss_after) {
        (Some(b), Some(a)) => println!(
            "    resident memory: {:.1} MiB before, {:.1} MiB after = {:.1} B per pending timer",
            b as f64 / 1048576.0,
            a as f64 / 1048576.0,
            a.saturating_sub(b) as f64 / args.timers as f64
        ),
        _ => println!("    resident memory: /proc/self/status not readable here"),
    }
    Ok(())
}
