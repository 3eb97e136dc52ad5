//! Attention of query rows over one key/value head of a cache: scores,
//! softmax and the weighted sum of values, in one pass over the keys
//! (flash-style: a running maximum and sum per row, the output rescaled as
//! the maximum grows).
//!
//! Rows that share a KV head (the query heads of its group, and several
//! tokens of a prefill chunk) are processed together, so each block of 16
//! keys and values is read once for all of them and reused from L1.
//!
//! Keys are stored in tiles of [`KEY_TILE`] positions, dimension-major
//! inside a tile (`[tile][dim][16]`, see [`key_index`]), so that one vector
//! load gives one dimension of 16 keys and scores accumulate with one
//! broadcast FMA per dimension. Values stay position-major (`[slot][dim]`).
//!
//! Each row's result depends only on its own query and visible positions:
//! the blocks it visits, the order of every sum and the rounding of every
//! step are the same whichever rows share its call, so decoding one token
//! gives bit for bit what a prefill chunk gives at the same position. The
//! SIMD paths use the same fused multiply-adds in the same order as the
//! scalar reference, which computes the same values.

use crate::cpu::Isa;
use crate::exp::exp;
use half::bf16;

/// How a cache stores keys and values: f32, bf16 (half the bytes per
/// position; widening back to f32 is exact, so every path still computes
/// the same values from what is stored), or int8 codes with one f32 scale
/// per position and head for the keys and another for the values (a
/// quarter of the bytes, plus the scales).
///
/// The scales of an int8 cache are applied outside the instruction-set
/// steps, by the same scalar code on every path: a tile's scores are
/// multiplied by its keys' scales, and the softmax weights (after the
/// running sums took them) by the values' scales, so every path still
/// computes the same values.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    /// Whether values carry a scale per position and head ([`store`]
    /// divides by it before [`KvElement::from_f32`]).
    const SCALED: bool = false;
    /// The stored value of `v` (bf16: rounded to nearest, ties to even;
    /// int8: rounded to nearest and saturated, `v` already divided by the
    /// scale).
    fn from_f32(v: f32) -> Self;
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// 8 consecutive values widened to f32.
    ///
    /// # Safety
    /// `p` points to 8 readable values; the caller runs with AVX2 enabled.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// 16 consecutive values widened to f32.
    ///
    /// # Safety
    /// `p` points to 16 readable values; the caller runs with AVX-512 F enabled.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElement for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: 8 values, AVX2 enabled (caller).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: 16 values, AVX-512 F enabled (caller).
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElement for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: 8 values (16 bytes), AVX2 enabled (caller).
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: 16 values (32 bytes), AVX-512 F enabled (caller).
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
}

impl KvElement for i8 {
    const SCALED: bool = true;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        // `as` saturates (and sends NaN to 0).
        v.round_ties_even() as i8
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: 8 values (8 bytes), AVX2 enabled (caller).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: 16 values (16 bytes), AVX-512 F enabled (caller).
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
    }
}

/// The scale an int8 cache stores `v` with: its largest magnitude maps to
/// 127 (1 for a zero vector, so codes stay 0; a non-finite value gives a
/// non-finite scale, as an f32 cache would hold non-finite values).
fn int8_scale(v: &[f32]) -> f32 {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 { 1.0 } else { max / 127.0 }
}

/// Positions per key tile, and per block of the softmax pass.
pub const KEY_TILE: usize = 16;
/// Most query rows one [`attend`] call takes.
pub const MAX_ROWS: usize = 16;

/// One query row: where its query lies in `q` and the positions it sees
/// (`first..=last`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryRow {
    /// Offset of the query in `q`.
    pub at: usize,
    /// First visible position.
    pub first: usize,
    /// Last visible position.
    pub last: usize,
}

/// One key/value head of a cache that holds `slots` positions (a multiple
/// of [`KEY_TILE`]); position `p` lives in slot `p % slots`.
#[derive(Clone, Copy, Debug)]
pub struct KvHead<'a, E = f32> {
    /// Keys, `slots x head_dim` in tiles (see [`key_index`]).
    pub keys: &'a [E],
    /// Values, `[slot][dim]`.
    pub values: &'a [E],
    /// Per slot, the keys' and the values' scales (int8 caches; empty otherwise).
    pub scales: Scales<'a>,
    /// Positions held.
    pub slots: usize,
    /// Dimensions per head.
    pub head_dim: usize,
}

/// The scales of one head of an int8 cache, one f32 per slot for the keys
/// and one for the values (empty slices for an unscaled cache).
#[derive(Clone, Copy, Debug, Default)]
pub struct Scales<'a> {
    /// The keys' scales, `[slot]`.
    pub keys: &'a [f32],
    /// The values' scales, `[slot]`.
    pub values: &'a [f32],
}

impl<'a, E: KvElement> KvHead<'a, E> {
    /// A head view; panics if the buffers do not hold `slots` positions,
    /// `slots` is not a whole number of tiles, or the scales are missing
    /// (int8) or present (otherwise): caller bugs.
    pub fn new(
        keys: &'a [E],
        values: &'a [E],
        scales: Scales<'a>,
        slots: usize,
        head_dim: usize,
    ) -> Self {
        assert!(
            slots > 0 && slots.is_multiple_of(KEY_TILE),
            "{slots} slots are not whole key tiles"
        );
        assert!(
            crate::is_product(keys.len(), slots, head_dim)
                && crate::is_product(values.len(), slots, head_dim),
            "a KV head of {slots} x {head_dim} needs that many keys and values"
        );
        let n_scales = if E::SCALED { slots } else { 0 };
        assert!(
            scales.keys.len() == n_scales && scales.values.len() == n_scales,
            "a KV head of {slots} slots needs {n_scales} scales each for keys and values"
        );
        KvHead {
            keys,
            values,
            scales,
            slots,
            head_dim,
        }
    }
}

/// Where one head's positions lie, for [`attend_in`]: a cache in one piece
/// ([`KvHead`], a ring when it wraps), in pages ([`KvPaged`]), or with a
/// tail ([`WithTail`]). Whatever the layout, the blocks visited and every
/// sum are those of one cache holding the same entries.
pub trait KvLayout<'a, E: KvElement>: Copy {
    /// Dimensions per head.
    fn head_dim(&self) -> usize;
    /// Whether positions `first..=last` are all held.
    fn holds(&self, first: usize, last: usize) -> bool;
    /// The buffers holding the tile of positions `base..base + 16` (`base`
    /// a multiple of [`KEY_TILE`]) and the slot of `base` in them.
    fn tile(&self, base: usize) -> (KvHead<'a, E>, usize);
}

impl<'a, E: KvElement> KvLayout<'a, E> for KvHead<'a, E> {
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn holds(&self, first: usize, last: usize) -> bool {
        first <= last && last - first < self.slots
    }
    #[inline(always)]
    fn tile(&self, base: usize) -> (KvHead<'a, E>, usize) {
        (*self, base % self.slots)
    }
}

/// A head whose positions lie in `pages` pages of `page_len` positions
/// each (a multiple of [`KEY_TILE`]): position `p` in slot `p % page_len`
/// of page `p / page_len`, which `page` gives (a [`KvHead`] of `page_len`
/// slots). A cache grows a page at a time, so a short sequence holds only
/// the pages it fills.
#[derive(Clone, Copy)]
pub struct KvPaged<F> {
    /// Positions per page.
    pub page_len: usize,
    /// Pages held.
    pub pages: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Page `i`'s buffers, for `i < pages`.
    pub page: F,
}

impl<'a, E: KvElement, F: Fn(usize) -> KvHead<'a, E> + Copy> KvLayout<'a, E> for KvPaged<F> {
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn holds(&self, first: usize, last: usize) -> bool {
        first <= last && last / self.page_len < self.pages
    }
    #[inline(always)]
    fn tile(&self, base: usize) -> (KvHead<'a, E>, usize) {
        let page = (self.page)(base / self.page_len);
        debug_assert_eq!(page.slots, self.page_len, "a page of another length");
        (page, base % self.page_len)
    }
}

/// Positions from `from` on read from a second, small cache rather than
/// the main one: a branch of a speculative tree sees the shared prefix in
/// the cache and its own path, laid out as one sequence, in the tail.
/// Position `p >= from` lives in the tail's slot `p % tail.slots`, as in
/// any cache, so the blocks visited and every sum stay exactly those of a
/// cache holding that sequence.
#[derive(Clone, Copy, Debug)]
pub struct WithTail<'a, L, E = f32> {
    /// Where positions before `from` lie.
    pub main: L,
    /// First position read from the tail (a multiple of [`KEY_TILE`]).
    pub from: usize,
    /// The tail's buffers.
    pub tail: KvHead<'a, E>,
}

impl<'a, E: KvElement, L: KvLayout<'a, E>> KvLayout<'a, E> for WithTail<'a, L, E> {
    fn head_dim(&self) -> usize {
        self.main.head_dim()
    }
    fn holds(&self, first: usize, last: usize) -> bool {
        let tail_ok = last < self.from || last - self.from < self.tail.slots;
        let fits = self.from.is_multiple_of(KEY_TILE) && self.tail.head_dim == self.main.head_dim();
        fits && self.main.holds(first, last) && tail_ok
    }
    #[inline(always)]
    fn tile(&self, base: usize) -> (KvHead<'a, E>, usize) {
        if base >= self.from {
            (self.tail, base % self.tail.slots)
        } else {
            self.main.tile(base)
        }
    }
}

/// One head's buffers to write: keys, values, and their scales (int8
/// caches; empty slices otherwise), as in [`KvHead`].
pub struct KvHeadMut<'a, E> {
    /// Keys, in tiles.
    pub keys: &'a mut [E],
    /// Values, `[slot][dim]`.
    pub values: &'a mut [E],
    /// The keys' scales, `[slot]`.
    pub key_scales: &'a mut [f32],
    /// The values' scales, `[slot]`.
    pub value_scales: &'a mut [f32],
}

/// Index of dimension `d` of the key at `position` in one head's keys.
#[inline]
pub fn key_index(slots: usize, head_dim: usize, position: usize, d: usize) -> usize {
    let slot = position % slots;
    ((slot / KEY_TILE) * head_dim + d) * KEY_TILE + slot % KEY_TILE
}

/// Stores the key and value of `position` into one head's buffers (int8:
/// each with its own scale, see [`KvElement`]).
pub fn store<E: KvElement>(
    head: KvHeadMut<'_, E>,
    slots: usize,
    position: usize,
    key: &[f32],
    value: &[f32],
) {
    let hd = key.len();
    assert_eq!(value.len(), hd, "key and value lengths differ");
    let slot = position % slots;
    let (mut key_inv, mut value_inv) = (1.0, 1.0);
    if E::SCALED {
        let (ks, vs) = (int8_scale(key), int8_scale(value));
        head.key_scales[slot] = ks;
        head.value_scales[slot] = vs;
        (key_inv, value_inv) = (1.0 / ks, 1.0 / vs);
    }
    // Dimension `d` sits 16 values after dimension `d - 1` within the tile.
    let first = key_index(slots, hd, position, 0);
    for (d, &k) in key.iter().enumerate() {
        head.keys[first + d * KEY_TILE] = E::from_f32(k * key_inv);
    }
    for (o, &v) in head.values[slot * hd..(slot + 1) * hd]
        .iter_mut()
        .zip(value)
    {
        *o = E::from_f32(v * value_inv);
    }
}

/// `out[r] = softmax(scale · q_r · Kᵀ) · V` over the positions each row
/// sees, for up to [`MAX_ROWS`] rows; `out` holds `rows.len() x head_dim`.
///
/// Panics on shapes that do not fit or rows that see more positions than
/// the cache holds (caller bugs).
pub fn attend<E: KvElement>(
    isa: Isa,
    kv: KvHead<'_, E>,
    scale: f32,
    q: &[f32],
    rows: &[QueryRow],
    out: &mut [f32],
) {
    attend_in(isa, kv, scale, q, rows, out)
}

/// [`attend`] over the positions of any [`KvLayout`]: bit for bit what
/// [`attend`] gives over one cache holding the same entries.
///
/// Panics, as [`attend`] does, on shapes that do not fit, and on a row
/// that sees positions the layout does not hold or a tail that does not
/// start on a tile.
pub fn attend_in<'a, E: KvElement, L: KvLayout<'a, E>>(
    isa: Isa,
    kv: L,
    scale: f32,
    q: &[f32],
    rows: &[QueryRow],
    out: &mut [f32],
) {
    let hd = kv.head_dim();
    assert!(rows.len() <= MAX_ROWS, "at most {MAX_ROWS} rows per call");
    assert!(out.len() >= rows.len() * hd, "attention output too short");
    for r in rows {
        assert!(
            kv.holds(r.first, r.last),
            "row sees positions {}..={} the cache does not hold",
            r.first,
            r.last,
        );
        assert!(
            r.at.checked_add(hd).is_some_and(|end| end <= q.len()),
            "query row out of range"
        );
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.has_avx512() => {
            // SAFETY: the CPU supports AVX-512 (checked); shapes checked above.
            unsafe { x86::attend_avx512(kv, scale, q, rows, out) }
        }
        #[cfg(target_arch = "x86_64")]
        isa if isa.has_avx2() => {
            // SAFETY: the CPU supports AVX2 and FMA (checked); shapes checked above.
            unsafe { x86::attend_avx2(kv, scale, q, rows, out) }
        }
        _ => run::<Scalar, E, L>(kv, scale, q, rows, out),
    }
}

/// The three steps an instruction set provides; [`run`] does the rest.
trait Steps {
    /// `s[i][j] = Σ_d q_i[d] · k_j[d]` (fused, `d` ascending) for the 16 keys of a tile.
    fn scores<E: KvElement>(tile: &[E], hd: usize, queries: &[&[f32]], s: &mut [[f32; KEY_TILE]]);
    /// One row's softmax step over a block: scales the scores of lanes
    /// `from..=to` (the others become -∞), raises the running maximum,
    /// sets `p[j] = exp(s[j] - max)` and `sums = sums · alpha + p` lane by
    /// lane, and returns `alpha = exp(old max - new max)`.
    #[inline(always)]
    fn softmax_block(
        s: &mut [f32; KEY_TILE],
        lanes: std::ops::RangeInclusive<usize>,
        scale: f32,
        max: &mut f32,
        sums: &mut [f32; KEY_TILE],
        p: &mut [f32; KEY_TILE],
    ) -> f32 {
        let mut block_max = f32::NEG_INFINITY;
        for (j, v) in s.iter_mut().enumerate() {
            *v = if lanes.contains(&j) {
                *v * scale
            } else {
                f32::NEG_INFINITY
            };
            block_max = block_max.max(*v);
        }
        let new_max = max.max(block_max);
        let alpha = exp(*max - new_max);
        *max = new_max;
        for (pj, &sj) in p.iter_mut().zip(s.iter()) {
            *pj = exp(sj - new_max);
        }
        for (l, &pj) in sums.iter_mut().zip(p.iter()) {
            *l = l.mul_add(alpha, pj);
        }
        alpha
    }
    /// `o = o · alpha`, then `o = fma(p[j], v_j, o)` for `j` ascending.
    fn mix<E: KvElement>(o: &mut [f32], alpha: f32, p: &[f32; KEY_TILE], values: &[E]);
}

/// The pass over the blocks of keys, shared by every instruction set.
#[inline(always)]
fn run<'a, S: Steps, E: KvElement, L: KvLayout<'a, E>>(
    kv: L,
    scale: f32,
    q: &[f32],
    rows: &[QueryRow],
    out: &mut [f32],
) {
    let hd = kv.head_dim();
    let Some(lo) = rows.iter().map(|r| r.first).min() else {
        return;
    };
    let hi = rows.iter().map(|r| r.last).max().unwrap_or(lo);
    let mut max = [f32::NEG_INFINITY; MAX_ROWS];
    let mut sums = [[0f32; KEY_TILE]; MAX_ROWS];
    let mut s = [[0f32; KEY_TILE]; MAX_ROWS];
    let mut p = [0f32; KEY_TILE];
    out[..rows.len() * hd].fill(0.0);
    for block in lo / KEY_TILE..=hi / KEY_TILE {
        let base = block * KEY_TILE;
        let (src, slot) = kv.tile(base);
        let tile = &src.keys[slot * hd..(slot + KEY_TILE) * hd];
        let values = &src.values[slot * hd..(slot + KEY_TILE) * hd];
        let mut active = [0usize; MAX_ROWS];
        let mut queries: [&[f32]; MAX_ROWS] = [&[]; MAX_ROWS];
        let mut n = 0;
        for (i, r) in rows.iter().enumerate() {
            if r.first < base + KEY_TILE && r.last >= base {
                active[n] = i;
                queries[n] = &q[r.at..r.at + hd];
                n += 1;
            }
        }
        S::scores(tile, hd, &queries[..n], &mut s[..n]);
        if E::SCALED {
            let key_scales = &src.scales.keys[slot..slot + KEY_TILE];
            for si in &mut s[..n] {
                for (v, &ks) in si.iter_mut().zip(key_scales) {
                    *v *= ks;
                }
            }
        }
        for (&i, si) in active[..n].iter().zip(&mut s[..n]) {
            let r = rows[i];
            let from = r.first.saturating_sub(base);
            let to = (r.last - base).min(KEY_TILE - 1);
            let alpha = S::softmax_block(si, from..=to, scale, &mut max[i], &mut sums[i], &mut p);
            if E::SCALED {
                // The sums took the weights; the values take them scaled.
                for (pj, &vs) in p.iter_mut().zip(&src.scales.values[slot..slot + KEY_TILE]) {
                    *pj *= vs;
                }
            }
            S::mix(&mut out[i * hd..(i + 1) * hd], alpha, &p, values);
        }
    }
    for (o, lanes) in out.chunks_exact_mut(hd).zip(&sums[..rows.len()]) {
        let total: f32 = lanes.iter().sum();
        let inv = 1.0 / total;
        for v in o {
            *v *= inv;
        }
    }
}

/// The reference.
struct Scalar;

impl Steps for Scalar {
    fn scores<E: KvElement>(tile: &[E], hd: usize, queries: &[&[f32]], s: &mut [[f32; KEY_TILE]]) {
        for (qi, si) in queries.iter().zip(s.iter_mut()) {
            *si = [0.0; KEY_TILE];
            for d in 0..hd {
                let k = &tile[d * KEY_TILE..(d + 1) * KEY_TILE];
                for (v, &kj) in si.iter_mut().zip(k) {
                    *v = qi[d].mul_add(kj.to_f32(), *v);
                }
            }
        }
    }

    fn mix<E: KvElement>(o: &mut [f32], alpha: f32, p: &[f32; KEY_TILE], values: &[E]) {
        let hd = o.len();
        for v in o.iter_mut() {
            *v *= alpha;
        }
        for (j, &pj) in p.iter().enumerate() {
            for (v, &x) in o.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                *v = pj.mul_add(x.to_f32(), *v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KEY_TILE, KvElement, KvLayout, QueryRow, Scalar, Steps, run};
    use crate::exp::{
        exp,
        x86::{exp8, exp16},
    };
    use std::arch::x86_64::*;

    /// [`super::attend`] with AVX2 steps.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; shapes were checked by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_avx2<'a, E: KvElement, L: KvLayout<'a, E>>(
        kv: L,
        scale: f32,
        q: &[f32],
        rows: &[QueryRow],
        out: &mut [f32],
    ) {
        run::<Avx2, E, L>(kv, scale, q, rows, out)
    }

    /// [`super::attend`] with AVX-512 steps.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F (and AVX2, FMA); shapes were checked by the caller.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn attend_avx512<'a, E: KvElement, L: KvLayout<'a, E>>(
        kv: L,
        scale: f32,
        q: &[f32],
        rows: &[QueryRow],
        out: &mut [f32],
    ) {
        run::<Avx512, E, L>(kv, scale, q, rows, out)
    }

    struct Avx2;
    struct Avx512;

    /// AVX2 scores of `R` rows (`R` known at compile time, so the
    /// accumulators stay in registers).
    ///
    /// # Safety
    /// AVX2 and FMA are enabled; each query holds `hd` values and the tile `hd * 16`.
    #[inline(always)]
    unsafe fn scores_avx2<const R: usize, E: KvElement>(
        tile: &[E],
        hd: usize,
        qs: &[&[f32]],
        ss: &mut [[f32; KEY_TILE]],
    ) {
        // SAFETY: within the query rows and the tile (caller).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for d in 0..hd {
                let k0 = E::load8(tile.as_ptr().add(d * KEY_TILE));
                let k1 = E::load8(tile.as_ptr().add(d * KEY_TILE + 8));
                for (a, qi) in acc.iter_mut().zip(qs) {
                    let x = _mm256_set1_ps(*qi.get_unchecked(d));
                    a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, k1, a[1]);
                }
            }
            for (a, si) in acc.iter().zip(ss.iter_mut()) {
                _mm256_storeu_ps(si.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(si.as_mut_ptr().add(8), a[1]);
            }
        }
    }

    /// AVX-512 scores of `R` rows.
    ///
    /// # Safety
    /// AVX-512 F is enabled; each query holds `hd` values and the tile `hd * 16`.
    #[inline(always)]
    unsafe fn scores_avx512<const R: usize, E: KvElement>(
        tile: &[E],
        hd: usize,
        qs: &[&[f32]],
        ss: &mut [[f32; KEY_TILE]],
    ) {
        // SAFETY: within the query rows and the tile (caller).
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            for d in 0..hd {
                let k = E::load16(tile.as_ptr().add(d * KEY_TILE));
                for (a, qi) in acc.iter_mut().zip(qs) {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*qi.get_unchecked(d)), k, *a);
                }
            }
            for (a, si) in acc.iter().zip(ss.iter_mut()) {
                _mm512_storeu_ps(si.as_mut_ptr(), *a);
            }
        }
    }

    impl Steps for Avx2 {
        #[inline(always)]
        fn softmax_block(
            s: &mut [f32; KEY_TILE],
            lanes: std::ops::RangeInclusive<usize>,
            scale: f32,
            max: &mut f32,
            sums: &mut [f32; KEY_TILE],
            p: &mut [f32; KEY_TILE],
        ) -> f32 {
            let (from, to) = (*lanes.start() as i32, *lanes.end() as i32);
            // SAFETY: AVX2 and FMA are enabled in every caller; 16 lanes each.
            unsafe {
                let mut v = [_mm256_setzero_ps(); 2];
                let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
                for (h, vh) in v.iter_mut().enumerate() {
                    let j = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                    let j = _mm256_add_epi32(j, _mm256_set1_epi32(8 * h as i32));
                    let inside = _mm256_andnot_si256(
                        _mm256_cmpgt_epi32(_mm256_set1_epi32(from), j),
                        _mm256_cmpgt_epi32(_mm256_set1_epi32(to + 1), j),
                    );
                    let scaled = _mm256_mul_ps(
                        _mm256_loadu_ps(s.as_ptr().add(8 * h)),
                        _mm256_set1_ps(scale),
                    );
                    *vh = _mm256_blendv_ps(
                        _mm256_set1_ps(f32::NEG_INFINITY),
                        scaled,
                        _mm256_castsi256_ps(inside),
                    );
                    _mm256_storeu_ps(s.as_mut_ptr().add(8 * h), *vh);
                    m = _mm256_max_ps(m, *vh);
                }
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let block_max = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
                let new_max = max.max(block_max);
                let alpha = exp(*max - new_max);
                *max = new_max;
                for (h, vh) in v.iter().enumerate() {
                    let e = exp8(_mm256_sub_ps(*vh, _mm256_set1_ps(new_max)));
                    _mm256_storeu_ps(p.as_mut_ptr().add(8 * h), e);
                    let l = _mm256_loadu_ps(sums.as_ptr().add(8 * h));
                    let l = _mm256_fmadd_ps(l, _mm256_set1_ps(alpha), e);
                    _mm256_storeu_ps(sums.as_mut_ptr().add(8 * h), l);
                }
                alpha
            }
        }

        #[inline(always)]
        fn scores<E: KvElement>(
            tile: &[E],
            hd: usize,
            queries: &[&[f32]],
            s: &mut [[f32; KEY_TILE]],
        ) {
            assert!(tile.len() >= hd * KEY_TILE);
            for (qs, ss) in queries.chunks(4).zip(s.chunks_mut(4)) {
                // SAFETY: AVX2 and FMA are enabled in every caller
                // (`attend_avx2`); each query holds `hd` values and the tile
                // `hd * 16` (asserted).
                unsafe {
                    match qs.len() {
                        4 => scores_avx2::<4, E>(tile, hd, qs, ss),
                        3 => scores_avx2::<3, E>(tile, hd, qs, ss),
                        2 => scores_avx2::<2, E>(tile, hd, qs, ss),
                        _ => scores_avx2::<1, E>(tile, hd, qs, ss),
                    }
                }
            }
        }

        #[inline(always)]
        fn mix<E: KvElement>(o: &mut [f32], alpha: f32, p: &[f32; KEY_TILE], values: &[E]) {
            let hd = o.len();
            if !hd.is_multiple_of(8) {
                return Scalar::mix(o, alpha, p, values);
            }
            assert!(values.len() >= KEY_TILE * hd);
            let mut d = 0;
            while d < hd {
                // SAFETY: AVX2 and FMA are enabled in every caller; the
                // pieces lie within `o` and the 16 value rows (asserted).
                unsafe {
                    d += match (hd - d) / 8 {
                        4.. => mix_avx2::<4, E>(o, d, alpha, p, values),
                        3 => mix_avx2::<3, E>(o, d, alpha, p, values),
                        2 => mix_avx2::<2, E>(o, d, alpha, p, values),
                        _ => mix_avx2::<1, E>(o, d, alpha, p, values),
                    };
                }
            }
        }
    }

    /// The mix on dimensions `d..d + 8W` of `o`; returns `8W`.
    ///
    /// # Safety
    /// AVX2 and FMA are enabled; `d + 8W <= o.len()`, `values` holds 16 rows of `o.len()`.
    #[inline(always)]
    unsafe fn mix_avx2<const W: usize, E: KvElement>(
        o: &mut [f32],
        d: usize,
        alpha: f32,
        p: &[f32; KEY_TILE],
        values: &[E],
    ) -> usize {
        let hd = o.len();
        // SAFETY: within `o` and the value rows (caller).
        unsafe {
            let a = _mm256_set1_ps(alpha);
            let mut acc = [_mm256_setzero_ps(); W];
            for (w, v) in acc.iter_mut().enumerate() {
                *v = _mm256_mul_ps(_mm256_loadu_ps(o.as_ptr().add(d + 8 * w)), a);
            }
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm256_set1_ps(pj);
                let row = values.as_ptr().add(j * hd + d);
                for (w, v) in acc.iter_mut().enumerate() {
                    *v = _mm256_fmadd_ps(pv, E::load8(row.add(8 * w)), *v);
                }
            }
            for (w, v) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(d + 8 * w), *v);
            }
        }
        8 * W
    }

    /// The mix on dimensions `d..d + 16W` of `o`; returns `16W`.
    ///
    /// # Safety
    /// AVX-512 F is enabled; `d + 16W <= o.len()`, `values` holds 16 rows of `o.len()`.
    #[inline(always)]
    unsafe fn mix_avx512<const W: usize, E: KvElement>(
        o: &mut [f32],
        d: usize,
        alpha: f32,
        p: &[f32; KEY_TILE],
        values: &[E],
    ) -> usize {
        let hd = o.len();
        // SAFETY: within `o` and the value rows (caller).
        unsafe {
            let a = _mm512_set1_ps(alpha);
            let mut acc = [_mm512_setzero_ps(); W];
            for (w, v) in acc.iter_mut().enumerate() {
                *v = _mm512_mul_ps(_mm512_loadu_ps(o.as_ptr().add(d + 16 * w)), a);
            }
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm512_set1_ps(pj);
                let row = values.as_ptr().add(j * hd + d);
                for (w, v) in acc.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(pv, E::load16(row.add(16 * w)), *v);
                }
            }
            for (w, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.as_mut_ptr().add(d + 16 * w), *v);
            }
        }
        16 * W
    }

    impl Steps for Avx512 {
        #[inline(always)]
        fn scores<E: KvElement>(
            tile: &[E],
            hd: usize,
            queries: &[&[f32]],
            s: &mut [[f32; KEY_TILE]],
        ) {
            assert!(tile.len() >= hd * KEY_TILE);
            for (qs, ss) in queries.chunks(8).zip(s.chunks_mut(8)) {
                // SAFETY: AVX-512 F is enabled in every caller
                // (`attend_avx512`); each query holds `hd` values and the
                // tile `hd * 16` (asserted).
                unsafe {
                    match qs.len() {
                        8 => scores_avx512::<8, E>(tile, hd, qs, ss),
                        7 => scores_avx512::<7, E>(tile, hd, qs, ss),
                        6 => scores_avx512::<6, E>(tile, hd, qs, ss),
                        5 => scores_avx512::<5, E>(tile, hd, qs, ss),
                        4 => scores_avx512::<4, E>(tile, hd, qs, ss),
                        3 => scores_avx512::<3, E>(tile, hd, qs, ss),
                        2 => scores_avx512::<2, E>(tile, hd, qs, ss),
                        _ => scores_avx512::<1, E>(tile, hd, qs, ss),
                    }
                }
            }
        }

        #[inline(always)]
        fn softmax_block(
            s: &mut [f32; KEY_TILE],
            lanes: std::ops::RangeInclusive<usize>,
            scale: f32,
            max: &mut f32,
            sums: &mut [f32; KEY_TILE],
            p: &mut [f32; KEY_TILE],
        ) -> f32 {
            let (from, to) = (*lanes.start(), *lanes.end());
            let keep = ((1u32 << (to + 1)) - (1u32 << from)) as u16;
            // SAFETY: AVX-512 F is enabled in every caller; 16 lanes each.
            unsafe {
                let v = _mm512_mask_mul_ps(
                    _mm512_set1_ps(f32::NEG_INFINITY),
                    keep,
                    _mm512_loadu_ps(s.as_ptr()),
                    _mm512_set1_ps(scale),
                );
                _mm512_storeu_ps(s.as_mut_ptr(), v);
                let new_max = max.max(_mm512_reduce_max_ps(v));
                let alpha = exp(*max - new_max);
                *max = new_max;
                let e = exp16(_mm512_sub_ps(v, _mm512_set1_ps(new_max)));
                _mm512_storeu_ps(p.as_mut_ptr(), e);
                let l = _mm512_fmadd_ps(_mm512_loadu_ps(sums.as_ptr()), _mm512_set1_ps(alpha), e);
                _mm512_storeu_ps(sums.as_mut_ptr(), l);
                alpha
            }
        }

        #[inline(always)]
        fn mix<E: KvElement>(o: &mut [f32], alpha: f32, p: &[f32; KEY_TILE], values: &[E]) {
            let hd = o.len();
            if !hd.is_multiple_of(16) {
                return Avx2::mix(o, alpha, p, values);
            }
            assert!(values.len() >= KEY_TILE * hd);
            let mut d = 0;
            while d < hd {
                // SAFETY: AVX-512 F is enabled in every caller; the pieces
                // lie within `o` and the 16 value rows (asserted).
                unsafe {
                    d += match (hd - d) / 16 {
                        8.. => mix_avx512::<8, E>(o, d, alpha, p, values),
                        4..=7 => mix_avx512::<4, E>(o, d, alpha, p, values),
                        2 | 3 => mix_avx512::<2, E>(o, d, alpha, p, values),
                        _ => mix_avx512::<1, E>(o, d, alpha, p, values),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Five random queries, row `i` seeing positions `i..=slots - 1 - 2i`.
    fn five_queries(hd: usize, slots: usize, seed: &mut u64) -> (usize, Vec<f32>, Vec<QueryRow>) {
        let n_rows = 5;
        let q = (0..n_rows * hd).map(|_| lcg(seed)).collect();
        let rows = (0..n_rows)
            .map(|i| QueryRow {
                at: i * hd,
                first: i,
                last: slots - 1 - 2 * i,
            })
            .collect();
        (n_rows, q, rows)
    }

    /// A writable view of an f32 or bf16 head.
    fn unscaled<'a, E>(keys: &'a mut [E], values: &'a mut [E]) -> KvHeadMut<'a, E> {
        KvHeadMut {
            keys,
            values,
            key_scales: &mut [],
            value_scales: &mut [],
        }
    }

    /// Softmax attention in f64, positions in order.
    fn reference(
        kv: &KvHead<'_>,
        keys: &[Vec<f32>],
        scale: f32,
        q: &[f32],
        row: QueryRow,
    ) -> Vec<f64> {
        let hd = kv.head_dim;
        let qr = &q[row.at..row.at + hd];
        let scores: Vec<f64> = (row.first..=row.last)
            .map(|p| {
                let k = &keys[p];
                qr.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut out = vec![0f64; hd];
        for (i, p) in (row.first..=row.last).enumerate() {
            let slot = p % kv.slots;
            for (o, &v) in out.iter_mut().zip(&kv.values[slot * hd..(slot + 1) * hd]) {
                *o += w[i] / total * v as f64;
            }
        }
        out
    }

    /// Every path against an f64 softmax, each row's result independent of
    /// the rows beside it (bit for bit), and the SIMD paths equal to the
    /// scalar reference (bit for bit: same operations, same order).
    #[test]
    fn every_path_matches_the_reference_and_rows_are_independent() {
        let mut seed = 5;
        for &(hd, slots, wrap) in &[
            (128, 64, false),
            (64, 48, true),
            (8, 32, false),
            (12, 16, true),
            (48, 80, false),
        ] {
            // Positions written: a ring wraps once when `wrap`.
            let written = if wrap { slots + slots / 2 } else { slots };
            let keys_by_pos: Vec<Vec<f32>> = (0..written)
                .map(|_| (0..hd).map(|_| 2.0 * lcg(&mut seed)).collect())
                .collect();
            let mut keys = vec![0f32; slots * hd];
            let mut values = vec![0f32; slots * hd];
            for (p, k) in keys_by_pos.iter().enumerate() {
                let v: Vec<f32> = (0..hd).map(|_| lcg(&mut seed)).collect();
                store(unscaled(&mut keys, &mut values), slots, p, k, &v);
            }
            let kv = KvHead::new(&keys, &values, Scales::default(), slots, hd);
            let n_rows = 11;
            let q: Vec<f32> = (0..n_rows * hd).map(|_| lcg(&mut seed)).collect();
            let oldest = written - slots;
            let rows: Vec<QueryRow> = (0..n_rows)
                .map(|i| {
                    let last = written - 1 - (i * 7) % (slots / 2);
                    let first = (oldest + (i * 5) % 9).min(last);
                    QueryRow {
                        at: i * hd,
                        first,
                        last,
                    }
                })
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let mut want = vec![0f32; n_rows * hd];
            attend(Isa::Scalar, kv, scale, &q, &rows, &mut want);
            for (i, row) in rows.iter().enumerate() {
                let exact = reference(&kv, &keys_by_pos, scale, &q, *row);
                for (a, b) in want[i * hd..(i + 1) * hd].iter().zip(&exact) {
                    assert!((*a as f64 - b).abs() < 2e-6, "hd={hd} row {i}: {a} vs {b}");
                }
            }
            for isa in Isa::supported() {
                let mut all = vec![f32::NAN; n_rows * hd];
                attend(isa, kv, scale, &q, &rows, &mut all);
                assert_eq!(
                    all, want,
                    "{isa:?} hd={hd}: differs from the scalar reference"
                );
                for (i, row) in rows.iter().enumerate() {
                    let mut alone = vec![f32::NAN; hd];
                    attend(isa, kv, scale, &q, &[*row], &mut alone);
                    assert_eq!(
                        alone[..],
                        all[i * hd..(i + 1) * hd],
                        "{isa:?} hd={hd} row {i}"
                    );
                }
            }
        }
    }

    /// A bf16 cache stores each value rounded to bf16 and reads it back
    /// exactly: on every path it gives bit for bit what an f32 cache holding
    /// the rounded values gives.
    #[test]
    fn a_bf16_cache_equals_an_f32_cache_of_rounded_values() {
        let mut seed = 9;
        for &(hd, slots) in &[(128, 48), (64, 32), (12, 16)] {
            let (mut kb, mut vb) = (vec![bf16::ZERO; slots * hd], vec![bf16::ZERO; slots * hd]);
            let (mut kr, mut vr) = (vec![0f32; slots * hd], vec![0f32; slots * hd]);
            let round =
                |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect() };
            let mut changed = 0;
            for p in 0..slots {
                let k: Vec<f32> = (0..hd).map(|_| 2.0 * lcg(&mut seed)).collect();
                let v: Vec<f32> = (0..hd).map(|_| lcg(&mut seed)).collect();
                store(unscaled(&mut kb, &mut vb), slots, p, &k, &v);
                let (k2, v2) = (round(&k), round(&v));
                changed += k.iter().zip(&k2).filter(|(a, b)| a != b).count();
                store(unscaled(&mut kr, &mut vr), slots, p, &k2, &v2);
            }
            assert!(
                changed > slots * hd / 2,
                "the rounding must change most keys"
            );
            let (n_rows, q, rows) = five_queries(hd, slots, &mut seed);
            let scale = 1.0 / (hd as f32).sqrt();
            for isa in Isa::supported() {
                let (mut a, mut b) = (vec![f32::NAN; n_rows * hd], vec![f32::NAN; n_rows * hd]);
                let none = Scales::default();
                let bf = KvHead::new(&kb, &vb, none, slots, hd);
                attend(isa, bf, scale, &q, &rows, &mut a);
                let rounded = KvHead::new(&kr, &vr, none, slots, hd);
                attend(isa, rounded, scale, &q, &rows, &mut b);
                assert_eq!(a, b, "{isa:?} hd={hd}");
            }
        }
    }

    /// An int8 cache: every path gives the scalar reference's bits; the
    /// result is what an f32 cache of the dequantized values gives (up to
    /// where the scales are applied); and the codes are the nearest, so the
    /// error against the exact values stays within what rounding allows.
    #[test]
    fn an_int8_cache_matches_its_dequantized_values_on_every_path() {
        let mut seed = 13;
        for &(hd, slots) in &[(128, 48), (64, 32), (12, 16)] {
            let n = slots * hd;
            let (mut kq, mut vq) = (vec![0i8; n], vec![0i8; n]);
            let (mut ks, mut vs) = (vec![0f32; slots], vec![0f32; slots]);
            let (mut kd, mut vd) = (vec![0f32; n], vec![0f32; n]);
            let (mut kx, mut vx) = (vec![0f32; n], vec![0f32; n]);
            for p in 0..slots {
                // Magnitudes that differ by position, as real keys do.
                let spread = 0.1 + (p % 5) as f32;
                let k: Vec<f32> = (0..hd).map(|_| spread * lcg(&mut seed)).collect();
                let v: Vec<f32> = (0..hd).map(|_| lcg(&mut seed)).collect();
                let head = KvHeadMut {
                    keys: &mut kq,
                    values: &mut vq,
                    key_scales: &mut ks,
                    value_scales: &mut vs,
                };
                store(head, slots, p, &k, &v);
                let (k_s, v_s) = (ks[p % slots], vs[p % slots]);
                let kdeq: Vec<f32> = (0..hd)
                    .map(|d| kq[key_index(slots, hd, p, d)] as f32 * k_s)
                    .collect();
                let vdeq: Vec<f32> = (0..hd).map(|d| vq[p * hd + d] as f32 * v_s).collect();
                for d in 0..hd {
                    assert!(
                        (kdeq[d] - k[d]).abs() <= 0.5 * k_s * 1.0001,
                        "key code {p},{d}"
                    );
                    assert!(
                        (vdeq[d] - v[d]).abs() <= 0.5 * v_s * 1.0001,
                        "value code {p},{d}"
                    );
                }
                store(unscaled(&mut kd, &mut vd), slots, p, &kdeq, &vdeq);
                store(unscaled(&mut kx, &mut vx), slots, p, &k, &v);
            }
            let (n_rows, q, rows) = five_queries(hd, slots, &mut seed);
            let scale = 1.0 / (hd as f32).sqrt();
            let scales = Scales {
                keys: &ks,
                values: &vs,
            };
            let q8 = KvHead::new(&kq, &vq, scales, slots, hd);
            let mut want = vec![f32::NAN; n_rows * hd];
            attend(Isa::Scalar, q8, scale, &q, &rows, &mut want);
            let none = Scales::default();
            let (mut deq, mut exact) = (vec![0f32; n_rows * hd], vec![0f32; n_rows * hd]);
            attend(
                Isa::Scalar,
                KvHead::new(&kd, &vd, none, slots, hd),
                scale,
                &q,
                &rows,
                &mut deq,
            );
            attend(
                Isa::Scalar,
                KvHead::new(&kx, &vx, none, slots, hd),
                scale,
                &q,
                &rows,
                &mut exact,
            );
            let (mut worst_deq, mut worst_exact) = (0f32, 0f32);
            for ((a, b), c) in want.iter().zip(&deq).zip(&exact) {
                worst_deq = worst_deq.max((a - b).abs());
                worst_exact = worst_exact.max((a - c).abs());
            }
            // Shown with `--nocapture`, to review the bounds.
            eprintln!(
                "int8 cache hd={hd}: max |Δ| {worst_deq:.1e} vs dequantized, {worst_exact:.1e} vs exact"
            );
            assert!(
                worst_deq <= 1e-6,
                "hd={hd}: {worst_deq} from the dequantized cache"
            );
            // Values are within [-1, 1]: 8 bits leave errors near 1/254.
            assert!(
                worst_exact <= 6e-3,
                "hd={hd}: {worst_exact} from the exact cache"
            );
            assert!(worst_exact > 1e-5, "hd={hd}: the codes must lose something");
            for isa in Isa::supported() {
                let mut got = vec![f32::NAN; n_rows * hd];
                attend(isa, q8, scale, &q, &rows, &mut got);
                assert_eq!(got, want, "{isa:?} hd={hd}");
            }
        }
    }

    /// Positions read from a tail give bit for bit what a cache holding
    /// them gives, on every path and for scaled caches too; the main
    /// cache's entries there are not read.
    #[test]
    fn a_tail_reads_as_a_cache_holding_its_positions() {
        let mut seed = 21;
        let (hd, slots, tail_slots) = (24, 64, 32);
        let from = 32;
        let written = 52;
        let fill = |seed: &mut u64| -> Vec<Vec<f32>> {
            (0..written)
                .map(|_| (0..hd).map(|_| 2.0 * lcg(seed)).collect())
                .collect()
        };
        let (true_keys, true_values) = (fill(&mut seed), fill(&mut seed));
        let (junk_keys, junk_values) = (fill(&mut seed), fill(&mut seed));
        fn scaled<'a>(
            k: &'a mut [i8],
            v: &'a mut [i8],
            ks: &'a mut [f32],
            vs: &'a mut [f32],
        ) -> KvHeadMut<'a, i8> {
            KvHeadMut {
                keys: k,
                values: v,
                key_scales: ks,
                value_scales: vs,
            }
        }
        // The whole sequence in one cache; the main cache with other entries
        // from `from` on; the tail with the true ones there.
        let (mut k, mut v) = (vec![0i8; slots * hd], vec![0i8; slots * hd]);
        let (mut ks, mut vs) = (vec![0f32; slots], vec![0f32; slots]);
        let (mut mk, mut mv) = (vec![0i8; slots * hd], vec![0i8; slots * hd]);
        let (mut mks, mut mvs) = (vec![0f32; slots], vec![0f32; slots]);
        let (mut tk, mut tv) = (vec![0i8; tail_slots * hd], vec![0i8; tail_slots * hd]);
        let (mut tks, mut tvs) = (vec![0f32; tail_slots], vec![0f32; tail_slots]);
        let (mut fk, mut fv) = (vec![0f32; slots * hd], vec![0f32; slots * hd]);
        let (mut fmk, mut fmv) = (vec![0f32; slots * hd], vec![0f32; slots * hd]);
        let (mut ftk, mut ftv) = (vec![0f32; tail_slots * hd], vec![0f32; tail_slots * hd]);
        for p in 0..written {
            let (key, value) = (&true_keys[p], &true_values[p]);
            store(
                scaled(&mut k, &mut v, &mut ks, &mut vs),
                slots,
                p,
                key,
                value,
            );
            store(unscaled(&mut fk, &mut fv), slots, p, key, value);
            let (mkey, mvalue) = if p < from {
                (key, value)
            } else {
                (&junk_keys[p], &junk_values[p])
            };
            store(
                scaled(&mut mk, &mut mv, &mut mks, &mut mvs),
                slots,
                p,
                mkey,
                mvalue,
            );
            store(unscaled(&mut fmk, &mut fmv), slots, p, mkey, mvalue);
            if p >= from {
                store(
                    scaled(&mut tk, &mut tv, &mut tks, &mut tvs),
                    tail_slots,
                    p,
                    key,
                    value,
                );
                store(unscaled(&mut ftk, &mut ftv), tail_slots, p, key, value);
            }
        }
        let n_rows = 6;
        let q: Vec<f32> = (0..n_rows * hd).map(|_| lcg(&mut seed)).collect();
        // Rows ending before, at and after `from`, some starting late.
        let rows: Vec<QueryRow> = (0..n_rows)
            .map(|i| QueryRow {
                at: i * hd,
                first: (i * 7) % 20,
                last: 20 + i * 6,
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let none = Scales::default();
        let q8 = |k, v, keys, values, n| KvHead::new(k, v, Scales { keys, values }, n, hd);
        let whole = q8(&k, &v, &ks, &vs, slots);
        let main = q8(&mk, &mv, &mks, &mvs, slots);
        let tail = WithTail {
            main,
            from,
            tail: q8(&tk, &tv, &tks, &tvs, tail_slots),
        };
        let fwhole = KvHead::new(&fk, &fv, none, slots, hd);
        let fmain = KvHead::new(&fmk, &fmv, none, slots, hd);
        let ftail = WithTail {
            main: fmain,
            from,
            tail: KvHead::new(&ftk, &ftv, none, tail_slots, hd),
        };
        for isa in Isa::supported() {
            let mut want = vec![f32::NAN; n_rows * hd];
            let mut got = vec![f32::NAN; n_rows * hd];
            let mut stale = vec![f32::NAN; n_rows * hd];
            attend(isa, whole, scale, &q, &rows, &mut want);
            attend_in(isa, tail, scale, &q, &rows, &mut got);
            attend(isa, main, scale, &q, &rows, &mut stale);
            assert_eq!(got, want, "{isa:?} int8");
            assert_ne!(
                stale, want,
                "{isa:?}: the main cache's later entries must matter"
            );
            attend(isa, fwhole, scale, &q, &rows, &mut want);
            attend_in(isa, ftail, scale, &q, &rows, &mut got);
            assert_eq!(got, want, "{isa:?} f32");
        }
    }

    /// A cache cut into pages, held out of order in buffers of their own,
    /// gives bit for bit what the whole cache gives, on every path, for
    /// f32 and int8 entries; a row past the pages held is a bug.
    #[test]
    fn pages_read_as_one_cache() {
        let mut seed = 33;
        let (hd, page_len, n_pages) = (40, 32, 4);
        let slots = page_len * n_pages;
        let written = slots - 7;
        let (mut fk, mut fv) = (vec![0f32; slots * hd], vec![0f32; slots * hd]);
        let (mut qk, mut qv) = (vec![0i8; slots * hd], vec![0i8; slots * hd]);
        let (mut qks, mut qvs) = (vec![0f32; slots], vec![0f32; slots]);
        // Page `i` in buffer `order[i]`.
        let order = [2usize, 0, 3, 1];
        let mut pk = vec![vec![0f32; page_len * hd]; n_pages];
        let mut pv = pk.clone();
        let mut pqk = vec![vec![0i8; page_len * hd]; n_pages];
        let mut pqv = pqk.clone();
        let mut pqks = vec![vec![0f32; page_len]; n_pages];
        let mut pqvs = pqks.clone();
        for p in 0..written {
            let k: Vec<f32> = (0..hd).map(|_| 2.0 * lcg(&mut seed)).collect();
            let v: Vec<f32> = (0..hd).map(|_| lcg(&mut seed)).collect();
            store(unscaled(&mut fk, &mut fv), slots, p, &k, &v);
            let whole = KvHeadMut {
                keys: &mut qk,
                values: &mut qv,
                key_scales: &mut qks,
                value_scales: &mut qvs,
            };
            store(whole, slots, p, &k, &v);
            let b = order[p / page_len];
            store(unscaled(&mut pk[b], &mut pv[b]), page_len, p, &k, &v);
            let page = KvHeadMut {
                keys: &mut pqk[b],
                values: &mut pqv[b],
                key_scales: &mut pqks[b],
                value_scales: &mut pqvs[b],
            };
            store(page, page_len, p, &k, &v);
        }
        let n_rows = 7;
        let q: Vec<f32> = (0..n_rows * hd).map(|_| lcg(&mut seed)).collect();
        // Rows within one page, across two, and over all of them.
        let rows: Vec<QueryRow> = (0..n_rows)
            .map(|i| QueryRow {
                at: i * hd,
                first: (i * 19) % 50,
                last: (50 + i * 11).min(written - 1),
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let none = Scales::default();
        let f_paged = KvPaged {
            page_len,
            pages: n_pages,
            head_dim: hd,
            page: |i: usize| KvHead::new(&pk[order[i]], &pv[order[i]], none, page_len, hd),
        };
        let q_paged = KvPaged {
            page_len,
            pages: n_pages,
            head_dim: hd,
            page: |i: usize| {
                let b = order[i];
                let scales = Scales {
                    keys: &pqks[b],
                    values: &pqvs[b],
                };
                KvHead::new(&pqk[b], &pqv[b], scales, page_len, hd)
            },
        };
        let f_whole = KvHead::new(&fk, &fv, none, slots, hd);
        let scales = Scales {
            keys: &qks,
            values: &qvs,
        };
        let q_whole = KvHead::new(&qk, &qv, scales, slots, hd);
        for isa in Isa::supported() {
            let mut want = vec![f32::NAN; n_rows * hd];
            let mut got = vec![f32::NAN; n_rows * hd];
            attend(isa, f_whole, scale, &q, &rows, &mut want);
            attend_in(isa, f_paged, scale, &q, &rows, &mut got);
            assert_eq!(got, want, "{isa:?} f32");
            attend(isa, q_whole, scale, &q, &rows, &mut want);
            attend_in(isa, q_paged, scale, &q, &rows, &mut got);
            assert_eq!(got, want, "{isa:?} int8");
        }
        let beyond = QueryRow {
            at: 0,
            first: 0,
            last: slots,
        };
        let caught = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; hd];
            attend_in(Isa::Scalar, f_paged, scale, &q, &[beyond], &mut out);
        });
        assert!(caught.is_err(), "a row past the last page must be refused");
    }

    #[test]
    #[should_panic(expected = "the cache does not hold")]
    fn a_row_wider_than_the_cache_is_a_bug() {
        let (keys, values) = (vec![0f32; 16 * 4], vec![0f32; 16 * 4]);
        let kv = KvHead::new(&keys, &values, Scales::default(), 16, 4);
        let row = QueryRow {
            at: 0,
            first: 0,
            last: 16,
        };
        attend(Isa::Scalar, kv, 1.0, &[0.0; 4], &[row], &mut [0.0; 4]);
    }
}
