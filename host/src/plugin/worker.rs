//! Worker threads: each is one consumer instance of the plugin's group that loops
//! receive → call its own reused wasm instance → settle.
//!
//! Workers are OS threads, not async tasks: a plugin call is CPU-bound and may run up to its
//! consume timeout, and the host imports block on the broker's futures, which is only allowed
//! outside the async runtime's own threads.
//!
//! A failure on the host's side (an instance cannot be created, e.g. the instance pool is
//! exhausted) is not the plugin's answer and must not use up a message's retries: the worker
//! creates its instance before it asks for messages, and when it cannot, it pauses with a
//! growing back-off and shows the error in the plugin's status. In a clustering group it also
//! leaves the group while paused, so its queues, and any message it still holds, go to healthy
//! instances unsettled, with the same reconsume count; it rejoins once an instance exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tracing::{debug, debug_span, info, warn};

use super::runtime::{Failure, Instance, InstanceConfig, PluginPre};
use crate::broker::ConsumeModel;
use crate::broker::api::BrokerApi;
use crate::broker::consume::{Delivered, InstanceSpec, Outcome, Subscription};
use crate::error::{ErrorCode, Result, WharfError};
use crate::metrics::Histogram;
use crate::model::{MessageId, StoredMessage};

/// How long one receive waits for messages; also how quickly a stop request is noticed.
const RECEIVE_WAIT: Duration = Duration::from_millis(200);
/// Pause after a failed receive, and the first pause after a host-side failure.
const ERROR_PAUSE: Duration = Duration::from_millis(200);
/// Longest pause between attempts while host-side failures go on.
const MAX_HOST_PAUSE: Duration = Duration::from_secs(5);

/// Counters of one plugin (over all its versions since the host started).
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Calls into the plugin (a batch call counts once per message).
    pub invocations: AtomicU64,
    /// Messages answered with commit-message.
    pub commits: AtomicU64,
    /// Messages answered with reconsume-later, or failed by trap or timeout.
    pub retries: AtomicU64,
    /// Calls that trapped (panic, memory cap, …).
    pub traps: AtomicU64,
    /// Calls stopped at the consume timeout.
    pub timeouts: AtomicU64,
    /// Settles the broker refused (e.g. the receipt had expired).
    pub settle_errors: AtomicU64,
    /// Instances created (the first per worker plus replacements after traps).
    pub instantiations: AtomicU64,
    /// Host-side failures (an instance could not be created); no message used a retry for them.
    pub host_errors: AtomicU64,
    /// Workers paused by a host-side failure right now.
    pub paused_workers: AtomicUsize,
    /// The ongoing host-side failure, if any (cleared when every worker has recovered).
    pub host_error: Mutex<Option<HostError>>,
    /// Call duration in microseconds.
    pub duration_us: Histogram,
}

/// A host-side failure as plugin status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostError {
    /// What failed, e.g. the pool allocator's words.
    pub message: String,
    /// When the failures began (broker clock, ms).
    pub since_ms: u64,
    /// The latest failure (broker clock, ms).
    pub last_ms: u64,
}

impl PluginStats {
    /// Every counter as (name, help, value), in one fixed order: `/metrics` names them
    /// `wharf_plugin_<name>_total` and plugin status shows them under `counters`.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 8] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "invocations",
                "Messages handed to the plugin",
                get(&self.invocations),
            ),
            (
                "commits",
                "Messages the plugin committed",
                get(&self.commits),
            ),
            (
                "retries",
                "Messages answered reconsume-later or failed (retried)",
                get(&self.retries),
            ),
            ("traps", "Calls that trapped", get(&self.traps)),
            (
                "timeouts",
                "Calls stopped at consume_timeout_ms",
                get(&self.timeouts),
            ),
            (
                "settle_errors",
                "Settles the broker refused",
                get(&self.settle_errors),
            ),
            (
                "instantiations",
                "Instances created (first per worker and replacements)",
                get(&self.instantiations),
            ),
            (
                "host_errors",
                "Host-side failures (no instance could be created); messages kept their retries",
                get(&self.host_errors),
            ),
        ]
    }

    /// The ongoing host-side failure, for plugin status.
    pub fn host_error(&self) -> Option<HostError> {
        self.host_error.lock().clone()
    }

    fn note_host_error(&self, message: &str, now_ms: u64) {
        self.host_errors.fetch_add(1, Ordering::Relaxed);
        let mut current = self.host_error.lock();
        match current.as_mut() {
            Some(e) => {
                e.message = message.to_string();
                e.last_ms = now_ms;
            }
            None => {
                *current = Some(HostError {
                    message: message.to_string(),
                    since_ms: now_ms,
                    last_ms: now_ms,
                })
            }
        }
    }
}

/// A native message handler (the benchmark's baseline through the same worker loop).
pub type NativeFn = Arc<dyn Fn(&StoredMessage) -> Outcome + Send + Sync>;

/// What answers messages.
#[derive(Clone)]
pub enum Handler {
    /// A wasm component: one reused instance per worker.
    Wasm {
        /// Engine instances are created in.
        engine: wasmtime::Engine,
        /// The version's pre-linked component.
        pre: PluginPre,
    },
    /// A Rust closure (benchmarks only).
    Native(NativeFn),
}

/// A worker's live handler state.
enum Live {
    Wasm(Box<Instance>),
    Native(NativeFn),
}

impl Handler {
    fn instantiate(&self, config: &Arc<InstanceConfig>) -> Result<Live> {
        match self {
            Handler::Wasm { engine, pre } => {
                #[cfg(test)]
                {
                    let injected = &pre.fail_instantiations;
                    if injected
                        .try_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return Err(WharfError::internal(
                            "injected: the instance pool is exhausted",
                        ));
                    }
                }
                Ok(Live::Wasm(Box::new(Instance::new(
                    engine,
                    pre,
                    config.clone(),
                )?)))
            }
            Handler::Native(f) => Ok(Live::Native(f.clone())),
        }
    }
}

impl Live {
    fn consume(&mut self, m: &StoredMessage) -> std::result::Result<Outcome, Failure> {
        match self {
            Live::Wasm(i) => i.consume(m),
            Live::Native(f) => Ok(f(m)),
        }
    }

    /// True when one call can take the whole batch.
    fn has_batch(&self) -> bool {
        match self {
            Live::Wasm(i) => i.has_batch(),
            Live::Native(_) => true,
        }
    }

    fn consume_batch(
        &mut self,
        ms: &[&StoredMessage],
    ) -> std::result::Result<Vec<Outcome>, Failure> {
        match self {
            Live::Wasm(i) => i.consume_batch(ms),
            Live::Native(f) => Ok(ms.iter().map(|m| f(m)).collect()),
        }
    }
}

/// What a set of workers runs.
pub struct WorkerSpec {
    /// The broker.
    pub broker: BrokerApi,
    /// Runtime handle for blocking on broker futures.
    pub handle: tokio::runtime::Handle,
    /// What answers messages.
    pub handler: Handler,
    /// The version's identity and limits.
    pub config: Arc<InstanceConfig>,
    /// Subscriptions from the manifest, nothing else.
    pub subscriptions: Vec<Subscription>,
    /// Messages per call.
    pub batch_max: usize,
    /// Counters to update.
    pub stats: Arc<PluginStats>,
}

/// Running workers of one version.
pub struct Workers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    ids: Vec<String>,
    group: String,
    broker: BrokerApi,
    live: Arc<AtomicUsize>,
}

/// `<plugin>@<host>#<n>`: stable across restarts and versions of the same plugin.
pub fn instance_id(plugin: &str, n: usize) -> String {
    format!("{plugin}@{}#{n}", host_name())
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Workers {
    /// Registers `count` consumer instances and starts one thread per instance.
    pub async fn start(spec: WorkerSpec, count: usize) -> Result<Workers> {
        let spec = Arc::new(spec);
        let ids: Vec<String> = (0..count)
            .map(|n| instance_id(&spec.config.plugin, n))
            .collect();
        for id in &ids {
            spec.broker
                .register_consumer(instance_spec(&spec, id))
                .await?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicUsize::new(0));
        spawn_heartbeats(&spec, &ids, &stop);
        let mut workers = Workers {
            stop: stop.clone(),
            handles: Vec::new(),
            ids: ids.clone(),
            group: spec.config.group.clone(),
            broker: spec.broker.clone(),
            live: live.clone(),
        };
        for id in ids {
            let (spec, stop, running) = (spec.clone(), stop.clone(), live.clone());
            let name = format!("wharf-plugin-{}", spec.config.plugin);
            // Counted from spawn, so a status right after a deploy shows the instances.
            live.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                run(&spec, &id, &stop);
                running.fetch_sub(1, Ordering::SeqCst);
            });
            match spawned {
                Ok(h) => workers.handles.push(h),
                Err(e) => {
                    live.fetch_sub(1, Ordering::SeqCst);
                    workers.stop().await;
                    return Err(crate::error::WharfError::internal(format!(
                        "cannot start a plugin worker thread: {e}"
                    )));
                }
            }
        }
        Ok(workers)
    }

    /// Instances (threads) currently running.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Consumer instance ids.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Stops taking new messages, lets every worker settle what it holds, then unregisters
    /// the instances so anything still assigned goes back to the group.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let handles = std::mem::take(&mut self.handles);
        let joined = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        })
        .await;
        if let Err(e) = joined {
            warn!(error = %e, "plugin worker join failed");
        }
        for id in &self.ids {
            if let Err(e) = self.broker.unregister_consumer(&self.group, id).await {
                debug!(instance = %id, error = %e, "unregister after stop");
            }
        }
    }
}

/// Keeps the instances alive in the engine while a long call blocks their receive loop (a call
/// may run up to `consume_timeout_ms`, far longer than the heartbeat timeout).
fn spawn_heartbeats(spec: &Arc<WorkerSpec>, ids: &[String], stop: &Arc<AtomicBool>) {
    let every = Duration::from_millis(
        (spec.broker.config().consumer_heartbeat_timeout_ms / 3).clamp(50, 10_000),
    );
    let (broker, group, ids, stop) = (
        spec.broker.clone(),
        spec.config.group.clone(),
        ids.to_vec(),
        stop.clone(),
    );
    spec.handle.spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            for id in &ids {
                broker.heartbeat(&group, id);
            }
            tokio::time::sleep(every).await;
        }
    });
}

impl Drop for Workers {
    /// Dropped without `stop` (e.g. the host is torn down): let the threads end on their own.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn instance_spec(spec: &WorkerSpec, id: &str) -> InstanceSpec {
    InstanceSpec {
        group: spec.config.group.clone(),
        instance_id: id.to_string(),
        address: format!("wasm:{}/v{}", spec.config.plugin, spec.config.version),
        pid: Some(std::process::id()),
        subscriptions: spec.subscriptions.clone(),
    }
}

/// One worker's loop; returns when `stop` is set and what it holds is settled.
fn run(spec: &WorkerSpec, id: &str, stop: &AtomicBool) {
    let mut worker = Worker {
        spec,
        id,
        stop,
        registered: true,
        paused: false,
        pause: ERROR_PAUSE,
    };
    let mut instance: Option<Live> = None;
    // Received messages not yet handed to the plugin (its instance failed mid-batch).
    let mut untried: Vec<Delivered> = Vec::new();
    let mut last_error = String::new();
    while !stop.load(Ordering::SeqCst) {
        let inst = match instance.take() {
            Some(i) => i,
            None => match spec.handler.instantiate(&spec.config) {
                Ok(i) => {
                    spec.stats.instantiations.fetch_add(1, Ordering::Relaxed);
                    worker.recovered();
                    i
                }
                Err(e) => {
                    worker.host_failure(&e, &mut untried);
                    continue;
                }
            },
        };
        if !worker.registered && !worker.rejoin() {
            instance = Some(inst);
            continue;
        }
        let batch = if untried.is_empty() {
            let receive = || {
                spec.handle.block_on(spec.broker.receive(
                    &spec.config.group,
                    id,
                    spec.batch_max,
                    RECEIVE_WAIT,
                ))
            };
            // The async runtime going away under us (abnormal teardown) ends the worker.
            let Ok(received) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(receive))
            else {
                warn!(plugin = %spec.config.plugin, instance = %id, "async runtime gone; worker exits");
                return;
            };
            match received {
                Ok(b) => b,
                Err(e) => {
                    instance = Some(inst);
                    worker.receive_failed(&e, &mut last_error);
                    continue;
                }
            }
        } else {
            std::mem::take(&mut untried)
        };
        if batch.is_empty() {
            instance = Some(inst);
            continue;
        }
        let (kept, rest) = handle_batch(spec, inst, &batch);
        instance = kept;
        untried = rest;
    }
}

/// One worker's standing with the group and its back-off from host-side failures.
struct Worker<'a> {
    spec: &'a WorkerSpec,
    id: &'a str,
    stop: &'a AtomicBool,
    /// Whether the broker knows this instance (it leaves the group while paused).
    registered: bool,
    /// Counted in `paused_workers`.
    paused: bool,
    /// The next pause after a host-side failure.
    pause: Duration,
}

impl Worker<'_> {
    /// No instance could be created: nothing the plugin did, so no message may use a retry.
    fn host_failure(&mut self, e: &WharfError, held: &mut Vec<Delivered>) {
        let (spec, c) = (self.spec, &self.spec.config);
        spec.stats
            .note_host_error(&e.message, spec.broker.clock().now_ms());
        if !self.paused {
            self.paused = true;
            spec.stats.paused_workers.fetch_add(1, Ordering::SeqCst);
        }
        warn!(plugin = %c.plugin, version = c.version, instance = %self.id, error = %e.message,
            pause_ms = self.pause.as_millis() as u64, held = held.len(),
            "cannot create a plugin instance; pausing delivery (messages keep their retries)");
        // Leaving a clustering group hands this worker's queues and unsettled messages to the
        // others, uncounted. A broadcasting instance has nobody to hand to: it keeps what it
        // holds and tries again with a new instance.
        let model = spec.broker.group(&c.group).map(|g| g.model);
        if model.unwrap_or(ConsumeModel::Clustering) == ConsumeModel::Clustering {
            if self.registered {
                let left = spec
                    .handle
                    .block_on(spec.broker.unregister_consumer(&c.group, self.id));
                if let Err(e) = left {
                    debug!(instance = %self.id, error = %e, "leave group while paused");
                }
                self.registered = false;
            }
            held.clear();
        }
        self.sleep(self.pause);
        self.pause = (self.pause * 2).min(MAX_HOST_PAUSE);
    }

    /// An instance exists again; clears the plugin's host error once no worker is paused.
    fn recovered(&mut self) {
        self.pause = ERROR_PAUSE;
        if !self.paused {
            return;
        }
        self.paused = false;
        let stats = &self.spec.stats;
        if stats.paused_workers.fetch_sub(1, Ordering::SeqCst) == 1 {
            *stats.host_error.lock() = None;
        }
        info!(plugin = %self.spec.config.plugin, instance = %self.id, "plugin instance created again; delivery resumes");
    }

    /// Registers again after a pause; false (after a pause) when the broker refused.
    fn rejoin(&mut self) -> bool {
        let spec = self.spec;
        match spec
            .handle
            .block_on(spec.broker.register_consumer(instance_spec(spec, self.id)))
        {
            Ok(()) => {
                self.registered = true;
                true
            }
            Err(e) => {
                warn!(plugin = %spec.config.plugin, instance = %self.id, error = %e, "cannot rejoin the group");
                self.sleep(ERROR_PAUSE);
                false
            }
        }
    }

    fn receive_failed(&mut self, e: &WharfError, last_error: &mut String) {
        let spec = self.spec;
        let text = e.to_string();
        if text != *last_error {
            warn!(plugin = %spec.config.plugin, instance = %self.id, error = %text, "receive failed");
            *last_error = text;
        }
        if e.code == ErrorCode::SubscriptionGroupNotExist
            || e.kind == crate::error::ErrorKind::NotFound
        {
            // The instance expired or the group was recreated: register again.
            self.registered = false;
        }
        self.sleep(ERROR_PAUSE);
    }

    /// Sleeps up to `d`, waking early when the worker is asked to stop.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(RECEIVE_WAIT));
        }
    }
}

/// Calls the plugin for a batch and settles each message. Returns the instance unless it
/// failed, and the messages it never reached (one call per message, the instance failed
/// before them): those are retried with a new instance, not failed.
fn handle_batch(
    spec: &WorkerSpec,
    mut inst: Live,
    batch: &[Delivered],
) -> (Option<Live>, Vec<Delivered>) {
    let c = &spec.config;
    let stats = &spec.stats;
    if spec.batch_max <= 1 || !inst.has_batch() {
        for (i, d) in batch.iter().enumerate() {
            let span = debug_span!("plugin_call", plugin = %c.plugin, version = c.version, message_id = %d.message.id);
            let _enter = span.enter();
            let started = Instant::now();
            let result = inst.consume(&d.message);
            stats
                .duration_us
                .record(started.elapsed().as_micros() as u64);
            stats.invocations.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(outcome) => {
                    settle(spec, d, outcome);
                    count(stats, outcome);
                }
                Err(f) => {
                    note_failure(spec, d.message.id, &f);
                    settle(spec, d, Outcome::ReconsumeLater);
                    count(stats, Outcome::ReconsumeLater);
                    return (None, batch[i + 1..].to_vec());
                }
            }
        }
        return (Some(inst), Vec::new());
    }
    let messages: Vec<&StoredMessage> = batch.iter().map(|d| &*d.message).collect();
    let Some(first) = messages.first().map(|m| m.id) else {
        return (Some(inst), Vec::new());
    };
    let span = debug_span!("plugin_call", plugin = %c.plugin, version = c.version, message_id = %first, batch = messages.len());
    let _enter = span.enter();
    let started = Instant::now();
    let result = inst.consume_batch(&messages);
    stats
        .duration_us
        .record(started.elapsed().as_micros() as u64);
    stats
        .invocations
        .fetch_add(messages.len() as u64, Ordering::Relaxed);
    let (outcomes, keep) = match result {
        Ok(o) => (o, Some(inst)),
        Err(f) => {
            note_failure(spec, first, &f);
            (vec![Outcome::ReconsumeLater; batch.len()], None)
        }
    };
    for (d, o) in batch.iter().zip(outcomes) {
        settle(spec, d, o);
        count(stats, o);
    }
    (keep, Vec::new())
}

/// Counts an answer once its settle has been tried, so whoever watches the counters never sees
/// a commit the broker has not yet applied (status and backlog would lag behind them).
fn count(stats: &PluginStats, outcome: Outcome) {
    match outcome {
        Outcome::CommitMessage => stats.commits.fetch_add(1, Ordering::Relaxed),
        Outcome::ReconsumeLater => stats.retries.fetch_add(1, Ordering::Relaxed),
    };
}

fn note_failure(spec: &WorkerSpec, message_id: MessageId, f: &Failure) {
    let c = &spec.config;
    match f {
        Failure::Timeout => {
            spec.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            warn!(plugin = %c.plugin, version = c.version, message_id = %message_id,
                timeout_ms = c.timeout.as_millis() as u64,
                "plugin call ran past consume_timeout_ms; stopped, message will be retried, instance replaced");
        }
        Failure::Trap(why) => {
            spec.stats.traps.fetch_add(1, Ordering::Relaxed);
            warn!(plugin = %c.plugin, version = c.version, message_id = %message_id, error = %why,
                "plugin trapped; message will be retried, instance replaced");
        }
    }
}

fn settle(spec: &WorkerSpec, d: &Delivered, outcome: Outcome) {
    let batch = [(d.token.clone(), outcome)];
    let settled = spec
        .handle
        .block_on(spec.broker.settle_batch(&spec.config.group, &batch))
        .and_then(|mut r| r.pop().unwrap_or(Ok(())));
    if let Err(e) = settled {
        spec.stats.settle_errors.fetch_add(1, Ordering::Relaxed);
        warn!(plugin = %spec.config.plugin, message_id = %d.message.id, error = %e, "settle refused");
    }
}
