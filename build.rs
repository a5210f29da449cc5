//! Records the commit ocifs is built from, for `ocifs --version` ("unknown" outside a git
//! checkout).

use std::path::Path;

/// `git ARGS`' output, trimmed, when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=OCIFS_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    // Run again when HEAD moves: HEAD itself, and the branch it names (a loose ref, or
    // packed-refs). Asked of git, since in a worktree `.git` is a file and these live in the
    // main repository; a watched path that does not exist makes cargo run this script, and
    // rebuild ocifs, on every build.
    let mut watched = Vec::new();
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        watched.push(head);
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(&["rev-parse", "--git-path", &branch]));
        watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    watched.retain(|p| Path::new(p).exists());
    for p in &watched {
        println!("cargo:rerun-if-changed={p}");
    }
    // For the test that every watched path exists.
    println!("cargo:rustc-env=OCIFS_BUILD_WATCHED={}", watched.join("\n"));
}
