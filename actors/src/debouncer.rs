//! The `HeartbeatDebouncer` actor: when to persist last-seen of devices that stream data.
//!
//! Devices that stream data send no heartbeats, and persisting last-seen on every data
//! frame would flood the database. Per device there are two timers of one period
//! (`docs/PROTOCOL.md` §4): the first frame starts timer 1; the next frame while it runs
//! starts timer 2, and every later frame restarts timer 2. When timer 1 fires, last-seen
//! is persisted and timer 2, if any, becomes timer 1; otherwise the device is dropped.
//!
//! Sessions do not message the debouncer per frame: [`data_frame`] stamps the device's
//! shared [`Activity`] and sends [`DataSeen`] only when the device is not tracked yet. Since
//! timer 2 always ends one period after the latest frame, the debouncer can rebuild it
//! when timer 1 fires: a frame newer than timer 1's start means timer 2 exists and
//! runs until `latest frame + period`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use crate::clock::Stamp;
use crate::device::{DeviceKey, Identity};
use crate::persistence::Record;

/// What a session does on each device data frame: refresh last-seen and, if the
/// debouncer does not track the device yet, tell it.
pub fn data_frame(debouncer: &Addr<HeartbeatDebouncer>, device: &Arc<Identity>) {
    device.activity.touch();
    if device.activity.arm() {
        debouncer.do_send(DataSeen {
            device: device.clone(),
            at: device.activity.last_seen(),
        });
    }
}

pub struct HeartbeatDebouncer {
    period: Duration,
    persist: Recipient<Record>,
    devices: HashMap<DeviceKey, Timer>,
}

struct Timer {
    device: Arc<Identity>,
    /// When the running timer 1 started; frames after it mean timer 2 runs.
    since: Stamp,
    handle: SpawnHandle,
}

impl HeartbeatDebouncer {
    pub fn new(period: Duration, persist: Recipient<Record>) -> Self {
        Self {
            period,
            persist,
            devices: HashMap::new(),
        }
    }

    fn schedule(&self, key: DeviceKey, at: Stamp, ctx: &mut Context<Self>) -> SpawnHandle {
        let delay = at.instant().saturating_duration_since(Instant::now());
        ctx.run_later(delay, move |act, ctx| act.fire(key, ctx))
    }

    fn persist(&self, timer: &Timer) {
        self.persist
            .do_send(Record::Sighting(timer.device.sighting()));
    }

    /// Timer 1 of `key` fired.
    fn fire(&mut self, key: DeviceKey, ctx: &mut Context<Self>) {
        let Some(timer) = self.devices.get(&key) else {
            return;
        };
        self.persist(timer);
        let now = Stamp::now();
        let activity = &timer.device.activity;
        let mut latest = activity.last_seen();
        if latest <= timer.since {
            // No timer 2. A frame racing with this check saw the device armed and sent
            // nothing, so look once more after disarming.
            activity.disarm();
            latest = activity.last_seen();
            if latest <= timer.since || !activity.arm() {
                self.devices.remove(&key);
                return;
            }
        }
        // Timer 2 becomes timer 1, still ending one period after the latest frame.
        let handle = self.schedule(key.clone(), latest + self.period, ctx);
        if let Some(timer) = self.devices.get_mut(&key) {
            timer.since = now;
            timer.handle = handle;
        }
    }
}

impl Actor for HeartbeatDebouncer {
    type Context = Context<Self>;
}

/// A data frame of a device the debouncer does not track yet (see [`data_frame`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DataSeen {
    pub device: Arc<Identity>,
    /// When the frame arrived.
    pub at: Stamp,
}

/// Persist every tracked device now and stop tracking them (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushAll;

impl Handler<DataSeen> for HeartbeatDebouncer {
    type Result = ();

    fn handle(&mut self, msg: DataSeen, ctx: &mut Context<Self>) {
        let key = msg.device.key.clone();
        if let Some(timer) = self.devices.get_mut(&key) {
            // The device came back on a new connection while its timer runs: that
            // frame counts as one more frame of the same device.
            timer.device = msg.device;
            return;
        }
        let handle = self.schedule(key.clone(), msg.at + self.period, ctx);
        self.devices.insert(
            key,
            Timer {
                device: msg.device,
                since: msg.at,
                handle,
            },
        );
    }
}

impl Handler<FlushAll> for HeartbeatDebouncer {
    type Result = ();

    fn handle(&mut self, _: FlushAll, ctx: &mut Context<Self>) {
        for timer in std::mem::take(&mut self.devices).into_values() {
            ctx.cancel_future(timer.handle);
            self.persist(&timer);
            timer.device.activity.disarm();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use chrono::{DateTime, Utc};

    /// What the debouncer persisted: when (paused time since start) and which last-seen.
    #[derive(Default, Clone)]
    struct Sink(Arc<Mutex<Vec<Write>>>);

    /// When (paused time since start) a last-seen was persisted, and its value.
    type Write = (Duration, DateTime<Utc>);

    struct SinkActor(Sink, Instant);

    impl Actor for SinkActor {
        type Context = Context<Self>;
    }

    impl Handler<Record> for SinkActor {
        type Result = ();
        fn handle(&mut self, msg: Record, _: &mut Context<Self>) {
            let Record::Sighting(s) = msg else {
                panic!("the debouncer sends sightings")
            };
            self.0 .0.lock().unwrap().push((self.1.elapsed(), s.at));
        }
    }

    const PERIOD: Duration = Duration::from_secs(30);

    /// One device's data frames against a debouncer, on tokio's paused clock.
    struct Device {
        debouncer: Addr<HeartbeatDebouncer>,
        device: Arc<Identity>,
        writes: Sink,
        start: Instant,
    }

    impl Device {
        fn start() -> Self {
            tokio::time::pause();
            let writes = Sink::default();
            let start = Instant::now();
            let sink = SinkActor(writes.clone(), start).start();
            Self {
                debouncer: HeartbeatDebouncer::new(PERIOD, sink.recipient()).start(),
                device: Identity::new("u", "m", "h"),
                writes,
                start,
            }
        }

        /// One data frame of the device, as a session handles it.
        fn frame(&self) {
            data_frame(&self.debouncer, &self.device);
        }

        /// Sleeps until `secs` after the start (the paused clock auto-advances from one
        /// due timer to the next, so every timer fires at its own deadline).
        async fn at(&self, secs: u64) {
            tokio::time::sleep_until(self.start + Duration::from_secs(secs)).await;
        }

        /// The whole seconds after the start at which last-seen was persisted, looked at
        /// half a second after `secs` so that everything due at `secs` has run.
        async fn writes_by(&self, secs: u64) -> Vec<u64> {
            let at = self.start + Duration::from_secs(secs) + Duration::from_millis(500);
            tokio::time::sleep_until(at).await;
            self.writes
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(t, _)| t.as_secs())
                .collect()
        }
    }

    #[actix_rt::test]
    async fn a_single_frame_is_persisted_once_after_one_period() {
        let dev = Device::start();
        dev.frame();
        assert_eq!(dev.writes_by(29).await, [0; 0]);
        assert_eq!(dev.writes_by(30).await, [30]);
        assert_eq!(
            dev.writes_by(150).await,
            [30],
            "no timer left after a lone frame"
        );
    }

    #[actix_rt::test]
    async fn a_second_frame_starts_timer_two_which_takes_over() {
        let dev = Device::start();
        dev.frame(); // t=0: timer 1 until 30
        dev.at(10).await;
        dev.frame(); // t=10: timer 2 until 40
        assert_eq!(dev.writes_by(39).await, [30]);
        assert_eq!(
            dev.writes_by(40).await,
            [30, 40],
            "timer 2 became timer 1 and fired"
        );
        assert_eq!(dev.writes_by(200).await, [30, 40]);
    }

    #[actix_rt::test]
    async fn later_frames_restart_timer_two() {
        let dev = Device::start();
        dev.frame(); // timer 1: 0..30
        dev.at(5).await;
        dev.frame(); // timer 2: 5..35
        dev.at(15).await;
        dev.frame(); // timer 2 restarted: 15..45
        assert_eq!(dev.writes_by(44).await, [30]);
        assert_eq!(dev.writes_by(45).await, [30, 45]);
        assert_eq!(dev.writes_by(200).await, [30, 45]);
    }

    #[actix_rt::test]
    async fn continuous_traffic_writes_once_per_period_and_once_after() {
        let dev = Device::start();
        for t in 0..300 {
            dev.at(t).await;
            dev.frame(); // one frame a second, t = 0..=299
        }
        // Timer 1 fires every 30 s (the frame of that very second has just restarted
        // timer 2, which takes over); the last frame, at 299, is persisted at 329.
        let mut want: Vec<u64> = (1..=10).map(|k| 30 * k).collect();
        want.push(329);
        assert_eq!(dev.writes_by(400).await, want);
        let (_, last_seen) = *dev.writes.0.lock().unwrap().last().unwrap();
        assert_eq!(last_seen, dev.device.activity.last_seen().to_utc());
    }

    #[actix_rt::test]
    async fn flush_all_persists_tracked_devices_at_once() {
        let dev = Device::start();
        dev.frame();
        dev.at(1).await;
        dev.debouncer.send(FlushAll).await.unwrap();
        assert_eq!(dev.writes_by(1).await, [1]);
        assert_eq!(dev.writes_by(100).await, [1], "the flushed timer is gone");
    }
}
