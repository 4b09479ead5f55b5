//! The audit trail: who had a tunnel to which device, from where, when, for how long
//! and how many bytes; when each device came and went, and why; and who was refused
//! what (a request, a handshake, a takeover), from where, with which certificate.
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
//!
//! **Budgets.** No peer can fill the operator's disk through the trail: in each
//! [`WINDOW`] (10 minutes) a device's events are bounded ([`DEVICE_EVENTS_PER_WINDOW`]),
//! and tunnel records and refusal records each by `audit.budget_per_10min` per user
//! and per source address. What a full budget leaves out is counted
//! (`elfin_audit_records_dropped_total`) and summarised in the next record that is
//! written ("N earlier ... not recorded"). The budgets' own table is bounded and
//! fails closed ([`BoundedMap`]): when it is full, newcomers share one budget.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bounded::{BoundedMap, WindowCounts};
use crate::certificate::ClientCert;
use crate::metric;
use crate::refusal::Reason;
use crate::source::{Ipv6Prefix, Source};

/// Device events recorded per device in a [`WINDOW`]; past it (a device flapping, or
/// someone replaying its heartbeat to take it over and over) they are counted, not
/// written, and the next window's first event says how many were left out. A device's
/// database rows stay bounded whatever its connections do.
pub const DEVICE_EVENTS_PER_WINDOW: u32 = 30;
pub const WINDOW: Duration = Duration::from_secs(600);
/// Devices, users and sources with a budget in use at once, at most.
const MAX_BUDGETS: usize = 200_000;
/// Devices whose events in the window are counted, at most.
pub const MAX_DEVICE_BUDGETS: usize = 1_000_000;

/// The `[audit]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// Days a record is kept; older ones are pruned in the background.
    pub retention_days: std::num::NonZeroU32,
    /// Tunnel records, and refusal records, per user and per source address in 10
    /// minutes; past it they are counted, not written.
    pub budget_per_10min: std::num::NonZeroU32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention_days: std::num::NonZeroU32::new(90).expect("non-zero"),
            budget_per_10min: std::num::NonZeroU32::new(600).expect("non-zero"),
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
    /// The connection that asked for the tunnel, its certificate's subject (common
    /// name) and serial.
    pub client_addr: String,
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_cert_serial: Option<String>,
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

/// What a refused peer asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attempt {
    Connme,
    Connthem,
    Query,
    /// A TLS handshake (its client certificate).
    Handshake,
    /// A device connection that would take over a device beating elsewhere.
    Takeover,
    /// An open connection, closed when its client certificate was revoked or expired.
    Connection,
}

impl Attempt {
    pub fn label(self) -> &'static str {
        match self {
            Attempt::Connme => "connme",
            Attempt::Connthem => "connthem",
            Attempt::Query => "query",
            Attempt::Handshake => "handshake",
            Attempt::Takeover => "takeover",
            Attempt::Connection => "connection",
        }
    }

    pub fn parse(label: &str) -> Option<Self> {
        [
            Self::Connme,
            Self::Connthem,
            Self::Query,
            Self::Handshake,
            Self::Takeover,
            Self::Connection,
        ]
        .into_iter()
        .find(|r| r.label() == label)
    }
}

/// Something a peer was refused: a request, a handshake or a takeover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalRecord {
    pub at: DateTime<Utc>,
    pub node: String,
    pub request: Attempt,
    /// The user and the device the peer named, if it named them.
    pub uuid: Option<String>,
    pub device: Option<String>,
    /// `elfin_refusals_total`'s reason label, and the refusal in words.
    pub reason: String,
    pub detail: String,
    /// The peer's address, and its client certificate's subject and serial.
    pub source: String,
    pub certificate: Option<String>,
    pub certificate_serial: Option<String>,
}

/// A refusal as the code that refused tells the trail.
pub struct Refused<'a> {
    pub request: Attempt,
    pub reason: Reason,
    pub source: SocketAddr,
    pub uuid: Option<&'a str>,
    pub device: Option<&'a str>,
    pub certificate: Option<&'a ClientCert>,
    pub detail: String,
}

/// Hand a record to the persistence actor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Audit {
    Tunnel(TunnelRecord),
    Device(DeviceEvent),
    Refusal(RefusalRecord),
}

/// Audit records written together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditBatch {
    /// Tunnels by id: a later record of a tunnel replaces its earlier one.
    pub tunnels: Vec<TunnelRecord>,
    /// Appended.
    pub events: Vec<DeviceEvent>,
    pub refusals: Vec<RefusalRecord>,
}

impl AuditBatch {
    pub fn len(&self) -> usize {
        self.tunnels.len() + self.events.len() + self.refusals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many records the trail holds, by kind (`elfin_audit_records`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditSize {
    pub tunnels: u64,
    pub device_events: u64,
    pub refusals: u64,
}

/// Where actors send their records; one per gateway, naming this node.
#[derive(Clone)]
pub struct Trail {
    sink: Recipient<Audit>,
    node: Arc<str>,
    /// This process's start, which keeps tunnel ids unique across restarts.
    boot: i64,
    prefix: Ipv6Prefix,
    budget: u32,
    budgets: Arc<Mutex<BoundedMap<Budget, Window>>>,
    /// Each device's events in the current window: an entry for every device that came
    /// online lately, so the compact kind.
    devices: Arc<Mutex<WindowCounts>>,
}

/// Whose records a window counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Budget {
    User(RecordKind, ByteString),
    Source(RecordKind, Source),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RecordKind {
    Tunnel,
    Refusal,
}

impl RecordKind {
    fn plural(self) -> &'static str {
        match self {
            RecordKind::Tunnel => "tunnels",
            RecordKind::Refusal => "refusals",
        }
    }
}

struct Window {
    start: Instant,
    recorded: u32,
    left_out: u32,
}

/// Whether a record may be written, and how many its budgets' previous windows left
/// out (for its "not recorded" note).
struct Taken {
    record: bool,
    earlier: u32,
}

impl Trail {
    pub fn new(
        sink: Recipient<Audit>,
        node: &str,
        settings: &AuditSettings,
        prefix: Ipv6Prefix,
    ) -> Self {
        Self {
            sink,
            node: node.into(),
            boot: Utc::now().timestamp_millis(),
            prefix,
            budget: settings.budget_per_10min.get(),
            // Kept a window longer than it counts, so the next window's first record
            // can say what this one left out.
            budgets: Arc::new(Mutex::new(BoundedMap::new(
                "audit budgets",
                MAX_BUDGETS,
                2 * WINDOW,
            ))),
            devices: Arc::new(Mutex::new(WindowCounts::new(
                "audit device budgets",
                MAX_DEVICE_BUDGETS,
                WINDOW,
            ))),
        }
    }

    /// Takes one record from each of `budgets` (each holding at most `limit` a
    /// window): recorded only if every one has room; a full one counts it as left out.
    fn take(&self, budgets: &[(Budget, u32)]) -> Taken {
        let now = Instant::now();
        let fresh = || Window {
            start: now,
            recorded: 0,
            left_out: 0,
        };
        let mut table = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        // First: a window that has ended starts anew; which budgets are full?
        let mut earlier = 0;
        let full: Vec<bool> = budgets
            .iter()
            .map(|(budget, limit)| {
                let (window, _) = table.touch(budget, now, fresh);
                if now.duration_since(window.start) >= WINDOW {
                    earlier = earlier.max(window.left_out);
                    *window = fresh();
                }
                window.recorded >= *limit
            })
            .collect();
        let record = !full.contains(&true);
        // Then: charge the record to every budget, or count it left out where full.
        for ((budget, limit), full) in budgets.iter().zip(full) {
            let (window, _) = table.touch(budget, now, fresh);
            if record {
                window.recorded += 1;
            } else if full {
                window.left_out += 1;
                if window.left_out == 1 {
                    warn_full(budget, *limit);
                }
            }
        }
        if !record {
            metrics::counter!(metric::AUDIT_DROPPED_TOTAL).increment(1);
        }
        Taken { record, earlier }
    }

    /// Takes a tunnel record of user `uuid` asked for from `source` out of their
    /// budgets: `Some(n)` if it is to be written, `n` earlier ones having been left out.
    pub fn admit_tunnel(&self, uuid: &ByteString, source: IpAddr) -> Option<u32> {
        let taken = self.take(&[
            (Budget::User(RecordKind::Tunnel, uuid.clone()), self.budget),
            (
                Budget::Source(RecordKind::Tunnel, self.prefix.source_of(source)),
                self.budget,
            ),
        ]);
        taken.record.then_some(taken.earlier)
    }

    /// Records a refusal, within the budgets of the user it named and of its source.
    pub fn refusal(&self, refused: Refused<'_>) {
        let mut budgets = vec![(
            Budget::Source(
                RecordKind::Refusal,
                self.prefix.source_of(refused.source.ip()),
            ),
            self.budget,
        )];
        if let Some(uuid) = refused.uuid {
            budgets.push((Budget::User(RecordKind::Refusal, uuid.into()), self.budget));
        }
        let taken = self.take(&budgets);
        if !taken.record {
            return;
        }
        let mut detail = refused.detail;
        if taken.earlier > 0 {
            detail.push_str(&format!(
                " ({} earlier refusals not recorded)",
                taken.earlier
            ));
        }
        self.sink.do_send(Audit::Refusal(RefusalRecord {
            at: Utc::now(),
            node: self.node.to_string(),
            request: refused.request,
            uuid: refused.uuid.map(str::to_owned),
            device: refused.device.map(str::to_owned),
            reason: refused.reason.label().to_owned(),
            detail,
            source: refused.source.to_string(),
            certificate: refused.certificate.map(|c| c.user.to_string()),
            certificate_serial: refused.certificate.map(|c| c.serial.to_string()),
        }));
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
        let counted = self.devices.lock().unwrap_or_else(|e| e.into_inner()).take(
            &(uuid, mac),
            DEVICE_EVENTS_PER_WINDOW,
            Instant::now(),
        );
        if !counted.within {
            metrics::counter!(metric::AUDIT_DROPPED_TOTAL).increment(1);
            if counted.first_left_out {
                log::warn!(
                    "device {mac}: more than {DEVICE_EVENTS_PER_WINDOW} online/offline events \
                     in {} min; the audit trail records no more of them until the window ends",
                    WINDOW.as_secs() / 60
                );
            }
            return;
        }
        let earlier = counted.earlier;
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

/// Says once per window that a budget is full.
fn warn_full(budget: &Budget, limit: u32) {
    let minutes = WINDOW.as_secs() / 60;
    match budget {
        Budget::User(kind, uuid) => log::warn!(
            "user {}: more than {limit} {} in {minutes} min (audit.budget_per_10min); the \
             audit trail counts the rest until the window ends",
            crate::masked::masked(uuid),
            kind.plural()
        ),
        Budget::Source(kind, source) => log::warn!(
            "source {source}: more than {limit} {} in {minutes} min (audit.budget_per_10min); \
             the audit trail counts the rest until the window ends",
            kind.plural()
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps what the trail hands over.
    #[derive(Default)]
    struct Kept(Arc<Mutex<Vec<Audit>>>);

    impl Actor for Kept {
        type Context = Context<Self>;
    }

    impl Handler<Audit> for Kept {
        type Result = ();
        fn handle(&mut self, record: Audit, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(record);
        }
    }

    fn trail(budget: u32) -> (Trail, Arc<Mutex<Vec<Audit>>>) {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let sink = Kept(kept.clone()).start().recipient();
        let settings = AuditSettings {
            budget_per_10min: std::num::NonZeroU32::new(budget).unwrap(),
            ..AuditSettings::default()
        };
        (Trail::new(sink, "gw", &settings, Ipv6Prefix::DEFAULT), kept)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[actix_rt::test]
    async fn tunnel_records_are_bounded_per_user_and_per_source_and_the_rest_summarised() {
        tokio::time::pause();
        let (trail, _) = trail(3);
        let alice: ByteString = "ua".into();
        let bob: ByteString = "ub".into();
        let taken: Vec<Option<u32>> = (0..5)
            .map(|_| trail.admit_tunnel(&alice, ip("192.0.2.1")))
            .collect();
        assert_eq!(taken, [Some(0), Some(0), Some(0), None, None]);
        // Per user: alice from elsewhere is over her budget too.
        assert_eq!(trail.admit_tunnel(&alice, ip("192.0.2.2")), None);
        // Per source: another user from the first address is refused by the
        // address's budget; from a fresh address bob is recorded.
        assert_eq!(trail.admit_tunnel(&bob, ip("192.0.2.1")), None);
        assert_eq!(trail.admit_tunnel(&bob, ip("192.0.2.3")), Some(0));
        // An IPv6 network is one source.
        for host in 1..=3 {
            assert!(trail
                .admit_tunnel(&format!("v{host}").into(), ip(&format!("2001:db8::{host}")))
                .is_some());
        }
        assert_eq!(trail.admit_tunnel(&"v9".into(), ip("2001:db8::ff")), None);
        // The next window records again and says how many were left out.
        tokio::time::advance(WINDOW).await;
        assert_eq!(trail.admit_tunnel(&alice, ip("192.0.2.1")), Some(3));
    }

    #[actix_rt::test]
    async fn refusals_are_recorded_within_their_budget_with_the_certificate() {
        tokio::time::pause();
        let (trail, kept) = trail(2);
        let certificate = ClientCert {
            user: "bob".into(),
            serial: "0C0FFEE0".into(),
            not_before: DateTime::<Utc>::MIN_UTC,
            not_after: DateTime::<Utc>::MAX_UTC,
        };
        let refuse = |uuid: Option<&str>| {
            trail.refusal(Refused {
                request: Attempt::Connme,
                reason: Reason::UserBinding,
                source: "192.0.2.9:4000".parse().unwrap(),
                uuid,
                device: Some("F0FE6B2A1C3D"),
                certificate: Some(&certificate),
                detail: "refused".into(),
            })
        };
        for _ in 0..4 {
            refuse(Some("ua"));
        }
        tokio::time::advance(WINDOW).await;
        refuse(None);
        tokio::task::yield_now().await;
        actix_rt::time::sleep(Duration::from_millis(10)).await;
        let kept = kept.lock().unwrap();
        let refusals: Vec<&RefusalRecord> = kept
            .iter()
            .filter_map(|r| match r {
                Audit::Refusal(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(refusals.len(), 3, "two, then one in the next window");
        assert_eq!(refusals[0].certificate.as_deref(), Some("bob"));
        assert_eq!(refusals[0].certificate_serial.as_deref(), Some("0C0FFEE0"));
        assert_eq!(refusals[0].request, Attempt::Connme);
        assert_eq!(refusals[0].source, "192.0.2.9:4000");
        assert_eq!(
            refusals[2].detail,
            "refused (2 earlier refusals not recorded)"
        );
    }

    #[actix_rt::test]
    async fn a_flapping_device_is_recorded_up_to_its_window_budget() {
        tokio::time::pause();
        let (trail, kept) = trail(600);
        let (uuid, mac, host): (ByteString, ByteString, ByteString) =
            ("ua".into(), "M1".into(), "plc".into());
        let address: SocketAddr = "192.0.2.1:1".parse().unwrap();
        for _ in 0..DEVICE_EVENTS_PER_WINDOW + 5 {
            trail.device(&uuid, &mac, &host, DeviceChange::Online, address, None);
        }
        tokio::time::advance(WINDOW).await;
        trail.device(&uuid, &mac, &host, DeviceChange::Offline, address, None);
        actix_rt::time::sleep(Duration::from_millis(10)).await;
        let kept = kept.lock().unwrap();
        assert_eq!(kept.len() as u32, DEVICE_EVENTS_PER_WINDOW + 1);
        let Some(Audit::Device(last)) = kept.last() else {
            panic!("a device event")
        };
        assert_eq!(last.cause.as_deref(), Some("5 earlier events not recorded"));
    }
}
