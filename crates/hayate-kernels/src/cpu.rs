//! Run-time choice of the instruction set the kernels use.

use std::sync::OnceLock;

/// Instruction-set level a kernel runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; the reference every SIMD path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (256-bit vectors).
    Avx2,
}

impl Isa {
    /// Every level this build knows, slowest first.
    pub const ALL: [Isa; 2] = [Isa::Scalar, Isa::Avx2];

    /// Whether this CPU and OS can run kernels of this level.
    ///
    /// `is_x86_feature_detected!` also checks that the OS saves the vector
    /// registers (XGETBV), so a feature the kernel disabled is reported absent.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
        }
    }

    /// Short lowercase name, as accepted by `HAYATE_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }

    /// The best supported level, unless `HAYATE_ISA` asks for a lower one
    /// (useful to compare paths end to end). Decided once per process.
    pub fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::ALL
                .iter()
                .rev()
                .copied()
                .find(|isa| isa.is_supported())
                .unwrap_or(Isa::Scalar);
            match std::env::var("HAYATE_ISA") {
                Ok(wanted) => Isa::ALL
                    .iter()
                    .copied()
                    .find(|isa| isa.name() == wanted && isa.is_supported())
                    .unwrap_or(best),
                Err(_) => best,
            }
        })
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
