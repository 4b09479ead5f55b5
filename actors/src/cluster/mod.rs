//! Cluster mode: several gateway nodes serve one fleet, over NATS and a shared store.
//!
//! The [`Cluster`] actor is this node's member of the cluster. It owns the NATS
//! client and three things:
//!
//! - **Presence.** For each device live here (the registry tells it, [`Presence`]) it
//!   subscribes to the device's subject ([`wire::Subjects::device`], a hash, never
//!   the uuid), so NATS's interest graph is the presence table: a node that dies
//!   takes its entries with it. A device that goes live here publishes a claim there,
//!   and the node that held it before closes its stale connection
//!   ([`Evict`](crate::registry::Evict)).
//! - **Reaching devices elsewhere** (`requests.rs`). `connme`/`connthem` for a device
//!   live on another node ask that node, on the device's subject, to tunnel it to a
//!   [`remote::Remote`] here; it dials this node's peer port ([`peer`]) and the
//!   tunnel's bytes go over that direct TLS connection. `query` asks every node for
//!   the user's live devices ([`Gather`]).
//! - **Membership.** Every node says hello every so often, with where it takes peer
//!   connections and its certificate's fingerprint; a node not heard from for
//!   [`ClusterConfig::node_timeout`] is gone and its tunnels end. A lost NATS
//!   connection ends every cross-node tunnel; the client reconnects in the background
//!   and subscribes again, which rebuilds presence.
//!
//! Every message between nodes is sealed with the cluster secret ([`bus`]): whoever
//! else reaches NATS can neither speak as a node nor replay what one said.
//! The shared MongoDB store does the rest: users, and devices' last-seen, are the same
//! on every node.

pub mod bus;
pub mod fleet;
mod membership;
mod nats;
pub mod peer;
mod peer_tls;
pub mod remote;
mod requests;
mod settings;
pub mod wire;

pub use membership::{ClusterView, Membership};
use nats::tokio_stream_of;
pub use nats::{NatsAuth, Subscription};
pub use requests::{Elsewhere, Gather, Open, Probe, SeenElsewhere};
pub use settings::{ClusterSettings, SettingError};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_nats::{Event, Message};
use bytestring::ByteString;
use futures::stream::AbortHandle;
use futures::StreamExt;
use tokio::time::Instant;

use serde::Serialize;

use crate::bridge::BridgeManager;
use crate::device::DeviceKey;
use crate::link::SessionId;
use crate::metric;
use crate::registry::{DeviceRegistry, Presence, Watch};
use bus::{Bus, Keys, Seal};
use peer::{AwaitedTunnels, Known, PeerIdentity, PeerTls};
use remote::{Lost, Remote, Tracked};
use wire::{Ask, Hello, NodeId, Subjects};

/// How this node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS servers (`nats://host:4222`, `tls://…`), tried in turn.
    pub servers: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node: NodeId,
    pub subjects: Subjects,
    /// Keys from the cluster secret.
    pub keys: Arc<Keys>,
    pub auth: NatsAuth,
    /// Where this node takes peer connections, and the address other nodes dial
    /// (default: the bound `peer_listen`).
    pub peer_listen: SocketAddr,
    pub peer_advertise: Option<String>,
    /// The peer certificate and key files, if not a fresh pair.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// How long a request to another node waits for its answer.
    pub request_timeout: Duration,
    /// Under `auth.device_takeover = "when-silent"`: how long this node keeps answering
    /// for a device whose connection left it (the online window), so a node the
    /// device's impostor reaches learns where it was last seen.
    pub linger: Option<Duration>,
    /// A node not heard from for this long is gone.
    pub node_timeout: Duration,
    /// The gateway's stall time, and a cross-node end's output queue.
    pub stall: Duration,
    pub out_chunks: usize,
    pub out_bytes: usize,
}

impl ClusterConfig {
    /// How often this node says hello.
    fn hello_every(&self) -> Duration {
        self.node_timeout / 4
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot read the NATS credentials file: {0}")]
    Credentials(std::io::Error),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("cluster.peer_cert: {0}")]
    Identity(#[from] peer::PeerIdentityError),
    #[error("cluster.peer_listen {0}: {1}")]
    PeerListen(SocketAddr, std::io::Error),
    #[error("peer TLS: {0}")]
    PeerTls(#[from] rustls::Error),
}

pub struct Cluster {
    bus: Bus,
    config: Arc<ClusterConfig>,
    /// What this node says in its hellos.
    hello: Hello,
    /// The certificates of the nodes in `nodes`, for the peer port.
    known: Known,
    peer_tls: Arc<PeerTls>,
    expected: Arc<AwaitedTunnels>,
    registry: Addr<DeviceRegistry>,
    bridge: Addr<BridgeManager>,
    /// Devices live here.
    held: HashMap<DeviceKey, LiveHere>,
    /// Devices whose connection left within [`ClusterConfig::linger`]: their subjects
    /// are still answered, until this handle ends them.
    lingering: HashMap<DeviceKey, Lingering>,
    /// Hands each device's stream to the one stream that merges them all: actix polls
    /// every stream of an actor's context on each wake, which for thousands of devices
    /// would cost more than the messages, while a merged stream polls only those that
    /// have something.
    devices: tokio::sync::mpsc::UnboundedSender<DeviceStream>,
    /// Users with devices live here, by their name in `query` requests: uuid, and how
    /// many devices.
    users: HashMap<String, (ByteString, usize)>,
    /// Other nodes, from their hellos.
    nodes: HashMap<NodeId, Node>,
    /// Cross-node tunnel ends here, with the node of their other end.
    remotes: HashMap<SessionId, (NodeId, Addr<Remote>)>,
    connected: bool,
    /// The fleet events keeper of this node, once it watches ([`fleet`]).
    fleet: Option<fleet::WatchFleet>,
}

/// Another node, as its hellos tell.
#[derive(Debug, Clone)]
struct Node {
    seen: Instant,
    started_ms: i64,
    /// Where it takes peer connections.
    peer: String,
    /// Its certificate there.
    fingerprint: String,
}

/// A device live on this node.
struct LiveHere {
    /// Ends its subject's stream (and so the subscription).
    stream: AbortHandle,
    /// When it went live here: milliseconds since the Unix epoch.
    since_ms: i64,
}

/// A device's subject still answered after its connection left.
struct Lingering {
    stream: AbortHandle,
    /// Tells this lingering apart from a later one of the same device.
    since_ms: i64,
}

/// What a device's subject brings, as one of [`Cluster::devices`]' streams.
type DeviceStream = futures::stream::BoxStream<'static, Incoming>;

/// Everything that reaches the cluster actor from NATS.
enum Incoming {
    Event(Event),
    Device(DeviceKey, Message),
    Query(Message),
    Hello(Message),
    Fleet(Message),
}

/// Opens the peer port, connects to NATS (in the background: a node whose NATS is
/// down runs alone until it answers) and starts this node's [`Cluster`] actor.
pub async fn join(
    config: ClusterConfig,
    registry: Addr<DeviceRegistry>,
    bridge: Addr<BridgeManager>,
) -> Result<Addr<Cluster>, JoinError> {
    let identity = match &config.identity {
        Some((cert, key)) => PeerIdentity::load(cert, key)?,
        None => PeerIdentity::generate(config.node.as_str()),
    };
    identity.export_expiry();
    let known = Known::default();
    let fingerprint = identity.fingerprint.clone();
    let peer_tls = Arc::new(PeerTls::new(Arc::new(identity), known.clone())?);
    let listener = tokio::net::TcpListener::bind(config.peer_listen)
        .await
        .map_err(|e| JoinError::PeerListen(config.peer_listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| JoinError::PeerListen(config.peer_listen, e))?;
    let hello = Hello {
        peer: config.peer_advertise.clone().unwrap_or(bound.to_string()),
        fingerprint,
        started_ms: chrono::Utc::now().timestamp_millis(),
    };
    let seal = Arc::new(Seal::new(config.node.clone(), &config.keys));
    let expected = Arc::new(AwaitedTunnels::default());
    actix_rt::spawn(peer::listen(
        listener,
        peer_tls.clone(),
        expected.clone(),
        seal.clone(),
        config.request_timeout,
        config.node_timeout,
    ));
    let (events, incoming) = tokio::sync::mpsc::unbounded_channel();
    let nats = config
        .auth
        .options()
        .await?
        .name(format!("elfin-gateway {}", config.node))
        // This node's own hellos, claims and queries are not for itself.
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(100u64 << attempts.min(5)).min(Duration::from_secs(2))
        })
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                let _ = events.send(event);
            }
        })
        .connect(config.servers.as_slice())
        .await
        .map_err(|e| JoinError::Nats(e.to_string()))?;
    let query = Subscription::new(&nats, config.subjects.query())
        .await
        .map_err(|e| JoinError::Nats(e.to_string()))?;
    let hellos = Subscription::new(&nats, config.subjects.hello())
        .await
        .map_err(|e| JoinError::Nats(e.to_string()))?;
    let fleet_asks = Subscription::new(&nats, config.subjects.fleet())
        .await
        .map_err(|e| JoinError::Nats(e.to_string()))?;
    log::info!(
        "cluster node {}: tunnels from other nodes on {bound}, advertised as {}, \
         certificate sha256 {}",
        config.node,
        hello.peer,
        hello.fingerprint
    );
    let watched = registry.clone();
    let (devices, device_streams) = tokio::sync::mpsc::unbounded_channel();
    let cluster = Cluster::create(move |ctx| {
        ctx.add_stream(tokio_stream_of(incoming).map(Incoming::Event));
        ctx.add_stream(query.map(Incoming::Query));
        ctx.add_stream(hellos.map(Incoming::Hello));
        ctx.add_stream(fleet_asks.map(Incoming::Fleet));
        ctx.add_stream(tokio_stream_of(device_streams).flatten_unordered(None));
        Cluster {
            bus: Bus { nats, seal },
            config: Arc::new(config),
            hello,
            known,
            peer_tls,
            expected,
            registry,
            bridge,
            held: HashMap::new(),
            lingering: HashMap::new(),
            devices,
            users: HashMap::new(),
            nodes: HashMap::new(),
            remotes: HashMap::new(),
            connected: false,
            fleet: None,
        }
    });
    watched.do_send(Watch(cluster.clone().recipient()));
    Ok(cluster)
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::info!(
            "cluster node {} joining over NATS at {}",
            self.config.node,
            self.config.servers.join(",")
        );
        ctx.run_interval(self.config.hello_every(), |act, _| act.tick());
        // The first attempt has had its connection timeout by then.
        ctx.run_later(Duration::from_millis(2500), |act, _| {
            if !act.connected {
                log::warn!(
                    "NATS at {} does not answer: this node runs alone (its own devices \
                     only) and keeps trying in the background",
                    act.config.servers.join(",")
                );
            }
        });
        self.report();
    }
}

impl Cluster {
    fn report(&self) {
        metrics::gauge!(metric::CLUSTER_CONNECTED).set(if self.connected { 1.0 } else { 0.0 });
        metrics::gauge!(metric::CLUSTER_NODES).set(self.nodes.len() as f64);
        metrics::gauge!(metric::CLUSTER_TUNNEL_ENDS).set(self.remotes.len() as f64);
    }

    /// Ends the cross-node tunnel ends whose other node `matches`; returns how many.
    fn end_tunnels(&mut self, matches: impl Fn(&NodeId) -> bool, why: &str) -> usize {
        let mut ended = 0;
        for (node, end) in self.remotes.values() {
            if matches(node) {
                end.do_send(Lost(why.to_owned()));
                ended += 1;
            }
        }
        ended
    }

    /// Publishes `message`, sealed, without waiting.
    fn publish<T: Serialize>(&self, subject: String, message: &T) {
        let (bus, payload) = (self.bus.clone(), bus::encode(message));
        actix_rt::spawn(async move {
            bus.publish_raw(subject, payload).await;
        });
    }

    /// Answers `to`, sealed, without waiting.
    fn reply<T: Serialize>(&self, to: &Message, answer: &T) {
        if let Some(reply) = &to.reply {
            self.publish(reply.to_string(), answer);
        }
    }

    fn nats_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                self.connected = true;
                log::info!(
                    "connected to NATS; {} devices live here are reachable from other nodes",
                    self.held.len()
                );
                // A device may have moved while NATS was away, leaving its old
                // connection open on another node: the older connection gives way.
                for (key, held) in &self.held {
                    self.claim(key, held.since_ms);
                }
                self.tick();
            }
            Event::Disconnected => {
                self.connected = false;
                let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
                for name in names {
                    self.forget(&name);
                }
                let ended = self.end_tunnels(|_| true, "the NATS connection was lost");
                log::warn!(
                    "lost the NATS connection: {ended} cross-node tunnel ends closed; local \
                     tunnels keep flowing; reconnecting in the background"
                );
            }
            Event::SlowConsumer(sid) => {
                log::warn!("NATS dropped messages for subscription {sid} (slow consumer)")
            }
            other => log::info!("NATS: {other}"),
        }
        self.report();
    }

    /// Tells whoever else holds the device that this node has had it since
    /// `since_ms`: a holder whose own connection of the device is older gives it up.
    fn claim(&self, device: &DeviceKey, since_ms: i64) {
        let subject = self.config.subjects.device(&device.uuid, &device.mac);
        self.publish(subject, &Ask::Claim { since_ms });
    }

    fn online(&mut self, key: DeviceKey) {
        if self.held.contains_key(&key) {
            return;
        }
        if let Some(lingering) = self.lingering.remove(&key) {
            lingering.stream.abort();
        }
        let user = self.config.subjects.user(&key.uuid);
        self.users
            .entry(user)
            .or_insert_with(|| (key.uuid.clone(), 0))
            .1 += 1;
        let since_ms = chrono::Utc::now().timestamp_millis();
        self.claim(&key, since_ms);
        let (nats, subject) = (
            self.bus.nats.clone(),
            self.config.subjects.device(&key.uuid, &key.mac),
        );
        let subscribed = async move { Subscription::new(&nats, subject).await.ok() };
        let k = key.clone();
        let messages = futures::stream::once(subscribed)
            .filter_map(std::future::ready)
            .flatten()
            .map(move |m| Incoming::Device(k.clone(), m));
        let (stream, abort) = futures::stream::abortable(messages);
        let _ = self.devices.send(stream.boxed());
        let held = LiveHere {
            stream: abort,
            since_ms,
        };
        self.held.insert(key, held);
    }

    fn offline(&mut self, key: DeviceKey, ctx: &mut Context<Self>) {
        let Some(held) = self.held.remove(&key) else {
            return;
        };
        match self.config.linger {
            // Still answered for the online window: where it was last seen.
            Some(linger) => {
                let since_ms = held.since_ms;
                let lingering = Lingering {
                    stream: held.stream,
                    since_ms,
                };
                self.lingering.insert(key.clone(), lingering);
                let key = key.clone();
                ctx.run_later(linger, move |act, _| {
                    if act
                        .lingering
                        .get(&key)
                        .is_some_and(|l| l.since_ms == since_ms)
                    {
                        if let Some(lingering) = act.lingering.remove(&key) {
                            lingering.stream.abort();
                        }
                    }
                });
            }
            None => held.stream.abort(),
        }
        let user = self.config.subjects.user(&key.uuid);
        if let Some((_, devices)) = self.users.get_mut(&user) {
            *devices -= 1;
            if *devices == 0 {
                self.users.remove(&user);
            }
        }
    }
}

impl StreamHandler<Incoming> for Cluster {
    fn handle(&mut self, incoming: Incoming, ctx: &mut Context<Self>) {
        match incoming {
            Incoming::Event(event) => self.nats_event(event),
            Incoming::Device(key, message) => self.device_message(key, message, ctx),
            Incoming::Query(message) => self.query_message(message, ctx),
            Incoming::Hello(message) => self.hello_message(message),
            Incoming::Fleet(message) => self.fleet_message(message, ctx),
        }
    }

    /// None of the streams ends while the actor lives (devices come and go inside the
    /// merged one).
    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl Handler<Presence> for Cluster {
    type Result = ();

    fn handle(&mut self, change: Presence, ctx: &mut Context<Self>) {
        match change {
            Presence::Online(seen) => self.online(seen.device),
            Presence::Offline(seen) => self.offline(seen.device, ctx),
            Presence::Contested { .. } => {}
        }
    }
}

impl Handler<Tracked> for Cluster {
    type Result = ();

    fn handle(&mut self, tracked: Tracked, _: &mut Context<Self>) {
        match tracked {
            Tracked::Open { id, node, end } => {
                self.remotes.insert(id, (node, end));
            }
            Tracked::Closed(id) => {
                self.remotes.remove(&id);
            }
        }
        self.report();
    }
}

/// The node is stopping: whatever its tunnel ends published (their `Close` above all)
/// goes out before the process ends, for at most a second.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave;

impl Handler<Leave> for Cluster {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Leave, _: &mut Context<Self>) -> Self::Result {
        let nats = self.bus.nats.clone();
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), nats.flush()).await;
        })
    }
}
