//! Safetensors headers and shard indexes: any bytes must load or fail with
//! an error, never panic or read out of bounds; every tensor that loads
//! must be readable through each accessor.
//!
//! Input: one byte of mode, then the body. Even mode: the body is one
//! safetensors file, loaded from memory. Odd mode: the body is cut at each
//! `\0SHARD\0` into `model.safetensors.index.json` and the shards
//! `model-00001-of-0000N.safetensors`, ..., written to a directory and
//! opened as a sharded checkpoint.
#![no_main]

use hayate_formats::{Tensor, TensorStore};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

const SEPARATOR: &[u8] = b"\0SHARD\0";

fn split(body: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        parts.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// Reads a tensor every way the loaders do.
fn exercise(t: &Tensor) {
    let bytes = t.bytes();
    assert_eq!(bytes.len(), t.n_bytes());
    let Ok(weights) = t.weights() else { return };
    assert_eq!(weights.len(), t.n_elements());
    match t.shape[..] {
        [rows, cols] => {
            let m = t
                .matrix(rows, cols)
                .expect("a 2-D float tensor is a matrix");
            if rows > 0 {
                let mut row = vec![0f32; cols];
                m.widen_row(rows - 1, &mut row);
            }
        }
        [n] => {
            t.vector_f32(n).expect("a 1-D float tensor is a vector");
        }
        _ => {}
    }
    if t.n_elements() <= 1 << 16 {
        t.array_f32(&t.shape.clone()).expect("its own shape");
    }
}

fn exercise_store(store: &TensorStore) {
    let names: Vec<String> = store.names().map(str::to_owned).collect();
    for name in names {
        exercise(store.require(&name).expect("listed"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(store) = TensorStore::from_bytes(Path::new("fuzz.safetensors"), body) {
            exercise_store(&store);
        }
        return;
    }
    let parts = split(body);
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory");
    std::fs::write(dir.path().join("model.safetensors.index.json"), parts[0]).unwrap();
    let n = parts.len() - 1;
    for (i, shard) in parts[1..].iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        std::fs::write(dir.path().join(name), shard).unwrap();
    }
    if let Ok(store) = TensorStore::open_dir(dir.path()) {
        exercise_store(&store);
    }
});
