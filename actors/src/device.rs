//! A device as the gateway knows it while it is connected: which device it is
//! ([`DeviceKey`]: its user's uuid and its mac), what it is called ([`Identity`]) and
//! when it was last heard from ([`Activity`]).
//!
//! The session that speaks for a device, the registry, the heartbeat debouncer and the
//! persistence actor share one `Identity` (an `Arc`, so a live device's names are
//! kept once), and with it one `Activity`: refreshing last-seen on every frame costs
//! the session one atomic store and no message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytestring::ByteString;

use crate::clock::Stamp;
use crate::store::Sighting;

/// When a device was last heard from, whether the heartbeat debouncer tracks it, and
/// whether the persistence actor holds it for the next batch.
#[derive(Debug, Default)]
pub struct Activity {
    last_seen: AtomicU64,
    armed: AtomicBool,
    queued: AtomicBool,
}

impl Activity {
    /// Last heard from now.
    pub fn new() -> Self {
        let activity = Self::default();
        activity.touch();
        activity
    }

    pub fn touch(&self) {
        self.last_seen
            .store(Stamp::now().as_nanos(), Ordering::SeqCst);
    }

    pub fn last_seen(&self) -> Stamp {
        Stamp::from_nanos(self.last_seen.load(Ordering::SeqCst))
    }

    /// Marks the device as tracked by the debouncer; true if it was not, i.e. the
    /// caller must tell the debouncer.
    pub fn arm(&self) -> bool {
        !self.armed.swap(true, Ordering::SeqCst)
    }

    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// Marks the device as held for the next batch; true if it was not, i.e. the
    /// caller must hand it to the persistence actor. However often it beats until
    /// then, it is written once, with its newest last-seen.
    pub fn queue(&self) -> bool {
        !self.queued.swap(true, Ordering::SeqCst)
    }

    /// The batch took it: the next beat queues it again.
    pub fn dequeue(&self) {
        self.queued.store(false, Ordering::SeqCst);
    }
}

/// Which device: its user's uuid and its mac. One live connection per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub uuid: ByteString,
    pub mac: ByteString,
}

impl DeviceKey {
    /// A key copied out of whatever buffer its fields were parsed from, so a
    /// long-lived device never pins a connection's read buffer.
    pub fn new(uuid: &str, mac: &str) -> Self {
        Self {
            uuid: ByteString::from(uuid.to_owned()),
            mac: ByteString::from(mac.to_owned()),
        }
    }

    pub fn is(&self, uuid: &str, mac: &str) -> bool {
        self.uuid == uuid && self.mac == mac
    }
}

/// The device a connection speaks for: its key, its current host name, and when it
/// was last heard from. Shared as an `Arc<Identity>`.
#[derive(Debug)]
pub struct Identity {
    pub key: DeviceKey,
    pub host: ByteString,
    pub activity: Activity,
}

impl Identity {
    /// A new identity, seen now, its fields copied (see [`DeviceKey::new`]).
    pub fn new(uuid: &str, mac: &str, host: &str) -> Arc<Self> {
        Arc::new(Self {
            key: DeviceKey::new(uuid, mac),
            host: ByteString::from(host.to_owned()),
            activity: Activity::new(),
        })
    }

    /// Last-seen as the store records it.
    pub fn sighting(&self) -> Sighting {
        Sighting {
            uuid: self.key.uuid.clone(),
            mac: self.key.mac.clone(),
            host: self.host.clone(),
            at: self.activity.last_seen().to_utc(),
        }
    }
}
