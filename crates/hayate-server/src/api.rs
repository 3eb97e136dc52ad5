//! The requests of OpenAI's API as this server reads them, and checks that
//! name the field at fault. Unknown fields are ignored; `null` is the same
//! as absent.

use crate::error::ApiError;
use hayate_chat::grammar::{Constraint, GrammarCompiler};
use hayate_chat::tools::{Tool, ToolCall, ToolSyntax, Turn};
use hayate_engine::SamplingParams;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Most stop strings a request may give.
pub const MAX_STOPS: usize = 16;
/// Most alternatives `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Echoed back; one model is served whatever it says.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate (old name).
    pub max_tokens: Option<u64>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<u64>,
    /// Return log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per position with `logprobs` (0 to 20).
    pub top_logprobs: Option<u64>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// `{"type": "text"}` only, so far.
    pub response_format: Option<Value>,
    /// Tools the model may call.
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`.
    pub tool_choice: Option<Value>,
    /// Whether a reply may make several calls (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Extra variables for the chat template (e.g. `enable_thinking`).
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// An extension: a grammar in llguidance's Lark syntax the reply follows.
    pub grammar: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Echoed back.
    pub model: Option<String>,
    /// A string, a one-string list, or token ids.
    pub prompt: Prompt,
    /// Most tokens to generate (OpenAI's default for completions is 16).
    pub max_tokens: Option<u64>,
    /// Alternatives per position to report (0 to 20), the chosen token's too.
    pub logprobs: Option<u64>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    /// `text`, `json_object` or `json_schema`, as for chat.
    pub response_format: Option<Value>,
    /// An extension: a grammar in llguidance's Lark syntax the reply follows.
    pub grammar: Option<String>,
}

/// The sampling and streaming fields both endpoints take, read from the
/// same body as the request (not flattened into it, so that an error
/// names its field).
#[derive(Debug, Deserialize)]
pub struct SamplingFields {
    /// 0 to 2; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus threshold, (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 or -1: off).
    pub top_k: Option<i64>,
    /// Drop tokens below min_p times the most likely one's probability.
    pub min_p: Option<f32>,
    /// Seed of the sampling noise: the same seed gives the same reply.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// -2 to 2.
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// `transformers`' repetition penalty (> 0; 1 off).
    pub repetition_penalty: Option<f32>,
    /// Number of choices: only 1.
    pub n: Option<u64>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// A completion prompt.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A list of texts (one is served per request).
    Texts(Vec<String>),
    /// A list of token-id prompts.
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    /// End the stream with a chunk holding `usage`.
    pub include_usage: Option<bool>,
}

/// One message of a conversation.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// system, developer, user, assistant or tool.
    pub role: String,
    /// A string or a list of text parts (absent for assistant tool calls).
    pub content: Option<Content>,
    /// A participant's name.
    pub name: Option<String>,
    /// An assistant's tool calls.
    pub tool_calls: Option<Vec<Value>>,
    /// The call a tool message answers.
    pub tool_call_id: Option<String>,
    /// Reasoning an assistant turn carried.
    pub reasoning_content: Option<String>,
}

/// Message content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; text ones are joined.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

/// Reads a JSON body into `T`; a malformed body or a field of the wrong
/// type is a 400 naming the field.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid("body", format!("the body is not valid JSON: {inner}"));
        }
        if path == "." {
            ApiError::invalid("body", format!("the request is malformed: {inner}"))
        } else {
            ApiError::invalid(&path, format!("`{path}`: {inner}"))
        }
    })
}

/// What a request asks of the sampler, checked.
pub struct Sampling {
    /// The parameters, the server's defaults filled in.
    pub params: SamplingParams,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Whether to stream.
    pub stream: bool,
}

impl SamplingFields {
    /// The request's sampling over the server's `defaults`; a fresh seed
    /// (`fresh_seed`) when the request gives none.
    pub fn resolve(
        &self,
        defaults: &SamplingParams,
        fresh_seed: u64,
    ) -> Result<Sampling, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("only n = 1 is supported, not {n}"),
            ));
        }
        let mut p = defaults.clone();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    "temperature",
                    format!("temperature must be in [0, 2], not {t}"),
                ));
            }
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("top_p must be in (0, 1], not {v}"),
                ));
            }
            p.top_p = v;
        }
        if let Some(k) = self.top_k {
            if k < -1 {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1, 0 (off) or positive, not {k}"),
                ));
            }
            p.top_k = usize::try_from(k).unwrap_or(0);
        }
        if let Some(v) = self.min_p {
            if !(0.0..=1.0).contains(&v) {
                return Err(ApiError::invalid(
                    "min_p",
                    format!("min_p must be in [0, 1], not {v}"),
                ));
            }
            p.min_p = v;
        }
        for (name, value, slot) in [
            (
                "presence_penalty",
                self.presence_penalty,
                &mut p.presence_penalty,
            ),
            (
                "frequency_penalty",
                self.frequency_penalty,
                &mut p.frequency_penalty,
            ),
        ] {
            if let Some(v) = value {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        name,
                        format!("{name} must be in [-2, 2], not {v}"),
                    ));
                }
                *slot = v;
            }
        }
        if let Some(v) = self.repetition_penalty {
            if !(v > 0.0 && v.is_finite()) {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    format!("repetition_penalty must be > 0, not {v}"),
                ));
            }
            p.repetition_penalty = v;
        }
        p.seed = self.seed.map_or(fresh_seed, |s| s as u64);
        p.validate().map_err(|e| ApiError::invalid("body", e))?;
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOPS} stop strings, not {}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "a stop string cannot be empty"));
        }
        Ok(Sampling {
            params: p,
            stops,
            stream: self.stream.unwrap_or(false),
        })
    }
}

/// The number of log-probability alternatives `top` asks for, checked.
pub fn top_logprobs(param: &str, top: Option<u64>) -> Result<usize, ApiError> {
    let top = top.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS as u64 {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be in [0, {MAX_TOP_LOGPROBS}], not {top}"),
        ));
    }
    Ok(top as usize)
}

impl ChatRequest {
    /// The tools and what `tool_choice` asks of them, checked; `None`
    /// when no tools are offered.
    pub fn tool_request(&self) -> Result<Option<ToolRequest>, ApiError> {
        let offered = self.tools.as_deref().unwrap_or(&[]);
        let mut tools = Vec::with_capacity(offered.len());
        for (i, t) in offered.iter().enumerate() {
            let at = |f: &str| format!("tools[{i}]{f}");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    &at(".type"),
                    "only tools of type `function` are supported",
                ));
            }
            let function = t
                .get("function")
                .ok_or_else(|| ApiError::invalid(&at(".function"), "a tool needs a `function`"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid(&at(".function.name"), "a function needs a non-empty `name`")
                })?;
            let parameters = match function.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        &at(".function.parameters"),
                        "`parameters` must be a JSON schema object",
                    ));
                }
            };
            if tools.iter().any(|t: &Tool| t.name == name) {
                return Err(ApiError::invalid(
                    &at(".function.name"),
                    format!("two tools are named `{name}`"),
                ));
            }
            tools.push(Tool {
                name: name.to_owned(),
                parameters,
            });
        }
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice `{other}` is not none, auto or required"),
                    ));
                }
            },
            Some(v) => {
                let name = v.pointer("/function/name").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
                })?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice names `{name}`, which is not among the tools"),
                    ));
                }
                ToolChoice::Named(name.to_owned())
            }
        };
        if tools.is_empty() {
            return match choice {
                ToolChoice::Required | ToolChoice::Named(_) => Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice asks for a call but no tools are given",
                )),
                _ => Ok(None),
            };
        }
        Ok(Some(ToolRequest {
            tools,
            listing: Value::Array(offered.to_vec()),
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        }))
    }

    /// The messages as turns of a conversation: content as one string,
    /// `developer` as `system`, tool-call arguments as objects.
    pub fn turns(&self) -> Result<Vec<Turn>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages cannot be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let at = |field: &str| format!("messages[{i}].{field}");
                let role = match m.role.as_str() {
                    "developer" | "system" => "system",
                    r @ ("user" | "assistant" | "tool") => r,
                    other => {
                        return Err(ApiError::invalid(&at("role"), format!("unknown role `{other}` (system, developer, user, assistant or tool)")));
                    }
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text += t,
                                ("text", None) => {
                                    return Err(ApiError::invalid(&format!("messages[{i}].content[{j}].text"), "a text part needs `text`"));
                                }
                                (other, _) => {
                                    return Err(ApiError::invalid(&format!("messages[{i}].content[{j}].type"), format!("content parts of type `{other}` are not supported (text only)")));
                                }
                            }
                        }
                        text
                    }
                };
                if m.content.is_none() && m.tool_calls.is_none() {
                    return Err(ApiError::invalid(&at("content"), "a message needs content"));
                }
                let mut calls = Vec::new();
                for (j, call) in m.tool_calls.iter().flatten().enumerate() {
                    let bad = || ApiError::invalid(&format!("messages[{i}].tool_calls[{j}]"), "a tool call needs `function.name` and `function.arguments` (a JSON string)");
                    let name = call.pointer("/function/name").and_then(Value::as_str).ok_or_else(bad)?;
                    let arguments = match call.pointer("/function/arguments") {
                        Some(Value::String(a)) => serde_json::from_str(a).map_err(|_| bad())?,
                        Some(a @ Value::Object(_)) => a.clone(),
                        None => json!({}),
                        Some(_) => return Err(bad()),
                    };
                    let id = call.get("id").and_then(Value::as_str).map(str::to_owned);
                    calls.push((id, ToolCall { name: name.to_owned(), arguments, arguments_text: None }));
                }
                Ok(Turn {
                    role: role.to_owned(),
                    content,
                    calls,
                    name: m.name.clone(),
                    tool_call_id: m.tool_call_id.clone(),
                    reasoning: m.reasoning_content.clone(),
                })
            })
            .collect()
    }
}

/// What `tool_choice` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are not shown to the model.
    None,
    /// The model decides; calls in its reply are recognised.
    Auto,
    /// At least one call, forced by a grammar.
    Required,
    /// A call to this function, forced by a grammar.
    Named(String),
}

/// The tools of a chat request, checked.
#[derive(Clone, Debug)]
pub struct ToolRequest {
    /// The functions and their argument schemas.
    pub tools: Vec<Tool>,
    /// The `tools` array as given, for templates.
    pub listing: Value,
    /// What `tool_choice` asks for.
    pub choice: ToolChoice,
    /// Whether several calls may be made at once.
    pub parallel: bool,
}

impl ToolRequest {
    /// The grammar that forces the calls `choice` asks for in `syntax`
    /// (`None` unless a call is required); `special` gives the id of a
    /// marker that is one special token.
    pub fn grammar(
        &self,
        syntax: ToolSyntax,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<String> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => None,
            ToolChoice::Required => Some(syntax.grammar(&self.tools, self.parallel, special)),
            ToolChoice::Named(name) => {
                let one: Vec<Tool> = self
                    .tools
                    .iter()
                    .filter(|t| &t.name == name)
                    .cloned()
                    .collect();
                Some(syntax.grammar(&one, false, special))
            }
        }
    }

    /// Under `tool_choice: auto`, the grammar that leaves the reply free
    /// until the model opens a call and then holds the call to the tools'
    /// schemas (`None` otherwise, and for syntaxes without an opener).
    pub fn auto_grammar(
        &self,
        syntax: ToolSyntax,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<String> {
        match self.choice {
            ToolChoice::Auto => syntax.auto_grammar(&self.tools, self.parallel, special),
            _ => None,
        }
    }
}

/// The constraint a request's `response_format` and `grammar` ask for:
/// none for `text`; a JSON schema (`json_schema`, or any object for
/// `json_object`); a Lark grammar. What cannot be compiled is a 400 naming
/// the field and llguidance's reason.
pub fn constraint(
    compiler: Option<&GrammarCompiler>,
    response_format: Option<&Value>,
    grammar: Option<&str>,
) -> Result<Option<Constraint>, ApiError> {
    let schema = match response_format {
        None | Some(Value::Null) => None,
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(json!({"type": "object"})),
            Some("json_schema") => {
                let spec = format.get("json_schema").ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema",
                        "json_schema needs a `json_schema` object",
                    )
                })?;
                let schema = spec.get("schema").cloned().unwrap_or_else(|| json!({}));
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "the schema must be a JSON object",
                    ));
                }
                Some(schema)
            }
            other => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!(
                        "response_format type {} is not one of text, json_object, json_schema",
                        other.map_or("(missing)".to_owned(), |o| format!("`{o}`"))
                    ),
                ));
            }
        },
    };
    if schema.is_some() && grammar.is_some() {
        return Err(ApiError::invalid(
            "grammar",
            "give response_format or grammar, not both",
        ));
    }
    if schema.is_none() && grammar.is_none() {
        return Ok(None);
    }
    let compiler = compiler.ok_or_else(|| {
        ApiError::invalid(
            "response_format",
            "constrained decoding is unavailable for this model's tokenizer",
        )
    })?;
    match (schema, grammar) {
        (Some(schema), _) => compiler.json_schema(&schema).map(Some).map_err(|e| {
            ApiError::invalid(
                "response_format.json_schema.schema",
                format!("the schema cannot be compiled: {e}"),
            )
        }),
        (None, Some(lark)) => compiler.lark(lark).map(Some).map_err(|e| {
            ApiError::invalid("grammar", format!("the grammar cannot be compiled: {e}"))
        }),
        (None, None) => Ok(None),
    }
}
