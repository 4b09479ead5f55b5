//! The database behind the gateway: users, their devices, and device sightings.
//!
//! [`Store`] is what the persistence actor writes through and what `query` and the
//! operator commands read. Two backends implement it: [`embedded`] (SQLite in a local
//! file, the default) and [`mongo`] (the schema shared with the Web UI). Both follow the
//! ownership rules of `docs/PROTOCOL.md` §5.

pub mod embedded;
pub mod mongo;

use async_trait::async_trait;
use bytestring::ByteString;
use chrono::{DateTime, Utc};

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

/// What a batch write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Sightings written.
    pub written: usize,
    /// Sightings skipped because no user has their uuid (§5 rule 1).
    pub unknown_user: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed; the operation may succeed later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The request conflicts with what is stored (e.g. a duplicate user).
    #[error("{0}")]
    Conflict(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes a batch of sightings (at most one per mac) following §5: unknown users
    /// are skipped, devices change owner, last-seen never moves backwards.
    async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError>;

    /// Whether a user with this uuid exists.
    async fn user_exists(&self, uuid: &str) -> Result<bool, StoreError>;

    /// The user's devices in the order they were added, or `None` for an unknown user.
    async fn user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError>;

    /// Creates a user; fails with [`StoreError::Conflict`] if the name or uuid is taken.
    async fn add_user(&self, username: &str, uuid: &str) -> Result<(), StoreError>;

    async fn users(&self) -> Result<Vec<User>, StoreError>;

    /// All devices, or those of one user.
    async fn devices(&self, owner: Option<&str>) -> Result<Vec<OwnedDevice>, StoreError>;
}
