//! RoPE: the inverse frequencies of a Llama-family config, and its scaling types (`llama3`,
//! `linear`, `dynamic`, `yarn`, `longrope`) as transformers reads them from config.json and
//! llama.cpp stores them in GGUF (llama3 as per-frequency factors, `rope_freqs.weight`).

use crate::config::{num, LlamaConfig};
use petal_core::{Error, Result};
use serde_json::Value;

/// RoPE scaling as transformers' `rope_scaling` / `rope_parameters` gives it: `llama3`
/// (low/high frequency factors), `linear` (every frequency divided by `factor`) or `yarn`
/// (frequencies ramped between interpolation and extrapolation by `beta_fast`/`beta_slow`,
/// cos and sin scaled by `attention_factor`) or `longrope` (Phi-3's: one factor per frequency,
/// `short_factor` up to `original_max_position_embeddings` and `long_factor` past it, cos and
/// sin scaled by `attention_factor`). The fields another type does not use hold its neutral
/// value and are not written.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub rope_type: String, // "llama3" | "linear" | "dynamic" | "yarn" | "longrope"
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
    /// yarn: the ramp's bounds in rotations (transformers' defaults 32 and 1)
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// yarn: the factor on cos and sin (resolved: `0.1 ln(factor) + 1` unless given, or
    /// DeepSeek's `mscale` / `mscale_all_dim` ratio); 1 for the other types
    pub attention_factor: f64,
    /// yarn: the ramp's bounds rounded outwards to whole dimensions (transformers' default)
    pub truncate: bool,
    /// longrope: each frequency divided by its factor, for a forward whose positions stay
    /// within `original_max_position_embeddings` (short) or go past it (long); empty otherwise
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
}

/// YaRN's attention temperature `0.1 m ln(s) + 1` (1 for s <= 1).
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Llama 3's scaling.
    pub fn llama3(factor: f64, low: f64, high: f64, original: usize) -> Self {
        RopeScaling {
            rope_type: "llama3".into(),
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
            truncate: true,
            short_factor: Vec::new(),
            long_factor: Vec::new(),
        }
    }

    /// Linear scaling (position interpolation): every frequency divided by `factor`.
    pub fn linear(factor: f64) -> Self {
        RopeScaling {
            rope_type: "linear".into(),
            original_max_position_embeddings: 0,
            ..RopeScaling::llama3(factor, 1.0, 1.0, 0)
        }
    }

    /// YaRN, with transformers' default attention factor `0.1 ln(factor) + 1` when `None`.
    pub fn yarn(
        factor: f64,
        original: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention: Option<f64>,
    ) -> Self {
        RopeScaling {
            rope_type: "yarn".into(),
            beta_fast,
            beta_slow,
            attention_factor: attention.unwrap_or_else(|| yarn_mscale(factor, 1.0)),
            ..RopeScaling::llama3(factor, 1.0, 1.0, original)
        }
    }

    /// LongRoPE with transformers' default attention factor `sqrt(1 + ln(factor) / ln(original))`
    /// (1 for factor <= 1) when `None`.
    pub fn longrope(
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        factor: f64,
        original: usize,
        attention: Option<f64>,
    ) -> Self {
        let default = if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        };
        RopeScaling {
            rope_type: "longrope".into(),
            attention_factor: attention.unwrap_or(default),
            short_factor,
            long_factor,
            ..RopeScaling::llama3(factor, 1.0, 1.0, original)
        }
    }

    /// Whether YaRN's attention factor is the one its `factor` implies (`0.1 ln(factor) + 1`,
    /// what llama.cpp computes itself) and its ramp is truncated: what GGUF can hold.
    pub fn yarn_defaults(&self) -> bool {
        (self.attention_factor - yarn_mscale(self.factor, 1.0)).abs() <= 1e-6 && self.truncate
    }

    /// The keys transformers reads for this type (`rope_scaling` of config.json).
    pub fn to_hf_json(&self) -> Value {
        match self.rope_type.as_str() {
            "linear" | "dynamic" => {
                serde_json::json!({"rope_type": self.rope_type, "factor": self.factor})
            }
            "yarn" => serde_json::json!({"rope_type": "yarn", "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "attention_factor": self.attention_factor, "truncate": self.truncate}),
            "longrope" => serde_json::json!({"rope_type": "longrope", "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "attention_factor": self.attention_factor,
                "short_factor": self.short_factor, "long_factor": self.long_factor}),
            _ => serde_json::json!({"rope_type": "llama3", "factor": self.factor,
                "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings}),
        }
    }

    /// The scaling of a `rope_scaling` / `rope_parameters` object `s` of config.json `v`
    /// (`None` for `default`); an unknown type or a missing or non-positive key is an error
    /// naming it.
    pub(crate) fn from_hf(s: &Value, v: &Value, file: &str) -> Result<Option<RopeScaling>> {
        let ty = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let positive = |key: &str| -> Result<f64> {
            match num(s, key, file)? {
                x if x > 0.0 && x.is_finite() => Ok(x),
                x => Err(Error::config(
                    file,
                    &format!("rope_scaling.{key}"),
                    format!("{x} is not a positive number"),
                )),
            }
        };
        let opt = |key: &str| s.get(key).and_then(Value::as_f64);
        Ok(match ty {
            "default" => None,
            "llama3" => Some(RopeScaling::llama3(
                num(s, "factor", file)?,
                num(s, "low_freq_factor", file)?,
                num(s, "high_freq_factor", file)?,
                num(s, "original_max_position_embeddings", file)? as usize,
            )),
            "linear" => Some(RopeScaling::linear(positive("factor")?)),
            // dynamic NTK changes the frequencies only for positions past
            // max_position_embeddings, which petal's RoPE tables never reach (a longer sequence
            // is refused): within them it is the default, as in transformers
            "dynamic" => Some(RopeScaling {
                rope_type: "dynamic".into(),
                ..RopeScaling::linear(positive("factor")?)
            }),
            "yarn" => {
                let max_pos = v.get("max_position_embeddings").and_then(Value::as_f64);
                let original = opt("original_max_position_embeddings").or(max_pos);
                let Some(original) = original.filter(|o| *o >= 1.0) else {
                    return Err(Error::config(
                        file,
                        "rope_scaling.original_max_position_embeddings",
                        "missing or below 1 (yarn needs the pretraining context)",
                    ));
                };
                // DeepSeek-V3's configs give the ratio of the two lengths, not `factor`
                let factor = match opt("factor") {
                    Some(_) => positive("factor")?,
                    None => max_pos.unwrap_or(original) / original,
                };
                let attention = opt("attention_factor").or_else(|| {
                    match (opt("mscale"), opt("mscale_all_dim")) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            Some(yarn_mscale(factor, m) / yarn_mscale(factor, a))
                        }
                        _ => None,
                    }
                });
                let beta = |key: &str, default: f64| match opt(key) {
                    Some(b) if b != 0.0 => b,
                    _ => default,
                };
                let mut y = RopeScaling::yarn(
                    factor,
                    original as usize,
                    beta("beta_fast", 32.0),
                    beta("beta_slow", 1.0),
                    attention,
                );
                y.truncate = s.get("truncate").and_then(Value::as_bool).unwrap_or(true);
                Some(y)
            }
            "longrope" => {
                // transformers 5: the config's top-level original_max_position_embeddings (Phi-3
                // keeps it there) before the scaling's own, then max_position_embeddings; the
                // factor, when absent, is the ratio of the two lengths
                // (max_position_embeddings defaults to 2048, as petal's config and Llama's do)
                let max_pos = v
                    .get("max_position_embeddings")
                    .and_then(Value::as_f64)
                    .unwrap_or(2048.0);
                let (key, original) = match v.get("original_max_position_embeddings") {
                    Some(o) => ("original_max_position_embeddings", o.as_f64()),
                    None => match s.get("original_max_position_embeddings") {
                        Some(o) => ("rope_scaling.original_max_position_embeddings", o.as_f64()),
                        None => ("max_position_embeddings", Some(max_pos)),
                    },
                };
                let original = match original {
                    Some(o) if o >= 2.0 && o.fract() == 0.0 => o,
                    o => {
                        return Err(Error::config(
                            file,
                            key,
                            format!(
                                "{o:?}: LongRoPE's pretraining context must be a whole number of \
                                 at least 2 positions"
                            ),
                        ))
                    }
                };
                let factor = match opt("factor") {
                    Some(_) => positive("factor")?,
                    None => max_pos / original,
                };
                let head_dim = v.get("head_dim").and_then(Value::as_u64).or_else(|| {
                    let h = v.get("hidden_size").and_then(Value::as_u64)?;
                    Some(h / v.get("num_attention_heads").and_then(Value::as_u64)?.max(1))
                });
                let factors = |key: &str| -> Result<Vec<f64>> {
                    let list = s.get(key).and_then(Value::as_array).ok_or_else(|| {
                        Error::config(
                            file,
                            &format!("rope_scaling.{key}"),
                            "missing or not a list",
                        )
                    })?;
                    let field = |i: usize| format!("rope_scaling.{key}[{i}]");
                    let mut xs = Vec::with_capacity(list.len());
                    for (i, x) in list.iter().enumerate() {
                        match x.as_f64() {
                            Some(x) if x > 0.0 && x.is_finite() => xs.push(x),
                            _ => {
                                return Err(Error::config(
                                    file,
                                    &field(i),
                                    format!("{x}: a factor must be a positive number"),
                                ))
                            }
                        }
                    }
                    match head_dim {
                        Some(d) if xs.len() as u64 == d / 2 => Ok(xs),
                        _ => Err(Error::config(
                            file,
                            &format!("rope_scaling.{key}"),
                            format!(
                                "{} entries: one factor per frequency is needed ({})",
                                list.len(),
                                head_dim.map_or("head_dim / 2".into(), |d| (d / 2).to_string())
                            ),
                        )),
                    }
                };
                let attention = match opt("attention_factor") {
                    Some(_) => Some(positive("attention_factor")?),
                    None => None,
                };
                Some(RopeScaling::longrope(
                    factors("short_factor")?,
                    factors("long_factor")?,
                    factor,
                    original as usize,
                    attention,
                ))
            }
            other => {
                let known = "default, linear, dynamic, llama3, yarn, longrope";
                return Err(Error::config(
                    file,
                    "rope_scaling.rope_type",
                    format!("`{other}` is not supported ({known})"),
                ));
            }
        })
    }
}

impl LlamaConfig {
    /// llama.cpp's form of llama3 rope scaling: one factor per frequency (`rope_freqs.weight`,
    /// each frequency divided by its factor), as its converter computes them (frequencies in
    /// f32, the rest in f64). `None` without rope scaling.
    pub fn rope_freq_factors(&self) -> Option<Vec<f32>> {
        let s = self
            .rope_scaling
            .as_ref()
            .filter(|s| s.rope_type == "llama3")?;
        let d = self.head_dim;
        let (old, lo, hi) = (
            s.original_max_position_embeddings as f64,
            s.low_freq_factor,
            s.high_freq_factor,
        );
        let factors = (0..d / 2).map(|i| {
            let freq = 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32);
            let wl = 2.0 * std::f64::consts::PI / freq as f64;
            if wl < old / hi {
                1.0
            } else if wl > old / lo {
                s.factor as f32
            } else {
                let smooth = (old / wl - lo) / (hi - lo);
                (1.0 / ((1.0 - smooth) / s.factor + smooth)) as f32
            }
        });
        Some(factors.collect())
    }

    /// Llama3 rope scaling from llama.cpp's per-frequency factors (a GGUF file's
    /// `rope_freqs.weight`): the factor is the largest, and with `low_freq_factor` 1 (every
    /// Llama 3 model's) `high_freq_factor` and `original_max_position_embeddings` follow from the
    /// frequencies between the two thresholds, which must be at least two. An error when the
    /// factors do not have llama3's form (checked by computing them back, within 1e-4).
    pub fn rope_scaling_from_factors(
        &self,
        factors: &[f32],
    ) -> std::result::Result<RopeScaling, String> {
        let d = self.head_dim;
        if factors.len() != d / 2 {
            return Err(format!(
                "{} factors for {} frequencies",
                factors.len(),
                d / 2
            ));
        }
        let factor = factors.iter().fold(1f32, |m, f| m.max(*f)) as f64;
        // between the thresholds: smooth = (old / wl - 1) / (hi - 1) = A / wl - B
        let points: Vec<(f64, f64)> = (0..d / 2)
            .filter(|&i| factors[i] > 1.0 + 1e-6 && (factors[i] as f64) < factor * (1.0 - 1e-6))
            .map(|i| {
                let freq = 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32);
                let smooth = (1.0 / factors[i] as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
                (freq as f64 / (2.0 * std::f64::consts::PI), smooth)
            })
            .collect();
        if factor <= 1.0 || points.len() < 2 {
            return Err(format!(
                "{} frequencies between llama3's thresholds (at least two are needed to recover \
                 its parameters)",
                points.len()
            ));
        }
        // least squares of smooth = A x - B over the points (x = 1 / wl)
        let n = points.len() as f64;
        let (sx, sy) = points
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let (sxx, sxy) = points
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x * x, b + x * y));
        let a = (n * sxy - sx * sy) / (n * sxx - sx * sx);
        let b = -(sy - a * sx) / n;
        if !(a > 0.0 && b > 0.0) {
            return Err("the factors do not follow llama3's smooth ramp".into());
        }
        let scaling = RopeScaling::llama3(factor, 1.0, 1.0 + 1.0 / b, (a / b).round() as usize);
        let back = LlamaConfig {
            rope_scaling: Some(scaling.clone()),
            ..self.clone()
        }
        .rope_freq_factors()
        .unwrap_or_default();
        match back
            .iter()
            .zip(factors)
            .map(|(a, b)| ((a - b) / b).abs())
            .fold(0f32, f32::max)
        {
            e if e <= 1e-4 => Ok(scaling),
            e => Err(format!(
                "the factors do not follow llama3's form (recomputed from the fitted parameters \
                 they differ by {e:e})"
            )),
        }
    }

    /// The unscaled inverse frequencies `theta^(-2i/d)`, in f64.
    fn base_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect()
    }

    /// RoPE inverse frequencies (head_dim/2), with the configured scaling (transformers'
    /// `_compute_*_parameters` of modeling_rope_utils.py, in f64).
    pub fn inv_freq(&self) -> Vec<f32> {
        let (d, base) = (self.head_dim, self.base_inv_freq());
        let Some(s) = &self.rope_scaling else {
            return base.iter().map(|&x| x as f32).collect();
        };
        match s.rope_type.as_str() {
            "linear" => base.iter().map(|&f| (f / s.factor) as f32).collect(),
            "longrope" => divided(&base, &s.short_factor),
            "dynamic" => base.iter().map(|&f| f as f32).collect(),
            "yarn" => {
                // the dimension at which a frequency turns `rotations` times over the original
                // context, and a linear ramp between the two bounds
                let (dim, ln_base) = (d as f64, self.rope_theta.ln());
                let orig = s.original_max_position_embeddings as f64;
                let at = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * ln_base)
                };
                let (mut low, mut high) = (at(s.beta_fast), at(s.beta_slow));
                if s.truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolate = 1.0 - ramp;
                        (f / s.factor * (1.0 - extrapolate) + f * extrapolate) as f32
                    })
                    .collect()
            }
            _ => {
                let old = s.original_max_position_embeddings as f64;
                let low_wl = old / s.low_freq_factor;
                let high_wl = old / s.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let v = if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / s.factor
                        } else {
                            let smooth = (old / wl - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        };
                        v as f32
                    })
                    .collect()
            }
        }
    }

    /// LongRoPE's inverse frequencies for a forward whose positions go past the pretraining
    /// context, and that context's length: transformers takes them when the largest position
    /// plus one exceeds it (the whole forward, so a cache's earlier keys keep their rotation).
    /// `None` for the other types.
    pub fn long_inv_freq(&self) -> Option<(Vec<f32>, usize)> {
        let s = self
            .rope_scaling
            .as_ref()
            .filter(|s| s.rope_type == "longrope")?;
        Some((
            divided(&self.base_inv_freq(), &s.long_factor),
            s.original_max_position_embeddings,
        ))
    }

    /// The factor on RoPE's cos and sin tables (YaRN's and LongRoPE's attention factor; 1
    /// otherwise).
    pub fn rope_attention_factor(&self) -> f64 {
        self.rope_scaling
            .as_ref()
            .map_or(1.0, |s| s.attention_factor)
    }
}

/// Each frequency divided by its factor (LongRoPE's).
fn divided(base: &[f64], factors: &[f64]) -> Vec<f32> {
    base.iter()
        .zip(factors)
        .map(|(&f, &x)| (f / x) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_factors_are_llama_cpps_and_give_the_parameters_back() {
        // tools/golden/make_rope_freqs.py: llama.cpp's converter, transcribed, in torch
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/golden/rope_freqs.json"
        );
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let base = LlamaConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":96,"hidden_size":128,"intermediate_size":64,
                "num_hidden_layers":1,"num_attention_heads":1}"#,
            "config.json",
        )
        .unwrap();
        for case in golden["cases"].as_array().unwrap() {
            let want: Vec<f32> = serde_json::from_value(case["factors"].clone()).unwrap();
            let scaling = RopeScaling::llama3(case["factor"].as_f64().unwrap(), 1.0, 4.0, 8192);
            let c = LlamaConfig {
                head_dim: case["head_dim"].as_u64().unwrap() as usize,
                rope_theta: case["rope_theta"].as_f64().unwrap(),
                rope_scaling: Some(scaling.clone()),
                ..base.clone()
            };
            let got = c.rope_freq_factors().unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) / b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{}: {worst}", case["name"]);
            let back = c.rope_scaling_from_factors(&want).unwrap();
            assert_eq!(
                back.original_max_position_embeddings, 8192,
                "{}",
                case["name"]
            );
            assert!((back.high_freq_factor - 4.0).abs() < 1e-4, "{back:?}");
            assert_eq!(back.factor, scaling.factor);
        }
        // not llama3's form: a ramp that is not 1 / wavelength-linear, or too few points on it
        let c = LlamaConfig {
            head_dim: 8,
            rope_theta: 10000.0,
            ..base
        };
        let e = c
            .rope_scaling_from_factors(&[1.0, 1.5, 7.0, 8.0])
            .unwrap_err();
        assert!(e.contains("form") || e.contains("ramp"), "{e}");
        let e = c
            .rope_scaling_from_factors(&[1.0, 1.0, 2.0, 8.0])
            .unwrap_err();
        assert!(e.contains("at least two"), "{e}");
        assert!(c.rope_scaling_from_factors(&[1.0, 2.0]).is_err());
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_by_factor_and_keeps_high_ones() {
        let mut c = LlamaConfig::from_hf_json(r#"{"model_type":"llama","vocab_size":10,"hidden_size":128,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":1,"rope_theta":500000.0}"#, "c").unwrap();
        let plain = c.inv_freq();
        c.rope_scaling = Some(RopeScaling::llama3(8.0, 1.0, 4.0, 8192));
        let scaled = c.inv_freq();
        assert_eq!(plain[0], scaled[0]); // wavelength 2*pi < 2048: unchanged
        let last = plain.len() - 1; // wavelength far above 8192: divided by 8
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }
}
