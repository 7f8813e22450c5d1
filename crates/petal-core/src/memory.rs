//! The memory an adapter will need, computed from its config and the model before anything is
//! allocated, and the limit it is held to: a config from an untrusted file (`"r": 1000000000`)
//! is refused with a one-line reason instead of growing until the host runs out.

use crate::config::{AdapterConfig, TokenIndices};
use crate::inject::{extent, targeted_linears, Adaptable};
use crate::methods::modules_to_save;
use crate::{adapter::ModuleDims, registry, Error, Result};

/// Bytes of one value: adapters train and keep f32.
const VALUE_BYTES: u64 = 4;

/// What an adapter will hold, counted before it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Values over every layer, shared tensor and input-side part (saturating).
    pub values: u64,
}

/// The most memory an adapter may take, and whether it is for training (parameters, their
/// gradients and AdamW's two moments: four values per parameter) or inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub training: bool,
    /// `bytes` is the default (half of the machine), not a value the user gave.
    pub default: bool,
}

impl Default for MemoryLimit {
    /// Half of this machine's memory (or of the container's limit, if lower), for inference.
    fn default() -> Self {
        MemoryLimit {
            bytes: physical_memory().map_or(u64::MAX, |m| m / 2),
            training: false,
            default: true,
        }
    }
}

impl MemoryLimit {
    /// A limit the user gave (`--max-memory`).
    pub fn bytes(bytes: u64) -> Self {
        MemoryLimit {
            bytes,
            training: false,
            default: false,
        }
    }

    /// The same limit, counting gradients and optimizer state too.
    pub fn for_training(self) -> Self {
        MemoryLimit {
            training: true,
            ..self
        }
    }

    /// Bytes the adapter of `estimate` will take under this limit's use.
    pub fn needed(&self, estimate: &Estimate) -> u64 {
        let per_value = if self.training { 4 } else { 1 } * VALUE_BYTES;
        estimate.values.saturating_mul(per_value)
    }

    /// An error naming the adapter, its size, the option that sets it and the limit, when the
    /// adapter would not fit.
    pub fn check(&self, name: &str, cfg: &AdapterConfig, estimate: &Estimate) -> Result<()> {
        let need = self.needed(estimate);
        if need <= self.bytes {
            return Ok(());
        }
        let why = match self.default {
            true => "half of this machine's memory; --max-memory to change it",
            false => "--max-memory",
        };
        let what = if self.training {
            " with its gradients and optimizer state"
        } else {
            ""
        };
        Err(Error::Msg(format!(
            "adapter `{name}` ({}{}) would need {}{what} for {} values, over the limit of {} \
             ({why})",
            cfg.peft_type,
            largest_size_option(cfg).map_or(String::new(), |(k, v)| format!(", {k} = {v}")),
            human_bytes(need),
            estimate.values,
            human_bytes(self.bytes),
        )))
    }
}

/// Counts what adapter `cfg` will hold on `model`: each targeted linear's layer (the method's
/// `layer_values`), its shared tensors, tuned norms and an input-side adapter.
pub fn estimate(model: &dyn Adaptable, cfg: &AdapterConfig) -> Result<Estimate> {
    let method = registry::method(&cfg.peft_type)
        .ok_or_else(|| Error::Unsupported(format!("unknown peft_type `{}`", cfg.peft_type)))?;
    let mut values: u64 = 0;
    if let Some(shape) = model.input_shape() {
        values = values.saturating_add(method.input_values(cfg, &shape)?);
    }
    if method.tunes_norms().is_some() {
        let norms: u64 = model
            .norms()
            .iter()
            .map(|n| n.base().elem_count() as u64)
            .sum();
        return Ok(Estimate {
            values: values.saturating_add(norms),
        });
    }
    let linears = targeted_linears(model, cfg);
    let (max_in, max_out) = extent(&linears);
    let dims = |out, inp| ModuleDims {
        out,
        inp,
        max_in,
        max_out,
    };
    if !linears.is_empty() {
        values = values.saturating_add(method.shared_values(cfg, &dims(max_out, max_in))?);
    }
    for l in &linears {
        let v = method.layer_values(cfg, l.path(), &dims(l.out_features(), l.in_features()))?;
        values = values.saturating_add(v);
    }
    // a scale and shift per norm that feeds linears (SSF with `norms`)
    for n in model.norms() {
        let dev = candle_core::Device::Cpu;
        if !model.norm_consumers(n.path()).is_empty()
            && method.norm_affine(cfg, 1, 0, &dev)?.is_some()
        {
            values = values.saturating_add(2 * n.base().elem_count() as u64);
        }
    }
    Ok(Estimate {
        values: values.saturating_add(beside(model, cfg)),
    })
}

/// What the shared fields add next to the method: full copies of `modules_to_save` and the
/// embedding rows of `trainable_token_indices`.
fn beside(model: &dyn Adaptable, cfg: &AdapterConfig) -> u64 {
    let copies: u64 = model
        .linears()
        .iter()
        .filter(|l| modules_to_save::is_listed(cfg, l.path()))
        .map(|l| (l.in_features() * l.out_features() + l.out_features()) as u64)
        .sum();
    let rows = match &cfg.trainable_token_indices {
        Some(TokenIndices::List(v)) => v.len(),
        Some(TokenIndices::PerModule(m)) => m.values().map(Vec::len).sum(),
        None => 0,
    };
    let width = model
        .linears()
        .iter()
        .find(|l| l.is_embedding())
        .map_or(0, |l| l.out_features());
    copies.saturating_add((rows * width) as u64)
}

/// The method option with the largest whole-number value (the one that makes an adapter big),
/// for the message.
fn largest_size_option(cfg: &AdapterConfig) -> Option<(String, u64)> {
    cfg.options
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .max_by_key(|(_, v)| *v)
}

/// This machine's memory in bytes, or its container's limit where lower (Linux: /proc/meminfo,
/// cgroup v2 `memory.max`); None where neither can be read.
pub fn physical_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// `bytes` as "512.0 MB", "4.2 GB", "4.6 TB".
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// A size as the command line gives it: bytes, or a number with K, M, G or T (powers of 1024,
/// an optional trailing B: "8G", "512MB", "1.5T").
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.strip_suffix('B').unwrap_or(&t);
    let (num, mul) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * (mul as f64) < u64::MAX as f64 => {
            Ok((v * mul as f64) as u64)
        }
        _ => Err(format!(
            "`{s}` is not a size: a positive number of bytes, or with K, M, G or T (e.g. 8G)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_binary_units_and_bad_ones_are_refused() {
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("512mb"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5T"), Ok(3 << 39));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        for bad in ["", "0", "-1G", "nanG", "lots", "1e30T"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(human_bytes(3 << 30), "3.0 GB");
    }

    #[test]
    fn training_counts_four_values_per_parameter() {
        let e = Estimate { values: 1000 };
        let l = MemoryLimit::bytes(10_000);
        assert_eq!(l.needed(&e), 4000);
        assert_eq!(l.for_training().needed(&e), 16_000);
        let cfg = AdapterConfig::new("LORA").unwrap();
        assert!(l.check("a", &cfg, &e).is_ok());
        let err = l
            .for_training()
            .check("a", &cfg, &e)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("over the limit of 9.8 KB (--max-memory)"),
            "{err}"
        );
    }
}
