//! When a device is offline, and when it is back: this node's record of the devices
//! that left it, with the grace period (`events.offline_after_secs`) that keeps a
//! reconnect, a move between nodes or a flapping link from being an outage.
//!
//! A device whose connection here closes is *away*; if no node holds it when its
//! grace period ends, it is announced *offline*, and when it connects again it is
//! *back online*. Back within the grace period: nothing is said, so a device that
//! flaps yields at most one offline and one back-online per grace period. Devices
//! live here have no record (the registry knows them): an idle device costs the
//! ledger nothing.
//!
//! In cluster mode the node a device arrives at asks every node what it knows
//! ([`Whereabouts`]); the node keeping a record hands it over. When a grace period
//! ends, the node asks again and announces only if no node holds the device and no
//! record outranks its own ([`outranks`]): exactly one node speaks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::cluster::wire::{NodeId, Whereabouts};
use crate::device::DeviceKey;

/// Records kept at most: devices away or announced offline. Past it, a device that
/// leaves is not remembered (no `device.offline` for it); said once in the log and
/// counted in `elfin_bounded_table_overflows_total{table="fleet ledger"}`.
pub const MAX_RECORDS: usize = 1_000_000;

/// How long an offline device is remembered (then its return is `device.online`).
pub const REMEMBER_OFFLINE: Duration = Duration::from_secs(30 * 86_400);

/// What was last known of a device that left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Last {
    pub host: ByteString,
    /// The address its connection came from; none if taken over from the store.
    pub source: Option<SocketAddr>,
    /// When it was last held (its connection closed, or its last sighting).
    pub left: DateTime<Utc>,
}

/// Why a device has a record here: away (its grace period runs), or announced
/// offline.
#[derive(Debug, Clone)]
enum Absence {
    Away {
        last: Last,
        due: Instant,
        adopted: bool,
    },
    Offline {
        last: Last,
        announced: Instant,
    },
}

/// What an arrival means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Back within its grace period (a reconnect, a move): nothing to say.
    Quiet,
    /// Announced offline, now back after `away`.
    BackOnline { left: DateTime<Utc>, away: Duration },
    /// No record here: in cluster mode the other nodes are asked; alone, it is
    /// `device.online`.
    Unknown,
}

/// A grace period that ended: announce it, unless another node holds the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub device: DeviceKey,
    pub last: Last,
    pub adopted: bool,
}

#[derive(Default)]
pub struct Ledger {
    records: HashMap<DeviceKey, Absence>,
    full_said: bool,
}

impl Ledger {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The device's connection here closed: away, due at `due`.
    pub fn left(&mut self, device: DeviceKey, last: Last, due: Instant) {
        self.insert(
            device,
            Absence::Away {
                last,
                due,
                adopted: false,
            },
        );
    }

    /// A device the store saw lately, taken over (after a start, or when the node
    /// holding it was lost) unless there is a record of it already.
    pub fn adopt(&mut self, device: DeviceKey, last: Last, due: Instant) {
        if !self.records.contains_key(&device) {
            self.insert(
                device,
                Absence::Away {
                    last,
                    due,
                    adopted: true,
                },
            );
        }
    }

    fn insert(&mut self, device: DeviceKey, absence: Absence) {
        if self.records.len() >= MAX_RECORDS && !self.records.contains_key(&device) {
            metrics::counter!(crate::metric::BOUNDED_TABLE_OVERFLOWS_TOTAL, "table" => "fleet ledger")
                .increment(1);
            if !self.full_said {
                self.full_said = true;
                log::warn!(
                    "fleet events: {MAX_RECORDS} devices are away or offline; those leaving \
                     now are not remembered (no device.offline for them)"
                );
            }
            return;
        }
        self.records.insert(device, absence);
    }

    /// The device connected here.
    pub fn arrived(&mut self, device: &DeviceKey, now: DateTime<Utc>) -> Arrival {
        match self.records.remove(device) {
            Some(Absence::Away { .. }) => Arrival::Quiet,
            Some(Absence::Offline { last, .. }) => Arrival::BackOnline {
                left: last.left,
                away: (now - last.left).to_std().unwrap_or_default(),
            },
            None => Arrival::Unknown,
        }
    }

    /// The grace periods that ended by `now`. Each stays away (and is asked about
    /// again a grace period later) until [`Ledger::announced`] or [`Ledger::forget`].
    pub fn due(&mut self, now: Instant, grace: Duration) -> Vec<Due> {
        let mut due = Vec::new();
        for (device, record) in &mut self.records {
            if let Absence::Away {
                last,
                due: at,
                adopted,
            } = record
            {
                if *at <= now {
                    *at = now + grace;
                    due.push(Due {
                        device: device.clone(),
                        last: last.clone(),
                        adopted: *adopted,
                    });
                }
            }
        }
        due
    }

    /// Records that the device is announced offline, if it is still away since
    /// `since` (it may have come back while the other nodes were asked): whether
    /// it is to be announced.
    pub fn announced(&mut self, device: &DeviceKey, since: &Last, now: Instant) -> bool {
        match self.records.get_mut(device) {
            Some(record @ Absence::Away { .. }) => {
                let Absence::Away { last, .. } = record else {
                    return false;
                };
                if last.left != since.left {
                    return false;
                }
                *record = Absence::Offline {
                    last: last.clone(),
                    announced: now,
                };
                true
            }
            _ => false,
        }
    }

    pub fn forget(&mut self, device: &DeviceKey) {
        self.records.remove(device);
    }

    /// Forgets devices offline for longer than [`REMEMBER_OFFLINE`].
    pub fn forget_old(&mut self, now: Instant) {
        self.records.retain(|_, r| match r {
            Absence::Offline { announced, .. } => {
                now.saturating_duration_since(*announced) < REMEMBER_OFFLINE
            }
            Absence::Away { .. } => true,
        });
        if self.records.len() < MAX_RECORDS {
            self.full_said = false;
        }
    }

    /// What this node knows of each of `devices` (those it knows), for another node;
    /// `handing_over`: the devices connected there, so their records move with them.
    pub fn tell<'a>(
        &mut self,
        devices: impl IntoIterator<Item = &'a DeviceKey>,
        handing_over: bool,
    ) -> Vec<(DeviceKey, Whereabouts)> {
        let mut told = Vec::new();
        for device in devices {
            let Some(record) = self.records.get(device) else {
                continue;
            };
            let whereabouts = match record {
                Absence::Away { last, adopted, .. } => Whereabouts::Away {
                    left_ms: last.left.timestamp_millis(),
                    adopted: *adopted,
                },
                Absence::Offline { last, .. } => Whereabouts::Offline {
                    left_ms: last.left.timestamp_millis(),
                },
            };
            if handing_over {
                self.records.remove(device);
            }
            told.push((device.clone(), whereabouts));
        }
        told
    }

    /// Every device this node keeps a record of.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceKey> {
        self.records.keys()
    }
}

/// What an arrival means given what the other nodes said of the device.
pub fn arrival_elsewhere(told: &[Whereabouts], now: DateTime<Utc>) -> Arrival {
    let offline = told.iter().filter_map(|w| match w {
        Whereabouts::Offline { left_ms } => DateTime::from_timestamp_millis(*left_ms),
        _ => None,
    });
    if let Some(left) = offline.max() {
        return Arrival::BackOnline {
            left,
            away: (now - left).to_std().unwrap_or_default(),
        };
    }
    if told.is_empty() {
        Arrival::Unknown
    } else {
        Arrival::Quiet
    }
}

/// Whether this node announces its due record `mine` (node `me`), given what the
/// other nodes said of the device: not if one holds it or announced it, nor if
/// another record outranks its own.
pub fn announces(mine: &Due, me: &str, told: &[(NodeId, Whereabouts)]) -> bool {
    let own = (mine.adopted, mine.last.left.timestamp_millis(), me);
    told.iter().all(|(node, w)| match *w {
        Whereabouts::Held | Whereabouts::Offline { .. } => false,
        Whereabouts::Away { left_ms, adopted } => !outranks((adopted, left_ms, node.as_str()), own),
    })
}

/// Two nodes' records of one away device: one from a connection outranks one
/// adopted from the store; then the later departure (the newer holder); then the
/// smaller node name. A total order, so every node agrees on who speaks.
fn outranks(a: (bool, i64, &str), b: (bool, i64, &str)) -> bool {
    let ((a_adopted, a_left, a_node), (b_adopted, b_left, b_node)) = (a, b);
    if a_adopted != b_adopted {
        return !a_adopted;
    }
    if a_left != b_left {
        return a_left > b_left;
    }
    a_node < b_node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mac: &str) -> DeviceKey {
        DeviceKey::new("uuid-1", mac)
    }

    fn last(left: DateTime<Utc>) -> Last {
        Last {
            host: "pump".into(),
            source: None,
            left,
        }
    }

    const GRACE: Duration = Duration::from_secs(300);

    #[test]
    fn a_device_back_within_its_grace_period_is_no_outage() {
        let (mut ledger, now, wall) = (Ledger::default(), Instant::now(), Utc::now());
        ledger.left(key("A"), last(wall), now + GRACE);
        assert!(ledger.due(now + GRACE / 2, GRACE).is_empty());
        assert_eq!(ledger.arrived(&key("A"), wall), Arrival::Quiet);
        assert!(
            ledger.due(now + GRACE * 2, GRACE).is_empty(),
            "nothing left"
        );
    }

    #[test]
    fn a_device_gone_for_its_grace_period_is_offline_then_back_online_once() {
        let (mut ledger, now, wall) = (Ledger::default(), Instant::now(), Utc::now());
        ledger.left(key("A"), last(wall), now + GRACE);
        let due = ledger.due(now + GRACE, GRACE);
        assert_eq!(due.len(), 1);
        assert!(ledger.due(now + GRACE, GRACE).is_empty(), "asked once");
        assert!(ledger.announced(&key("A"), &due[0].last, now + GRACE));
        assert!(
            !ledger.announced(&key("A"), &due[0].last, now + GRACE),
            "once"
        );
        assert!(
            ledger.due(now + GRACE * 5, GRACE).is_empty(),
            "announced once"
        );
        let back = wall + chrono::TimeDelta::seconds(400);
        assert_eq!(
            ledger.arrived(&key("A"), back),
            Arrival::BackOnline {
                left: wall,
                away: Duration::from_secs(400)
            }
        );
        assert_eq!(ledger.arrived(&key("A"), back), Arrival::Unknown);
    }

    #[test]
    fn a_flapping_device_is_announced_at_most_once_per_grace_period() {
        let (mut ledger, start, wall) = (Ledger::default(), Instant::now(), Utc::now());
        let mut announced = 0;
        // Connected for a second every 10 s, for an hour.
        for tick in 0..360u32 {
            let now = start + Duration::from_secs(10) * tick;
            ledger.arrived(&key("A"), wall);
            ledger.left(key("A"), last(wall), now + GRACE);
            for due in ledger.due(now, GRACE) {
                announced += 1;
                ledger.announced(&due.device, &due.last, now);
            }
        }
        assert_eq!(announced, 0);
    }

    #[test]
    fn one_node_speaks_for_a_device_whatever_the_nodes_know() {
        let t = Utc::now();
        let due = |adopted, left: DateTime<Utc>| Due {
            device: key("A"),
            last: last(left),
            adopted,
        };
        let away = |adopted, left: DateTime<Utc>| Whereabouts::Away {
            left_ms: left.timestamp_millis(),
            adopted,
        };
        // Held elsewhere, or already announced: nobody speaks.
        assert!(!announces(
            &due(false, t),
            "a",
            &[("b".into(), Whereabouts::Held)]
        ));
        let announced = Whereabouts::Offline {
            left_ms: t.timestamp_millis(),
        };
        assert!(!announces(&due(false, t), "a", &[("b".into(), announced)]));
        assert!(announces(&due(false, t), "a", &[]));
        // The holder's own record outranks one adopted from the store, both ways.
        assert!(announces(
            &due(false, t),
            "b",
            &[("a".into(), away(true, t))]
        ));
        assert!(!announces(
            &due(true, t),
            "a",
            &[("b".into(), away(false, t))]
        ));
        // Two adopters (two nodes started together): the smaller name speaks.
        assert!(announces(
            &due(true, t),
            "a",
            &[("b".into(), away(true, t))]
        ));
        assert!(!announces(
            &due(true, t),
            "b",
            &[("a".into(), away(true, t))]
        ));
        // Two holders' records: the later departure speaks.
        let later = t + chrono::TimeDelta::seconds(5);
        assert!(announces(
            &due(false, later),
            "z",
            &[("a".into(), away(false, t))]
        ));
        assert!(!announces(
            &due(false, t),
            "a",
            &[("z".into(), away(false, later))]
        ));
    }

    #[test]
    fn a_record_moves_with_the_device_to_the_node_it_arrives_at() {
        let (mut ledger, now, wall) = (Ledger::default(), Instant::now(), Utc::now());
        ledger.left(key("A"), last(wall), now + GRACE);
        ledger.left(key("B"), last(wall), now + GRACE);
        ledger.announced(&key("B"), &last(wall), now);
        let told = ledger.tell([&key("A"), &key("B"), &key("C")], true);
        assert_eq!(told.len(), 2);
        assert!(ledger.is_empty(), "handed over");
        let said: Vec<Whereabouts> = told.into_iter().map(|(_, w)| w).collect();
        match arrival_elsewhere(&said, wall + chrono::TimeDelta::seconds(60)) {
            Arrival::BackOnline { away, .. } => assert_eq!(away.as_secs(), 60),
            other => panic!("{other:?}"),
        }
        assert_eq!(arrival_elsewhere(&[], wall), Arrival::Unknown);
        assert_eq!(
            arrival_elsewhere(&[Whereabouts::Held], wall),
            Arrival::Quiet
        );
    }
}
