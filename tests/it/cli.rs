//! The command line's edges: clear one-line errors before a mount is ready, and a
//! foreground mount's clean exit on SIGTERM.

use crate::builder::{self, Enc, encode, file};
use crate::harness::{self, Env, Mount, TempDir, ocifs};

#[test]
fn clear_errors_before_the_mount_is_ready() {
    let Some(Env { reg, work }) = Env::new("errors") else {
        return;
    };
    let layers = vec![encode(builder::tar(&[file("a", "a")]), Enc::Tar)];
    builder::push_one(work.path(), &layers, &reg.addr, "err/image");
    let mp = TempDir::new("mp");
    let m = mp.path().to_str().unwrap();
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (format!("{}/err/image:nope", reg.addr), "not found"),
        (format!("{}/err/missing:v1", reg.addr), "not found"),
        (
            format!("127.0.0.1:{}/err/image:v1", harness::free_port()),
            "cannot connect",
        ),
        ("Bad/Ref".to_string(), "invalid reference"),
    ];
    for (r, want) in cases {
        let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &r, m], &[]);
        assert!(!ok, "{r} mounted");
        assert!(err.to_lowercase().contains(want), "{r}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        // Each cause once, though the serving process's error passes through its supervisor.
        assert!(
            err.matches("opening").count() <= 1,
            "{r}: said twice: {err}"
        );
    }
    let good = format!("{}/err/image:v1", reg.addr);
    let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &good, "/nonexistent/mp"], &[]);
    assert!(!ok && err.contains("/nonexistent/mp"), "{err}");
    std::fs::write(mp.path().join("file"), "x").unwrap();
    let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &good, m], &[]);
    assert!(!ok && err.contains("not empty"), "{err}");
    std::fs::remove_file(mp.path().join("file")).unwrap();
    let mounted = Mount::new(&good, &[], &[]);
    let (ok, _, err) = ocifs(
        &[
            "mount",
            "--cache-dir",
            cd,
            &good,
            mounted.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !ok && (err.contains("busy") || err.contains("not empty")),
        "{err}"
    );
    assert!(
        std::fs::write(mounted.path().join("new"), "x").is_err(),
        "read-only"
    );
}

#[test]
fn foreground_mount_unmounts_cleanly_on_sigterm() {
    let Some(Env { reg, work }) = Env::new("fg") else {
        return;
    };
    let layers = vec![encode(builder::tar(&[file("hello", "hi\n")]), Enc::Gzip)];
    builder::push_one(work.path(), &layers, &reg.addr, "fg/image");
    let mp = TempDir::new("fg-mp");
    let cache = work.path().join("cache");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args([
            "mount",
            "--foreground",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
        .arg(format!("{}/fg/image:v1", reg.addr))
        .arg(mp.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hello = mp.path().join("hello");
    for _ in 0..200 {
        if hello.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(std::fs::read_to_string(&hello).unwrap(), "hi\n");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!hello.exists(), "unmounted");
    assert!(std::fs::read_dir(mp.path()).unwrap().next().is_none());
}
