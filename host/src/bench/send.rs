//! `wharf bench send`: the broker send path in-process (validate → store append → group commit).
//!
//! C tasks each send one message (or `--batch` messages) at a time and wait for the
//! acknowledgement, like C synchronous producers; with `--flush sync` every acknowledgement means
//! fsynced, so throughput shows how well concurrent appends share fsyncs.
//!
//! With `--postgres`, `--hosts N` opens N brokers on the one database, each with its own pool and
//! writer as N `wharf serve` processes would have, and spreads the senders over them; `--consume`
//! then drains everything sent with clustering consumers on every host (the hosts split the
//! queues through their leases) and prints the consume rate.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;

use super::util::{ScratchDir, create_consumer_group, open_broker, open_broker_on, parse_flush};
use crate::broker::api::BrokerApi;
use crate::broker::consume::{InstanceSpec, Outcome, Subscription};
use crate::broker::{OutgoingMessage, TopicSpec, TopicType};
use crate::store::{Backend, FlushMode, PostgresConfig, StoreConfig};

/// Options of `wharf bench send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Messages to send in all.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Concurrent senders (each waits for its acknowledgement before sending again).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Body size of each message, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages per send call (1 = single sends).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// `sync` (acknowledge after fsync) or `async` (acknowledge after write).
    #[arg(long, default_value = "sync", value_parser = parse_flush)]
    pub flush: FlushMode,
    /// Queues of the bench topic.
    #[arg(long, default_value_t = 8)]
    pub queues: u32,
    /// Store directory; default a fresh `./wharf-bench-<pid>` (on the current disk, since /tmp
    /// is often tmpfs where fsync costs nothing), deleted afterwards.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL: bench the PostgreSQL backend on this (scratch) database instead of the
    /// embedded store, then run pgbench's single-row INSERT rate on the same server.
    #[arg(long)]
    pub postgres: Option<String>,
    /// How long the pgbench comparison runs, in seconds (with --postgres).
    #[arg(long, default_value_t = 10)]
    pub pgbench_secs: u64,
    /// Hosts sharing the PostgreSQL database (with --postgres): senders are spread over them.
    #[arg(long, default_value_t = 1)]
    pub hosts: usize,
    /// Afterwards drain every message sent with clustering consumers, `--instances` per host.
    #[arg(long)]
    pub consume: bool,
    /// Consumer instances per host (with --consume).
    #[arg(long, default_value_t = 4)]
    pub instances: usize,
}

/// Consumer group of `--consume`.
const CONSUME_GROUP: &str = "GID_bench_send";
/// Most messages one receive of `--consume` takes.
const CONSUME_MAX: usize = 256;

/// Latency percentiles of one run, from exact per-operation samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencySummary {
    /// Samples.
    pub count: usize,
    /// Mean (µs).
    pub mean_us: f64,
    /// Median (µs).
    pub p50_us: u32,
    /// 99th percentile (µs).
    pub p99_us: u32,
    /// 99.9th percentile (µs).
    pub p999_us: u32,
    /// Slowest (µs).
    pub max_us: u32,
}

impl LatencySummary {
    /// Summarises microsecond samples (sorts them in place).
    pub fn from_micros(samples: &mut [u32]) -> LatencySummary {
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i]
        };
        LatencySummary {
            count: samples.len(),
            mean_us: samples.iter().map(|&v| v as f64).sum::<f64>() / samples.len() as f64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: samples[samples.len() - 1],
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |us: u32| us as f64 / 1000.0;
        write!(
            f,
            "p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  mean {:.3} ms  (n={})",
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.mean_us / 1000.0,
            self.count
        )
    }
}

/// Sends `total` messages of `body` from `concurrency` tasks (task i through `brokers[i % n]`),
/// `batch` per call, each waiting for its acknowledgement before the next; returns every call's
/// latency (µs).
pub async fn send_concurrently(
    brokers: &[BrokerApi],
    topic: &'static str,
    total: u64,
    concurrency: usize,
    batch: usize,
    body: &Bytes,
) -> anyhow::Result<Vec<u32>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let (broker, next) = (brokers[i % brokers.len()].clone(), next.clone());
        let msgs = bench_messages(body, batch);
        tasks.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::new();
            loop {
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= total {
                    return Ok::<_, crate::error::WharfError>(lat_us);
                }
                let n = (batch as u64).min(total - first) as usize;
                let t = Instant::now();
                broker.send(topic, msgs[..n].to_vec()).await?;
                lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
        }));
    }
    let mut all = Vec::with_capacity((total / batch as u64) as usize + 1);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// `n` tagged messages sharing `body`.
fn bench_messages(body: &Bytes, n: usize) -> Vec<OutgoingMessage> {
    (0..n)
        .map(|_| OutgoingMessage {
            tag: Some("bench".into()),
            body: body.clone(),
            ..OutgoingMessage::default()
        })
        .collect()
}

/// Runs the benchmark.
pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.messages == 0 || args.concurrency == 0 || args.size == 0 || args.batch == 0 {
        bail!("--messages, --concurrency, --size and --batch must be at least 1");
    }
    if args.hosts == 0 || (args.hosts > 1 && args.postgres.is_none()) {
        bail!(
            "--hosts must be at least 1, and more than 1 only with --postgres (hosts share a database, not a data dir)"
        );
    }
    if args.consume && args.instances == 0 {
        bail!("--instances must be at least 1 with --consume");
    }
    let scratch = ScratchDir::new(args.data_dir.as_deref(), "wharf-bench")?;
    let dir = scratch.path();
    let (broker, store, _clock) = match &args.postgres {
        None => open_broker(dir, args.flush).await?,
        Some(url) => open_broker_on(&postgres_config(url, args.flush)).await?,
    };
    let mut hosts = vec![broker.clone()];
    if let Some(url) = &args.postgres {
        for _ in 1..args.hosts {
            hosts.push(open_broker_on(&postgres_config(url, args.flush)).await?.0);
        }
    }
    let topic = "BenchSend";
    if broker.topic(topic).is_err() {
        broker
            .create_topic(TopicSpec {
                name: topic.into(),
                topic_type: TopicType::Normal,
                queues: Some(args.queues),
            })
            .await?;
    }
    for h in &hosts[1..] {
        h.refresh_registry().await?;
    }
    if args.consume {
        prepare_consumers(&hosts, topic, args.instances).await?;
    }
    let body = Bytes::from(vec![b'x'; args.size]);

    // Warm-up: files created, pages touched, tasks scheduled; not measured.
    let warm = (args.messages / 50).clamp(1, 2_000) as usize;
    for _ in 0..warm.div_ceil(args.batch) {
        broker
            .send(topic, bench_messages(&body, args.batch))
            .await?;
    }

    let checkpoints = match &args.postgres {
        Some(url) => Some(super::pgbench::Checkpoints::start(url).await?),
        None => None,
    };
    let before = store.stats();
    let started = Instant::now();
    let mut all = send_concurrently(
        &hosts,
        topic,
        args.messages,
        args.concurrency,
        args.batch,
        &body,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let after = store.stats();
    let checkpoints = match checkpoints {
        Some(c) => Some(c.finish().await?),
        None => None,
    };
    let summary = LatencySummary::from_micros(&mut all);
    let msgs = args.messages as f64;
    let fsyncs = after
        .fsync_latency_us
        .count
        .saturating_sub(before.fsync_latency_us.count);
    let place = match &args.postgres {
        Some(url) => format!("postgres={}", crate::store::postgres::redacted_url(url)),
        None => format!("dir={}", dir.display()),
    };
    println!(
        "bench send: {place} flush={:?} hosts={} messages={} concurrency={} size={} B batch={}",
        args.flush, args.hosts, args.messages, args.concurrency, args.size, args.batch
    );
    println!(
        "  msgs/s {:>10.0}   body MB/s {:>8.1}   elapsed {:.2}s",
        msgs / secs,
        msgs * args.size as f64 / secs / 1e6,
        secs
    );
    println!("  send latency {summary}");
    if let Some(c) = &checkpoints {
        println!("  server {c}");
    }
    if fsyncs > 0 {
        println!(
            "  fsyncs {fsyncs} ({:.0}/s, {:.1} msgs per fsync; fsync p50 ≤ {} µs, p99 ≤ {} µs by bucket)",
            fsyncs as f64 / secs,
            msgs / fsyncs as f64,
            after.fsync_latency_us.quantile(0.5),
            after.fsync_latency_us.quantile(0.99)
        );
    }
    if args.consume {
        let total = (warm.div_ceil(args.batch) * args.batch) as u64 + args.messages;
        let (secs, per_host) = drain(&hosts, args.instances, total).await?;
        let spread: Vec<String> = per_host.iter().map(|n| n.to_string()).collect();
        println!(
            "  consume {:>10.0} msgs/s   ({total} messages settled by {} instances on {} hosts in {secs:.2}s; per host {})",
            total as f64 / secs,
            args.instances * hosts.len(),
            hosts.len(),
            spread.join(" / ")
        );
    }
    for h in hosts.iter().rev() {
        h.shutdown().await?;
    }
    if let Some(url) = &args.postgres {
        let d = std::time::Duration::from_secs(args.pgbench_secs);
        let checkpoints = super::pgbench::Checkpoints::start(url).await?;
        let tps = super::pgbench::insert_rate(url, args.concurrency, args.size, d).await?;
        println!("  pgbench {}", checkpoints.finish().await?);
        println!(
            "  pgbench INSERT on the same server ({} clients, {} B, 1 row per transaction): \
             {tps:.0} rows/s; wharf = {:.0} % of it",
            args.concurrency,
            args.size,
            msgs / secs / tps * 100.0
        );
    }
    Ok(())
}

fn postgres_config(url: &str, flush: FlushMode) -> StoreConfig {
    StoreConfig {
        backend: Backend::Postgres,
        flush,
        postgres: PostgresConfig {
            url: url.to_string(),
            ..PostgresConfig::default()
        },
        ..StoreConfig::default()
    }
}

/// The `--consume` group, created before anything is sent so it starts at the beginning, with
/// `instances` registered consumers on every host.
async fn prepare_consumers(
    hosts: &[BrokerApi],
    topic: &str,
    instances: usize,
) -> anyhow::Result<()> {
    if hosts[0].group(CONSUME_GROUP).is_err() {
        create_consumer_group(&hosts[0], CONSUME_GROUP).await?;
    }
    for (h, broker) in hosts.iter().enumerate() {
        broker.refresh_registry().await?;
        for i in 0..instances {
            broker
                .register_consumer(InstanceSpec {
                    group: CONSUME_GROUP.into(),
                    instance_id: format!("bench-h{h}-{i}"),
                    address: "in-process".into(),
                    pid: Some(std::process::id()),
                    subscriptions: vec![Subscription {
                        topic: topic.into(),
                        expression: "*".into(),
                    }],
                })
                .await?;
        }
    }
    Ok(())
}

/// Receives and commits until `total` messages are settled over all hosts; returns the seconds
/// it took and how many each host settled.
async fn drain(
    hosts: &[BrokerApi],
    instances: usize,
    total: u64,
) -> anyhow::Result<(f64, Vec<u64>)> {
    let settled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (h, broker) in hosts.iter().enumerate() {
        for i in 0..instances {
            let (broker, settled) = (broker.clone(), settled.clone());
            tasks.push((
                h,
                tokio::spawn(async move {
                    let id = format!("bench-h{h}-{i}");
                    let mut mine = 0u64;
                    let mut idle_since = Instant::now();
                    while settled.load(Ordering::Relaxed) < total {
                        let got = broker
                            .receive(CONSUME_GROUP, &id, CONSUME_MAX, Duration::from_millis(50))
                            .await?;
                        if got.is_empty() {
                            if idle_since.elapsed() > Duration::from_secs(30) {
                                bail!(
                                    "consume stalled at {} of {total} messages",
                                    settled.load(Ordering::Relaxed)
                                );
                            }
                            continue;
                        }
                        idle_since = Instant::now();
                        let batch: Vec<_> = got
                            .into_iter()
                            .map(|d| (d.token, Outcome::CommitMessage))
                            .collect();
                        for r in broker.settle_batch(CONSUME_GROUP, &batch).await? {
                            r?;
                            mine += 1;
                            settled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok::<_, anyhow::Error>(mine)
                }),
            ));
        }
    }
    let mut per_host = vec![0u64; hosts.len()];
    for (h, t) in tasks {
        per_host[h] += t.await??;
    }
    Ok((started.elapsed().as_secs_f64(), per_host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact() {
        let mut v: Vec<u32> = (1..=1000).rev().collect();
        let s = LatencySummary::from_micros(&mut v);
        assert_eq!(
            (s.p50_us, s.p99_us, s.p999_us, s.max_us),
            (500, 990, 999, 1000)
        );
        assert_eq!(s.count, 1000);
        assert!((s.mean_us - 500.5).abs() < 1e-9);
        assert_eq!(LatencySummary::from_micros(&mut []).count, 0);
    }
}
