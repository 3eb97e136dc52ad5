//! The decode loop shared by every front end.

use crate::forward::Logits;
use crate::model::{Model, StateOptions};
use crate::sampler::Sampler;
use crate::speculate::{Speculation, SpeculationStats};
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
    /// the whole conversation, and only the new turn costs time.
    pub fn set_prompt(&mut self, prompt: &[u32]) -> Result<()> {
        let common = self.tokens[..self.state.len()]
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least one token must be fed to get logits for the next one.
        let keep = common.min(prompt.len().saturating_sub(1));
        if self.state.can_truncate(keep) {
            self.state.truncate(keep)?;
        } else {
            // Recurrent layers cannot go back that far: start over.
            self.state.clear();
        }
        self.tokens.clear();
        self.tokens.extend_from_slice(prompt);
        Ok(())
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
        mut speculation: Option<&mut Speculation<'_>>,
        max_tokens: usize,
        stop_ids: &[u32],
        mut on_token: impl FnMut(u32) -> std::result::Result<bool, E>,
    ) -> std::result::Result<GenerationStats, E> {
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
        let max_draft = speculation.as_ref().map_or(0, |s| s.length().max());
        if let Some(r) = self.state.max_rollback()
            && r < max_draft
        {
            return Err(EngineError::State(format!(
                "drafts of up to {max_draft} tokens need a state that rolls back as many; this one keeps {r}"
            ))
            .into());
        }
        if let Some(s) = speculation.as_deref_mut() {
            s.reset_stats();
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
        let mut drafts: Vec<u32> = Vec::with_capacity(max_draft);
        let mut pass: Vec<u32> = Vec::with_capacity(max_draft + 1);
        let mut rows: Vec<f32> = Vec::with_capacity((max_draft + 1) * vocab);
        let new = &self.tokens[self.state.len()..];
        logits.copy_from_slice(self.model.forward(&mut self.state, new, Logits::Last)?);
        stats.prefill_time = start.elapsed();
        let mut first_at = None;
        // Row of `rows` the current logits came from; drafts before it were accepted.
        let mut row = 0;
        while stats.generated < max_tokens {
            let position = self.tokens.len();
            let token = sampler.sample(&mut logits, position, &self.tokens);
            if first_at.is_none() {
                let now = Instant::now();
                stats.time_to_first_token = Some(now - start);
                first_at = Some(now);
            }
            // A drafted token the model drew too: already fed, its logits are the next row.
            let accepted = row < drafts.len() && drafts[row] == token;
            if let Some(s) = speculation.as_deref_mut()
                && !accepted
                && !drafts.is_empty()
            {
                // The pass is settled: `row` drafts were accepted.
                s.record_outcome(&self.tokens, drafts.len(), row);
                drafts.clear();
            }
            if stop_ids.contains(&token) {
                stats.stop = StopReason::Stop;
                break;
            }
            self.tokens.push(token);
            stats.generated += 1;
            if !on_token(token)? {
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
            if accepted {
                row += 1;
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
            s.propose(&self.tokens, k, &mut drafts)?;
            pass.clear();
            pass.push(token);
            pass.extend_from_slice(&drafts);
            let began = Instant::now();
            self.model
                .forward_exact(&mut self.state, &pass, Logits::All(&mut rows))?;
            s.record_pass(pass.len(), began.elapsed());
            row = 0;
            logits.copy_from_slice(&rows[..vocab]);
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
