//! How an image says it is to be run: `Entrypoint`, `Cmd`, `Env`, `WorkingDir` and `User` from
//! its config (the OCI image spec's `config` object). Read by `ocifs run` to start the
//! image's command, and by speculation to predict its first reads.

use serde_json::Value;

/// The search path when the config sets none (what Docker and containerd use).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Strings read from one list of a config (a config is untrusted: a longer list is cut).
const MAX_ITEMS: usize = 4096;

/// The run settings of an image config; empty where the config says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` strings.
    pub env: Vec<String>,
    /// An absolute path; `/` when unset.
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
}

impl RunConfig {
    /// Reads the run settings from an image config's JSON (defaults when it is not JSON).
    pub fn parse(config: &[u8]) -> RunConfig {
        let v: Value = serde_json::from_slice(config).unwrap_or(Value::Null);
        let c = &v["config"];
        let strings = |key: &str| -> Vec<String> {
            c[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .take(MAX_ITEMS)
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let working_dir = match c["WorkingDir"].as_str() {
            Some(d) if d.starts_with('/') => d.to_string(),
            Some(d) if !d.is_empty() => format!("/{d}"),
            _ => "/".to_string(),
        };
        RunConfig {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            working_dir,
            user: c["User"].as_str().unwrap_or_default().to_string(),
        }
    }

    /// The command line to run: `Entrypoint` followed by `args` when given (they replace
    /// `Cmd`, as `docker run IMAGE ARGS` does), else by `Cmd`.
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone();
        match args.is_empty() {
            true => argv.extend(self.cmd.iter().cloned()),
            false => argv.extend(args.iter().cloned()),
        }
        argv
    }

    /// The `PATH` the config sets, or the default one.
    pub fn path(&self) -> &str {
        self.env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_run_settings_and_builds_the_command_line() {
        let c = RunConfig::parse(
            br#"{"config":{"Entrypoint":["python3"],"Cmd":["/app/main.py","-v"],
                 "Env":["A=1","PATH=/opt/bin:/usr/bin"],"WorkingDir":"srv","User":"app:app"}}"#,
        );
        assert_eq!(c.argv(&[]), ["python3", "/app/main.py", "-v"]);
        assert_eq!(c.argv(&["-c".into(), "1".into()]), ["python3", "-c", "1"]);
        assert_eq!(c.path(), "/opt/bin:/usr/bin");
        assert_eq!(
            (c.working_dir.as_str(), c.user.as_str()),
            ("/srv", "app:app")
        );
        let empty = RunConfig::parse(b"not json");
        assert_eq!(empty.path(), DEFAULT_PATH);
        assert_eq!(empty.working_dir, "/");
        assert!(empty.argv(&[]).is_empty());
    }
}
