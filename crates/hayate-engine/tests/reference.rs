//! The engine against `transformers` on the real trained checkpoints in `../shared`.

use hayate_engine::{KvFormat, LoadOptions, Logits, Model, StateOptions};
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

/// The largest |a − b| over two equally long logit arrays.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Max |Δlogit| allowed: about ten times the largest measured (in the
/// comments at the call sites), as in the `hayate logits` tests.
/// Pages of 16 positions: the caches span several.
fn paged() -> StateOptions {
    StateOptions {
        kv_page: 16,
        ..StateOptions::default()
    }
}

fn check(name: &str, tolerance: f32) {
    let dir = shared_model(name);
    let (ids, want, vocab) = reference(&dir);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    // One prefill of everything.
    let mut state = model.new_state_with(&paged()).unwrap();
    let mut all = Vec::new();
    model
        .forward(&mut state, &ids, Logits::All(&mut all))
        .unwrap();
    let max_diff = max_abs_diff(&all, &want);
    assert!(
        max_diff <= tolerance,
        "{name} prefill: max |Δ| = {max_diff}"
    );
    // One token at a time through the cache.
    let mut state = model.new_state_with(&paged()).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let got = model.forward(&mut state, &[id], Logits::Last).unwrap();
        let row = &want[t * vocab..(t + 1) * vocab];
        let d = max_abs_diff(got, row);
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

/// Mean KL from `transformers`' next-token distributions (f32 keys and
/// values) to ours with a `kv` cache on the trained checkpoint, and the
/// largest logit difference.
fn pystd_with_cache(kv: KvFormat) -> (f64, f32) {
    let dir = shared_model("pystd-qwen3-7m");
    let (ids, want, vocab) = reference(&dir);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let options = StateOptions {
        kv_cache: kv,
        ..paged()
    };
    let mut state = model.new_state_with(&options).unwrap();
    let mut got = Vec::new();
    model
        .forward(&mut state, &ids, Logits::All(&mut got))
        .unwrap();
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        row.iter().map(|&v| v as f64 - lse).collect()
    };
    let mut kl = 0.0;
    for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
        let (lg, lw) = (log_softmax(g), log_softmax(w));
        kl += lw
            .iter()
            .zip(&lg)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    let kl = kl / ids.len() as f64;
    let max_diff = max_abs_diff(&got, &want);
    eprintln!(
        "pystd-qwen3-7m, {} cache: mean KL {kl:.3e}, max |Δ| {max_diff}",
        kv.name()
    );
    (kl, max_diff)
}

/// A bf16 KV cache: the logits stay close to `transformers`' and the
/// next-token distributions barely move (mean KL), yet they do move, so the
/// cache really is bf16.
#[test]
fn pystd_qwen3_7m_with_a_bf16_cache_stays_close() {
    let (kl, max_diff) = pystd_with_cache(KvFormat::Bf16);
    // Measured: mean KL 5.79e-6, max |Δ| 0.0255 (an f32 cache: 1.5e-5).
    assert!(kl < 3e-5, "mean KL {kl}");
    assert!(max_diff < 0.1, "max |Δ| {max_diff}");
    assert!(
        max_diff > 2e-4,
        "max |Δ| {max_diff}: no larger than with an f32 cache"
    );
}

/// An int8 KV cache: close too, and further than bf16 (8 bits of each
/// value against bf16's 8 significant bits, but one scale per vector).
#[test]
fn pystd_qwen3_7m_with_a_q8_cache_stays_close() {
    let (kl, max_diff) = pystd_with_cache(KvFormat::Q8);
    // Measured: mean KL 5.36e-5, max |Δ| 0.0814 (bf16: 5.7e-6, 0.0255).
    assert!(kl < 2e-4, "mean KL {kl}");
    assert!(kl > 2e-5, "mean KL {kl}: no further than a bf16 cache");
    assert!(max_diff < 0.3, "max |Δ| {max_diff}");
}
