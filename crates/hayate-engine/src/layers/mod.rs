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
//! [`Block`]s. Each mixer module implements one interface
//! (`mixer::MixerLayer`: state, scratch, linear layers, forward), and the
//! `mixers!` list below registers it: a new mixer is a new module plus one
//! line there.

pub mod attention;
pub mod deltanet;
pub mod kv_pool;
mod mixer;
pub mod mlp;
pub mod norm;
pub mod short_conv;

pub use attention::{Attention, KvCache, KvData, KvFormat};
pub use deltanet::{DeltaState, GatedDeltaNet};
pub use kv_pool::{KV_PAGE, KvPool};
pub use mlp::{Activation, GatedMlp};
pub use norm::RmsNorm;
pub use short_conv::{ConvHistory, ShortConv};

pub(crate) use mixer::{Step, Tree};

/// Little-endian bytes of plain values, for states saved to disk.
pub(crate) mod bytes {
    /// A value with a fixed little-endian encoding.
    pub(crate) trait Plain: Copy + Default {
        const SIZE: usize;
        fn put(self, out: &mut Vec<u8>);
        fn get(bytes: &[u8]) -> Self;
    }

    macro_rules! plain {
        ($($t:ty),+) => {$(
            impl Plain for $t {
                const SIZE: usize = size_of::<$t>();
                fn put(self, out: &mut Vec<u8>) {
                    out.extend_from_slice(&self.to_le_bytes());
                }
                fn get(bytes: &[u8]) -> Self {
                    <$t>::from_le_bytes(bytes.try_into().expect("sized by the caller"))
                }
            }
        )+};
    }
    plain!(f32, i8, u16, u32, u64);

    impl Plain for half::bf16 {
        const SIZE: usize = 2;
        fn put(self, out: &mut Vec<u8>) {
            self.to_bits().put(out);
        }
        fn get(bytes: &[u8]) -> Self {
            half::bf16::from_bits(u16::get(bytes))
        }
    }

    /// Appends `values`.
    pub(crate) fn put<T: Plain>(values: &[T], out: &mut Vec<u8>) {
        out.reserve(values.len() * T::SIZE);
        for &v in values {
            v.put(out);
        }
    }

    /// Fills `values` from the front of `input`, advancing it; `None` when
    /// it is too short.
    pub(crate) fn take<T: Plain>(values: &mut [T], input: &mut &[u8]) -> Option<()> {
        let n = values.len().checked_mul(T::SIZE)?;
        if input.len() < n {
            return None;
        }
        let (head, rest) = input.split_at(n);
        for (v, b) in values.iter_mut().zip(head.chunks_exact(T::SIZE)) {
            *v = T::get(b);
        }
        *input = rest;
        Some(())
    }
}

use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use mixer::MixerLayer;

/// Declares the mixers: the [`Mixer`] and `MixerState` enums, the
/// per-type scratch, and their dispatch to each module's [`MixerLayer`].
macro_rules! mixers {
    ($($variant:ident($layer:ty, $scratch:ident): $doc:literal;)+) => {
        /// What mixes information across positions.
        pub enum Mixer {
            $(#[doc = $doc] $variant($layer),)+
        }

        /// The state one layer carries between calls, made by its mixer.
        pub(crate) enum MixerState {
            $($variant(<$layer as MixerLayer>::State),)+
        }

        /// What a snapshot keeps of one layer's state.
        pub(crate) enum MixerSnapshot {
            $($variant(Option<<$layer as MixerLayer>::Snapshot>),)+
        }

        /// Each mixer type's scratch, sized for its largest layer.
        struct MixerScratch {
            $($scratch: <$layer as MixerLayer>::Scratch,)+
        }

        impl MixerState {
            /// Back to an empty sequence.
            pub(crate) fn clear(&mut self) {
                match self {
                    $(MixerState::$variant(s) => <$layer as MixerLayer>::clear(s),)+
                }
            }
        }

        impl MixerSnapshot {
            /// Bytes the snapshot copied.
            pub(crate) fn bytes(&self) -> usize {
                match self {
                    $(MixerSnapshot::$variant(k) => k.as_ref().map_or(0, <$layer as MixerLayer>::snapshot_bytes),)+
                }
            }
        }

        impl MixerScratch {
            fn new(blocks: &[Block], shape: &StateShape, budget: &mut Budget) -> Result<Self> {
                Ok(MixerScratch {
                    $($scratch: {
                        let layers: Vec<&$layer> = blocks
                            .iter()
                            .filter_map(|b| match &b.mixer {
                                Mixer::$variant(m) => Some(m),
                                _ => None,
                            })
                            .collect();
                        <$layer as MixerLayer>::new_scratch(&layers, shape, budget)?
                    },)+
                })
            }
        }

        impl Mixer {
            /// A fresh state for this layer, and whether it holds a bounded
            /// window of positions (which limits rollback).
            pub(crate) fn new_state(
                &self,
                shape: &StateShape,
                budget: &mut Budget,
            ) -> Result<(MixerState, bool)> {
                Ok(match self {
                    $(Mixer::$variant(m) => {
                        let (state, bounded) = m.new_state(shape, budget)?;
                        (MixerState::$variant(state), bounded)
                    })+
                })
            }

            /// What `state` (holding `len` tokens) keeps in a snapshot.
            pub(crate) fn snapshot(&self, state: &MixerState, len: usize) -> MixerSnapshot {
                match (self, state) {
                    $((Mixer::$variant(m), MixerState::$variant(s)) => {
                        MixerSnapshot::$variant(m.snapshot(s, len))
                    })+
                    _ => unreachable!("states are made by the same blocks"),
                }
            }

            /// Puts a snapshot taken at `len` tokens back into `state`.
            pub(crate) fn restore(&self, state: &mut MixerState, snapshot: &MixerSnapshot, len: usize) {
                match (self, state, snapshot) {
                    $((Mixer::$variant(m), MixerState::$variant(s), MixerSnapshot::$variant(k)) => {
                        if let Some(k) = k {
                            m.restore(s, k, len);
                        }
                    })+
                    _ => unreachable!("snapshots are made by the same blocks"),
                }
            }

            /// Appends what `state` holds of its first `len` tokens to `out`.
            pub(crate) fn save(&self, state: &MixerState, len: usize, out: &mut Vec<u8>) {
                match (self, state) {
                    $((Mixer::$variant(m), MixerState::$variant(s)) => m.save(s, len, out),)+
                    _ => unreachable!("states are made by the same blocks"),
                }
            }

            /// Reads what [`save`](Self::save) wrote; `None` when `input` ends too soon.
            pub(crate) fn load(&self, state: &mut MixerState, len: usize, input: &mut &[u8]) -> Option<()> {
                match (self, state) {
                    $((Mixer::$variant(m), MixerState::$variant(s)) => m.load(s, len, input),)+
                    _ => unreachable!("states are made by the same blocks"),
                }
            }

            fn linear_groups(&self) -> Vec<Vec<&Linear>> {
                match self {
                    $(Mixer::$variant(m) => m.linear_groups(),)+
                }
            }

            fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
                match self {
                    $(Mixer::$variant(m) => m.linear_groups_mut(),)+
                }
            }

            fn project_in(&self, cx: &Compute<'_>, scratch: &mut MixerScratch, x: &[f32], rows: usize) {
                match self {
                    $(Mixer::$variant(m) => m.project_in(cx, &mut scratch.$scratch, x, rows),)+
                }
            }

            fn mix(&self, step: &Step<'_>, state: &mut MixerState, scratch: &mut MixerScratch) {
                match (self, state) {
                    $((Mixer::$variant(m), MixerState::$variant(s)) => {
                        m.mix(step, s, &mut scratch.$scratch)
                    })+
                    _ => unreachable!("states are made by the same blocks"),
                }
            }

            fn project_out(
                &self,
                cx: &Compute<'_>,
                scratch: &mut MixerScratch,
                rows: usize,
                out: &mut [f32],
            ) {
                match self {
                    $(Mixer::$variant(m) => m.project_out(cx, &mut scratch.$scratch, rows, out),)+
                }
            }
        }
    };
}

mixers! {
    Attention(Attention, attention): "Causal attention over a KV cache (full or sliding-window).";
    DeltaNet(GatedDeltaNet, deltanet): "Gated DeltaNet linear attention with a fixed-size state.";
    ShortConv(ShortConv, short_conv): "Gated short convolution with a few positions of state.";
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

    /// Runs the block over the step's residual rows `s.x`.
    pub(crate) fn forward(
        &self,
        step: &Step<'_>,
        state: &mut MixerState,
        s: &mut Scratch,
        hidden: usize,
    ) {
        self.forward_mixer(step, state, s, hidden);
        self.forward_mlp(&step.cx, s, step.n, hidden);
    }

    /// The mixer half of [`Self::forward`]: `x += post(mixer(norm(x)))`.
    pub(crate) fn forward_mixer(
        &self,
        step: &Step<'_>,
        state: &mut MixerState,
        s: &mut Scratch,
        hidden: usize,
    ) {
        self.mixer_in(&step.cx, s, step.n, hidden);
        self.mixer.mix(step, state, &mut s.mixers);
        self.mixer_out(&step.cx, s, step.n, hidden);
    }

    /// The first part of the mixer half over all `rows` rows of a step:
    /// the norm and the mixer's input projections. Each sequence's
    /// [`mixer_mix`](Self::mixer_mix) follows, then [`mixer_out`](Self::mixer_out).
    pub(crate) fn mixer_in(&self, cx: &Compute<'_>, s: &mut Scratch, rows: usize, hidden: usize) {
        let n = rows * hidden;
        let (x, h) = (&s.x[..n], &mut s.h[..n]);
        self.mixer_norm.rows(x, h, hidden);
        self.mixer.project_in(cx, &mut s.mixers, h, rows);
    }

    /// One sequence's part of the mixer (its rows, its state).
    pub(crate) fn mixer_mix(&self, step: &Step<'_>, state: &mut MixerState, s: &mut Scratch) {
        self.mixer.mix(step, state, &mut s.mixers);
    }

    /// The last part of the mixer half over all `rows` rows: output
    /// projection, post norm, residual.
    pub(crate) fn mixer_out(&self, cx: &Compute<'_>, s: &mut Scratch, rows: usize, hidden: usize) {
        let n = rows * hidden;
        let (x, mix) = (&mut s.x[..n], &mut s.mix[..n]);
        self.mixer.project_out(cx, &mut s.mixers, rows, mix);
        if let Some(norm) = &self.post_mixer_norm {
            norm.rows_inplace(mix, hidden);
        }
        add_into(x, mix);
    }

    /// The feed-forward half of [`Self::forward`]: `x += post(mlp(norm(x)))`.
    pub(crate) fn forward_mlp(
        &self,
        cx: &Compute<'_>,
        s: &mut Scratch,
        rows: usize,
        hidden: usize,
    ) {
        let n = rows * hidden;
        let (x, h, mix) = (&mut s.x[..n], &mut s.h[..n], &mut s.mix[..n]);
        self.mlp_norm.rows(x, h, hidden);
        self.mlp.forward(cx, &mut s.mlp, h, mix, rows);
        if let Some(norm) = &self.post_mlp_norm {
            norm.rows_inplace(mix, hidden);
        }
        add_into(x, mix);
    }

    /// How many of [`Self::linear_groups`] belong to the mixer (the rest
    /// are the feed-forward network's).
    pub(crate) fn mixer_groups(&self) -> usize {
        self.mixer.linear_groups().len()
    }
}

/// The buffers one sequence's forward pass reuses, sized once when its
/// state is made so that decoding does not allocate: the residual stream
/// and the per-layer-type scratch (shared by all layers of a type).
pub(crate) struct Scratch {
    /// The residual stream, `chunk × hidden`.
    pub x: Vec<f32>,
    /// The normalised input of the current sublayer.
    pub h: Vec<f32>,
    /// The current sublayer's output.
    pub mix: Vec<f32>,
    /// The last token's logits.
    pub logits: Vec<f32>,
    mixers: MixerScratch,
    mlp: mlp::Scratch,
}

impl Scratch {
    /// Buffers for `blocks` (of width `hidden`, output `vocab`), each taken
    /// from `budget` before it is allocated.
    pub(crate) fn new(
        blocks: &[Block],
        (hidden, vocab): (usize, usize),
        shape: &StateShape,
        budget: &mut Budget,
    ) -> Result<Self> {
        let mlps: Vec<&GatedMlp> = blocks.iter().map(|b| &b.mlp).collect();
        let chunk = shape.chunk;
        Ok(Scratch {
            x: budget.floats(chunk * hidden)?,
            h: budget.floats(chunk * hidden)?,
            mix: budget.floats(chunk * hidden)?,
            logits: budget.floats(vocab)?,
            mixers: MixerScratch::new(blocks, shape, budget)?,
            mlp: mlp::Scratch::new(&mlps, shape, budget)?,
        })
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
