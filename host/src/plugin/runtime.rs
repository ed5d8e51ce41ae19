//! The wasmtime side: one engine for every plugin, compiled components cached on disk, and
//! sandboxed instances that turn a message into an action.
//!
//! Sandbox: an epoch deadline per call (a ticker thread advances the epoch), a linear-memory cap
//! per instance (`StoreLimits`, growing past it traps), and WASI with nothing granted — no
//! preopened directories, environment, arguments or sockets; stdout is discarded and stderr is kept
//! in a small buffer so a panic message can be logged when the instance traps.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use wasmtime::component::{
    Component, ComponentExportIndex, Func, HasSelf, Linker, ResourceTable, TypedFunc,
};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig, Store,
    StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wharf_codec::properties;

use crate::broker::api::BrokerApi;
use crate::broker::consume::Outcome;
use crate::broker::{OutgoingMessage, SendReceipt};
use crate::error::{ErrorCode, Result, WharfError};
use crate::model::{MessageId, StoredMessage};

wasmtime::component::bindgen!({
    world: "consumer",
    path: "../wit",
});

use wharf::plugin::types as wit;

/// How often the ticker advances the engine's epoch; deadlines are whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Instances the pooling allocator can hold at once over all plugins.
pub const POOL_INSTANCES: u32 = 512;
/// Largest linear memory any instance may have (the manifest cap is at most this).
const POOL_MAX_MEMORY: usize = super::manifest::MAX_MEMORY_MIB as usize * 1024 * 1024;
/// Bytes of guest stderr kept per instance (for panic messages).
const STDERR_KEEP: usize = 4096;
/// The optional export of world `batch-consumer`.
const BATCH_EXPORT: &str = "consume-batch";

/// `consume-batch` as the host calls it.
type BatchFunc<'a> = TypedFunc<(&'a [wit::Message], &'a wit::Context), (Vec<wit::Action>,)>;

/// What the host imports reach: the broker in production, a recorder in unit tests.
pub trait HostApi: Send + Sync + 'static {
    /// Sends one message (permission already checked).
    fn send(&self, topic: &str, message: OutgoingMessage) -> Result<SendReceipt>;
    /// Newest messages of `topic` with `key` (permission already checked).
    fn find_by_key(&self, topic: &str, key: &str) -> Result<Vec<StoredMessage>>;
    /// The broker clock (epoch ms).
    fn now_ms(&self) -> u64;
}

/// [`HostApi`] over the broker; called from plugin worker threads, which are outside the async
/// runtime, so blocking on the broker's futures is allowed there.
pub struct BrokerSender {
    /// The broker.
    pub broker: BrokerApi,
    /// Runtime the broker's futures run on.
    pub handle: tokio::runtime::Handle,
}

impl HostApi for BrokerSender {
    fn send(&self, topic: &str, message: OutgoingMessage) -> Result<SendReceipt> {
        let mut receipts = self
            .handle
            .block_on(self.broker.send(topic, vec![message]))?;
        receipts
            .pop()
            .ok_or_else(|| WharfError::internal("send returned no receipt"))
    }

    fn find_by_key(&self, topic: &str, key: &str) -> Result<Vec<StoredMessage>> {
        self.handle.block_on(self.broker.by_key(topic, key))
    }

    fn now_ms(&self) -> u64 {
        self.broker.clock().now_ms()
    }
}

/// Everything an instance of one deployed version needs to know.
pub struct InstanceConfig {
    /// Plugin name.
    pub plugin: String,
    /// Deploy number.
    pub version: u64,
    /// Consumer group.
    pub group: String,
    /// Topics `send` may reach.
    pub publish: Vec<String>,
    /// Topics `find-by-key` may read (subscribed or publishable).
    pub readable: Vec<String>,
    /// Linear-memory cap (bytes).
    pub memory_bytes: usize,
    /// Per-call deadline.
    pub timeout: Duration,
    /// The imports' backend.
    pub api: Arc<dyn HostApi>,
}

/// Per-store state: WASI with nothing granted, the memory limiter, and the call's identity.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    stderr: MemoryOutputPipe,
    config: Arc<InstanceConfig>,
    /// Id of the message being handled, for log lines (formatted only when a line is written).
    current: Option<MessageId>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The message being handled, for guest log lines: formatted only when a line is written, and
/// empty outside a call (start-up code may log too).
struct CurrentId(Option<MessageId>);

impl std::fmt::Display for CurrentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => id.fmt(f),
            None => Ok(()),
        }
    }
}

fn host_error(e: WharfError) -> wit::HostError {
    wit::HostError {
        code: e.code.code() as u32,
        name: e.code.name().to_string(),
        message: e.message,
    }
}

fn no_permission(message: String) -> wit::HostError {
    host_error(WharfError::new(
        ErrorCode::NoPermission,
        crate::error::ErrorKind::Forbidden,
        message,
    ))
}

impl wit::Host for HostState {}

impl wharf::plugin::host::Host for HostState {
    fn send(&mut self, m: wit::Outgoing) -> std::result::Result<wit::SendReceipt, wit::HostError> {
        let c = &self.config;
        if !c.publish.contains(&m.topic) {
            return Err(no_permission(format!(
                "plugin '{}' may not send to topic '{}'; add it to [permissions] publish in plugin.toml",
                c.plugin, m.topic
            )));
        }
        let out = OutgoingMessage {
            tag: m.tag,
            keys: m.keys,
            properties: m.properties.into_iter().collect(),
            body: m.body.into(),
            deliver_at_ms: m.deliver_at_ms,
            delay_ms: m.delay_ms,
            born_ms: None,
            queue: Default::default(),
        };
        match c.api.send(&m.topic, out) {
            Ok(r) => Ok(wit::SendReceipt {
                message_id: r.message_id.to_string(),
                queue_id: r.queue_id,
            }),
            Err(e) => Err(host_error(e)),
        }
    }

    fn find_by_key(
        &mut self,
        topic: String,
        key: String,
    ) -> std::result::Result<Vec<wit::Found>, wit::HostError> {
        let c = &self.config;
        if !c.readable.contains(&topic) {
            return Err(no_permission(format!(
                "plugin '{}' may not read topic '{topic}'; only subscribed topics and those in [permissions] publish",
                c.plugin
            )));
        }
        match c.api.find_by_key(&topic, &key) {
            Ok(found) => Ok(found
                .into_iter()
                .map(|m| wit::Found {
                    message_id: m.id.to_string(),
                    tag: m.tag,
                    stored_ms: m.stored_ms,
                })
                .collect()),
            Err(e) => Err(host_error(e)),
        }
    }

    fn log(&mut self, level: wit::Level, message: String) {
        let c = &self.config;
        let (plugin, version) = (&c.plugin, c.version);
        let id = CurrentId(self.current);
        match level {
            wit::Level::Trace => {
                tracing::trace!(target: "wharf::plugin::guest", plugin = %plugin, version, message_id = %id, "{message}")
            }
            wit::Level::Debug => {
                tracing::debug!(target: "wharf::plugin::guest", plugin = %plugin, version, message_id = %id, "{message}")
            }
            wit::Level::Info => {
                tracing::info!(target: "wharf::plugin::guest", plugin = %plugin, version, message_id = %id, "{message}")
            }
            wit::Level::Warn => {
                tracing::warn!(target: "wharf::plugin::guest", plugin = %plugin, version, message_id = %id, "{message}")
            }
            wit::Level::Error => {
                tracing::error!(target: "wharf::plugin::guest", plugin = %plugin, version, message_id = %id, "{message}")
            }
        }
    }

    fn now_ms(&mut self) -> u64 {
        self.config.api.now_ms()
    }
}

/// One engine and linker for every plugin, plus the on-disk artifact cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    compat: String,
    ticker_stop: Arc<AtomicBool>,
}

/// A pre-linked component and what it exports: each instantiation only allocates and
/// initialises.
#[derive(Clone)]
pub struct PluginPre {
    consumer: ConsumerPre<HostState>,
    /// `consume-batch`, when the component exports it (world `batch-consumer`).
    batch: Option<ComponentExportIndex>,
    /// Test hook: this many coming worker instantiations fail as an exhausted pool does.
    #[cfg(test)]
    pub(crate) fail_instantiations: Arc<std::sync::atomic::AtomicU32>,
}

impl PluginPre {
    /// True when the component exports `consume-batch`; without it a batch is served by one
    /// `consume` call per message.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }
}

/// A component ready to instantiate.
#[derive(Clone)]
pub struct Loaded {
    /// Pre-linked component: each instantiation only allocates and initialises.
    pub pre: PluginPre,
    /// SHA-256 of the component bytes (hex).
    pub hash: String,
    /// True when the compiled artifact came from the disk cache.
    pub cache_hit: bool,
    /// Compile or load time.
    pub took: Duration,
}

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption) and starts the epoch ticker.
    pub fn new(cache_dir: PathBuf) -> Result<Runtime> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            // One linear memory per Rust component; each slot reserves 4 GiB of address space
            // (so bounds checks compile away), which bounds how many we keep.
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES * 8)
            .max_core_instances_per_component(32)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_memory_size(POOL_MAX_MEMORY);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(|e| WharfError::internal(format!("cannot start the wasm engine: {e}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| WharfError::internal(format!("cannot link WASI: {e}")))?;
        Consumer::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| WharfError::internal(format!("cannot link the plugin host API: {e}")))?;
        std::fs::create_dir_all(&cache_dir).map_err(|e| {
            WharfError::internal(format!(
                "cannot create plugin cache {}: {e}",
                cache_dir.display()
            ))
        })?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let compat = format!("{:016x}", h.finish());
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("wharf-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| WharfError::internal(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Runtime {
            engine,
            linker,
            cache_dir,
            compat,
            ticker_stop,
        })
    }

    /// The engine (for the bench).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn cache_path(&self, hash: &str) -> PathBuf {
        self.cache_dir.join(format!("{hash}-{}.cwasm", self.compat))
    }

    /// Compiles (or loads from the cache) and pre-links a component; refuses one that is not
    /// a valid component or does not implement the `wharf:plugin/consumer` world.
    pub fn load(&self, bytes: &[u8]) -> Result<Loaded> {
        let started = Instant::now();
        let hash = component_hash(bytes);
        let path = self.cache_path(&hash);
        let mut cache_hit = false;
        let component = match self.load_cached(&path) {
            Some(c) => {
                cache_hit = true;
                c
            }
            None => {
                let c = Component::new(&self.engine, bytes).map_err(|e| {
                    WharfError::bad_request(format!(
                        "the component does not compile: {e:#}; build it with `cargo build --release --target wasm32-wasip2`"
                    ))
                })?;
                self.store_cached(&path, &c);
                c
            }
        };
        let pre = self.link(&component)?;
        let took = started.elapsed();
        debug!(hash = %hash, cache_hit, took_ms = took.as_secs_f64() * 1e3, "component loaded");
        Ok(Loaded {
            pre,
            hash,
            cache_hit,
            took,
        })
    }

    fn link(&self, component: &Component) -> Result<PluginPre> {
        let instance_pre = self.linker.instantiate_pre(component).map_err(|e| {
            WharfError::bad_request(format!(
                "the component imports something the host does not offer ({e:#}); plugins may import only wharf:plugin/host and WASI (with nothing granted)"
            ))
        })?;
        let consumer = ConsumerPre::new(instance_pre).map_err(|e| {
            WharfError::bad_request(format!(
                "the component does not implement the wharf:plugin/consumer world ({e:#}); export consume, e.g. with the wharf-sdk crate"
            ))
        })?;
        // Its signature is checked when an instance is made, which a deploy does once.
        let batch = component.get_export_index(None, BATCH_EXPORT);
        Ok(PluginPre {
            consumer,
            batch,
            #[cfg(test)]
            fail_instantiations: Arc::default(),
        })
    }

    fn load_cached(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the file is one this host wrote with `Component::serialize` for an engine
        // with the same compatibility hash (part of the name); nobody else writes the cache dir.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cached plugin artifact unusable; recompiling");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    fn store_cached(&self, path: &Path, component: &Component) {
        let bytes = match component.serialize() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot serialise compiled plugin; it will be recompiled next start");
                return;
            }
        };
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "cannot write plugin cache");
        } else {
            info!(path = %path.display(), bytes = bytes.len(), "compiled plugin cached");
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// SHA-256 of component bytes (hex): the cache key and the version's identity.
pub fn component_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How a call ended when it did not return normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Ran past the consume timeout and was stopped.
    Timeout,
    /// Trapped (panic, out of bounds, memory cap, …); the message says why.
    Trap(String),
}

/// A live, reusable instance of one deployed version.
pub struct Instance {
    store: Store<HostState>,
    bindings: Consumer,
    /// `consume-batch`, when exported (its type checked at instantiation).
    batch: Option<Func>,
    config: Arc<InstanceConfig>,
    deadline_ticks: u64,
}

impl Instance {
    /// Instantiates from the pre-linked component with the version's limits.
    pub fn new(engine: &Engine, pre: &PluginPre, config: Arc<InstanceConfig>) -> Result<Instance> {
        let stderr = MemoryOutputPipe::new(STDERR_KEEP);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(config.memory_bytes)
            .trap_on_grow_failure(true)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits,
            stderr,
            config: config.clone(),
            current: None,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        // Instantiation runs guest start code; give it the same deadline as a call.
        let deadline_ticks = config.timeout.as_millis().div_ceil(EPOCH_TICK.as_millis()) as u64 + 1;
        store.set_epoch_deadline(deadline_ticks);
        let cannot = |e: wasmtime::Error| {
            WharfError::internal(format!(
                "cannot instantiate plugin '{}' v{}: {e:#}",
                config.plugin, config.version
            ))
        };
        let instance = pre
            .consumer
            .instance_pre()
            .instantiate(&mut store)
            .map_err(cannot)?;
        let bindings = Consumer::new(&mut store, &instance).map_err(cannot)?;
        let batch = match &pre.batch {
            Some(index) => {
                let func = instance.get_func(&mut store, index).ok_or_else(|| {
                    WharfError::internal(format!(
                        "plugin '{}': consume-batch vanished",
                        config.plugin
                    ))
                })?;
                func.typed::<(&[wit::Message], &wit::Context), (Vec<wit::Action>,)>(&store)
                    .map_err(|e| {
                        WharfError::bad_request(format!(
                            "consume-batch of plugin '{}' has the wrong signature ({e:#}); it must be consume-batch(list<message>, context) -> list<action> as in wit/plugin.wit",
                            config.plugin
                        ))
                    })?;
                Some(func)
            }
            None => None,
        };
        Ok(Instance {
            store,
            bindings,
            batch,
            config,
            deadline_ticks,
        })
    }

    /// Calls `consume` for one message.
    pub fn consume(&mut self, message: &StoredMessage) -> std::result::Result<Outcome, Failure> {
        let msg = to_wit(message);
        let ctx = self.context(message);
        self.store.data_mut().current = Some(message.id);
        self.store.set_epoch_deadline(self.deadline_ticks);
        let res = self.bindings.call_consume(&mut self.store, &msg, &ctx);
        match res {
            Ok(a) => Ok(from_wit(a)),
            Err(e) => Err(self.failure(e)),
        }
    }

    /// True when the component exports `consume-batch`.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// Calls `consume-batch`; a wrong-length answer counts as reconsume-later for every message.
    /// A component without that export gets one `consume` per message, and the first failure
    /// fails the call (callers that must not fail untried messages check [`Self::has_batch`]).
    pub fn consume_batch(
        &mut self,
        messages: &[&StoredMessage],
    ) -> std::result::Result<Vec<Outcome>, Failure> {
        let Some(&first) = messages.first() else {
            return Ok(Vec::new());
        };
        let Some(func) = self.batch else {
            return messages.iter().map(|m| self.consume(m)).collect();
        };
        let msgs: Vec<wit::Message> = messages.iter().map(|m| to_wit(m)).collect();
        let ctx = self.context(first);
        self.store.data_mut().current = Some(first.id);
        self.store.set_epoch_deadline(self.deadline_ticks);
        let called = func
            .typed::<(&[wit::Message], &wit::Context), (Vec<wit::Action>,)>(&self.store)
            .and_then(|f: BatchFunc<'_>| f.call(&mut self.store, (&msgs, &ctx)))
            .map(|(actions,)| actions);
        match called {
            Ok(actions) if actions.len() == messages.len() => {
                Ok(actions.into_iter().map(from_wit).collect())
            }
            Ok(actions) => {
                warn!(
                    plugin = %self.config.plugin,
                    expected = messages.len(),
                    got = actions.len(),
                    "consume-batch answered the wrong number of actions; retrying the batch"
                );
                Ok(vec![Outcome::ReconsumeLater; messages.len()])
            }
            Err(e) => Err(self.failure(e)),
        }
    }

    fn context(&self, message: &StoredMessage) -> wit::Context {
        wit::Context {
            group: self.config.group.clone(),
            attempt: message.reconsume_times.saturating_add(1),
        }
    }

    fn failure(&mut self, e: wasmtime::Error) -> Failure {
        if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return Failure::Timeout;
        }
        // The full error carries a wasm backtrace; the trap kind and the guest's own words
        // (a Rust panic prints its message to stderr) say more in one log line.
        let what = match e.downcast_ref::<Trap>() {
            Some(t) => t.to_string(),
            None => e.to_string(),
        };
        let stderr = self.store.data().stderr.contents();
        let stderr = String::from_utf8_lossy(&stderr);
        let said: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        match said.len() {
            0 => Failure::Trap(what),
            n => Failure::Trap(format!(
                "{what}; guest stderr: {}",
                said[n.saturating_sub(3)..].join(" | ")
            )),
        }
    }
}

fn from_wit(a: wit::Action) -> Outcome {
    match a {
        wit::Action::CommitMessage => Outcome::CommitMessage,
        wit::Action::ReconsumeLater => Outcome::ReconsumeLater,
    }
}

/// Packs keys and user properties in RocketMQ's property encoding (the tag travels on its own):
/// one buffer into the guest instead of one allocation per string.
pub fn pack_meta(message: &StoredMessage) -> Vec<u8> {
    let keys = || message.keys.iter().map(String::as_str);
    let props = || {
        message
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    };
    let mut meta = Vec::with_capacity(properties::message_len(None, keys(), props()));
    properties::encode_message(&mut meta, None, keys(), props());
    meta
}

fn to_wit(m: &StoredMessage) -> wit::Message {
    let id = m.id.0;
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&id[..8]);
    lo.copy_from_slice(&id[8..]);
    wit::Message {
        id: wit::MessageId {
            hi: u64::from_be_bytes(hi),
            lo: u64::from_be_bytes(lo),
        },
        topic: m.topic.clone(),
        tag: m.tag.clone(),
        meta: pack_meta(m),
        body: m.body.to_vec(),
        born_ms: m.born_ms,
        stored_ms: m.stored_ms,
        reconsume_times: m.reconsume_times,
        queue_id: m.queue_id,
        queue_offset: m.queue_offset.unwrap_or(0),
    }
}
