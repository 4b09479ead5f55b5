//! What one peer may cost: how many connections (in all and per source address), how
//! many requests a second, and how many failed uuid look-ups before answers slow down.
//!
//! The gateway faces the internet and its only secret travels in clear text, so every
//! peer is bounded. [`Limits`] holds the settings; [`Admission`] counts open
//! connections and hands out a [`Ticket`] per admitted one (returned when the
//! connection closes); [`TokenBucket`] paces one connection's requests;
//! [`LookupGuard`] slows down a source that keeps presenting unknown uuids.
//!
//! "Per address" means per [`Source`]: an IPv4 address, or an IPv6 prefix
//! (`limits.ipv6_prefix`). The tables kept per source are bounded and fail closed
//! ([`BoundedMap`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bounded::{BoundedMap, OncePer};
use crate::de;
use crate::source::{Ipv6Prefix, Source};

/// Sources whose refusals were logged lately, at most.
const MAX_WARNED_SOURCES: usize = 10_000;
/// Sources with failed look-ups tracked at once, at most.
const MAX_LOOKUP_SOURCES: usize = 100_000;

/// The `[limits]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: NonZeroUsize,
    /// Per source: an IPv4 address, or an IPv6 network of `ipv6_prefix` bits.
    pub max_connections_per_ip: NonZeroUsize,
    /// How many leading bits of an IPv6 address name one source for every
    /// per-address limit (64: one customer line).
    pub ipv6_prefix: Ipv6Prefix,
    /// A new connection must send a valid message within this, and any message must
    /// be complete this long after its first byte.
    #[serde(rename = "identify_secs", with = "de::positive_secs")]
    pub identify: Duration,
    /// A connection that is not a tunnel end and sent no valid message for this long
    /// is closed.
    #[serde(rename = "idle_secs", with = "de::positive_secs")]
    pub idle: Duration,
    /// Replies and tunnel data queued to one connection, in bytes.
    pub output_queue_bytes: NonZeroUsize,
    /// `connme`, `connthem` and `query` a connection may send per second, and in a burst.
    pub requests_per_sec: NonZeroU32,
    pub request_burst: NonZeroU32,
    /// Failed uuid look-ups from one source address per minute before each further one
    /// is answered only after `failed_lookup_delay`.
    pub failed_lookups_per_min: u32,
    #[serde(rename = "failed_lookup_delay_ms", with = "de::millis")]
    pub failed_lookup_delay: Duration,
    /// Devices one user may have (stored, or live for a guest).
    pub max_devices_per_user: NonZeroUsize,
    /// New devices one user may add a minute, after a burst of `new_devices_burst`.
    pub new_devices_per_minute: NonZeroU32,
    pub new_devices_burst: NonZeroU32,
    /// Input handled per turn of a session before it lets other connections run.
    #[serde(skip)]
    pub turn_bytes: usize,
}

impl Limits {
    /// Requests a connection may send (`requests_per_sec`, `request_burst`).
    pub fn requests(&self) -> Rate {
        Rate::new(
            f64::from(self.requests_per_sec.get()),
            f64::from(self.request_burst.get()),
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: NonZeroUsize::new(50_000).unwrap(),
            max_connections_per_ip: NonZeroUsize::new(2_000).unwrap(),
            ipv6_prefix: Ipv6Prefix::DEFAULT,
            identify: Duration::from_secs(10),
            idle: Duration::from_secs(180),
            output_queue_bytes: NonZeroUsize::new(1 << 20).unwrap(),
            requests_per_sec: NonZeroU32::new(20).unwrap(),
            request_burst: NonZeroU32::new(40).unwrap(),
            failed_lookups_per_min: 30,
            failed_lookup_delay: Duration::from_secs(1),
            max_devices_per_user: NonZeroUsize::new(10_000).unwrap(),
            new_devices_per_minute: NonZeroU32::new(100).unwrap(),
            new_devices_burst: NonZeroU32::new(10_000).unwrap(),
            turn_bytes: 64 * 1024,
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcceptRefused {
    #[error("the gateway holds its maximum number of connections")]
    Total,
    #[error("this address (or its IPv6 network) holds its maximum number of connections")]
    PerIp,
}

impl AcceptRefused {
    pub fn label(self) -> &'static str {
        match self {
            AcceptRefused::Total => "max_connections",
            AcceptRefused::PerIp => "max_connections_per_ip",
        }
    }
}

/// Open connections, in all and per source.
pub struct Admission {
    max: usize,
    max_per_ip: usize,
    prefix: Ipv6Prefix,
    open: AtomicUsize,
    per_source: Mutex<HashMap<Source, usize>>,
    /// Refusals are logged once a minute per source.
    pub warnings: Warnings,
}

/// When each source was last warned about, so a flood logs once a minute.
pub struct Warnings {
    prefix: Ipv6Prefix,
    last: Mutex<OncePer<Source>>,
}

impl Warnings {
    pub fn new(prefix: Ipv6Prefix) -> Self {
        let every = Duration::from_secs(60);
        Self {
            prefix,
            last: Mutex::new(OncePer::new("refusal warnings", MAX_WARNED_SOURCES, every)),
        }
    }

    /// True at most once a minute per source: whether to log.
    pub fn should_warn(&self, ip: IpAddr) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.first(&self.prefix.source_of(ip))
    }
}

/// One admitted connection; dropping it gives its place back.
pub struct Ticket {
    source: Source,
    admission: Arc<Admission>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.source)
    }
}

impl Admission {
    pub fn new(max: usize, max_per_ip: usize, prefix: Ipv6Prefix) -> Arc<Self> {
        Arc::new(Self {
            max,
            max_per_ip,
            prefix,
            open: AtomicUsize::new(0),
            per_source: Mutex::default(),
            warnings: Warnings::new(prefix),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a connection from `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, AcceptRefused> {
        if self.open.load(Ordering::Relaxed) >= self.max {
            return Err(AcceptRefused::Total);
        }
        let source = self.prefix.source_of(ip);
        let mut per_source = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_source.entry(source).or_default();
        if *count >= self.max_per_ip {
            return Err(AcceptRefused::PerIp);
        }
        *count += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            source,
            admission: self.clone(),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        a.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_source = a.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// A rate limit: `per_sec` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_sec: f64, burst: f64) -> Self {
        Self {
            per_sec: per_sec.max(1e-9),
            burst: burst.max(1.0),
        }
    }

    /// Seconds in which `tokens` come back.
    fn secs(&self, tokens: f64) -> f64 {
        tokens / self.per_sec
    }
}

/// A token bucket, kept as the moment it would be full again (the generic cell rate
/// algorithm): 16 bytes however many tokens it holds, because every connection keeps
/// one. Its [`Rate`] is the caller's setting, given at each take.
#[derive(Debug)]
pub struct TokenBucket {
    full_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new() -> Self {
        Self {
            full_at: Instant::now(),
        }
    }

    /// Spends a token: when the bucket will be full again, and how many tokens short
    /// it is (at most zero while tokens are left).
    fn spend(&self, rate: &Rate) -> (Instant, f64) {
        let now = Instant::now();
        let full_at = self.full_at.max(now) + Duration::from_secs_f64(rate.secs(1.0));
        let short = full_at.duration_since(now).as_secs_f64() * rate.per_sec - rate.burst;
        // Within a nanosecond's worth of a token is not short (rounding).
        (full_at, if short < 1e-6 { 0.0 } else { short })
    }

    /// Takes a token if one is left; a refusal spends nothing.
    pub fn try_take(&mut self, rate: &Rate) -> bool {
        let (full_at, short) = self.spend(rate);
        if short > 0.0 {
            return false;
        }
        self.full_at = full_at;
        true
    }

    /// Takes a token; if none is left, how long until there is one (the token is
    /// then already spent).
    pub fn take(&mut self, rate: &Rate) -> Option<Duration> {
        let (full_at, short) = self.spend(rate);
        self.full_at = full_at;
        (short > 0.0).then(|| Duration::from_secs_f64(rate.secs(short)))
    }
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::new()
    }
}

/// Failed uuid look-ups per source, in one-minute windows. Past the threshold, the
/// source's failed look-ups are answered one at a time, `delay` apart, however many
/// connections (or addresses of its IPv6 network) it asks from.
pub struct LookupGuard {
    per_min: u32,
    delay: Duration,
    prefix: Ipv6Prefix,
    failures: Mutex<BoundedMap<Source, FailedLookups>>,
}

struct FailedLookups {
    /// Start of the current minute, and failures in it.
    since: Instant,
    count: u32,
    /// When the address's next slowed answer may go out.
    next: Instant,
}

impl LookupGuard {
    pub fn new(per_min: u32, delay: Duration, prefix: Ipv6Prefix) -> Self {
        Self::with_capacity(per_min, delay, prefix, MAX_LOOKUP_SOURCES)
    }

    fn with_capacity(per_min: u32, delay: Duration, prefix: Ipv6Prefix, max: usize) -> Self {
        // A source is forgotten two minutes after its last failure: its minute has
        // ended by then, and so has any queue of slowed answers shorter than that.
        let forget = Duration::from_secs(120);
        Self {
            per_min,
            delay,
            prefix,
            failures: Mutex::new(BoundedMap::new("failed look-ups", max, forget)),
        }
    }

    /// Records a failed look-up from `ip`; returns how long to wait before answering
    /// (zero below the threshold; past it, the source's answers queue up `delay`
    /// apart).
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        let (f, _) = failures.touch(&self.prefix.source_of(ip), now, || FailedLookups {
            since: now,
            count: 0,
            next: now,
        });
        if now.duration_since(f.since) >= minute {
            (f.since, f.count) = (now, 0);
        }
        f.count += 1;
        if f.count <= self.per_min {
            return Duration::ZERO;
        }
        f.next = f.next.max(now) + self.delay;
        f.next - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn admission_counts_in_all_and_per_address_and_gives_places_back() {
        let admission = Admission::new(3, 2, Ipv6Prefix::DEFAULT);
        let a1 = admission.admit(ip(1)).unwrap();
        let _a2 = admission.admit(ip(1)).unwrap();
        assert_eq!(admission.admit(ip(1)).unwrap_err(), AcceptRefused::PerIp);
        let _b1 = admission.admit(ip(2)).unwrap();
        assert_eq!(admission.admit(ip(3)).unwrap_err(), AcceptRefused::Total);
        drop(a1);
        assert_eq!(admission.open(), 2);
        let _a3 = admission.admit(ip(1)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_bucket_allows_a_burst_then_the_rate() {
        let rate = Rate::new(10.0, 3.0);
        let mut bucket = TokenBucket::new();
        assert_eq!(
            (bucket.take(&rate), bucket.take(&rate), bucket.take(&rate)),
            (None, None, None)
        );
        let wait = bucket.take(&rate).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        let wait = bucket.take(&rate).unwrap();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "spent: {wait:?}");
        assert!(!bucket.try_take(&rate), "none left");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !bucket.try_take(&rate),
            "a refusal spent nothing: still short"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(bucket.try_take(&rate));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            (bucket.take(&rate), bucket.take(&rate), bucket.take(&rate)),
            (None, None, None),
            "full again, never more than the burst"
        );
        assert!(bucket.take(&rate).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_look_ups_slow_down_after_the_threshold_for_a_minute() {
        let guard = LookupGuard::new(2, Duration::from_secs(1), Ipv6Prefix::DEFAULT);
        assert_eq!(guard.failed(ip(1)), Duration::ZERO);
        assert_eq!(guard.failed(ip(1)), Duration::ZERO);
        assert_eq!(guard.failed(ip(1)), Duration::from_secs(1));
        // From however many connections, one answer a delay.
        assert_eq!(guard.failed(ip(1)), Duration::from_secs(2));
        assert_eq!(guard.failed(ip(1)), Duration::from_secs(3));
        assert_eq!(guard.failed(ip(2)), Duration::ZERO, "per address");
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(guard.failed(ip(1)), Duration::ZERO);
    }

    fn v6(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_ipv6_network_counts_as_one_source() {
        let admission = Admission::new(10, 2, Ipv6Prefix::DEFAULT);
        let _a = admission.admit(v6("2001:db8:1:2::1")).unwrap();
        let _b = admission.admit(v6("2001:db8:1:2::2")).unwrap();
        assert_eq!(
            admission.admit(v6("2001:db8:1:2:ffff::3")).unwrap_err(),
            AcceptRefused::PerIp
        );
        let _other = admission.admit(v6("2001:db8:1:3::1")).unwrap();
        let _mapped = admission.admit(v6("::ffff:192.0.2.1")).unwrap();
        let _v4 = admission.admit(IpAddr::from([192, 0, 2, 1])).unwrap();
        assert_eq!(
            admission.admit(IpAddr::from([192, 0, 2, 1])).unwrap_err(),
            AcceptRefused::PerIp,
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotating_ipv6_addresses_does_not_escape_look_up_pacing() {
        let guard = LookupGuard::new(2, Duration::from_secs(1), Ipv6Prefix::DEFAULT);
        let delays: Vec<Duration> = (1..=4u16)
            .map(|i| guard.failed(IpAddr::from([0x2001, 0xdb8, 0, 7, i, i, i, i])))
            .collect();
        assert_eq!(delays[1], Duration::ZERO);
        assert_eq!(delays[2], Duration::from_secs(1));
        assert_eq!(delays[3], Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_look_up_table_paces_newcomers_together() {
        let guard = LookupGuard::with_capacity(2, Duration::from_secs(1), Ipv6Prefix::DEFAULT, 3);
        for last in 1..=3 {
            guard.failed(ip(last));
        }
        // Every source beyond the table's three shares one count: past two failures
        // in all, newcomers are slowed, however many addresses they rotate through.
        assert_eq!(guard.failed(ip(10)), Duration::ZERO);
        assert_eq!(guard.failed(ip(11)), Duration::ZERO);
        assert_eq!(guard.failed(ip(12)), Duration::from_secs(1));
        assert_eq!(guard.failed(ip(13)), Duration::from_secs(2));
        assert_eq!(guard.failures.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_a_minute_per_address() {
        let warnings = Warnings::new(Ipv6Prefix::DEFAULT);
        assert!(warnings.should_warn(ip(1)));
        assert!(!warnings.should_warn(ip(1)));
        assert!(warnings.should_warn(ip(2)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(warnings.should_warn(ip(1)));
    }
}
