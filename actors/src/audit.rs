//! The audit trail: who had a tunnel to which device, from where, when, for how long
//! and how many bytes; and when each device came and went, and why.
//!
//! The bridge ([`crate::bridge`]) reports a tunnel when it opens and again when it
//! closes; the registry ([`crate::registry`]) reports devices going online, offline
//! (closed, silent, replaced by another address, moved to another node, shutdown) and
//! takeovers it refused. Both hand an [`Audit`] message to the persistence actor,
//! which writes it with its next batch (never on a tunnel's path) and keeps a
//! tunnel's open and close as one record when they fall into the same batch. Records
//! older than `audit.retention_days` are pruned in the background.
//!
//! A tunnel is recorded by the node its requester is connected to, so a cross-node
//! tunnel is one record, naming that node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::metric;

/// Device events recorded per device in a [`DEVICE_WINDOW`]; past it (a device
/// flapping, or someone replaying its heartbeat to take it over and over) they are
/// counted, not written, and the next window's first event says how many were left
/// out. A device's database rows stay bounded whatever its connections do.
pub const DEVICE_EVENTS_PER_WINDOW: u32 = 30;
pub const DEVICE_WINDOW: Duration = Duration::from_secs(600);

/// The `[audit]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// Days a record is kept; older ones are pruned in the background.
    pub retention_days: std::num::NonZeroU32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention_days: std::num::NonZeroU32::new(90).expect("non-zero"),
        }
    }
}

/// A tunnel, as opened (no `closed` yet) or as closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// Unique: this process's start and the tunnel's number.
    pub id: String,
    /// The node that recorded it (the requester's).
    pub node: String,
    /// The user's uuid (shown as the user's name, or masked).
    pub uuid: String,
    /// The device tunnelled to (`connme`), or the first of two (`connthem`).
    pub device: String,
    pub device_addr: String,
    /// The second device of a `connthem` tunnel.
    pub peer_device: Option<String>,
    /// The connection that asked for the tunnel, and its certificate's subject.
    pub client_addr: String,
    pub client_cert: Option<String>,
    pub opened: DateTime<Utc>,
    pub closed: Option<DateTime<Utc>>,
    /// Why it closed, in words.
    pub cause: Option<String>,
    /// Bytes into and out of `device` through the tunnel.
    pub to_device: u64,
    pub from_device: u64,
}

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChange {
    Online,
    Offline,
    /// A second connection of a device that still beats was refused
    /// (`auth.device_takeover = "when-silent"`).
    Refused,
}

impl DeviceChange {
    pub fn label(self) -> &'static str {
        match self {
            DeviceChange::Online => "online",
            DeviceChange::Offline => "offline",
            DeviceChange::Refused => "refused",
        }
    }

    pub fn parse(label: &str) -> Option<Self> {
        [Self::Online, Self::Offline, Self::Refused]
            .into_iter()
            .find(|c| c.label() == label)
    }
}

/// A device came, went, or was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub at: DateTime<Utc>,
    pub node: String,
    pub uuid: String,
    pub mac: String,
    pub host: String,
    pub change: DeviceChange,
    /// The connection's address (a refused one's, for `Refused`).
    pub address: String,
    /// Why, in words: "closed", "silent", "replaced by 1.2.3.4:5678", ...
    pub cause: Option<String>,
}

/// Hand a record to the persistence actor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Audit {
    Tunnel(TunnelRecord),
    Device(DeviceEvent),
}

/// Where actors send their records; one per gateway, naming this node.
#[derive(Clone)]
pub struct Trail {
    sink: Recipient<Audit>,
    node: Arc<str>,
    /// This process's start, which keeps tunnel ids unique across restarts.
    boot: i64,
    budgets: Arc<Mutex<Budgets>>,
}

/// Each device's events in its current window.
#[derive(Default)]
struct Budgets {
    windows: HashMap<(ByteString, ByteString), Window>,
    /// Expired windows are swept once there are this many.
    sweep_at: usize,
}

struct Window {
    start: Instant,
    recorded: u32,
    left_out: u32,
}

impl Budgets {
    /// Whether an event of (uuid, mac) may be recorded now; with the number of events
    /// the device's previous window left out, if any.
    fn take(&mut self, uuid: &ByteString, mac: &ByteString) -> (bool, u32) {
        let now = Instant::now();
        if self.windows.len() >= self.sweep_at.max(10_000) {
            self.windows
                .retain(|_, w| now.duration_since(w.start) < DEVICE_WINDOW);
            self.sweep_at = 2 * self.windows.len();
        }
        let fresh = Window {
            start: now,
            recorded: 0,
            left_out: 0,
        };
        let window = self
            .windows
            .entry((uuid.clone(), mac.clone()))
            .or_insert(fresh);
        let mut earlier = 0;
        if now.duration_since(window.start) >= DEVICE_WINDOW {
            earlier = window.left_out;
            window.start = now;
            window.recorded = 0;
            window.left_out = 0;
        }
        if window.recorded >= DEVICE_EVENTS_PER_WINDOW {
            window.left_out += 1;
            if window.left_out == 1 {
                log::warn!(
                    "device {mac}: more than {DEVICE_EVENTS_PER_WINDOW} online/offline events \
                     in {} min; the audit trail records no more of them until the window ends",
                    DEVICE_WINDOW.as_secs() / 60
                );
            }
            return (false, earlier);
        }
        window.recorded += 1;
        (true, earlier)
    }
}

impl Trail {
    pub fn new(sink: Recipient<Audit>, node: &str) -> Self {
        Self {
            sink,
            node: node.into(),
            boot: Utc::now().timestamp_millis(),
            budgets: Arc::default(),
        }
    }

    /// The id of this process's tunnel `tunnel`.
    pub fn tunnel_id(&self, tunnel: u64) -> String {
        format!("{}-{:x}-{tunnel}", self.node, self.boot)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn tunnel(&self, record: TunnelRecord) {
        self.sink.do_send(Audit::Tunnel(record));
    }

    pub fn device(
        &self,
        uuid: &ByteString,
        mac: &ByteString,
        host: &ByteString,
        change: DeviceChange,
        address: SocketAddr,
        cause: Option<String>,
    ) {
        let (record, earlier) = self
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(uuid, mac);
        if !record {
            metrics::counter!(metric::AUDIT_DROPPED_TOTAL).increment(1);
            return;
        }
        let cause = match (cause, earlier) {
            (cause, 0) => cause,
            (Some(cause), n) => Some(format!("{cause} ({n} earlier events not recorded)")),
            (None, n) => Some(format!("{n} earlier events not recorded")),
        };
        self.sink.do_send(Audit::Device(DeviceEvent {
            at: Utc::now(),
            node: self.node.to_string(),
            uuid: uuid.to_string(),
            mac: mac.to_string(),
            host: host.to_string(),
            change,
            address: address.to_string(),
            cause,
        }));
    }
}

/// Which records to read, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub uuid: Option<String>,
    pub mac: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Records to skip, and at most how many to return.
    pub offset: usize,
    pub limit: usize,
}
