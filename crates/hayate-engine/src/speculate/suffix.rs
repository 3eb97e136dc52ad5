//! Suffix speculation: counts of which token followed each recent context
//! (the last 1 to `depth` tokens) over everything this speculator has seen
//! (prompts and outputs of earlier generations too: a chat session, or
//! later a server's requests), proposing the continuation seen most often
//! while its empirical frequency stays high.
//!
//! It is a suffix tree cut at `depth`, stored flat: each context is hashed
//! with its length into one table whose entries keep their most frequent
//! next tokens. Unlike prompt lookup it learns across generations and
//! weighs continuations by how often they occurred, so it drafts long runs
//! only where the text has been repetitive.

use super::Speculator;
use crate::Result;
use std::collections::HashMap;

/// Next tokens kept per context.
const KEPT: usize = 4;

/// What followed one context: up to [`KEPT`] tokens with their counts, and
/// how often the context occurred.
#[derive(Clone, Copy, Debug, Default)]
struct Continuations {
    next: [(u32, u32); KEPT],
    total: u32,
}

impl Continuations {
    fn add(&mut self, token: u32) {
        self.total = self.total.saturating_add(1);
        if let Some(slot) = self.next.iter_mut().find(|(t, c)| *c > 0 && *t == token) {
            slot.1 = slot.1.saturating_add(1);
        } else {
            // A new token replaces the rarest kept one.
            let rarest = (0..KEPT).min_by_key(|&i| self.next[i].1).unwrap_or(0);
            if self.next[rarest].1 <= 1 {
                self.next[rarest] = (token, 1);
            }
        }
    }

    /// The most frequent next token and its empirical frequency.
    fn best(&self) -> Option<(u32, f64)> {
        let (token, count) = self.next.iter().copied().max_by_key(|&(_, c)| c)?;
        (count > 0).then(|| (token, f64::from(count) / f64::from(self.total.max(1))))
    }
}

/// Drafts from counted continuations; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct SuffixSpeculator {
    depth: usize,
    /// Stop drafting once the product of the drafted tokens' frequencies
    /// falls below this.
    min_confidence: f64,
    table: HashMap<u64, Continuations>,
    /// The sequence the table has indexed.
    indexed: Vec<u32>,
    /// The context of the draft being made (reused between proposals).
    tail: Vec<u32>,
}

impl Default for SuffixSpeculator {
    fn default() -> Self {
        SuffixSpeculator::new(8, 0.2)
    }
}

/// A key for the context `tokens` (its length is mixed in).
fn key(tokens: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ tokens.len() as u64;
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h
}

impl SuffixSpeculator {
    /// Contexts of 1 to `depth` tokens; drafts while the running product of
    /// frequencies stays at or above `min_confidence`.
    pub fn new(depth: usize, min_confidence: f64) -> Self {
        SuffixSpeculator {
            depth: depth.max(1),
            min_confidence,
            table: HashMap::new(),
            indexed: Vec::new(),
            tail: Vec::new(),
        }
    }

    /// Counts the token at `end` after each context ending just before it.
    fn count(&mut self, sequence: &[u32], end: usize) {
        let token = sequence[end];
        for d in 1..=self.depth.min(end) {
            self.table
                .entry(key(&sequence[end - d..end]))
                .or_default()
                .add(token);
        }
    }

    /// Indexes what `sequence` adds to the sequence seen before; a sequence
    /// that does not extend it (a new prompt) is indexed from where they part.
    fn index(&mut self, sequence: &[u32]) {
        let common = self
            .indexed
            .iter()
            .zip(sequence)
            .take_while(|(a, b)| a == b)
            .count();
        self.indexed.truncate(common);
        for end in common.max(1)..sequence.len() {
            self.count(sequence, end);
        }
        self.indexed.extend_from_slice(&sequence[common..]);
    }

    /// The most frequent continuation after the longest known context at the end of `tail`.
    fn next(&self, tail: &[u32]) -> Option<(u32, f64)> {
        (1..=self.depth.min(tail.len()))
            .rev()
            .find_map(|d| self.table.get(&key(&tail[tail.len() - d..])))
            .and_then(Continuations::best)
    }
}

impl Speculator for SuffixSpeculator {
    fn name(&self) -> &'static str {
        "suffix"
    }

    fn propose(&mut self, sequence: &[u32], max: usize, out: &mut Vec<u32>) -> Result<()> {
        self.index(sequence);
        let mut confidence = 1.0;
        // The sequence's last `depth` tokens, then the drafted ones.
        let start = sequence.len().saturating_sub(self.depth);
        let mut tail = std::mem::take(&mut self.tail);
        tail.clear();
        tail.extend_from_slice(&sequence[start..]);
        while out.len() < max {
            let Some((token, frequency)) = self.next(&tail) else {
                break;
            };
            confidence *= frequency;
            if confidence < self.min_confidence {
                break;
            }
            out.push(token);
            tail.push(token);
        }
        self.tail = tail;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_the_most_frequent_continuation_and_learns_across_sequences() {
        let mut s = SuffixSpeculator::new(3, 0.2);
        let mut out = Vec::new();
        // Nothing seen: nothing proposed.
        s.propose(&[1, 2], 4, &mut out).unwrap();
        assert!(out.is_empty());
        // `1 2` was followed by 3 twice and by 9 once.
        s.propose(&[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 9, 0, 1, 2], 2, &mut out)
            .unwrap();
        assert_eq!(out, [3, 4]);
        // A new sequence (another request) still finds what the first taught.
        out.clear();
        s.propose(&[7, 7, 3], 3, &mut out).unwrap();
        assert_eq!(out, [4, 1, 2]);
        // Low confidence stops the draft: after `5` came 6, 7, 8 and 9 once each.
        let mut s = SuffixSpeculator::new(1, 0.5);
        out.clear();
        s.propose(&[5, 6, 5, 7, 5, 8, 5, 9, 5], 3, &mut out)
            .unwrap();
        assert!(out.is_empty(), "{out:?}");
    }
}
