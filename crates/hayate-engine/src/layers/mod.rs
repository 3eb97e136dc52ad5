//! The layer types every architecture is assembled from, one module each:
//! its weights, its per-sequence state, the scratch it needs and its
//! forward, with pointers to its kernels.
//!
//! - [`attention`]: causal attention over a KV cache (full or sliding window).
//! - [`deltanet`]: Gated DeltaNet linear attention with a fixed-size state.
//! - [`short_conv`]: gated short convolution with a few positions of state.
//! - [`mlp`]: the gated feed-forward network.
//! - [`norm`]: RMS normalisation.
//!
//! A translator ([`crate::arch`]) turns a configuration into a list of
//! [`Block`]s; this module dispatches each block's mixer to its module. A
//! new mixer is a new module here plus one variant in each of [`Mixer`],
//! [`MixerState`] and the scratch, whose `match` arms the compiler lists.

pub mod attention;
pub mod deltanet;
pub mod mlp;
pub mod norm;
pub mod short_conv;

pub use attention::{Attention, KvCache};
pub use deltanet::{DeltaState, GatedDeltaNet};
pub use mlp::{Activation, GatedMlp};
pub use norm::RmsNorm;
pub use short_conv::{ConvHistory, ShortConv};

use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use crate::rope::{Rope, RopeTables};

/// What mixes information across positions.
pub enum Mixer {
    /// Causal attention over a KV cache (full or sliding-window).
    Attention(Attention),
    /// Gated DeltaNet linear attention with a fixed-size state.
    DeltaNet(GatedDeltaNet),
    /// Gated short convolution with a few positions of state.
    ShortConv(ShortConv),
}

/// The state one layer carries between calls, made by its mixer.
pub enum MixerState {
    /// An attention layer's cache.
    Attention(KvCache),
    /// A Gated DeltaNet layer's convolution history and recurrent states.
    DeltaNet(DeltaState),
    /// A short convolution's history.
    ShortConv(ConvHistory),
}

impl MixerState {
    /// Back to an empty sequence.
    pub(crate) fn clear(&mut self) {
        match self {
            MixerState::DeltaNet(d) => d.clear(),
            // Entries past the length are overwritten before they are read.
            MixerState::Attention(_) | MixerState::ShortConv(_) => {}
        }
    }
}

impl Mixer {
    /// A fresh state for this layer, and whether it holds a bounded window
    /// of positions (which limits rollback).
    pub(crate) fn new_state(
        &self,
        shape: &StateShape,
        budget: &mut Budget,
    ) -> Result<(MixerState, bool)> {
        Ok(match self {
            Mixer::Attention(a) => {
                let (cache, ring) = a.new_state(shape, budget)?;
                (MixerState::Attention(cache), ring)
            }
            Mixer::DeltaNet(d) => (MixerState::DeltaNet(d.new_state(shape, budget)?), true),
            Mixer::ShortConv(c) => (MixerState::ShortConv(c.new_state(shape, budget)?), true),
        })
    }

    fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        match self {
            Mixer::Attention(a) => a.linear_groups(),
            Mixer::DeltaNet(d) => d.linear_groups(),
            Mixer::ShortConv(c) => c.linear_groups(),
        }
    }

    fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        match self {
            Mixer::Attention(a) => a.linear_groups_mut(),
            Mixer::DeltaNet(d) => d.linear_groups_mut(),
            Mixer::ShortConv(c) => c.linear_groups_mut(),
        }
    }
}

/// One pre-norm residual layer: `x += post(mixer(norm(x))); x += post(mlp(norm(x)))`,
/// the post norms only where the architecture has them (Gemma).
pub struct Block {
    /// Norm before the mixer.
    pub mixer_norm: RmsNorm,
    /// What mixes positions.
    pub mixer: Mixer,
    /// Norm of the mixer's output before the residual add.
    pub post_mixer_norm: Option<RmsNorm>,
    /// Norm before the feed-forward network.
    pub mlp_norm: RmsNorm,
    /// The feed-forward network.
    pub mlp: GatedMlp,
    /// Norm of the feed-forward output before the residual add.
    pub post_mlp_norm: Option<RmsNorm>,
}

impl Block {
    /// The block's linear layers, grouped by shared input (one group is one
    /// fused product and, when quantized with a rotation, shares `S_in`).
    pub fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        let mut groups = self.mixer.linear_groups();
        groups.extend(self.mlp.linear_groups());
        groups
    }

    /// The block's linear layers, grouped by shared input.
    pub fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        let mut groups = self.mixer.linear_groups_mut();
        groups.extend(self.mlp.linear_groups_mut());
        groups
    }

    /// The block's linear layers.
    pub fn linears(&self) -> Vec<&Linear> {
        self.linear_groups().into_iter().flatten().collect()
    }
}

/// The buffers one sequence's forward pass reuses, sized once when its
/// state is made so that decoding does not allocate: the residual stream
/// and the per-layer-type scratch (shared by all layers of a type).
pub(crate) struct Scratch {
    /// Most tokens per step.
    pub chunk: usize,
    /// The residual stream, `chunk × hidden`.
    pub x: Vec<f32>,
    /// The normalised input of the current sublayer.
    pub h: Vec<f32>,
    /// The current sublayer's output.
    pub mix: Vec<f32>,
    /// The last token's logits.
    pub logits: Vec<f32>,
    pub ropes: RopeTables,
    attention: attention::Scratch,
    deltanet: deltanet::Scratch,
    short_conv: short_conv::Scratch,
    mlp: mlp::Scratch,
}

impl Scratch {
    /// Buffers for `blocks` (of width `hidden`, output `vocab`, rotary
    /// tables `ropes`), each taken from `budget` before it is allocated.
    pub(crate) fn new(
        blocks: &[Block],
        ropes: &[Rope],
        (hidden, vocab): (usize, usize),
        shape: &StateShape,
        budget: &mut Budget,
    ) -> Result<Self> {
        // Each layer type's scratch fits the largest layer of that type.
        let (mut attention, mut deltanet, mut short_conv) = (Vec::new(), Vec::new(), Vec::new());
        for b in blocks {
            match &b.mixer {
                Mixer::Attention(a) => attention.push(a),
                Mixer::DeltaNet(d) => deltanet.push(d),
                Mixer::ShortConv(c) => short_conv.push(c),
            }
        }
        let mlps: Vec<&GatedMlp> = blocks.iter().map(|b| &b.mlp).collect();
        let chunk = shape.chunk;
        Ok(Scratch {
            chunk,
            x: budget.floats(chunk * hidden)?,
            h: budget.floats(chunk * hidden)?,
            mix: budget.floats(chunk * hidden)?,
            logits: budget.floats(vocab)?,
            ropes: RopeTables::new(ropes, chunk, budget)?,
            attention: attention::Scratch::new(&attention, shape, budget)?,
            deltanet: deltanet::Scratch::new(&deltanet, shape, budget)?,
            short_conv: short_conv::Scratch::new(&short_conv, shape, budget)?,
            mlp: mlp::Scratch::new(&mlps, shape, budget)?,
        })
    }
}

/// Where a chunk of new tokens sits in its sequence.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    /// Tokens in the chunk.
    pub n: usize,
    /// Position of the first.
    pub start: usize,
    /// Recurrent layers keep the state after each of this many last tokens.
    pub recurrent_tail: usize,
}

impl Block {
    /// Runs the block over the chunk's residual rows `s.x`.
    pub(crate) fn forward(
        &self,
        cx: &Compute<'_>,
        state: &mut MixerState,
        s: &mut Scratch,
        hidden: usize,
        span: Span,
    ) {
        let Span {
            n,
            start,
            recurrent_tail,
        } = span;
        let rows = n * hidden;
        let (x, h, mix) = (&mut s.x[..rows], &mut s.h[..rows], &mut s.mix[..rows]);
        self.mixer_norm.rows(x, h, hidden);
        match (&self.mixer, state) {
            (Mixer::Attention(a), MixerState::Attention(cache)) => {
                a.forward(cx, cache, &mut s.attention, &s.ropes, h, mix, n, start);
            }
            (Mixer::DeltaNet(d), MixerState::DeltaNet(st)) => {
                d.forward(cx, st, &mut s.deltanet, h, mix, n, start, recurrent_tail);
            }
            (Mixer::ShortConv(c), MixerState::ShortConv(history)) => {
                c.forward(cx, history, &mut s.short_conv, h, mix, n, start);
            }
            _ => unreachable!("states are made by the same blocks"),
        }
        if let Some(norm) = &self.post_mixer_norm {
            norm.rows_inplace(mix, hidden);
        }
        add_into(x, mix);

        self.mlp_norm.rows(x, h, hidden);
        self.mlp.forward(cx, &mut s.mlp, h, mix, n);
        if let Some(norm) = &self.post_mlp_norm {
            norm.rows_inplace(mix, hidden);
        }
        add_into(x, mix);
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
