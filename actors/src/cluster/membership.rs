//! Membership: every node says hello every so often, with where it takes peer
//! connections and its certificate's fingerprint; a node not heard from for
//! [`ClusterConfig::node_timeout`](super::ClusterConfig::node_timeout) is gone, its
//! tunnels end and the fleet events keeper is told. [`Membership`] is this node's
//! view of it, for the status page.

use actix::prelude::*;
use async_nats::Message;
use tokio::time::Instant;

use super::bus::Rejected;
use super::wire::{Hello, NodeId};
use super::{Cluster, Node};

impl Cluster {
    pub(super) fn say_hello(&self) {
        self.publish(self.config.subjects.hello(), &self.hello);
    }

    /// Says hello, and ends the tunnels of nodes that stopped saying it.
    pub(super) fn tick(&mut self) {
        self.say_hello();
        let timeout = self.config.node_timeout;
        let gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.seen.elapsed() >= timeout)
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.forget(&name);
            let why = format!("node {name} stopped answering for {timeout:?}");
            let ends = self.end_tunnels(|n| *n == name, &why);
            log::warn!("{why}; ended its {ends} cross-node tunnel ends");
            self.fleet_node_lost(&name);
        }
        self.report();
    }

    /// Drops a node from the membership, and its certificate from the peer port.
    pub(super) fn forget(&mut self, name: &NodeId) {
        if let Some(node) = self.nodes.remove(name) {
            self.known
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&node.fingerprint);
        }
    }

    pub(super) fn hello_message(&mut self, message: Message) {
        let Some((name, hello)) = self.bus.open::<Hello>(&message) else {
            return;
        };
        if let Some(known) = self.nodes.get(&name) {
            let fresh = known.seen.elapsed() < self.config.node_timeout;
            if known.fingerprint != hello.fingerprint
                && fresh
                && hello.started_ms <= known.started_ms
            {
                // Two nodes under one name, both holding the secret.
                self.bus.seal.reject(Rejected::Unexpected, || {
                    format!(
                        "a hello from a second node calling itself {name:?} (peer {}): \
                         give each node its own cluster.node_id",
                        hello.peer
                    )
                });
                return;
            }
        }
        let node = Node {
            seen: Instant::now(),
            started_ms: hello.started_ms,
            peer: hello.peer,
            fingerprint: hello.fingerprint,
        };
        let restarted = self
            .nodes
            .get(&name)
            .is_some_and(|old| old.fingerprint != node.fingerprint);
        if restarted {
            log::info!("cluster node {name} restarted");
            self.forget(&name);
            self.end_tunnels(|n| *n == name, &format!("node {name} restarted"));
        }
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.fingerprint.clone(), name.clone());
        if self.nodes.insert(name.clone(), node).is_none() {
            log::info!("cluster node {name} is up");
            // So that it knows of this node at once, not at the next hello.
            self.say_hello();
            self.report();
        }
    }
}

/// This node's view of the cluster, for the status page.
#[derive(Message)]
#[rtype(result = "ClusterView")]
pub struct Membership;

#[derive(Debug, Clone, MessageResponse, serde::Serialize)]
pub struct ClusterView {
    pub node: NodeId,
    pub connected: bool,
    /// The other nodes heard from lately, by name.
    pub nodes: Vec<NodeId>,
    /// Tunnel ends here whose other end is on another node.
    pub tunnel_ends: usize,
}

impl Handler<Membership> for Cluster {
    type Result = ClusterView;

    fn handle(&mut self, _: Membership, _: &mut Context<Self>) -> ClusterView {
        let mut nodes: Vec<NodeId> = self.nodes.keys().cloned().collect();
        nodes.sort();
        ClusterView {
            node: self.config.node.clone(),
            connected: self.connected,
            nodes,
            tunnel_ends: self.remotes.len(),
        }
    }
}
