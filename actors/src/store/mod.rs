//! The database behind the gateway: users, their devices, device sightings, and the
//! audit trail ([`crate::audit`]).
//!
//! Three roles, each a trait: [`Sightings`] (what the persistence actor writes in
//! batches), [`Directory`] (users, devices and accounts, read by admission, `query`,
//! the follower and the operator commands) and [`AuditLog`] (the audit trail).
//! [`Store`] is all three on one database. Two backends implement them: [`embedded`]
//! (SQLite in a local file, the default) and [`mongo`] (the schema shared with the Web
//! UI). Both follow the ownership rules of `docs/PROTOCOL.md` §5.

pub mod embedded;
pub mod mongo;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditBatch, AuditSize, DeviceEvent, Filter, RefusalRecord, TunnelRecord};
use crate::de;

/// A device was seen: what the persistence actor batches and the store records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub uuid: ByteString,
    pub mac: ByteString,
    pub host: ByteString,
    pub at: DateTime<Utc>,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub host: String,
    pub mac: String,
    pub last_seen: DateTime<Utc>,
}

/// A device with the uuid of the user listing it, for `device list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedDevice {
    pub device: Device,
    pub owner: Option<String>,
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uuid: String,
    pub username: String,
    pub admin: bool,
    pub devices: usize,
}

/// A user as a client certificate is checked against it (`auth.clients =
/// "user-cert"`): its name is the certificate's subject, an admin reaches every user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uuid: String,
    pub username: String,
    pub admin: bool,
}

/// A stored user as the gateway follows the database: name, admin flag and, when
/// asked for, the MACs of its devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    pub username: String,
    pub admin: bool,
    pub devices: std::collections::HashSet<String>,
}

/// Every stored user, by uuid.
pub type Members = std::collections::HashMap<String, Member>;

/// Which user to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKey<'a> {
    Uuid(&'a str),
    Username(&'a str),
}

/// What a batch write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Sightings written.
    pub written: usize,
    /// Sightings skipped because no user has their uuid (§5 rule 1).
    pub unknown_user: usize,
    /// Sightings the database refused for good (e.g. a document validator); the rest
    /// of the batch was written.
    pub refused: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is busy: the same request may succeed later,
    /// so a write is kept and retried.
    #[error("database unavailable: {0}")]
    Transient(String),
    /// The database refused the request and would refuse it again: a write is logged,
    /// counted and dropped, never retried.
    #[error("database refused the request: {0}")]
    Permanent(String),
    /// The request conflicts with what is stored (e.g. a duplicate user).
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be opened or configured at all (start-up).
    #[error("{0}")]
    Unusable(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

/// The `[storage]` section: which database the gateway uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub backend: Backend,
    /// The embedded store's file.
    pub path: PathBuf,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            path: "data/elfin.db".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// SQLite in one local file.
    Embedded,
    /// The MongoDB database shared with the Web UI.
    Mongodb,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Mongodb => "mongodb",
        })
    }
}

/// The `[mongodb]` section, used when `storage.backend = "mongodb"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mongodb {
    pub uri: SecretUri,
    pub database: String,
    #[serde(rename = "connect_timeout_ms", with = "de::positive_millis")]
    pub connect_timeout: Duration,
    #[serde(rename = "server_selection_timeout_ms", with = "de::positive_millis")]
    pub server_selection_timeout: Duration,
}

impl Default for Mongodb {
    fn default() -> Self {
        Self {
            uri: SecretUri("mongodb://localhost:27017".into()),
            database: "elfinconnect".into(),
            connect_timeout: Duration::from_secs(5),
            server_selection_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection string that may hold a password: shown masked in `Debug` (and so in
/// every log line and error that prints settings).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUri(String);

impl SecretUri {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUri {
    /// `scheme://user:****@host…`: the password, if any, is replaced.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = &self.0;
        let masked = uri.find("://").and_then(|scheme| {
            let rest = &uri[scheme + 3..];
            let at = rest.find('@')?;
            let colon = rest[..at].find(':')?;
            Some(format!(
                "{}{}:****{}",
                &uri[..scheme + 3],
                &rest[..colon],
                &rest[at..]
            ))
        });
        write!(f, "{:?}", masked.as_deref().unwrap_or(uri))
    }
}

/// Opens the configured store. For the gateway itself (`serving`), MongoDB indexes are
/// created in the background, so it starts even when MongoDB is down.
pub async fn open(
    storage: &Storage,
    mongodb: &Mongodb,
    serving: bool,
) -> Result<Arc<dyn Store>, StoreError> {
    match storage.backend {
        Backend::Embedded => Ok(Arc::new(embedded::EmbeddedStore::open(&storage.path)?)),
        Backend::Mongodb => {
            let store = Arc::new(
                mongo::MongoStore::connect(
                    mongodb.uri.expose(),
                    &mongodb.database,
                    mongodb.connect_timeout,
                    mongodb.server_selection_timeout,
                )
                .await?,
            );
            if serving {
                store.ensure_indexes_in_background();
            }
            Ok(store)
        }
    }
}

/// Device sightings, written in batches by the persistence actor.
#[async_trait]
pub trait Sightings: Send + Sync + 'static {
    /// Writes a batch of sightings (at most one per mac) following §5: unknown users
    /// are skipped, devices change owner, last-seen never moves backwards.
    async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError>;

    /// As [`Sightings::record`], but only for devices stored as their user's already:
    /// nothing is inserted or moved (`auth.devices = "registered"`, where a removed
    /// device's row must never come back).
    async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError>;
}

/// Users, their devices and accounts as the gateway reads them (and the operator
/// commands change them), and whether the database answers.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Whether a user with this uuid exists.
    async fn user_exists(&self, uuid: &str) -> Result<bool, StoreError>;

    /// One user, by uuid or by name.
    async fn account(&self, key: AccountKey<'_>) -> Result<Option<Account>, StoreError>;

    /// The user's devices in the order they were added, or `None` for an unknown user.
    async fn user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError>;

    /// Creates a user; fails with [`StoreError::Conflict`] if the name or uuid is taken.
    async fn add_user(&self, username: &str, uuid: &str) -> Result<(), StoreError>;

    async fn users(&self) -> Result<Vec<User>, StoreError>;

    /// All devices, or those of one user.
    async fn devices(&self, owner: Option<&str>) -> Result<Vec<OwnedDevice>, StoreError>;

    /// One round trip that touches the database, for the readiness check.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Every stored user, with its devices' MACs if `with_devices` (what the gateway
    /// re-reads to follow removals and changes made by any writer).
    async fn members(&self, with_devices: bool) -> Result<Members, StoreError>;

    /// Deletes the device with this MAC (and its place in its user's list); false if
    /// there is none.
    async fn remove_device(&self, mac: &str) -> Result<bool, StoreError>;

    /// Deletes the user with this name (its devices stay, owned by nobody); false if
    /// there is none.
    async fn remove_user(&self, username: &str) -> Result<bool, StoreError>;

    /// Sets the user's admin flag; false if there is no such user.
    async fn set_admin(&self, username: &str, admin: bool) -> Result<bool, StoreError>;

    /// Drops what the store caches about these users (they changed or are gone).
    fn forget_users(&self, _uuids: &[String]) {}
}

/// The audit trail ([`crate::audit`]): written in batches, read by the operator.
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    /// Writes audit records in one batch: tunnels by id (a later record of a tunnel
    /// replaces its earlier one), device events and refusals appended.
    async fn write_audit(&self, batch: &AuditBatch) -> Result<(), StoreError>;

    /// Tunnels of the filter's user and device (as either end of a `connthem`), open
    /// at or after `since`, newest first.
    async fn audit_tunnels(&self, filter: &Filter) -> Result<Vec<TunnelRecord>, StoreError>;

    /// Device events of the filter's user and device, at or after `since`, newest
    /// first.
    async fn audit_devices(&self, filter: &Filter) -> Result<Vec<DeviceEvent>, StoreError>;

    /// Refusals naming the filter's user and device, at or after `since`, newest
    /// first.
    async fn audit_refusals(&self, filter: &Filter) -> Result<Vec<RefusalRecord>, StoreError>;

    /// Deletes audit records that ended before `before`; answers how many.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// How many records the audit trail holds, by kind.
    async fn audit_size(&self) -> Result<AuditSize, StoreError>;
}

/// A whole backend: every role on one database. Each part of the gateway takes the
/// role it uses (an `Arc<dyn Store>` coerces to any of them).
pub trait Store: Sightings + Directory + AuditLog {}

impl<T: Sightings + Directory + AuditLog> Store for T {}
