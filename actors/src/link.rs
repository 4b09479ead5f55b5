//! The tunnel vocabulary: how the shared actors reach a session, and what they tell it.
//!
//! A [`PeerLink`] is everything another actor holds of a connection: its id, its
//! address for [`PeerEvent`]s and its [`Outbox`], into which a tunnel peer writes
//! payloads directly. Nothing here knows the session actor's type, so the registry and
//! the bridge sit below the session in the module graph.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use crate::device::DeviceKey;
use crate::frame::Role;
use crate::metric;
use crate::outbox::Outbox;
use crate::tls::Transport;

/// A connection, numbered in accept order for the life of the process.
pub type SessionId = u64;

/// A tunnel, numbered by the bridge in creation order: of two tunnels, the one with the
/// larger id is the newer.
pub type TunnelId = u64;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

pub fn next_session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// What another actor needs to reach a session.
#[derive(Clone, Debug)]
pub struct PeerLink {
    pub id: SessionId,
    pub remote: SocketAddr,
    pub transport: Transport,
    /// Its client certificate (the user it names, its serial), if any.
    pub certificate: Option<Arc<crate::certificate::ClientCert>>,
    pub events: Recipient<PeerEvent>,
    pub out: Outbox,
    /// The thread its actor runs on (a cross-node end of a tunnel to it runs there
    /// too).
    pub home: ArbiterHandle,
}

/// A session's place in a tunnel: which tunnel, its other end, and the meter of what
/// this side sends into it.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub id: TunnelId,
    pub peer: PeerLink,
    pub sent: Meter,
}

/// One end of a tunnel. Its role decides what happens to its connection when the
/// tunnel ends from the other side (`docs/PROTOCOL.md` §4): a client (it asked with
/// `connme`) is closed, as a TCP relay would close it; a device stays connected.
#[derive(Clone, Debug)]
pub struct End {
    pub link: PeerLink,
    pub role: Role,
    /// A device end's mac, how logs name it.
    mac: Option<ByteString>,
}

impl End {
    pub fn client(link: PeerLink) -> End {
        End {
            link,
            role: Role::Client,
            mac: None,
        }
    }

    pub fn device(link: PeerLink, mac: ByteString) -> End {
        End {
            link,
            role: Role::Device,
            mac: Some(mac),
        }
    }

    /// The device's mac, for a device end.
    pub fn mac(&self) -> Option<&ByteString> {
        self.mac.as_ref()
    }

    /// The end as the logs name it: a device by its mac, a client by its address.
    pub fn name(&self) -> String {
        match &self.mac {
            Some(mac) => format!("device {mac} ({})", self.link.remote),
            None => format!("client {}", self.link.remote),
        }
    }
}

/// The bytes one end has forwarded into its tunnel: counted by its session, read by
/// the bridge for the status page, and added to `elfin_tunnel_bytes_total` by the
/// receiving side's role.
#[derive(Clone)]
pub struct Meter {
    bytes: Arc<AtomicU64>,
    /// `elfin_tunnel_bytes_total` of this direction, looked up once per tunnel.
    total: metrics::Counter,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Meter({})", self.get())
    }
}

impl Meter {
    /// A meter for bytes sent to an end with this role.
    pub fn towards(role: Role) -> Meter {
        let direction = match role {
            Role::Client => "to_client",
            Role::Device => "to_device",
        };
        Meter {
            bytes: Arc::default(),
            total: metrics::counter!(metric::TUNNEL_BYTES_TOTAL, "direction" => direction),
        }
    }

    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.total.increment(n);
    }

    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// What the bridge and the registry tell a session.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum PeerEvent {
    /// This session is now one end of this tunnel.
    Linked(Tunnel),
    /// `tunnel` is gone. With `close`, this session is a client whose tunnel ended from
    /// the device side: it writes what is queued and closes.
    Unlinked { tunnel: TunnelId, close: bool },
    /// A newer connection took over this device, which this session spoke for: it
    /// ends its tunnel, writes what is queued and closes.
    Replaced(DeviceKey),
    /// The device, or its user, was removed from the database: the session closes
    /// as for [`PeerEvent::Replaced`] and says why.
    Withdrawn(DeviceKey, &'static str),
}
