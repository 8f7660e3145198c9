//! The core's one timer structure: a deadline per allocation slot, in an indexed min-heap.
//!
//! Each id holds at most one entry. Re-arming moves the entry instead of pushing another, and
//! removing an id frees its entry at once, so the heap never holds more entries than there are
//! live allocations, however often they refresh or churn. (A plain heap with lazy deletion grows
//! by one entry per Refresh until each stale entry's own time comes.)

use std::time::Instant;

const ABSENT: u32 = u32::MAX;

#[derive(Debug, Default)]
pub struct DeadlineQueue {
    /// Min-heap on the deadline.
    heap: Vec<(Instant, u32)>,
    /// Per id: its index in `heap`, or `ABSENT`.
    position: Vec<u32>,
}

impl DeadlineQueue {
    /// Sets (or moves) `id`'s deadline.
    pub fn set(&mut self, id: u32, at: Instant) {
        let i = id as usize;
        if self.position.len() <= i {
            self.position.resize(i + 1, ABSENT);
        }
        match self.position[i] {
            ABSENT => {
                self.heap.push((at, id));
                let last = self.heap.len() - 1;
                self.position[i] = last as u32;
                self.sift_up(last);
            }
            p => {
                let p = p as usize;
                let earlier = at < self.heap[p].0;
                self.heap[p].0 = at;
                if earlier {
                    self.sift_up(p);
                } else {
                    self.sift_down(p);
                }
            }
        }
    }

    /// Forgets `id`'s deadline, if it has one.
    pub fn remove(&mut self, id: u32) {
        let Some(&p) = self.position.get(id as usize) else {
            return;
        };
        if p == ABSENT {
            return;
        }
        let p = p as usize;
        self.position[id as usize] = ABSENT;
        let last = self.heap.len() - 1;
        if p != last {
            self.heap.swap(p, last);
            self.position[self.heap[p].1 as usize] = p as u32;
        }
        self.heap.pop();
        if p < self.heap.len() {
            self.sift_up(p);
            self.sift_down(p);
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.heap.first().map(|&(t, _)| t)
    }

    /// Removes and returns an id whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<u32> {
        let &(t, id) = self.heap.first()?;
        if t > now {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    pub fn deadline(&self, id: u32) -> Option<Instant> {
        match self.position.get(id as usize) {
            Some(&p) if p != ABSENT => Some(self.heap[p as usize].0),
            _ => None,
        }
    }

    /// Entries held: one per id with a deadline.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Gives back room the queue no longer needs: ids from `ids` on are gone (their slots were
    /// cut from the table, free and so without a deadline), and either vector keeps at most
    /// twice what it holds once it is a quarter full. O(1) unless there is something to cut.
    pub fn shrink(&mut self, ids: usize) {
        if self.position.len() > ids {
            debug_assert!(self.position[ids..].iter().all(|&p| p == ABSENT));
            self.position.truncate(ids);
        }
        if self.position.capacity() > 64.max(4 * self.position.len()) {
            self.position.shrink_to(2 * self.position.len());
        }
        if self.heap.capacity() > 64.max(4 * self.heap.len()) {
            self.heap.shrink_to(2 * self.heap.len());
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.position[self.heap[a].1 as usize] = a as u32;
        self.position[self.heap[b].1 as usize] = b as u32;
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[i].0 >= self.heap[parent].0 {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < self.heap.len() && self.heap[l].0 < self.heap[least].0 {
                least = l;
            }
            if r < self.heap.len() && self.heap[r].0 < self.heap[least].0 {
                least = r;
            }
            if least == i {
                break;
            }
            self.swap(i, least);
            i = least;
        }
    }

    #[cfg(test)]
    fn check(&self) {
        for (i, &(t, id)) in self.heap.iter().enumerate() {
            assert_eq!(self.position[id as usize], i as u32);
            if i > 0 {
                assert!(self.heap[(i - 1) / 2].0 <= t);
            }
        }
        let held = self.position.iter().filter(|&&p| p != ABSENT).count();
        assert_eq!(held, self.heap.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        for (id, secs) in [(3, 30), (1, 10), (2, 20), (0, 5)] {
            q.set(id, t0 + Duration::from_secs(secs));
        }
        q.check();
        assert_eq!(q.next(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(q.pop_due(t0 + Duration::from_secs(4)), None);
        let due: Vec<u32> =
            std::iter::from_fn(|| q.pop_due(t0 + Duration::from_secs(20))).collect();
        assert_eq!(due, [0, 1, 2]);
        assert_eq!(q.len(), 1);
        q.check();
    }

    #[test]
    fn rearming_keeps_one_entry_per_id() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        for i in 0..2_000_000u64 {
            q.set(7, t0 + Duration::from_millis(i % 5000));
        }
        assert_eq!(q.len(), 1);
        q.set(7, t0 + Duration::from_secs(100));
        q.set(8, t0 + Duration::from_secs(50));
        q.set(7, t0 + Duration::from_secs(1));
        assert_eq!(q.pop_due(t0 + Duration::from_secs(2)), Some(7));
        assert_eq!(q.deadline(8), Some(t0 + Duration::from_secs(50)));
        q.check();
    }

    #[test]
    fn shrink_gives_back_the_room_of_ended_ids() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        for id in 0..10_000 {
            q.set(id, t0 + Duration::from_millis(u64::from(id)));
        }
        for id in 0..10_000 {
            if id != 3 {
                q.remove(id);
            }
        }
        q.shrink(4);
        q.check();
        assert!(q.heap.capacity() <= 64 && q.position.capacity() <= 64);
        assert_eq!(q.pop_due(t0 + Duration::from_secs(1)), Some(3));
        q.set(9_000, t0);
        assert_eq!(
            q.deadline(9_000),
            Some(t0),
            "ids past the cut come back as new"
        );
    }

    #[test]
    fn remove_frees_the_entry_anywhere_in_the_heap() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        let mut state = 0x1234_5678u64;
        let mut live = std::collections::BTreeMap::new();
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let id = (state % 300) as u32;
            if state % 3 == 0 {
                q.remove(id);
                live.remove(&id);
            } else {
                let at = t0 + Duration::from_millis(state % 10_000);
                q.set(id, at);
                live.insert(id, at);
            }
        }
        q.check();
        assert_eq!(q.len(), live.len());
        for (&id, &at) in &live {
            assert_eq!(q.deadline(id), Some(at));
        }
        let mut last = t0;
        while let Some(t) = q.next() {
            assert!(t >= last);
            last = t;
            let id = q.pop_due(t).unwrap();
            assert_eq!(live.remove(&id), Some(t));
        }
        assert!(live.is_empty() && q.is_empty());
    }
}
