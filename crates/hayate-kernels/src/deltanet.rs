//! The gated delta rule of Gated DeltaNet layers, for one head.
//!
//! The state `S` is a `dk × dv` matrix (row `r` belongs to key dimension
//! `r`). Per token, with decay `e = exp(g)` and write strength `β`:
//!
//! ```text
//! S ← e·S;  δ = β·(v − Sᵀk);  S ← S + k δᵀ;  o = Sᵀq
//! ```
//!
//! [`delta_step`] is that recurrence (decode). [`delta_chunk`] computes the
//! same outputs and final state for up to [`CHUNK`] tokens at once from the
//! chunk's starting state (prefill): with `Γᵢ = exp(Σ_{j≤i} g_j)`,
//!
//! ```text
//! uᵢ = βᵢ (vᵢ − Γᵢ S₀ᵀkᵢ − Σ_{j<i} (Γᵢ/Γⱼ)(kᵢ·kⱼ) uⱼ)
//! oᵢ = Γᵢ S₀ᵀqᵢ + Σ_{j≤i} (Γᵢ/Γⱼ)(qᵢ·kⱼ) uⱼ
//! S  = Γ_c S₀ + Σⱼ (Γ_c/Γⱼ) kⱼ uⱼᵀ
//! ```
//!
//! where `uᵢ` is exactly the `δ` of token `i` in the recurrence, so the two
//! forms agree up to rounding.

use crate::cpu::Isa;
use crate::ops;
use crate::weights::{MatRef, WeightSlice};
use crate::{holds, is_product};

/// Most tokens [`delta_chunk`] takes at once.
pub const CHUNK: usize = 64;

/// One token of the recurrence: reads the state `prev`, writes the updated
/// state to `next` and the output to `out` (`dv` values). `delta` is
/// `dv` values of scratch.
#[allow(clippy::too_many_arguments)]
pub fn delta_step(
    isa: Isa,
    prev: &[f32],
    next: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: f32,
    g: f32,
    out: &mut [f32],
    delta: &mut [f32],
) {
    let (dk, dv) = (k.len(), v.len());
    assert!(is_product(prev.len(), dk, dv) && is_product(next.len(), dk, dv) && q.len() == dk);
    assert!(out.len() == dv && delta.len() == dv);
    let e = g.exp();
    // δ = β (v − e·Sᵀk)
    delta.fill(0.0);
    for (row, &kr) in prev.chunks_exact(dv).zip(k) {
        ops::axpy(isa, e * kr, row, delta);
    }
    for (d, &vv) in delta.iter_mut().zip(v) {
        *d = beta * (vv - *d);
    }
    out.fill(0.0);
    for (((p, n), &kr), &qr) in prev
        .chunks_exact(dv)
        .zip(next.chunks_exact_mut(dv))
        .zip(k)
        .zip(q)
    {
        update_row(isa, p, n, e, kr, delta, qr, out);
    }
}

/// `next = e·prev + kr·delta; out += qr·next` for one state row.
#[allow(clippy::too_many_arguments)]
#[inline]
fn update_row(
    isa: Isa,
    prev: &[f32],
    next: &mut [f32],
    e: f32,
    kr: f32,
    delta: &[f32],
    qr: f32,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        isa if isa.has_avx2() => {
            // SAFETY: the CPU supports AVX2 and FMA (checked); all slices are `dv` long
            // (checked by the caller's asserts).
            unsafe { avx2::update_row(prev, next, e, kr, delta, qr, out) }
        }
        _ => {
            for (((&p, n), &d), o) in prev.iter().zip(next.iter_mut()).zip(delta).zip(out) {
                let s = e * p + kr * d;
                *n = s;
                *o += qr * s;
            }
        }
    }
}

/// Scratch for [`delta_chunk`], sized for one head.
pub struct ChunkScratch {
    /// `S₀ᵀ`, `dv × dk`.
    state_t: Vec<f32>,
    /// The chunk's keys then queries, `2c × dk`.
    keys_queries: Vec<f32>,
    /// `[K; Q]·S₀`, `2c × dv`.
    projected: Vec<f32>,
    /// `[K; Q]·Kᵀ`, `2c × c`.
    gram: Vec<f32>,
    /// The decayed, causal `Q·Kᵀ`, `c × c`.
    mix: Vec<f32>,
    /// The `u` of every token, `c × dv`, and its transpose.
    u: Vec<f32>,
    u_t: Vec<f32>,
    /// The decayed keys, transposed: `dk × c`.
    keys_t: Vec<f32>,
    /// `Σⱼ (Γ_c/Γⱼ) kⱼ uⱼᵀ`, `dk × dv`.
    update: Vec<f32>,
    cum: Vec<f32>,
}

impl ChunkScratch {
    /// Scratch for heads with `dk` key and `dv` value dimensions.
    pub fn new(dk: usize, dv: usize) -> Self {
        ChunkScratch {
            state_t: vec![0.0; dv * dk],
            keys_queries: vec![0.0; 2 * CHUNK * dk],
            projected: vec![0.0; 2 * CHUNK * dv],
            gram: vec![0.0; 2 * CHUNK * CHUNK],
            mix: vec![0.0; CHUNK * CHUNK],
            u: vec![0.0; CHUNK * dv],
            u_t: vec![0.0; dv * CHUNK],
            keys_t: vec![0.0; dk * CHUNK],
            update: vec![0.0; dk * dv],
            cum: vec![0.0; CHUNK],
        }
    }
}

/// `y = x·wᵀ` on this thread: `x` is `n × cols`, `w` `rows × cols`, `y`
/// `n × rows` (the products' register-blocked kernels).
fn product(isa: Isa, w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    let w = MatRef::new(WeightSlice::F32(w), rows, cols).expect("product shapes");
    assert!(
        holds(x.len(), n, cols) && holds(y.len(), n, rows),
        "product shapes"
    );
    // SAFETY: `x` holds `n * cols` values and `y` `n * rows` (checked); the
    // rows are all of `w`, and `y` is this thread's alone (a `&mut`).
    unsafe { crate::matmul::matmul_rows(isa, w, x, n, 0..rows, y.as_mut_ptr()) }
}

/// `dst = srcᵀ` for `src` of `rows × cols`.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}

/// Up to [`CHUNK`] tokens at once: `q`, `k` are `c × dk`, `v` and `out`
/// `c × dv`, `beta`, `g` have `c` values; `state` (`dk × dv`) goes from the
/// chunk's start to its end in place.
///
/// The terms of the chunked form are matrix products (`[K; Q]·S₀`,
/// `[K; Q]·Kᵀ`, the decayed causal `Q·Kᵀ` times `U`, and `Kᵀ·diag(w)·U`),
/// run by the register-blocked kernels of [`crate::matmul`]; only the
/// triangular solve for `U` goes token by token.
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk(
    isa: Isa,
    state: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: &[f32],
    out: &mut [f32],
    scratch: &mut ChunkScratch,
) {
    let c = beta.len();
    assert!(c <= CHUNK && g.len() == c);
    let dk = k.len() / c.max(1);
    let dv = v.len() / c.max(1);
    assert!(is_product(q.len(), c, dk) && is_product(k.len(), c, dk));
    assert!(is_product(v.len(), c, dv) && is_product(out.len(), c, dv));
    assert!(is_product(state.len(), dk, dv), "state of {dk} x {dv}");
    assert!(
        scratch.state_t.len() == dk * dv && holds(scratch.u.len(), c, dv),
        "scratch sized for another head"
    );
    if c == 0 {
        return;
    }
    let cum = &mut scratch.cum[..c];
    let mut acc = 0f32;
    for (s, &gi) in cum.iter_mut().zip(g) {
        acc += gi;
        *s = acc;
    }
    // [K; Q]·S₀ (the S₀ terms) and [K; Q]·Kᵀ (the key products).
    transpose(state, dk, dv, &mut scratch.state_t);
    let kq = &mut scratch.keys_queries[..2 * c * dk];
    kq[..c * dk].copy_from_slice(k);
    kq[c * dk..].copy_from_slice(q);
    let projected = &mut scratch.projected[..2 * c * dv];
    product(isa, &scratch.state_t, dv, dk, kq, 2 * c, projected);
    let gram = &mut scratch.gram[..2 * c * c];
    product(isa, k, c, dk, kq, 2 * c, gram);
    let (ks, qs) = projected.split_at(c * dv);
    let (kk, qk) = gram.split_at(c * c);
    // The decays Γᵢ/Γⱼ (j ≤ i, zero above), as exponentials of differences
    // (Γ itself can underflow within a chunk), once for both uses below.
    let mix = &mut scratch.mix[..c * c];
    for i in 0..c {
        for j in 0..c {
            mix[i * c + j] = if j <= i { (cum[i] - cum[j]).exp() } else { 0.0 };
        }
    }
    // uᵢ = βᵢ (vᵢ − Γᵢ (S₀ᵀkᵢ) − Σ_{j<i} (Γᵢ/Γⱼ)(kᵢ·kⱼ) uⱼ), token by token.
    let u = &mut scratch.u[..c * dv];
    for i in 0..c {
        let gamma = cum[i].exp();
        let (done, rest) = u.split_at_mut(i * dv);
        let ui = &mut rest[..dv];
        for (x, &p) in ui.iter_mut().zip(&ks[i * dv..(i + 1) * dv]) {
            *x = -gamma * p;
        }
        for (j, uj) in done.chunks_exact(dv).enumerate() {
            ops::axpy(isa, -mix[i * c + j] * kk[i * c + j], uj, ui);
        }
        for (x, &vv) in ui.iter_mut().zip(&v[i * dv..(i + 1) * dv]) {
            *x = beta[i] * (vv + *x);
        }
    }
    // oᵢ = Γᵢ (S₀ᵀqᵢ) + Σ_{j≤i} (Γᵢ/Γⱼ)(qᵢ·kⱼ) uⱼ: the causal mix times U.
    for (m, &p) in mix.iter_mut().zip(qk.iter()) {
        *m *= p;
    }
    let u_t = &mut scratch.u_t[..dv * c];
    transpose(u, c, dv, u_t);
    product(isa, u_t, dv, c, mix, c, out);
    for (i, oi) in out.chunks_exact_mut(dv).enumerate() {
        let gamma = cum[i].exp();
        for (o, &p) in oi.iter_mut().zip(&qs[i * dv..(i + 1) * dv]) {
            *o += gamma * p;
        }
    }
    // S = Γ_c S₀ + Σⱼ (Γ_c/Γⱼ) kⱼ uⱼᵀ.
    let last = cum[c - 1];
    let keys_t = &mut scratch.keys_t[..dk * c];
    for j in 0..c {
        let w = (last - cum[j]).exp();
        for r in 0..dk {
            keys_t[r * c + j] = w * k[j * dk + r];
        }
    }
    product(isa, u_t, dv, c, keys_t, dk, &mut scratch.update);
    let gamma_c = last.exp();
    for (x, &d) in state.iter_mut().zip(&scratch.update) {
        *x = gamma_c * *x + d;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn update_row(
        prev: &[f32],
        next: &mut [f32],
        e: f32,
        kr: f32,
        delta: &[f32],
        qr: f32,
        out: &mut [f32],
    ) {
        let n = prev.len();
        let body = n - n % 8;
        let (ev, kv, qv) = (_mm256_set1_ps(e), _mm256_set1_ps(kr), _mm256_set1_ps(qr));
        let mut i = 0;
        // SAFETY: i + 8 <= body <= n, and every slice is n long.
        unsafe {
            while i < body {
                let p = _mm256_loadu_ps(prev.as_ptr().add(i));
                let d = _mm256_loadu_ps(delta.as_ptr().add(i));
                let s = _mm256_fmadd_ps(kv, d, _mm256_mul_ps(ev, p));
                _mm256_storeu_ps(next.as_mut_ptr().add(i), s);
                let op = out.as_mut_ptr().add(i);
                _mm256_storeu_ps(op, _mm256_fmadd_ps(qv, s, _mm256_loadu_ps(op)));
                i += 8;
            }
        }
        for j in body..n {
            let s = e * prev[j] + kr * delta[j];
            next[j] = s;
            out[j] += qr * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + 1.0) * (seed as f32 * 0.618 + 0.1)).sin())
            .collect()
    }

    fn normalized(mut x: Vec<f32>, dim: usize) -> Vec<f32> {
        for row in x.chunks_exact_mut(dim) {
            ops::l2_normalize(row, 1e-6);
        }
        x
    }

    /// The recurrence in f64, straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        s0: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        beta: &[f32],
        g: &[f32],
        dk: usize,
        dv: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut s: Vec<f64> = s0.iter().map(|&x| x as f64).collect();
        let mut out = Vec::new();
        for t in 0..beta.len() {
            let e = (g[t] as f64).exp();
            s.iter_mut().for_each(|x| *x *= e);
            for j in 0..dv {
                let kv: f64 = (0..dk).map(|r| s[r * dv + j] * k[t * dk + r] as f64).sum();
                let d = (v[t * dv + j] as f64 - kv) * beta[t] as f64;
                for r in 0..dk {
                    s[r * dv + j] += k[t * dk + r] as f64 * d;
                }
            }
            for j in 0..dv {
                out.push((0..dk).map(|r| s[r * dv + j] * q[t * dk + r] as f64).sum());
            }
        }
        (out, s)
    }

    #[test]
    fn chunk_and_step_match_the_recurrence() {
        // Small heads, and heads wide enough for the products' register
        // blocks and panels to have tails.
        for (dk, dv, n) in [
            (12, 20, 1),
            (12, 20, 5),
            (12, 20, CHUNK - 1),
            (12, 20, CHUNK),
            (48, 72, 37),
            (48, 72, CHUNK),
        ] {
            let q = normalized(pseudo(n * dk, 1), dk);
            let k = normalized(pseudo(n * dk, 2), dk);
            let v = pseudo(n * dv, 3);
            let beta: Vec<f32> = pseudo(n, 4).iter().map(|x| ops::sigmoid(3.0 * x)).collect();
            let g: Vec<f32> = pseudo(n, 5).iter().map(|x| -0.5 * (1.0 + x)).collect();
            let s0 = pseudo(dk * dv, 6);
            let (want_out, want_s) = reference(&s0, &q, &k, &v, &beta, &g, dk, dv);
            for isa in Isa::supported() {
                // Recurrent form.
                let (mut prev, mut next) = (s0.clone(), vec![0f32; dk * dv]);
                let (mut out, mut delta) = (vec![0f32; n * dv], vec![0f32; dv]);
                for t in 0..n {
                    delta_step(
                        isa,
                        &prev,
                        &mut next,
                        &q[t * dk..(t + 1) * dk],
                        &k[t * dk..(t + 1) * dk],
                        &v[t * dv..(t + 1) * dv],
                        beta[t],
                        g[t],
                        &mut out[t * dv..(t + 1) * dv],
                        &mut delta,
                    );
                    std::mem::swap(&mut prev, &mut next);
                }
                close(&out, &want_out, &format!("{isa:?} step out n={n}"));
                close(&prev, &want_s, &format!("{isa:?} step state n={n}"));
                // Chunked form.
                let mut state = s0.clone();
                let mut out = vec![0f32; n * dv];
                let mut scratch = ChunkScratch::new(dk, dv);
                delta_chunk(
                    isa,
                    &mut state,
                    &q,
                    &k,
                    &v,
                    &beta,
                    &g,
                    &mut out,
                    &mut scratch,
                );
                close(&out, &want_out, &format!("{isa:?} chunk out n={n}"));
                close(&state, &want_s, &format!("{isa:?} chunk state n={n}"));
            }
        }
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{what}: [{i}] {a} vs {b}"
            );
        }
    }
}
