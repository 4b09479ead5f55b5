//! The [`Hub`]: handles to the shared actors and the run-time settings, cloned into
//! every session; and the flush that ends the gateway's life without losing a sighting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::bridge::BridgeManager;
use crate::cluster::Cluster;
use crate::debouncer::{FlushAll, HeartbeatDebouncer};
use crate::limits::{Admission, Limits, LookupGuard};
use crate::persistence::{Flush, Persistence};
use crate::query::QueryFormat;
use crate::registry::DeviceRegistry;
use crate::store::Store;
use crate::tls::{ClientPolicy, Tls};
use crate::users::UserDirectory;

/// Run-time settings of the gateway's library side.
#[derive(Debug, Clone)]
pub struct Config {
    /// Refuse `connme`/`connthem`/`query` and ignore devices of unknown uuids.
    pub require_known_user: bool,
    /// Tell "unknown user" apart from "device offline" in `failed` replies (helps
    /// whoever guesses uuids, so off by default).
    pub verbose_reasons: bool,
    /// Who may send `connme`, `connthem` and `query` over what.
    pub clients: ClientPolicy,
    /// TLS on the listener, if configured.
    pub tls: Option<Arc<Tls>>,
    pub limits: Limits,
    pub query: QueryFormat,
    /// Period of the heartbeat debouncer's timers.
    pub debounce: Duration,
    pub flush_interval: Duration,
    pub max_batch: usize,
    /// How long shutdown keeps trying to write pending sightings.
    pub shutdown_timeout: Duration,
    /// Output queue of a connection, in chunks (each at most `read_buffer` bytes).
    pub out_queue: usize,
    /// Bytes read from a socket at a time.
    pub read_buffer: usize,
    /// How long a tunnel waits for a peer that reads nothing before closing.
    pub stall_timeout: Duration,
    /// How long a payload tail that could start the next header waits for the rest.
    pub header_hold: Duration,
    /// TCP keepalive idle time; zero = off.
    pub keepalive: Duration,
    pub workers: Workers,
}

/// Where sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// On the arbiter that calls [`crate::serve`], with the shared actors: no thread
    /// hop at all (tests run this way, on a paused clock).
    Caller,
    /// On this many worker threads of their own, connections dealt round-robin.
    Threads(usize),
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
    /// Failed uuid look-ups per source address (abuse brake).
    pub lookups: Arc<LookupGuard>,
    /// Open connections, in all and per source address.
    pub admission: Arc<Admission>,
    /// Whether the server accepts connections (from start until shutdown begins).
    pub accepting: Arc<AtomicBool>,
    pub started: SystemTime,
    pub config: Arc<Config>,
    /// This node's member of a cluster, in cluster mode ([`crate::cluster`]).
    pub cluster: Option<Addr<Cluster>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("{0} sightings could not be written before the shutdown timeout")]
    Unwritten(usize),
    #[error("the persistence actor stopped before everything was written")]
    PersistenceGone,
}

impl Hub {
    /// Starts the shared actors on the current arbiter.
    pub fn start(store: Arc<dyn Store>, config: Config) -> Hub {
        let persistence =
            Persistence::new(store.clone(), config.flush_interval, config.max_batch).start();
        let debouncer =
            HeartbeatDebouncer::new(config.debounce, persistence.clone().recipient()).start();
        Hub {
            registry: DeviceRegistry::default().start(),
            bridge: BridgeManager::default().start(),
            debouncer,
            persistence,
            users: Arc::new(UserDirectory::new(store.clone(), config.require_known_user)),
            lookups: Arc::new(LookupGuard::new(
                config.limits.failed_lookups_per_min,
                config.limits.failed_lookup_delay,
            )),
            admission: Admission::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
            ),
            accepting: Arc::default(),
            started: SystemTime::now(),
            store,
            config: Arc::new(config),
            cluster: None,
        }
    }

    /// Whether the server accepts connections now.
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Persists every device the debouncer tracks and writes everything pending, for
    /// at most the shutdown timeout. Call it once no session is left.
    pub async fn shutdown(&self) -> Result<(), ShutdownError> {
        let _ = self.debouncer.send(FlushAll).await;
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout;
        loop {
            let unwritten = self
                .persistence
                .send(Flush)
                .await
                .map_err(|_| ShutdownError::PersistenceGone)?;
            if unwritten == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ShutdownError::Unwritten(unwritten));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
