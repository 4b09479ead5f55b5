//! The requests between nodes, asked and answered: `probe` and `open` on a device's
//! subject (is it live on your node? tunnel it to an end on mine), and `query` to
//! every node (your live devices of this user).
//!
//! [`Command`](crate::command::Command) asks through [`Probe`], [`Open`] and [`Gather`]
//! when a device is not live on this node; the [`Cluster`] actor answers what other
//! nodes ask.

use std::net::SocketAddr;

use actix::prelude::*;
use async_nats::{Client, Message};
use bytestring::ByteString;
use futures::StreamExt;
use tokio::time::Instant;

use super::remote::{self, Tracked};
use super::wire::{self, Answer, Ask, LiveElsewhere, QueryAnswer, QueryAsk, WireRole};
use super::{Cluster, ClusterConfig, Subscription};
use crate::bridge::{BridgeManager, Link};
use crate::device::DeviceKey;
use crate::link::{End, PeerLink};
use crate::registry::{Evict, LiveDevices, Lookup, StillBeats};
use crate::store::Sighting;

/// Answering other nodes.
impl Cluster {
    pub(super) fn device_message(
        &mut self,
        key: DeviceKey,
        message: Message,
        ctx: &mut Context<Self>,
    ) {
        let Ok(ask) = serde_json::from_slice::<Ask>(&message.payload) else {
            log::debug!("cluster: unreadable request on {}", message.subject);
            return;
        };
        match ask {
            Ask::Claim { node, since_ms } => {
                let ours = self.held.get(&key).map(|h| h.since_ms);
                if gives_way(ours, &self.config.node, since_ms, &node) {
                    log::info!(
                        "device {} connected to node {node}; closing its connection here",
                        key.mac
                    );
                    self.registry.do_send(Evict(key));
                } else if let Some(ours) = ours {
                    // An older connection re-claimed after NATS came back: its node is
                    // listening now, and may have missed this node's own re-claim.
                    self.claim(&key, Some(ours));
                }
            }
            Ask::Probe => {
                let lookup = self.registry.send(Lookup(key));
                ctx.spawn(lookup.into_actor(self).map(move |found, act, _| {
                    act.reply(&message, present(found.ok().flatten().is_some()));
                }));
            }
            Ask::Beating => {
                let beats = self.registry.send(StillBeats(key));
                ctx.spawn(beats.into_actor(self).map(move |beats, act, _| {
                    act.reply(&message, present(beats.unwrap_or(false)));
                }));
            }
            Ask::Open {
                node,
                inbox,
                remote,
                role,
                window,
            } => {
                let far = Far {
                    node,
                    inbox,
                    remote,
                    window,
                };
                let accept = self.accept(key, far, role, ctx);
                ctx.spawn(accept.into_actor(self).map(move |answer, act, _| {
                    act.reply(&message, wire::encode(&answer));
                }));
            }
        }
    }

    /// Tunnels `device`, live here, to an end on another node.
    fn accept(
        &self,
        device: DeviceKey,
        far: Far,
        role: WireRole,
        ctx: &mut Context<Self>,
    ) -> impl std::future::Future<Output = Answer> + 'static {
        let (registry, bridge) = (self.registry.clone(), self.bridge.clone());
        let (nats, config) = (self.nats.clone(), self.config.clone());
        let tracker = ctx.address().recipient();
        async move {
            let offline = || Answer::Failed {
                reason: "offline".into(),
            };
            let mac = device.mac.clone();
            let Ok(Some(device)) = registry.send(Lookup(device)).await else {
                return offline();
            };
            let remote = device.remote;
            let Ok((inbox, end)) = open_end(&nats, &config, far, tracker, &bridge).await else {
                return offline();
            };
            let link = Link {
                a: role.end(end),
                b: End::device(device, mac),
                notify: true,
            };
            if bridge.send(link).await.is_err() {
                return offline();
            }
            Answer::Opened {
                node: config.node.clone(),
                inbox,
                remote,
                window: config.window,
            }
        }
    }

    pub(super) fn query_message(&mut self, message: Message, ctx: &mut Context<Self>) {
        let Ok(ask) = serde_json::from_slice::<QueryAsk>(&message.payload) else {
            return;
        };
        let node = self.config.node.clone();
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
            QueryAnswer { node, devices }
        };
        ctx.spawn(answer.into_actor(self).map(move |answer, act, _| {
            act.reply(&message, wire::encode(&answer));
        }));
    }
}

/// The answer to a yes-or-no request about a device.
fn present(yes: bool) -> bytes::Bytes {
    wire::encode(&match yes {
        true => Answer::Present,
        false => Answer::Failed {
            reason: "offline".into(),
        },
    })
}

/// Whether this node's connection of a device (live here since `ours`) gives way to
/// a claim by `node` ([`Ask::Claim`]): always to a new connection, and to a re-claim
/// when it is the older one (on a tie, the node with the smaller name gives way).
fn gives_way(ours: Option<i64>, me: &str, since_ms: Option<i64>, node: &str) -> bool {
    match (ours, since_ms) {
        (Some(ours), Some(theirs)) => (ours, me) < (theirs, node),
        _ => true,
    }
}

/// The other end of a tunnel being opened: its node, its data inbox, the address of
/// the connection it stands for, and its receive window.
struct Far {
    node: String,
    inbox: String,
    remote: SocketAddr,
    window: u64,
}

/// Subscribes a new end's inbox and starts its [`Remote`]; returns the inbox and the
/// end's link.
async fn open_end(
    nats: &Client,
    config: &ClusterConfig,
    far: Far,
    tracker: Recipient<Tracked>,
    bridge: &Addr<BridgeManager>,
) -> Result<(String, PeerLink), async_nats::SubscribeError> {
    let inbox = nats.new_inbox();
    let (data, credits) = subscribe_end(nats, &inbox).await?;
    Ok((
        inbox,
        start_end(nats, config, far, data, credits, tracker, bridge),
    ))
}

async fn subscribe_end(
    nats: &Client,
    inbox: &str,
) -> Result<(Subscription, Subscription), async_nats::SubscribeError> {
    let data = Subscription::new(nats, inbox.to_owned()).await?;
    let credits = Subscription::new(nats, format!("{inbox}.credit")).await?;
    Ok((data, credits))
}

fn start_end(
    nats: &Client,
    config: &ClusterConfig,
    far: Far,
    data: Subscription,
    credits: Subscription,
    tracker: Recipient<Tracked>,
    bridge: &Addr<BridgeManager>,
) -> PeerLink {
    remote::start(remote::Parts {
        nats: nats.clone(),
        node: far.node,
        data,
        credits,
        peer_inbox: far.inbox,
        remote: far.remote,
        // At least two full messages fit, whatever the other node asks for.
        send_credit: far
            .window
            .max(2 * (remote::MAX_MESSAGE as u64 + remote::MESSAGE_COST)),
        receive_window: config.window,
        stall: config.stall,
        out_chunks: config.out_chunks,
        out_bytes: config.out_bytes,
        bridge: bridge.clone(),
        tracker,
    })
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

/// Does another node hold this device with a connection that still beats? Asked
/// before a new connection registers a device under `auth.device_takeover =
/// "when-silent"`; a node that does not answer in time counts as no.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct BeatsElsewhere(pub DeviceKey);

impl Handler<BeatsElsewhere> for Cluster {
    type Result = ResponseFuture<bool>;

    fn handle(
        &mut self,
        BeatsElsewhere(device): BeatsElsewhere,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.ask_yes_no(&device, Ask::Beating)
    }
}

impl Cluster {
    /// Asks the node holding `device`; true if it answers [`Answer::Present`].
    fn ask_yes_no(&self, device: &DeviceKey, ask: Ask) -> ResponseFuture<bool> {
        let (nats, config) = (self.nats.clone(), self.config.clone());
        let subject = config.subjects.device(&device.uuid, &device.mac);
        Box::pin(async move {
            let asked = nats.request(subject, wire::encode(&ask));
            matches!(
                tokio::time::timeout(config.request_timeout, asked).await,
                Ok(Ok(reply)) if serde_json::from_slice(&reply.payload).ok() == Some(Answer::Present)
            )
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
}

impl Handler<Open> for Cluster {
    type Result = ResponseFuture<Option<PeerLink>>;

    fn handle(&mut self, open: Open, ctx: &mut Context<Self>) -> Self::Result {
        let (nats, config, bridge) = (self.nats.clone(), self.config.clone(), self.bridge.clone());
        let tracker = ctx.address().recipient();
        Box::pin(async move {
            let inbox = nats.new_inbox();
            let (data, credits) = subscribe_end(&nats, &inbox).await.ok()?;
            let ask = Ask::Open {
                node: config.node.clone(),
                inbox,
                remote: open.remote,
                role: open.role,
                window: config.window,
            };
            let subject = config.subjects.device(&open.uuid, &open.mac);
            let asked = nats.request(subject, wire::encode(&ask));
            let reply = tokio::time::timeout(config.request_timeout, asked)
                .await
                .ok()?
                .ok()?;
            match serde_json::from_slice(&reply.payload).ok()? {
                Answer::Opened {
                    node,
                    inbox,
                    remote,
                    window,
                } => {
                    let far = Far {
                        node,
                        inbox,
                        remote,
                        window,
                    };
                    Some(start_end(
                        &nats, &config, far, data, credits, tracker, &bridge,
                    ))
                }
                _ => None,
            }
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
        let (nats, config) = (self.nats.clone(), self.config.clone());
        let expected = self.nodes.len();
        Box::pin(async move {
            let mut found = Vec::new();
            if expected == 0 {
                return found;
            }
            let inbox = nats.new_inbox();
            let Ok(mut answers) = Subscription::new(&nats, inbox.clone()).await else {
                return found;
            };
            let ask = wire::encode(&QueryAsk {
                user: config.subjects.user(&uuid),
            });
            if nats
                .publish_with_reply(config.subjects.query(), inbox, ask)
                .await
                .is_err()
            {
                return found;
            }
            let deadline = Instant::now() + config.request_timeout;
            let mut heard = std::collections::HashSet::new();
            while heard.len() < expected {
                let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await
                else {
                    break;
                };
                let Ok(answer) = serde_json::from_slice::<QueryAnswer>(&answer.payload) else {
                    continue;
                };
                heard.insert(answer.node);
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
            (5_000, "a", None, "b", true, "a device just connected"),
            (5_000, "a", Some(6_000), "b", true, "re-claim, newer"),
            (7_000, "a", Some(6_000), "b", false, "re-claim, older"),
            (6_000, "a", Some(6_000), "b", true, "tie: smaller name"),
            (6_000, "b", Some(6_000), "a", false, "tie: larger name"),
        ] {
            assert_eq!(gives_way(Some(ours), me, theirs, node), gives, "{why}");
        }
    }
}
