//! What each user (tenant) may have: its devices, at most
//! `limits.max_devices_per_user`; new ones (MACs not stored yet) after a burst only
//! `limits.new_devices_per_minute`; and under `auth.devices = "registered"` only those
//! already in the store.
//!
//! The uuid travels in clear text, so whoever sniffed one heartbeat can present it;
//! this is what bounds the devices, rows and memory one uuid can make the gateway hold.
//! A user's stored devices are read once, when its first device registers; devices
//! admitted since are added in memory. Devices already known reconnect without limit,
//! so a fleet reconnecting after a restart is never paced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::device::DeviceKey;
use crate::limits::{Limits, Rate, TokenBucket};
use crate::refusal::Reason;
use crate::store::Store;

/// Users tracked before guests (unknown users allowed by `auth.require_known_user =
/// false`, whose devices are never stored) are forgotten.
const MAX_USERS: usize = 100_000;

/// `auth.devices`: which devices may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Devices {
    /// Any MAC of a known user (deployed devices' behaviour).
    #[default]
    Open,
    /// Only devices already in the store (`device add`).
    Registered,
}

pub struct Tenants {
    store: Arc<dyn Store>,
    devices: Devices,
    max_devices: usize,
    /// New devices a user may add.
    new_devices: Rate,
    users: Mutex<HashMap<ByteString, Tenant>>,
}

struct Tenant {
    /// The user's devices: stored ones (once read) and those admitted since.
    devices: HashSet<ByteString>,
    /// Whether the stored devices were read (never for guests).
    read: bool,
    /// New devices still allowed now.
    new: TokenBucket,
}

impl Tenants {
    pub fn new(store: Arc<dyn Store>, devices: Devices, limits: &Limits) -> Self {
        Self {
            store,
            devices,
            max_devices: limits.max_devices_per_user.get(),
            new_devices: Rate::new(
                f64::from(limits.new_devices_per_minute.get()) / 60.0,
                f64::from(limits.new_devices_burst.get()),
            ),
            users: Mutex::default(),
        }
    }

    /// Whether `device` may register. `member`: its user is in the store (a guest's
    /// devices are counted but never read from there).
    pub async fn admit(&self, device: &DeviceKey, member: bool) -> Result<(), Reason> {
        let unread = {
            let users = self.lock();
            match users.get(&device.uuid) {
                Some(t) if t.devices.contains(&device.mac) => return Ok(()),
                Some(t) => member && !t.read,
                None => member,
            }
        };
        // The stored devices, read outside the lock; an unreachable store reads
        // nothing now and is asked again by the next device.
        let stored = match unread {
            true => self.stored(&device.uuid).await,
            false => None,
        };
        let mut users = self.lock();
        if users.len() >= MAX_USERS && !users.contains_key(&device.uuid) {
            users.retain(|_, t| t.read);
        }
        let tenant = users.entry(device.uuid.clone()).or_insert_with(|| Tenant {
            devices: HashSet::new(),
            read: false,
            new: TokenBucket::new(),
        });
        if let Some(stored) = stored {
            tenant.devices.extend(stored);
            tenant.read = true;
        }
        if tenant.devices.contains(&device.mac) {
            return Ok(());
        }
        if self.devices == Devices::Registered {
            return Err(Reason::Enrollment);
        }
        if tenant.devices.len() >= self.max_devices {
            return Err(Reason::DeviceQuota);
        }
        if !tenant.new.try_take(&self.new_devices) {
            return Err(Reason::NewDeviceRate);
        }
        tenant.devices.insert(device.mac.clone());
        Ok(())
    }

    /// The stored devices as the database says now (`auth.devices = "registered"`):
    /// each user read so far gets exactly its stored list; a user no longer stored
    /// has none.
    pub fn follow(&self, members: &crate::store::Members) {
        let mut users = self.lock();
        for (uuid, tenant) in users.iter_mut().filter(|(_, t)| t.read) {
            tenant.devices = members
                .get(&**uuid)
                .map(|m| {
                    m.devices
                        .iter()
                        .map(|mac| ByteString::from(mac.as_str()))
                        .collect()
                })
                .unwrap_or_default();
        }
    }

    async fn stored(&self, uuid: &str) -> Option<Vec<ByteString>> {
        match self.store.user_devices(uuid).await {
            Ok(devices) => Some(
                devices
                    .unwrap_or_default()
                    .into_iter()
                    .map(|d| ByteString::from(d.mac))
                    .collect(),
            ),
            Err(e) => {
                log::debug!("cannot read the devices of a user: {e}");
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ByteString, Tenant>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroUsize};
    use std::time::Duration;

    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{Directory, Sighting, Sightings};

    const UUID: &str = "0b7c6a35-1f4c-4d6e-9c07-7d3d1c4e9a11";

    async fn tenants(devices: Devices, max: usize, per_minute: u32, burst: u32) -> Tenants {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("db")).unwrap();
        store.add_user("alice", UUID).await.unwrap();
        let stored = Sighting {
            uuid: UUID.into(),
            mac: "STORED".into(),
            host: "h".into(),
            at: chrono::Utc::now(),
        };
        store.record(&[stored]).await.unwrap();
        std::mem::forget(dir); // the file outlives the test's store
        let limits = Limits {
            max_devices_per_user: NonZeroUsize::new(max).unwrap(),
            new_devices_per_minute: NonZeroU32::new(per_minute).unwrap(),
            new_devices_burst: NonZeroU32::new(burst).unwrap(),
            ..Limits::default()
        };
        Tenants::new(Arc::new(store), devices, &limits)
    }

    fn device(mac: &str) -> DeviceKey {
        DeviceKey::new(UUID, mac)
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_gets_a_burst_of_new_devices_then_the_rate_and_stored_ones_always() {
        let t = tenants(Devices::Open, 100, 60, 2).await;
        assert_eq!(t.admit(&device("N1"), true).await, Ok(()));
        assert_eq!(t.admit(&device("N2"), true).await, Ok(()));
        assert_eq!(
            t.admit(&device("N3"), true).await,
            Err(Reason::NewDeviceRate)
        );
        assert_eq!(t.admit(&device("STORED"), true).await, Ok(()), "stored");
        assert_eq!(
            t.admit(&device("N1"), true).await,
            Ok(()),
            "admitted before"
        );
        // Refused attempts spend nothing: a second later, one more is allowed.
        for _ in 0..100 {
            let _ = t.admit(&device("N9"), true).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(t.admit(&device("N3"), true).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_at_its_device_limit_gets_no_new_device() {
        let t = tenants(Devices::Open, 2, 1000, 1000).await;
        assert_eq!(t.admit(&device("N1"), true).await, Ok(()));
        assert_eq!(
            t.admit(&device("N2"), true).await,
            Err(Reason::DeviceQuota),
            "STORED and N1"
        );
        assert_eq!(t.admit(&device("STORED"), true).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn registered_mode_admits_only_stored_devices() {
        let t = tenants(Devices::Registered, 100, 100, 100).await;
        assert_eq!(t.admit(&device("STORED"), true).await, Ok(()));
        assert_eq!(t.admit(&device("NEW"), true).await, Err(Reason::Enrollment));
    }
}
