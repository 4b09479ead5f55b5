//! The gateway's settings as `settings.toml` spells them: each section's type, with
//! its defaults, deserializing every key straight into the type it means (addresses,
//! durations, counts that cannot be zero, enums, lists), so a wrong value never
//! reaches the gateway.
//!
//! Sections that belong to one module live there ([`crate::Limits`],
//! [`crate::tls::TlsSettings`], [`crate::store::Storage`], [`crate::store::Mongodb`],
//! [`crate::cluster::ClusterSettings`], [`crate::query::QueryFormat`]); the rest are
//! here, with [`Config`], what the library runs on. [`de`] holds the few rules every
//! key follows: durations in the unit their key names, empty means none, a list may
//! also be written as one comma-separated string.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::de;
use crate::limits::Limits;
use crate::query::QueryFormat;
use crate::registry::Takeover;
use crate::tenants::Devices;
use crate::tls::{Clients, Tls, Transport};

/// This node's name (in the audit trail, fleet events and the cluster):
/// `cluster.node_id` if set, else the host name.
pub fn node_name(configured: Option<&str>) -> String {
    match configured {
        Some(name) => name.to_owned(),
        None => gethostname::gethostname().to_string_lossy().into_owned(),
    }
}

/// Run-time settings of the gateway's library side: the sections it uses, and the
/// loaded TLS server side.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: Server,
    pub heartbeat: Heartbeat,
    pub persistence: PersistenceSettings,
    pub query: QueryFormat,
    pub auth: Auth,
    pub limits: Limits,
    pub audit: crate::audit::AuditSettings,
    /// This node's name in the audit trail (the cluster's node id); none = the host
    /// name.
    pub node: Option<String>,
    /// TLS on the listener, if configured.
    pub tls: Option<Arc<Tls>>,
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Where devices and clients connect.
    #[serde(with = "de::parsed")]
    pub listen: SocketAddr,
    pub workers: Workers,
    /// Bytes read from a socket at a time.
    pub read_buffer_bytes: NonZeroUsize,
    /// Output queue of a connection, in chunks (each at most `read_buffer_bytes`).
    pub output_queue_chunks: NonZeroUsize,
    /// How long a tunnel waits for a peer that reads nothing before closing.
    #[serde(rename = "tunnel_stall_secs", with = "de::positive_secs")]
    pub tunnel_stall: Duration,
    /// The longest a payload tail that could start the next header waits for the
    /// rest (a far link's hold; see [`crate::connection::header_hold`]).
    #[serde(rename = "header_hold_ms", with = "de::positive_millis")]
    pub header_hold: Duration,
    /// The shortest such wait, whatever the link's round trip.
    #[serde(rename = "header_hold_min_ms", with = "de::millis")]
    pub header_hold_min: Duration,
    /// TCP keepalive idle time; zero = off.
    #[serde(rename = "keepalive_secs", with = "de::secs")]
    pub keepalive: Duration,
    /// Connections waiting to be accepted (capped by the system's somaxconn).
    pub backlog: std::num::NonZeroU32,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3001)),
            workers: Workers::default(),
            read_buffer_bytes: NonZeroUsize::new(64 * 1024).unwrap(),
            output_queue_chunks: NonZeroUsize::new(64).unwrap(),
            tunnel_stall: Duration::from_secs(30),
            header_hold: Duration::from_millis(100),
            header_hold_min: Duration::ZERO,
            keepalive: Duration::from_secs(60),
            backlog: std::num::NonZeroU32::new(4096).unwrap(),
        }
    }
}

/// Where sessions run (`server.workers`: a thread count, 0 = one per CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// On the arbiter that calls [`crate::serve`], with the shared actors: no thread
    /// hop at all (tests run this way, on a paused clock). Not a setting.
    Caller,
    /// On this many worker threads of their own, connections dealt round-robin.
    Threads(NonZeroUsize),
}

impl Default for Workers {
    fn default() -> Self {
        Workers::Threads(NonZeroUsize::MIN)
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let threads = usize::deserialize(d)?;
        Ok(Workers::Threads(NonZeroUsize::new(threads).unwrap_or_else(
            || std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        )))
    }
}

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Threads(n) => s.serialize_u64(n.get() as u64),
            Workers::Caller => Err(serde::ser::Error::custom(
                "server.workers: the caller's arbiter is not a setting",
            )),
        }
    }
}

/// `[heartbeat]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    /// Period of the data-heartbeat debouncer's timers.
    #[serde(rename = "debounce_secs", with = "de::positive_secs")]
    pub debounce: Duration,
    /// A device seen within this window is online in `query` replies.
    #[serde(rename = "online_window_secs", with = "de::positive_secs")]
    pub online_window: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            debounce: Duration::from_secs(30),
            online_window: Duration::from_secs(60),
        }
    }
}

/// `[persistence]`: how sightings are batched into the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersistenceSettings {
    #[serde(rename = "flush_interval_ms", with = "de::positive_millis")]
    pub flush_interval: Duration,
    pub max_batch: NonZeroUsize,
    /// How long shutdown keeps trying to write pending sightings.
    #[serde(rename = "shutdown_timeout_secs", with = "de::secs")]
    pub shutdown_timeout: Duration,
}

impl Default for PersistenceSettings {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            max_batch: NonZeroUsize::new(1000).unwrap(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// `[auth]`: who may do what.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Refuse `connme`/`connthem`/`query` and ignore devices of unknown uuids.
    pub require_known_user: bool,
    /// Tell "unknown user" apart from "device offline" in `failed` replies (helps
    /// whoever guesses uuids, so off by default).
    pub verbose_reasons: bool,
    /// Who may send `connme`, `connthem` and `query` over what.
    pub clients: Clients,
    /// Sources exempt from `clients` (e.g. the web backend's host).
    #[serde(with = "de::list")]
    pub trusted_networks: Vec<IpNet>,
    /// Which devices may register.
    pub devices: Devices,
    /// What a second connection of a live device does.
    pub device_takeover: Takeover,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            require_known_user: true,
            verbose_reasons: false,
            clients: Clients::Any,
            trusted_networks: Vec::new(),
            devices: Devices::Open,
            device_takeover: Takeover::Newest,
        }
    }
}

impl Auth {
    /// Whether a request from `ip` over `transport` is accepted; if not, what is
    /// required.
    pub fn check_client(&self, transport: Transport, ip: IpAddr) -> Result<(), &'static str> {
        if self.trusts(ip) {
            return Ok(());
        }
        match (self.clients, transport) {
            (Clients::Any, _) => Ok(()),
            (Clients::Tls, Transport::Tls { .. }) => Ok(()),
            (Clients::ClientCert | Clients::UserCert, Transport::Tls { client_cert: true }) => {
                Ok(())
            }
            (Clients::Tls, Transport::Plain) => {
                Err("this gateway accepts connme, connthem and query only over TLS")
            }
            (Clients::ClientCert | Clients::UserCert, _) => Err(
                "this gateway accepts connme, connthem and query only over TLS with a client certificate",
            ),
        }
    }

    /// Whether `ip` is in a trusted network (exempt from `clients`).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.trusted_networks.iter().any(|net| net.contains(&ip))
    }
}

/// A secret setting (a token, a password, a key): shown as `****` in `Debug`, so no
/// log line or error that prints settings reveals it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"****\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Probe {
        #[serde(default, with = "de::list")]
        nets: Vec<IpNet>,
        #[serde(default, with = "de::optional")]
        addr: Option<SocketAddr>,
        #[serde(default, with = "de::positive_secs")]
        wait: Duration,
    }

    fn probe(text: &str) -> Result<Probe, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn a_list_is_an_array_a_toml_array_in_a_string_or_comma_separated() {
        let both: Vec<IpNet> = vec![
            "10.0.0.5/32".parse().unwrap(),
            "192.168.1.0/24".parse().unwrap(),
        ];
        for text in [
            r#"nets = ["10.0.0.5/32", "192.168.1.0/24"]"#,
            r#"nets = '["10.0.0.5/32", "192.168.1.0/24"]'"#,
            r#"nets = "10.0.0.5/32, 192.168.1.0/24""#,
        ] {
            assert_eq!(probe(text).unwrap().nets, both, "{text}");
        }
        assert!(probe(r#"nets = """#).unwrap().nets.is_empty());
        let err = probe(r#"nets = "10.0.0.5/33""#).unwrap_err();
        assert!(err.contains("10.0.0.5/33"), "{err}");
    }

    #[test]
    fn empty_means_none_and_a_bad_value_is_named() {
        assert_eq!(probe(r#"addr = """#).unwrap().addr, None);
        assert_eq!(
            probe(r#"addr = "127.0.0.1:9""#).unwrap().addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
        let err = probe(r#"addr = "nowhere""#).unwrap_err();
        assert!(err.contains("\"nowhere\""), "{err}");
    }

    #[test]
    fn durations_that_must_run_refuse_zero() {
        assert_eq!(probe("wait = 5").unwrap().wait, Duration::from_secs(5));
        assert!(probe("wait = 0").unwrap_err().contains("greater than 0"));
    }

    #[test]
    fn zero_workers_means_one_per_cpu() {
        #[derive(Deserialize)]
        struct W {
            workers: Workers,
        }
        let w: W = toml::from_str("workers = 0").unwrap();
        assert!(matches!(w.workers, Workers::Threads(_)));
        let w: W = toml::from_str("workers = 3").unwrap();
        assert_eq!(w.workers, Workers::Threads(NonZeroUsize::new(3).unwrap()));
    }

    #[test]
    fn a_secret_never_prints() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s:?}"), "\"****\"");
    }

    #[test]
    fn the_policy_asks_for_what_each_mode_requires_and_trusts_its_networks() {
        let plain = Transport::Plain;
        let tls = Transport::Tls { client_cert: false };
        let cert = Transport::Tls { client_cert: true };
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let any = Auth::default();
        assert!(any.check_client(plain, ip).is_ok());
        let only_tls = Auth {
            clients: Clients::Tls,
            trusted_networks: vec!["10.0.0.0/8".parse().unwrap()],
            ..Auth::default()
        };
        assert!(only_tls
            .check_client(plain, ip)
            .unwrap_err()
            .contains("TLS"));
        assert!(only_tls.check_client(tls, ip).is_ok());
        assert!(only_tls
            .check_client(plain, "10.1.2.3".parse().unwrap())
            .is_ok());
        let certs = Auth {
            clients: Clients::ClientCert,
            trusted_networks: vec!["127.0.0.1/32".parse().unwrap()],
            ..Auth::default()
        };
        assert!(certs
            .check_client(tls, ip)
            .unwrap_err()
            .contains("certificate"));
        assert!(certs.check_client(cert, ip).is_ok());
        assert!(certs
            .check_client(plain, "::ffff:127.0.0.1".parse().unwrap())
            .is_ok());
    }
}
