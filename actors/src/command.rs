//! The requests a client sends and how each is answered: `connme`, `connthem` and
//! `query` (`docs/PROTOCOL.md` §3).
//!
//! A [`Command`] is parsed from a [`Frame::Request`](crate::frame::Frame) by
//! [`Command::from_frame`], which checks the fields each command needs, and carried out
//! by [`Command::apply`], which queues its [`Reply`] on the requester's output queue.
//! Failures are [`Refusal`]s, whose text is the reply's `reason`.
//!
//! Abuse brakes live here too: a uuid that is no user's costs its source address a
//! delay once it has failed too often (`limits.failed_lookups_per_min`), and unless
//! `auth.verbose_reasons` is set it gets the same answer as an offline device.

use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;

use crate::audit::{Attempt, Refused};
use crate::bridge::{Link, Requester};
use crate::clock::Stamp;
use crate::cluster::wire::WireRole;
use crate::cluster::{Gather, Open, Probe};
use crate::device::DeviceKey;
use crate::frame::{Reply, Request};
use crate::hub::Hub;
use crate::link::{End, PeerEvent, PeerLink, Tunnel};
use crate::masked::masked;
use crate::metric;
use crate::outbox::{Outbox, Unsent};
use crate::persistence::PendingFor;
use crate::refusal::Reason;
use crate::registry::{LiveDevices, Lookup};
use crate::tls::{Clients, Transport};
use crate::users::Access;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Tunnel the requesting connection to a device. A fourth field (the web backend's
    /// "priority") is accepted; the protocol gives it no meaning.
    Connme { uuid: ByteString, mac: ByteString },
    /// Tunnel two devices of one user to each other.
    Connthem {
        uuid: ByteString,
        mac1: ByteString,
        mac2: ByteString,
    },
    /// List the user's devices.
    Query { uuid: ByteString },
}

/// Why a command failed: the `reason` of its `failed` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("empty uuid or mac")]
    EmptyField,
    #[error("unknown user")]
    UnknownUser,
    #[error("device {0} is offline")]
    Offline(ByteString),
    #[error("cannot tunnel a connection to itself")]
    ToItself,
    #[error("cannot tunnel a device to itself")]
    DeviceToItself,
    #[error("gateway is shutting down")]
    ShuttingDown,
    /// `auth.clients` asks for more than this connection has.
    #[error("{0}")]
    Requires(&'static str),
}

impl Refusal {
    /// The `reason` label of `elfin_requests_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) | Refusal::EmptyField => "malformed",
            Refusal::UnknownUser => "unknown_user",
            Refusal::Offline(_) => "offline",
            Refusal::ToItself | Refusal::DeviceToItself => "to_itself",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Requires(_) => "transport",
        }
    }
}

/// The requester did not read its replies within the stall time: it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer does not read its replies")]
pub struct Unread;

/// Replies with more rows than this are rendered on the blocking pool, so a user with
/// thousands of devices does not hold up other connections.
const RENDER_INLINE_ROWS: usize = 500;

impl Command {
    pub fn from_frame(request: Request, fields: Vec<ByteString>) -> Result<Command, Refusal> {
        if fields.iter().take(3).any(|f| f.is_empty()) {
            return Err(Refusal::EmptyField);
        }
        let mut it = fields.into_iter();
        let (a, b, c, d) = (it.next(), it.next(), it.next(), it.next());
        match (request, a, b, c, d) {
            (Request::Connme, Some(uuid), Some(mac), _, None) => Ok(Command::Connme { uuid, mac }),
            (Request::Connme, ..) => Err(Refusal::Malformed(
                "expected connme;<uuid>;<mac>[;<priority>]",
            )),
            (Request::Connthem, Some(uuid), Some(mac1), Some(mac2), None) => {
                Ok(Command::Connthem { uuid, mac1, mac2 })
            }
            (Request::Connthem, ..) => {
                Err(Refusal::Malformed("expected connthem;<uuid>;<mac1>;<mac2>"))
            }
            (Request::Query, Some(uuid), None, ..) => Ok(Command::Query { uuid }),
            (Request::Query, ..) => Err(Refusal::Malformed("expected query;<uuid>")),
        }
    }

    /// The user the command names.
    pub fn uuid(&self) -> &ByteString {
        match self {
            Command::Connme { uuid, .. }
            | Command::Connthem { uuid, .. }
            | Command::Query { uuid } => uuid,
        }
    }

    /// The reply to this command for a user that does not exist.
    async fn answer_unknown_user(&self, hub: &Hub, me: &PeerLink) -> Result<(), Unread> {
        let refusal = match self {
            Command::Query { .. } => {
                return answer(hub, &me.out, Reply::Devices(Vec::new()).encode()).await
            }
            _ if hub.config.auth.verbose_reasons => Refusal::UnknownUser,
            Command::Connme { mac, .. } | Command::Connthem { mac1: mac, .. } => {
                Refusal::Offline(mac.clone())
            }
        };
        refuse(hub, me, refusal).await
    }

    fn name(&self) -> &'static str {
        self.request().label()
    }

    /// The command as the audit trail names what a refused peer asked for.
    fn request(&self) -> Attempt {
        match self {
            Command::Connme { .. } => Attempt::Connme,
            Command::Connthem { .. } => Attempt::Connthem,
            Command::Query { .. } => Attempt::Query,
        }
    }

    /// The device the command names first, if any.
    fn device(&self) -> Option<&str> {
        match self {
            Command::Connme { mac, .. } | Command::Connthem { mac1: mac, .. } => Some(mac),
            Command::Query { .. } => None,
        }
    }

    /// Carries the command out for the connection `me` and queues its reply there.
    pub async fn apply(self, hub: &Hub, me: &PeerLink) -> Result<Applied, Unread> {
        if let Err(required) = hub.config.auth.check_client(me.transport, me.remote.ip()) {
            let detail = format!(
                "{} over {}: {required}",
                self.name(),
                match me.transport {
                    Transport::Plain => "plain TCP",
                    Transport::Tls { client_cert: false } => "TLS without a client certificate",
                    Transport::Tls { client_cert: true } => "TLS",
                }
            );
            hub.refusals
                .report(me.remote.ip(), Reason::Transport, || detail.clone());
            record_refusal(
                hub,
                me,
                self.request(),
                Reason::Transport,
                Some(self.uuid()),
                self.device(),
                detail,
            );
            refuse(hub, me, Refusal::Requires(required)).await?;
            return Ok(Applied {
                close: true,
                ..Applied::default()
            });
        }
        let ip = me.remote.ip();
        if hub.config.auth.clients == Clients::UserCert && !hub.config.auth.trusts(ip) {
            let certificate = me.certificate.as_ref().map_or("", |c| &*c.user);
            if let Err(unbound) = hub.users.may_reach(certificate, self.uuid()).await {
                let detail = format!(
                    "{} for user {} with a client certificate: {unbound}",
                    self.name(),
                    masked(self.uuid())
                );
                hub.refusals
                    .report(ip, Reason::UserBinding, || detail.clone());
                record_refusal(
                    hub,
                    me,
                    self.request(),
                    Reason::UserBinding,
                    Some(self.uuid()),
                    self.device(),
                    detail,
                );
                // Answered as for a user that does not exist: the certificate learns
                // nothing of other users.
                self.answer_unknown_user(hub, me).await?;
                return Ok(Applied::default());
            }
        }
        let known_user = !hub.users.access(self.uuid()).await.refused();
        let tunnel = self.carry_out(hub, me).await?;
        Ok(Applied {
            tunnel,
            known_user,
            close: false,
        })
    }

    /// Does what the command asks and queues its reply; returns the tunnel `me` is
    /// now one end of, if any.
    async fn carry_out(self, hub: &Hub, me: &PeerLink) -> Result<Option<Tunnel>, Unread> {
        let done = match self {
            // The success reply is already queued, ahead of the device's data.
            Command::Connme { uuid, mac } => connme(hub, &uuid, mac, me).await.map(Some),
            Command::Connthem { uuid, mac1, mac2 } => {
                connthem(hub, &uuid, mac1, mac2, me).await.map(|()| None)
            }
            Command::Query { uuid } => {
                let line = query(hub, &uuid, me).await;
                return answer(hub, &me.out, line).await.map(|()| None);
            }
        };
        match done {
            Ok(Some(tunnel)) => Ok(Some(tunnel)),
            Ok(None) => answer(hub, &me.out, Reply::Success.encode())
                .await
                .map(|()| None),
            Err(refusal) => refuse(hub, me, refusal).await.map(|()| None),
        }
    }
}

/// What applying a command did for its connection.
#[derive(Debug, Default)]
pub struct Applied {
    /// The tunnel the connection is now one end of.
    pub tunnel: Option<Tunnel>,
    /// The request named a known user: it identifies the connection and keeps it
    /// alive (one of an unknown user does neither).
    pub known_user: bool,
    /// Refused for its transport: the connection is closed after the reply.
    pub close: bool,
}

/// How every refused request is answered: counted by reason, logged, and a `failed`
/// reply queued.
pub async fn refuse(hub: &Hub, me: &PeerLink, refusal: Refusal) -> Result<(), Unread> {
    metrics::counter!(metric::REQUESTS_REFUSED_TOTAL, "reason" => refusal.label()).increment(1);
    log::debug!("{}: request failed: {refusal}", me.remote);
    answer(hub, &me.out, Reply::Failed(refusal.to_string()).encode()).await
}

/// Queues an encoded reply, waiting for room at most the stall time.
pub async fn answer(hub: &Hub, out: &Outbox, line: Bytes) -> Result<(), Unread> {
    match out.send_within(line, hub.config.server.tunnel_stall).await {
        Err(Unsent::Stalled) => Err(Unread),
        // Sent, or the requester is closing anyway.
        Ok(()) | Err(Unsent::Closed) => Ok(()),
    }
}

async fn connme(
    hub: &Hub,
    uuid: &ByteString,
    mac: ByteString,
    me: &PeerLink,
) -> Result<Tunnel, Refusal> {
    let found = locate(hub, Attempt::Connme, uuid, &mac, me).await?;
    let device = reach(hub, found, uuid, &mac, me, WireRole::Client).await?;
    if device.id == me.id {
        return Err(Refusal::ToItself);
    }
    let link = Link {
        a: End::client(me.clone()),
        b: End::device(device.clone(), owned(&mac)),
        notify: false,
        requester: Some(Requester {
            uuid: uuid.clone(),
            link: me.clone(),
        }),
    };
    let opened = hub
        .bridge
        .send(link)
        .await
        .map_err(|_| Refusal::ShuttingDown)?;
    // The reply goes into our queue before the device learns of the tunnel, so it
    // reaches the client ahead of any data from the device.
    let _ = me.out.send(Reply::Success.encode()).await;
    device.events.do_send(PeerEvent::Linked(Tunnel {
        id: opened.tunnel,
        peer: me.clone(),
        sent: opened.b_sent,
    }));
    Ok(Tunnel {
        id: opened.tunnel,
        peer: device,
        sent: opened.a_sent,
    })
}

async fn connthem(
    hub: &Hub,
    uuid: &ByteString,
    mac1: ByteString,
    mac2: ByteString,
    me: &PeerLink,
) -> Result<(), Refusal> {
    if mac1 == mac2 {
        return Err(Refusal::DeviceToItself);
    }
    // Both must be live before either is touched.
    let a = locate(hub, Attempt::Connthem, uuid, &mac1, me).await?;
    let b = locate(hub, Attempt::Connthem, uuid, &mac2, me).await?;
    confirm(hub, &a, uuid, &mac1).await?;
    confirm(hub, &b, uuid, &mac2).await?;
    // Each device's node learns which device the other end is.
    let as_device = |mac: &ByteString| WireRole::Device {
        mac: mac.to_string(),
    };
    let a = reach(hub, a, uuid, &mac1, me, as_device(&mac2)).await?;
    let b = reach(hub, b, uuid, &mac2, me, as_device(&mac1)).await?;
    let link = Link {
        a: End::device(a, owned(&mac1)),
        b: End::device(b, owned(&mac2)),
        notify: true,
        requester: Some(Requester {
            uuid: uuid.clone(),
            link: me.clone(),
        }),
    };
    hub.bridge
        .send(link)
        .await
        .map(drop)
        .map_err(|_| Refusal::ShuttingDown)
}

/// The encoded `query` reply.
async fn query(hub: &Hub, uuid: &ByteString, me: &PeerLink) -> Bytes {
    if hub.users.access(uuid).await.refused() {
        unknown_user(hub, me, Attempt::Query, uuid, None).await;
        return Reply::Devices(Vec::new()).encode();
    }
    let stored = async {
        let started = std::time::Instant::now();
        let read = hub.store.user_devices(uuid).await;
        metrics::histogram!(metric::STORE_ROUND_TRIP_SECONDS, "op" => "user_devices")
            .record(started.elapsed());
        match read {
            Ok(devices) => devices.unwrap_or_default(),
            Err(e) => {
                log::debug!("query answered from memory: {e}");
                Vec::new()
            }
        }
    };
    let pending = hub.persistence.send(PendingFor { uuid: uuid.clone() });
    let live = hub.registry.send(LiveDevices { uuid: uuid.clone() });
    // Devices live on other nodes count as sightings not yet stored.
    let elsewhere = async {
        match &hub.cluster {
            Some(cluster) => cluster
                .send(Gather { uuid: uuid.clone() })
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        }
    };
    let (stored, pending, live, elsewhere) = futures::join!(stored, pending, live, elsewhere);
    let (mut pending, live) = (pending.unwrap_or_default(), live.unwrap_or_default());
    pending.extend(elsewhere);
    if me.out.is_closed() {
        // The requester is gone while its devices were read: nothing to render for.
        metrics::counter!(metric::REQUESTS_DROPPED_TOTAL).increment(1);
        return Bytes::new();
    }
    let rows = stored.len().max(live.len()) + pending.len();
    let format = hub.config.query.clone();
    let window = hub.config.heartbeat.online_window;
    let render = move || {
        let now = Stamp::now().to_utc();
        let rows = crate::query::rows(stored, pending, live, now, &format, window);
        Reply::Devices(rows).encode()
    };
    if rows <= RENDER_INLINE_ROWS {
        return render();
    }
    tokio::task::spawn_blocking(render)
        .await
        .unwrap_or_else(|_| Reply::Devices(Vec::new()).encode())
}

/// Where a user's device is live.
enum Found {
    Here(PeerLink),
    /// Not here, so on another node of the cluster if anywhere: [`reach`] finds out
    /// by opening the tunnel, [`confirm`] without touching anything.
    Elsewhere,
}

/// Finds the user's device, checking the user first. A uuid that is no user's slows
/// its source address down once it has failed too often.
async fn locate(
    hub: &Hub,
    request: Attempt,
    uuid: &ByteString,
    mac: &ByteString,
    me: &PeerLink,
) -> Result<Found, Refusal> {
    if hub.users.access(uuid).await == Access::Refused {
        unknown_user(hub, me, request, uuid, Some(mac)).await;
        return Err(if hub.config.auth.verbose_reasons {
            Refusal::UnknownUser
        } else {
            Refusal::Offline(mac.clone())
        });
    }
    let lookup = Lookup(DeviceKey {
        uuid: uuid.clone(),
        mac: mac.clone(),
    });
    match hub.registry.send(lookup).await.ok().flatten() {
        Some(link) => Ok(Found::Here(link)),
        None if hub.cluster.is_some() => Ok(Found::Elsewhere),
        None => Err(Refusal::Offline(mac.clone())),
    }
}

/// Checks that a device found elsewhere is live on some node.
async fn confirm(
    hub: &Hub,
    found: &Found,
    uuid: &ByteString,
    mac: &ByteString,
) -> Result<(), Refusal> {
    let (Found::Elsewhere, Some(cluster)) = (found, &hub.cluster) else {
        return Ok(());
    };
    let probe = Probe {
        uuid: uuid.clone(),
        mac: mac.clone(),
    };
    match cluster.send(probe).await {
        Ok(true) => Ok(()),
        _ => Err(Refusal::Offline(mac.clone())),
    }
}

/// The link to tunnel to a device found: its connection, or for a device on another
/// node a new end here that stands for it (`me` is the end `role` says there).
async fn reach(
    hub: &Hub,
    found: Found,
    uuid: &ByteString,
    mac: &ByteString,
    me: &PeerLink,
    role: WireRole,
) -> Result<PeerLink, Refusal> {
    let cluster = match (found, &hub.cluster) {
        (Found::Here(link), _) => return Ok(link),
        (Found::Elsewhere, Some(cluster)) => cluster,
        (Found::Elsewhere, None) => return Err(Refusal::Offline(mac.clone())),
    };
    let open = Open {
        uuid: uuid.clone(),
        mac: owned(mac),
        role,
        remote: me.remote,
        home: me.home.clone(),
    };
    cluster
        .send(open)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Refusal::Offline(mac.clone()))
}

/// A request named `uuid`, which is no user's: reported, recorded, and paced per
/// address (a source that has failed too often this minute waits).
async fn unknown_user(
    hub: &Hub,
    me: &PeerLink,
    request: Attempt,
    uuid: &str,
    device: Option<&str>,
) {
    let detail = format!(
        "a request named user {}, which does not exist",
        masked(uuid)
    );
    hub.refusals
        .report(me.remote.ip(), Reason::UnknownUser, || detail.clone());
    record_refusal(
        hub,
        me,
        request,
        Reason::UnknownUser,
        Some(uuid),
        device,
        detail,
    );
    metrics::counter!(metric::FAILED_LOOKUPS_TOTAL).increment(1);
    let delay = hub.lookups.failed(me.remote.ip());
    if delay > Duration::ZERO {
        metrics::counter!(metric::FAILED_LOOKUPS_DELAYED_TOTAL).increment(1);
        tokio::time::sleep(delay).await;
    }
}

/// Records a refused request in the audit trail (within its budgets).
fn record_refusal(
    hub: &Hub,
    me: &PeerLink,
    request: Attempt,
    reason: Reason,
    uuid: Option<&str>,
    device: Option<&str>,
    detail: String,
) {
    hub.trail.refusal(Refused {
        request,
        reason,
        source: me.remote,
        uuid,
        device,
        certificate: me.certificate.as_deref(),
        detail,
    });
}

/// A field kept beyond this request, copied so it does not pin the read buffer it
/// was parsed from.
fn owned(field: &ByteString) -> ByteString {
    ByteString::from(field.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[&str]) -> Vec<ByteString> {
        list.iter().map(|f| ByteString::from(*f)).collect()
    }

    #[test]
    fn each_command_takes_its_own_fields() {
        assert_eq!(
            Command::from_frame(Request::Connme, fields(&["u", "m"])),
            Ok(Command::Connme {
                uuid: "u".into(),
                mac: "m".into()
            })
        );
        assert_eq!(
            Command::from_frame(Request::Connme, fields(&["u", "m", "1"])),
            Ok(Command::Connme {
                uuid: "u".into(),
                mac: "m".into()
            }),
            "the web backend's priority field"
        );
        assert!(matches!(
            Command::from_frame(Request::Connthem, fields(&["u", "a", "b"])),
            Ok(Command::Connthem { .. })
        ));
        assert_eq!(
            Command::from_frame(Request::Query, fields(&["u"])),
            Ok(Command::Query { uuid: "u".into() })
        );
    }

    #[test]
    fn wrong_field_counts_and_empty_ids_are_refused() {
        for (request, list) in [
            (Request::Connme, &["u"][..]),
            (Request::Connme, &["u", "m", "1", "2"]),
            (Request::Connme, &["", "m"]),
            (Request::Connme, &["u", ""]),
            (Request::Connthem, &["u", "a"]),
            (Request::Query, &["u", "x"]),
            (Request::Query, &[""]),
        ] {
            assert!(
                Command::from_frame(request, fields(list)).is_err(),
                "{request:?} {list:?}"
            );
        }
    }
}
