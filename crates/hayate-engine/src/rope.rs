//! Rotary position embedding frequencies, as `transformers` computes them.

use crate::Result;
use crate::budget::Budget;
use hayate_formats::{RopeConfig, RopeScaling};

/// Frequencies of the rotated dimensions of one head.
#[derive(Clone, Debug)]
pub struct Rope {
    /// One inverse frequency per rotated pair.
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `rotary_dim` rotated dimensions.
    pub fn new(config: &RopeConfig, rotary_dim: usize) -> Self {
        let half = rotary_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| {
                // transformers computes the exponent in f32.
                let exponent = (2 * i) as f32 / rotary_dim as f32;
                1.0 / config.theta.powf(exponent as f64)
            })
            .collect();
        let scaled: Vec<f64> = match config.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope {
            inv_freq: scaled.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// Number of rotated pairs.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// cos and sin of every pair's angle at `position` (angles in f32, as `transformers`).
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = p * f;
            *c = angle.cos();
            *s = angle.sin();
        }
    }
}

/// cos and sin of every rotary table at each position of one chunk,
/// computed once per chunk and shared by the attention layers.
pub(crate) struct RopeTables {
    /// Per table: its pairs `half`, then `chunk × half` cosines and sines.
    tables: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

impl RopeTables {
    /// Room for chunks of `chunk` positions of every table in `ropes`.
    pub(crate) fn new(ropes: &[Rope], chunk: usize, budget: &mut Budget) -> Result<Self> {
        let tables = ropes
            .iter()
            .map(|r| {
                let n = chunk * r.half();
                Ok((r.half(), budget.floats(n)?, budget.floats(n)?))
            })
            .collect::<Result<_>>()?;
        Ok(RopeTables { tables })
    }

    /// Fills the tables for positions `start..start + n`.
    pub(crate) fn fill(&mut self, ropes: &[Rope], start: usize, n: usize) {
        self.fill_at(ropes, n, |t| start + t);
    }

    /// Fills the tables for `n` tokens, token `t` at `position(t)` (a
    /// draft tree's tokens sit at their depth).
    pub(crate) fn fill_at(&mut self, ropes: &[Rope], n: usize, position: impl Fn(usize) -> usize) {
        for (rope, (half, cos, sin)) in ropes.iter().zip(&mut self.tables) {
            let half = *half;
            for t in 0..n {
                let r = t * half..(t + 1) * half;
                rope.cos_sin(position(t), &mut cos[r.clone()], &mut sin[r]);
            }
        }
    }

    /// cos and sin of table `table` at the chunk's `t`-th position.
    pub(crate) fn at(&self, table: usize, t: usize) -> (&[f32], &[f32]) {
        let (half, cos, sin) = &self.tables[table];
        let half = *half;
        let r = t * half..(t + 1) * half;
        (&cos[r.clone()], &sin[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let plain = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
            partial_rotary_factor: 1.0,
        };
        let llama3 = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
            partial_rotary_factor: 1.0,
        };
        let (a, b) = (Rope::new(&plain, 16), Rope::new(&llama3, 16));
        assert_eq!(a.inv_freq[0], b.inv_freq[0]);
        assert!((a.inv_freq[7] / 8.0 - b.inv_freq[7]).abs() < 1e-9);
    }
}
