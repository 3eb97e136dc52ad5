//! Per-sequence state: one entry per layer, whatever the layer keeps.
//!
//! - Full attention keeps a KV cache that grows by one entry per token.
//! - Sliding-window attention keeps a ring of the last positions only.
//! - Convolutions keep a ring of their last inputs.
//! - Gated DeltaNet layers keep a ring of fixed-size states, one per recent
//!   position.
//!
//! All of them can roll back the last `rollback` tokens exactly (speculative
//! decoding rejects drafted tokens; chat re-renders the last turn): the rings
//! keep that many positions beyond what the next token needs, so rolling
//! back only moves the end marker.

use crate::budget::{Budget, StateShape};
use crate::layers::{Block, KvCache, MixerSnapshot, MixerState, Scratch};
use crate::rope::{Rope, RopeTables};
use crate::{EngineError, Result};

/// Everything a sequence carries between forward calls, plus the scratch
/// buffers the forward pass reuses so that decoding does not allocate.
pub struct InferenceState {
    /// The model this state belongs to ([`crate::Model::forward`] checks it).
    pub(crate) model_id: u64,
    pub(crate) layers: Vec<MixerState>,
    pub(crate) len: usize,
    /// What the buffers were sized for: context, step length, rollback depth.
    pub(crate) shape: StateShape,
    /// Whether some layer keeps only the last positions (a ring), so that
    /// rolling back is limited to `shape.rollback` tokens.
    pub(crate) bounded: bool,
    pub(crate) scratch: Scratch,
    /// The rotary tables of the current step's positions.
    pub(crate) ropes: RopeTables,
    /// Bytes of its buffers but the attention pages.
    bytes: usize,
}

/// What a sequence's state holds after its first `len` tokens, for the
/// layers that cannot roll back that far (recurrent states, convolutions,
/// sliding windows): resumed later with [`InferenceState::restore`] once
/// the sequence went on past where it can roll back. Full attention
/// caches need nothing: they keep every position.
pub struct Snapshot {
    model_id: u64,
    len: usize,
    layers: Vec<MixerSnapshot>,
    bytes: usize,
}

impl Snapshot {
    /// The tokens the state held when it was taken.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it was taken before any token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes it takes (roughly: the buffers it copied).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl InferenceState {
    /// State for `blocks` (rotary tables `ropes`, width `hidden`, output
    /// `vocab`) of model `model_id`, sized by `shape`, every buffer taken
    /// from `budget` before it is allocated.
    pub(crate) fn new(
        model_id: u64,
        (blocks, ropes): (&[Block], &[Rope]),
        sizes: (usize, usize),
        shape: &StateShape,
        budget: &mut Budget,
    ) -> Result<Self> {
        let scratch = Scratch::new(blocks, sizes, shape, budget)?;
        let ropes = RopeTables::new(ropes, shape.chunk, budget)?;
        let mut bounded = false;
        let layers = blocks
            .iter()
            .map(|b| {
                let (state, ring) = b.mixer.new_state(shape, budget)?;
                bounded |= ring;
                Ok(state)
            })
            .collect::<Result<_>>()?;
        Ok(InferenceState {
            model_id,
            layers,
            len: 0,
            shape: *shape,
            bounded,
            scratch,
            ropes,
            bytes: budget.used(),
        })
    }

    /// Bytes its buffers take when full (caches, recurrent states, scratch).
    pub fn bytes(&self) -> usize {
        self.bytes + self.kv_bytes_at(self.capacity())
    }

    /// Bytes of the attention pages it takes from its pool when it holds
    /// `len` tokens.
    pub fn kv_bytes_at(&self, len: usize) -> usize {
        self.attention_caches().map(|c| c.bytes_at(len)).sum()
    }

    /// Bytes of the attention pages it holds now.
    pub fn kv_bytes_held(&self) -> usize {
        self.attention_caches().map(KvCache::bytes_held).sum()
    }

    fn attention_caches(&self) -> impl Iterator<Item = &KvCache> {
        self.layers.iter().filter_map(|l| match l {
            MixerState::Attention(c) => Some(c),
            _ => None,
        })
    }

    fn attention_caches_mut(&mut self) -> impl Iterator<Item = &mut KvCache> {
        self.layers.iter_mut().filter_map(|l| match l {
            MixerState::Attention(c) => Some(c),
            _ => None,
        })
    }

    /// Makes room for tokens `len..end` in every attention cache: pages
    /// from the pool, copies of shared ones.
    pub(crate) fn prepare(&mut self, end: usize) -> Result<()> {
        let from = self.len;
        self.attention_caches_mut()
            .try_for_each(|cache| cache.prepare(from, end))
    }

    /// Gives the attention pages past its tokens back to the pool, for
    /// other states to take. (Rolling back and clearing keep them: taking
    /// a page again would allocate in the decode loop.)
    pub fn release_unused(&mut self) {
        let len = self.len;
        self.attention_caches_mut()
            .for_each(|cache| cache.release_from(len));
    }

    /// Whether [`share_prefix`](Self::share_prefix) works for this model:
    /// every layer is full attention (a recurrent state or a ring is not
    /// a prefix of pages).
    pub fn can_share(&self) -> bool {
        !self.bounded
            && self
                .layers
                .iter()
                .all(|l| matches!(l, MixerState::Attention(_)))
    }

    /// Becomes `other` after its first `len` tokens, sharing its attention
    /// pages (copied only when written): a prefix another sequence already
    /// computed costs no prefill and no memory. Both must be states of
    /// the same model and shape that [`can_share`](Self::can_share).
    pub fn share_prefix(&mut self, other: &InferenceState, len: usize) -> Result<()> {
        let same = other.model_id == self.model_id
            && other.shape.capacity == self.shape.capacity
            && other.shape.page == self.shape.page
            && other.shape.kv == self.shape.kv;
        if !same || !self.can_share() {
            return Err(EngineError::State(
                "only states of the same model and shape, all of full attention, share pages"
                    .into(),
            ));
        }
        if len > other.len {
            return Err(EngineError::State(format!(
                "cannot share {len} tokens of a state that holds {}",
                other.len
            )));
        }
        for (mine, theirs) in self.attention_caches_mut().zip(other.attention_caches()) {
            mine.share_prefix(theirs, len);
        }
        self.len = len;
        Ok(())
    }

    /// Tokens processed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next-token logits after the last call that asked for
    /// [`Logits::Last`](crate::Logits::Last) (zeros before any).
    pub fn last_logits(&self) -> &[f32] {
        &self.scratch.logits
    }

    /// Most tokens this state can hold.
    pub fn capacity(&self) -> usize {
        self.shape.capacity
    }

    /// Most tokens [`truncate`](Self::truncate) can take back at once;
    /// `None` when only growing caches are involved (no limit).
    pub fn max_rollback(&self) -> Option<usize> {
        self.bounded.then_some(self.shape.rollback)
    }

    /// Most tokens one [`Model::forward_tree`](crate::Model::forward_tree)
    /// pass takes on this state (its root included): what it can roll back
    /// plus one, within one step and [`crate::MAX_TREE_NODES`].
    pub fn max_tree_tokens(&self) -> usize {
        crate::MAX_TREE_NODES
            .min(self.shape.rollback + 1)
            .min(self.shape.chunk)
    }

    /// How many of `prompt`'s first tokens this state, holding `held`
    /// (its tokens), already has, at most all but the last (which must be
    /// fed for the logits after it): what a new prompt can keep, by
    /// [`truncate`](Self::truncate) where [`can_truncate`](Self::can_truncate) allows.
    pub fn shared_prefix(&self, held: &[u32], prompt: &[u32]) -> usize {
        let common = held[..self.len.min(held.len())]
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// Whether [`truncate`](Self::truncate)`(len)` would succeed.
    pub fn can_truncate(&self, len: usize) -> bool {
        len <= self.len && self.max_rollback().is_none_or(|r| self.len - len <= r)
    }

    /// Forgets everything after the first `len` tokens, so they can be
    /// re-fed (or replaced); the state is then exactly what it was after
    /// `len` tokens. Layers with bounded state keep only the last
    /// [`max_rollback`](Self::max_rollback) positions, so rolling back
    /// further is an error ([`clear`](Self::clear) always works).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(EngineError::State(format!(
                "cannot roll back to {len} tokens: only {} were processed",
                self.len
            )));
        }
        if let Some(r) = self.max_rollback()
            && self.len - len > r
        {
            return Err(EngineError::State(format!(
                "cannot roll back {} tokens: this model's recurrent and sliding-window layers keep {r}",
                self.len - len
            )));
        }
        // Nothing to undo: every ring still holds the positions up to
        // `len`, and entries past it are overwritten before they are read.
        self.len = len;
        Ok(())
    }

    /// After [`Model::forward_tree`](crate::Model::forward_tree) over
    /// `nodes` tokens, keeps the branch `path` (indices into the tree:
    /// 0, then each a child of the one before): the state is then exactly
    /// what feeding the prefix and the branch's tokens one at a time gives.
    /// A chain (`path[j] == j`) works for every model, like
    /// [`truncate`](Self::truncate).
    pub fn keep_branch(&mut self, nodes: usize, path: &[usize]) -> Result<()> {
        let increasing = path.first() == Some(&0) && path.windows(2).all(|w| w[0] < w[1]);
        if nodes > self.len || path.len() > nodes || !increasing || path.iter().any(|&i| i >= nodes)
        {
            return Err(EngineError::State(format!(
                "branch {path:?} of a {nodes}-token tree (the state holds {} tokens)",
                self.len
            )));
        }
        let chain = path.iter().enumerate().all(|(j, &i)| i == j);
        if !chain {
            if !self
                .layers
                .iter()
                .all(|l| matches!(l, MixerState::Attention(_)))
            {
                return Err(EngineError::State(
                    "this model's recurrent layers cannot branch".into(),
                ));
            }
            for layer in &mut self.layers {
                if let MixerState::Attention(cache) = layer {
                    cache.keep_branch(self.len, nodes, path);
                }
            }
        }
        self.truncate(self.len - nodes + path.len())
    }

    /// Keeps what resuming after the first [`len`](Self::len) tokens needs
    /// (`blocks`: those of the model that made the state).
    pub(crate) fn snapshot(&self, blocks: &[Block]) -> Snapshot {
        let layers: Vec<MixerSnapshot> = blocks
            .iter()
            .zip(&self.layers)
            .map(|(b, l)| b.mixer.snapshot(l, self.len))
            .collect();
        // Each layer's share of the state, for those a snapshot copies.
        let bytes = layers.iter().map(MixerSnapshot::bytes).sum();
        Snapshot {
            model_id: self.model_id,
            len: self.len,
            layers,
            bytes,
        }
    }

    /// Resumes after the snapshot's tokens: the state is then exactly what
    /// it was when `snapshot` was taken. The state must hold at least those
    /// tokens, the same ones (the caller knows its tokens; full attention
    /// caches are not copied, so theirs must not have been overwritten
    /// since: the sequence may only have gone on past them).
    pub(crate) fn restore(&mut self, blocks: &[Block], snapshot: &Snapshot) -> Result<()> {
        if snapshot.model_id != self.model_id || snapshot.len > self.len {
            return Err(EngineError::State(format!(
                "a snapshot after {} tokens cannot resume this state of {} tokens",
                snapshot.len, self.len
            )));
        }
        for ((b, l), k) in blocks.iter().zip(&mut self.layers).zip(&snapshot.layers) {
            b.mixer.restore(l, k, snapshot.len);
        }
        self.len = snapshot.len;
        Ok(())
    }

    /// Forgets all tokens (the attention pages stay, for the next ones;
    /// [`release_unused`](Self::release_unused) gives them back).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(MixerState::clear);
        self.len = 0;
    }
}
