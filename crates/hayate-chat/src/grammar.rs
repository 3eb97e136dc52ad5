//! Constrained decoding with `llguidance`: JSON schemas and Lark grammars
//! compiled against the model's own vocabulary (its `toktrie` built from
//! `tokenizer.json`), applied as a mask before each draw
//! ([`hayate_engine::TokenConstraint`]), through the same sampler.

use crate::{ChatError, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// The vocabulary as llguidance sees it, tokenizing with the model's tokenizer.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Text forced by a grammar is tokenized as the model would see it;
        // bytes that are not UTF-8 fall back to the trie's greedy split.
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(e) => e.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints for one model's vocabulary.
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    vocab: usize,
    ends: Arc<[u32]>,
}

impl GrammarCompiler {
    /// A compiler for the tokenizer in `tokenizer_json` (the file's text)
    /// over `vocab` model tokens; `end_ids` end a constrained reply (the
    /// grammar allows them once it is complete).
    pub fn new(tokenizer_json: &str, vocab: usize, end_ids: &[u32]) -> Result<Self> {
        let bad = |m: String| ChatError::Tokenizer(format!("constrained decoding: {m}"));
        let json: Value = serde_json::from_str(tokenizer_json).map_err(|e| bad(e.to_string()))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
        if words.len() > vocab {
            return Err(bad(format!(
                "the tokenizer has {} tokens but the model only {vocab}",
                words.len()
            )));
        }
        words.resize(vocab, Vec::new());
        let n = u32::try_from(vocab).map_err(|_| bad("vocabulary too large".into()))?;
        let (&first, _) = end_ids
            .split_first()
            .ok_or_else(|| bad("the model declares no end-of-reply token".into()))?;
        if end_ids.iter().any(|&id| id >= n) {
            return Err(bad(format!(
                "an end-of-reply id in {end_ids:?} is outside the vocabulary"
            )));
        }
        let trie = TokTrie::from(&TokRxInfo::new(n, first), &words).with_eos_tokens(end_ids);
        let tokenizer =
            Tokenizer::from_bytes(tokenizer_json.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        Ok(GrammarCompiler {
            factory: Arc::new(factory),
            vocab,
            ends: end_ids.into(),
        })
    }

    /// A constraint to documents valid under the JSON `schema`. A schema
    /// llguidance cannot compile is an error saying why.
    ///
    /// Documents come out in one line with `", "` and `": "` separators
    /// (unless the schema's own `x-guidance` options say otherwise): with
    /// free whitespace a small model can pad a document with spaces until
    /// it runs out of tokens.
    pub fn json_schema(&self, schema: &Value) -> std::result::Result<Constraint, String> {
        let mut schema = schema.clone();
        if let Some(object) = schema.as_object_mut()
            && !object.contains_key("x-guidance")
        {
            object.insert(
                "x-guidance".into(),
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                }),
            );
        }
        self.compile(TopLevelGrammar::from_json_schema(schema))
    }

    /// A constraint to a grammar in llguidance's Lark syntax.
    pub fn lark(&self, grammar: &str) -> std::result::Result<Constraint, String> {
        self.compile(TopLevelGrammar::from_lark(grammar.to_owned()))
    }

    fn compile(&self, grammar: TopLevelGrammar) -> std::result::Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
            ends: self.ends.clone(),
        })
    }
}

/// One reply's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    ends: Arc<[u32]>,
}

impl Constraint {
    /// Whether the output so far is a complete document.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

impl hayate_engine::TokenConstraint for Constraint {
    fn mask(&mut self, logits: &mut [f32]) -> std::result::Result<(), String> {
        // Once the grammar is complete only the end-of-reply tokens are left.
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        // 32 tokens per word of the mask; most words are all clear or all set.
        let words = allowed.as_slice();
        let n = logits.len().min(self.vocab);
        for (i, chunk) in logits[..n].chunks_mut(32).enumerate() {
            match words.get(i).copied().unwrap_or(0) {
                u32::MAX if chunk.len() == 32 => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                word => {
                    for (bit, l) in chunk.iter_mut().enumerate() {
                        if word & (1 << bit) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        logits[n..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    fn commit(&mut self, token: u32) -> std::result::Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn rollback(&mut self, tokens: usize) -> std::result::Result<(), String> {
        self.matcher.rollback(tokens).map_err(|e| e.to_string())
    }

    fn is_end(&self, token: u32) -> bool {
        self.ends.contains(&token)
    }

    fn valid_prefix(&mut self, tokens: &[u32]) -> std::result::Result<usize, String> {
        self.matcher
            .validate_tokens(tokens)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hayate_engine::TokenConstraint;

    fn pystd() -> (String, Tokenizer) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/models/pystd-qwen3-7m/tokenizer.json");
        let json = std::fs::read_to_string(&path).unwrap();
        let tokenizer = Tokenizer::from_bytes(json.as_bytes()).unwrap();
        (json, tokenizer)
    }

    /// Draws greedily from pseudo-random logits under `c` until an end id.
    fn draw(c: &mut Constraint, vocab: usize, end: u32, seed: u64) -> Vec<u32> {
        let mut out = Vec::new();
        let mut x = seed;
        for _ in 0..200 {
            let mut logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect();
            c.mask(&mut logits).unwrap();
            let best = (0..vocab)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            if best == end {
                return out;
            }
            c.commit(best).unwrap();
            out.push(best);
        }
        panic!("no end after 200 tokens: {out:?}");
    }

    #[test]
    fn a_schema_constrains_random_logits_to_valid_documents() {
        let (json, tokenizer) = pystd();
        let vocab = tokenizer.get_vocab_size(true);
        let end = tokenizer.token_to_id("<|im_end|>").unwrap();
        let compiler = GrammarCompiler::new(&json, vocab, &[end]).unwrap();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "kind": {"enum": ["a", "b"]},
                "n": {"type": "integer", "minimum": 3, "maximum": 7},
            },
            "required": ["kind", "n"],
            "additionalProperties": false,
        });
        for seed in 0..8 {
            let mut c = compiler.json_schema(&schema).unwrap();
            let ids = draw(&mut c, vocab, end, seed);
            assert!(c.is_complete());
            let text = tokenizer.decode(&ids, false).unwrap();
            let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(matches!(doc["kind"].as_str(), Some("a" | "b")), "{text}");
            assert!((3..=7).contains(&doc["n"].as_i64().unwrap()), "{text}");
            assert!(
                text.starts_with("{\"kind\": "),
                "one line, `: ` separators: {text}"
            );
        }
        let mut c = compiler.lark(r#"start: "x" | "yz""#).unwrap();
        let ids = draw(&mut c, vocab, end, 1);
        let text = tokenizer.decode(&ids, false).unwrap();
        assert!(text == "x" || text == "yz", "{text}");
    }

    #[test]
    fn tool_call_grammars_force_calls_that_parse_in_every_syntax() {
        use crate::tools::{Tool, ToolSyntax};
        let (json, tokenizer) = pystd();
        let vocab = tokenizer.get_vocab_size(true);
        let end = tokenizer.token_to_id("<|im_end|>").unwrap();
        let compiler = GrammarCompiler::new(&json, vocab, &[end]).unwrap();
        let tools = [
            Tool {
                name: "get_weather".into(),
                parameters: serde_json::json!({
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 12},
                        "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    },
                    "required": ["city", "days"],
                    "additionalProperties": false,
                }),
            },
            Tool {
                name: "now".into(),
                // Closed, so that random draws end.
                parameters: serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false}),
            },
        ];
        let no_special = |_: &str| None;
        for syntax in [ToolSyntax::Hermes, ToolSyntax::Llama3, ToolSyntax::Lfm2] {
            for parallel in [false, true] {
                let grammar = syntax.grammar(&tools, parallel, &no_special);
                for seed in 0..4 {
                    let mut c = compiler
                        .lark(&grammar)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{grammar}", syntax.name()));
                    let ids = draw(&mut c, vocab, end, seed);
                    let text = tokenizer.decode(&ids, false).unwrap();
                    let (rest, calls) = syntax.parse(&text);
                    assert!(rest.is_empty(), "{}: {text}", syntax.name());
                    assert!(
                        !calls.is_empty() && (parallel || calls.len() == 1),
                        "{text}"
                    );
                    for call in &calls {
                        match call.name.as_str() {
                            "get_weather" => {
                                let days = call.arguments["days"].as_i64().unwrap();
                                assert!((1..=7).contains(&days), "{text}");
                                assert!(call.arguments["city"].is_string(), "{text}");
                            }
                            "now" => {}
                            other => panic!("unknown tool {other} in {text}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn auto_grammars_leave_text_free_and_hold_a_started_call_to_the_schema() {
        use crate::tools::{Tool, ToolSyntax};
        let (json, tokenizer) = pystd();
        let vocab = tokenizer.get_vocab_size(true);
        let end = tokenizer.token_to_id("<|im_end|>").unwrap();
        let compiler = GrammarCompiler::new(&json, vocab, &[end]).unwrap();
        let tools = [Tool {
            name: "add".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a"],
                "additionalProperties": false,
            }),
        }];
        let encode = |text: &str| tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        let allows = |c: &mut Constraint, id: u32| {
            let mut logits = vec![0.0; vocab];
            c.mask(&mut logits).unwrap();
            logits[id as usize].is_finite()
        };
        // In the pystd vocabulary the openers are text; `<|im_start|>`
        // stands in for an opener that is one special token.
        let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
        let as_special =
            |m: &str| (m == "<tool_call>" || m == "<|tool_call_start|>").then_some(im_start);
        let no_special = |_: &str| None;
        assert_eq!(
            ToolSyntax::Llama3.auto_grammar(&tools, true, &no_special),
            None
        );
        for syntax in [ToolSyntax::Hermes, ToolSyntax::Lfm2] {
            let opener = if syntax == ToolSyntax::Hermes {
                "<tool_call>"
            } else {
                "<|tool_call_start|>"
            };
            for special in [false, true] {
                let marker: &dyn Fn(&str) -> Option<u32> =
                    if special { &as_special } else { &no_special };
                let grammar = syntax.auto_grammar(&tools, false, marker).unwrap();
                let compile = || {
                    compiler
                        .lark(&grammar)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{grammar}", syntax.name()))
                };
                // Free text, with a `<` that opens no call, may end the reply.
                let mut c = compile();
                for id in encode("x = a < b\nprint(x)") {
                    assert!(allows(&mut c, id), "{grammar}");
                    c.commit(id).unwrap();
                }
                assert!(allows(&mut c, end));
                // Once the opener is written the call must follow, valid.
                for seed in 0..4 {
                    let mut c = compile();
                    let mut ids = encode("Let me add. ");
                    if special {
                        ids.push(im_start);
                    } else {
                        ids.extend(encode(opener));
                    }
                    for &id in &ids {
                        c.commit(id).unwrap();
                    }
                    assert!(!allows(&mut c, end), "a started call cannot end the reply");
                    ids.extend(draw(&mut c, vocab, end, seed));
                    let text = tokenizer
                        .decode(&ids, false)
                        .unwrap()
                        .replace("<|im_start|>", opener);
                    let (rest, calls) = syntax.parse(&text);
                    assert_eq!(rest, "Let me add.", "{text}");
                    assert_eq!(calls.len(), 1, "{text}");
                    let a = calls[0].arguments["a"].as_i64().unwrap();
                    assert!((0..=9).contains(&a), "{text}");
                }
            }
        }
    }

    #[test]
    fn schemas_and_grammars_that_cannot_compile_say_why() {
        let (json, tokenizer) = pystd();
        let vocab = tokenizer.get_vocab_size(true);
        let compiler = GrammarCompiler::new(&json, vocab, &[0]).unwrap();
        let err = compiler
            .json_schema(&serde_json::json!({"$ref": "#/nowhere"}))
            .err()
            .unwrap();
        assert!(err.contains("nowhere"), "{err}");
        assert!(compiler.lark("start: ((").is_err());
        let too_small = GrammarCompiler::new(&json, 10, &[0]).err().unwrap();
        assert!(too_small.to_string().contains("only 10"), "{too_small}");
        assert!(GrammarCompiler::new("{", vocab, &[0]).is_err());
        assert!(GrammarCompiler::new(&json, vocab, &[]).is_err());
    }
}
