//! The `BridgeManager` actor: the tunnel table, and what happens when a tunnel ends.
//!
//! A tunnel pairs two connections. The manager is the only one who creates and removes
//! tunnels, numbering each one in creation order; the sessions involved learn of it
//! with [`PeerEvent::Linked`] and [`PeerEvent::Unlinked`], and from then on each
//! session writes straight into its peer's output queue, so tunnel data never passes
//! through here.
//!
//! Each direction of a tunnel has a [`Meter`] its sending session counts on; the
//! manager reads them for [`Tunnels`] (the status page) and keeps the total of ended
//! tunnels, so the gateway's tunnel throughput is one sum.
//!
//! Every tunnel a connection of this node asked for goes into the audit trail
//! ([`crate::audit`]) when it opens and when it closes, with why and how many bytes.
//!
//! A connection is in at most one tunnel: linking a connection that is already
//! tunnelled removes its old tunnel first. A tunnel ends like a TCP relay's
//! (`docs/PROTOCOL.md` §4): when one end goes away (closed, taken over, relinked) or
//! the tunnel stalls, a [`Role::Client`] end left behind is told to close once its
//! queued output is written; a device end stays connected.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use bytestring::ByteString;

use crate::audit::{Trail, TunnelRecord};
use crate::frame::Role;
use crate::link::{End, Meter, PeerEvent, PeerLink, SessionId, Tunnel, TunnelId};
use crate::metric;

pub struct BridgeManager {
    /// Each tunnelled session -> its side of its tunnel.
    tunnels: HashMap<SessionId, Side>,
    last_id: TunnelId,
    /// Bytes carried by tunnels that have ended.
    ended_bytes: u64,
    trail: Trail,
    /// The audit record of each open tunnel a connection of this node asked for.
    audited: HashMap<TunnelId, Audited>,
}

/// An open tunnel's audit record, and the meters its bytes are read from at the end.
struct Audited {
    record: TunnelRecord,
    to_device: Meter,
    from_device: Meter,
    /// Tunnels of its user or source left out of the trail before it (their budget
    /// was spent), said in its cause.
    left_out_before: u32,
}

impl BridgeManager {
    pub fn new(trail: Trail) -> Self {
        Self {
            tunnels: HashMap::new(),
            last_id: 0,
            ended_bytes: 0,
            trail,
            audited: HashMap::new(),
        }
    }
}

/// One session's side of a tunnel.
struct Side {
    tunnel: TunnelId,
    /// What this session forwards to the other end.
    sent: Meter,
    other: End,
    opened: SystemTime,
    /// Whether this is the `a` end of its [`Link`].
    first: bool,
}

impl Actor for BridgeManager {
    type Context = Context<Self>;
}

/// Tunnel `a` and `b`. With `notify`, both are told with [`PeerEvent::Linked`];
/// without, the caller tells them (a `connme` requester queues its reply first, so that
/// it reaches the client ahead of any data from the device).
#[derive(Message)]
#[rtype(result = "Opened")]
pub struct Link {
    pub a: End,
    pub b: End,
    pub notify: bool,
    /// Who asked for it, when that is a connection of this node: the tunnel is
    /// audited here (the other node of a cross-node tunnel leaves it out).
    pub requester: Option<Requester>,
}

/// The connection that asked for a tunnel, and for which user.
pub struct Requester {
    pub uuid: ByteString,
    pub link: PeerLink,
}

/// A new tunnel, and the meters `a` and `b` count what they send on.
#[derive(Debug, Clone, MessageResponse)]
pub struct Opened {
    pub tunnel: TunnelId,
    pub a_sent: Meter,
    pub b_sent: Meter,
}

/// The open tunnels, and every byte tunnels have carried.
#[derive(Message)]
#[rtype(result = "TunnelReport")]
pub struct Tunnels;

#[derive(Debug, Clone, MessageResponse)]
pub struct TunnelReport {
    pub open: Vec<TunnelInfo>,
    /// Bytes carried since start, by open and ended tunnels, both ways.
    pub total_bytes: u64,
}

/// An open tunnel: its ends in the order they were linked, and what each has sent.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    pub id: TunnelId,
    pub a: End,
    pub b: End,
    pub opened: SystemTime,
    pub a_sent: u64,
    pub b_sent: u64,
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
    /// The gateway is shutting down.
    Shutdown,
    /// The client's certificate was revoked, or expired.
    Certificate(&'static str),
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
        let Some(Side {
            tunnel,
            other,
            sent,
            ..
        }) = self.tunnels.remove(&session)
        else {
            return;
        };
        let Some(Side {
            other: me,
            sent: received,
            ..
        }) = self.tunnels.remove(&other.link.id)
        else {
            return;
        };
        self.ended_bytes += sent.get() + received.get();
        self.audit_close(tunnel, &me, &other, cause);
        let has_client = me.role == Role::Client || other.role == Role::Client;
        match cause {
            Cause::Closed | Cause::Shutdown => {
                log::info!("tunnel {tunnel} closed by {}", me.name())
            }
            Cause::Relinked => log::info!("tunnel {tunnel} replaced: {} has a new one", me.name()),
            Cause::Certificate(what) => log::info!(
                "tunnel {tunnel} closed: the certificate of {} was {what}",
                me.name()
            ),
            Cause::Stalled(after) => {
                log::warn!(
                    "tunnel {tunnel} between {} and {} stalled: the {} read nothing for \
                     {after:?}; closing the tunnel{}",
                    me.name(),
                    other.name(),
                    Role::label(Some(other.role)),
                    if has_client { " and its client" } else { "" },
                );
                metrics::counter!(metric::TUNNELS_STALLED_TOTAL).increment(1);
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
        metrics::gauge!(metric::TUNNELS_OPEN).set((self.tunnels.len() / 2) as f64);
    }

    /// Starts the audit record of a new tunnel that `requester` asked for.
    fn audit_open(&mut self, tunnel: TunnelId, link: &Link, opened: &Opened) {
        let Some(requester) = &link.requester else {
            return;
        };
        let Some(left_out_before) = self
            .trail
            .admit_tunnel(&requester.uuid, requester.link.remote.ip())
        else {
            return;
        };
        // The device is the `connme` target, or the first of a `connthem` pair.
        let (device, peer, to_device, from_device) = if link.a.role == Role::Device {
            (&link.a, Some(&link.b), &opened.b_sent, &opened.a_sent)
        } else {
            (&link.b, None, &opened.a_sent, &opened.b_sent)
        };
        let record = TunnelRecord {
            id: self.trail.tunnel_id(tunnel),
            node: self.trail.node().to_owned(),
            uuid: requester.uuid.to_string(),
            device: device.mac().map(ToString::to_string).unwrap_or_default(),
            device_addr: device.link.remote.to_string(),
            peer_device: peer.and_then(|p| p.mac()).map(ToString::to_string),
            client_addr: requester.link.remote.to_string(),
            client_cert: requester
                .link
                .certificate
                .as_ref()
                .map(|c| c.user.to_string()),
            client_cert_serial: requester
                .link
                .certificate
                .as_ref()
                .map(|c| c.serial.to_string()),
            opened: chrono::Utc::now(),
            closed: None,
            cause: None,
            to_device: 0,
            from_device: 0,
        };
        self.trail.tunnel(record.clone());
        self.audited.insert(
            tunnel,
            Audited {
                record,
                to_device: to_device.clone(),
                from_device: from_device.clone(),
                left_out_before,
            },
        );
    }

    /// Completes the audit record of a tunnel that ended: when, why, how many bytes.
    fn audit_close(&mut self, tunnel: TunnelId, me: &End, other: &End, cause: Cause) {
        let Some(Audited {
            mut record,
            to_device,
            from_device,
            left_out_before,
        }) = self.audited.remove(&tunnel)
        else {
            return;
        };
        let mine = Role::label(Some(me.role));
        record.closed = Some(chrono::Utc::now());
        record.cause = Some(match cause {
            Cause::Closed => format!("{mine} closed"),
            Cause::Relinked => format!("replaced by a newer tunnel of the {mine}"),
            Cause::Stalled(after) => format!(
                "stalled: the {} read nothing for {} s",
                Role::label(Some(other.role)),
                after.as_secs()
            ),
            Cause::Shutdown => "gateway shut down".to_owned(),
            Cause::Certificate(what) => format!("the client's certificate was {what}"),
        });
        if left_out_before > 0 {
            if let Some(cause) = &mut record.cause {
                cause.push_str(&format!(
                    " ({left_out_before} earlier tunnels of this user or address not recorded)"
                ));
            }
        }
        record.to_device = to_device.get();
        record.from_device = from_device.get();
        self.trail.tunnel(record);
    }
}

impl Handler<Link> for BridgeManager {
    type Result = Opened;

    fn handle(&mut self, msg: Link, _: &mut Context<Self>) -> Opened {
        self.remove(msg.a.link.id, Cause::Relinked);
        self.remove(msg.b.link.id, Cause::Relinked);
        self.last_id += 1;
        let opened = Opened {
            tunnel: self.last_id,
            a_sent: Meter::towards(msg.b.role),
            b_sent: Meter::towards(msg.a.role),
        };
        let tunnel = opened.tunnel;
        self.audit_open(tunnel, &msg, &opened);
        let Link { a, b, notify, .. } = msg;
        if notify {
            for (to, peer, sent) in [(&a, &b, &opened.a_sent), (&b, &a, &opened.b_sent)] {
                to.link.events.do_send(PeerEvent::Linked(Tunnel {
                    id: tunnel,
                    peer: peer.link.clone(),
                    sent: sent.clone(),
                }));
            }
        }
        log::info!("tunnel {tunnel} opened: {} <-> {}", a.name(), b.name());
        let now = SystemTime::now();
        for (me, other, sent, first) in [
            (&a, &b, &opened.a_sent, true),
            (&b, &a, &opened.b_sent, false),
        ] {
            let side = Side {
                tunnel,
                sent: sent.clone(),
                other: other.clone(),
                opened: now,
                first,
            };
            self.tunnels.insert(me.link.id, side);
        }
        self.report();
        opened
    }
}

impl Handler<Unlink> for BridgeManager {
    type Result = ();

    fn handle(&mut self, msg: Unlink, _: &mut Context<Self>) {
        self.remove(msg.session, msg.cause);
        self.report();
    }
}

impl Handler<Tunnels> for BridgeManager {
    type Result = TunnelReport;

    fn handle(&mut self, _: Tunnels, _: &mut Context<Self>) -> TunnelReport {
        let mut total_bytes = self.ended_bytes;
        let mut open: Vec<TunnelInfo> = Vec::with_capacity(self.tunnels.len() / 2);
        for side in self.tunnels.values() {
            total_bytes += side.sent.get();
            // Each tunnel once, from its `a` side.
            if !side.first {
                continue;
            }
            let Some(back) = self.tunnels.get(&side.other.link.id) else {
                continue;
            };
            let a = back.other.clone();
            open.push(TunnelInfo {
                id: side.tunnel,
                a,
                b: side.other.clone(),
                opened: side.opened,
                a_sent: side.sent.get(),
                b_sent: back.sent.get(),
            });
        }
        open.sort_by_key(|t| t.id);
        TunnelReport { open, total_bytes }
    }
}
