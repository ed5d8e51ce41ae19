//! Broker core: topics and groups, the send path, queries, and the consumption engine.
//!
//! Every front end (HTTP, plugins, later MQTT and remoting) calls this API; none touches the store.

pub mod api;
pub mod config;
pub mod consume;
pub mod deployments;
pub mod query;
pub mod resources;
pub mod send;
pub mod specs;

use std::sync::Arc;

use parking_lot::RwLock;
use tracing::info;

use crate::clock::SharedClock;
use crate::error::Result;
use crate::store::Store;

pub use config::BrokerConfig;
pub use query::{Delivery, DeliveryStatus, MessageView};
pub use send::SendReceipt;
pub use specs::{ConsumeModel, Group, GroupKind, GroupSpec, Topic, TopicSpec, TopicType};
pub use specs::{OutgoingMessage, QueueChoice};

/// The broker: owns the resource registry and the consumption engine, over one store.
pub struct Broker {
    store: Arc<dyn Store>,
    clock: SharedClock,
    config: BrokerConfig,
    registry: RwLock<resources::Registry>,
    /// Serialises topic and group writes, so "exists?" and "store it" are one step: two
    /// concurrent creates of one name must give one 201 and one 409, and a delete must not
    /// race an update into resurrecting the resource.
    registry_writes: tokio::sync::Mutex<()>,
    engine: consume::Engine,
    /// This host's identity for this boot: receipts, leases and member rows carry it.
    host_id: String,
}

impl Broker {
    /// Loads topics and groups from the store and starts background tasks (timers, retention, engine).
    pub async fn open(
        config: BrokerConfig,
        store: Arc<dyn Store>,
        clock: SharedClock,
    ) -> Result<Arc<Broker>> {
        // Watch before loading, so a change another host makes meanwhile is not missed.
        let watches = resources::RegistryWatches::new(store.as_ref());
        let registry = resources::Registry::load(store.as_ref()).await?;
        info!(
            topics = registry.topics.len(),
            groups = registry.groups.len(),
            "broker registry loaded"
        );
        let engine = consume::Engine::new(store.clone());
        let broker = Arc::new(Broker {
            store,
            clock,
            config,
            registry: RwLock::new(registry),
            registry_writes: tokio::sync::Mutex::new(()),
            engine,
            host_id: host_identity(),
        });
        consume::Engine::start(&broker);
        resources::spawn_sync(&broker, watches);
        Ok(broker)
    }

    /// The store underneath (for metrics and the bench only; front ends must not use it).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The injected clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// This host's identity for this boot (`<hostname>#<boot>`): a new boot gets a new one, so
    /// receipts, leases and member rows from before a restart are told apart.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Broker settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The consumption engine.
    pub fn engine(&self) -> &consume::Engine {
        &self.engine
    }

    /// Flushes the store and stops background work (graceful shutdown).
    pub async fn shutdown(&self) -> Result<()> {
        self.engine.shutdown().await;
        // Hand the queues to the other hosts now rather than when the leases expire.
        self.release_all_leases().await;
        self.store.close().await
    }
}

/// `<hostname>#<random boot id>`: stable enough to read in logs, unique per boot.
fn host_identity() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() && c != '#'))
        .unwrap_or_else(|| "wharf".to_string());
    format!("{name}#{:08x}", rand::random::<u32>())
}
