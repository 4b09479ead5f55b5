//! Who may use the admin server, and how fast a stranger may guess.
//!
//! - **Host**: without a token the server answers only `Host:` values that are
//!   loopback addresses, `localhost` or one of `admin.allowed_hosts`, so a web page
//!   reached through a rebound DNS name cannot read it from the operator's browser.
//! - **Token and sessions**: a request carries the token as a bearer token, or the
//!   cookie of a session the login form opened. A session id is random (256 bits),
//!   never the token, and expires after `admin.session_secs`.
//! - **Pacing**: each wrong token (bearer or login) from a source address makes that
//!   address wait before its next try, doubling from 1 s up to a minute; meanwhile it
//!   gets `429` with `Retry-After`, however many requests it sends in parallel. IPv6
//!   sources are paced by their prefix (`limits.ipv6_prefix`, a /64). A valid session
//!   is never paced. Behind `admin.trusted_proxies`, the source is read from the
//!   proxies' headers ([`forwarded`](super::forwarded)). The table of sources is
//!   bounded and fails closed: once it holds [`MAX_SOURCES`] sources that failed
//!   lately, every new one shares one pace (logged once).
//!
//! Every refusal is counted in `elfin_refusals_total{reason="admin_…"}` and logged with
//! the source address, at most once a minute per address and reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::HttpRequest;
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::forwarded;
use elfin_actors::bounded::BoundedMap;
use elfin_actors::refusal::{Reason, Refusals};
use elfin_actors::source::{Ipv6Prefix, Source};

/// The cookie a session travels in.
pub const COOKIE: &str = "elfin_session";
/// The first wait after a wrong token; each further one doubles it, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(60);
/// An address's failures are forgotten once it has not failed for this long.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Sources tracked at once; past it, new ones share one pace.
pub const MAX_SOURCES: usize = 10_000;
/// Sessions kept at once; past it, the one expiring first is dropped.
const MAX_SESSIONS: usize = 1_000;

/// What the admin server's access rules are made of (`[admin]`).
pub struct Rules {
    pub token: Option<String>,
    pub allowed_hosts: Vec<String>,
    pub trusted_proxies: Vec<IpAddr>,
    pub session: Duration,
    /// How IPv6 sources are grouped (`limits.ipv6_prefix`).
    pub ipv6_prefix: Ipv6Prefix,
}

pub struct Guard {
    rules: Rules,
    sessions: Mutex<HashMap<String, Instant>>,
    failures: Mutex<BoundedMap<Source, FailedLogins>>,
}

#[derive(Clone, Copy)]
struct FailedLogins {
    count: u32,
    /// No try from this source is checked before this.
    until: tokio::time::Instant,
}

/// What a request presented, and whether it may go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No token is configured, the path is public, or the credential is right.
    Allowed,
    /// Nothing presented, or a session that is unknown or expired.
    Unauthenticated,
    /// A wrong bearer token: the source now waits this long.
    WrongToken(Duration),
    /// The source is still waiting after a wrong token.
    Paced(Duration),
    /// A `Host:` this server does not answer.
    ForeignHost,
}

impl Guard {
    pub fn new(mut rules: Rules) -> Self {
        for host in &mut rules.allowed_hosts {
            host.make_ascii_lowercase();
        }
        Self {
            rules,
            sessions: Mutex::default(),
            failures: Mutex::new(BoundedMap::new("admin pacing", MAX_SOURCES, FORGET_AFTER)),
        }
    }

    pub fn has_token(&self) -> bool {
        self.rules.token.is_some()
    }

    /// Checks a request for a path that needs the token (`public` = one that does not:
    /// the login form and its style sheet).
    pub fn check(&self, req: &HttpRequest, public: bool) -> Verdict {
        if !self.host_allowed(req) {
            return Verdict::ForeignHost;
        }
        let Some(token) = &self.rules.token else {
            return Verdict::Allowed;
        };
        if public || self.session_of(req).is_some() {
            return Verdict::Allowed;
        }
        let source = self.source(req);
        if let Some(wait) = self.waiting(source) {
            return Verdict::Paced(wait);
        }
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match bearer {
            Some(presented) if same(presented, token) => {
                self.succeeded(source);
                Verdict::Allowed
            }
            Some(_) => Verdict::WrongToken(self.failed(source)),
            None => Verdict::Unauthenticated,
        }
    }

    /// The login form's check: `Ok(session id)` for the right token, `Err(verdict)`
    /// (paced or wrong) otherwise.
    pub fn login(&self, req: &HttpRequest, presented: &str) -> Result<String, Verdict> {
        let source = self.source(req);
        if let Some(wait) = self.waiting(source) {
            return Err(Verdict::Paced(wait));
        }
        match &self.rules.token {
            Some(token) if same(presented, token) => {
                self.succeeded(source);
                Ok(self.open_session())
            }
            _ => Err(Verdict::WrongToken(self.failed(source))),
        }
    }

    pub fn logout(&self, req: &HttpRequest) {
        if let Some(id) = self.session_of(req) {
            self.lock_sessions().remove(&id);
        }
    }

    pub fn session_lifetime(&self) -> Duration {
        self.rules.session
    }

    /// Whether a cookie should be `Secure`: the request came through a configured
    /// proxy (which terminates HTTPS; the admin server itself speaks plain HTTP).
    pub fn behind_proxy(&self, req: &HttpRequest) -> bool {
        req.peer_addr()
            .is_some_and(|peer| self.rules.trusted_proxies.contains(&peer.ip()))
    }

    /// Counts and logs a refusal (at most once a minute per source and reason).
    pub fn report(&self, refusals: &Refusals, req: &HttpRequest, verdict: &Verdict) {
        let (reason, detail) = match verdict {
            Verdict::WrongToken(wait) => (
                Reason::AdminToken,
                format!("wrong admin token; its next try waits {wait:?}"),
            ),
            Verdict::Paced(wait) => (
                Reason::AdminPaced,
                format!("admin request within {wait:?} of a wrong token"),
            ),
            Verdict::ForeignHost => (
                Reason::AdminHost,
                format!(
                    "admin request for Host {:?} (not loopback, localhost or admin.allowed_hosts)",
                    host_of(req).unwrap_or("")
                ),
            ),
            Verdict::Allowed | Verdict::Unauthenticated => return,
        };
        refusals.report(self.source(req), reason, || detail);
    }

    /// The address a request comes from: through trusted proxies, the first address
    /// from the right of their headers that is not one of them.
    pub fn source(&self, req: &HttpRequest) -> IpAddr {
        let peer = req
            .peer_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        forwarded::source(peer, req.headers(), &self.rules.trusted_proxies)
    }

    fn host_allowed(&self, req: &HttpRequest) -> bool {
        if self.rules.token.is_some() && self.rules.allowed_hosts.is_empty() {
            return true;
        }
        let Some(host) = host_of(req) else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let host = strip_port(&host);
        host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || self.rules.allowed_hosts.iter().any(|h| h == host)
    }

    fn session_of(&self, req: &HttpRequest) -> Option<String> {
        let cookie = req.cookie(COOKIE)?;
        let id = cookie.value();
        let mut sessions = self.lock_sessions();
        match sessions.get(id) {
            Some(expires) if Instant::now() < *expires => Some(id.to_owned()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    fn open_session(&self) -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut sessions = self.lock_sessions();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, expires| now < *expires);
        }
        if sessions.len() >= MAX_SESSIONS {
            if let Some(first) = sessions
                .iter()
                .min_by_key(|(_, expires)| **expires)
                .map(|(id, _)| id.clone())
            {
                sessions.remove(&first);
            }
        }
        sessions.insert(id.clone(), now + self.rules.session);
        id
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, BoundedMap<Source, FailedLogins>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `source` must still wait, if it must: its own pace, or the shared
    /// one while the table is full.
    fn waiting(&self, source: IpAddr) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let failures = self.lock_failures();
        let until = failures
            .get(&self.rules.ipv6_prefix.source_of(source), now)?
            .until;
        until.checked_duration_since(now)
    }

    /// Records a wrong token from `source`; answers how long it now waits.
    fn failed(&self, source: IpAddr) -> Duration {
        let now = tokio::time::Instant::now();
        let mut failures = self.lock_failures();
        let key = self.rules.ipv6_prefix.source_of(source);
        let (entry, _) = failures.touch(&key, now, || FailedLogins {
            count: 0,
            until: now,
        });
        entry.count = entry.count.saturating_add(1);
        let wait = FIRST_WAIT
            .saturating_mul(1 << (entry.count - 1).min(6))
            .min(MAX_WAIT);
        entry.until = now + wait;
        wait
    }

    /// The right token: the source's own pace is forgotten (a shared one is not).
    fn succeeded(&self, source: IpAddr) {
        self.lock_failures()
            .remove(&self.rules.ipv6_prefix.source_of(source));
    }
}

fn host_of(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
}

/// `host:port` -> `host`, `[::1]:port` -> `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// Compares in time independent of where the two differ.
fn same(presented: &str, token: &str) -> bool {
    presented.as_bytes().ct_eq(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn guard(token: Option<&str>, allowed: &[&str]) -> Guard {
        Guard::new(Rules {
            token: token.map(str::to_owned),
            allowed_hosts: allowed.iter().map(|h| h.to_string()).collect(),
            trusted_proxies: vec!["10.0.0.9".parse().unwrap()],
            session: Duration::from_secs(3600),
            ipv6_prefix: Ipv6Prefix::DEFAULT,
        })
    }

    fn from(peer: &str, host: &str) -> TestRequest {
        TestRequest::default()
            .peer_addr(peer.parse().unwrap())
            .insert_header((header::HOST, host))
    }

    #[test]
    fn without_a_token_only_loopback_names_are_answered() {
        let g = guard(None, &["gateway.plant.example"]);
        for host in [
            "127.0.0.1:9100",
            "localhost:9100",
            "LOCALHOST",
            "[::1]:9100",
            "127.1.2.3",
            "Gateway.Plant.Example:9100",
        ] {
            let req = from("127.0.0.1:5000", host).to_http_request();
            assert_eq!(g.check(&req, false), Verdict::Allowed, "{host}");
        }
        for host in [
            "evil.example:9100",
            "localhost.evil.example",
            "10.0.0.1:9100",
            "",
        ] {
            let req = from("127.0.0.1:5000", host).to_http_request();
            assert_eq!(g.check(&req, false), Verdict::ForeignHost, "{host}");
        }
    }

    #[test]
    fn wrong_tokens_make_their_source_wait_longer_each_time() {
        let g = guard(Some("right"), &[]);
        let wrong = || {
            from("192.0.2.1:5000", "gw")
                .insert_header((header::AUTHORIZATION, "Bearer wrong"))
                .to_http_request()
        };
        assert_eq!(
            g.check(&wrong(), false),
            Verdict::WrongToken(Duration::from_secs(1))
        );
        // At once again: paced, whatever it presents, even the right token.
        let right = from("192.0.2.1:5001", "gw")
            .insert_header((header::AUTHORIZATION, "Bearer right"))
            .to_http_request();
        assert!(matches!(g.check(&right, false), Verdict::Paced(_)));
        // Another source is not.
        let other = from("192.0.2.2:5000", "gw")
            .insert_header((header::AUTHORIZATION, "Bearer right"))
            .to_http_request();
        assert_eq!(g.check(&other, false), Verdict::Allowed);
        // The waits double, up to a minute.
        let waits: Vec<Duration> = (0..8)
            .map(|_| g.failed(IpAddr::from([192, 0, 2, 1])))
            .collect();
        assert_eq!(waits[0], Duration::from_secs(2));
        assert_eq!(waits[1], Duration::from_secs(4));
        assert_eq!(waits[7], MAX_WAIT);
    }

    #[test]
    fn ipv6_sources_share_a_pace_per_64() {
        let g = guard(Some("right"), &[]);
        g.failed("2001:db8:1:2::1".parse().unwrap());
        assert!(g.waiting("2001:db8:1:2:ffff::9".parse().unwrap()).is_some());
        assert!(g.waiting("2001:db8:1:3::1".parse().unwrap()).is_none());
    }

    #[test]
    fn a_full_table_paces_every_new_source_together() {
        let g = guard(Some("right"), &[]);
        let wrong_from = |source: &str| {
            from("10.0.0.9:5000", "gw")
                .insert_header(("x-forwarded-for", source))
                .insert_header((header::AUTHORIZATION, "Bearer wrong"))
                .to_http_request()
        };
        // More sources than the table holds, each with one wrong token.
        for i in 0..MAX_SOURCES + 50 {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0xC633_0000 + i as u32));
            let verdict = g.check(&wrong_from(&source.to_string()), false);
            assert!(
                matches!(verdict, Verdict::WrongToken(_) | Verdict::Paced(_)),
                "{verdict:?}"
            );
        }
        assert_eq!(g.lock_failures().len(), MAX_SOURCES);
        // A new source is paced at once: it shares the newcomers' pace.
        let mut paced = 0;
        for _ in 0..300 {
            if matches!(
                g.check(&wrong_from("203.0.113.99"), false),
                Verdict::Paced(_)
            ) {
                paced += 1;
            }
        }
        assert_eq!(paced, 300, "every try of a new source is paced");
        // Sources with an entry of their own keep it.
        assert!(g.waiting(IpAddr::from([198, 51, 0, 0])).is_some());
    }

    #[test]
    fn a_login_opens_a_random_session_that_expires() {
        let g = Guard::new(Rules {
            session: Duration::from_millis(50),
            ..guard(Some("right"), &[]).rules
        });
        let req = from("192.0.2.1:5000", "gw").to_http_request();
        let id = g.login(&req, "right").unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(id, g.login(&req, "right").unwrap(), "a new id each time");
        let with_cookie = || {
            from("192.0.2.1:5000", "gw")
                .cookie(actix_web::cookie::Cookie::new(COOKIE, id.clone()))
                .to_http_request()
        };
        assert_eq!(g.check(&with_cookie(), false), Verdict::Allowed);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(g.check(&with_cookie(), false), Verdict::Unauthenticated);
        assert!(matches!(
            g.login(&req, "wrong"),
            Err(Verdict::WrongToken(_))
        ));
        assert!(matches!(g.login(&req, "right"), Err(Verdict::Paced(_))));
    }

    #[test]
    fn a_trusted_proxy_names_the_source_and_makes_cookies_secure() {
        let g = guard(Some("right"), &[]);
        let proxied = from("10.0.0.9:5000", "gw")
            .insert_header(("x-forwarded-for", "203.0.113.7, 198.51.100.3"))
            .to_http_request();
        assert_eq!(
            g.source(&proxied),
            "198.51.100.3".parse::<IpAddr>().unwrap()
        );
        assert!(g.behind_proxy(&proxied));
        let direct = from("192.0.2.1:5000", "gw")
            .insert_header(("x-forwarded-for", "203.0.113.7"))
            .to_http_request();
        assert_eq!(g.source(&direct), "192.0.2.1".parse::<IpAddr>().unwrap());
        assert!(!g.behind_proxy(&direct));
    }

    #[test]
    fn ports_are_stripped_from_host_names() {
        assert_eq!(strip_port("gw:9100"), "gw");
        assert_eq!(strip_port("[::1]:9100"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("gw"), "gw");
    }
}
