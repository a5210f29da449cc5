//! Verification: a layer served through an index from the registry (a hostile index is
//! refused or found out, an honest one passes), and what a damaged answer may leave behind.

use crate::blob::cache::{BlockCache, ReadAhead};
use crate::blob::damaging::Damaging;
use crate::blob::{Blob, BlobSource, MemBlob};
use crate::layer::Entry;
use crate::layer::Format;
use crate::layer::checkpoint::tests::{gzip, sample_tar, sample_tar_of};
use crate::layer::checkpoint::{CheckpointBlob, CheckpointIndex, Codec, file};
use std::sync::{Arc, RwLock};
use std::time::Duration;

fn unchecked_layer(
    digest: &str,
    decoded: Blob,
    entries: &[Entry],
    index: &CheckpointIndex,
) -> Arc<crate::layer::Layer> {
    use crate::layer::{Format, Health, IndexCheck, Layer, LayerData};
    Arc::new(Layer {
        digest: digest.to_string(),
        format: Format::Gzip,
        data: LayerData::Tar(decoded),
        health: std::sync::RwLock::new(Health::Pending),
        index_source: Some("test"),
        index_check: Some(IndexCheck {
            entries: file::entries_digest(entries),
            kept: None,
            stretches: index.mark_stretches(),
        }),
        entries_read: None,
    })
}

/// A hostile index (any values, with a valid checksum, as anyone publishing one can make) is
/// refused at once, or verification finds out exactly when it lies: when decoding the layer
/// through it does not give the layer's bytes, or its entries are not the layer's. Never a
/// panic or a hang. Values in the decoded payload are changed at random, many times.
#[tokio::test]
async fn a_hostile_index_is_refused_or_found_out() {
    use crate::layer::Health;
    let tar = sample_tar_of(10);
    let blob_bytes = gzip(&tar, 6);
    let digest = crate::digest::sha256(&blob_bytes);
    let diff_ids = [crate::digest::sha256(&tar)];
    let blob: Blob = Arc::new(MemBlob::new(digest.clone(), blob_bytes));
    let (index, windows) = CheckpointIndex::build(blob.clone(), Codec::Gzip, 64 << 10, &|_, _| {})
        .await
        .unwrap();
    let windows: Blob = Arc::new(MemBlob::new("windows", windows));
    let encoded = file::encode(&index);
    let raw = ::zstd::bulk::decompress(&encoded[52..], 64 << 20).unwrap();
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 11
    };
    let (mut accepted, mut lying) = (0, 0);
    for _ in 0..80 {
        let mut r = raw.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() as usize) % r.len();
            let end = (at + 8).min(r.len());
            let value = match next() % 4 {
                0 => next() % 300_000,
                1 => u64::MAX - next() % 3,
                2 => u64::from(r[at] ^ (1 << (next() % 8))),
                _ => next(),
            };
            r[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
        }
        let Ok(mut hostile) = file::decode(&file::frame(file::VERSION, &r), &digest) else {
            continue;
        };
        accepted += 1;
        let entries = std::mem::take(&mut hostile.entries);
        let hostile = Arc::new(hostile);
        let mut resumed_lies = false;
        for at in hostile.mark_stretches().iter().map(|s| s.0 + 10) {
            let Some(len) = (tar.len() as u64).checked_sub(at).map(|l| l.min(2000)) else {
                continue;
            };
            let gz = CheckpointBlob::new(hostile.clone(), blob.clone());
            let got = gz.with_windows(windows.clone()).read_at(at, len).await;
            resumed_lies |= got.is_ok_and(|got| got[..] != tar[at as usize..(at + len) as usize]);
        }
        let gz: Blob = Arc::new(CheckpointBlob::new(hostile.clone(), blob.clone()));
        let whole = tokio::time::timeout(Duration::from_secs(20), gz.read_at(0, tar.len() as u64))
            .await
            .expect("a read through a hostile index hung");
        let lies =
            entries != index.entries || whole.is_ok_and(|got| got[..] != tar[..]) || resumed_lies;
        let layer = unchecked_layer(&digest, gz, &entries, &hostile);
        let layers = [(&*layer, &blob)];
        let verified = crate::verify::verify_layers(&layers, &diff_ids, &|| true);
        tokio::time::timeout(Duration::from_secs(60), verified)
            .await
            .expect("verifying through a hostile index hung")
            .unwrap();
        let health = layer.health.read().unwrap().clone();
        if lies {
            assert!(matches!(health, Health::Bad(_)), "a lying index passed");
        }
        lying += usize::from(lies);
    }
    // The mutations must reach the read path and verification, not only the parser.
    assert!(
        accepted > 20 && lying > 10,
        "{accepted} accepted, {lying} lying"
    );
}

#[tokio::test]
async fn the_honest_index_passes_verification() {
    use crate::layer::Health;
    let tar = sample_tar();
    let blob_bytes = gzip(&tar, 6);
    let digest = crate::digest::sha256(&blob_bytes);
    let blob: Blob = Arc::new(MemBlob::new(digest.clone(), blob_bytes));
    let (mut index, _) = CheckpointIndex::build(blob.clone(), Codec::Gzip, 128 << 10, &|_, _| {})
        .await
        .unwrap();
    let entries = std::mem::take(&mut index.entries);
    let index = Arc::new(index);
    let gz = Arc::new(CheckpointBlob::new(index.clone(), blob.clone()));
    let layer = unchecked_layer(&digest, gz, &entries, &index);
    // The size the index claims is not told (the store's `info`) before it is checked.
    assert_eq!(layer.uncompressed_size(), None);
    let layers = [(&*layer, &blob)];
    crate::verify::verify_layers(&layers, &[crate::digest::sha256(&tar)], &|| true)
        .await
        .unwrap();
    assert_eq!(*layer.health.read().unwrap(), Health::Verified);
    assert_eq!(layer.uncompressed_size(), Some(tar.len() as u64));
    // A config naming another diff_id fails it.
    *layer.health.write().unwrap() = Health::Pending;
    crate::verify::verify_layers(&layers, &["sha256:00".into()], &|| true)
        .await
        .unwrap();
    assert!(matches!(*layer.health.read().unwrap(), Health::Bad(_)));
    // An index whose digest of the output after one mark is not the layer's (as a window
    // crafted to decode to other bytes would need) fails it, though every span is right.
    let mut lying = (*index).clone();
    let m = lying.marks.iter_mut().flatten().nth(3).expect("marks");
    m.resume.as_mut().unwrap().out_digest[0] ^= 1;
    let lying = Arc::new(lying);
    let gz = Arc::new(CheckpointBlob::new(lying.clone(), layers[0].1.clone()));
    let layer = unchecked_layer(&digest, gz, &entries, &lying);
    let blob = layers[0].1.clone();
    let layers = [(&*layer, &blob)];
    crate::verify::verify_layers(&layers, &[crate::digest::sha256(&tar)], &|| true)
        .await
        .unwrap();
    let health = layer.health.read().unwrap().clone();
    assert!(
        matches!(&health, Health::Bad(why) if why.contains("output from offset")),
        "{health:?}"
    );
}

/// The issue this answers: one damaged answer, cached, made a layer bad for good.
#[tokio::test]
async fn a_mismatch_is_checked_again_from_fresh_bytes_before_the_layer_is_bad() {
    // One piece (one request) per pass, so that `damaged` counts passes.
    let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let ra = ReadAhead {
        bytes: 1 << 20,
        after: 1 << 40, // no read-ahead: it would take the damaged answers
    };
    for (damaged, verified) in [(1, true), (2, false)] {
        let src = Damaging::new(bytes.clone(), damaged);
        let raw = BlockCache::new(64 << 10, 1 << 20, 64 << 20, None, ra).wrap(src);
        let layer = crate::layer::Layer {
            digest: raw.id().to_string(),
            format: Format::Tar,
            data: crate::layer::LayerData::Tar(raw.clone()),
            health: RwLock::new(crate::layer::Health::Pending),
            index_source: None,
            index_check: None,
            entries_read: None,
        };
        crate::verify::verify_layers(&[(&layer, &raw)], &[], &|| true)
            .await
            .unwrap();
        let health = layer.health.read().unwrap().clone();
        match verified {
            true => assert_eq!(health, crate::layer::Health::Verified),
            false => assert!(matches!(health, crate::layer::Health::Bad(_)), "{health:?}"),
        }
    }
}

/// A tar layer's file list is read from its blob before anything vouches for it, and a long
/// name's bytes have no checksum of their own. When the blob's digest matches only on bytes
/// fetched again, the list is read again: a name that came from the damaged answer makes
/// the layer bad (its files were placed by it); damage in a file's data alone does not.
#[tokio::test]
async fn a_file_list_read_from_a_damaged_answer_is_found_out() {
    use crate::layer::{Health, Layer, LayerData};
    let ra = ReadAhead {
        bytes: 64 << 10,
        after: 1 << 40,
    };
    let name = format!(
        "{}/{}/{}/f",
        "a".repeat(200),
        "b".repeat(200),
        "c".repeat(200)
    );
    // The first read (block 0, 64 KiB) is damaged in its middle byte, offset 32768: inside
    // the long name's bytes (its GNU header at 31744, its data from 32256), or, with a
    // larger first file, inside that file's data.
    for (first, list_damaged) in [(31232, true), (40448, false)] {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, size) in [("first", first), (name.as_str(), 10), ("last", 100_000)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(size as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            let data = vec![b'x'; size];
            builder.append_data(&mut header, path, &data[..]).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        // One block per fetch, so that the first read is block 0.
        let raw =
            BlockCache::new(64 << 10, 64 << 10, 64 << 20, None, ra).wrap(Damaging::new(bytes, 1));
        let opened = crate::layer::tar::index(raw.clone()).await.unwrap();
        let names: Vec<&str> = opened.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names.contains(&name.as_str()), !list_damaged, "{names:?}");
        let layer = Layer {
            digest: raw.id().to_string(),
            format: Format::Tar,
            data: LayerData::Tar(raw.clone()),
            health: RwLock::new(Health::Pending),
            index_source: None,
            index_check: None,
            entries_read: Some(file::entries_digest(&opened)),
        };
        crate::verify::verify_layers(&[(&layer, &raw)], &[], &|| true)
            .await
            .unwrap();
        let health = layer.health.read().unwrap().clone();
        match list_damaged {
            true => assert!(matches!(health, Health::Bad(_)), "{health:?}"),
            false => assert_eq!(health, Health::Verified),
        }
    }
}
