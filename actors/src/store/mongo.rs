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
//! A batch's write reads as its steps: [`MongoStore::upsert_devices`], then
//! [`MongoStore::give_devices`].

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
    Account, AccountKey, Device, Member, Members, OwnedDevice, Recorded, Sighting, Store,
    StoreError, User,
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

impl MongoStore {
    /// Writes the batch's devices (§5 step 1) in one round trip: an upsert per device,
    /// last-seen by `$max`. Returns each device's id (from the cache or the upsert) and
    /// the indexes of the writes the server refused.
    async fn upsert_devices(
        &self,
        known: &[(&Sighting, &CachedUser)],
    ) -> Result<(Vec<Option<ObjectId>>, Vec<usize>), StoreError> {
        let unknown_macs: Vec<&str> = {
            let cache = self.cache();
            known
                .iter()
                .map(|(s, _)| &*s.mac)
                .filter(|mac| !cache.devices.contains_key(*mac))
                .collect()
        };
        self.read_device_ids(unknown_macs).await?;
        let updates: Vec<Document> = known
            .iter()
            .map(|(s, _)| {
                doc! {
                    "q": { "macAddress": &*s.mac },
                    "u": {
                        "$set": { "hostName": &*s.host },
                        "$max": { "lastSeenDate": bson::DateTime::from_chrono(s.at) },
                        "$setOnInsert": { "__v": 0_i32 },
                    },
                    "upsert": true,
                }
            })
            .collect();
        let (reply, refused) = self
            .write(doc! { "update": "devices", "updates": updates, "ordered": false })
            .await?;
        let upserted = reply
            .get_array("upserted")
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut cache = self.cache();
        for u in upserted.iter().filter_map(|u| u.as_document()) {
            let index = u.get("index").and_then(bson_usize);
            if let (Some((s, _)), Ok(id)) =
                (index.and_then(|i| known.get(i)), u.get_object_id("_id"))
            {
                cache.devices.insert(s.mac.to_string(), id);
            }
        }
        let ids = known
            .iter()
            .map(|(s, _)| cache.devices.get(&*s.mac).copied())
            .collect();
        Ok((ids, refused))
    }

    /// Gives each (user, device) pair's device to its user (§5 steps 2-3): pulled from
    /// whoever else lists it, added to the user's `allDevices`; one round trip.
    async fn give_devices(&self, moves: Vec<(ObjectId, ObjectId)>) -> Result<(), StoreError> {
        if moves.is_empty() {
            return Ok(());
        }
        let statements: Vec<Document> = moves
            .iter()
            .flat_map(|&(user, device)| {
                [
                    doc! {
                        "q": { "allDevices": device, "_id": { "$ne": user } },
                        "u": { "$pull": { "allDevices": device } },
                        "multi": true,
                    },
                    doc! {
                        "q": { "_id": user },
                        "u": { "$addToSet": { "allDevices": device } },
                    },
                ]
            })
            .collect();
        self.write(doc! { "update": "users", "updates": statements, "ordered": false })
            .await?;
        let mut cache = self.cache();
        for (user_id, device) in moves {
            for user in cache.users.values_mut() {
                if user.id == user_id {
                    user.devices.insert(device);
                } else {
                    user.devices.remove(&device);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MongoStore {
    async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        let users = self.batch_users(batch).await?;
        let known: Vec<(&Sighting, &CachedUser)> = batch
            .iter()
            .filter_map(|s| users.get(&*s.uuid).map(|u| (s, u)))
            .collect();
        let mut recorded = Recorded {
            written: known.len(),
            unknown_user: batch.len() - known.len(),
            refused: 0,
        };
        if known.is_empty() {
            return Ok(recorded);
        }
        let (ids, refused) = self.upsert_devices(&known).await?;
        recorded.refused = refused.len();
        recorded.written -= refused.len();
        // Ownership (§5 steps 2-3): a device not yet in its user's allDevices moves.
        let mut moves: Vec<(ObjectId, ObjectId)> = Vec::new();
        for (index, ((_, user), id)) in known.iter().zip(&ids).enumerate() {
            if refused.contains(&index) {
                continue;
            }
            let Some(id) = *id else {
                recorded.written -= 1; // cannot happen: upserted or found above
                continue;
            };
            if !user.devices.contains(&id) && !moves.contains(&(user.id, id)) {
                moves.push((user.id, id));
            }
        }
        self.give_devices(moves).await?;
        Ok(recorded)
    }

    async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
        let users = self.batch_users(batch).await?;
        let known: Vec<(&Sighting, &CachedUser)> = batch
            .iter()
            .filter_map(|s| users.get(&*s.uuid).map(|u| (s, u)))
            .collect();
        let mut recorded = Recorded {
            written: 0,
            unknown_user: batch.len() - known.len(),
            refused: 0,
        };
        if known.is_empty() {
            return Ok(recorded);
        }
        // Only a device its user lists: never inserted, never moved.
        let updates: Vec<Document> = known
            .iter()
            .map(|(s, user)| {
                let listed: Vec<ObjectId> = user.devices.iter().copied().collect();
                doc! {
                    "q": { "macAddress": &*s.mac, "_id": { "$in": listed } },
                    "u": {
                        "$set": { "hostName": &*s.host },
                        "$max": { "lastSeenDate": bson::DateTime::from_chrono(s.at) },
                    },
                    "upsert": false,
                }
            })
            .collect();
        let (reply, refused) = self
            .write(doc! { "update": "devices", "updates": updates, "ordered": false })
            .await?;
        let matched = reply.get("n").and_then(bson_usize).unwrap_or(0);
        recorded.written = matched;
        recorded.refused = known.len().saturating_sub(matched).max(refused.len());
        Ok(recorded)
    }

    async fn members(&self, with_devices: bool) -> Result<Members, StoreError> {
        self.check_reachable()?;
        let users = self
            .collect(
                self.users
                    .find(doc! {})
                    .projection(doc! { "uuid": 1, "username": 1, "admin": 1, "allDevices": 1 }),
            )
            .await?;
        let macs: HashMap<ObjectId, String> = if with_devices {
            let devices = self
                .collect(
                    self.devices
                        .find(doc! {})
                        .projection(doc! { "macAddress": 1 }),
                )
                .await?;
            devices
                .iter()
                .filter_map(|d| {
                    Some((
                        d.get_object_id("_id").ok()?,
                        d.get_str("macAddress").ok()?.to_owned(),
                    ))
                })
                .collect()
        } else {
            HashMap::new()
        };
        Ok(users
            .iter()
            .filter_map(|u| {
                let member = Member {
                    username: u.get_str("username").unwrap_or_default().to_owned(),
                    admin: u.get_bool("admin").unwrap_or(false),
                    devices: object_ids(u.get("allDevices"))
                        .iter()
                        .filter_map(|id| macs.get(id).cloned())
                        .collect(),
                };
                Some((u.get_str("uuid").ok()?.to_owned(), member))
            })
            .collect())
    }

    async fn remove_device(&self, mac: &str) -> Result<bool, StoreError> {
        let Some(device) = self
            .devices
            .find_one_and_delete(doc! { "macAddress": mac })
            .await
            .map_err(unavailable)?
        else {
            return Ok(false);
        };
        if let Ok(id) = device.get_object_id("_id") {
            self.users
                .update_many(
                    doc! { "allDevices": id },
                    doc! { "$pull": { "allDevices": id } },
                )
                .await
                .map_err(unavailable)?;
        }
        self.cache().devices.remove(mac);
        Ok(true)
    }

    async fn remove_user(&self, username: &str) -> Result<bool, StoreError> {
        let gone = self
            .users
            .delete_one(doc! { "username": username })
            .await
            .map_err(unavailable)?;
        Ok(gone.deleted_count > 0)
    }

    async fn set_admin(&self, username: &str, admin: bool) -> Result<bool, StoreError> {
        let set = self
            .users
            .update_one(
                doc! { "username": username },
                doc! { "$set": { "admin": admin } },
            )
            .await
            .map_err(unavailable)?;
        Ok(set.matched_count > 0)
    }

    fn forget_users(&self, uuids: &[String]) {
        let mut cache = self.cache();
        for uuid in uuids {
            cache.users.remove(uuid);
            cache.answers.remove(uuid);
        }
    }

    async fn user_exists(&self, uuid: &str) -> Result<bool, StoreError> {
        if let Some(user) = self.cache().users.get(uuid) {
            if user.read_at.elapsed() < USER_TTL {
                return Ok(true);
            }
        }
        self.check_reachable()?;
        Ok(self
            .read_users(&[uuid.to_owned()])
            .await?
            .contains_key(uuid))
    }

    async fn account(&self, key: AccountKey<'_>) -> Result<Option<Account>, StoreError> {
        self.check_reachable()?;
        let filter = match key {
            AccountKey::Uuid(uuid) => doc! { "uuid": uuid },
            AccountKey::Username(name) => doc! { "username": name },
        };
        let find = self
            .users
            .find(filter)
            .projection(doc! { "uuid": 1, "username": 1, "admin": 1 })
            .limit(1);
        let docs = self.collect(find).await?;
        Ok(docs.first().map(|d| Account {
            uuid: d.get_str("uuid").unwrap_or_default().to_owned(),
            username: d.get_str("username").unwrap_or_default().to_owned(),
            admin: d.get_bool("admin").unwrap_or(false),
        }))
    }

    async fn user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError> {
        match self.fetch_user_devices(uuid).await {
            Ok(answer) => {
                let mut cache = self.cache();
                match &answer {
                    Some(devices) => cache.answers.insert(uuid.to_owned(), devices.clone()),
                    None => cache.answers.remove(uuid),
                };
                Ok(answer)
            }
            Err(e) => match self.cache().answers.get(uuid) {
                Some(devices) => Ok(Some(devices.clone())),
                None => Err(e),
            },
        }
    }

    async fn add_user(&self, username: &str, uuid: &str) -> Result<(), StoreError> {
        let taken = self
            .users
            .find_one(doc! { "$or": [ { "username": username }, { "uuid": uuid } ] })
            .await
            .map_err(unavailable)?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "a user named {username:?} or with uuid {uuid} already exists"
            )));
        }
        self.users
            .insert_one(doc! {
                "uuid": uuid,
                "username": username,
                "admin": false,
                "allDevices": [],
            })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        let docs = self
            .collect(
                self.users
                    .find(doc! {})
                    .projection(doc! { "uuid": 1, "username": 1, "admin": 1, "allDevices": 1 }),
            )
            .await?;
        Ok(docs
            .iter()
            .map(|d| User {
                uuid: d.get_str("uuid").unwrap_or_default().to_owned(),
                username: d.get_str("username").unwrap_or_default().to_owned(),
                admin: d.get_bool("admin").unwrap_or(false),
                devices: object_ids(d.get("allDevices")).len(),
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong = self.db.run_command(doc! { "ping": 1 }).await;
        self.health.watch(pong).map(drop).map_err(unavailable)
    }

    async fn devices(&self, owner: Option<&str>) -> Result<Vec<OwnedDevice>, StoreError> {
        let filter = owner.map_or_else(Document::new, |uuid| doc! { "uuid": uuid });
        let users = self
            .collect(
                self.users
                    .find(filter)
                    .projection(doc! { "uuid": 1, "allDevices": 1 }),
            )
            .await?;
        let mut owners: HashMap<ObjectId, String> = HashMap::new();
        let mut order: Vec<ObjectId> = Vec::new();
        for u in &users {
            for id in object_ids(u.get("allDevices")) {
                owners.insert(id, u.get_str("uuid").unwrap_or_default().to_owned());
                order.push(id);
            }
        }
        let mut found = if owner.is_some() {
            self.read_devices(&order).await?
        } else {
            let all = self.collect(self.devices.find(doc! {})).await?;
            let mut found = HashMap::new();
            for d in &all {
                if let (Ok(id), Some(device)) = (d.get_object_id("_id"), device_from_doc(d)) {
                    if !owners.contains_key(&id) {
                        order.push(id);
                    }
                    found.insert(id, device);
                }
            }
            found
        };
        Ok(order
            .iter()
            .filter_map(|id| {
                Some(OwnedDevice {
                    device: found.remove(id)?,
                    owner: owners.get(id).cloned(),
                })
            })
            .collect())
    }

    async fn write_audit(&self, batch: &AuditBatch) -> Result<(), StoreError> {
        if !batch.tunnels.is_empty() {
            let updates: Vec<Document> = batch
                .tunnels
                .iter()
                .map(|t| {
                    let mut fields = tunnel_doc(t);
                    fields.remove("_id");
                    doc! { "q": { "_id": &t.id }, "u": { "$set": fields }, "upsert": true }
                })
                .collect();
            self.write(doc! { "update": AUDIT_TUNNELS, "updates": updates, "ordered": false })
                .await?;
        }
        for (collection, documents) in [
            (
                AUDIT_DEVICES,
                batch.events.iter().map(event_doc).collect::<Vec<_>>(),
            ),
            (
                AUDIT_REFUSALS,
                batch.refusals.iter().map(refusal_doc).collect(),
            ),
        ] {
            if !documents.is_empty() {
                self.write(doc! { "insert": collection, "documents": documents, "ordered": false })
                    .await?;
            }
        }
        Ok(())
    }

    async fn audit_tunnels(&self, filter: &Filter) -> Result<Vec<TunnelRecord>, StoreError> {
        let mut clauses = Vec::new();
        if let Some(uuid) = &filter.uuid {
            clauses.push(doc! { "uuid": uuid });
        }
        if let Some(mac) = &filter.mac {
            clauses.push(doc! { "$or": [ { "device": mac }, { "peerDevice": mac } ] });
        }
        if let Some(since) = filter.since {
            let since = bson::DateTime::from_chrono(since);
            clauses.push(doc! { "$or": [ { "closed": null }, { "closed": { "$gte": since } } ] });
        }
        let docs = self
            .newest_first(&self.audit_tunnels, clauses, "opened", filter)
            .await?;
        Ok(docs.iter().filter_map(tunnel_from_doc).collect())
    }

    async fn audit_devices(&self, filter: &Filter) -> Result<Vec<DeviceEvent>, StoreError> {
        let clauses = at_clauses(filter, "mac");
        let docs = self
            .newest_first(&self.audit_devices, clauses, "at", filter)
            .await?;
        Ok(docs.iter().filter_map(event_from_doc).collect())
    }

    async fn audit_refusals(&self, filter: &Filter) -> Result<Vec<RefusalRecord>, StoreError> {
        let clauses = at_clauses(filter, "device");
        let docs = self
            .newest_first(&self.audit_refusals, clauses, "at", filter)
            .await?;
        Ok(docs.iter().filter_map(refusal_from_doc).collect())
    }

    async fn audit_size(&self) -> Result<AuditSize, StoreError> {
        self.check_reachable()?;
        let count = |coll: &Collection<Document>| {
            let coll = coll.clone();
            async move {
                self.health
                    .watch(coll.estimated_document_count().await)
                    .map_err(unavailable)
            }
        };
        Ok(AuditSize {
            tunnels: count(&self.audit_tunnels).await?,
            device_events: count(&self.audit_devices).await?,
            refusals: count(&self.audit_refusals).await?,
        })
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let before = bson::DateTime::from_chrono(before);
        let tunnels = self
            .health
            .watch(
                self.audit_tunnels
                    .delete_many(doc! { "$or": [
                        { "closed": { "$lt": before } },
                        { "closed": null, "opened": { "$lt": before } },
                    ] })
                    .await,
            )
            .map_err(unavailable)?;
        let mut deleted = tunnels.deleted_count;
        for coll in [&self.audit_devices, &self.audit_refusals] {
            let gone = self
                .health
                .watch(coll.delete_many(doc! { "at": { "$lt": before } }).await)
                .map_err(unavailable)?;
            deleted += gone.deleted_count;
        }
        Ok(deleted)
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

fn device_from_doc(d: &Document) -> Option<Device> {
    Some(Device {
        host: d.get_str("hostName").unwrap_or_default().to_owned(),
        mac: d.get_str("macAddress").ok()?.to_owned(),
        last_seen: d.get_datetime("lastSeenDate").ok()?.to_chrono(),
    })
}

/// One filter of all `clauses` (none: everything).
fn all_of(clauses: Vec<Document>) -> Document {
    match clauses.len() {
        0 => Document::new(),
        1 => clauses.into_iter().next().unwrap_or_default(),
        _ => doc! { "$and": clauses },
    }
}

fn tunnel_doc(t: &TunnelRecord) -> Document {
    doc! {
        "_id": &t.id,
        "node": &t.node,
        "uuid": &t.uuid,
        "device": &t.device,
        "deviceAddress": &t.device_addr,
        "peerDevice": t.peer_device.as_deref(),
        "clientAddress": &t.client_addr,
        "clientCertificate": t.client_cert.as_deref(),
        "clientCertificateSerial": t.client_cert_serial.as_deref(),
        "opened": bson::DateTime::from_chrono(t.opened),
        "closed": t.closed.map(bson::DateTime::from_chrono),
        "cause": t.cause.as_deref(),
        "bytesToDevice": i64::try_from(t.to_device).unwrap_or(i64::MAX),
        "bytesFromDevice": i64::try_from(t.from_device).unwrap_or(i64::MAX),
    }
}

fn tunnel_from_doc(d: &Document) -> Option<TunnelRecord> {
    let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
    let count = |key: &str| d.get(key).and_then(bson_usize).unwrap_or(0) as u64;
    Some(TunnelRecord {
        id: text("_id")?,
        node: text("node").unwrap_or_default(),
        uuid: text("uuid").unwrap_or_default(),
        device: text("device").unwrap_or_default(),
        device_addr: text("deviceAddress").unwrap_or_default(),
        peer_device: text("peerDevice"),
        client_addr: text("clientAddress").unwrap_or_default(),
        client_cert: text("clientCertificate"),
        client_cert_serial: text("clientCertificateSerial"),
        opened: d.get_datetime("opened").ok()?.to_chrono(),
        closed: d.get_datetime("closed").ok().map(|c| c.to_chrono()),
        cause: text("cause"),
        to_device: count("bytesToDevice"),
        from_device: count("bytesFromDevice"),
    })
}

fn event_doc(e: &DeviceEvent) -> Document {
    doc! {
        "at": bson::DateTime::from_chrono(e.at),
        "node": &e.node,
        "uuid": &e.uuid,
        "mac": &e.mac,
        "host": &e.host,
        "change": e.change.label(),
        "address": &e.address,
        "cause": e.cause.as_deref(),
    }
}

fn event_from_doc(d: &Document) -> Option<DeviceEvent> {
    let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
    Some(DeviceEvent {
        at: d.get_datetime("at").ok()?.to_chrono(),
        node: text("node").unwrap_or_default(),
        uuid: text("uuid").unwrap_or_default(),
        mac: text("mac").unwrap_or_default(),
        host: text("host").unwrap_or_default(),
        change: DeviceChange::parse(d.get_str("change").ok()?)?,
        address: text("address").unwrap_or_default(),
        cause: text("cause"),
    })
}

/// The filter's clauses for an audit collection of records at one time (`at`),
/// the device named in `device_field`.
fn at_clauses(filter: &Filter, device_field: &str) -> Vec<Document> {
    let mut clauses = Vec::new();
    if let Some(uuid) = &filter.uuid {
        clauses.push(doc! { "uuid": uuid });
    }
    if let Some(mac) = &filter.mac {
        clauses.push(doc! { device_field: mac });
    }
    if let Some(since) = filter.since {
        clauses.push(doc! { "at": { "$gte": bson::DateTime::from_chrono(since) } });
    }
    clauses
}

fn refusal_doc(r: &RefusalRecord) -> Document {
    doc! {
        "at": bson::DateTime::from_chrono(r.at),
        "node": &r.node,
        "request": r.request.label(),
        "uuid": r.uuid.as_deref(),
        "device": r.device.as_deref(),
        "reason": &r.reason,
        "detail": &r.detail,
        "source": &r.source,
        "certificate": r.certificate.as_deref(),
        "certificateSerial": r.certificate_serial.as_deref(),
    }
}

fn refusal_from_doc(d: &Document) -> Option<RefusalRecord> {
    let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
    Some(RefusalRecord {
        at: d.get_datetime("at").ok()?.to_chrono(),
        node: text("node").unwrap_or_default(),
        request: Attempt::parse(d.get_str("request").ok()?)?,
        uuid: text("uuid"),
        device: text("device"),
        reason: text("reason").unwrap_or_default(),
        detail: text("detail").unwrap_or_default(),
        source: text("source").unwrap_or_default(),
        certificate: text("certificate"),
        certificate_serial: text("certificateSerial"),
    })
}
