//! The requests a client sends and how each is answered: `connme`, `connthem` and
//! `query` (`docs/PROTOCOL.md` §3).
//!
//! A [`Command`] is parsed from a [`Frame::Request`](crate::frame::Frame) by
//! [`Command::from_frame`], which checks the fields each command needs, and carried out
//! by [`Command::apply`], which queues its [`Reply`] on the requester's output queue.
//! Failures are [`Refusal`]s, whose text is the reply's `reason`.

use bytestring::ByteString;

use crate::bridge::Link;
use crate::clock::Stamp;
use crate::frame::{Reply, Request};
use crate::hub::Hub;
use crate::link::{End, Outbox, PeerEvent, PeerLink, Role, TunnelId};
use crate::persistence::PendingFor;
use crate::registry::{LiveDevices, Lookup};
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
}

impl From<Refusal> for Reply {
    fn from(refusal: Refusal) -> Reply {
        Reply::Failed(refusal.to_string())
    }
}

/// A tunnel a command made for the requester, for the session to install.
pub type Tunnel = (TunnelId, PeerLink);

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

    /// Carries the command out for the connection `me` and queues its reply there.
    /// Returns the tunnel `me` is now one end of, if any.
    pub async fn apply(self, hub: &Hub, me: &PeerLink) -> Option<Tunnel> {
        let (reply, tunnel) = match self {
            Command::Connme { uuid, mac } => match connme(hub, &uuid, mac, me).await {
                // The success reply is already queued, ahead of the device's data.
                Ok(tunnel) => return Some(tunnel),
                Err(refusal) => (refusal.into(), None),
            },
            Command::Connthem { uuid, mac1, mac2 } => {
                let linked = connthem(hub, &uuid, mac1, mac2).await;
                (linked.map_or_else(Reply::from, |()| Reply::Success), None)
            }
            Command::Query { uuid } => (query(hub, &uuid).await, None),
        };
        if let Reply::Failed(reason) = &reply {
            log::debug!("{}: request failed: {reason}", me.remote);
        }
        answer(&me.out, reply).await;
        tunnel
    }
}

/// Queues a reply, waiting for room in the queue.
pub async fn answer(out: &Outbox, reply: Reply) {
    let _ = out.send(reply.encode()).await;
}

async fn connme(
    hub: &Hub,
    uuid: &ByteString,
    mac: ByteString,
    me: &PeerLink,
) -> Result<Tunnel, Refusal> {
    let device = find_device(hub, uuid, &mac).await?;
    if device.id == me.id {
        return Err(Refusal::ToItself);
    }
    let link = Link {
        a: End {
            link: me.clone(),
            role: Role::Client,
        },
        b: End {
            link: device.clone(),
            role: Role::Device(mac),
        },
        notify: false,
    };
    let tunnel = hub
        .bridge
        .send(link)
        .await
        .map_err(|_| Refusal::ShuttingDown)?;
    // The reply goes into our queue before the device learns of the tunnel, so it
    // reaches the client ahead of any data from the device.
    let _ = me.out.send(Reply::Success.encode()).await;
    device.events.do_send(PeerEvent::Linked {
        tunnel,
        peer: me.clone(),
    });
    Ok((tunnel, device))
}

async fn connthem(
    hub: &Hub,
    uuid: &ByteString,
    mac1: ByteString,
    mac2: ByteString,
) -> Result<(), Refusal> {
    if mac1 == mac2 {
        return Err(Refusal::DeviceToItself);
    }
    let a = find_device(hub, uuid, &mac1).await?;
    let b = find_device(hub, uuid, &mac2).await?;
    let link = Link {
        a: End {
            link: a,
            role: Role::Device(mac1),
        },
        b: End {
            link: b,
            role: Role::Device(mac2),
        },
        notify: true,
    };
    hub.bridge
        .send(link)
        .await
        .map(drop)
        .map_err(|_| Refusal::ShuttingDown)
}

async fn query(hub: &Hub, uuid: &ByteString) -> Reply {
    if hub.users.access(uuid).await.refused() {
        return Reply::Devices(Vec::new());
    }
    let stored = async {
        match hub.store.user_devices(uuid).await {
            Ok(devices) => devices.unwrap_or_default(),
            Err(e) => {
                log::debug!("query answered from memory: {e}");
                Vec::new()
            }
        }
    };
    let pending = hub.persistence.send(PendingFor { uuid: uuid.clone() });
    let live = hub.registry.send(LiveDevices { uuid: uuid.clone() });
    let (stored, pending, live) = futures::join!(stored, pending, live);
    Reply::Devices(crate::query::rows(
        stored,
        pending.unwrap_or_default(),
        live.unwrap_or_default(),
        Stamp::now().to_utc(),
        &hub.config.query,
    ))
}

/// The live connection of the user's device, checking the user first.
async fn find_device(hub: &Hub, uuid: &ByteString, mac: &ByteString) -> Result<PeerLink, Refusal> {
    if hub.users.access(uuid).await == Access::Refused {
        return Err(Refusal::UnknownUser);
    }
    hub.registry
        .send(Lookup {
            uuid: uuid.clone(),
            mac: mac.clone(),
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Refusal::Offline(mac.clone()))
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
