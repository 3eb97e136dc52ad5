use crate::{ChatError, Result};
use tokenizers::Tokenizer;

/// Turns a stream of token ids into text pieces as soon as they are whole.
///
/// Byte-level tokens can split a character; a piece is held back while it
/// ends in an incomplete UTF-8 sequence. Bytes that never form valid UTF-8
/// are emitted as U+FFFD rather than held forever.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Special tokens to leave out, sorted; `None`: every special token
    /// (the tokenizer's own skipping).
    hidden: Option<Vec<u32>>,
    /// The ids being decoded, without the hidden ones.
    visible: Vec<u32>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Byte length of the text of `ids[prefix_offset..read_offset]`, which
    /// only changes when the offsets advance.
    prefix_len: usize,
    /// The text of `ids[prefix_offset..]` before the last push.
    last_text: String,
    /// Tokens held back since the last piece that changed the text. Tokens
    /// that decode to nothing (skipped special tokens, ids the tokenizer
    /// does not know) do not count: they cannot be part of a character.
    held_changes: usize,
}

/// A character is at most 4 bytes, and every token that changes the text
/// adds at least 1: holding more than this many means the bytes are
/// invalid, not incomplete.
const MAX_HELD_TOKENS: usize = 4;

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer, hidden: Option<Vec<u32>>) -> Self {
        StreamDecoder {
            tokenizer,
            hidden,
            visible: Vec::new(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            prefix_len: 0,
            last_text: String::new(),
            held_changes: 0,
        }
    }

    fn decode(&mut self, ids: std::ops::Range<usize>) -> Result<String> {
        let decoded = if let Some(hidden) = &self.hidden {
            self.visible.clear();
            self.visible.extend(
                self.ids[ids]
                    .iter()
                    .filter(|id| hidden.binary_search(id).is_err()),
            );
            self.tokenizer.decode(&self.visible, false)
        } else {
            self.tokenizer.decode(&self.ids[ids], true)
        };
        decoded.map_err(|e| ChatError::Tokenizer(e.to_string()))
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let full = self.decode(self.prefix_offset..self.ids.len())?;
        if full != self.last_text {
            self.held_changes += 1;
        }
        let complete = !full.ends_with('\u{FFFD}');
        if full.len() > self.prefix_len && (complete || self.held_changes > MAX_HELD_TOKENS) {
            let piece = full.get(self.prefix_len..).unwrap_or(&full).to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.last_text = self.decode(self.prefix_offset..self.read_offset)?;
            self.prefix_len = self.last_text.len();
            self.held_changes = 0;
            return Ok(Some(piece));
        }
        self.last_text = full;
        Ok(None)
    }

    /// Whatever is still held back (incomplete bytes become U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self.decode(self.prefix_offset..self.read_offset)?;
        let full = self.decode(self.prefix_offset..self.ids.len())?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok((full.len() > prefix.len())
            .then(|| full.get(prefix.len()..).unwrap_or(&full).to_owned()))
    }
}
