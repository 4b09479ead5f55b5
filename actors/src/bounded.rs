//! A table of per-peer state with a fixed number of entries that fails closed.
//!
//! Pacing, failed look-ups and log rate limits keep one entry per source; an attacker
//! who rotates sources must neither grow such a table without bound nor escape it by
//! filling it. [`BoundedMap`] keeps at most `capacity` entries, each forgotten once it
//! has not been touched for `forget_after`. A new key finds room by evicting the
//! entry touched longest ago if that one is forgotten; when every entry is still live,
//! the new key shares one *overflow* entry with every other key that found no room,
//! and keeps sharing it while that entry is live: the table paces all newcomers
//! together rather than none of them. That is logged once per episode and counted in
//! `elfin_bounded_table_overflows_total{table}`. Every operation is O(log n).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use crate::metric;

/// Forgotten entries evicted on each new key beyond what makes room.
const SWEEP_PER_INSERT: usize = 2;

/// When an entry was last touched; the sequence number orders equal instants.
type Touched = (Instant, u64);

pub struct BoundedMap<K, V> {
    /// Names the table in the log line and the metric.
    name: &'static str,
    capacity: usize,
    forget_after: Duration,
    entries: HashMap<K, Slot<V>>,
    by_touch: BTreeMap<Touched, K>,
    overflow: Option<Slot<V>>,
    /// Whether the current overflow episode was logged.
    overflowing: bool,
    seq: u64,
}

struct Slot<V> {
    value: V,
    touched: Touched,
}

impl<K: Clone + Eq + Hash, V> BoundedMap<K, V> {
    pub fn new(name: &'static str, capacity: usize, forget_after: Duration) -> Self {
        Self {
            name,
            capacity: capacity.max(1),
            forget_after,
            entries: HashMap::new(),
            by_touch: BTreeMap::new(),
            overflow: None,
            overflowing: false,
            seq: 0,
        }
    }

    /// The live entry that stands for `key`: its own, or the shared overflow entry
    /// while `key` has none and the overflow entry is live.
    pub fn get(&self, key: &K, now: Instant) -> Option<&V> {
        match self.entries.get(key) {
            Some(slot) => self.live(slot, now).then_some(&slot.value),
            None => self
                .overflow
                .as_ref()
                .filter(|slot| self.live(slot, now))
                .map(|slot| &slot.value),
        }
    }

    /// The entry that stands for `key`, touched now: its own (made by `make` if it
    /// has none or its old one was forgotten), or the overflow entry when the table
    /// is full of live entries. Says which with [`Place`].
    pub fn touch(&mut self, key: &K, now: Instant, make: impl FnOnce() -> V) -> (&mut V, Place) {
        let stamp = self.stamp(now);
        if let Some(old) = self.entries.get(key).map(|slot| slot.touched) {
            self.by_touch.remove(&old);
            self.by_touch.insert(stamp, key.clone());
            let slot = self.entries.get_mut(key).expect("present");
            if now.duration_since(old.0) >= self.forget_after {
                slot.value = make();
            }
            slot.touched = stamp;
            return (&mut slot.value, Place::Own);
        }
        if self.overflow_in_use(now) || !self.make_room(now) {
            return (self.overflow_entry(stamp, make), Place::Shared);
        }
        self.overflowing = false;
        self.by_touch.insert(stamp, key.clone());
        let slot = self.entries.entry(key.clone()).or_insert(Slot {
            value: make(),
            touched: stamp,
        });
        (&mut slot.value, Place::Own)
    }

    pub fn remove(&mut self, key: &K) {
        if let Some(slot) = self.entries.remove(key) {
            self.by_touch.remove(&slot.touched);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn live(&self, slot: &Slot<V>, now: Instant) -> bool {
        now.duration_since(slot.touched.0) < self.forget_after
    }

    fn stamp(&mut self, now: Instant) -> Touched {
        self.seq += 1;
        (now, self.seq)
    }

    /// Whether newcomers still share the overflow entry (it is live).
    fn overflow_in_use(&self, now: Instant) -> bool {
        self.overflow
            .as_ref()
            .is_some_and(|slot| self.live(slot, now))
    }

    /// Evicts forgotten entries, oldest first: a few on every new key (so the table
    /// holds about what is live, not what ever came), and as many as it takes for one
    /// more to fit. False if the table is full of live entries.
    fn make_room(&mut self, now: Instant) -> bool {
        let mut swept = 0;
        loop {
            let full = self.entries.len() >= self.capacity;
            if !full && swept >= SWEEP_PER_INSERT {
                return true;
            }
            let Some((&touched, _)) = self.by_touch.first_key_value() else {
                return true;
            };
            if now.duration_since(touched.0) < self.forget_after {
                return !full;
            }
            if let Some((_, key)) = self.by_touch.pop_first() {
                self.entries.remove(&key);
            }
            swept += 1;
        }
    }

    fn overflow_entry(&mut self, stamp: Touched, make: impl FnOnce() -> V) -> &mut V {
        if !self.overflowing {
            self.overflowing = true;
            log::warn!(
                "{}: {} sources are tracked, each active within {:?}; sources beyond them \
                 now share one entry (paced together, not let through) until old ones \
                 are forgotten",
                self.name,
                self.capacity,
                self.forget_after
            );
        }
        metrics::counter!(metric::BOUNDED_TABLE_OVERFLOWS_TOTAL, "table" => self.name).increment(1);
        let live = self.overflow_in_use(stamp.0);
        match &mut self.overflow {
            Some(slot) if live => slot.touched = stamp,
            // None yet, or the last episode's was forgotten: start afresh.
            _ => {
                self.overflow = Some(Slot {
                    value: make(),
                    touched: stamp,
                })
            }
        }
        &mut self.overflow.as_mut().expect("just set").value
    }
}

/// At most once per `every` per key, for log lines: a [`BoundedMap`] of when each key
/// was last let through (so, full, the newcomers share one turn).
pub struct OncePer<K> {
    every: Duration,
    last: BoundedMap<K, Option<Instant>>,
}

impl<K: Clone + Eq + Hash> OncePer<K> {
    pub fn new(name: &'static str, capacity: usize, every: Duration) -> Self {
        Self {
            every,
            last: BoundedMap::new(name, capacity, every),
        }
    }

    /// Whether `key` may go now (and then not again for `every`).
    pub fn first(&mut self, key: &K) -> bool {
        let now = Instant::now();
        let (last, _) = self.last.touch(key, now, || None);
        match last {
            Some(at) if now.duration_since(*at) < self.every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

/// Per-key counts within a fixed window, for a budget every device has an entry in
/// (its events in ten minutes): keyed by a 64-bit hash of the key, 8 bytes of count,
/// no eviction index — about 30 bytes a key where a [`BoundedMap`] of two strings
/// takes ten times that. Keys last counted two windows ago are swept once a window.
/// Full ([`WindowCounts::new`]'s capacity), a newcomer counts as over its budget (fail
/// closed), logged once and counted in `elfin_bounded_table_overflows_total`.
pub struct WindowCounts {
    name: &'static str,
    capacity: usize,
    window: Duration,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
    counts: HashMap<u64, WindowCount>,
    swept: Instant,
    overflowing: bool,
}

#[derive(Debug, Clone, Copy)]
struct WindowCount {
    /// The window's start, in seconds since `epoch`.
    start: u32,
    counted: u16,
    left_out: u16,
}

/// What [`WindowCounts::take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Within the budget: go ahead.
    pub within: bool,
    /// How many the key's previous window left out (said with its next record).
    pub earlier: u32,
    /// This was the first one left out in this window (to say once).
    pub first_left_out: bool,
}

impl WindowCounts {
    pub fn new(name: &'static str, capacity: usize, window: Duration) -> Self {
        let now = Instant::now();
        Self {
            name,
            capacity: capacity.max(1),
            window,
            hasher: Default::default(),
            epoch: now,
            counts: HashMap::new(),
            swept: now,
            overflowing: false,
        }
    }

    /// Counts one for `key` against `limit` a window.
    pub fn take(&mut self, key: &impl Hash, limit: u32, now: Instant) -> Counted {
        use std::hash::BuildHasher;
        let window = self.window.as_secs().max(1) as u32;
        let secs = now.saturating_duration_since(self.epoch).as_secs() as u32;
        if now.saturating_duration_since(self.swept) >= self.window {
            self.swept = now;
            self.counts
                .retain(|_, c| secs.saturating_sub(c.start) < 2 * window);
        }
        let id = self.hasher.hash_one(key);
        if !self.counts.contains_key(&id) && self.counts.len() >= self.capacity {
            if !self.overflowing {
                self.overflowing = true;
                log::warn!(
                    "{}: {} keys are counted; newcomers count as over their budget until \
                     old ones are swept",
                    self.name,
                    self.capacity
                );
            }
            metrics::counter!(metric::BOUNDED_TABLE_OVERFLOWS_TOTAL, "table" => self.name)
                .increment(1);
            return Counted {
                within: false,
                earlier: 0,
                first_left_out: false,
            };
        }
        self.overflowing = false;
        let count = self.counts.entry(id).or_insert(WindowCount {
            start: secs,
            counted: 0,
            left_out: 0,
        });
        let mut earlier = 0;
        if secs.saturating_sub(count.start) >= window {
            earlier = u32::from(count.left_out);
            *count = WindowCount {
                start: secs,
                counted: 0,
                left_out: 0,
            };
        }
        if u32::from(count.counted) < limit {
            count.counted += 1;
            Counted {
                within: true,
                earlier,
                first_left_out: false,
            }
        } else {
            count.left_out = count.left_out.saturating_add(1);
            Counted {
                within: false,
                earlier,
                first_left_out: count.left_out == 1,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// Where [`BoundedMap::touch`] filed a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The key's own entry.
    Own,
    /// The overflow entry every newcomer shares while the table is full.
    Shared,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn window_counts_bound_each_key_and_say_what_the_last_window_left_out() {
        let window = Duration::from_secs(600);
        let mut counts = WindowCounts::new("test", 2, window);
        let now = Instant::now();
        let taken: Vec<Counted> = (0..5).map(|_| counts.take(&"a", 3, now)).collect();
        assert_eq!(taken.iter().filter(|c| c.within).count(), 3);
        assert!(taken[3].first_left_out && !taken[4].first_left_out);
        assert!(counts.take(&"b", 3, now).within);
        // Full: a third key is refused, not let through.
        assert!(!counts.take(&"c", 3, now).within);
        // The next window: room again, and what was left out is said.
        let later = now + window;
        let next = counts.take(&"a", 3, later);
        assert_eq!((next.within, next.earlier), (true, 2));
        // Two windows on, keys not counted since are swept.
        let much_later = now + 3 * window;
        assert!(counts.take(&"c", 3, much_later).within);
        assert_eq!(counts.len(), 1);
    }

    const FORGET: Duration = Duration::from_secs(60);

    fn table(capacity: usize) -> BoundedMap<u32, u32> {
        BoundedMap::new("test", capacity, FORGET)
    }

    fn bump(t: &mut BoundedMap<u32, u32>, key: u32) -> (u32, Place) {
        let (count, place) = t.touch(&key, Instant::now(), || 0);
        *count += 1;
        (*count, place)
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_entries_while_there_is_room() {
        let mut t = table(3);
        assert_eq!(bump(&mut t, 1), (1, Place::Own));
        assert_eq!(bump(&mut t, 1), (2, Place::Own));
        assert_eq!(bump(&mut t, 2), (1, Place::Own));
        assert_eq!(t.get(&1, Instant::now()), Some(&2));
        assert_eq!(t.get(&3, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_files_newcomers_together_and_looks_them_up_there() {
        let mut t = table(2);
        bump(&mut t, 1);
        bump(&mut t, 2);
        assert_eq!(bump(&mut t, 3), (1, Place::Shared));
        assert_eq!(bump(&mut t, 4), (2, Place::Shared), "one entry for all");
        // A newcomer that never touched the table is looked up there too.
        assert_eq!(t.get(&5, Instant::now()), Some(&2));
        // Old keys keep their own.
        assert_eq!(t.get(&1, Instant::now()), Some(&1));
        assert_eq!(t.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_entries_make_room_oldest_first() {
        let mut t = table(2);
        bump(&mut t, 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        bump(&mut t, 2);
        tokio::time::advance(Duration::from_secs(31)).await;
        // 1 is forgotten, 2 is not: 3 takes 1's place.
        assert_eq!(bump(&mut t, 3), (1, Place::Own));
        assert_eq!(t.get(&1, Instant::now()), None);
        assert_eq!(t.get(&2, Instant::now()), Some(&1));
        // Full of live entries again.
        assert_eq!(bump(&mut t, 4), (1, Place::Shared));
        // While the overflow entry is live, newcomers keep sharing it even when
        // room appears; once it is forgotten they get their own.
        tokio::time::advance(FORGET).await;
        assert_eq!(bump(&mut t, 5), (1, Place::Own));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_entry_starts_afresh() {
        let mut t = table(2);
        bump(&mut t, 1);
        bump(&mut t, 1);
        tokio::time::advance(FORGET).await;
        assert_eq!(t.get(&1, Instant::now()), None);
        assert_eq!(bump(&mut t, 1), (1, Place::Own));
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_entries_go_as_new_keys_come_well_before_it_is_full() {
        let mut t = table(1_000);
        for key in 0..100 {
            bump(&mut t, key);
        }
        tokio::time::advance(FORGET).await;
        for key in 100..150 {
            bump(&mut t, key);
        }
        assert_eq!(t.len(), 50, "the 100 forgotten ones went, two per new key");
    }

    #[tokio::test(start_paused = true)]
    async fn it_never_holds_more_than_its_capacity() {
        let mut t = table(100);
        for key in 0..10_000 {
            bump(&mut t, key);
            assert!(t.len() <= 100);
        }
        t.remove(&0);
        assert_eq!(t.len(), 99);
    }
}
