//! What the status page shows: totals, open tunnels and the last 15 minutes of
//! connections and throughput (`GET /api/status`); the devices, searched and paged
//! (`GET /api/devices`); and one device with its tunnels and history
//! (`GET /api/devices/<mac>`).
//!
//! Live state comes from the registry and the bridge by message, every request. The
//! stored users and devices come from the store at most every [`DIRECTORY_TTL`],
//! shared by every viewer, so an open page costs the database nothing per refresh;
//! when the store fails, the last listing is kept and the failure shown. Uuids appear
//! only masked.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use elfin_actors::bridge::{TunnelInfo, Tunnels};
use elfin_actors::cluster::{Members, Membership};
use elfin_actors::device::masked;
use elfin_actors::frame::Role;
use elfin_actors::link::End;
use elfin_actors::registry::{AllLive, Connected};
use elfin_actors::store::{OwnedDevice, User};
use elfin_actors::Hub;

use crate::audit;

/// How long the store's listing of users and devices is reused.
pub const DIRECTORY_TTL: Duration = Duration::from_secs(10);
/// One history sample per this, kept for [`HISTORY_SPAN`].
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const HISTORY_SPAN: Duration = Duration::from_secs(15 * 60);
/// Devices per page unless asked otherwise, and at most (a page stays a few tens of
/// KiB).
const PER_PAGE: usize = 50;
const MAX_PER_PAGE: usize = 200;
/// Records of each kind the device page shows.
const DEVICE_HISTORY: usize = 50;
/// A store read for the page gives up after this.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub totals: Totals,
    pub tunnels: Vec<TunnelRow>,
    pub history: Vec<Sample>,
    pub sample_secs: u64,
    /// Why the stored users and devices may be out of date, if they are.
    pub store_error: Option<String>,
    /// In cluster mode: this node, its NATS connection and the nodes it hears.
    pub cluster: Option<Members>,
}

#[derive(Serialize)]
pub struct Totals {
    pub devices_online: usize,
    pub devices_offline: usize,
    pub connections: usize,
    pub tunnels: usize,
    pub tunnel_bytes: u64,
    pub bytes_per_sec: f64,
}

/// A device as the page lists it.
#[derive(Serialize, Clone)]
pub struct DeviceRow {
    pub host: String,
    pub mac: String,
    /// Its user's name; none for a uuid that is no stored user (a guest).
    pub user: Option<String>,
    /// Its user's uuid, masked.
    pub uuid: String,
    pub online: bool,
    pub last_seen: String,
    /// The address its connection comes from, while online.
    pub connected_from: Option<String>,
    #[serde(skip)]
    last_seen_at: DateTime<Utc>,
}

/// What `/api/devices` is asked for.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeviceQuery {
    /// Part of a MAC, host name, user name or address (any case).
    pub q: Option<String>,
    /// "online" or "offline".
    pub status: Option<String>,
    /// A user's name, exactly.
    pub user: Option<String>,
    /// From 1.
    pub page: Option<usize>,
    pub per_page: Option<usize>,
}

/// One page of devices, online first, then by host name and MAC.
#[derive(Serialize)]
pub struct DevicePage {
    /// Devices matching the query, on every page.
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub pages: usize,
    pub devices: Vec<DeviceRow>,
    pub store_error: Option<String>,
}

/// Everything the device page shows.
#[derive(Serialize)]
pub struct DeviceDetail {
    pub device: DeviceRow,
    /// Its open tunnels (on this node).
    pub tunnels_now: Vec<TunnelRow>,
    /// Its tunnels from the audit trail, newest first.
    pub tunnels: Vec<audit::TunnelRow>,
    /// It coming and going, newest first.
    pub events: Vec<audit::EventRow>,
    pub audit_error: Option<String>,
}

#[derive(Serialize)]
pub struct TunnelRow {
    pub id: u64,
    pub a: EndRow,
    pub b: EndRow,
    pub age_secs: u64,
    pub bytes_a_to_b: u64,
    pub bytes_b_to_a: u64,
}

#[derive(Serialize)]
pub struct EndRow {
    /// "device" or "client".
    pub kind: &'static str,
    pub mac: Option<String>,
    pub address: String,
    pub transport: &'static str,
}

#[derive(Serialize, Clone, Copy)]
pub struct Sample {
    /// Unix time, seconds.
    pub at: u64,
    pub connections: usize,
    pub tunnels: usize,
    pub bytes_per_sec: f64,
}

/// The store's users and devices as last read.
#[derive(Default)]
struct Directory {
    users: Vec<User>,
    devices: Vec<OwnedDevice>,
    read_at: Option<Instant>,
    error: Option<String>,
}

/// The status page's state: the cached directory and the history.
pub struct StatusBoard {
    hub: Hub,
    directory: tokio::sync::Mutex<Directory>,
    history: Mutex<History>,
}

#[derive(Default)]
struct History {
    samples: VecDeque<Sample>,
    last_bytes: Option<(Instant, u64)>,
}

impl StatusBoard {
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            directory: tokio::sync::Mutex::default(),
            history: Mutex::default(),
        }
    }

    /// Takes one history sample; called every [`SAMPLE_EVERY`].
    pub async fn sample(&self) {
        let Ok(report) = self.hub.bridge.send(Tunnels).await else {
            return;
        };
        let now = Instant::now();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let bytes_per_sec = match history.last_bytes {
            Some((then, bytes)) => {
                let secs = now.duration_since(then).as_secs_f64().max(1e-3);
                report.total_bytes.saturating_sub(bytes) as f64 / secs
            }
            None => 0.0,
        };
        history.last_bytes = Some((now, report.total_bytes));
        history.samples.push_back(Sample {
            at: unix_secs(SystemTime::now()),
            connections: self.hub.admission.open(),
            tunnels: report.open.len(),
            bytes_per_sec,
        });
        let keep = (HISTORY_SPAN.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        while history.samples.len() > keep {
            history.samples.pop_front();
        }
    }

    pub async fn status(&self) -> Status {
        let cluster = async {
            match &self.hub.cluster {
                Some(cluster) => cluster.send(Membership).await.ok(),
                None => None,
            }
        };
        let (live, tunnels, cluster) = futures::join!(
            self.hub.registry.send(AllLive),
            self.hub.bridge.send(Tunnels),
            cluster
        );
        let live = live.unwrap_or_default();
        let (tunnel_bytes, open) = match tunnels {
            Ok(report) => (report.total_bytes, report.open),
            Err(_) => (0, Vec::new()),
        };
        let (offline, store_error) = {
            let directory = self.directory().await;
            let rows = self.device_rows(&directory, &live);
            let offline = rows.iter().filter(|d| !d.online).count();
            (offline, directory.error.clone())
        };
        let history: Vec<Sample> = {
            let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            history.samples.iter().copied().collect()
        };
        let now = SystemTime::now();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: age(self.hub.started, now),
            totals: Totals {
                devices_online: live.len(),
                devices_offline: offline,
                connections: self.hub.admission.open(),
                tunnels: open.len(),
                tunnel_bytes,
                bytes_per_sec: history.last().map_or(0.0, |s| s.bytes_per_sec),
            },
            tunnels: open.iter().map(|t| tunnel_row(t, now)).collect(),
            history,
            sample_secs: SAMPLE_EVERY.as_secs(),
            store_error,
            cluster,
        }
    }

    /// The store's listing, read again once it is older than [`DIRECTORY_TTL`]. One
    /// reader at a time: viewers arriving meanwhile wait for it and share it.
    async fn directory(&self) -> tokio::sync::MutexGuard<'_, Directory> {
        let mut directory = self.directory.lock().await;
        if directory
            .read_at
            .is_some_and(|at| at.elapsed() < DIRECTORY_TTL)
        {
            return directory;
        }
        let store = &self.hub.store;
        let read = tokio::time::timeout(STORE_TIMEOUT, async {
            Ok::<_, elfin_actors::store::StoreError>((
                store.users().await?,
                store.devices(None).await?,
            ))
        })
        .await;
        directory.read_at = Some(Instant::now());
        match read {
            Ok(Ok((users, devices))) => {
                directory.users = users;
                directory.devices = devices;
                directory.error = None;
            }
            Ok(Err(e)) => directory.error = Some(e.to_string()),
            Err(_) => {
                directory.error = Some(format!("the store did not answer within {STORE_TIMEOUT:?}"))
            }
        }
        directory
    }

    /// Every device, stored and live merged (live wins), with its user's name.
    fn device_rows(&self, directory: &Directory, live: &[Connected]) -> Vec<DeviceRow> {
        let names: HashMap<&str, &str> = directory
            .users
            .iter()
            .map(|u| (u.uuid.as_str(), u.username.as_str()))
            .collect();
        let row = |uuid: Option<&str>| {
            let user = uuid.and_then(|u| names.get(u)).map(|n| n.to_string());
            (user, uuid.map(masked).unwrap_or_default())
        };
        let mut rows: HashMap<&str, DeviceRow> = HashMap::with_capacity(directory.devices.len());
        for d in &directory.devices {
            let (user, uuid) = row(d.owner.as_deref());
            rows.insert(
                &d.device.mac,
                DeviceRow {
                    host: d.device.host.clone(),
                    mac: d.device.mac.clone(),
                    user,
                    uuid,
                    online: false,
                    last_seen: String::new(),
                    connected_from: None,
                    last_seen_at: d.device.last_seen,
                },
            );
        }
        for c in live {
            let (user, uuid) = row(Some(&c.uuid));
            rows.insert(
                &c.device.mac,
                DeviceRow {
                    host: c.device.host.to_string(),
                    mac: c.device.mac.to_string(),
                    user,
                    uuid,
                    online: true,
                    last_seen: String::new(),
                    connected_from: Some(c.remote.to_string()),
                    last_seen_at: c.device.last_seen.to_utc(),
                },
            );
        }
        rows.into_values().collect()
    }

    /// One page of the devices matching `query`.
    pub async fn devices(&self, query: &DeviceQuery) -> DevicePage {
        let live = self.hub.registry.send(AllLive).await.unwrap_or_default();
        let directory = self.directory().await;
        let needle = query.q.as_deref().unwrap_or("").trim().to_lowercase();
        let status = query.status.as_deref();
        let mut rows: Vec<DeviceRow> = self
            .device_rows(&directory, &live)
            .into_iter()
            .filter(|d| match status {
                Some("online") => d.online,
                Some("offline") => !d.online,
                _ => true,
            })
            .filter(|d| {
                query
                    .user
                    .as_deref()
                    .is_none_or(|user| d.user.as_deref() == Some(user))
            })
            .filter(|d| needle.is_empty() || matches(d, &needle))
            .collect();
        rows.sort_unstable_by(|a, b| {
            b.online
                .cmp(&a.online)
                .then_with(|| a.host.cmp(&b.host))
                .then_with(|| a.mac.cmp(&b.mac))
        });
        let per_page = query.per_page.unwrap_or(PER_PAGE).clamp(1, MAX_PER_PAGE);
        let total = rows.len();
        let pages = total.div_ceil(per_page).max(1);
        let page = query.page.unwrap_or(1).clamp(1, pages);
        let mut devices: Vec<DeviceRow> = rows
            .into_iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .collect();
        for d in &mut devices {
            d.last_seen = self.shown(d.last_seen_at);
        }
        DevicePage {
            total,
            page,
            per_page,
            pages,
            devices,
            store_error: directory.error.clone(),
        }
    }

    /// One device with its tunnels and history; `None` if the gateway knows no such
    /// device.
    pub async fn device(&self, mac: &str) -> Option<DeviceDetail> {
        let (live, tunnels) = futures::join!(
            self.hub.registry.send(AllLive),
            self.hub.bridge.send(Tunnels)
        );
        let live = live.unwrap_or_default();
        let (mut device, names) = {
            let directory = self.directory().await;
            let device = self
                .device_rows(&directory, &live)
                .into_iter()
                .find(|d| d.mac == mac)?;
            let names: HashMap<String, String> = directory
                .users
                .iter()
                .map(|u| (u.uuid.clone(), u.username.clone()))
                .collect();
            (device, names)
        };
        device.last_seen = self.shown(device.last_seen_at);
        let now = SystemTime::now();
        let tunnels_now = tunnels
            .map(|r| r.open)
            .unwrap_or_default()
            .iter()
            .filter(|t| {
                [&t.a, &t.b]
                    .iter()
                    .any(|e| e.mac().is_some_and(|m| m == mac))
            })
            .map(|t| tunnel_row(t, now))
            .collect();
        let filter = elfin_actors::audit::Filter {
            mac: Some(mac.to_owned()),
            limit: DEVICE_HISTORY,
            ..Default::default()
        };
        let store = &self.hub.store;
        let read = tokio::time::timeout(STORE_TIMEOUT, async {
            futures::try_join!(store.audit_tunnels(&filter), store.audit_devices(&filter))
        })
        .await;
        let shown = audit::Shown {
            names: &names,
            format: &self.hub.config.query,
        };
        let (tunnels, events, audit_error) = match read {
            Ok(Ok((tunnels, events))) => (
                tunnels.into_iter().map(|t| shown.tunnel(t)).collect(),
                events.into_iter().map(|e| shown.event(e)).collect(),
                None,
            ),
            Ok(Err(e)) => (Vec::new(), Vec::new(), Some(e.to_string())),
            Err(_) => (
                Vec::new(),
                Vec::new(),
                Some(format!("the store did not answer within {STORE_TIMEOUT:?}")),
            ),
        };
        Some(DeviceDetail {
            device,
            tunnels_now,
            tunnels,
            events,
            audit_error,
        })
    }

    /// uuid -> name of the stored users, as last read.
    pub async fn user_names(&self) -> HashMap<String, String> {
        self.directory()
            .await
            .users
            .iter()
            .map(|u| (u.uuid.clone(), u.username.clone()))
            .collect()
    }

    fn shown(&self, at: DateTime<Utc>) -> String {
        let format = &self.hub.config.query;
        at.with_timezone(&format.time_zone)
            .format(&format.time_format)
            .to_string()
    }
}

/// Whether the device's MAC, host name, user name or address contains `needle`
/// (lower case).
fn matches(d: &DeviceRow, needle: &str) -> bool {
    let has = |text: &str| text.to_lowercase().contains(needle);
    has(&d.mac)
        || has(&d.host)
        || d.user.as_deref().is_some_and(has)
        || d.connected_from.as_deref().is_some_and(has)
}

fn end_row(end: &End) -> EndRow {
    EndRow {
        kind: Role::label(Some(end.role)),
        mac: end.mac().map(ToString::to_string),
        address: end.link.remote.to_string(),
        transport: end.link.transport.label(),
    }
}

fn tunnel_row(t: &TunnelInfo, now: SystemTime) -> TunnelRow {
    TunnelRow {
        id: t.id,
        a: end_row(&t.a),
        b: end_row(&t.b),
        age_secs: age(t.opened, now),
        bytes_a_to_b: t.a_sent,
        bytes_b_to_a: t.b_sent,
    }
}

fn age(since: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(since).map_or(0, |d| d.as_secs())
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
