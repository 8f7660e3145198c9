//! Relay to relay across shards, in memory: a datagram that one shard's relay sends to a UDP
//! relay socket of another shard (two clients of this server in one call, their allocations
//! made on different shards) is handed to that shard instead of going through the kernel.
//!
//! The kernel hop costs a UDP send on one shard and a receive on the other, about 3 us per
//! datagram here. A handover costs a copy into the sender's outgoing parcel, one lock and at
//! most one wake-up of the receiving shard per flush, however many datagrams the parcel holds;
//! the receiver then runs each through the core exactly as if its relay socket had read it.
//! Without this, with N shards, (N - 1) / N of such calls took the kernel hop.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// A mailbox holding this many bytes (payloads plus [`HEADER_COST`] per datagram) refuses more,
/// as a full socket buffer would: the receiving shard is that far behind.
pub const MAILBOX_LIMIT: usize = 1 << 20;

/// What a datagram costs against the limit besides its payload: its header's memory, so that
/// a flood of empty datagrams is bounded too (like the kernel's per-skb overhead).
pub const HEADER_COST: usize = std::mem::size_of::<Header>();

/// Buffers grown past this by a burst are given back once it is over.
const KEEP_CAPACITY: usize = 64 << 10;

/// Datagrams in order: where each goes, where it is from, and its payload in `bytes`.
#[derive(Default)]
pub struct Parcel {
    headers: Vec<Header>,
    bytes: Vec<u8>,
}

struct Header {
    to: SocketAddr,
    from: SocketAddr,
    len: usize,
}

impl Parcel {
    pub fn push(&mut self, to: SocketAddr, from: SocketAddr, payload: &[u8]) {
        self.headers.push(Header {
            to,
            from,
            len: payload.len(),
        });
        self.bytes.extend_from_slice(payload);
    }

    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.headers.len()
    }

    /// (to, from, payload) of each datagram, in the order they were pushed.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, SocketAddr, &[u8])> {
        let mut at = 0;
        self.headers.iter().map(move |h| {
            let payload = &self.bytes[at..at + h.len];
            at += h.len;
            (h.to, h.from, payload)
        })
    }

    /// Empties the parcel, and hands back the memory a burst grew it to.
    pub fn clear(&mut self) {
        self.headers.clear();
        self.bytes.clear();
        self.headers.shrink_to(KEEP_CAPACITY / HEADER_COST);
        self.bytes.shrink_to(KEEP_CAPACITY);
    }

    fn cost(&self) -> usize {
        self.bytes.len() + self.headers.len() * HEADER_COST
    }

    fn append(&mut self, other: &mut Parcel) {
        self.headers.append(&mut other.headers);
        self.bytes.append(&mut other.bytes);
    }
}

struct Mailbox {
    parcel: Mutex<Parcel>,
    arrived: Notify,
}

/// One mailbox per shard, shared by all of them.
pub struct Mailboxes {
    boxes: Box<[Mailbox]>,
}

impl Mailboxes {
    /// Mailboxes for `shards` shards; `None` where a handover cannot be addressed (the relay
    /// table names owners in a byte, so past 256 shards everything takes the kernel hop).
    pub fn new(shards: usize) -> Option<Mailboxes> {
        (2..=256).contains(&shards).then(|| Mailboxes {
            boxes: (0..shards)
                .map(|_| Mailbox {
                    parcel: Mutex::new(Parcel::default()),
                    arrived: Notify::new(),
                })
                .collect(),
        })
    }

    fn lock(&self, shard: usize) -> Option<MutexGuard<'_, Parcel>> {
        // Held only to move buffers: a poisoned lock still guards a consistent parcel.
        let m = self.boxes.get(shard)?;
        Some(m.parcel.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Moves `out` into shard `shard`'s mailbox and leaves `out` empty. Returns how many
    /// datagrams were dropped instead: all of `out` when the mailbox is full or there is no
    /// such shard.
    pub fn post(&self, shard: u8, out: &mut Parcel) -> usize {
        let shard = usize::from(shard);
        let Some(mut inbox) = self.lock(shard) else {
            let n = out.len();
            out.clear();
            return n;
        };
        if inbox.cost() + out.cost() > MAILBOX_LIMIT {
            drop(inbox);
            let n = out.len();
            out.clear();
            return n;
        }
        let was_empty = inbox.is_empty();
        if was_empty {
            // The usual case: hand over the buffers, get the receiver's spent (empty) ones back.
            std::mem::swap(&mut *inbox, out);
        } else {
            inbox.append(out);
        }
        drop(inbox);
        if was_empty {
            // A mailbox that held something has a wake-up pending already.
            self.boxes[shard].arrived.notify_one();
        }
        0
    }

    /// Waits until shard `shard`'s mailbox holds datagrams, then swaps them into `into`, which
    /// must be empty.
    pub async fn collect(&self, shard: usize, into: &mut Parcel) {
        debug_assert!(into.is_empty());
        let Some(mailbox) = self.boxes.get(shard) else {
            return std::future::pending().await;
        };
        loop {
            if let Some(mut inbox) = self.lock(shard) {
                if !inbox.is_empty() {
                    std::mem::swap(&mut *inbox, into);
                    return;
                }
            }
            // A post after the look above stored a permit: this returns at once then.
            mailbox.arrived.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_or_past_256_shards_have_no_mailboxes() {
        assert!(Mailboxes::new(1).is_none());
        assert!(Mailboxes::new(257).is_none());
        assert!(Mailboxes::new(256).is_some());
    }

    #[tokio::test]
    async fn datagrams_arrive_in_order_across_posts() {
        let boxes = Mailboxes::new(2).unwrap();
        let mut out = Parcel::default();
        out.push(addr(1), addr(2), b"one");
        out.push(addr(1), addr(3), b"");
        assert_eq!(boxes.post(1, &mut out), 0);
        assert!(out.is_empty());
        out.push(addr(4), addr(2), b"three");
        assert_eq!(boxes.post(1, &mut out), 0);
        let mut got = Parcel::default();
        boxes.collect(1, &mut got).await;
        let seen: Vec<_> = got.iter().map(|(t, f, p)| (t, f, p.to_vec())).collect();
        assert_eq!(
            seen,
            vec![
                (addr(1), addr(2), b"one".to_vec()),
                (addr(1), addr(3), vec![]),
                (addr(4), addr(2), b"three".to_vec()),
            ]
        );
    }

    #[test]
    fn empty_datagrams_count_against_the_limit() {
        let boxes = Mailboxes::new(2).unwrap();
        let mut out = Parcel::default();
        let fit = MAILBOX_LIMIT / HEADER_COST;
        for _ in 0..fit {
            out.push(addr(1), addr(2), b"");
        }
        assert_eq!(boxes.post(1, &mut out), 0);
        out.push(addr(1), addr(2), b"");
        assert_eq!(
            boxes.post(1, &mut out),
            1,
            "one more empty datagram is refused"
        );
    }

    #[test]
    fn a_full_mailbox_or_an_unknown_shard_drops_the_parcel() {
        let boxes = Mailboxes::new(2).unwrap();
        let mut out = Parcel::default();
        out.push(addr(1), addr(2), &vec![0u8; MAILBOX_LIMIT - HEADER_COST]);
        assert_eq!(boxes.post(0, &mut out), 0);
        out.push(addr(1), addr(2), b"x");
        out.push(addr(1), addr(2), b"y");
        assert_eq!(boxes.post(0, &mut out), 2);
        assert!(out.is_empty());
        out.push(addr(1), addr(2), b"z");
        assert_eq!(boxes.post(9, &mut out), 1);
    }

    #[test]
    fn a_post_from_another_thread_wakes_the_collector() {
        let boxes = std::sync::Arc::new(Mailboxes::new(2).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let poster = std::sync::Arc::clone(&boxes);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mut out = Parcel::default();
            out.push(addr(1), addr(2), b"late");
            poster.post(0, &mut out)
        });
        let mut got = Parcel::default();
        rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                boxes.collect(0, &mut got),
            )
            .await
            .expect("the post woke the collector")
        });
        assert_eq!(t.join().unwrap(), 0);
        assert_eq!(got.len(), 1);
    }
}
