//! The one retry policy of registry requests: what is retried, how often, and how long to
//! wait between tries.
//!
//! Retried: requests that got no answer (no connection, no headers in time, a request that
//! could not be sent), answers of 429 or 5xx, answers that do not fit the request (a
//! Content-Range starting elsewhere), and bodies that broke off, stalled or crawled (these
//! resume from the last byte received). Each request gets [`MAX_RETRIES`] retries, whatever
//! failed — [`FALLBACK_RETRIES`] at a host that has another to fall back to (a mirror before
//! the registry: asking the next host is the better retry); a body that delivered bytes
//! before it broke does not use one up (retry while bytes still arrive), up to [`MAX_TRIES`]
//! tries in all. Waits double from the outcome's first
//! wait (100 ms after a broken body, 200 ms without an answer, 400 ms after an answer) up to
//! [`MAX_WAIT`], with equal jitter (half fixed, half random, so that many readers failing
//! together do not come back together), and are never shorter than the answer's
//! `Retry-After` (at most [`MAX_RETRY_AFTER`] of it). A 401 is not an outcome here:
//! [`super::Registry`] answers the challenge and tries again.

use reqwest::StatusCode;
use std::time::{Duration, SystemTime};

/// Retries after the first try of one request.
pub(super) const MAX_RETRIES: u32 = 5;
/// Retries after the first try of one request at a host that has another to fall back to:
/// one rides out a blip, and a mirror answering 5xx costs one wait (0.2-0.4 s) before the
/// next host is asked instead of five (3-10 s in all).
pub(super) const FALLBACK_RETRIES: u32 = 1;
/// Tries of one request in all, counting those that delivered bytes.
const MAX_TRIES: u32 = 64;
/// Longest wait between tries, before `Retry-After`.
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured (a longer one is waited this long).
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How a try of a request ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// No connection could be made.
    Connect,
    /// The request or its answer took too long.
    Timeout,
    /// The request could not be sent.
    Request,
    /// Another transport error (a redirect loop, a bad body, ...).
    Transport,
    /// The registry answered with this status.
    Status(StatusCode),
    /// The answer does not fit the request (a 206 starting elsewhere).
    Misfit,
    /// The body broke off, stalled or crawled; `progressed` if this try delivered bytes.
    Body { progressed: bool },
}

impl Outcome {
    /// The outcome a transport error is.
    pub fn of(e: &reqwest::Error) -> Outcome {
        if super::http::tls_refused(e) {
            // Refused in TLS (a certificate, a plain-HTTP server): the same again next time.
            Outcome::Transport
        } else if e.is_connect() {
            Outcome::Connect
        } else if e.is_timeout() {
            Outcome::Timeout
        } else if e.is_request() {
            Outcome::Request
        } else {
            Outcome::Transport
        }
    }

    /// The first wait before retrying after this outcome, or `None` if it is not retried.
    fn first_wait(self) -> Option<Duration> {
        let ms = match self {
            Outcome::Body { .. } => 100,
            Outcome::Connect | Outcome::Timeout | Outcome::Request => 200,
            Outcome::Misfit => 400,
            Outcome::Status(s) if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => 400,
            Outcome::Transport | Outcome::Status(_) => return None,
        };
        Some(Duration::from_millis(ms))
    }
}

/// The retries of one request so far.
#[derive(Debug)]
pub(super) struct Retries {
    /// Retries used up.
    done: u32,
    /// Tries so far, counting those that delivered bytes.
    tries: u32,
    /// Retries allowed ([`MAX_RETRIES`] or [`FALLBACK_RETRIES`]).
    budget: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries::new(MAX_RETRIES)
    }
}

impl Retries {
    /// A request's retries, `budget` of them (bodies that deliver bytes aside).
    pub fn new(budget: u32) -> Retries {
        Retries {
            done: 0,
            tries: 0,
            budget,
        }
    }

    /// How long to wait before trying again after `outcome` (whose answer, if any, said
    /// `Retry-After: retry_after`); `None` to give up (for an answer, to hand it on).
    pub fn wait(&mut self, outcome: Outcome, retry_after: Option<Duration>) -> Option<Duration> {
        let first = outcome.first_wait()?;
        let progressed = outcome == Outcome::Body { progressed: true };
        if self.tries + 1 >= MAX_TRIES || (!progressed && self.done >= self.budget) {
            return None;
        }
        self.tries += 1;
        let base = first.saturating_mul(1 << self.done).min(MAX_WAIT);
        if !progressed {
            self.done += 1;
        }
        let half = base / 2;
        let jitter = Duration::from_micros(rand::random_range(0..=half.as_micros() as u64));
        let wait = half + jitter;
        Some(wait.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER)))
    }
}

/// The wait a `Retry-After` header asks for: delay-seconds, or an HTTP date (then the time
/// until it, by this machine's clock). `None` when absent or unreadable.
pub(super) fn retry_after(value: Option<&str>, now: SystemTime) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits of a series of outcomes, in ms, with the jitter's bounds: each wait lies in
    /// `[base/2, base]`.
    fn waits(outcomes: &[Outcome]) -> Vec<Option<(u64, u64)>> {
        let mut r = Retries::default();
        outcomes
            .iter()
            .map(|&f| {
                let before = r.done;
                let w = r.wait(f, None)?.as_millis() as u64;
                let base = (f.first_wait().unwrap() * (1 << before)).min(MAX_WAIT);
                let base = base.as_millis() as u64;
                assert!(
                    w >= base / 2 && w <= base,
                    "{f:?}: {w} ms outside [{}, {base}]",
                    base / 2
                );
                Some((base / 2, base))
            })
            .collect()
    }

    #[test]
    fn five_retries_with_doubling_jittered_waits() {
        use Outcome::*;
        let busy = Status(StatusCode::TOO_MANY_REQUESTS);
        let b = |ms: u64| Some((ms / 2, ms));
        assert_eq!(
            waits(&[Connect, Timeout, Request, Connect, Timeout, Connect]),
            [b(200), b(400), b(800), b(1600), b(3200), None]
        );
        assert_eq!(
            waits(&[
                busy,
                Status(StatusCode::BAD_GATEWAY),
                busy,
                Misfit,
                busy,
                busy
            ]),
            [b(400), b(800), b(1600), b(3200), b(5000), None]
        );
        // One count for every kind; the wait doubles from the kind's first.
        assert_eq!(waits(&[Timeout, busy, Connect]), [b(200), b(800), b(800)]);
    }

    #[test]
    fn a_body_that_delivered_bytes_uses_no_retry() {
        use Outcome::*;
        let mut r = Retries::default();
        for _ in 0..5 {
            assert!(r.wait(Body { progressed: false }, None).is_some());
        }
        assert!(r.wait(Body { progressed: false }, None).is_none());
        // Still retried while bytes arrive, up to the bound on all tries.
        let tries = (0..100)
            .take_while(|_| r.wait(Body { progressed: true }, None).is_some())
            .count() as u32;
        assert_eq!(tries, MAX_TRIES - 1 - 5);
    }

    #[test]
    fn a_host_with_a_fallback_gets_one_retry() {
        use Outcome::*;
        let mut r = Retries::new(FALLBACK_RETRIES);
        let unavailable = Status(StatusCode::SERVICE_UNAVAILABLE);
        let w = r.wait(unavailable, None).unwrap();
        assert!(w >= Duration::from_millis(200) && w <= Duration::from_millis(400));
        assert!(r.wait(unavailable, None).is_none());
        // Bytes arriving still do not count.
        assert!(r.wait(Body { progressed: true }, None).is_some());
        assert!(r.wait(Timeout, None).is_none());
    }

    #[test]
    fn retry_after_is_a_floor_and_capped() {
        let mut r = Retries::default();
        let busy = Outcome::Status(StatusCode::TOO_MANY_REQUESTS);
        let w = r.wait(busy, Some(Duration::from_secs(3))).unwrap();
        assert_eq!(w, Duration::from_secs(3));
        let w = r.wait(busy, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(w, MAX_RETRY_AFTER);
        // A short Retry-After does not shorten the backoff.
        let w = r.wait(busy, Some(Duration::ZERO)).unwrap();
        assert!(w >= Duration::from_millis(800), "{w:?}");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37 GMT
        assert_eq!(retry_after(Some("7"), now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(Some("Sun, 06 Nov 1994 08:49:47 GMT"), now),
            Some(Duration::from_secs(10))
        );
        // A date past is no wait; garbage and absence are no Retry-After.
        assert_eq!(
            retry_after(Some("Sun, 06 Nov 1994 08:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(Some("soon"), now), None);
        assert_eq!(retry_after(None, now), None);
    }

    #[test]
    fn other_outcomes_are_not_retried_and_use_no_retry() {
        use Outcome::*;
        for f in [
            Transport,
            Status(StatusCode::OK),
            Status(StatusCode::NOT_FOUND),
            Status(StatusCode::UNAUTHORIZED),
            Status(StatusCode::FORBIDDEN),
        ] {
            assert_eq!(waits(&[f]), [None], "{f:?}");
        }
        let mut r = Retries::default();
        assert!(r.wait(Transport, None).is_none());
        assert!(r.wait(Status(StatusCode::NOT_FOUND), None).is_none());
        assert_eq!(r.done, 0);
    }
}
