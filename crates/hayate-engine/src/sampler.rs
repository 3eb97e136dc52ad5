//! Choosing the next token.
//!
//! Tokens are drawn with the Gumbel-max trick: `argmax(logits/T + g)` where
//! `g` is standard Gumbel noise from a counter-based generator keyed by
//! `(seed, absolute position, token id)` ([`crate::rng`]). Drawing this way
//! is exactly sampling from `softmax(logits/T)`, and the noise of any position
//! can be recomputed, which speculative decoding relies on: a draft model
//! that agrees with the target under the same noise picks the same token.

use crate::rng::{self, GUMBEL_BOUND, PositionNoise, gumbel_of};

/// How to pick tokens. The defaults are plain sampling at temperature 1.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p` (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of tokens already in the
    /// sequence by this (1: off), as `transformers` does.
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token the output already holds
    /// (OpenAI's `presence_penalty`, -2 to 2; 0: off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the output holds it
    /// (OpenAI's `frequency_penalty`, -2 to 2; 0: off).
    pub frequency_penalty: f32,
    /// Seed of the noise.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges; the message names the offending parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], not {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], not {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repeat-penalty must be > 0, not {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence-penalty", self.presence_penalty),
            ("frequency-penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], not {v}"));
            }
        }
        Ok(())
    }
}

/// Restricts which tokens may come next (a grammar, a JSON schema): the
/// generation loop masks the logits with it before every draw, through the
/// same sampler, and tells it each token drawn.
pub trait TokenConstraint {
    /// Sets the logits of the tokens that may not come next to -inf.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Advances past `token`, which the mask allowed.
    fn commit(&mut self, token: u32) -> Result<(), String>;
    /// Undoes the last `tokens` commits: a draft looks ahead under the
    /// constraint, then steps back.
    fn rollback(&mut self, tokens: usize) -> Result<(), String>;
    /// How many of `tokens`, in order from here, the constraint allows
    /// (nothing is committed).
    fn valid_prefix(&mut self, tokens: &[u32]) -> Result<usize, String>;
    /// Whether `token` ends the reply (it is never committed).
    fn is_end(&self, token: u32) -> bool;
}

/// Picks tokens from logits; keeps its buffers between calls so decoding does not allocate.
pub struct Sampler {
    /// The parameters in force.
    pub params: SamplingParams,
    seen: Vec<bool>,
    /// Occurrences of each token in the output (presence/frequency penalties).
    counts: Vec<u32>,
    /// Where the output begins in the histories this sampler is given: the
    /// presence and frequency penalties count tokens from here on (the
    /// prompt's own tokens are not penalized, as in vLLM).
    pub output_start: usize,
    candidates: Vec<(f32, u32)>,
    /// Tokens whose noise was computed, over all calls (most are ruled out
    /// without it).
    pub(crate) noise_evaluations: usize,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(params: SamplingParams, vocab: usize) -> Self {
        Sampler {
            params,
            seen: vec![false; vocab],
            counts: vec![0; vocab],
            output_start: 0,
            candidates: Vec::with_capacity(vocab),
            noise_evaluations: 0,
        }
    }

    /// Picks the token at absolute `position` from `logits` (modified in
    /// place by the penalty), given the sequence so far in `history`.
    pub fn sample(&mut self, logits: &mut [f32], position: usize, history: &[u32]) -> u32 {
        let mut best = [(f32::NEG_INFINITY, 0)];
        self.sample_ranked(logits, position, history, &mut best);
        best[0].1
    }

    /// [`sample`](Self::sample)'s best `best.len()` candidates, best first,
    /// as `(score, token)`: the score is the perturbed scaled logit
    /// `l / T + g` (the raw logit when greedy), ties to the lower id, so
    /// `best[0]` is what `sample` picks. Returns how many candidates there
    /// were (fewer slots are filled when the filters leave fewer). A draft
    /// tree branches where the runner-up comes close.
    pub fn sample_ranked(
        &mut self,
        logits: &mut [f32],
        position: usize,
        history: &[u32],
        best: &mut [(f32, u32)],
    ) -> usize {
        best.fill((f32::NEG_INFINITY, 0));
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in history {
                let t = t as usize;
                if t < logits.len() && !self.seen[t] {
                    self.seen[t] = true;
                    let l = &mut logits[t];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
            for &t in history {
                if let Some(s) = self.seen.get_mut(t as usize) {
                    *s = false;
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let output = history.get(self.output_start..).unwrap_or(&[]);
            for &t in output {
                if let Some(c) = self.counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
            // The first visit of each token applies its penalty and resets its count.
            for &t in output {
                let n = self.counts.get_mut(t as usize).map_or(0, std::mem::take);
                if let Some(l) = logits.get_mut(t as usize)
                    && n > 0
                {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.temperature == 0.0 {
            for (i, &l) in logits.iter().enumerate() {
                rank(best, (l, i as u32));
            }
            return logits.len();
        }
        let inv_t = 1.0 / p.temperature;
        let noise = PositionNoise::new(p.seed, position as u64);
        let mut evaluated = 0;
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            for (i, &l) in logits.iter().enumerate() {
                evaluated += rank_perturbed(best, noise, l * inv_t, i as u32);
            }
            self.noise_evaluations += evaluated;
            return logits.len();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
        // A token whose scaled logit is this far below the best can never win,
        // whatever the noise (|g| < GUMBEL_BOUND), nor matter for top-p or min-p.
        let floor = max - 2.0 * GUMBEL_BOUND;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32))
                .filter(|&(l, _)| l >= floor),
        );
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            self.candidates.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            self.candidates.sort_unstable_by(by_logit_desc);
            let total: f64 = self
                .candidates
                .iter()
                .map(|c| ((c.0 - max) as f64).exp())
                .sum();
            let mut mass = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                mass += ((c.0 - max) as f64).exp() / total;
                if mass >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        if p.min_p > 0.0 {
            // Applied last, as in `transformers`; the best token always survives
            // top-k and top-p, so `max` is still the reference.
            let min_logit = max + p.min_p.ln();
            self.candidates.retain(|c| c.0 >= min_logit);
        }
        for &(l, id) in &self.candidates {
            evaluated += rank_perturbed(best, noise, l, id);
        }
        self.noise_evaluations += evaluated;
        self.candidates.len()
    }
}

/// Scores below this magnitude (logits below it, any way below) keep the
/// rounding of `l - bar` far inside [`rank_perturbed`]'s margin; beyond it
/// every token's noise is computed.
const PRUNE_RANGE: f32 = 1.0e4;

/// Ranks the token `id` of scaled logit `l` by `l + g` (its Gumbel noise),
/// skipping the two logarithms of `g` when the noise provably cannot lift
/// it into `best`, so the result is exactly that of scoring every token.
/// Returns 1 when it computed `g`, 0 when it skipped it.
///
/// With `bar` the last kept score, entering needs `g > bar - l`, that is
/// `-ln u < e^(l - bar)`; since `-ln u >= 1 - u`, a uniform with
/// `1 - u >= 1.05 e^(l - bar)` leaves `l + g <= bar - ln 1.05`. The test
/// runs on powers of two: `1 - u >= 2^e` (`e` from its leading zeros) and
/// `e >= (l - bar) log2(e) + 0.1` imply it, with 0.03 to spare for
/// rounding. Usually only a few tokens near the top pass.
#[inline(always)]
fn rank_perturbed(best: &mut [(f32, u32)], noise: PositionNoise, l: f32, id: u32) -> usize {
    let Some(&(bar, _)) = best.last() else {
        return 0;
    };
    let bits = noise.bits(u64::from(id));
    // (Far below the range, l can only lose; NaN is scored, and never enters.)
    if bar.abs() < PRUNE_RANGE && l < PRUNE_RANGE {
        // 1 - u = m / 2^54 with m odd, as `PositionNoise::uniform` makes u.
        let m = (1u64 << 54) - 2 * (bits >> 11) - 1;
        let e = (63 - m.leading_zeros() as i32 - 54) as f32;
        if e >= (l - bar) * std::f32::consts::LOG2_E + 0.1 {
            return 0;
        }
    }
    rank(best, (l + gumbel_of(rng::uniform_of(bits)), id));
    1
}

/// Inserts `c` into `best` (kept in descending score, ties to the lower
/// id), dropping the last.
#[inline]
fn rank(best: &mut [(f32, u32)], c: (f32, u32)) {
    let beats = |a: (f32, u32), b: (f32, u32)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
    let Some(last) = best.last() else { return };
    if !beats(c, *last) {
        return;
    }
    let mut i = best.len() - 1;
    while i > 0 && beats(c, best[i - 1]) {
        best[i] = best[i - 1];
        i -= 1;
    }
    best[i] = c;
}

/// Index of the largest value (the first, on ties, as `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gumbel;

    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(params, logits.len());
        let mut counts = vec![0; logits.len()];
        for pos in 0..n {
            let mut l = logits.to_vec();
            counts[sampler.sample(&mut l, pos, &[]) as usize] += 1;
        }
        counts
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_output_only() {
        let params = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.2,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut s = Sampler::new(params, 4);
        // Token 0 twice in the output: 3.0 - 0.2 - 2 * 0.25 = 2.3 < 2.5.
        let history = [3, 0, 2, 0];
        let mut logits = [3.0, 2.5, 1.0, 0.0];
        assert_eq!(s.sample(&mut logits, 4, &history), 1);
        assert_eq!(logits, [2.3, 2.5, 1.0 - 0.45, -0.45]);
        // The same tokens in the prompt are not penalized: once is not enough.
        s.output_start = 3;
        let mut logits = [3.0, 2.5, 1.0, 0.0];
        assert_eq!(s.sample(&mut logits, 4, &history), 0);
        assert_eq!(logits, [2.55, 2.5, 1.0, 0.0]);
        s.output_start = 4;
        let mut logits = [3.0, 2.5, 1.0, 0.0];
        assert_eq!(s.sample(&mut logits, 4, &history), 0);
        assert_eq!(logits, [3.0, 2.5, 1.0, 0.0]);
        let bad = SamplingParams {
            frequency_penalty: 2.5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("frequency-penalty"));
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            4,
        );
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], 0, &[]), 1);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let n = 40_000;
        let counts = draws(
            SamplingParams {
                seed: 9,
                ..Default::default()
            },
            &logits,
            n,
        );
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (c, l) in counts.iter().zip(logits) {
            let expected = l.exp() / z;
            let got = *c as f32 / n as f32;
            assert!((got - expected).abs() < 0.01, "{got} vs {expected}");
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_truncate() {
        let logits = [3.0f32, 2.9, 0.0, -5.0];
        let k = draws(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert_eq!(k[2] + k[3], 0);
        let p = draws(
            SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert_eq!(p[1] + p[2] + p[3], 0);
        let m = draws(
            SamplingParams {
                min_p: 0.5,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert!(m[1] > 0 && m[2] + m[3] == 0);
    }

    #[test]
    fn same_seed_and_position_give_the_same_token() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut a = Sampler::new(
            SamplingParams {
                seed: 5,
                ..Default::default()
            },
            100,
        );
        let mut b = Sampler::new(
            SamplingParams {
                seed: 5,
                ..Default::default()
            },
            100,
        );
        for pos in 0..50 {
            assert_eq!(
                a.sample(&mut logits.clone(), pos, &[]),
                b.sample(&mut logits.clone(), pos, &[])
            );
        }
    }

    /// The ranked candidates are the perturbed scores in order, computed
    /// independently here; the first is what `sample` picks.
    #[test]
    fn ranked_candidates_are_the_best_perturbed_scores() {
        let logits: Vec<f32> = (0..60).map(|i| (i as f32 * 0.37).cos() * 2.0).collect();
        for temperature in [0.0, 0.7, 1.0] {
            let params = SamplingParams {
                seed: 11,
                temperature,
                ..Default::default()
            };
            let mut sampler = Sampler::new(params.clone(), logits.len());
            for pos in 0..40 {
                let mut best = [(0.0, 0); 3];
                let n = sampler.sample_ranked(&mut logits.clone(), pos, &[], &mut best);
                assert_eq!(n, logits.len());
                let mut want: Vec<(f32, u32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| match temperature {
                        0.0 => (l, i as u32),
                        t => (l * (1.0 / t) + gumbel(11, pos as u64, i as u64), i as u32),
                    })
                    .collect();
                want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let ids: Vec<u32> = best.iter().map(|b| b.1).collect();
                let want_ids: Vec<u32> = want[..3].iter().map(|w| w.1).collect();
                assert_eq!(ids, want_ids, "T={temperature} pos {pos}");
                assert!(best[0].0 >= best[1].0 && best[1].0 >= best[2].0);
                assert_eq!(sampler.sample(&mut logits.clone(), pos, &[]), best[0].1);
            }
        }
    }

    /// Every token scored, as `sample_ranked` would without ruling any out.
    fn exhaustive(
        logits: &[f32],
        params: &SamplingParams,
        pos: usize,
        width: usize,
    ) -> Vec<(u32, u32)> {
        let inv_t = 1.0 / params.temperature;
        let mut scored: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                (
                    l * inv_t + gumbel(params.seed, pos as u64, i as u64),
                    i as u32,
                )
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored[..width]
            .iter()
            .map(|&(s, id)| (s.to_bits(), id))
            .collect()
    }

    #[test]
    fn ruling_tokens_out_changes_no_pick_and_skips_most_noise() {
        let vocab = 4096;
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        // Logit spreads from flat to peaked, and one far beyond the pruning
        // range (there the noise is computed for all but the hopeless).
        for (spread, temperature) in [
            (0.5, 1.0),
            (8.0, 1.0),
            (8.0, 0.7),
            (20.0, 1.5),
            (3.0e4, 1.0),
        ] {
            let params = SamplingParams {
                seed: 5,
                temperature,
                ..Default::default()
            };
            let mut sampler = Sampler::new(params.clone(), vocab);
            let positions = 60;
            for pos in 0..positions {
                let logits: Vec<f32> = (0..vocab).map(|_| next() * spread).collect();
                for width in [1, 2, 4] {
                    let mut best = vec![(0.0, 0); width];
                    sampler.sample_ranked(&mut logits.clone(), pos, &[], &mut best);
                    let got: Vec<(u32, u32)> =
                        best.iter().map(|&(s, id)| (s.to_bits(), id)).collect();
                    assert_eq!(
                        got,
                        exhaustive(&logits, &params, pos, width),
                        "spread {spread} T={temperature} pos {pos}"
                    );
                }
            }
            let per_token = sampler.noise_evaluations as f64 / (positions * 3 * vocab) as f64;
            if spread < 1.0e4 {
                assert!(
                    per_token < 0.02,
                    "spread {spread}: noise of {per_token:.3} of the tokens computed"
                );
            }
            if spread > 1.0e4 {
                assert!(
                    per_token > 0.9,
                    "beyond the range nearly every token is scored"
                );
            }
        }
    }

    #[test]
    fn repetition_penalty_applies_once_per_token() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            3,
        );
        let mut l = [4.0, 3.0, -1.0];
        s.sample(&mut l, 0, &[0, 0, 2]);
        assert_eq!(l, [2.0, 3.0, -2.0]);
    }
}
