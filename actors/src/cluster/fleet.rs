//! Fleet events across nodes: what every node knows of some devices ([`FleetAsk`] on
//! [`Subjects::fleet`](super::wire::Subjects::fleet)), so that exactly one node tells
//! that a device went offline or came back (`crate::events`).
//!
//! The node where devices arrived, or whose grace period for them ended, asks
//! ([`AskFleet`]); every node answers with the devices it holds and the records its
//! events keeper has of them ([`KnownHere`]). A node lost from the membership is told
//! to the keeper ([`NodeLost`]), with whether this node is the one that takes over
//! its devices (the smallest name among the nodes left).

use std::collections::{HashMap, HashSet};

use actix::prelude::*;
use async_nats::Message;
use futures::StreamExt;
use tokio::time::Instant;

use super::wire::{FleetAnswer, FleetAsk, NodeId, Subjects, Whereabouts};
use super::Cluster;
use crate::device::DeviceKey;

/// Ask every other node what it knows of `devices`; `arrived`: they connected here,
/// so records of them move here.
#[derive(Message)]
#[rtype(result = "Result<Vec<Told>, Unanswered>")]
pub struct AskFleet {
    pub devices: Vec<DeviceKey>,
    pub arrived: bool,
}

/// What a node said of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    pub device: DeviceKey,
    pub node: NodeId,
    pub whereabouts: Whereabouts,
}

/// NATS is away: the other nodes could not be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unanswered;

/// From the cluster to the events keeper: which of its records match `subjects`
/// (the devices another node asks about, by [`Subjects::device`]).
#[derive(Message)]
#[rtype(result = "Vec<(String, Whereabouts)>")]
pub struct KnownHere {
    pub asked: HashSet<String>,
    pub subjects: Subjects,
    pub arrived: bool,
}

/// From the cluster to the events keeper: `node` stopped answering; `successor`
/// says whether this node takes over its devices.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeLost {
    pub node: NodeId,
    pub successor: bool,
}

/// Where the cluster tells the events keeper.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct WatchFleet {
    pub recorded: Recipient<KnownHere>,
    pub lost: Recipient<NodeLost>,
}

impl Handler<WatchFleet> for Cluster {
    type Result = ();

    fn handle(&mut self, watch: WatchFleet, _: &mut Context<Self>) {
        self.fleet = Some(watch);
    }
}

impl Cluster {
    /// Answers another node's [`FleetAsk`]: devices live here, and the keeper's
    /// records.
    pub(super) fn fleet_message(&mut self, message: Message, ctx: &mut Context<Self>) {
        let Some((_, ask)) = self.bus.open::<FleetAsk>(&message) else {
            return;
        };
        let asked: HashSet<String> = ask.devices.into_iter().collect();
        let subjects = &self.config.subjects;
        let mut devices: Vec<(String, Whereabouts)> = self
            .held
            .keys()
            .map(|k| subjects.device(&k.uuid, &k.mac))
            .filter(|s| asked.contains(s))
            .map(|s| (s, Whereabouts::Held))
            .collect();
        let recorded = self.fleet.as_ref().map(|f| {
            f.recorded.send(KnownHere {
                asked,
                subjects: subjects.clone(),
                arrived: ask.arrived,
            })
        });
        let answer = async move {
            if let Some(recorded) = recorded {
                devices.extend(recorded.await.unwrap_or_default());
            }
            FleetAnswer { devices }
        };
        ctx.spawn(answer.into_actor(self).map(move |answer, act, _| {
            act.reply(&message, &answer);
        }));
    }

    /// Tells the keeper that `node` is gone, and whether this node succeeds it.
    pub(super) fn fleet_node_lost(&self, node: &NodeId) {
        if let Some(fleet) = &self.fleet {
            let successor = self.nodes.keys().all(|other| *other > self.config.node);
            fleet.lost.do_send(NodeLost {
                node: node.clone(),
                successor,
            });
        }
    }
}

impl Handler<AskFleet> for Cluster {
    type Result = ResponseFuture<Result<Vec<Told>, Unanswered>>;

    fn handle(&mut self, ask: AskFleet, _: &mut Context<Self>) -> Self::Result {
        let (bus, config) = (self.bus.clone(), self.config.clone());
        let expected = self.nodes.len();
        let connected = self.connected;
        Box::pin(async move {
            if !connected {
                return Err(Unanswered);
            }
            if expected == 0 || ask.devices.is_empty() {
                return Ok(Vec::new());
            }
            let named: HashMap<String, DeviceKey> = ask
                .devices
                .into_iter()
                .map(|k| (config.subjects.device(&k.uuid, &k.mac), k))
                .collect();
            let question = FleetAsk {
                devices: named.keys().cloned().collect(),
                arrived: ask.arrived,
            };
            let Some(mut answers) = bus
                .ask::<_, FleetAnswer>(config.subjects.fleet(), &question)
                .await
            else {
                return Err(Unanswered);
            };
            let deadline = Instant::now() + config.request_timeout;
            let mut heard = HashSet::new();
            let mut told = Vec::new();
            while heard.len() < expected {
                let Ok(Some((node, answer))) =
                    tokio::time::timeout_at(deadline, answers.next()).await
                else {
                    break;
                };
                if !heard.insert(node.clone()) {
                    continue;
                }
                for (subject, whereabouts) in answer.devices {
                    if let Some(device) = named.get(&subject) {
                        told.push(Told {
                            device: device.clone(),
                            node: node.clone(),
                            whereabouts,
                        });
                    }
                }
            }
            Ok(told)
        })
    }
}
