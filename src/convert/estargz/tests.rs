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

#[tokio::test]
async fn written_blob_reads_back_identically_and_is_a_plain_tar_gz() {
    let tar = sample_tar();
    let mut out = Vec::new();
    let opts = Options {
        chunk_size: 64 * 1024,
        prioritized: vec!["app/main.py".into()],
    };
    let w = write(std::io::Cursor::new(&tar), &mut out, &opts).unwrap();
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
    let (tail_start, tail) = crate::blob::read_tail(&blob, crate::blob::TAIL_READ)
        .await
        .unwrap();
    let (reader, entries, legacy) =
        crate::layer::estargz::open(blob, tail_start, tail, Some(&w.toc_digest))
            .await
            .unwrap();
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
