//! How far a fetch may run past what is being read: the guess budget and read-ahead.
//!
//! A miss fetches a *stretch*: its block and the following blocks nobody has, in one
//! request. The part of a stretch past the end of the file being read is a guess, and guesses
//! share the link with the reads that wait: at most one stretch's worth of them is under way
//! at a time, across every blob of the cache. A reader that misses alone (a chain of
//! dependent reads) gets its whole stretch; when many miss at once, the first carries on and
//! the others fetch only their own files. The rest of the file being read is never held back.
//!
//! Reads that touch or follow the previous read's last block form a *streak*; once a streak
//! has crossed enough block boundaries, the blocks after it are fetched in the background
//! (read-ahead), so a streaming reader waits for the network once per window.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of guesses under way, against a limit.
pub(super) struct Guesses {
    limit: u64,
    under_way: AtomicU64,
}

impl Guesses {
    /// A budget of `limit` bytes of guesses under way.
    pub(super) fn new(limit: u64) -> Self {
        Guesses {
            limit,
            under_way: AtomicU64::new(0),
        }
    }

    /// Bytes of guesses that may start now.
    pub(super) fn room(&self) -> u64 {
        self.limit
            .saturating_sub(self.under_way.load(Ordering::Relaxed))
    }

    /// Counts `bytes` of guesses as under way.
    pub(super) fn start(&self, bytes: u64) {
        self.under_way.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `bytes` of guesses as settled (arrived or failed).
    pub(super) fn settle(&self, bytes: u64) {
        self.under_way.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One blob's reading streak, for read-ahead.
#[derive(Debug)]
pub(super) struct Streak {
    /// The last block of the previous read.
    last_block: AtomicU64,
    /// Block boundaries crossed in the current streak.
    crossed: AtomicU64,
    /// Read-ahead has been requested up to (excluding) this block.
    pub(super) ahead_until: AtomicU64,
}

impl Default for Streak {
    fn default() -> Self {
        Streak {
            last_block: AtomicU64::new(u64::MAX),
            crossed: AtomicU64::new(0),
            ahead_until: AtomicU64::new(0),
        }
    }
}

impl Streak {
    /// Notes a read of blocks `first..=last`; returns the block boundaries the streak has
    /// crossed so far (0 when the read does not touch or follow the previous one's last
    /// block; the kernel may deliver its read-ahead requests slightly out of order).
    pub(super) fn note(&self, first: u64, last: u64) -> u64 {
        let prev = self.last_block.swap(last, Ordering::Relaxed);
        let sequential = prev != u64::MAX && first <= prev + 1 && last + 1 >= prev;
        match (sequential, last > prev) {
            (true, true) => self.crossed.fetch_add(last - prev, Ordering::Relaxed) + (last - prev),
            (true, false) => self.crossed.load(Ordering::Relaxed),
            (false, _) => {
                self.crossed.store(0, Ordering::Relaxed);
                0
            }
        }
    }

    /// The blocks to fetch ahead after block `last`, up to `end` (exclusive) and at most
    /// `window` blocks on; `None` until half the previous window has been consumed, so the
    /// window is requested in a few large pieces rather than a block at a time.
    pub(super) fn ahead(&self, last: u64, end: u64, window: u64) -> Option<(u64, u64)> {
        let end = (last + 1 + window).min(end);
        let until = self.ahead_until.load(Ordering::Relaxed);
        let from = (last + 1).max(until);
        if from >= end || until > last + 1 + window / 2 {
            return None;
        }
        self.ahead_until.store(end, Ordering::Relaxed);
        Some((from, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_counts_forward_boundaries_and_breaks_on_a_jump() {
        let s = Streak::default();
        assert_eq!(s.note(0, 0), 0);
        assert_eq!(s.note(1, 2), 2);
        assert_eq!(
            s.note(2, 2),
            2,
            "a reread of the last block keeps the streak"
        );
        assert_eq!(s.note(3, 5), 5);
        assert_eq!(s.note(40, 40), 0, "a jump starts over");
    }

    #[test]
    fn read_ahead_is_topped_up_only_once_half_the_window_is_used() {
        let s = Streak::default();
        assert_eq!(s.ahead(3, 100, 8), Some((4, 12)));
        assert_eq!(
            s.ahead(4, 100, 8),
            None,
            "most of the window is still ahead"
        );
        assert_eq!(s.ahead(8, 100, 8), Some((12, 17)));
        assert_eq!(s.ahead(99, 100, 8), None, "nothing past the end");
    }

    #[test]
    fn guesses_have_room_up_to_their_limit() {
        let g = Guesses::new(100);
        g.start(70);
        assert_eq!(g.room(), 30);
        g.start(50);
        assert_eq!(g.room(), 0);
        g.settle(120);
        assert_eq!(g.room(), 100);
    }
}
