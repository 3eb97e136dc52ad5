//! Gated short convolution (LFM2): `out(C ⊙ conv(B ⊙ x))`, with `B`, `C` and
//! `x` from one input projection and a causal depthwise convolution over a
//! few positions. Also the convolution history that Gated DeltaNet shares.
//!
//! State: the last `kernel - 1` inputs of the convolution (plus as many as
//! can be rolled back), in a ring. Kernels: the products and
//! [`hayate_kernels::ops::causal_conv1d`].

use super::bytes;
use super::mixer::{MixerLayer, Step};
use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use hayate_kernels::ops;

/// Gated short convolution (LFM2): `out(C ⊙ conv(B ⊙ x))` with `B`, `C`
/// and `x` from one input projection.
pub struct ShortConv {
    /// Input projection, `3 * channels` outputs: `B`, `C`, `x`.
    pub in_proj: Linear,
    /// Output projection.
    pub out: Linear,
    /// Convolution taps, `[kernel][channels]`.
    pub conv: Vec<f32>,
    /// Convolution bias, if any.
    pub conv_bias: Option<Vec<f32>>,
    /// Convolution length.
    pub kernel: usize,
    /// Channels (the hidden size).
    pub channels: usize,
}

/// The last inputs of a causal convolution: position `p` in row `p % rows`.
pub struct ConvHistory {
    /// `rows × channels` values.
    pub data: Vec<f32>,
    /// Positions kept.
    pub rows: usize,
    /// Values per position.
    pub channels: usize,
}

impl ConvHistory {
    /// The history of a `kernel`-long convolution over `channels`, able to
    /// roll back `shape.rollback` positions.
    pub(crate) fn new(
        kernel: usize,
        channels: usize,
        shape: &StateShape,
        budget: &mut Budget,
    ) -> Result<Self> {
        let rows = (kernel - 1 + shape.rollback).max(1);
        Ok(ConvHistory {
            data: budget.floats(rows * channels)?,
            rows,
            channels,
        })
    }

    /// The stored input of `position`.
    pub fn row(&self, position: usize) -> &[f32] {
        let r = position % self.rows;
        &self.data[r * self.channels..(r + 1) * self.channels]
    }

    /// Stores the input of `position`.
    pub fn row_mut(&mut self, position: usize) -> &mut [f32] {
        let r = position % self.rows;
        &mut self.data[r * self.channels..(r + 1) * self.channels]
    }

    /// Writes the inputs of the `kernel - 1` positions before `start`
    /// (zeros before the sequence) into the first rows of `window`.
    pub(crate) fn fill_window(&self, kernel: usize, start: usize, window: &mut [f32]) {
        let c = self.channels;
        for (i, dst) in window[..(kernel - 1) * c].chunks_exact_mut(c).enumerate() {
            match (start + i).checked_sub(kernel - 1) {
                Some(p) => dst.copy_from_slice(self.row(p)),
                None => dst.fill(0.0),
            }
        }
    }

    /// Keeps the inputs of positions `start..` (`rows` holds one per
    /// position), as many of the last as there is room for.
    pub(crate) fn remember(&mut self, start: usize, rows: &[f32]) {
        let c = self.channels;
        let n = rows.len() / c;
        for t in n - n.min(self.rows)..n {
            self.row_mut(start + t)
                .copy_from_slice(&rows[t * c..(t + 1) * c]);
        }
    }
}

/// A sequence's buffers for the widest short convolution of the model.
pub(crate) struct Scratch {
    /// `B`, `C`, `x` of each token.
    bcx: Vec<f32>,
    /// Convolution input: history rows, then the chunk's `B ⊙ x` rows.
    window: Vec<f32>,
    /// `C ⊙ conv(..)` before the output projection.
    y: Vec<f32>,
}

impl MixerLayer for ShortConv {
    type State = ConvHistory;
    type Scratch = Scratch;
    /// The history's rows.
    type Snapshot = Vec<f32>;

    fn snapshot(&self, history: &ConvHistory, _len: usize) -> Option<Vec<f32>> {
        Some(history.data.clone())
    }

    fn save(&self, history: &ConvHistory, _len: usize, out: &mut Vec<u8>) {
        bytes::put(&history.data, out);
    }

    fn load(&self, history: &mut ConvHistory, _len: usize, input: &mut &[u8]) -> Option<()> {
        bytes::take(&mut history.data, input)
    }

    fn snapshot_bytes(rows: &Vec<f32>) -> usize {
        4 * rows.len()
    }

    fn restore(&self, history: &mut ConvHistory, rows: &Vec<f32>, _len: usize) {
        history.data.copy_from_slice(rows);
    }

    /// An empty history (a ring, so rollback is bounded).
    fn new_state(&self, shape: &StateShape, budget: &mut Budget) -> Result<(ConvHistory, bool)> {
        Ok((
            ConvHistory::new(self.kernel, self.channels, shape, budget)?,
            true,
        ))
    }

    fn new_scratch(layers: &[&Self], shape: &StateShape, budget: &mut Budget) -> Result<Scratch> {
        let (mut channels, mut window) = (0, 0);
        for c in layers.iter().copied() {
            channels = channels.max(c.channels);
            window = window.max((c.kernel - 1 + shape.chunk) * c.channels);
        }
        Ok(Scratch {
            bcx: budget.floats(shape.chunk * 3 * channels)?,
            window: budget.floats(window)?,
            y: budget.floats(shape.chunk * channels)?,
        })
    }

    fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        vec![vec![&self.in_proj], vec![&self.out]]
    }

    fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        vec![vec![&mut self.in_proj], vec![&mut self.out]]
    }

    fn project_in(&self, cx: &Compute<'_>, s: &mut Scratch, x: &[f32], rows: usize) {
        let bcx = &mut s.bcx[..rows * 3 * self.channels];
        cx.project([(&self.in_proj, bcx)], x, rows);
    }

    fn mix(&self, step: &Step<'_>, history: &mut ConvHistory, s: &mut Scratch) {
        let (n, start, offset) = (step.n, step.start, step.offset);
        let ch = self.channels;
        let bcx = &s.bcx[offset * 3 * ch..(offset + n) * 3 * ch];
        let window = &mut s.window[..(self.kernel - 1 + n) * ch];
        history.fill_window(self.kernel, start, window);
        for (row, dst) in bcx
            .chunks_exact(3 * ch)
            .zip(window[(self.kernel - 1) * ch..].chunks_exact_mut(ch))
        {
            dst.copy_from_slice(&row[..ch]);
            ops::mul(dst, &row[2 * ch..]);
        }
        history.remember(start, &window[(self.kernel - 1) * ch..]);
        let y = &mut s.y[offset * ch..(offset + n) * ch];
        ops::causal_conv1d(window, &self.conv, self.conv_bias.as_deref(), ch, y);
        for (row, yr) in bcx.chunks_exact(3 * ch).zip(y.chunks_exact_mut(ch)) {
            ops::mul(yr, &row[ch..2 * ch]);
        }
    }

    fn project_out(&self, cx: &Compute<'_>, s: &mut Scratch, rows: usize, out: &mut [f32]) {
        cx.project([(&self.out, out)], &s.y[..rows * self.channels], rows);
    }
}
