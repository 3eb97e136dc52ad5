//! Continuous batching: many requests generated together, one step at a
//! time, each joining and leaving at any step.
//!
//! A [`Batcher`] holds a fixed number of slots, each a sequence's state and
//! tokens. A request takes a free slot (the one whose state already holds
//! the longest prefix of its prompt, so a conversation's next turn
//! prefills only what is new); each [`Batcher::step`] then
//!
//! - prefills prompts in pieces of the state's step length, within a
//!   per-step token budget while others decode, so that a long prompt does
//!   not stall them (all of it at once when nothing decodes);
//! - decodes one token for every other active sequence in one batched
//!   pass ([`Model::forward_batch`]: the weights are read once per step),
//!   or, for a slot that speculates ([`Batcher::speculate`]), its pending
//!   token and a draft;
//! - samples each sequence's next tokens under its own sampler and
//!   constraint (the drafted ones the model draws too), and reports them.
//!
//! Models whose layers cannot roll back far (Gated DeltaNet, short
//! convolutions, sliding windows) keep [`Snapshot`]s of a slot's state as
//! its prompts are prefilled: after each end-of-turn token (a message
//! boundary), every [`SNAPSHOT_EVERY`] tokens and at the prompt's end. A
//! request whose prompt shares a prefix with the slot's sequence resumes
//! from the latest snapshot inside it, so a conversation's next turn, or
//! a request sharing a long system prompt, prefills only what follows.
//!
//! When every layer is full attention, a request whose prompt shares a
//! prefix with another slot's sequence takes that slot's pages for it
//! (shared, copied before one is written): whole pieces the lender
//! computed from the start, so that what follows is computed as it would
//! be alone.
//!
//! Attention caches take their pages from one [`KvPool`] of a fixed size
//! (`kv_memory`): a request is admitted when the memory its prompt and
//! `max_tokens` can fill is free, counting what the running requests may
//! still take; idle slots' cached sequences are evicted for it, least
//! recently used first. One that must wait is left to the caller to queue
//! ([`Batcher::fits`]); one that can never fit is longer than
//! [`Batcher::capacity`].
//!
//! Batch-invariant: a prompt's pieces depend only on the prompt and what
//! its slot held, and a batched pass gives each sequence what it gives
//! alone, so a seeded request generates the same text alone or under load.

use crate::forward::{BatchScratch, Logits, SequenceStep};
use crate::generate::{GenerationStats, StopReason};
use crate::layers::KvPool;
use crate::model::{Model, StateOptions};
use crate::sampler::{Sampler, SamplingParams, TokenConstraint};
use crate::saved;
use crate::speculate::{DraftTree, Speculation};
use crate::state::{InferenceState, Snapshot};
use crate::{EngineError, Result};
use hayate_kernels::pool::{DisjointMut, split_range};
use std::time::{Duration, Instant};

/// What a request asks of its generation.
pub struct BatchRequest {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<u32>,
    /// How to sample.
    pub params: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens allowed at each step (a grammar).
    pub constraint: Option<Box<dyn TokenConstraint + Send>>,
}

/// What a step reports of one slot's request.
pub enum SlotEvent<'a> {
    /// A token was generated; `logits` are those it was drawn from
    /// (penalties and the constraint's mask applied).
    Token {
        /// The token.
        token: u32,
        /// Its logits.
        logits: &'a [f32],
    },
    /// The request ended; its slot is free again.
    Done(GenerationStats),
    /// The request failed; its slot is free again.
    Failed(EngineError),
}

/// The generation a slot is running.
struct Active {
    sampler: Sampler,
    constraint: Option<Box<dyn TokenConstraint + Send>>,
    max_tokens: usize,
    /// Where the prompt's prefill began and the tokens it prefills.
    prompt_tokens: usize,
    started: Instant,
    prefill_time: Duration,
    first_token_at: Option<Instant>,
    generated: usize,
    /// Bytes of attention pages its sequence may hold by its end.
    reserved: usize,
}

impl Active {
    /// Draws the token after `tokens` from `row` (its logits, masked by
    /// the constraint first), and whether it is a stop token (which the
    /// constraint does not take); an error where the constraint fails.
    fn pick(
        &mut self,
        row: &mut [f32],
        tokens: &[u32],
        stop_ids: &[u32],
    ) -> std::result::Result<(u32, bool), String> {
        if let Some(c) = self.constraint.as_deref_mut() {
            c.mask(row)?;
            if !row.iter().any(|l| *l > f32::NEG_INFINITY) {
                return Err("the constraint allows no token here".into());
            }
        }
        let token = self.sampler.sample(row, tokens.len(), tokens);
        let stop = stop_ids.contains(&token);
        if let Some(c) = self.constraint.as_deref_mut()
            && !stop
        {
            c.commit(token)?;
        }
        Ok((token, stop))
    }
}

/// What drawing a slot's next tokens came to.
enum Draw {
    /// `drawn` tokens were added to the sequence, of which `accepted`
    /// were drafted ones the model drew too; the generation ends after
    /// them when `end` says so.
    Tokens {
        drawn: usize,
        accepted: usize,
        end: Option<StopReason>,
    },
    /// The constraint failed.
    Failed(EngineError),
}

/// Prompt tokens between snapshots of a state that cannot roll back.
pub const SNAPSHOT_EVERY: usize = 512;

/// Most snapshots one slot keeps (the earliest go first).
const MAX_SNAPSHOTS: usize = 8;

/// One sequence's state and tokens, kept between requests.
struct Slot {
    state: InferenceState,
    /// Snapshots of the state along `tokens`, by increasing length.
    snapshots: Vec<Snapshot>,
    /// Every token of the sequence (the prompt and what was generated);
    /// the state holds `tokens[..state.len()]`.
    tokens: Vec<u32>,
    /// The next-token logits, sampled in place.
    logits: Vec<f32>,
    /// A speculative pass: the token to feed, then the draft (empty for
    /// a plain step).
    pass: Vec<u32>,
    /// The pass's logits, a row per token, sampled in place.
    rows: Vec<f32>,
    active: Option<Active>,
    /// When the slot last took a request: the least recently used is
    /// reused first, and prompts prefill in the order they came.
    last_used: u64,
    /// Leading tokens the state computed in whole pieces from the start
    /// (a multiple of the step length): what another slot may share, as
    /// the pieces it would have computed alone.
    aligned: usize,
}

impl Slot {
    /// Forgets the sequence (state, tokens, snapshots); its attention pages
    /// go back to the pool.
    fn forget(&mut self) {
        self.state.clear();
        self.state.release_unused();
        self.tokens.clear();
        self.snapshots.clear();
        self.aligned = 0;
    }

    /// Whether the state rolls back only a few tokens (then snapshots
    /// resume it further back).
    fn bounded(&self) -> bool {
        self.state.max_rollback().is_some()
    }

    /// Whether the slot's prompt is still being prefilled.
    fn prefilling(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.generated == 0)
            && self.state.len() < self.tokens.len()
    }

    /// Whether the slot has a sampled token to feed.
    fn decoding(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.generated > 0)
    }

    /// Draws the next tokens under the slot's sampler and constraint: one
    /// from the state's fresh logits, or, after a speculative pass, one per
    /// row of the pass for as long as the model draws the drafted token
    /// (the noise is the position's, so this is what plain decoding
    /// draws). The state then keeps the pass up to its last accepted
    /// token. Touches nothing but the slot, so that slots draw on threads
    /// of their own.
    fn draw(&mut self, stop_ids: &[u32], capacity: usize) -> Draw {
        let Slot {
            state,
            tokens,
            logits,
            pass,
            rows,
            active,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Draw::Tokens {
                drawn: 0,
                accepted: 0,
                end: Some(StopReason::Cancelled),
            };
        };
        let vocab = logits.len();
        let base = tokens.len();
        let (mut drawn, mut accepted, mut end) = (0, 0, None);
        for r in 0..pass.len().max(1) {
            if active.generated == active.max_tokens {
                end = Some(StopReason::MaxTokens);
                break;
            }
            let row: &mut [f32] = if pass.is_empty() {
                logits.copy_from_slice(state.last_logits());
                logits
            } else {
                &mut rows[r * vocab..(r + 1) * vocab]
            };
            let (token, stop) = match active.pick(row, tokens, stop_ids) {
                Ok(picked) => picked,
                // Tokens drawn before are reported first; the next step
                // meets the failure again from this position.
                Err(_) if drawn > 0 => break,
                Err(e) => return Draw::Failed(EngineError::Constraint(e)),
            };
            active.first_token_at.get_or_insert_with(Instant::now);
            if stop {
                end = Some(StopReason::Stop);
                break;
            }
            tokens.push(token);
            active.generated += 1;
            drawn += 1;
            if active.generated == active.max_tokens {
                end = Some(StopReason::MaxTokens);
            } else if tokens.len() >= capacity {
                end = Some(StopReason::ContextFull);
            }
            if end.is_some() || pass.get(r + 1) != Some(&token) {
                break;
            }
            accepted += 1;
        }
        // Fed so far: the pass's first token (the last drawn before it)
        // and the drafts the model drew too.
        let held = (base + accepted).min(state.len());
        if held < state.len()
            && let Err(e) = state.truncate(held)
        {
            return Draw::Failed(e);
        }
        Draw::Tokens {
            drawn,
            accepted,
            end,
        }
    }

    /// Tokens of `prompt` this slot's state holds and can keep (at least
    /// one prompt token must be fed, for the logits after it), and the
    /// snapshot to resume from when rolling back cannot keep them.
    fn reusable(&self, prompt: &[u32]) -> (usize, Option<usize>) {
        let keep = self.state.shared_prefix(&self.tokens, prompt);
        if self.state.can_truncate(keep) {
            return (keep, None);
        }
        match self.snapshots.iter().rposition(|s| s.len() <= keep) {
            Some(i) => (self.snapshots[i].len(), Some(i)),
            None => (0, None),
        }
    }

    /// Tokens of `prompt` another slot's state may take from this one's
    /// pages: within the common prefix, whole pieces it computed from the
    /// start (so the other computes every later piece as it would alone).
    fn shareable(&self, prompt: &[u32]) -> usize {
        let chunk = self.state.shape.chunk;
        let common = self.state.shared_prefix(&self.tokens, prompt);
        common.min(self.aligned) / chunk * chunk
    }

    /// Where the prompt piece starting at `from` ends: a whole step, or
    /// sooner at a message boundary (after a token of `ends`) where a
    /// bounded state takes a snapshot.
    fn piece_end(&self, from: usize, ends: &[u32]) -> usize {
        let end = (from + self.state.shape.chunk).min(self.tokens.len());
        if !self.bounded() {
            return end;
        }
        self.tokens[from..end - 1]
            .iter()
            .position(|t| ends.contains(t))
            .map_or(end, |i| from + i + 1)
    }

    /// After a prompt piece ending at `end`: a snapshot where the state
    /// cannot roll back, at a message boundary, the prompt's end or
    /// [`SNAPSHOT_EVERY`] tokens after the last.
    fn maybe_snapshot(&mut self, blocks: &[crate::layers::Block], end: usize, ends: &[u32]) {
        if !self.bounded() {
            return;
        }
        let last = self.snapshots.last().map_or(0, Snapshot::len);
        let boundary = ends.contains(&self.tokens[end - 1]);
        if end > last && (boundary || end == self.tokens.len() || end - last >= SNAPSHOT_EVERY) {
            if self.snapshots.len() == MAX_SNAPSHOTS {
                self.snapshots.remove(0);
            }
            self.snapshots.push(self.state.snapshot(blocks));
        }
    }
}

/// Requests generated together: a fixed number of slots, advanced one
/// [`step`](Self::step) at a time.
pub struct Batcher<'m> {
    model: &'m Model,
    slots: Vec<Slot>,
    /// Where the slots' attention caches take their pages.
    pool: KvPool,
    /// Each slot's speculative decoding, when asked for ([`Batcher::speculate`];
    /// else none).
    speculations: Vec<Speculation<'m>>,
    /// Most tokens a sequence holds: the context, or less where one
    /// sequence alone would fill the pool.
    capacity: usize,
    scratch: BatchScratch,
    /// Ids that end a generation (not reported).
    stop_ids: Vec<u32>,
    /// Counts admissions and uses, for ordering.
    clock: u64,
}

/// Where a step's decode tokens go: rows of one batched pass.
const DECODE_ROWS: usize = 64;

impl<'m> Batcher<'m> {
    /// `slots` sequences, each with a state as `options` say, their
    /// attention caches sharing `kv_memory` bytes of pages (`None`: enough
    /// for every slot's whole context, within half of what the machine has
    /// left); `stop_ids` end every generation. The states' memory is
    /// checked against the machine's first, all slots together.
    pub fn new(
        model: &'m Model,
        options: &StateOptions,
        slots: usize,
        stop_ids: Vec<u32>,
        kv_memory: Option<usize>,
    ) -> Result<Self> {
        if slots == 0 {
            return Err(EngineError::State(
                "a batch of 0 slots serves nothing".into(),
            ));
        }
        let pool = KvPool::new(0);
        let first = model.new_state_in(options, &pool)?;
        let whole = first.kv_bytes_at(first.capacity());
        let fixed = first.bytes() - whole;
        let gib = |b: f64| b / f64::from(1u32 << 30);
        let physical = crate::budget::physical_memory().unwrap_or(usize::MAX);
        let fixed_total = fixed.checked_mul(slots).filter(|&t| t <= physical);
        let Some(fixed_total) = fixed_total else {
            return Err(EngineError::State(format!(
                "{slots} sequences need {:.1} GiB of state besides their attention caches; this machine has {:.1} GiB: lower the sequences or the context",
                gib(fixed as f64 * slots as f64),
                gib(physical as f64)
            )));
        };
        let left = physical - fixed_total;
        let limit = match kv_memory {
            Some(bytes) if bytes > left => {
                return Err(EngineError::State(format!(
                    "a KV memory of {:.1} GiB is more than this machine has left for it ({:.1} GiB)",
                    gib(bytes as f64),
                    gib(left as f64)
                )));
            }
            Some(bytes) => bytes,
            None => whole.saturating_mul(slots).min(left / 2),
        };
        let one_page = first.kv_bytes_at(1);
        if limit < one_page {
            return Err(EngineError::State(format!(
                "a KV memory of {} KiB holds no page of this model's attention caches ({} KiB each)",
                limit >> 10,
                one_page.div_ceil(1 << 10)
            )));
        }
        pool.set_limit(limit);
        // The longest sequence the pool holds (its pages grow with it).
        let (mut fits, mut beyond) = (1, first.capacity() + 1);
        while beyond - fits > 1 {
            let mid = fits + (beyond - fits) / 2;
            if first.kv_bytes_at(mid) <= limit {
                fits = mid;
            } else {
                beyond = mid;
            }
        }
        let mut states = vec![first];
        for _ in 1..slots {
            states.push(model.new_state_in(options, &pool)?);
        }
        let vocab = model.info.vocab;
        let slots = states
            .into_iter()
            .map(|state| Slot {
                tokens: Vec::with_capacity(state.capacity()),
                snapshots: Vec::new(),
                state,
                logits: vec![0.0; vocab],
                pass: Vec::new(),
                rows: Vec::new(),
                active: None,
                last_used: 0,
                aligned: 0,
            })
            .collect();
        Ok(Batcher {
            model,
            slots,
            pool,
            speculations: Vec::new(),
            capacity: fits,
            scratch: model.new_batch_scratch(DECODE_ROWS)?,
            stop_ids,
            clock: 0,
        })
    }

    /// Most tokens a sequence holds: the context, or less when the KV
    /// memory holds less (a request longer than this can never run).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The KV memory: bytes of pages the caches hold now, and the most they may.
    pub fn kv_memory(&self) -> (usize, usize) {
        (self.pool.held(), self.pool.limit())
    }

    /// Bytes of attention pages a sequence of `tokens` takes.
    fn kv_bytes(&self, tokens: usize) -> usize {
        self.slots[0].state.kv_bytes_at(tokens.min(self.capacity))
    }

    /// Bytes the running requests may still take, all they reserved.
    fn reserved(&self) -> usize {
        let active = self.slots.iter().filter_map(|s| s.active.as_ref());
        active.map(|a| a.reserved).sum()
    }

    /// Whether a request of `prompt` tokens and up to `max_tokens` more
    /// can start now: a free slot, and KV memory for all of them besides
    /// what the running requests reserved (idle slots' cached sequences
    /// give way). When not, it waits for some to end (one longer than
    /// [`capacity`](Self::capacity) never fits).
    pub fn fits(&self, prompt: usize, max_tokens: usize) -> bool {
        let need = self.kv_bytes(prompt.saturating_add(max_tokens));
        self.active() < self.slots.len()
            && prompt < self.capacity
            && self.reserved() + need <= self.pool.limit()
    }

    /// Slots, busy or free.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Slots running a request.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.active.is_some()).count()
    }

    /// Speculative decoding in every slot from now on, each with the
    /// speculation `make(slot)` returns: a decoding slot's step then
    /// verifies its pending token and a draft in one pass (chains), inside
    /// the batched pass, and takes every drafted token the model draws
    /// too, so its tokens are the ones plain decoding gives. Drafts are
    /// cut to what the state rolls back and what a batched pass takes.
    pub fn speculate(
        &mut self,
        mut make: impl FnMut(usize) -> Result<Speculation<'m>>,
    ) -> Result<()> {
        let mut speculations = Vec::with_capacity(self.slots.len());
        for i in 0..self.slots.len() {
            let s = make(i)?;
            let depth = s.length().max();
            if let Some(r) = self.slots[i].state.max_rollback()
                && r < depth
            {
                return Err(EngineError::State(format!(
                    "drafts of up to {depth} tokens need states that roll back as many; these keep {r}"
                )));
            }
            speculations.push(s);
        }
        self.speculations = speculations;
        Ok(())
    }

    /// Starts `request` in a free slot, the one holding the longest prefix
    /// of its prompt (else the least recently used), evicting idle slots'
    /// sequences where its KV memory needs their pages. Returns the slot
    /// and how many prompt tokens its state already held (not prefilled).
    /// A prompt that is empty or fills the context is an error, as is a
    /// request that does not [`fit`](Self::fits) now.
    pub fn admit(&mut self, request: BatchRequest) -> Result<(usize, usize)> {
        let prompt = &request.prompt;
        if prompt.is_empty() {
            return Err(EngineError::State(
                "nothing to prefill: the prompt is empty".into(),
            ));
        }
        let capacity = self.capacity;
        if prompt.len() >= capacity {
            return Err(EngineError::ContextFull {
                needed: prompt.len() + 1,
                capacity,
            });
        }
        let vocab = self.model.info.vocab;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { token: bad, vocab });
        }
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .map(|(i, s)| (i, s.reusable(prompt).0, s.last_used))
            .min_by_key(|&(_, own, used)| (std::cmp::Reverse(own), used));
        let Some((index, own, _)) = best else {
            return Err(EngineError::State(format!(
                "all {} sequences are busy",
                self.slots.len()
            )));
        };
        let reserved = self.kv_bytes(prompt.len().saturating_add(request.max_tokens));
        let limit = self.pool.limit();
        if self.reserved() + reserved > limit {
            return Err(EngineError::KvMemory { limit });
        }
        self.clock += 1;
        // Another slot holding a longer prefix lends its pages. A slot whose
        // sequence shares little with the prompt (less than a piece, at most
        // an eighth of what is left to prefill) starts over instead: at most
        // an eighth more prefill, and the prompt laid out in whole pieces
        // from its first token, which later prompts can borrow exactly.
        let sharing = self.slots[index].state.can_share();
        let chunk = self.slots[index].state.shape.chunk;
        let start_over = sharing && own < chunk && own * 8 <= prompt.len() - own;
        let own = if start_over { 0 } else { own };
        let lender = (0..self.slots.len())
            .filter(|&i| sharing && i != index)
            .map(|i| (self.slots[i].shareable(prompt), i))
            .max()
            .filter(|&(n, _)| n > own);
        if let Some((n, lender)) = lender {
            let (slot, other) = pair(&mut self.slots, index, lender);
            slot.state.share_prefix(&other.state, n)?;
            slot.tokens.clear();
            slot.tokens.extend_from_slice(&prompt[..n]);
            slot.snapshots.clear();
            slot.aligned = n;
        } else if start_over {
            // Nothing of its sequence matches now: it is cleared below.
            self.slots[index].tokens.clear();
        }
        let slot = &mut self.slots[index];
        let (kept, from_snapshot) = slot.reusable(prompt);
        // Snapshots past where the new sequence leaves the old one no longer hold.
        let common = slot.state.shared_prefix(&slot.tokens, prompt);
        if let Some(i) = from_snapshot {
            slot.state
                .restore(&self.model.parts.blocks, &slot.snapshots[i])?;
        } else if kept > 0 {
            slot.state.truncate(kept)?;
        } else {
            slot.state.clear();
        }
        slot.snapshots.retain(|s| s.len() <= common);
        slot.state.release_unused();
        slot.aligned = slot.aligned.min(kept) / slot.state.shape.chunk * slot.state.shape.chunk;
        slot.tokens.clear();
        slot.tokens.extend_from_slice(prompt);
        slot.last_used = self.clock;
        slot.pass.clear();
        if let Some(s) = self.speculations.get_mut(index) {
            s.set_params(&request.params);
            s.begin_output(prompt.len());
        }
        let mut sampler = Sampler::new(request.params, vocab);
        sampler.output_start = prompt.len();
        slot.active = Some(Active {
            sampler,
            constraint: request.constraint,
            max_tokens: request.max_tokens,
            prompt_tokens: prompt.len() - kept,
            started: Instant::now(),
            prefill_time: Duration::ZERO,
            first_token_at: None,
            generated: 0,
            reserved,
        });
        self.evict_for(index);
        Ok((index, kept))
    }

    /// Evicts idle slots' sequences, least recently used first, until the
    /// pages they hold and all the running requests reserved fit in the
    /// pool (`keep`, just admitted, holds what it reserved).
    fn evict_for(&mut self, keep: usize) {
        let limit = self.pool.limit();
        let idle_bytes = |s: &Slot| match s.active {
            None => s.state.kv_bytes_held(),
            Some(_) => 0,
        };
        let mut held: usize = self.reserved() + self.slots.iter().map(idle_bytes).sum::<usize>();
        while held > limit {
            let victim = (0..self.slots.len())
                .filter(|&i| i != keep && idle_bytes(&self.slots[i]) > 0)
                .min_by_key(|&i| self.slots[i].last_used);
            let Some(i) = victim else { break };
            held -= idle_bytes(&self.slots[i]);
            self.slots[i].forget();
        }
    }

    /// Ends the request in `slot` at once (its client left); nothing more
    /// is reported for it.
    pub fn cancel(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.active = None;
            let held = s.state.len().min(s.tokens.len());
            s.tokens.truncate(held);
            s.state.release_unused();
        }
    }

    /// One step of every active request: prompt pieces within the budget,
    /// one token for every decoding sequence. `on_event(slot, event)`
    /// hears each token (returning `false` ends that request, as
    /// cancelled) and each request's end.
    pub fn step(&mut self, mut on_event: impl FnMut(usize, SlotEvent<'_>) -> bool) {
        let decoding: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].decoding())
            .collect();
        let mut ready: Vec<usize> = Vec::new();
        // Prefill, oldest request first.
        let mut prefilling: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.prefilling().then_some((s.last_used, i)))
            .collect();
        prefilling.sort_unstable();
        // While others decode, one piece (a state's step length) per step.
        let mut budget = if decoding.is_empty() {
            usize::MAX
        } else {
            self.slots[0].state.shape.chunk
        };
        for &(_, i) in &prefilling {
            if budget == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let began = Instant::now();
            // Whole pieces from where the prompt's prefill began (or a
            // message boundary), so that where they split does not depend
            // on the budget.
            let mut result = Ok(false);
            while budget > 0 && slot.prefilling() {
                let from = slot.state.len();
                let end = slot.piece_end(from, &self.stop_ids);
                let last = end == slot.tokens.len();
                let logits = if last { Logits::Last } else { Logits::None };
                if let Err(e) = self
                    .model
                    .forward(&mut slot.state, &slot.tokens[from..end], logits)
                {
                    result = Err(e);
                    break;
                }
                budget = budget.saturating_sub(end - from);
                if from == slot.aligned && end - from == slot.state.shape.chunk {
                    slot.aligned = end;
                }
                slot.maybe_snapshot(&self.model.parts.blocks, end, &self.stop_ids);
                if last {
                    result = Ok(true);
                }
            }
            let active = slot.active.as_mut().expect("prefilling slots are active");
            active.prefill_time += began.elapsed();
            match result {
                Ok(true) => ready.push(i),
                Ok(false) => {}
                Err(e) => self.fail(i, e, &mut on_event),
            }
        }
        // Drafts for the decoding slots that speculate.
        let mut drafts = DraftTree::with_capacity(DECODE_ROWS);
        let mut failed = Vec::new();
        for &i in &decoding {
            let slot = &mut self.slots[i];
            slot.pass.clear();
            let Some(s) = self.speculations.get_mut(i) else {
                continue;
            };
            let active = slot.active.as_mut().expect("decoding slots are active");
            let room = self.capacity - slot.tokens.len();
            let budget = (active.max_tokens - active.generated).saturating_sub(1);
            let most = (DECODE_ROWS - 1).min(slot.state.shape.chunk - 1);
            let k = s.next_length(room.min(budget)).min(most);
            let constraint = active
                .constraint
                .as_deref_mut()
                .map(|c| c as &mut dyn TokenConstraint);
            match s.propose(&slot.tokens, (k, k), false, constraint, &mut drafts) {
                Ok(()) if !drafts.tokens.is_empty() => {
                    slot.pass.push(slot.tokens[slot.state.len()]);
                    slot.pass.extend_from_slice(&drafts.tokens);
                }
                Ok(()) => {}
                Err(e) => failed.push((i, e)),
            }
        }
        for (i, e) in failed {
            self.fail(i, e, &mut on_event);
        }
        // Every decoding sequence's pending token (and draft), in passes of
        // at most DECODE_ROWS rows.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut rows = DECODE_ROWS;
        for &i in decoding.iter().filter(|&&i| self.slots[i].decoding()) {
            let n = self.slots[i].pass.len().max(1);
            if rows + n > DECODE_ROWS {
                groups.push(Vec::new());
                rows = 0;
            }
            groups.last_mut().expect("a group").push(i);
            rows += n;
        }
        for mut group in groups {
            // Each sequence's pages first: one that cannot have them fails
            // alone, not its whole group (the pass's own checks then find
            // them in place).
            let mut short = Vec::new();
            group.retain(|&i| {
                let slot = &mut self.slots[i];
                let end = slot.state.len() + slot.pass.len().max(1);
                match slot.state.prepare(end) {
                    Ok(()) => true,
                    Err(e) => {
                        short.push((i, e));
                        false
                    }
                }
            });
            for (i, e) in short {
                self.fail(i, e, &mut on_event);
            }
            let began = Instant::now();
            let mut batch: Vec<SequenceStep<'_>> = self
                .slots
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| group.binary_search(i).is_ok())
                .map(|(_, slot)| {
                    let Slot {
                        state,
                        tokens,
                        pass,
                        rows,
                        ..
                    } = slot;
                    let at = state.len();
                    match pass.is_empty() {
                        true => SequenceStep {
                            state,
                            tokens: &tokens[at..at + 1],
                            logits: Logits::Last,
                        },
                        false => SequenceStep {
                            state,
                            tokens: &pass[..],
                            logits: Logits::All(rows),
                        },
                    }
                })
                .collect();
            match self.model.forward_batch(&mut self.scratch, &mut batch) {
                Ok(()) => {
                    drop(batch);
                    let time = began.elapsed();
                    for &i in &group {
                        let n = self.slots[i].pass.len();
                        if let Some(s) = self.speculations.get_mut(i)
                            && n > 0
                        {
                            s.record_pass(n, false, time);
                        }
                    }
                    ready.extend_from_slice(&group);
                }
                Err(e) => {
                    drop(batch);
                    for &i in &group {
                        self.fail(i, EngineError::State(e.to_string()), &mut on_event);
                    }
                }
            }
        }
        self.sample(&ready, &mut on_event);
    }

    /// The fingerprint of saved sequences for the model `model` names
    /// ([`crate::saved::fingerprint`]) and these slots' state shape.
    fn saved_fingerprint(&self, model: u64) -> u64 {
        let shape = &self.slots[0].state.shape;
        let numbers = [
            model,
            shape.capacity as u64,
            shape.chunk as u64,
            shape.rollback as u64,
        ];
        let hash = numbers
            .iter()
            .fold(saved::FNV_START, |h, n| saved::fnv(h, &n.to_le_bytes()));
        saved::fnv(hash, shape.kv.name().as_bytes())
    }

    /// Saves every idle slot's sequence under `dir` as `slot-N.seq`
    /// (written to a temporary name, then renamed), for the model whose
    /// fingerprint is `model` ([`crate::saved::fingerprint`]). A state that
    /// cannot roll back far is first taken back to its latest snapshot
    /// (the end of its last prompt, where the next turn of a conversation
    /// resumes). Returns how many were saved.
    pub fn save_to(&mut self, dir: &std::path::Path, model: u64) -> std::io::Result<usize> {
        let fingerprint = self.saved_fingerprint(model);
        let blocks = &self.model.parts.blocks;
        let mut saved = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.active.is_some() {
                continue;
            }
            if let Some(last) = slot.snapshots.last()
                && slot.state.restore(blocks, last).is_ok()
            {
                slot.tokens.truncate(last.len());
            }
            if slot.state.is_empty() {
                continue;
            }
            let bytes = saved::encode(fingerprint, blocks, &slot.state, &slot.tokens);
            let path = dir.join(format!("slot-{i}.seq"));
            let temporary = dir.join(format!(".slot-{i}.seq.partial"));
            std::fs::write(&temporary, &bytes)?;
            std::fs::rename(&temporary, &path)?;
            saved += 1;
        }
        Ok(saved)
    }

    /// Reads the sequences [`save_to`](Self::save_to) left under `dir`
    /// into the idle slots. A file that cannot be read (truncated, corrupt,
    /// saved for another model or other options) is skipped; the returned
    /// lines say which and why. Returns also how many were read.
    pub fn load_from(&mut self, dir: &std::path::Path, model: u64) -> (usize, Vec<String>) {
        let fingerprint = self.saved_fingerprint(model);
        let vocab = self.model.info.vocab;
        let blocks = &self.model.parts.blocks;
        let (mut loaded, mut warnings) = (0, Vec::new());
        let page = self.kv_bytes(1);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let path = dir.join(format!("slot-{i}.seq"));
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warnings.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            // How it was computed is not saved: nothing to lend.
            slot.forget();
            match saved::decode(&bytes, fingerprint, blocks, &mut slot.state) {
                Ok(tokens) if tokens.iter().all(|&t| (t as usize) < vocab) => {
                    slot.tokens = tokens;
                    if slot.bounded() {
                        slot.snapshots.push(slot.state.snapshot(blocks));
                    }
                    loaded += 1;
                }
                Ok(_) => {
                    slot.forget();
                    warnings.push(format!(
                        "{}: a token is outside the vocabulary",
                        path.display()
                    ));
                }
                Err(e) => {
                    // A load cut short by the KV memory holds pages: back with them.
                    let full = self.pool.held() + page > self.pool.limit();
                    slot.forget();
                    let why = match full {
                        true => {
                            "it does not fit in the KV memory beside the sequences read before it"
                                .to_owned()
                        }
                        false => e.to_string(),
                    };
                    warnings.push(format!("{}: {why}", path.display()));
                }
            }
        }
        (loaded, warnings)
    }

    /// Draws the next token of every slot in `ready` (its logits are
    /// fresh), the slots shared among the kernel threads, then reports
    /// each in turn.
    fn sample(&mut self, ready: &[usize], on_event: &mut impl FnMut(usize, SlotEvent<'_>) -> bool) {
        let mut draws: Vec<Option<Draw>> = ready.iter().map(|_| None).collect();
        {
            let slots = DisjointMut::new(&mut self.slots);
            let out = DisjointMut::new(&mut draws);
            let stop_ids = &self.stop_ids[..];
            let capacity = self.capacity;
            self.model.pool.run(&|tid, n_threads| {
                for j in split_range(ready.len(), n_threads, tid, 1) {
                    // SAFETY: the slots of `ready` are distinct, and thread
                    // `tid` alone takes the `j`s of its range.
                    let (slot, draw) =
                        unsafe { (&mut slots.piece(ready[j], 1)[0], &mut out.piece(j, 1)[0]) };
                    *draw = Some(slot.draw(stop_ids, capacity));
                }
            });
        }
        for (&i, draw) in ready.iter().zip(draws) {
            match draw.expect("every slot drawn") {
                Draw::Tokens {
                    drawn,
                    accepted,
                    end,
                } => {
                    let slot = &self.slots[i];
                    if let Some(s) = self.speculations.get_mut(i)
                        && !slot.pass.is_empty()
                    {
                        let drafted = slot.pass.len() - 1;
                        s.record_outcome(&slot.tokens, (drafted, drafted), accepted);
                    }
                    self.report(i, drawn, end, on_event);
                }
                Draw::Failed(e) => self.fail(i, e, on_event),
            }
        }
    }

    /// Reports slot `i`'s last `drawn` tokens (each with the logits it was
    /// drawn from), then the end of its request when `end` says so or its
    /// client left.
    fn report(
        &mut self,
        i: usize,
        drawn: usize,
        end: Option<StopReason>,
        on_event: &mut impl FnMut(usize, SlotEvent<'_>) -> bool,
    ) {
        let slot = &mut self.slots[i];
        let vocab = slot.logits.len();
        let base = slot.tokens.len() - drawn;
        for j in 0..drawn {
            let logits = match slot.pass.is_empty() {
                true => &slot.logits[..],
                false => &slot.rows[j * vocab..(j + 1) * vocab],
            };
            let token = slot.tokens[base + j];
            if !on_event(i, SlotEvent::Token { token, logits }) {
                // What was drawn past the last token heard is dropped.
                slot.tokens.truncate(base + j + 1);
                let held = slot.tokens.len();
                if slot.state.len() > held && slot.state.truncate(held).is_err() {
                    slot.forget();
                }
                self.finish(i, StopReason::Cancelled, on_event);
                return;
            }
        }
        if let Some(reason) = end {
            self.finish(i, reason, on_event);
        }
    }

    /// Ends slot `i`'s request for `stop` and reports its statistics.
    fn finish(
        &mut self,
        i: usize,
        stop: StopReason,
        on_event: &mut impl FnMut(usize, SlotEvent<'_>) -> bool,
    ) {
        let Some(active) = self.slots[i].active.take() else {
            return;
        };
        self.slots[i].state.release_unused();
        let first = active.first_token_at;
        let stats = GenerationStats {
            prompt_tokens: active.prompt_tokens,
            prefill_time: active.prefill_time,
            time_to_first_token: first.map(|t| t - active.started),
            generated: active.generated,
            decode_time: first.map_or(Duration::ZERO, |t| t.elapsed()),
            stop,
            speculation: self.speculations.get(i).map(|s| s.stats.clone()),
        };
        on_event(i, SlotEvent::Done(stats));
    }

    /// Ends slot `i`'s request with `error`; the slot starts over next time.
    fn fail(
        &mut self,
        i: usize,
        error: EngineError,
        on_event: &mut impl FnMut(usize, SlotEvent<'_>) -> bool,
    ) {
        let slot = &mut self.slots[i];
        if slot.active.take().is_some() {
            slot.forget();
            on_event(i, SlotEvent::Failed(error));
        }
    }
}

/// Slot `a` to write and slot `b` (another) to read.
fn pair(slots: &mut [Slot], a: usize, b: usize) -> (&mut Slot, &Slot) {
    if a < b {
        let (low, high) = slots.split_at_mut(b);
        (&mut low[a], &high[0])
    } else {
        let (low, high) = slots.split_at_mut(a);
        (&mut high[0], &low[b])
    }
}
