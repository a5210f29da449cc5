//! Fuzz targets: one function per parser of untrusted bytes. Each takes arbitrary bytes and
//! may return an error through the parser, but panics when something the rest of ocifs relies
//! on does not hold (a parser that panics, overflows or loops is a bug by itself).
//!
//! `fuzz/` drives them with cargo-fuzz (libFuzzer, nightly: `scripts/fuzz`); the unit tests in
//! `tests.rs` drive the same functions on stable with the committed corpus
//! (`fuzz/corpus/<target>/`) and deterministic mutations of it, so `cargo test` exercises every
//! target. Not part of the library's API: hidden from its docs.

#[cfg(test)]
mod mutate;
#[cfg(test)]
mod tests;

use crate::blob::{Blob, MemBlob};
use crate::config::Platform;
use crate::image::manifest;
use crate::layer::checkpoint::{CheckpointIndex, file, soci};
use crate::layer::chunked::Reader;
use crate::layer::{Entry, Kind, Locator, detect, estargz, zstdchunked};
use crate::reference::Reference;
use std::sync::Arc;

/// A fuzz target: arbitrary bytes in, a panic when something ocifs relies on breaks.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: &[(&str, Target)] = &[
    ("reference", reference),
    ("manifest", manifest),
    ("estargz", estargz),
    ("zstdchunked", zstdchunked),
    ("soci", soci),
    ("tar", tar),
    ("checkpoint_file", checkpoint_file),
];

/// The blob id the targets give their inputs (also the layer digest indexes must name).
const ID: &str = "sha256:fuzz";
/// Bytes read from each end of a file in a layer target (reads are bounded by the kernel's
/// request size in a mount, so larger ones prove nothing more).
const READ: u64 = 64 << 10;
/// Entries whose bytes a layer target reads (the first ones; a TOC can list millions).
const READ_ENTRIES: usize = 32;

/// An image reference: a parsed reference prints as one that parses to itself.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Reference::parse(s) else {
        return;
    };
    let again = Reference::parse(&r.to_string())
        .unwrap_or_else(|e| panic!("{s:?} parsed, but its normal form {r} does not: {e}"));
    assert_eq!(again, r, "{s:?}: normalising twice changed it");
    assert!(!r.manifest_reference().is_empty());
}

/// A manifest body from a registry: image index (platform choice) or image manifest (config
/// and layers), and an image config's `diff_ids`.
pub fn manifest(data: &[u8]) {
    for media_type in [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "",
    ] {
        let _ = manifest::is_index(media_type, data);
    }
    for p in ["linux/amd64", "linux/arm64/v8"] {
        let platform = Platform::parse(p).expect("a valid platform");
        if let Ok((offered, Some(_))) = manifest::choose_platform(data, ID, &platform) {
            assert!(!offered.is_empty(), "chose a manifest no platform offered");
        }
    }
    if let Ok(parts) = manifest::manifest_parts(data, ID) {
        for l in &parts.layers {
            if let Ok(format) = crate::layer::Format::from_media_type(&l.media_type) {
                let _ = detect::announces_toc(format, l);
            }
        }
    }
    let _ = manifest::diff_ids(data);
}

/// A whole eStargz (or legacy stargz) blob: footer, TOC, entries, and reads of their chunks.
pub fn estargz(data: &[u8]) {
    let blob: Blob = Arc::new(MemBlob::new(ID, data.to_vec()));
    let opened = [crate::blob::SMALL_TAIL_READ, detect::FOOTER_TAIL]
        .map(|tail_len| {
            run(async {
                let (tail_start, tail) = crate::blob::read_tail(&blob, tail_len).await?;
                let (reader, entries, _legacy) =
                    estargz::open(blob.clone(), tail_start, tail, None).await?;
                Ok::<_, crate::Error>((reader, entries))
            })
        })
        .map(no_panic);
    check_chunked(opened, data.len() as u64);
}

/// A whole zstd:chunked blob: footer, TOC, entries, and reads of their chunks.
pub fn zstdchunked(data: &[u8]) {
    let blob: Blob = Arc::new(MemBlob::new(ID, data.to_vec()));
    let opened = [crate::blob::SMALL_TAIL_READ, detect::FOOTER_TAIL]
        .map(|tail_len| {
            run(async {
                let (tail_start, tail) = crate::blob::read_tail(&blob, tail_len).await?;
                zstdchunked::open(blob.clone(), tail_start, tail, None).await
            })
        })
        .map(no_panic);
    check_chunked(opened, data.len() as u64);
}

/// A SOCI zTOC, checked against the layer size it declares (and a wrong one); the index it
/// yields must hold what readers rely on and survive being kept as an index file.
pub fn soci(data: &[u8]) {
    let size = soci::declared_size(data).unwrap_or(data.len() as u64);
    assert!(
        soci::parse(data, ID, size.wrapping_add(1)).is_err(),
        "a zTOC for another layer size was accepted"
    );
    if let Ok(index) = soci::parse(data, ID, size) {
        check_index(&index);
        round_trip(&index);
    }
}

/// An uncompressed tar walked through a [`Blob`] (as a layer is), compared with the streaming
/// walk, and the GNU sparse maps of its sparse files read.
pub fn tar(data: &[u8]) {
    use crate::layer::tar;
    let blob: Blob = Arc::new(MemBlob::new(ID, data.to_vec()));
    let walked = no_panic(run(tar::index(blob.clone())));
    let streamed = tar::index_stream(data, ID);
    if let (Ok(w), Ok(s)) = (&walked, &streamed) {
        assert_eq!(w, s, "the seeking and the streaming walk disagree");
    }
    let Ok(entries) = walked else {
        return;
    };
    check_entries(&entries);
    for e in entries.iter().take(READ_ENTRIES) {
        if let Locator::Sparse { header } = e.data {
            for (offset, len) in ends(e.size) {
                if let Ok(b) = run(tar::read_sparse(&blob, header, offset, len)) {
                    assert_eq!(b.len() as u64, len, "short sparse read of {:?}", e.path);
                }
            }
        }
    }
}

/// A checkpoint index file: the file as kept (magic, version, checksum), and, past the
/// checksum no mutation gets through, its payload: the first input byte picks the format
/// version (2, 3 or 4), the rest is the decompressed payload, whose own layer digest it is
/// checked against.
pub fn checkpoint_file(data: &[u8]) {
    if let Ok(index) = file::decode(data, ID) {
        check_index(&index);
    }
    let Some((&v, raw)) = data.split_first() else {
        return;
    };
    let version = 2 + u32::from(v % 3);
    let digest = leading_string(raw);
    if let Ok(index) = file::decode_payload(version, raw, &digest) {
        check_index(&index);
        round_trip(&index);
    }
}

/// The length-prefixed string a payload starts with (its layer digest), or "".
fn leading_string(raw: &[u8]) -> String {
    let Some(len) = raw
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    else {
        return String::new();
    };
    usize::try_from(len)
        .ok()
        .and_then(|len| raw.get(8..8usize.checked_add(len)?))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// Runs `f` to completion on this thread's runtime (a current-thread one: the targets' blobs
/// are in memory, and the tar walk and chunk decoding use its blocking pool).
fn run<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(f))
}

/// `r`, failing the target when its error is a panic that a blocking task turned into one
/// (the tar walk and chunk decoding run on the blocking pool).
fn no_panic<T>(r: crate::Result<T>) -> crate::Result<T> {
    if let Err(e) = &r {
        assert!(!e.to_string().contains(" panicked"), "{e}");
    }
    r
}

/// The ranges a target reads of a file of `size` bytes: its start and its end.
fn ends(size: u64) -> Vec<(u64, u64)> {
    let head = (0, size.min(READ));
    let tail = (size.saturating_sub(READ), size.min(READ));
    if size == 0 {
        Vec::new()
    } else if tail == head {
        vec![head]
    } else {
        vec![head, tail]
    }
}

/// What every layer format promises the tree: clean paths, and data only on files.
fn check_entries(entries: &[Entry]) {
    check_paths(entries);
    for e in entries {
        if !matches!(e.data, Locator::None) {
            assert_eq!(e.kind, Kind::File, "{:?} has data but is no file", e.path);
        }
    }
}

/// Clean relative paths: no empty, `.` or `..` component, no NUL (the tree makes a name of
/// every component, and the kernel refuses a directory listing with an empty name in it).
fn check_paths(entries: &[Entry]) {
    for e in entries {
        assert!(
            e.path.is_empty()
                || e.path
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0')),
            "unclean path {:?}",
            e.path
        );
    }
}

/// Opening a chunked layer with a large and a small tail read gives the same entries; their
/// chunks tile each file, lie inside the blob, and read back as many bytes as asked.
fn check_chunked(opened: [crate::Result<(Reader, Vec<Entry>)>; 2], blob_size: u64) {
    let [large, small] = opened;
    let (reader, entries) = match (large, small) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.1, b.1, "the tail read changed the entries");
            a
        }
        (Err(_), Err(_)) => return,
        (a, b) => panic!(
            "the tail read changed the outcome: {:?} / {:?}",
            a.map(|x| x.1.len()),
            b.map(|x| x.1.len())
        ),
    };
    check_entries(&entries);
    for e in &entries {
        let Locator::Chunks(chunks) = &e.data else {
            continue;
        };
        let mut at = 0u64;
        for c in chunks.iter() {
            assert_eq!(c.file_offset, at, "chunks of {:?} do not tile it", e.path);
            at = at.checked_add(c.len).expect("chunk lengths overflow");
            assert!(
                c.zeros || (c.start < c.end && c.end <= blob_size),
                "chunk of {:?} at {}..{} outside the blob",
                e.path,
                c.start,
                c.end
            );
        }
        assert_eq!(at, e.size, "chunks of {:?} do not cover it", e.path);
    }
    for e in entries.iter().take(READ_ENTRIES) {
        let Locator::Chunks(chunks) = &e.data else {
            continue;
        };
        for (offset, len) in ends(e.size) {
            if let Ok(b) = no_panic(run(reader.read(chunks, offset, len))) {
                assert_eq!(b.len() as u64, len, "short read of {:?}", e.path);
            }
        }
    }
}

/// What readers of a checkpoint index compute from it must not overflow or run backwards.
fn check_index(index: &CheckpointIndex) {
    check_paths(&index.entries);
    for k in 0..index.checkpoints.len() {
        let (start, end) = index.span_extent(k);
        assert!(start <= end, "span {k} runs backwards: {start}..{end}");
        let (out, out_end) = index.span_output(k);
        assert!(
            out <= out_end,
            "span {k} outputs backwards: {out}..{out_end}"
        );
        for m in index.marks_of(k) {
            assert!((start..end).contains(&m.inp), "mark outside span {k}");
        }
    }
    for (a, b, _) in index.mark_stretches() {
        assert!(a <= b, "stretch {a}..{b} runs backwards");
    }
    let size = index.uncomp_size;
    for (from, to) in [
        (0, 1),
        (size / 2, size / 2 + 1),
        (size.saturating_sub(1), size),
    ] {
        let (a, b) = index.compressed_extent(from, to.max(from + 1));
        assert!(
            a <= b,
            "compressed extent {a}..{b} of {from}..{to} runs backwards"
        );
    }
}

/// An index kept in the cache directory reads back as itself.
fn round_trip(index: &CheckpointIndex) {
    let again = file::decode(&file::encode(index), &index.digest)
        .unwrap_or_else(|e| panic!("an accepted index does not read back: {e}"));
    assert_eq!(&again, index, "an index changed on its way through a file");
}
