//! `--config run.toml`: any training flag as a TOML key (same name, `-` or `_`); flags given on
//! the command line win. Unknown keys are refused with the nearest known one suggested.

use anyhow::{bail, Context, Result};
use std::path::Path;

pub use petal_core::config::nearest;

/// Parse `path` into a table with keys normalised to snake_case, checking them against `known`;
/// `tables` may appear as tables (a method's options, under its PEFT keys, kept as written).
pub fn read(path: &Path, known: &[&str], tables: &[String]) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        // toml's message draws the line with a caret over several lines: one line instead
        let at = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let why = e.message().replace('\n', "; ");
        match at {
            Some(line) => anyhow::anyhow!("{}:{line}: not valid TOML: {why}", path.display()),
            None => anyhow::anyhow!("{}: not valid TOML: {why}", path.display()),
        }
    })?;
    let mut out = toml::Table::new();
    for (k, v) in table {
        let key = k.replace('-', "_");
        if tables.contains(&key) && v.is_table() {
            out.insert(key, v);
            continue;
        }
        if !known.contains(&key.as_str()) {
            match nearest(&key, known) {
                Some(s) => bail!("{}: unknown key `{k}`; did you mean `{s}`?", path.display()),
                None => bail!(
                    "{}: unknown key `{k}` (known: {})",
                    path.display(),
                    known.join(", ")
                ),
            }
        }
        out.insert(key, v);
    }
    Ok(out)
}
