//! The `DeviceRegistry` actor: which connection is the live connection of each device.
//!
//! Keyed by (uuid, mac). A session registers itself when it first sees a device's
//! `beat` or device `data` and unregisters when it closes. One live connection per
//! device (`docs/PROTOCOL.md` §4): a newer connection of the same device replaces the
//! older one, which is told [`PeerEvent::Replaced`] and closes (it is usually a
//! half-open socket the device already gave up on).
//!
//! Each device coming, going and each takeover refused goes into the audit trail
//! ([`crate::audit`]), with the address and why.
//!
//! In cluster mode the registry tells the cluster ([`Watch`]) when a device becomes
//! live here or stops being, and the cluster evicts a device that connected to another
//! node since ([`Evict`]).

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;

use crate::audit::{DeviceChange, Trail};
use crate::clock::Stamp;
use crate::config::Takeover;
use crate::device::{DeviceKey, Identity};
use crate::link::{PeerEvent, PeerLink, SessionId};
use crate::metric;

struct Entry {
    device: Identity,
    link: PeerLink,
}

pub struct DeviceRegistry {
    /// uuid -> mac -> live connection.
    users: HashMap<ByteString, HashMap<ByteString, Entry>>,
    online: usize,
    watcher: Option<Recipient<Presence>>,
    /// What a second connection of a live device does, and how long a device that
    /// beat counts as live for it.
    takeover: Takeover,
    online_window: Duration,
    trail: Trail,
}

impl DeviceRegistry {
    pub fn new(takeover: Takeover, online_window: Duration, trail: Trail) -> Self {
        Self {
            users: HashMap::new(),
            online: 0,
            watcher: None,
            takeover,
            online_window,
            trail,
        }
    }

    /// Records what happened to the device of `entry` in the audit trail.
    fn audit(&self, entry: &Entry, change: DeviceChange, cause: Option<String>) {
        let key = &entry.device.key;
        self.trail.device(
            &key.uuid,
            &key.mac,
            &entry.device.host,
            change,
            entry.link.remote,
            cause,
        );
    }
}

impl Actor for DeviceRegistry {
    type Context = Context<Self>;
}

/// `link` is now the live connection of `device`, unless `auth.device_takeover =
/// "when-silent"` keeps another connection that still beats: then
/// `Err(StillLive)` with that connection's address, and nothing changes.
#[derive(Message)]
#[rtype(result = "Result<(), StillLive>")]
pub struct Register {
    pub device: Identity,
    pub link: PeerLink,
}

/// The session closed or speaks for another device now; removes the entry only if it
/// is still this session's.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub device: DeviceKey,
    pub session: SessionId,
    /// Why, for the audit trail ("closed", "silent", ...).
    pub cause: &'static str,
}

/// A device became live here, or stopped being (not told when a newer connection of
/// a live device replaces its older one).
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum Presence {
    Online(DeviceKey),
    Offline(DeviceKey),
}

/// Tell this recipient of every [`Presence`] change, starting with every live device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch(pub Recipient<Presence>);

/// The device went live on another node: its connection here is closed as if a newer
/// connection had replaced it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Evict(pub DeviceKey);

/// The live connection of device (uuid, mac).
#[derive(Message)]
#[rtype(result = "Option<PeerLink>")]
pub struct Lookup(pub DeviceKey);

/// Whether the device's live connection here beat within the online window.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct StillBeats(pub DeviceKey);

impl Handler<StillBeats> for DeviceRegistry {
    type Result = bool;

    fn handle(&mut self, StillBeats(device): StillBeats, _: &mut Context<Self>) -> bool {
        let live = self
            .users
            .get(&device.uuid)
            .and_then(|d| d.get(&device.mac));
        live.is_some_and(|e| e.device.activity.last_seen().instant().elapsed() < self.online_window)
    }
}

/// The user's devices that have a live connection.
#[derive(Message)]
#[rtype(result = "Vec<LiveDevice>")]
pub struct LiveDevices {
    pub uuid: ByteString,
}

/// Every live device, for the status page.
#[derive(Message)]
#[rtype(result = "Vec<Connected>")]
pub struct AllLive;

/// A live device and where its connection comes from.
#[derive(Debug, Clone)]
pub struct Connected {
    pub uuid: ByteString,
    pub device: LiveDevice,
    pub remote: std::net::SocketAddr,
}

#[derive(Debug, Clone)]
pub struct LiveDevice {
    pub mac: ByteString,
    pub host: ByteString,
    pub last_seen: Stamp,
}

impl DeviceRegistry {
    fn report(&self) {
        metrics::gauge!(metric::DEVICES_ONLINE).set(self.online as f64);
    }

    fn tell(&self, change: Presence) {
        if let Some(watcher) = &self.watcher {
            watcher.do_send(change);
        }
    }

    /// Removes the entry of `device` if it is `which`.
    fn remove(&mut self, device: &DeviceKey, which: impl FnOnce(&Entry) -> bool) -> Option<Entry> {
        let devices = self.users.get_mut(&device.uuid)?;
        if !devices.get(&device.mac).is_some_and(which) {
            return None;
        }
        let entry = devices.remove(&device.mac)?;
        self.online -= 1;
        if devices.is_empty() {
            self.users.remove(&device.uuid);
        }
        self.report();
        self.tell(Presence::Offline(device.clone()));
        Some(entry)
    }
}

/// The device's live connection, from this address, still beats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StillLive(pub std::net::SocketAddr);

impl Handler<Register> for DeviceRegistry {
    type Result = Result<(), StillLive>;

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) -> Self::Result {
        let key = msg.device.key.clone();
        if self.takeover == Takeover::WhenSilent {
            let live = self.users.get(&key.uuid).and_then(|d| d.get(&key.mac));
            if let Some(live) = live.filter(|e| e.link.id != msg.link.id) {
                let silent = live.device.activity.last_seen().instant().elapsed();
                if silent < self.online_window {
                    let refused = Entry {
                        device: msg.device,
                        link: msg.link,
                    };
                    let cause =
                        format!("takeover refused: still beating from {}", live.link.remote);
                    let still = live.link.remote;
                    self.audit(&refused, DeviceChange::Refused, Some(cause));
                    return Err(StillLive(still));
                }
            }
        }
        let mac = key.mac.clone();
        let new = msg.link.remote;
        let new_id = msg.link.id;
        let entry = Entry {
            device: msg.device,
            link: msg.link,
        };
        let devices = self.users.entry(key.uuid.clone()).or_default();
        let replaced = devices.insert(mac.clone(), entry);
        let now = &self.users[&key.uuid][&mac];
        match replaced {
            Some(old) if old.link.id != new_id => {
                log::info!(
                    "device {mac} reconnected from {new}; closing its old connection from {}",
                    old.link.remote
                );
                metrics::counter!(metric::DEVICE_TAKEOVERS_TOTAL).increment(1);
                self.audit(
                    &old,
                    DeviceChange::Offline,
                    Some(format!("replaced by {new}")),
                );
                self.audit(now, DeviceChange::Online, None);
                old.link.events.do_send(PeerEvent::Replaced(old.device.key));
            }
            Some(_) => {}
            None => {
                self.audit(now, DeviceChange::Online, None);
                self.online += 1;
                self.tell(Presence::Online(key));
            }
        }
        self.report();
        Ok(())
    }
}

impl Handler<Unregister> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) {
        if let Some(gone) = self.remove(&msg.device, |e| e.link.id == msg.session) {
            self.audit(&gone, DeviceChange::Offline, Some(msg.cause.to_owned()));
        }
    }
}

impl Handler<Evict> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, Evict(device): Evict, _: &mut Context<Self>) {
        if let Some(old) = self.remove(&device, |_| true) {
            let cause = "connected to another node".to_owned();
            self.audit(&old, DeviceChange::Offline, Some(cause));
            metrics::counter!(metric::DEVICE_TAKEOVERS_TOTAL).increment(1);
            old.link.events.do_send(PeerEvent::Replaced(old.device.key));
        }
    }
}

impl Handler<Watch> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, Watch(watcher): Watch, _: &mut Context<Self>) {
        for devices in self.users.values() {
            for entry in devices.values() {
                watcher.do_send(Presence::Online(entry.device.key.clone()));
            }
        }
        self.watcher = Some(watcher);
    }
}

impl Handler<Lookup> for DeviceRegistry {
    type Result = Option<PeerLink>;

    fn handle(&mut self, Lookup(device): Lookup, _: &mut Context<Self>) -> Option<PeerLink> {
        self.users
            .get(&device.uuid)?
            .get(&device.mac)
            .map(|e| e.link.clone())
    }
}

impl Handler<AllLive> for DeviceRegistry {
    type Result = MessageResult<AllLive>;

    fn handle(&mut self, _: AllLive, _: &mut Context<Self>) -> Self::Result {
        let all = self.users.iter().flat_map(|(uuid, devices)| {
            devices.values().map(move |e| Connected {
                uuid: uuid.clone(),
                device: e.live(),
                remote: e.link.remote,
            })
        });
        MessageResult(all.collect())
    }
}

impl Entry {
    fn live(&self) -> LiveDevice {
        LiveDevice {
            mac: self.device.key.mac.clone(),
            host: self.device.host.clone(),
            last_seen: self.device.activity.last_seen(),
        }
    }
}

impl Handler<LiveDevices> for DeviceRegistry {
    type Result = MessageResult<LiveDevices>;

    fn handle(&mut self, msg: LiveDevices, _: &mut Context<Self>) -> Self::Result {
        let devices = self.users.get(&msg.uuid).into_iter().flatten();
        MessageResult(devices.map(|(_, e)| e.live()).collect())
    }
}
