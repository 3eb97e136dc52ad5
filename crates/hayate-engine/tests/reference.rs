//! The engine against `transformers` on the real trained checkpoints in `../shared`.

use hayate_engine::{LoadOptions, Logits, Model};
use std::path::{Path, PathBuf};

fn shared_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

fn reference(dir: &Path) -> (Vec<u32>, Vec<f32>, usize) {
    let bytes = std::fs::read(dir.join("reference_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let logits = st.tensor("logits").unwrap();
    let vocab = *logits.shape().last().unwrap();
    let logits = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (ids, logits, vocab)
}

/// Max |Δlogit| allowed: about ten times the largest measured (in the
/// comments at the call sites), as in the `hayate logits` tests.
fn check(name: &str, tolerance: f32) {
    let dir = shared_model(name);
    let (ids, want, vocab) = reference(&dir);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    // One prefill of everything.
    let mut state = model.new_state(None).unwrap();
    let mut all = Vec::new();
    model
        .forward(&mut state, &ids, Logits::All(&mut all))
        .unwrap();
    let max_diff = all
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff <= tolerance,
        "{name} prefill: max |Δ| = {max_diff}"
    );
    // One token at a time through the cache.
    let mut state = model.new_state(None).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let got = model.forward(&mut state, &[id], Logits::Last).unwrap();
        let row = &want[t * vocab..(t + 1) * vocab];
        let d = got
            .iter()
            .zip(row)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= tolerance, "{name} incremental at {t}: max |Δ| = {d}");
    }
    eprintln!("{name}: prefill max |Δ| = {max_diff}");
}

#[test]
fn pystd_qwen3_7m_matches_transformers() {
    check("pystd-qwen3-7m", 2e-4); // measured 1.53e-5
}

#[test]
fn stories260k_matches_transformers() {
    check("stories260K", 7e-4); // measured 6.29e-5
}
