//! What one peer may cost: how many connections (in all and per source address), how
//! many requests a second, and how many failed uuid look-ups before answers slow down.
//!
//! The gateway faces the internet and its only secret travels in clear text, so every
//! peer is bounded. [`Limits`] holds the settings; [`Admission`] counts open
//! connections and hands out a [`Ticket`] per admitted one (returned when the
//! connection closes); [`TokenBucket`] paces one connection's requests;
//! [`LookupGuard`] slows down a source address that keeps presenting unknown uuids.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::de;

/// The `[limits]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_connections: NonZeroUsize,
    pub max_connections_per_ip: NonZeroUsize,
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

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: NonZeroUsize::new(50_000).unwrap(),
            max_connections_per_ip: NonZeroUsize::new(2_000).unwrap(),
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
pub enum Refused {
    #[error("the gateway holds its maximum number of connections")]
    Total,
    #[error("this address holds its maximum number of connections")]
    PerIp,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerIp => "max_connections_per_ip",
        }
    }
}

/// Open connections, in all and per source address.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    max_per_ip: usize,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Refusals are logged once a minute per address.
    pub warnings: Warnings,
}

/// When each address was last warned about, so a flood logs once a minute.
#[derive(Debug, Default)]
pub struct Warnings {
    last: Mutex<HashMap<IpAddr, Instant>>,
}

impl Warnings {
    /// True at most once a minute per address: whether to log.
    pub fn should_warn(&self, ip: IpAddr) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.len() > 10_000 {
            last.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        }
        match last.get(&ip) {
            Some(at) if now.duration_since(*at) < Duration::from_secs(60) => false,
            _ => {
                last.insert(ip, now);
                true
            }
        }
    }
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Ticket {
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Admission {
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            max_per_ip,
            open: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            warnings: Warnings::default(),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a connection from `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        if self.open.load(Ordering::Relaxed) >= self.max {
            return Err(Refused::Total);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_ip.entry(ip).or_default();
        if *count >= self.max_per_ip {
            return Err(Refused::PerIp);
        }
        *count += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            ip,
            admission: self.clone(),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        a.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = a.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            at: Instant::now(),
        }
    }

    /// Takes a token if one is left; a refusal spends nothing.
    pub fn try_take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
    }

    /// Takes a token; if none is left, how long until there is one (the token is
    /// then already spent).
    pub fn take(&mut self) -> Option<Duration> {
        self.refill();
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(-self.tokens / self.rate.max(1e-9)))
        }
    }
}

/// Failed uuid look-ups per source address, in one-minute windows. Past the
/// threshold, the address's failed look-ups are answered one at a time, `delay` apart,
/// however many connections it asks from.
#[derive(Debug)]
pub struct LookupGuard {
    per_min: u32,
    delay: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug)]
struct Failures {
    /// Start of the current minute, and failures in it.
    since: Instant,
    count: u32,
    /// When the address's next slowed answer may go out.
    next: Instant,
}

impl LookupGuard {
    pub fn new(per_min: u32, delay: Duration) -> Self {
        Self {
            per_min,
            delay,
            failures: Mutex::default(),
        }
    }

    /// Records a failed look-up from `ip`; returns how long to wait before answering
    /// (zero below the threshold; past it, the address's answers queue up `delay`
    /// apart).
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        if failures.len() > 100_000 {
            failures.retain(|_, f| now.duration_since(f.since) < minute || f.next > now);
        }
        let f = failures.entry(ip).or_insert(Failures {
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
        let admission = Admission::new(3, 2);
        let a1 = admission.admit(ip(1)).unwrap();
        let _a2 = admission.admit(ip(1)).unwrap();
        assert_eq!(admission.admit(ip(1)).unwrap_err(), Refused::PerIp);
        let _b1 = admission.admit(ip(2)).unwrap();
        assert_eq!(admission.admit(ip(3)).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!(admission.open(), 2);
        let _a3 = admission.admit(ip(1)).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10.0, 3.0);
        assert_eq!(
            (bucket.take(), bucket.take(), bucket.take()),
            (None, None, None)
        );
        let wait = bucket.take().unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(bucket.take(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_look_ups_slow_down_after_the_threshold_for_a_minute() {
        let guard = LookupGuard::new(2, Duration::from_secs(1));
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

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_a_minute_per_address() {
        let warnings = Warnings::default();
        assert!(warnings.should_warn(ip(1)));
        assert!(!warnings.should_warn(ip(1)));
        assert!(warnings.should_warn(ip(2)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(warnings.should_warn(ip(1)));
    }
}
