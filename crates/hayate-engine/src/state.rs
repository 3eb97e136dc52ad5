//! Per-sequence state: one entry per layer, whatever the layer keeps.
//!
//! Attention layers keep a KV cache that grows by one entry per token;
//! recurrent layers (Gated DeltaNet, short convolutions) will keep a
//! fixed-size state instead. All support rolling back to an earlier length,
//! which speculative decoding and chat-prefix reuse need.

use crate::blocks::{Block, Mixer};
use crate::{EngineError, Result};

/// Keys and values of one attention layer, laid out `[kv_head][position][dim]`
/// so that each head's history is contiguous for the score and mix loops.
pub struct KvCache {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Positions the buffers hold.
    pub capacity: usize,
}

impl KvCache {
    fn new(n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        // Zeroed allocations come from fresh pages, so memory is only
        // committed as positions are written.
        let n = n_kv_heads * capacity * head_dim;
        KvCache {
            k: vec![0.0; n],
            v: vec![0.0; n],
            n_kv_heads,
            head_dim,
            capacity,
        }
    }

    /// Offset of `(head, position)` in `k` and `v`.
    #[inline]
    pub fn offset(&self, head: usize, position: usize) -> usize {
        (head * self.capacity + position) * self.head_dim
    }
}

/// The state one layer carries between calls.
pub enum LayerState {
    /// An attention layer's cache.
    Attention(KvCache),
}

/// Everything a sequence carries between forward calls, plus the scratch
/// buffers the forward pass reuses so that decoding does not allocate.
pub struct InferenceState {
    pub(crate) layers: Vec<LayerState>,
    pub(crate) len: usize,
    pub(crate) capacity: usize,
    pub(crate) scratch: crate::forward::Scratch,
}

impl InferenceState {
    pub(crate) fn new(blocks: &[Block], capacity: usize, scratch: crate::forward::Scratch) -> Self {
        let layers = blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => {
                    LayerState::Attention(KvCache::new(a.n_kv_heads, a.head_dim, capacity))
                }
            })
            .collect();
        InferenceState {
            layers,
            len: 0,
            capacity,
            scratch,
        }
    }

    /// Tokens processed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens this state can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything after the first `len` tokens, so they can be
    /// re-fed (or replaced). For attention this only moves the end marker.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(EngineError::State(format!(
                "cannot roll back to {len} tokens: only {} were processed",
                self.len
            )));
        }
        // Attention caches need no work: entries past `len` are overwritten
        // before they are read again.
        self.len = len;
        Ok(())
    }

    /// Forgets all tokens.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}
