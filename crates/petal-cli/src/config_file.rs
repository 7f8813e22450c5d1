//! `--config run.toml`: any training flag as a TOML key (same name, `-` or `_`); flags given on
//! the command line win. Unknown keys are refused with the nearest known one suggested.

use anyhow::{bail, Context, Result};
use std::path::Path;

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

pub fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (distance(key, k), *k))
        .filter(|(d, _)| *d <= 3.max(key.len() / 3))
        .min()
        .map(|(_, k)| k)
}

/// Parse `path` into a table with keys normalised to snake_case, checking them against `known`.
pub fn read(path: &Path, known: &[&str]) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut out = toml::Table::new();
    for (k, v) in table {
        let key = k.replace('-', "_");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_suggests_the_nearest_known_one() {
        assert_eq!(
            nearest("learning_rat", &["lr", "learning_rate", "seed"]),
            Some("learning_rate")
        );
        assert_eq!(
            nearest("max_step", &["max_steps", "batch_size"]),
            Some("max_steps")
        );
        assert_eq!(nearest("zzzzzzzz", &["lr", "seed"]), None);
    }
}
