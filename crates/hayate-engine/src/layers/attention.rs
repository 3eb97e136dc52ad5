//! Causal self-attention with grouped key/value heads, rotary positions,
//! optional per-head q/k norms (Qwen3, Gemma 3), an optional sigmoid output
//! gate (Qwen3.5) and an optional sliding window (Gemma 3, LFM2-style).
//!
//! Per token: project q (and the gate), k and v in one fused product;
//! norm and rotate each query and key head; append k and v to the cache;
//! then, per KV head, the query rows of its group (every head of the group,
//! several tokens) attend together over the visible cached positions;
//! gate; output projection.
//!
//! State: the KV cache ([`KvCache`]), the whole context for full attention,
//! a ring of the window (plus a chunk or the rollback depth) for sliding
//! windows. Kernels: the products, [`hayate_kernels::attention::attend`]
//! (scores, softmax and values in one pass; the key layout it reads), and
//! the rotation [`hayate_kernels::ops::rope_rotate_half`].

use super::bytes;
use super::mixer::{MixerLayer, Step, Tree};
use super::norm::RmsNorm;
use crate::Result;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use half::bf16;
use half::vec::HalfBitsVecExt;
use hayate_kernels::Isa;
use hayate_kernels::attention::{
    self as kernel, KEY_TILE, KvElement, KvHead, KvHeadMut, MAX_ROWS, QueryRow, Scales,
};
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

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// f32: exactly what the projections computed (for logits comparisons).
    #[default]
    F32,
    /// bf16: half the memory and half the bytes attention reads per token.
    Bf16,
    /// int8 codes with an f32 scale per position and head for the keys and
    /// another for the values: about a quarter of f32's bytes.
    Q8,
}

impl KvFormat {
    /// `f32`, `bf16` or `q8`.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::Bf16 => "bf16",
            KvFormat::Q8 => "q8",
        }
    }
}

/// The keys and values of a cache, in its format.
#[derive(Clone)]
pub enum KvData {
    /// f32 keys and values.
    F32 {
        /// Keys.
        k: Vec<f32>,
        /// Values.
        v: Vec<f32>,
    },
    /// bf16 keys and values.
    Bf16 {
        /// Keys.
        k: Vec<bf16>,
        /// Values.
        v: Vec<bf16>,
    },
    /// int8 keys and values with their scales.
    Q8 {
        /// Key codes.
        k: Vec<i8>,
        /// Value codes.
        v: Vec<i8>,
        /// Per head and slot, the keys' scales (`[kv_head][slot]`).
        k_scales: Vec<f32>,
        /// Per head and slot, the values' scales.
        v_scales: Vec<f32>,
    },
}

/// Keys and values of one attention layer, each head's history contiguous:
/// keys `[kv_head][tile of 16 positions][dim][16]`, values
/// `[kv_head][slot][dim]` (the layout [`hayate_kernels::attention`] reads),
/// and for int8 caches the scales `[kv_head][slot]`.
/// Position `p` lives in slot `p % slots`: with a sliding window the buffer
/// holds only the window (plus room for a chunk and for rollback) and wraps.
pub struct KvCache {
    /// Keys and values.
    pub data: KvData,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Positions the buffers hold (a multiple of 16).
    pub slots: usize,
    /// Whether it holds a sliding window's last positions only (a ring),
    /// not every position of the context.
    pub ring: bool,
}

/// The element type of one [`KvData`] variant: typed access to a cache's
/// buffers (keys, values, and the scales of int8 caches, empty otherwise).
/// A cache's keys, values, key scales and value scales.
type Parts<'a, E> = (&'a [E], &'a [E], &'a [f32], &'a [f32]);
/// [`Parts`], to write.
type PartsMut<'a, E> = (&'a mut [E], &'a mut [E], &'a mut [f32], &'a mut [f32]);

trait Element: KvElement {
    fn parts(data: &KvData) -> Option<Parts<'_, Self>>;
    fn parts_mut(data: &mut KvData) -> Option<PartsMut<'_, Self>>;
}

macro_rules! plain_element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            fn parts(data: &KvData) -> Option<Parts<'_, Self>> {
                match data {
                    KvData::$variant { k, v } => Some((k, v, &[], &[])),
                    _ => None,
                }
            }
            fn parts_mut(data: &mut KvData) -> Option<PartsMut<'_, Self>> {
                match data {
                    KvData::$variant { k, v } => Some((k, v, &mut [], &mut [])),
                    _ => None,
                }
            }
        }
    };
}
plain_element!(f32, F32);
plain_element!(bf16, Bf16);

impl Element for i8 {
    fn parts(data: &KvData) -> Option<Parts<'_, Self>> {
        match data {
            KvData::Q8 {
                k,
                v,
                k_scales,
                v_scales,
            } => Some((k, v, k_scales, v_scales)),
            _ => None,
        }
    }
    fn parts_mut(data: &mut KvData) -> Option<PartsMut<'_, Self>> {
        match data {
            KvData::Q8 {
                k,
                v,
                k_scales,
                v_scales,
            } => Some((k, v, k_scales, v_scales)),
            _ => None,
        }
    }
}

/// Runs `$body` with `$E` the element type of `$data`.
macro_rules! by_element {
    ($data:expr, $E:ident => $body:expr) => {
        match $data {
            KvData::F32 { .. } => {
                type $E = f32;
                $body
            }
            KvData::Bf16 { .. } => {
                type $E = bf16;
                $body
            }
            KvData::Q8 { .. } => {
                type $E = i8;
                $body
            }
        }
    };
}

impl KvCache {
    /// How much of each head a saved sequence of `len` tokens keeps: key
    /// values (whole tiles), value values and scales; a ring keeps all.
    fn saved_extent(&self, len: usize) -> (usize, usize, usize) {
        let positions = if self.ring {
            self.slots
        } else {
            len.next_multiple_of(KEY_TILE).min(self.slots)
        };
        (
            positions * self.head_dim,
            positions * self.head_dim,
            positions,
        )
    }

    /// An empty cache of `slots` positions (a multiple of [`KEY_TILE`]).
    fn zeroed(
        format: KvFormat,
        n_kv_heads: usize,
        slots: usize,
        head_dim: usize,
        budget: &mut Budget,
    ) -> Result<Self> {
        // The geometry bounds each factor well below overflow.
        let n = n_kv_heads * slots * head_dim;
        let data = match format {
            KvFormat::F32 => KvData::F32 {
                k: budget.zeroed(n)?,
                v: budget.zeroed(n)?,
            },
            // Zero bits from fresh pages: memory is committed only as the
            // cache fills (a `bf16` zero written element by element would
            // commit the whole context at once).
            KvFormat::Bf16 => KvData::Bf16 {
                k: budget.zeroed::<u16>(n)?.reinterpret_into(),
                v: budget.zeroed::<u16>(n)?.reinterpret_into(),
            },
            KvFormat::Q8 => KvData::Q8 {
                k: budget.zeroed(n)?,
                v: budget.zeroed(n)?,
                k_scales: budget.zeroed(n_kv_heads * slots)?,
                v_scales: budget.zeroed(n_kv_heads * slots)?,
            },
        };
        Ok(KvCache {
            data,
            n_kv_heads,
            head_dim,
            slots,
            ring: false,
        })
    }

    /// KV head `head`, read-only.
    fn head<E: Element>(&self, head: usize) -> KvHead<'_, E> {
        let (k, v, ks, vs) = E::parts(&self.data).expect("the element type of this cache");
        let (slots, hd) = (self.slots, self.head_dim);
        let range = head * slots * hd..(head + 1) * slots * hd;
        let scales = match E::SCALED {
            true => Scales {
                keys: &ks[head * slots..(head + 1) * slots],
                values: &vs[head * slots..(head + 1) * slots],
            },
            false => Scales::default(),
        };
        KvHead::new(&k[range.clone()], &v[range], scales, slots, hd)
    }

    /// KV head `head`, to write.
    fn head_mut<E: Element>(&mut self, head: usize) -> KvHeadMut<'_, E> {
        let (slots, hd) = (self.slots, self.head_dim);
        let (k, v, ks, vs) = E::parts_mut(&mut self.data).expect("the element type of this cache");
        let range = head * slots * hd..(head + 1) * slots * hd;
        let scales = if E::SCALED {
            head * slots..(head + 1) * slots
        } else {
            0..0
        };
        KvHeadMut {
            keys: &mut k[range.clone()],
            values: &mut v[range],
            key_scales: &mut ks[scales.clone()],
            value_scales: &mut vs[scales],
        }
    }

    /// Stores the key and value of `position` for KV head `head`.
    fn store(&mut self, head: usize, position: usize, key: &[f32], value: &[f32]) {
        let slots = self.slots;
        by_element!(&self.data, E => kernel::store(self.head_mut::<E>(head), slots, position, key, value))
    }

    /// The query `rows` attend over KV head `head`, positions from
    /// `tail.0` on read from head 0 of `tail.1` (see [`kernel::attend_with_tail`]).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        isa: Isa,
        head: usize,
        tail: Option<(usize, &KvCache)>,
        scale: f32,
        q: &[f32],
        rows: &[QueryRow],
        out: &mut [f32],
    ) {
        by_element!(&self.data, E => {
            let tail = tail.map(|(from, t)| kernel::KvTail { from, kv: t.head::<E>(0) });
            kernel::attend_with_tail(isa, self.head::<E>(head), tail, scale, q, rows, out)
        })
    }

    /// Copies, for KV head `head`, the key tile holding `position` (its 16
    /// positions, with their scales) to the same positions of head 0 of
    /// `dst`, a cache of the same format and head size.
    fn copy_tile(&self, head: usize, position: usize, dst: &mut KvCache) {
        let base = position / KEY_TILE * KEY_TILE;
        let hd = self.head_dim;
        let (from, to) = (base % self.slots, base % dst.slots);
        by_element!(&self.data, E => {
            let src = self.head::<E>(head);
            let out = dst.head_mut::<E>(0);
            let tile = KEY_TILE * hd;
            out.keys[to * hd..][..tile].copy_from_slice(&src.keys[from * hd..][..tile]);
            out.values[to * hd..][..tile].copy_from_slice(&src.values[from * hd..][..tile]);
            if E::SCALED {
                out.key_scales[to..to + KEY_TILE]
                    .copy_from_slice(&src.scales.keys[from..from + KEY_TILE]);
                out.value_scales[to..to + KEY_TILE]
                    .copy_from_slice(&src.scales.values[from..from + KEY_TILE]);
            }
        })
    }

    /// Keeps one branch of a draft tree whose `nodes` tokens end the first
    /// `len` positions: the entry of the `j`-th token of `path` (indices
    /// into the tree, increasing, from 0) moves to the tree's `j`-th position.
    pub(crate) fn keep_branch(&mut self, len: usize, nodes: usize, path: &[usize]) {
        let base = len - nodes;
        for (j, &i) in path.iter().enumerate() {
            if i != j {
                self.move_position(base + i, base + j);
            }
        }
    }

    /// Moves every head's entry at position `from` to position `to`: what
    /// was stored for a token, bit for bit, as if it had been stored there.
    fn move_position(&mut self, from: usize, to: usize) {
        let (slots, hd) = (self.slots, self.head_dim);
        let (a, b) = (from % slots, to % slots);
        for head in 0..self.n_kv_heads {
            by_element!(&self.data, E => {
                let h = self.head_mut::<E>(head);
                for d in 0..hd {
                    h.keys[kernel::key_index(slots, hd, to, d)] =
                        h.keys[kernel::key_index(slots, hd, from, d)];
                }
                h.values.copy_within(a * hd..(a + 1) * hd, b * hd);
                if E::SCALED {
                    h.key_scales[b] = h.key_scales[a];
                    h.value_scales[b] = h.value_scales[a];
                }
            })
        }
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
    /// Per kernel thread, the outputs of one tile of query rows.
    tiles: Vec<f32>,
    /// Per kernel thread, one KV head's tail where a draft tree's node
    /// lays out its path as a sequence ([`kernel::KvTail`]): the tile
    /// before the tree, then up to the rollback depth of positions.
    tails: Vec<KvCache>,
}

impl MixerLayer for Attention {
    type State = KvCache;
    type Scratch = Scratch;
    /// A sliding window's whole ring (a full cache needs nothing).
    type Snapshot = KvData;

    fn snapshot(&self, cache: &KvCache, _len: usize) -> Option<KvData> {
        cache.ring.then(|| cache.data.clone())
    }

    /// Every head's keys and values of positions below `len` (a ring: all
    /// of it), with the scales of an int8 cache.
    fn save(&self, cache: &KvCache, len: usize, out: &mut Vec<u8>) {
        let (keys, values, scales) = cache.saved_extent(len);
        by_element!(&cache.data, E => {
            let (k, v, ks, vs) = E::parts(&cache.data).expect("the element type of this cache");
            for head in 0..cache.n_kv_heads {
                let (kb, vb, sb) = (head * k.len() / cache.n_kv_heads, head * v.len() / cache.n_kv_heads, head * cache.slots);
                bytes::put(&k[kb..kb + keys], out);
                bytes::put(&v[vb..vb + values], out);
                if E::SCALED {
                    bytes::put(&ks[sb..sb + scales], out);
                    bytes::put(&vs[sb..sb + scales], out);
                }
            }
        })
    }

    fn load(&self, cache: &mut KvCache, len: usize, input: &mut &[u8]) -> Option<()> {
        let (keys, values, scales) = cache.saved_extent(len);
        let (heads, slots) = (cache.n_kv_heads, cache.slots);
        by_element!(&cache.data, E => {
            let (k, v, ks, vs) = E::parts_mut(&mut cache.data).expect("the element type of this cache");
            for head in 0..heads {
                let (kb, vb, sb) = (head * k.len() / heads, head * v.len() / heads, head * slots);
                bytes::take(&mut k[kb..kb + keys], input)?;
                bytes::take(&mut v[vb..vb + values], input)?;
                if E::SCALED {
                    bytes::take(&mut ks[sb..sb + scales], input)?;
                    bytes::take(&mut vs[sb..sb + scales], input)?;
                }
            }
            Some(())
        })
    }

    fn snapshot_bytes(ring: &KvData) -> usize {
        match ring {
            KvData::F32 { k, v } => 4 * (k.len() + v.len()),
            KvData::Bf16 { k, v } => 2 * (k.len() + v.len()),
            KvData::Q8 {
                k,
                v,
                k_scales,
                v_scales,
            } => k.len() + v.len() + 4 * (k_scales.len() + v_scales.len()),
        }
    }

    fn restore(&self, cache: &mut KvCache, ring: &KvData, _len: usize) {
        cache.data.clone_from(ring);
    }

    /// An empty cache of the whole context, or of the window plus room for
    /// a whole chunk (its first token still needs the window before it) or
    /// for rolling back; a ring bounds how far the state can roll back.
    fn new_state(&self, shape: &StateShape, budget: &mut Budget) -> Result<(KvCache, bool)> {
        let (held, ring) = match self.window {
            Some(w) if w - 1 + shape.chunk.max(shape.rollback) < shape.capacity => {
                (w - 1 + shape.chunk.max(shape.rollback), true)
            }
            _ => (shape.capacity, false),
        };
        let slots = held.next_multiple_of(KEY_TILE);
        let mut cache = KvCache::zeroed(shape.kv, self.n_kv_heads, slots, self.head_dim, budget)?;
        cache.ring = ring;
        Ok((cache, ring))
    }

    fn new_scratch(layers: &[&Self], shape: &StateShape, budget: &mut Budget) -> Result<Scratch> {
        let (mut q_dim, mut gate_dim, mut kv_dim, mut head_dim) = (0, 0, 0, 0);
        for a in layers.iter().copied() {
            q_dim = q_dim.max(a.n_heads * a.head_dim);
            gate_dim = gate_dim.max(a.gate.as_ref().map_or(0, |g| g.rows));
            kv_dim = kv_dim.max(a.n_kv_heads * a.head_dim);
            head_dim = head_dim.max(a.head_dim);
        }
        let chunk = shape.chunk;
        Ok(Scratch {
            q: budget.floats(chunk * q_dim)?,
            gate: budget.floats(chunk * gate_dim)?,
            k: budget.floats(chunk * kv_dim)?,
            v: budget.floats(chunk * kv_dim)?,
            attn: budget.floats(chunk * q_dim)?,
            tiles: budget.floats(shape.threads * MAX_ROWS * head_dim)?,
            tails: (0..shape.threads)
                .map(|_| {
                    let slots = (KEY_TILE + shape.rollback).next_multiple_of(KEY_TILE);
                    KvCache::zeroed(shape.kv, 1, slots, head_dim, budget)
                })
                .collect::<Result<_>>()?,
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

    fn project_in(&self, cx: &Compute<'_>, s: &mut Scratch, x: &[f32], rows: usize) {
        let hd = self.head_dim;
        let (q_dim, kv_dim) = (self.n_heads * hd, self.n_kv_heads * hd);
        let (q, k, v) = (
            &mut s.q[..rows * q_dim],
            &mut s.k[..rows * kv_dim],
            &mut s.v[..rows * kv_dim],
        );
        match &self.gate {
            Some(gate) => {
                let g = &mut s.gate[..rows * q_dim];
                cx.project(
                    [(&self.q, q), (gate, g), (&self.k, k), (&self.v, v)],
                    x,
                    rows,
                );
            }
            None => cx.project([(&self.q, q), (&self.k, k), (&self.v, v)], x, rows),
        }
    }

    fn mix(&self, step: &Step<'_>, cache: &mut KvCache, s: &mut Scratch) {
        let (cx, ropes, n, start) = (&step.cx, step.ropes, step.n, step.start);
        let hd = self.head_dim;
        let (q_dim, kv_dim) = (self.n_heads * hd, self.n_kv_heads * hd);
        let (qs, kvs) = (step.offset * q_dim, step.offset * kv_dim);
        let q = &mut s.q[qs..qs + n * q_dim];
        let (k, v) = (&mut s.k[kvs..kvs + n * kv_dim], &s.v[kvs..kvs + n * kv_dim]);
        for t in 0..n {
            let (cos, sin) = ropes.at(self.rope, t);
            for head in q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                if let Some(norm) = &self.q_norm {
                    ops::rms_norm_inplace(head, &norm.weight, norm.eps);
                }
                ops::rope_rotate_half(head, cos, sin);
            }
            for (kvh, head) in k[t * kv_dim..(t + 1) * kv_dim]
                .chunks_exact_mut(hd)
                .enumerate()
            {
                if let Some(norm) = &self.k_norm {
                    ops::rms_norm_inplace(head, &norm.weight, norm.eps);
                }
                ops::rope_rotate_half(head, cos, sin);
                let v = &v[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                cache.store(kvh, start + t, head, v);
            }
        }
        let q = &s.q[qs..qs + n * q_dim];
        let attn = &mut s.attn[qs..qs + n * q_dim];
        match step.tree {
            None => self.attend(cx, cache, q, attn, &mut s.tiles, n, start),
            Some(tree) => {
                let kv = (&s.k[kvs..kvs + n * kv_dim], &s.v[kvs..kvs + n * kv_dim]);
                let buffers = (&mut s.tiles[..], &mut s.tails[..]);
                self.attend_tree(cx, cache, (q, kv), attn, buffers, tree, start)
            }
        }
    }

    fn project_out(&self, cx: &Compute<'_>, s: &mut Scratch, rows: usize, out: &mut [f32]) {
        let q_dim = self.n_heads * self.head_dim;
        let attn = &mut s.attn[..rows * q_dim];
        if self.gate.is_some() {
            ops::mul_sigmoid(attn, &s.gate[..rows * q_dim]);
        }
        cx.project([(&self.o, out)], attn, rows);
    }
}

impl Attention {
    /// Every (head, new token) row attends over the positions it sees: token
    /// `t` those up to its own, from the start of the sequence or of its
    /// sliding window. Rows go in tiles of one KV head's query heads times
    /// several tokens (at most [`MAX_ROWS`]), so a tile reads each cached key
    /// and value once; tiles are split across threads.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        cx: &Compute<'_>,
        cache: &KvCache,
        q: &[f32],
        out: &mut [f32],
        tiles: &mut [f32],
        n: usize,
        start: usize,
    ) {
        let isa = cx.isa;
        let hd = self.head_dim;
        let q_dim = self.n_heads * hd;
        let group = self.n_heads / self.n_kv_heads;
        let heads_per_tile = group.min(MAX_ROWS);
        let head_chunks = group.div_ceil(heads_per_tile);
        let tokens_per_tile = MAX_ROWS / heads_per_tile;
        let token_tiles = n.div_ceil(tokens_per_tile);
        let items = self.n_kv_heads * head_chunks * token_tiles;
        let per_thread = tiles.len() / cx.pool.n_threads();
        let out = DisjointMut::new(out);
        let tiles = DisjointMut::new(tiles);
        cx.pool.run(&|tid, n_threads| {
            // SAFETY: each thread owns `tiles[tid * per_thread..][..per_thread]`
            // (the buffer holds `n_threads * per_thread`).
            let tile_out = unsafe { tiles.piece(tid * per_thread, per_thread) };
            for item in split_range(items, n_threads, tid, 1) {
                let kvh = item / (head_chunks * token_tiles);
                let chunk = item / token_tiles % head_chunks;
                let tokens = item % token_tiles * tokens_per_tile;
                let tokens = tokens..(tokens + tokens_per_tile).min(n);
                let heads = kvh * group + chunk * heads_per_tile;
                let heads = heads..(heads + heads_per_tile).min((kvh + 1) * group);
                let mut rows = [QueryRow {
                    at: 0,
                    first: 0,
                    last: 0,
                }; MAX_ROWS];
                let mut count = 0;
                for t in tokens {
                    let last = start + t;
                    let first = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
                    for head in heads.clone() {
                        rows[count] = QueryRow {
                            at: t * q_dim + head * hd,
                            first,
                            last,
                        };
                        count += 1;
                    }
                }
                let rows = &rows[..count];
                cache.attend(isa, kvh, None, self.scale, q, rows, tile_out);
                for (row, result) in rows.iter().zip(tile_out.chunks_exact(hd)) {
                    // SAFETY: query row `row.at` is one (token, head) of this
                    // item, and items are split across threads without overlap.
                    unsafe { out.piece(row.at, hd) }.copy_from_slice(result);
                }
            }
        });
    }

    /// [`attend`](Self::attend) for a draft tree: every node's rows see the
    /// prefix in the cache and the keys and values of its own path, laid
    /// out at their depths in a thread's tail (the cache's tile holding
    /// `start`, then the path from `k` and `v`, stored as the cache stores
    /// them), so each node computes what one-token decoding of its path
    /// would. One node per tile of rows.
    #[allow(clippy::too_many_arguments)]
    fn attend_tree(
        &self,
        cx: &Compute<'_>,
        cache: &KvCache,
        (q, (k, v)): (&[f32], (&[f32], &[f32])),
        out: &mut [f32],
        (tiles, tails): (&mut [f32], &mut [KvCache]),
        tree: Tree<'_>,
        start: usize,
    ) {
        let isa = cx.isa;
        let hd = self.head_dim;
        let (q_dim, kv_dim) = (self.n_heads * hd, self.n_kv_heads * hd);
        let n = tree.depths.len();
        let group = self.n_heads / self.n_kv_heads;
        let heads_per_tile = group.min(MAX_ROWS);
        let head_chunks = group.div_ceil(heads_per_tile);
        let items = self.n_kv_heads * head_chunks * n;
        let per_thread = tiles.len() / cx.pool.n_threads();
        let from = start / KEY_TILE * KEY_TILE;
        let out = DisjointMut::new(out);
        let tiles = DisjointMut::new(tiles);
        let tails = DisjointMut::new(tails);
        cx.pool.run(&|tid, n_threads| {
            // SAFETY: each thread owns its piece of `tiles` and its tail
            // (both hold one per thread).
            let (tile_out, tail) = unsafe {
                (
                    tiles.piece(tid * per_thread, per_thread),
                    &mut tails.piece(tid, 1)[0],
                )
            };
            tail.head_dim = hd;
            for item in split_range(items, n_threads, tid, 1) {
                let kvh = item / (head_chunks * n);
                let chunk = item / n % head_chunks;
                let t = item % n;
                if from < start {
                    cache.copy_tile(kvh, start, tail);
                }
                let mut node = t;
                loop {
                    let at = node * kv_dim + kvh * hd;
                    let position = start + tree.depths[node];
                    tail.store(0, position, &k[at..at + hd], &v[at..at + hd]);
                    if node == 0 {
                        break;
                    }
                    node = tree.parents[node];
                }
                let last = start + tree.depths[t];
                let first = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
                let heads = kvh * group + chunk * heads_per_tile;
                let heads = heads..(heads + heads_per_tile).min((kvh + 1) * group);
                let count = heads.len();
                let mut rows = [QueryRow {
                    at: 0,
                    first: 0,
                    last: 0,
                }; MAX_ROWS];
                for (row, head) in rows.iter_mut().zip(heads) {
                    *row = QueryRow {
                        at: t * q_dim + head * hd,
                        first,
                        last,
                    };
                }
                let rows = &rows[..count];
                cache.attend(isa, kvh, Some((from, tail)), self.scale, q, rows, tile_out);
                for (row, result) in rows.iter().zip(tile_out.chunks_exact(hd)) {
                    // SAFETY: query row `row.at` is one (token, head) of this
                    // item, and items are split across threads without overlap.
                    unsafe { out.piece(row.at, hd) }.copy_from_slice(result);
                }
            }
        });
    }
}
