//! What the status page shows: totals, open tunnels and the last 15 minutes of
//! connections and throughput (`GET /api/status`); the devices, searched and paged
//! (`GET /api/devices`); and one device with its tunnels and history
//! (`GET /api/devices/<mac>`, in `status/device.rs`).
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

use elfin_actors::audit::TunnelRecord;
use elfin_actors::bridge::{TunnelInfo, Tunnels};
use elfin_actors::cluster::{ClusterView, Membership};
use elfin_actors::events::herald::Endpoints;
use elfin_actors::frame::Role;
use elfin_actors::link::End;
use elfin_actors::masked::masked;
use elfin_actors::registry::{AllLive, Connected, ContestOf};
use elfin_actors::store::{OwnedDevice, User};
use elfin_actors::Hub;

use crate::audit;

mod device;

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
    pub tunnels: Vec<LiveTunnelRow>,
    pub history: Vec<Sample>,
    pub sample_secs: u64,
    /// Why the stored users and devices may be out of date, if they are.
    pub store_error: Option<String>,
    /// In cluster mode: this node, its NATS connection and the nodes it hears.
    pub cluster: Option<ClusterView>,
    /// Each `[[webhooks]]` endpoint's deliveries.
    pub webhooks: Vec<WebhookRow>,
    pub clock: Clock,
}

/// A webhook endpoint as the status page shows it.
#[derive(Serialize)]
pub struct WebhookRow {
    pub name: String,
    /// Without its query (which may hold a token).
    pub url: String,
    pub queued: usize,
    pub delivered: u64,
    pub failures: u64,
    pub dropped: u64,
    pub last_delivery: Option<String>,
    pub last_failure: Option<String>,
    pub last_error: Option<String>,
}

/// The gateway's time as the page shows every time: in `query.time_zone` and
/// `query.time_format`, with the zone named (one zone on one screen, whatever the
/// browser's is).
#[derive(Serialize)]
pub struct Clock {
    pub now: String,
    pub zone: String,
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
}

/// A device while a request looks through all of them: borrowed from the store's
/// listing and the live connections.
struct Listed<'a> {
    host: &'a str,
    mac: &'a str,
    user: Option<&'a str>,
    uuid: Option<&'a str>,
    last_seen: DateTime<Utc>,
    /// Where its connection comes from, while online.
    from: Option<std::net::SocketAddr>,
}

/// What the search box asked for: found in a MAC, host name, user name or address,
/// in any case, without allocating per device.
struct Needle(Vec<u8>);

impl Needle {
    fn new(text: &str) -> Self {
        Needle(text.trim().to_lowercase().into_bytes())
    }

    fn in_text(&self, text: &str) -> bool {
        let (hay, needle) = (text.as_bytes(), self.0.as_slice());
        if needle.is_ascii() {
            hay.windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
        } else {
            text.to_lowercase()
                .as_bytes()
                .windows(needle.len())
                .any(|w| w == needle)
        }
    }

    /// Whether `d` matches; `address` is scratch space for its address as text.
    fn finds(&self, d: &Listed<'_>, address: &mut String) -> bool {
        use std::fmt::Write as _;
        if self.0.is_empty() {
            return true;
        }
        if self.in_text(d.mac) || self.in_text(d.host) || d.user.is_some_and(|u| self.in_text(u)) {
            return true;
        }
        let Some(from) = d.from else { return false };
        address.clear();
        let _ = write!(address, "{from}");
        self.in_text(address)
    }
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

#[derive(Serialize)]
pub struct LiveTunnelRow {
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
    history: Mutex<TrafficHistory>,
}

#[derive(Default)]
struct TrafficHistory {
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
        let (live, tunnels, cluster, webhooks) = futures::join!(
            self.hub.registry.send(AllLive),
            self.hub.bridge.send(Tunnels),
            cluster,
            self.hub.herald.send(Endpoints)
        );
        let live = live.unwrap_or_default();
        let (tunnel_bytes, open) = match tunnels {
            Ok(report) => (report.total_bytes, report.open),
            Err(_) => (0, Vec::new()),
        };
        let (offline, store_error) = {
            let directory = self.directory().await;
            let offline = Self::entries(&directory, &live)
                .iter()
                .filter(|d| d.from.is_none())
                .count();
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
            webhooks: webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|w| WebhookRow {
                    name: w.name,
                    url: w.url,
                    queued: w.queued,
                    delivered: w.delivered,
                    failures: w.failures,
                    dropped: w.dropped,
                    last_delivery: w.last_delivery.map(|t| self.shown(t)),
                    last_failure: w.last_failure.map(|t| self.shown(t)),
                    last_error: w.last_error,
                })
                .collect(),
            clock: self.clock(),
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

    /// Every device, stored and live merged (live wins), borrowed from both.
    fn entries<'a>(directory: &'a Directory, live: &'a [Connected]) -> Vec<Listed<'a>> {
        let names: HashMap<&str, &str> = directory
            .users
            .iter()
            .map(|u| (u.uuid.as_str(), u.username.as_str()))
            .collect();
        let mut all: HashMap<&str, Listed<'a>> = HashMap::with_capacity(directory.devices.len());
        for d in &directory.devices {
            let uuid = d.owner.as_deref();
            all.insert(
                &d.device.mac,
                Listed {
                    host: &d.device.host,
                    mac: &d.device.mac,
                    user: uuid.and_then(|u| names.get(u).copied()),
                    uuid,
                    last_seen: d.device.last_seen,
                    from: None,
                },
            );
        }
        for c in live {
            all.insert(
                &c.device.mac,
                Listed {
                    host: &c.device.host,
                    mac: &c.device.mac,
                    user: names.get(&*c.uuid).copied(),
                    uuid: Some(&c.uuid),
                    last_seen: c.device.last_seen.to_utc(),
                    from: Some(c.remote),
                },
            );
        }
        all.into_values().collect()
    }

    /// One page of the devices matching `query`.
    pub async fn devices(&self, query: &DeviceQuery) -> DevicePage {
        let live = self.hub.registry.send(AllLive).await.unwrap_or_default();
        let directory = self.directory().await;
        let needle = Needle::new(query.q.as_deref().unwrap_or(""));
        let status = query.status.as_deref();
        let mut address = String::new();
        let mut found: Vec<Listed<'_>> = Self::entries(&directory, &live)
            .into_iter()
            .filter(|d| match status {
                Some("online") => d.from.is_some(),
                Some("offline") => d.from.is_none(),
                _ => true,
            })
            .filter(|d| {
                query
                    .user
                    .as_deref()
                    .is_none_or(|user| d.user == Some(user))
            })
            .filter(|d| needle.finds(d, &mut address))
            .collect();
        found.sort_unstable_by(|a, b| {
            b.from
                .is_some()
                .cmp(&a.from.is_some())
                .then_with(|| a.host.cmp(b.host))
                .then_with(|| a.mac.cmp(b.mac))
        });
        let per_page = query.per_page.unwrap_or(PER_PAGE).clamp(1, MAX_PER_PAGE);
        let total = found.len();
        let pages = total.div_ceil(per_page).max(1);
        let page = query.page.unwrap_or(1).clamp(1, pages);
        let devices = found
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .map(|d| self.row(d))
            .collect();
        DevicePage {
            total,
            page,
            per_page,
            pages,
            devices,
            store_error: directory.error.clone(),
        }
    }

    /// A device as the pages show it.
    fn row(&self, d: &Listed<'_>) -> DeviceRow {
        DeviceRow {
            host: d.host.to_owned(),
            mac: d.mac.to_owned(),
            user: d.user.map(str::to_owned),
            uuid: d.uuid.map(masked).unwrap_or_default(),
            online: d.from.is_some(),
            last_seen: self.shown(d.last_seen),
            connected_from: d.from.map(|a| a.to_string()),
        }
    }

    fn clock(&self) -> Clock {
        Clock {
            now: self.shown(Utc::now()),
            zone: self.hub.config.query.time_zone.name().to_owned(),
        }
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

fn end_row(end: &End) -> EndRow {
    EndRow {
        kind: Role::label(Some(end.role)),
        mac: end.mac().map(ToString::to_string),
        address: end.link.remote.to_string(),
        transport: end.link.transport.label(),
    }
}

fn tunnel_row(t: &TunnelInfo, now: SystemTime) -> LiveTunnelRow {
    LiveTunnelRow {
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
