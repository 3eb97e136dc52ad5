//! Helpers shared by the engine's tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's committed fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The fixture `name`'s directory.
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Every fixture's name, as `MANIFEST.json` lists them.
pub fn fixture_names() -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A checkpoint of `../shared/models`.
pub fn shared_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

/// The token ids `reference_logits.safetensors` in `dir` holds.
pub fn reference_ids(dir: &Path) -> Vec<u32> {
    let bytes = std::fs::read(dir.join("reference_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect()
}
