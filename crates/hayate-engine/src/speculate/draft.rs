//! A draft model: a smaller model with the same tokenizer guesses the next
//! tokens by sampling them as the model would, under the same noise (or
//! its own, for comparison).

use super::{Coupling, DraftTree, Speculator};
use crate::forward::Logits;
use crate::model::{Model, StateOptions};
use crate::sampler::{Sampler, SamplingParams, TokenConstraint};
use crate::state::InferenceState;
use crate::{EngineError, Result};

/// Drafts with a second model; see the [module](super) docs.
pub struct DraftModel<'m> {
    model: &'m Model,
    state: InferenceState,
    /// What `state` holds: the first `state.len()` tokens of this.
    fed: Vec<u32>,
    sampler: Sampler,
    /// The target's vocabulary: the draft samples only ids below it.
    vocab: usize,
    logits: Vec<f32>,
    history: Vec<u32>,
    coupling: Coupling,
}

impl<'m> DraftModel<'m> {
    /// A draft by `model` for a target with `target_vocab` tokens, sampling
    /// as `params` say (the target's settings) under `coupling`'s noise.
    /// `options` size its state; it must roll back at least as many tokens
    /// as will be drafted at once.
    ///
    /// The two vocabularies may differ in size (checkpoints pad them), not
    /// in their tokens: the caller checks the tokenizers agree. Ids that
    /// only the draft has are never proposed.
    pub fn new(
        model: &'m Model,
        target_vocab: usize,
        params: &SamplingParams,
        coupling: Coupling,
        options: &StateOptions,
    ) -> Result<Self> {
        let vocab = target_vocab.min(model.info.vocab);
        if vocab == 0 {
            return Err(EngineError::State(
                "the draft model has no vocabulary".into(),
            ));
        }
        let params = SamplingParams {
            seed: coupling.draft_seed(params.seed),
            ..params.clone()
        };
        let state = model.new_state_with(options)?;
        Ok(DraftModel {
            model,
            fed: Vec::with_capacity(state.capacity()),
            history: Vec::with_capacity(state.capacity()),
            state,
            sampler: Sampler::new(params, vocab),
            vocab,
            logits: vec![0.0; vocab],
            coupling,
        })
    }

    /// Brings the state to `sequence[..sequence.len() - 1]` plus the last
    /// token fed, leaving the logits after it in `self.logits`: rolls back
    /// to the longest common prefix (or starts over), then feeds the rest.
    fn sync(&mut self, sequence: &[u32]) -> Result<()> {
        let held = self.state.len();
        let common = self.fed[..held]
            .iter()
            .zip(sequence)
            .take_while(|(a, b)| a == b)
            .count();
        // Feed at least the last token, for its logits.
        let keep = common.min(sequence.len() - 1);
        if self.state.can_truncate(keep) {
            self.state.truncate(keep)?;
        } else {
            self.state.clear();
        }
        let start = self.state.len();
        self.fed.truncate(start);
        self.fed.extend_from_slice(&sequence[start..]);
        let logits = self
            .model
            .forward(&mut self.state, &sequence[start..], Logits::Last)?;
        self.logits.copy_from_slice(&logits[..self.vocab]);
        Ok(())
    }
}

/// Most candidates per position a draft tree takes from the draft model.
pub const MAX_WIDTH: usize = 4;

/// A runner-up joins the tree when its perturbed score is within this of
/// the draft's pick (in scaled-logit units: the pick is then at most about
/// e² ≈ 7 times likelier under the draft), where the model may well choose
/// it. On the trained pair, margins of 1 and 4 traded tokens per pass
/// against tree size worse.
pub const BRANCH_MARGIN: f32 = 2.0;

impl DraftModel<'_> {
    /// Drafts a chain of up to `max` tokens; with `tree`, also the
    /// runners-up (up to `width - 1` per position) that come within
    /// [`BRANCH_MARGIN`] of each pick, as leaves beside it.
    fn draft(
        &mut self,
        sequence: &[u32],
        max: usize,
        width: usize,
        (tokens, mut parents): (&mut Vec<u32>, Option<&mut Vec<usize>>),
        mut constraint: Option<&mut dyn TokenConstraint>,
    ) -> Result<()> {
        if sequence.is_empty() {
            return Ok(());
        }
        // The draft's context may be shorter than the model's.
        let room = self.state.capacity().saturating_sub(sequence.len());
        let max = max.min(room);
        if max == 0 {
            return Ok(());
        }
        self.sync(sequence)?;
        self.history.clear();
        self.history.extend_from_slice(sequence);
        let mut best = [(0f32, 0u32); MAX_WIDTH];
        let width = if parents.is_some() {
            width.clamp(1, MAX_WIDTH)
        } else {
            1
        };
        let best = &mut best[..width];
        // The pass index of the chain's last token.
        let mut parent = 0;
        // Tokens committed to the constraint, stepped back at the end.
        let mut committed = 0;
        for i in 0..max {
            let position = self.history.len();
            if let Some(c) = constraint.as_deref_mut() {
                // The draft draws from masked logits as the model will.
                c.mask(&mut self.logits).map_err(EngineError::Constraint)?;
                if !self.logits.iter().any(|l| *l > f32::NEG_INFINITY) {
                    break;
                }
            }
            let found = self
                .sampler
                .sample_ranked(&mut self.logits, position, &self.history, best);
            let token = best[0].1;
            tokens.push(token);
            if let Some(c) = constraint.as_deref_mut() {
                if c.is_end(token) {
                    // Nothing follows the end of the reply.
                    break;
                }
                if let Err(e) = c.commit(token) {
                    c.rollback(committed).map_err(EngineError::Constraint)?;
                    return Err(EngineError::Constraint(e));
                }
                committed += 1;
            }
            if let Some(parents) = parents.as_deref_mut() {
                parents.push(parent);
                parent = tokens.len();
                for &(score, other) in &best[1..found.min(width)] {
                    if best[0].0 - score < BRANCH_MARGIN {
                        tokens.push(other);
                        parents.push(parents[parent - 1]);
                    }
                }
            }
            self.history.push(token);
            if i + 1 < max {
                let logits = self
                    .model
                    .forward(&mut self.state, &[token], Logits::Last)?;
                self.logits.copy_from_slice(&logits[..self.vocab]);
                self.fed.push(token);
            }
        }
        if let Some(c) = constraint {
            c.rollback(committed).map_err(EngineError::Constraint)?;
        }
        Ok(())
    }
}

impl Speculator for DraftModel<'_> {
    fn name(&self) -> &'static str {
        "draft"
    }

    fn set_params(&mut self, params: &SamplingParams) {
        self.sampler.params = SamplingParams {
            seed: self.coupling.draft_seed(params.seed),
            ..params.clone()
        };
    }

    fn begin_output(&mut self, start: usize) {
        self.sampler.output_start = start;
    }

    fn propose(&mut self, sequence: &[u32], max: usize, out: &mut Vec<u32>) -> Result<()> {
        self.draft(sequence, max, 1, (out, None), None)
    }

    fn propose_constrained(
        &mut self,
        sequence: &[u32],
        max: usize,
        constraint: &mut dyn TokenConstraint,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        self.draft(sequence, max, 1, (out, None), Some(constraint))
    }

    fn propose_tree(
        &mut self,
        sequence: &[u32],
        max: usize,
        width: usize,
        out: &mut DraftTree,
    ) -> Result<()> {
        self.draft(
            sequence,
            max,
            width,
            (&mut out.tokens, Some(&mut out.parents)),
            None,
        )
    }
}
