//! Stamps the git commit into the binary (`TRIPLINE_GIT_COMMIT`), so
//! `tripline --version` and `tripline_build_info` say which source a running
//! binary came from: the version alone cannot tell two builds between
//! releases apart.
//!
//! Building must never fail here: a crates.io tarball, a copy without
//! `.git`, or a machine without `git` gets "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = if is_checkout(&dir) {
        watch_git_state(&dir);
        commit(&dir)
    } else {
        None
    };
    let commit = commit.unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRIPLINE_GIT_COMMIT={commit}");
}

/// `git` in `dir`, its trimmed stdout when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `dir` is the top of a git work tree: a copy of the crate inside
/// some other repository must not be stamped with that one's commit.
fn is_checkout(dir: &Path) -> bool {
    let Some(top) = git(dir, &["rev-parse", "--show-toplevel"]) else {
        return false;
    };
    let canonical = |p: &Path| p.canonicalize().ok();
    canonical(Path::new(&top)).is_some_and(|t| Some(t) == canonical(dir))
}

/// The short hash of HEAD, "-dirty" when tracked files differ from it.
fn commit(dir: &Path) -> Option<String> {
    let hash = git(dir, &["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(dir, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

/// Reruns this script when HEAD moves (checkout, commit: HEAD, the branch
/// it names, packed-refs), files are staged (the index) or the sources
/// change, and not otherwise. Paths come from `git rev-parse --git-path`,
/// which also finds them for a linked worktree. Only existing paths are
/// named: Cargo reruns a script every build for a missing one.
fn watch_git_state(dir: &Path) {
    let mut paths = vec!["HEAD".to_string(), "packed-refs".into(), "index".into()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        paths.push(branch);
    }
    for p in paths {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &p]) {
            let path = dir.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={p}");
    }
}
