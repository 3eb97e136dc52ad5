//! Causal self-attention with grouped key/value heads, rotary positions,
//! optional per-head q/k norms (Qwen3, Gemma 3), an optional sigmoid output
//! gate (Qwen3.5) and an optional sliding window (Gemma 3, LFM2-style).
//!
//! Per token: project q (and the gate), k and v in one fused product;
//! norm and rotate each query and key head; append k and v to the cache;
//! for each query head, scores against every visible cached key, softmax,
//! and the weighted sum of values; gate; output projection.
//!
//! State: the KV cache ([`KvCache`]), the whole context for full attention,
//! a ring of the window (plus a chunk or the rollback depth) for sliding
//! windows. Kernels: the products, [`hayate_kernels::ops::dot`] /
//! [`hayate_kernels::ops::axpy`] for scores and values, and the rotation
//! [`hayate_kernels::ops::rope_rotate_half`].

use super::mixer::{MixerLayer, Step};
use super::norm::RmsNorm;
use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use hayate_kernels::ops;
use hayate_kernels::pool::{DisjointMut, split_range};

/// Causal self-attention with grouped key/value heads and rotary positions.
pub struct Attention {
    /// Query projection, `n_heads * head_dim` outputs.
    pub q: Linear,
    /// Output gate projection, `n_heads * head_dim` outputs: the output is
    /// `o · sigmoid(gate)` (Qwen3.5, whose checkpoints interleave it with
    /// the queries; the translator separates them at load).
    pub gate: Option<Linear>,
    /// Key projection, `n_kv_heads * head_dim` outputs.
    pub k: Linear,
    /// Value projection, `n_kv_heads * head_dim` outputs.
    pub v: Linear,
    /// Output projection back to the hidden size.
    pub o: Linear,
    /// Per-head RMS norm of the queries before rotation (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head RMS norm of the keys before rotation (Qwen3).
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Which of the model's rotary tables this layer uses; it rotates the
    /// first `2 * half` dimensions of each head (partial rotary if fewer).
    pub rope: usize,
    /// Sliding window: each token sees itself and the `window - 1` before it.
    pub window: Option<usize>,
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
    /// Offset of `(head, position)` in `k` and `v`.
    #[inline]
    pub fn offset(&self, head: usize, position: usize) -> usize {
        (head * self.slots + position % self.slots) * self.head_dim
    }
}

/// A sequence's buffers for the widest attention layer of the model.
pub(crate) struct Scratch {
    q: Vec<f32>,
    gate: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The heads' outputs before the output projection.
    attn: Vec<f32>,
    /// One row of scores per kernel thread, as long as the context.
    scores: Vec<f32>,
}

impl MixerLayer for Attention {
    type State = KvCache;
    type Scratch = Scratch;

    /// An empty cache of the whole context, or of the window plus room for
    /// a whole chunk (its first token still needs the window before it) or
    /// for rolling back; a ring bounds how far the state can roll back.
    fn new_state(&self, shape: &StateShape, budget: &mut Budget) -> Result<(KvCache, bool)> {
        let (slots, ring) = match self.window {
            Some(w) if w - 1 + shape.chunk.max(shape.rollback) < shape.capacity => {
                (w - 1 + shape.chunk.max(shape.rollback), true)
            }
            _ => (shape.capacity, false),
        };
        // The geometry bounds each factor well below overflow.
        let n = self.n_kv_heads * slots * self.head_dim;
        let cache = KvCache {
            k: budget.floats(n)?,
            v: budget.floats(n)?,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            slots,
        };
        Ok((cache, ring))
    }

    fn new_scratch(layers: &[&Self], shape: &StateShape, budget: &mut Budget) -> Result<Scratch> {
        let (mut q_dim, mut gate_dim, mut kv_dim, mut any) = (0, 0, 0, false);
        for a in layers.iter().copied() {
            q_dim = q_dim.max(a.n_heads * a.head_dim);
            gate_dim = gate_dim.max(a.gate.as_ref().map_or(0, |g| g.rows));
            kv_dim = kv_dim.max(a.n_kv_heads * a.head_dim);
            any = true;
        }
        let chunk = shape.chunk;
        Ok(Scratch {
            q: budget.floats(chunk * q_dim)?,
            gate: budget.floats(chunk * gate_dim)?,
            k: budget.floats(chunk * kv_dim)?,
            v: budget.floats(chunk * kv_dim)?,
            attn: budget.floats(chunk * q_dim)?,
            scores: budget.floats(if any {
                shape.threads * shape.capacity
            } else {
                0
            })?,
        })
    }

    fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        let mut inputs = vec![&self.q];
        inputs.extend(&self.gate);
        inputs.extend([&self.k, &self.v]);
        vec![inputs, vec![&self.o]]
    }

    fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        let mut inputs = vec![&mut self.q];
        inputs.extend(&mut self.gate);
        inputs.extend([&mut self.k, &mut self.v]);
        vec![inputs, vec![&mut self.o]]
    }

    fn forward(
        &self,
        step: &Step<'_>,
        cache: &mut KvCache,
        s: &mut Scratch,
        x: &[f32],
        out: &mut [f32],
    ) {
        let (cx, ropes, n, start) = (&step.cx, step.ropes, step.n, step.start);
        let hd = self.head_dim;
        let (q_dim, kv_dim) = (self.n_heads * hd, self.n_kv_heads * hd);
        let (q, k, v) = (
            &mut s.q[..n * q_dim],
            &mut s.k[..n * kv_dim],
            &mut s.v[..n * kv_dim],
        );
        match &self.gate {
            Some(gate) => {
                let g = &mut s.gate[..n * q_dim];
                cx.project([(&self.q, q), (gate, g), (&self.k, k), (&self.v, v)], x, n);
            }
            None => cx.project([(&self.q, q), (&self.k, k), (&self.v, v)], x, n),
        }
        for t in 0..n {
            let (cos, sin) = ropes.at(self.rope, t);
            for head in s.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                if let Some(norm) = &self.q_norm {
                    ops::rms_norm_inplace(head, &norm.weight, norm.eps);
                }
                ops::rope_rotate_half(head, cos, sin);
            }
            for (kvh, head) in s.k[t * kv_dim..(t + 1) * kv_dim]
                .chunks_exact_mut(hd)
                .enumerate()
            {
                if let Some(norm) = &self.k_norm {
                    ops::rms_norm_inplace(head, &norm.weight, norm.eps);
                }
                ops::rope_rotate_half(head, cos, sin);
                let off = cache.offset(kvh, start + t);
                cache.k[off..off + hd].copy_from_slice(head);
                let v = &s.v[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                cache.v[off..off + hd].copy_from_slice(v);
            }
        }
        let attn = &mut s.attn[..n * q_dim];
        self.attend(cx, cache, &s.q[..n * q_dim], attn, &mut s.scores, n, start);
        if self.gate.is_some() {
            ops::mul_sigmoid(attn, &s.gate[..n * q_dim]);
        }
        cx.project([(&self.o, out)], attn, n);
    }
}

impl Attention {
    /// Scores, softmax and value mix for every (head, new token), heads split
    /// across threads. Token `t` sees positions up to its own, from the start
    /// of the sequence or of its sliding window.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        cx: &Compute<'_>,
        cache: &KvCache,
        q: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        n: usize,
        start: usize,
    ) {
        let isa = cx.isa;
        let hd = self.head_dim;
        let q_dim = self.n_heads * hd;
        let group = self.n_heads / self.n_kv_heads;
        let per_thread = scores.len() / cx.pool.n_threads();
        let out = DisjointMut::new(out);
        let scores = DisjointMut::new(scores);
        cx.pool.run(&|tid, n_threads| {
            // SAFETY: each thread owns `scores[tid * per_thread..][..per_thread]`
            // (the buffer holds `n_threads * per_thread`), and writes only the
            // output slices of its own heads.
            let scores = unsafe { scores.piece(tid * per_thread, per_thread) };
            for head in split_range(self.n_heads, n_threads, tid, 1) {
                let kvh = head / group;
                for t in 0..n {
                    let position = start + t;
                    let first = self.window.map_or(0, |w| (position + 1).saturating_sub(w));
                    let len = position + 1 - first;
                    let qh = &q[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
                    for (j, score) in scores[..len].iter_mut().enumerate() {
                        let off = cache.offset(kvh, first + j);
                        *score = ops::dot(isa, qh, &cache.k[off..off + hd]) * self.scale;
                    }
                    ops::softmax(&mut scores[..len]);
                    // SAFETY: see above.
                    let dst = unsafe { out.piece(t * q_dim + head * hd, hd) };
                    dst.fill(0.0);
                    for (j, &p) in scores[..len].iter().enumerate() {
                        let off = cache.offset(kvh, first + j);
                        ops::axpy(isa, p, &cache.v[off..off + hd], dst);
                    }
                }
            }
        });
    }
}
