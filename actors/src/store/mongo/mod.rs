//! The MongoDB store: the database shared with the Elfin Connect Web UI.
//!
//! Collections and fields are exactly those of `docs/PROTOCOL.md` §5: `users` (`uuid`,
//! `username`, `admin`, `allDevices`) and `devices` (`hostName`, `macAddress`,
//! `lastSeenDate`, `__v`). The gateway never touches `password`.
//!
//! A batch of sightings costs one round trip in steady state: one `update` command
//! with an unordered upsert per device (`$set` host, `$max` last-seen). What the
//! ownership rules need (users by uuid with their `allDevices`, device ids by mac) is
//! cached, so only a cache miss, a new device or an ownership change costs more: a
//! `find` for the missing users or devices, and one `update` of `users` that pulls
//! moved devices from their old owners and adds them to the new one. Cached users are
//! re-read after [`USER_TTL`], so edits made in the Web UI are picked up.
//!
//! When the database cannot be reached, reads fail fast (retrying at most every
//! [`PROBE_INTERVAL`]) and `user_devices` answers from the last reply it had; each
//! change of reachability is logged once.
//!
//! One file per role: the batched writes of sightings (`sightings.rs`: a batch's
//! write reads as its steps, `upsert_devices`, then `give_devices`), users and
//! devices (`directory.rs`), the audit trail (`audit.rs`); here the connection, the
//! caches they share and the reachability tracking.

mod audit;
mod directory;
mod sightings;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bson::oid::ObjectId;
use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Cursor, Database, IndexModel};
use tokio::time::Instant;

use super::{
    Account, AccountKey, AuditLog, Device, Directory, Member, Members, OwnedDevice, Recorded,
    Sighting, Sightings, StoreError, User,
};
use crate::audit::{
    Attempt, AuditBatch, AuditSize, DeviceChange, DeviceEvent, Filter, RefusalRecord, TunnelRecord,
};

/// How long a cached user (and its `allDevices`) is trusted before it is read again.
pub const USER_TTL: Duration = Duration::from_secs(60);
/// While the database is unreachable, how often a read tries it again.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Commands the driver sends on its own (handshakes, monitoring, cursor and session
/// clean-up): not round trips of the gateway's reads and writes, which is what the
/// tests and the benchmark count.
pub const HOUSEKEEPING_COMMANDS: &[&str] = &[
    "hello",
    "isMaster",
    "ismaster",
    "ping",
    "endSessions",
    "killCursors",
    "buildInfo",
];

/// The audit trail's collections: the gateway's own, which the Web UI ignores.
pub const AUDIT_TUNNELS: &str = "gatewayAuditTunnels";
pub const AUDIT_DEVICES: &str = "gatewayAuditDevices";
pub const AUDIT_REFUSALS: &str = "gatewayAuditRefusals";

pub struct MongoStore {
    db: Database,
    users: Collection<Document>,
    devices: Collection<Document>,
    audit_tunnels: Collection<Document>,
    audit_devices: Collection<Document>,
    audit_refusals: Collection<Document>,
    cache: Mutex<Cache>,
    health: Health,
}

#[derive(Default)]
struct Cache {
    users: HashMap<String, CachedUser>,
    /// mac -> device `_id`.
    devices: HashMap<String, ObjectId>,
    /// The last `user_devices` answer per uuid, for when the database is unreachable.
    answers: HashMap<String, Vec<Device>>,
}

#[derive(Clone)]
struct CachedUser {
    id: ObjectId,
    devices: HashSet<ObjectId>,
    read_at: Instant,
}

impl MongoStore {
    /// Connects lazily: the driver reaches the server on first use, so the gateway
    /// starts even when MongoDB is down.
    pub async fn connect(
        uri: &str,
        database: &str,
        connect_timeout: Duration,
        server_selection_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| StoreError::Unusable(format!("mongodb.uri: {e}")))?;
        options.app_name = Some("elfin-gateway".into());
        options.connect_timeout = Some(connect_timeout);
        options.server_selection_timeout = Some(server_selection_timeout);
        Self::with_options(options, database)
    }

    /// Uses prepared driver options (tests attach a command monitor this way).
    pub fn with_options(options: ClientOptions, database: &str) -> Result<Self, StoreError> {
        let client = Client::with_options(options).map_err(unavailable)?;
        let db = client.database(database);
        Ok(Self {
            users: db.collection("users"),
            devices: db.collection("devices"),
            audit_tunnels: db.collection(AUDIT_TUNNELS),
            audit_devices: db.collection(AUDIT_DEVICES),
            audit_refusals: db.collection(AUDIT_REFUSALS),
            db,
            cache: Mutex::default(),
            health: Health::default(),
        })
    }

    /// Creates the indexes the gateway's queries use, if missing. An index the Web UI
    /// made on the same key with other options is left as it is.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let indexes = [
            (&self.users, doc! { "uuid": 1 }),
            (&self.devices, doc! { "macAddress": 1 }),
            (&self.audit_tunnels, doc! { "opened": -1 }),
            (&self.audit_tunnels, doc! { "uuid": 1, "opened": -1 }),
            (&self.audit_tunnels, doc! { "device": 1, "opened": -1 }),
            (&self.audit_tunnels, doc! { "peerDevice": 1, "opened": -1 }),
            (&self.audit_devices, doc! { "at": -1 }),
            (&self.audit_devices, doc! { "uuid": 1, "at": -1 }),
            (&self.audit_devices, doc! { "mac": 1, "at": -1 }),
            (&self.audit_refusals, doc! { "at": -1 }),
            (&self.audit_refusals, doc! { "uuid": 1, "at": -1 }),
            (&self.audit_refusals, doc! { "device": 1, "at": -1 }),
        ];
        for (coll, keys) in indexes {
            let index = IndexModel::builder().keys(keys).build();
            match self.health.watch(coll.create_index(index).await) {
                Ok(_) => {}
                // IndexOptionsConflict / IndexKeySpecsConflict: an equivalent index exists.
                Err(e) if matches!(command_error_code(&e), Some(85 | 86)) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(())
    }

    /// Retries [`MongoStore::ensure_indexes`] in the background until it succeeds.
    pub fn ensure_indexes_in_background(self: &Arc<Self>) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(500);
            while let Err(e) = store.ensure_indexes().await {
                log::debug!("cannot create indexes yet: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// Runs a `find` and collects all its documents, noting reachability.
    async fn collect(
        &self,
        find: impl std::future::IntoFuture<Output = mongodb::error::Result<Cursor<Document>>>,
    ) -> Result<Vec<Document>, StoreError> {
        let cursor = self.health.watch(find.await).map_err(unavailable)?;
        self.health
            .watch(cursor.try_collect().await)
            .map_err(unavailable)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the given users, replacing their cache entries; returns those found.
    async fn read_users(
        &self,
        uuids: &[String],
    ) -> Result<HashMap<String, CachedUser>, StoreError> {
        let docs = self
            .collect(
                self.users
                    .find(doc! { "uuid": { "$in": uuids } })
                    .projection(doc! { "uuid": 1, "allDevices": 1 }),
            )
            .await?;
        let read_at = Instant::now();
        let found: HashMap<String, CachedUser> = docs
            .iter()
            .filter_map(|d| {
                Some((
                    d.get_str("uuid").ok()?.to_owned(),
                    CachedUser {
                        id: d.get_object_id("_id").ok()?,
                        devices: object_ids(d.get("allDevices")).into_iter().collect(),
                        read_at,
                    },
                ))
            })
            .collect();
        let mut cache = self.cache();
        for uuid in uuids {
            match found.get(uuid) {
                Some(user) => cache.users.insert(uuid.clone(), user.clone()),
                None => cache.users.remove(uuid),
            };
        }
        Ok(found)
    }

    /// The users of a batch, from the cache or (for misses and stale entries) read.
    async fn batch_users(
        &self,
        batch: &[Sighting],
    ) -> Result<HashMap<String, CachedUser>, StoreError> {
        let wanted: HashSet<&str> = batch.iter().map(|s| &*s.uuid).collect();
        let (mut users, missing) = {
            let cache = self.cache();
            let mut users = HashMap::new();
            let mut missing = Vec::new();
            for uuid in wanted {
                match cache.users.get(uuid) {
                    Some(u) if u.read_at.elapsed() < USER_TTL => {
                        users.insert(uuid.to_owned(), u.clone());
                    }
                    _ => missing.push(uuid.to_owned()),
                }
            }
            (users, missing)
        };
        if !missing.is_empty() {
            users.extend(self.read_users(&missing).await?);
        }
        Ok(users)
    }

    /// Learns the ids of devices not in the cache (those that exist).
    async fn read_device_ids(&self, macs: Vec<&str>) -> Result<(), StoreError> {
        if macs.is_empty() {
            return Ok(());
        }
        let docs = self
            .collect(
                self.devices
                    .find(doc! { "macAddress": { "$in": macs } })
                    .projection(doc! { "macAddress": 1 }),
            )
            .await?;
        let mut cache = self.cache();
        for d in docs {
            if let (Ok(mac), Ok(id)) = (d.get_str("macAddress"), d.get_object_id("_id")) {
                cache.devices.insert(mac.to_owned(), id);
            }
        }
        Ok(())
    }

    /// Runs a write command. Statements the server refused are returned with the
    /// reply (by index); a duplicate key (two writers inserting the same device at
    /// once) or a write concern error fails the whole write as transient, since
    /// repeating it succeeds.
    async fn write(&self, command: Document) -> Result<(Document, Vec<usize>), StoreError> {
        let reply = self
            .health
            .watch(self.db.run_command(command).await)
            .map_err(unavailable)?;
        if let Ok(concern) = reply.get_document("writeConcernError") {
            return Err(StoreError::Transient(format!("write concern: {concern}")));
        }
        let mut refused = Vec::new();
        for error in reply.get_array("writeErrors").into_iter().flatten() {
            let Some(error) = error.as_document() else {
                continue;
            };
            let code = error.get("code").and_then(bson_usize);
            if code == Some(11000) {
                return Err(StoreError::Transient(format!("write conflict: {error}")));
            }
            log::warn!("MongoDB refused a write, dropping it: {error}");
            refused.extend(error.get("index").and_then(bson_usize));
        }
        Ok((reply, refused))
    }

    /// The documents of `coll` matching all `clauses`, newest (by `time`) first, the
    /// filter's page of them.
    async fn newest_first(
        &self,
        coll: &Collection<Document>,
        clauses: Vec<Document>,
        time: &str,
        filter: &Filter,
    ) -> Result<Vec<Document>, StoreError> {
        self.check_reachable()?;
        self.collect(
            coll.find(all_of(clauses))
                .sort(doc! { time: -1, "_id": -1 })
                .skip(filter.offset as u64)
                .limit(i64::try_from(filter.limit).unwrap_or(i64::MAX)),
        )
        .await
    }

    /// Fails fast while the database is known to be unreachable (between probes).
    fn check_reachable(&self) -> Result<(), StoreError> {
        if self.health.should_try() {
            Ok(())
        } else {
            Err(StoreError::Transient("MongoDB is unreachable".into()))
        }
    }

    async fn read_devices(
        &self,
        ids: &[ObjectId],
    ) -> Result<HashMap<ObjectId, Device>, StoreError> {
        let docs = self
            .collect(self.devices.find(doc! { "_id": { "$in": ids } }))
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| Some((d.get_object_id("_id").ok()?, device_from_doc(d)?)))
            .collect())
    }

    async fn fetch_user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError> {
        self.check_reachable()?;
        let user = self
            .health
            .watch(
                self.users
                    .find_one(doc! { "uuid": uuid })
                    .projection(doc! { "allDevices": 1 })
                    .await,
            )
            .map_err(unavailable)?;
        let Some(user) = user else {
            self.cache().users.remove(uuid);
            return Ok(None);
        };
        // allDevices in its stored order (the order devices were added).
        let order = object_ids(user.get("allDevices"));
        if let Ok(id) = user.get_object_id("_id") {
            let cached = CachedUser {
                id,
                devices: order.iter().copied().collect(),
                read_at: Instant::now(),
            };
            self.cache().users.insert(uuid.to_owned(), cached);
        }
        let mut found = self.read_devices(&order).await?;
        Ok(Some(
            order.iter().filter_map(|id| found.remove(id)).collect(),
        ))
    }
}

/// Tracks whether MongoDB is reachable and logs each change once.
#[derive(Default)]
struct Health {
    down: AtomicBool,
    ever_up: AtomicBool,
    last_try: Mutex<Option<Instant>>,
}

impl Health {
    fn watch<T>(&self, result: mongodb::error::Result<T>) -> mongodb::error::Result<T> {
        *self.last_try.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        match &result {
            Err(e) if is_connectivity(e) => {
                if !self.down.swap(true, Ordering::SeqCst) {
                    log::warn!("MongoDB is unreachable: {e}");
                }
            }
            _ => {
                if self.down.swap(false, Ordering::SeqCst) {
                    log::info!("MongoDB is reachable again");
                } else if !self.ever_up.swap(true, Ordering::SeqCst) {
                    log::info!("connected to MongoDB");
                }
            }
        }
        result
    }

    fn should_try(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
            || self
                .last_try
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|t| t.elapsed() >= PROBE_INTERVAL)
    }
}

fn is_connectivity(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(
        *e.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. }
    ) || e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
}

fn command_error_code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// Server codes that mean "not now" rather than "never": the node is unreachable,
/// stepping down, shutting down or out of time.
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 18, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

/// Unreachable, retryable, or a refusal that passes (authentication included: the
/// operator can fix credentials without losing what is pending) is transient; any
/// other error will not go away by repeating the request.
fn unavailable(e: mongodb::error::Error) -> StoreError {
    use mongodb::error::ErrorKind;
    let transient = is_connectivity(&e)
        || matches!(*e.kind, ErrorKind::Authentication { .. })
        || command_error_code(&e).is_some_and(|code| TRANSIENT_CODES.contains(&code));
    if transient {
        StoreError::Transient(e.to_string())
    } else {
        StoreError::Permanent(e.to_string())
    }
}

fn object_ids(value: Option<&Bson>) -> Vec<ObjectId> {
    match value {
        Some(Bson::Array(items)) => items.iter().filter_map(Bson::as_object_id).collect(),
        _ => Vec::new(),
    }
}

fn bson_usize(value: &Bson) -> Option<usize> {
    match value {
        Bson::Int32(i) => usize::try_from(*i).ok(),
        Bson::Int64(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

/// One filter of all `clauses` (none: everything).
fn all_of(clauses: Vec<Document>) -> Document {
    match clauses.len() {
        0 => Document::new(),
        1 => clauses.into_iter().next().unwrap_or_default(),
        _ => doc! { "$and": clauses },
    }
}

fn device_from_doc(d: &Document) -> Option<Device> {
    Some(Device {
        host: d.get_str("hostName").unwrap_or_default().to_owned(),
        mac: d.get_str("macAddress").ok()?.to_owned(),
        last_seen: d.get_datetime("lastSeenDate").ok()?.to_chrono(),
    })
}
