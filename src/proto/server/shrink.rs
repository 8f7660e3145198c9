//! Giving table memory back once allocations have ended. Every table the core keeps grows to its
//! peak and would stay there: after a burst of 100k allocations that all ended, the slot table,
//! the client map and the timer heap would hold their peak's memory for good. Here, on the timer
//! path (never per packet), a table whose live entries fell below a quarter of its room is cut to
//! twice what it holds, which keeps the work amortised: it must fill half way again to grow.

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use super::Core;

/// Below this many entries of room a table is left alone: not worth a reallocation.
const FLOOR: usize = 64;

impl Core {
    /// Shrinks what is mostly empty. Cheap when nothing is: a few length checks.
    pub(super) fn shrink_tables(&mut self) {
        let live = self.by_client.len() + self.pending.len();
        if self.slots.len() > FLOOR && live * 4 < self.slots.len() && live <= self.shrink_below {
            self.cut_slot_tail();
            // The next cut waits until half of what is live now has gone too, so a tail pinned
            // by one long-lived allocation is not scanned again on every timer.
            self.shrink_below = live / 2;
        }
        shrink_map(&mut self.by_client);
        shrink_map(&mut self.own_relays);
        shrink_vec(&mut self.pending);
        shrink_deque(&mut self.commands);
        if self.free_slots.capacity() > FLOOR.max(4 * self.free_slots.len()) {
            self.free_slots.shrink_to(2 * self.free_slots.len());
        }
        self.timers.shrink(self.slots.len());
    }

    /// Cuts the free slots at the end of the table. Free slots are reused lowest first, so after
    /// a burst ends the live ones sit at the front and the tail is free.
    fn cut_slot_tail(&mut self) {
        let pending = self.pending.iter().map(|p| p.slot as usize + 1).max();
        let live = self
            .slots
            .iter()
            .rposition(|s| s.alloc.is_some())
            .map(|i| i + 1);
        let keep = pending.max(live).unwrap_or(0);
        if keep == self.slots.len() {
            return;
        }
        for s in &self.slots[keep..] {
            self.fresh_gen = self.fresh_gen.max(s.gen);
        }
        self.slots.truncate(keep);
        self.free_slots.retain(|&Reverse(s)| (s as usize) < keep);
        if self.slots.capacity() > FLOOR.max(4 * keep) {
            self.slots.shrink_to(2 * keep);
        }
    }

    /// Called when the slot table grows: a later shrink may look again.
    pub(super) fn slots_grew(&mut self) {
        self.shrink_below = self.slots.len();
    }
}

fn shrink_map<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > FLOOR.max(4 * map.len()) {
        map.shrink_to(2 * map.len());
    }
}

fn shrink_vec<T>(v: &mut Vec<T>) {
    if v.capacity() > FLOOR.max(4 * v.len()) {
        v.shrink_to(2 * v.len());
    }
}

fn shrink_deque<T>(v: &mut VecDeque<T>) {
    if v.capacity() > FLOOR.max(4 * v.len()) {
        v.shrink_to(2 * v.len());
    }
}
