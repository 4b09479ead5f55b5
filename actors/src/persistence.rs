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
//! The audit trail ([`crate::audit`]) rides on the same batches: records arrive as
//! [`Audit`] messages, a tunnel's close replaces its open while both wait, and they are
//! written after the batch's sightings, kept through an outage like them (up to
//! [`MAX_AUDIT_PENDING`]; past it the oldest device events are dropped and counted).
//! Records older than the retention are pruned a minute after start, then every
//! [`PRUNE_EVERY`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::time::Instant;

use crate::audit::{Audit, AuditBatch, DeviceEvent, RefusalRecord, TunnelRecord};
use crate::device::Identity;
use crate::metric;
use crate::store::{Recorded, Sighting, Store, StoreError};

const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Audit records waiting at most (through an outage).
pub const MAX_AUDIT_PENDING: usize = 200_000;
/// How often records past the retention are deleted, the first time this long after
/// start.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
pub const PRUNE_FIRST: Duration = Duration::from_secs(60);

/// What a session does on each `beat` of a device whose sightings are stored: refresh
/// last-seen and, unless the device already waits for the next batch, queue it.
pub fn beat(persistence: &Addr<Persistence>, device: &Identity) {
    device.activity.touch();
    if device.activity.queue() {
        persistence.do_send(Record::Beat(device.clone()));
    }
}

pub struct Persistence {
    store: Arc<dyn Store>,
    flush_interval: Duration,
    max_batch: usize,
    /// mac -> newest sighting not written yet.
    pending: HashMap<ByteString, Pending>,
    /// Audit records not written yet: tunnels by id (the newest record of each),
    /// device events and refusals in order.
    tunnels: HashMap<String, TunnelRecord>,
    events: VecDeque<DeviceEvent>,
    refusals: VecDeque<RefusalRecord>,
    /// Sightings and audit records of the write in flight.
    in_flight: usize,
    /// How long audit records are kept.
    retention: Duration,
    /// At most this many audit records wait ([`MAX_AUDIT_PENDING`]).
    audit_bound: usize,
    /// Audit records are being dropped for want of room (logged once until a write
    /// succeeds).
    overflowing: bool,
    /// Set while the store is failing: the current backoff and when to try again.
    outage: Option<(Duration, Instant)>,
    /// Only devices already stored are written (`auth.devices = "registered"`): a
    /// device removed from the database never comes back through a sighting.
    existing_only: bool,
}

impl Persistence {
    pub fn new(store: Arc<dyn Store>, flush_interval: Duration, max_batch: usize) -> Self {
        Self {
            store,
            flush_interval,
            max_batch: max_batch.max(1),
            pending: HashMap::new(),
            tunnels: HashMap::new(),
            events: VecDeque::new(),
            refusals: VecDeque::new(),
            in_flight: 0,
            retention: Duration::from_secs(90 * 86_400),
            audit_bound: MAX_AUDIT_PENDING,
            overflowing: false,
            outage: None,
            existing_only: false,
        }
    }

    /// Writes sightings only of devices already stored (`auth.devices = "registered"`).
    pub fn existing_only(mut self, existing_only: bool) -> Self {
        self.existing_only = existing_only;
        self
    }

    /// Keeps audit records for `retention` (default 90 days).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    fn waiting(&self) -> usize {
        self.pending.len() + self.audit_waiting()
    }

    fn audit_waiting(&self) -> usize {
        self.tunnels.len() + self.events.len() + self.refusals.len()
    }

    fn keep_audit(&mut self, record: Audit) {
        match record {
            Audit::Tunnel(t) => {
                self.tunnels.insert(t.id.clone(), t);
            }
            Audit::Device(e) => self.events.push_back(e),
            Audit::Refusal(r) => self.refusals.push_back(r),
        }
        if self.audit_waiting() <= self.audit_bound {
            return;
        }
        // Past the bound (a long outage): the oldest refusal goes, or else the oldest
        // device event, or else some tunnel's record.
        if self.refusals.pop_front().is_none() && self.events.pop_front().is_none() {
            if let Some(id) = self.tunnels.keys().next().cloned() {
                self.tunnels.remove(&id);
            }
        }
        metrics::counter!(metric::AUDIT_DROPPED_TOTAL).increment(1);
        if !self.overflowing {
            self.overflowing = true;
            log::warn!(
                "more than {MAX_AUDIT_PENDING} audit records wait for the database: dropping \
                 the oldest refusals, then device events, then tunnel records until it takes \
                 them again"
            );
        }
    }

    /// Puts back audit records whose write failed, unless a newer record of the same
    /// tunnel arrived meanwhile.
    fn restore_audit(&mut self, batch: AuditBatch) {
        for t in batch.tunnels {
            self.tunnels.entry(t.id.clone()).or_insert(t);
        }
        for e in batch.events.into_iter().rev() {
            self.events.push_front(e);
        }
        for r in batch.refusals.into_iter().rev() {
            self.refusals.push_front(r);
        }
    }

    /// Deletes audit records past the retention, in the background, then reads how
    /// many the trail holds (`elfin_audit_records{kind}`).
    fn prune(&self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let Ok(retention) = chrono::Duration::from_std(self.retention) else {
            return;
        };
        let before = chrono::Utc::now() - retention;
        ctx.spawn(
            async move {
                match store.prune_audit(before).await {
                    Ok(0) => {}
                    Ok(n) => log::info!("pruned {n} audit records from before {before}"),
                    Err(e) => log::debug!("cannot prune audit records now: {e}"),
                }
                match store.audit_size().await {
                    Ok(size) => {
                        for (kind, n) in [
                            ("tunnels", size.tunnels),
                            ("device_events", size.device_events),
                            ("refusals", size.refusals),
                        ] {
                            metrics::gauge!(metric::AUDIT_RECORDS, "kind" => kind).set(n as f64);
                        }
                    }
                    Err(e) => log::debug!("cannot count audit records now: {e}"),
                }
            }
            .into_actor(self),
        );
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
        if self.in_flight > 0 || self.waiting() == 0 {
            return;
        }
        if !force
            && self
                .outage
                .is_some_and(|(_, retry_at)| Instant::now() < retry_at)
        {
            return;
        }
        let batch = self.take_batch();
        self.in_flight = batch.len();
        let (store, existing_only) = (self.store.clone(), self.existing_only);
        async move {
            let written = batch.write(&*store, existing_only).await;
            (batch, written)
        }
        .into_actor(self)
        .map(|(batch, (recorded, audited)), act, ctx| {
            act.in_flight = 0;
            // Both parts are accounted for; the first failure sets the backoff.
            let sightings = act.sightings_written(batch.sightings, recorded);
            let audit = act.audit_written(batch.audit, audited);
            match sightings.or(audit) {
                None => {
                    act.overflowing = false;
                    if act.outage.take().is_some() {
                        log::info!("database is back; wrote what was pending");
                    }
                }
                Some(e) => act.failed(e),
            }
            metrics::gauge!(metric::SIGHTINGS_PENDING).set(act.pending.len() as f64);
            if act.waiting() >= act.max_batch {
                act.flush(false, ctx);
            }
        })
        .spawn(ctx);
    }

    /// What the next write takes: at most `max_batch` sightings (a backlog after an
    /// outage goes out that many at a time), and as many audit records.
    fn take_batch(&mut self) -> Batch {
        let sightings: Vec<Sighting> = if self.pending.len() <= self.max_batch {
            self.pending.drain().map(|(_, p)| Self::take(p)).collect()
        } else {
            let macs: Vec<ByteString> = self.pending.keys().take(self.max_batch).cloned().collect();
            macs.iter()
                .filter_map(|mac| self.pending.remove(mac))
                .map(Self::take)
                .collect()
        };
        let ids: Vec<String> = self.tunnels.keys().take(self.max_batch).cloned().collect();
        let tunnels: Vec<TunnelRecord> = ids
            .iter()
            .filter_map(|id| self.tunnels.remove(id))
            .collect();
        let room = self.max_batch.saturating_sub(tunnels.len()).max(1);
        let events: Vec<DeviceEvent> = self.events.drain(..self.events.len().min(room)).collect();
        let room = room.saturating_sub(events.len()).max(1);
        let refusals = self
            .refusals
            .drain(..self.refusals.len().min(room))
            .collect();
        Batch {
            sightings,
            audit: AuditBatch {
                tunnels,
                events,
                refusals,
            },
        }
    }

    /// Counts what a write of sightings did; keeps them again if it may succeed later
    /// and answers that failure.
    fn sightings_written(
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

    /// As [`Persistence::sightings_written`], for audit records.
    fn audit_written(
        &mut self,
        batch: AuditBatch,
        result: Result<(), StoreError>,
    ) -> Option<StoreError> {
        let records = batch.len();
        match result {
            Ok(()) => {
                metrics::counter!(metric::AUDIT_WRITTEN_TOTAL).increment(records as u64);
                None
            }
            Err(e) if !e.is_transient() => {
                metrics::counter!(metric::STORE_ERRORS_TOTAL).increment(1);
                metrics::counter!(metric::AUDIT_DROPPED_TOTAL).increment(records as u64);
                log::error!("database refused {records} audit records, dropped: {e}");
                None
            }
            Err(e) => {
                self.restore_audit(batch);
                Some(e)
            }
        }
    }

    /// A write failed transiently: what it held is pending again; retry with backoff.
    fn failed(&mut self, e: StoreError) {
        metrics::counter!(metric::STORE_ERRORS_TOTAL).increment(1);
        let backoff = match self.outage {
            None => {
                log::warn!(
                    "database write failed, keeping {} sightings and {} audit records and \
                     retrying: {e}",
                    self.pending.len(),
                    self.audit_waiting()
                );
                self.flush_interval.min(Duration::from_millis(500))
            }
            Some((backoff, _)) => {
                log::debug!("database still failing ({} pending): {e}", self.waiting());
                (backoff * 2).min(MAX_BACKOFF)
            }
        };
        self.outage = Some((backoff, Instant::now() + backoff));
    }
}

impl Actor for Persistence {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.flush_interval, |act, ctx| act.flush(false, ctx));
        // Not at start, when devices reconnect: a minute later, then hourly.
        ctx.run_later(PRUNE_FIRST, |act, ctx| {
            act.prune(ctx);
            ctx.run_interval(PRUNE_EVERY, |act, ctx| act.prune(ctx));
        });
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
    Beat(Identity),
}

/// What one write takes to the store.
struct Batch {
    sightings: Vec<Sighting>,
    audit: AuditBatch,
}

impl Batch {
    fn len(&self) -> usize {
        self.sightings.len() + self.audit.len()
    }

    /// Writes the sightings, then the audit records (each part only if there is one),
    /// timing each round trip.
    async fn write(
        &self,
        store: &dyn Store,
        existing_only: bool,
    ) -> (Result<Recorded, StoreError>, Result<(), StoreError>) {
        let recorded = if self.sightings.is_empty() {
            Ok(Recorded::default())
        } else {
            let started = std::time::Instant::now();
            let recorded = match existing_only {
                true => store.record_existing(&self.sightings).await,
                false => store.record(&self.sightings).await,
            };
            metrics::histogram!(metric::STORE_ROUND_TRIP_SECONDS, "op" => "record")
                .record(started.elapsed());
            recorded
        };
        let audited = if self.audit.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let audited = store.write_audit(&self.audit).await;
            metrics::histogram!(metric::STORE_ROUND_TRIP_SECONDS, "op" => "audit")
                .record(started.elapsed());
            audited
        };
        (recorded, audited)
    }
}

/// A device waiting for the next batch.
enum Pending {
    At(Sighting),
    Live(Identity),
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

/// Write everything pending now, ignoring backoff. Answers how many sightings are
/// still unwritten (pending or in flight); shutdown repeats it until that is zero.
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

impl Handler<Audit> for Persistence {
    type Result = ();

    fn handle(&mut self, record: Audit, ctx: &mut Context<Self>) {
        self.keep_audit(record);
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
    use crate::store::{Device, OwnedDevice, Recorded, StoreError, User};
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

    #[async_trait]
    impl Store for Flaky {
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
        async fn user_exists(&self, uuid: &str) -> Result<bool, StoreError> {
            self.inner.user_exists(uuid).await
        }
        async fn account(
            &self,
            key: crate::store::AccountKey<'_>,
        ) -> Result<Option<crate::store::Account>, StoreError> {
            self.inner.account(key).await
        }
        async fn user_devices(&self, uuid: &str) -> Result<Option<Vec<Device>>, StoreError> {
            self.inner.user_devices(uuid).await
        }
        async fn add_user(&self, username: &str, uuid: &str) -> Result<(), StoreError> {
            self.inner.add_user(username, uuid).await
        }
        async fn users(&self) -> Result<Vec<User>, StoreError> {
            self.inner.users().await
        }
        async fn devices(&self, owner: Option<&str>) -> Result<Vec<OwnedDevice>, StoreError> {
            self.inner.devices(owner).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn write_audit(&self, batch: &AuditBatch) -> Result<(), StoreError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Transient("outage".into()));
            }
            self.inner.write_audit(batch).await
        }
        async fn members(&self, with_devices: bool) -> Result<crate::store::Members, StoreError> {
            self.inner.members(with_devices).await
        }
        async fn record_existing(&self, batch: &[Sighting]) -> Result<Recorded, StoreError> {
            self.inner.record_existing(batch).await
        }
        async fn remove_device(&self, mac: &str) -> Result<bool, StoreError> {
            self.inner.remove_device(mac).await
        }
        async fn remove_user(&self, username: &str) -> Result<bool, StoreError> {
            self.inner.remove_user(username).await
        }
        async fn set_admin(&self, username: &str, admin: bool) -> Result<bool, StoreError> {
            self.inner.set_admin(username, admin).await
        }
        async fn audit_refusals(
            &self,
            filter: &crate::audit::Filter,
        ) -> Result<Vec<RefusalRecord>, StoreError> {
            self.inner.audit_refusals(filter).await
        }
        async fn audit_size(&self) -> Result<crate::audit::AuditSize, StoreError> {
            self.inner.audit_size().await
        }
        async fn audit_tunnels(
            &self,
            filter: &crate::audit::Filter,
        ) -> Result<Vec<TunnelRecord>, StoreError> {
            self.inner.audit_tunnels(filter).await
        }
        async fn audit_devices(
            &self,
            filter: &crate::audit::Filter,
        ) -> Result<Vec<DeviceEvent>, StoreError> {
            self.inner.audit_devices(filter).await
        }
        async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
            self.inner.prune_audit(before).await
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

    fn event(mac: &str, at_ms: i64) -> Audit {
        Audit::Device(DeviceEvent {
            at: DateTime::<Utc>::from_timestamp_millis(at_ms).unwrap(),
            node: "n".into(),
            uuid: "ua".into(),
            mac: mac.into(),
            host: "h".into(),
            change: crate::audit::DeviceChange::Online,
            address: "192.0.2.1:1".into(),
            cause: None,
        })
    }

    #[actix_rt::test]
    async fn audit_records_wait_out_an_outage_within_their_bound_and_a_tunnel_is_one_row() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky::new(&dir, true, false);
        let mut persistence = Persistence::new(store.clone(), Duration::from_millis(20), 100);
        persistence.audit_bound = 4;
        let persistence = persistence.start();
        let opened = TunnelRecord {
            id: "t1".into(),
            node: "n".into(),
            uuid: "ua".into(),
            device: "M1".into(),
            device_addr: "192.0.2.1:1".into(),
            peer_device: None,
            client_addr: "192.0.2.2:2".into(),
            client_cert: None,
            client_cert_serial: None,
            opened: DateTime::<Utc>::from_timestamp_millis(1_000).unwrap(),
            closed: None,
            cause: None,
            to_device: 0,
            from_device: 0,
        };
        let closed = TunnelRecord {
            closed: Some(DateTime::<Utc>::from_timestamp_millis(2_000).unwrap()),
            cause: Some("client closed".into()),
            to_device: 10,
            ..opened.clone()
        };
        persistence.do_send(Audit::Tunnel(opened));
        for i in 0..5 {
            persistence.do_send(event(&format!("M{i}"), i));
        }
        persistence.do_send(Audit::Tunnel(closed.clone()));
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        assert!(store.attempts.load(Ordering::SeqCst) >= 2, "it retried");

        store.failing.store(false, Ordering::SeqCst);
        settle(&persistence).await;
        let all = crate::audit::Filter {
            limit: 100,
            ..Default::default()
        };
        assert_eq!(store.inner.audit_tunnels(&all).await.unwrap(), [closed]);
        // Bound 4: the tunnel and the three newest events; the two oldest dropped.
        let macs: Vec<String> = store
            .inner
            .audit_devices(&all)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.mac)
            .collect();
        assert_eq!(macs, ["M4", "M3", "M2"]);
    }

    #[actix_rt::test]
    async fn records_past_the_retention_are_pruned_a_minute_after_start() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let Audit::Device(mut old) = event("M1", 0) else {
            unreachable!()
        };
        old.at = Utc::now() - chrono::Duration::days(2);
        let mut new = old.clone();
        new.at = Utc::now();
        let batch = AuditBatch {
            events: vec![old, new],
            ..AuditBatch::default()
        };
        store.write_audit(&batch).await.unwrap();
        let _persistence = Persistence::new(store.clone(), Duration::from_secs(1), 100)
            .with_retention(Duration::from_secs(86_400))
            .start();
        let all = crate::audit::Filter {
            limit: 10,
            ..Default::default()
        };
        actix_rt::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            store.audit_devices(&all).await.unwrap().len(),
            2,
            "not at start"
        );
        actix_rt::time::sleep(Duration::from_secs(31)).await;
        for _ in 0..100 {
            if store.audit_devices(&all).await.unwrap().len() == 1 {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the record from two days ago is still there");
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
