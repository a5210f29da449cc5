//! What a user finds without reading the source: `--version` names the commit and what is
//! compiled in, shell completions and man pages come from the same definitions as `--help`.

use crate::harness::{TempDir, ocifs};

#[test]
fn version_completions_and_man_pages() {
    let (ok, out, err) = ocifs(&["--version"], &[]);
    assert!(ok, "{err}");
    let v = String::from_utf8(out).unwrap();
    assert!(
        v.contains("commit") && v.contains("eStargz") && v.contains("zstd:chunked"),
        "{v}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = ocifs(&["completions", shell], &[]);
        assert!(ok, "{shell}: {err}");
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("mount") && script.contains("cache-dir"),
            "{shell}"
        );
    }
    let dir = TempDir::new("man");
    let (ok, _, err) = ocifs(&["man", dir.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let page = std::fs::read_to_string(dir.path().join("ocifs-mount.1")).unwrap();
    assert!(
        page.contains(".TH") && page.contains("cache\\-dir"),
        "{page}"
    );
    assert!(dir.path().join("ocifs.1").exists());
}
