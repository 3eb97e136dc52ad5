//! Speculative decoding: a speculator guesses the next tokens, the model
//! checks them all in one pass, and every guess it would have sampled
//! itself is kept.
//!
//! The model draws each position's token exactly as plain decoding does
//! (same penalties, filters and Gumbel noise `g(seed, position, token)`,
//! [`crate::sampler`]) from logits that equal one-token decoding's bit for
//! bit ([`crate::Model::forward_exact`]), and drafted tokens are kept while
//! they equal what it drew. So the output is the plain sampler's whatever
//! the speculator proposes; a good speculator only makes it faster. A draft
//! model that samples under the *same* noise ([`Coupling::Shared`]) agrees
//! with the model whenever their distributions are close, not merely when
//! two independent draws happen to coincide ([`Coupling::Independent`],
//! kept for comparison).
//!
//! The pieces:
//! - [`Speculator`]: the interface every speculator implements (propose up
//!   to `k` tokens, learn from what was accepted);
//! - [`DraftModel`] (a smaller model with the same tokenizer),
//!   [`PromptLookup`] (n-gram matches in the sequence so far) and
//!   [`SuffixSpeculator`] (counted continuations over everything seen);
//! - [`Speculation`]: a speculator with its draft length (fixed, or
//!   adaptive from the measured acceptance and costs) and statistics, which
//!   [`crate::Generator::generate_with`] drives.

mod draft;
mod ngram;
mod suffix;

pub use draft::{BRANCH_MARGIN, DraftModel, MAX_WIDTH};
pub use ngram::PromptLookup;
pub use suffix::SuffixSpeculator;

use crate::sampler::{SamplingParams, TokenConstraint};
use crate::{EngineError, Result};
use std::time::Duration;

/// How a draft model's samples relate to the model's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Coupling {
    /// The draft samples under the model's noise: when their
    /// distributions agree, their samples agree.
    #[default]
    Shared,
    /// The draft samples under noise of its own (what llama.cpp and mlx-lm
    /// do); tokens are still accepted by equality, so only the acceptance
    /// rate changes. For comparisons.
    Independent,
}

impl Coupling {
    /// The noise seed a draft uses when the model samples with `seed`.
    pub fn draft_seed(self, seed: u64) -> u64 {
        match self {
            Coupling::Shared => seed,
            // Any fixed bijection that moves every seed will do.
            Coupling::Independent => seed.rotate_left(29) ^ 0xd1b5_4a32_d192_ed03,
        }
    }
}

/// Something that guesses how a sequence continues.
pub trait Speculator {
    /// A short name for reports (`draft`, `ngram`, `suffix`).
    fn name(&self) -> &'static str;

    /// Appends to `out` up to `max` tokens guessed to follow `sequence`
    /// (the prompt and output so far; its last token was sampled by the
    /// model but not yet fed to it). Proposing none is allowed.
    fn propose(&mut self, sequence: &[u32], max: usize, out: &mut Vec<u32>) -> Result<()>;

    /// Like [`propose`](Self::propose), but a tree of depth up to `max`:
    /// `out.tokens[i]` follows the pass's token `out.parents[i]` (0 the
    /// last token of `sequence`, `j + 1` the drafted `out.tokens[j]`, so
    /// parents precede children), with up to `width` candidates per
    /// position, the likeliest first (the tree may be cut to fewer nodes).
    /// Speculators without alternatives propose a chain (the default).
    fn propose_tree(
        &mut self,
        sequence: &[u32],
        max: usize,
        _width: usize,
        out: &mut DraftTree,
    ) -> Result<()> {
        self.propose(sequence, max, &mut out.tokens)?;
        out.parents.extend(0..out.tokens.len());
        Ok(())
    }

    /// Like [`propose`](Self::propose), under a constraint on the output
    /// (a grammar): the tokens should be ones `constraint` allows in turn,
    /// and `constraint` must be left as it was. Speculators that cannot
    /// consult it propose as usual (the default); either way a draft is cut
    /// at its first token the constraint rejects before it is verified.
    fn propose_constrained(
        &mut self,
        sequence: &[u32],
        max: usize,
        _constraint: &mut dyn TokenConstraint,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        self.propose(sequence, max, out)
    }

    /// Called once each verification is settled: `sequence` now ends with
    /// the first `accepted` of the `drafted` tokens (the model's own next
    /// token follows, unless it ends generation).
    fn observe(&mut self, _sequence: &[u32], _drafted: usize, _accepted: usize) {}

    /// Called before a generation that samples with `params`, which may
    /// differ from the last one's (a server's requests): a speculator that
    /// samples as the model does takes them up (a draft model, under its
    /// coupling's noise). Others ignore them (the default).
    fn set_params(&mut self, _params: &SamplingParams) {}

    /// Called as a generation starts: its output begins at index `start`
    /// of the sequences that follow (a draft's sampler counts presence and
    /// frequency penalties from there, as the model's does).
    fn begin_output(&mut self, _start: usize) {}
}

/// Drafted tokens and where each attaches: `tokens[i]` follows the pass's
/// token `parents[i]` (0: the model's last token; `j + 1`: `tokens[j]`).
/// A chain has `parents[i] == i`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DraftTree {
    /// The drafted tokens, parents before children.
    pub tokens: Vec<u32>,
    /// Each one's parent in the pass.
    pub parents: Vec<usize>,
}

impl DraftTree {
    /// Room for `nodes` tokens.
    pub fn with_capacity(nodes: usize) -> Self {
        DraftTree {
            tokens: Vec::with_capacity(nodes),
            parents: Vec::with_capacity(nodes),
        }
    }

    /// Empties it.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.parents.clear();
    }

    /// Whether it has branches (else it is a chain).
    pub fn branches(&self) -> bool {
        self.parents.iter().enumerate().any(|(i, &p)| p != i)
    }

    /// The longest branch, in tokens (at most [`crate::MAX_TREE_NODES`]
    /// nodes are read: no pass verifies more).
    pub fn depth(&self) -> usize {
        if !self.branches() {
            return self.tokens.len();
        }
        // Parents precede children, so one sweep finds every node's depth.
        let mut depths = [0usize; crate::MAX_TREE_NODES];
        let mut deepest = 0;
        for (i, &p) in self
            .parents
            .iter()
            .enumerate()
            .take(crate::MAX_TREE_NODES - 1)
        {
            depths[i + 1] = depths[p] + 1;
            deepest = deepest.max(depths[i + 1]);
        }
        deepest
    }

    /// Keeps the first `n` tokens.
    fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.parents.truncate(n);
    }

    /// The drafted child of pass token `node` that is `token`, as a pass index.
    pub fn child(&self, node: usize, token: u32) -> Option<usize> {
        self.tokens
            .iter()
            .zip(&self.parents)
            .position(|(&t, &p)| p == node && t == token)
            .map(|i| i + 1)
    }
}

/// How many tokens to draft per model pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DraftLength {
    /// Always this many (fewer where the context or the token budget ends).
    Fixed(usize),
    /// The length that maximises expected tokens per second, from the
    /// acceptance observed so far and the measured costs of drafting and
    /// of verifying, up to `max`.
    Adaptive {
        /// The longest draft.
        max: usize,
    },
}

impl DraftLength {
    /// The longest draft this allows: a state must be able to roll back this many tokens.
    pub fn max(self) -> usize {
        match self {
            DraftLength::Fixed(k) | DraftLength::Adaptive { max: k } => k,
        }
    }
}

/// Longest draft the adaptive length picks by default.
pub const DEFAULT_MAX_DRAFT: usize = 10;

/// Passes without a draft after which an adaptive length drafts once anyway,
/// to keep its acceptance estimate current.
pub const PROBE_EVERY: usize = 16;

/// Longest run of passes without a draft between probes.
pub const MAX_PROBE_INTERVAL: usize = 128;

/// What speculation did during one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeculationStats {
    /// Tokens the speculator proposed.
    pub drafted: usize,
    /// Of those, tokens the model accepted.
    pub accepted: usize,
    /// Model passes after the prefill (verifications and plain steps).
    pub passes: usize,
    /// Of those, passes that verified a tree with branches.
    pub tree_passes: usize,
    /// Time spent proposing.
    pub draft_time: Duration,
    /// Time spent in the model's passes.
    pub verify_time: Duration,
}

impl SpeculationStats {
    /// Accepted over drafted (0 when nothing was drafted).
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

/// Decayed sums for a least-squares line `y = a + b·x` (verification time
/// against tokens verified).
#[derive(Clone, Debug, Default)]
struct LineFit {
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl LineFit {
    /// Weight of the past per new observation: costs drift as caches warm
    /// and the context grows.
    const DECAY: f64 = 0.97;

    fn add(&mut self, x: f64, y: f64) {
        let d = Self::DECAY;
        self.n = self.n * d + 1.0;
        self.x = self.x * d + x;
        self.y = self.y * d + y;
        self.xx = self.xx * d + x * x;
        self.xy = self.xy * d + x * y;
    }

    /// The fitted `(a, b)`, or `None` before two distinct `x` were seen.
    fn line(&self) -> Option<(f64, f64)> {
        let var = self.n * self.xx - self.x * self.x;
        if self.n < 2.0 || var <= 1e-9 * self.n * self.n {
            return None;
        }
        let b = (self.n * self.xy - self.x * self.y) / var;
        let a = (self.y - b * self.x) / self.n;
        Some((a, b))
    }

    fn mean_y(&self) -> Option<f64> {
        (self.n > 0.0).then(|| self.y / self.n)
    }

    fn mean_xy(&self) -> Option<(f64, f64)> {
        (self.n > 0.0).then(|| (self.x / self.n, self.y / self.n))
    }
}

/// A speculator with its draft length, the estimates that choose an
/// adaptive one, and the statistics of the current generation.
pub struct Speculation<'a> {
    speculator: Box<dyn Speculator + 'a>,
    length: DraftLength,
    /// Decayed counts of accepted positions and of rejections: the
    /// acceptance rate per position is `hits / (hits + misses)`.
    hits: f64,
    misses: f64,
    /// Seconds of a proposal against tokens drafted, from proposals that
    /// followed a drafted pass (so a draft model's catching up after plain
    /// steps, or its prefill of the prompt, does not count as drafting cost).
    draft_cost: LineFit,
    /// Length of the sequence at the last proposal that drafted.
    drafted_at: Option<usize>,
    /// Seconds of a model pass against tokens in it.
    verify_cost: LineFit,
    /// Passes in a row the adaptive length chose not to draft for.
    undrafted: usize,
    /// Undrafted passes before the next probe: [`PROBE_EVERY`], doubled
    /// after each probe that did not make drafting pay (a draft model's
    /// probe costs catching up on every token since the last one).
    probe_interval: usize,
    /// Candidates per position a tree may hold (1: chains).
    width: usize,
    /// Decayed mean of drafted tokens per position of depth (1 for
    /// chains): a tree `k` deep costs a pass over about `1 + k · breadth`.
    breadth: f64,
    /// This generation's counts.
    pub stats: SpeculationStats,
}

impl<'a> Speculation<'a> {
    /// Speculation by `speculator`, drafting as `length` says.
    pub fn new(speculator: Box<dyn Speculator + 'a>, length: DraftLength) -> Self {
        Speculation {
            speculator,
            length,
            // A prior worth a few observations, at 60%.
            hits: 3.0,
            misses: 2.0,
            draft_cost: LineFit::default(),
            drafted_at: None,
            verify_cost: LineFit::default(),
            undrafted: 0,
            probe_interval: PROBE_EVERY,
            width: 1,
            breadth: 1.0,
            stats: SpeculationStats::default(),
        }
    }

    /// Drafts trees of up to `width` candidates per position where the
    /// speculator has alternatives (1: chains; models with recurrent
    /// layers verify chains whatever this says).
    pub fn with_width(mut self, width: usize) -> Self {
        self.width = width.max(1);
        self
    }

    /// Candidates per position.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The speculator's name.
    pub fn name(&self) -> &'static str {
        self.speculator.name()
    }

    /// Speculates for generations that sample with `params` from now on
    /// (what was learnt of acceptance and costs carries over).
    pub fn set_params(&mut self, params: &SamplingParams) {
        self.speculator.set_params(params);
    }

    /// The draft length setting.
    pub fn length(&self) -> DraftLength {
        self.length
    }

    /// Estimated probability that the model accepts a drafted token, given
    /// it accepted the ones before.
    pub fn acceptance_estimate(&self) -> f64 {
        self.hits / (self.hits + self.misses)
    }

    /// How many tokens to draft now, at most `room`. An adaptive length
    /// may choose none where drafting does not pay, drafting once after
    /// [`PROBE_EVERY`] such passes (then twice as many, up to
    /// [`MAX_PROBE_INTERVAL`]) to learn whether it has started to.
    pub(crate) fn next_length(&mut self, room: usize) -> usize {
        let k = match self.length {
            DraftLength::Fixed(k) => k,
            DraftLength::Adaptive { max } => match self.best_length(max, 0) {
                0 if self.undrafted + 1 < self.probe_interval => {
                    self.undrafted += 1;
                    0
                }
                0 => {
                    self.undrafted = 0;
                    self.probe_interval = (2 * self.probe_interval).min(MAX_PROBE_INTERVAL);
                    self.best_length(max, 1)
                }
                k => {
                    self.undrafted = 0;
                    self.probe_interval = PROBE_EVERY;
                    k
                }
            },
        };
        k.min(room)
    }

    /// The `k` in `min..=max` with the most expected tokens per second:
    /// `(1 - α^(k+1)) / (1 - α)` tokens for `k` draft steps and a pass over
    /// `k + 1` tokens (`k = 0`: a plain step).
    fn best_length(&self, max: usize, min: usize) -> usize {
        let alpha = self.acceptance_estimate().min(0.999);
        let pass = |tokens: f64| -> f64 {
            match (self.verify_cost.line(), self.verify_cost.mean_y()) {
                (Some((a, b)), _) => (a + b * tokens).max(1e-9),
                // Until two lengths were measured: a pass over a few tokens
                // costs about one token's (decoding is memory-bound).
                (None, Some(mean)) => mean * (1.0 + 0.05 * (tokens - 1.0)),
                (None, None) => 1.0 + 0.05 * (tokens - 1.0),
            }
        };
        let draft = |k: f64| -> f64 {
            match (self.draft_cost.line(), self.draft_cost.mean_xy()) {
                _ if k == 0.0 => 0.0,
                (Some((a, b)), _) => (a + b * k).max(0.0),
                (None, Some((x, y))) => y * k / x.max(1.0),
                // Nothing measured yet: drafting is taken as free until it is.
                (None, None) => 0.0,
            }
        };
        let rate = |k: usize| {
            let tokens = (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha);
            tokens / (draft(k as f64) + pass(1.0 + k as f64 * self.breadth))
        };
        (min..=max.max(min))
            .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
            .unwrap_or(min)
    }

    /// Asks the speculator for up to `depth` tokens after `sequence`: a
    /// tree of at most `max_nodes` when `branch` (and the width allows),
    /// else a chain; under a `constraint`, a chain of tokens it allows.
    pub(crate) fn propose(
        &mut self,
        sequence: &[u32],
        (depth, max_nodes): (usize, usize),
        branch: bool,
        constraint: Option<&mut dyn TokenConstraint>,
        out: &mut DraftTree,
    ) -> Result<()> {
        out.clear();
        let depth = depth.min(max_nodes);
        if depth == 0 {
            return Ok(());
        }
        let start = std::time::Instant::now();
        if let Some(c) = constraint {
            self.speculator
                .propose_constrained(sequence, depth, c, &mut out.tokens)?;
            out.tokens.truncate(depth);
            // Tokens the constraint rejects could never be accepted.
            let valid = c
                .valid_prefix(&out.tokens)
                .map_err(EngineError::Constraint)?;
            out.tokens.truncate(valid);
            out.parents.extend(0..out.tokens.len());
        } else if branch && self.width > 1 {
            self.speculator
                .propose_tree(sequence, depth, self.width, out)?;
            out.truncate(max_nodes);
        } else {
            self.speculator.propose(sequence, depth, &mut out.tokens)?;
            out.tokens.truncate(depth);
            out.parents.extend(0..out.tokens.len());
        }
        if out.parents.iter().enumerate().any(|(i, &p)| p > i) {
            return Err(crate::EngineError::State(format!(
                "the {} speculator proposed a tree whose parents {:?} do not precede their children",
                self.speculator.name(),
                out.parents
            )));
        }
        let spent = start.elapsed();
        self.stats.draft_time += spent;
        // Right after a drafted pass the sequence grew by at most a whole
        // draft and the model's token.
        let steady = self
            .drafted_at
            .is_some_and(|at| sequence.len() <= at + self.length.max() + 1);
        let n = out.tokens.len();
        if steady && n > 0 {
            self.draft_cost.add(n as f64, spent.as_secs_f64());
        }
        self.drafted_at = (n > 0).then_some(sequence.len());
        Ok(())
    }

    /// Records a model pass over `tokens` tokens (a tree with branches,
    /// if `tree`) that took `time`.
    pub(crate) fn record_pass(&mut self, tokens: usize, tree: bool, time: Duration) {
        self.stats.passes += 1;
        self.stats.tree_passes += usize::from(tree);
        self.stats.verify_time += time;
        self.verify_cost.add(tokens as f64, time.as_secs_f64());
    }

    /// Records that `accepted` of `drafted` tokens were kept, of a draft
    /// whose longest branch was `depth` deep; `sequence` is the sequence
    /// after the pass.
    pub(crate) fn record_outcome(
        &mut self,
        sequence: &[u32],
        (drafted, depth): (usize, usize),
        accepted: usize,
    ) {
        if drafted > 0 {
            self.stats.drafted += drafted;
            self.stats.accepted += accepted;
            let d = 0.98f64.powi(accepted as i32 + 1);
            self.hits = self.hits * d + accepted as f64;
            self.misses = self.misses * d + f64::from(accepted < depth);
            if depth > 0 {
                self.breadth = 0.9 * self.breadth + 0.1 * drafted as f64 / depth as f64;
            }
        }
        self.speculator.observe(sequence, drafted, accepted);
    }

    /// Starts a new generation whose output begins at `output_start`:
    /// new statistics (the estimates carry over).
    pub(crate) fn begin_output(&mut self, output_start: usize) {
        self.stats = SpeculationStats::default();
        self.speculator.begin_output(output_start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl Speculator for Nothing {
        fn name(&self) -> &'static str {
            "nothing"
        }
        fn propose(&mut self, _: &[u32], _: usize, _: &mut Vec<u32>) -> Result<()> {
            Ok(())
        }
    }

    fn with(hits: f64, misses: f64, draft: f64, pass: (f64, f64)) -> Speculation<'static> {
        let mut s = Speculation::new(Box::new(Nothing), DraftLength::Adaptive { max: 12 });
        (s.hits, s.misses) = (hits, misses);
        for t in 1..=6 {
            s.verify_cost.add(t as f64, pass.0 + pass.1 * t as f64);
            s.draft_cost.add(t as f64, draft * t as f64);
        }
        s
    }

    #[test]
    fn adaptive_length_follows_acceptance_and_costs() {
        // A near-perfect, free speculator with flat passes: the longest draft.
        assert_eq!(with(99.0, 1.0, 0.0, (1.0, 0.0)).next_length(100), 12);
        // Poor acceptance: short drafts.
        assert_eq!(with(1.0, 3.0, 0.05, (1.0, 0.05)).next_length(100), 1);
        // Drafting does not pay: plain steps, with a probe after PROBE_EVERY
        // passes, then after twice as many each time.
        let mut s = with(1.0, 4.0, 0.4, (1.0, 0.3));
        let lengths: Vec<usize> = (0..7 * PROBE_EVERY).map(|_| s.next_length(100)).collect();
        let probes: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
        let p = PROBE_EVERY;
        assert_eq!(probes, [p - 1, 3 * p - 1, 7 * p - 1], "{lengths:?}");
        assert_eq!(lengths[p - 1], 1);
        // Good acceptance but an expensive draft: in between.
        let k = with(9.0, 1.0, 0.3, (1.0, 0.05)).next_length(100);
        assert!((2..8).contains(&k), "{k}");
        // The room left bounds it.
        assert_eq!(with(99.0, 1.0, 0.0, (1.0, 0.0)).next_length(3), 3);
    }

    #[test]
    fn line_fit_recovers_a_line() {
        let mut f = LineFit::default();
        assert!(f.line().is_none());
        for x in [1.0, 2.0, 5.0, 3.0] {
            f.add(x, 2.0 + 0.5 * x);
        }
        let (a, b) = f.line().unwrap();
        assert!((a - 2.0).abs() < 1e-9 && (b - 0.5).abs() < 1e-9, "{a} {b}");
    }

    #[test]
    fn independent_coupling_moves_the_seed() {
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(Coupling::Shared.draft_seed(seed), seed);
            assert_ne!(Coupling::Independent.draft_seed(seed), seed);
        }
    }
}
