//! What gateway nodes say to each other over NATS: the subjects, and the messages on
//! them.
//!
//! Subjects never carry a uuid (whoever operates NATS sees every subject): a device's
//! subject carries a keyed SHA-256 of its uuid and mac, a user's a keyed hash of the
//! uuid. Requests and replies are small JSON documents, each sealed with its sender's
//! node id ([`super::bus`]), so no message names its sender in its body. Tunnel
//! payload never crosses NATS ([`super::peer`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::link::{End, PeerLink};

/// A node's name in the cluster: `cluster.node_id`, or the host name. Every message
/// between nodes is sealed with it, so a node is known by this name alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(name: impl Into<String>) -> NodeId {
        NodeId(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(name: &str) -> NodeId {
        NodeId(name.to_owned())
    }
}

impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The subjects of one cluster.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    key: String,
}

impl Subjects {
    /// Subjects under `prefix`, hashed with `key` (shared by every node).
    pub fn new(prefix: &str, key: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_owned(),
            key: key.to_owned(),
        }
    }

    /// Where the node holding device (uuid, mac) listens: subscribed while it is live
    /// there, so NATS's interest in it is the presence table.
    pub fn device(&self, uuid: &str, mac: &str) -> String {
        format!("{}.dev.{}", self.prefix, self.digest(&[uuid, mac]))
    }

    /// A user's name in `query` requests.
    pub fn user(&self, uuid: &str) -> String {
        self.digest(&[uuid])
    }

    /// Every node answers `query` requests here.
    pub fn query(&self) -> String {
        format!("{}.query", self.prefix)
    }

    /// Every node answers [`FleetAsk`]s here.
    pub fn fleet(&self) -> String {
        format!("{}.fleet", self.prefix)
    }

    /// Every node says it is alive here.
    pub fn hello(&self) -> String {
        format!("{}.hello", self.prefix)
    }

    /// 128 bits of SHA-256 over the key and the parts, in hex. Each is length-prefixed,
    /// so no two inputs collide by moving a boundary.
    fn digest(&self, parts: &[&str]) -> String {
        let mut hash = Sha256::new();
        for part in std::iter::once(&self.key.as_str()).chain(parts) {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        super::bus::hex(&hash.finalize()[..16])
    }
}

/// A request to the node holding a device, on its [`Subjects::device`] subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Ask {
    /// Is the device live there?
    Probe,
    /// May a connection from `from` take the device (`auth.device_takeover =
    /// "when-silent"`)? A node that saw the device within the online window answers
    /// [`Answer::Present`] when it was seen from another address (refuse), a failure
    /// otherwise. Asked of the node holding it, and of a node its connection left
    /// within the window.
    Beating {
        #[serde(default)]
        from: Option<std::net::IpAddr>,
    },
    /// Tunnel the device to an end on the asking node: dial its peer port and
    /// attach with `token` (hex); the end there is a connection from `remote` in
    /// role `role`.
    Open {
        token: String,
        remote: SocketAddr,
        role: WireRole,
    },
    /// The device has been connected to the sending node since `since_ms`
    /// (milliseconds since the Unix epoch): whoever else holds it with an older
    /// connection closes that one (the node with the smaller name on a tie).
    /// Published, not requested: when a device connects, and again for every device
    /// when the NATS connection comes back (it may have moved meanwhile). Comparing
    /// the times, not taking every claim, also makes a claim replayed within the
    /// seal's window to a node that never saw it harmless.
    Claim { since_ms: i64 },
}

/// The reply to an [`Ask`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Answer {
    Present,
    /// The answering node attached the tunnel; the device connects from `remote`.
    Opened {
        remote: SocketAddr,
    },
    Failed {
        reason: String,
    },
}

/// A tunnel end's role, as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireRole {
    Client,
    Device { mac: String },
}

impl WireRole {
    /// The tunnel end `link` is, in this role.
    pub fn end(self, link: PeerLink) -> End {
        match self {
            WireRole::Client => End::client(link),
            WireRole::Device { mac } => End::device(link, mac.into()),
        }
    }
}

/// A `query` request: the user's devices live on any node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryAsk {
    pub user: String,
}

/// One node's answer to a [`QueryAsk`] (every node answers, with no devices if it has
/// none, so the asker knows when it has heard from all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryAnswer {
    pub devices: Vec<LiveElsewhere>,
}

/// A device live on another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveElsewhere {
    pub mac: String,
    pub host: String,
    /// Last seen, in milliseconds since the Unix epoch.
    pub seen_ms: i64,
}

/// A node says it is alive, where other nodes dial it (`host:port`), the SHA-256
/// fingerprint of the certificate it answers there with, and when it started
/// (milliseconds since the Unix epoch: a newer start under a known name is a
/// restart with a new certificate).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub peer: String,
    pub fingerprint: String,
    pub started_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_hide_the_uuid_and_tell_devices_and_clusters_apart() {
        let subjects = Subjects::new("elfin", "k");
        let uuid = "0123456789abcdef0123456789abcdef";
        let device = subjects.device(uuid, "F0FE6B2A1C3D");
        assert!(device.starts_with("elfin.dev."), "{device}");
        assert!(!device.contains(uuid) && !device.contains("F0FE6B2A1C3D"));
        assert_eq!(device.len(), "elfin.dev.".len() + 32);
        assert_eq!(device, subjects.device(uuid, "F0FE6B2A1C3D"), "stable");
        assert_ne!(device, subjects.device(uuid, "F0FE6B2A1C3E"));
        assert_ne!(
            subjects.device("ab", "c"),
            subjects.device("a", "bc"),
            "part boundaries count"
        );
        assert_ne!(
            device,
            Subjects::new("elfin", "other").device(uuid, "F0FE6B2A1C3D")
        );
    }

    #[test]
    fn requests_round_trip_as_json() {
        let ask = Ask::Open {
            token: "00ff".into(),
            remote: "10.0.0.1:5000".parse().unwrap(),
            role: WireRole::Device { mac: "M".into() },
        };
        let back: Ask = serde_json::from_slice(&super::super::bus::encode(&ask)).unwrap();
        assert_eq!(back, ask);
        assert_eq!(
            serde_json::from_slice::<Ask>(br#"{"op":"probe"}"#).unwrap(),
            Ask::Probe
        );
    }
}

/// What a node knows of devices, asked of every node on [`Subjects::fleet`] by the
/// node where they arrived or whose grace period for them ended (fleet events).
/// Devices are named by their [`Subjects::device`] subject, never by uuid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetAsk {
    pub devices: Vec<String>,
    /// The devices connected to the asking node: whoever kept a record of them
    /// hands it over (answers it, and forgets it).
    pub arrived: bool,
}

/// The answer to a [`FleetAsk`]: what this node knows of each device it knows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetAnswer {
    pub devices: Vec<(String, Whereabouts)>,
}

/// What one node knows of a device.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Whereabouts {
    /// Live there.
    Held,
    /// Left that node at `left_ms` (ms since the Unix epoch); its grace period runs
    /// there. `adopted`: the node took it over from the store (after a start, or
    /// when the node holding it was lost), not from a connection of its own.
    Away { left_ms: i64, adopted: bool },
    /// Announced offline there; last held at `left_ms`.
    Offline { left_ms: i64 },
}
