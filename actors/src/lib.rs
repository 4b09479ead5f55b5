//! The Elfin Connect gateway's protocol codec, actors and storage.
//!
//! * [`frame`] splits a connection's bytes into protocol messages.
//! * [`session`] is the actor behind each TCP connection.
//! * [`registry`], [`bridge`], [`debouncer`] and [`persistence`] are the shared actors:
//!   live devices, tunnels, data-heartbeat timers and batched database writes.
//! * [`store`] is the database behind the persistence actor and the operator commands;
//!   [`users`] caches which uuids are known; [`query`] renders the `query` reply.
//!
//! [`Hub`] bundles what every session needs and starts the shared actors.

pub mod bridge;
pub mod clock;
pub mod debouncer;
pub mod frame;
pub mod persistence;
pub mod query;
pub mod registry;
pub mod session;
pub mod store;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use bridge::BridgeManager;
use debouncer::HeartbeatDebouncer;
use persistence::Persistence;
use query::QueryFormat;
use registry::DeviceRegistry;
use store::Store;
use users::UserDirectory;

/// Run-time settings of the protocol actors.
#[derive(Debug, Clone)]
pub struct Config {
    /// Refuse `connme`/`connthem`/`query` and ignore devices of unknown uuids.
    pub require_known_user: bool,
    pub query: QueryFormat,
    /// Period of the heartbeat debouncer's timers.
    pub debounce: Duration,
    pub flush_interval: Duration,
    pub max_batch: usize,
    /// Output queue of a connection, in chunks (each at most `read_buffer` bytes).
    pub out_queue: usize,
    /// Bytes read from a socket at a time.
    pub read_buffer: usize,
    /// How long a tunnel waits for a peer that reads nothing before closing.
    pub stall_timeout: Duration,
}

/// Handles to the shared actors and settings; cloned into every session.
#[derive(Clone)]
pub struct Hub {
    pub registry: Addr<DeviceRegistry>,
    pub bridge: Addr<BridgeManager>,
    pub debouncer: Addr<HeartbeatDebouncer>,
    pub persistence: Addr<Persistence>,
    pub store: Arc<dyn Store>,
    pub users: Arc<UserDirectory>,
    pub config: Arc<Config>,
    /// Cancelled at shutdown: sessions end their input and close.
    pub shutdown: CancellationToken,
    /// Held by every session; once all are dropped, every session has closed.
    pub alive: mpsc::Sender<()>,
}

impl Hub {
    /// Starts the shared actors on the current arbiter. The receiver yields `None` once
    /// this hub and all sessions started with it are gone.
    pub fn start(store: Arc<dyn Store>, config: Config) -> (Hub, mpsc::Receiver<()>) {
        let persistence =
            Persistence::new(store.clone(), config.flush_interval, config.max_batch).start();
        let debouncer =
            HeartbeatDebouncer::new(config.debounce, persistence.clone().recipient()).start();
        let (alive, all_closed) = mpsc::channel(1);
        let hub = Hub {
            registry: DeviceRegistry::default().start(),
            bridge: BridgeManager::default().start(),
            debouncer,
            persistence,
            users: Arc::new(UserDirectory::new(store.clone())),
            store,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            alive,
        };
        (hub, all_closed)
    }
}
