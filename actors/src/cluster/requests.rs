//! The requests between nodes, asked and answered: `probe` and `open` on a device's
//! subject (is it live on your node? tunnel it to an end on mine), and `query` to
//! every node (your live devices of this user).
//!
//! [`Command`](crate::command::Command) asks through [`Probe`], [`Open`] and [`Gather`]
//! when a device is not live on this node; the [`Cluster`] actor answers what other
//! nodes ask. Every request and answer goes through the [`Bus`](super::bus::Bus),
//! which seals and opens them.
//!
//! Opening a tunnel across nodes: the node where the client is (the asker) makes a
//! one-time token and asks on the device's subject; the node holding the device
//! dials the asker's peer port (pinned to the certificate its hello announced),
//! presents the token, and answers `opened` once the asker has attached it. The asker
//! takes the connection only from the node that answered.

use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use async_nats::Message;
use bytestring::ByteString;
use futures::StreamExt;
use tokio::time::Instant;

use super::bus::{hex, unhex, Rejected, Replied};
use super::peer::{self, Token};
use super::remote::{self, Tracked};
use super::wire::{Answer, Ask, LiveElsewhere, NodeId, QueryAnswer, QueryAsk, WireRole};
use super::{Cluster, ClusterConfig, Node};
use crate::bridge::{BridgeManager, Link};
use crate::device::DeviceKey;
use crate::link::{End, PeerLink};
use crate::registry::{Evict, LastSeen, LiveDevices, Lookup};
use crate::store::Sighting;

/// Answering other nodes.
impl Cluster {
    pub(super) fn device_message(
        &mut self,
        key: DeviceKey,
        message: Message,
        ctx: &mut Context<Self>,
    ) {
        let Some((node, ask)) = self.bus.open::<Ask>(&message) else {
            return;
        };
        if !self.held.contains_key(&key) && !matches!(ask, Ask::Beating { .. }) {
            // A device that left lately: only asked where it was last seen.
            return;
        }
        match ask {
            Ask::Claim { since_ms } => {
                let Some(ours) = self.held.get(&key).map(|h| h.since_ms) else {
                    return;
                };
                if gives_way(ours, self.config.node.as_str(), since_ms, node.as_str()) {
                    log::info!(
                        "device {} connected to node {node}; closing its connection here",
                        key.mac
                    );
                    self.registry.do_send(Evict(key));
                } else {
                    // An older connection claimed (after NATS came back, or a replay):
                    // its node may have missed this node's own claim.
                    self.claim(&key, ours);
                }
            }
            Ask::Probe => {
                let lookup = self.registry.send(Lookup(key));
                ctx.spawn(lookup.into_actor(self).map(move |found, act, _| {
                    act.reply(&message, &present(found.ok().flatten().is_some()));
                }));
            }
            Ask::Beating { from } => {
                let seen = self.registry.send(LastSeen(key));
                ctx.spawn(seen.into_actor(self).map(move |seen, act, _| {
                    let seen = seen.ok().flatten();
                    // Refused when seen lately from elsewhere (an old node that does
                    // not say from where: seen lately at all).
                    let refuse = seen.is_some_and(|h| from.is_none_or(|ip| ip != h.ip));
                    act.reply(&message, &present(refuse));
                }));
            }
            Ask::Open {
                token,
                remote,
                role,
            } => {
                let Some(far) = self.nodes.get(&node).cloned() else {
                    // Its hello is on the way (a node that just started): it asks again.
                    log::debug!("an open from node {node}, not heard from yet");
                    self.reply(&message, &present(false));
                    return;
                };
                let Some(token) = unhex_token(&token) else {
                    self.bus.seal.reject(Rejected::Unexpected, || {
                        format!("an open from node {node} with a malformed token")
                    });
                    return;
                };
                let asker = Asker {
                    name: node,
                    node: far,
                    remote,
                    token,
                };
                let accept = self.accept(key, asker, role, ctx);
                ctx.spawn(accept.into_actor(self).map(move |answer, act, _| {
                    act.reply(&message, &answer);
                }));
            }
        }
    }

    /// Tunnels `device`, live here, to an end on the asking node.
    fn accept(
        &self,
        device: DeviceKey,
        asker: Asker,
        role: WireRole,
        ctx: &mut Context<Self>,
    ) -> impl std::future::Future<Output = Answer> + 'static {
        let (registry, bridge) = (self.registry.clone(), self.bridge.clone());
        let (config, tls) = (self.config.clone(), self.peer_tls.clone());
        let tracker = ctx.address().recipient();
        async move {
            let failed = |reason: &str| Answer::Failed {
                reason: reason.into(),
            };
            let mac = device.mac.clone();
            let Ok(Some(device)) = registry.send(Lookup(device)).await else {
                return failed("offline");
            };
            let remote = device.remote;
            let dialed = peer::dial(
                &tls,
                &asker.node.peer,
                &asker.node.fingerprint,
                asker.token,
                config.request_timeout,
                config.node_timeout,
            )
            .await;
            let lanes = match dialed {
                Ok(lanes) => lanes,
                Err(e) => {
                    log::warn!(
                        "cannot reach node {} on its peer port {}: {e}; its tunnels to \
                         devices here fail",
                        asker.name,
                        asker.node.peer
                    );
                    return failed("offline");
                }
            };
            let started = start_end(
                lanes,
                &device.home,
                &config,
                asker.name,
                asker.remote,
                tracker,
                &bridge,
            );
            let Ok(end) = started.await else {
                return failed("offline");
            };
            let link = Link {
                a: role.end(end),
                b: End::device(device, mac),
                notify: true,
                // The asking node audits it.
                requester: None,
            };
            if bridge.send(link).await.is_err() {
                return failed("offline");
            }
            Answer::Opened { remote }
        }
    }

    pub(super) fn query_message(&mut self, message: Message, ctx: &mut Context<Self>) {
        let Some((_, ask)) = self.bus.open::<QueryAsk>(&message) else {
            return;
        };
        let live = match self.users.get(&ask.user) {
            Some((uuid, _)) => Some(self.registry.send(LiveDevices { uuid: uuid.clone() })),
            None => None,
        };
        let answer = async move {
            let live = match live {
                Some(live) => live.await.unwrap_or_default(),
                None => Vec::new(),
            };
            let devices = live
                .into_iter()
                .map(|d| LiveElsewhere {
                    mac: d.mac.to_string(),
                    host: d.host.to_string(),
                    seen_ms: d.last_seen.to_utc().timestamp_millis(),
                })
                .collect();
            QueryAnswer { devices }
        };
        ctx.spawn(answer.into_actor(self).map(move |answer, act, _| {
            act.reply(&message, &answer);
        }));
    }
}

/// The answer to a yes-or-no request about a device.
fn present(yes: bool) -> Answer {
    match yes {
        true => Answer::Present,
        false => Answer::Failed {
            reason: "offline".into(),
        },
    }
}

/// Whether this node's connection of a device (live here since `ours`) gives way to
/// a claim by `node` for a connection since `theirs` ([`Ask::Claim`]): when it is the
/// older one (on a tie, the node with the smaller name gives way).
fn gives_way(ours: i64, me: &str, theirs: i64, node: &str) -> bool {
    (ours, me) < (theirs, node)
}

/// The node that asked for a tunnel: its name, where it takes peer connections, the
/// connection its end stands for, and the token to attach with.
struct Asker {
    name: NodeId,
    node: Node,
    remote: SocketAddr,
    token: Token,
}

fn unhex_token(text: &str) -> Option<Token> {
    unhex(text)?.try_into().ok()
}

/// Starts the [`Remote`](remote::Remote) end of a tunnel whose peer connections are
/// `lanes`, its other end on node `node` standing for the connection `remote`, on
/// `home`: the thread of the local connection it is tunnelled to.
async fn start_end(
    lanes: peer::Lanes,
    home: &ArbiterHandle,
    config: &ClusterConfig,
    node: NodeId,
    remote: SocketAddr,
    tracker: Recipient<Tracked>,
    bridge: &Addr<BridgeManager>,
) -> std::io::Result<PeerLink> {
    let parts = remote::Parts {
        node,
        remote,
        stall: config.stall,
        out_chunks: config.out_chunks,
        out_bytes: config.out_bytes,
        bridge: bridge.clone(),
        tracker,
    };
    remote::start_on(lanes, parts, home).await
}

/// Is device (uuid, mac) live on another node?
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Probe {
    pub uuid: ByteString,
    pub mac: ByteString,
}

impl Handler<Probe> for Cluster {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, Probe { uuid, mac }: Probe, _: &mut Context<Self>) -> Self::Result {
        self.ask_yes_no(&DeviceKey { uuid, mac }, Ask::Probe)
    }
}

/// May a connection from `from` take `device`, as far as other nodes know? Asked
/// before a new connection registers a device under `auth.device_takeover =
/// "when-silent"`. A node that holds the device, or that its connection left within
/// the online window, answers; one that does not answer in time keeps the device
/// (fail closed).
#[derive(Message)]
#[rtype(result = "Elsewhere")]
pub struct SeenElsewhere {
    pub device: DeviceKey,
    pub from: std::net::IpAddr,
}

/// What other nodes say about a takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elsewhere {
    /// No node saw the device lately from another address.
    Free,
    /// A node saw it lately from another address.
    Seen,
    /// A node listens for it but did not answer in time, or NATS is away.
    Unanswered,
}

impl Handler<SeenElsewhere> for Cluster {
    type Result = ResponseFuture<Elsewhere>;

    fn handle(&mut self, ask: SeenElsewhere, _: &mut Context<Self>) -> Self::Result {
        let (bus, timeout) = (self.bus.clone(), self.config.request_timeout);
        let subject = self
            .config
            .subjects
            .device(&ask.device.uuid, &ask.device.mac);
        let question = Ask::Beating {
            from: Some(ask.from),
        };
        Box::pin(async move {
            match bus
                .request_reply::<_, Answer>(subject, &question, timeout)
                .await
            {
                Replied::Answer(Answer::Present) => Elsewhere::Seen,
                Replied::Answer(_) | Replied::Nobody => Elsewhere::Free,
                Replied::Unanswered => Elsewhere::Unanswered,
            }
        })
    }
}

impl Cluster {
    /// Asks the node holding `device`; true if it answers [`Answer::Present`].
    fn ask_yes_no(&self, device: &DeviceKey, ask: Ask) -> ResponseFuture<bool> {
        let (bus, timeout) = (self.bus.clone(), self.config.request_timeout);
        let subject = self.config.subjects.device(&device.uuid, &device.mac);
        Box::pin(async move {
            let answer = bus.request::<_, Answer>(subject, &ask, timeout).await;
            answer == Some(Answer::Present)
        })
    }
}

/// Tunnel device (uuid, mac), live on another node, to a new end here that stands for
/// it; the local connection `remote` (the end `role` says) is to be linked to that
/// end. `None` if no node has the device.
#[derive(Message)]
#[rtype(result = "Option<PeerLink>")]
pub struct Open {
    pub uuid: ByteString,
    pub mac: ByteString,
    pub role: WireRole,
    pub remote: SocketAddr,
    /// The thread of that local connection.
    pub home: ArbiterHandle,
}

/// How long the attached connection may trail the answer that says it is attached
/// (it is handed over before that answer is sent, so only a scheduling delay).
const ATTACH_GRACE: Duration = Duration::from_secs(1);

impl Handler<Open> for Cluster {
    type Result = ResponseFuture<Option<PeerLink>>;

    fn handle(&mut self, open: Open, ctx: &mut Context<Self>) -> Self::Result {
        let (bus, config, bridge) = (self.bus.clone(), self.config.clone(), self.bridge.clone());
        let (token, attached) = self.expected.expect();
        let tracker = ctx.address().recipient();
        Box::pin(async move {
            let ask = Ask::Open {
                token: hex(&token),
                remote: open.remote,
                role: open.role,
            };
            let subject = config.subjects.device(&open.uuid, &open.mac);
            let mut answers = bus.ask::<_, Answer>(subject, &ask).await?;
            let (node, answer) = tokio::time::timeout(config.request_timeout, answers.next())
                .await
                .ok()??;
            let Answer::Opened { remote } = answer else {
                return None;
            };
            let (by, lanes) = tokio::time::timeout(ATTACH_GRACE, attached)
                .await
                .ok()?
                .ok()?;
            if by != node {
                bus.seal.reject(Rejected::Peer, || {
                    format!("node {by} attached a tunnel that node {node} opened")
                });
                return None;
            }
            start_end(lanes, &open.home, &config, node, remote, tracker, &bridge)
                .await
                .ok()
        })
    }
}

/// The user's devices live on other nodes, as sightings (every node is asked; the
/// answer is complete once each node heard from lately has answered, or after the
/// request timeout).
#[derive(Message)]
#[rtype(result = "Vec<Sighting>")]
pub struct Gather {
    pub uuid: ByteString,
}

impl Handler<Gather> for Cluster {
    type Result = ResponseFuture<Vec<Sighting>>;

    fn handle(&mut self, Gather { uuid }: Gather, _: &mut Context<Self>) -> Self::Result {
        let (bus, config) = (self.bus.clone(), self.config.clone());
        let expected = self.nodes.len();
        Box::pin(async move {
            let mut found = Vec::new();
            if expected == 0 {
                return found;
            }
            let ask = QueryAsk {
                user: config.subjects.user(&uuid),
            };
            let Some(mut answers) = bus
                .ask::<_, QueryAnswer>(config.subjects.query(), &ask)
                .await
            else {
                return found;
            };
            let deadline = Instant::now() + config.request_timeout;
            let mut heard = std::collections::HashSet::new();
            while heard.len() < expected {
                let Ok(Some((node, answer))) =
                    tokio::time::timeout_at(deadline, answers.next()).await
                else {
                    break;
                };
                // One answer per node counts.
                if !heard.insert(node) {
                    continue;
                }
                found.extend(answer.devices.into_iter().filter_map(|d| {
                    Some(Sighting {
                        uuid: uuid.clone(),
                        mac: d.mac.into(),
                        host: d.host.into(),
                        at: chrono::DateTime::from_timestamp_millis(d.seen_ms)?,
                    })
                }));
            }
            found
        })
    }
}

#[cfg(test)]
mod tests {
    use super::gives_way;

    #[test]
    fn a_connection_gives_way_to_a_newer_one_only() {
        // (live here since, this node, claim's since, claimant), gives way?
        for (ours, me, theirs, node, gives, why) in [
            (
                5_000,
                "a",
                6_000,
                "b",
                true,
                "the device connected there since",
            ),
            (
                7_000,
                "a",
                6_000,
                "b",
                false,
                "an older claim (replayed, or after NATS)",
            ),
            (6_000, "a", 6_000, "b", true, "tie: smaller name"),
            (6_000, "b", 6_000, "a", false, "tie: larger name"),
        ] {
            assert_eq!(gives_way(ours, me, theirs, node), gives, "{why}");
        }
    }
}
