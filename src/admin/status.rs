//! What the status page shows (`GET /api/status`): totals, users with their devices,
//! open tunnels, and the last 15 minutes of connections and throughput.
//!
//! Live state comes from the registry and the bridge by message, every request. The
//! stored users and devices come from the store at most every [`DIRECTORY_TTL`],
//! shared by every viewer, so an open page costs the database nothing per refresh;
//! when the store fails, the last listing is kept and the failure shown. Uuids appear
//! only masked.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::Serialize;

use elfin_actors::bridge::{TunnelInfo, Tunnels};
use elfin_actors::cluster::{Members, Membership};
use elfin_actors::device::masked;
use elfin_actors::frame::Role;
use elfin_actors::link::End;
use elfin_actors::registry::{AllLive, Connected};
use elfin_actors::store::{OwnedDevice, User};
use elfin_actors::Hub;

/// How long the store's listing of users and devices is reused.
pub const DIRECTORY_TTL: Duration = Duration::from_secs(10);
/// One history sample per this, kept for [`HISTORY_SPAN`].
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const HISTORY_SPAN: Duration = Duration::from_secs(15 * 60);
/// At most this many device rows are sent; online devices first.
const MAX_ROWS: usize = 2_000;
/// A store read for the page gives up after this.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub totals: Totals,
    pub users: Vec<UserRow>,
    /// Device rows left out beyond [`MAX_ROWS`].
    pub rows_omitted: usize,
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

#[derive(Serialize)]
pub struct UserRow {
    /// None for a uuid with live devices that is no stored user (a guest).
    pub name: Option<String>,
    pub uuid: String,
    pub devices: Vec<DeviceRow>,
}

#[derive(Serialize)]
pub struct DeviceRow {
    pub host: String,
    pub mac: String,
    pub online: bool,
    pub last_seen: String,
    /// The address its connection comes from, while online.
    pub connected_from: Option<String>,
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
        let (users, rows_omitted, offline, store_error) = {
            let directory = self.directory().await;
            let (users, omitted, offline) = self.user_rows(&directory, &live);
            (users, omitted, offline, directory.error.clone())
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
            users,
            rows_omitted,
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

    /// Users and their devices, stored and live merged; with the number of rows left
    /// out and of offline devices.
    fn user_rows(&self, directory: &Directory, live: &[Connected]) -> (Vec<UserRow>, usize, usize) {
        let format = &self.hub.config.query;
        let shown = |at: DateTime<Utc>| {
            at.with_timezone(&format.time_zone)
                .format(&format.time_format)
                .to_string()
        };
        // uuid -> (name, mac -> row)
        let mut users: BTreeMap<&str, (Option<&str>, BTreeMap<String, DeviceRow>)> = directory
            .users
            .iter()
            .map(|u| {
                (
                    u.uuid.as_str(),
                    (Some(u.username.as_str()), BTreeMap::new()),
                )
            })
            .collect();
        for d in &directory.devices {
            let Some(owner) = d.owner.as_deref() else {
                continue;
            };
            let Some((_, devices)) = users.get_mut(owner) else {
                continue;
            };
            devices.insert(
                d.device.mac.clone(),
                DeviceRow {
                    host: d.device.host.clone(),
                    mac: d.device.mac.clone(),
                    online: false,
                    last_seen: shown(d.device.last_seen),
                    connected_from: None,
                },
            );
        }
        for c in live {
            let (_, devices) = users.entry(&c.uuid).or_insert((None, BTreeMap::new()));
            devices.insert(
                c.device.mac.to_string(),
                DeviceRow {
                    host: c.device.host.to_string(),
                    mac: c.device.mac.to_string(),
                    online: true,
                    last_seen: shown(c.device.last_seen.to_utc()),
                    connected_from: Some(c.remote.to_string()),
                },
            );
        }
        let offline = users
            .values()
            .flat_map(|(_, d)| d.values())
            .filter(|d| !d.online)
            .count();
        // Online rows first, then offline ones, up to MAX_ROWS in all.
        let mut budget = [MAX_ROWS, MAX_ROWS - live.len().min(MAX_ROWS)];
        let mut omitted = 0;
        let mut rows = Vec::with_capacity(users.len());
        for (uuid, (name, devices)) in users {
            let mut kept = Vec::new();
            for row in devices.into_values() {
                let left = &mut budget[usize::from(!row.online)];
                if *left == 0 {
                    omitted += 1;
                } else {
                    *left -= 1;
                    kept.push(row);
                }
            }
            rows.push(UserRow {
                name: name.map(str::to_owned),
                uuid: masked(uuid),
                devices: kept,
            });
        }
        (rows, omitted, offline)
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
