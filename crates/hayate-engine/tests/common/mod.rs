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
