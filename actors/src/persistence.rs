//! The `Persistence` actor: batched, loss-free writes of device sightings.
//!
//! Sightings arrive one by one ([`Record`]); the actor keeps only the newest per device
//! (so its memory is bounded by the number of devices, whatever the traffic) and hands
//! them to the store as one batch every `flush_interval`, or sooner once `max_batch`
//! are pending. A beating device is coalesced at its source: its session sends it once
//! ([`Record::Beat`]) and nothing more until a batch takes it, when its newest
//! last-seen is read, so a device beating 10 000 times a second costs what one beat
//! costs. One write is in flight at a time. When the store fails transiently
//! (an outage), the batch goes back into the pending set (newer sightings win) and the
//! actor retries with exponential backoff; outages and recoveries are logged once each.
//! A permanent failure (the database refuses the batch) is logged, counted and the
//! batch dropped, so it never blocks later writes or shutdown.
//!
//! It writes through the [`Sightings`] role alone; the audit trail has its own
//! batching actor ([`crate::audit_writer`]), which shares [`Outage`] with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::time::Instant;

use crate::device::Identity;
use crate::metric;
use crate::store::{Recorded, Sighting, Sightings, StoreError};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A store that keeps failing: the current backoff and when to try again. The first
/// failure and the recovery are logged once each.
#[derive(Debug, Default)]
pub struct Outage(Option<(Duration, Instant)>);

impl Outage {
    /// Within a backoff: nothing is written before it ends (unless forced).
    pub fn waiting(&self) -> bool {
        self.0
            .is_some_and(|(_, retry_at)| Instant::now() < retry_at)
    }

    /// A write failed transiently, keeping `what` (in words): the first time it is
    /// logged and retried soon, then at doubling intervals up to 30 s.
    pub fn failed(&mut self, e: &StoreError, first: Duration, what: impl FnOnce() -> String) {
        metrics::counter!(metric::STORE_ERRORS_TOTAL).increment(1);
        let backoff = match self.0 {
            None => {
                log::warn!(
                    "database write failed, keeping {} and retrying: {e}",
                    what()
                );
                first.min(Duration::from_millis(500))
            }
            Some((backoff, _)) => {
                log::debug!("database still failing ({} pending): {e}", what());
                (backoff * 2).min(MAX_BACKOFF)
            }
        };
        self.0 = Some((backoff, Instant::now() + backoff));
    }

    /// A write succeeded: an outage is over.
    pub fn over(&mut self, what: &str) {
        if self.0.take().is_some() {
            log::info!("database is back; wrote the {what} that waited");
        }
    }
}

/// What a session does on each `beat` of a device whose sightings are stored: refresh
/// last-seen and, unless the device already waits for the next batch, queue it.
pub fn beat(persistence: &Addr<Persistence>, device: &Arc<Identity>) {
    device.activity.touch();
    if device.activity.queue() {
        persistence.do_send(Record::Beat(device.clone()));
    }
}

pub struct Persistence {
    store: Arc<dyn Sightings>,
    flush_interval: Duration,
    max_batch: usize,
    /// mac -> newest sighting not written yet.
    pending: HashMap<ByteString, Pending>,
    /// Sightings of the write in flight.
    in_flight: usize,
    outage: Outage,
    /// Only devices already stored are written (`auth.devices = "registered"`): a
    /// device removed from the database never comes back through a sighting.
    existing_only: bool,
}

impl Persistence {
    pub fn new(store: Arc<dyn Sightings>, flush_interval: Duration, max_batch: usize) -> Self {
        Self {
            store,
            flush_interval,
            max_batch: max_batch.max(1),
            pending: HashMap::new(),
            in_flight: 0,
            outage: Outage::default(),
            existing_only: false,
        }
    }

    /// Writes sightings only of devices already stored (`auth.devices = "registered"`).
    pub fn existing_only(mut self, existing_only: bool) -> Self {
        self.existing_only = existing_only;
        self
    }

    fn waiting(&self) -> usize {
        self.pending.len()
    }

    fn keep(&mut self, record: Record) {
        let (mac, new) = match record {
            Record::Sighting(s) => (s.mac.clone(), Pending::At(s)),
            Record::Beat(device) => (device.key.mac.clone(), Pending::Live(device)),
        };
        match self.pending.get(&mac) {
            Some(old) if old.at() > new.at() => new.release(),
            _ => {
                if let Some(old) = self.pending.insert(mac, new) {
                    old.release();
                }
            }
        }
    }

    /// Takes a pending entry for a batch: a live device is read now and released.
    fn take(pending: Pending) -> Sighting {
        pending.release();
        pending.sighting()
    }

    /// Starts a batch write unless one is in flight, nothing is pending, or (without
    /// `force`) the store is in backoff.
    fn flush(&mut self, force: bool, ctx: &mut Context<Self>) {
        if self.in_flight > 0 || self.waiting() == 0 || (!force && self.outage.waiting()) {
            return;
        }
        let batch = self.take_batch();
        self.in_flight = batch.len();
        let (store, existing_only) = (self.store.clone(), self.existing_only);
        async move {
            let started = std::time::Instant::now();
            let recorded = match existing_only {
                true => store.record_existing(&batch).await,
                false => store.record(&batch).await,
            };
            metrics::histogram!(metric::STORE_ROUND_TRIP_SECONDS, "op" => "record")
                .record(started.elapsed());
            (batch, recorded)
        }
        .into_actor(self)
        .map(|(batch, recorded), act, ctx| {
            act.in_flight = 0;
            match act.written(batch, recorded) {
                None => act.outage.over("sightings"),
                Some(e) => {
                    let waiting = act.pending.len();
                    act.outage
                        .failed(&e, act.flush_interval, || format!("{waiting} sightings"));
                }
            }
            metrics::gauge!(metric::SIGHTINGS_PENDING).set(act.pending.len() as f64);
            if act.waiting() >= act.max_batch {
                act.flush(false, ctx);
            }
        })
        .spawn(ctx);
    }

    /// What the next write takes: at most `max_batch` sightings (a backlog after an
    /// outage goes out that many at a time).
    fn take_batch(&mut self) -> Vec<Sighting> {
        if self.pending.len() <= self.max_batch {
            return self.pending.drain().map(|(_, p)| Self::take(p)).collect();
        }
        let macs: Vec<ByteString> = self.pending.keys().take(self.max_batch).cloned().collect();
        macs.iter()
            .filter_map(|mac| self.pending.remove(mac))
            .map(Self::take)
            .collect()
    }

    /// Counts what a write of sightings did; keeps them again if it may succeed later
    /// and answers that failure.
    fn written(
        &mut self,
        batch: Vec<Sighting>,
        result: Result<Recorded, StoreError>,
    ) -> Option<StoreError> {
        match result {
            Ok(recorded) => {
                metrics::counter!(metric::STORE_BATCHES_TOTAL).increment(1);
                metrics::counter!(metric::SIGHTINGS_WRITTEN_TOTAL)
                    .increment(recorded.written as u64);
                if recorded.refused > 0 {
                    metrics::counter!(metric::SIGHTINGS_DROPPED_TOTAL)
                        .increment(recorded.refused as u64);
                }
                if recorded.unknown_user > 0 {
                    metrics::counter!(metric::SIGHTINGS_UNKNOWN_USER_TOTAL)
                        .increment(recorded.unknown_user as u64);
                    log::debug!(
                        "{} sightings of unknown users not written",
                        recorded.unknown_user
                    );
                }
                None
            }
            Err(e) if !e.is_transient() => {
                metrics::counter!(metric::STORE_ERRORS_TOTAL).increment(1);
                metrics::counter!(metric::SIGHTINGS_DROPPED_TOTAL).increment(batch.len() as u64);
                log::error!(
                    "database refused a batch of {} sightings, dropped: {e}",
                    batch.len()
                );
                None
            }
            Err(e) => {
                for s in batch {
                    self.keep(Record::Sighting(s));
                }
                Some(e)
            }
        }
    }
}

impl Actor for Persistence {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.flush_interval, |act, ctx| act.flush(false, ctx));
    }
}

/// A device was seen; persist it with the next batch.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum Record {
    /// Last-seen as of a moment (the debouncer's timer fired).
    Sighting(Sighting),
    /// A device that beats: queued once (see [`crate::device::Activity::queue`]) and
    /// read when its batch is taken.
    Beat(Arc<Identity>),
}

/// A device waiting for the next batch.
enum Pending {
    At(Sighting),
    Live(Arc<Identity>),
}

impl Pending {
    fn at(&self) -> chrono::DateTime<chrono::Utc> {
        match self {
            Pending::At(s) => s.at,
            Pending::Live(d) => d.activity.last_seen().to_utc(),
        }
    }

    fn sighting(&self) -> Sighting {
        match self {
            Pending::At(s) => s.clone(),
            Pending::Live(d) => d.sighting(),
        }
    }

    /// Lets a live device be queued again by its next beat.
    fn release(&self) {
        if let Pending::Live(d) = self {
            d.activity.dequeue();
        }
    }
}

/// The pending (not yet written) sightings of one user, for `query`.
#[derive(Message)]
#[rtype(result = "Vec<Sighting>")]
pub struct PendingFor {
    pub uuid: ByteString,
}

/// Write everything pending now, ignoring backoff. Answers how many sightings (or, to
/// the audit writer, records) are still unwritten, pending or in flight; shutdown
/// repeats it until that is zero.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Flush;

impl Handler<Record> for Persistence {
    type Result = ();

    fn handle(&mut self, record: Record, ctx: &mut Context<Self>) {
        self.keep(record);
        if self.waiting() >= self.max_batch {
            self.flush(false, ctx);
        }
    }
}

impl Handler<PendingFor> for Persistence {
    type Result = MessageResult<PendingFor>;

    fn handle(&mut self, msg: PendingFor, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.pending
                .values()
                .map(Pending::sighting)
                .filter(|s| s.uuid == msg.uuid)
                .collect(),
        )
    }
}

impl Handler<Flush> for Persistence {
    type Result = usize;

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> usize {
        self.flush(true, ctx);
        self.waiting() + self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{Directory, Recorded, StoreError};
    use async_trait::async_trait;
    use chrono::{DateTime, Utc};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The real embedded store behind a switch that makes writes fail, transiently (a
    /// database outage) or for good.
    struct Flaky {
        inner: EmbeddedStore,
        failing: std::sync::atomic::AtomicBool,
        permanent: bool,
        attempts: AtomicUsize,
    }

    impl Flaky {
        fn new(dir: &tempfile::TempDir, failing: bool, permanent: bool) -> Arc<Self> {
            let inner = EmbeddedStore::open(&dir.path().join("db")).unwrap();
            Arc::new(Flaky {
                inner,
                failing: failing.into(),
                permanent,
                attempts: AtomicUsize::new(0),
            })
        }
    }

    /// Intercepts the one role the persistence actor writes through.
    #[async_trait]
    impl Sightings for Flaky {
        async fn record(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(if self.permanent {
                    StoreError::Permanent("document failed validation".into())
                } else {
                    StoreError::Transient("outage".into())
                });
            }
            self.inner.record(batch).await
        }
        async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
            self.inner.record_existing(batch).await
        }
    }

    fn sighting(mac: &str, at_ms: i64) -> Sighting {
        Sighting {
            uuid: "ua".into(),
            mac: mac.into(),
            host: "h".into(),
            at: DateTime::<Utc>::from_timestamp_millis(at_ms).unwrap(),
        }
    }

    /// Asks until nothing is pending or in flight, at most 5 s of the test's clock.
    async fn settle(persistence: &Addr<Persistence>) {
        for _ in 0..500 {
            if persistence.send(Flush).await.unwrap() == 0 {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("sightings still pending");
    }

    #[actix_rt::test]
    async fn keeps_the_newest_sighting_through_an_outage_and_writes_it_after() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky::new(&dir, true, false);
        store.inner.add_user("alice", "ua").await.unwrap();
        let persistence = Persistence::new(store.clone(), Duration::from_millis(20), 100).start();

        persistence.do_send(Record::Sighting(sighting("M1", 1_000)));
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        persistence.do_send(Record::Sighting(sighting("M1", 3_000)));
        persistence.do_send(Record::Sighting(sighting("M1", 2_000))); // older: must not win
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        assert!(store.attempts.load(Ordering::SeqCst) >= 2, "it retried");
        assert!(store.inner.devices(None).await.unwrap().is_empty());

        store.failing.store(false, Ordering::SeqCst);
        settle(&persistence).await;
        let devices = store.inner.user_devices("ua").await.unwrap().unwrap();
        assert_eq!(devices[0].last_seen.timestamp_millis(), 3_000);
    }

    #[actix_rt::test]
    async fn a_device_beating_ten_thousand_times_is_written_once_with_its_newest_time() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky::new(&dir, false, false);
        store.inner.add_user("alice", "ua").await.unwrap();
        let persistence = Persistence::new(store.clone(), Duration::from_secs(3600), 100).start();
        let device = Identity::new("ua", "M1", "h");
        for _ in 0..10_000 {
            beat(&persistence, &device);
        }
        let pending = persistence
            .send(PendingFor { uuid: "ua".into() })
            .await
            .unwrap();
        assert_eq!(pending.len(), 1);
        settle(&persistence).await;
        assert_eq!(store.attempts.load(Ordering::SeqCst), 1, "one batch");
        let written = store.inner.user_devices("ua").await.unwrap().unwrap();
        assert_eq!(
            written[0].last_seen.timestamp_millis(),
            device.activity.last_seen().to_utc().timestamp_millis()
        );
        // Taken by the batch: the next beat queues it again.
        assert!(device.activity.queue());
    }

    #[actix_rt::test]
    async fn a_batch_refused_for_good_is_dropped_not_retried() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky::new(&dir, true, true);
        store.inner.add_user("alice", "ua").await.unwrap();
        let persistence = Persistence::new(store.clone(), Duration::from_millis(20), 100).start();
        persistence.do_send(Record::Sighting(sighting("M1", 1_000)));
        settle(&persistence).await;
        assert_eq!(store.attempts.load(Ordering::SeqCst), 1, "tried once");
        // Later sightings are written as usual.
        store.failing.store(false, Ordering::SeqCst);
        persistence.do_send(Record::Sighting(sighting("M2", 2_000)));
        settle(&persistence).await;
        let devices = store.inner.user_devices("ua").await.unwrap().unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].mac, "M2");
    }

    #[actix_rt::test]
    async fn a_full_batch_is_written_without_waiting_for_the_interval() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        store.add_user("alice", "ua").await.unwrap();
        let persistence = Persistence::new(store.clone(), Duration::from_secs(3600), 10).start();
        let started = tokio::time::Instant::now();
        for i in 0..10 {
            persistence.do_send(Record::Sighting(sighting(&format!("M{i}"), 1_000)));
        }
        settle(&persistence).await;
        assert_eq!(store.devices(None).await.unwrap().len(), 10);
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "no interval waited"
        );
    }

    #[actix_rt::test]
    async fn pending_sightings_are_visible_per_user() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let persistence = Persistence::new(store, Duration::from_secs(3600), 100).start();
        persistence.do_send(Record::Sighting(sighting("M1", 1_000)));
        let mine = persistence
            .send(PendingFor { uuid: "ua".into() })
            .await
            .unwrap();
        let theirs = persistence
            .send(PendingFor { uuid: "ub".into() })
            .await
            .unwrap();
        assert_eq!((mine.len(), theirs.len()), (1, 0));
    }
}
