//! The forward pass over any list of generic blocks.

use crate::blocks::{
    Activation, Attention, Block, GatedDeltaNet, Linear, Mixer, RmsNorm, ShortConv,
};
use crate::linear::LinearKernel;
use crate::model::Model;
use crate::state::{Budget, ConvHistory, DeltaState, InferenceState, KvCache, LayerState};
use crate::{EngineError, Result};
use hayate_kernels::deltanet::{self, CHUNK, ChunkScratch};
use hayate_kernels::pool::split_range;
use hayate_kernels::quant::{QuantJob, qmatmul_many};
use hayate_kernels::{Isa, MatmulJob, ThreadPool, matmul_many, ops};
use std::sync::Mutex;

/// Tokens processed per step of a long prefill by default; bounds the
/// scratch memory.
pub const PREFILL_CHUNK: usize = 512;

/// Which next-token logits a forward call produces.
#[derive(Debug)]
pub enum Logits<'a> {
    /// None (e.g. prefilling a prompt whose continuation is already known).
    None,
    /// Only after the last token: `vocab` values, returned by the call.
    Last,
    /// After every token: written here, resized to `tokens x vocab` values.
    All(&'a mut Vec<f32>),
    /// After the tokens at these indices of the call (strictly increasing,
    /// each below the number of tokens): written here, one row of `vocab`
    /// values per index (speculative verification asks for k + 1 of them).
    At(&'a [usize], &'a mut Vec<f32>),
}

/// One sequence's part of a batched forward call ([`Model::forward_batch`]).
pub struct SequenceStep<'a> {
    /// The sequence's state; it advances by `tokens`.
    pub state: &'a mut InferenceState,
    /// The new tokens: many for a prefill or a verification, one to decode.
    pub tokens: &'a [u32],
    /// Which logits to produce. With [`Logits::Last`] they are read from
    /// the state afterwards ([`InferenceState::last_logits`]).
    pub logits: Logits<'a>,
}

/// cos and sin of one rotary table at each position of a chunk.
struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// One thread's buffers for the delta rule: a chunk of one head's inputs,
/// gathered contiguous.
struct DeltaWork {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Vec<f32>,
    out: Vec<f32>,
    delta: Vec<f32>,
    chunk: ChunkScratch,
}

/// Buffers the forward pass reuses, sized once per state.
pub struct Scratch {
    pub(crate) chunk: usize,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    attn_gate: Vec<f32>,
    mix: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    ropes: Vec<RopeTable>,
    scores: Vec<f32>,
    pub(crate) logits: Vec<f32>,
    /// Projected inputs of a recurrent mixer (DeltaNet q/k/v, conv B/C/x).
    mixer_in: Vec<f32>,
    /// DeltaNet's output gate `z`.
    mixer_gate: Vec<f32>,
    /// DeltaNet's `b`, then `β`.
    mixer_b: Vec<f32>,
    /// DeltaNet's `a`, then the log-decay `g`.
    mixer_a: Vec<f32>,
    /// A recurrent mixer's output before its output projection.
    mixer_out: Vec<f32>,
    /// Convolution input: history rows, then the chunk's rows.
    conv_in: Vec<f32>,
    delta_work: Vec<Mutex<DeltaWork>>,
}

impl Scratch {
    /// Buffers for chunks of up to `chunk` tokens in a context of
    /// `capacity`, each taken from `budget` before it is allocated. The
    /// geometry bounds every factor, so no product below overflows.
    pub(crate) fn new(
        model: &Model,
        capacity: usize,
        chunk: usize,
        budget: &mut Budget,
    ) -> Result<Self> {
        let p = &model.parts;
        let (mut q_rows, mut q_dim, mut kv_dim, mut inter) = (0, 0, 0, 0);
        let (mut mixer_in, mut mixer_gate, mut mixer_ba, mut mixer_out, mut conv_in) =
            (0, 0, 0, 0, 0);
        let (mut k_dim, mut v_dim) = (0, 0);
        for b in &p.blocks {
            match &b.mixer {
                Mixer::Attention(a) => {
                    q_rows = q_rows.max(a.q.rows);
                    q_dim = q_dim.max(a.n_heads * a.head_dim);
                    kv_dim = kv_dim.max(a.n_kv_heads * a.head_dim);
                }
                Mixer::DeltaNet(d) => {
                    let c = d.channels();
                    let vd = d.n_v_heads * d.v_dim;
                    mixer_in = mixer_in.max(c);
                    mixer_gate = mixer_gate.max(vd);
                    mixer_ba = mixer_ba.max(d.n_v_heads);
                    mixer_out = mixer_out.max(vd);
                    conv_in = conv_in.max((d.kernel - 1 + chunk) * c);
                    k_dim = k_dim.max(d.k_dim);
                    v_dim = v_dim.max(d.v_dim);
                }
                Mixer::ShortConv(c) => {
                    mixer_in = mixer_in.max(3 * c.channels);
                    mixer_out = mixer_out.max(c.channels);
                    conv_in = conv_in.max((c.kernel - 1 + chunk) * c.channels);
                }
            }
            inter = inter.max(b.mlp.gate.rows);
        }
        let mut buf = |n: usize| budget.floats(n);
        let delta_work = if k_dim > 0 {
            (0..model.n_threads())
                .map(|_| {
                    Ok(Mutex::new(DeltaWork {
                        q: buf(CHUNK * k_dim)?,
                        k: buf(CHUNK * k_dim)?,
                        v: buf(CHUNK * v_dim)?,
                        beta: buf(CHUNK)?,
                        g: buf(CHUNK)?,
                        out: buf(CHUNK * v_dim)?,
                        delta: buf(v_dim)?,
                        chunk: ChunkScratch::new(v_dim),
                    }))
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let ropes = p
            .ropes
            .iter()
            .map(|r| {
                Ok(RopeTable {
                    cos: buf(chunk * r.half())?,
                    sin: buf(chunk * r.half())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Scratch {
            chunk,
            x: buf(chunk * p.hidden)?,
            h: buf(chunk * p.hidden)?,
            q: buf(chunk * q_rows)?,
            k: buf(chunk * kv_dim)?,
            v: buf(chunk * kv_dim)?,
            attn: buf(chunk * q_dim)?,
            attn_gate: buf(chunk * q_dim)?,
            mix: buf(chunk * p.hidden)?,
            gate: buf(chunk * inter)?,
            up: buf(chunk * inter)?,
            ropes,
            scores: buf(model.n_threads() * capacity)?,
            logits: buf(p.vocab)?,
            mixer_in: buf(chunk * mixer_in)?,
            mixer_gate: buf(chunk * mixer_gate)?,
            mixer_b: buf(chunk * mixer_ba)?,
            mixer_a: buf(chunk * mixer_ba)?,
            mixer_out: buf(chunk * mixer_out)?,
            conv_in: buf(conv_in)?,
            delta_work,
        })
    }
}

struct SyncPtr(*mut f32);
// SAFETY: used only to let threads write disjoint parts of one buffer.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

impl Model {
    /// Runs `tokens` through the model after what `state` already holds.
    /// Returns the last token's logits (borrowed from `state`; meaningful for
    /// [`Logits::Last`]); [`Logits::All`] and [`Logits::At`] write theirs to
    /// their buffers.
    pub fn forward<'s>(
        &self,
        state: &'s mut InferenceState,
        tokens: &[u32],
        mut logits: Logits<'_>,
    ) -> Result<&'s [f32]> {
        self.check_step(state, tokens, &mut logits)?;
        self.run_step(state, tokens, &mut logits);
        Ok(&state.scratch.logits)
    }

    /// Runs a batch of sequences, each with its own state, new tokens and
    /// logits request: one sequence with many tokens is a prefill (or a
    /// speculative verification), many with one token each a batched decode.
    /// Every step is checked before any runs, so an error leaves all the
    /// states as they were. Each sequence's results equal those of
    /// [`forward`](Self::forward) on it alone.
    pub fn forward_batch(&self, batch: &mut [SequenceStep<'_>]) -> Result<()> {
        for (i, step) in batch.iter_mut().enumerate() {
            self.check_step(step.state, step.tokens, &mut step.logits)
                .map_err(|e| EngineError::State(format!("sequence {i} of the batch: {e}")))?;
        }
        // The fused path across sequences is still to come; each runs in turn.
        for step in batch.iter_mut() {
            self.run_step(step.state, step.tokens, &mut step.logits);
        }
        Ok(())
    }

    /// Whether `tokens` can run on `state` with this logits request; also
    /// reserves the request's buffer, so that one too large for this
    /// machine is an error here rather than an abort later.
    fn check_step(
        &self,
        state: &InferenceState,
        tokens: &[u32],
        logits: &mut Logits<'_>,
    ) -> Result<()> {
        if state.model_id != self.id {
            return Err(EngineError::State(
                "this state was made by another model; states cannot move between models".into(),
            ));
        }
        let vocab = self.info.vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { token: bad, vocab });
        }
        let needed = state.len + tokens.len();
        if needed > state.capacity {
            return Err(EngineError::ContextFull {
                needed,
                capacity: state.capacity,
            });
        }
        if let Logits::At(at, _) = logits
            && (at.windows(2).any(|w| w[0] >= w[1])
                || at.last().is_some_and(|&i| i >= tokens.len()))
        {
            return Err(EngineError::State(format!(
                "logits asked at {at:?}: the indices must increase and lie below the {} tokens",
                tokens.len()
            )));
        }
        let (rows, out) = match logits {
            Logits::All(out) => (tokens.len(), out),
            Logits::At(at, out) => (at.len(), out),
            Logits::None | Logits::Last => return Ok(()),
        };
        let values = rows.checked_mul(vocab);
        if values.is_none_or(|n| out.try_reserve_exact(n.saturating_sub(out.len())).is_err()) {
            return Err(EngineError::State(format!(
                "the logits of {rows} positions ({rows} x {vocab} values) do not fit in memory; ask for fewer at once"
            )));
        }
        Ok(())
    }

    /// Runs a checked step.
    fn run_step(&self, state: &mut InferenceState, tokens: &[u32], logits: &mut Logits<'_>) {
        let vocab = self.info.vocab;
        match logits {
            Logits::All(out) => out.resize(tokens.len() * vocab, 0.0),
            Logits::At(at, out) => out.resize(at.len() * vocab, 0.0),
            Logits::None | Logits::Last => {}
        }
        let chunk = state.scratch.chunk;
        let n_chunks = tokens.len().div_ceil(chunk);
        let softcap = self.parts.logit_softcap;
        for (c, piece) in tokens.chunks(chunk).enumerate() {
            self.forward_chunk(state, piece);
            let n = piece.len();
            let hidden = self.info.hidden;
            let s = &mut state.scratch;
            let head = &self.parts.lm_head;
            match logits {
                Logits::None => {}
                Logits::Last if c + 1 == n_chunks => {
                    let last = &s.x[(n - 1) * hidden..n * hidden];
                    let norm = &self.parts.final_norm;
                    ops::rms_norm(last, &norm.weight, norm.eps, &mut s.h[..hidden]);
                    self.project([(head, &mut s.logits[..])], &s.h[..hidden], 1);
                    soft_cap(&mut s.logits, softcap);
                }
                Logits::Last => {}
                Logits::All(out) => {
                    norm_rows(&self.parts.final_norm, &s.x, &mut s.h, n, hidden);
                    let dst = &mut out[c * chunk * vocab..(c * chunk + n) * vocab];
                    self.project([(head, &mut *dst)], &s.h[..n * hidden], n);
                    soft_cap(dst, softcap);
                }
                Logits::At(at, out) => {
                    // The requested rows of this chunk, gathered and normalised.
                    let first = at.partition_point(|&i| i < c * chunk);
                    let end = at.partition_point(|&i| i < c * chunk + n);
                    let m = end - first;
                    if m == 0 {
                        continue;
                    }
                    let norm = &self.parts.final_norm;
                    for (j, &i) in at[first..end].iter().enumerate() {
                        let row = i - c * chunk;
                        let x = &s.x[row * hidden..(row + 1) * hidden];
                        ops::rms_norm(
                            x,
                            &norm.weight,
                            norm.eps,
                            &mut s.h[j * hidden..(j + 1) * hidden],
                        );
                    }
                    let dst = &mut out[first * vocab..end * vocab];
                    self.project([(head, &mut *dst)], &s.h[..m * hidden], m);
                    soft_cap(dst, softcap);
                }
            }
        }
    }

    /// Runs one chunk (at most `scratch.chunk` tokens); leaves the final
    /// hidden states in `scratch.x` and advances the state.
    fn forward_chunk(&self, state: &mut InferenceState, tokens: &[u32]) {
        let InferenceState {
            layers,
            len,
            scratch: s,
            recurrent_tail,
            ..
        } = state;
        let n = tokens.len();
        let start = *len;
        let hidden = self.info.hidden;
        let embedding = &self.parts.embedding;
        for (t, &token) in tokens.iter().enumerate() {
            let row = &mut s.x[t * hidden..(t + 1) * hidden];
            embedding.row(self.isa, token as usize, row);
            if let Some(scale) = self.parts.embed_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        for (rope, table) in self.parts.ropes.iter().zip(&mut s.ropes) {
            let half = rope.half();
            for t in 0..n {
                let r = t * half..(t + 1) * half;
                rope.cos_sin(start + t, &mut table.cos[r.clone()], &mut table.sin[r]);
            }
        }
        for (block, layer) in self.parts.blocks.iter().zip(layers.iter_mut()) {
            self.run_block(block, layer, s, n, start, *recurrent_tail);
        }
        *len += n;
    }

    fn run_block(
        &self,
        block: &Block,
        layer: &mut LayerState,
        s: &mut Scratch,
        n: usize,
        start: usize,
        recurrent_tail: usize,
    ) {
        let hidden = self.info.hidden;
        norm_rows(&block.mixer_norm, &s.x, &mut s.h, n, hidden);
        match (&block.mixer, layer) {
            (Mixer::Attention(a), LayerState::Attention(cache)) => {
                self.attention(a, cache, s, n, start);
            }
            (Mixer::DeltaNet(d), LayerState::DeltaNet(state)) => {
                self.delta_net(d, state, s, n, start, recurrent_tail);
            }
            (Mixer::ShortConv(c), LayerState::ShortConv(history)) => {
                self.short_conv(c, history, s, n, start);
            }
            _ => unreachable!("states are built from the same blocks"),
        }
        if let Some(norm) = &block.post_mixer_norm {
            norm_rows_inplace(norm, &mut s.mix[..n * hidden], hidden);
        }
        add_into(&mut s.x[..n * hidden], &s.mix[..n * hidden]);

        norm_rows(&block.mlp_norm, &s.x, &mut s.h, n, hidden);
        let mlp = &block.mlp;
        let inter = mlp.gate.rows;
        self.project(
            [
                (&mlp.gate, &mut s.gate[..n * inter]),
                (&mlp.up, &mut s.up[..n * inter]),
            ],
            &s.h[..n * hidden],
            n,
        );
        mlp.gate.add_bias(&mut s.gate, n);
        mlp.up.add_bias(&mut s.up, n);
        let (gate, up) = (&mut s.gate[..n * inter], &s.up[..n * inter]);
        match mlp.activation {
            Activation::Silu => ops::silu_mul(gate, up),
            Activation::GeluTanh => ops::gelu_tanh_mul(gate, up),
        }
        self.project(
            [(&mlp.down, &mut s.mix[..n * hidden])],
            &s.gate[..n * inter],
            n,
        );
        mlp.down.add_bias(&mut s.mix, n);
        if let Some(norm) = &block.post_mlp_norm {
            norm_rows_inplace(norm, &mut s.mix[..n * hidden], hidden);
        }
        add_into(&mut s.x[..n * hidden], &s.mix[..n * hidden]);
    }

    /// `y_i = x · W_iᵀ` for layers that share the input `x` (`n` rows):
    /// one fused product when their weights allow it, else one each.
    fn project<const N: usize>(&self, jobs: [(&Linear, &mut [f32]); N], x: &[f32], n: usize) {
        let (pool, isa) = (&*self.pool, self.isa);
        if jobs.iter().all(|(l, _)| l.dense().is_some()) {
            let mut dense = jobs.map(|(l, y)| MatmulJob {
                w: l.dense().expect("checked above"),
                y,
            });
            matmul_many(pool, isa, &mut dense, x, n);
            return;
        }
        if jobs.iter().all(|(l, _)| l.dense().is_none()) {
            let signs_in = jobs.each_ref().map(|(l, _)| l.sign_in());
            let mut quant = jobs.map(|(l, y)| {
                let LinearKernel::Quant(w, rotation) = l.kernel() else {
                    unreachable!("checked above")
                };
                QuantJob {
                    w,
                    sign_out: rotation.map(|r| r.sign_out),
                    y,
                }
            });
            // One fused product per run of layers sharing `S_in` (a group
            // may mix rotated matrices with small unrotated ones).
            let mut first = 0;
            while first < N {
                let sign_in = signs_in[first];
                let end = (first..N).find(|&i| signs_in[i] != sign_in).unwrap_or(N);
                let run = &mut quant[first..end];
                qmatmul_many(pool, isa, self.precision, run, sign_in, x, n);
                first = end;
            }
            return;
        }
        for (l, y) in jobs {
            self.project([(l, y)], x, n);
        }
    }

    /// Causal attention of `n` new tokens at positions `start..start+n`;
    /// the projected output goes to `s.mix`.
    fn attention(
        &self,
        a: &Attention,
        cache: &mut KvCache,
        s: &mut Scratch,
        n: usize,
        start: usize,
    ) {
        let (pool, isa) = (&*self.pool, self.isa);
        let hd = a.head_dim;
        let (q_dim, kv_dim, q_rows) = (a.n_heads * hd, a.n_kv_heads * hd, a.q.rows);
        self.project(
            [
                (&a.q, &mut s.q[..n * q_rows]),
                (&a.k, &mut s.k[..n * kv_dim]),
                (&a.v, &mut s.v[..n * kv_dim]),
            ],
            &s.h[..n * self.info.hidden],
            n,
        );
        a.q.add_bias(&mut s.q, n);
        a.k.add_bias(&mut s.k, n);
        a.v.add_bias(&mut s.v, n);
        if a.output_gate {
            // Per head, the projection holds the query then the gate: move
            // the gates out, then pack the queries (each moves down, so
            // increasing order never overwrites one not yet moved).
            for t in 0..n {
                for h in 0..a.n_heads {
                    let src = t * q_rows + h * 2 * hd;
                    s.attn_gate[t * q_dim + h * hd..t * q_dim + (h + 1) * hd]
                        .copy_from_slice(&s.q[src + hd..src + 2 * hd]);
                }
            }
            for t in 0..n {
                for h in 0..a.n_heads {
                    let src = t * q_rows + h * 2 * hd;
                    s.q.copy_within(src..src + hd, t * q_dim + h * hd);
                }
            }
        }
        let table = &s.ropes[a.rope];
        let half = self.parts.ropes[a.rope].half();
        for t in 0..n {
            let (cos, sin) = (
                &table.cos[t * half..(t + 1) * half],
                &table.sin[t * half..(t + 1) * half],
            );
            for head in s.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                if let Some(norm) = &a.q_norm {
                    ops::rms_norm_inplace(head, &norm.weight, norm.eps);
                }
                ops::rope_rotate_half(head, cos, sin);
            }
            for (kvh, head) in s.k[t * kv_dim..(t + 1) * kv_dim]
                .chunks_exact_mut(hd)
                .enumerate()
            {
                if let Some(norm) = &a.k_norm {
                    ops::rms_norm_inplace(head, &norm.weight, norm.eps);
                }
                ops::rope_rotate_half(head, cos, sin);
                let off = cache.offset(kvh, start + t);
                cache.k[off..off + hd].copy_from_slice(head);
                let v = &s.v[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                cache.v[off..off + hd].copy_from_slice(v);
            }
        }
        attend(
            pool,
            isa,
            a,
            cache,
            &s.q,
            &mut s.attn,
            &mut s.scores,
            n,
            start,
        );
        if a.output_gate {
            ops::mul_sigmoid(&mut s.attn[..n * q_dim], &s.attn_gate[..n * q_dim]);
        }
        self.project(
            [(&a.o, &mut s.mix[..n * self.info.hidden])],
            &s.attn[..n * q_dim],
            n,
        );
        a.o.add_bias(&mut s.mix, n);
    }

    /// Gated DeltaNet over `n` new tokens at positions `start..start+n`;
    /// the projected output goes to `s.mix`. All but the last
    /// `recurrent_tail` tokens go through the chunked form; those last ones
    /// step through the recurrence so that the state after each is kept.
    fn delta_net(
        &self,
        d: &GatedDeltaNet,
        st: &mut DeltaState,
        s: &mut Scratch,
        n: usize,
        start: usize,
        recurrent_tail: usize,
    ) {
        let (pool, isa) = (&*self.pool, self.isa);
        let c = d.channels();
        let (nk, dk, nv, dv) = (d.n_k_heads, d.k_dim, d.n_v_heads, d.v_dim);
        let key_dim = nk * dk;
        let vd = nv * dv;
        self.project(
            [
                (&d.qkv, &mut s.mixer_in[..n * c]),
                (&d.z, &mut s.mixer_gate[..n * vd]),
                (&d.b, &mut s.mixer_b[..n * nv]),
                (&d.a, &mut s.mixer_a[..n * nv]),
            ],
            &s.h[..n * self.info.hidden],
            n,
        );
        d.qkv.add_bias(&mut s.mixer_in, n);
        d.z.add_bias(&mut s.mixer_gate, n);
        d.b.add_bias(&mut s.mixer_b, n);
        d.a.add_bias(&mut s.mixer_a, n);

        // Causal convolution over the fused projection, then SiLU.
        let window = &mut s.conv_in[..(d.kernel - 1 + n) * c];
        fill_history(&st.conv, d.kernel, start, window);
        window[(d.kernel - 1) * c..].copy_from_slice(&s.mixer_in[..n * c]);
        remember(&mut st.conv, start, &window[(d.kernel - 1) * c..]);
        let mixed = &mut s.mixer_in[..n * c];
        ops::causal_conv1d(window, &d.conv, None, c, mixed);
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
                s.mixer_b[i] = ops::sigmoid(s.mixer_b[i]);
                s.mixer_a[i] = d.neg_decay[h] * ops::softplus(s.mixer_a[i] + d.dt_bias[h]);
            }
        }

        let n_tail = n.min(recurrent_tail);
        let n_head = n - n_tail;
        let head_size = dk * dv;
        let group = nv / nk;
        let (mixed, beta, g) = (&s.mixer_in[..n * c], &s.mixer_b, &s.mixer_a);
        let works = &s.delta_work;
        let out_ptr = SyncPtr(s.mixer_out.as_mut_ptr());
        let states_ptr = SyncPtr(st.states.as_mut_ptr());
        let (slots, size) = (st.slots, st.size);
        let slot = |p: usize| p % slots;
        pool.run(&|tid, n_threads| {
            let mut guard = works[tid].lock().unwrap_or_else(|e| e.into_inner());
            let w = &mut *guard;
            for h in split_range(nv, n_threads, tid, 1) {
                let kh = h / group;
                let q_at = |t: usize| t * c + kh * dk;
                let k_at = |t: usize| t * c + key_dim + kh * dk;
                let v_at = |t: usize| t * c + 2 * key_dim + h * dv;
                // SAFETY: each thread touches only its own heads' state
                // matrices (`head_size` values at `slot * size + h * head_size`,
                // within `slots * size`) and its own heads' output slices.
                let state_of = |slot: usize| unsafe {
                    std::slice::from_raw_parts_mut(
                        states_ptr.get().add(slot * size + h * head_size),
                        head_size,
                    )
                };
                let out_of = |t: usize| unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(t * vd + h * dv), dv)
                };
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

        // Gated RMS norm per value head, then the output projection.
        for (o, z) in s.mixer_out[..n * vd]
            .chunks_exact_mut(dv)
            .zip(s.mixer_gate[..n * vd].chunks_exact(dv))
        {
            ops::rms_norm_inplace(o, &d.norm.weight, d.norm.eps);
            ops::mul_silu(o, z);
        }
        self.project(
            [(&d.out, &mut s.mix[..n * self.info.hidden])],
            &s.mixer_out[..n * vd],
            n,
        );
        d.out.add_bias(&mut s.mix, n);
    }

    /// Gated short convolution over `n` new tokens at positions
    /// `start..start+n`; the projected output goes to `s.mix`.
    fn short_conv(
        &self,
        sc: &ShortConv,
        history: &mut ConvHistory,
        s: &mut Scratch,
        n: usize,
        start: usize,
    ) {
        let ch = sc.channels;
        self.project(
            [(&sc.in_proj, &mut s.mixer_in[..n * 3 * ch])],
            &s.h[..n * self.info.hidden],
            n,
        );
        sc.in_proj.add_bias(&mut s.mixer_in, n);
        let window = &mut s.conv_in[..(sc.kernel - 1 + n) * ch];
        fill_history(history, sc.kernel, start, window);
        let bcx = &s.mixer_in[..n * 3 * ch];
        for (row, dst) in bcx
            .chunks_exact(3 * ch)
            .zip(window[(sc.kernel - 1) * ch..].chunks_exact_mut(ch))
        {
            dst.copy_from_slice(&row[..ch]);
            ops::mul(dst, &row[2 * ch..]);
        }
        remember(history, start, &window[(sc.kernel - 1) * ch..]);
        let y = &mut s.mixer_out[..n * ch];
        ops::causal_conv1d(window, &sc.conv, sc.conv_bias.as_deref(), ch, y);
        for (row, yr) in bcx.chunks_exact(3 * ch).zip(y.chunks_exact_mut(ch)) {
            ops::mul(yr, &row[ch..2 * ch]);
        }
        self.project(
            [(&sc.out, &mut s.mix[..n * self.info.hidden])],
            &s.mixer_out[..n * ch],
            n,
        );
        sc.out.add_bias(&mut s.mix, n);
    }
}

/// Writes the convolution inputs of the `kernel - 1` positions before
/// `start` (zeros before the sequence) into the first rows of `window`.
fn fill_history(history: &ConvHistory, kernel: usize, start: usize, window: &mut [f32]) {
    let c = history.channels;
    for (i, dst) in window[..(kernel - 1) * c].chunks_exact_mut(c).enumerate() {
        match (start + i).checked_sub(kernel - 1) {
            Some(p) => dst.copy_from_slice(history.row(p)),
            None => dst.fill(0.0),
        }
    }
}

/// Keeps the inputs of positions `start..` (`rows` holds one per position),
/// as many of the last as the history has room for.
fn remember(history: &mut ConvHistory, start: usize, rows: &[f32]) {
    let c = history.channels;
    let n = rows.len() / c;
    for t in n - n.min(history.rows)..n {
        history
            .row_mut(start + t)
            .copy_from_slice(&rows[t * c..(t + 1) * c]);
    }
}

/// `x = cap · tanh(x / cap)` when the model caps its logits.
fn soft_cap(x: &mut [f32], cap: Option<f32>) {
    if let Some(cap) = cap {
        for v in x {
            *v = (*v / cap).tanh() * cap;
        }
    }
}

/// Scores, softmax and value mix for every (head, new token), heads split
/// across threads. Token `t` sees positions up to its own, from the start of
/// the sequence or of its sliding window.
#[allow(clippy::too_many_arguments)]
fn attend(
    pool: &ThreadPool,
    isa: Isa,
    a: &Attention,
    cache: &KvCache,
    q: &[f32],
    out: &mut [f32],
    scores: &mut [f32],
    n: usize,
    start: usize,
) {
    let hd = a.head_dim;
    let q_dim = a.n_heads * hd;
    let group = a.n_heads / a.n_kv_heads;
    let per_thread = scores.len() / pool.n_threads();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let scores_ptr = SyncPtr(scores.as_mut_ptr());
    pool.run(&|tid, n_threads| {
        // SAFETY: each thread owns `scores[tid * per_thread..][..per_thread]`
        // (the buffer holds `n_threads * per_thread`), and writes only the
        // output slices of its own heads.
        let scores = unsafe {
            std::slice::from_raw_parts_mut(scores_ptr.get().add(tid * per_thread), per_thread)
        };
        for head in split_range(a.n_heads, n_threads, tid, 1) {
            let kvh = head / group;
            for t in 0..n {
                let position = start + t;
                let first = a.window.map_or(0, |w| (position + 1).saturating_sub(w));
                let len = position + 1 - first;
                let qh = &q[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
                for (j, score) in scores[..len].iter_mut().enumerate() {
                    let off = cache.offset(kvh, first + j);
                    *score = ops::dot(isa, qh, &cache.k[off..off + hd]) * a.scale;
                }
                ops::softmax(&mut scores[..len]);
                // SAFETY: see above; the slice lies within `out` (n * q_dim values).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(t * q_dim + head * hd), hd)
                };
                dst.fill(0.0);
                for (j, &p) in scores[..len].iter().enumerate() {
                    let off = cache.offset(kvh, first + j);
                    ops::axpy(isa, p, &cache.v[off..off + hd], dst);
                }
            }
        }
    });
}

/// Normalises the first `n` rows (each `hidden` long) of `x` into `h`.
fn norm_rows(norm: &RmsNorm, x: &[f32], h: &mut [f32], n: usize, hidden: usize) {
    for (xr, hr) in x[..n * hidden]
        .chunks_exact(hidden)
        .zip(h.chunks_exact_mut(hidden))
    {
        ops::rms_norm(xr, &norm.weight, norm.eps, hr);
    }
}

/// Normalises every `dim`-long row of `x` in place.
fn norm_rows_inplace(norm: &RmsNorm, x: &mut [f32], dim: usize) {
    for row in x.chunks_exact_mut(dim) {
        ops::rms_norm_inplace(row, &norm.weight, norm.eps);
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
