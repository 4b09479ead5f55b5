//! The `[cluster]` section as operators write it ([`ClusterSettings`]), and how it
//! becomes the [`ClusterConfig`] a node joins with: the secret read and checked, the
//! peer port and its advertised address, NATS credentials.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::bus::{self, Keys};
use super::wire::{NodeId, Subjects};
use super::{ClusterConfig, NatsAuth};
use crate::config::Secret;
use crate::de;

/// The `[cluster]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// NATS servers; none = this gateway runs alone.
    #[serde(with = "de::list")]
    pub nats_url: Vec<String>,
    /// This node's name in the cluster; none = the host name.
    #[serde(with = "de::optional")]
    pub node_id: Option<String>,
    #[serde(deserialize_with = "subject_prefix")]
    pub subject_prefix: String,
    #[serde(with = "de::optional")]
    pub subject_key: Option<Secret>,
    #[serde(with = "de::optional")]
    pub token: Option<Secret>,
    #[serde(with = "de::optional")]
    pub user: Option<String>,
    #[serde(with = "de::optional")]
    pub password: Option<Secret>,
    #[serde(with = "de::optional")]
    pub nkey_seed: Option<Secret>,
    #[serde(with = "de::optional")]
    pub credentials_file: Option<PathBuf>,
    #[serde(with = "de::optional")]
    pub tls_ca: Option<PathBuf>,
    #[serde(with = "de::optional")]
    pub tls_cert: Option<PathBuf>,
    #[serde(with = "de::optional")]
    pub tls_key: Option<PathBuf>,
    pub require_tls: bool,
    /// Seals every message between nodes; at least [`bus::MIN_SECRET`] bytes.
    #[serde(with = "de::optional")]
    pub secret: Option<Secret>,
    /// A file holding the secret instead.
    #[serde(with = "de::optional")]
    pub secret_file: Option<PathBuf>,
    /// Where this node takes other nodes' tunnel connections.
    #[serde(with = "de::optional")]
    pub peer_listen: Option<SocketAddr>,
    /// `host:port` other nodes dial; default: `peer_listen`.
    #[serde(with = "de::optional")]
    pub peer_advertise: Option<String>,
    /// This node's certificate and key on the peer port; default: a fresh pair.
    #[serde(with = "de::optional")]
    pub peer_cert: Option<PathBuf>,
    #[serde(with = "de::optional")]
    pub peer_key: Option<PathBuf>,
    #[serde(rename = "request_timeout_ms", with = "de::positive_millis")]
    pub request_timeout: Duration,
    #[serde(rename = "node_timeout_secs", with = "de::positive_secs")]
    pub node_timeout: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats_url: Vec::new(),
            node_id: None,
            subject_prefix: "elfin".into(),
            subject_key: None,
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            credentials_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            secret: None,
            secret_file: None,
            peer_listen: None,
            peer_advertise: None,
            peer_cert: None,
            peer_key: None,
            request_timeout: Duration::from_secs(1),
            node_timeout: Duration::from_secs(10),
        }
    }
}

fn subject_prefix<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let prefix = String::deserialize(d)?;
    let words_ok = !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !prefix.starts_with('.')
        && !prefix.ends_with('.');
    if !words_ok {
        return Err(serde::de::Error::custom(format!(
            "{prefix:?}: use A-Z a-z 0-9 - _ and dots between words"
        )));
    }
    Ok(prefix)
}

/// A wrong `[cluster]` setting: the key it is about, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SettingError {
    pub key: &'static str,
    pub reason: String,
}

fn wrong(key: &'static str, reason: impl Into<String>) -> SettingError {
    SettingError {
        key,
        reason: reason.into(),
    }
}

impl ClusterSettings {
    /// How this node joins its cluster; `None` when it runs alone. A cross-node
    /// tunnel end queues and stalls as a local connection does. An error names the
    /// key at fault (the secret's file is read here).
    pub fn config(
        &self,
        server: &crate::config::Server,
        limits: &crate::Limits,
    ) -> Result<Option<ClusterConfig>, SettingError> {
        if self.nats_url.is_empty() {
            return Ok(None);
        }
        let keys = Keys::derive(&self.read_secret()?);
        let peer_listen = self.peer_listen.ok_or_else(|| {
            wrong(
                "cluster.peer_listen",
                "cluster mode needs the address this node takes other nodes' tunnel \
                 connections on, e.g. 0.0.0.0:3101",
            )
        })?;
        if self.peer_advertise.is_none() && peer_listen.ip().is_unspecified() {
            return Err(wrong(
                "cluster.peer_advertise",
                format!(
                    "cluster.peer_listen = {peer_listen} names no address other nodes \
                     can dial: set cluster.peer_advertise to this node's host:port"
                ),
            ));
        }
        let identity = match (&self.peer_cert, &self.peer_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(wrong(
                    "cluster.peer_cert",
                    "set cluster.peer_cert and cluster.peer_key both, or neither",
                ))
            }
        };
        let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned());
        let node = NodeId::new(crate::config::node_name(self.node_id.as_deref()));
        let subject_key = match &self.subject_key {
            Some(key) => key.expose().to_owned(),
            None => keys.subjects.clone(),
        };
        Ok(Some(ClusterConfig {
            servers: self.nats_url.clone(),
            node,
            subjects: Subjects::new(&self.subject_prefix, &subject_key),
            keys: Arc::new(keys),
            auth: NatsAuth {
                token: secret(&self.token),
                user: self.user.clone().zip(secret(&self.password)),
                nkey_seed: secret(&self.nkey_seed),
                credentials_file: self.credentials_file.clone(),
                tls_ca: self.tls_ca.clone(),
                tls_client: self.tls_cert.clone().zip(self.tls_key.clone()),
                require_tls: self.require_tls,
            },
            peer_listen,
            peer_advertise: self.peer_advertise.clone(),
            identity,
            request_timeout: self.request_timeout,
            linger: None,
            // A silent node's tunnels end within the stall time, as a stalled one's.
            node_timeout: self.node_timeout.min(server.tunnel_stall),
            stall: server.tunnel_stall,
            out_chunks: server.output_queue_chunks.get(),
            out_bytes: limits.output_queue_bytes.get(),
        }))
    }

    /// The cluster secret, from `secret_file` if set, else `secret`.
    fn read_secret(&self) -> Result<Vec<u8>, SettingError> {
        let secret = match (&self.secret_file, &self.secret) {
            (Some(path), _) => {
                let mut bytes = std::fs::read(path).map_err(|e| {
                    wrong("cluster.secret_file", format!("{}: {e}", path.display()))
                })?;
                while bytes.last().is_some_and(u8::is_ascii_whitespace) {
                    bytes.pop();
                }
                bytes
            }
            (None, Some(secret)) => secret.expose().as_bytes().to_vec(),
            (None, None) => {
                return Err(wrong(
                    "cluster.secret",
                    format!(
                        "cluster mode needs a secret shared by every node (or \
                         cluster.secret_file), at least {} bytes: make one with \
                         `openssl rand -hex 32`",
                        bus::MIN_SECRET
                    ),
                ))
            }
        };
        if secret.len() < bus::MIN_SECRET {
            let key = match self.secret_file {
                Some(_) => "cluster.secret_file",
                None => "cluster.secret",
            };
            return Err(wrong(
                key,
                format!(
                    "the cluster secret has {} bytes, fewer than {}: make one with \
                     `openssl rand -hex 32`",
                    secret.len(),
                    bus::MIN_SECRET
                ),
            ));
        }
        Ok(secret)
    }
}
