//! What the podman tests run: `ocifs store` at a directory of its own, and a private podman
//! (Debian's 4.3, with runc and conmon) whose storage.conf names that directory as an
//! additional layer store. Everything this machine needs to run containers (runc, cgroupfs,
//! explicit ulimits, no network) is in the test's own containers.conf, never in ocifs.

use crate::harness::{TempDir, ocifs, require};
use crate::stats::poll;
use ocifs::stats::StoreStats;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the podman tests need besides the common tools.
pub const PODMAN_TOOLS: &[&str] = &["podman", "runc", "conmon", "busybox", "timeout"];

/// Whether podman can run here (a panic under CI when it cannot).
pub fn podman_available() -> bool {
    require(PODMAN_TOOLS, true)
}

/// The longest one podman command may take before the test fails.
const PODMAN_LIMIT: &str = "180";

/// `ocifs store` (daemon mode) at a directory of its own, unmounted on drop.
pub struct LayerStore {
    pub dir: TempDir,
    _cache: TempDir,
}

impl LayerStore {
    /// Starts `ocifs store` with `flags` and the environment `env`.
    pub fn start(flags: &[&str], env: &[(&str, &str)]) -> LayerStore {
        let dir = TempDir::new("store");
        let cache = TempDir::new("store-cache");
        let mut args = vec!["store", "--cache-dir", cache.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        args.push(dir.path().to_str().unwrap());
        let (ok, out, err) = ocifs(&args, env);
        let out = String::from_utf8_lossy(&out);
        assert!(ok && out.contains("ready"), "ocifs store: {out} {err}");
        LayerStore { dir, _cache: cache }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `ocifs stats --json` of the store.
    pub fn stats(&self) -> StoreStats {
        let (ok, out, err) = ocifs(&["stats", "--json", self.path().to_str().unwrap()], &[]);
        assert!(ok, "stats: {err}");
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "not a store's stats ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }

    /// Polls the store's stats (up to 10 s) until `done` says so; returns the last answer.
    pub fn poll_stats(&self, done: impl Fn(&StoreStats) -> bool) -> StoreStats {
        poll(|| self.stats(), done)
    }
}

impl Drop for LayerStore {
    fn drop(&mut self) {
        let _ = ocifs(&["umount", self.path().to_str().unwrap()], &[]);
        for _ in 0..50 {
            if std::fs::read_dir(self.path()).is_ok_and(|mut d| d.next().is_none()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A podman of its own: storage (graphroot, runroot), containers.conf, registries.conf.
pub struct Podman {
    dir: TempDir,
    env: Vec<(String, String)>,
}

impl Podman {
    /// A podman using `store` as its additional layer store, trusting the plain-HTTP
    /// registries at `registries`, with `env` besides its configuration.
    pub fn new(store: &Path, registries: &[&str], env: &[(&str, &str)]) -> Podman {
        Podman::with_store(Some(store), registries, env)
    }

    /// [`Podman::new`], or with `None` an ordinary podman that pulls every layer itself.
    pub fn with_store(store: Option<&Path>, registries: &[&str], env: &[(&str, &str)]) -> Podman {
        let dir = TempDir::new("podman");
        let p = |name: &str| dir.path().join(name);
        for d in ["root", "run", "tmp"] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        let mut storage_conf = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            p("root").display(),
            p("run").display(),
        );
        if let Some(store) = store {
            storage_conf += &format!(
                "[storage.options]\nadditionallayerstores = [\"{}:ref\"]\n",
                store.display()
            );
        }
        std::fs::write(p("storage.conf"), storage_conf).unwrap();
        // This machine: crun and raising rlimits are refused, the cgroups are hybrid.
        std::fs::write(
            p("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
                 netns = \"none\"\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\nlock_type = \"file\"\ntmp_dir = \"{}\"\n",
                p("tmp").display()
            ),
        )
        .unwrap();
        let mut registries_conf = String::new();
        for r in registries {
            registries_conf += &format!("[[registry]]\nlocation = \"{r}\"\ninsecure = true\n");
        }
        std::fs::write(p("registries.conf"), registries_conf).unwrap();
        let mut all = vec![
            ("CONTAINERS_STORAGE_CONF".to_string(), p("storage.conf")),
            ("CONTAINERS_CONF".to_string(), p("containers.conf")),
            (
                "CONTAINERS_REGISTRIES_CONF".to_string(),
                p("registries.conf"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.display().to_string()))
        .collect::<Vec<_>>();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Podman { dir, env: all }
    }

    /// Runs `podman ARGS` (within a time limit): (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", PODMAN_LIMIT, "podman"]).args(args);
        cmd.env_remove("REGISTRY_AUTH_FILE");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("podman");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `podman ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "podman {args:?} failed:\n{out}\n{err}");
        out
    }

    /// How many of podman's layers are served from `store`: containers/storage makes an
    /// additional layer's `diff` a symlink into the store.
    pub fn layers_from(&self, store: &Path) -> usize {
        let Ok(dirs) = std::fs::read_dir(self.dir.path().join("root/overlay")) else {
            return 0;
        };
        dirs.flatten()
            .filter_map(|d| std::fs::read_link(d.path().join("diff")).ok())
            .filter(|target| target.starts_with(store))
            .count()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-a", "-f"]);
        let _ = self.run(&["image", "unmount", "-a", "-f"]);
        let _ = self.run(&["rmi", "-a", "-f"]);
        // The overlay driver bind-mounts its directory onto itself; anything left mounted
        // under ours goes, deepest first, before the directory is removed.
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The mount points at or below `dir`, in mount order.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}
