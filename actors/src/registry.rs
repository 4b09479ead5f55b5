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
//!
//! **Takeover under `auth.device_takeover = "when-silent"`** is judged on the device's
//! history, not only on the connection open at that moment: where and when it was
//! last seen through an accepted connection, kept for `heartbeat.online_window_secs`
//! after that connection closes ([`History`]). A connection from the address the
//! device was last seen from takes its place at once (the real device reconnecting
//! after a NAT rebinding); one from another address only once the device has been
//! silent for the online window. Refused claims make the device *contested*
//! ([`Contest`]): logged, counted in `elfin_devices_contested`, shown on its page, and
//! said again when the device later moves to a new address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use actix::prelude::*;
use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::audit::{DeviceChange, Trail};
use crate::clock::Stamp;
use crate::device::{DeviceKey, Identity};
use crate::link::{PeerEvent, PeerLink, SessionId};
use crate::metric;

/// `auth.device_takeover`: what a second connection of a live device does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Takeover {
    /// The newer connection replaces the live one (deployed devices' behaviour).
    #[default]
    Newest,
    /// Judged on the device's history: from the address it was last seen from at
    /// once, from elsewhere only once it has been silent for the online window.
    WhenSilent,
}

struct Registered {
    device: Arc<Identity>,
    link: PeerLink,
}

pub struct DeviceRegistry {
    /// uuid -> mac -> live connection.
    users: HashMap<ByteString, HashMap<ByteString, Registered>>,
    /// Where and when devices whose connection closed were last seen ("when-silent").
    departed: HashMap<DeviceKey, History>,
    /// Devices a connection from elsewhere claimed within the online window.
    contests: HashMap<DeviceKey, Contest>,
    online: usize,
    /// Told of every [`Presence`] change: the cluster, the fleet events keeper.
    watchers: Vec<Recipient<Presence>>,
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
            departed: HashMap::new(),
            contests: HashMap::new(),
            online: 0,
            watchers: Vec::new(),
            takeover,
            online_window,
            trail,
        }
    }

    /// Records what happened to the device of `entry` in the audit trail.
    fn audit(&self, entry: &Registered, change: DeviceChange, cause: Option<String>) {
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

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.takeover == Takeover::WhenSilent {
            ctx.run_interval(self.online_window, |act, _| act.forget_old());
        }
    }
}

/// Where and when a device was last seen through a connection the registry accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub ip: IpAddr,
    pub seen: Instant,
    /// The connection it was seen on, while that connection is still open.
    pub live: Option<SocketAddr>,
}

/// Connections from elsewhere that claimed a device while it was not silent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contest {
    /// Their addresses, the first [`MAX_CLAIMANTS`] distinct ones.
    pub claimants: Vec<SocketAddr>,
    pub since: Instant,
    pub last: Instant,
    /// Where the device was last seen from when it was first claimed.
    pub holder: IpAddr,
}

/// Claimant addresses a contest keeps.
pub const MAX_CLAIMANTS: usize = 8;

/// A takeover refused: the device was last seen from `holder`, `ago`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StillLive {
    pub holder: IpAddr,
    pub ago: Duration,
}

/// `link` is now the live connection of `device`, unless `auth.device_takeover =
/// "when-silent"` refuses it (the device was seen from another address within the
/// online window): then `Err(StillLive)`, and nothing changes.
#[derive(Message)]
#[rtype(result = "Result<(), StillLive>")]
pub struct Register {
    pub device: Arc<Identity>,
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
/// a live device replaces its older one), or a connection from elsewhere claimed it.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum Presence {
    Online(DeviceSeen),
    Offline(DeviceSeen),
    /// A new claimant of a device seen from `holder` within the online window
    /// ("when-silent"); refused.
    Contested {
        device: DeviceKey,
        host: Option<ByteString>,
        claimant: SocketAddr,
        holder: IpAddr,
    },
}

/// A device and the connection it was seen through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSeen {
    pub device: DeviceKey,
    pub host: ByteString,
    pub remote: SocketAddr,
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

/// The device, or its user, is no longer in the database: its connection is closed
/// with `why`, and it goes offline.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Withdraw {
    pub device: DeviceKey,
    pub why: &'static str,
}

impl Handler<Withdraw> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, Withdraw { device, why }: Withdraw, _: &mut Context<Self>) {
        if let Some(old) = self.remove(&device, |_| true) {
            self.audit(&old, DeviceChange::Offline, Some(why.to_owned()));
            old.link
                .events
                .do_send(PeerEvent::Withdrawn(old.device.key.clone(), why));
        }
    }
}

/// The live connection of device (uuid, mac).
#[derive(Message)]
#[rtype(result = "Option<PeerLink>")]
pub struct Lookup(pub DeviceKey);

/// Where and when the device was last seen here, within the online window: from its
/// live connection, or from one that closed since.
#[derive(Message)]
#[rtype(result = "Option<History>")]
pub struct LastSeen(pub DeviceKey);

impl Handler<LastSeen> for DeviceRegistry {
    type Result = Option<History>;

    fn handle(&mut self, LastSeen(device): LastSeen, _: &mut Context<Self>) -> Option<History> {
        self.history(&device, None)
    }
}

/// The device's contest, if one is open (for its page).
#[derive(Message)]
#[rtype(result = "Option<Contest>")]
pub struct ContestOf(pub DeviceKey);

impl Handler<ContestOf> for DeviceRegistry {
    type Result = Option<Contest>;

    fn handle(&mut self, ContestOf(device): ContestOf, _: &mut Context<Self>) -> Option<Contest> {
        self.contests
            .get(&device)
            .filter(|c| c.last.elapsed() < self.online_window)
            .cloned()
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
        for watcher in &self.watchers {
            watcher.do_send(change.clone());
        }
    }

    /// Where and when `device` was last seen within the online window, leaving out the
    /// connection `except` (the one asking).
    fn history(&self, device: &DeviceKey, except: Option<SessionId>) -> Option<History> {
        let live = self
            .users
            .get(&device.uuid)
            .and_then(|d| d.get(&device.mac))
            .filter(|e| Some(e.link.id) != except)
            .map(|e| History {
                ip: e.link.remote.ip(),
                seen: e.device.activity.last_seen().instant(),
                live: Some(e.link.remote),
            });
        live.or_else(|| self.departed.get(device).copied())
            .filter(|h| h.seen.elapsed() < self.online_window)
    }

    /// Remembers where a device whose connection closed was last seen.
    fn depart(&mut self, entry: &Registered) {
        if self.takeover == Takeover::WhenSilent {
            let history = History {
                ip: entry.link.remote.ip(),
                seen: entry.device.activity.last_seen().instant(),
                live: None,
            };
            self.departed.insert(entry.device.key.clone(), history);
        }
    }

    /// Forgets histories and contests older than the online window.
    fn forget_old(&mut self) {
        let window = self.online_window;
        self.departed.retain(|_, h| h.seen.elapsed() < window);
        self.contests.retain(|_, c| c.last.elapsed() < window);
        metrics::gauge!(metric::DEVICES_CONTESTED).set(self.contests.len() as f64);
    }

    /// A connection from `claimant` claimed `device`, seen from `holder` `ago`.
    fn contested(&mut self, device: &DeviceKey, claimant: SocketAddr, still: StillLive) {
        let now = Instant::now();
        let fresh = Contest {
            claimants: Vec::new(),
            since: now,
            last: now,
            holder: still.holder,
        };
        let window = self.online_window;
        let contest = self.contests.entry(device.clone()).or_insert(fresh.clone());
        if contest.last.elapsed() >= window {
            // The last contest ended a window ago: this is a new one.
            *contest = fresh;
        }
        contest.last = now;
        let known = contest.claimants.iter().any(|c| c.ip() == claimant.ip());
        if !known && contest.claimants.len() < MAX_CLAIMANTS {
            contest.claimants.push(claimant);
            let host = self
                .users
                .get(&device.uuid)
                .and_then(|d| d.get(&device.mac))
                .map(|e| e.device.host.clone());
            self.tell(Presence::Contested {
                device: device.clone(),
                host,
                claimant,
                holder: still.holder,
            });
            log::warn!(
                "device {} contested: {claimant} claims it, but it was seen from {} {:?} ago \
                 (auth.device_takeover = \"when-silent\"); refused",
                device.mac,
                still.holder,
                still.ago
            );
        }
        metrics::gauge!(metric::DEVICES_CONTESTED).set(self.contests.len() as f64);
    }

    /// Removes the entry of `device` if it is `which`.
    fn remove(
        &mut self,
        device: &DeviceKey,
        which: impl FnOnce(&Registered) -> bool,
    ) -> Option<Registered> {
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
        self.tell(Presence::Offline(entry.seen()));
        Some(entry)
    }
}

impl Handler<Register> for DeviceRegistry {
    type Result = Result<(), StillLive>;

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) -> Self::Result {
        let key = msg.device.key.clone();
        if self.takeover == Takeover::WhenSilent {
            let from = msg.link.remote;
            if let Some(seen) = self.history(&key, Some(msg.link.id)) {
                if seen.ip != from.ip() {
                    let still = StillLive {
                        holder: seen.ip,
                        ago: seen.seen.elapsed(),
                    };
                    let refused = Registered {
                        device: msg.device,
                        link: msg.link,
                    };
                    let cause = match seen.live {
                        Some(live) => format!("takeover refused: still beating from {live}"),
                        None => format!(
                            "takeover refused: seen from {} {:?} ago",
                            still.holder, still.ago
                        ),
                    };
                    self.audit(&refused, DeviceChange::Refused, Some(cause));
                    self.contested(&key, from, still);
                    return Err(still);
                }
            }
            self.departed.remove(&key);
            // Back where it was seen: a contest stays visible for its window. From a
            // new address (after the window of silence): said, and settled.
            let moved = self
                .contests
                .get(&key)
                .is_some_and(|c| c.holder != from.ip());
            if moved {
                if let Some(contest) = self.contests.remove(&key) {
                    log::warn!(
                        "device {} now connects from {from}, a new address, after {:?} of \
                         silence; it was contested by {:?} (it was seen from {})",
                        key.mac,
                        self.online_window,
                        contest.claimants,
                        contest.holder
                    );
                }
                metrics::gauge!(metric::DEVICES_CONTESTED).set(self.contests.len() as f64);
            }
        }
        let mac = key.mac.clone();
        let new = msg.link.remote;
        let new_id = msg.link.id;
        let entry = Registered {
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
                old.link
                    .events
                    .do_send(PeerEvent::Replaced(old.device.key.clone()));
            }
            Some(_) => {}
            None => {
                self.audit(now, DeviceChange::Online, None);
                self.online += 1;
                self.tell(Presence::Online(now.seen()));
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
            self.depart(&gone);
            self.audit(&gone, DeviceChange::Offline, Some(msg.cause.to_owned()));
        }
    }
}

impl Handler<Evict> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, Evict(device): Evict, _: &mut Context<Self>) {
        if let Some(old) = self.remove(&device, |_| true) {
            self.depart(&old);
            let cause = "connected to another node".to_owned();
            self.audit(&old, DeviceChange::Offline, Some(cause));
            metrics::counter!(metric::DEVICE_TAKEOVERS_TOTAL).increment(1);
            old.link
                .events
                .do_send(PeerEvent::Replaced(old.device.key.clone()));
        }
    }
}

impl Handler<Watch> for DeviceRegistry {
    type Result = ();

    fn handle(&mut self, Watch(watcher): Watch, _: &mut Context<Self>) {
        for devices in self.users.values() {
            for entry in devices.values() {
                watcher.do_send(Presence::Online(entry.seen()));
            }
        }
        self.watchers.push(watcher);
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

impl Registered {
    fn seen(&self) -> DeviceSeen {
        DeviceSeen {
            device: self.device.key.clone(),
            host: self.device.host.clone(),
            remote: self.link.remote,
        }
    }

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
