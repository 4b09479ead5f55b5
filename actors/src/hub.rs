//! The [`Hub`]: handles to the shared actors and the run-time settings, cloned into
//! every session; and the flush that ends the gateway's life without losing a sighting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::audit::Trail;
use crate::audit_writer::AuditWriter;
use crate::bridge::{BridgeManager, Tunnels};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::debouncer::{FlushAll, HeartbeatDebouncer};
use crate::events::herald::{Drain, Herald, Joined};
use crate::events::webhook::Queue;
use crate::events::FleetEvents;
use crate::follow::Follower;
use crate::limits::{Admission, LookupGuard};
use crate::persistence::{Flush, Persistence};
use crate::refusal::Refusals;
use crate::registry::{AllLive, DeviceRegistry};
use crate::store::Store;
use crate::tenants::Devices;
use crate::tenants::Tenants;
use crate::users::UserDirectory;

/// Handles to the shared actors and settings; cloned into every session.
#[derive(Clone)]
pub struct Hub {
    pub registry: Addr<DeviceRegistry>,
    /// Re-reads users and registered devices so removals apply to open connections.
    pub follower: Addr<Follower>,
    pub bridge: Addr<BridgeManager>,
    pub debouncer: Addr<HeartbeatDebouncer>,
    pub persistence: Addr<Persistence>,
    /// Batches the audit trail's writes.
    pub audit_writer: Addr<AuditWriter>,
    pub store: Arc<dyn Store>,
    pub users: Arc<UserDirectory>,
    /// Failed uuid look-ups per source address (abuse brake).
    pub lookups: Arc<LookupGuard>,
    /// What each user may have: device limits, pacing and enrollment.
    pub tenants: Arc<Tenants>,
    /// Every refusal, counted and logged.
    pub refusals: Arc<Refusals>,
    /// The audit trail, where refusals are recorded too.
    pub trail: Trail,
    /// Open connections, in all and per source address.
    pub admission: Arc<Admission>,
    /// Whether the server accepts connections (from start until shutdown begins).
    pub accepting: Arc<AtomicBool>,
    pub started: SystemTime,
    pub config: Arc<Config>,
    /// This node's member of a cluster, in cluster mode ([`crate::cluster`]).
    pub cluster: Option<Addr<Cluster>>,
    /// Fleet events: devices offline and back, refusals, sent to webhooks.
    pub herald: Addr<Herald>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("{0} sightings and audit records could not be written before the shutdown timeout")]
    Unwritten(usize),
    #[error("the persistence actor stopped before everything was written")]
    PersistenceGone,
}

impl Hub {
    /// Starts the shared actors on the current arbiter, with fleet events sent
    /// nowhere (they are still counted and logged).
    pub fn start(store: Arc<dyn Store>, config: Config) -> Hub {
        Self::start_with_events(store, config, FleetEvents::default())
    }

    /// [`Hub::start`], fleet events sent to `events.endpoints`.
    pub fn start_with_events(store: Arc<dyn Store>, config: Config, events: FleetEvents) -> Hub {
        let batches = &config.persistence;
        let retention = Duration::from_secs(86_400 * u64::from(config.audit.retention_days.get()));
        let persistence = Persistence::new(
            store.clone(),
            batches.flush_interval,
            batches.max_batch.get(),
        )
        .existing_only(config.auth.devices == Devices::Registered)
        .start();
        let audit_writer = AuditWriter::new(
            store.clone(),
            batches.flush_interval,
            batches.max_batch.get(),
        )
        .with_retention(retention)
        .start();
        let node = crate::config::node_name(config.node.as_deref());
        let trail = Trail::new(
            audit_writer.clone().recipient(),
            &node,
            &config.audit,
            config.limits.ipv6_prefix,
        );
        let debouncer =
            HeartbeatDebouncer::new(config.heartbeat.debounce, persistence.clone().recipient())
                .start();
        let registry = DeviceRegistry::new(
            config.auth.device_takeover,
            config.heartbeat.online_window,
            trail.clone(),
        )
        .start();
        let users = Arc::new(UserDirectory::new(
            store.clone(),
            config.auth.require_known_user,
        ));
        let tenants = Arc::new(Tenants::new(
            store.clone(),
            config.auth.devices,
            &config.limits,
        ));
        let follower = Follower::new(
            store.clone(),
            registry.clone(),
            tenants.clone(),
            users.clone(),
            config.auth.devices == Devices::Registered,
            config.auth.require_known_user,
        )
        .start();
        let queues = events.endpoints.into_iter().map(Queue::start).collect();
        let herald = Herald::new(
            &node,
            events.settings.offline_after,
            config.heartbeat.debounce + config.heartbeat.online_window,
            users.clone(),
            store.clone(),
            registry.clone(),
            queues,
        )
        .start();
        Hub {
            audit_writer,
            herald,
            registry,
            follower,
            bridge: BridgeManager::new(trail.clone()).start(),
            trail,
            debouncer,
            persistence,
            users,
            tenants,
            refusals: Arc::new(Refusals::new(config.limits.ipv6_prefix)),
            lookups: Arc::new(LookupGuard::new(
                config.limits.failed_lookups_per_min,
                config.limits.failed_lookup_delay,
                config.limits.ipv6_prefix,
            )),
            admission: Admission::new(
                config.limits.max_connections.get(),
                config.limits.max_connections_per_ip.get(),
                config.limits.ipv6_prefix,
            ),
            accepting: Arc::default(),
            started: SystemTime::now(),
            store,
            config: Arc::new(config),
            cluster: None,
        }
    }

    /// Joins this node's member of the cluster: requests reach other nodes through
    /// it, and the fleet events keeper asks them before it speaks.
    pub fn join(&mut self, cluster: Addr<Cluster>) {
        self.herald.do_send(Joined(cluster.clone()));
        self.cluster = Some(cluster);
    }

    /// Whether the server accepts connections now.
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Persists every device the debouncer tracks and writes everything pending, for
    /// at most the shutdown timeout. Call it once no session is left.
    pub async fn shutdown(&self) -> Result<(), ShutdownError> {
        // The last sessions' tunnels and devices reach the audit trail: once the
        // bridge and the registry have answered, what the sessions told them is
        // handled and its records are queued at the persistence actor, ahead of the
        // flushes below. (Both are empty by now, so the answers cost nothing.)
        let _ = self.bridge.send(Tunnels).await;
        let _ = self.registry.send(AllLive).await;
        let _ = self.debouncer.send(FlushAll).await;
        let deadline = tokio::time::Instant::now() + self.config.persistence.shutdown_timeout;
        loop {
            let sightings = self.persistence.send(Flush);
            let records = self.audit_writer.send(Flush);
            let (sightings, records) = futures::join!(sightings, records);
            let unwritten = sightings
                .and_then(|s| records.map(|r| s + r))
                .map_err(|_| ShutdownError::PersistenceGone)?;
            if unwritten == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ShutdownError::Unwritten(unwritten));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Fleet events already decided go out too, within what is left of the time.
        let undelivered = self
            .herald
            .send(Drain { until: deadline })
            .await
            .unwrap_or(0);
        if undelivered > 0 {
            log::warn!(
                "{undelivered} webhook events were not delivered before the shutdown timeout \
                 (persistence.shutdown_timeout_secs)"
            );
        }
        Ok(())
    }
}
