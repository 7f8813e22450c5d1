//! Which vector unit the few-row decoding kernels run on.

/// The vector unit a few-row kernel (`q4_1_rows`, `nf4_rows`) runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Simd {
    /// AVX-512F (with F16C)
    Avx512,
    /// AVX2 + FMA (with F16C): CPUs without AVX-512
    Avx2,
}

impl Simd {
    /// Whether this CPU runs it (feature detection is cached by std: cheap on every call).
    pub(super) fn runs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("f16c")
                && match self {
                    Simd::Avx512 => has!("avx512f"),
                    Simd::Avx2 => has!("avx2") && has!("fma"),
                }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Every one this CPU runs, best first (the tests check each).
    pub(super) fn all() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2]
            .into_iter()
            .filter(|s| s.runs())
            .collect()
    }

    /// The best this CPU has, None on a CPU with neither (the caller decodes rows then).
    /// `PETAL_FEW_ROWS=avx2` or `off` picks a lesser one, to measure what a CPU without
    /// AVX-512 gets (a unit this CPU lacks is reported and the best kept).
    pub(super) fn best() -> Option<Simd> {
        static BEST: std::sync::OnceLock<Option<Simd>> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Simd::all();
            let asked = std::env::var("PETAL_FEW_ROWS").unwrap_or_default();
            match asked.as_str() {
                "" => {}
                "off" => return None,
                "avx2" if all.contains(&Simd::Avx2) => return Some(Simd::Avx2),
                "avx512" if all.contains(&Simd::Avx512) => return Some(Simd::Avx512),
                o => eprintln!(
                    "petal: PETAL_FEW_ROWS: `{o}` is not one of avx512, avx2, off that this CPU \
                     runs; using {:?}",
                    all.first()
                ),
            }
            all.first().copied()
        })
    }
}
