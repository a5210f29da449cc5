//! Deciding a layer's format: the media type names the compression; for gzip and zstd the
//! blob's last bytes tell whether the layer is eStargz (or legacy stargz) or zstd:chunked,
//! whose footers point at a TOC, or a plain stream.

use super::{Format, LayerDesc, estargz, zstdchunked};
use crate::blob::Blob;
use crate::error::Result;

/// The last bytes of a blob that hold either footer: eStargz (51) or zstd:chunked (up to 72).
pub const FOOTER_TAIL: u64 = 72;

/// Whether a layer of `format` (from its media type) may end in a footer that changes it.
pub fn may_have_footer(format: Format) -> bool {
    matches!(format, Format::Gzip | Format::Zstd)
}

/// Whether `desc`'s annotations announce a TOC (eStargz's TOC digest, zstd:chunked's manifest
/// checksum): the footer is then almost surely there, and the TOC before it.
pub fn announces_toc(format: Format, desc: &LayerDesc) -> bool {
    let has = |a: &str| desc.annotations.contains_key(a);
    match format {
        Format::Gzip => has(estargz::TOC_DIGEST_ANNOTATION),
        Format::Zstd => zstdchunked::CHECKSUM_ANNOTATIONS.iter().any(|a| has(a)),
        _ => false,
    }
}

/// The most bytes a hint ([`estargz::TOC_OFFSET_ANNOTATION`]) may make a layer's opening read
/// at its end (a wrong hint costs at most this much).
pub const MAX_TAIL_HINT: u64 = 64 << 20;

/// How many bytes at the end of `desc`'s blob to read for its TOC when the descriptor
/// announces one: from the offset [`estargz::TOC_OFFSET_ANNOTATION`] names when that is a
/// number leaving a footer's worth to [`MAX_TAIL_HINT`] of the blob's end, else
/// [`crate::blob::TAIL_READ`] (which usually holds a TOC whole); never more than the blob.
/// A wrong hint costs a read, never a wrong TOC: the footer says where the TOC starts.
pub fn toc_tail(desc: &LayerDesc) -> u64 {
    let hinted = (desc.annotations.get(estargz::TOC_OFFSET_ANNOTATION))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .and_then(|offset| desc.size.checked_sub(offset))
        .filter(|len| (FOOTER_TAIL..=MAX_TAIL_HINT).contains(len));
    hinted.unwrap_or(crate::blob::TAIL_READ).min(desc.size)
}

/// The format of a layer whose media type says `format` and whose blob ends with `tail`.
pub fn from_tail(format: Format, tail: &[u8]) -> Format {
    match format {
        Format::Gzip => match estargz::parse_footer(tail) {
            Some((_, true)) => Format::LegacyStargz,
            Some((_, false)) => Format::Estargz,
            None => Format::Gzip,
        },
        Format::Zstd if zstdchunked::parse_footer(tail).is_some() => Format::ZstdChunked,
        f => f,
    }
}

/// A layer's format as `inspect` reports it: media type, then (for gzip and zstd) the footer,
/// read with one small ranged request of the blob `open` gives (called only then). `None` for
/// media types ocifs cannot read.
pub async fn probe(
    desc: &LayerDesc,
    open: impl FnOnce() -> Result<Blob>,
) -> Result<Option<Format>> {
    let Ok(format) = Format::from_media_type(&desc.media_type) else {
        return Ok(None);
    };
    if !may_have_footer(format) || desc.size < FOOTER_TAIL {
        return Ok(Some(format));
    }
    let tail = open()?
        .read_at(desc.size - FOOTER_TAIL, FOOTER_TAIL)
        .await?;
    Ok(Some(from_tail(format, &tail)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::MemBlob;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn desc(media_type: &str, size: u64) -> LayerDesc {
        LayerDesc {
            digest: "sha256:x".into(),
            size,
            media_type: media_type.into(),
            annotations: HashMap::new(),
        }
    }

    #[test]
    fn an_announced_toc_offset_sizes_the_tail_read_within_bounds() {
        let size = 100 << 20;
        let hinted = |value: &str| {
            let mut d = desc("application/vnd.oci.image.layer.v1.tar+gzip", size);
            d.annotations
                .insert(estargz::TOC_OFFSET_ANNOTATION.into(), value.into());
            toc_tail(&d)
        };
        let default = crate::blob::TAIL_READ;
        assert_eq!(hinted(&(size - 300_000).to_string()), 300_000);
        assert_eq!(
            hinted(&(size - (8 << 20)).to_string()),
            8 << 20,
            "larger too"
        );
        // Not a number, past the blob, leaving no footer, or asking too much: the guess.
        for bad in [
            "x",
            "-5",
            "",
            &(size + 1).to_string(),
            &(size - 10).to_string(),
            "0",
        ] {
            assert_eq!(hinted(bad), default, "{bad:?}");
        }
        assert_eq!(toc_tail(&desc("x", size)), default, "no hint");
        assert_eq!(toc_tail(&desc("x", 1000)), 1000, "never past the blob");
    }

    #[tokio::test]
    async fn the_footer_refines_the_media_type() {
        const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
        const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
        const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
        let mut footer = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        footer.extend_from_slice(b"00000000000012abSTARGZ");
        footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut estargz = vec![0u8; 100];
        estargz.extend_from_slice(&footer);
        async fn check(media_type: &str, bytes: &[u8]) -> Option<Format> {
            let blob: Blob = Arc::new(MemBlob::new("sha256:x", bytes.to_vec()));
            probe(&desc(media_type, bytes.len() as u64), || Ok(blob))
                .await
                .unwrap()
        }
        let plain = [0u8; 200];
        let mut chunked = vec![0u8; 100];
        chunked.extend_from_slice(&0x184D2A50u32.to_le_bytes());
        chunked.extend_from_slice(&40u32.to_le_bytes());
        for word in [100u64, 20, 50, 1] {
            chunked.extend_from_slice(&word.to_le_bytes());
        }
        chunked.extend_from_slice(b"GnUlInUx");
        assert_eq!(check(ZSTD, &chunked).await, Some(Format::ZstdChunked));
        assert_eq!(check(GZIP, &estargz).await, Some(Format::Estargz));
        assert_eq!(check(GZIP, &plain).await, Some(Format::Gzip));
        assert_eq!(check(ZSTD, &plain).await, Some(Format::Zstd));
        assert_eq!(check("text/plain", &plain).await, None);
        // Other formats and blobs too short for a footer are not opened.
        let never = || -> Result<Blob> { panic!("opened") };
        for (mt, size) in [(TAR, 1000), (GZIP, FOOTER_TAIL - 1)] {
            let f = Format::from_media_type(mt).unwrap();
            assert_eq!(probe(&desc(mt, size), never).await.unwrap(), Some(f));
        }
    }
}
