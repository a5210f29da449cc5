//! The one retry policy of registry requests: what is retried (requests that got no answer —
//! no connection, a timeout, a request that could not be sent — and answers of 429 or 5xx),
//! how often (three retries for a request, whatever failed), and how long to wait between
//! tries (doubling: 200, 400, 800 ms without an answer, 400, 800, 1600 ms after an answer).
//! A 401 is not a outcome here: [`super::Registry`] answers the challenge and tries again.

use reqwest::StatusCode;
use std::time::Duration;

/// Retries after the first try of one request.
const MAX_RETRIES: u32 = 3;

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
}

impl Outcome {
    /// The outcome a transport error is.
    pub fn of(e: &reqwest::Error) -> Outcome {
        if e.is_connect() {
            Outcome::Connect
        } else if e.is_timeout() {
            Outcome::Timeout
        } else if e.is_request() {
            Outcome::Request
        } else {
            Outcome::Transport
        }
    }
}

/// The retries of one request so far.
#[derive(Debug, Default)]
pub(super) struct Retries {
    done: u32,
}

impl Retries {
    /// How long to wait before trying again after `outcome`; `None` to give up (for an
    /// answer, to hand it on).
    pub fn wait(&mut self, outcome: Outcome) -> Option<Duration> {
        let first_wait_ms = match outcome {
            Outcome::Connect | Outcome::Timeout | Outcome::Request => 200,
            Outcome::Status(s) if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => 400,
            Outcome::Transport | Outcome::Status(_) => return None,
        };
        if self.done >= MAX_RETRIES {
            return None;
        }
        let wait = Duration::from_millis(first_wait_ms << self.done);
        self.done += 1;
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(outcomes: &[Outcome]) -> Vec<Option<u64>> {
        let mut r = Retries::default();
        let ms = |d: Duration| d.as_millis() as u64;
        outcomes.iter().map(|&f| r.wait(f).map(ms)).collect()
    }

    #[test]
    fn three_retries_with_doubling_waits() {
        use Outcome::*;
        let busy = Status(StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            waits(&[Connect, Timeout, Request, Connect]),
            [Some(200), Some(400), Some(800), None]
        );
        assert_eq!(
            waits(&[busy, Status(StatusCode::BAD_GATEWAY), busy, busy]),
            [Some(400), Some(800), Some(1600), None]
        );
        // One count for both kinds; the wait doubles from the kind's first.
        assert_eq!(
            waits(&[Timeout, busy, Connect, busy]),
            [Some(200), Some(800), Some(800), None]
        );
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
        assert_eq!(
            waits(&[Transport, Status(StatusCode::NOT_FOUND), Connect]),
            [None, None, Some(200)]
        );
    }
}
