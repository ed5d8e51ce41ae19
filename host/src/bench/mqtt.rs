//! `wharf bench mqtt`: the MQTT gateway against Debian's Mosquitto, the same rows in the same
//! run, driven by rumqttc over TCP with TCP_NODELAY.
//!
//! Rows: QoS 0 with 100 B payloads and QoS 1 with 1 KiB payloads, one publisher to 1 subscriber
//! and to `--fanout` subscribers. Each payload carries its sequence number and send time, so
//! every subscriber counts exactly which messages it got (lost, duplicated) and each delivery's
//! latency. Figures: delivered msgs/s (deliveries over first publish → last delivery), p50/p99
//! latency, and resident memory of each broker holding `--idle` idle connections. Wharf runs
//! with `[store] flush = "async"` for every row and again with `"sync"` for the QoS 1 rows; a
//! QoS 1 message lost at Wharf fails the bench, one lost at Mosquitto is reported.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::mqtt_brokers::{BrokerProcess, MOSQUITTO, raise_fd_limit};
use super::send::LatencySummary;
use crate::store::FlushMode;

/// Options of `wharf bench mqtt`.
#[derive(Debug, clap::Args)]
pub struct MqttArgs {
    /// Messages the publisher sends in a 1→1 row.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Messages the publisher sends in a fan-out row (each reaches every subscriber).
    #[arg(long, default_value_t = 10_000)]
    pub fanout_messages: u64,
    /// Subscribers in the fan-out rows.
    #[arg(long, default_value_t = 50)]
    pub fanout: usize,
    /// Idle connections for the memory figure (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// Unacknowledged QoS 1 publishes the publisher keeps in flight (rumqttc's window).
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// A row ends this long after the last delivery when not every message arrived.
    #[arg(long, default_value_t = 3000)]
    pub settle_ms: u64,
    /// The Mosquitto broker to compare with.
    #[arg(long, default_value = MOSQUITTO)]
    pub mosquitto: PathBuf,
    /// Measure Wharf only.
    #[arg(long)]
    pub no_mosquitto: bool,
    /// Wharf's data directory (default a fresh `./wharf-bench-mqtt-data-<flush>-<pid>` on the
    /// current disk, deleted afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
struct Row {
    qos: QoS,
    payload: usize,
    subscribers: usize,
    messages: u64,
}

impl Row {
    fn label(&self) -> String {
        let size = if self.payload >= 1024 && self.payload.is_multiple_of(1024) {
            format!("{} KiB", self.payload / 1024)
        } else {
            format!("{} B", self.payload)
        };
        format!("QoS {} {size} 1→{}", self.qos as u8, self.subscribers)
    }
}

/// What one row measured.
#[derive(Debug)]
struct RowResult {
    broker: String,
    row: String,
    qos: QoS,
    published: u64,
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    reconnects: u64,
    elapsed: Duration,
    latency: LatencySummary,
}

impl RowResult {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Resident memory of one broker with idle connections.
#[derive(Debug)]
struct IdleResult {
    broker: String,
    connections: usize,
    before: u64,
    after: u64,
}

/// Runs every row against Wharf (async, then sync for QoS 1) and Mosquitto; prints the table.
pub async fn run(args: MqttArgs) -> anyhow::Result<()> {
    // Room for the idle connections plus every client of a row, here and in the children.
    let want = args.idle as u64 + args.fanout as u64 * 2 + 1024;
    let limit = raise_fd_limit(want)?;
    if limit < want {
        bail!(
            "the open-file limit is {limit} (hard limit included) but --idle {} needs about {want}; \
             raise it (ulimit -Hn) or lower --idle",
            args.idle
        );
    }
    let rows = [
        Row {
            qos: QoS::AtMostOnce,
            payload: 100,
            subscribers: 1,
            messages: args.messages,
        },
        Row {
            qos: QoS::AtMostOnce,
            payload: 100,
            subscribers: args.fanout,
            messages: args.fanout_messages,
        },
        Row {
            qos: QoS::AtLeastOnce,
            payload: 1024,
            subscribers: 1,
            messages: args.messages,
        },
        Row {
            qos: QoS::AtLeastOnce,
            payload: 1024,
            subscribers: args.fanout,
            messages: args.fanout_messages,
        },
    ];
    let epoch = Instant::now();
    let mut results = Vec::new();
    let mut idle = Vec::new();
    let mut run_no = 0u32;

    let targets: Vec<(Option<FlushMode>, bool)> = {
        // (Wharf flush mode or None for Mosquitto, QoS 1 rows only)
        let mut t = vec![
            (Some(FlushMode::Async), false),
            (Some(FlushMode::Sync), true),
        ];
        if !args.no_mosquitto {
            t.push((None, false));
        }
        t
    };
    for (flush, qos1_only) in targets {
        let start = || match flush {
            Some(f) => BrokerProcess::wharf(f, args.data_dir.as_deref()),
            None => BrokerProcess::mosquitto(&args.mosquitto),
        };
        let mut broker = start()?;
        eprintln!("bench mqtt: {} on {}", broker.label, broker.addr);
        for row in rows
            .iter()
            .filter(|r| !qos1_only || r.qos == QoS::AtLeastOnce)
        {
            run_no += 1;
            let r = run_row(&broker, row, &args, epoch, run_no).await?;
            broker.check_alive()?;
            eprintln!("  {:<14} {:>10.0} msgs/s  lost {}", r.row, r.rate(), r.lost);
            results.push(r);
        }
        broker.stop()?;
        if args.idle > 0 && !qos1_only {
            // A fresh broker, so the figure is connections, not what earlier rows left behind.
            let broker = start()?;
            idle.push(measure_idle(&broker, args.idle).await?);
            broker.stop()?;
        }
    }
    print_table(&results, &idle);

    let wharf_lost: Vec<&RowResult> = results
        .iter()
        .filter(|r| r.broker.starts_with("wharf") && r.qos == QoS::AtLeastOnce && r.lost > 0)
        .collect();
    if !wharf_lost.is_empty() {
        let rows: Vec<String> = wharf_lost
            .iter()
            .map(|r| format!("{} {}: {} lost", r.broker, r.row, r.lost))
            .collect();
        bail!("Wharf lost QoS 1 messages: {}", rows.join("; "));
    }
    Ok(())
}

/// Per-subscriber tallies, shared with the row's coordinator.
struct Tally {
    /// Distinct sequence numbers received, one bit each.
    seen: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    reconnects: u64,
    latencies_us: Vec<u32>,
    last_at: Option<Instant>,
    messages: u64,
}

impl Tally {
    fn new(messages: u64) -> Tally {
        Tally {
            messages,
            seen: vec![0; messages.div_ceil(64) as usize],
            distinct: 0,
            duplicates: 0,
            reconnects: 0,
            latencies_us: Vec::with_capacity(messages as usize),
            last_at: None,
        }
    }

    /// Records one delivery of `seq`: `Some(true)` the first time, `Some(false)` for a
    /// duplicate, `None` when `seq` is out of range (not this row's message).
    fn record(&mut self, seq: u64) -> Option<bool> {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let w = self.seen.get_mut(word)?;
        if seq >= self.messages {
            return None;
        }
        if *w & (1 << bit) != 0 {
            self.duplicates += 1;
            Some(false)
        } else {
            *w |= 1 << bit;
            self.distinct += 1;
            Some(true)
        }
    }
}

/// The first 16 bytes of every payload: sequence number and send time (ns since the bench's
/// epoch), big-endian; the rest is filler up to the row's size.
fn encode_payload(seq: u64, sent_ns: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(16));
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&sent_ns.to_be_bytes());
    b.resize(size.max(16), b'x');
    b.freeze()
}

/// `(seq, sent_ns)` of a payload, `None` when it is too short to be the bench's.
fn decode_payload(p: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(p.get(0..8)?.try_into().ok()?);
    let sent = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

fn options(client_id: String, addr: SocketAddr, clean: bool, inflight: u16) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean)
        .set_inflight(inflight)
        .set_request_channel_capacity(1024)
        .set_max_packet_size(1 << 20, 1 << 20);
    o
}

fn eventloop(
    client_id: String,
    addr: SocketAddr,
    clean: bool,
    inflight: u16,
) -> (AsyncClient, EventLoop) {
    let (client, mut el) = AsyncClient::new(options(client_id, addr, clean, inflight), 1024);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    (client, el)
}

/// Runs one row against one broker.
async fn run_row(
    broker: &BrokerProcess,
    row: &Row,
    args: &MqttArgs,
    epoch: Instant,
    run_no: u32,
) -> anyhow::Result<RowResult> {
    let topic = format!("bench/{run_no}/{}", std::process::id());
    let total_expected = row.messages * row.subscribers as u64;
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<anyhow::Result<()>>(row.subscribers);
    let mut subs = Vec::with_capacity(row.subscribers);
    for i in 0..row.subscribers {
        // QoS 1 subscribers keep their session across a reconnect, so a disconnect by the
        // broker (a full per-client queue) cannot pass for a lost message.
        let clean = row.qos == QoS::AtMostOnce;
        let id = format!("bench-{run_no}-sub-{i}-{}", std::process::id());
        let (client, el) = eventloop(id, broker.addr, clean, 100);
        subs.push(tokio::spawn(subscriber(
            client,
            el,
            topic.clone(),
            *row,
            epoch,
            delivered.clone(),
            ready_tx.clone(),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    for _ in 0..row.subscribers {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(e.context("a subscriber could not subscribe")),
            Ok(None) | Err(_) => bail!("subscribers did not all get their SUBACK within 60 s"),
        }
    }

    let (client, el) = eventloop(
        format!("bench-{run_no}-pub-{}", std::process::id()),
        broker.addr,
        true,
        args.inflight,
    );
    let acked = Arc::new(AtomicU64::new(0));
    let pub_stop = CancellationToken::new();
    let pub_loop = tokio::spawn(publisher_loop(el, acked.clone(), pub_stop.clone()));
    let started = Instant::now();
    for seq in 0..row.messages {
        let sent = epoch.elapsed().as_nanos() as u64;
        client
            .publish(
                topic.clone(),
                row.qos,
                false,
                encode_payload(seq, sent, row.payload),
            )
            .await
            .context("publish")?;
    }
    // Wait for every delivery, or for deliveries to stop coming (QoS 0 may drop, and Mosquitto
    // drops QoS 1 past its queue limit).
    let settle = Duration::from_millis(args.settle_ms);
    let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = delivered.load(Ordering::Relaxed);
        let qos1_acked =
            row.qos == QoS::AtMostOnce || acked.load(Ordering::Relaxed) >= row.messages;
        if now >= total_expected && qos1_acked {
            break;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let mut tallies = Vec::with_capacity(subs.len());
    for s in subs {
        tallies.push(s.await.context("subscriber task")?);
    }
    let _ = client.disconnect().await;
    pub_stop.cancel();
    let _ = pub_loop.await;

    let end = tallies
        .iter()
        .filter_map(|t| t.last_at)
        .max()
        .unwrap_or_else(Instant::now);
    let mut lat: Vec<u32> = Vec::with_capacity(total_expected as usize);
    let (mut distinct, mut duplicates, mut reconnects) = (0, 0, 0);
    for t in &mut tallies {
        distinct += t.distinct;
        duplicates += t.duplicates;
        reconnects += t.reconnects;
        lat.append(&mut t.latencies_us);
    }
    Ok(RowResult {
        broker: broker.label.clone(),
        row: row.label(),
        qos: row.qos,
        published: row.messages,
        expected: total_expected,
        delivered: distinct + duplicates,
        lost: total_expected.saturating_sub(distinct),
        duplicates,
        reconnects,
        elapsed: end.saturating_duration_since(started),
        latency: LatencySummary::from_micros(&mut lat),
    })
}

/// Polls the publisher's event loop, counting PUBACKs, until stopped.
async fn publisher_loop(mut el: EventLoop, acked: Arc<AtomicU64>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                // The broker closes the connection after DISCONNECT: not an error to report.
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench mqtt: publisher connection: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// One subscriber: subscribes (again after a reconnect without a session), tallies every
/// delivery until stopped.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    client: AsyncClient,
    mut el: EventLoop,
    topic: String,
    row: Row,
    epoch: Instant,
    delivered: Arc<AtomicU64>,
    ready: tokio::sync::mpsc::Sender<anyhow::Result<()>>,
    stop: CancellationToken,
) -> Tally {
    let mut t = Tally::new(row.messages);
    let mut ready = Some(ready);
    let mut connects = 0u64;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some((seq, sent)) = decode_payload(&p.payload)
                    && let Some(first) = t.record(seq)
                {
                    let now = Instant::now();
                    let lat_ns = ((now - epoch).as_nanos() as u64).saturating_sub(sent);
                    t.latencies_us
                        .push((lat_ns / 1000).min(u32::MAX as u64) as u32);
                    t.last_at = Some(now);
                    if first {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connects += 1;
                if connects > 1 {
                    t.reconnects += 1;
                }
                if !ack.session_present
                    && let Err(e) = client.try_subscribe(topic.clone(), row.qos)
                    && let Some(r) = ready.take()
                {
                    let _ = r.try_send(Err(anyhow::anyhow!("subscribe: {e}")));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if let Some(r) = ready.take() {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    let _ = r.try_send(if refused {
                        Err(anyhow::anyhow!("SUBACK refused {topic}"))
                    } else {
                        Ok(())
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                if ready.is_some() && connects == 0 {
                    if let Some(r) = ready.take() {
                        let _ = r.try_send(Err(anyhow::anyhow!("connect: {e}")));
                    }
                    break;
                }
                // The broker closed the connection; rumqttc reconnects on the next poll.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = client.try_disconnect();
    t
}

/// Opens `n` idle MQTT connections (CONNECT with keep-alive 0, CONNACK read) and reads the
/// broker's resident memory before and after.
async fn measure_idle(broker: &BrokerProcess, n: usize) -> anyhow::Result<IdleResult> {
    let before = broker
        .rss_bytes()
        .context("read the broker's resident memory")?;
    let mut conns = Vec::with_capacity(n);
    let mut next = 0usize;
    while next < n {
        let batch: Vec<usize> = (next..(next + 256).min(n)).collect();
        next += batch.len();
        let mut set = tokio::task::JoinSet::new();
        for i in batch {
            set.spawn(idle_connection(
                broker.addr,
                format!("idle-{i}-{}", std::process::id()),
            ));
        }
        while let Some(r) = set.join_next().await {
            conns.push(r.context("idle connection task")??);
        }
    }
    // Let the broker finish whatever it does after a CONNACK (session tasks, buffers).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = broker
        .rss_bytes()
        .context("read the broker's resident memory")?;
    drop(conns);
    Ok(IdleResult {
        broker: broker.label.clone(),
        connections: n,
        before,
        after,
    })
}

async fn idle_connection(addr: SocketAddr, client_id: String) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)
        .await
        .context("connect an idle client")?;
    s.set_nodelay(true)?;
    let mut connect = rumqttc::Connect::new(client_id);
    connect.keep_alive = 0;
    let mut buf = BytesMut::new();
    connect
        .write(&mut buf)
        .map_err(|e| anyhow::anyhow!("encode CONNECT: {e:?}"))?;
    s.write_all(&buf).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack))
        .await
        .context("no CONNACK within 30 s")??;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("CONNACK refused: {ack:02x?}");
    }
    Ok(s)
}

fn print_table(results: &[RowResult], idle: &[IdleResult]) {
    println!(
        "{:<22} {:<16} {:>10} {:>10} {:>8} {:>6} {:>12} {:>9} {:>9}",
        "broker", "row", "published", "delivered", "lost", "dups", "msgs/s", "p50 ms", "p99 ms"
    );
    for r in results {
        println!(
            "{:<22} {:<16} {:>10} {:>10} {:>8} {:>6} {:>12.0} {:>9.3} {:>9.3}",
            r.broker,
            r.row,
            r.published,
            r.delivered,
            r.lost,
            r.duplicates,
            r.rate(),
            r.latency.p50_us as f64 / 1000.0,
            r.latency.p99_us as f64 / 1000.0,
        );
        if r.reconnects > 0 {
            println!("{:<22}   ({} subscriber reconnects)", "", r.reconnects);
        }
        debug_assert!(r.delivered <= r.expected + r.duplicates);
    }
    if !idle.is_empty() {
        println!();
        println!(
            "{:<22} {:>12} {:>12} {:>12} {:>12}",
            "broker", "idle conns", "RSS before", "RSS after", "per conn"
        );
        for m in idle {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "{:<22} {:>12} {:>9.1} MiB {:>9.1} MiB {:>9.2} KiB",
                m.broker,
                m.connections,
                mib(m.before),
                mib(m.after),
                m.after.saturating_sub(m.before) as f64 / 1024.0 / m.connections.max(1) as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_at_every_size() {
        for size in [0, 16, 100, 1024] {
            let p = encode_payload(42, 7_000_000, size);
            assert_eq!(p.len(), size.max(16));
            assert_eq!(decode_payload(&p), Some((42, 7_000_000)));
        }
        assert_eq!(decode_payload(b"short"), None);
    }

    #[test]
    fn tally_counts_distinct_duplicates_and_ignores_strangers() {
        let mut t = Tally::new(130);
        assert_eq!(t.record(0), Some(true));
        assert_eq!(t.record(129), Some(true));
        assert_eq!(t.record(129), Some(false));
        assert_eq!(
            t.record(130),
            None,
            "past the row's messages, inside the last word"
        );
        assert_eq!(t.record(192), None, "out of range");
        assert_eq!((t.distinct, t.duplicates), (2, 1));
    }

    #[test]
    fn row_labels_name_qos_size_and_fanout() {
        let r = Row {
            qos: QoS::AtLeastOnce,
            payload: 1024,
            subscribers: 50,
            messages: 1,
        };
        assert_eq!(r.label(), "QoS 1 1 KiB 1→50");
        let r = Row {
            qos: QoS::AtMostOnce,
            payload: 100,
            subscribers: 1,
            messages: 1,
        };
        assert_eq!(r.label(), "QoS 0 100 B 1→1");
    }
}
