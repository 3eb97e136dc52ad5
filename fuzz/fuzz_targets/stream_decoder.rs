//! The streaming detokeniser with arbitrary token ids (in and out of the
//! vocabulary): it must never panic, and when the ids decode to valid text
//! (no U+FFFD), the pieces it streams must add up to that text. (Invalid
//! bytes may be replaced at different places: the stream cannot hold them
//! forever.)
//!
//! Input: little-endian u16 ids; an id of 0xFFFF takes the next four bytes
//! as a full u32 id (to reach ids far outside the vocabulary).
#![no_main]

use hayate_chat::TextTokenizer;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

fn tokenizer() -> &'static TextTokenizer {
    static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/pystd-qwen3-7m");
        TextTokenizer::load(&dir).expect("the shared pystd tokenizer")
    })
}

fn ids(data: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let id = u16::from_le_bytes([rest[0], rest[1]]);
        rest = &rest[2..];
        if id == u16::MAX && rest.len() >= 4 {
            ids.push(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            rest = &rest[4..];
        } else {
            ids.push(u32::from(id));
        }
    }
    ids
}

fuzz_target!(|data: &[u8]| {
    let tokenizer = tokenizer();
    let ids = ids(data);
    let mut stream = tokenizer.stream();
    let mut streamed = String::new();
    for &id in &ids {
        match stream.push(id) {
            Ok(Some(piece)) => streamed += &piece,
            Ok(None) => {}
            // An unknown id is an error for the caller, not a crash.
            Err(_) => return,
        }
    }
    match stream.finish() {
        Ok(Some(piece)) => streamed += &piece,
        Ok(None) => {}
        Err(_) => return,
    }
    if let Ok(whole) = tokenizer.decode(&ids)
        && !whole.contains('\u{FFFD}')
    {
        assert_eq!(streamed, whole, "ids {ids:?}");
    }
});
