//! Sequences saved to disk and read back: what `hayate serve --cache-dir`
//! keeps across restarts, so that the first request after one still finds
//! its conversation or system prompt prefilled.
//!
//! A file holds one sequence: its tokens and every layer's state after
//! them (attention keys and values of those positions, recurrent and
//! convolution states, sliding-window rings), after a header naming the
//! model and state shape it belongs to, and a CRC-32 of everything before
//! it at the end. A file that is truncated, corrupt or made for another
//! model or shape is refused with the reason, never half-read into a state.

use crate::layers::Block;
use crate::layers::bytes::{put, take};
use crate::state::InferenceState;

/// The first bytes of a saved sequence (the last is the format's version).
const MAGIC: &[u8; 8] = b"HAYATSQ\x01";

/// `state`'s tokens (`tokens`, the ones it holds) and its layers' states,
/// for the model and shape `fingerprint` names.
pub(crate) fn encode(
    fingerprint: u64,
    blocks: &[Block],
    state: &InferenceState,
    tokens: &[u32],
) -> Vec<u8> {
    let len = state.len();
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    put(&[fingerprint, len as u64], &mut out);
    put(&tokens[..len], &mut out);
    for (block, layer) in blocks.iter().zip(&state.layers) {
        block.mixer.save(layer, len, &mut out);
    }
    let crc = crc32fast::hash(&out);
    put(&[crc], &mut out);
    out
}

/// Reads a sequence [`encode`] wrote into `state` (made by the same model
/// with the same options, which `fingerprint` names) and returns its
/// tokens. On any error the state is left empty.
pub(crate) fn decode(
    bytes: &[u8],
    fingerprint: u64,
    blocks: &[Block],
    state: &mut InferenceState,
) -> Result<Vec<u32>, String> {
    state.clear();
    let result = read(bytes, fingerprint, blocks, state);
    if result.is_err() {
        state.clear();
    }
    result
}

fn read(
    bytes: &[u8],
    fingerprint: u64,
    blocks: &[Block],
    state: &mut InferenceState,
) -> Result<Vec<u32>, String> {
    let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
        return Err("the file is too short".into());
    };
    if body.len() < MAGIC.len() || &body[..MAGIC.len()] != MAGIC {
        return Err("not a saved sequence of this version".into());
    }
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err("its checksum does not match: the file is corrupt".into());
    }
    let mut input = &body[MAGIC.len()..];
    let mut header = [0u64; 2];
    take(&mut header, &mut input).ok_or("the header is cut short")?;
    let [found, len] = header;
    if found != fingerprint {
        return Err("it was saved for another model or other state options".into());
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l > 0 && l < state.capacity())
        .ok_or_else(|| {
            format!(
                "its {len} tokens do not fit a context of {}",
                state.capacity()
            )
        })?;
    let mut tokens = vec![0u32; len];
    take(&mut tokens, &mut input).ok_or("its tokens are cut short")?;
    for (block, layer) in blocks.iter().zip(&mut state.layers) {
        block
            .mixer
            .load(layer, len, &mut input)
            .ok_or("its layer states are cut short")?;
    }
    if !input.is_empty() {
        return Err(format!("{} bytes follow the layer states", input.len()));
    }
    state.len = len;
    Ok(tokens)
}

/// FNV-1a over `bytes`, continuing from `hash`: stable across builds and
/// machines, which a file's name for its model must be.
pub(crate) fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The start of an FNV-1a hash.
pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Bytes read from each end of a weight file for its fingerprint.
const SAMPLED: u64 = 1 << 16;

/// A fingerprint of the model in `dir` as loaded with `options` (any text
/// that changes what the weights compute, e.g. the quantization asked
/// for): its `config.json`, and each `*.safetensors` file's name, size and
/// first and last 64 KiB. A checkpoint rewritten in place with the same
/// sizes and different weights only in between is not noticed.
pub fn fingerprint(dir: &std::path::Path, options: &str) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut hash = fnv(FNV_START, options.as_bytes());
    hash = fnv(hash, &std::fs::read(dir.join("config.json"))?);
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut buffer = vec![0u8; SAMPLED as usize];
    for path in files {
        let mut file = std::fs::File::open(&path)?;
        let size = file.metadata()?.len();
        let name = path.file_name().map(|n| n.as_encoded_bytes().to_vec());
        hash = fnv(hash, &name.unwrap_or_default());
        hash = fnv(hash, &size.to_le_bytes());
        for start in [0, size.saturating_sub(SAMPLED)] {
            file.seek(SeekFrom::Start(start))?;
            let n = (size - start).min(SAMPLED) as usize;
            file.read_exact(&mut buffer[..n])?;
            hash = fnv(hash, &buffer[..n]);
        }
    }
    Ok(hash)
}
