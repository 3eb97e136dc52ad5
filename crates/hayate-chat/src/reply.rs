//! A chat reply split as OpenAI's API returns it: reasoning between
//! `<think>` tags goes to `reasoning_content`, tool calls to `tool_calls`,
//! the rest to `content`. The same splitter serves streamed and whole
//! replies, so both give the same parts.

use crate::stop::StopMatcher;
use crate::tools::{ToolCall, ToolSyntax};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// The ids of the special tokens a reply is split by (`<think>`, and the
/// call markers of `tools`), for [`TextTokenizer::stream_showing`]: where
/// a marker is a special token, decoding would otherwise drop it.
///
/// [`TextTokenizer::stream_showing`]: crate::TextTokenizer::stream_showing
pub fn marker_ids(tokenizer: &crate::TextTokenizer, tools: Option<ToolSyntax>) -> Vec<u32> {
    [THINK_OPEN, THINK_CLOSE]
        .iter()
        .chain(tools.map_or(&[][..], ToolSyntax::markers))
        .filter_map(|m| tokenizer.special_token_id(m))
        .collect()
}

/// A part of a reply, as it becomes known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Reasoning text (inside `<think>` ... `</think>`).
    Reasoning(String),
    /// Answer text.
    Content(String),
}

/// Where the reply is.
enum Phase {
    /// Not yet known whether it opens with `<think>`: the text so far.
    Opening(String),
    /// Inside the reasoning.
    Thinking,
    /// The answer.
    Answer,
}

/// Splits one reply as it streams.
pub struct ReplySplitter {
    phase: Phase,
    think_end: StopMatcher,
    /// Tool-call openers, when tools were offered.
    tools: Option<(ToolSyntax, StopMatcher)>,
    /// The text from the first call opener on, held until the end.
    held: Option<String>,
}

impl ReplySplitter {
    /// A splitter for a reply whose prompt already opened a reasoning
    /// block (`thinking`), reading calls in `tools` when they were offered.
    pub fn new(tools: Option<ToolSyntax>, thinking: bool) -> Self {
        ReplySplitter {
            phase: if thinking {
                Phase::Thinking
            } else {
                Phase::Opening(String::new())
            },
            think_end: StopMatcher::new(vec![THINK_CLOSE.to_owned()]),
            tools: tools.map(|s| {
                let openers = s.openers().iter().map(|o| o.to_string()).collect();
                (s, StopMatcher::new(openers))
            }),
            held: None,
        }
    }

    /// A splitter for the reply to `prompt` (the rendered chat): a prompt
    /// that ends by opening `<think>` starts the reply in its reasoning.
    pub fn after(prompt: &str, tools: Option<ToolSyntax>) -> Self {
        ReplySplitter::new(tools, prompt.trim_end().ends_with(THINK_OPEN))
    }

    /// Adds generated text; returns the parts it completes.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        let mut parts = Vec::new();
        self.feed(text, &mut parts);
        parts
    }

    fn feed(&mut self, text: &str, parts: &mut Vec<Part>) {
        match &mut self.phase {
            Phase::Opening(seen) => {
                seen.push_str(text);
                let start = seen.trim_start();
                if THINK_OPEN.starts_with(start) && start.len() < THINK_OPEN.len() {
                    return;
                }
                let seen = std::mem::take(seen);
                match seen.trim_start().strip_prefix(THINK_OPEN) {
                    Some(rest) => {
                        let rest = rest.to_owned();
                        self.phase = Phase::Thinking;
                        self.feed(&rest, parts);
                    }
                    None => {
                        self.phase = Phase::Answer;
                        self.feed(&seen, parts);
                    }
                }
            }
            Phase::Thinking => {
                let (reasoning, end) = self.think_end.push(text);
                push(parts, Part::Reasoning(reasoning));
                if let Some(rest) = end {
                    self.phase = Phase::Answer;
                    let answer = rest[THINK_CLOSE.len()..].trim_start().to_owned();
                    self.feed(&answer, parts);
                }
            }
            Phase::Answer => match (&mut self.held, &mut self.tools) {
                (Some(held), _) => held.push_str(text),
                (None, Some((_, openers))) => {
                    let (answer, call) = openers.push(text);
                    push(parts, Part::Content(answer));
                    self.held = call;
                }
                (None, None) => push(parts, Part::Content(text.to_owned())),
            },
        }
    }

    /// A whole reply at once: its reasoning, its content and its calls.
    pub fn split(mut self, reply: &str) -> (String, String, Vec<ToolCall>) {
        let mut parts = self.push(reply);
        let (rest, calls) = self.finish();
        parts.extend(rest);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for part in parts {
            match part {
                Part::Reasoning(t) => reasoning += &t,
                Part::Content(t) => content += &t,
            }
        }
        (reasoning, content, calls)
    }

    /// Ends the reply: the parts still held, and the calls it made.
    pub fn finish(&mut self) -> (Vec<Part>, Vec<ToolCall>) {
        let mut parts = Vec::new();
        match std::mem::replace(&mut self.phase, Phase::Answer) {
            Phase::Opening(seen) => push(&mut parts, Part::Content(seen)),
            Phase::Thinking => push(&mut parts, Part::Reasoning(self.think_end.finish())),
            Phase::Answer => {}
        }
        let Some((syntax, openers)) = &mut self.tools else {
            return (parts, Vec::new());
        };
        let rest = self.held.take().unwrap_or_else(|| openers.finish());
        let (text, calls) = syntax.parse(&rest);
        push(&mut parts, Part::Content(text));
        (parts, calls)
    }
}

/// Appends `part` unless it is empty.
fn push(parts: &mut Vec<Part>, part: Part) {
    let empty = match &part {
        Part::Reasoning(t) | Part::Content(t) => t.is_empty(),
    };
    if !empty {
        parts.push(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply fed in `pieces` (the last through [`ReplySplitter::split`]):
    /// reasoning, content, call names.
    fn split(
        tools: Option<ToolSyntax>,
        thinking: bool,
        pieces: &[&str],
    ) -> (String, String, Vec<String>) {
        let mut s = ReplySplitter::new(tools, thinking);
        let (init, last) = pieces.split_at(pieces.len() - 1);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for part in init.iter().flat_map(|p| s.push(p)) {
            match part {
                Part::Reasoning(t) => reasoning += &t,
                Part::Content(t) => content += &t,
            }
        }
        let (r, c, calls) = s.split(last[0]);
        (
            reasoning + &r,
            content + &c,
            calls.into_iter().map(|c| c.name).collect(),
        )
    }

    #[test]
    fn reasoning_is_split_off_wherever_the_tags_fall() {
        let want = ("plan it".to_owned(), "Answer.".to_owned(), vec![]);
        assert_eq!(
            split(None, false, &["<think>plan it</think>\n\nAnswer."]),
            want
        );
        assert_eq!(
            split(
                None,
                false,
                &["<th", "ink>plan", " it</th", "ink>\n", "Answer."]
            ),
            want
        );
        assert_eq!(split(None, true, &["plan it</think>Answer."]), want);
        // No tags: all content; an unclosed block: all reasoning.
        assert_eq!(
            split(None, false, &["<b>x</b>"]),
            (String::new(), "<b>x</b>".into(), vec![])
        );
        assert_eq!(
            split(None, false, &["<thi"]),
            (String::new(), "<thi".into(), vec![])
        );
        assert_eq!(
            split(None, false, &["<think>never done"]),
            ("never done".into(), String::new(), vec![])
        );
    }

    #[test]
    fn calls_after_reasoning_are_read_and_kept_out_of_the_content() {
        let reply = "<think>need weather</think>Checking.\n<tool_call>\n{\"name\": \"w\", \"arguments\": {}}\n</tool_call>";
        let whole = split(Some(ToolSyntax::Hermes), false, &[reply]);
        assert_eq!(
            whole,
            (
                "need weather".into(),
                "Checking.\n".into(),
                vec!["w".into()]
            )
        );
        let pieces: Vec<String> = reply.chars().map(String::from).collect();
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(split(Some(ToolSyntax::Hermes), false, &refs), whole);
        // Text that only looks like the start of a call comes out at the end.
        assert_eq!(
            split(Some(ToolSyntax::Hermes), false, &["a <tool_", "b"]),
            (String::new(), "a <tool_b".into(), vec![])
        );
    }
}
