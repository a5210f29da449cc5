use super::*;
use crate::blob::{BlobSource, MemBlob, ReadHints};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn sample_tar() -> Vec<u8> {
    sample_tar_of(40)
}

/// `n` files of 50-90 KB, part random and part repetitive (so deflate uses back references).
pub(crate) fn sample_tar_of(n: usize) -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let mut x = 1u64;
    for i in 0..n {
        let data: Vec<u8> = (0..(50_000 + i * 1000))
            .map(|j| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                if j % 3 == 0 {
                    (x >> 33) as u8
                } else {
                    b'a' + (j % 7) as u8
                }
            })
            .collect();
        let mut h = ::tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

pub(crate) fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn check_all_reads(blob_bytes: Vec<u8>, tar: &[u8], span: u64) -> CheckpointIndex {
    check_reads(blob_bytes, tar, span, Codec::Gzip).await
}

async fn check_reads(blob_bytes: Vec<u8>, tar: &[u8], span: u64, codec: Codec) -> CheckpointIndex {
    let digest = crate::digest::sha256(&blob_bytes);
    let blob: Blob = Arc::new(MemBlob::new(digest, blob_bytes));
    let (index, windows) = CheckpointIndex::build(blob.clone(), codec, span, &|_, _| {})
        .await
        .unwrap();
    assert!(
        index.checkpoints.len() > 3,
        "{} checkpoints",
        index.checkpoints.len()
    );
    assert_eq!(index.uncomp_size, tar.len() as u64);
    assert_eq!(index.entries.len(), 40);
    let index = Arc::new(index);
    let gz = CheckpointBlob::new(index.clone(), blob.clone());
    for (off, len) in [
        (0u64, 10u64),
        (12_345, 200_000),
        (tar.len() as u64 - 5000, 5000),
        (span - 3, 6),
        (span * 2, 1),
    ] {
        let got = gz.read_at(off, len).await.unwrap();
        assert_eq!(
            &got[..],
            &tar[off as usize..(off + len) as usize],
            "read at {off}"
        );
    }
    // Resuming at marks: each read a span's first (a new reader each time), across the layer.
    let has_marks = index.marks.iter().any(|m| !m.is_empty());
    assert_eq!(index.windows.is_some(), has_marks);
    if let Some(w) = &index.windows {
        let windows: Blob = Arc::new(MemBlob::new(w.digest.clone(), windows));
        for off in (0..tar.len() as u64).step_by(7919) {
            let gz = CheckpointBlob::new(index.clone(), blob.clone()).with_windows(windows.clone());
            let len = 3000.min(tar.len() as u64 - off);
            let got = gz.read_at(off, len).await.unwrap();
            assert_eq!(
                &got[..],
                &tar[off as usize..(off + len) as usize],
                "at {off}"
            );
        }
    }
    (*index).clone()
}

#[tokio::test]
async fn single_member_reads_match_at_any_offset() {
    let tar = sample_tar();
    check_all_reads(gzip(&tar, 1), &tar, 64 * 1024).await;
    check_all_reads(gzip(&tar, 9), &tar, 64 * 1024).await;
}

#[tokio::test]
async fn multi_member_streams_work_across_member_boundaries() {
    let tar = sample_tar();
    let mut blob = Vec::new();
    for part in tar.chunks(300_000) {
        blob.extend(gzip(part, 6));
    }
    check_all_reads(blob, &tar, 100 * 1024).await;
}

#[tokio::test]
async fn corrupt_spans_and_blobs_are_refused() {
    let tar = sample_tar();
    let good = gzip(&tar, 6);
    let index = check_all_reads(good.clone(), &tar, 64 * 1024).await;
    // A flipped byte in a span: the span digest catches it on read.
    let mut bad = good.clone();
    let (s, e) = index.span_extent(2);
    bad[((s + e) / 2) as usize] ^= 1;
    let gz = CheckpointBlob::new(
        Arc::new(index.clone()),
        Arc::new(MemBlob::new(index.digest.clone(), bad.clone())),
    );
    let (o0, _) = index.span_output(2);
    let err = gz.read_at(o0, 10).await.unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    // The whole-blob digest catches it at build time.
    let blob: Blob = Arc::new(MemBlob::new(index.digest.clone(), bad));
    assert!(
        CheckpointIndex::build(blob, Codec::Gzip, 64 * 1024, &|_, _| {})
            .await
            .is_err()
    );
    // A truncated stream is an error, not a short index.
    let cut = good[..good.len() / 2].to_vec();
    let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&cut), cut));
    let err = CheckpointIndex::build(blob, Codec::Gzip, 64 * 1024, &|_, _| {})
        .await
        .map(drop)
        .unwrap_err();
    assert!(
        err.to_string().contains("truncated") || err.to_string().contains("tar"),
        "{err}"
    );
}

fn zstd_frames(data: &[u8], frame: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, part) in data.chunks(frame).enumerate() {
        out.extend(::zstd::bulk::compress(part, 3).unwrap());
        if i == 2 {
            // A skippable frame, as zstd:chunked and pzstd carry.
            out.extend_from_slice(&0x184D2A51u32.to_le_bytes());
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(b"abc");
        }
    }
    out
}

#[tokio::test]
async fn zstd_frames_become_spans_and_reads_match() {
    let tar = sample_tar();
    let index = check_reads(zstd_frames(&tar, 50_000), &tar, 64 * 1024, Codec::Zstd).await;
    assert!(
        index
            .checkpoints
            .iter()
            .all(|c| c.window.is_empty() && c.bits == 0)
    );
}

#[tokio::test]
async fn single_frame_zstd_is_one_span_and_truncation_is_an_error() {
    let tar = sample_tar();
    let one = ::zstd::bulk::compress(&tar, 3).unwrap();
    let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&one), one.clone()));
    let (index, _) = CheckpointIndex::build(blob, Codec::Zstd, 64 * 1024, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(index.checkpoints.len(), 1);
    let cut = one[..one.len() / 2].to_vec();
    let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&cut), cut));
    assert!(
        CheckpointIndex::build(blob, Codec::Zstd, 64 * 1024, &|_, _| {})
            .await
            .is_err()
    );
}

#[tokio::test]
async fn marks_let_a_read_fetch_and_verify_only_a_span_prefix() {
    let tar = sample_tar();
    let good = gzip(&tar, 6);
    let span = 512 << 10;
    let index = check_all_reads(good.clone(), &tar, span).await;
    assert_eq!(index.marks.len(), index.checkpoints.len());
    let marks = index.marks[0].clone();
    assert!(marks.len() >= 4, "{} marks in span 0", marks.len());
    let index = Arc::new(index);
    // A read at the start of span 0 fetches only up to the first mark past it.
    let counted = Arc::new(crate::blob::counting::CountingBlob::new(Arc::new(
        MemBlob::new(index.digest.clone(), good.clone()),
    )));
    let gz = CheckpointBlob::new(index.clone(), counted.clone());
    let got = gz.read_at(100, 1000).await.unwrap();
    assert_eq!(&got[..], &tar[100..1100]);
    let fetched = counted.bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(fetched, marks[0].inp - index.span_extent(0).0);
    // A flipped byte after the first mark: the prefix read is unaffected, a read past it fails.
    let mut bad = good.clone();
    bad[(marks[1].inp - 1) as usize] ^= 1;
    let gz = CheckpointBlob::new(
        index.clone(),
        Arc::new(MemBlob::new(index.digest.clone(), bad)),
    );
    assert_eq!(&gz.read_at(100, 1000).await.unwrap()[..], &tar[100..1100]);
    let past = marks[1].out - 10;
    let err = gz.read_at(past, 5).await.unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    // Reads moving forward through a span: a prefix first, then the whole span.
    let counted = Arc::new(crate::blob::counting::CountingBlob::new(Arc::new(
        MemBlob::new(index.digest.clone(), good),
    )));
    let gz = CheckpointBlob::new(index.clone(), counted.clone());
    let (_, o1) = index.span_output(0);
    for off in (0..o1).step_by(64 << 10) {
        let n = (64 << 10).min(o1 - off);
        let got = gz.read_at(off, n).await.unwrap();
        assert_eq!(&got[..], &tar[off as usize..(off + n) as usize]);
    }
    let (start, end) = index.span_extent(0);
    assert_eq!(
        counted.bytes.load(std::sync::atomic::Ordering::Relaxed),
        (marks[0].inp - start) + (end - start),
        "the first mark's prefix, then the span once"
    );
}

#[tokio::test]
async fn a_files_compressed_extent_ends_at_the_mark_past_it() {
    let tar = sample_tar();
    let good = gzip(&tar, 6);
    let index = check_all_reads(good, &tar, 512 << 10).await;
    let marks = &index.marks[0];
    let (start, end) = index.span_extent(0);
    // Inside span 0, before its second mark: from the span's start to that mark.
    assert_eq!(
        index.compressed_extent(100, marks[1].out - 1),
        (start, marks[1].inp)
    );
    // Ending exactly at a mark: that mark.
    assert_eq!(
        index.compressed_extent(100, marks[0].out),
        (start, marks[0].inp)
    );
    // Into span 1: from span 0's start to a mark of span 1 (or its end).
    let (o1_start, _) = index.span_output(1);
    let (s1, e1) = index.span_extent(1);
    let (a, b) = index.compressed_extent(100, o1_start + 10);
    assert_eq!(a, start);
    assert!(b > s1 && b <= e1, "{b} within span 1 ({s1}..{e1})");
    assert!(end <= s1);
}

/// A pending gzip layer served through `decoded`, whose index (with `entries`) came from the
/// registry and is still to be checked.
/// A layer of 80 sample files (gzip, level 6), its index with 4 MiB spans and its windows,
/// and the first mark of span 0 whose front is long enough to be worth a window's request.
struct Indexed {
    tar: Vec<u8>,
    good: Vec<u8>,
    digest: String,
    index: CheckpointIndex,
    windows: Vec<u8>,
    j: usize,
}

async fn indexed_sample() -> Indexed {
    let tar = sample_tar_of(80);
    let good = gzip(&tar, 6);
    let digest = crate::digest::sha256(&good);
    let blob: Blob = Arc::new(MemBlob::new(digest.clone(), good.clone()));
    let (index, windows) = CheckpointIndex::build(blob, Codec::Gzip, 4 << 20, &|_, _| {})
        .await
        .unwrap();
    let marks = &index.marks[0];
    let start = index.span_extent(0).0;
    let j = marks
        .iter()
        .position(|m| m.inp - start >= super::blob::SKIP_MIN)
        .expect("a mark far enough into span 0");
    assert!(j + 1 < marks.len(), "{} marks in span 0", marks.len());
    Indexed {
        tar,
        good,
        digest,
        index,
        windows,
        j,
    }
}

/// With its marks' windows at hand, a read in the middle of a span fetches and decodes from
/// the mark before it, not from the span's start, when that front is long; a reader moving on
/// decodes the rest of the span from that mark; a damaged window costs only the attempt,
/// never a wrong byte.
#[tokio::test]
async fn mark_windows_let_a_read_mid_span_skip_the_span_front() {
    use std::sync::atomic::Ordering::Relaxed;
    let Indexed {
        tar,
        good,
        digest,
        index,
        windows,
        j,
    } = indexed_sample().await;
    let marks = index.marks[0].clone();
    let (start, end) = index.span_extent(0);
    let index = Arc::new(index);
    let counted = || {
        Arc::new(crate::blob::counting::CountingBlob::new(Arc::new(
            MemBlob::new(digest.clone(), good.clone()),
        )))
    };
    let windows_id = index.windows.as_ref().unwrap().digest.clone();
    let windows_of = |bytes: Vec<u8>| -> Blob { Arc::new(MemBlob::new(windows_id.clone(), bytes)) };
    let at = marks[j].out + 100;
    let want = &tar[at as usize..at as usize + 1000];

    let c = counted();
    let gz =
        CheckpointBlob::new(index.clone(), c.clone()).with_windows(windows_of(windows.clone()));
    assert_eq!(&gz.read_at(at, 1000).await.unwrap()[..], want);
    let stretch = marks[j + 1].inp - (marks[j].inp - 1);
    assert_eq!(
        c.bytes.load(Relaxed),
        stretch,
        "from mark j to the next only"
    );
    // Reading on to the span's end: the rest of the span from mark j, once.
    let span_end = index.span_output(0).1;
    let mut off = at + 1000;
    while off < span_end {
        let n = (64 << 10).min(span_end - off);
        let got = gz.read_at(off, n).await.unwrap();
        assert_eq!(&got[..], &tar[off as usize..(off + n) as usize]);
        off += n;
    }
    assert_eq!(c.bytes.load(Relaxed), stretch + (end - (marks[j].inp - 1)));
    assert!(c.bytes.load(Relaxed) < stretch + (end - start));

    // Mark j's entry damaged (its bits to prime): the resume fails its digest, is tried once
    // more from fresh bytes (they might have arrived damaged), then the read decodes from the
    // span's start instead and is still exact.
    let entry_at: u64 = marks[..j]
        .iter()
        .map(|m| u64::from(m.resume.as_ref().unwrap().len))
        .sum();
    let mut bad = windows.clone();
    bad[entry_at as usize] = (bad[entry_at as usize] + 1) % 8;
    let c = counted();
    let gz = CheckpointBlob::new(index.clone(), c.clone()).with_windows(windows_of(bad));
    assert_eq!(&gz.read_at(at, 1000).await.unwrap()[..], want);
    assert_eq!(
        c.bytes.load(Relaxed),
        2 * stretch + (marks[j + 1].inp - start)
    );
    // A windows blob of another size than the index says is not used at all.
    let c = counted();
    let gz = CheckpointBlob::new(index.clone(), c.clone())
        .with_windows(windows_of(windows[..windows.len() - 1].to_vec()));
    assert_eq!(&gz.read_at(at, 1000).await.unwrap()[..], want);
    assert_eq!(c.bytes.load(Relaxed), marks[j + 1].inp - start);
    // A short front is fetched rather than a window (a request of its own).
    let c = counted();
    let gz = CheckpointBlob::new(index.clone(), c.clone()).with_windows(windows_of(windows));
    let near = marks[0].out + 10;
    let got = gz.read_at(near, 100).await.unwrap();
    assert_eq!(&got[..], &tar[near as usize..near as usize + 100]);
    assert_eq!(c.bytes.load(Relaxed), marks[1].inp - start);
}

/// A blob that records what each read asked for (offset, length, and the end of the file
/// being read) and takes `delay` to answer, so that concurrent readers overlap.
struct Probe {
    inner: MemBlob,
    delay: Duration,
    calls: std::sync::Mutex<Vec<(u64, u64, u64)>>,
}

impl Probe {
    fn new(id: String, bytes: Vec<u8>, delay: Duration) -> Arc<Probe> {
        Arc::new(Probe {
            inner: MemBlob::new(id, bytes),
            delay,
            calls: Default::default(),
        })
    }
    fn calls(&self) -> Vec<(u64, u64, u64)> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BlobSource for Probe {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, len: u64) -> Result<bytes::Bytes> {
        self.read_within(offset, len, self.size()).await
    }
}

#[async_trait::async_trait]
impl ReadHints for Probe {
    async fn read_within(&self, offset: u64, len: u64, until: u64) -> Result<bytes::Bytes> {
        self.calls.lock().unwrap().push((offset, len, until));
        tokio::time::sleep(self.delay).await;
        self.inner.read_at(offset, len).await
    }
}

/// A read whose answer decides what to fetch next (`read_now`: a program's dynamic section)
/// tells the compressed blob that its file ends with it, so what a cache fetches past the
/// mark after it is counted and limited as a guess. It used to pass on the end of the layer
/// as the end of the file being read.
#[tokio::test]
async fn a_read_now_marks_only_its_own_range_as_the_file_being_read() {
    let Indexed {
        tar,
        good,
        digest,
        index,
        ..
    } = indexed_sample().await;
    let index = Arc::new(index);
    let at = index.marks[0][0].out + 100;
    let probe = Probe::new(digest, good, Duration::ZERO);
    let gz = CheckpointBlob::new(index.clone(), probe.clone());
    assert_eq!(
        &gz.read_now(at, 512).await.unwrap()[..],
        &tar[at as usize..at as usize + 512]
    );
    let (_, mark_past) = index.compressed_extent(at, at + 512);
    let calls = probe.calls();
    assert!(!calls.is_empty());
    for (offset, len, until) in calls {
        assert_eq!(
            until, mark_past,
            "read {offset}+{len} was told the file ends at {until}, not at the mark past the read"
        );
    }
}

/// Reads that need the same stretch at once (the kernel asks for several pages together)
/// fetch the mark's window once and the stretch's compressed bytes once (and decode it once).
#[tokio::test]
async fn concurrent_reads_of_one_stretch_fetch_its_window_and_bytes_once() {
    let Indexed {
        tar,
        good,
        digest,
        index,
        windows,
        j,
    } = indexed_sample().await;
    let marks = index.marks[0].clone();
    let index = Arc::new(index);
    let delay = Duration::from_millis(30);
    let compressed = Probe::new(digest, good, delay);
    let windows_id = index.windows.as_ref().unwrap().digest.clone();
    let window_blob = Probe::new(windows_id, windows, delay);
    let gz = Arc::new(
        CheckpointBlob::new(index.clone(), compressed.clone()).with_windows(window_blob.clone()),
    );
    let at = marks[j].out + 100;
    let reads: Vec<_> = (0..8u64)
        .map(|i| {
            let gz = gz.clone();
            tokio::spawn(async move { (i, gz.read_at(at + i * 4096, 4096).await.unwrap()) })
        })
        .collect();
    for r in reads {
        let (i, got) = r.await.unwrap();
        let o = (at + i * 4096) as usize;
        assert_eq!(&got[..], &tar[o..o + 4096]);
    }
    assert_eq!(window_blob.calls().len(), 1, "{:?}", window_blob.calls());
    assert_eq!(compressed.calls().len(), 1, "{:?}", compressed.calls());
}

use crate::blob::damaging::Damaging;

/// Damaged bytes cached by the block cache are dropped and fetched again, once: a span read
/// and the index pass of a first mount mend a damaged answer; a second one fails them.
#[tokio::test]
async fn damaged_answers_are_fetched_again_not_kept() {
    let tar = sample_tar();
    let good = gzip(&tar, 6);
    let ra = crate::blob::cache::ReadAhead {
        bytes: 1 << 20,
        after: 1 << 40, // no read-ahead: it would take the damaged answers
    };
    let cache = || crate::blob::cache::BlockCache::new(4096, 4096, 64 << 20, None, ra);
    // The index pass: one damaged answer is mended, two are not.
    let (index, _) = CheckpointIndex::build(
        cache().wrap(Damaging::new(good.clone(), 1)),
        Codec::Gzip,
        64 * 1024,
        &|_, _| {},
    )
    .await
    .unwrap();
    let err = CheckpointIndex::build(
        cache().wrap(Damaging::new(good.clone(), 2)),
        Codec::Gzip,
        64 * 1024,
        &|_, _| {},
    )
    .await
    .map(drop)
    .unwrap_err();
    assert!(err.is_check(), "{err}");
    // A span read through the block cache: the same.
    let index = Arc::new(index);
    let (o0, o1) = index.span_output(3);
    for (damaged, mended) in [(1, true), (2, false)] {
        let gz = CheckpointBlob::new(
            index.clone(),
            cache().wrap(Damaging::new(good.clone(), damaged)),
        );
        let got = gz.read_at(o0, o1 - o0).await;
        match mended {
            true => assert_eq!(&got.unwrap()[..], &tar[o0 as usize..o1 as usize]),
            false => assert!(got.unwrap_err().is_check()),
        }
    }
}

#[tokio::test]
async fn a_pass_asked_to_copy_leaves_the_decoded_tar_only_when_whole_and_within_its_limit() {
    let tar = sample_tar_of(12);
    let gz = gzip(&tar, 6);
    let dir = std::env::temp_dir().join(format!("ocifs-copy-{}", std::process::id()));
    let build = |gz: Vec<u8>, limit: u64| {
        let to = CopyTo {
            dir: dir.clone(),
            limit,
            budget: Arc::new(std::sync::atomic::AtomicU64::new(1 << 30)),
        };
        async move {
            let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&gz), gz));
            CheckpointIndex::build_copying(blob, Codec::Gzip, 64 << 10, &|_, _| {}, Some(&to)).await
        }
    };
    // The copy holds exactly the decoded tar, and the index is the one `build` makes.
    let (index, _, copy) = build(gz.clone(), 1 << 30).await.unwrap();
    let mut copied = Vec::new();
    use std::io::{Read, Seek};
    let mut file = copy.expect("a copy");
    file.rewind().unwrap();
    file.read_to_end(&mut copied).unwrap();
    assert!(copied == tar, "the copy differs from the tar");
    let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&gz), gz.clone()));
    let (plain, _) = CheckpointIndex::build(blob, Codec::Gzip, 64 << 10, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(file::encode(&index), file::encode(&plain));
    // Past its limit there is no copy, but the index is still built.
    let (index, _, copy) = build(gz.clone(), tar.len() as u64 - 1).await.unwrap();
    assert!(copy.is_none());
    assert_eq!(index.uncomp_size, tar.len() as u64);
    // A blob that does not hash to its digest leaves neither.
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    // A budget shared with others that has too little left: no copy either, and what
    // the attempt took is given back.
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(tar.len() as u64 - 1));
    let to = CopyTo {
        dir: dir.clone(),
        limit: 1 << 30,
        budget: budget.clone(),
    };
    let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&gz), gz.clone()));
    let (_, _, copy) =
        CheckpointIndex::build_copying(blob, Codec::Gzip, 64 << 10, &|_, _| {}, Some(&to))
            .await
            .unwrap();
    assert!(copy.is_none());
    assert_eq!(
        budget.load(std::sync::atomic::Ordering::Relaxed),
        tar.len() as u64 - 1
    );
    budget.store(1 << 30, std::sync::atomic::Ordering::Relaxed);
    let blob: Blob = Arc::new(MemBlob::new(crate::digest::sha256(&gz), bad));
    assert!(
        CheckpointIndex::build_copying(blob, Codec::Gzip, 64 << 10, &|_, _| {}, Some(&to))
            .await
            .is_err()
    );
    // The copies were unnamed: nothing is left behind.
    assert_eq!(std::fs::read_dir(&dir).map_or(0, |d| d.count()), 0);
    let _ = std::fs::remove_dir(&dir);
}
