use super::*;
use crate::blob::{Blob, MemBlob};
use std::sync::Arc;

fn sample_tar() -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: ::tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = ::tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == ::tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(7);
        h.set_gid(8);
        h.set_mtime(1_700_000_000);
        match link {
            Some(l) => b.append_link(&mut h, path, l).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    add("app", ::tar::EntryType::Directory, b"", None);
    add(
        "app/big.bin",
        ::tar::EntryType::Regular,
        &vec![42u8; 300_000],
        None,
    );
    add(
        "app/main.py",
        ::tar::EntryType::Regular,
        b"print('hi')\n",
        None,
    );
    add("app/link", ::tar::EntryType::Link, b"", Some("app/main.py"));
    add(
        &format!("app/{}", "x".repeat(140)),
        ::tar::EntryType::Regular,
        b"long",
        None,
    );
    add("empty", ::tar::EntryType::Regular, b"", None);
    b.into_inner().unwrap()
}

/// `blob`, the bytes `w` describes, opened as our reader opens a layer: tail, then TOC.
async fn open_written(
    blob: Blob,
    w: &Written,
) -> (
    crate::layer::chunked::Reader,
    Vec<crate::layer::Entry>,
    bool,
) {
    let (tail_start, tail) = crate::blob::read_tail(&blob, crate::blob::TAIL_READ)
        .await
        .unwrap();
    // The offset `convert` announces is the footer's.
    let footer = crate::layer::estargz::parse_footer(&tail).unwrap();
    assert_eq!(footer, (w.toc_offset, false));
    // The TOC vouches for its chunk digests only when the manifest names its digest.
    let unnamed = crate::layer::estargz::open(blob.clone(), tail_start, tail.clone(), None);
    assert!(!unnamed.await.unwrap().0.toc_vouched);
    let opened = crate::layer::estargz::open(blob, tail_start, tail, Some(&w.toc_digest))
        .await
        .unwrap();
    assert!(opened.0.toc_vouched);
    opened
}

/// `tar` written as eStargz in 64 KiB chunks with `prioritized` first: what was written,
/// and the blob.
fn write_sample(tar: &[u8], prioritized: &[&str]) -> (Written, Vec<u8>) {
    let mut out = Vec::new();
    let opts = Options {
        chunk_size: 64 * 1024,
        prioritized: prioritized.iter().map(|p| p.to_string()).collect(),
    };
    let w = write(std::io::Cursor::new(tar), &mut out, &opts).unwrap();
    (w, out)
}

#[tokio::test]
async fn written_blob_reads_back_identically_and_is_a_plain_tar_gz() {
    let tar = sample_tar();
    let (w, out) = write_sample(&tar, &["app/main.py"]);
    assert_eq!(w.digest, crate::digest::sha256(&out));
    // A plain tar.gz: the same entries (plus the landmark and the TOC) come out of gunzip.
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(&out[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(w.diff_id, crate::digest::sha256(&plain));
    let names: Vec<String> = crate::layer::tar::index_reader(std::io::Cursor::new(&plain), "t")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        &names[..3],
        &["app", "app/main.py", ".prefetch.landmark"],
        "prioritized first, after its parent"
    );
    assert_eq!(names.last().unwrap(), "stargz.index.json");
    // Our reader sees the same files with the same bytes.
    let blob: Blob = Arc::new(MemBlob::new(w.digest.clone(), out.clone()));
    let (reader, entries, legacy) = open_written(blob, &w).await;
    assert!(!legacy);
    assert!(reader.prefetch_len > 0);
    let original = crate::layer::tar::index_reader(std::io::Cursor::new(&tar), "t").unwrap();
    assert_eq!(entries.len(), original.len());
    for e in &entries {
        let o = original.iter().find(|o| o.path == e.path).unwrap();
        assert_eq!(
            (e.kind, e.mode, e.uid, e.gid, e.size, e.mtime),
            (o.kind, o.mode, o.uid, o.gid, o.size, o.mtime),
            "{}",
            e.path
        );
        if let (Locator::Chunks(c), Locator::Tar { offset }) = (&e.data, &o.data) {
            let got = reader.read(c, 0, e.size).await.unwrap();
            assert_eq!(
                &got[..],
                &tar[*offset as usize..(*offset + e.size) as usize],
                "{}",
                e.path
            );
            if e.size > 64 * 1024 {
                assert!(c.len() > 1, "{} is chunked", e.path);
            }
        }
    }
}

#[test]
fn rfc3339_matches_the_parser() {
    for t in [0i64, 1_700_000_000, 951_782_400, 4_102_444_800] {
        assert_eq!(crate::layer::toc::parse_rfc3339(&rfc3339(t)), Some(t));
    }
}

#[tokio::test]
async fn prioritized_files_are_announced_and_their_chunks_decoded_ahead() {
    let (w, out) = write_sample(&sample_tar(), &["app/big.bin", "app/main.py"]);
    let mem: Blob = Arc::new(MemBlob::new(w.digest.clone(), out.clone()));
    let counter = Arc::new(crate::blob::counting::CountingBlob::new(mem));
    let (reader, entries, _) = open_written(counter.clone(), &w).await;
    // What `convert` announces in the layer's annotation is where the TOC's landmark is.
    assert!(w.prefetch_size > 0);
    assert_eq!(w.prefetch_size, reader.prefetch_len);
    let chunks = |path: &str| match &entries.iter().find(|e| e.path == path).unwrap().data {
        Locator::Chunks(c) => c.to_vec(),
        other => panic!("{path}: {other:?}"),
    };
    let (big, main) = (chunks("app/big.bin"), chunks("app/main.py"));
    assert!(big.len() > 1);
    let mut ahead = big.clone();
    ahead.extend(main.iter().cloned());
    let done = std::sync::atomic::AtomicU64::new(0);
    let (fetched, ()) = futures::join!(reader.prefetch(&done), reader.decode_ahead(&ahead));
    fetched.unwrap();
    assert_eq!(
        done.load(std::sync::atomic::Ordering::Relaxed),
        reader.prefetch_len
    );
    // Decoded ahead and kept: reading them fetches nothing more.
    let requests = counter.requests.load(std::sync::atomic::Ordering::Relaxed);
    let got = reader.read(&big, 0, 300_000).await.unwrap();
    assert_eq!(&got[..], &vec![42u8; 300_000][..]);
    assert_eq!(
        &reader.read(&main, 0, 12).await.unwrap()[..],
        b"print('hi')\n"
    );
    assert_eq!(
        counter.requests.load(std::sync::atomic::Ordering::Relaxed),
        requests
    );
}
