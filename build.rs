//! Records the git commit the binary was built from (`MLBENCH_GIT_COMMIT`, empty outside a
//! checkout) for run manifests and cell keys: `<12 hex>`, or `<12 hex>-dirty-<8 hex>` when the
//! code (`src`, `Cargo.toml`, `Cargo.lock`, `build.rs`) differs from that commit, the suffix a
//! hash of the difference, so two different builds never claim one version.
//!
//! Reruns when HEAD moves (a commit, a checkout; also from a linked worktree, whose `.git` is a
//! file: the paths come from git itself) and when the code changes.

use std::process::Command;

/// Paths whose changes make the build differ from its commit.
const CODE: [&str; 4] = ["src", "Cargo.toml", "Cargo.lock", "build.rs"];

fn git(args: &[&str]) -> Option<Vec<u8>> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout)
}

fn git_str(args: &[&str]) -> Option<String> {
    git(args).map(|o| String::from_utf8_lossy(&o).trim().to_string())
}

/// FNV-1a 64-bit (the same hash as `util::fnv1a64`; a build script cannot use the crate).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn main() {
    let commit = git_str(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_default();
    let version = if commit.is_empty() {
        commit
    } else {
        let mut diff_args = vec!["diff", "HEAD", "--"];
        diff_args.extend(CODE);
        let mut untracked_args = vec!["ls-files", "--others", "--exclude-standard", "--"];
        untracked_args.extend(CODE);
        let diff = git(&diff_args).unwrap_or_default();
        let untracked = git(&untracked_args).unwrap_or_default();
        if diff.is_empty() && untracked.is_empty() {
            commit
        } else {
            let mut all = diff;
            all.extend(&untracked);
            format!("{commit}-dirty-{:08x}", fnv1a64(&all) as u32)
        }
    };
    println!("cargo:rustc-env=MLBENCH_GIT_COMMIT={version}");
    // What `mlbench --version` prints: the package version and the commit, so a pinned binary
    // can be checked against the commit it should carry (a target folder copied between
    // checkouts keeps its timestamps, and cargo may then skip this script: the binary would
    // claim the old commit).
    let pkg = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let line = if version.is_empty() {
        pkg
    } else {
        format!("{pkg} (git {version})")
    };
    println!("cargo:rustc-env=MLBENCH_VERSION_LINE={line}");
    // HEAD, the branch it names and packed refs, wherever this checkout keeps them (only
    // paths that exist: cargo reruns for a missing one every time).
    let mut refs = vec!["HEAD".to_string(), "packed-refs".to_string()];
    refs.extend(git_str(&["symbolic-ref", "-q", "HEAD"]));
    for r in refs {
        if let Some(p) = git_str(&["rev-parse", "--git-path", &r]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    for p in CODE {
        println!("cargo:rerun-if-changed={p}");
    }
}
