//! Operator settings: `settings.toml` overridden by `ELFIN__SECTION__KEY` variables.
//!
//! Every key has a default (the same ones `settings.toml` documents), so the file is
//! optional when it is not named explicitly. Values are checked at start-up; an error
//! names the key.
//!
//! (Over 400 lines: one plain struct per settings section, their defaults and checks;
//! each section is short, and keeping them together keeps `settings.toml` reviewable.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use chrono::format::{Item, StrftimeItems};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use elfin_actors::query::QueryFormat;
use elfin_actors::store::Backend as StoreBackend;
use elfin_actors::{Config, Workers};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: Server,
    pub storage: Storage,
    pub mongodb: Mongodb,
    pub heartbeat: Heartbeat,
    pub persistence: Persistence,
    pub query: Query,
    pub auth: Auth,
    pub tls: Tls,
    pub limits: Limits,
    pub log: Log,
    pub admin: Admin,
    pub cluster: Cluster,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    pub listen: String,
    /// Threads serving connections; 0 = one per CPU.
    pub workers: usize,
    pub read_buffer_bytes: usize,
    pub output_queue_chunks: usize,
    pub tunnel_stall_secs: u64,
    /// How long a payload tail that could start the next header waits for the rest.
    pub header_hold_ms: u64,
    /// TCP keepalive idle time; 0 = off.
    pub keepalive_secs: u64,
    /// Connections waiting to be accepted; capped by the system's somaxconn.
    pub backlog: u32,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:3001".into(),
            workers: 1,
            read_buffer_bytes: 64 * 1024,
            output_queue_chunks: 64,
            tunnel_stall_secs: 30,
            header_hold_ms: 100,
            keepalive_secs: 60,
            backlog: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub backend: Backend,
    pub path: PathBuf,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            path: "data/elfin.db".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Embedded,
    Mongodb,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Mongodb => "mongodb",
        })
    }
}

/// A connection string that may hold a password: shown masked in `Debug` (and so in
/// every log line and error that prints settings).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUri(String);

impl SecretUri {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretUri {
    fn from(uri: &str) -> Self {
        Self(uri.to_owned())
    }
}

impl std::fmt::Debug for SecretUri {
    /// `scheme://user:****@host…`: the password, if any, is replaced.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = &self.0;
        let masked = uri.find("://").and_then(|scheme| {
            let rest = &uri[scheme + 3..];
            let at = rest.find('@')?;
            let colon = rest[..at].find(':')?;
            Some(format!(
                "{}{}:****{}",
                &uri[..scheme + 3],
                &rest[..colon],
                &rest[at..]
            ))
        });
        write!(f, "{:?}", masked.as_deref().unwrap_or(uri))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mongodb {
    pub uri: SecretUri,
    pub database: String,
    pub connect_timeout_ms: u64,
    pub server_selection_timeout_ms: u64,
}

impl Default for Mongodb {
    fn default() -> Self {
        Self {
            uri: SecretUri::from("mongodb://localhost:27017"),
            database: "elfinconnect".into(),
            connect_timeout_ms: 5_000,
            server_selection_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    pub debounce_secs: u64,
    pub online_window_secs: u64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            debounce_secs: 30,
            online_window_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Persistence {
    pub flush_interval_ms: u64,
    pub max_batch: usize,
    pub shutdown_timeout_secs: u64,
}

impl Default for Persistence {
    fn default() -> Self {
        Self {
            flush_interval_ms: 1_000,
            max_batch: 1_000,
            shutdown_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Query {
    pub time_zone: String,
    pub time_format: String,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            time_zone: "Europe/Budapest".into(),
            time_format: "%Y. %m. %d. %H:%M:%S".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub require_known_user: bool,
    pub verbose_reasons: bool,
    pub clients: Clients,
    pub trusted_networks: Vec<ipnet::IpNet>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            require_known_user: true,
            verbose_reasons: false,
            clients: Clients::Any,
            trusted_networks: Vec::new(),
        }
    }
}

/// `auth.clients`: who may send connme, connthem and query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clients {
    Any,
    Tls,
    ClientCert,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// A second, TLS-only listener (e.g. "0.0.0.0:443"); empty = none.
    pub listen: String,
    /// PEM certificate chain; empty = no TLS.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM CA of accepted client certificates; empty = none.
    pub client_ca: PathBuf,
    pub min_version: TlsVersion,
    pub handshake_timeout_secs: u64,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            listen: String::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: PathBuf::new(),
            min_version: TlsVersion::V13,
            handshake_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V12,
    #[serde(rename = "1.3")]
    V13,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub identify_secs: u64,
    pub idle_secs: u64,
    pub output_queue_bytes: usize,
    pub requests_per_sec: u32,
    pub request_burst: u32,
    pub failed_lookups_per_min: u32,
    pub failed_lookup_delay_ms: u64,
}

impl Default for Limits {
    /// The library's defaults, in the units of the settings file.
    fn default() -> Self {
        let l = elfin_actors::Limits::default();
        Self {
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            identify_secs: l.identify.as_secs(),
            idle_secs: l.idle.as_secs(),
            output_queue_bytes: l.output_queue_bytes,
            requests_per_sec: l.requests_per_sec as u32,
            request_burst: l.request_burst as u32,
            failed_lookups_per_min: l.failed_lookups_per_min,
            failed_lookup_delay_ms: l.failed_lookup_delay.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub level: String,
    pub format: crate::logging::Format,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: crate::logging::Format::Text,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin HTTP server; empty = off.
    pub listen: String,
    /// Required on every request when set; without it, listen must be loopback.
    pub token: Secret,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9100".into(),
            token: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// NATS servers, comma-separated; empty = this gateway runs alone.
    pub nats_url: String,
    /// This node's name in the cluster; empty = the host name.
    pub node_id: String,
    pub subject_prefix: String,
    pub subject_key: Secret,
    pub token: Secret,
    pub user: String,
    pub password: Secret,
    pub nkey_seed: Secret,
    pub credentials_file: PathBuf,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub require_tls: bool,
    pub tunnel_window_bytes: u64,
    pub request_timeout_ms: u64,
    pub node_timeout_secs: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            node_id: String::new(),
            subject_prefix: "elfin".into(),
            subject_key: Secret::default(),
            token: Secret::default(),
            user: String::new(),
            password: Secret::default(),
            nkey_seed: Secret::default(),
            credentials_file: PathBuf::new(),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            require_tls: false,
            tunnel_window_bytes: 1 << 20,
            request_timeout_ms: 1000,
            node_timeout_secs: 10,
        }
    }
}

/// The smallest cross-node credit window: a few of the largest messages.
const MIN_TUNNEL_WINDOW: u64 = 256 * 1024;

/// A secret setting: shown as `****` in `Debug` when set.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> Option<&str> {
        (!self.0.is_empty()).then_some(self.0.as_str())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"****\""
        })
    }
}

/// The shortest admin token accepted.
const MIN_TOKEN_LEN: usize = 16;

impl Settings {
    /// Reads defaults, then the file (required only if `explicit`), then the
    /// environment, and checks every value.
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<Self> {
        if explicit && !path.exists() {
            bail!("settings file {} does not exist", path.display());
        }
        let settings: Settings = config::Config::builder()
            .add_source(config::Config::try_from(&Settings::default())?)
            .add_source(config::File::from(path).required(false))
            .add_source(
                config::Environment::with_prefix("ELFIN")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| format!("invalid settings (file {})", path.display()))?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        self.time_zone()?;
        if StrftimeItems::new(&self.query.time_format).any(|i| matches!(i, Item::Error)) {
            bail!(
                "settings: query.time_format: {:?} is not a valid strftime pattern",
                self.query.time_format
            );
        }
        for (key, value) in [
            ("heartbeat.debounce_secs", self.heartbeat.debounce_secs),
            (
                "heartbeat.online_window_secs",
                self.heartbeat.online_window_secs,
            ),
            (
                "persistence.flush_interval_ms",
                self.persistence.flush_interval_ms,
            ),
            ("persistence.max_batch", self.persistence.max_batch as u64),
            (
                "server.read_buffer_bytes",
                self.server.read_buffer_bytes as u64,
            ),
            (
                "server.output_queue_chunks",
                self.server.output_queue_chunks as u64,
            ),
            ("server.tunnel_stall_secs", self.server.tunnel_stall_secs),
            ("server.header_hold_ms", self.server.header_hold_ms),
            ("server.backlog", u64::from(self.server.backlog)),
            ("limits.max_connections", self.limits.max_connections as u64),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip as u64,
            ),
            ("limits.identify_secs", self.limits.identify_secs),
            ("limits.idle_secs", self.limits.idle_secs),
            (
                "limits.output_queue_bytes",
                self.limits.output_queue_bytes as u64,
            ),
            (
                "limits.requests_per_sec",
                u64::from(self.limits.requests_per_sec),
            ),
            ("limits.request_burst", u64::from(self.limits.request_burst)),
            (
                "tls.handshake_timeout_secs",
                self.tls.handshake_timeout_secs,
            ),
        ] {
            if value == 0 {
                bail!("settings: {key}: must be greater than 0");
            }
        }
        let (cert, key) = (&self.tls.cert, &self.tls.key);
        if cert.as_os_str().is_empty() != key.as_os_str().is_empty() {
            bail!("settings: tls.cert and tls.key: set both, or neither");
        }
        if !self.tls.listen.is_empty() {
            if cert.as_os_str().is_empty() {
                bail!("settings: tls.listen needs tls.cert and tls.key");
            }
            self.tls
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| anyhow::anyhow!("settings: tls.listen: {:?}: {e}", self.tls.listen))?;
        }
        if self.auth.clients != Clients::Any && cert.as_os_str().is_empty() {
            bail!(
                "settings: auth.clients: {:?} needs tls.cert and tls.key",
                self.auth.clients
            );
        }
        if self.auth.clients == Clients::ClientCert && self.tls.client_ca.as_os_str().is_empty() {
            bail!("settings: auth.clients: \"client-cert\" needs tls.client_ca");
        }
        if self.log.level.parse::<log::LevelFilter>().is_err() {
            bail!(
                "settings: log.level: {:?} is not one of off, error, warn, info, debug, trace",
                self.log.level
            );
        }
        self.admin_addr()?;
        self.check_cluster()?;
        Ok(())
    }

    fn check_cluster(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if c.nats_url.trim().is_empty() {
            return Ok(());
        }
        if self.storage.backend != Backend::Mongodb {
            bail!(
                "settings: cluster.nats_url: cluster mode needs storage.backend = \"mongodb\" \
                 (every node shares its database)"
            );
        }
        if c.subject_prefix.is_empty()
            || !c
                .subject_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || c.subject_prefix.starts_with('.')
            || c.subject_prefix.ends_with('.')
        {
            bail!(
                "settings: cluster.subject_prefix: {:?}: use A-Z a-z 0-9 - _ and dots between \
                 words",
                c.subject_prefix
            );
        }
        if c.tunnel_window_bytes < MIN_TUNNEL_WINDOW {
            bail!("settings: cluster.tunnel_window_bytes: must be at least {MIN_TUNNEL_WINDOW}");
        }
        for (key, value) in [
            ("cluster.request_timeout_ms", c.request_timeout_ms),
            ("cluster.node_timeout_secs", c.node_timeout_secs),
        ] {
            if value == 0 {
                bail!("settings: {key}: must be greater than 0");
            }
        }
        if c.user.is_empty() != c.password.expose().is_none() {
            bail!("settings: cluster.user and cluster.password: set both, or neither");
        }
        if c.tls_cert.as_os_str().is_empty() != c.tls_key.as_os_str().is_empty() {
            bail!("settings: cluster.tls_cert and cluster.tls_key: set both, or neither");
        }
        Ok(())
    }

    /// How this node joins its cluster; `None` when it runs alone.
    pub fn cluster_config(&self) -> Option<elfin_actors::cluster::ClusterConfig> {
        let c = &self.cluster;
        if c.nats_url.trim().is_empty() {
            return None;
        }
        let path = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        let secret = |s: &Secret| s.expose().map(str::to_owned);
        let node = match c.node_id.as_str() {
            "" => gethostname::gethostname().to_string_lossy().into_owned(),
            id => id.to_owned(),
        };
        let stall = Duration::from_secs(self.server.tunnel_stall_secs);
        Some(elfin_actors::cluster::ClusterConfig {
            servers: c
                .nats_url
                .split(',')
                .map(|url| url.trim().to_owned())
                .filter(|url| !url.is_empty())
                .collect(),
            node,
            subjects: elfin_actors::cluster::wire::Subjects::new(
                &c.subject_prefix,
                c.subject_key.expose().unwrap_or_default(),
            ),
            auth: elfin_actors::cluster::NatsAuth {
                token: secret(&c.token),
                user: secret(&c.password).map(|password| (c.user.clone(), password)),
                nkey_seed: secret(&c.nkey_seed),
                credentials_file: path(&c.credentials_file),
                tls_ca: path(&c.tls_ca),
                tls_client: path(&c.tls_cert).zip(path(&c.tls_key)),
                require_tls: c.require_tls,
            },
            window: c.tunnel_window_bytes,
            request_timeout: Duration::from_millis(c.request_timeout_ms),
            // A silent node's tunnels end within the stall time, as a stalled one's.
            node_timeout: Duration::from_secs(c.node_timeout_secs).min(stall),
            stall,
            out_chunks: self.server.output_queue_chunks,
            out_bytes: self.limits.output_queue_bytes,
        })
    }

    /// The admin server's address, if it is on. Without a token it must be loopback;
    /// a token must be long and cookie-safe.
    pub fn admin_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        let a = &self.admin;
        if a.listen.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = a
            .listen
            .parse()
            .map_err(|e| anyhow::anyhow!("settings: admin.listen: {:?}: {e}", a.listen))?;
        match a.token.expose() {
            None if !addr.ip().is_loopback() => bail!(
                "settings: admin.listen: {addr} is not a loopback address; set admin.token \
                 to serve the admin pages there"
            ),
            Some(token)
                if token.len() < MIN_TOKEN_LEN
                    || !token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)) =>
            {
                bail!(
                    "settings: admin.token: use at least {MIN_TOKEN_LEN} characters of \
                     A-Z a-z 0-9 - . _ ~ + / = (e.g. the output of `openssl rand -hex 32`)"
                )
            }
            _ => Ok(Some(addr)),
        }
    }

    /// The TLS files, if TLS is on.
    pub fn tls_files(&self) -> Option<elfin_actors::tls::TlsFiles> {
        let t = &self.tls;
        if t.cert.as_os_str().is_empty() {
            return None;
        }
        Some(elfin_actors::tls::TlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: (!t.client_ca.as_os_str().is_empty()).then(|| t.client_ca.clone()),
            allow_tls12: t.min_version == TlsVersion::V12,
            handshake_timeout: Duration::from_secs(t.handshake_timeout_secs),
        })
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .listen
            .parse()
            .map_err(|e| anyhow::anyhow!("settings: server.listen: {:?}: {e}", self.server.listen))
    }

    pub fn time_zone(&self) -> anyhow::Result<Tz> {
        self.query.time_zone.parse().map_err(|_| {
            anyhow::anyhow!(
                "settings: query.time_zone: {:?} is not an IANA time zone name",
                self.query.time_zone
            )
        })
    }

    /// The database the settings name.
    pub fn store_backend(&self) -> StoreBackend {
        match self.storage.backend {
            Backend::Embedded => StoreBackend::Embedded {
                path: self.storage.path.clone(),
            },
            Backend::Mongodb => StoreBackend::Mongodb {
                uri: self.mongodb.uri.expose().to_owned(),
                database: self.mongodb.database.clone(),
                connect_timeout: Duration::from_millis(self.mongodb.connect_timeout_ms),
                server_selection_timeout: Duration::from_millis(
                    self.mongodb.server_selection_timeout_ms,
                ),
            },
        }
    }

    /// What the gateway library needs.
    pub fn gateway_config(&self) -> anyhow::Result<Config> {
        let workers = match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let l = &self.limits;
        Ok(Config {
            require_known_user: self.auth.require_known_user,
            verbose_reasons: self.auth.verbose_reasons,
            clients: elfin_actors::tls::ClientPolicy {
                clients: match self.auth.clients {
                    Clients::Any => elfin_actors::tls::Clients::Any,
                    Clients::Tls => elfin_actors::tls::Clients::Tls,
                    Clients::ClientCert => elfin_actors::tls::Clients::ClientCert,
                },
                trusted_networks: self.auth.trusted_networks.clone(),
            },
            tls: None,
            limits: elfin_actors::Limits {
                max_connections: l.max_connections,
                max_connections_per_ip: l.max_connections_per_ip,
                identify: Duration::from_secs(l.identify_secs),
                idle: Duration::from_secs(l.idle_secs),
                output_queue_bytes: l.output_queue_bytes,
                requests_per_sec: f64::from(l.requests_per_sec),
                request_burst: f64::from(l.request_burst),
                failed_lookups_per_min: l.failed_lookups_per_min,
                failed_lookup_delay: Duration::from_millis(l.failed_lookup_delay_ms),
                ..elfin_actors::Limits::default()
            },
            query: QueryFormat {
                time_zone: self.time_zone()?,
                time_format: self.query.time_format.clone(),
                online_window: Duration::from_secs(self.heartbeat.online_window_secs),
            },
            debounce: Duration::from_secs(self.heartbeat.debounce_secs),
            flush_interval: Duration::from_millis(self.persistence.flush_interval_ms),
            max_batch: self.persistence.max_batch,
            shutdown_timeout: Duration::from_secs(self.persistence.shutdown_timeout_secs),
            out_queue: self.server.output_queue_chunks,
            read_buffer: self.server.read_buffer_bytes,
            stall_timeout: Duration::from_secs(self.server.tunnel_stall_secs),
            header_hold: Duration::from_millis(self.server.header_hold_ms),
            keepalive: Duration::from_secs(self.server.keepalive_secs),
            workers: Workers::Threads(workers),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checking `settings` fails with a message naming `key`.
    fn assert_names(key: &str, settings: &Settings) {
        let err = settings.check().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }

    #[test]
    fn defaults_match_the_protocol() {
        let s = Settings::default();
        assert_eq!(s.server.listen, "0.0.0.0:3001");
        assert_eq!(s.heartbeat.debounce_secs, 30);
        assert_eq!(s.heartbeat.online_window_secs, 60);
        assert_eq!(s.query.time_zone, "Europe/Budapest");
        assert_eq!(s.query.time_format, "%Y. %m. %d. %H:%M:%S");
        assert!(s.auth.require_known_user);
        s.check().unwrap();
    }

    #[test]
    fn the_shipped_settings_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("settings.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let shipped: toml::Table = text.parse().unwrap();
        let defaults: toml::Table = toml::to_string(&Settings::default())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(shipped, defaults);
    }

    #[test]
    fn a_password_in_the_mongodb_uri_never_prints() {
        let mut s = Settings::default();
        s.mongodb.uri = SecretUri::from("mongodb://gw:hunter2@db.example:27017/?tls=true");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("mongodb://gw:****@db.example:27017/?tls=true"),
            "{shown}"
        );
        assert_eq!(
            format!("{:?}", SecretUri::from("mongodb://localhost")),
            "\"mongodb://localhost\""
        );
    }

    #[test]
    fn cluster_settings_become_the_cluster_config() {
        let mut s = Settings::default();
        assert!(s.cluster_config().is_none(), "alone by default");
        s.storage.backend = Backend::Mongodb;
        s.cluster.nats_url = "nats://n1:4222, nats://n2:4222".into();
        s.cluster.node_id = "eu-1".into();
        s.cluster.user = "gw".into();
        s.cluster.password = Secret("hunter2".into());
        s.server.tunnel_stall_secs = 5;
        s.check().unwrap();
        let c = s.cluster_config().unwrap();
        assert_eq!(c.servers, ["nats://n1:4222", "nats://n2:4222"]);
        assert_eq!(c.node, "eu-1");
        assert_eq!(
            c.node_timeout,
            Duration::from_secs(5),
            "at most the stall time"
        );
        assert_eq!(c.auth.user, Some(("gw".into(), "hunter2".into())));
        assert!(!format!("{s:?}").contains("hunter2"));
        s.cluster.node_id = String::new();
        assert!(
            !s.cluster_config().unwrap().node.is_empty(),
            "the host name"
        );
        s.cluster.password = Secret::default();
        assert_names("cluster.user", &s);
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut s = Settings::default();
        s.query.time_zone = "Mars/Olympus".into();
        assert_names("query.time_zone", &s);
        let mut s = Settings::default();
        s.query.time_format = "%Y %Q".into();
        assert_names("query.time_format", &s);
        let mut s = Settings::default();
        s.server.listen = "nowhere".into();
        assert_names("server.listen", &s);
        let mut s = Settings::default();
        s.limits.identify_secs = 0;
        assert_names("limits.identify_secs", &s);
        let mut s = Settings::default();
        s.cluster.nats_url = "nats://127.0.0.1:4222".into();
        assert_names("storage.backend = \"mongodb\"", &s);
        s.storage.backend = Backend::Mongodb;
        s.check().unwrap();
        s.cluster.subject_prefix = "elfin.>".into();
        assert_names("cluster.subject_prefix", &s);
        let mut s = Settings::default();
        s.persistence.max_batch = 0;
        assert_names("persistence.max_batch", &s);
    }
}
