//! Chat templates: hostile template sources and messages must render or
//! fail with an error, never panic, hang or grow without bound.
//!
//! Input: the template source, `\0`, then messages separated by `\0`, each
//! `role\x01content` (no `\x01`: the whole part is a user message).
#![no_main]

use hayate_chat::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let messages: Vec<Message> = parts
        .map(|m| match m.split_once('\x01') {
            Some((role, content)) => Message::new(role, content),
            None => Message::new("user", m),
        })
        .collect();
    let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") else {
        return;
    };
    for add_generation_prompt in [false, true] {
        if let Ok(out) = template.render(&messages, add_generation_prompt) {
            assert!(out.len() <= hayate_chat::MAX_TEMPLATE_OUTPUT);
        }
    }
});
