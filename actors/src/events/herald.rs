//! The `Herald` actor: this node's fleet events. It watches the registry (devices
//! coming and going, contests), hears refusals from sessions, keeps the
//! [`Ledger`] of devices that left, asks the other nodes in cluster mode without
//! waiting for them (it keeps answering theirs meanwhile), and hands each event it
//! decides to the [`Announcer`].
//!
//! Bounds: a device's events count against the audit trail's per-device budget
//! ([`DEVICE_EVENTS_PER_WINDOW`] in ten minutes); a refusal is said at most once a
//! minute per type and subject (device, or certificate and address); the ledger
//! holds devices that left, never those live; each endpoint's queue is bounded.
//!
//! After it starts, and when it succeeds a cluster node that was lost, the herald
//! takes over from the store the devices seen lately (within the grace period plus
//! how stale a live device's last-seen can be) that no connection holds here
//! ("adopted"): those no node holds when the grace period ends are announced
//! offline, so a restart or a lost node leaves no device untold.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::announcer::{Announcer, Draft};
use super::ledger::{announces, arrival_elsewhere, Arrival, Due, Last, Ledger};
use super::webhook::{EndpointState, Queue};
use super::{EventData, EventKind};
use crate::audit::{DEVICE_EVENTS_PER_WINDOW, WINDOW};
use crate::bounded::{OncePer, WindowCounts};
use crate::certificate::ClientCert;
use crate::cluster::fleet::{AskFleet, KnownHere, NodeLost, Told, WatchFleet};
use crate::cluster::wire::{NodeId, Whereabouts};
use crate::cluster::Cluster;
use crate::device::DeviceKey;
use crate::metric;
use crate::registry::{AllLive, DeviceRegistry, DeviceSeen, Presence};
use crate::store::Store;
use crate::users::UserDirectory;

/// Devices asked about in one cluster request at most (a request names each by a
/// 34-byte subject; NATS takes 1 MiB by default).
const ASK_AT_MOST: usize = 2_000;
/// How often arrivals are asked about (in cluster mode) and grace periods checked.
const ARRIVALS_EVERY: Duration = Duration::from_millis(250);
const DUE_EVERY: Duration = Duration::from_secs(1);
/// Devices whose events in the window are counted, at most.
const MAX_BUDGETS: usize = 1_000_000;

pub struct Herald {
    node: String,
    grace: Duration,
    /// How recent a sighting in the store must be for its device to be adopted.
    adopt_within: Duration,
    ledger: Ledger,
    store: Arc<dyn Store>,
    registry: Addr<DeviceRegistry>,
    /// Each endpoint, for the status page.
    queues: Vec<Queue>,
    announcer: Announcer,
    cluster: Option<Addr<Cluster>>,
    /// Arrivals with no record here, to ask the other nodes about.
    arriving: Vec<(DeviceSeen, DateTime<Utc>)>,
    /// Refusals said lately, by type and subject.
    said: OncePer<(EventKind, String)>,
    /// Events per device in the current window.
    budgets: WindowCounts,
}

impl Herald {
    /// `grace`: `events.offline_after_secs`; `written_within`: how stale a live
    /// device's last-seen in the store can be (the debouncer's period and the online
    /// window), so that a device live until a restart or a lost node is adopted.
    pub fn new(
        node: &str,
        grace: Duration,
        written_within: Duration,
        users: Arc<UserDirectory>,
        store: Arc<dyn Store>,
        registry: Addr<DeviceRegistry>,
        queues: Vec<Queue>,
    ) -> Herald {
        Herald {
            node: node.to_owned(),
            grace,
            adopt_within: grace + written_within,
            ledger: Ledger::default(),
            store,
            registry,
            announcer: Announcer::start(users, queues.clone()),
            queues,
            cluster: None,
            arriving: Vec::new(),
            said: OncePer::new("event refusals", 10_000, Duration::from_secs(60)),
            budgets: WindowCounts::new("event budgets", MAX_BUDGETS, WINDOW),
        }
    }
}

impl Actor for Herald {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.registry
            .do_send(crate::registry::Watch(ctx.address().recipient()));
        ctx.run_interval(ARRIVALS_EVERY, |act, ctx| act.ask_about_arrivals(ctx));
        ctx.run_interval(DUE_EVERY, |act, ctx| act.check_due(ctx));
        ctx.run_interval(Duration::from_secs(3600), |act, _| {
            act.ledger.forget_old(Instant::now())
        });
        self.adopt_from_store("the gateway started", ctx);
    }
}

/// A refusal a session or the server tells the herald of.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct PeerRefused {
    pub kind: EventKind,
    pub uuid: Option<ByteString>,
    pub mac: Option<ByteString>,
    pub host: Option<ByteString>,
    pub source: SocketAddr,
    pub certificate: Option<ClientCert>,
    pub reason: String,
}

/// In cluster mode: this node's member of the cluster, to ask the other nodes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Joined(pub Addr<Cluster>);

/// The gateway is stopping: wait until every endpoint has delivered what it holds,
/// or `until`; answers how many events are left.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Drain {
    pub until: Instant,
}

impl Handler<Drain> for Herald {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, Drain { until }: Drain, _: &mut Context<Self>) -> Self::Result {
        let queues = self.queues.clone();
        Box::pin(async move {
            loop {
                let waiting: usize = queues.iter().map(Queue::waiting).sum();
                if waiting == 0 || Instant::now() >= until {
                    return waiting;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}

/// The endpoints' states, for the status page.
#[derive(Message)]
#[rtype(result = "Vec<EndpointState>")]
pub struct Endpoints;

impl Herald {
    fn data(&self, time: DateTime<Utc>, reason: String) -> EventData {
        EventData {
            node: self.node.clone(),
            time,
            reason,
            ..EventData::default()
        }
    }

    fn device_draft(
        &self,
        kind: EventKind,
        device: &DeviceKey,
        host: Option<&ByteString>,
        source: Option<SocketAddr>,
        time: DateTime<Utc>,
        reason: String,
    ) -> Draft {
        let mut data = self.data(time, reason);
        data.mac = Some(device.mac.to_string());
        data.host = host.map(ToString::to_string);
        data.source = source.map(|s| s.to_string());
        Draft {
            kind,
            uuid: Some(device.uuid.clone()),
            user: None,
            data,
        }
    }

    /// Takes one event from the device's budget: false if it is spent.
    fn within_budget(&mut self, device: &DeviceKey) -> bool {
        let counted = self
            .budgets
            .take(device, DEVICE_EVENTS_PER_WINDOW, Instant::now());
        if counted.first_left_out {
            log::warn!(
                "device {}: more than {DEVICE_EVENTS_PER_WINDOW} fleet events in {} min; no \
                 more of them until the window ends",
                device.mac,
                WINDOW.as_secs() / 60
            );
        }
        counted.within
    }

    /// Hands the drafts within their devices' budgets to the announcer.
    fn emit(&mut self, drafts: Vec<Draft>) {
        let mut kept = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let device = draft
                .uuid
                .as_ref()
                .zip(draft.data.mac.as_ref())
                .map(|(u, m)| DeviceKey::new(u, m));
            if device.is_some_and(|d| !self.within_budget(&d)) {
                metrics::counter!(metric::EVENTS_SUPPRESSED_TOTAL, "type" => draft.kind.name())
                    .increment(1);
                continue;
            }
            kept.push(draft);
        }
        self.announcer.announce(kept);
    }

    fn report(&self) {
        metrics::gauge!(metric::DEVICES_AWAY).set(self.ledger.len() as f64);
    }

    fn arrived(&mut self, seen: DeviceSeen) {
        let now = Utc::now();
        match self.ledger.arrived(&seen.device, now) {
            Arrival::Quiet => {}
            Arrival::BackOnline { left, away } => self.back_online(&seen, left, away),
            Arrival::Unknown if self.cluster.is_some() => self.arriving.push((seen, now)),
            Arrival::Unknown => self.online(&seen, now, "connected"),
        }
        self.report();
    }

    fn online(&mut self, seen: &DeviceSeen, at: DateTime<Utc>, reason: &str) {
        let draft = self.device_draft(
            EventKind::Online,
            &seen.device,
            Some(&seen.host),
            Some(seen.remote),
            at,
            reason.to_owned(),
        );
        self.emit(vec![draft]);
    }

    fn back_online(&mut self, seen: &DeviceSeen, left: DateTime<Utc>, away: Duration) {
        let mut draft = self.device_draft(
            EventKind::BackOnline,
            &seen.device,
            Some(&seen.host),
            Some(seen.remote),
            Utc::now(),
            format!("back after {} s away (last held {left})", away.as_secs()),
        );
        draft.data.away_secs = Some(away.as_secs());
        self.emit(vec![draft]);
    }

    /// Asks the other nodes about the devices that arrived with no record here.
    fn ask_about_arrivals(&mut self, ctx: &mut Context<Self>) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        while !self.arriving.is_empty() {
            let batch: Vec<(DeviceSeen, DateTime<Utc>)> = self
                .arriving
                .drain(..self.arriving.len().min(ASK_AT_MOST))
                .collect();
            let ask = AskFleet {
                devices: batch.iter().map(|(s, _)| s.device.clone()).collect(),
                arrived: true,
            };
            let asked = cluster.send(ask);
            ctx.spawn(asked.into_actor(self).map(move |told, act, _| {
                let told = match told {
                    Ok(Ok(told)) => Some(told),
                    _ => None,
                };
                let mut by_device = group(told.as_deref().unwrap_or_default());
                for (seen, at) in batch {
                    let said: Vec<Whereabouts> = by_device
                        .remove(&seen.device)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(_, w)| w)
                        .collect();
                    match (arrival_elsewhere(&said, at), told.is_some()) {
                        (Arrival::Quiet, _) => {}
                        (Arrival::BackOnline { left, away }, _) => {
                            act.back_online(&seen, left, away)
                        }
                        (Arrival::Unknown, true) => act.online(&seen, at, "connected"),
                        (Arrival::Unknown, false) => act.online(
                            &seen,
                            at,
                            "connected (the other nodes could not be asked whether they \
                             waited for it)",
                        ),
                    }
                }
            }));
        }
    }

    /// Grace periods that ended: announced offline unless a node holds the device
    /// (asked in cluster mode) or another node's record outranks this one's.
    fn check_due(&mut self, ctx: &mut Context<Self>) {
        let due = self.ledger.due(Instant::now(), self.grace);
        if due.is_empty() {
            return;
        }
        let Some(cluster) = self.cluster.clone() else {
            self.announce(due);
            return;
        };
        for batch in due.chunks(ASK_AT_MOST) {
            let batch = batch.to_vec();
            let ask = AskFleet {
                devices: batch.iter().map(|d| d.device.clone()).collect(),
                arrived: false,
            };
            let asked = cluster.send(ask);
            ctx.spawn(asked.into_actor(self).map(move |told, act, _| {
                let Ok(Ok(told)) = told else {
                    log::warn!(
                        "fleet events: the other nodes cannot be asked whether they hold \
                         {} devices whose grace period ended; asked again in {:?}",
                        batch.len(),
                        act.grace
                    );
                    return;
                };
                let mut by_device = group(&told);
                let mut announce = Vec::new();
                for due in batch {
                    let said = by_device.remove(&due.device).unwrap_or_default();
                    if announces(&due, &act.node, &said) {
                        announce.push(due);
                    } else {
                        act.ledger.forget(&due.device);
                    }
                }
                act.announce(announce);
                act.report();
            }));
        }
    }

    fn announce(&mut self, due: Vec<Due>) {
        let now = Instant::now();
        let mut drafts = Vec::with_capacity(due.len());
        for Due { device, last, .. } in due {
            if !self.ledger.announced(&device, &last, now) {
                // It came back while the other nodes were asked.
                continue;
            }
            let reason = format!(
                "no connection for {} s (events.offline_after_secs)",
                self.grace.as_secs()
            );
            drafts.push(self.device_draft(
                EventKind::Offline,
                &device,
                Some(&last.host),
                last.source,
                last.left,
                reason,
            ));
        }
        self.emit(drafts);
        self.report();
    }

    /// Takes over the devices the store saw within the grace period that are not
    /// live here and of which there is no record: announced offline if they do not
    /// come back within the grace period.
    fn adopt_from_store(&mut self, why: &'static str, ctx: &mut Context<Self>) {
        let (store, registry) = (self.store.clone(), self.registry.clone());
        let (grace, within) = (self.grace, self.adopt_within);
        let read = async move {
            let devices = store.devices(None).await;
            let live = registry.send(AllLive).await.unwrap_or_default();
            (devices, live)
        };
        ctx.spawn(read.into_actor(self).map(move |(devices, live), act, _| {
            let devices = match devices {
                Ok(devices) => devices,
                Err(e) => {
                    log::warn!(
                        "fleet events: cannot read the devices seen lately ({why}): {e}; \
                         devices that do not come back are not announced offline"
                    );
                    return;
                }
            };
            let live: HashSet<(ByteString, ByteString)> =
                live.into_iter().map(|c| (c.uuid, c.device.mac)).collect();
            let now = Utc::now();
            let due = Instant::now() + grace;
            let mut adopted = 0;
            for owned in devices {
                let Some(uuid) = owned.owner else { continue };
                let seen_ago = (now - owned.device.last_seen).to_std().unwrap_or_default();
                if seen_ago >= within {
                    continue;
                }
                let key = DeviceKey::new(&uuid, &owned.device.mac);
                if live.contains(&(key.uuid.clone(), key.mac.clone())) {
                    continue;
                }
                let last = Last {
                    host: owned.device.host.as_str().into(),
                    source: None,
                    left: owned.device.last_seen,
                };
                act.ledger.adopt(key, last, due);
                adopted += 1;
            }
            if adopted > 0 {
                log::info!(
                    "fleet events: {why}; {adopted} devices seen within {within:?} are not \
                     connected here: announced offline unless they come back within {grace:?}"
                );
            }
            act.report();
        }));
    }
}

/// What the nodes said, by device.
fn group(told: &[Told]) -> HashMap<DeviceKey, Vec<(NodeId, Whereabouts)>> {
    let mut by_device: HashMap<DeviceKey, Vec<(NodeId, Whereabouts)>> = HashMap::new();
    for t in told {
        by_device
            .entry(t.device.clone())
            .or_default()
            .push((t.node.clone(), t.whereabouts));
    }
    by_device
}

impl Handler<Presence> for Herald {
    type Result = ();

    fn handle(&mut self, change: Presence, _: &mut Context<Self>) {
        match change {
            Presence::Online(seen) => self.arrived(seen),
            Presence::Offline(seen) => {
                let last = Last {
                    host: seen.host,
                    source: Some(seen.remote),
                    left: Utc::now(),
                };
                self.ledger
                    .left(seen.device, last, Instant::now() + self.grace);
                self.report();
            }
            Presence::Contested {
                device,
                host,
                claimant,
                holder,
            } => {
                let draft = self.device_draft(
                    EventKind::Contested,
                    &device,
                    host.as_ref(),
                    Some(claimant),
                    Utc::now(),
                    format!(
                        "{claimant} claims it while it is seen from {holder} \
                         (auth.device_takeover = \"when-silent\")"
                    ),
                );
                self.emit(vec![draft]);
            }
        }
    }
}

impl Handler<PeerRefused> for Herald {
    type Result = ();

    fn handle(&mut self, refused: PeerRefused, _: &mut Context<Self>) {
        let subject = match (&refused.uuid, &refused.mac, &refused.certificate) {
            (Some(uuid), Some(mac), _) => format!("{uuid}/{mac}"),
            (_, _, Some(cert)) => format!("{}/{}", cert.serial, refused.source.ip()),
            _ => refused.source.ip().to_string(),
        };
        if !self.said.first(&(refused.kind, subject)) {
            metrics::counter!(metric::EVENTS_SUPPRESSED_TOTAL, "type" => refused.kind.name())
                .increment(1);
            return;
        }
        let mut data = self.data(Utc::now(), refused.reason);
        data.mac = refused.mac.map(|m| m.to_string());
        data.host = refused.host.map(|h| h.to_string());
        data.source = Some(refused.source.to_string());
        data.certificate_serial = refused.certificate.as_ref().map(|c| c.serial.to_string());
        let draft = Draft {
            kind: refused.kind,
            uuid: refused.uuid,
            user: refused.certificate.map(|c| c.user.to_string()),
            data,
        };
        self.emit(vec![draft]);
    }
}

impl Handler<Joined> for Herald {
    type Result = ();

    fn handle(&mut self, Joined(cluster): Joined, ctx: &mut Context<Self>) {
        cluster.do_send(WatchFleet {
            recorded: ctx.address().recipient(),
            lost: ctx.address().recipient(),
        });
        self.cluster = Some(cluster);
    }
}

impl Handler<KnownHere> for Herald {
    type Result = MessageResult<KnownHere>;

    fn handle(&mut self, asked: KnownHere, _: &mut Context<Self>) -> Self::Result {
        let named: HashMap<DeviceKey, String> = self
            .ledger
            .devices()
            .filter_map(|k| {
                let subject = asked.subjects.device(&k.uuid, &k.mac);
                asked.asked.contains(&subject).then(|| (k.clone(), subject))
            })
            .collect();
        let told = self.ledger.tell(named.keys(), asked.arrived);
        self.report();
        MessageResult(
            told.into_iter()
                .filter_map(|(k, w)| Some((named.get(&k)?.clone(), w)))
                .collect(),
        )
    }
}

impl Handler<NodeLost> for Herald {
    type Result = ();

    fn handle(&mut self, lost: NodeLost, ctx: &mut Context<Self>) {
        if lost.successor {
            log::info!(
                "fleet events: node {} was lost; this node takes over its devices",
                lost.node
            );
            self.adopt_from_store("a cluster node was lost", ctx);
        }
    }
}

impl Handler<Endpoints> for Herald {
    type Result = MessageResult<Endpoints>;

    fn handle(&mut self, _: Endpoints, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.queues.iter().map(Queue::state).collect())
    }
}
