//! A small deterministic mutator for the stable property tests: the kinds of change libFuzzer
//! makes (bit flips, interesting bytes and integers, deleted, repeated and spliced ranges,
//! truncation), plus decimal numbers swapped for extreme ones, which JSON parsers meet.

/// Integers that find off-by-ones and overflows.
const WORDS: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];
/// The same as decimal text, and a few that are no valid u64.
const NUMBERS: [&str; 9] = [
    "0",
    "1",
    "-1",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e400",
];
/// Bytes that change a parser's path (quotes, brackets, separators, high bytes).
const BYTES: [u8; 12] = [
    0, 1, b'"', b'{', b'[', b'/', b'.', b':', b'@', 0x7f, 0x80, 0xff,
];

/// A xorshift generator seeded per target, so a failing input can be found again.
pub struct Mutator(u64);

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator(seed | 1)
    }

    pub fn word(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.word() % n.max(1) as u64) as usize
    }

    /// Random bytes, up to `max` of them.
    pub fn noise(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.word() as u8).collect()
    }

    /// `seed` with one to four changes; `other` is spliced from.
    pub fn mutate(&mut self, seed: &[u8], other: &[u8]) -> Vec<u8> {
        let mut d = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            self.change(&mut d, other);
        }
        d
    }

    fn change(&mut self, d: &mut Vec<u8>, other: &[u8]) {
        let at = self.below(d.len());
        match self.below(8) {
            0 if !d.is_empty() => d[at] ^= 1 << self.below(8),
            1 if !d.is_empty() => d[at] = BYTES[self.below(BYTES.len())],
            2 => {
                let w = WORDS[self.below(WORDS.len())].to_le_bytes();
                let n = [1, 2, 4, 8][self.below(4)].min(d.len() - at.min(d.len()));
                d[at..at + n].copy_from_slice(&w[..n]);
            }
            3 => {
                let n = self.below(d.len() - at + 1);
                d.drain(at..at + n);
            }
            4 => {
                let n = self.below((d.len() - at).min(256) + 1);
                let piece = d[at..at + n].to_vec();
                let to = self.below(d.len() + 1);
                replace(d, to..to, &piece);
            }
            5 if !other.is_empty() => {
                let from = self.below(other.len());
                let n = self.below((other.len() - from).min(512) + 1);
                let to = self.below(d.len() + 1);
                replace(d, to..to, &other[from..from + n]);
            }
            6 => d.truncate(at),
            _ => self.swap_number(d),
        }
    }

    /// Replaces one run of ASCII digits with an extreme decimal number.
    fn swap_number(&mut self, d: &mut Vec<u8>) {
        let starts: Vec<usize> = (0..d.len())
            .filter(|&i| d[i].is_ascii_digit() && (i == 0 || !d[i - 1].is_ascii_digit()))
            .collect();
        if starts.is_empty() {
            return;
        }
        let s = starts[self.below(starts.len())];
        let e = (s..d.len())
            .find(|&i| !d[i].is_ascii_digit())
            .unwrap_or(d.len());
        let n = NUMBERS[self.below(NUMBERS.len())];
        replace(d, s..e, n.as_bytes());
    }
}

/// `d` with `range` replaced by `with`.
fn replace(d: &mut Vec<u8>, range: std::ops::Range<usize>, with: &[u8]) {
    let tail = d.split_off(range.end);
    d.truncate(range.start);
    d.extend_from_slice(with);
    d.extend_from_slice(&tail);
}
