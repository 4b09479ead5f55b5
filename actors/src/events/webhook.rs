//! One webhook endpoint: its `[[webhooks]]` entry, its bounded queue and the task
//! that delivers it.
//!
//! Delivery never blocks a tunnel or a heartbeat: events are handed over with a
//! non-blocking send to the endpoint's queue (`queue` events at most; past that they
//! are dropped, counted and logged once). The task delivers one event at a time, in
//! the order they were queued, so each device's events arrive in order; a failed
//! attempt (no connection, a timeout, any status but 2xx) is retried with
//! exponential backoff and jitter (1 s doubling up to 5 min) for up to
//! `retry_for_secs` after the event, then dropped. Each attempt is signed anew
//! ([`super::signature`]) with its own timestamp, so a receiver that checks
//! timestamps takes late deliveries; `webhook-id` stays the event's.
//!
//! Plain `http` reaches only loopback and `events.allow_http_hosts`; `https` verifies
//! the receiver's certificate against the system's roots or the entry's `ca_file`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use awc::http::Uri;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::signature::SigningKey;
use super::{Event, EventKind};
use crate::config::Secret;
use crate::de;
use crate::metric;

/// A `[[webhooks]]` entry, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// The endpoint's name in metrics, logs and the status page; default: the URL's
    /// host and port (never its path or query, which may hold a token).
    #[serde(with = "de::optional")]
    pub name: Option<String>,
    /// `whsec_…` (Standard Webhooks), or `secret_file` naming a file that holds it.
    #[serde(with = "de::optional")]
    pub secret: Option<Secret>,
    #[serde(with = "de::optional")]
    pub secret_file: Option<PathBuf>,
    /// Event types sent (`device.offline`, `device.*`, ...); none = all.
    #[serde(with = "de::list")]
    pub events: Vec<String>,
    /// Users (names or uuids) whose events are sent; none = all.
    #[serde(with = "de::list")]
    pub users: Vec<String>,
    #[serde(rename = "timeout_secs", with = "de::positive_secs")]
    pub timeout: Duration,
    #[serde(rename = "retry_for_secs", with = "de::positive_secs")]
    pub retry_for: Duration,
    /// Events waiting at most.
    pub queue: std::num::NonZeroUsize,
    /// CA certificates (PEM) for an `https` receiver; none = the system's.
    #[serde(with = "de::optional")]
    pub ca_file: Option<PathBuf>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            name: None,
            secret: None,
            secret_file: None,
            events: Vec::new(),
            users: Vec::new(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(3600),
            queue: std::num::NonZeroUsize::new(20_000).unwrap(),
            ca_file: None,
        }
    }
}

/// A `[[webhooks]]` entry the gateway can deliver to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    url: Uri,
    key: SigningKey,
    /// Types sent; none = all.
    kinds: Option<HashSet<EventKind>>,
    users: Vec<String>,
    timeout: Duration,
    retry_for: Duration,
    capacity: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A wrong `[[webhooks]]` entry: the key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {why}")]
pub struct EndpointError {
    pub key: String,
    pub why: String,
}

impl Endpoint {
    /// Entry `index` of `[[webhooks]]`, with the hosts plain `http` may reach.
    pub fn new(
        settings: &WebhookSettings,
        index: usize,
        allow_http: &[String],
    ) -> Result<Endpoint, EndpointError> {
        let error = |key: &str, why: String| EndpointError {
            key: format!("webhooks[{index}].{key}"),
            why,
        };
        let url: Uri = settings
            .url
            .parse()
            .map_err(|e| error("url", format!("{:?}: {e}", settings.url)))?;
        let host = url
            .host()
            .ok_or_else(|| error("url", format!("{:?} names no host", settings.url)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match url.scheme_str() {
            Some("https") => Some(client_tls(settings.ca_file.as_ref()).map_err(|why| {
                let key = if settings.ca_file.is_some() {
                    "ca_file"
                } else {
                    "url"
                };
                error(key, why)
            })?),
            Some("http") if plain_http_allowed(&host, allow_http) => None,
            Some("http") => {
                return Err(error(
                    "url",
                    format!(
                        "{host} is reached over plain http, which only loopback and \
                         events.allow_http_hosts may be: use https"
                    ),
                ))
            }
            _ => {
                return Err(error(
                    "url",
                    format!("{:?} is no http(s) URL", settings.url),
                ))
            }
        };
        let secret = match (&settings.secret_file, &settings.secret) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| error("secret_file", format!("{}: {e}", path.display())))?,
            (None, Some(secret)) => secret.expose().to_owned(),
            (None, None) => {
                return Err(error(
                    "secret",
                    "each webhook needs a secret (whsec_…): make one with `elfin-gateway \
                     events secret`"
                        .into(),
                ))
            }
        };
        let key = SigningKey::parse(&secret).map_err(|e| {
            let key = if settings.secret_file.is_some() {
                "secret_file"
            } else {
                "secret"
            };
            error(key, e.to_string())
        })?;
        let kinds = if settings.events.is_empty() {
            None
        } else {
            let mut kinds = HashSet::new();
            for pattern in &settings.events {
                let matched: Vec<EventKind> = EventKind::ALL
                    .into_iter()
                    .filter(|k| matches_pattern(pattern, k.name()))
                    .collect();
                if matched.is_empty() {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
                    return Err(error(
                        "events",
                        format!("{pattern:?} is no event type (known: {})", known.join(", ")),
                    ));
                }
                kinds.extend(matched);
            }
            Some(kinds)
        };
        let port = url.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
        Ok(Endpoint {
            name: settings.name.clone().unwrap_or(format!("{host}{port}")),
            url,
            key,
            kinds,
            users: settings.users.clone(),
            timeout: settings.timeout,
            retry_for: settings.retry_for,
            capacity: settings.queue.get(),
            tls,
        })
    }

    /// Whether this endpoint takes `event` (its type, and its user's name or uuid).
    pub fn takes(&self, event: &Event, uuid: Option<&str>) -> bool {
        let kind = self.kinds.as_ref().is_none_or(|k| k.contains(&event.kind));
        let user = self.users.is_empty()
            || self.users.iter().any(|u| {
                Some(u.as_str()) == uuid
                    || event.data.user.as_ref().and_then(|x| x.name.as_deref()) == Some(u)
            });
        kind && user
    }

    /// An HTTP client for this endpoint: its timeout, its TLS, no redirects (a
    /// receiver's redirect would send the signed body elsewhere).
    fn client(&self) -> awc::Client {
        let mut connector = awc::Connector::new().timeout(self.timeout);
        if let Some(tls) = &self.tls {
            connector = connector.rustls_0_23(tls.clone());
        }
        awc::Client::builder()
            .connector(connector)
            .timeout(self.timeout)
            .disable_redirects()
            .finish()
    }

    /// The URL without its query, for the status page.
    pub fn shown_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.url.scheme_str().unwrap_or("http"),
            self.url.authority().map_or("", |a| a.as_str()),
            self.url.path()
        )
    }
}

/// `device.*` matches every device event; otherwise the exact type.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn plain_http_allowed(host: &str, allow: &[String]) -> bool {
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback || allow.iter().any(|a| a.eq_ignore_ascii_case(host))
}

/// rustls for `https` receivers: the roots of `ca_file`, or the system's.
fn client_tls(ca_file: Option<&PathBuf>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let certs = rustls_native_certs::load_native_certs()
                .map_err(|e| format!("cannot read the system's CA certificates: {e}"))?;
            roots.add_parsable_certificates(certs);
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to verify the receiver with".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An event as an endpoint delivers it: id, body, and when it happened.
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    pub body: Bytes,
    pub at: Instant,
}

impl Prepared {
    pub fn of(event: &Event) -> Arc<Prepared> {
        Arc::new(Prepared {
            id: event.id.clone(),
            body: event.body().into(),
            at: Instant::now(),
        })
    }
}

/// What the status page shows of an endpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointState {
    pub name: String,
    pub url: String,
    pub delivered: u64,
    /// Failed attempts (each retried, until the event's retry time is over).
    pub failures: u64,
    pub dropped: u64,
    pub queued: usize,
    /// An event is being delivered (or waits for its next attempt).
    #[serde(skip)]
    pub in_flight: bool,
    pub last_delivery: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// The handle events are queued through.
#[derive(Clone)]
pub struct Queue {
    endpoint: Arc<Endpoint>,
    tx: mpsc::Sender<Arc<Prepared>>,
    state: Arc<Mutex<EndpointState>>,
}

impl Queue {
    /// Starts the endpoint's delivery task on the current arbiter.
    pub fn start(endpoint: Endpoint) -> Queue {
        let (tx, rx) = mpsc::channel(endpoint.capacity);
        let state = Arc::new(Mutex::new(EndpointState {
            name: endpoint.name.clone(),
            url: endpoint.shown_url(),
            ..EndpointState::default()
        }));
        let endpoint = Arc::new(endpoint);
        actix_rt::spawn(deliver_all(endpoint.clone(), rx, state.clone()));
        Queue {
            endpoint,
            tx,
            state,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Queues `event` without waiting; a full queue drops it (counted, logged once
    /// until a delivery succeeds again).
    pub fn push(&self, event: Arc<Prepared>) {
        let name = self.endpoint.name.clone();
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(_) => {
                metrics::counter!(metric::WEBHOOK_DROPPED_TOTAL, "endpoint" => name.clone(), "reason" => "queue_full")
                    .increment(1);
                let mut state = self.lock();
                state.dropped += 1;
                if state.dropped == 1 || state.last_error.as_deref() != Some(QUEUE_FULL) {
                    log::warn!(
                        "webhook {name}: {} events wait already; dropping new ones until \
                         it takes deliveries again",
                        self.endpoint.capacity
                    );
                    state.last_error = Some(QUEUE_FULL.into());
                }
            }
        }
        self.report_depth();
    }

    fn report_depth(&self) {
        metrics::gauge!(metric::WEBHOOK_QUEUE_DEPTH, "endpoint" => self.endpoint.name.clone())
            .set(self.queued() as f64);
    }

    /// Events waiting in the queue (not the one being delivered).
    fn queued(&self) -> usize {
        self.endpoint.capacity - self.tx.capacity()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> EndpointState {
        EndpointState {
            queued: self.queued(),
            ..self.lock().clone()
        }
    }

    /// Events not delivered yet: queued, and the one being delivered.
    pub fn waiting(&self) -> usize {
        self.queued() + usize::from(self.lock().in_flight)
    }
}

const QUEUE_FULL: &str = "queue full: new events dropped";

/// The first retry's wait, and the longest.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(300);

/// How long to wait before retry `attempt` (1, 2, ...): doubling from a second up to
/// five minutes, each wait drawn between half and all of it (jitter, so endpoints
/// coming back are not hit by every gateway at once).
pub fn backoff(attempt: u32) -> Duration {
    let full = FIRST_RETRY
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(LONGEST_RETRY);
    let mut byte = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let fraction = f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
    full.mul_f64(0.5 + 0.5 * fraction)
}

async fn deliver_all(
    endpoint: Arc<Endpoint>,
    mut rx: mpsc::Receiver<Arc<Prepared>>,
    state: Arc<Mutex<EndpointState>>,
) {
    let client = endpoint.client();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let name = endpoint.name.clone();
    let mut failing = false;
    while let Some(event) = rx.recv().await {
        lock().in_flight = true;
        metrics::gauge!(metric::WEBHOOK_QUEUE_DEPTH, "endpoint" => name.clone())
            .set(rx.len() as f64);
        let mut attempt = 0;
        loop {
            match attempt_delivery(&client, &endpoint, &event).await {
                Ok(()) => {
                    metrics::counter!(metric::WEBHOOK_DELIVERED_TOTAL, "endpoint" => name.clone())
                        .increment(1);
                    metrics::histogram!(metric::WEBHOOK_DELIVERY_SECONDS, "endpoint" => name.clone())
                        .record(event.at.elapsed().as_secs_f64());
                    let mut state = lock();
                    state.delivered += 1;
                    state.last_delivery = Some(Utc::now());
                    if failing {
                        failing = false;
                        log::info!("webhook {name}: delivering again");
                        state.last_error = None;
                    }
                    break;
                }
                Err(why) => {
                    attempt += 1;
                    let wait = backoff(attempt);
                    {
                        let mut state = lock();
                        state.failures += 1;
                        state.last_failure = Some(Utc::now());
                        state.last_error = Some(why.clone());
                    }
                    if event.at.elapsed() + wait > endpoint.retry_for {
                        metrics::counter!(metric::WEBHOOK_DROPPED_TOTAL, "endpoint" => name.clone(), "reason" => "expired")
                            .increment(1);
                        lock().dropped += 1;
                        log::warn!(
                            "webhook {name}: event {} dropped after {attempt} attempts over \
                             {:?} (retry_for_secs): {why}",
                            event.id,
                            endpoint.retry_for
                        );
                        break;
                    }
                    if !failing {
                        failing = true;
                        log::warn!(
                            "webhook {name}: delivery failed ({why}); retrying with backoff \
                             for up to {:?} per event",
                            endpoint.retry_for
                        );
                    }
                    metrics::counter!(metric::WEBHOOK_RETRIES_TOTAL, "endpoint" => name.clone())
                        .increment(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
        lock().in_flight = false;
    }
}

/// One signed attempt; `Err` says why it failed.
async fn attempt_delivery(
    client: &awc::Client,
    endpoint: &Endpoint,
    event: &Prepared,
) -> Result<(), String> {
    let timestamp = Utc::now().timestamp();
    let signature = endpoint.key.sign(&event.id, timestamp, &event.body);
    let sent = client
        .post(endpoint.url.clone())
        .insert_header(("content-type", "application/json"))
        .insert_header(("webhook-id", event.id.as_str()))
        .insert_header(("webhook-timestamp", timestamp.to_string()))
        .insert_header(("webhook-signature", signature))
        .insert_header((
            "user-agent",
            concat!("elfin-gateway/", env!("CARGO_PKG_VERSION")),
        ))
        .send_body(event.body.clone())
        .await;
    let mut response = sent.map_err(|e| e.to_string())?;
    // Read (and drop) the answer, so the connection is kept for the next event.
    let _ = response.body().limit(64 * 1024).await;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

/// Sends one signed event to `endpoint` now, once: `elfin-gateway events test`.
pub async fn send_once(endpoint: &Endpoint, event: &Event) -> Result<(), String> {
    attempt_delivery(&endpoint.client(), endpoint, &Prepared::of(event)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> WebhookSettings {
        WebhookSettings {
            url: url.into(),
            secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap()),
            ..WebhookSettings::default()
        }
    }

    #[test]
    fn plain_http_reaches_only_loopback_and_the_hosts_allowed() {
        assert!(Endpoint::new(&settings("http://127.0.0.1:8080/hook"), 0, &[]).is_ok());
        assert!(Endpoint::new(&settings("http://[::1]:8080/hook"), 0, &[]).is_ok());
        assert!(Endpoint::new(&settings("http://localhost/hook"), 0, &[]).is_ok());
        let far = Endpoint::new(&settings("http://10.0.0.5/hook"), 2, &[]).unwrap_err();
        assert_eq!(far.key, "webhooks[2].url");
        assert!(far.why.contains("use https"), "{far}");
        assert!(Endpoint::new(&settings("http://10.0.0.5/hook"), 0, &["10.0.0.5".into()]).is_ok());
        assert!(Endpoint::new(&settings("ftp://x/"), 0, &[]).is_err());
    }

    #[test]
    fn an_entry_needs_a_standard_webhooks_secret() {
        let mut s = settings("http://127.0.0.1/");
        s.secret = None;
        assert_eq!(
            Endpoint::new(&s, 0, &[]).unwrap_err().key,
            "webhooks[0].secret"
        );
        s.secret = Some("hunter2".parse().unwrap());
        assert!(Endpoint::new(&s, 0, &[])
            .unwrap_err()
            .why
            .contains("whsec_"));
    }

    #[test]
    fn a_secret_file_is_read_with_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let mut s = settings("http://127.0.0.1/");
        s.secret = None;
        s.secret_file = Some(path.clone());
        assert!(Endpoint::new(&s, 0, &[]).is_ok());
        s.secret_file = Some(dir.path().join("missing"));
        assert_eq!(
            Endpoint::new(&s, 0, &[]).unwrap_err().key,
            "webhooks[0].secret_file"
        );
    }

    #[test]
    fn filters_take_types_patterns_and_users() {
        let mut s = settings("http://127.0.0.1:9/x?token=secret");
        s.events = vec!["device.offline".into(), "client.*".into()];
        s.users = vec!["alice".into()];
        let endpoint = Endpoint::new(&s, 0, &[]).unwrap();
        assert_eq!(endpoint.name, "127.0.0.1:9");
        assert_eq!(endpoint.shown_url(), "http://127.0.0.1:9/x");
        let event = |kind, name: Option<&str>| {
            Event::new(
                kind,
                super::super::EventData {
                    user: Some(super::super::EventUser {
                        name: name.map(str::to_owned),
                        uuid_prefix: Some("u-alice…".into()),
                    }),
                    ..Default::default()
                },
            )
        };
        assert!(endpoint.takes(&event(EventKind::Offline, Some("alice")), None));
        assert!(endpoint.takes(&event(EventKind::CertificateRefused, Some("alice")), None));
        assert!(!endpoint.takes(&event(EventKind::Online, Some("alice")), None));
        assert!(!endpoint.takes(&event(EventKind::Offline, Some("bob")), None));
        s.users = vec!["u-alice".into()];
        let by_uuid = Endpoint::new(&s, 0, &[]).unwrap();
        assert!(by_uuid.takes(&event(EventKind::Offline, None), Some("u-alice")));
        s.events = vec!["device.gone".into()];
        assert_eq!(
            Endpoint::new(&s, 0, &[]).unwrap_err().key,
            "webhooks[0].events"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_five_minutes() {
        for attempt in 1..40 {
            let full = FIRST_RETRY
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(LONGEST_RETRY);
            let wait = backoff(attempt);
            assert!(wait >= full / 2 && wait <= full, "{attempt}: {wait:?}");
        }
    }
}
