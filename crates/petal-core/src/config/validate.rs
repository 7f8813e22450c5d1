//! What petal refuses in an adapter config, naming the field: the shared part here, each
//! method's own options in its file (`AdapterMethod::validate`).

use super::{unknown_method, AdapterConfig};
use crate::{Error, Result};

impl AdapterConfig {
    /// Refuse settings petal cannot honour, naming the field.
    pub fn validate(&self, file: &str) -> Result<()> {
        let m = self
            .method()
            .ok_or_else(|| unknown_method(&self.peft_type, file))?;
        let spec = m.options();
        for k in self.options.keys() {
            if !spec.has(k) {
                let what = format!("option of {}", m.peft_type());
                return Err(Error::config(
                    file,
                    k,
                    super::unknown(&what, k, &spec.names()),
                ));
            }
        }
        (spec.check)(&self.options)
            .map_err(|(key, e)| Error::config(file, key.as_deref().unwrap_or(m.peft_type()), e))?;
        m.validate(self).map_err(|e| match e {
            Error::Config { field, msg, .. } => Error::config(file, field, msg),
            e => e,
        })
    }
}

/// `field` must lie in `[0, 1)`.
pub fn probability(field: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::config(
            "adapter config",
            field,
            format!("{p} is out of range: must be in [0, 1)"),
        ));
    }
    Ok(())
}

/// `field` must be finite, and at least `min` when given.
pub fn finite(field: &str, v: f64, min: Option<f64>) -> Result<()> {
    if v.is_finite() && min.is_none_or(|m| v >= m) {
        return Ok(());
    }
    let range = match min {
        Some(m) => format!("finite and >= {m}"),
        None => "finite".to_string(),
    };
    Err(Error::config(
        "adapter config",
        field,
        format!("{v} is out of range: must be {range}"),
    ))
}

/// A setting petal cannot honour yet.
pub fn unsupported(field: &str, v: impl std::fmt::Display) -> Error {
    Error::config(
        "adapter config",
        field,
        format!("{field} = {v} is not supported by petal yet"),
    )
}
