//! Intel AMX (Advanced Matrix Extensions) for the bf16 products: `tdpbf16ps` multiplies a
//! 16 x 32 bf16 tile of `a` by a 32 x 16 bf16 tile of `b` (k-pairs in 32-bit words, the layout
//! `crate::bf16` packs for AVX512-BF16 already) into a 16 x 16 f32 tile, 16 x 16 x 32
//! multiply-adds an instruction: about 20 times the throughput of `vdpbf16ps` on one core.
//! Sapphire Rapids and later Xeons have it.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are written as inline assembly;
//! the tile registers are invisible to the compiler, and every use here configures, fills and
//! releases them within one call on one thread. Linux hands a process the 8 KB tile state only
//! once it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): `available` asks once.
//! `PETAL_BF16_KERNEL=avx512-bf16` keeps the AVX512-BF16 kernel on an AMX CPU (to measure what
//! a CPU without AMX gets).

/// The bf16 product kernels, fastest first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`)
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`) in zmm registers
    Avx512,
}

impl Bf16Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx-bf16",
            Bf16Kernel::Avx512 => "avx512-bf16",
        }
    }

    /// The kernel the bf16 products take on this CPU (given it has AVX512-BF16): AMX where the
    /// CPU and the OS give it, unless `PETAL_BF16_KERNEL` names the other.
    pub fn chosen() -> Bf16Kernel {
        static CHOSEN: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let asked = std::env::var("PETAL_BF16_KERNEL").unwrap_or_default();
            if available() && asked.trim() != Bf16Kernel::Avx512.name() {
                Bf16Kernel::Amx
            } else {
                Bf16Kernel::Avx512
            }
        })
    }
}

/// Whether this CPU has AMX-TILE and AMX-BF16 and the OS lets this process use the tiles.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
    let max = std::arch::x86_64::__cpuid(0).eax;
    if max < 7 || !crate::bf16::available() {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it fails (non-zero) on kernels
    // older than 5.16 or where the tile state is not enabled.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Rows of `a` in one AMX tile (and of the `c` tile the kernel computes).
pub(crate) const MR: usize = 16;
/// k-pairs in one tile row: 16 words of 4 bytes, the tile's 64-byte row.
pub(crate) const PAIRS: usize = 16;

/// The 64-byte tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn full() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
        }
        Config(c)
    }
}

/// Configures this thread's tiles while it lives and releases them when dropped.
pub(crate) struct Tiles(());

impl Tiles {
    /// # Safety
    /// `available()` must be true.
    pub(crate) unsafe fn start() -> Tiles {
        let cfg = Config::full();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AMX and the process has the tile state (the caller's contract).
        unsafe {
            std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
        }
        Tiles(())
    }

    /// `out (16 x 48, row-major) = a_panel b_panel` over `kcp` pairs (a multiple of
    /// `PAIRS`): `a` is 16 rows of `kcp` words, `b` `kcp` rows of 48 words (`[p][j]`).
    pub(crate) fn micro_16x48(&self, kcp: usize, a: &[u32], b: &[u32], out: &mut [f32; MR * 48]) {
        assert!(kcp.is_multiple_of(PAIRS) && a.len() >= MR * kcp && b.len() >= 48 * kcp);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles are configured (`self` exists); the assert bounds every load (16
        // rows of 64 bytes at strides kcp * 4 and 192 bytes from the given offsets) and
        // `out` holds the three 16 x 16 stores at a 192-byte stride.
        unsafe {
            use std::arch::asm;
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                options(nostack)
            );
            let (sa, sb): (usize, usize) = (kcp * 4, 48 * 4);
            for s in (0..kcp).step_by(PAIRS) {
                let bp = b.as_ptr().add(s * 48);
                asm!(
                    "tileloadd tmm3, [{a} + {sa}]",
                    "tileloadd tmm4, [{b0} + {sb}]",
                    "tdpbf16ps tmm0, tmm3, tmm4",
                    "tileloadd tmm5, [{b1} + {sb}]",
                    "tdpbf16ps tmm1, tmm3, tmm5",
                    "tileloadd tmm6, [{b2} + {sb}]",
                    "tdpbf16ps tmm2, tmm3, tmm6",
                    a = in(reg) a.as_ptr().add(s),
                    b0 = in(reg) bp,
                    b1 = in(reg) bp.add(16),
                    b2 = in(reg) bp.add(32),
                    sa = in(reg) sa,
                    sb = in(reg) sb,
                    options(nostack, readonly),
                );
            }
            let o = out.as_mut_ptr();
            asm!(
                "tilestored [{o0} + {so}], tmm0",
                "tilestored [{o1} + {so}], tmm1",
                "tilestored [{o2} + {so}], tmm2",
                o0 = in(reg) o,
                o1 = in(reg) o.add(16),
                o2 = in(reg) o.add(32),
                so = in(reg) 48usize * 4,
                options(nostack),
            );
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: releasing the tile state is always allowed once it was configured.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}
