//! Stop strings, matched across token boundaries: text that could be the
//! start of a stop string is held back until it is known not to be one,
//! so a stop string is never emitted, even in part.

/// Watches generated text for any of a request's stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (none empty).
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Adds generated text. Returns the text that can be emitted and, once
    /// a stop string is reached, the text from its start on (the emitted
    /// text ends before it; a stop string ends generation, a tool call's
    /// opener starts a call).
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let rest = self.held.split_off(at);
            return (std::mem::take(&mut self.held), Some(rest));
        }
        let keep = self.partial_suffix();
        let emit = self.held.len() - keep;
        let out = self.held[..emit].to_owned();
        self.held.drain(..emit);
        (out, None)
    }

    /// The text still held back, once generation has ended without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of the held text that begin some stop string.
    fn partial_suffix(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let len = self.held.len();
        (1..longest.min(len + 1))
            .rev()
            .find(|&k| {
                self.held.is_char_boundary(len - k)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.starts_with(&self.held[len - k..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns the emitted text and whether a stop matched.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            out += &text;
            if stopped.is_some() {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn a_stop_split_over_tokens_is_found_and_never_emitted() {
        assert_eq!(
            run(&["\n\n"], &["def f", "():\n", "\n    x"]),
            ("def f():".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "Dxyz"]),
            ("abc ".into(), true)
        );
        // The earliest of several stops wins, wherever each begins.
        assert_eq!(run(&["cd", "b"], &["ab", "cd"]), ("a".into(), true));
    }

    #[test]
    fn held_text_that_is_not_a_stop_comes_out() {
        assert_eq!(
            run(&["END"], &["a E", "Nx", " END?"]),
            ("a ENx ".into(), true)
        );
        assert_eq!(run(&["END"], &["a EN"]), ("a EN".into(), false));
        let mut m = StopMatcher::new(vec!["END".into()]);
        // Only what could begin the stop is held.
        assert_eq!(m.push("xyzE"), ("xyz".into(), None));
        assert_eq!(m.push("é"), ("Eé".into(), None));
        // What follows a match comes back with it.
        assert_eq!(m.push("ab ENDcd"), ("ab ".into(), Some("ENDcd".into())));
    }

    #[test]
    fn multibyte_text_is_cut_at_character_boundaries() {
        assert_eq!(run(&["éé"], &["aé", "éb"]), ("a".into(), true));
        assert_eq!(run(&["ñx"], &["ññ", "ñ"]), ("ñññ".into(), false));
    }
}
