//! Operator settings: `settings.toml`, each key overridable by an environment variable
//! `ELFIN__SECTION__KEY`.
//!
//! Every section is a type that parses its keys into what they mean (most live in the
//! library, beside what they configure; `[log]` and `[admin]` are the binary's own), so
//! loading either yields settings the gateway can run on or an error naming the key,
//! the bad value and where it came from: the file's line, or the environment variable.
//! What is left to [`Settings::check`] are the rules between keys.
//!
//! Environment values are read by the key's type: a string key keeps the text as it
//! is (an all-digit token stays a string), a number, boolean or enum key parses it,
//! and a list key takes `a,b` or a TOML array `["a", "b"]`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde::{Deserialize, Serialize};

use elfin_actors::audit::AuditSettings;
use elfin_actors::cluster::ClusterSettings;
use elfin_actors::config::{Auth, Heartbeat, PersistenceSettings, Secret, Server};
use elfin_actors::de;
use elfin_actors::events::webhook::{Endpoint, WebhookSettings};
use elfin_actors::events::EventsSettings;
use elfin_actors::query::QueryFormat;
use elfin_actors::store::{Backend, Mongodb, Storage};
use elfin_actors::tls::{Clients, TlsSettings};
use elfin_actors::{Config, Limits};

use crate::logging::Log;

/// The prefix of environment overrides; sections and keys follow, `__`-separated.
const ENV_PREFIX: &str = "ELFIN__";

/// Keys whose values an error never shows.
const SECRET_KEYS: &[&str] = &[
    "admin.token",
    "cluster.nkey_seed",
    "cluster.password",
    "cluster.secret",
    "cluster.subject_key",
    "cluster.token",
    "mongodb.uri",
    // A list of webhooks, written whole in one variable, holds their secrets.
    "webhooks",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: Server,
    pub storage: Storage,
    pub mongodb: Mongodb,
    pub heartbeat: Heartbeat,
    pub persistence: PersistenceSettings,
    pub query: QueryFormat,
    pub auth: Auth,
    pub tls: TlsSettings,
    pub limits: Limits,
    pub log: Log,
    pub admin: Admin,
    pub audit: AuditSettings,
    pub cluster: ClusterSettings,
    pub events: EventsSettings,
    /// `[[webhooks]]`: where fleet events are sent.
    #[serde(with = "de::tables")]
    pub webhooks: Vec<WebhookSettings>,
}

/// The `[admin]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin HTTP server; none = off.
    #[serde(with = "de::optional")]
    pub listen: Option<SocketAddr>,
    /// Required on every request when set; without it, `listen` must be loopback.
    #[serde(with = "de::optional")]
    pub token: Option<AdminToken>,
    /// `Host:` names answered besides loopback addresses and `localhost`.
    #[serde(with = "de::list")]
    pub allowed_hosts: Vec<String>,
    /// Reverse proxies (terminating HTTPS) whose `Forwarded` or `X-Forwarded-For`
    /// names the source (read from the right, past these).
    #[serde(with = "de::list")]
    pub trusted_proxies: Vec<IpAddr>,
    /// How long a login lasts.
    #[serde(rename = "session_secs", with = "de::positive_secs")]
    pub session: Duration,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9100))),
            token: None,
            allowed_hosts: Vec::new(),
            trusted_proxies: Vec::new(),
            session: Duration::from_secs(12 * 3600),
        }
    }
}

impl Admin {
    /// The admin server's access rules; IPv6 sources grouped by `ipv6_prefix`.
    pub fn rules(&self, ipv6_prefix: elfin_actors::source::Ipv6Prefix) -> crate::admin::Rules {
        crate::admin::Rules {
            token: self.token.as_ref().map(|t| t.expose().to_owned()),
            allowed_hosts: self.allowed_hosts.clone(),
            trusted_proxies: self.trusted_proxies.clone(),
            session: self.session,
            ipv6_prefix,
        }
    }
}

/// An admin token: long, and safe in a cookie.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AdminToken(Secret);

/// The least entropy an admin token must have, in bits (as [`token_bits`] estimates).
const MIN_TOKEN_BITS: f64 = 128.0;

impl std::str::FromStr for AdminToken {
    type Err = String;
    fn from_str(token: &str) -> Result<Self, String> {
        let safe = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
        let how = "make one with `openssl rand -hex 32`";
        if !token.bytes().all(safe) {
            return Err(format!(
                "use only the characters A-Z a-z 0-9 - . _ ~ + / = ({how})"
            ));
        }
        let bits = token_bits(token);
        if bits < MIN_TOKEN_BITS {
            return Err(format!(
                "too easy to guess: about {bits:.0} bits where at least {MIN_TOKEN_BITS:.0} \
                 are needed ({how})"
            ));
        }
        Ok(AdminToken(token.parse().unwrap_or_else(|e| match e {})))
    }
}

/// A conservative estimate of a token's entropy, as if it were drawn at random: its
/// length times the bits of one character of the smallest alphabet that holds it
/// (hex digits 4, lower-case letters and digits 5.2, base64 6), where a token made
/// of a shorter string repeated counts only that string, and one of fewer than
/// 8 different characters counts only the bits of that many.
fn token_bits(token: &str) -> f64 {
    let bytes = token.as_bytes();
    let has = |f: fn(&u8) -> bool| bytes.iter().any(f);
    let hex = bytes.iter().all(u8::is_ascii_hexdigit)
        && !(has(u8::is_ascii_lowercase) && has(u8::is_ascii_uppercase));
    let alphabet = if hex {
        16
    } else {
        [
            (has(u8::is_ascii_digit), 10),
            (has(u8::is_ascii_lowercase), 26),
            (has(u8::is_ascii_uppercase), 26),
            (has(|b| !b.is_ascii_alphanumeric()), 7),
        ]
        .iter()
        .filter(|(used, _)| *used)
        .map(|(_, size)| size)
        .sum()
    };
    let mut distinct = bytes.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let alphabet = if distinct.len() < 8 {
        distinct.len()
    } else {
        alphabet
    };
    // The shortest string the token repeats ("abcabc" -> 3).
    let period = (1..=bytes.len())
        .find(|&p| (p..bytes.len()).all(|i| bytes[i] == bytes[i - p]))
        .unwrap_or(bytes.len());
    period as f64 * (alphabet.max(1) as f64).log2()
}

impl AdminToken {
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Settings {
    /// Reads the file at `path` (required only if `explicit`), then the process's
    /// `ELFIN__…` variables.
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<Self> {
        Self::load_from(path, explicit, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given.
    pub fn load_from(
        path: &Path,
        explicit: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => bail!("settings file {}: {e}", path.display()),
        };
        // The file alone first, so that its errors point at their line.
        toml::from_str::<Settings>(&text)
            .map_err(|e| anyhow!("settings file {}: {e}", path.display()))?;
        let env = Overrides::new(env)?;
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(env.vars.clone().into_iter().collect())),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| env.explain(e))?;
        settings
            .check()
            .map_err(|(key, reason)| env.error(key, reason))?;
        Ok(settings)
    }

    /// The rules between keys; an error names the first key it is about.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let server = &self.server;
        if let Err(e) = self.endpoints() {
            return Err(("webhooks", e.to_string()));
        }
        if server.header_hold_min > server.header_hold {
            return Err((
                "server.header_hold_min_ms",
                format!(
                    "{} ms is more than server.header_hold_ms ({} ms)",
                    server.header_hold_min.as_millis(),
                    server.header_hold.as_millis()
                ),
            ));
        }
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return Err((
                "tls.cert",
                "set tls.cert and tls.key both, or neither".into(),
            ));
        }
        if tls.listen.is_some() && tls.cert.is_none() {
            return Err(("tls.listen", "needs tls.cert and tls.key".into()));
        }
        let clients = self.auth.clients.setting();
        if self.auth.clients != Clients::Any && tls.cert.is_none() {
            return Err((
                "auth.clients",
                format!(
                    "= \"{clients}\" needs TLS: set tls.cert and tls.key (the server's \
                     certificate chain and private key, PEM), or set auth.clients = \"any\""
                ),
            ));
        }
        let certificates = matches!(self.auth.clients, Clients::ClientCert | Clients::UserCert);
        if certificates && tls.client_ca.is_none() {
            return Err((
                "auth.clients",
                format!(
                    "= \"{clients}\" needs tls.client_ca: the CA certificate (PEM) that signs \
                     the clients' certificates (README, \"Client certificates\")"
                ),
            ));
        }
        if let Some(addr) = self.admin.listen {
            if self.admin.token.is_none() && !addr.ip().is_loopback() {
                return Err((
                    "admin.listen",
                    format!(
                        "{addr} is not a loopback address; set admin.token to serve the \
                         admin pages there"
                    ),
                ));
            }
        }
        let c = &self.cluster;
        if c.nats_url.is_empty() {
            return Ok(());
        }
        if self.storage.backend != Backend::Mongodb {
            return Err((
                "cluster.nats_url",
                "cluster mode needs storage.backend = \"mongodb\" (every node shares its \
                 database)"
                    .into(),
            ));
        }
        if c.user.is_some() != c.password.is_some() {
            return Err((
                "cluster.user",
                "set cluster.user and cluster.password both, or neither".into(),
            ));
        }
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return Err((
                "cluster.tls_cert",
                "set cluster.tls_cert and cluster.tls_key both, or neither".into(),
            ));
        }
        c.config(&self.server, &self.limits)
            .map(drop)
            .map_err(|e| (e.key, e.reason))
    }

    /// What is allowed but probably not meant, for the log at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let both_secrets = self.cluster.secret.is_some() && self.cluster.secret_file.is_some();
        let secrets = both_secrets.then(|| {
            "cluster.secret and cluster.secret_file are both set: the file's secret is used"
                .to_owned()
        });
        let networks = self
            .auth
            .trusted_networks
            .iter()
            .filter(|net| match net {
                ipnet::IpNet::V4(v4) => v4.prefix_len() < 16,
                ipnet::IpNet::V6(v6) => v6.prefix_len() < 48,
            })
            .map(|net| {
                format!(
                    "auth.trusted_networks: {net} is wider than a /16 (IPv6: /48): every \
                     address in it may send connme, connthem and query without what \
                     auth.clients = {:?} asks",
                    self.auth.clients
                )
            });
        secrets.into_iter().chain(networks).collect()
    }

    /// What the gateway library runs on (without TLS, which the caller loads).
    pub fn gateway_config(&self) -> Config {
        Config {
            server: self.server.clone(),
            heartbeat: self.heartbeat.clone(),
            persistence: self.persistence.clone(),
            query: self.query.clone(),
            auth: self.auth.clone(),
            limits: self.limits.clone(),
            audit: self.audit.clone(),
            node: self.cluster.node_id.clone(),
            tls: None,
        }
    }

    /// What fleet events run on: `[events]` and the `[[webhooks]]` endpoints (checked
    /// when the settings were loaded; an error here is a secret file gone since).
    pub fn fleet_events(&self) -> anyhow::Result<elfin_actors::events::FleetEvents> {
        Ok(elfin_actors::events::FleetEvents {
            settings: self.events.clone(),
            endpoints: self.endpoints()?,
        })
    }

    /// The `[[webhooks]]` endpoints, each checked: its URL, its secret (read from
    /// `secret_file`), its filters, and its CA.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, elfin_actors::events::webhook::EndpointError> {
        self.webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| Endpoint::new(w, i, &self.events.allow_http_hosts))
            .collect()
    }

    /// How this node joins its cluster; `None` when it runs alone. (The settings
    /// were checked when loaded; an error here is a secret file gone since.)
    pub fn cluster_config(&self) -> anyhow::Result<Option<elfin_actors::cluster::ClusterConfig>> {
        self.cluster
            .config(&self.server, &self.limits)
            .map_err(|e| anyhow!("{e}"))
    }

    /// Every key a settings file may hold, as `section.key`.
    fn keys() -> BTreeSet<String> {
        let defaults = toml::Table::try_from(Settings::default()).expect("defaults serialize");
        defaults
            .iter()
            .flat_map(|(section, keys)| match keys.as_table() {
                Some(keys) => keys.keys().map(|key| format!("{section}.{key}")).collect(),
                // A list of tables (`[[webhooks]]`): set whole.
                None => vec![section.clone()],
            })
            .collect()
    }
}

/// The `ELFIN__…` variables, by the key they set (`admin.token`).
struct Overrides {
    vars: BTreeMap<String, String>,
}

impl Overrides {
    /// Takes the variables that start with the prefix; one that names no setting is an
    /// error, so a typo never passes silently.
    fn new(env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let keys = Settings::keys();
        let mut vars = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replacen("__", ".", 1);
            if !keys.contains(&key) {
                bail!("settings: environment variable {name}: there is no setting {key}");
            }
            vars.insert(name, value);
        }
        Ok(Self { vars })
    }

    /// The error about `key`, saying which environment variable set it, if one did.
    /// A secret's value is not shown. A reason about the key's value starts with
    /// `= value`, and reads on from the key as the operator wrote it
    /// (`auth.clients = "user-cert" needs ...`).
    fn error(&self, key: &str, reason: String) -> anyhow::Error {
        let name = format!(
            "{ENV_PREFIX}{}",
            key.replace('.', "__").to_ascii_uppercase()
        );
        let lead = match reason.starts_with("= ") {
            true => format!("{key} "),
            false => format!("{key}: "),
        };
        match self.vars.get(&name) {
            Some(value) if SECRET_KEYS.contains(&key) => {
                let reason = reason.replace(value.as_str(), "****");
                anyhow!("settings: {lead}{reason} (environment variable {name})")
            }
            Some(value) => {
                anyhow!("settings: {lead}{reason} (environment variable {name}={value:?})")
            }
            None => anyhow!("settings: {lead}{reason}"),
        }
    }

    /// The error of the file and the environment together: the file alone was fine,
    /// so an environment variable is the cause.
    fn explain(&self, e: config::ConfigError) -> anyhow::Error {
        use config::ConfigError::{At, Type};
        let (key, reason) = match &e {
            Type {
                key: Some(key),
                unexpected,
                expected,
                ..
            } => (key.as_str(), format!("{unexpected} is not {expected}")),
            At {
                key: Some(key),
                error,
                ..
            } => (key.as_str(), error.to_string()),
            _ => return anyhow!("settings: {e}"),
        };
        self.error(key, reason)
    }
}

#[cfg(test)]
mod tests;
