//! Run-time choice of the instruction set the kernels use.

use std::sync::OnceLock;

/// Instruction-set level a kernel runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; the reference every SIMD path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (256-bit vectors).
    Avx2,
    /// AVX2's features plus AVX-512 F/BW/VL with VNNI (int8 dot products)
    /// and BF16 (Zen 4, Sapphire Rapids and later). Kernels without an
    /// AVX-512 version run their AVX2 one at this level.
    Avx512,
    /// AVX-512's features plus the AMX tile unit with BF16 and INT8 tile
    /// products (Sapphire Rapids and later), with the OS's permission to use
    /// the tile registers (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`). Kernels
    /// without a tile version run their AVX-512 one at this level.
    Amx,
}

impl Isa {
    /// Every level this build knows, slowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx];

    /// Whether this CPU and OS can run kernels of this level.
    ///
    /// `is_x86_feature_detected!` also checks that the OS saves the vector
    /// registers (XGETBV), so a feature the kernel disabled is reported absent.
    pub fn is_supported(self) -> bool {
        // Kernels ask this on every call; detect once. `ALL` lists the
        // levels in declaration order, so a level's discriminant indexes it.
        static SUPPORTED: OnceLock<[bool; Isa::ALL.len()]> = OnceLock::new();
        SUPPORTED.get_or_init(|| Isa::ALL.map(Isa::detect))[self as usize]
    }

    /// What [`Isa::is_supported`] caches.
    fn detect(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.detect()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Isa::Avx512.detect() && amx::enable(),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => false,
        }
    }

    /// Whether AVX2 kernels may run: the level is AVX2 or above and the
    /// CPU supports it (a level is only chosen when supported, but a caller
    /// may pass any value).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512 | Isa::Amx) && self.is_supported()
    }

    /// Whether AVX-512 kernels may run at this level on this CPU.
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Amx) && self.is_supported()
    }

    /// Whether AMX tile kernels may run at this level on this CPU and OS.
    pub fn has_amx(self) -> bool {
        self == Isa::Amx && self.is_supported()
    }

    /// Short lowercase name, as accepted by `HAYATE_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// The best level this CPU and OS support.
    pub fn best() -> Isa {
        Isa::ALL
            .iter()
            .rev()
            .copied()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }

    /// The level to run at: the best supported, unless `HAYATE_ISA` names
    /// another (to compare paths end to end). A name that is unknown, or a
    /// level this CPU lacks, is an error rather than a silent fallback.
    /// Decided once per process.
    pub fn from_env() -> Result<Isa, String> {
        static CHOSEN: OnceLock<Result<Isa, String>> = OnceLock::new();
        CHOSEN
            .get_or_init(|| match std::env::var("HAYATE_ISA") {
                Err(std::env::VarError::NotPresent) => Ok(Isa::best()),
                Err(std::env::VarError::NotUnicode(v)) => {
                    Err(format!("HAYATE_ISA={v:?} is not a kernel level"))
                }
                Ok(wanted) => Isa::parse(&wanted),
            })
            .clone()
    }

    /// The level called `name`, if this CPU supports it.
    pub fn parse(name: &str) -> Result<Isa, String> {
        let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
        match Isa::ALL.iter().copied().find(|isa| isa.name() == name) {
            None => Err(format!(
                "HAYATE_ISA={name} is not a kernel level (known: {})",
                names.join(", ")
            )),
            Some(isa) if !isa.is_supported() => Err(format!(
                "HAYATE_ISA={name}: this CPU (or OS) does not support it"
            )),
            Some(isa) => Ok(isa),
        }
    }

    /// Every level this machine supports (for tests and benchmarks).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL
            .iter()
            .copied()
            .filter(|i| i.is_supported())
            .collect()
    }
}

/// The AMX tile unit: whether the CPU has it and the OS lets us use it.
#[cfg(target_arch = "x86_64")]
mod amx {
    /// Whether the CPU reports AMX-TILE, AMX-BF16 and AMX-INT8, the OS saves
    /// the tile state (XCR0 bits 17 and 18), and this process is granted the
    /// tile data (on Linux the state is off until asked for, per process).
    pub fn enable() -> bool {
        use std::arch::x86_64::__cpuid_count;
        if !std::arch::is_x86_feature_detected!("xsave") {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (bf16, tile, int8) = (1 << 22, 1 << 24, 1 << 25);
        if leaf7.edx & (bf16 | tile | int8) != bf16 | tile | int8 {
            return false;
        }
        // SAFETY: XSAVE (hence XGETBV) is supported, checked above.
        let xcr0 = unsafe { xgetbv0() };
        let (tilecfg, tiledata) = (1 << 17, 1 << 18);
        xcr0 & (tilecfg | tiledata) == tilecfg | tiledata && request_tile_data()
    }

    /// XCR0, the state components the OS saves.
    ///
    /// # Safety
    /// The CPU supports XSAVE.
    #[target_feature(enable = "xsave")]
    unsafe fn xgetbv0() -> u64 {
        // SAFETY: the caller guarantees XSAVE.
        unsafe { std::arch::x86_64::_xgetbv(0) }
    }

    /// Asks Linux for the tile data state and checks that it was granted.
    #[cfg(target_os = "linux")]
    fn request_tile_data() -> bool {
        const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these codes reads or writes only the
        // process's permission mask and the u64 passed by pointer.
        unsafe {
            if libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) != 0
            {
                return false;
            }
            let mut granted: u64 = 0;
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_GET_XCOMP_PERM,
                &mut granted as *mut u64,
            ) == 0
                && granted & (1 << XFEATURE_XTILEDATA) != 0
        }
    }

    /// Other systems: not tested, so not used.
    #[cfg(not(target_os = "linux"))]
    fn request_tile_data() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel tests compare every supported SIMD path with the scalar
    /// reference. On a machine with no SIMD path they would compare scalar
    /// with scalar and prove nothing: that is a failure, unless the machine
    /// is declared scalar-only (`HAYATE_SCALAR_ONLY_MACHINE=1`).
    #[test]
    fn a_simd_path_is_tested_on_this_machine() {
        if std::env::var_os("HAYATE_SCALAR_ONLY_MACHINE").is_some() {
            return;
        }
        let simd: Vec<Isa> = Isa::supported()
            .into_iter()
            .filter(|&i| i != Isa::Scalar)
            .collect();
        assert!(
            !simd.is_empty(),
            "no SIMD kernel path runs on this machine, so the SIMD tests compared scalar with scalar"
        );
        assert_ne!(Isa::best(), Isa::Scalar);
    }

    #[test]
    fn unknown_or_unsupported_levels_are_errors() {
        assert_eq!(Isa::parse("scalar"), Ok(Isa::Scalar));
        let err = Isa::parse("avx9000").unwrap_err();
        assert!(
            err.contains("avx9000") && err.contains("scalar, avx2, avx512, amx"),
            "{err}"
        );
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()).is_ok(), isa.is_supported());
        }
    }
}
