//! What every mixer module provides: the one interface [`super::Block`]
//! runs its mixer through, whatever the layer type.

use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use crate::rope::RopeTables;

/// One sequence's part of a step of the forward pass, as a mixer sees it:
/// `n` new tokens at positions `start..start + n`, rows `offset..offset + n`
/// of the step's buffers (a batched step holds several sequences' rows).
pub(crate) struct Step<'a> {
    /// Where the products run.
    pub cx: Compute<'a>,
    /// The rotary tables of these positions.
    pub ropes: &'a RopeTables,
    /// Tokens in the step.
    pub n: usize,
    /// Position of the first.
    pub start: usize,
    /// Row of the first in the step's buffers.
    pub offset: usize,
    /// Recurrent layers keep the state after each of this many last tokens.
    pub recurrent_tail: usize,
    /// For a draft tree ([`crate::Model::forward_tree`]): which token each
    /// follows; its tokens still occupy positions `start..start + n` of
    /// the caches, but each sees only the prefix and its own path.
    pub tree: Option<Tree<'a>>,
}

/// The shape of a draft tree of `n` tokens: token 0 follows the sequence,
/// token `i > 0` follows `parents[i] < i`, at depth `depths[i]` (its
/// position is `start + depths[i]`).
#[derive(Clone, Copy)]
pub(crate) struct Tree<'a> {
    /// Each token's parent (`parents[0] == 0`).
    pub parents: &'a [usize],
    /// Each token's depth (`depths[0] == 0`).
    pub depths: &'a [usize],
}

/// A layer type that mixes information across positions (attention,
/// Gated DeltaNet, short convolution, ...).
pub(crate) trait MixerLayer: Sized {
    /// What one sequence keeps between steps for one such layer.
    type State;
    /// Buffers one sequence's steps reuse, shared by all layers of this type.
    type Scratch;

    /// A fresh state, and whether it keeps a bounded window of positions
    /// (which limits how far the sequence can roll back).
    fn new_state(&self, shape: &StateShape, budget: &mut Budget) -> Result<(Self::State, bool)>;

    /// What a snapshot keeps of one such layer's state.
    type Snapshot: Send;

    /// Back to an empty sequence. Most states need nothing: entries past
    /// the length are overwritten before they are read.
    fn clear(_state: &mut Self::State) {}

    /// What `state`, holding `len` tokens, must keep to be resumed there
    /// after the sequence went on past where it can roll back; `None` when
    /// rolling back is enough (a full KV cache keeps every position).
    fn snapshot(&self, state: &Self::State, len: usize) -> Option<Self::Snapshot>;

    /// Appends what `state` holds of its first `len` tokens to `out` (a
    /// sequence saved to disk, [`crate::saved`]).
    fn save(&self, state: &Self::State, len: usize, out: &mut Vec<u8>);

    /// Reads back what [`save`](Self::save) wrote for `len` tokens from the
    /// front of `input`, advancing it; `None` when `input` ends too soon.
    fn load(&self, state: &mut Self::State, len: usize, input: &mut &[u8]) -> Option<()>;

    /// Bytes a snapshot takes.
    fn snapshot_bytes(snapshot: &Self::Snapshot) -> usize;

    /// Puts back what [`snapshot`](Self::snapshot) kept at `len` tokens.
    fn restore(&self, state: &mut Self::State, snapshot: &Self::Snapshot, len: usize);

    /// Scratch that fits every one of `layers` (possibly none).
    fn new_scratch(
        layers: &[&Self],
        shape: &StateShape,
        budget: &mut Budget,
    ) -> Result<Self::Scratch>;

    /// The linear layers, grouped by shared input (one group is one fused
    /// product and, when quantized with a rotation, shares `S_in`).
    fn linear_groups(&self) -> Vec<Vec<&Linear>>;

    /// The same, to replace them (quantization at load).
    fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>>;

    /// The input projections of all `rows` rows of the step (every
    /// sequence's) from the normalised inputs `x` (`rows × hidden`) into
    /// the scratch.
    fn project_in(&self, cx: &Compute<'_>, scratch: &mut Self::Scratch, x: &[f32], rows: usize);

    /// One sequence's part between the projections: its rows of the
    /// scratch (`step.offset..step.offset + step.n`) against its state.
    fn mix(&self, step: &Step<'_>, state: &mut Self::State, scratch: &mut Self::Scratch);

    /// The output projection of all `rows` rows into `out` (`rows × hidden`).
    fn project_out(
        &self,
        cx: &Compute<'_>,
        scratch: &mut Self::Scratch,
        rows: usize,
        out: &mut [f32],
    );
}
