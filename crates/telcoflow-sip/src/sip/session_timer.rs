//! Session timers (RFC 4028) for calls we answer: what a caller's `Session-Expires` asks,
//! what our 2xx grants, and when the call must be refreshed or is over. The header parsing
//! and the expiry rule serve the calls we dial too (`uac`).
//!
//! A caller (or a proxy on its path) that wants to learn of a dead call asks for a session
//! interval; one side then refreshes the session (a re-INVITE or UPDATE) before it expires,
//! and the other ends the call (BYE) when no refresh came. We let the caller refresh when it
//! supports the extension, and refresh ourselves with an UPDATE otherwise (when it allows
//! UPDATE; else we grant no timer at all, which RFC 4028 permits when the caller did not
//! require it).

use std::time::{Duration, Instant};

use super::message::{Headers, Request};

/// The smallest session interval we take (RFC 4028's own minimum, `Min-SE`); a smaller one
/// is refused with `422 Session Interval Too Small`.
pub const MIN_SE: Duration = Duration::from_secs(90);
/// The largest interval we grant: a caller asking for more gets this (a shorter interval
/// is always allowed in the 2xx, RFC 4028 9).
pub const MAX_SE: Duration = Duration::from_secs(7200);

/// Who refreshes the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    /// The caller (the UAC of the INVITE).
    Uac,
    /// We do.
    Uas,
}

impl Refresher {
    /// The `refresher` parameter's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uac => "uac",
            Self::Uas => "uas",
        }
    }
}

/// What an INVITE (or a refresh) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// `Session-Expires` (delta-seconds).
    pub interval: Duration,
    /// Its `refresher` parameter, if any.
    pub refresher: Option<Refresher>,
    /// Whether the caller lists `timer` in `Supported` (or `Require`).
    pub caller_supports: bool,
    /// Whether the caller lists `UPDATE` in `Allow` (we can refresh with it).
    pub caller_allows_update: bool,
}

/// A request's `Session-Expires` ask, or `None` without the header (or with a value that
/// does not parse, which we ignore as if absent).
pub fn asked(request: &Request) -> Option<Asked> {
    let (interval, refresher) = parse_session_expires(request.headers.get("Session-Expires")?)?;
    let h = &request.headers;
    Some(Asked {
        interval,
        refresher,
        caller_supports: lists(h, "Supported", "timer") || lists(h, "Require", "timer"),
        caller_allows_update: lists(h, "Allow", "UPDATE"),
    })
}

/// Whether a header lists `token` (case-insensitive) among its comma-separated values.
pub fn lists(headers: &Headers, name: &str, token: &str) -> bool {
    headers
        .values(name)
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// A `Session-Expires` value: the interval and its `refresher` parameter, if any (`uac` and
/// `uas` name the roles of the transaction the header is in). `None` when it does not parse.
pub fn parse_session_expires(value: &str) -> Option<(Duration, Option<Refresher>)> {
    let mut parts = value.split(';');
    let secs: u64 = parts.next()?.trim().parse().ok()?;
    let refresher = parts.find_map(|p| {
        let (name, v) = p.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("refresher") {
            return None;
        }
        match v.trim().to_ascii_lowercase().as_str() {
            "uac" => Some(Refresher::Uac),
            "uas" => Some(Refresher::Uas),
            _ => None,
        }
    });
    Some((Duration::from_secs(secs), refresher))
}

/// A `Min-SE` value (delta-seconds, parameters ignored); `None` when it does not parse.
pub fn parse_min_se(value: &str) -> Option<Duration> {
    let secs: u64 = value.split(';').next()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// When the side that does not refresh ends a session refreshed at `now` for want of the next
/// refresh: the interval less the smaller of 32 s and a third of it (RFC 4028 10).
pub fn expiry(interval: Duration, now: Instant) -> Instant {
    now + interval - (interval / 3).min(Duration::from_secs(32))
}

/// What we grant in our 2xx, or why we refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A session timer: put [`Granted::headers`] in the 2xx.
    Timer(Granted),
    /// No session timer (the caller does not support it and does not allow UPDATE, so only a
    /// re-INVITE of ours could refresh): the 2xx carries no `Session-Expires`.
    None,
    /// `422 Session Interval Too Small` with `Min-SE: 90`.
    TooSmall,
}

/// A session timer in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The session interval.
    pub interval: Duration,
    /// Who refreshes.
    pub refresher: Refresher,
    /// Whether the caller supports the extension (then the 2xx says `Require: timer`).
    pub caller_supports: bool,
}

impl Granted {
    /// Headers of the 2xx: `Session-Expires` with the refresher, and `Require: timer` when
    /// the caller supports it (RFC 4028 9).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![(
            "Session-Expires",
            format!(
                "{};refresher={}",
                self.interval.as_secs(),
                self.refresher.as_str()
            ),
        )];
        if self.caller_supports {
            h.push(("Require", "timer".into()));
        }
        h
    }

    /// When we must act after a refresh at `now`: send our refresh (half the interval) or,
    /// when the caller refreshes, end the call for want of one (the interval less the
    /// smaller of 32 s and a third of it, RFC 4028 10).
    pub fn deadline(&self, now: Instant) -> Instant {
        match self.refresher {
            Refresher::Uas => now + self.interval / 2,
            Refresher::Uac => expiry(self.interval, now),
        }
    }
}

/// Decides on a caller's ask (RFC 4028 9): refuses an interval under [`MIN_SE`], keeps the
/// refresher of a caller that supports timers, else lets such a caller refresh, else
/// refreshes ourselves when the caller allows UPDATE.
pub fn grant(asked: Asked) -> Grant {
    if asked.interval < MIN_SE {
        return Grant::TooSmall;
    }
    let interval = asked.interval.min(MAX_SE);
    let refresher = match asked.refresher {
        // A caller that does not support timers cannot refresh (a proxy asked for it).
        Some(r) if asked.caller_supports => r,
        _ if asked.caller_supports => Refresher::Uac,
        _ => Refresher::Uas,
    };
    // Our refreshes are UPDATEs: a caller that neither supports timers nor allows UPDATE
    // gets none (a caller that supports timers and asks us to refresh is taken to take
    // UPDATE, as RFC 4028 implementations do).
    if refresher == Refresher::Uas && !asked.caller_supports && !asked.caller_allows_update {
        return Grant::None;
    }
    Grant::Timer(Granted {
        interval,
        refresher,
        caller_supports: asked.caller_supports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::Method;

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut r = Request::new(Method::Invite, "sip:+1@example.com");
        for (n, v) in headers {
            r.headers.push(n, *v);
        }
        r
    }

    #[test]
    fn a_supporting_caller_refreshes_and_the_2xx_requires_timer() {
        let a = asked(&request(&[
            ("Session-Expires", "1800"),
            ("Supported", "100rel, timer"),
        ]))
        .unwrap();
        let Grant::Timer(g) = grant(a) else {
            panic!("a timer")
        };
        assert_eq!(g.refresher, Refresher::Uac);
        assert_eq!(
            g.headers(),
            [
                ("Session-Expires", "1800;refresher=uac".to_string()),
                ("Require", "timer".to_string())
            ]
        );
        // BYE 32 s before the end when no refresh came.
        let t0 = Instant::now();
        assert_eq!(g.deadline(t0), t0 + Duration::from_secs(1800 - 32));
    }

    #[test]
    fn the_callers_refresher_is_kept_and_short_intervals_are_refused() {
        let a = asked(&request(&[
            ("Session-Expires", "120; refresher=UAS"),
            ("Supported", "timer"),
        ]))
        .unwrap();
        let Grant::Timer(g) = grant(a) else {
            panic!("a timer")
        };
        assert_eq!(g.refresher, Refresher::Uas);
        let t0 = Instant::now();
        assert_eq!(g.deadline(t0), t0 + Duration::from_secs(60));
        assert_eq!(
            grant(asked(&request(&[("Session-Expires", "89")])).unwrap()),
            Grant::TooSmall
        );
        // Over two hours is cut to two hours; a third of 120 s is 40 s, so 32 s it is.
        let a = asked(&request(&[
            ("Session-Expires", "100000"),
            ("Supported", "timer"),
        ]))
        .unwrap();
        let Grant::Timer(g) = grant(a) else {
            panic!("a timer")
        };
        assert_eq!(g.interval, MAX_SE);
        assert!(asked(&request(&[("Session-Expires", "soon")])).is_none());
        assert!(asked(&request(&[])).is_none());
    }

    #[test]
    fn a_caller_without_timer_support_gets_us_refreshing_by_update_or_no_timer() {
        let a = asked(&request(&[
            ("Session-Expires", "600;refresher=uac"),
            ("Allow", "INVITE, ACK, BYE, UPDATE"),
        ]))
        .unwrap();
        let Grant::Timer(g) = grant(a) else {
            panic!("a timer")
        };
        assert_eq!(
            g.refresher,
            Refresher::Uas,
            "a proxy asked; the caller cannot"
        );
        assert_eq!(
            g.headers(),
            [("Session-Expires", "600;refresher=uas".to_string())]
        );
        let a = asked(&request(&[("Session-Expires", "600")])).unwrap();
        assert_eq!(grant(a), Grant::None);
    }
}
