//! `ocifs convert --estargz`: to a registry and to an OCI layout.

use crate::builder::{self, Enc, encode, file, noise};
use crate::fixtures::base_layers;
use crate::harness::{Env, Mount, TempDir, ocifs};
use crate::oracle;

#[test]
fn convert_to_estargz_is_correct_lazy_and_readable_by_stargz_snapshotter() {
    let Some(Env { reg, work }) = Env::new("convert") else {
        return;
    };
    let mut tars = base_layers();
    // Larger than one upload chunk (8 MiB): the converted layer goes up in several PATCHes.
    tars.push(builder::tar(&[file("big.bin", noise(18 << 20, 11))]));
    let layers: Vec<_> = tars
        .iter()
        .cloned()
        .zip([Enc::Gzip, Enc::Tar, Enc::Gzip])
        .map(|(t, e)| encode(t, e))
        .collect();
    builder::push_one(work.path(), &layers, &reg.addr, "conv/src");
    let profile = work.path().join("profile");
    std::fs::write(&profile, "{\"layer\":\"\",\"path\":\"bin/tool\",\"offset\":0,\"len\":10}\n{\"layer\":\"\",\"path\":\"opq/upper\",\"offset\":0,\"len\":5}\n").unwrap();
    let cache = work.path().join("cache");
    let cd = cache.to_str().unwrap();
    let src = format!("{}/conv/src:v1", reg.addr);
    let dst = format!("{}/conv/dst:v1", reg.addr);
    let (ok, out, err) = ocifs(
        &[
            "convert",
            "--estargz",
            "--chunk-size",
            "64KiB",
            "--profile",
            profile.to_str().unwrap(),
            "--cache-dir",
            cd,
            &src,
            &dst,
        ],
        &[],
    );
    assert!(ok, "convert: {err}");
    assert!(String::from_utf8_lossy(&out).contains("converted"), "{err}");

    let (ok, out, err) = ocifs(&["inspect", "--json", &dst], &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let formats: Vec<&str> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["estargz", "estargz", "estargz"]);

    // The converted image is the same tree.
    let expected_root = work.path().join("expected");
    oracle::extract(&[&tars[0], &tars[1], &tars[2]], &expected_root);
    let m = Mount::new(&dst, &[], &[]);
    oracle::assert_same(
        &oracle::snapshot(&expected_root),
        &oracle::snapshot(m.path()),
    );

    // stargz-snapshotter's own reader accepts every layer: TOC digest and chunk digests.
    for (i, l) in v["layers"].as_array().unwrap().iter().enumerate() {
        let digest = l["digest"].as_str().unwrap();
        let (ok, blob, err) = ocifs(&["fetch", &dst, digest], &[]);
        assert!(ok, "{err}");
        let path = work.path().join(format!("layer{i}.esgz"));
        std::fs::write(&path, &blob).unwrap();
        let (_, manifest, _) = ocifs(&["fetch", &dst], &[]);
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let annotations = &m["layers"][i]["annotations"];
        let toc = annotations["containerd.io/snapshot/stargz/toc.digest"]
            .as_str()
            .unwrap()
            .to_string();
        // The layers with profiled files announce how far they reach (the mount above
        // streamed them in beside the TOCs); the last has none.
        let front = annotations["io.ocifs.prefetch-size"].as_str();
        match i {
            2 => assert_eq!(front, None),
            _ => assert!(
                front
                    .and_then(|f| f.parse::<u64>().ok())
                    .is_some_and(|f| f > 0),
                "layer {i}: {annotations}"
            ),
        }
        // Every layer announces where its TOC starts: the footer's offset.
        let toc_at = annotations["io.ocifs.toc-offset"].as_str();
        let footer = &blob[blob.len() - 51..];
        let hex = std::str::from_utf8(&footer[16..32]).unwrap();
        let want = u64::from_str_radix(hex, 16).unwrap().to_string();
        assert_eq!(toc_at, Some(want.as_str()), "layer {i}");
        let file = ["bin/tool", "opq/upper", "big.bin"][i];
        let out = std::process::Command::new(builder::estargz_tool())
            .args(["--verify", path.to_str().unwrap(), &toc, file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stargz-snapshotter rejects layer {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = builder::sha(&std::fs::read(expected_root.join(file)).unwrap());
        assert_eq!(
            format!(
                "sha256:{}",
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap()
            ),
            want
        );
    }

    // To an OCI layout too, mounted from there with the same code path.
    let oci = work.path().join("oci-out");
    let dest = format!("oci:{}:esgz", oci.display());
    let (ok, _, err) = ocifs(
        &["convert", "--estargz", "--cache-dir", cd, &src, &dest],
        &[],
    );
    assert!(ok, "convert to layout: {err}");
    let (ok, out, err) = ocifs(&["cat", "--cache-dir", cd, &dest, "etc/hostname"], &[]);
    assert!(ok, "{err}");
    assert_eq!(out, b"changed\n");
    // A layout's blobs are files already: reading them keeps no second copy in blocks.
    let fresh = TempDir::new("layout-cache");
    let fresh_dir = fresh.path().to_str().unwrap();
    let (ok, out, err) = ocifs(&["cat", "--cache-dir", fresh_dir, &dest, "big.bin"], &[]);
    assert!(ok, "{err}");
    assert_eq!(
        builder::sha(&out),
        builder::sha(&std::fs::read(expected_root.join("big.bin")).unwrap())
    );
    let blocks = fresh.path().join("blocks");
    let kept = std::fs::read_dir(&blocks).map_or(0, |d| d.count());
    assert_eq!(
        kept,
        0,
        "blocks of a local layout kept in {}",
        blocks.display()
    );
}
