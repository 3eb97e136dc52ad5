//! Compute kernels for Hayate.
//!
//! Everything here is pure compute over slices: no model knowledge, no I/O.
//! Each SIMD path has a scalar reference beside it ([`Isa::Scalar`]) and the
//! fastest path the CPU *and* the OS support is chosen once at run time
//! ([`Isa::from_env`]). Weights are read in their stored dtype (f32, bf16, f16)
//! and widened to f32 inside the kernels; quantized weights ([`quant`]: q4,
//! q8, block Hadamard rotation) meet int8 activations in integer products.

pub mod attention;
pub mod bandwidth;
pub mod cpu;
pub mod deltanet;
pub mod exp;
pub mod hadamard;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod weights;

pub use cpu::Isa;

/// Whether `len` is exactly `a * b`; false when the product overflows, so
/// that a guard cannot pass on a wrapped size.
pub(crate) fn is_product(len: usize, a: usize, b: usize) -> bool {
    a.checked_mul(b) == Some(len)
}

/// Whether `len` is at least `a * b`; false when the product overflows.
pub(crate) fn holds(len: usize, a: usize, b: usize) -> bool {
    a.checked_mul(b).is_some_and(|need| len >= need)
}
pub use matmul::{MatmulJob, ProductMode, matmul, matmul_many, matmul_many_in};
pub use pool::ThreadPool;
pub use quant::{ActPrecision, QuantFormat, QuantMatRef};
pub use weights::{MatRef, WeightSlice};
