//! The `BridgeManager` actor: the tunnel table.
//!
//! A tunnel pairs two connections. The manager is the only one who creates and removes
//! tunnels, numbering each one in creation order; the sessions involved learn of it
//! with [`SetPeer`] and [`ClearPeer`], and from then on each session writes straight into its peer's output
//! queue, so tunnel data never passes through here.
//!
//! A connection is in at most one tunnel: linking a connection that is already
//! tunnelled removes its old tunnel first, and when a session closes its tunnel goes
//! with it. The other side stays connected.

use std::collections::HashMap;

use actix::prelude::*;

use crate::session::{ClearPeer, PeerLink, SessionId, SetPeer};

pub type TunnelId = u64;

#[derive(Default)]
pub struct BridgeManager {
    /// Each tunnelled session -> (tunnel, the other side).
    tunnels: HashMap<SessionId, (TunnelId, PeerLink)>,
    last_id: TunnelId,
}

impl Actor for BridgeManager {
    type Context = Context<Self>;
}

/// Tunnel `a` and `b`. With `notify`, both are told with a [`SetPeer`]; without, the
/// caller tells them (a `connme` requester queues its reply first, so that it reaches
/// the client ahead of any data from the device).
#[derive(Message)]
#[rtype(result = "TunnelId")]
pub struct Link {
    pub a: PeerLink,
    pub b: PeerLink,
    pub notify: bool,
}

/// Remove the tunnel of this session, if any (it closed, or its peer stalled).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unlink {
    pub session: SessionId,
}

impl BridgeManager {
    fn remove(&mut self, session: SessionId) {
        if let Some((tunnel, other)) = self.tunnels.remove(&session) {
            self.tunnels.remove(&other.id);
            other.addr.do_send(ClearPeer { tunnel });
        }
    }

    fn report(&self) {
        metrics::gauge!("elfin_tunnels_active").set((self.tunnels.len() / 2) as f64);
    }
}

impl Handler<Link> for BridgeManager {
    type Result = TunnelId;

    fn handle(&mut self, msg: Link, _: &mut Context<Self>) -> TunnelId {
        self.remove(msg.a.id);
        self.remove(msg.b.id);
        self.last_id += 1;
        let tunnel = self.last_id;
        if msg.notify {
            for (to, peer) in [(&msg.a, &msg.b), (&msg.b, &msg.a)] {
                to.addr.do_send(SetPeer {
                    tunnel,
                    peer: peer.clone(),
                });
            }
        }
        let (a_id, b_id) = (msg.a.id, msg.b.id);
        self.tunnels.insert(a_id, (tunnel, msg.b));
        self.tunnels.insert(b_id, (tunnel, msg.a));
        self.report();
        tunnel
    }
}

impl Handler<Unlink> for BridgeManager {
    type Result = ();

    fn handle(&mut self, msg: Unlink, _: &mut Context<Self>) {
        self.remove(msg.session);
        self.report();
    }
}
