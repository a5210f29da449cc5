//! `pull` refuses a corrupt layer (the browse verbs themselves are tested in `browse.rs` and
//! `help.rs`, as main has them).

use crate::builder::{self, Enc, encode, file};
use crate::harness::{Env, ocifs};

#[test]
fn pull_refuses_a_layer_that_does_not_match_its_digest() {
    let Some(Env { reg, work }) = Env::without_fuse("pull-bad") else {
        return;
    };
    let layers = vec![
        encode(builder::tar(&[file("good", "good\n")]), Enc::Gzip),
        encode(
            builder::tar(&[file("data", crate::builder::noise(200_000, 3))]),
            Enc::Tar,
        ),
    ];
    builder::push_one(work.path(), &layers, &reg.addr, "pull/bad");
    // Flip one byte in the middle of the stored tar layer.
    let d = builder::sha(&layers[1].blob);
    let path = reg.blob_path(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let cache = work.path().join("cache");
    let into = work.path().join("rootfs");
    let (ok, _, err) = ocifs(
        &[
            "pull",
            "-q",
            "--cache-dir",
            cache.to_str().unwrap(),
            &format!("{}/pull/bad:v1", reg.addr),
            into.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok, "pulled a corrupt layer");
    // One error line (the library's own log lines aside), naming the layer.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ocifs:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&d) && lines[0].contains("digest"),
        "{err}"
    );
    assert!(!into.join("data").exists(), "nothing written from it");
}
