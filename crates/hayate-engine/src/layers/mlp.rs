//! The gated feed-forward network of every block: `down(act(gate(x)) * up(x))`.
//! Kernels: the products (`Compute::project` in `linear.rs`) and the fused
//! activations [`hayate_kernels::ops::silu_mul`] / [`hayate_kernels::ops::gelu_tanh_mul`].

use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use hayate_kernels::ops;

/// Activation of a gated feed-forward network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU with the tanh approximation (GeGLU, Gemma).
    GeluTanh,
}

/// Gated feed-forward network: `down(act(gate(x)) * up(x))`.
pub struct GatedMlp {
    /// Gate projection.
    pub gate: Linear,
    /// Up projection.
    pub up: Linear,
    /// Down projection.
    pub down: Linear,
    /// Activation applied to the gate.
    pub activation: Activation,
}

/// A sequence's buffers for the widest MLP of the model.
pub(crate) struct Scratch {
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Scratch {
    /// Room for chunks through any of `mlps`.
    pub(crate) fn new(mlps: &[&GatedMlp], shape: &StateShape, budget: &mut Budget) -> Result<Self> {
        let inter = mlps.iter().map(|m| m.gate.rows).max().unwrap_or(0);
        Ok(Scratch {
            gate: budget.floats(shape.chunk * inter)?,
            up: budget.floats(shape.chunk * inter)?,
        })
    }
}

impl GatedMlp {
    /// The linear layers, grouped by shared input.
    pub fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        vec![vec![&self.gate, &self.up], vec![&self.down]]
    }

    /// The linear layers, grouped by shared input.
    pub fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        vec![vec![&mut self.gate, &mut self.up], vec![&mut self.down]]
    }

    /// `out = mlp(x)` for `n` rows of `x` (each `hidden` long).
    pub(crate) fn forward(
        &self,
        cx: &Compute<'_>,
        s: &mut Scratch,
        x: &[f32],
        out: &mut [f32],
        n: usize,
    ) {
        let inter = self.gate.rows;
        let (gate, up) = (&mut s.gate[..n * inter], &mut s.up[..n * inter]);
        cx.project([(&self.gate, &mut *gate), (&self.up, &mut *up)], x, n);
        match self.activation {
            Activation::Silu => ops::silu_mul(cx.isa, gate, up),
            Activation::GeluTanh => ops::gelu_tanh_mul(gate, up),
        }
        cx.project([(&self.down, out)], gate, n);
    }
}
