//! Raw FUSE messages as the supervisor relays them: only the headers it must read (a request's
//! length, opcode and `unique`; a reply's length, error and `unique`), parsed with bounds
//! checks, and the few messages it writes itself (an error reply, a `DESTROY` request).
//! Everything past the headers is passed on untouched. Layouts from the kernel's
//! `include/uapi/linux/fuse.h`; FUSE uses the host's byte order.

use crate::error::{Error, Result};

/// `struct fuse_in_header`: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32,
/// pid u32, total_extlen u16, padding u16.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`: len u32, error i32, unique u64.
pub const OUT_HEADER_LEN: usize = 16;

/// The opcodes the supervisor treats specially.
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_NOTIFY_REPLY: u32 = 41;
pub const FUSE_BATCH_FORGET: u32 = 42;

/// The header of a request from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
}

impl InHeader {
    /// Reads the header of the whole request `msg`; its length field must match `msg`.
    pub fn parse(msg: &[u8]) -> Result<InHeader> {
        if msg.len() < IN_HEADER_LEN {
            return Err(bad(format!("a {}-byte request has no header", msg.len())));
        }
        let h = InHeader {
            len: u32_at(msg, 0),
            opcode: u32_at(msg, 4),
            unique: u64_at(msg, 8),
        };
        if h.len as usize != msg.len() {
            return Err(bad(format!(
                "request {} says {} bytes but has {}",
                h.unique,
                h.len,
                msg.len()
            )));
        }
        Ok(h)
    }

    /// Whether the kernel waits for an answer: all but the forgets, interrupts and the
    /// kernel's answers to our notifications.
    pub fn needs_reply(&self) -> bool {
        !matches!(
            self.opcode,
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT | FUSE_NOTIFY_REPLY
        )
    }
}

/// The header of a reply (or, with `unique` 0, a notification) from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

impl OutHeader {
    /// Reads the header of the whole reply `msg`; its length field must match `msg`.
    pub fn parse(msg: &[u8]) -> Result<OutHeader> {
        if msg.len() < OUT_HEADER_LEN {
            return Err(bad(format!("a {}-byte reply has no header", msg.len())));
        }
        let h = OutHeader {
            len: u32_at(msg, 0),
            error: u32_at(msg, 4) as i32,
            unique: u64_at(msg, 8),
        };
        if h.len as usize != msg.len() {
            return Err(bad(format!(
                "reply to {} says {} bytes but has {}",
                h.unique,
                h.len,
                msg.len()
            )));
        }
        Ok(h)
    }
}

/// A reply failing request `unique` with `errno` (positive, as in `libc::EIO`).
pub fn error_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut out = [0u8; OUT_HEADER_LEN];
    out[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
    out
}

/// A `DESTROY` request: a session thread that reads one answers it and stops, so one per
/// thread ends a server's session cleanly.
pub fn destroy_request(unique: u64) -> [u8; IN_HEADER_LEN] {
    let mut out = [0u8; IN_HEADER_LEN];
    out[0..4].copy_from_slice(&(IN_HEADER_LEN as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&FUSE_DESTROY.to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
    out
}

/// The same reply with `unique` cleared, to compare two servers' answers to one request.
pub fn without_unique(msg: &[u8]) -> Vec<u8> {
    let mut v = msg.to_vec();
    if v.len() >= OUT_HEADER_LEN {
        v[8..16].fill(0);
    }
    v
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

fn bad(reason: String) -> Error {
    Error::format("FUSE message", reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; IN_HEADER_LEN];
        m[0..4].copy_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_ne_bytes());
        m[4..8].copy_from_slice(&opcode.to_ne_bytes());
        m[8..16].copy_from_slice(&unique.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_request_header_is_read_and_checked_against_its_length() {
        let m = request(15, 42, b"0123456789");
        let h = InHeader::parse(&m).unwrap();
        assert_eq!((h.len, h.opcode, h.unique), (50, 15, 42));
        assert!(h.needs_reply());
        // Too short for a header, or a length that is not the message's: refused, no panic.
        assert!(InHeader::parse(&m[..39]).is_err());
        assert!(InHeader::parse(&m[..45]).is_err());
        assert!(InHeader::parse(&[]).is_err());
        let mut long = m.clone();
        long.push(0);
        assert!(InHeader::parse(&long).is_err());
    }

    #[test]
    fn forgets_interrupts_and_notify_replies_need_no_reply() {
        for op in [
            FUSE_FORGET,
            FUSE_BATCH_FORGET,
            FUSE_INTERRUPT,
            FUSE_NOTIFY_REPLY,
        ] {
            assert!(!InHeader::parse(&request(op, 7, &[])).unwrap().needs_reply());
        }
        for op in [1, FUSE_INIT, FUSE_DESTROY, 15, 44] {
            assert!(InHeader::parse(&request(op, 7, &[])).unwrap().needs_reply());
        }
    }

    #[test]
    fn replies_are_built_and_read_back() {
        let e = error_reply(99, libc::EIO);
        let h = OutHeader::parse(&e).unwrap();
        assert_eq!((h.len, h.error, h.unique), (16, -libc::EIO, 99));
        assert!(OutHeader::parse(&e[..15]).is_err());
        let mut wrong = e.to_vec();
        wrong.extend_from_slice(b"extra");
        assert!(OutHeader::parse(&wrong).is_err());
        let d = destroy_request(5);
        let h = InHeader::parse(&d).unwrap();
        assert_eq!((h.opcode, h.unique), (FUSE_DESTROY, 5));
        assert_eq!(
            without_unique(&e),
            without_unique(&error_reply(1, libc::EIO))
        );
    }
}
