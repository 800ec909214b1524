//! RTP port bookkeeping for the configured range (`--rtp-ports LOW-HIGH`).
//!
//! Contract: pure bookkeeping, no sockets. [`PortPool::allocate`] hands out an even RTP port
//! whose odd neighbour (RTCP, RFC 3550 11) is also in the range, picked at random among the
//! free ones (from the seed given to [`PortPool::new`]), so that a peer who learns one call's
//! port cannot guess the next call's. A released port rests until half the pool has been
//! released after it (or nothing else is free), so late packets of an ended call do not
//! reach the next one. The owner binds both; if binding fails (another process has one), it
//! releases the port and allocates again. Every allocated port must be released when its
//! call ends.

use std::collections::{BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Why a pool cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PortRangeError {
    /// `low` is above `high`, or the range holds no even port followed by an odd one.
    #[error("RTP port range {low}-{high} holds no even/odd port pair")]
    Empty {
        /// Lowest port.
        low: u16,
        /// Highest port.
        high: u16,
    },
}

/// RTP/RTCP port pairs of a range, handed out in random order by their even RTP port.
#[derive(Debug, Clone)]
pub struct PortPool {
    low: u16,
    high: u16,
    /// Ports ready to hand out.
    free: Vec<u16>,
    /// Released ports resting before they rejoin `free`, oldest first.
    resting: VecDeque<u16>,
    in_use: BTreeSet<u16>,
    rng: StdRng,
}

impl PortPool {
    /// A pool of the even ports `p` in `low..=high` with `p + 1` also in it. `seed` drives
    /// the order ports are handed out in: use a random one outside tests.
    pub fn new(low: u16, high: u16, seed: u64) -> Result<Self, PortRangeError> {
        let first = low.checked_add(low % 2);
        // The last even port whose odd neighbour fits.
        let last = if high % 2 == 1 {
            Some(high - 1)
        } else {
            high.checked_sub(2)
        };
        let (Some(first), Some(last)) = (first, last) else {
            return Err(PortRangeError::Empty { low, high });
        };
        if first > last || low > high {
            return Err(PortRangeError::Empty { low, high });
        }
        Ok(Self {
            low: first,
            high: last,
            free: (first..=last).step_by(2).collect(),
            resting: VecDeque::new(),
            in_use: BTreeSet::new(),
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// How many ports the pool holds.
    pub fn capacity(&self) -> usize {
        usize::from((self.high - self.low) / 2) + 1
    }

    /// How many are allocated.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// A free even port picked at random, or `None` when all are in use.
    pub fn allocate(&mut self) -> Option<u16> {
        if self.free.is_empty() {
            self.free.extend(self.resting.drain(..));
        }
        if self.free.is_empty() {
            return None;
        }
        let port = self
            .free
            .swap_remove(self.rng.random_range(0..self.free.len()));
        self.in_use.insert(port);
        Some(port)
    }

    /// Returns a port to the pool; unknown ports are ignored.
    pub fn release(&mut self, port: u16) {
        if !self.in_use.remove(&port) {
            return;
        }
        self.resting.push_back(port);
        let rest_limit = (self.capacity() / 2).max(1);
        while self.resting.len() > rest_limit {
            if let Some(p) = self.resting.pop_front() {
                self.free.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_even_port_once_in_random_order() {
        // 10008 is left out: its RTCP port 10009 is outside the range.
        let mut pool = PortPool::new(10001, 10008, 1).unwrap();
        assert_eq!(pool.capacity(), 3);
        let mut got: Vec<u16> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![10002, 10004, 10006]);
        assert_eq!(pool.allocate(), None);
        pool.release(10004);
        assert_eq!(pool.in_use(), 2);
        assert_eq!(pool.allocate(), Some(10004), "the only free port");
        pool.release(9999);
        assert_eq!(pool.in_use(), 3);

        // A large pool: the order is not the range's, and differs by seed.
        let order = |seed| {
            let mut pool = PortPool::new(20000, 20999, seed).unwrap();
            (0..pool.capacity())
                .map(|_| pool.allocate().unwrap())
                .collect::<Vec<_>>()
        };
        let a = order(1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (20000..=20998).step_by(2).collect::<Vec<_>>());
        assert_ne!(a, sorted, "not in range order");
        assert_ne!(a, order(2), "the seed picks the order");
        // Consecutive allocations are rarely neighbours (port N+2 is no guess).
        let neighbours = a.windows(2).filter(|w| w[1] == w[0] + 2).count();
        assert!(neighbours < 10, "{neighbours} of 499 steps were +2");
    }

    #[test]
    fn a_released_port_rests_before_it_is_reused() {
        let mut pool = PortPool::new(30000, 30199, 9).unwrap(); // 100 ports
        let mut held: Vec<u16> = (0..10).map(|_| pool.allocate().unwrap()).collect();
        let released = held.remove(0);
        pool.release(released);
        // 90 free ports come first, then the resting one.
        for _ in 0..90 {
            let p = pool.allocate().unwrap();
            assert_ne!(p, released);
            held.push(p);
        }
        assert_eq!(pool.allocate(), Some(released));
        assert_eq!(pool.allocate(), None);
        // Released ports rejoin the free set once half the pool rests after them.
        for p in held.drain(..) {
            pool.release(p);
        }
        assert_eq!(pool.in_use(), 1);
        let mut seen = BTreeSet::new();
        while let Some(p) = pool.allocate() {
            assert!(seen.insert(p));
        }
        assert_eq!(seen.len(), 99);
    }

    #[test]
    fn edges() {
        assert!(PortPool::new(10001, 10001, 0).is_err());
        assert!(PortPool::new(10000, 10000, 0).is_err());
        assert!(PortPool::new(10001, 10002, 0).is_err());
        assert!(PortPool::new(20000, 10000, 0).is_err());
        assert!(PortPool::new(65535, 65535, 0).is_err());
        let mut top = PortPool::new(65534, 65535, 0).unwrap();
        assert_eq!(top.allocate(), Some(65534));
        assert_eq!(top.allocate(), None);
        top.release(65534);
        assert_eq!(top.allocate(), Some(65534));
        let mut pair = PortPool::new(10000, 10001, 0).unwrap();
        assert_eq!(pair.capacity(), 1);
        assert_eq!(pair.allocate(), Some(10000));
        let full = PortPool::new(0, 65535, 0).unwrap();
        assert_eq!(full.capacity(), 32768);
    }
}
