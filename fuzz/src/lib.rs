//! The host's pure parsers, compiled from their own source files under the module paths they
//! have in the host (`crate::error`, `crate::broker::specs`, ...), so the fuzz targets exercise
//! exactly the code the host runs without building its runtime (wasmtime, tokio, sqlx, axum).
//!
//! Only plain-data and parsing modules are listed; each module below is the host's file itself,
//! the inline `mod` blocks are just the namespaces those files name each other by.
#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../host/src/error.rs"]
pub mod error;
#[path = "../../host/src/model.rs"]
pub mod model;
#[path = "../../host/src/config.rs"]
pub mod config;

/// `crate::broker`: its config section and specs.
#[path = "../../host/src/broker"]
pub mod broker {
    #[path = "config.rs"]
    pub mod config;
    #[path = "specs.rs"]
    pub mod specs;
    pub use config::BrokerConfig;
    pub use specs::{ConsumeModel, OutgoingMessage, QueueChoice};

    /// `crate::broker::consume`: receipts.
    #[path = "consume"]
    pub mod consume {
        #[path = "receipt.rs"]
        pub mod receipt;
    }
}

/// `crate::store`: its config section, the embedded record format, the URL redaction.
#[path = "../../host/src/store"]
pub mod store {
    #[path = "config.rs"]
    mod config;
    pub use config::{Backend, FlushMode, PostgresConfig, StoreConfig};

    /// `crate::store::embedded`: the log record format.
    #[path = "embedded"]
    pub mod embedded {
        #[path = "record.rs"]
        pub mod record;
    }

    /// `crate::store::postgres`: only the password redaction the config uses.
    #[path = "postgres"]
    pub mod postgres {
        #[path = "secret.rs"]
        mod secret;
        pub use secret::redacted_url;
    }
}

/// `crate::plugin`: its config section and the manifest parser.
#[path = "../../host/src/plugin"]
pub mod plugin {
    #[path = "config.rs"]
    mod config;
    #[path = "manifest.rs"]
    pub mod manifest;
    pub use config::PluginsConfig;
}

/// `crate::mqtt`: topic filter validation (the config checks `deny_subscribe`).
#[path = "../../host/src/mqtt"]
pub mod mqtt {
    #[path = "topic.rs"]
    pub mod topic;
}

/// `crate::http`: the JSON body parser and the send body.
#[path = "../../host/src/http"]
pub mod http {
    #[path = "body.rs"]
    pub mod body;
    #[path = "messages.rs"]
    pub mod messages;
}
