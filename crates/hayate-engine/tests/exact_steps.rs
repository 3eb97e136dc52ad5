//! `forward_exact`, which speculative verification runs: a step over n
//! tokens gives, bit for bit, the logits and the state that n one-token
//! steps give, for every architecture fixture, float and quantized, and on
//! the trained checkpoint in `../shared`. (The fast path that
//! prefill takes differs in the last bits from n = 5 on here: that is what
//! makes the exact path necessary.)

use hayate_engine::{InferenceState, LoadOptions, Logits, Model, QuantSpec, StateOptions};
use hayate_kernels::QuantFormat;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture_dirs() -> Vec<PathBuf> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap()).unwrap();
    manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|f| fixtures().join(f["name"].as_str().unwrap()))
        .collect()
}

fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104729 + 13) % vocab) as u32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Sliding-window rings small enough to wrap within the prefix; room to
/// roll back a whole step.
fn state(model: &Model) -> InferenceState {
    model
        .new_state_with(&StateOptions {
            context: Some(160),
            prefill_chunk: 32,
            rollback: 20,
            ..StateOptions::default()
        })
        .unwrap()
}

/// Returns how many step lengths the fast path got wrong (for the report).
fn check(dir: &Path, options: &LoadOptions, label: &str) -> usize {
    let model = Model::load(dir, options).unwrap();
    let vocab = model.info.vocab;
    // Longer than the fixtures' sliding windows and one DeltaNet chunk.
    let prefix = tokens(70, vocab, 1);
    let step = tokens(20, vocab, 2);
    let after = tokens(3, vocab, 3);
    let mut one = state(&model);
    model.forward(&mut one, &prefix, Logits::None).unwrap();
    let mut want = Vec::new();
    for &t in &step {
        want.extend(model.forward(&mut one, &[t], Logits::Last).unwrap());
    }
    let mut want_after = Vec::new();
    for &t in &after {
        want_after.extend(model.forward(&mut one, &[t], Logits::Last).unwrap());
    }
    let mut fast_differs = 0;
    for n in 1..=step.len() {
        let mut s = state(&model);
        model.forward(&mut s, &prefix, Logits::None).unwrap();
        let mut got = Vec::new();
        model
            .forward_exact(&mut s, &step[..n], Logits::All(&mut got))
            .unwrap();
        assert!(
            bits(&got) == bits(&want[..n * vocab]),
            "{label} {dir:?}: a {n}-token exact step differs from {n} one-token steps"
        );
        // What the state kept equals too: the next tokens' logits match.
        if n == step.len() {
            let mut next = Vec::new();
            for &t in &after {
                next.extend(model.forward(&mut s, &[t], Logits::Last).unwrap());
            }
            assert!(
                bits(&next) == bits(&want_after),
                "{label} {dir:?}: state after the exact step"
            );
        }
        let mut s = state(&model);
        model.forward(&mut s, &prefix, Logits::None).unwrap();
        let mut fast = Vec::new();
        model
            .forward(&mut s, &step[..n], Logits::All(&mut fast))
            .unwrap();
        fast_differs += usize::from(bits(&fast) != bits(&want[..n * vocab]));
    }
    fast_differs
}

fn quantized(format: QuantFormat) -> LoadOptions {
    LoadOptions {
        quantize: Some(QuantSpec::new(format)),
        ..LoadOptions::default()
    }
}

#[test]
fn exact_steps_equal_one_token_steps_on_every_fixture() {
    let mut fast_differs = 0;
    for dir in fixture_dirs() {
        fast_differs += check(&dir, &LoadOptions::default(), "float");
        fast_differs += check(&dir, &quantized(QuantFormat::Q4), "q4");
        fast_differs += check(&dir, &quantized(QuantFormat::Q8), "q8");
    }
    eprintln!("the fast path differed at {fast_differs} step lengths");
}

#[test]
fn exact_steps_equal_one_token_steps_on_the_trained_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/pystd-qwen3-7m");
    check(&dir, &LoadOptions::default(), "bf16");
    check(&dir, &quantized(QuantFormat::Q4), "q4");
}
