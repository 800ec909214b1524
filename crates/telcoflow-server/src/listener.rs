//! The HTTP/WebSocket listener: accepts TCP connections, holds each one to the connection caps
//! and deadlines of `[limits]`, and serves the router on it over HTTP/1.1 (after a TLS handshake
//! with `[tls]`).
//!
//! - Caps: at most `max_connections` at once, and `max_connections_per_ip` from one source
//!   address. A connection over a cap is closed at once (plain HTTP gets a `503` first if the
//!   socket takes it without waiting); refusals are counted and logged once per interval.
//! - Deadlines: the TLS handshake, and the headers of every request, must arrive within
//!   `header_read_timeout_secs` (hyper's header read timeout, which also runs while a connection
//!   is silent); a write that makes no progress for `write_timeout_secs` fails, which closes the
//!   connection whatever runs on it (HTTP, or the WebSocket it was upgraded to).
//!
//! - Accept errors (no file descriptors left) pause accepting with a growing delay, logged at
//!   most once per [`ACCEPT_LOG_INTERVAL`] ([`AcceptBackoff`], which the SIP/TCP listener uses
//!   too).
//!
//! A connection holds its place under the caps until its socket is dropped, upgraded or not: the
//! place travels with the socket ([`Guarded`]).

use crate::config::Limits;
use crate::tls::{PeerInfo, fingerprint};
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How long a request in flight at shutdown has to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How often refused connections are summed up in the log, at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a connection over a cap is told, when its socket takes it without waiting.
const BUSY_RESPONSE: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "content-type: text/plain; charset=utf-8\r\n",
    "content-length: 80\r\n",
    "connection: close\r\n",
    "\r\n",
    "too many connections (limits.max_connections or limits.max_connections_per_ip)\r\n",
);

/// Connections the kernel completes for us before we accept them. The default (128) drops the
/// SYNs of a burst of clients that arrives faster than one accept loop turn; the clients then
/// wait a second or more for their retransmission.
const ACCEPT_BACKLOG: u32 = 1024;

/// First pause of accepting after an accept error; it doubles up to [`ACCEPT_MAX_PAUSE`].
const ACCEPT_FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause of accepting after repeated accept errors.
const ACCEPT_MAX_PAUSE: Duration = Duration::from_secs(1);
/// Accept errors are logged at most once per this interval, with how many were not.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Binds the listener socket.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As the standard library does: a restarted server can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves `app` on `tcp` until `shutdown`; connection tasks are tracked by `tasks`.
pub(crate) async fn serve(
    tcp: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    app: Router,
    limits: &Limits,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let caps = Arc::new(Caps::new(
        limits.max_connections,
        limits.max_connections_per_ip,
    ));
    let deadlines = Deadlines {
        header: limits.header_read_timeout(),
        write: limits.write_timeout(),
    };
    let acceptor = tls.map(TlsAcceptor::from);
    let mut refusals = Refusals::default();
    let mut accept_backoff = AcceptBackoff::default();
    let mut log_refusals = tokio::time::interval(REFUSAL_LOG_INTERVAL);
    loop {
        let (stream, addr) = tokio::select! {
            // Cancel-safe: TcpListener::accept.
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    let (pause, log) = accept_backoff.on_error(Instant::now());
                    if let Some(suppressed) = log {
                        warn!(error = %e, pause_ms = pause.as_millis() as u64, suppressed, "accept failed; pausing accepts");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            // Cancel-safe: a missed tick is just late.
            _ = log_refusals.tick() => {
                refusals.log();
                continue;
            }
            // Cancel-safe: only observes the token.
            () = shutdown.cancelled() => break,
        };
        accept_backoff.on_success();
        let place = match Caps::admit(&caps, addr.ip()) {
            Ok(place) => place,
            Err(cap) => {
                refusals.count(cap);
                if acceptor.is_none() {
                    // Never waits: what the socket buffer does not take is not sent.
                    let _ = stream.try_write(BUSY_RESPONSE.as_bytes());
                }
                continue;
            }
        };
        // Audio frames are small writes that must leave at once; Nagle's algorithm would hold
        // one behind an unacknowledged one (up to the peer's delayed-ACK timeout, ~40 ms).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let io = Guarded::new(stream, deadlines.write, place);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(deadlines.header, acceptor.accept(io));
                    let tls = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => return debug!(%addr, error = %e, "TLS handshake failed"),
                            Err(_) => return debug!(%addr, "TLS handshake timed out"),
                        },
                        () = shutdown.cancelled() => return,
                    };
                    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let peer = PeerInfo {
                        addr,
                        cert_sha256: cert.map(|c| fingerprint(c)),
                    };
                    serve_http(tls, peer, app, deadlines.header, shutdown).await;
                }
                None => {
                    let peer = PeerInfo {
                        addr,
                        cert_sha256: None,
                    };
                    serve_http(io, peer, app, deadlines.header, shutdown).await;
                }
            }
        });
    }
    refusals.log();
}

#[derive(Debug, Clone, Copy)]
struct Deadlines {
    header: Duration,
    write: Duration,
}

/// Serves HTTP/1.1 on one connection; on shutdown, finishes the request in flight (within
/// [`SHUTDOWN_GRACE`]) and closes.
async fn serve_http<I>(
    io: I,
    peer: PeerInfo,
    app: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer.clone()));
        tower_service::Service::call(&mut app.clone(), request)
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        // Cancel-safe: the connection future is pinned and polled again below.
        r = conn.as_mut() => r,
        // Cancel-safe: only observes the token.
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // A connection still waiting for request headers is not idle to hyper and would
            // hold shutdown up to the header deadline.
            match tokio::time::timeout(SHUTDOWN_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => return debug!("HTTP connection dropped at shutdown"),
            }
        }
    };
    if let Err(e) = result {
        // A header timeout, a client gone mid-request: nothing for an operator to act on.
        debug!(error = %e, "HTTP connection ended");
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    Total,
    PerAddress,
}

/// Open connections, in total and per source address.
#[derive(Debug)]
struct Caps {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Caps {
    fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            max_total,
            max_per_address,
            open: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // The counters are updated in single statements; a poisoned guard is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `ip`, or the cap it would break.
    fn admit(caps: &Arc<Self>, ip: IpAddr) -> Result<Place, Cap> {
        let address = source_address(ip);
        let mut open = caps.lock();
        if open.total >= caps.max_total {
            return Err(Cap::Total);
        }
        let here = open.by_address.entry(address).or_default();
        if *here >= caps.max_per_address {
            return Err(Cap::PerAddress);
        }
        *here += 1;
        open.total += 1;
        Ok(Place {
            caps: caps.clone(),
            address,
        })
    }
}

/// The address a connection counts against: IPv4 as is (also when mapped into IPv6), IPv6 by
/// its /64 prefix, since one host is usually given a whole /64.
pub(crate) fn source_address(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// A connection's place under the caps, given back when dropped.
#[derive(Debug)]
struct Place {
    caps: Arc<Caps>,
    address: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(here) = open.by_address.get_mut(&self.address) {
            *here = here.saturating_sub(1);
            if *here == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

/// How accepting reacts to errors (typically `EMFILE`: no file descriptors left, with the
/// pending connection still queued, so an immediate retry fails again): pause with a delay
/// that doubles up to [`ACCEPT_MAX_PAUSE`], and log at most once per
/// [`ACCEPT_LOG_INTERVAL`].
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    pause: Option<Duration>,
    last_log: Option<Instant>,
    /// Errors since the last log line.
    unlogged: u64,
}

impl AcceptBackoff {
    /// An accept failed at `now`: how long to pause, and `Some(errors not logged since the
    /// last line)` when this one is to be logged.
    pub(crate) fn on_error(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self
            .pause
            .map_or(ACCEPT_FIRST_PAUSE, |p| (p * 2).min(ACCEPT_MAX_PAUSE));
        self.pause = Some(pause);
        let log = self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_INTERVAL);
        if log {
            self.last_log = Some(now);
            let suppressed = self.unlogged;
            self.unlogged = 0;
            (pause, Some(suppressed))
        } else {
            self.unlogged += 1;
            (pause, None)
        }
    }

    /// An accept succeeded: the next error starts from the first pause again.
    pub(crate) fn on_success(&mut self) {
        self.pause = None;
    }
}

/// Connections refused since the last log line.
#[derive(Debug, Default)]
struct Refusals {
    total: u64,
    per_address: u64,
}

impl Refusals {
    fn count(&mut self, cap: Cap) {
        match cap {
            Cap::Total => self.total += 1,
            Cap::PerAddress => self.per_address += 1,
        }
    }

    fn log(&mut self) {
        if self.total + self.per_address > 0 {
            warn!(
                over_max_connections = self.total,
                over_max_connections_per_ip = self.per_address,
                "connections refused at the limits in the last {}s",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
        }
        *self = Self::default();
    }
}

/// An accepted socket with a write deadline, holding the connection's place under the caps.
///
/// A write (or flush) that the socket does not take starts a clock; any write that makes
/// progress stops it. When it runs out, the write fails with `TimedOut`, and so does every
/// later read and write: the peer has not read for the whole deadline, and whatever runs on
/// the connection ends it when its socket fails.
#[derive(Debug)]
pub(crate) struct Guarded {
    stream: TcpStream,
    write_timeout: Duration,
    /// Running while writes are blocked.
    blocked: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    _place: Place,
}

impl Guarded {
    fn new(stream: TcpStream, write_timeout: Duration, place: Place) -> Self {
        Self {
            stream,
            write_timeout,
            blocked: None,
            timed_out: false,
            _place: place,
        }
    }

    fn timeout_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the peer took no data for {}s (limits.write_timeout_secs)",
                self.write_timeout.as_secs()
            ),
        )
    }

    /// Runs a write-side operation under the deadline.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.timed_out {
            return Poll::Ready(Err(self.timeout_error()));
        }
        match op(Pin::new(&mut self.stream), cx) {
            Poll::Pending => {
                let timeout = self.write_timeout;
                let clock = self
                    .blocked
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                // Polling the clock registers this task to be woken when it runs out.
                match clock.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.timed_out = true;
                        self.blocked = None;
                        debug!(timeout = ?timeout, "write deadline passed; closing the connection");
                        Poll::Ready(Err(self.timeout_error()))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                self.blocked = None;
                done
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Once the write deadline has passed the connection is over for readers too, also
        // for code that ignored the failed write.
        if self.timed_out {
            return Poll::Ready(Err(self.timeout_error()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.deadline(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.deadline(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.deadline(cx, AsyncWrite::poll_flush)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.deadline(cx, AsyncWrite::poll_shutdown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_total_and_give_places_back() {
        let caps = Arc::new(Caps::new(3, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = Caps::admit(&caps, a).unwrap();
        let _a2 = Caps::admit(&caps, a).unwrap();
        assert_eq!(Caps::admit(&caps, a).unwrap_err(), Cap::PerAddress);
        let _b1 = Caps::admit(&caps, b).unwrap();
        assert_eq!(Caps::admit(&caps, b).unwrap_err(), Cap::Total);
        drop(a1);
        let _a3 = Caps::admit(&caps, a).unwrap();
        assert_eq!(caps.lock().by_address.len(), 2);
    }

    #[test]
    fn busy_response_length_matches_its_body() {
        let (head, body) = BUSY_RESPONSE.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{}",
            body.len()
        );
    }

    #[test]
    fn ipv6_counts_by_64_prefix_and_mapped_ipv4_as_ipv4() {
        let one: IpAddr = "2001:db8::1".parse().unwrap();
        let other: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert_eq!(source_address(one), source_address(other));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            source_address(mapped),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn accept_errors_pause_longer_and_log_rarely() {
        let mut backoff = AcceptBackoff::default();
        let start = Instant::now();
        let mut now = start;
        let mut logged = Vec::new();
        let mut pauses = Vec::new();
        // An accept loop fed nothing but errors for 60 s, retrying after each pause.
        while now < start + Duration::from_secs(60) {
            let (pause, log) = backoff.on_error(now);
            if let Some(suppressed) = log {
                logged.push((now - start, suppressed));
            }
            pauses.push(pause);
            now += pause;
        }
        assert_eq!(pauses[0], ACCEPT_FIRST_PAUSE);
        assert_eq!(pauses[1], ACCEPT_FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().unwrap(), ACCEPT_MAX_PAUSE);
        // About one try a second once the pause is at its longest, not a busy loop.
        assert!(pauses.len() < 70, "{} accepts in 60 s", pauses.len());
        // One line per interval, each counting the errors it did not log.
        assert_eq!(logged.len(), 6, "{logged:?}");
        assert_eq!(logged[0], (Duration::ZERO, 0));
        assert!(logged[1].1 > 0);
        for pair in logged.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= ACCEPT_LOG_INTERVAL);
        }
        // A success resets the pause.
        backoff.on_success();
        assert_eq!(backoff.on_error(now).0, ACCEPT_FIRST_PAUSE);
    }
}
