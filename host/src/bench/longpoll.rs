//! `wharf bench longpoll`: does a crowd of parked long polls on other queues slow sends down?
//!
//! In-process over a fresh store: C concurrent senders send M messages to one topic with no long
//! polls parked, then again with N long polls parked on the queues of another, empty topic (the
//! queue-level pull a self-balancing client uses, with a wait longer than the run). A waiter that
//! is woken for data it does not care about costs the senders CPU; per-queue wake-ups make that
//! cost vanish. At the end every waiter must still be parked.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use tokio::sync::Notify;

use super::send::{LatencySummary, send_concurrently};
use super::util::{ScratchDir, create_consumer_group, open_broker, parse_flush};
use crate::broker::api::BrokerApi;
use crate::broker::specs::MAX_QUEUES;
use crate::broker::{TopicSpec, TopicType};
use crate::store::FlushMode;

/// Options of `wharf bench longpoll`.
#[derive(Debug, clap::Args)]
pub struct LongpollArgs {
    /// Messages sent in each of the two measured phases.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Concurrent senders (each waits for its acknowledgement before sending again).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Body size of each message, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Long polls parked on the other topic's queues during the second phase.
    #[arg(long, default_value_t = 10_000)]
    pub waiters: usize,
    /// `async` by default: the target is the CPU that waking waiters costs, and with `sync` the
    /// shared disk's fsync times vary by more than 2× between runs, hiding a 10 % difference.
    #[arg(long, default_value = "async", value_parser = parse_flush)]
    pub flush: FlushMode,
    /// Store directory; default a fresh `./wharf-bench-longpoll-<pid>` on the current disk,
    /// deleted afterwards.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

const SEND_TOPIC: &str = "BenchLongpollSend";
const IDLE_TOPIC: &str = "BenchLongpollIdle";
const GROUP: &str = "GID_bench_longpoll";
/// Queues of the send topic (as `wharf bench send`).
const SEND_QUEUES: u32 = 8;
/// Longer than any run: a waiter that returns was woken for good, not timed out.
const PARK_WAIT: Duration = Duration::from_secs(24 * 3600);
/// How long parking every waiter may take before the bench gives up.
const PARK_TIMEOUT: Duration = Duration::from_secs(120);

/// One parked long poll on `queue_id` of the idle topic: the only place the bench waits, so
/// switching to another wait API changes this function alone. Returns the messages it got.
async fn park(broker: &BrokerApi, queue_id: u32) -> crate::error::Result<usize> {
    let deadline = tokio::time::Instant::now() + PARK_WAIT;
    let arrived = broker.wait_queue(IDLE_TOPIC, queue_id, 0, deadline).await;
    Ok(usize::from(arrived))
}

/// Runs the benchmark.
pub async fn run(args: LongpollArgs) -> anyhow::Result<()> {
    if args.messages == 0 || args.concurrency == 0 || args.size == 0 {
        bail!("--messages, --concurrency and --size must be at least 1");
    }
    let scratch = ScratchDir::new(args.data_dir.as_deref(), "wharf-bench-longpoll")?;
    let dir = scratch.path();
    let (broker, _store, _clock) = open_broker(dir, args.flush).await?;
    for (name, queues) in [(SEND_TOPIC, SEND_QUEUES), (IDLE_TOPIC, MAX_QUEUES)] {
        broker
            .create_topic(TopicSpec {
                name: name.into(),
                topic_type: TopicType::Normal,
                queues: Some(queues),
            })
            .await?;
    }
    create_consumer_group(&broker, GROUP).await?;
    let body = Bytes::from(vec![b'x'; args.size]);

    // Warm-up: files created, pages touched, tasks scheduled; not measured.
    let warm = (args.messages / 50).clamp(1, 2_000);
    send_concurrently(
        std::slice::from_ref(&broker),
        SEND_TOPIC,
        warm,
        args.concurrency,
        1,
        &body,
    )
    .await?;

    let (none_secs, mut none_lat) = timed(&broker, &args, &body).await?;

    let parked = Arc::new(AtomicUsize::new(0));
    let all_parked = Arc::new(Notify::new());
    let waiters: Vec<_> = (0..args.waiters)
        .map(|i| {
            let (broker, parked, all_parked) = (broker.clone(), parked.clone(), all_parked.clone());
            let total = args.waiters;
            let queue_id = i as u32 % MAX_QUEUES;
            tokio::spawn(async move {
                let on_park = || {
                    if parked.fetch_add(1, Ordering::AcqRel) + 1 == total {
                        all_parked.notify_one();
                    }
                };
                first_pending(park(&broker, queue_id), on_park).await
            })
        })
        .collect();
    if args.waiters > 0
        && tokio::time::timeout(PARK_TIMEOUT, all_parked.notified())
            .await
            .is_err()
    {
        bail!(
            "only {} of {} waiters parked within {PARK_TIMEOUT:?}",
            parked.load(Ordering::Acquire),
            args.waiters
        );
    }

    let (with_secs, mut with_lat) = timed(&broker, &args, &body).await?;
    let still_parked = waiters.iter().filter(|w| !w.is_finished()).count();

    let rate = |secs: f64| args.messages as f64 / secs;
    println!(
        "bench longpoll: dir={} flush={:?} messages={} per phase, concurrency={} size={} B; waiters on {MAX_QUEUES} queues of {IDLE_TOPIC}",
        dir.display(),
        args.flush,
        args.messages,
        args.concurrency,
        args.size
    );
    println!(
        "  {:>14}  {:>10}  {:>10}  {:>10}",
        "parked waiters", "msgs/s", "send p50", "send p99"
    );
    for (waiting, secs, lat) in [
        (0, none_secs, &mut none_lat),
        (args.waiters, with_secs, &mut with_lat),
    ] {
        let s = LatencySummary::from_micros(lat);
        println!(
            "  {waiting:>14}  {:>10.0}  {:>7.3} ms  {:>7.3} ms",
            rate(secs),
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0
        );
    }
    println!(
        "  with / without waiters = {:.1} %; {still_parked} of {} waiters still parked at the end",
        100.0 * none_secs / with_secs,
        args.waiters
    );

    // Stopping the broker ends every long poll.
    broker.shutdown().await?;
    let mut woken_with_messages = 0usize;
    for w in waiters {
        if w.await?? > 0 {
            woken_with_messages += 1;
        }
    }
    if still_parked != args.waiters || woken_with_messages > 0 {
        bail!(
            "{} of {} waiters returned before the end ({woken_with_messages} with messages from a topic nobody sent to)",
            args.waiters - still_parked,
            args.waiters
        );
    }
    Ok(())
}

/// One measured phase: `--messages` sends; returns seconds and per-send latencies.
async fn timed(
    broker: &BrokerApi,
    args: &LongpollArgs,
    body: &Bytes,
) -> anyhow::Result<(f64, Vec<u32>)> {
    let started = Instant::now();
    let lat = send_concurrently(
        std::slice::from_ref(broker),
        SEND_TOPIC,
        args.messages,
        args.concurrency,
        1,
        body,
    )
    .await?;
    Ok((started.elapsed().as_secs_f64(), lat))
}

/// Drives `fut`, calling `on_park` once the first time it is pending: that is when a long poll
/// has read its queue, found nothing and parked.
async fn first_pending<F: Future>(fut: F, on_park: impl FnOnce()) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut on_park = Some(on_park);
    std::future::poll_fn(|cx| {
        let polled = fut.as_mut().poll(cx);
        if polled.is_pending()
            && let Some(f) = on_park.take()
        {
            f();
        }
        polled
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    /// Pending on its first poll (waking itself at once), ready with 7 on the next.
    struct PendingOnce(bool);

    impl Future for PendingOnce {
        type Output = u8;
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<u8> {
            if self.0 {
                Poll::Ready(7)
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn first_pending_fires_once_when_the_future_parks() {
        let fired = AtomicUsize::new(0);
        let got = first_pending(PendingOnce(false), || {
            fired.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        assert_eq!((got, fired.load(Ordering::SeqCst)), (7, 1));
    }

    #[tokio::test]
    async fn first_pending_never_fires_for_a_ready_future() {
        let fired = AtomicUsize::new(0);
        let got = first_pending(std::future::ready(3), || {
            fired.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        assert_eq!((got, fired.load(Ordering::SeqCst)), (3, 0));
    }
}
