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
use super::kv_pool::{KvPage, KvPool};
use super::mixer::{MixerLayer, Step, Tree};
use super::norm::RmsNorm;
use crate::budget::{Budget, StateShape};
use crate::linear::{Compute, Linear};
use crate::{EngineError, Result};
use half::bf16;
use half::vec::HalfBitsVecExt;
use hayate_kernels::Isa;
use hayate_kernels::attention::{
    self as kernel, KEY_TILE, KvElement, KvHead, KvHeadMut, MAX_ROWS, QueryRow, Scales,
};
use hayate_kernels::ops;
use hayate_kernels::pool::{DisjointMut, split_range};
use std::sync::Arc;

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

/// The keys and values of a cache page, in its format.
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

impl KvData {
    /// No entries (no allocation).
    pub(crate) fn empty() -> Self {
        KvData::F32 {
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Zeroed buffers of `values` keys and values each and, for int8,
    /// `scales` scales each. Zero bits from fresh pages: memory is
    /// committed only as the cache fills (a `bf16` zero written element
    /// by element would commit all of it at once).
    pub(crate) fn zeroed(format: KvFormat, values: usize, scales: usize) -> Self {
        match format {
            KvFormat::F32 => KvData::F32 {
                k: vec![0.0; values],
                v: vec![0.0; values],
            },
            KvFormat::Bf16 => KvData::Bf16 {
                k: vec![0u16; values].reinterpret_into(),
                v: vec![0u16; values].reinterpret_into(),
            },
            KvFormat::Q8 => KvData::Q8 {
                k: vec![0; values],
                v: vec![0; values],
                k_scales: vec![0.0; scales],
                v_scales: vec![0.0; scales],
            },
        }
    }

    /// Bytes of buffers of `values` keys and values each (and `scales`
    /// scales each for int8); `None` when that overflows.
    pub(crate) fn bytes_of(format: KvFormat, values: usize, scales: usize) -> Option<usize> {
        let entries = values.checked_mul(2)?;
        match format {
            KvFormat::F32 => entries.checked_mul(4),
            KvFormat::Bf16 => entries.checked_mul(2),
            KvFormat::Q8 => entries.checked_add(scales.checked_mul(8)?),
        }
    }

    /// Bytes its buffers take.
    pub(crate) fn bytes(&self) -> usize {
        match self {
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

    /// Whether it is in `format` with `values` keys and `scales` scales.
    pub(crate) fn is_shaped(&self, format: KvFormat, values: usize, scales: usize) -> bool {
        match self {
            KvData::F32 { k, .. } => format == KvFormat::F32 && k.len() == values,
            KvData::Bf16 { k, .. } => format == KvFormat::Bf16 && k.len() == values,
            KvData::Q8 { k, k_scales, .. } => {
                format == KvFormat::Q8 && k.len() == values && k_scales.len() == scales
            }
        }
    }
}

/// Keys and values of one attention layer, in pages of `page_len`
/// positions; in each page every head's history is contiguous: keys
/// `[kv_head][tile of 16 positions][dim][16]`, values `[kv_head][slot][dim]`
/// (the layout [`hayate_kernels::attention`] reads), and for int8 caches
/// the scales `[kv_head][slot]`.
///
/// A full cache grows a page at a time from its [`KvPool`], up to `slots`
/// positions (the context), and gives pages back as it shrinks; pages of a
/// common prefix may be shared with other caches, and are copied before
/// one is written. A sliding window keeps one page of its own, a ring of
/// `slots` positions (the window plus room for a chunk and for rollback):
/// position `p` lives in slot `p % slots`.
pub struct KvCache {
    /// The pages, in position order.
    pages: Vec<Arc<KvPage>>,
    /// Positions per page.
    page_len: usize,
    /// Most positions held (whole pages for a full cache, the ring's size).
    slots: usize,
    /// Whether it holds a sliding window's last positions only (a ring),
    /// not every position of the context.
    ring: bool,
    /// How it stores keys and values.
    format: KvFormat,
    /// Key/value heads.
    n_kv_heads: usize,
    /// Dimensions per head.
    head_dim: usize,
    /// Where a full cache takes its pages.
    pool: Option<KvPool>,
}

/// The element type of one [`KvData`] variant: typed access to a page's
/// buffers (keys, values, and the scales of int8 caches, empty otherwise).
/// A page's keys, values, key scales and value scales.
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

/// Runs `$body` with `$E` the element type of cache format `$format`.
macro_rules! by_element {
    ($format:expr, $E:ident => $body:expr) => {
        match $format {
            KvFormat::F32 => {
                type $E = f32;
                $body
            }
            KvFormat::Bf16 => {
                type $E = bf16;
                $body
            }
            KvFormat::Q8 => {
                type $E = i8;
                $body
            }
        }
    };
}

/// Head `head` of a page of `slots` positions, read-only.
fn page_head<E: Element>(data: &KvData, head: usize, slots: usize, hd: usize) -> KvHead<'_, E> {
    let (k, v, ks, vs) = E::parts(data).expect("the element type of this cache");
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

/// Head `head` of a page of `slots` positions, to write.
fn page_head_mut<E: Element>(
    data: &mut KvData,
    head: usize,
    slots: usize,
    hd: usize,
) -> KvHeadMut<'_, E> {
    let (k, v, ks, vs) = E::parts_mut(data).expect("the element type of this cache");
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

impl KvCache {
    /// A ring (or a draft tree's tail) of `slots` positions (a multiple of
    /// [`KEY_TILE`]) in one page of its own, taken from `budget`.
    fn ring(
        format: KvFormat,
        n_kv_heads: usize,
        slots: usize,
        head_dim: usize,
        budget: &mut Budget,
    ) -> Result<Self> {
        // The geometry bounds each factor well below overflow.
        let values = n_kv_heads * slots * head_dim;
        let scales = if format == KvFormat::Q8 {
            n_kv_heads * slots
        } else {
            0
        };
        let bytes = KvData::bytes_of(format, values, scales).unwrap_or(usize::MAX);
        budget.take(bytes)?;
        Ok(KvCache {
            pages: vec![Arc::new(KvPage::detached(KvData::zeroed(
                format, values, scales,
            )))],
            page_len: slots,
            slots,
            ring: true,
            format,
            n_kv_heads,
            head_dim,
            pool: None,
        })
    }

    /// An empty full cache of up to `capacity` positions, growing in pages
    /// of `page_len` positions (a multiple of [`KEY_TILE`]) from `pool`.
    fn growing(
        format: KvFormat,
        (n_kv_heads, head_dim): (usize, usize),
        capacity: usize,
        page_len: usize,
        pool: &KvPool,
    ) -> Self {
        KvCache {
            pages: Vec::with_capacity(capacity.div_ceil(page_len)),
            page_len,
            slots: capacity.next_multiple_of(page_len),
            ring: false,
            format,
            n_kv_heads,
            head_dim,
            pool: Some(pool.clone()),
        }
    }

    /// Bytes of one page.
    fn page_bytes(&self) -> usize {
        let values = self.n_kv_heads * self.page_len * self.head_dim;
        KvData::bytes_of(self.format, values, self.n_kv_heads * self.page_len).unwrap_or(0)
    }

    /// Bytes a full cache's pages take when it holds `len` positions (0
    /// for a ring: its page is not the pool's).
    pub(crate) fn bytes_at(&self, len: usize) -> usize {
        if self.ring {
            return 0;
        }
        len.min(self.slots).div_ceil(self.page_len) * self.page_bytes()
    }

    /// Bytes of the pool's pages it holds (0 for a ring).
    pub(crate) fn bytes_held(&self) -> usize {
        match self.ring {
            true => 0,
            false => self.pages.len() * self.page_bytes(),
        }
    }

    /// Makes positions `from..to` writable: the pages holding them taken
    /// from the pool where the cache has none yet, copied where they are
    /// shared. An error when the pool is out of pages (the cache then
    /// holds what it had, plus the pages it could take).
    pub(crate) fn prepare(&mut self, from: usize, to: usize) -> Result<()> {
        let Some(pool) = self.pool.as_ref() else {
            return Ok(());
        };
        if from >= to {
            return Ok(());
        }
        let (first, last) = (from / self.page_len, (to - 1) / self.page_len);
        let out_of_pages = |pool: &KvPool| EngineError::KvMemory {
            limit: pool.limit(),
        };
        for p in first..=last {
            let shared = self
                .pages
                .get(p)
                .is_some_and(|page| Arc::strong_count(page) > 1);
            if p < self.pages.len() && !shared {
                continue;
            }
            let mut page = pool
                .take(self.format, self.n_kv_heads, self.page_len, self.head_dim)
                .ok_or_else(|| out_of_pages(pool))?;
            if shared {
                page.data.clone_from(&self.pages[p].data);
                self.pages[p] = Arc::new(page);
            } else {
                self.pages.push(Arc::new(page));
            }
        }
        Ok(())
    }

    /// Gives back the pages past the first `len` positions (a full cache).
    pub(crate) fn release_from(&mut self, len: usize) {
        if !self.ring {
            self.pages.truncate(len.div_ceil(self.page_len));
        }
    }

    /// Shares the pages of `other` (a cache of the same layer) holding its
    /// first `len` positions, in place of its own: copy-on-write.
    pub(crate) fn share_prefix(&mut self, other: &KvCache, len: usize) {
        if !self.ring && !other.ring {
            let n = len.div_ceil(self.page_len).min(other.pages.len());
            self.pages.clear();
            self.pages.extend(other.pages[..n].iter().cloned());
        }
    }

    /// The page and the slot in it of `position`.
    fn locate(&self, position: usize) -> (usize, usize) {
        let slot = position % self.slots;
        (slot / self.page_len, slot % self.page_len)
    }

    /// A page being written: the cache's own ([`prepare`](Self::prepare)d).
    fn page_mut(pages: &mut [Arc<KvPage>], p: usize) -> &mut KvData {
        &mut Arc::get_mut(&mut pages[p])
            .expect("a page being written is the cache's own")
            .data
    }

    /// Stores the key and value of `position` for KV head `head`.
    fn store(&mut self, head: usize, position: usize, key: &[f32], value: &[f32]) {
        let (p, slot) = self.locate(position);
        let (len, hd) = (self.page_len, self.head_dim);
        let data = Self::page_mut(&mut self.pages, p);
        by_element!(self.format, E => {
            kernel::store(page_head_mut::<E>(data, head, len, hd), len, slot, key, value)
        })
    }

    /// Head `head` of the one page of a ring (or tail).
    fn ring_head<E: Element>(&self, head: usize) -> KvHead<'_, E> {
        page_head::<E>(&self.pages[0].data, head, self.slots, self.head_dim)
    }

    /// The query `rows` attend over KV head `head`, positions from
    /// `tail.0` on read from head 0 of `tail.1` (a tail, see [`kernel::WithTail`]).
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
        let (page_len, hd) = (self.page_len, self.head_dim);
        by_element!(self.format, E => {
            let paged = kernel::KvPaged {
                page_len,
                pages: self.pages.len(),
                head_dim: hd,
                page: |i: usize| page_head::<E>(&self.pages[i].data, head, page_len, hd),
            };
            let tail = tail.map(|(from, t)| (from, t.ring_head::<E>(0)));
            match (self.ring, tail) {
                (false, None) => kernel::attend_in(isa, paged, scale, q, rows, out),
                (false, Some((from, tail))) => {
                    let kv = kernel::WithTail { main: paged, from, tail };
                    kernel::attend_in(isa, kv, scale, q, rows, out)
                }
                (true, None) => kernel::attend_in(isa, self.ring_head::<E>(head), scale, q, rows, out),
                (true, Some((from, tail))) => {
                    let kv = kernel::WithTail { main: self.ring_head::<E>(head), from, tail };
                    kernel::attend_in(isa, kv, scale, q, rows, out)
                }
            }
        })
    }

    /// Copies, for KV head `head`, the key tile holding `position` (its 16
    /// positions, with their scales) to the same positions of head 0 of
    /// `dst`, a tail of the same format and head size.
    fn copy_tile(&self, head: usize, position: usize, dst: &mut KvCache) {
        let base = position / KEY_TILE * KEY_TILE;
        let hd = self.head_dim;
        let (p, from) = self.locate(base);
        let (dst_slots, to) = (dst.slots, base % dst.slots);
        let dst_data = Self::page_mut(&mut dst.pages, 0);
        by_element!(self.format, E => {
            let src = page_head::<E>(&self.pages[p].data, head, self.page_len, hd);
            let out = page_head_mut::<E>(dst_data, 0, dst_slots, hd);
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

    /// Moves every head's entry at position `from` to position `to`
    /// (before it): what was stored for a token, bit for bit, as if it had
    /// been stored there.
    fn move_position(&mut self, from: usize, to: usize) {
        let (len, hd) = (self.page_len, self.head_dim);
        let ((pf, a), (pt, b)) = (self.locate(from), self.locate(to));
        for head in 0..self.n_kv_heads {
            by_element!(self.format, E => {
                let entry = |src: &KvHeadMut<'_, E>, dst: &mut KvHeadMut<'_, E>| {
                    for d in 0..hd {
                        dst.keys[kernel::key_index(len, hd, b, d)] =
                            src.keys[kernel::key_index(len, hd, a, d)];
                    }
                    dst.values[b * hd..(b + 1) * hd].copy_from_slice(&src.values[a * hd..(a + 1) * hd]);
                    if E::SCALED {
                        dst.key_scales[b] = src.key_scales[a];
                        dst.value_scales[b] = src.value_scales[a];
                    }
                };
                if pf == pt {
                    let h = page_head_mut::<E>(Self::page_mut(&mut self.pages, pf), head, len, hd);
                    for d in 0..hd {
                        h.keys[kernel::key_index(len, hd, b, d)] =
                            h.keys[kernel::key_index(len, hd, a, d)];
                    }
                    h.values.copy_within(a * hd..(a + 1) * hd, b * hd);
                    if E::SCALED {
                        h.key_scales[b] = h.key_scales[a];
                        h.value_scales[b] = h.value_scales[a];
                    }
                } else {
                    let (low, high) = self.pages.split_at_mut(pf);
                    let src = page_head_mut::<E>(Self::page_mut(high, 0), head, len, hd);
                    let mut dst = page_head_mut::<E>(Self::page_mut(low, pt), head, len, hd);
                    entry(&src, &mut dst);
                }
            })
        }
    }

    /// Each page's share of the first `positions` positions (whole tiles),
    /// in order: the page and how many of its positions.
    fn extent(&self, positions: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let len = self.page_len;
        (0..positions.div_ceil(len)).map(move |p| (p, (positions - p * len).min(len)))
    }

    /// Positions a saved sequence of `len` tokens keeps: whole tiles, or
    /// the whole ring.
    fn saved_positions(&self, len: usize) -> usize {
        if self.ring {
            self.slots
        } else {
            len.next_multiple_of(KEY_TILE).min(self.slots)
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
        cache.ring.then(|| cache.pages[0].data.clone())
    }

    /// Every head's keys and values of positions below `len` (a ring: all
    /// of it), with the scales of an int8 cache: for each head its keys
    /// page after page, then its values, then the scales, as one cache of
    /// those positions lays them out.
    fn save(&self, cache: &KvCache, len: usize, out: &mut Vec<u8>) {
        let positions = cache.saved_positions(len);
        let (page_len, hd) = (cache.page_len, cache.head_dim);
        by_element!(cache.format, E => {
            for head in 0..cache.n_kv_heads {
                let view = |p: usize| page_head::<E>(&cache.pages[p].data, head, page_len, hd);
                for (p, n) in cache.extent(positions) {
                    bytes::put(&view(p).keys[..n * hd], out);
                }
                for (p, n) in cache.extent(positions) {
                    bytes::put(&view(p).values[..n * hd], out);
                }
                if E::SCALED {
                    for (p, n) in cache.extent(positions) {
                        bytes::put(&view(p).scales.keys[..n], out);
                    }
                    for (p, n) in cache.extent(positions) {
                        bytes::put(&view(p).scales.values[..n], out);
                    }
                }
            }
        })
    }

    /// Reads back what [`save`](Self::save) wrote; `None` also when the
    /// pool has no pages left for it.
    fn load(&self, cache: &mut KvCache, len: usize, input: &mut &[u8]) -> Option<()> {
        let positions = cache.saved_positions(len);
        cache.release_from(0);
        cache.prepare(0, positions).ok()?;
        let (page_len, hd) = (cache.page_len, cache.head_dim);
        let extent: Vec<(usize, usize)> = cache.extent(positions).collect();
        by_element!(cache.format, E => {
            for head in 0..cache.n_kv_heads {
                let pages = &mut cache.pages;
                for &(p, n) in &extent {
                    let h = page_head_mut::<E>(KvCache::page_mut(pages, p), head, page_len, hd);
                    bytes::take(&mut h.keys[..n * hd], input)?;
                }
                for &(p, n) in &extent {
                    let h = page_head_mut::<E>(KvCache::page_mut(pages, p), head, page_len, hd);
                    bytes::take(&mut h.values[..n * hd], input)?;
                }
                if E::SCALED {
                    for &(p, n) in &extent {
                        let h = page_head_mut::<E>(KvCache::page_mut(pages, p), head, page_len, hd);
                        bytes::take(&mut h.key_scales[..n], input)?;
                    }
                    for &(p, n) in &extent {
                        let h = page_head_mut::<E>(KvCache::page_mut(pages, p), head, page_len, hd);
                        bytes::take(&mut h.value_scales[..n], input)?;
                    }
                }
            }
            Some(())
        })
    }

    fn snapshot_bytes(ring: &KvData) -> usize {
        ring.bytes()
    }

    fn restore(&self, cache: &mut KvCache, ring: &KvData, _len: usize) {
        KvCache::page_mut(&mut cache.pages, 0).clone_from(ring);
    }

    /// An empty cache of the whole context, growing in pages from the
    /// budget's pool, or a ring of the window plus room for a whole chunk
    /// (its first token still needs the window before it) or for rolling
    /// back; a ring bounds how far the state can roll back.
    fn new_state(&self, shape: &StateShape, budget: &mut Budget) -> Result<(KvCache, bool)> {
        let heads = (self.n_kv_heads, self.head_dim);
        match self.window {
            Some(w) if w - 1 + shape.chunk.max(shape.rollback) < shape.capacity => {
                let slots = (w - 1 + shape.chunk.max(shape.rollback)).next_multiple_of(KEY_TILE);
                let cache = KvCache::ring(shape.kv, heads.0, slots, heads.1, budget)?;
                Ok((cache, true))
            }
            _ => {
                let page_len = shape.page.min(shape.capacity.next_multiple_of(KEY_TILE));
                let cache =
                    KvCache::growing(shape.kv, heads, shape.capacity, page_len, &budget.pool);
                Ok((cache, false))
            }
        }
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
                    KvCache::ring(shape.kv, 1, slots, head_dim, budget)
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
