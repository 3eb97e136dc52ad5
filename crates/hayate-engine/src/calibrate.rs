//! Calibrated quantization: GPTQ layer after layer over calibration text.
//!
//! The calibration tokens are cut into windows, each run from an empty
//! context. Their residual stream is kept between blocks (`tokens x hidden`
//! floats): block by block, and within a block group by group (layers
//! sharing an input: q/k/v, gate/up, ...), the block runs over every window
//! with its earlier groups already quantized, the second moment of the
//! group's input is gathered in the basis its kernels see (rotated:
//! `H·S_in·x`), and GPTQ quantizes the group against it
//! ([`hayate_kernels::quant::gptq_quantize`]). The quantized block then
//! produces the next block's inputs, so later layers are calibrated on
//! what the quantized earlier ones give them. The output head is calibrated
//! last, on the final norm of the stream; an untied embedding table (only
//! read row by row) is rounded to nearest.

use crate::arch::Translated;
use crate::budget::{Budget, StateShape};
use crate::layers::{KvFormat, KvPool, Step};
use crate::linear::{Compute, Linear, Signs};
use crate::quantize::{PlannedGroup, replace_layers};
use crate::refine::Refinement;
use crate::state::InferenceState;
use crate::{EngineError, Result};
use hayate_kernels::hadamard::hadamard_blocks;
use hayate_kernels::quant::{
    CrossMoment, GptqFactor, Hessian, Rotation, gptq_quantize, quantize_matrix,
};
use hayate_kernels::{ActPrecision, Isa, ProductMode, ThreadPool};
use std::cell::RefCell;
use std::sync::Arc;

/// What GPTQ makes each layer's quantized outputs close to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// The float layer's outputs on the same (quantized model's) inputs:
    /// `Σ ‖(W − Q)·x̃‖²`, GPTQ as published.
    Layer,
    /// The float model's outputs of that layer: `Σ ‖W·x − Q·x̃‖²` with `x`
    /// the float model's inputs, so each layer also corrects the drift its
    /// inputs carry from the quantized layers before it.
    Float,
}

/// Calibration tokens, cut into windows that each start from an empty context.
#[derive(Clone)]
pub struct Calibration {
    windows: Vec<Vec<u32>>,
    damp: f64,
    objective: Objective,
    refinement: Option<Refinement>,
}

impl std::fmt::Debug for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Calibration {{ {} windows of {} tokens, damp {}, {:?}, {:?} }}",
            self.windows.len(),
            self.context(),
            self.damp,
            self.objective,
            self.refinement
        )
    }
}

impl Calibration {
    /// Dampening of the Hessians by default, a share of their mean diagonal
    /// (GPTQ's choice).
    pub const DEFAULT_DAMP: f64 = 0.01;

    /// The first `max_tokens` of `tokens` in whole windows of `context`
    /// (a shorter remainder is dropped). Errors if not even one window fits,
    /// or `damp` is not a small positive number.
    pub fn new(
        tokens: &[u32],
        (context, max_tokens): (usize, usize),
        damp: f64,
        objective: Objective,
    ) -> Result<Self> {
        let bad = |m: String| Err(EngineError::Quantize(m));
        if context == 0 {
            return bad("the calibration context must be at least one token".into());
        }
        if !(damp > 0.0 && damp <= 1.0) {
            return bad(format!(
                "the Hessian dampening must lie in (0, 1], not {damp}"
            ));
        }
        let usable = tokens.len().min(max_tokens);
        if usable < context {
            return bad(format!(
                "the calibration text has {usable} usable tokens, fewer than one window of {context}: give more text or a shorter --calibration-context"
            ));
        }
        let windows = tokens[..usable / context * context]
            .chunks_exact(context)
            .map(<[u32]>::to_vec)
            .collect();
        Ok(Calibration {
            windows,
            damp,
            objective,
            refinement: None,
        })
    }

    /// The same calibration, followed by a KL-aware refinement of the
    /// scales on its windows ([`crate::refine`]).
    pub fn with_refinement(mut self, refinement: Refinement) -> Result<Self> {
        refinement.validate()?;
        self.refinement = Some(refinement);
        Ok(self)
    }

    /// The refinement after GPTQ, if any.
    pub fn refinement(&self) -> Option<Refinement> {
        self.refinement
    }

    /// The windows.
    pub(crate) fn windows(&self) -> &[Vec<u32>] {
        &self.windows
    }

    /// Tokens per window.
    pub fn context(&self) -> usize {
        self.windows.first().map_or(0, Vec::len)
    }

    /// Tokens in all windows.
    pub fn tokens(&self) -> usize {
        self.windows.len() * self.context()
    }

    /// Hessian dampening, a share of the mean diagonal.
    pub fn damp(&self) -> f64 {
        self.damp
    }

    /// What each layer is made to reproduce.
    pub fn objective(&self) -> Objective {
        self.objective
    }
}

/// What one basis of a group's inputs accumulates: the quantized model's
/// second moment and, toward the float model, the cross moment with the
/// float model's inputs.
struct Moments {
    hessian: Hessian,
    cross: Option<CrossMoment>,
}

/// The inputs one group's members are quantized against, in each basis
/// its members need (rotated by the group's `S_in`, or not).
struct GroupInputs {
    sign_in: Arc<[f32]>,
    plain: Option<Moments>,
    rotated: Option<Moments>,
    /// The current inputs rotated (reused).
    buffers: (Vec<f32>, Vec<f32>),
}

impl GroupInputs {
    fn new(group: &PlannedGroup, seed: u64, objective: Objective) -> Result<Self> {
        let cols = group.members[0].linear.cols;
        let too_big = || {
            EngineError::Quantize(format!(
                "the {cols} x {cols} Hessian of `{}` does not fit in memory",
                group.input_name
            ))
        };
        let moments = |wanted: bool| -> Result<Option<Moments>> {
            if !wanted {
                return Ok(None);
            }
            let cross = match objective {
                Objective::Layer => None,
                Objective::Float => Some(CrossMoment::new(cols).ok_or_else(too_big)?),
            };
            Ok(Some(Moments {
                hessian: Hessian::new(cols).ok_or_else(too_big)?,
                cross,
            }))
        };
        Ok(GroupInputs {
            sign_in: group.sign_in(seed),
            plain: moments(group.members.iter().any(|p| !p.rotated))?,
            rotated: moments(group.members.iter().any(|p| p.rotated))?,
            buffers: (Vec::new(), Vec::new()),
        })
    }

    /// Adds the quantized model's input rows `x`, paired with the float
    /// model's `float` toward the float model.
    fn add(&mut self, pool: &ThreadPool, isa: Isa, x: &[f32], float: &[f32]) {
        let add = |m: &mut Moments, x: &[f32], float: &[f32]| {
            m.hessian.add(pool, isa, x);
            if let Some(c) = &mut m.cross {
                c.add(pool, isa, float, x);
            }
        };
        if let Some(m) = &mut self.plain {
            add(m, x, float);
        }
        if let Some(m) = &mut self.rotated {
            let rotate = |from: &[f32], to: &mut Vec<f32>| {
                to.clear();
                to.extend_from_slice(from);
                for row in to.chunks_exact_mut(self.sign_in.len()) {
                    row.iter_mut()
                        .zip(&*self.sign_in)
                        .for_each(|(v, s)| *v *= s);
                    hadamard_blocks(isa, row);
                }
            };
            let (rx, rf) = &mut self.buffers;
            rotate(x, rx);
            if m.cross.is_some() {
                rotate(float, rf);
            }
            add(m, rx, rf);
        }
    }

    /// GPTQ of every member, or an error naming the layer.
    fn quantize(
        &self,
        group: &PlannedGroup,
        (pool, isa): (&ThreadPool, Isa),
        seed: u64,
        damp: f64,
    ) -> Result<Vec<Linear>> {
        let named = |e: hayate_kernels::quant::GptqError| {
            EngineError::Quantize(format!("`{}`: {e}", group.input_name))
        };
        let factor = |m: &Option<Moments>| {
            m.as_ref()
                .map(|m| {
                    if m.hessian.tokens() == 0 {
                        return Err(EngineError::Quantize(format!(
                            "calibration saw no input of `{}`",
                            group.input_name
                        )));
                    }
                    match &m.cross {
                        None => GptqFactor::new(pool, &m.hessian, damp).map_err(named),
                        Some(c) => {
                            GptqFactor::toward(pool, isa, &m.hessian, c, damp).map_err(named)
                        }
                    }
                })
                .transpose()
        };
        let (plain, rotated) = (factor(&self.plain)?, factor(&self.rotated)?);
        group
            .members
            .iter()
            .map(|p| {
                let l = &p.linear;
                let signs = p.signs(seed, &self.sign_in);
                let rotation = signs.as_ref().map(|s: &Signs| Rotation {
                    sign_in: &s.sign_in,
                    sign_out: &s.sign_out,
                });
                let f = if p.rotated { &rotated } else { &plain };
                let f = f.as_ref().expect("a factor per basis the members need");
                let dense = l.dense().expect("planned matrices are dense");
                let m = gptq_quantize(pool, isa, (p.format, p.group_size), dense, rotation, f)
                    .map_err(|e| EngineError::Quantize(format!("`{}`: {e}", l.name)))?;
                Ok(l.with_quantized(Arc::new(m), signs))
            })
            .collect()
    }
}

/// Quantizes `planned` (in forward order) with GPTQ over `calibration`,
/// handing each group to `emit` as it is done; `keep` leaves the quantized
/// layers in `parts`, else each block gets its float layers back once the
/// next block's inputs are computed (so memory holds one block's quantized
/// layers at a time).
pub(crate) fn quantize_calibrated(
    parts: &mut Translated,
    (pool, isa, precision): (&ThreadPool, Isa, ActPrecision),
    seed: u64,
    planned: &[PlannedGroup],
    calibration: &Calibration,
    keep: bool,
    emit: &mut dyn FnMut(Vec<Linear>) -> Result<()>,
) -> Result<()> {
    let (hidden, context) = (parts.hidden, calibration.context());
    if context > parts.max_positions {
        return Err(EngineError::Quantize(format!(
            "calibration windows of {context} tokens exceed the model's {} positions",
            parts.max_positions
        )));
    }
    let toward_float = calibration.objective == Objective::Float;
    let shape = StateShape {
        capacity: context,
        chunk: context,
        rollback: 1,
        threads: pool.n_threads(),
        kv: KvFormat::F32,
        page: context.next_multiple_of(16),
    };
    let kv_pool = KvPool::new(usize::MAX);
    let mut budget = Budget::for_context(context, kv_pool.clone());
    let layers = (&parts.blocks[..], &parts.ropes[..]);
    let mut state =
        InferenceState::new(u64::MAX, layers, (hidden, parts.vocab), &shape, &mut budget)?;
    // Every window fills the same positions: their pages, once.
    budget.take(state.kv_bytes_at(context))?;
    state.prepare(context)?;
    // The residual stream of the quantized model and, toward the float
    // model, of the float one.
    let streams = 1 + usize::from(toward_float);
    let mut stream = budget
        .floats(calibration.tokens() * hidden * streams)
        .map_err(|_| {
            EngineError::Quantize(format!(
                "the residual stream of {} calibration tokens does not fit in memory; use fewer --calibration-tokens",
                calibration.tokens()
            ))
        })?;
    let (stream, float_stream) = stream.split_at_mut(calibration.tokens() * hidden);
    for (row, &token) in stream
        .chunks_exact_mut(hidden)
        .zip(calibration.windows.iter().flatten())
    {
        parts.embedding.row(isa, token as usize, row);
        if let Some(scale) = parts.embed_scale {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    }
    if toward_float {
        float_stream.copy_from_slice(stream);
    }
    let plain = Compute {
        pool,
        isa,
        precision,
        mode: ProductMode::Fast,
        tap: None,
    };
    let window = context * hidden;
    for b in 0..parts.blocks.len() {
        let mut quantized: Vec<Vec<Linear>> = Vec::new();
        let mut floats: Vec<Linear> = Vec::new();
        let mixer_groups = parts.blocks[b].mixer_groups();
        // The mixer's groups, then its outputs into the stream; the same
        // for the feed-forward half (which does not run attention again).
        for half in [Half::Mixer, Half::Mlp] {
            let in_half = |g: &&PlannedGroup| {
                g.block == Some(b) && (g.index < mixer_groups) == (half == Half::Mixer)
            };
            for group in planned.iter().filter(in_half) {
                let inputs = RefCell::new(GroupInputs::new(group, seed, calibration.objective)?);
                let float_inputs = RefCell::new(Vec::new());
                let float_tap = |name: &str, x: &[f32]| {
                    if name == group.input_name {
                        let mut f = float_inputs.borrow_mut();
                        f.clear();
                        f.extend_from_slice(x);
                    }
                };
                let tap = |name: &str, x: &[f32]| {
                    if name == group.input_name {
                        inputs
                            .borrow_mut()
                            .add(pool, isa, x, &float_inputs.borrow());
                    }
                };
                // This block's layers as quantized so far, to swap back in after each float pass.
                let current: Vec<Linear> = quantized.concat();
                for w in 0..calibration.windows.len() {
                    let span = w * window..(w + 1) * window;
                    if toward_float {
                        // The float model: this block's float layers back for the pass.
                        replace_layers(parts, &floats);
                        let cx = Compute {
                            tap: Some(&float_tap),
                            ..plain
                        };
                        run_half(
                            parts,
                            &mut state,
                            (b, half),
                            cx,
                            &mut float_stream[span.clone()],
                            false,
                        );
                        replace_layers(parts, &current);
                    }
                    let cx = Compute {
                        tap: Some(&tap),
                        ..plain
                    };
                    run_half(parts, &mut state, (b, half), cx, &mut stream[span], false);
                }
                let done =
                    inputs
                        .into_inner()
                        .quantize(group, (pool, isa), seed, calibration.damp)?;
                floats.extend(group.members.iter().map(|p| p.linear.clone()));
                replace_layers(parts, &done);
                quantized.push(done);
            }
            for span in stream.chunks_exact_mut(window) {
                run_half(parts, &mut state, (b, half), plain, span, true);
            }
            if toward_float {
                replace_layers(parts, &floats);
                for span in float_stream.chunks_exact_mut(window) {
                    run_half(parts, &mut state, (b, half), plain, span, true);
                }
                replace_layers(parts, &quantized.concat());
            }
        }
        if !keep {
            replace_layers(parts, &floats);
        }
        for done in quantized {
            emit(done)?;
        }
    }
    for group in planned.iter().filter(|g| g.block.is_none()) {
        let done = if group.input_name == parts.lm_head.name {
            let mut inputs = GroupInputs::new(group, seed, calibration.objective)?;
            let (mut normed, mut float_normed) = (vec![0f32; window], vec![0f32; window]);
            for w in 0..calibration.windows.len() {
                let span = w * window..(w + 1) * window;
                parts
                    .final_norm
                    .rows(&stream[span.clone()], &mut normed, hidden);
                if toward_float {
                    parts
                        .final_norm
                        .rows(&float_stream[span], &mut float_normed, hidden);
                }
                inputs.add(pool, isa, &normed, &float_normed);
            }
            inputs.quantize(group, (pool, isa), seed, calibration.damp)?
        } else {
            // The embedding table: only its rows are read, there is no input.
            group
                .members
                .iter()
                .map(|p| {
                    let dense = p.linear.dense().expect("planned matrices are dense");
                    let m = quantize_matrix(pool, isa, p.format, p.group_size, dense, None);
                    p.linear.with_quantized(Arc::new(m), None)
                })
                .collect()
        };
        if keep {
            replace_layers(parts, &done);
        }
        emit(done)?;
    }
    Ok(())
}

/// One half of a block: the mixer, or the feed-forward network.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    Mixer,
    Mlp,
}

/// Runs one half of block `b` over one calibration window of the stream
/// (from an empty state), writing its outputs back when asked.
fn run_half(
    parts: &Translated,
    state: &mut InferenceState,
    (b, half): (usize, Half),
    cx: Compute<'_>,
    window: &mut [f32],
    write_back: bool,
) {
    let hidden = parts.hidden;
    let InferenceState {
        layers,
        scratch,
        ropes,
        ..
    } = state;
    let (block, layer) = (&parts.blocks[b], &mut layers[b]);
    let n = window.len() / hidden;
    scratch.x[..window.len()].copy_from_slice(window);
    ropes.fill(&parts.ropes, 0, n);
    let step = Step {
        cx,
        ropes,
        n,
        start: 0,
        offset: 0,
        recurrent_tail: 1,
        tree: None,
    };
    match half {
        Half::Mixer => {
            layer.clear();
            block.forward_mixer(&step, layer, scratch, hidden);
        }
        Half::Mlp => block.forward_mlp(&step.cx, scratch, n, hidden),
    }
    if write_back {
        window.copy_from_slice(&scratch.x[..window.len()]);
    }
}
