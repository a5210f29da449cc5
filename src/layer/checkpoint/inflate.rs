//! A small safe wrapper over zlib's streaming inflate (libz-rs-sys, pure Rust), exposing what
//! checkpoint indexes need and flate2 does not: `Z_BLOCK` stops at deflate block boundaries,
//! `data_type`, `inflatePrime` and `inflateSetDictionary`.

use crate::error::{Error, Result};
use libz_rs_sys as z;

/// Window bits: raw deflate, or gzip/zlib with automatic header detection.
pub const RAW: i32 = -15;
/// Gzip (or zlib) with header detection.
pub const AUTO: i32 = 47;
/// Gzip only.
pub const GZIP: i32 = 31;

/// One inflate stream. Boxed because zlib's state points back at the stream.
pub struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream owns its state exclusively; it is moved between threads, never shared.
unsafe impl Send for Inflater {}

/// What one inflate call did.
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// zlib's return code (`Z_OK`, `Z_STREAM_END`, `Z_BUF_ERROR`, ...).
    pub code: i32,
}

impl Inflater {
    /// A new stream with the given window bits.
    pub fn new(window_bits: i32) -> Result<Inflater> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, default-initialised stream; version and size are zlib's own.
        let r = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        check(r, "inflateInit2")?;
        Ok(Inflater { strm })
    }

    /// Restarts the stream with new window bits (next gzip member, raw resume).
    pub fn reset(&mut self, window_bits: i32) -> Result<()> {
        // SAFETY: the stream was initialised by `new`.
        check(
            unsafe { z::inflateReset2(&mut *self.strm, window_bits) },
            "inflateReset2",
        )
    }

    /// Feeds `bits` leftover bits (0-7) of the byte before a checkpoint.
    pub fn prime(&mut self, bits: i32, value: i32) -> Result<()> {
        // SAFETY: initialised stream.
        check(
            unsafe { z::inflatePrime(&mut *self.strm, bits, value) },
            "inflatePrime",
        )
    }

    /// Sets the 32 KiB of history a raw resume needs.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<()> {
        // SAFETY: dict is valid for reads of its length during the call.
        check(
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) },
            "inflateSetDictionary",
        )
    }

    /// Inflates from `input` into `out` with `flush` (`Z_NO_FLUSH` or `Z_BLOCK`).
    pub fn inflate(&mut self, input: &[u8], out: &mut [u8], flush: i32) -> Step {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = out.as_mut_ptr();
        s.avail_out = out.len().min(u32::MAX as usize) as u32;
        let (ai, ao) = (s.avail_in, s.avail_out);
        // SAFETY: next_in/next_out point into live slices of the stated lengths.
        let code = unsafe { z::inflate(s, flush) };
        let step = Step {
            consumed: (ai - s.avail_in) as usize,
            produced: (ao - s.avail_out) as usize,
            code,
        };
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        s.avail_in = 0;
        s.avail_out = 0;
        step
    }

    /// zlib's `data_type`: bit 7 = at a block boundary, bit 6 = last block, bits 0-2 = unused bits.
    pub fn data_type(&self) -> i32 {
        self.strm.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised stream, ended once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

fn check(code: i32, what: &str) -> Result<()> {
    if code == z::Z_OK {
        Ok(())
    } else {
        Err(Error::format(
            "gzip stream",
            format!("{what} failed with zlib code {code}"),
        ))
    }
}
