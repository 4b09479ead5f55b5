//! The `DeviceRegistry` actor: which connection is the live connection of each device.
//!
//! Keyed by (uuid, mac). A session registers itself when it first sees a device's `beat`
//! or device `data` and unregisters when it closes; a newer connection of the same
//! device replaces the older one. Each entry shares an [`Activity`] with its session,
//! so refreshing last-seen on every frame costs the session one atomic store and the
//! registry no message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use crate::clock::Stamp;
use crate::session::{PeerLink, SessionId};

/// When a device was last heard from, shared by its session (writer), the registry and
/// the heartbeat debouncer (readers).
#[derive(Debug, Default)]
pub struct Activity {
    last_seen: AtomicU64,
    armed: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        let activity = Arc::new(Self::default());
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
}

struct Entry {
    host: ByteString,
    link: PeerLink,
    activity: Arc<Activity>,
}

#[derive(Default)]
pub struct DeviceRegistry {
    /// uuid -> mac -> live connection.
    users: HashMap<ByteString, HashMap<ByteString, Entry>>,
    online: usize,
}

impl Actor for DeviceRegistry {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub uuid: ByteString,
    pub mac: ByteString,
    pub host: ByteString,
    pub link: PeerLink,
    pub activity: Arc<Activity>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub uuid: ByteString,
    pub mac: ByteString,
    pub session: SessionId,
}

/// The live connection of device (uuid, mac).
#[derive(Message)]
#[rtype(result = "Option<PeerLink>")]
pub struct Lookup {
    pub uuid: ByteString,
    pub mac: ByteString,
}

/// The user's devices that have a live connection.
#[derive(Message)]
#[rtype(result = "Vec<LiveDevice>")]
pub struct LiveDevices {
    pub uuid: ByteString,
}

#[derive(Debug, Clone)]
pub struct LiveDevice {
    pub mac: ByteString,
    pub host: ByteString,
    pub last_seen: Stamp,
}

impl Handler<Register> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) {
        let entry = Entry {
            host: msg.host,
            link: msg.link,
            activity: msg.activity,
        };
        let devices = self.users.entry(msg.uuid).or_default();
        match devices.insert(msg.mac.clone(), entry) {
            Some(old) if old.link.id != devices[&msg.mac].link.id => {
                log::info!("device {} moved to a new connection", msg.mac)
            }
            Some(_) => {}
            None => self.online += 1,
        }
        metrics::gauge!("elfin_devices_online").set(self.online as f64);
    }
}

impl Handler<Unregister> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) {
        let Some(devices) = self.users.get_mut(&msg.uuid) else {
            return;
        };
        if devices
            .get(&msg.mac)
            .is_some_and(|e| e.link.id == msg.session)
        {
            devices.remove(&msg.mac);
            self.online -= 1;
            if devices.is_empty() {
                self.users.remove(&msg.uuid);
            }
            metrics::gauge!("elfin_devices_online").set(self.online as f64);
        }
    }
}

impl Handler<Lookup> for DeviceRegistry {
    type Result = Option<PeerLink>;

    fn handle(&mut self, msg: Lookup, _: &mut Context<Self>) -> Option<PeerLink> {
        self.users
            .get(&msg.uuid)?
            .get(&msg.mac)
            .map(|e| e.link.clone())
    }
}

impl Handler<LiveDevices> for DeviceRegistry {
    type Result = MessageResult<LiveDevices>;

    fn handle(&mut self, msg: LiveDevices, _: &mut Context<Self>) -> Self::Result {
        let devices = self.users.get(&msg.uuid).into_iter().flatten();
        MessageResult(
            devices
                .map(|(mac, e)| LiveDevice {
                    mac: mac.clone(),
                    host: e.host.clone(),
                    last_seen: e.activity.last_seen(),
                })
                .collect(),
        )
    }
}
