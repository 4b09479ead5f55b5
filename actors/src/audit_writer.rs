//! The `AuditWriter` actor: the audit trail's records ([`crate::audit`]), written in
//! batches like sightings but apart from them, through the [`AuditLog`] role alone.
//!
//! Records arrive as [`Audit`] messages; a tunnel's close replaces its open while both
//! wait. They go to the store as one batch every `flush_interval`, or sooner once
//! `max_batch` wait; one write is in flight at a time. Through an outage they are kept
//! (up to [`MAX_AUDIT_PENDING`]; past it the oldest refusals, then device events, then
//! tunnel records are dropped and counted) and retried with backoff ([`Outage`]);
//! a batch the database refuses for good is dropped and counted. Records older than
//! the retention are pruned a minute after start, then every [`PRUNE_EVERY`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::audit::{Audit, AuditBatch, DeviceEvent, RefusalRecord, TunnelRecord};
use crate::metric;
use crate::persistence::{Flush, Outage};
use crate::store::{AuditLog, StoreError};

/// Audit records waiting at most (through an outage).
pub const MAX_AUDIT_PENDING: usize = 200_000;
/// How often records past the retention are deleted, the first time this long after
/// start.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
pub const PRUNE_FIRST: Duration = Duration::from_secs(60);

pub struct AuditWriter {
    log: Arc<dyn AuditLog>,
    flush_interval: Duration,
    max_batch: usize,
    /// Not written yet: tunnels by id (the newest record of each), device events and
    /// refusals in order.
    tunnels: HashMap<String, TunnelRecord>,
    events: VecDeque<DeviceEvent>,
    refusals: VecDeque<RefusalRecord>,
    /// Records of the write in flight.
    in_flight: usize,
    /// How long records are kept.
    retention: Duration,
    /// At most this many records wait ([`MAX_AUDIT_PENDING`]).
    bound: usize,
    /// Records are being dropped for want of room (logged once until a write
    /// succeeds).
    overflowing: bool,
    outage: Outage,
}

impl AuditWriter {
    pub fn new(log: Arc<dyn AuditLog>, flush_interval: Duration, max_batch: usize) -> Self {
        Self {
            log,
            flush_interval,
            max_batch: max_batch.max(1),
            tunnels: HashMap::new(),
            events: VecDeque::new(),
            refusals: VecDeque::new(),
            in_flight: 0,
            retention: Duration::from_secs(90 * 86_400),
            bound: MAX_AUDIT_PENDING,
            overflowing: false,
            outage: Outage::default(),
        }
    }

    /// Keeps records for `retention` (default 90 days).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    fn waiting(&self) -> usize {
        self.tunnels.len() + self.events.len() + self.refusals.len()
    }

    fn keep(&mut self, record: Audit) {
        match record {
            Audit::Tunnel(t) => {
                self.tunnels.insert(t.id.clone(), t);
            }
            Audit::Device(e) => self.events.push_back(e),
            Audit::Refusal(r) => self.refusals.push_back(r),
        }
        if self.waiting() <= self.bound {
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

    /// Puts back records whose write failed, unless a newer record of the same
    /// tunnel arrived meanwhile.
    fn restore(&mut self, batch: AuditBatch) {
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

    /// Deletes records past the retention, in the background, then reads how many
    /// the trail holds (`elfin_audit_records{kind}`).
    fn prune(&self, ctx: &mut Context<Self>) {
        let log = self.log.clone();
        let Ok(retention) = chrono::Duration::from_std(self.retention) else {
            return;
        };
        let before = chrono::Utc::now() - retention;
        ctx.spawn(
            async move {
                match log.prune_audit(before).await {
                    Ok(0) => {}
                    Ok(n) => log::info!("pruned {n} audit records from before {before}"),
                    Err(e) => log::debug!("cannot prune audit records now: {e}"),
                }
                match log.audit_size().await {
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

    /// Starts a batch write unless one is in flight, nothing waits, or (without
    /// `force`) the store is in backoff.
    fn flush(&mut self, force: bool, ctx: &mut Context<Self>) {
        if self.in_flight > 0 || self.waiting() == 0 || (!force && self.outage.waiting()) {
            return;
        }
        let batch = self.take_batch();
        self.in_flight = batch.len();
        let log = self.log.clone();
        async move {
            let started = std::time::Instant::now();
            let written = log.write_audit(&batch).await;
            metrics::histogram!(metric::STORE_ROUND_TRIP_SECONDS, "op" => "audit")
                .record(started.elapsed());
            (batch, written)
        }
        .into_actor(self)
        .map(|(batch, written), act, ctx| {
            act.in_flight = 0;
            match act.written(batch, written) {
                None => {
                    act.overflowing = false;
                    act.outage.over("audit records");
                }
                Some(e) => {
                    let waiting = act.waiting();
                    act.outage.failed(&e, act.flush_interval, || {
                        format!("{waiting} audit records")
                    });
                }
            }
            if act.waiting() >= act.max_batch {
                act.flush(false, ctx);
            }
        })
        .spawn(ctx);
    }

    /// At most `max_batch` records: tunnels first, then device events, then refusals.
    fn take_batch(&mut self) -> AuditBatch {
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
        AuditBatch {
            tunnels,
            events,
            refusals,
        }
    }

    /// Counts what a write did; keeps the records again if it may succeed later and
    /// answers that failure.
    fn written(&mut self, batch: AuditBatch, result: Result<(), StoreError>) -> Option<StoreError> {
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
                self.restore(batch);
                Some(e)
            }
        }
    }
}

impl Actor for AuditWriter {
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

impl Handler<Audit> for AuditWriter {
    type Result = ();

    fn handle(&mut self, record: Audit, ctx: &mut Context<Self>) {
        self.keep(record);
        if self.waiting() >= self.max_batch {
            self.flush(false, ctx);
        }
    }
}

impl Handler<Flush> for AuditWriter {
    type Result = usize;

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> usize {
        self.flush(true, ctx);
        self.waiting() + self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditSize;
    use crate::store::embedded::EmbeddedStore;
    use async_trait::async_trait;
    use chrono::{DateTime, Utc};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// The real embedded store's audit trail behind a switch that makes writes fail
    /// (a database outage): the one role the writer uses.
    struct Flaky {
        inner: EmbeddedStore,
        failing: AtomicBool,
        attempts: AtomicUsize,
    }

    #[async_trait]
    impl AuditLog for Flaky {
        async fn write_audit(&self, batch: &AuditBatch) -> Result<(), StoreError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Transient("outage".into()));
            }
            self.inner.write_audit(batch).await
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
        async fn audit_refusals(
            &self,
            filter: &crate::audit::Filter,
        ) -> Result<Vec<RefusalRecord>, StoreError> {
            self.inner.audit_refusals(filter).await
        }
        async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
            self.inner.prune_audit(before).await
        }
        async fn audit_size(&self) -> Result<AuditSize, StoreError> {
            self.inner.audit_size().await
        }
    }

    impl Flaky {
        fn new(dir: &tempfile::TempDir, failing: bool) -> Arc<Self> {
            Arc::new(Flaky {
                inner: EmbeddedStore::open(&dir.path().join("db")).unwrap(),
                failing: failing.into(),
                attempts: AtomicUsize::new(0),
            })
        }
    }

    /// Asks until nothing waits or is in flight, at most 5 s of the test's clock.
    async fn settle(writer: &Addr<AuditWriter>) {
        for _ in 0..500 {
            if writer.send(Flush).await.unwrap() == 0 {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("audit records still waiting");
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
    async fn records_wait_out_an_outage_within_their_bound_and_a_tunnel_is_one_row() {
        tokio::time::pause();
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky::new(&dir, true);
        let mut writer = AuditWriter::new(store.clone(), Duration::from_millis(20), 100);
        writer.bound = 4;
        let writer = writer.start();
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
        writer.do_send(Audit::Tunnel(opened));
        for i in 0..5 {
            writer.do_send(event(&format!("M{i}"), i));
        }
        writer.do_send(Audit::Tunnel(closed.clone()));
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        assert!(store.attempts.load(Ordering::SeqCst) >= 2, "it retried");

        store.failing.store(false, Ordering::SeqCst);
        settle(&writer).await;
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
        let _writer = AuditWriter::new(store.clone(), Duration::from_secs(1), 100)
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
}
