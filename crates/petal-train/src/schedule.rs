//! Learning-rate schedules with linear warmup, as transformers' `get_scheduler` defines them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            o => Err(format!("unknown schedule `{o}` (constant, linear, cosine)")),
        }
    }
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based) of `total`, after `warmup` steps of
    /// linear warmup from 0.
    pub fn lr(&self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / span;
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_their_formulas_through_warmup_and_decay() {
        let (b, w, t) = (1e-3, 10, 110);
        for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            assert_eq!(s.lr(b, 0, w, t), 0.0);
            assert!((s.lr(b, 5, w, t) - 5e-4).abs() < 1e-15);
            assert!((s.lr(b, 10, w, t) - b).abs() < 1e-15);
        }
        assert!((Schedule::Linear.lr(b, 60, w, t) - b * 0.5).abs() < 1e-15);
        assert!((Schedule::Cosine.lr(b, 60, w, t) - b * 0.5).abs() < 1e-15);
        let q = Schedule::Cosine.lr(b, 35, w, t); // progress 1/4: 0.5 (1 + cos(pi/4))
        assert!((q - b * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-15);
        assert_eq!(Schedule::Linear.lr(b, 110, w, t), 0.0);
        assert_eq!(Schedule::Constant.lr(b, 100, w, t), b);
    }
}
