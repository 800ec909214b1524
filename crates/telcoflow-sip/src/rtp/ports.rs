//! RTP port bookkeeping for the configured range (`--rtp-ports LOW-HIGH`).
//!
//! Contract: pure bookkeeping, no sockets. [`PortPool::allocate`] hands out an even RTP port
//! whose odd neighbour (RTCP, RFC 3550 11) is also in the range, round-robin, so a port just
//! released is not reused at once and late packets of an ended call do not reach the next
//! one. The owner binds both; if binding fails (another process has one), it releases the
//! port and allocates again. Every allocated port must be released when its call ends.

use std::collections::BTreeSet;

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

/// RTP/RTCP port pairs of a range, handed out round-robin by their even RTP port.
#[derive(Debug, Clone)]
pub struct PortPool {
    low: u16,
    high: u16,
    in_use: BTreeSet<u16>,
    next: u16,
}

impl PortPool {
    /// A pool of the even ports `p` in `low..=high` with `p + 1` also in it.
    pub fn new(low: u16, high: u16) -> Result<Self, PortRangeError> {
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
            in_use: BTreeSet::new(),
            next: first,
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

    /// The next free even port, or `None` when all are in use.
    pub fn allocate(&mut self) -> Option<u16> {
        if self.in_use.len() >= self.capacity() {
            return None;
        }
        loop {
            let port = self.next;
            self.next = match port.checked_add(2) {
                Some(n) if n <= self.high => n,
                _ => self.low,
            };
            if self.in_use.insert(port) {
                return Some(port);
            }
        }
    }

    /// Returns a port to the pool; unknown ports are ignored.
    pub fn release(&mut self, port: u16) {
        self.in_use.remove(&port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_even_ports_round_robin() {
        // 10008 is left out: its RTCP port 10009 is outside the range.
        let mut pool = PortPool::new(10001, 10008).unwrap();
        assert_eq!(pool.capacity(), 3);
        let got: Vec<u16> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(got, vec![10002, 10004, 10006]);
        assert_eq!(pool.allocate(), None);
        pool.release(10004);
        assert_eq!(pool.in_use(), 2);
        assert_eq!(pool.allocate(), Some(10004));
        pool.release(10002);
        pool.release(10006);
        // Round-robin: continues after the last handed out, skipping ports in use.
        assert_eq!(pool.allocate(), Some(10006));
        assert_eq!(pool.allocate(), Some(10002));
        pool.release(9999);
    }

    #[test]
    fn edges() {
        assert!(PortPool::new(10001, 10001).is_err());
        assert!(PortPool::new(10000, 10000).is_err());
        assert!(PortPool::new(10001, 10002).is_err());
        assert!(PortPool::new(20000, 10000).is_err());
        assert!(PortPool::new(65535, 65535).is_err());
        let mut top = PortPool::new(65534, 65535).unwrap();
        assert_eq!(top.allocate(), Some(65534));
        assert_eq!(top.allocate(), None);
        top.release(65534);
        assert_eq!(top.allocate(), Some(65534));
        let mut pair = PortPool::new(10000, 10001).unwrap();
        assert_eq!(pair.capacity(), 1);
        assert_eq!(pair.allocate(), Some(10000));
        let full = PortPool::new(0, 65535).unwrap();
        assert_eq!(full.capacity(), 32768);
    }
}
