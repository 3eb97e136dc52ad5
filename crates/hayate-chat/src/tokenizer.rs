use crate::{ChatError, ChatTemplate, Message, RenderOptions, Result, StreamDecoder};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// A model's tokenizer and chat template.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// `eos_token` of `tokenizer_config.json` (empty if none).
    eos_token: String,
    /// The special tokens' ids, sorted: left out of decoded text.
    special_ids: Vec<u32>,
}

/// Assistant text the template is probed with, to see what follows a turn.
const TURN_PROBE: &str = "HAYATE-END-OF-TURN-PROBE";

fn file_error(path: &Path, message: impl ToString) -> ChatError {
    ChatError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// A token given as a string or as `{"content": ...}` in tokenizer_config.json.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, and the chat template from
    /// `chat_template.jinja` or else `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(file_error(
                &path,
                "not found (this model has no tokenizer; use token ids)",
            ));
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| file_error(&path, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| file_error(&config_path, e))?,
            Err(_) => Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| file_error(&jinja_path, e))?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default", else the first.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => None,
            }
        };
        let bos = token_text(config.get("bos_token")).unwrap_or_default();
        let eos = token_text(config.get("eos_token")).unwrap_or_default();
        let template = source
            .map(|s| ChatTemplate::new(&s, &bos, &eos))
            .transpose()?;
        let mut special_ids: Vec<u32> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        special_ids.sort_unstable();
        Ok(TextTokenizer {
            tokenizer,
            template,
            eos_token: eos,
            special_ids,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's
    /// post-processor (e.g. a BOS), as `tokenizer(text)` does in Python.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ChatError::Tokenizer(e.to_string()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ChatError::Tokenizer(e.to_string()))
    }

    /// Why `other` would read token ids differently from this tokenizer
    /// (`None` when every token, special ones included, has the same id in
    /// both): a draft model must share the model's vocabulary.
    pub fn vocabulary_difference(&self, other: &TextTokenizer) -> Option<String> {
        let (mine, theirs) = (
            self.tokenizer.get_vocab(true),
            other.tokenizer.get_vocab(true),
        );
        let mut differ: Vec<(&String, u32, Option<u32>)> = mine
            .iter()
            .filter_map(|(text, &id)| {
                let there = theirs.get(text).copied();
                (there != Some(id)).then_some((text, id, there))
            })
            .collect();
        let only_theirs = theirs.keys().filter(|t| !mine.contains_key(*t)).count();
        if differ.is_empty() && only_theirs == 0 {
            return None;
        }
        differ.sort_by_key(|d| d.1);
        let example = differ.first().map_or(String::new(), |(text, id, there)| {
            let there = there.map_or("absent".to_owned(), |t| format!("id {t}"));
            format!(" (e.g. {text:?} is id {id} here, {there} there)")
        });
        Some(format!(
            "{} of {} tokens differ and {only_theirs} exist only in the other vocabulary{example}",
            differ.len(),
            mine.len()
        ))
    }

    /// The id of a special token given by its text (`<|tool_call_start|>`),
    /// if the vocabulary has it as one.
    pub fn special_token_id(&self, token: &str) -> Option<u32> {
        let id = self.tokenizer.token_to_id(token)?;
        self.tokenizer
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
            .then_some(id)
    }

    /// The id of a token given by its text (e.g. `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Ids that end an assistant's turn, as the model's own files declare
    /// them: `tokenizer_config.json`'s `eos_token`, and the special token the
    /// chat template writes right after an assistant message (`<|im_end|>`,
    /// `<|eot_id|>`, `<end_of_turn>`, ...), found by rendering one.
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .tokenizer
            .token_to_id(&self.eos_token)
            .into_iter()
            .collect();
        let probe = [
            Message::new("user", "hi"),
            Message::new("assistant", TURN_PROBE),
        ];
        // A template that refuses this conversation declares nothing here.
        let after = self
            .render_chat(&probe, false)
            .ok()
            .and_then(|text| Some(text.split_once(TURN_PROBE)?.1.to_owned()));
        if let Some(after) = after
            && let Ok(encoding) = self.tokenizer.encode(after.as_str(), false)
            && let Some(&first) = encoding.get_ids().first()
            && self
                .tokenizer
                .get_added_tokens_decoder()
                .get(&first)
                .is_some_and(|t| t.special)
            && !ids.contains(&first)
        {
            ids.push(first);
        }
        ids
    }

    /// The chat template's source, if there is one.
    pub fn template_source(&self) -> Option<&str> {
        self.template.as_ref().map(ChatTemplate::source)
    }

    /// Whether a chat template is available.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a conversation with the model's template.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template
            .as_ref()
            .ok_or(ChatError::NoTemplate)?
            .render(messages, add_generation_prompt)
    }

    /// Token ids of a conversation: rendered, then encoded without adding
    /// special tokens (the template already placed them), as `transformers` does.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }

    /// Token ids of any serializable conversation (an API's JSON messages)
    /// rendered with `options`, encoded as [`Self::encode_chat`] does.
    pub fn encode_chat_with(
        &self,
        messages: &(impl serde::Serialize + ?Sized),
        options: &RenderOptions<'_>,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat_with(messages, options)?, false)
    }

    /// The text of any serializable conversation rendered with `options`.
    pub fn render_chat_with(
        &self,
        messages: &(impl serde::Serialize + ?Sized),
        options: &RenderOptions<'_>,
    ) -> Result<String> {
        self.template
            .as_ref()
            .ok_or(ChatError::NoTemplate)?
            .render_with(messages, options)
    }

    /// The text of one token, special tokens included (`<|im_end|>`), as
    /// log-probability listings show it.
    pub fn token_text(&self, id: u32) -> Result<String> {
        self.tokenizer
            .decode(&[id], false)
            .map_err(|e| ChatError::Tokenizer(e.to_string()))
    }

    /// A streaming decoder for generated ids; special tokens are left out.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(&self.tokenizer, None)
    }

    /// A streaming decoder that writes out the special tokens among
    /// `shown` (markers a reply is parsed by, such as a tool-call opener
    /// that is one special token) and leaves out the others.
    pub fn stream_showing(&self, shown: &[u32]) -> StreamDecoder<'_> {
        let hidden: Vec<u32> = self
            .special_ids
            .iter()
            .copied()
            .filter(|id| !shown.contains(id))
            .collect();
        StreamDecoder::new(&self.tokenizer, Some(hidden))
    }
}
