//! Prompt lookup: the continuation of the latest earlier occurrence of the
//! sequence's last few tokens. Costs no model; pays off when the output
//! repeats its input (code edits, quotations, summaries that copy names).

use super::Speculator;
use crate::Result;

/// Drafts from n-gram matches in the sequence so far; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct PromptLookup {
    /// Longest suffix looked up first.
    max_ngram: usize,
    /// Shortest suffix that may match.
    min_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        PromptLookup::new(4, 2)
    }
}

impl PromptLookup {
    /// Matches suffixes of `max_ngram` tokens down to `min_ngram` (at least 1).
    pub fn new(max_ngram: usize, min_ngram: usize) -> Self {
        let min_ngram = min_ngram.max(1);
        PromptLookup {
            max_ngram: max_ngram.max(min_ngram),
            min_ngram,
        }
    }
}

/// Where the latest earlier occurrence of `sequence`'s last `n` tokens ends
/// (the index its continuation starts at), if any.
fn latest_match(sequence: &[u32], n: usize) -> Option<usize> {
    let len = sequence.len();
    if len <= n {
        return None;
    }
    let pattern = &sequence[len - n..];
    // Candidate ends, latest first; the suffix itself (end == len) excluded.
    (n..len)
        .rev()
        .find(|&end| &sequence[end - n..end] == pattern)
}

impl Speculator for PromptLookup {
    fn name(&self) -> &'static str {
        "ngram"
    }

    fn propose(&mut self, sequence: &[u32], max: usize, out: &mut Vec<u32>) -> Result<()> {
        for n in (self.min_ngram..=self.max_ngram).rev() {
            if let Some(end) = latest_match(sequence, n) {
                let take = max.min(sequence.len() - end);
                out.extend_from_slice(&sequence[end..end + take]);
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_the_continuation_of_the_longest_latest_match() {
        let mut s = PromptLookup::new(3, 1);
        let mut out = Vec::new();
        // `7 8` occurs twice; the latest is followed by 4 5.
        s.propose(&[7, 8, 1, 2, 7, 8, 4, 5, 6, 7, 8], 3, &mut out)
            .unwrap();
        assert_eq!(out, [4, 5, 6]);
        // A longer match wins over a later shorter one: `1 7 8` is
        // followed by 9; `7 8` alone, later, by 3.
        out.clear();
        s.propose(&[1, 7, 8, 9, 0, 7, 8, 3, 1, 7, 8], 2, &mut out)
            .unwrap();
        assert_eq!(out, [9, 0]);
        // No match: nothing.
        out.clear();
        s.propose(&[1, 2, 3, 4], 4, &mut out).unwrap();
        assert!(out.is_empty());
        // The continuation may run up to the suffix itself.
        out.clear();
        s.propose(&[5, 5, 5], 4, &mut out).unwrap();
        assert_eq!(out, [5]);
    }
}
