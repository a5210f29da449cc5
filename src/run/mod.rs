//! `ocifs run`: the startup experiment in one command. [`RunSpec`] is the process an image's
//! config describes (`Entrypoint` + `Cmd`, `Env`, `WorkingDir`, `User` resolved in the
//! image's own `/etc/passwd` and `/etc/group`), read from the lazily opened image;
//! [`container`] starts it in a private mount namespace on the mounted image, as a runtime
//! would; [`RunSummary`] is the one line of figures the run ends with.

pub mod container;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::layer::Kind;
use serde_json::Value;

/// The search path when the config sets none (Docker's and containerd's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The most of `/etc/passwd` or `/etc/group` read to resolve a user (they are untrusted).
const MAX_ACCOUNTS_FILE: u64 = 4 << 20;

/// The process to start: what the image's config says, with the caller's command if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub argv: Vec<String>,
    /// `NAME=value`, in order.
    pub env: Vec<String>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
}

/// The image config's fields a run needs.
struct Config {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    workdir: String,
    user: String,
}

fn parse_config(config: &[u8]) -> Result<Config> {
    let v: Value =
        serde_json::from_slice(config).map_err(|e| Error::format("image config", e.to_string()))?;
    let c = &v["config"];
    let strings = |key: &str| -> Vec<String> {
        (c[key].as_array().into_iter().flatten())
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    Ok(Config {
        entrypoint: strings("Entrypoint"),
        cmd: strings("Cmd"),
        env: strings("Env"),
        workdir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
        user: c["User"].as_str().unwrap_or("").to_string(),
    })
}

impl RunSpec {
    /// The process `image`'s config describes; `command`, when not empty, replaces its `Cmd`
    /// (the `Entrypoint` stays, as with `docker run IMAGE ARGS`).
    pub async fn from_image(image: &Image, command: &[String]) -> Result<RunSpec> {
        let c = parse_config(&image.resolved.config)?;
        let mut argv = c.entrypoint.clone();
        argv.extend(if command.is_empty() {
            c.cmd.clone()
        } else {
            command.to_vec()
        });
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(Error::format(
                "image config",
                "it names no command (give one after --)",
            ));
        }
        let passwd = accounts(image, "etc/passwd").await?;
        let group = accounts(image, "etc/group").await?;
        let (uid, gid, groups, home) = resolve_user(&c.user, &passwd, &group)?;
        let mut env = c.env.clone();
        let has = |env: &[String], k: &str| env.iter().any(|e| e.starts_with(&format!("{k}=")));
        if !has(&env, "PATH") {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        if !has(&env, "HOME") {
            env.push(format!("HOME={home}"));
        }
        let workdir = match c.workdir.as_str() {
            "" => "/".to_string(),
            w => w.to_string(),
        };
        Ok(RunSpec {
            argv,
            env,
            workdir,
            uid,
            gid,
            groups,
        })
    }
}

/// The text of an accounts file of the image (`None` if it has none).
async fn accounts(image: &Image, path: &str) -> Result<Option<String>> {
    let Some(ino) = image.tree.resolve_links(path) else {
        return Ok(None);
    };
    let Some(node) = image.tree.get(ino).filter(|n| n.kind == Kind::File) else {
        return Ok(None);
    };
    if node.size > MAX_ACCOUNTS_FILE {
        return Err(Error::format(
            format!("/{path}"),
            format!("{} bytes is too large", node.size),
        ));
    }
    let bytes = image.read_file(ino, 0, node.size).await?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Resolves a config's `User` (`""`, `name`, `uid`, `name:group`, `uid:gid`) against the
/// image's `/etc/passwd` and `/etc/group`: uid, gid, supplementary groups, home directory.
pub fn resolve_user(
    user: &str,
    passwd: &Option<String>,
    group: &Option<String>,
) -> Result<(u32, u32, Vec<u32>, String)> {
    let (who, grp) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let who = if who.is_empty() { "0" } else { who };
    // name:x:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = (passwd.iter())
        .flat_map(|p| p.lines())
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let numeric = who.parse::<u32>().ok();
    let entry = entries.iter().find(|f| match numeric {
        Some(n) => f[2].parse() == Ok(n),
        None => f[0] == who,
    });
    let uid = match (numeric, entry) {
        (Some(n), _) => n,
        (None, Some(f)) => f[2]
            .parse()
            .map_err(|_| Error::format("/etc/passwd", format!("uid of {who:?}")))?,
        (None, None) => {
            return Err(Error::NotFound(format!(
                "user {who:?} in the image's /etc/passwd"
            )));
        }
    };
    // name:x:gid:member,member
    let groups_of: Vec<Vec<&str>> = (group.iter())
        .flat_map(|g| g.lines())
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let gid = match grp {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups_of
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| Error::NotFound(format!("group {g:?} in the image's /etc/group")))?,
        },
        None => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let mut groups = vec![gid];
    if let Some(name) = entry.map(|f| f[0]) {
        for f in &groups_of {
            if f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse()
                && !groups.contains(&g)
            {
                groups.push(g);
            }
        }
    }
    let home = entry
        .map(|f| f[5].to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok((uid, gid, groups, home))
}

/// The figures a run ends with (`ocifs run --json` prints them as JSON on stderr).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub reference: String,
    pub digest: String,
    /// From the start of `ocifs run` to the mounted image.
    pub ready_ms: u64,
    /// ... to the command's `exec`.
    pub first_exec_ms: u64,
    /// From the `exec` to the command's exit.
    pub run_ms: u64,
    /// The command's exit status (128 + the signal that ended it).
    pub exit_status: i32,
    /// Network bytes and requests of the image's layers, against their compressed size.
    pub fetched_bytes: u64,
    pub requests: u64,
    pub image_bytes: u64,
    /// Distinct files read, and reads served.
    pub files_touched: u64,
    pub reads: u64,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = (self.fetched_bytes as f64 * 100.0) / (self.image_bytes.max(1) as f64);
        write!(
            f,
            "ocifs run: {} exited {}; ready in {:.2} s, exec at {:.2} s, ran {:.2} s; fetched {} of {} bytes ({pct:.1}%) in {} requests; {} files touched, {} reads",
            self.reference,
            self.exit_status,
            self.ready_ms as f64 / 1000.0,
            self.first_exec_ms as f64 / 1000.0,
            self.run_ms as f64 / 1000.0,
            self.fetched_bytes,
            self.image_bytes,
            self.requests,
            self.files_touched,
            self.reads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nbad\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nweb:x:33:app,other\n";

    #[test]
    fn users_resolve_in_the_images_own_accounts() {
        let (p, g) = (Some(PASSWD.to_string()), Some(GROUP.to_string()));
        assert_eq!(
            resolve_user("", &p, &g).unwrap(),
            (0, 0, vec![0], "/root".into())
        );
        assert_eq!(
            resolve_user("app", &p, &g).unwrap(),
            (1000, 1001, vec![1001, 33], "/home/app".into())
        );
        assert_eq!(resolve_user("app:web", &p, &g).unwrap().1, 33);
        assert_eq!(resolve_user("1000:7", &p, &g).unwrap().0, 1000);
        assert_eq!(resolve_user("1000:7", &p, &g).unwrap().1, 7);
        // A numeric user the image does not list: gid 0, home /.
        assert_eq!(
            resolve_user("4242", &p, &g).unwrap(),
            (4242, 0, vec![0], "/".into())
        );
        assert_eq!(
            resolve_user("5:6", &None, &None).unwrap(),
            (5, 6, vec![6], "/".into())
        );
        assert!(resolve_user("nobody", &p, &g).is_err());
        assert!(resolve_user("app:nogroup", &p, &g).is_err());
    }

    #[test]
    fn config_fields() {
        let c = parse_config(
            br#"{"config":{"Entrypoint":["/e"],"Cmd":["a","b"],"Env":["A=1"],"WorkingDir":"/w","User":"u"}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.entrypoint, c.cmd, c.env),
            (
                vec!["/e".into()],
                vec!["a".into(), "b".into()],
                vec!["A=1".into()]
            )
        );
        assert_eq!((c.workdir.as_str(), c.user.as_str()), ("/w", "u"));
        let empty = parse_config(br#"{"config":{"Cmd":null}}"#).unwrap();
        assert!(empty.cmd.is_empty() && empty.entrypoint.is_empty());
        assert!(parse_config(b"not json").is_err());
    }
}
