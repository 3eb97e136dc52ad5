//! A chat reply split as OpenAI's API returns it: reasoning between
//! `<think>` tags goes to `reasoning_content`, tool calls to `tool_calls`,
//! the rest to `content`. The same splitter serves streamed and whole
//! replies, so both give the same parts.

use crate::stop::StopMatcher;
use crate::tools::{CALL_HEADER, ToolCall, ToolSyntax, ValueScan, call_header};
use serde_json::Value;

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
    /// A streamed tool call begins: its index among the reply's calls and
    /// the function's name.
    CallName {
        /// The call's index.
        index: usize,
        /// The function.
        name: String,
    },
    /// More of a streamed call's arguments, as the model writes them.
    CallArguments {
        /// The call's index.
        index: usize,
        /// The next piece of the arguments' JSON text.
        text: String,
    },
}

/// Reads JSON calls from held text as they are written, so that their
/// arguments stream as fragments.
struct CallStream {
    /// The key of the arguments (`arguments`, `parameters`).
    key: &'static str,
    /// How far the held text has been read.
    read: usize,
    /// Calls begun so far: each name and its arguments' text so far.
    begun: Vec<(String, String)>,
    /// Inside a call's arguments: where the unsent text starts, and the scan.
    arguments: Option<(usize, ValueScan)>,
}

impl CallStream {
    fn read(&mut self, held: &str, parts: &mut Vec<Part>) {
        loop {
            match &mut self.arguments {
                None => {
                    let Some(at) = held[self.read..].find(CALL_HEADER) else {
                        return;
                    };
                    let from = self.read + at;
                    let Some((written, offset)) = call_header(&held[from..], self.key) else {
                        return;
                    };
                    let start = from + offset;
                    match held[start..].chars().next() {
                        Some('{') => {}
                        // Not an object (yet): wait, or leave it to the parse at the end.
                        None => return,
                        Some(_) => {
                            self.read = start;
                            continue;
                        }
                    }
                    let name = serde_json::from_str::<String>(&format!("\"{written}\""))
                        .unwrap_or_else(|_| written.to_owned());
                    parts.push(Part::CallName {
                        index: self.begun.len(),
                        name: name.clone(),
                    });
                    self.begun.push((name, String::new()));
                    self.read = start;
                    self.arguments = Some((start, ValueScan::default()));
                }
                Some((unsent, scan)) => {
                    let index = self.begun.len() - 1;
                    let end = scan.advance(&held[self.read..]).map(|e| self.read + e);
                    let upto = end.unwrap_or(held.len());
                    if upto > *unsent {
                        let text = &held[*unsent..upto];
                        self.begun[index].1 += text;
                        parts.push(Part::CallArguments {
                            index,
                            text: text.to_owned(),
                        });
                    }
                    self.read = upto;
                    match end {
                        Some(_) => self.arguments = None,
                        None => {
                            *unsent = upto;
                            return;
                        }
                    }
                }
            }
        }
    }
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
    /// Calls streamed as they are written (see [`Self::streaming_calls`]).
    calls: Option<CallStream>,
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
            calls: None,
        }
    }

    /// Streams JSON tool calls (Hermes, Llama 3) as they are written: a
    /// [`Part::CallName`] once a call's name is known, then its arguments
    /// in [`Part::CallArguments`] pieces. For replies whose calls a grammar
    /// holds to the compact form (then every call parses as it streamed,
    /// unless the reply is cut short).
    pub fn streaming_calls(mut self) -> Self {
        let key = match self.tools.as_ref().map(|(s, _)| *s) {
            Some(ToolSyntax::Hermes) => "arguments",
            Some(ToolSyntax::Llama3) => "parameters",
            _ => return self,
        };
        self.calls = Some(CallStream {
            key,
            read: 0,
            begun: Vec::new(),
            arguments: None,
        });
        self
    }

    /// How many calls have begun streaming (their later deltas carry only
    /// what was not streamed).
    pub fn streamed_calls(&self) -> usize {
        self.calls.as_ref().map_or(0, |c| c.begun.len())
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
            Phase::Answer => {
                match (&mut self.held, &mut self.tools) {
                    (Some(held), _) => held.push_str(text),
                    (None, Some((_, openers))) => {
                        let (answer, call) = openers.push(text);
                        push(parts, Part::Content(answer));
                        self.held = call;
                    }
                    (None, None) => push(parts, Part::Content(text.to_owned())),
                }
                if let (Some(held), Some(calls)) = (&self.held, &mut self.calls) {
                    calls.read(held, parts);
                }
            }
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
                Part::CallName { .. } | Part::CallArguments { .. } => {}
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
        let (mut text, mut calls) = syntax.parse(&rest);
        // Streamed calls are the reply's calls, also when it was cut short
        // before the calls' markers were all written (the parse then fails).
        if let Some(stream) = &self.calls
            && stream.begun.len() > calls.len()
        {
            calls = stream
                .begun
                .iter()
                .map(|(name, arguments)| ToolCall {
                    name: name.clone(),
                    arguments: serde_json::from_str(arguments).unwrap_or(Value::Null),
                    arguments_text: Some(arguments.clone()),
                })
                .collect();
            text.clear();
        }
        push(&mut parts, Part::Content(text));
        (parts, calls)
    }
}

/// Appends `part` unless it is empty.
fn push(parts: &mut Vec<Part>, part: Part) {
    let empty = match &part {
        Part::Reasoning(t) | Part::Content(t) => t.is_empty(),
        Part::CallName { .. } | Part::CallArguments { .. } => false,
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
                Part::CallName { .. } | Part::CallArguments { .. } => {}
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

    #[test]
    fn json_calls_stream_as_names_then_argument_fragments_equal_to_the_whole() {
        let hermes = "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"O\\\"s{lo}\", \"days\": [1, {\"x\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let llama = "{\"name\": \"now\", \"parameters\": {}}; {\"name\": \"f\", \"parameters\": {\"a\": \"}\"}}";
        for (syntax, reply) in [(ToolSyntax::Hermes, hermes), (ToolSyntax::Llama3, llama)] {
            for step in [1, 3, 7, reply.len()] {
                let mut s = ReplySplitter::new(Some(syntax), false).streaming_calls();
                let mut parts = Vec::new();
                let chars: Vec<char> = reply.chars().collect();
                for piece in chars.chunks(step) {
                    parts.extend(s.push(&piece.iter().collect::<String>()));
                }
                let (rest, calls) = s.finish();
                parts.extend(rest);
                let mut streamed: Vec<(String, String)> = Vec::new();
                for part in &parts {
                    match part {
                        Part::CallName { index, name } => {
                            assert_eq!(*index, streamed.len());
                            streamed.push((name.clone(), String::new()));
                        }
                        Part::CallArguments { index, text } => streamed[*index].1 += text,
                        _ => {}
                    }
                }
                let whole: Vec<(String, String)> = calls
                    .iter()
                    .map(|c| (c.name.clone(), c.arguments_text.clone().unwrap()))
                    .collect();
                assert_eq!(streamed, whole, "{syntax:?} in pieces of {step}");
                assert_eq!(s.streamed_calls(), 2);
                // In pieces, some call's arguments come in several fragments.
                let fragments = parts
                    .iter()
                    .filter(|p| matches!(p, Part::CallArguments { .. }))
                    .count();
                assert!(
                    step == reply.len() || fragments > 2,
                    "{syntax:?}: {fragments}"
                );
            }
        }
        // A reply cut short inside its second call: the calls are what
        // streamed, whole or in pieces.
        let cut = &hermes[..hermes.find("{}").unwrap() + 1];
        let whole = ReplySplitter::new(Some(ToolSyntax::Hermes), false)
            .streaming_calls()
            .split(cut);
        let mut s = ReplySplitter::new(Some(ToolSyntax::Hermes), false).streaming_calls();
        for c in cut.chars() {
            s.push(&c.to_string());
        }
        let (_, calls) = s.finish();
        assert_eq!(whole.2, calls);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments_text.as_deref(), Some("{"));
        assert_eq!(whole.1, "Sure.\n");

        // Without streaming, the calls come whole (and their text is kept).
        let mut s = ReplySplitter::new(Some(ToolSyntax::Hermes), false);
        assert!(
            s.push(hermes)
                .iter()
                .all(|p| !matches!(p, Part::CallName { .. }))
        );
        let (_, calls) = s.finish();
        assert_eq!(
            calls[0].arguments_text.as_deref(),
            Some("{\"city\": \"O\\\"s{lo}\", \"days\": [1, {\"x\": 2}]}")
        );
        assert_eq!(s.streamed_calls(), 0);
    }
}
