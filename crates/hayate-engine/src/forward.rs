//! The forward pass: a batch of sequences, each through every block.

use crate::layers::Step;
use crate::linear::Compute;
use crate::model::Model;
use crate::state::InferenceState;
use crate::{EngineError, Result};
use hayate_kernels::ops;

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
        let cx = self.compute();
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
                    cx.project([(head, &mut s.logits[..])], &s.h[..hidden], 1);
                    soft_cap(&mut s.logits, softcap);
                }
                Logits::Last => {}
                Logits::All(out) => {
                    self.parts
                        .final_norm
                        .rows(&s.x[..n * hidden], &mut s.h[..n * hidden], hidden);
                    let dst = &mut out[c * chunk * vocab..(c * chunk + n) * vocab];
                    cx.project([(head, &mut *dst)], &s.h[..n * hidden], n);
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
                    cx.project([(head, &mut *dst)], &s.h[..m * hidden], m);
                    soft_cap(dst, softcap);
                }
            }
        }
    }

    /// The products' context: this model's threads, ISA and precision.
    pub(crate) fn compute(&self) -> Compute<'_> {
        Compute {
            pool: &self.pool,
            isa: self.isa,
            precision: self.precision,
        }
    }

    /// Runs one chunk (at most `scratch.chunk` tokens); leaves the final
    /// hidden states in `scratch.x` and advances the state.
    fn forward_chunk(&self, state: &mut InferenceState, tokens: &[u32]) {
        let InferenceState {
            layers,
            len,
            scratch: s,
            ropes,
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
        ropes.fill(&self.parts.ropes, start, n);
        let step = Step {
            cx: self.compute(),
            ropes,
            n,
            start,
            recurrent_tail: *recurrent_tail,
        };
        for (block, layer) in self.parts.blocks.iter().zip(layers.iter_mut()) {
            block.forward(&step, layer, s, hidden);
        }
        *len += n;
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
