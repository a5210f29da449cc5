//! Where a repository is pulled from, in order: [`MirrorConfig::routes`] asks the containerd
//! hosts directory for a directory of the registry's own, then `registries.conf`, then the
//! hosts directory's `_default`, and without any of them reaches the registry as its name
//! says (Docker Hub's names at `registry-1.docker.io`).

use super::endpoint::Route;
use super::hosts::{self, HostsDir};
use super::registries_conf::RegistriesConf;
use crate::error::Result;
use crate::reference::Reference;

/// The mirror configuration of this machine (or a test's): both formats, read once; a
/// registry's `hosts.toml` is read when the registry is first asked for.
#[derive(Debug, Clone, Default)]
pub struct MirrorConfig {
    pub hosts_dir: Option<HostsDir>,
    pub registries: RegistriesConf,
}

impl MirrorConfig {
    /// The hosts to pull `r` from, mirrors first, the registry last. `insecure`: reach the
    /// registry over plain HTTP unless configured otherwise.
    pub fn routes(&self, r: &Reference, insecure: bool) -> Result<Vec<Route>> {
        let dir = self.hosts_dir.as_ref();
        if let Some(d) = dir
            && let Some(hosts) = d.hosts(&r.registry, false, insecure)?
        {
            return hosts::routes(&hosts, &r.registry, &r.repository);
        }
        if let Some(routes) = self.registries.routes(r)? {
            return Ok(routes);
        }
        if let Some(d) = dir
            && let Some(hosts) = d.hosts(&r.registry, true, insecure)?
        {
            return hosts::routes(&hosts, &r.registry, &r.repository);
        }
        Ok(vec![Route::direct(&r.registry, &r.repository, insecure)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ocifs-routes-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_registrys_own_directory_beats_registries_conf_which_beats_default() {
        let root = tmp("order");
        let write = |dir: &str, mirror: &str| {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            let text = format!("[host.\"https://{mirror}\"]\ncapabilities = [\"pull\"]\n");
            std::fs::write(root.join(dir).join("hosts.toml"), text).unwrap();
        };
        write("_default", "default.example");
        write("own.example_5000_", "own-mirror.example");
        let conf = root.join("registries.conf");
        std::fs::write(
            &conf,
            "[[registry]]\nlocation = \"conf.example\"\n[[registry.mirror]]\nlocation = \"conf-mirror.example\"\n",
        )
        .unwrap();
        let cfg = MirrorConfig {
            hosts_dir: Some(HostsDir(root.clone())),
            registries: RegistriesConf::load(&[conf]).unwrap(),
        };
        let hosts = |name: &str| -> Vec<String> {
            let r = Reference::parse(name).unwrap();
            let routes = cfg.routes(&r, false).unwrap();
            routes.iter().map(|r| r.endpoint.host.clone()).collect()
        };
        assert_eq!(
            hosts("own.example:5000/a"),
            ["own-mirror.example", "own.example:5000"]
        );
        assert_eq!(
            hosts("conf.example/a"),
            ["conf-mirror.example", "conf.example"]
        );
        assert_eq!(
            hosts("other.example/a"),
            ["default.example", "other.example"]
        );
        assert_eq!(hosts("alpine"), ["default.example", "registry-1.docker.io"]);
        let none = MirrorConfig::default();
        let r = Reference::parse("alpine").unwrap();
        let routes = none.routes(&r, false).unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].endpoint.api(), "https://registry-1.docker.io/v2");
        assert_eq!(routes[0].repo, "library/alpine");
        let _ = std::fs::remove_dir_all(root);
    }
}
