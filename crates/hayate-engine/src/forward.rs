//! The forward pass over any list of generic blocks.

use crate::blocks::{Activation, Attention, Block, Linear, Mixer, RmsNorm};
use crate::linear::LinearKernel;
use crate::model::Model;
use crate::state::{InferenceState, KvCache, LayerState};
use crate::{EngineError, Result};
use hayate_kernels::pool::split_range;
use hayate_kernels::quant::{QuantJob, qmatmul_many};
use hayate_kernels::{Isa, MatmulJob, ThreadPool, matmul_many, ops};

/// Tokens processed per step of a long prefill; bounds the scratch memory.
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
}

/// Buffers the forward pass reuses, sized once per state.
pub struct Scratch {
    chunk: usize,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    mix: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(model: &Model, capacity: usize) -> Self {
        let p = &model.parts;
        let chunk = PREFILL_CHUNK.min(capacity);
        let (mut q_dim, mut kv_dim, mut inter) = (0, 0, 0);
        for b in &p.blocks {
            let Mixer::Attention(a) = &b.mixer;
            q_dim = q_dim.max(a.n_heads * a.head_dim);
            kv_dim = kv_dim.max(a.n_kv_heads * a.head_dim);
            inter = inter.max(b.mlp.gate.rows);
        }
        let half = p.rope.half();
        let buf = |n: usize| vec![0f32; n];
        Scratch {
            chunk,
            x: buf(chunk * p.hidden),
            h: buf(chunk * p.hidden),
            q: buf(chunk * q_dim),
            k: buf(chunk * kv_dim),
            v: buf(chunk * kv_dim),
            attn: buf(chunk * q_dim),
            mix: buf(chunk * p.hidden),
            gate: buf(chunk * inter),
            up: buf(chunk * inter),
            cos: buf(chunk * half),
            sin: buf(chunk * half),
            scores: buf(model.n_threads() * capacity),
            logits: buf(p.vocab),
        }
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
    /// [`Logits::Last`]); [`Logits::All`] writes every position's to its buffer.
    pub fn forward<'s>(
        &self,
        state: &'s mut InferenceState,
        tokens: &[u32],
        mut logits: Logits<'_>,
    ) -> Result<&'s [f32]> {
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
        if let Logits::All(out) = &mut logits {
            out.resize(tokens.len() * vocab, 0.0);
        }
        let chunk = state.scratch.chunk;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (c, piece) in tokens.chunks(chunk).enumerate() {
            self.forward_chunk(state, piece);
            let n = piece.len();
            let hidden = self.info.hidden;
            let s = &mut state.scratch;
            let head = &self.parts.lm_head;
            match &mut logits {
                Logits::None => {}
                Logits::Last if c + 1 == n_chunks => {
                    let last = &s.x[(n - 1) * hidden..n * hidden];
                    let norm = &self.parts.final_norm;
                    ops::rms_norm(last, &norm.weight, norm.eps, &mut s.h[..hidden]);
                    self.project([(head, &mut s.logits[..])], &s.h[..hidden], 1);
                }
                Logits::Last => {}
                Logits::All(out) => {
                    norm_rows(&self.parts.final_norm, &s.x, &mut s.h, n, hidden);
                    let dst = &mut out[c * chunk * vocab..(c * chunk + n) * vocab];
                    self.project([(head, dst)], &s.h[..n * hidden], n);
                }
            }
        }
        Ok(&state.scratch.logits)
    }

    /// Runs one chunk (at most `scratch.chunk` tokens); leaves the final
    /// hidden states in `scratch.x` and advances the state.
    fn forward_chunk(&self, state: &mut InferenceState, tokens: &[u32]) {
        let InferenceState {
            layers,
            len,
            scratch: s,
            ..
        } = state;
        let n = tokens.len();
        let start = *len;
        let hidden = self.info.hidden;
        let embedding = &self.parts.embedding;
        for (t, &token) in tokens.iter().enumerate() {
            embedding.row(
                self.isa,
                token as usize,
                &mut s.x[t * hidden..(t + 1) * hidden],
            );
        }
        let half = self.parts.rope.half();
        for t in 0..n {
            let r = t * half..(t + 1) * half;
            self.parts
                .rope
                .cos_sin(start + t, &mut s.cos[r.clone()], &mut s.sin[r]);
        }
        for (block, layer) in self.parts.blocks.iter().zip(layers.iter_mut()) {
            self.run_block(block, layer, s, n, start);
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
    ) {
        let hidden = self.info.hidden;
        norm_rows(&block.mixer_norm, &s.x, &mut s.h, n, hidden);
        match (&block.mixer, layer) {
            (Mixer::Attention(a), LayerState::Attention(cache)) => {
                self.attention(a, cache, s, n, start);
            }
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
        match mlp.activation {
            Activation::Silu => ops::silu_mul(&mut s.gate[..n * inter], &s.up[..n * inter]),
        }
        self.project(
            [(&mlp.down, &mut s.mix[..n * hidden])],
            &s.gate[..n * inter],
            n,
        );
        mlp.down.add_bias(&mut s.mix, n);
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
        let sign_in = jobs[0].0.sign_in();
        if jobs
            .iter()
            .all(|(l, _)| l.dense().is_none() && l.sign_in() == sign_in)
        {
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
            qmatmul_many(pool, isa, self.precision, &mut quant, sign_in, x, n);
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
        let (q_dim, kv_dim) = (a.n_heads * hd, a.n_kv_heads * hd);
        self.project(
            [
                (&a.q, &mut s.q[..n * q_dim]),
                (&a.k, &mut s.k[..n * kv_dim]),
                (&a.v, &mut s.v[..n * kv_dim]),
            ],
            &s.h[..n * self.info.hidden],
            n,
        );
        a.q.add_bias(&mut s.q, n);
        a.k.add_bias(&mut s.k, n);
        a.v.add_bias(&mut s.v, n);
        let half = self.parts.rope.half();
        for t in 0..n {
            let (cos, sin) = (
                &s.cos[t * half..(t + 1) * half],
                &s.sin[t * half..(t + 1) * half],
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
        self.project(
            [(&a.o, &mut s.mix[..n * self.info.hidden])],
            &s.attn[..n * q_dim],
            n,
        );
        a.o.add_bias(&mut s.mix, n);
    }
}

/// Scores, softmax and value mix for every (head, new token), heads split across threads.
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
    let capacity = cache.capacity;
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let scores_ptr = SyncPtr(scores.as_mut_ptr());
    pool.run(&|tid, n_threads| {
        // SAFETY: each thread owns `scores[tid * capacity..][..capacity]`
        // (the buffer holds `n_threads * capacity`), and writes only the
        // output slices of its own heads.
        let scores = unsafe {
            std::slice::from_raw_parts_mut(scores_ptr.get().add(tid * capacity), capacity)
        };
        for head in split_range(a.n_heads, n_threads, tid, 1) {
            let kvh = head / group;
            for t in 0..n {
                let len = start + t + 1;
                let qh = &q[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
                for (j, score) in scores[..len].iter_mut().enumerate() {
                    let off = cache.offset(kvh, j);
                    *score = ops::dot(isa, qh, &cache.k[off..off + hd]) * a.scale;
                }
                ops::softmax(&mut scores[..len]);
                // SAFETY: see above; the slice lies within `out` (n * q_dim values).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(t * q_dim + head * hd), hd)
                };
                dst.fill(0.0);
                for (j, &p) in scores[..len].iter().enumerate() {
                    let off = cache.offset(kvh, j);
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

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
