//! What the image's configured command will read first.
//!
//! A runtime starting a container from a lazily mounted image runs the command its config
//! names (`Entrypoint` + `Cmd`, found on the config's `PATH`, relative to `WorkingDir`). Its
//! first reads are known before the process exists: the program, what the loader reads for
//! it (see `image::elf`) or a script's interpreter, and the files its arguments name (a
//! Python script, a configuration file). A mount queues them for the background fetcher as
//! soon as it is ready, so the first round trips of the start are already under way. Before
//! the command runs, the runtime itself reads the user and group databases of the root
//! ([`runtime_files`]): a mount fetches those as it starts too.

use crate::blob::Blob;
use crate::image::Image;
use crate::image::runconfig::{DEFAULT_PATH, RunConfig};
use crate::layer::Kind;
use crate::tree::Tree;

/// Files a container runtime reads from the root before it runs the command: the user and
/// group databases, to resolve the config's `User` and the process's groups (podman does for
/// every container, `User` set or not, between mounting the root and starting it).
pub const RUNTIME_FILES: [&str; 2] = ["etc/passwd", "etc/group"];

/// Larger files of the names speculation looks for at a start (the runtime's, the C
/// library's) are left to their reads.
pub(super) const START_FILE_MAX: u64 = 1 << 20;

/// The command an image config names: program, arguments, search path, working directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    pub argv: Vec<String>,
    pub path: String,
    pub workdir: String,
}

/// The command an image config names (see [`RunConfig`]); `None` when it names none.
pub fn from_config(config: &[u8]) -> Option<Command> {
    let run = RunConfig::parse(config);
    let argv = run.argv(&[]);
    if argv.first().is_none_or(|p| p.is_empty()) {
        return None;
    }
    Some(Command {
        argv,
        path: run.path().to_string(),
        workdir: run.working_dir.clone(),
    })
}

/// The regular file `name` names on `path` (the default search path when `None`).
pub fn find_on_path(tree: &Tree, name: &str, path: Option<&str>) -> Option<u64> {
    path.unwrap_or(DEFAULT_PATH)
        .split(':')
        .filter(|d| !d.is_empty())
        .find_map(|d| regular_file(tree, &format!("{d}/{name}")))
}

/// The regular file at image path `p`, links followed.
pub(super) fn regular_file(tree: &Tree, p: &str) -> Option<u64> {
    tree.resolve_links(p)
        .filter(|&ino| tree.get(ino).is_some_and(|n| n.kind == Kind::File))
}

/// The small regular files at image paths `paths` that `tree` has (links followed).
pub(super) fn start_files(tree: &Tree, paths: &[&str]) -> Vec<u64> {
    paths
        .iter()
        .filter_map(|p| regular_file(tree, p))
        .filter(|&i| tree.get(i).is_some_and(|n| n.size <= START_FILE_MAX))
        .collect()
}

/// The files a runtime reads before it starts a container from this root (see
/// [`RUNTIME_FILES`]), those `tree` has.
pub fn runtime_files(tree: &Tree) -> Vec<u64> {
    start_files(tree, &RUNTIME_FILES)
}

/// Where a runtime file's bytes are fetched from ahead of its read.
pub struct RuntimeRange {
    pub ino: u64,
    pub blob: Blob,
    pub start: u64,
    pub len: u64,
    /// The file's size (what speculation counts).
    pub size: u64,
}

/// The blob ranges of `image`'s [`runtime_files`], each only its own bytes (no guess past
/// them: one would compete with the program's fetch), and only those of at most `max`
/// bytes: in a gzip layer read through its index that is a file near its span's start
/// (from there to the mark past the file); one deeper in the span is left to its read,
/// which resumes at a mark (`checkpoint::blob::SKIP_MIN` draws the same line).
pub fn runtime_ranges(image: &Image, max: u64) -> Vec<RuntimeRange> {
    let range = |ino: u64| {
        let node = image.tree.get(ino)?;
        let (li, loc) = node.data.as_ref()?;
        let (blob, start, end) = image
            .layers
            .get(*li)?
            .layer
            .fetch_range(loc, 0, node.size)?;
        let len = end.checked_sub(start).filter(|&l| l <= max)?;
        Some(RuntimeRange {
            ino,
            blob,
            start,
            len,
            size: node.size,
        })
    };
    runtime_files(&image.tree)
        .into_iter()
        .filter_map(range)
        .collect()
}

impl Command {
    /// `p` as an image path: relative paths are taken from the working directory.
    fn absolute(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("{}/{p}", self.workdir.trim_end_matches('/'))
        }
    }
}

/// The configured command's program and the regular files its arguments name (at most
/// `max_args` arguments are looked at: a config is untrusted, and a long command line is not
/// worth more); `None` when the config names no command the image has.
pub fn predict(config: &[u8], tree: &Tree, max_args: usize) -> Option<(u64, Vec<u64>)> {
    let cmd = from_config(config)?;
    let file = |p: &str| regular_file(tree, p);
    let program = if cmd.argv[0].contains('/') {
        file(&cmd.absolute(&cmd.argv[0]))
    } else {
        find_on_path(tree, &cmd.argv[0], Some(&cmd.path))
    }?;
    // Arguments that are files of the image: a script, a configuration file.
    let files = cmd
        .argv
        .iter()
        .skip(1)
        .take(max_args)
        .filter(|a| !a.starts_with('-'))
        .filter_map(|a| file(&cmd.absolute(a)))
        .collect();
    tracing::debug!("command {:?}", cmd.argv);
    Some((program, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_command_from_a_config() {
        let c = from_config(
            br#"{"config":{"Entrypoint":["python3"],"Cmd":["/app/main.py","-v"],
                 "Env":["A=1","PATH=/opt/bin:/usr/bin"],"WorkingDir":"/srv"}}"#,
        )
        .unwrap();
        assert_eq!(c.argv, ["python3", "/app/main.py", "-v"]);
        assert_eq!(c.path, "/opt/bin:/usr/bin");
        assert_eq!(c.absolute("x.conf"), "/srv/x.conf");
        let d = from_config(br#"{"config":{"Cmd":["./run.sh"]}}"#).unwrap();
        assert_eq!(d.absolute(&d.argv[0]), "/./run.sh");
        assert_eq!(d.path, DEFAULT_PATH);
        assert!(from_config(br#"{"config":{}}"#).is_none());
        assert!(from_config(br#"{"config":{"Cmd":[""]}}"#).is_none());
        assert!(from_config(b"not json").is_none());
    }

    #[test]
    fn the_runtime_files_are_small_regular_files_links_followed() {
        use crate::layer::{Entry, Kind};
        let mut passwd = Entry::new("etc/passwd".to_string(), Kind::Symlink);
        passwd.link = Some("../usr/share/passwd".into());
        let mut shared = Entry::new("usr/share/passwd".to_string(), Kind::File);
        shared.size = 839;
        let tree = Tree::build(&[vec![
            passwd,
            shared,
            Entry::new("etc/group".into(), Kind::Dir),
        ]]);
        let found = runtime_files(&tree);
        assert_eq!(found, vec![tree.resolve("usr/share/passwd").unwrap()]);
        let mut big = Entry::new("etc/passwd".to_string(), Kind::File);
        big.size = START_FILE_MAX + 1;
        assert!(runtime_files(&Tree::build(&[vec![big]])).is_empty());
    }

    #[test]
    fn the_command_and_the_files_its_arguments_name_are_predicted() {
        use crate::layer::{Entry, Kind};
        let e = |p: &str, k| Entry::new(p.to_string(), k);
        let mut link = e("usr/bin/python3", Kind::Symlink);
        link.link = Some("python3.11".into());
        let tree = Tree::build(&[vec![
            e("usr/bin/python3.11", Kind::File),
            link,
            e("srv/app.py", Kind::File),
            e("srv/conf", Kind::Dir),
        ]]);
        let config = br#"{"config":{"Entrypoint":["python3"],
            "Cmd":["app.py","-v","conf","missing.txt","/srv/app.py"],"WorkingDir":"/srv"}}"#;
        let (program, files) = predict(config, &tree, 32).unwrap();
        assert_eq!(program, tree.resolve("usr/bin/python3.11").unwrap());
        let app = tree.resolve("srv/app.py").unwrap();
        // Flags, directories and names the image lacks are not files to fetch.
        assert_eq!(files, vec![app, app]);
        assert_eq!(
            predict(config, &tree, 1).unwrap().1,
            vec![app],
            "arguments are bounded"
        );
        let absent = br#"{"config":{"Cmd":["nosuch"]}}"#;
        assert!(predict(absent, &tree, 32).is_none());
    }
}
