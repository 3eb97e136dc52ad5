//! KL-aware refinement of a calibrated quantization: the group scales of
//! every quantized layer of the blocks are tuned end to end, codes and zero
//! points fixed, so that the quantized model's next-token distributions
//! come closer to the float model's on the calibration windows.
//!
//! The objective is the mean KL(float ‖ quantized) over every position of a
//! window. Its exact gradient comes from a backward pass written here over
//! the generic blocks: attention (full or sliding window, q/k norms, biases,
//! partial rotary), the gated MLP and the norms around them, the final norm,
//! the output head and its soft cap. Weights are dense f32 (each quantized
//! layer dequantized and un-rotated after every step); activations of one
//! window are kept for the backward pass. Each scale `s` is parametrised as
//! `s₀·(1 + θ)` and `θ` follows Adam, one window per step; the scales are
//! rounded to bf16 at the end, so the stored format does not change.
//!
//! Recurrent mixers (Gated DeltaNet, short convolutions) and attention's
//! output gate have no backward pass yet: refining such a model is an error.
//!
//! Products run on the kernels' f32 GEMM ([`hayate_kernels::matmul`]);
//! the Hadamard rotation and its inverse are
//! [`hayate_kernels::quant::rotate_rows`] and `unrotate_rows`.

use crate::arch::Translated;
use crate::layers::{Activation, Attention, Block, GatedMlp, Mixer, RmsNorm};
use crate::linear::{Linear, LinearKernel, Signs};
use crate::quantize::{PlannedGroup, replace_layers};
use crate::{EngineError, Result};
use half::bf16;
use hayate_kernels::quant::{QuantLayout, QuantizedMatrix, Rotation, rotate_rows, unrotate_rows};
use hayate_kernels::{Isa, MatRef, ThreadPool, WeightSlice, matmul};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// How long and how fast to refine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refinement {
    /// Optimisation steps, one calibration window each (in order, cycling).
    pub steps: usize,
    /// Adam's step size on each scale's relative change.
    pub lr: f32,
}

impl Refinement {
    /// Adam's step size by default.
    pub const DEFAULT_LR: f32 = 1e-3;

    /// Checks the ranges; the message names the offending value.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(EngineError::Quantize(
                "refinement needs at least one step".into(),
            ));
        }
        if !(self.lr > 0.0 && self.lr <= 0.1) {
            return Err(EngineError::Quantize(format!(
                "the refinement step size must lie in (0, 0.1], not {}",
                self.lr
            )));
        }
        Ok(())
    }
}

/// What refinement did.
#[derive(Clone, Copy, Debug)]
pub struct RefineReport {
    /// Mean KL over the windows of the first quarter of the steps (at most
    /// one pass), each measured before its step, nats.
    pub kl_first: f64,
    /// The same over as many steps at the end, nats.
    pub kl_last: f64,
    /// Wall time.
    pub seconds: f64,
}

/// The threads and instruction set the products run on.
#[derive(Clone, Copy)]
struct Cx<'a> {
    pool: &'a ThreadPool,
    isa: Isa,
}

impl Cx<'_> {
    /// `y = x·wᵀ` for `n` rows of `x`, `w` being `rows x cols` f32.
    fn mm(&self, w: &[f32], (rows, cols): (usize, usize), x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * rows];
        self.mm_ref(f32_mat(w, rows, cols), x, n, &mut y);
        y
    }

    fn mm_ref(&self, w: MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        matmul(self.pool, self.isa, w, x, n, y);
    }
}

fn f32_mat(w: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef::new(WeightSlice::F32(w), rows, cols).expect("sized by the caller")
}

/// `src` (`rows x cols`) transposed.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// A student matrix as the products take it, and transposed for the
/// backward pass.
struct Dense {
    w: Vec<f32>,
    wt: Vec<f32>,
}

impl Dense {
    /// `W` of any layer (un-rotated, dequantized).
    fn of(isa: Isa, l: &Linear) -> Self {
        let mut w = vec![0f32; l.rows * l.cols];
        for (r, row) in w.chunks_exact_mut(l.cols).enumerate() {
            l.row(isa, r, row);
        }
        let wt = transpose(&w, l.rows, l.cols);
        Dense { w, wt }
    }
}

/// Where the forward pass takes each layer's weights from.
enum Source<'a> {
    /// The float model: each quantized layer's float original, by name
    /// (the others as the model holds them).
    Teacher(&'a HashMap<&'a str, &'a Linear>),
    /// The quantized model, dequantized: every matrix of the blocks and the head.
    Student(&'a HashMap<String, Dense>),
}

impl Source<'_> {
    fn mat<'s>(&'s self, l: &'s Linear) -> MatRef<'s> {
        match self {
            Source::Teacher(float) => float
                .get(l.name.as_str())
                .copied()
                .unwrap_or(l)
                .dense()
                .expect("the teacher's layers are float"),
            Source::Student(dense) => f32_mat(&dense[&l.name].w, l.rows, l.cols),
        }
    }

    fn embed_row(&self, isa: Isa, embedding: &Linear, token: usize, out: &mut [f32]) {
        let layer = match self {
            Source::Teacher(float) => float
                .get(embedding.name.as_str())
                .copied()
                .unwrap_or(embedding),
            Source::Student(_) => embedding,
        };
        layer.row(isa, token, out);
    }
}

/// `y = x·Wᵀ + b` for `n` rows.
fn linear(cx: Cx<'_>, src: &Source<'_>, l: &Linear, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * l.rows];
    cx.mm_ref(src.mat(l), x, n, &mut y);
    l.add_bias(&mut y, n);
    y
}

/// One quantized layer being refined.
struct Trained {
    /// The quantized layer, rebuilt with the refined scales at the end.
    linear: Linear,
    matrix: QuantizedMatrix,
    signs: Option<Signs>,
    /// `code − zero` of every weight, in the stored (rotated) basis.
    offsets: Vec<f32>,
    /// The scales GPTQ chose, `rows x groups`.
    base: Vec<f32>,
    theta: Vec<f32>,
    grad: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
}

impl Trained {
    /// `None` when `l` is not quantized.
    fn new(l: &Linear) -> Option<Self> {
        let LinearKernel::Quant(view, rotation) = l.kernel() else {
            return None;
        };
        assert_eq!(view.layout, QuantLayout::Rows, "refined before strips");
        let groups = view.groups();
        let mut offsets = vec![0f32; view.rows * view.cols];
        let mut base = vec![0f32; view.rows * groups];
        for r in 0..view.rows {
            for g in 0..groups {
                base[r * groups + g] = view.scale(r, g);
                let zero = view.zero(r, g);
                for c in g * view.group..(g + 1) * view.group {
                    offsets[r * view.cols + c] = (view.code(r, c) - zero) as f32;
                }
            }
        }
        let signs = rotation.map(|r| Signs {
            sign_in: r.sign_in.into(),
            sign_out: r.sign_out.into(),
        });
        let matrix = QuantizedMatrix {
            format: view.format,
            rows: view.rows,
            cols: view.cols,
            group: view.group,
            codes: view.codes.to_vec(),
            scales: view.scales.to_vec(),
            zeros: view.zeros.to_vec(),
            layout: QuantLayout::Rows,
        };
        let n = base.len();
        Some(Trained {
            linear: l.clone(),
            matrix,
            signs,
            offsets,
            base,
            theta: vec![0.0; n],
            grad: vec![0.0; n],
            adam_m: vec![0.0; n],
            adam_v: vec![0.0; n],
        })
    }

    fn rotation(&self) -> Option<Rotation<'_>> {
        self.signs.as_ref().map(|s| Rotation {
            sign_in: &s.sign_in,
            sign_out: &s.sign_out,
        })
    }

    /// The current scales, `rows x groups`.
    fn scales(&self) -> impl Iterator<Item = f32> + '_ {
        self.base
            .iter()
            .zip(&self.theta)
            .map(|(&s, &t)| s * (1.0 + t))
    }

    /// `W` with the current scales, un-rotated.
    fn dense(&self, isa: Isa) -> Dense {
        let (cols, group) = (self.matrix.cols, self.matrix.group);
        let scales: Vec<f32> = self.scales().collect();
        let mut w = self.offsets.clone();
        for (row, row_scales) in w
            .chunks_exact_mut(cols)
            .zip(scales.chunks_exact(cols / group))
        {
            for (part, &s) in row.chunks_exact_mut(group).zip(row_scales) {
                part.iter_mut().for_each(|v| *v *= s);
            }
        }
        if let Some(rotation) = self.rotation() {
            unrotate_rows(isa, &mut w, cols, rotation);
        }
        let wt = transpose(&w, self.matrix.rows, cols);
        Dense { w, wt }
    }

    /// Adds the gradient of `θ` given `dw`, the gradient of the un-rotated
    /// `W` (rotated in place).
    fn accumulate(&mut self, isa: Isa, dw: &mut [f32]) {
        let (cols, group) = (self.matrix.cols, self.matrix.group);
        if let Some(s) = &self.signs {
            let rotation = Rotation {
                sign_in: &s.sign_in,
                sign_out: &s.sign_out,
            };
            // W' = H·S_out·W·S_in·H is linear in W, so dW' is dW transformed alike.
            rotate_rows(isa, dw, cols, rotation);
        }
        let groups = cols / group;
        for (r, (row, offsets)) in dw
            .chunks_exact(cols)
            .zip(self.offsets.chunks_exact(cols))
            .enumerate()
        {
            for (g, (d, o)) in row
                .chunks_exact(group)
                .zip(offsets.chunks_exact(group))
                .enumerate()
            {
                let dot: f32 = d.iter().zip(o).map(|(a, b)| a * b).sum();
                let i = r * groups + g;
                self.grad[i] += self.base[i] * dot;
            }
        }
    }

    /// One Adam step of size `lr` (step `t`, from 1), then clears the gradient.
    fn step(&mut self, lr: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.99;
        const EPS: f32 = 1e-20;
        let (c1, c2) = (1.0 - B1.powi(t), 1.0 - B2.powi(t));
        for (((theta, g), m), v) in self
            .theta
            .iter_mut()
            .zip(&mut self.grad)
            .zip(&mut self.adam_m)
            .zip(&mut self.adam_v)
        {
            *m = B1 * *m + (1.0 - B1) * *g;
            *v = B2 * *v + (1.0 - B2) * *g * *g;
            *theta -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
            *g = 0.0;
        }
    }

    /// The layer with the refined scales, rounded to bf16.
    fn finish(mut self) -> Linear {
        let scales: Vec<u16> = self.scales().map(|s| bf16::from_f32(s).to_bits()).collect();
        self.matrix.scales = scales;
        self.linear
            .with_quantized(Arc::new(self.matrix), self.signs)
    }
}

/// RMS norm of each `dim`-long row; returns the rows and their `1/rms`.
fn norm_forward(norm: &RmsNorm, x: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let mut inv = Vec::with_capacity(x.len() / dim);
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let i = 1.0 / (mean_sq + norm.eps).sqrt();
        for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(&norm.weight) {
            *o = v * i * w;
        }
        inv.push(i);
    }
    (y, inv)
}

/// The gradient of [`norm_forward`]'s input, given its output's `dy`:
/// `dx = inv·w⊙dy − inv³/d · x · Σ(w⊙dy⊙x)`.
fn norm_backward(norm: &RmsNorm, x: &[f32], inv: &[f32], dy: &[f32], dim: usize) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    for (((xr, dyr), dxr), &i) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
        .zip(inv)
    {
        let dot: f32 = xr
            .iter()
            .zip(dyr)
            .zip(&norm.weight)
            .map(|((x, d), w)| x * d * w)
            .sum();
        let k = i * i * i / dim as f32 * dot;
        for (((o, &x), &d), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(&norm.weight) {
            *o = i * w * d - k * x;
        }
    }
    dx
}

/// Rotates each `head_dim`-long head of the `n` rows of `x` (`width` wide)
/// by the angles of its token (`sign` −1 rotates back: the backward pass).
fn rope_rows(x: &mut [f32], width: usize, head_dim: usize, table: &RopeTable, sign: f32) {
    let half = table.half;
    for (t, row) in x.chunks_exact_mut(width).enumerate() {
        let (cos, sin) = (
            &table.cos[t * half..(t + 1) * half],
            &table.sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = head[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (a, b, s) = (lo[i], hi[i], sign * sin[i]);
                lo[i] = a * cos[i] - b * s;
                hi[i] = b * cos[i] + a * s;
            }
        }
    }
}

/// cos and sin of one rotary table at positions `0..n`.
struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Head `h` (`d` wide) of each of the `n` rows of `x` (`width` wide), as `n x d`.
fn head_of(x: &[f32], width: usize, h: usize, d: usize) -> Vec<f32> {
    x.chunks_exact(width)
        .flat_map(|row| &row[h * d..(h + 1) * d])
        .copied()
        .collect()
}

/// Adds `head` (`n x d`) into head `h` of the rows of `x`.
fn add_head(x: &mut [f32], width: usize, h: usize, d: usize, head: &[f32]) {
    for (row, part) in x.chunks_exact_mut(width).zip(head.chunks_exact(d)) {
        add_into(&mut row[h * d..(h + 1) * d], part);
    }
}

/// What an attention layer's backward pass needs of its forward pass.
struct AttentionTape {
    input: Vec<f32>,
    /// q and k after the projections, before their norms.
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    q_inv: Vec<f32>,
    k_inv: Vec<f32>,
    /// q and k normed and rotated, and v.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Per head, the `n x n` attention weights.
    probs: Vec<Vec<f32>>,
    /// The heads' outputs, the output projection's input.
    attn: Vec<f32>,
}

fn attention_forward(
    cx: Cx<'_>,
    src: &Source<'_>,
    a: &Attention,
    table: &RopeTable,
    input: Vec<f32>,
    n: usize,
) -> (Vec<f32>, AttentionTape) {
    let d = a.head_dim;
    let (q_dim, kv_dim) = (a.n_heads * d, a.n_kv_heads * d);
    let q_pre = linear(cx, src, &a.q, &input, n);
    let k_pre = linear(cx, src, &a.k, &input, n);
    let v = linear(cx, src, &a.v, &input, n);
    let normed = |pre: &[f32], norm: &Option<RmsNorm>| match norm {
        Some(norm) => norm_forward(norm, pre, d),
        None => (pre.to_vec(), Vec::new()),
    };
    let (mut q, q_inv) = normed(&q_pre, &a.q_norm);
    let (mut k, k_inv) = normed(&k_pre, &a.k_norm);
    rope_rows(&mut q, q_dim, d, table, 1.0);
    rope_rows(&mut k, kv_dim, d, table, 1.0);
    let group = a.n_heads / a.n_kv_heads;
    let mut attn = vec![0f32; n * q_dim];
    let mut probs = Vec::with_capacity(a.n_heads);
    for h in 0..a.n_heads {
        let kv = h / group;
        let (qh, kh, vh) = (
            head_of(&q, q_dim, h, d),
            head_of(&k, kv_dim, kv, d),
            head_of(&v, kv_dim, kv, d),
        );
        let mut p = cx.mm(&kh, (n, d), &qh, n);
        for (t, row) in p.chunks_exact_mut(n).enumerate() {
            let first = a.window.map_or(0, |w| (t + 1).saturating_sub(w));
            let visible = &mut row[first..=t];
            let max = visible.iter().fold(f32::MIN, |m, &v| m.max(v * a.scale));
            let mut sum = 0f32;
            for v in visible.iter_mut() {
                *v = (*v * a.scale - max).exp();
                sum += *v;
            }
            visible.iter_mut().for_each(|v| *v /= sum);
            row[..first].fill(0.0);
            row[t + 1..].fill(0.0);
        }
        let out = cx.mm(&transpose(&vh, n, d), (d, n), &p, n);
        add_head(&mut attn, q_dim, h, d, &out);
        probs.push(p);
    }
    let out = linear(cx, src, &a.o, &attn, n);
    let tape = AttentionTape {
        input,
        q_pre,
        k_pre,
        q_inv,
        k_inv,
        q,
        k,
        v,
        probs,
        attn,
    };
    (out, tape)
}

/// The gradients a backward pass hands to the layers it passes.
struct Grads<'a> {
    cx: Cx<'a>,
    dense: &'a HashMap<String, Dense>,
    trained: &'a mut HashMap<String, Trained>,
}

impl Grads<'_> {
    /// Backward through `y = x·Wᵀ + b`: returns `dx`, and adds `W`'s
    /// gradient to the layer's scales when it is refined.
    fn linear(&mut self, l: &Linear, x: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
        let dense = &self.dense[&l.name];
        let dx = self.cx.mm(&dense.wt, (l.cols, l.rows), dy, n);
        if let Some(t) = self.trained.get_mut(&l.name) {
            // dW[r, c] = Σ_t dy[t, r]·x[t, c]: a product of the transposes.
            let (xt, dyt) = (transpose(x, n, l.cols), transpose(dy, n, l.rows));
            let mut dw = self.cx.mm(&xt, (l.cols, n), &dyt, l.rows);
            t.accumulate(self.cx.isa, &mut dw);
        }
        dx
    }
}

fn attention_backward(
    g: &mut Grads<'_>,
    a: &Attention,
    table: &RopeTable,
    tape: &AttentionTape,
    d_out: &[f32],
    n: usize,
) -> Vec<f32> {
    let cx = g.cx;
    let d = a.head_dim;
    let (q_dim, kv_dim) = (a.n_heads * d, a.n_kv_heads * d);
    let d_attn = g.linear(&a.o, &tape.attn, d_out, n);
    let group = a.n_heads / a.n_kv_heads;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; n * q_dim],
        vec![0f32; n * kv_dim],
        vec![0f32; n * kv_dim],
    );
    for (h, p) in tape.probs.iter().enumerate() {
        let kv = h / group;
        let (qh, kh, vh) = (
            head_of(&tape.q, q_dim, h, d),
            head_of(&tape.k, kv_dim, kv, d),
            head_of(&tape.v, kv_dim, kv, d),
        );
        let d_o = head_of(&d_attn, q_dim, h, d);
        // dP[t, s] = Σ_k dO[t, k]·V[s, k]; dV[s, k] = Σ_t P[t, s]·dO[t, k].
        let mut ds = cx.mm(&vh, (n, d), &d_o, n);
        let d_v = cx.mm(&transpose(&d_o, n, d), (d, n), &transpose(p, n, n), n);
        add_head(&mut dv, kv_dim, kv, d, &d_v);
        // Through the softmax: dS = P⊙(dP − Σ P⊙dP), times the score scale.
        for (ds_row, p_row) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            let dot: f32 = ds_row.iter().zip(p_row).map(|(a, b)| a * b).sum();
            for (v, &pv) in ds_row.iter_mut().zip(p_row) {
                *v = pv * (*v - dot) * a.scale;
            }
        }
        // dQ[t, k] = Σ_s dS[t, s]·K[s, k]; dK[s, k] = Σ_t dS[t, s]·Q[t, k].
        let d_q = cx.mm(&transpose(&kh, n, d), (d, n), &ds, n);
        let d_k = cx.mm(&transpose(&qh, n, d), (d, n), &transpose(&ds, n, n), n);
        add_head(&mut dq, q_dim, h, d, &d_q);
        add_head(&mut dk, kv_dim, kv, d, &d_k);
    }
    rope_rows(&mut dq, q_dim, d, table, -1.0);
    rope_rows(&mut dk, kv_dim, d, table, -1.0);
    if let Some(norm) = &a.q_norm {
        dq = norm_backward(norm, &tape.q_pre, &tape.q_inv, &dq, d);
    }
    if let Some(norm) = &a.k_norm {
        dk = norm_backward(norm, &tape.k_pre, &tape.k_inv, &dk, d);
    }
    let mut dx = g.linear(&a.q, &tape.input, &dq, n);
    add_into(&mut dx, &g.linear(&a.k, &tape.input, &dk, n));
    add_into(&mut dx, &g.linear(&a.v, &tape.input, &dv, n));
    dx
}

/// What the MLP's backward pass needs.
struct MlpTape {
    input: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    hidden: Vec<f32>,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// The activation of the gate and its derivative.
fn activate(activation: Activation, x: f32) -> (f32, f32) {
    match activation {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        Activation::GeluTanh => {
            let t = (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh();
            let inner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
            (
                0.5 * x * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner,
            )
        }
    }
}

fn mlp_forward(
    cx: Cx<'_>,
    src: &Source<'_>,
    m: &GatedMlp,
    input: Vec<f32>,
    n: usize,
) -> (Vec<f32>, MlpTape) {
    let gate = linear(cx, src, &m.gate, &input, n);
    let up = linear(cx, src, &m.up, &input, n);
    let hidden: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| activate(m.activation, g).0 * u)
        .collect();
    let out = linear(cx, src, &m.down, &hidden, n);
    let tape = MlpTape {
        input,
        gate,
        up,
        hidden,
    };
    (out, tape)
}

fn mlp_backward(
    g: &mut Grads<'_>,
    m: &GatedMlp,
    tape: &MlpTape,
    d_out: &[f32],
    n: usize,
) -> Vec<f32> {
    let d_hidden = g.linear(&m.down, &tape.hidden, d_out, n);
    let mut d_gate = vec![0f32; d_hidden.len()];
    let mut d_up = vec![0f32; d_hidden.len()];
    for i in 0..d_hidden.len() {
        let (a, da) = activate(m.activation, tape.gate[i]);
        d_gate[i] = d_hidden[i] * tape.up[i] * da;
        d_up[i] = d_hidden[i] * a;
    }
    let mut dx = g.linear(&m.gate, &tape.input, &d_gate, n);
    add_into(&mut dx, &g.linear(&m.up, &tape.input, &d_up, n));
    dx
}

/// One block's record: `x1 = x0 + post(mixer(norm(x0)))`, `x2 = x1 + post(mlp(norm(x1)))`.
struct BlockTape {
    x0: Vec<f32>,
    inv0: Vec<f32>,
    attention: AttentionTape,
    /// The mixer's output before its post norm, and that norm's `1/rms`.
    mixed: Vec<f32>,
    mixed_inv: Vec<f32>,
    x1: Vec<f32>,
    inv1: Vec<f32>,
    mlp: MlpTape,
    fed: Vec<f32>,
    fed_inv: Vec<f32>,
}

/// The attention layer of a block the backward pass supports.
fn attention_of(block: &Block, index: usize) -> Result<&Attention> {
    match &block.mixer {
        Mixer::Attention(a) if a.gate.is_none() => Ok(a),
        Mixer::Attention(_) => Err(unsupported(index, "attention with an output gate")),
        Mixer::DeltaNet(_) => Err(unsupported(index, "Gated DeltaNet")),
        Mixer::ShortConv(_) => Err(unsupported(index, "a short convolution")),
    }
}

fn unsupported(index: usize, what: &str) -> EngineError {
    EngineError::Quantize(format!(
        "refinement has no backward pass for {what} (layer {index}); quantize this model without --refine-steps"
    ))
}

/// Everything the backward pass needs of one window's forward pass.
struct Tape {
    blocks: Vec<BlockTape>,
    last: Vec<f32>,
    last_inv: Vec<f32>,
    normed: Vec<f32>,
    /// Logits before the soft cap.
    raw: Vec<f32>,
}

/// The model over `tokens` from an empty context: the logits (`n x vocab`)
/// and the record of the pass.
fn forward(
    cx: Cx<'_>,
    parts: &Translated,
    src: &Source<'_>,
    tables: &[RopeTable],
    tokens: &[u32],
) -> Result<(Vec<f32>, Tape)> {
    let (n, hidden) = (tokens.len(), parts.hidden);
    let mut x = vec![0f32; n * hidden];
    for (row, &token) in x.chunks_exact_mut(hidden).zip(tokens) {
        src.embed_row(cx.isa, &parts.embedding, token as usize, row);
        if let Some(scale) = parts.embed_scale {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    }
    let mut blocks = Vec::with_capacity(parts.blocks.len());
    for (i, block) in parts.blocks.iter().enumerate() {
        let a = attention_of(block, i)?;
        let (input, inv0) = norm_forward(&block.mixer_norm, &x, hidden);
        let (mixed, attention) = attention_forward(cx, src, a, &tables[a.rope], input, n);
        let (post, mixed_inv) = match &block.post_mixer_norm {
            Some(norm) => norm_forward(norm, &mixed, hidden),
            None => (mixed.clone(), Vec::new()),
        };
        let x0 = std::mem::take(&mut x);
        let mut x1 = x0.clone();
        add_into(&mut x1, &post);
        let (input, inv1) = norm_forward(&block.mlp_norm, &x1, hidden);
        let (fed, mlp) = mlp_forward(cx, src, &block.mlp, input, n);
        let (post, fed_inv) = match &block.post_mlp_norm {
            Some(norm) => norm_forward(norm, &fed, hidden),
            None => (fed.clone(), Vec::new()),
        };
        x = x1.clone();
        add_into(&mut x, &post);
        blocks.push(BlockTape {
            x0,
            inv0,
            attention,
            mixed,
            mixed_inv,
            x1,
            inv1,
            mlp,
            fed,
            fed_inv,
        });
    }
    let (normed, last_inv) = norm_forward(&parts.final_norm, &x, hidden);
    let raw = linear(cx, src, &parts.lm_head, &normed, n);
    let mut logits = raw.clone();
    if let Some(cap) = parts.logit_softcap {
        logits.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
    }
    let tape = Tape {
        blocks,
        last: x,
        last_inv,
        normed,
        raw,
    };
    Ok((logits, tape))
}

/// Backward from `d_logits` through the whole model, adding each refined
/// layer's gradient to its scales.
fn backward(
    g: &mut Grads<'_>,
    parts: &Translated,
    tables: &[RopeTable],
    tape: &Tape,
    mut d_logits: Vec<f32>,
) {
    let hidden = parts.hidden;
    let n = tape.normed.len() / hidden;
    if let Some(cap) = parts.logit_softcap {
        for (d, &z) in d_logits.iter_mut().zip(&tape.raw) {
            let t = (z / cap).tanh();
            *d *= 1.0 - t * t;
        }
    }
    let d_normed = g.linear(&parts.lm_head, &tape.normed, &d_logits, n);
    let mut dx = norm_backward(
        &parts.final_norm,
        &tape.last,
        &tape.last_inv,
        &d_normed,
        hidden,
    );
    for (block, bt) in parts.blocks.iter().zip(&tape.blocks).rev() {
        let a = attention_of(block, 0).expect("checked by the forward pass");
        let d_fed = match &block.post_mlp_norm {
            Some(norm) => norm_backward(norm, &bt.fed, &bt.fed_inv, &dx, hidden),
            None => dx.clone(),
        };
        let d_input = mlp_backward(g, &block.mlp, &bt.mlp, &d_fed, n);
        add_into(
            &mut dx,
            &norm_backward(&block.mlp_norm, &bt.x1, &bt.inv1, &d_input, hidden),
        );
        let d_mixed = match &block.post_mixer_norm {
            Some(norm) => norm_backward(norm, &bt.mixed, &bt.mixed_inv, &dx, hidden),
            None => dx.clone(),
        };
        let d_input = attention_backward(g, a, &tables[a.rope], &bt.attention, &d_mixed, n);
        add_into(
            &mut dx,
            &norm_backward(&block.mixer_norm, &bt.x0, &bt.inv0, &d_input, hidden),
        );
    }
}

/// Softmax of each `vocab`-long row of `logits`, in place.
fn softmax_rows(logits: &mut [f32], vocab: usize) {
    for row in logits.chunks_exact_mut(vocab) {
        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
        let mut sum = 0f64;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += f64::from(*v);
        }
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Mean KL(p ‖ q) over the rows, from the probabilities `p` and `q`.
fn mean_kl(p: &[f32], q: &[f32], vocab: usize) -> f64 {
    let rows = p.len() / vocab;
    let mut total = 0f64;
    for (pr, qr) in p.chunks_exact(vocab).zip(q.chunks_exact(vocab)) {
        for (&a, &b) in pr.iter().zip(qr) {
            if a > 0.0 {
                total +=
                    f64::from(a) * (f64::from(a).ln() - f64::from(b.max(f32::MIN_POSITIVE)).ln());
            }
        }
    }
    total / rows as f64
}

/// The rotary tables of `parts` at positions `0..n`.
fn rope_tables(parts: &Translated, n: usize) -> Vec<RopeTable> {
    parts
        .ropes
        .iter()
        .map(|rope| {
            let half = rope.half();
            let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
            for t in 0..n {
                rope.cos_sin(
                    t,
                    &mut cos[t * half..(t + 1) * half],
                    &mut sin[t * half..(t + 1) * half],
                );
            }
            RopeTable { half, cos, sin }
        })
        .collect()
}

/// The teacher, the student being refined and its dense weights.
struct Refiner<'a> {
    cx: Cx<'a>,
    parts: &'a Translated,
    tables: Vec<RopeTable>,
    /// The float original of each quantized layer, by name.
    teacher: HashMap<&'a str, &'a Linear>,
    trained: HashMap<String, Trained>,
    /// Every matrix of the student's blocks and its head, dequantized.
    dense: HashMap<String, Dense>,
}

impl<'a> Refiner<'a> {
    /// A refiner of the quantized layers of `parts` (quantized from
    /// `planned`) for windows of up to `context` tokens.
    fn new(
        cx: Cx<'a>,
        parts: &'a Translated,
        planned: &'a [PlannedGroup],
        context: usize,
    ) -> Result<Self> {
        for (i, block) in parts.blocks.iter().enumerate() {
            attention_of(block, i)?;
        }
        let teacher = planned
            .iter()
            .flat_map(|g| &g.members)
            .map(|p| (p.linear.name.as_str(), &p.linear))
            .collect();
        let trained = parts
            .blocks
            .iter()
            .flat_map(|b| b.linears())
            .filter_map(|l| Some((l.name.clone(), Trained::new(l)?)))
            .collect();
        let dense = parts
            .blocks
            .iter()
            .flat_map(|b| b.linears())
            .chain([&parts.lm_head])
            .map(|l| (l.name.clone(), Dense::of(cx.isa, l)))
            .collect();
        Ok(Refiner {
            cx,
            parts,
            tables: rope_tables(parts, context),
            teacher,
            trained,
            dense,
        })
    }

    /// The mean KL(teacher ‖ student) over the positions of `window`;
    /// with `gradient`, its gradient is added to the refined layers.
    fn kl(&mut self, window: &[u32], gradient: bool) -> Result<f64> {
        let (cx, parts, vocab) = (self.cx, self.parts, self.parts.vocab);
        let teacher = Source::Teacher(&self.teacher);
        let (mut p, _) = forward(cx, parts, &teacher, &self.tables, window)?;
        softmax_rows(&mut p, vocab);
        let (mut q, tape) = forward(
            cx,
            parts,
            &Source::Student(&self.dense),
            &self.tables,
            window,
        )?;
        softmax_rows(&mut q, vocab);
        let kl = mean_kl(&p, &q, vocab);
        if gradient {
            // d KL / d logits = (softmax(q) − p) / n.
            let scale = 1.0 / window.len() as f32;
            let d_logits: Vec<f32> = q.iter().zip(&p).map(|(a, b)| (a - b) * scale).collect();
            let mut grads = Grads {
                cx,
                dense: &self.dense,
                trained: &mut self.trained,
            };
            backward(&mut grads, parts, &self.tables, &tape, d_logits);
        }
        Ok(kl)
    }

    /// One Adam step of every refined layer, then their dense weights anew.
    fn step(&mut self, lr: f32, t: i32) {
        for (name, trained) in self.trained.iter_mut() {
            trained.step(lr, t);
            self.dense.insert(name.clone(), trained.dense(self.cx.isa));
        }
    }

    /// The refined layers, scales rounded to bf16.
    fn finish(self) -> Vec<Linear> {
        self.trained.into_values().map(Trained::finish).collect()
    }
}

/// Refines the quantized layers of `parts` (quantized from `planned`,
/// whose float originals are the teacher) on `windows`, and puts the
/// refined layers in place. Returns them and what the KL did.
pub(crate) fn refine(
    parts: &mut Translated,
    planned: &[PlannedGroup],
    (pool, isa): (&ThreadPool, Isa),
    windows: &[Vec<u32>],
    refinement: Refinement,
) -> Result<(Vec<Linear>, RefineReport)> {
    refinement.validate()?;
    let start = Instant::now();
    let context = windows.iter().map(Vec::len).max().unwrap_or(0);
    let mut refiner = Refiner::new(Cx { pool, isa }, parts, planned, context)?;
    // The first and the last quarter of the steps (at most a pass each).
    let report_span = windows.len().min(refinement.steps / 4).max(1);
    let mut losses = Vec::with_capacity(refinement.steps);
    for s in 0..refinement.steps {
        let kl = refiner.kl(&windows[s % windows.len()], true)?;
        losses.push(kl);
        // Cosine decay to a tenth of the step size.
        let progress = s as f32 / refinement.steps as f32;
        let lr = refinement.lr * (0.55 + 0.45 * (std::f32::consts::PI * progress).cos());
        refiner.step(lr, s as i32 + 1);
        if (s + 1) % report_span == 0 || s + 1 == refinement.steps {
            let recent = &losses[losses.len().saturating_sub(report_span)..];
            tracing::info!(
                "refinement step {}/{}: mean KL {:.4e} over the last {} windows",
                s + 1,
                refinement.steps,
                recent.iter().sum::<f64>() / recent.len() as f64,
                recent.len()
            );
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let report = RefineReport {
        kl_first: mean(&losses[..report_span]),
        kl_last: mean(&losses[losses.len() - report_span..]),
        seconds: start.elapsed().as_secs_f64(),
    };
    let refined = refiner.finish();
    replace_layers(parts, &refined);
    Ok((refined, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::Logits;
    use crate::model::{LoadOptions, Model};
    use crate::quantize::{QuantSpec, plan, quantize_parts};
    use hayate_kernels::{ActPrecision, QuantFormat};
    use std::path::{Path, PathBuf};

    fn fixtures() -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|d| d.join("config.json").exists())
            .collect();
        dirs.sort();
        dirs
    }

    fn tokens(n: usize, vocab: usize, mut seed: u64) -> Vec<u32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) % vocab as u64) as u32
            })
            .collect()
    }

    fn load(dir: &Path) -> Model {
        let options = LoadOptions {
            activations: ActPrecision::F32,
            ..LoadOptions::default()
        };
        Model::load(dir, &options).unwrap()
    }

    /// The float model of `dir` and its parts quantized to q4 by
    /// round-to-nearest (rows layout), with the plan (the teacher's layers).
    fn quantized(dir: &Path) -> (Model, Model, Vec<PlannedGroup>) {
        let float = load(dir);
        let mut student = load(dir);
        let spec = QuantSpec::new(QuantFormat::Q4);
        let (planned, _) = plan(&float.parts, &spec).unwrap();
        let cx = (&*student.pool, student.isa, ActPrecision::F32);
        quantize_parts(&mut student.parts, cx, &spec, None).unwrap();
        (float, student, planned)
    }

    fn supported(parts: &Translated) -> bool {
        parts
            .blocks
            .iter()
            .all(|b| matches!(&b.mixer, Mixer::Attention(a) if a.gate.is_none()))
    }

    /// Largest difference between two logit arrays, relative to the largest logit.
    fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let gap = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        gap / scale
    }

    /// Measured: within 1.4e-6 to 5.5e-6 of the largest logit (quantized).
    #[test]
    fn the_forward_pass_gives_the_engines_logits() {
        let mut checked = 0;
        for dir in fixtures() {
            let (float, student, planned) = quantized(&dir);
            if !supported(&float.parts) {
                continue;
            }
            let window = tokens(40, float.info.vocab, 3);
            let cx = Cx {
                pool: &float.pool,
                isa: float.isa,
            };
            let tables = rope_tables(&float.parts, window.len());
            let engine = |m: &Model| {
                let mut out = Vec::new();
                let mut state = m.new_state(Some(window.len())).unwrap();
                m.forward(&mut state, &window, Logits::All(&mut out))
                    .unwrap();
                out
            };
            // The float model, and the quantized one dequantized.
            let none = HashMap::new();
            let (ours, _) =
                forward(cx, &float.parts, &Source::Teacher(&none), &tables, &window).unwrap();
            let gap = relative_gap(&ours, &engine(&float));
            assert!(
                gap < 2e-5,
                "{}: float logits differ by {gap}",
                dir.display()
            );
            let refiner = Refiner::new(cx, &student.parts, &planned, window.len()).unwrap();
            let student_source = Source::Student(&refiner.dense);
            let (ours, _) = forward(cx, &student.parts, &student_source, &tables, &window).unwrap();
            let gap = relative_gap(&ours, &engine(&student));
            assert!(
                gap < 2e-5,
                "{}: quantized logits differ by {gap}",
                dir.display()
            );
            // The teacher of the refiner is the float model.
            let (teacher, _) = forward(
                cx,
                &student.parts,
                &Source::Teacher(&refiner.teacher),
                &tables,
                &window,
            )
            .unwrap();
            assert!(relative_gap(&teacher, &engine(&float)) < 2e-5);
            checked += 1;
        }
        assert!(checked >= 8, "only {checked} fixtures checked");
    }

    /// The gradient of the KL with respect to every scale, against central
    /// differences along a random direction (in name order, fixed). Measured:
    /// 0.001% to 0.07% apart.
    #[test]
    fn the_gradient_matches_finite_differences() {
        let mut checked = 0;
        for dir in fixtures() {
            let (_float, student, planned) = quantized(&dir);
            if !supported(&student.parts) {
                continue;
            }
            let cx = Cx {
                pool: &student.pool,
                isa: student.isa,
            };
            let window = tokens(24, student.info.vocab, 7);
            let mut refiner = Refiner::new(cx, &student.parts, &planned, window.len()).unwrap();
            let kl = refiner.kl(&window, true).unwrap();
            assert!(kl > 0.0);
            let mut seed = 11u64;
            let mut predicted = 0f64;
            let mut directions = HashMap::new();
            // In name order, so that the direction is the same every run.
            let mut names: Vec<&String> = refiner.trained.keys().collect();
            names.sort();
            for name in names {
                let t = &refiner.trained[name];
                let d: Vec<f32> = (0..t.theta.len())
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        if seed >> 63 == 0 { 1.0 } else { -1.0 }
                    })
                    .collect();
                predicted += t
                    .grad
                    .iter()
                    .zip(&d)
                    .map(|(g, d)| f64::from(g * d))
                    .sum::<f64>();
                directions.insert(name.clone(), d);
            }
            let mut at = |step: f32| {
                for (name, t) in refiner.trained.iter_mut() {
                    for (theta, d) in t.theta.iter_mut().zip(&directions[name]) {
                        *theta = step * d;
                    }
                    refiner.dense.insert(name.clone(), t.dense(cx.isa));
                }
                refiner.kl(&window, false).unwrap()
            };
            let mut central = |eps: f32| (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
            // Richardson's extrapolation of two step sizes cancels the
            // differences' ε² term (the KL curves strongly on these
            // random-weight fixtures).
            let (coarse, fine) = (central(2e-3), central(1e-3));
            let measured = (4.0 * fine - coarse) / 3.0;
            let error = (measured - predicted).abs() / predicted.abs();
            assert!(
                error < 3e-3,
                "{}: gradient {predicted:.6e}, differences {measured:.6e}",
                dir.display()
            );
            checked += 1;
        }
        assert!(checked >= 8, "only {checked} fixtures checked");
    }

    #[test]
    fn recurrent_mixers_are_a_clear_error() {
        for dir in fixtures() {
            let (_float, student, planned) = quantized(&dir);
            if supported(&student.parts) {
                continue;
            }
            let cx = Cx {
                pool: &student.pool,
                isa: student.isa,
            };
            let Err(e) = Refiner::new(cx, &student.parts, &planned, 8) else {
                panic!("{}: refined a recurrent model", dir.display());
            };
            let message = e.to_string();
            assert!(message.contains("no backward pass for"), "{message}");
            assert!(message.contains("--refine-steps"), "{message}");
        }
    }
}
