//! The answer to a ranged GET of a blob: a 206 must start where we asked (its Content-Range
//! says so), a 200 carries the whole blob, of which we keep our slice.

use crate::error::{Error, Result};
use bytes::Bytes;
use reqwest::{StatusCode, header};

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

/// The body of a ranged GET of `[offset, offset+len)`, handed to `sink` as it arrives, reading
/// no further than needed.
pub(super) async fn ranged_body(
    mut resp: reqwest::Response,
    offset: u64,
    len: u64,
    what: &str,
    sink: &mut (dyn FnMut(Bytes) + Send),
) -> Result<()> {
    let content_range = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    let skip = RangeAnswer::of(resp.status(), content_range, offset, what)?.skip();
    let mut seen = 0u64;
    let mut delivered = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        let (cs, ce) = (seen, seen + chunk.len() as u64);
        seen = ce;
        let s = skip.max(cs);
        let e = (skip + len).min(ce);
        if s < e {
            delivered += e - s;
            sink(chunk.slice((s - cs) as usize..(e - cs) as usize));
        }
        if seen >= skip + len {
            break;
        }
    }
    if delivered != len {
        return Err(Error::Registry(format!(
            "{what}: short read at {offset}: wanted {len} bytes, got {delivered}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
