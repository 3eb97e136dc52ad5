//! The forward pass: a batch of sequences, each through every block.

use crate::budget::{Budget, StateShape};
use crate::layers::{Mixer, Scratch, Step, Tree};
use crate::linear::Compute;
use crate::model::Model;
use crate::state::InferenceState;
use crate::{EngineError, Result};
use hayate_kernels::ProductMode;

/// Most tokens one [`Model::forward_tree`] pass verifies.
pub const MAX_TREE_NODES: usize = 64;

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

/// The buffers of batched steps ([`Model::forward_batch`]): the rows of
/// every sequence of a step side by side, and the logits they ask for.
/// Made once ([`Model::new_batch_scratch`]) and reused, so that batched
/// decoding does not allocate.
pub struct BatchScratch {
    model_id: u64,
    /// Most rows (tokens of all the sequences) one step takes.
    rows: usize,
    scratch: Scratch,
    /// The logits of the rows asked for, `rows × vocab`.
    logits: Vec<f32>,
}

impl BatchScratch {
    /// Most tokens, over all its sequences, one batched step takes.
    pub fn rows(&self) -> usize {
        self.rows
    }
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
        self.run_step(state, tokens, &mut logits, ProductMode::Fast, None);
        Ok(&state.scratch.logits)
    }

    /// [`forward`](Self::forward) computing every token exactly as a
    /// one-token step at its position would: each token's logits, and what
    /// the state keeps of it, are bit-identical to feeding the tokens one
    /// at a time. Speculative verification runs drafted tokens so, since a
    /// near-tie resolved differently would change the output. It takes the
    /// kernels of one-token decoding for every token (row kernels over the
    /// weights, which stay in cache between tokens; recurrent steps for
    /// DeltaNet), so it suits short steps, not prompts.
    pub fn forward_exact<'s>(
        &self,
        state: &'s mut InferenceState,
        tokens: &[u32],
        mut logits: Logits<'_>,
    ) -> Result<&'s [f32]> {
        self.check_step(state, tokens, &mut logits)?;
        self.run_step(state, tokens, &mut logits, ProductMode::TokenExact, None);
        Ok(&state.scratch.logits)
    }

    /// Verifies a draft tree in one exact pass: `tokens[0]` follows what
    /// `state` holds, and each `tokens[i]` (i > 0) follows `tokens[parents[i]]`
    /// (`parents[0] == 0`, `parents[i] < i`). Every token's logits (written to
    /// `logits`, `tokens.len() x vocab`) are bit-identical to those one-token
    /// decoding gives after the prefix and the token's own path, as
    /// [`forward_exact`](Self::forward_exact)'s are for a chain.
    ///
    /// Afterwards the state holds the tree, not a sequence: keep one branch
    /// with [`InferenceState::keep_branch`] (or roll back with
    /// [`InferenceState::truncate`]) before the next call. Only models whose
    /// every mixer is attention can branch (see [`Self::can_branch`]); at
    /// most [`MAX_TREE_NODES`] tokens, and no more than the state rolls back
    /// plus one.
    pub fn forward_tree(
        &self,
        state: &mut InferenceState,
        tokens: &[u32],
        parents: &[usize],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let n = tokens.len();
        if !self.can_branch() {
            return Err(EngineError::State(
                "this model's recurrent layers cannot branch: verify chains".into(),
            ));
        }
        let most = MAX_TREE_NODES
            .min(state.shape.rollback + 1)
            .min(state.shape.chunk);
        if n == 0 || n > most {
            return Err(EngineError::State(format!(
                "a draft tree of {n} tokens: this state verifies 1 to {most}"
            )));
        }
        if parents.len() != n || parents[0] != 0 || (1..n).any(|i| parents[i] >= i) {
            return Err(EngineError::State(format!(
                "the parents {parents:?} of a draft tree must start with 0 and precede their children"
            )));
        }
        let mut request = Logits::All(logits);
        self.check_step(state, tokens, &mut request)?;
        self.run_step(
            state,
            tokens,
            &mut request,
            ProductMode::TokenExact,
            Some(parents),
        );
        Ok(())
    }

    /// Whether [`forward_tree`](Self::forward_tree) can run: every mixer
    /// is attention (recurrent states hold one history, not a tree).
    pub fn can_branch(&self) -> bool {
        self.parts
            .blocks
            .iter()
            .all(|b| matches!(b.mixer, Mixer::Attention(_)))
    }

    /// Buffers for batched steps of up to `rows` tokens in all (the decode
    /// tokens of every sequence, or the drafts they verify).
    pub fn new_batch_scratch(&self, rows: usize) -> Result<BatchScratch> {
        if rows == 0 {
            return Err(EngineError::State(
                "a batch of 0 rows cannot run anything".into(),
            ));
        }
        let shape = StateShape {
            capacity: rows,
            chunk: rows,
            rollback: 1,
            threads: self.n_threads(),
            kv: Default::default(),
            page: rows.next_multiple_of(16),
        };
        // No caches: the batch's sequences bring theirs.
        let mut budget = Budget::for_context(rows, crate::layers::KvPool::new(0));
        let p = &self.parts;
        let scratch = Scratch::new(&p.blocks, (p.hidden, p.vocab), &shape, &mut budget)?;
        let logits = match rows.checked_mul(p.vocab) {
            Some(n) => budget.floats(n)?,
            None => return Err(EngineError::State(format!("a batch of {rows} rows"))),
        };
        Ok(BatchScratch {
            model_id: self.id,
            rows,
            scratch,
            logits,
        })
    }

    /// Runs one step of several sequences together, each with its own
    /// state, new tokens (one to decode, or a few to verify) and logits
    /// request. The linear layers run once over the rows of every
    /// sequence, so the weights are read once per step however many
    /// sequences share it; attention and the recurrent layers run per
    /// sequence over its own state.
    ///
    /// Batch-invariant: each sequence's logits and state are bit-identical
    /// to those of [`forward_exact`](Self::forward_exact) on it alone (for
    /// a one-token step, to [`forward`](Self::forward)'s), whatever else
    /// shares the step. Every step is checked before any runs, so an error
    /// leaves all the states as they were. At most
    /// [`BatchScratch::rows`] tokens in all, and each sequence's no more
    /// than its state's step length.
    pub fn forward_batch(
        &self,
        scratch: &mut BatchScratch,
        batch: &mut [SequenceStep<'_>],
    ) -> Result<()> {
        if scratch.model_id != self.id {
            return Err(EngineError::State(
                "these batch buffers were made by another model".into(),
            ));
        }
        let mut rows = 0;
        for (i, step) in batch.iter_mut().enumerate() {
            let fail =
                |e: EngineError| EngineError::State(format!("sequence {i} of the batch: {e}"));
            self.check_step(step.state, step.tokens, &mut step.logits)
                .map_err(fail)?;
            let (n, most) = (step.tokens.len(), step.state.shape.chunk);
            if n == 0 || n > most {
                return Err(fail(EngineError::State(format!(
                    "a step of {n} tokens: this state takes 1 to {most} at once"
                ))));
            }
            rows += n;
        }
        if rows > scratch.rows {
            return Err(EngineError::State(format!(
                "a batched step of {rows} tokens: these buffers take {}",
                scratch.rows
            )));
        }
        let (hidden, vocab) = (self.info.hidden, self.info.vocab);
        let s = &mut scratch.scratch;
        let mut row = 0;
        for step in batch.iter_mut() {
            let n = step.tokens.len();
            match &mut step.logits {
                Logits::All(out) => out.resize(n * vocab, 0.0),
                Logits::At(at, out) => out.resize(at.len() * vocab, 0.0),
                Logits::None | Logits::Last => {}
            }
            for &token in step.tokens {
                let x = &mut s.x[row * hidden..(row + 1) * hidden];
                self.parts.embedding.row(self.isa, token as usize, x);
                if let Some(scale) = self.parts.embed_scale {
                    x.iter_mut().for_each(|v| *v *= scale);
                }
                row += 1;
            }
            let state = &mut *step.state;
            state.ropes.fill(&self.parts.ropes, state.len, n);
        }
        let cx = Compute {
            mode: ProductMode::TokenExact,
            ..self.compute()
        };
        for (l, block) in self.parts.blocks.iter().enumerate() {
            block.mixer_in(&cx, s, rows, hidden);
            let mut offset = 0;
            for step in batch.iter_mut() {
                let InferenceState {
                    layers, ropes, len, ..
                } = &mut *step.state;
                let n = step.tokens.len();
                let part = Step {
                    cx,
                    ropes,
                    n,
                    start: *len,
                    offset,
                    recurrent_tail: n,
                    tree: None,
                };
                block.mixer_mix(&part, &mut layers[l], s);
                offset += n;
            }
            block.mixer_out(&cx, s, rows, hidden);
            block.forward_mlp(&cx, s, rows, hidden);
        }
        // The rows whose logits are asked for, normalised side by side.
        let norm = &self.parts.final_norm;
        let (mut asked, mut offset) = (0, 0);
        for step in batch.iter_mut() {
            let n = step.tokens.len();
            step.state.len += n;
            for r in asked_rows(&step.logits, n) {
                let x = &s.x[(offset + r) * hidden..(offset + r + 1) * hidden];
                norm.rows(x, &mut s.h[asked * hidden..(asked + 1) * hidden], hidden);
                asked += 1;
            }
            offset += n;
        }
        if asked == 0 {
            return Ok(());
        }
        let out = &mut scratch.logits[..asked * vocab];
        cx.project(
            [(&self.parts.lm_head, &mut *out)],
            &s.h[..asked * hidden],
            asked,
        );
        if let Some(cap) = self.parts.logit_softcap {
            for v in out.iter_mut() {
                *v = (*v / cap).tanh() * cap;
            }
        }
        let mut from = 0;
        for step in batch.iter_mut() {
            let dst: &mut [f32] = match &mut step.logits {
                Logits::None => continue,
                Logits::Last => &mut step.state.scratch.logits,
                Logits::All(out) | Logits::At(_, out) => out,
            };
            let len = dst.len();
            dst.copy_from_slice(&out[from..from + len]);
            from += len;
        }
        Ok(())
    }

    /// Whether `tokens` can run on `state` with this logits request; also
    /// reserves the request's buffer, so that one too large for this
    /// machine is an error here rather than an abort later, and the
    /// attention pages the tokens fill (an error when the pool has none left).
    fn check_step(
        &self,
        state: &mut InferenceState,
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
        if needed > state.capacity() {
            return Err(EngineError::ContextFull {
                needed,
                capacity: state.capacity(),
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
        let asked = match logits {
            Logits::All(out) => Some((tokens.len(), out)),
            Logits::At(at, out) => Some((at.len(), out)),
            Logits::None | Logits::Last => None,
        };
        if let Some((rows, out)) = asked {
            let values = rows.checked_mul(vocab);
            if values.is_none_or(|n| out.try_reserve_exact(n.saturating_sub(out.len())).is_err()) {
                return Err(EngineError::State(format!(
                    "the logits of {rows} positions ({rows} x {vocab} values) do not fit in memory; ask for fewer at once"
                )));
            }
        }
        state.prepare(needed)
    }

    /// Runs a checked step with the kernels `mode` allows; a tree (its
    /// parents, checked) fits in one chunk.
    fn run_step(
        &self,
        state: &mut InferenceState,
        tokens: &[u32],
        logits: &mut Logits<'_>,
        mode: ProductMode,
        tree: Option<&[usize]>,
    ) {
        let vocab = self.info.vocab;
        match logits {
            Logits::All(out) => out.resize(tokens.len() * vocab, 0.0),
            Logits::At(at, out) => out.resize(at.len() * vocab, 0.0),
            Logits::None | Logits::Last => {}
        }
        let chunk = state.shape.chunk;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (c, piece) in tokens.chunks(chunk).enumerate() {
            self.forward_chunk(state, piece, mode, tree);
            let (n, first) = (piece.len(), c * chunk);
            // The call's last token, as an index of the call like `At`'s.
            let last_row = [first + n - 1];
            let Scratch {
                x, h, logits: last, ..
            } = &mut state.scratch;
            // This chunk's rows whose logits are asked for (`None`: all),
            // and where they go.
            let (rows, dst): (Option<&[usize]>, &mut [f32]) = match logits {
                Logits::None => continue,
                Logits::Last if c + 1 < n_chunks => continue,
                Logits::Last => (Some(&last_row[..]), &mut last[..]),
                Logits::All(out) => (None, &mut out[first * vocab..(first + n) * vocab]),
                Logits::At(at, out) => {
                    let lo = at.partition_point(|&i| i < first);
                    let hi = at.partition_point(|&i| i < first + n);
                    if lo == hi {
                        continue;
                    }
                    let local = &at[lo..hi];
                    (Some(local), &mut out[lo * vocab..hi * vocab])
                }
            };
            self.head((&x[..n * self.info.hidden], h), rows, (first, mode), dst);
        }
    }

    /// Logits of a chunk's residual rows `x` into `dst`: all of them, or
    /// those at `rows` (indices of the call; the chunk starts at `first`).
    /// Final norm (into `h`), output head, soft cap.
    fn head(
        &self,
        (x, h): (&[f32], &mut [f32]),
        rows: Option<&[usize]>,
        (first, mode): (usize, ProductMode),
        dst: &mut [f32],
    ) {
        let hidden = self.info.hidden;
        let norm = &self.parts.final_norm;
        let m = match rows {
            None => {
                norm.rows(x, &mut h[..x.len()], hidden);
                x.len() / hidden
            }
            Some(rows) => {
                for (j, &i) in rows.iter().enumerate() {
                    let row = &x[(i - first) * hidden..(i - first + 1) * hidden];
                    norm.rows(row, &mut h[j * hidden..(j + 1) * hidden], hidden);
                }
                rows.len()
            }
        };
        let cx = Compute {
            mode,
            ..self.compute()
        };
        cx.project([(&self.parts.lm_head, &mut *dst)], &h[..m * hidden], m);
        if let Some(cap) = self.parts.logit_softcap {
            for v in dst {
                *v = (*v / cap).tanh() * cap;
            }
        }
    }

    /// The products' context: this model's threads, ISA and precision.
    pub(crate) fn compute(&self) -> Compute<'_> {
        Compute {
            pool: &self.pool,
            isa: self.isa,
            precision: self.precision,
            mode: ProductMode::Fast,
            tap: None,
        }
    }

    /// Runs one chunk (at most `shape.chunk` tokens) with the kernels `mode`
    /// allows; leaves the final hidden states in `scratch.x` and advances
    /// the state.
    fn forward_chunk(
        &self,
        state: &mut InferenceState,
        tokens: &[u32],
        mode: ProductMode,
        parents: Option<&[usize]>,
    ) {
        let InferenceState {
            layers,
            len,
            scratch: s,
            ropes,
            shape,
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
        // A tree's tokens sit at their depths.
        let mut depths = [0usize; MAX_TREE_NODES];
        let tree = parents.map(|parents| {
            for i in 1..n {
                depths[i] = depths[parents[i]] + 1;
            }
            Tree {
                parents,
                depths: &depths[..n],
            }
        });
        match &tree {
            Some(t) => ropes.fill_at(&self.parts.ropes, n, |i| start + t.depths[i]),
            None => ropes.fill(&self.parts.ropes, start, n),
        }
        // Exact steps take every token through the recurrent path, as one-token steps do.
        let recurrent_tail = match mode {
            ProductMode::Fast => shape.rollback,
            ProductMode::TokenExact => n,
        };
        let step = Step {
            cx: Compute {
                mode,
                ..self.compute()
            },
            ropes,
            n,
            start,
            offset: 0,
            recurrent_tail,
            tree,
        };
        for (block, layer) in self.parts.blocks.iter().zip(layers.iter_mut()) {
            block.forward(&step, layer, s, hidden);
        }
        *len += n;
    }
}

/// The rows of an `n`-token step whose logits `logits` asks for.
fn asked_rows<'a>(logits: &'a Logits<'_>, n: usize) -> impl Iterator<Item = usize> + 'a {
    let (range, at): (std::ops::Range<usize>, &[usize]) = match logits {
        Logits::None => (0..0, &[]),
        Logits::Last => (n - 1..n, &[]),
        Logits::All(_) => (0..n, &[]),
        Logits::At(at, _) => (0..0, at),
    };
    range.chain(at.iter().copied())
}
