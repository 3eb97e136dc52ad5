//! Tool calls as each model family writes them: recognised from the chat
//! template, parsed out of replies, rendered back into conversations whose
//! template cannot, and forced by a grammar when a call is required.

use serde_json::{Value, json};

/// How a model family writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolSyntax {
    /// Hermes and Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
    /// per call. Also the fallback for templates that know no tools.
    Hermes,
    /// Llama 3.x: one JSON object `{"name": ..., "parameters": {...}}` per
    /// call (`;`-separated), optionally after `<|python_tag|>`.
    Llama3,
    /// LFM2: `<|tool_call_start|>[name(arg=value, ...), ...]<|tool_call_end|>`,
    /// values written as JSON.
    Lfm2,
}

/// One call a reply makes.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The function.
    pub name: String,
    /// Its arguments (an object).
    pub arguments: Value,
    /// The arguments as the model wrote them, where they can be read as
    /// written (JSON calls in the compact form grammars force): what a
    /// reply returns, streamed or whole, rather than a re-serialisation.
    pub arguments_text: Option<String>,
}

/// A tool offered to the model: a function and the JSON schema of its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    /// The function's name.
    pub name: String,
    /// The schema of its arguments (an object schema).
    pub parameters: Value,
}

/// One message of a conversation that may hold tool calls and results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Turn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its text.
    pub content: String,
    /// The calls an assistant turn made, each with its id when it has one.
    pub calls: Vec<(Option<String>, ToolCall)>,
    /// The speaker's name, when given.
    pub name: Option<String>,
    /// For a tool result: the call it answers.
    pub tool_call_id: Option<String>,
    /// An assistant turn's reasoning, for templates that render it.
    pub reasoning: Option<String>,
}

impl Turn {
    /// A turn of text only.
    pub fn text(role: &str, content: &str) -> Self {
        Turn {
            role: role.to_owned(),
            content: content.to_owned(),
            ..Turn::default()
        }
    }
}

/// How a chat template deals with tools: the syntax it teaches its model,
/// and whether it renders offered tools and assistant calls itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolTemplate {
    /// The model's tool-call syntax.
    pub syntax: ToolSyntax,
    /// The template reads a `tools` variable.
    pub renders_tools: bool,
    /// The template reads messages' `tool_calls`.
    pub renders_calls: bool,
}

impl ToolTemplate {
    /// What the template `source` does with tools.
    pub fn of(source: &str) -> Self {
        ToolTemplate {
            syntax: ToolSyntax::detect(source),
            renders_tools: source.contains("tools"),
            renders_calls: source.contains("tool_calls"),
        }
    }

    /// The messages as the template takes them, and the `tools` (an
    /// OpenAI `tools` array) to hand it. What the template cannot render
    /// is written out in the model's syntax: offered tools as a system
    /// prompt, calls into the assistant's text, results as user turns in
    /// `<tool_response>` tags.
    pub fn messages<'a>(
        &self,
        turns: &[Turn],
        tools: Option<&'a Value>,
    ) -> (Vec<Value>, Option<&'a Value>) {
        let native = self.renders_calls;
        let mut messages: Vec<Value> = turns
            .iter()
            .map(|turn| {
                let calls: Vec<ToolCall> = turn.calls.iter().map(|(_, c)| c.clone()).collect();
                let (role, content) = match (turn.role.as_str(), native) {
                    ("tool", false) => (
                        "user",
                        format!("<tool_response>\n{}\n</tool_response>", turn.content),
                    ),
                    ("assistant", false) if !calls.is_empty() => {
                        let written = self.syntax.render(&calls);
                        let joined = if turn.content.is_empty() {
                            written
                        } else {
                            format!("{}\n{written}", turn.content)
                        };
                        ("assistant", joined)
                    }
                    (role, _) => (role, turn.content.clone()),
                };
                let mut out = json!({ "role": role, "content": content });
                if let Some(name) = &turn.name {
                    out["name"] = json!(name);
                }
                if native && !calls.is_empty() {
                    out["tool_calls"] = turn
                        .calls
                        .iter()
                        .map(|(id, c)| json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                        .collect();
                }
                if let Some(id) = &turn.tool_call_id {
                    out["tool_call_id"] = json!(id);
                }
                if let Some(r) = &turn.reasoning {
                    out["reasoning_content"] = json!(r);
                }
                out
            })
            .collect();
        match tools {
            Some(tools) if !self.renders_tools => {
                let instructions = self.syntax.instructions(tools);
                match messages.first_mut() {
                    Some(first) if first["role"] == "system" => {
                        let text = first["content"].as_str().unwrap_or("").to_owned();
                        first["content"] = json!(format!("{text}\n\n{instructions}"));
                    }
                    _ => messages.insert(0, json!({"role": "system", "content": instructions})),
                }
                (messages, None)
            }
            tools => (messages, tools),
        }
    }
}

const LFM2_START: &str = "<|tool_call_start|>";
const LFM2_END: &str = "<|tool_call_end|>";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolSyntax {
    /// The syntax a chat template teaches its model (Hermes when it names none).
    pub fn detect(template: &str) -> Self {
        if template.contains(LFM2_START) {
            ToolSyntax::Lfm2
        } else if template.contains(PYTHON_TAG) || template.contains("ipython") {
            ToolSyntax::Llama3
        } else {
            ToolSyntax::Hermes
        }
    }

    /// A short name for logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            ToolSyntax::Hermes => "hermes",
            ToolSyntax::Llama3 => "llama3-json",
            ToolSyntax::Lfm2 => "lfm2",
        }
    }

    /// The markers of calls in this syntax (in some vocabularies each is
    /// one special token, which decoding must then keep).
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolSyntax::Hermes => &["<tool_call>", "</tool_call>"],
            ToolSyntax::Llama3 => &[PYTHON_TAG],
            ToolSyntax::Lfm2 => &[LFM2_START, LFM2_END],
        }
    }

    /// Texts that open a call: a streamed reply is held back from the
    /// first of them on.
    pub fn openers(self) -> &'static [&'static str] {
        match self {
            ToolSyntax::Hermes => &["<tool_call>"],
            ToolSyntax::Llama3 => &[PYTHON_TAG, "{\"name\""],
            ToolSyntax::Lfm2 => &[LFM2_START],
        }
    }

    /// `calls` as the model writes them.
    pub fn render(self, calls: &[ToolCall]) -> String {
        match self {
            ToolSyntax::Hermes => calls
                .iter()
                .map(|c| {
                    format!(
                        "<tool_call>\n{}\n</tool_call>",
                        json!({"name": c.name, "arguments": c.arguments})
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            ToolSyntax::Llama3 => calls
                .iter()
                .map(|c| json!({"name": c.name, "parameters": c.arguments}).to_string())
                .collect::<Vec<_>>()
                .join("; "),
            ToolSyntax::Lfm2 => {
                let calls: Vec<String> = calls
                    .iter()
                    .map(|c| {
                        let args: Vec<String> = c
                            .arguments
                            .as_object()
                            .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                            .unwrap_or_default();
                        format!("{}({})", c.name, args.join(", "))
                    })
                    .collect();
                format!("{LFM2_START}[{}]{LFM2_END}", calls.join(", "))
            }
        }
    }

    /// A system prompt that teaches this syntax and `tools` (the OpenAI
    /// `tools` array), for templates that do not render tools themselves.
    pub fn instructions(self, tools: &Value) -> String {
        let listing: Vec<String> = tools
            .as_array()
            .map(|a| a.iter().map(Value::to_string).collect())
            .unwrap_or_default();
        let example = self.render(&[ToolCall {
            name: "<function-name>".into(),
            arguments: json!({"<argument>": "<value>"}),
            arguments_text: None,
        }]);
        format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query. The functions:\n<tools>\n{}\n</tools>\n\nTo call a function, reply with:\n{example}",
            listing.join("\n")
        )
    }

    /// A Lark grammar that admits only calls to `tools` (one, or one or
    /// more with `parallel`), in this syntax, with arguments valid under
    /// each tool's schema. `special` gives the id of a marker that is one
    /// special token of the vocabulary (written `<[id]>` in the grammar).
    pub fn grammar(
        self,
        tools: &[Tool],
        parallel: bool,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> String {
        let (rules, _) = self.call_rules(tools, parallel, special);
        format!("start: calls\n{rules}")
    }

    /// A Lark grammar for `tool_choice: auto`: free text, or text followed
    /// by calls to `tools` that, once the model writes the call opener,
    /// must be well formed with arguments valid under the tools' schemas.
    /// `None` for Llama 3 JSON, whose calls have no opener to wait for.
    pub fn auto_grammar(
        self,
        tools: &[Tool],
        parallel: bool,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<String> {
        let opener = match self {
            ToolSyntax::Hermes => "<tool_call>",
            ToolSyntax::Lfm2 => LFM2_START,
            ToolSyntax::Llama3 => return None,
        };
        let (rules, more) = self.call_rules(tools, parallel, special);
        let free = "free: /(.|\\n)*/\n";
        Some(match special(opener) {
            // A special token cannot occur in text: the text ends where it is drawn.
            Some(_) => format!("start: free | free calls\n{free}{rules}"),
            // A text opener: the first occurrence of it starts the calls.
            None => format!(
                "start: free | head after{more}\n{free}head[lazy]: /(.|\\n)*{}/\n{rules}",
                regex_escape(opener)
            ),
        })
    }

    /// The rules `calls` (every call), `call` (one call, opener included)
    /// and `after` (a call after its opener) of this syntax's grammars,
    /// and what follows a first call (more calls, when parallel).
    fn call_rules(
        self,
        tools: &[Tool],
        parallel: bool,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> (String, String) {
        let marker = |text: &str| match special(text) {
            Some(id) => format!("<[{id}]>"),
            None => lark_string(text),
        };
        let compact =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let call_schema = |arguments_key: &str| {
            let options: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
                        "required": ["name", arguments_key],
                        "additionalProperties": false,
                    })
                })
                .collect();
            json!({"x-guidance": compact, "anyOf": options})
        };
        // More calls after the first, when parallel calls are allowed.
        let more = |sep: &str, call: &str| {
            if parallel {
                format!(" ({} {call})*", lark_string(sep))
            } else {
                String::new()
            }
        };
        match self {
            ToolSyntax::Hermes => {
                let more = more("\n", "call");
                let rules = format!(
                    "calls: call{more}\ncall: {open} after\nafter: \"\\n\" body \"\\n\" {close}\nbody: %json {schema}\n",
                    open = marker("<tool_call>"),
                    close = marker("</tool_call>"),
                    schema = call_schema("arguments"),
                );
                (rules, more)
            }
            ToolSyntax::Llama3 => {
                let more = more("; ", "body");
                let rules = format!(
                    "calls: body{more}\nbody: %json {schema}\n",
                    schema = call_schema("parameters"),
                );
                (rules, more)
            }
            ToolSyntax::Lfm2 => {
                let mut rules = String::new();
                let mut names = Vec::new();
                for (i, t) in tools.iter().enumerate() {
                    let properties = t.parameters.get("properties").and_then(Value::as_object);
                    let required: Vec<&str> = t
                        .parameters
                        .get("required")
                        .and_then(Value::as_array)
                        .map(|r| r.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut args = Vec::new();
                    for (j, name) in required.iter().enumerate() {
                        let schema = properties
                            .and_then(|p| p.get(*name))
                            .cloned()
                            .unwrap_or(json!({}));
                        let mut schema = schema;
                        if let Some(o) = schema.as_object_mut() {
                            o.insert("x-guidance".into(), compact.clone());
                        }
                        rules += &format!("arg{i}_{j}: %json {schema}\n");
                        args.push(format!("{} arg{i}_{j}", lark_string(&format!("{name}="))));
                    }
                    let sep = format!(" {} ", lark_string(", "));
                    rules += &format!(
                        "fn{i}: {} {} {}\n",
                        lark_string(&format!("{}(", t.name)),
                        if args.is_empty() {
                            String::new()
                        } else {
                            args.join(&sep)
                        },
                        lark_string(")")
                    );
                    names.push(format!("fn{i}"));
                }
                let rules = format!(
                    "calls: call\ncall: {open} after\nafter: \"[\" fn{inner} \"]\" {close}\nfn: {}\n{rules}",
                    names.join(" | "),
                    open = marker(LFM2_START),
                    close = marker(LFM2_END),
                    inner = more(", ", "fn"),
                );
                (rules, String::new())
            }
        }
    }

    /// Splits a reply into its text and the calls it makes. Text that
    /// looks like a call but does not parse stays text.
    pub fn parse(self, reply: &str) -> (String, Vec<ToolCall>) {
        match self {
            ToolSyntax::Hermes => {
                let mut text = String::new();
                let mut calls = Vec::new();
                let mut rest = reply;
                while let Some(start) = rest.find("<tool_call>") {
                    let after = &rest[start + "<tool_call>".len()..];
                    let Some(end) = after.find("</tool_call>") else {
                        break;
                    };
                    match call_of(after[..end].trim(), "arguments") {
                        Some(call) => {
                            text += &rest[..start];
                            calls.push(call);
                        }
                        None => {
                            text +=
                                &rest[..start + "<tool_call>".len() + end + "</tool_call>".len()]
                        }
                    }
                    rest = &after[end + "</tool_call>".len()..];
                }
                text += rest;
                if calls.is_empty() {
                    return (reply.to_owned(), calls);
                }
                (text.trim().to_owned(), calls)
            }
            ToolSyntax::Llama3 => {
                let body = reply
                    .trim()
                    .strip_prefix(PYTHON_TAG)
                    .unwrap_or(reply.trim())
                    .trim();
                let calls: Option<Vec<ToolCall>> = body
                    .split("; ")
                    .map(|part| {
                        call_of(part.trim(), "parameters")
                            .or_else(|| call_of(part.trim(), "arguments"))
                    })
                    .collect();
                match calls {
                    Some(calls) if body.starts_with('{') => (String::new(), calls),
                    _ => (reply.to_owned(), Vec::new()),
                }
            }
            ToolSyntax::Lfm2 => {
                let Some(start) = reply.find(LFM2_START) else {
                    return (reply.to_owned(), Vec::new());
                };
                let after = &reply[start + LFM2_START.len()..];
                let Some(end) = after.find(LFM2_END) else {
                    return (reply.to_owned(), Vec::new());
                };
                match pythonic_calls(after[..end].trim()) {
                    Some(calls) => {
                        let text = format!("{}{}", &reply[..start], &after[end + LFM2_END.len()..]);
                        (text.trim().to_owned(), calls)
                    }
                    None => (reply.to_owned(), Vec::new()),
                }
            }
        }
    }
}

/// A call written as JSON `{"name": ..., key: {...}}`.
fn call_of(text: &str, key: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(text).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get(key) {
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(v @ Value::Object(_)) => v.clone(),
        None => json!({}),
        Some(_) => return None,
    };
    let arguments_text = raw_arguments(text, key).map(str::to_owned);
    Some(ToolCall {
        name,
        arguments,
        arguments_text,
    })
}

/// The start of a JSON call in the compact form: `{"name": "`.
pub(crate) const CALL_HEADER: &str = "{\"name\": \"";

/// Where the arguments of a JSON call begin in `text`, which starts with
/// one written compactly, `{"name": "NAME", "KEY": ARGS`: the name as
/// written (escapes and all) and the offset of ARGS. `None` until all of
/// that has been written (or when `text` is not such a call).
pub(crate) fn call_header<'t>(text: &'t str, key: &str) -> Option<(&'t str, usize)> {
    let rest = text.strip_prefix(CALL_HEADER)?;
    let mut escaped = false;
    let end = rest.char_indices().find_map(|(i, c)| match (escaped, c) {
        (true, _) => {
            escaped = false;
            None
        }
        (false, '\\') => {
            escaped = true;
            None
        }
        (false, '"') => Some(i),
        _ => None,
    })?;
    let after = &rest[end + 1..];
    let separator = format!(", \"{key}\": ");
    after
        .strip_prefix(separator.as_str())
        .map(|_| (&rest[..end], CALL_HEADER.len() + end + 1 + separator.len()))
}

/// Scans a JSON value as it is written, to find where it ends.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ValueScan {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl ValueScan {
    /// Reads `text`, the next part of an object or array value; returns the
    /// offset just past the value's end, if it ends in `text`.
    pub(crate) fn advance(&mut self, text: &str) -> Option<usize> {
        for (i, c) in text.char_indices() {
            if self.in_string {
                match (self.escaped, c) {
                    (true, _) => self.escaped = false,
                    (false, '\\') => self.escaped = true,
                    (false, '"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => self.in_string = true,
                '{' | '[' => self.depth += 1,
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// The arguments object of the compact JSON call `text`, as written.
fn raw_arguments<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    let (_, start) = call_header(text, key)?;
    let args = &text[start..];
    if !args.starts_with('{') {
        return None;
    }
    let end = ValueScan::default().advance(args)?;
    (args[end..].trim() == "}").then(|| &args[..end])
}

/// `[f(a=1, b="x"), g()]` without the brackets: calls with keyword
/// arguments whose values are JSON (Python's True, False and None too).
fn pythonic_calls(text: &str) -> Option<Vec<ToolCall>> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    split_top(inner, ',')
        .into_iter()
        .filter(|c| !c.trim().is_empty())
        .map(|call| {
            let call = call.trim();
            let open = call.find('(')?;
            let name = call[..open].trim();
            let args = call[open + 1..].strip_suffix(')')?;
            let mut arguments = serde_json::Map::new();
            for arg in split_top(args, ',')
                .into_iter()
                .filter(|a| !a.trim().is_empty())
            {
                let (key, value) = arg.split_once('=')?;
                let value = match value.trim() {
                    "True" => Value::Bool(true),
                    "False" => Value::Bool(false),
                    "None" => Value::Null,
                    v => serde_json::from_str(v).ok()?,
                };
                arguments.insert(key.trim().to_owned(), value);
            }
            (!name.is_empty()).then(|| ToolCall {
                name: name.to_owned(),
                arguments: Value::Object(arguments),
                arguments_text: None,
            })
        })
        .collect()
}

/// Splits at `sep` outside brackets and strings.
fn split_top(text: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut escaped, mut from) =
        (Vec::new(), 0i32, false, false, 0);
    for (i, c) in text.char_indices() {
        if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&text[from..i]);
                from = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[from..]);
    parts
}

/// `text` as a literal inside a Lark regex.
fn regex_escape(text: &str) -> String {
    text.chars()
        .map(|c| {
            // In a class, so that no escape reads as an assertion (`\<`).
            match c {
                c if c.is_ascii_alphanumeric() || c == '_' || c == ' ' => c.to_string(),
                '/' => "\\/".to_owned(),
                '\\' | ']' | '[' | '^' | '-' => format!("[\\{c}]"),
                c => format!("[{c}]"),
            }
        })
        .collect()
}

/// `text` as a Lark string literal.
fn lark_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls() -> Vec<ToolCall> {
        vec![
            ToolCall {
                name: "get_weather".into(),
                arguments: json!({"city": "Oslo", "days": 3}),
                arguments_text: None,
            },
            ToolCall {
                name: "now".into(),
                arguments: json!({}),
                arguments_text: None,
            },
        ]
    }

    #[test]
    fn every_syntax_parses_what_it_renders() {
        for syntax in [ToolSyntax::Hermes, ToolSyntax::Llama3, ToolSyntax::Lfm2] {
            let text = syntax.render(&calls());
            assert_eq!(
                syntax.parse(&text),
                (String::new(), calls()),
                "{}: {text}",
                syntax.name()
            );
        }
    }

    #[test]
    fn text_around_calls_is_kept_and_broken_calls_stay_text() {
        let reply =
            "Let me check.\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let (text, found) = ToolSyntax::Hermes.parse(reply);
        assert_eq!(text, "Let me check.");
        assert_eq!(
            found,
            vec![ToolCall {
                name: "now".into(),
                arguments: json!({}),
                arguments_text: Some("{}".into()),
            }]
        );
        let broken = "<tool_call>\n{\"name\": \"now\", \"arguments\": \n</tool_call>";
        assert_eq!(
            ToolSyntax::Hermes.parse(broken),
            (broken.to_owned(), vec![])
        );
        // OpenAI-style string arguments are read too.
        let stringy = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>";
        assert_eq!(
            ToolSyntax::Hermes.parse(stringy).1[0].arguments,
            json!({"a": 1})
        );
        assert_eq!(ToolSyntax::Llama3.parse("no call here").1, vec![]);
        let lfm = "<|tool_call_start|>[f(flag=True, x=None, s=\"a, (b)\")]<|tool_call_end|>done";
        let (text, found) = ToolSyntax::Lfm2.parse(lfm);
        assert_eq!(text, "done");
        assert_eq!(
            found[0].arguments,
            json!({"flag": true, "x": null, "s": "a, (b)"})
        );
    }

    #[test]
    fn what_a_template_cannot_render_is_written_in_the_syntax() {
        let call = (Some("call-1".to_owned()), calls()[0].clone());
        let turns = vec![
            Turn::text("user", "Weather?"),
            Turn {
                role: "assistant".into(),
                calls: vec![call],
                ..Turn::default()
            },
            Turn {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: Some("call-1".into()),
                ..Turn::default()
            },
        ];
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let plain = ToolTemplate::of("{{ messages }}");
        let (messages, given) = plain.messages(&turns, Some(&tools));
        assert_eq!(given, None);
        assert_eq!(messages[0]["role"], "system");
        assert!(
            messages[0]["content"]
                .as_str()
                .unwrap()
                .contains("get_weather")
        );
        assert_eq!(
            messages[2]["content"],
            ToolSyntax::Hermes.render(&calls()[..1])
        );
        assert_eq!(
            messages[3],
            json!({"role": "user", "content": "<tool_response>\nsunny\n</tool_response>", "tool_call_id": "call-1"})
        );
        let native = ToolTemplate::of("{{ tools }}{{ m.tool_calls }}<|tool_call_start|>");
        assert_eq!(native.syntax, ToolSyntax::Lfm2);
        let (messages, given) = native.messages(&turns, Some(&tools));
        assert_eq!(given, Some(&tools));
        assert_eq!(messages.len(), 3);
        assert_eq!(
            messages[1]["tool_calls"][0]["function"],
            json!({"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}})
        );
        assert_eq!(messages[2]["role"], "tool");
    }

    #[test]
    fn templates_name_their_syntax() {
        assert_eq!(
            ToolSyntax::detect("{{ '<tool_call>' }}"),
            ToolSyntax::Hermes
        );
        assert_eq!(ToolSyntax::detect("<|python_tag|>"), ToolSyntax::Llama3);
        assert_eq!(ToolSyntax::detect("<|tool_call_start|>"), ToolSyntax::Lfm2);
        assert_eq!(ToolSyntax::detect("{{ messages }}"), ToolSyntax::Hermes);
    }
}
