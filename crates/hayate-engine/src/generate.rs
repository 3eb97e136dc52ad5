//! The decode loop shared by every front end.

use crate::forward::Logits;
use crate::model::{Model, StateOptions};
use crate::sampler::Sampler;
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
        let mut stats = GenerationStats {
            prompt_tokens: pending,
            prefill_time: Duration::ZERO,
            time_to_first_token: None,
            generated: 0,
            decode_time: Duration::ZERO,
            stop: StopReason::MaxTokens,
        };
        let mut logits = vec![0f32; self.model.info.vocab];
        let new = &self.tokens[self.state.len()..];
        logits.copy_from_slice(self.model.forward(&mut self.state, new, Logits::Last)?);
        stats.prefill_time = start.elapsed();
        let mut first_at = None;
        while stats.generated < max_tokens {
            let position = self.tokens.len();
            let token = sampler.sample(&mut logits, position, &self.tokens);
            if first_at.is_none() {
                let now = Instant::now();
                stats.time_to_first_token = Some(now - start);
                first_at = Some(now);
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
            logits.copy_from_slice(
                self.model
                    .forward(&mut self.state, &[token], Logits::Last)?,
            );
        }
        if let Some(first) = first_at {
            stats.decode_time = first.elapsed();
        }
        Ok(stats)
    }
}
