//! RTP ports for SIP calls: binding an even RTP port and its RTCP neighbour from the
//! configured range, and giving them back when the call ends.

use crate::metrics::Metrics;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_sip::rtp::codec::Codec;
use telcoflow_sip::rtp::ports::PortPool;
use telcoflow_sip::sip::sdp::{LocalMedia, SrtpPolicy};
use tracing::debug;

/// Attempts to find a free RTP port before giving up on a call.
const BIND_ATTEMPTS: usize = 8;

/// RTP resources shared by the endpoint and the dialler.
#[derive(Debug)]
pub(super) struct MediaEnv {
    pool: Mutex<PortPool>,
    /// Address RTP sockets bind to.
    bind_ip: IpAddr,
    /// Address announced in SDP.
    pub(super) advertised: IpAddr,
    pub(super) rtp_timeout: Duration,
    /// Counts the ports in use, and what the RTP legs report at their end.
    pub(super) metrics: Arc<Metrics>,
    /// Codecs of the calls, in order of preference (`sip.codecs`).
    pub(super) codecs: Vec<Codec>,
}

impl MediaEnv {
    pub(super) fn new(
        pool: PortPool,
        bind_ip: IpAddr,
        advertised: IpAddr,
        rtp_timeout: Duration,
        metrics: Arc<Metrics>,
        codecs: Vec<Codec>,
    ) -> Self {
        Self {
            metrics,
            codecs,
            pool: Mutex::new(pool),
            bind_ip,
            advertised,
            rtp_timeout,
        }
    }

    /// Our side of a call's SDP on RTP port `port`: the advertised address, the configured
    /// codecs, a random session id, and SRTP under `srtp` (with a fresh key).
    pub(super) fn local_media(&self, port: u16, srtp: SrtpPolicy) -> LocalMedia {
        let mut media = LocalMedia::new(self.advertised, port, rand::random::<u32>().into());
        media.codecs.clone_from(&self.codecs);
        media.srtp = super::srtp::local_srtp(srtp);
        media
    }

    /// Binds an RTP socket on a free even port of the range and its RTCP socket on the next
    /// port. The ports return to the pool when the guard drops.
    pub(super) fn bind(self: &Arc<Self>) -> Option<RtpSockets> {
        for _ in 0..BIND_ATTEMPTS {
            let port = self.lock().allocate()?;
            let bind = |p: u16| {
                let sock = std::net::UdpSocket::bind((self.bind_ip, p)).ok()?;
                sock.set_nonblocking(true).ok()?;
                Some(sock)
            };
            // The pool only hands out even ports whose odd neighbour is in the range.
            match (bind(port), port.checked_add(1).and_then(bind)) {
                (Some(rtp), Some(rtcp)) => {
                    self.metrics.rtp_ports_in_use.inc();
                    let guard = PortGuard {
                        env: self.clone(),
                        port,
                    };
                    return Some(RtpSockets { rtp, rtcp, guard });
                }
                _ => {
                    debug!(port, "RTP port pair busy; trying another");
                    self.lock().release(port);
                }
            }
        }
        None
    }

    /// Whether a port pair is free in the range (binding may still find it taken by another
    /// process).
    pub(super) fn has_free_port(&self) -> bool {
        let pool = self.lock();
        pool.in_use() < pool.capacity()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PortPool> {
        // Only plain bookkeeping happens under the lock; a poisoned pool is still consistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call's bound RTP and RTCP sockets.
#[derive(Debug)]
pub(super) struct RtpSockets {
    pub(super) rtp: std::net::UdpSocket,
    pub(super) rtcp: std::net::UdpSocket,
    pub(super) guard: PortGuard,
}

/// An allocated RTP port pair, released on drop.
#[derive(Debug)]
pub(super) struct PortGuard {
    env: Arc<MediaEnv>,
    pub(super) port: u16,
}

impl PortGuard {
    /// The server's metrics.
    pub(super) fn metrics(&self) -> &Metrics {
        &self.env.metrics
    }
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        self.env.metrics.rtp_ports_in_use.dec();
        self.env.lock().release(self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(low: u16, high: u16) -> Arc<MediaEnv> {
        Arc::new(MediaEnv {
            pool: Mutex::new(PortPool::new(low, high, 7).unwrap()),
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            advertised: IpAddr::from([127, 0, 0, 1]),
            rtp_timeout: Duration::from_secs(30),
            metrics: Arc::default(),
            codecs: Codec::ALL.to_vec(),
        })
    }

    #[test]
    fn rtp_ports_come_from_the_range_and_go_back_on_drop() {
        let env = env(41000, 41003); // two even ports: 41000, 41002
        let a = env.bind().expect("first pair");
        let b = env.bind().expect("second pair");
        assert_ne!(a.guard.port, b.guard.port);
        for s in [&a, &b] {
            assert_eq!(s.rtp.local_addr().unwrap().port(), s.guard.port);
            assert_eq!(s.rtcp.local_addr().unwrap().port(), s.guard.port + 1);
            assert!((41000..=41003).contains(&s.guard.port) && s.guard.port % 2 == 0);
        }
        assert!(env.bind().is_none(), "the range is used up");
        assert!(!env.has_free_port());
        drop(a);
        let c = env.bind().expect("a released pair is reused");
        assert_eq!(env.lock().in_use(), 2);
        assert_eq!(env.metrics.rtp_ports_in_use.get(), 2);
        drop(c);
        drop(b);
        assert_eq!(env.lock().in_use(), 0);
        assert_eq!(env.metrics.rtp_ports_in_use.get(), 0);
    }

    #[test]
    fn a_port_taken_by_another_process_is_skipped() {
        let env = env(41010, 41013);
        // Another process holds the RTCP port of the first pair.
        let squatter = std::net::UdpSocket::bind(("127.0.0.1", 41011)).unwrap();
        let sockets = env.bind().expect("the other pair");
        assert_eq!(sockets.guard.port, 41012);
        assert_eq!(
            env.lock().in_use(),
            1,
            "the busy port went back to the pool"
        );
        drop(squatter);
    }
}
