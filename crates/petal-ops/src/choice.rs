//! Which implementation each op takes, as a value handed to the op: petal's fused CPU kernels
//! or the composed reference ops (the path a GPU takes through candle), and which families of
//! petal's CUDA kernels. Chosen when a model is loaded and carried down to every op; no op
//! reads a global switch, so two models in one process can run different kernels.

use crate::cuda::Family;

/// The kernel choice of a model or a run. The default: fused CPU kernels on, petal's CUDA
/// kernels off (the `petal` binary, through [`Kernels::from_env`], turns on
/// [`Family::DEFAULT`]: the families that passed their tests on an H200, see docs/gpu.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernels {
    fused: bool,
    cuda: u8,
    frozen: Frozen,
}

/// The arithmetic of the products of a frozen quantized weight on the CPU (forward and input
/// gradient; no weight gradient is taken through them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frozen {
    /// bf16 where the CPU has AVX512-BF16, else 8-bit codes where it has AVX-512 VNNI or
    /// AVX-VNNI, else nibbles where it has AVX2 but no AVX-512 (its 8-bit kernel is slower
    /// than f32, and AVX-512's f32 faster than nibbles: measured), else f32.
    Auto,
    /// f32 products.
    F32,
    /// bf16 products (f32 where the CPU has no AVX512-BF16).
    Bf16,
    /// 8-bit codes with i32 sums (`crate::int8`): AVX-512 VNNI, AVX2, or plain loops.
    Int8,
    /// f32, except the forward products over 4-bit weights (Q4_0, Q4_1, Q4_K, int4), which
    /// take W's own codes times 8-bit codes of x (AVX2; f32 without it).
    Nibbles,
}

impl Frozen {
    pub const NAMES: [&'static str; 5] = ["auto", "f32", "bf16", "int8", "nibbles"];

    pub fn parse(s: &str) -> Option<Frozen> {
        Some(match s.trim() {
            "" | "auto" => Frozen::Auto,
            "f32" => Frozen::F32,
            "bf16" => Frozen::Bf16,
            "int8" => Frozen::Int8,
            "nibbles" => Frozen::Nibbles,
            _ => return None,
        })
    }
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels::FUSED
    }
}

impl Kernels {
    /// The default: fused CPU kernels, no CUDA kernel.
    pub const FUSED: Kernels = Kernels {
        fused: true,
        cuda: 0,
        frozen: Frozen::Auto,
    };

    /// The composed reference ops everywhere: no fused CPU kernel, no CUDA kernel.
    pub const REFERENCE: Kernels = Kernels {
        fused: false,
        cuda: 0,
        frozen: Frozen::Auto,
    };

    /// Fused CPU kernels on or off (off: the reference ops, and no CUDA kernel either).
    pub fn with_fused(self, on: bool) -> Self {
        Kernels { fused: on, ..self }
    }

    /// Exactly these CUDA kernel families switched on.
    pub fn with_cuda(self, families: &[Family]) -> Self {
        let cuda = families.iter().fold(0, |b, f| b | f.bit());
        Kernels { cuda, ..self }
    }

    /// The products of frozen quantized weights in this arithmetic (fused kernels only).
    pub fn with_frozen(self, frozen: Frozen) -> Self {
        Kernels { frozen, ..self }
    }

    /// The arithmetic asked of the frozen quantized products.
    pub fn frozen(self) -> Frozen {
        self.frozen
    }

    /// Whether the fused paths are on.
    pub fn fused(self) -> bool {
        self.fused
    }

    /// Whether the CUDA kernels of `family` may run (they still need a CUDA tensor; see
    /// [`crate::cuda::usable`]).
    pub fn cuda_on(self, family: Family) -> bool {
        self.fused && self.cuda & family.bit() != 0
    }

    /// The CUDA kernel families switched on, by name.
    pub fn cuda_families(self) -> Vec<&'static str> {
        Family::ALL
            .into_iter()
            .filter(|&f| self.cuda & f.bit() != 0)
            .map(Family::name)
            .collect()
    }

    /// The choice the environment asks for, as the `petal` binary reads it: `PETAL_FUSED=0` the
    /// reference ops; `PETAL_CUDA_KERNELS` the CUDA families (unset [`Family::DEFAULT`], `1`
    /// or `all` every one, a comma list some, `0` none; an unknown name is reported and
    /// skipped);
    /// `PETAL_FROZEN_PRODUCTS` the arithmetic of frozen quantized products (`auto`, `f32`,
    /// `bf16`, `int8`, `nibbles`; an unknown value is reported and `auto` kept).
    pub fn from_env() -> Self {
        let fused = std::env::var("PETAL_FUSED").map_or(true, |v| v != "0");
        let cuda = match std::env::var("PETAL_CUDA_KERNELS") {
            Ok(v) => parse_families(&v),
            Err(_) => Family::DEFAULT.to_vec(),
        };
        let v = std::env::var("PETAL_FROZEN_PRODUCTS").unwrap_or_default();
        let frozen = Frozen::parse(&v).unwrap_or_else(|| {
            eprintln!(
                "petal: PETAL_FROZEN_PRODUCTS: `{v}` is not one of {}; using auto",
                Frozen::NAMES.join(", ")
            );
            Frozen::Auto
        });
        Kernels::default()
            .with_fused(fused)
            .with_cuda(&cuda)
            .with_frozen(frozen)
    }
}

/// The families a `PETAL_CUDA_KERNELS` value names.
pub fn parse_families(v: &str) -> Vec<Family> {
    match v.trim() {
        "" | "0" => vec![],
        "1" | "all" => Family::ALL.to_vec(),
        list => list
            .split(',')
            .filter_map(|n| {
                let f = Family::ALL.into_iter().find(|f| f.name() == n.trim());
                if f.is_none() {
                    let names: Vec<_> = Family::ALL.iter().map(|f| f.name()).collect();
                    eprintln!(
                        "petal: PETAL_CUDA_KERNELS: no kernel family `{}` (1, all, or some of {})",
                        n.trim(),
                        names.join(", ")
                    );
                }
                f
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_switch_reads_all_none_or_a_list_of_families() {
        assert_eq!(parse_families("1"), Family::ALL.to_vec());
        assert_eq!(parse_families("all"), Family::ALL.to_vec());
        assert!(parse_families("0").is_empty() && parse_families("").is_empty());
        let some = parse_families(" norm, attention ,bogus");
        assert_eq!(some, vec![Family::Norm, Family::Attention]);
        let k = Kernels::default().with_cuda(&some);
        assert_eq!(k.cuda_families(), vec!["norm", "attention"]);
        assert!(k.cuda_on(Family::Norm) && !k.cuda_on(Family::Loss));
        assert!(
            !k.with_fused(false).cuda_on(Family::Norm),
            "reference ops take no CUDA kernel"
        );
    }
}
