//! Starting an image's command in a mounted root, as a runtime would, for `ocifs run`: a
//! private mount namespace with `/proc`, `/dev`, `/sys` and `/etc/resolv.conf` of the host
//! bound in (where the image has them), the root changed to the mount, the working directory,
//! user and environment of the image config applied. Not a sandbox: the process shares the
//! host's other namespaces, as `chroot` would. Needs root.

use crate::error::{Error, Result};
use crate::image::runconfig::RunConfig;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Host paths bound into the root (directories recursively) when the image has them.
const BINDS: [&str; 4] = ["/proc", "/dev", "/sys", "/etc/resolv.conf"];

/// What to start: the image's command line (already chosen), where and as whom.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub uid: u32,
    pub gid: u32,
}

impl Launch {
    /// The launch `config` asks for in the image mounted at `root`, running `args` instead
    /// of `Cmd` when given. The user is looked up in the image's `/etc/passwd` and
    /// `/etc/group` when named; `HOME` comes from there when the config sets none.
    pub fn new(root: &Path, config: &RunConfig, args: &[String]) -> Result<Launch> {
        let argv = config.argv(args);
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(Error::format(
                "image config",
                "names no command (Entrypoint and Cmd are empty): give one after --",
            ));
        }
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
        let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
        let (uid, gid, home) = user(&config.user, &passwd, &group)?;
        let mut env: Vec<(String, String)> = config
            .env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in [("PATH", config.path().to_string()), ("HOME", home)] {
            if !env.iter().any(|(name, _)| name == k) {
                env.push((k.to_string(), v));
            }
        }
        Ok(Launch {
            argv,
            env,
            working_dir: config.working_dir.clone(),
            uid,
            gid,
        })
    }

    /// A command that runs this launch in the root at `root` (stdio inherited; the caller
    /// spawns it and waits). The program is looked up on the launch's `PATH` inside the root.
    pub fn command(&self, root: &Path) -> Result<std::process::Command> {
        let c = |s: &str| CString::new(s).map_err(|_| Error::format("run", "a NUL in a path"));
        let root_c = c(&root.to_string_lossy())?;
        let workdir = c(&self.working_dir)?;
        // Prepared here: the child may not allocate between fork and exec.
        let binds: Vec<(CString, CString)> = BINDS
            .iter()
            .filter(|host| Path::new(host).exists())
            .filter(|host| inside(root, host).exists())
            .map(|host| Ok((c(host)?, c(&inside(root, host).to_string_lossy())?)))
            .collect::<Result<_>>()?;
        let path = self
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let program = resolve(root, &self.argv[0], &path);
        let mut cmd = std::process::Command::new(program);
        cmd.args(&self.argv[1..]).env_clear().envs(self.env.clone());
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: between fork and exec the closure only makes system calls on memory
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || enter(&root_c, &binds, &workdir, uid, gid));
        }
        Ok(cmd)
    }
}

/// `host` (an absolute path) under `root`.
fn inside(root: &Path, host: &str) -> PathBuf {
    root.join(host.trim_start_matches('/'))
}

/// The program `name` as an absolute path inside the root: looked up on `path` there when it
/// has no `/` (the lookup happens before the root changes, through the mount).
fn resolve(root: &Path, name: &str, path: &str) -> String {
    if name.contains('/') {
        return name.to_string();
    }
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
        .find(|p| inside(root, p).is_file())
        .unwrap_or_else(|| name.to_string())
}

/// In the child: a private mount namespace, the binds, the new root, the working directory,
/// then the user. Only system calls.
fn enter(
    root: &CString,
    binds: &[(CString, CString)],
    workdir: &CString,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    let check = |rc: libc::c_int| match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted here propagates back to the host.
        check(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for (host, target) in binds {
            check(libc::mount(
                host.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
        }
        check(libc::chroot(root.as_ptr()))?;
        if libc::chdir(workdir.as_ptr()) != 0 {
            check(libc::chdir(c"/".as_ptr()))?;
        }
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    Ok(())
}

/// The uid, gid and home directory `spec` (`user`, `uid`, `user:group`, `uid:gid`, or empty
/// for root) names, looked up in the image's `passwd` and `group` files.
fn user(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32, String)> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let fields = |file: &str, name: &str| -> Option<Vec<String>> {
        file.lines()
            .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.len() >= 3 && (f[0] == name || f[2] == name))
    };
    let unknown = |what: &str, name: &str| {
        Error::format(
            "image config User",
            format!("{what} {name:?} is not in the image's /etc/{what}"),
        )
    };
    let (uid, mut gid, home) = match u {
        "" => (0, 0, "/root".to_string()),
        u => match fields(passwd, u) {
            Some(f) if f.len() >= 6 => (
                f[2].parse().map_err(|_| unknown("passwd", u))?,
                f[3].parse().map_err(|_| unknown("passwd", u))?,
                f[5].clone(),
            ),
            _ => match u.parse::<u32>() {
                Ok(uid) => (uid, uid, "/".to_string()),
                Err(_) => return Err(unknown("passwd", u)),
            },
        },
    };
    if let Some(g) = g {
        gid = match (g.parse::<u32>(), fields(group, g)) {
            (Ok(n), _) => n,
            (_, Some(f)) => f[2].parse().map_err(|_| unknown("group", g))?,
            _ => return Err(unknown("group", g)),
        };
    }
    Ok((uid, gid, home))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_in_the_image() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(user("", passwd, group).unwrap(), (0, 0, "/root".into()));
        assert_eq!(
            user("app", passwd, group).unwrap(),
            (1000, 1001, "/home/app".into())
        );
        assert_eq!(user("app:staff", passwd, group).unwrap().1, 50);
        assert_eq!(user("1000", passwd, group).unwrap().0, 1000);
        assert_eq!(user("42:7", passwd, group).unwrap(), (42, 7, "/".into()));
        let e = user("nobody", passwd, group).unwrap_err().to_string();
        assert!(e.contains("nobody"), "{e}");
        assert!(user("app:wheel", passwd, group).is_err());
    }
}
