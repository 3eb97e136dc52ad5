//! The tokenizer and template of a real checkpoint.

use hayate_chat::{Message, TextTokenizer};
use std::path::Path;

fn pystd() -> TextTokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/pystd-qwen3-7m");
    TextTokenizer::load(&dir).unwrap()
}

#[test]
fn round_trips_and_renders_the_chat_template() {
    let t = pystd();
    let text = "def fibonacci(n):\n    return n  # ünïcode ✓\n";
    let ids = t.encode(text, true).unwrap();
    assert_eq!(t.decode(&ids).unwrap(), text);
    let chat = t.encode_chat(&[Message::new("user", "hi")], true).unwrap();
    assert_eq!(chat[0], t.token_id("<|im_start|>").unwrap());
    assert_eq!(
        t.render_chat(&[Message::new("user", "hi")], true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn streaming_reassembles_split_characters_and_survives_invalid_bytes() {
    let t = pystd();
    let text = "x = '✓ ünï'\n";
    let ids = t.encode(text, false).unwrap();
    let mut stream = t.stream();
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = stream.push(id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "emitted a partial character: {piece:?}"
            );
            out += &piece;
        }
    }
    out += &stream.finish().unwrap().unwrap_or_default();
    assert_eq!(out, text);

    // Byte tokens: a lone continuation byte (0x80) is invalid UTF-8 on its own.
    let lone = t.encode("\u{80}", false).unwrap();
    let continuation = *lone.last().unwrap();
    let mut stream = t.stream();
    let mut out = String::new();
    for id in [continuation; 6]
        .into_iter()
        .chain(t.encode("ok", false).unwrap())
    {
        if let Some(piece) = stream.push(id).unwrap() {
            out += &piece;
        }
    }
    out += &stream.finish().unwrap().unwrap_or_default();
    assert!(out.ends_with("ok") && out.contains('\u{FFFD}'), "{out:?}");
}

/// Found by the `stream_decoder` fuzz target: special tokens (which decode
/// to nothing) between the bytes of one character counted as held tokens,
/// so the stream gave up on the character and emitted U+FFFD.
#[test]
fn tokens_that_decode_to_nothing_do_not_break_a_character() {
    let t = pystd();
    let text = "s = 'ѩ✓'";
    let ids = t.encode(text, false).unwrap();
    let end_of_text = t.token_id("<|endoftext|>").unwrap();
    // Five skipped special tokens (and ids outside the vocabulary, which
    // decode to nothing too) after every token.
    let mut fed = Vec::new();
    for &id in &ids {
        fed.push(id);
        fed.extend([end_of_text; 5]);
        fed.push(100_000);
    }
    let mut stream = t.stream();
    let mut out = String::new();
    for &id in &fed {
        out += &stream.push(id).unwrap().unwrap_or_default();
    }
    out += &stream.finish().unwrap().unwrap_or_default();
    assert_eq!(t.decode(&fed).unwrap(), text);
    assert_eq!(out, text);
}

#[test]
fn the_end_of_a_turn_comes_from_the_template_and_tokenizer_config() {
    let t = pystd();
    let im_end = t.token_id("<|im_end|>").unwrap();
    // eos_token and the template's end of turn are both <|im_end|>.
    assert_eq!(t.end_of_turn_ids(), vec![im_end]);
}

#[test]
fn a_stream_shows_the_special_tokens_it_is_asked_to_and_hides_the_others() {
    let t = pystd();
    let start = t.special_token_id("<|im_start|>").unwrap();
    let end = t.special_token_id("<|im_end|>").unwrap();
    let mut ids = vec![start];
    ids.extend(t.encode("x = 1", false).unwrap());
    ids.push(end);
    let decode = |mut stream: hayate_chat::StreamDecoder<'_>| {
        let mut out = String::new();
        for &id in &ids {
            out += &stream.push(id).unwrap().unwrap_or_default();
        }
        out + &stream.finish().unwrap().unwrap_or_default()
    };
    assert_eq!(decode(t.stream()), "x = 1");
    assert_eq!(decode(t.stream_showing(&[start])), "<|im_start|>x = 1");
    assert_eq!(
        decode(t.stream_showing(&[start, end])),
        "<|im_start|>x = 1<|im_end|>"
    );
}
