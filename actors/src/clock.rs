//! Gateway time: wall-clock readings that never go backwards.
//!
//! A [`Stamp`] is nanoseconds on tokio's monotonic clock since the gateway first asked
//! for the time, anchored to the wall clock read at that moment. Last-seen times made
//! from it never jump back with the system clock, fit in one atomic, and follow
//! tokio's paused clock in tests.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use tokio::time::Instant;

static ANCHOR: OnceLock<(Instant, SystemTime)> = OnceLock::new();

/// The anchor lies a day before the first reading, so readings from another clock
/// that is a little behind (each test with a paused clock has its own) stay after it.
fn anchor() -> (Instant, SystemTime) {
    *ANCHOR.get_or_init(|| {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let back = Duration::from_secs(86_400);
        match (now.checked_sub(back), wall.checked_sub(back)) {
            (Some(now), Some(wall)) => (now, wall),
            _ => (now, wall),
        }
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(u64);

impl Stamp {
    pub fn now() -> Self {
        let nanos = Instant::now()
            .saturating_duration_since(anchor().0)
            .as_nanos();
        Self(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    pub fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn instant(self) -> Instant {
        anchor().0 + Duration::from_nanos(self.0)
    }

    pub fn to_utc(self) -> DateTime<Utc> {
        (anchor().1 + Duration::from_nanos(self.0)).into()
    }
}

impl std::ops::Add<Duration> for Stamp {
    type Output = Stamp;

    fn add(self, d: Duration) -> Stamp {
        Stamp(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}
