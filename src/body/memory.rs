//! One budget for every request body held in memory, across all connections.
//!
//! `body_buffer` bounds one body; without a bound on their sum, 10,000 connections (or one
//! HTTP/2 connection's 128 streams each) sending just under it would hold gigabytes. Past
//! the budget a body goes to its temporary file as a large one does: nothing is refused,
//! memory stays bounded, and only disk takes the excess.

use std::sync::Arc;

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};

/// The bytes held (the gauge is the count itself: one atomic, no scrape hook) and the
/// spool counters.
pub struct BodyMemory {
    held: IntGauge,
    spooled_large: IntCounter,
    spooled_memory: IntCounter,
}

impl BodyMemory {
    /// A budget counting into `held`; spools are counted by cause.
    pub fn new(held: IntGauge, spooled_large: IntCounter, spooled_memory: IntCounter) -> Self {
        BodyMemory {
            held,
            spooled_large,
            spooled_memory,
        }
    }

    /// A budget that reports nowhere (tests).
    #[cfg(test)]
    pub fn unregistered() -> Arc<BodyMemory> {
        let held = IntGauge::new("held", "-").expect("valid gauge");
        let large = IntCounter::new("large", "-").expect("valid counter");
        let memory = IntCounter::new("memory", "-").expect("valid counter");
        Arc::new(BodyMemory::new(held, large, memory))
    }

    /// Bytes of request bodies in memory now.
    #[cfg(test)]
    pub fn held(&self) -> u64 {
        self.held.get().max(0) as u64
    }

    /// An empty lease on this budget, capped at `limit` bytes held in all.
    pub fn lease(self: &Arc<Self>, limit: u64) -> Lease {
        Lease {
            budget: Arc::clone(self),
            limit: limit.min(i64::MAX as u64) as i64,
            held: 0,
        }
    }

    /// A body went to a temporary file: `over_budget` when it was under `body_buffer` but
    /// the budget had no room for it.
    pub fn spooled(&self, over_budget: bool) {
        if over_budget {
            self.spooled_memory.inc();
        } else {
            self.spooled_large.inc();
        }
    }
}

/// One body's share of the budget, given back when it is dropped.
pub struct Lease {
    budget: Arc<BodyMemory>,
    limit: i64,
    held: i64,
}

impl Lease {
    /// Holds `bytes` in all (more or less than now). False, holding what it held, when the
    /// budget has no room for the growth.
    pub fn hold(&mut self, bytes: usize) -> bool {
        let want = bytes.min(i64::MAX as usize) as i64;
        let grow = want - self.held;
        if grow <= 0 {
            self.budget.held.sub(-grow);
            self.held = want;
            return true;
        }
        // Added first and taken back on overshoot: two racing leases may both fail near
        // the limit, never both pass it.
        self.budget.held.add(grow);
        if self.budget.held.get() > self.limit {
            self.budget.held.sub(grow);
            return false;
        }
        self.held = want;
        true
    }

    /// Bytes this lease holds.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.held as usize
    }

    /// `bytes`, owning this lease: it is given back when the last clone of them is dropped,
    /// wherever that clone went.
    pub fn attach(self, bytes: Bytes) -> Bytes {
        Bytes::from_owner(Counted {
            bytes,
            _lease: self,
        })
    }
}

/// Bytes and the share of the budget they hold.
struct Counted {
    bytes: Bytes,
    _lease: Lease,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.held.sub(self.held);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({} bytes)", self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_share_the_limit_and_give_back_on_drop() {
        let m = BodyMemory::unregistered();
        let mut a = m.lease(100);
        let mut b = m.lease(100);
        assert!(a.hold(60));
        assert!(!b.hold(41), "60 + 41 is over 100");
        assert_eq!((m.held(), b.bytes()), (60, 0));
        assert!(b.hold(40));
        assert!(!a.hold(61));
        assert_eq!(a.bytes(), 60, "a failed growth keeps what it held");
        assert!(a.hold(10), "shrinking always works");
        assert_eq!(m.held(), 50);
        drop(b);
        assert_eq!(m.held(), 10);
        drop(a);
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn attached_bytes_hold_their_share_until_the_last_clone_goes() {
        let m = BodyMemory::unregistered();
        let mut lease = m.lease(100);
        assert!(lease.hold(10));
        let bytes = lease.attach(Bytes::from_static(b"0123456789"));
        let tail = bytes.slice(4..);
        drop(bytes);
        assert_eq!((m.held(), &tail[..]), (10, &b"456789"[..]));
        drop(tail);
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn a_lower_limit_stops_growth_but_not_what_is_held() {
        // A reload may lower the limit under bodies already held.
        let m = BodyMemory::unregistered();
        let mut a = m.lease(100);
        assert!(a.hold(90));
        let mut b = m.lease(50);
        assert!(!b.hold(1));
        assert!(a.hold(90), "holding the same is no growth");
        assert_eq!(m.held(), 90);
    }
}
