//! `ocifs run`: an image's own command, with its config's environment, working directory and
//! user, on a lazily mounted image under a writable layer, `/proc`, `/dev` and the host's
//! resolv.conf in place; stdin, stdout and the exit status pass through; one summary; no
//! mount left behind after a normal exit, a failing command or SIGINT.

use crate::builder::{self, Enc, Item, encode, file, noise, push};
use crate::harness::{Env, TempDir, ocifs, require};
use ocifs::run::RunSummary;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// What the image's own command prints (as user `app`, from `/work`).
const SCRIPT: &str = "echo hello $GREETING; pwd; id -u; id -g; echo $HOME; \
    test -d /proc/self && echo proc; test -c /dev/null && echo dev; \
    test -f /etc/resolv.conf && echo resolv; echo w > /scratch/x && cat /scratch/x";

/// Pushes an eStargz image whose config runs [`SCRIPT`] as `app` in `/work`; its reference.
fn push_runnable(env: &Env) -> String {
    let mut base = vec![
        Item::Dir("bb", 0o755),
        Item::File(
            "bb/busybox".into(),
            std::fs::read("/bin/busybox").unwrap(),
            0o755,
        ),
        Item::Dir("bin", 0o755),
        Item::Dir("data", 0o755),
        file("data/big.bin", noise(16 << 20, 77)),
    ];
    for applet in [
        "bin/sh",
        "bin/echo",
        "bin/cat",
        "bin/id",
        "bin/pwd",
        "bin/test",
        "bin/sleep",
    ] {
        base.push(Item::Symlink(applet, "/bb/busybox"));
    }
    let app = vec![
        Item::Dir("etc", 0o755),
        file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1234:5678::/home/app:/bin/sh\n",
        ),
        file("etc/group", "root:x:0:\napp:x:5678:\n"),
        Item::Dir("work", 0o755),
        Item::Dir("scratch", 0o1777),
    ];
    let layers: Vec<_> = [base, app]
        .iter()
        .map(|items| encode(builder::tar(items), Enc::Estargz))
        .collect();
    let config = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"], "Cmd": [SCRIPT],
        "Env": ["GREETING=world", "PATH=/bin"], "WorkingDir": "/work", "User": "app",
    });
    let dir = builder::layout_with_config(
        &env.work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
        config,
    );
    push(&dir, "v1", &env.reg.addr, "run/image", None);
    format!("{}/run/image:v1", env.reg.addr)
}

/// The summary `ocifs run --json` ended its stderr with.
fn summary(stderr: &str) -> RunSummary {
    let last = stderr.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no summary ({e}): {stderr}"))
}

/// Whether anything is still mounted under `dir`.
fn mounted_under(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_str().unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(d)))
}

fn run_args<'a>(cache: &'a TempDir, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--json",
        "--small-layers",
        "0",
        "--verify",
        "off",
        "--cache-dir",
    ];
    args.push(cache.path().to_str().unwrap());
    args.extend_from_slice(extra);
    args
}

#[test]
fn ocifs_run_runs_the_images_command_and_reports_its_figures() {
    if !require(&["busybox"], true) {
        return;
    }
    let Some(env) = Env::new("run") else {
        return;
    };
    let reference = push_runnable(&env);
    let cache = TempDir::new("run-cache");
    let profile = env.work.path().join("run.profile");
    let p = profile.to_str().unwrap();
    let mut args = run_args(&cache, &["--record", p]);
    args.push(&reference);
    let (ok, out, err) = ocifs(&args, &[]);
    assert!(ok, "ocifs run: {err}");
    let resolv = if Path::new("/etc/resolv.conf").exists() {
        "resolv\n"
    } else {
        ""
    };
    let want = format!("hello world\n/work\n1234\n5678\n/home/app\nproc\ndev\n{resolv}w\n");
    assert_eq!(String::from_utf8(out).unwrap(), want);
    let s = summary(&err);
    assert_eq!(s.exit_status, 0);
    assert!(s.files_touched > 0 && s.reads > 0, "{s:?}");
    assert!(
        s.fetched_bytes > 0 && s.fetched_bytes * 2 < s.image_bytes,
        "{s:?}"
    );
    assert!(s.first_exec_ms >= s.ready_ms, "{s:?}");
    assert!(
        std::fs::read_to_string(&profile)
            .unwrap()
            .contains("bb/busybox")
    );
    assert!(!mounted_under(cache.path()), "a mount was left behind");

    // stdin passes through; the command after `--` replaces Cmd (the Entrypoint stays).
    let mut args = run_args(&cache, &[]);
    args.extend([reference.as_str(), "--", "read l; echo got $l"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"got abc\n");

    // A failing command's status is ours, and nothing stays mounted.
    let mut args = run_args(&cache, &[]);
    args.extend([reference.as_str(), "--", "exit 7"]);
    let out = Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        summary(&String::from_utf8_lossy(&out.stderr)).exit_status,
        7
    );
    assert!(!mounted_under(cache.path()), "a mount was left behind");
}

#[test]
fn ocifs_run_passes_sigint_on_and_unmounts() {
    if !require(&["busybox"], true) {
        return;
    }
    let Some(env) = Env::new("run-int") else {
        return;
    };
    let reference = push_runnable(&env);
    let cache = TempDir::new("run-cache");
    let mut args = run_args(&cache, &[]);
    args.extend([reference.as_str(), "--", "echo started; exec sleep 60"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocifs"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGINT));
    let s = summary(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.exit_status, 128 + libc::SIGINT);
    assert!(!mounted_under(cache.path()), "a mount was left behind");
    assert!(std::fs::read_dir(cache.path().join("run")).is_ok_and(|mut d| d.next().is_none()));
}
