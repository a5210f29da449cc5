//! A mount survives its serving process (issue 17, "Survive a daemon restart"): as root,
//! `ocifs mount` is a supervisor holding the FUSE connection and a serving process it
//! restarts. Killing the serving process in the middle of a read loop of many threads must
//! cost a pause, never an error or a wrong byte; a crash loop must fail the readers and
//! unmount rather than hold them; and `ocifs umount` must clean up after a mount whose
//! supervisor was killed too.

use crate::builder::{self, Enc, Item, encode, file, noise};
use crate::harness::{Env, Mount, TempDir, ocifs};
use ocifs::stats::MountStats;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Reader threads (the issue asks for "many").
const THREADS: usize = 16;

/// Files of a few MB in all, of assorted sizes, random bytes (incompressible).
fn files() -> Vec<(String, Vec<u8>)> {
    (0..24u64)
        .map(|i| {
            let len = 40_000 + (i as usize * 17_389) % 360_000;
            (format!("data/f{i:02}.bin"), noise(len, 700 + i))
        })
        .collect()
}

/// Pushes one layer of [`files`] encoded as `enc`; returns its reference.
fn image(env: &Env, enc: Enc, repo: &str) -> String {
    let mut items = vec![Item::Dir("data", 0o755)];
    items.extend(files().into_iter().map(|(p, d)| file(&p, d)));
    let layers = vec![encode(builder::tar(&items), enc)];
    builder::push_one(env.work.path(), &layers, &env.reg.addr, repo);
    format!("{}/{repo}:v1", env.reg.addr)
}

/// `ocifs stats --json`, or `None` while no serving process answers (one is starting).
fn try_stats(mountpoint: &Path) -> Option<MountStats> {
    let (ok, out, _) = ocifs(&["stats", "--json", mountpoint.to_str().unwrap()], &[]);
    ok.then(|| serde_json::from_slice(&out).ok()).flatten()
}

/// Polls until `done` says so (up to 60 s: a restart fetches the manifest again).
fn wait_for<T>(what: &str, mut done: impl FnMut() -> Option<T>) -> T {
    for _ in 0..1200 {
        if let Some(v) = done() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("still waiting for {what} after 60 s");
}

/// The serving process's figures once a process other than `not` serves.
fn served_by_another(mountpoint: &Path, not: u32) -> MountStats {
    wait_for("a new serving process", || {
        try_stats(mountpoint).filter(|s| s.process.pid != not && s.process.pid != 0)
    })
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The `/proc/mounts` line of the mount at `dir`, if any.
fn mount_line(dir: &Path) -> Option<String> {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(dir))
        .map(str::to_string)
}

/// The daemon's log, named on the ready line.
fn log_of(m: &Mount) -> String {
    let path = m.ready.rsplit_once("(log: ").unwrap().1.trim_end();
    std::fs::read_to_string(path.trim_end_matches(')')).unwrap()
}

/// Threads reading every file of the mount over and over with `O_DIRECT` (so each read
/// reaches the serving process rather than the page cache), each byte checked.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Readers {
    fn start(mountpoint: &Path, files: Arc<Vec<(String, Vec<u8>)>>) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let threads = (0..THREADS)
            .map(|t| {
                let (stop, reads, files) = (stop.clone(), reads.clone(), files.clone());
                let dir = mountpoint.to_path_buf();
                std::thread::spawn(move || {
                    let mut done = 0u64;
                    for i in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let (path, want) = &files[(t * 5 + i * 7) % files.len()];
                        let got = read_direct(&dir.join(path)).map_err(|e| format!("{path}: {e}"))?;
                        if got != *want {
                            let at = got.iter().zip(want).position(|(a, b)| a != b);
                            return Err(format!(
                                "{path}: wrong bytes ({} read, {} expected, first difference at {at:?})",
                                got.len(),
                                want.len()
                            ));
                        }
                        done += 1;
                        reads.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(done)
                })
            })
            .collect();
        Readers {
            stop,
            reads,
            threads,
        }
    }

    fn count(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Waits until `more` further reads have completed.
    fn progress(&self, more: u64) {
        let target = self.count() + more;
        wait_for("reads to go on", || (self.count() >= target).then_some(()));
    }

    /// Waits until no read completes for a while: every thread waits on the server.
    fn stalled(&self) {
        let mut last = self.count();
        let mut still = 0;
        while still < 5 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.count();
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
    }

    /// Every thread's result once each has ended by itself (a read failed).
    fn until_error(self) -> Vec<Result<u64, String>> {
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }

    /// Stops the loop; every thread's result.
    fn finish(self) -> Vec<Result<u64, String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// Reads a whole file with `O_DIRECT`, 64 KiB at a time into an aligned buffer.
fn read_direct(path: &Path) -> std::io::Result<Vec<u8>> {
    const CHUNK: usize = 64 << 10;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut backing = vec![0u8; CHUNK + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + CHUNK];
    let mut out = Vec::new();
    loop {
        let n = f.read_at(buf, out.len() as u64)?;
        out.extend_from_slice(&buf[..n]);
        if n < CHUNK {
            return Ok(out);
        }
    }
}

/// Kills the serving process twice during the read loop — once while every reader waits on
/// it (stopped first, so its requests are certainly in flight), once while reads stream —
/// then stops the next one with SIGTERM (as an upgrade does), and requires every read to
/// finish with the right bytes, then a clean unmount.
fn reads_survive_killed_serving_processes(enc: Enc, tag: &str) {
    let Some(env) = Env::new(tag) else {
        return;
    };
    let reference = image(&env, enc, &format!("restart/{tag}"));
    let m = Mount::new(&reference, &[], &[]);
    let line = mount_line(m.path()).expect("mounted");
    assert!(line.contains(" fuse.ocifs "), "a supervised mount: {line}");
    let first = try_stats(m.path()).expect("stats");
    let supervisor = first.process.supervisor.expect("served under a supervisor");
    assert_eq!(first.process.restarts, 0);

    let readers = Readers::start(m.path(), Arc::new(files()));
    readers.progress(2 * THREADS as u64);

    // Every reader waits on a stopped server; then it dies.
    kill(first.process.pid, libc::SIGSTOP);
    readers.stalled();
    kill(first.process.pid, libc::SIGKILL);
    let second = served_by_another(m.path(), first.process.pid);
    assert_eq!(second.process.restarts, 1);
    assert_eq!(second.process.supervisor, Some(supervisor));
    readers.progress(2 * THREADS as u64);

    // Killed while reads stream.
    kill(second.process.pid, libc::SIGKILL);
    let third = served_by_another(m.path(), second.process.pid);
    assert_eq!(third.process.restarts, 2);
    readers.progress(2 * THREADS as u64);

    // Stopped as an upgrade stops it: it leaves the mount to a successor and must not fail
    // the reads it had under way.
    kill(third.process.pid, libc::SIGTERM);
    let fourth = served_by_another(m.path(), third.process.pid);
    assert_eq!(fourth.process.restarts, 3);
    readers.progress(2 * THREADS as u64);
    assert!(mount_line(m.path()).is_some(), "still mounted");

    let results = readers.finish();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "reads failed: {failures:?}");
    let total: u64 = results.iter().map(|r| *r.as_ref().unwrap()).sum();
    assert!(total >= 8 * THREADS as u64, "{total} reads");

    // The requests the stopped server held were sent to its successor.
    let log = log_of(&m);
    let replayed: u64 = log
        .lines()
        .find_map(|l| {
            let rest = l.split("took over (restart 1); ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no restart in the log:\n{log}"));
    assert!(replayed >= 1, "{log}");

    // `ocifs umount` stops both processes.
    let (ok, _, err) = ocifs(&["umount", m.path().to_str().unwrap()], &[]);
    assert!(ok, "umount: {err}");
    wait_for("the processes to exit", || {
        (!alive(supervisor) && !alive(fourth.process.pid)).then_some(())
    });
    assert!(mount_line(m.path()).is_none());
}

#[test]
fn estargz_reads_survive_killed_serving_processes() {
    reads_survive_killed_serving_processes(Enc::Estargz, "restart-estargz");
}

#[test]
fn gzip_reads_survive_killed_serving_processes() {
    reads_survive_killed_serving_processes(Enc::Gzip, "restart-gzip");
}

/// Past the restart bound, a waiting reader gets an error (not a hang) and the mount is
/// gone.
#[test]
fn a_crash_loop_fails_waiting_reads_and_unmounts() {
    let Some(env) = Env::new("restart-loop") else {
        return;
    };
    let reference = image(&env, Enc::Estargz, "restart/loop");
    let m = Mount::new(&reference, &["--verify", "off"], &[]);
    let first = try_stats(m.path()).expect("stats");
    let supervisor = first.process.supervisor.expect("served under a supervisor");
    let readers = Readers::start(m.path(), Arc::new(files()));
    readers.progress(THREADS as u64);
    // Kill each serving process as soon as it serves, until the supervisor gives up (the
    // default bound: five restarts a minute).
    let mut pid = first.process.pid;
    for _ in 0..5 {
        kill(pid, libc::SIGKILL);
        pid = served_by_another(m.path(), pid).process.pid;
    }
    kill(pid, libc::SIGKILL);
    wait_for("the supervisor to give up", || {
        (!alive(supervisor)).then_some(())
    });
    assert!(mount_line(m.path()).is_none(), "still mounted");
    // Not told to stop: each reader runs until a read fails, which must happen.
    for r in readers.until_error() {
        let e = r.expect_err("reads end in an error");
        assert!(!e.contains("wrong bytes"), "{e}");
    }
}

/// After `kill -9` of both the supervisor and the serving process, reads fail (the
/// connection is gone), `ocifs umount` removes the dead mount, and a new mount at the same
/// place serves again.
#[test]
fn umount_cleans_up_after_a_killed_supervisor() {
    let Some(env) = Env::new("restart-both") else {
        return;
    };
    let reference = image(&env, Enc::Estargz, "restart/both");
    let dir = TempDir::new("mnt-both");
    let cache = TempDir::new("cache-both");
    let mp = dir.path().to_str().unwrap();
    let args = [
        "mount",
        "--cache-dir",
        cache.path().to_str().unwrap(),
        &reference,
        mp,
    ];
    let (ok, _, err) = ocifs(&args, &[]);
    assert!(ok, "mount: {err}");
    let (name, want) = &files()[3];
    assert_eq!(&std::fs::read(dir.path().join(name)).unwrap(), want);
    let s = try_stats(dir.path()).expect("stats");
    kill(s.process.supervisor.expect("supervised"), libc::SIGKILL);
    kill(s.process.pid, libc::SIGKILL);
    wait_for("both processes to die", || {
        (!alive(s.process.pid) && !alive(s.process.supervisor.unwrap())).then_some(())
    });
    assert!(read_direct(&dir.path().join(name)).is_err());
    assert!(mount_line(dir.path()).is_some(), "the dead mount stays");
    let (ok, _, err) = ocifs(&args, &[]);
    assert!(
        !ok && err.contains("ocifs umount"),
        "a mount on it is refused: {err}"
    );

    let (ok, _, err) = ocifs(&["umount", mp], &[]);
    assert!(ok, "umount of a dead mount: {err}");
    assert!(mount_line(dir.path()).is_none());

    let (ok, _, err) = ocifs(&args, &[]);
    assert!(ok, "mount again: {err}");
    assert_eq!(&read_direct(&dir.path().join(name)).unwrap(), want);
    let (ok, _, err) = ocifs(&["umount", mp], &[]);
    assert!(ok, "umount: {err}");
}
