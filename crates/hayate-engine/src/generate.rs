//! The decode loop shared by every front end.

use crate::forward::Logits;
use crate::model::{Model, StateOptions};
use crate::sampler::{Sampler, TokenConstraint};
use crate::speculate::{DraftTree, Speculation, SpeculationStats};
use crate::state::InferenceState;
use crate::{EngineError, Result};
use std::time::{Duration, Instant};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was sampled (it is not part of the output).
    Stop,
    /// The token budget was reached.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Stop => "stop token",
            StopReason::MaxTokens => "token limit",
            StopReason::ContextFull => "context full",
            StopReason::Cancelled => "cancelled",
        })
    }
}

/// Timings of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    /// Tokens prefilled for this request.
    pub prompt_tokens: usize,
    /// Time to prefill them.
    pub prefill_time: Duration,
    /// Time to prefill them and sample the first token (`None` when no
    /// token was sampled: a limit of 0 tokens).
    pub time_to_first_token: Option<Duration>,
    /// Tokens generated (stop token excluded).
    pub generated: usize,
    /// Time spent after the first token.
    pub decode_time: Duration,
    /// Why it ended.
    pub stop: StopReason,
    /// What speculative decoding did, when it ran.
    pub speculation: Option<SpeculationStats>,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_rate(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_rate(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// What a generation may do besides sampling: speculate, follow a
/// constraint, stop.
pub struct Rules<'r, 's> {
    /// Speculative decoding (the same tokens in fewer passes).
    pub speculation: Option<&'r mut Speculation<'s>>,
    /// Tokens allowed at each step (a grammar). With speculation, every
    /// token is still drawn from the model's masked logits (the output is
    /// the same), and drafts are masked too.
    pub constraint: Option<&'r mut dyn TokenConstraint>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end generation (not passed on).
    pub stop_ids: &'r [u32],
}

/// One sequence being generated: the model's state and the tokens it holds.
pub struct Generator<'m> {
    model: &'m Model,
    /// The model state; holds `tokens[..state.len()]`.
    pub state: InferenceState,
    /// Every token of the sequence so far (prompt and generated).
    pub tokens: Vec<u32>,
}

impl<'m> Generator<'m> {
    /// A generator with a fresh state as `options` say (see [`Model::new_state_with`]).
    pub fn new(model: &'m Model, options: &StateOptions) -> Result<Self> {
        let state = model.new_state_with(options)?;
        let tokens = Vec::with_capacity(state.capacity());
        Ok(Generator {
            model,
            state,
            tokens,
        })
    }

    /// Makes the sequence `prompt`, keeping the longest already-processed
    /// prefix (only the rest will be prefilled): multi-turn chat re-renders
    /// the whole conversation, and only the new turn costs time. Returns
    /// how many of the prompt's tokens were kept (not to be prefilled).
    pub fn set_prompt(&mut self, prompt: &[u32]) -> Result<usize> {
        let keep = self.state.shared_prefix(&self.tokens, prompt);
        let kept = if self.state.can_truncate(keep) {
            self.state.truncate(keep)?;
            keep
        } else {
            // Recurrent layers cannot go back that far: start over.
            self.state.clear();
            0
        };
        self.tokens.clear();
        self.tokens.extend_from_slice(prompt);
        Ok(kept)
    }

    /// Prefills what the state lacks of the sequence, then samples up to
    /// `max_tokens` tokens, calling `on_token` with each (it returns `false`
    /// to stop). A token in `stop_ids` ends generation and is not passed on.
    pub fn generate<E: From<EngineError>>(
        &mut self,
        sampler: &mut Sampler,
        max_tokens: usize,
        stop_ids: &[u32],
        on_token: impl FnMut(u32) -> std::result::Result<bool, E>,
    ) -> std::result::Result<GenerationStats, E> {
        self.generate_with(sampler, None, max_tokens, stop_ids, on_token)
    }

    /// [`generate`](Self::generate), with speculative decoding when
    /// `speculation` is given: the same tokens, in fewer model passes when
    /// the speculator guesses well (see [`crate::speculate`]). The state
    /// must roll back as many tokens as are drafted at once.
    pub fn generate_with<E: From<EngineError>>(
        &mut self,
        sampler: &mut Sampler,
        speculation: Option<&mut Speculation<'_>>,
        max_tokens: usize,
        stop_ids: &[u32],
        mut on_token: impl FnMut(u32) -> std::result::Result<bool, E>,
    ) -> std::result::Result<GenerationStats, E> {
        let rules = Rules {
            speculation,
            constraint: None,
            max_tokens,
            stop_ids,
        };
        self.generate_observed(sampler, rules, |token, _| on_token(token))
    }

    /// [`generate_with`](Self::generate_with) under `rules`, also showing
    /// `on_token` the logits each token was drawn from, penalties and the
    /// constraint's mask applied (log-probabilities are computed from them).
    /// Presence and frequency penalties count the tokens generated by this
    /// call, not the prompt's.
    pub fn generate_observed<E: From<EngineError>>(
        &mut self,
        sampler: &mut Sampler,
        rules: Rules<'_, '_>,
        mut on_token: impl FnMut(u32, &[f32]) -> std::result::Result<bool, E>,
    ) -> std::result::Result<GenerationStats, E> {
        let Rules {
            mut speculation,
            mut constraint,
            max_tokens,
            stop_ids,
        } = rules;
        let start = Instant::now();
        let pending = self.tokens.len() - self.state.len();
        if pending == 0 {
            return Err(
                EngineError::State("nothing to prefill: the sequence is empty".into()).into(),
            );
        }
        if self.tokens.len() >= self.state.capacity() {
            return Err(EngineError::ContextFull {
                needed: self.tokens.len() + 1,
                capacity: self.state.capacity(),
            }
            .into());
        }
        // Trees where the model can branch and the speculation asks for them
        // (chains under a constraint, whose drafts are masked one path).
        let branch = self.model.can_branch()
            && constraint.is_none()
            && speculation.as_ref().is_some_and(|s| s.width() > 1);
        let max_depth = speculation.as_ref().map_or(0, |s| s.length().max());
        if let Some(r) = self.state.max_rollback()
            && r < max_depth
        {
            return Err(EngineError::State(format!(
                "drafts of up to {max_depth} tokens need a state that rolls back as many; this one keeps {r}"
            ))
            .into());
        }
        // A tree is held to what one tree pass takes on this state.
        let max_nodes = match (branch, &speculation) {
            (true, Some(s)) => (max_depth * s.width()).min(self.state.max_tree_tokens() - 1),
            _ => max_depth,
        };
        if let Some(s) = speculation.as_deref_mut() {
            s.begin_output(self.tokens.len());
        }
        let mut stats = GenerationStats {
            prompt_tokens: pending,
            prefill_time: Duration::ZERO,
            time_to_first_token: None,
            generated: 0,
            decode_time: Duration::ZERO,
            stop: StopReason::MaxTokens,
            speculation: None,
        };
        let vocab = self.model.info.vocab;
        let mut logits = vec![0f32; vocab];
        // Reserved here so that the loop does not allocate.
        let mut drafts = DraftTree::with_capacity(max_nodes);
        let mut pass: Vec<u32> = Vec::with_capacity(max_nodes + 1);
        let mut parents: Vec<usize> = Vec::with_capacity(max_nodes + 1);
        let mut rows: Vec<f32> = Vec::with_capacity((max_nodes + 1) * vocab);
        // The pass tokens accepted so far, from the pass's first (its path in a tree).
        let mut path: Vec<usize> = Vec::with_capacity(max_depth + 1);
        let new = &self.tokens[self.state.len()..];
        logits.copy_from_slice(self.model.forward(&mut self.state, new, Logits::Last)?);
        stats.prefill_time = start.elapsed();
        sampler.output_start = self.tokens.len();
        let mut first_at = None;
        // Row of `rows` (pass token) the current logits came from.
        let mut row = 0;
        while stats.generated < max_tokens {
            let position = self.tokens.len();
            if let Some(c) = constraint.as_deref_mut() {
                c.mask(&mut logits).map_err(EngineError::Constraint)?;
                if !logits.iter().any(|l| *l > f32::NEG_INFINITY) {
                    return Err(EngineError::Constraint(
                        "the constraint allows no token here".into(),
                    )
                    .into());
                }
            }
            let token = sampler.sample(&mut logits, position, &self.tokens);
            if let Some(c) = constraint.as_deref_mut()
                && !stop_ids.contains(&token)
            {
                c.commit(token).map_err(EngineError::Constraint)?;
            }
            if first_at.is_none() {
                let now = Instant::now();
                stats.time_to_first_token = Some(now - start);
                first_at = Some(now);
            }
            // A drafted token the model drew too: already fed, its logits are its row.
            let accepted = drafts.child(row, token);
            if let Some(s) = speculation.as_deref_mut()
                && accepted.is_none()
                && !drafts.tokens.is_empty()
            {
                // The pass is settled: its path is kept, the rest dropped.
                let depth = drafts.depth();
                s.record_outcome(&self.tokens, (drafts.tokens.len(), depth), path.len() - 1);
                self.state.keep_branch(pass.len(), &path)?;
                drafts.clear();
            }
            if stop_ids.contains(&token) {
                stats.stop = StopReason::Stop;
                break;
            }
            self.tokens.push(token);
            stats.generated += 1;
            if !on_token(token, &logits)? {
                stats.stop = StopReason::Cancelled;
                break;
            }
            if stats.generated == max_tokens {
                break;
            }
            if self.tokens.len() >= self.state.capacity() {
                stats.stop = StopReason::ContextFull;
                break;
            }
            if let Some(child) = accepted {
                row = child;
                path.push(child);
                logits.copy_from_slice(&rows[row * vocab..(row + 1) * vocab]);
                continue;
            }
            let Some(s) = speculation.as_deref_mut() else {
                logits.copy_from_slice(self.model.forward(
                    &mut self.state,
                    &[token],
                    Logits::Last,
                )?);
                continue;
            };
            // Drop what the last pass fed past the accepted tokens, then
            // check `token` and a new draft in one pass.
            self.state.truncate(self.tokens.len() - 1)?;
            let room = self.state.capacity() - self.tokens.len();
            let budget = (max_tokens - stats.generated).saturating_sub(1);
            let k = s.next_length(room.min(budget));
            s.propose(
                &self.tokens,
                (k, room.min(max_nodes)),
                branch,
                constraint
                    .as_deref_mut()
                    .map(|c| c as &mut dyn TokenConstraint),
                &mut drafts,
            )?;
            pass.clear();
            pass.push(token);
            pass.extend_from_slice(&drafts.tokens);
            let began = Instant::now();
            if drafts.branches() {
                parents.clear();
                parents.push(0);
                parents.extend_from_slice(&drafts.parents);
                self.model
                    .forward_tree(&mut self.state, &pass, &parents, &mut rows)?;
            } else {
                self.model
                    .forward_exact(&mut self.state, &pass, Logits::All(&mut rows))?;
            }
            s.record_pass(pass.len(), drafts.branches(), began.elapsed());
            row = 0;
            path.clear();
            path.push(0);
            logits.copy_from_slice(&rows[..vocab]);
        }
        // A pass left unsettled (generation ended on an accepted token): keep its path.
        if !drafts.tokens.is_empty() {
            self.state.keep_branch(pass.len(), &path)?;
        }
        // The state holds no token the sequence does not.
        if self.state.len() > self.tokens.len() {
            self.state.truncate(self.tokens.len())?;
        }
        if let Some(s) = speculation {
            stats.speculation = Some(s.stats.clone());
        }
        if let Some(first) = first_at {
            stats.decode_time = first.elapsed();
        }
        Ok(stats)
    }
}
