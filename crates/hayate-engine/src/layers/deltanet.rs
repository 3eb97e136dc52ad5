//! Gated DeltaNet linear attention (Qwen3.5).
//!
//! Per token: the fused projection `qkv` goes through a causal depthwise
//! convolution and SiLU; queries and keys are L2-normalised (queries also
//! scaled by `1/sqrt(k_dim)`); each value head then applies the gated delta
//! rule to its `k_dim × v_dim` state `S`:
//! `S ← g·S + β·k ⊗ (v − g·Sᵀk)`, output `Sᵀq`, with write strength
//! `β = sigmoid(b)` and decay `g = exp(−exp(A_log)·softplus(a + dt_bias))`.
//! The outputs get a gated RMS norm (`norm(o) ⊙ silu(z)`) and the output
//! projection.
//!
//! State: the convolution's history ([`ConvHistory`]) and one state
//! matrix per value head after each of the last `rollback + 1` positions,
//! so rolling back is moving the end marker. Long inputs run the chunked
//! form ([`hayate_kernels::deltanet::delta_chunk`]); the last `rollback`
//! tokens of a call step through the recurrence
//! ([`hayate_kernels::deltanet::delta_step`]) so that each one's state is kept.

use super::bytes;
use super::mixer::{MixerLayer, Step};
use super::norm::RmsNorm;
use super::short_conv::ConvHistory;
use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use hayate_kernels::deltanet::{self, CHUNK, ChunkScratch};
use hayate_kernels::ops;
use hayate_kernels::pool::{DisjointMut, split_range};
use std::sync::Mutex;

/// Gated DeltaNet linear attention (Qwen3.5): a causal depthwise
/// convolution over the fused q/k/v projection, then the gated delta rule
/// per value head, a gated RMS norm and the output projection.
pub struct GatedDeltaNet {
    /// Fused projection: queries and keys (`n_k_heads * k_dim` each), then
    /// values (`n_v_heads * v_dim`).
    pub qkv: Linear,
    /// Output gate, `n_v_heads * v_dim`.
    pub z: Linear,
    /// Write strength before the sigmoid, one per value head.
    pub b: Linear,
    /// Decay input, one per value head.
    pub a: Linear,
    /// Output projection back to the hidden size.
    pub out: Linear,
    /// Convolution taps, `[kernel][channels]`.
    pub conv: Vec<f32>,
    /// Convolution length.
    pub kernel: usize,
    /// Added to `a` before the softplus.
    pub dt_bias: Vec<f32>,
    /// `-exp(A_log)`: the decay rate per value head.
    pub neg_decay: Vec<f32>,
    /// Gated RMS norm over each value head's output.
    pub norm: RmsNorm,
    /// Key heads (divides `n_v_heads`; consecutive value heads share one).
    pub n_k_heads: usize,
    /// Dimensions per key head.
    pub k_dim: usize,
    /// Value heads.
    pub n_v_heads: usize,
    /// Dimensions per value head.
    pub v_dim: usize,
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

/// One thread's buffers for the delta rule: a chunk of one head's inputs,
/// gathered contiguous.
struct Work {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Vec<f32>,
    out: Vec<f32>,
    delta: Vec<f32>,
    chunk: ChunkScratch,
}

/// A sequence's buffers for the widest DeltaNet layer of the model.
pub(crate) struct Scratch {
    /// The fused projection, then its convolved and normalised q/k/v.
    qkv: Vec<f32>,
    /// The output gate `z`.
    z: Vec<f32>,
    /// `b`, then `β`.
    b: Vec<f32>,
    /// `a`, then the log-decay `g`.
    a: Vec<f32>,
    /// The heads' outputs before the output projection.
    out: Vec<f32>,
    /// Convolution input: history rows, then the chunk's rows.
    window: Vec<f32>,
    /// One per kernel thread.
    work: Vec<Mutex<Work>>,
}

impl GatedDeltaNet {
    /// Channels of the fused projection (and of the convolution).
    pub fn channels(&self) -> usize {
        2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim
    }
}

/// What a snapshot keeps of a DeltaNet layer: its convolution's history
/// and the state matrices after the snapshot's last token.
pub struct DeltaSnapshot {
    conv: Vec<f32>,
    state: Vec<f32>,
}

impl MixerLayer for GatedDeltaNet {
    type State = DeltaState;
    type Scratch = Scratch;
    type Snapshot = DeltaSnapshot;

    fn snapshot(&self, st: &DeltaState, len: usize) -> Option<DeltaSnapshot> {
        let at = len % st.slots * st.size;
        Some(DeltaSnapshot {
            conv: st.conv.data.clone(),
            state: st.states[at..at + st.size].to_vec(),
        })
    }

    /// The convolution's history and the state matrices after `len` tokens.
    fn save(&self, st: &DeltaState, len: usize, out: &mut Vec<u8>) {
        bytes::put(&st.conv.data, out);
        let at = len % st.slots * st.size;
        bytes::put(&st.states[at..at + st.size], out);
    }

    fn load(&self, st: &mut DeltaState, len: usize, input: &mut &[u8]) -> Option<()> {
        bytes::take(&mut st.conv.data, input)?;
        let at = len % st.slots * st.size;
        bytes::take(&mut st.states[at..at + st.size], input)
    }

    fn snapshot_bytes(snapshot: &DeltaSnapshot) -> usize {
        4 * (snapshot.conv.len() + snapshot.state.len())
    }

    fn restore(&self, st: &mut DeltaState, snapshot: &DeltaSnapshot, len: usize) {
        st.conv.data.copy_from_slice(&snapshot.conv);
        let at = len % st.slots * st.size;
        st.states[at..at + st.size].copy_from_slice(&snapshot.state);
    }

    /// Empty history, zero recurrent state, room for the states after each
    /// of the last `rollback` positions (so rollback is bounded).
    fn new_state(&self, shape: &StateShape, budget: &mut Budget) -> Result<(DeltaState, bool)> {
        let slots = shape.rollback + 1;
        let size = self.n_v_heads * self.k_dim * self.v_dim;
        let state = DeltaState {
            conv: ConvHistory::new(self.kernel, self.channels(), shape, budget)?,
            states: budget.floats(slots * size)?,
            slots,
            size,
        };
        Ok((state, true))
    }

    /// Position 0 reads the zero initial state.
    fn clear(state: &mut DeltaState) {
        state.states[..state.size].fill(0.0);
    }

    fn new_scratch(layers: &[&Self], shape: &StateShape, budget: &mut Budget) -> Result<Scratch> {
        let (mut channels, mut value, mut heads, mut window, mut k_dim, mut v_dim) =
            (0, 0, 0, 0, 0, 0);
        for d in layers.iter().copied() {
            channels = channels.max(d.channels());
            value = value.max(d.n_v_heads * d.v_dim);
            heads = heads.max(d.n_v_heads);
            window = window.max((d.kernel - 1 + shape.chunk) * d.channels());
            k_dim = k_dim.max(d.k_dim);
            v_dim = v_dim.max(d.v_dim);
        }
        let chunk = shape.chunk;
        let work = if k_dim > 0 {
            (0..shape.threads)
                .map(|_| {
                    Ok(Mutex::new(Work {
                        q: budget.floats(CHUNK * k_dim)?,
                        k: budget.floats(CHUNK * k_dim)?,
                        v: budget.floats(CHUNK * v_dim)?,
                        beta: budget.floats(CHUNK)?,
                        g: budget.floats(CHUNK)?,
                        out: budget.floats(CHUNK * v_dim)?,
                        delta: budget.floats(v_dim)?,
                        chunk: ChunkScratch::new(k_dim, v_dim),
                    }))
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Scratch {
            qkv: budget.floats(chunk * channels)?,
            z: budget.floats(chunk * value)?,
            b: budget.floats(chunk * heads)?,
            a: budget.floats(chunk * heads)?,
            out: budget.floats(chunk * value)?,
            window: budget.floats(window)?,
            work,
        })
    }

    fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        vec![vec![&self.qkv, &self.z, &self.b, &self.a], vec![&self.out]]
    }

    fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        vec![
            vec![&mut self.qkv, &mut self.z, &mut self.b, &mut self.a],
            vec![&mut self.out],
        ]
    }

    fn project_in(&self, cx: &Compute<'_>, s: &mut Scratch, x: &[f32], rows: usize) {
        let (c, vd, nv) = (self.channels(), self.n_v_heads * self.v_dim, self.n_v_heads);
        cx.project(
            [
                (&self.qkv, &mut s.qkv[..rows * c]),
                (&self.z, &mut s.z[..rows * vd]),
                (&self.b, &mut s.b[..rows * nv]),
                (&self.a, &mut s.a[..rows * nv]),
            ],
            x,
            rows,
        );
    }

    /// All but the last `recurrent_tail` tokens go through the chunked
    /// form; those last ones step through the recurrence so that the state
    /// after each is kept.
    fn mix(&self, step: &Step<'_>, st: &mut DeltaState, s: &mut Scratch) {
        let (cx, n, start, recurrent_tail) = (&step.cx, step.n, step.start, step.recurrent_tail);
        let offset = step.offset;
        let c = self.channels();
        let (nk, dk, nv, dv) = (self.n_k_heads, self.k_dim, self.n_v_heads, self.v_dim);
        let key_dim = nk * dk;
        let vd = nv * dv;
        let qkv = &mut s.qkv[offset * c..(offset + n) * c];
        let (b_rows, a_rows) = (
            &mut s.b[offset * nv..(offset + n) * nv],
            &mut s.a[offset * nv..(offset + n) * nv],
        );

        // Causal convolution over the fused projection, then SiLU.
        let window = &mut s.window[..(self.kernel - 1 + n) * c];
        st.conv.fill_window(self.kernel, start, window);
        window[(self.kernel - 1) * c..].copy_from_slice(qkv);
        st.conv.remember(start, &window[(self.kernel - 1) * c..]);
        let mixed = qkv;
        ops::causal_conv1d(window, &self.conv, None, c, mixed);
        ops::silu(mixed);

        // Unit-norm queries and keys (queries also scaled), β and the log-decay g.
        let q_scale = 1.0 / (dk as f32).sqrt();
        for row in mixed.chunks_exact_mut(c) {
            for head in row[..2 * key_dim].chunks_exact_mut(dk) {
                ops::l2_normalize(head, 1e-6);
            }
            row[..key_dim].iter_mut().for_each(|x| *x *= q_scale);
        }
        for t in 0..n {
            for h in 0..nv {
                let i = t * nv + h;
                b_rows[i] = ops::sigmoid(b_rows[i]);
                a_rows[i] = self.neg_decay[h] * ops::softplus(a_rows[i] + self.dt_bias[h]);
            }
        }

        let n_tail = n.min(recurrent_tail);
        let n_head = n - n_tail;
        let head_size = dk * dv;
        let group = nv / nk;
        let (mixed, beta, g) = (&*mixed, &*b_rows, &*a_rows);
        let works = &s.work;
        let outputs = DisjointMut::new(&mut s.out[offset * vd..(offset + n) * vd]);
        let states = DisjointMut::new(&mut st.states);
        let (slots, size) = (st.slots, st.size);
        let slot = |p: usize| p % slots;
        let isa = cx.isa;
        cx.pool.run(&|tid, n_threads| {
            let mut guard = works[tid].lock().unwrap_or_else(|e| e.into_inner());
            let w = &mut *guard;
            for h in split_range(nv, n_threads, tid, 1) {
                let kh = h / group;
                let q_at = |t: usize| t * c + kh * dk;
                let k_at = |t: usize| t * c + key_dim + kh * dk;
                let v_at = |t: usize| t * c + 2 * key_dim + h * dv;
                // SAFETY: each thread touches only its own heads' state
                // matrices (`head_size` values at `slot * size + h * head_size`)
                // and its own heads' output slices, one piece at a time
                // (a step's `prev` and `next` are different slots).
                let state_of =
                    |slot: usize| unsafe { states.piece(slot * size + h * head_size, head_size) };
                let out_of = |t: usize| unsafe { outputs.piece(t * vd + h * dv, dv) };
                if n_head > 0 {
                    let (src, dst) = (slot(start), slot(start + n_head));
                    let state = state_of(dst);
                    if src != dst {
                        state.copy_from_slice(state_of(src));
                    }
                    for first in (0..n_head).step_by(CHUNK) {
                        let m = CHUNK.min(n_head - first);
                        for i in 0..m {
                            let t = first + i;
                            w.q[i * dk..(i + 1) * dk]
                                .copy_from_slice(&mixed[q_at(t)..q_at(t) + dk]);
                            w.k[i * dk..(i + 1) * dk]
                                .copy_from_slice(&mixed[k_at(t)..k_at(t) + dk]);
                            w.v[i * dv..(i + 1) * dv]
                                .copy_from_slice(&mixed[v_at(t)..v_at(t) + dv]);
                            w.beta[i] = beta[t * nv + h];
                            w.g[i] = g[t * nv + h];
                        }
                        deltanet::delta_chunk(
                            isa,
                            state,
                            &w.q[..m * dk],
                            &w.k[..m * dk],
                            &w.v[..m * dv],
                            &w.beta[..m],
                            &w.g[..m],
                            &mut w.out[..m * dv],
                            &mut w.chunk,
                        );
                        for i in 0..m {
                            out_of(first + i).copy_from_slice(&w.out[i * dv..(i + 1) * dv]);
                        }
                    }
                }
                for t in n_head..n {
                    let (prev, next) = (slot(start + t), slot(start + t + 1));
                    deltanet::delta_step(
                        isa,
                        state_of(prev),
                        state_of(next),
                        &mixed[q_at(t)..q_at(t) + dk],
                        &mixed[k_at(t)..k_at(t) + dk],
                        &mixed[v_at(t)..v_at(t) + dv],
                        beta[t * nv + h],
                        g[t * nv + h],
                        out_of(t),
                        &mut w.delta[..dv],
                    );
                }
            }
        });
    }

    /// Gated RMS norm per value head, then the output projection.
    fn project_out(&self, cx: &Compute<'_>, s: &mut Scratch, rows: usize, out: &mut [f32]) {
        let (dv, vd) = (self.v_dim, self.n_v_heads * self.v_dim);
        let heads_out = &mut s.out[..rows * vd];
        for (o, z) in heads_out
            .chunks_exact_mut(dv)
            .zip(s.z[..rows * vd].chunks_exact(dv))
        {
            ops::rms_norm_inplace(o, &self.norm.weight, self.norm.eps);
            ops::mul_silu(o, z);
        }
        cx.project([(&self.out, out)], heads_out, rows);
    }
}
