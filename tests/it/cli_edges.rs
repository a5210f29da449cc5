//! The command line at its edges: interrupting a mount, unmounting what is not ours, errors
//! on one line, FUSE access checked first, a profile complete when `umount` returns, convert's
//! scratch files, plain log files, and `index` with a fresh cache directory.

use crate::builder::{self, Enc, encode, file, noise};
use crate::harness::{self, Env, Mount, Proxy, TempDir, ocifs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Polls `f` until it holds or `limit` passes; whether it held.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// The daemon log files in a cache directory, all their text.
fn logs(cache: &Path) -> String {
    let mut text = String::new();
    for e in std::fs::read_dir(cache.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        text += &std::fs::read_to_string(e.path()).unwrap_or_default();
    }
    text
}

/// Regular files anywhere under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// After an interrupted mount: nothing mounted at `mp`, or a working ocifs mount there.
fn no_dead_mount(mp: &Path, file: &str, want: &[u8]) {
    match ocifs::daemon::mounted_at(mp).unwrap() {
        None => {}
        Some(m) => {
            assert!(m.is_ocifs(), "{m:?}");
            let got = std::fs::read(mp.join(file)).expect("a mount left behind must work");
            assert_eq!(got, want);
            let (ok, _, err) = ocifs(&["umount", mp.to_str().unwrap()], &[]);
            assert!(ok, "{err}");
        }
    }
}

/// An image slow to mount: its gzip layer is read whole (to index it) through a slow link.
fn slow_image(tag: &str) -> Option<(Env, Proxy, String, Vec<u8>)> {
    let env = Env::new(tag)?;
    let hello = b"hello\n".to_vec();
    let tar = builder::tar(&[file("hello", hello.clone()), file("big", noise(6 << 20, 3))]);
    builder::push_one(
        env.work.path(),
        &[encode(tar, Enc::Gzip)],
        &env.reg.addr,
        "slow/image",
    );
    let proxy = Proxy::with_link(
        &env.reg.addr,
        None,
        Some((Duration::from_millis(5), 1_500_000)),
    );
    let r = format!("{}/slow/image:v1", proxy.addr);
    Some((env, proxy, r, hello))
}

#[test]
fn interrupting_a_mount_leaves_no_dead_mount() {
    let Some((env, proxy, r, hello)) = slow_image("intr") else {
        return;
    };
    // Ctrl-C at a terminal: SIGINT to the command's process group while the daemon reads.
    let mp = TempDir::new("intr-mp");
    let cache = env.work.path().join("cache-int");
    let child = Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args(["mount", "--cache-dir", cache.to_str().unwrap(), &r])
        .arg(mp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        proxy.blob_requests.load(Ordering::SeqCst) > 0
    }));
    // SAFETY: signalling the process group of our own child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{}: {err}", out.status);
    assert!(err.contains("interrupted"), "{err}");
    no_dead_mount(mp.path(), "hello", &hello);
    assert!(!logs(&cache).contains("panicked"), "{}", logs(&cache));

    // The command killed outright: the daemon cannot report, so it does not keep the mount.
    let mp = TempDir::new("intr-mp2");
    let cache = env.work.path().join("cache-kill");
    proxy.reset();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args(["mount", "--cache-dir", cache.to_str().unwrap(), &r])
        .arg(mp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        proxy.blob_requests.load(Ordering::SeqCst) > 0
    }));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(child);
    let done = wait_until(Duration::from_secs(60), || {
        let l = logs(&cache);
        l.contains("panicked") || l.contains("is gone before the mount was ready")
    });
    assert!(done, "daemon log: {}", logs(&cache));
    assert!(!logs(&cache).contains("panicked"), "{}", logs(&cache));
    assert!(wait_until(Duration::from_secs(10), || {
        ocifs::daemon::mounted_at(mp.path()).unwrap().is_none()
    }));
}

#[test]
fn umount_and_stats_refuse_what_is_not_an_ocifs_mount() {
    if !harness::require(&[], true) {
        return;
    }
    let dir = TempDir::new("not-ocifs");
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = ocifs(&["umount", d], &[]);
    assert!(!ok && err.contains("not an ocifs mount"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, _, err) = ocifs(&["stats", d], &[]);
    assert!(!ok && err.contains("not an ocifs mount"), "{err}");
    assert!(!err.contains(".sock"), "no internal paths: {err}");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "ocifs-test-tmpfs", d])
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs (needs root)");
    let (ok, _, err) = ocifs(&["umount", d], &[]);
    let still = ocifs::daemon::mounted_at(dir.path())
        .unwrap()
        .map(|m| m.fstype);
    let _ = Command::new("umount").arg(d).status();
    assert!(!ok, "unmounted a tmpfs");
    assert!(
        err.contains("not an ocifs mount") && err.contains("tmpfs"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(still.as_deref(), Some("tmpfs"));
}

#[test]
fn errors_are_one_line_said_once() {
    let Some(Env { reg, work }) = Env::new("once") else {
        return;
    };
    builder::push_one(
        work.path(),
        &[encode(builder::tar(&[file("a", "a")]), Enc::Tar)],
        &reg.addr,
        "once/image",
    );
    let good = format!("{}/once/image:v1", reg.addr);
    let cd = work.path().join("cache");
    let cd = cd.to_str().unwrap();
    let one_line = |err: &str| assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // A busy mountpoint, said once.
    let mounted = Mount::new(&good, &[], &[]);
    let m = mounted.path().to_str().unwrap();
    let (ok, _, err) = ocifs(&["mount", "--cache-dir", cd, &good, m], &[]);
    assert!(!ok && err.matches("busy").count() == 1, "{err}");
    one_line(&err);
    drop(mounted);

    // Nothing listening: the host, what happened, no URL or OS error number.
    let down = format!("127.0.0.1:{}/once/image:v1", harness::free_port());
    let (ok, _, err) = ocifs(&["ls", "--cache-dir", cd, &down], &[]);
    assert!(!ok && err.contains("cannot connect to 127.0.0.1:"), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    assert!(
        !err.contains("http://") && !err.contains("os error"),
        "{err}"
    );
    one_line(&err);

    // A web server that is not a registry.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in web.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot here\n",
            );
        }
    });
    let (ok, _, err) = ocifs(
        &["ls", "--cache-dir", cd, &format!("{web_addr}/a/b:c")],
        &[],
    );
    assert!(!ok && err.contains("is not a container registry"), "{err}");
    one_line(&err);

    // A digest reference is written name@sha256:..., and skopeo's docker:// is accepted.
    let missing = format!("sha256:{}", "0".repeat(64));
    let (ok, _, err) = ocifs(
        &[
            "ls",
            "--cache-dir",
            cd,
            &format!("{}/once/image@{missing}", reg.addr),
        ],
        &[],
    );
    assert!(
        !ok && err.contains(&format!("once/image@{missing}")),
        "{err}"
    );
    assert!(!err.contains(&format!("once/image:{missing}")), "{err}");
    one_line(&err);
    let (ok, out, err) = ocifs(&["ls", "--cache-dir", cd, &format!("docker://{good}")], &[]);
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "/a");
}

#[test]
fn without_access_to_dev_fuse_a_user_is_told_before_any_network_work() {
    if !harness::require(&["unshare", "setpriv"], true) {
        return;
    }
    // A "registry" that counts the connections it gets.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let r = format!("{}/a/b:c", listener.local_addr().unwrap());
    let work = TempDir::new("nofuse");
    let mp = work.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    // /dev/fuse as a user without access to it sees it, whatever this machine's mode for
    // it: a root-only file mounted over it in a mount namespace of the test's own.
    let fake = work.path().join("fuse");
    std::fs::write(&fake, "").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for extra in [&[][..], &["--foreground"][..]] {
        let script = format!(
            "mount --bind {} /dev/fuse && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$@\"",
            fake.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "sh", "-c", &script, "sh"])
            .arg(env!("CARGO_BIN_EXE_ocifs"))
            .args(["mount", "--cache-dir"])
            .arg(work.path().join("cache"))
            .args(extra)
            .arg(&r)
            .arg(&mp);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mounted without /dev/fuse");
        assert!(err.contains("/dev/fuse"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(listener.accept().is_err(), "the registry was contacted");
}

#[test]
fn a_recorded_profile_is_complete_when_umount_returns() {
    let Some(Env { reg, work }) = Env::new("record") else {
        return;
    };
    let tar = builder::tar(&[file("a.txt", "aaa\n"), file("b.bin", noise(300 << 10, 1))]);
    let layers = [encode(tar, Enc::Gzip)];
    builder::push_one(work.path(), &layers, &reg.addr, "rec/image");
    let profile = work.path().join("profile.json");
    let m = Mount::new(
        &format!("{}/rec/image:v1", reg.addr),
        &["--record", profile.to_str().unwrap()],
        &[],
    );
    assert_eq!(std::fs::read(m.path().join("a.txt")).unwrap(), b"aaa\n");
    std::fs::read(m.path().join("b.bin")).unwrap();
    // `stats` gives each layer's size beside what was fetched of it.
    let (ok, out, err) = ocifs(&["stats", "--json", m.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let stats: ocifs::stats::MountStats = serde_json::from_slice(&out).unwrap();
    assert_eq!(stats.layers[0].size, layers[0].blob.len() as u64);
    let (ok, out, _) = ocifs(&["stats", m.path().to_str().unwrap()], &[]);
    assert!(ok && String::from_utf8_lossy(&out).contains("%)"));
    let (ok, _, err) = ocifs(&["umount", m.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let accesses = ocifs::speculate::read_profile(&profile).expect("the profile is written");
    for f in ["a.txt", "b.bin"] {
        assert!(
            accesses.iter().any(|a| a.path.trim_start_matches('/') == f),
            "{f} in {accesses:?}"
        );
    }
}

#[test]
fn daemon_logs_have_no_colour_codes() {
    let Some(Env { reg, work }) = Env::new("colour") else {
        return;
    };
    builder::push_one(
        work.path(),
        &[encode(builder::tar(&[file("a", "a")]), Enc::Gzip)],
        &reg.addr,
        "colour/image",
    );
    let m = Mount::new(&format!("{}/colour/image:v1", reg.addr), &[], &[]);
    let log = m
        .ready
        .split("(log: ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("the ready line names the log")
        .to_string();
    let (ok, _, err) = ocifs(&["umount", m.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in {log}: {text:?}");
}

#[test]
fn convert_removes_its_scratch_files_and_says_what_it_needs() {
    let Some(Env { reg, work }) = Env::without_fuse("scratch") else {
        return;
    };
    let tar = builder::tar(&[file("a", "a\n"), file("big", noise(3 << 20, 9))]);
    builder::push_one(
        work.path(),
        &[encode(tar, Enc::Gzip)],
        &reg.addr,
        "scr/image",
    );
    let src = format!("{}/scr/image:v1", reg.addr);
    let cache = work.path().join("cache");
    let cd = cache.to_str().unwrap();
    let scratch = cache.join("convert");

    // Success.
    let dst = format!("oci:{}:v1", work.path().join("out").display());
    let (ok, _, err) = ocifs(
        &["convert", "--estargz", "--cache-dir", cd, &src, &dst],
        &[],
    );
    assert!(ok, "{err}");
    assert!(err.contains("scratch space"), "{err}");
    let progress = err.find("unpacked").expect("progress while unpacking");
    let done = err.find("-> sha256:").expect("the layer's line");
    assert!(progress < done, "progress during the layer: {err}");
    assert!(
        files_under(&scratch).is_empty(),
        "{:?}",
        files_under(&scratch)
    );

    // Failure after the layer was written: a destination registry that is not there.
    let dst = format!("127.0.0.1:{}/scr/out:v1", harness::free_port());
    let (ok, _, err) = ocifs(
        &["convert", "--estargz", "--cache-dir", cd, &src, &dst],
        &[],
    );
    assert!(!ok, "converted to nowhere");
    assert_eq!(
        err.lines().last().map(|l| l.starts_with("ocifs:")),
        Some(true)
    );
    assert!(
        files_under(&scratch).is_empty(),
        "{:?}",
        files_under(&scratch)
    );

    // Ctrl-C once scratch files exist (a slow link keeps the layer arriving).
    let proxy = Proxy::with_link(&reg.addr, None, Some((Duration::from_millis(5), 500_000)));
    let slow = format!("{}/scr/image:v1", proxy.addr);
    let dst = format!("oci:{}:v2", work.path().join("out").display());
    let child = Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args(["convert", "--estargz", "--cache-dir", cd, &slow, &dst])
        .env("HOME", std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || !files_under(
        &scratch
    )
    .is_empty()));
    // SAFETY: signalling the process group of our own child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        files_under(&scratch).is_empty(),
        "{:?}",
        files_under(&scratch)
    );
}

#[test]
fn index_works_on_a_fresh_cache_directory_when_the_index_is_published() {
    let Some(Env { reg, work }) = Env::without_fuse("fresh-idx") else {
        return;
    };
    let tar = builder::tar(&[file("a", "a\n"), file("big", noise(2 << 20, 4))]);
    builder::push_one(
        work.path(),
        &[encode(tar, Enc::Gzip)],
        &reg.addr,
        "fidx/image",
    );
    let r = format!("{}/fidx/image:v1", reg.addr);
    harness::push_index(&r, &["--span", "256KiB"]);
    let fresh = TempDir::new("fresh-idx-cache");
    let (ok, out, err) = ocifs(
        &["index", "--cache-dir", fresh.path().to_str().unwrap(), &r],
        &[],
    );
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("gzip: index"), "{out}");
}
