//! Every file petal writes goes to a temp file in the same folder, then is renamed over the
//! target, so an interrupted run never leaves a half-written adapter or checkpoint.

use candle_core::Tensor;
use petal_core::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
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
