//! The commit a binary was built from, for `petal --version` (a run's results say which build
//! made them): `PETAL_BUILD` = the short hash, `-modified` where tracked files differ from it,
//! or `unknown` outside a git checkout.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Rebuild when `path` changes; a path that does not exist is left out (cargo would run this
/// script again on every build).
fn watch(path: Option<String>) {
    if let Some(p) = path.filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={p}");
    }
}

fn main() {
    let build = match git(&["rev-parse", "--short=9", "HEAD"]) {
        Some(hash) => {
            // the checkout's state: HEAD, the branch it names, the index, and the sources
            for p in ["HEAD", "index", "packed-refs"] {
                watch(git(&["rev-parse", "--git-path", p]));
            }
            watch(
                git(&["symbolic-ref", "-q", "HEAD"])
                    .and_then(|r| git(&["rev-parse", "--git-path", &r])),
            );
            println!("cargo:rerun-if-changed=..");
            for p in ["../../Cargo.toml", "../../Cargo.lock"] {
                watch(Some(p.to_string()));
            }
            // without optional locks: status would otherwise rewrite the watched index
            let clean = git(&[
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
            ])
            .is_some_and(|s| s.is_empty());
            if clean {
                hash
            } else {
                format!("{hash}-modified")
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=PETAL_BUILD={build}");
}
