//! The end of an assistant turn is read from the model's own files, for
//! families whose end-of-turn token differs from `eos_token`.

use hayate_chat::TextTokenizer;
use serde_json::json;

/// A word-level tokenizer with special tokens `<|end|>` (2) and `<|eot|>`
/// (3), the given `eos_token` and chat template.
fn tokenizer(eos: &str, template: &str) -> (tempfile::TempDir, TextTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(2, "<|end|>"), special(3, "<|eot|>")],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "unk",
                  "vocab": {"unk": 0, "hi": 1, "<|end|>": 2, "<|eot|>": 3, "user": 4, "assistant": 5}}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = json!({"eos_token": eos, "chat_template": template});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = TextTokenizer::load(dir.path()).unwrap();
    (dir, t)
}

#[test]
fn the_template_declares_an_end_of_turn_beside_eos() {
    // Llama 3 style: eos is the end of text, each turn ends with another token.
    let template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}<|eot|>{% endfor %}";
    let (_dir, t) = tokenizer("<|end|>", template);
    assert_eq!(t.end_of_turn_ids(), vec![2, 3]);
}

#[test]
fn a_template_with_plain_text_after_a_turn_declares_nothing() {
    let template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} hi {% endfor %}";
    let (_dir, t) = tokenizer("<|end|>", template);
    assert_eq!(t.end_of_turn_ids(), vec![2]);
    // A template that refuses the probe conversation declares nothing either.
    let strict = "{{ raise_exception('no') }}";
    let (_dir, t) = tokenizer("", strict);
    assert!(t.end_of_turn_ids().is_empty());
}
