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

use crate::blocks::{Block, Mixer};
use crate::{EngineError, Result};

/// The memory a new state may take, checked buffer by buffer before each is
/// allocated: asking for a context the machine cannot hold is an error
/// naming the sizes, not an allocation failure that aborts the process.
pub(crate) struct Budget {
    context: usize,
    left: usize,
    total: usize,
}

impl Budget {
    /// A budget of this machine's physical memory, for a context of `context` tokens.
    pub(crate) fn for_context(context: usize) -> Self {
        let total = physical_memory().unwrap_or(isize::MAX as usize);
        Budget {
            context,
            left: total,
            total,
        }
    }

    /// A zeroed buffer of `n` floats, if the budget allows it. Zeroed
    /// allocations come from fresh pages, so memory is only committed as
    /// the buffer is written.
    pub(crate) fn floats(&mut self, n: usize) -> Result<Vec<f32>> {
        let bytes = n.checked_mul(size_of::<f32>());
        match bytes {
            Some(b) if b <= self.left => {
                self.left -= b;
                Ok(vec![0.0; n])
            }
            _ => Err(EngineError::State(format!(
                "a state for {} tokens of context needs more memory than this machine has ({:.1} GiB); lower --ctx-size",
                self.context,
                self.total as f64 / f64::from(1u32 << 30)
            ))),
        }
    }
}

/// Total physical memory in bytes (Linux: `MemTotal`), read once.
fn physical_memory() -> Option<usize> {
    static TOTAL: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(read_mem_total)
}

fn read_mem_total() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Keys and values of one attention layer, laid out `[kv_head][slot][dim]`
/// so that each head's history is contiguous for the score and mix loops.
/// Position `p` lives in slot `p % slots`: with a sliding window the buffer
/// holds only the window (plus room for a chunk and for rollback) and wraps.
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
    pub slots: usize,
}

impl KvCache {
    fn new(n_kv_heads: usize, head_dim: usize, slots: usize, budget: &mut Budget) -> Result<Self> {
        // The geometry bounds each factor well below overflow.
        let n = n_kv_heads * slots * head_dim;
        Ok(KvCache {
            k: budget.floats(n)?,
            v: budget.floats(n)?,
            n_kv_heads,
            head_dim,
            slots,
        })
    }

    /// Offset of `(head, position)` in `k` and `v`.
    #[inline]
    pub fn offset(&self, head: usize, position: usize) -> usize {
        (head * self.slots + position % self.slots) * self.head_dim
    }
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
    fn new(kernel: usize, channels: usize, rollback: usize, budget: &mut Budget) -> Result<Self> {
        let rows = (kernel - 1 + rollback).max(1);
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
}

/// A Gated DeltaNet layer's state: its convolution's history and the
/// `k_dim × v_dim` matrix of every value head after each recent position
/// (the state after `p` tokens in slot `p % slots`).
pub struct DeltaState {
    /// The convolution's last inputs.
    pub conv: ConvHistory,
    /// `slots × heads × k_dim × v_dim` values.
    pub states: Vec<f32>,
    /// Positions whose state is kept.
    pub slots: usize,
    /// Values of one position's state (all heads).
    pub size: usize,
}

/// The state one layer carries between calls.
pub enum LayerState {
    /// An attention layer's cache.
    Attention(KvCache),
    /// A Gated DeltaNet layer's convolution history and recurrent states.
    DeltaNet(DeltaState),
    /// A short convolution's history.
    ShortConv(ConvHistory),
}

/// Everything a sequence carries between forward calls, plus the scratch
/// buffers the forward pass reuses so that decoding does not allocate.
pub struct InferenceState {
    /// The model this state belongs to ([`crate::Model::forward`] checks it).
    pub(crate) model_id: u64,
    pub(crate) layers: Vec<LayerState>,
    pub(crate) len: usize,
    pub(crate) capacity: usize,
    /// How many tokens can be rolled back; `None` when nothing limits it.
    pub(crate) rollback: Option<usize>,
    /// Tokens the last recurrent steps of a call keep states for.
    pub(crate) recurrent_tail: usize,
    pub(crate) scratch: crate::forward::Scratch,
}

impl InferenceState {
    /// State for `blocks` of model `model_id`, holding up to `capacity`
    /// tokens; bounded layers keep enough to roll back `rollback` tokens (at
    /// least 1, at most `capacity`).
    pub(crate) fn new(
        model_id: u64,
        blocks: &[Block],
        capacity: usize,
        rollback: usize,
        scratch: crate::forward::Scratch,
        budget: &mut Budget,
    ) -> Result<Self> {
        let rollback = rollback.clamp(1, capacity);
        // The most tokens one step of the forward pass processes.
        let chunk = scratch.chunk;
        let mut bounded = false;
        let layers = blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => {
                    let slots = match a.window {
                        // The window, plus room for a whole chunk (its
                        // first token still needs the window before it) or
                        // for rolling back.
                        Some(w) if w - 1 + chunk.max(rollback) < capacity => {
                            bounded = true;
                            w - 1 + chunk.max(rollback)
                        }
                        _ => capacity,
                    };
                    let cache = KvCache::new(a.n_kv_heads, a.head_dim, slots, budget)?;
                    Ok(LayerState::Attention(cache))
                }
                Mixer::DeltaNet(d) => {
                    bounded = true;
                    let slots = rollback + 1;
                    let size = d.n_v_heads * d.k_dim * d.v_dim;
                    Ok(LayerState::DeltaNet(DeltaState {
                        conv: ConvHistory::new(d.kernel, d.channels(), rollback, budget)?,
                        states: budget.floats(slots * size)?,
                        slots,
                        size,
                    }))
                }
                Mixer::ShortConv(c) => {
                    bounded = true;
                    let history = ConvHistory::new(c.kernel, c.channels, rollback, budget)?;
                    Ok(LayerState::ShortConv(history))
                }
            })
            .collect::<Result<_>>()?;
        Ok(InferenceState {
            model_id,
            layers,
            len: 0,
            capacity,
            rollback: bounded.then_some(rollback),
            recurrent_tail: rollback,
            scratch,
        })
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
        self.capacity
    }

    /// Most tokens [`truncate`](Self::truncate) can take back at once;
    /// `None` when only growing caches are involved (no limit).
    pub fn max_rollback(&self) -> Option<usize> {
        self.rollback
    }

    /// Whether [`truncate`](Self::truncate)`(len)` would succeed.
    pub fn can_truncate(&self, len: usize) -> bool {
        len <= self.len && self.rollback.is_none_or(|r| self.len - len <= r)
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
        if let Some(r) = self.rollback
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

    /// Forgets all tokens.
    pub fn clear(&mut self) {
        // Position 0 reads the (zero) initial recurrent state.
        for layer in &mut self.layers {
            if let LayerState::DeltaNet(d) = layer {
                d.states[..d.size].fill(0.0);
            }
        }
        self.len = 0;
    }
}
