//! The `BridgeManager` actor: the tunnel table, and what happens when a tunnel ends.
//!
//! A tunnel pairs two connections. The manager is the only one who creates and removes
//! tunnels, numbering each one in creation order; the sessions involved learn of it
//! with [`PeerEvent::Linked`] and [`PeerEvent::Unlinked`], and from then on each
//! session writes straight into its peer's output queue, so tunnel data never passes
//! through here.
//!
//! A connection is in at most one tunnel: linking a connection that is already
//! tunnelled removes its old tunnel first. A tunnel ends like a TCP relay's
//! (`docs/PROTOCOL.md` §4): when one end goes away (closed, taken over, relinked) or
//! the tunnel stalls, a [`Role::Client`] end left behind is told to close once its
//! queued output is written; a device end stays connected.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use crate::link::{End, PeerEvent, Role, SessionId, TunnelId};

#[derive(Default)]
pub struct BridgeManager {
    /// Each tunnelled session -> (tunnel, its own role, the other end).
    tunnels: HashMap<SessionId, (TunnelId, Role, End)>,
    last_id: TunnelId,
}

impl Actor for BridgeManager {
    type Context = Context<Self>;
}

/// Tunnel `a` and `b`. With `notify`, both are told with [`PeerEvent::Linked`];
/// without, the caller tells them (a `connme` requester queues its reply first, so that
/// it reaches the client ahead of any data from the device).
#[derive(Message)]
#[rtype(result = "TunnelId")]
pub struct Link {
    pub a: End,
    pub b: End,
    pub notify: bool,
}

/// Why a session's tunnel ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The session closed, or was taken over by a newer connection of its device.
    Closed,
    /// The session is being linked into a new tunnel.
    Relinked,
    /// The session's peer read nothing for this long while the session had data for it.
    Stalled(Duration),
}

/// Remove the tunnel of this session, if any.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unlink {
    pub session: SessionId,
    pub cause: Cause,
}

impl BridgeManager {
    /// Removes `session`'s tunnel. The other end is told, and closes if it is a client;
    /// after a stall the session itself is told too, so a client on either side closes.
    fn remove(&mut self, session: SessionId, cause: Cause) {
        let Some((tunnel, _, other)) = self.tunnels.remove(&session) else {
            return;
        };
        let Some((_, _, me)) = self.tunnels.remove(&other.link.id) else {
            return;
        };
        let has_client = me.role == Role::Client || other.role == Role::Client;
        match cause {
            Cause::Closed => log::info!("tunnel {tunnel} closed by {}", name(&me)),
            Cause::Relinked => log::info!("tunnel {tunnel} replaced: {} has a new one", name(&me)),
            Cause::Stalled(after) => {
                log::warn!(
                    "tunnel {tunnel} between {} and {} stalled: the {} read nothing for \
                     {after:?}; closing the tunnel{}",
                    name(&me),
                    name(&other),
                    match other.role {
                        Role::Client => "client",
                        Role::Device(_) => "device",
                    },
                    if has_client { " and its client" } else { "" },
                );
                metrics::counter!("elfin_tunnels_stalled_total").increment(1);
                me.link.events.do_send(PeerEvent::Unlinked {
                    tunnel,
                    close: me.role == Role::Client,
                });
            }
        }
        other.link.events.do_send(PeerEvent::Unlinked {
            tunnel,
            close: other.role == Role::Client,
        });
    }

    fn report(&self) {
        metrics::gauge!("elfin_tunnels_active").set((self.tunnels.len() / 2) as f64);
    }
}

/// An end as the logs name it: a device by its mac, a client by its address.
fn name(end: &End) -> String {
    match &end.role {
        Role::Device(mac) => format!("device {mac} ({})", end.link.remote),
        Role::Client => format!("client {}", end.link.remote),
    }
}

impl Handler<Link> for BridgeManager {
    type Result = TunnelId;

    fn handle(&mut self, msg: Link, _: &mut Context<Self>) -> TunnelId {
        self.remove(msg.a.link.id, Cause::Relinked);
        self.remove(msg.b.link.id, Cause::Relinked);
        self.last_id += 1;
        let tunnel = self.last_id;
        if msg.notify {
            for (to, peer) in [(&msg.a, &msg.b), (&msg.b, &msg.a)] {
                to.link.events.do_send(PeerEvent::Linked {
                    tunnel,
                    peer: peer.link.clone(),
                });
            }
        }
        log::info!(
            "tunnel {tunnel} opened: {} <-> {}",
            name(&msg.a),
            name(&msg.b)
        );
        let (a_id, b_id) = (msg.a.link.id, msg.b.link.id);
        let (a_role, b_role) = (msg.a.role.clone(), msg.b.role.clone());
        self.tunnels.insert(a_id, (tunnel, a_role, msg.b));
        self.tunnels.insert(b_id, (tunnel, b_role, msg.a));
        self.report();
        tunnel
    }
}

impl Handler<Unlink> for BridgeManager {
    type Result = ();

    fn handle(&mut self, msg: Unlink, _: &mut Context<Self>) {
        self.remove(msg.session, msg.cause);
        self.report();
    }
}
