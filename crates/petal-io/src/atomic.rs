//! Every file petal writes goes to a temp file in the same folder, then is renamed over the
//! target, so an interrupted run never leaves a half-written adapter or checkpoint.

use candle_core::Tensor;
use petal_core::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Write `path` by `fill` into a temp file in its folder (buffered, seekable), then rename it
/// over `path`: whole or not at all.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        fill(&mut w)?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt; // temp files are 0600; outputs are ordinary files
        let perms = std::fs::Permissions::from_mode(0o644);
        tmp.as_file()
            .set_permissions(perms)
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Serialize tensors (contiguous, any dtype) with `{"format": "pt"}` metadata, atomically.
pub fn write_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut items: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        items.push((k, t.contiguous()?));
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(items.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| Error::msg(format!("{}: cannot serialize: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// The file petal leaves in a model folder it writes (`merge`, `quantize`), so that writing
/// there again knows the folder is its own output and may be replaced, while another model
/// folder (a download, say) is not.
pub const OUTPUT_MARKER: &str = ".petal-output";

/// Write [`OUTPUT_MARKER`] into `dir` (the command that wrote the folder).
pub fn mark_output(dir: &Path, command: &str) -> Result<()> {
    let text = format!("{{\"written_by\": \"petal {command}\"}}\n");
    write_atomic(&dir.join(OUTPUT_MARKER), text.as_bytes())
}

/// Build folder `dir` whole: `fill` writes into a temp folder beside it (`.NAME.tmp-PID`), which
/// then takes `dir`'s place (an old `dir` is moved aside to `.NAME.old-PID` first and deleted
/// after), so `dir` is never seen half-written and a failed `fill` leaves the old one as it
/// was; a file at `dir` is refused. Temp folders that runs which have ended left beside it
/// are removed first (a line on stderr says so; an old folder whose replacement never arrived
/// is put back instead).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .ok_or_else(|| Error::msg(format!("{}: not a folder name", dir.display())))?
        .to_string_lossy()
        .to_string();
    if dir.exists() && !dir.is_dir() {
        return Err(Error::msg(format!(
            "{}: a file is there, not a folder: it is not replaced by one",
            dir.display()
        )));
    }
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    remove_stale(parent);
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{pid}"));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if old.exists() {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(dir, e));
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Whether process `pid` still runs (on Linux; elsewhere assumed to, so nothing is removed).
fn alive(pid: u32) -> bool {
    !cfg!(target_os = "linux") || Path::new(&format!("/proc/{pid}")).exists()
}

/// Temp folders beside the outputs of `parent` left by runs that have ended: `.NAME.tmp-PID`
/// (removed), `.NAME.old-PID` (put back as NAME when NAME is missing, else removed), and the
/// checkpoints' former `.tmp-step-N-PID` (removed).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix('.') else {
            continue;
        };
        let (target, kind, pid) = if let Some(step) = rest.strip_prefix("tmp-step-") {
            match step.rsplit_once('-') {
                Some((_, pid)) => (None, "tmp", pid),
                None => continue,
            }
        } else {
            match rest.rsplit_once('.') {
                Some((target, tail)) => match tail.split_once('-') {
                    Some((kind @ ("tmp" | "old"), pid)) => (Some(target), kind, pid),
                    _ => continue,
                },
                None => continue,
            }
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let path = e.path();
        match (kind, target) {
            ("old", Some(t)) if !parent.join(t).exists() => {
                if std::fs::rename(&path, parent.join(t)).is_ok() {
                    eprintln!(
                        "petal: put back {} as {t} (a run that ended, pid {pid}, had moved it aside)",
                        path.display()
                    );
                }
            }
            _ => {
                if std::fs::remove_dir_all(&path).is_ok() {
                    eprintln!(
                        "petal: removed {}, left by a run that ended (pid {pid})",
                        path.display()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_folder_is_replaced_whole_and_a_failed_fill_leaves_the_old_one_and_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("adapter");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("stale.bin"), b"old").unwrap();
        let failed = write_dir_atomic(&out, |tmp| {
            std::fs::write(tmp.join("half.bin"), b"x").unwrap();
            Err(Error::msg("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(files(&out), vec!["stale.bin"], "the old folder as it was");
        assert_eq!(files(d.path()), vec!["adapter"], "no temp folder left");
        write_dir_atomic(&out, |tmp| write_atomic(&tmp.join("new.bin"), b"new")).unwrap();
        assert_eq!(files(&out), vec!["new.bin"], "replaced whole");
        assert_eq!(files(d.path()), vec!["adapter"]);
    }

    #[test]
    fn temp_folders_of_ended_runs_are_removed_and_those_of_running_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dead = 4_000_000_000u32; // above any pid Linux hands out
        for f in [
            format!(".adapter.tmp-{dead}"),
            format!(".tmp-step-000010-{dead}"),
            ".adapter.tmp-1".to_string(),  // pid 1 runs
            format!(".merged.old-{dead}"), // its replacement never arrived: put back
        ] {
            std::fs::create_dir(d.path().join(f)).unwrap();
        }
        write_dir_atomic(&d.path().join("adapter"), |_| Ok(())).unwrap();
        assert_eq!(files(d.path()), vec![".adapter.tmp-1", "adapter", "merged"]);
    }
}
