//! `ocifs run`: the image's own command (or one given after `--`) runs from a lazy mount with
//! its output and exit status passed through, one summary on stderr, and no mount left behind
//! after a normal exit, a failing command or Ctrl-C.

use crate::builder::{Enc, Item, encode, layout_with_command, push, tar};
use crate::harness::{Env, require};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// An image with a static busybox and the directories a runtime binds into.
fn busybox_image(env: &Env, command: &[&str]) -> String {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let items = vec![
        Item::Dir("bin", 0o755),
        Item::File("bin/busybox".into(), busybox, 0o755),
        Item::Dir("etc", 0o755),
        Item::File("etc/motd".into(), b"lazy hello\n".to_vec(), 0o644),
        Item::Dir("proc", 0o755),
        Item::Dir("dev", 0o755),
        Item::Dir("sys", 0o755),
    ];
    let layers = [encode(tar(&items), Enc::Gzip)];
    let dir = layout_with_command(
        &env.work.path().join("layout"),
        "v1",
        &[("linux", "amd64", None, &layers)],
        command,
    );
    push(&dir, "v1", &env.reg.addr, "run/busybox", None);
    format!("{}/run/busybox:v1", env.reg.addr)
}

/// Whether anything is mounted under `dir`.
fn mounted_under(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&*dir)))
}

/// `ocifs run` of `reference` with `args` (options, then `--` and a command line).
fn run(cache: &Path, reference: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocifs"));
    cmd.args(["run", "--platform", "linux/amd64", "--cache-dir"])
        .arg(cache)
        .args(args.iter().take_while(|a| **a != "--"))
        .arg(reference)
        .args(args.iter().skip_while(|a| **a != "--"))
        .env("HOME", std::env::temp_dir());
    cmd
}

#[test]
fn a_run_passes_output_and_status_through_and_leaves_no_mount() {
    if !require(&["busybox"], true) {
        return;
    }
    let Some(env) = Env::new("run") else {
        return;
    };
    let config_cmd = ["/bin/busybox", "sh", "-c", "cat /etc/motd; exit 0"];
    let reference = busybox_image(&env, &config_cmd);
    let cache = env.work.path().join("cache");

    // The image's own command.
    let out = run(&cache, &reference, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "lazy hello\n");
    assert!(err.contains("ocifs run: ready"), "one summary: {err}");
    assert!(err.contains("files touched"), "{err}");
    assert!(!mounted_under(&cache), "no mount after a normal exit");

    // A command given after `--`, with /proc bound in, its exit status passed through, and
    // the summary as JSON.
    let script = "test -e /proc/self/status && echo proc; pwd; exit 3";
    let args = ["--json", "--", "/bin/busybox", "sh", "-c", script];
    // A fresh cache directory: the first run's blocks would serve every byte.
    let cache = env.work.path().join("cache2");
    let out = run(&cache, &reference, &args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "proc\n/\n");
    let summary: serde_json::Value = serde_json::from_str(err.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("a JSON summary: {e}: {err}"));
    assert_eq!(summary["exitCode"], 3, "{summary}");
    assert!(summary["fetchedBytes"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["filesTouched"].as_u64().unwrap() >= 1, "{summary}");
    // What the command read, and how much of the fetched bytes it waited for.
    assert!(summary["readBytes"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        summary["waitedBytes"].as_u64().unwrap() <= summary["fetchedBytes"].as_u64().unwrap(),
        "{summary}"
    );
    assert!(!mounted_under(&cache), "no mount after a failing command");

    // A command that cannot start: a clear error, no mount.
    let out = run(&cache, &reference, &["--", "/nonexistent"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(!mounted_under(&cache), "no mount after a failed start");

    // Ctrl-C (SIGINT to the process group) ends the command, then the mount.
    let mut cmd = run(&cache, &reference, &["--", "/bin/busybox", "sleep", "60"]);
    // SAFETY: setpgid in the child before exec; a process group of its own to signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !mounted_under(&cache) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Give the command a moment to start under the mount, then interrupt the group.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill with a process group id this test created.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "killed by SIGINT: 128 + 2");
    assert!(!mounted_under(&cache), "no mount after Ctrl-C");
}
