//! The answer to a ranged GET of a blob: a 206 must start where we asked (its Content-Range
//! says so), a 200 carries the whole blob, of which we keep our slice.

use crate::config::Transfer;
use crate::error::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::{StatusCode, header};
use std::time::{Duration, Instant};

/// What a successful ranged GET was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RangeAnswer {
    /// 206 Partial Content, whose Content-Range starts at the offset asked for: the body is
    /// the range.
    Partial,
    /// Any other success (200 OK): the body is the whole blob, and the range starts `skip`
    /// bytes into it.
    Full { skip: u64 },
}

impl RangeAnswer {
    /// The answer to a GET of the bytes from `offset` on, from its status and Content-Range;
    /// an error if a 206 does not start at `offset`. `what` names the blob in errors.
    pub fn of(
        status: StatusCode,
        content_range: Option<&str>,
        offset: u64,
        what: &str,
    ) -> Result<RangeAnswer> {
        if status != StatusCode::PARTIAL_CONTENT {
            return Ok(RangeAnswer::Full { skip: offset });
        }
        let cr = content_range.unwrap_or("");
        let start = cr
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('-'))
            .and_then(|(s, _)| s.parse::<u64>().ok());
        if start != Some(offset) {
            return Err(Error::Registry(format!(
                "{what}: asked for bytes from {offset}, got Content-Range {cr:?}"
            )));
        }
        Ok(RangeAnswer::Partial)
    }

    /// Bytes of the body before the range asked for.
    fn skip(self) -> u64 {
        match self {
            RangeAnswer::Partial => 0,
            RangeAnswer::Full { skip } => skip,
        }
    }
}

/// Why one try of a ranged GET stopped before its range was whole.
#[derive(Debug)]
pub(super) enum Broke {
    /// The answer does not fit the request (a 206 starting elsewhere): nothing was used.
    Misfit(Error),
    /// The body broke off, ended short, stalled or crawled (see [`Pace`]).
    Body(Error),
}

impl From<Broke> for Error {
    fn from(b: Broke) -> Error {
        match b {
            Broke::Misfit(e) | Broke::Body(e) => e,
        }
    }
}

/// Watches the pace of a body: it is given up when a window of `idle_timeout` passes with
/// fewer than `min_rate × idle_timeout` bytes (none at all: a stall). Windows run back to
/// back from the first byte asked for, so a stall is noticed within two windows of the last
/// byte.
#[derive(Debug)]
pub(super) struct Pace {
    window: Duration,
    /// Bytes a window must bring.
    need: u64,
    /// When the current window ends.
    ends: Instant,
    /// Bytes in the current window.
    got: u64,
}

impl Pace {
    pub fn new(t: Transfer, now: Instant) -> Pace {
        let need = (t.min_rate as u128 * t.idle_timeout.as_millis() / 1000) as u64;
        Pace {
            window: t.idle_timeout,
            need,
            ends: now + t.idle_timeout,
            got: 0,
        }
    }

    /// When the current window ends.
    pub fn ends(&self) -> Instant {
        self.ends
    }

    /// Counts bytes that arrived at `now`; an error once a window has ended too slow.
    pub fn arrived(&mut self, n: u64, now: Instant) -> std::result::Result<(), String> {
        self.got += n;
        self.tick(now)
    }

    /// Closes the windows that have ended by `now`: an error if one brought too little.
    pub fn tick(&mut self, now: Instant) -> std::result::Result<(), String> {
        while now >= self.ends {
            if self.got == 0 {
                return Err(format!("no bytes for {:?}", self.window));
            }
            if self.got < self.need {
                return Err(format!(
                    "{} bytes in {:?}, under the least rate of {} bytes/s",
                    self.got,
                    self.window,
                    self.need * 1000 / self.window.as_millis().max(1) as u64
                ));
            }
            self.got = 0;
            self.ends += self.window;
        }
        Ok(())
    }
}

/// The body of a ranged GET of `[offset, offset+len)`, handed to `sink` as it arrives, reading
/// no further than needed, and given up when its pace falls below `transfer`'s.
pub(super) async fn ranged_body(
    resp: reqwest::Response,
    offset: u64,
    len: u64,
    what: &str,
    transfer: Transfer,
    sink: &mut (dyn FnMut(Bytes) + Send),
) -> std::result::Result<(), Broke> {
    let content_range = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    let skip = RangeAnswer::of(resp.status(), content_range, offset, what)
        .map_err(Broke::Misfit)?
        .skip();
    let mut body = resp.bytes_stream();
    let mut pace = Pace::new(transfer, Instant::now());
    let mut seen = 0u64;
    let mut delivered = 0u64;
    let slow = |why: String, delivered: u64| {
        Broke::Body(Error::Timeout(format!(
            "{what}: the answer for bytes from {offset} gave up after {delivered} of {len}: {why}"
        )))
    };
    while seen < skip + len {
        let chunk = match tokio::time::timeout_at(pace.ends().into(), body.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(Some(Err(e))) => return Err(Broke::Body(e.into())),
            Ok(None) => break,
            Err(_) => {
                pace.tick(Instant::now())
                    .map_err(|why| slow(why, delivered))?;
                continue;
            }
        };
        let (cs, ce) = (seen, seen + chunk.len() as u64);
        seen = ce;
        let s = skip.max(cs);
        let e = (skip + len).min(ce);
        if s < e {
            delivered += e - s;
            sink(chunk.slice((s - cs) as usize..(e - cs) as usize));
        }
        if seen < skip + len {
            pace.arrived(chunk.len() as u64, Instant::now())
                .map_err(|why| slow(why, delivered))?;
        }
    }
    if delivered != len {
        return Err(Broke::Body(Error::Registry(format!(
            "{what}: short read at {offset}: wanted {len} bytes, got {delivered}"
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_given_up_when_a_window_brings_too_little() {
        let t = Transfer {
            idle_timeout: Duration::from_secs(2),
            min_rate: 1000,
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 2,000 bytes a window suffice; they may come in any pattern.
        let mut pace = Pace::new(t, t0);
        assert!(pace.arrived(1500, at(100)).is_ok());
        assert!(pace.arrived(600, at(1900)).is_ok());
        assert!(
            pace.arrived(2000, at(2100)).is_ok(),
            "the first window had 2,100"
        );
        assert!(pace.tick(at(3999)).is_ok());
        // A stall: the next window brings nothing.
        let err = pace.tick(at(6000)).unwrap_err();
        assert!(err.contains("no bytes"), "{err}");
        // A trickle: bytes arrive, too few.
        let mut pace = Pace::new(t, t0);
        for ms in (0..2000).step_by(100) {
            pace.arrived(50, at(ms)).unwrap();
        }
        let err = pace.arrived(50, at(2000)).unwrap_err();
        assert!(
            err.contains("1050 bytes") && err.contains("1000 bytes/s"),
            "{err}"
        );
        // With no least rate, only a stall is given up.
        let mut pace = Pace::new(Transfer { min_rate: 0, ..t }, t0);
        assert!(pace.arrived(1, at(1999)).is_ok());
        assert!(pace.tick(at(3000)).is_ok());
        assert!(pace.tick(at(4000)).is_err());
    }

    #[test]
    fn a_206_must_start_where_asked_and_a_200_is_sliced() {
        let answer = |status, cr| RangeAnswer::of(status, cr, 100, "blob b");
        let partial = StatusCode::PARTIAL_CONTENT;
        assert_eq!(
            answer(partial, Some("bytes 100-199/1000")).unwrap(),
            RangeAnswer::Partial
        );
        assert_eq!(
            answer(StatusCode::OK, None).unwrap(),
            RangeAnswer::Full { skip: 100 }
        );
        assert_eq!(answer(StatusCode::OK, None).unwrap().skip(), 100);
        assert_eq!(
            answer(partial, Some("bytes 100-199/1000")).unwrap().skip(),
            0
        );
        for cr in [
            Some("bytes 0-99/1000"),
            Some("100-199/1000"),
            Some("bytes x"),
            None,
        ] {
            let err = answer(partial, cr).unwrap_err().to_string();
            assert!(err.contains("asked for bytes from 100"), "{cr:?}: {err}");
        }
    }
}
