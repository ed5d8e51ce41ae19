//! `wharf bench soak`: drives the broker send path (in-process, embedded store) past what it can
//! take and checks that back-pressure refuses the excess cleanly.
//!
//! First a closed-loop probe measures the send capacity (C senders, each waiting for its
//! acknowledgement). Then an open-loop generator offers `--factor` × that rate for
//! `--duration-secs`: every send is issued at its scheduled time whatever happened to earlier
//! ones, so the store's bounded write queue (`[store] write_queue_*`) must refuse with
//! SYSTEM_BUSY rather than queue without limit. Afterwards every accepted id is read back and the
//! topic's queue offsets are counted: `lost` (accepted but not stored) must be 0, and refused
//! sends must have stored nothing. Latency is from each send's scheduled time, so a stalled
//! generator cannot hide queueing (no coordinated omission).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use parking_lot::Mutex;

use super::send::LatencySummary;
use super::util::{ScratchDir, open_broker_on, parse_flush, rss_bytes};
use crate::broker::api::BrokerApi;
use crate::broker::{OutgoingMessage, TopicSpec, TopicType};
use crate::error::ErrorCode;
use crate::model::MessageId;
use crate::store::{FlushMode, StoreConfig};

/// Options of `wharf bench soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// How long the overload runs, in seconds.
    #[arg(long, default_value_t = 60)]
    pub duration_secs: u64,
    /// Offered rate as a multiple of the measured capacity.
    #[arg(long, default_value_t = 4.0)]
    pub factor: f64,
    /// How long the closed-loop capacity probe runs, in seconds.
    #[arg(long, default_value_t = 5)]
    pub probe_secs: u64,
    /// Concurrent senders of the capacity probe: enough that group commit is saturated (with
    /// 64 the store still has headroom, and 4× "capacity" would not overload it).
    #[arg(long, default_value_t = 1024)]
    pub probe_concurrency: usize,
    /// Body size of each message, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// `sync` (acknowledge after fsync) or `async` (acknowledge after write).
    #[arg(long, default_value = "sync", value_parser = parse_flush)]
    pub flush: FlushMode,
    /// Queues of the bench topic.
    #[arg(long, default_value_t = 8)]
    pub queues: u32,
    /// `[store] write_queue_requests` of the bench store (default: the shipped default).
    #[arg(long)]
    pub write_queue_requests: Option<u64>,
    /// `[store] write_queue_bytes` of the bench store (default: the shipped default).
    #[arg(long)]
    pub write_queue_bytes: Option<u64>,
    /// Store directory; default a fresh `./wharf-soak-<pid>` on the current disk, deleted
    /// afterwards.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Sends the generator keeps in flight at most, as a multiple of the write queue's request
/// limit: past it the generator itself is saturated and says so instead of growing without end.
const IN_FLIGHT_PER_QUEUE_SLOT: u64 = 4;

/// What the open-loop phase counted.
#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    busy: AtomicU64,
    other: AtomicU64,
    in_flight: AtomicU64,
    ids: Mutex<Vec<MessageId>>,
    latency_us: Mutex<Vec<u32>>,
    first_other: Mutex<Option<String>>,
}

fn message(body: &Bytes) -> Vec<OutgoingMessage> {
    vec![OutgoingMessage {
        tag: Some("soak".into()),
        body: body.clone(),
        ..OutgoingMessage::default()
    }]
}

/// Closed loop for `secs`: `concurrency` senders each waiting for their acknowledgement.
/// Returns the acknowledged messages.
async fn probe(
    broker: &BrokerApi,
    topic: &'static str,
    concurrency: usize,
    secs: u64,
    body: &Bytes,
) -> anyhow::Result<u64> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (broker, body) = (broker.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                broker.send(topic, message(&body)).await?;
                n += 1;
            }
            Ok::<_, crate::error::WharfError>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

/// Runs the benchmark.
pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    if args.duration_secs == 0 || args.probe_secs == 0 || args.probe_concurrency == 0 {
        bail!("--duration-secs, --probe-secs and --probe-concurrency must be at least 1");
    }
    if !(args.factor.is_finite() && args.factor > 0.0) {
        bail!("--factor must be a positive number, got {}", args.factor);
    }
    if args.size == 0 {
        bail!("--size must be at least 1");
    }
    let scratch = ScratchDir::new(args.data_dir.as_deref(), "wharf-soak")?;
    let defaults = StoreConfig::default();
    let config = StoreConfig {
        data_dir: scratch.path().to_path_buf(),
        flush: args.flush,
        write_queue_requests: args
            .write_queue_requests
            .unwrap_or(defaults.write_queue_requests),
        write_queue_bytes: args.write_queue_bytes.unwrap_or(defaults.write_queue_bytes),
        ..defaults
    };
    let (broker, _store, _clock) = open_broker_on(&config).await?;
    let topic = "BenchSoak";
    broker
        .create_topic(TopicSpec {
            name: topic.into(),
            topic_type: TopicType::Normal,
            queues: Some(args.queues),
        })
        .await?;
    let body = Bytes::from(vec![b's'; args.size]);
    println!(
        "bench soak: dir={} flush={:?} size={} B write_queue_requests={} write_queue_bytes={}",
        scratch.path().display(),
        args.flush,
        args.size,
        config.write_queue_requests,
        config.write_queue_bytes
    );

    let t = Instant::now();
    let probed = probe(
        &broker,
        topic,
        args.probe_concurrency,
        args.probe_secs,
        &body,
    )
    .await?;
    let capacity = probed as f64 / t.elapsed().as_secs_f64();
    println!(
        "  capacity: {capacity:.0} msgs/s ({} closed-loop senders, {} s)",
        args.probe_concurrency, args.probe_secs
    );

    let rate = capacity * args.factor;
    let tally = Arc::new(Tally::default());
    let max_in_flight = config.write_queue_requests * IN_FLIGHT_PER_QUEUE_SLOT;
    let mut issued = 0u64;
    let mut not_offered = 0u64;
    let mut peak_rss = rss_bytes().unwrap_or(0);
    let start = Instant::now();
    let run_for = Duration::from_secs(args.duration_secs);
    // The pacer wakes every millisecond and issues every send that has come due since.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks = 0u64;
    while start.elapsed() < run_for {
        tick.tick().await;
        ticks += 1;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64)
            .min((run_for.as_secs_f64() * rate) as u64);
        while issued < due {
            let scheduled = start + Duration::from_secs_f64(issued as f64 / rate);
            issued += 1;
            if tally.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                not_offered += 1;
                continue;
            }
            tally.in_flight.fetch_add(1, Ordering::Relaxed);
            let (broker, body, tally) = (broker.clone(), body.clone(), tally.clone());
            tokio::spawn(async move {
                match broker.send(topic, message(&body)).await {
                    Ok(r) => {
                        let us = scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        tally.latency_us.lock().push(us);
                        tally.ids.lock().extend(r.iter().map(|r| r.message_id));
                        tally.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.code == ErrorCode::SystemBusy => {
                        tally.busy.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tally.other.fetch_add(1, Ordering::Relaxed);
                        tally.first_other.lock().get_or_insert(e.to_string());
                    }
                }
                tally.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if ticks.is_multiple_of(250) {
            peak_rss = peak_rss.max(rss_bytes().unwrap_or(0));
        }
    }
    let offered_secs = start.elapsed().as_secs_f64();
    // Every issued send is answered; wait for the last answers (bounded by the write queue).
    let drain_until = Instant::now() + Duration::from_secs(60);
    while tally.in_flight.load(Ordering::Relaxed) > 0 {
        if Instant::now() > drain_until {
            bail!(
                "{} sends were still unanswered 60 s after the load stopped",
                tally.in_flight.load(Ordering::Relaxed)
            );
        }
        tick.tick().await;
    }
    peak_rss = peak_rss.max(rss_bytes().unwrap_or(0));

    let accepted = tally.accepted.load(Ordering::Relaxed);
    let busy = tally.busy.load(Ordering::Relaxed);
    let other = tally.other.load(Ordering::Relaxed);
    let ids = std::mem::take(&mut *tally.ids.lock());
    let mut latency = std::mem::take(&mut *tally.latency_us.lock());
    println!(
        "  offered {:.0} msgs/s ({:.1}× capacity) for {offered_secs:.1} s: {issued} sends, \
         {not_offered} not offered (generator at its {max_in_flight} in-flight cap)",
        issued as f64 / offered_secs,
        args.factor
    );
    println!(
        "  accepted {accepted} ({:.0}/s)  refused SYSTEM_BUSY {busy}  other errors {other}",
        accepted as f64 / offered_secs
    );
    if let Some(e) = tally.first_other.lock().as_ref() {
        println!("  first other error: {e}");
    }

    // Read every accepted message back, then count what the queues hold: accepted sends of both
    // phases must all be there, and refused ones must have left nothing behind.
    let mut lost = 0u64;
    for id in &ids {
        if broker.find_message(&id.to_string()).await.is_err() {
            lost += 1;
        }
    }
    let mut stored = 0u64;
    for q in 0..broker.queue_count(topic) {
        let b = broker.queue_bounds(topic, q).await?;
        stored += b.max - b.min;
    }
    let expected = probed + accepted;
    println!(
        "  lost {lost} of {accepted} accepted (each id read back); queues hold {stored} \
         messages, {expected} acknowledged in all"
    );
    println!(
        "  accepted send latency from scheduled time: {}",
        LatencySummary::from_micros(&mut latency)
    );
    println!(
        "  peak resident memory {:.1} MiB",
        peak_rss as f64 / 1048576.0
    );
    broker.shutdown().await?;
    if lost > 0 || other > 0 || stored != expected {
        bail!(
            "soak failed: {lost} lost, {other} unexpected errors, {stored} stored vs {expected} \
             acknowledged"
        );
    }
    Ok(())
}
