//! Calibrated quantization (GPTQ toward the float model) on every
//! architecture fixture: it runs through every layer type, and its
//! logits stay closer to the float model's than round-to-nearest's.

use hayate_engine::calibrate::{Calibration, Objective};
use hayate_engine::refine::Refinement;
use hayate_engine::{LoadOptions, Logits, Model, QuantSpec};
use hayate_kernels::QuantFormat;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// A skewed, repetitive token stream (a small Markov chain over a Zipf-like
/// vocabulary), so that calibration has structure to find.
fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut prev = 0usize;
    (0..n)
        .map(|_| {
            let r = next();
            let t = if r < 0.3 {
                (prev * 7 + 3) % vocab
            } else {
                ((r * r * r) * vocab as f64) as usize % vocab
            };
            prev = t;
            t as u32
        })
        .collect()
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// Mean KL(float || quantized) over the positions of `windows`.
fn mean_kl(float: &Model, quantized: &Model, windows: &[Vec<u32>]) -> f64 {
    let vocab = float.info.vocab;
    let (mut sum, mut n) = (0.0, 0);
    for w in windows {
        let run = |m: &Model| {
            let mut out = Vec::new();
            let mut state = m.new_state(Some(w.len())).unwrap();
            m.forward(&mut state, w, Logits::All(&mut out)).unwrap();
            out
        };
        let (p, q) = (run(float), run(quantized));
        for (pr, qr) in p.chunks_exact(vocab).zip(q.chunks_exact(vocab)) {
            let (lp, lq) = (log_softmax(pr), log_softmax(qr));
            sum += lp
                .iter()
                .zip(&lq)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>();
            n += 1;
        }
    }
    sum / n as f64
}

/// Each format with the objective `hayate quantize` picks for it: toward
/// the float model for q4, GPTQ as published for q8 (toward the float model,
/// q8 came out 2-12% worse than round-to-nearest on four fixtures: its
/// drift is too small to estimate from a few thousand tokens).
#[test]
fn calibrated_quantization_is_never_worse_than_round_to_nearest_on_any_fixture() {
    let context = 32;
    for dir in fixtures() {
        let float = Model::load(&dir, &LoadOptions::default()).unwrap();
        let vocab = float.info.vocab;
        // Enough tokens for the Hessians of these 64-wide models, and enough
        // held-out positions (2048) that the KL's noise stays below the gains.
        let calibration_tokens = tokens(64 * context, 1, vocab);
        let held_out: Vec<Vec<u32>> = tokens(64 * context, 2, vocab)
            .chunks(context)
            .map(<[u32]>::to_vec)
            .collect();
        for (format, objective) in [
            (QuantFormat::Q8, Objective::Layer),
            (QuantFormat::Q4, Objective::Float),
        ] {
            let calibration = Calibration::new(
                &calibration_tokens,
                (context, usize::MAX),
                Calibration::DEFAULT_DAMP,
                objective,
            )
            .unwrap();
            let load = |calibration: Option<Arc<Calibration>>| {
                let options = LoadOptions {
                    quantize: Some(QuantSpec::new(format)),
                    calibration,
                    ..LoadOptions::default()
                };
                Model::load(&dir, &options).unwrap()
            };
            let rtn = mean_kl(&float, &load(None), &held_out);
            let calibrated = mean_kl(&float, &load(Some(Arc::new(calibration))), &held_out);
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            // Measured: 0.70-0.98x round-to-nearest's KL for q8, 0.56-0.92x for q4.
            assert!(
                calibrated < rtn,
                "{name} {format:?}: calibrated KL {calibrated:.3e} vs round-to-nearest {rtn:.3e}"
            );
        }
    }
}

/// KL-aware refinement after GPTQ (q4, toward the float model): on every
/// fixture it has a backward pass for, the refined model is closer to the
/// float model on the windows it was refined on (measured with the
/// engine's own kernels, int8 activations, scales rounded to bf16), and
/// on a recurrent fixture it is a clear error.
#[test]
fn refinement_lowers_the_kl_it_is_refined_on() {
    let context = 32;
    let mut refined_fixtures = 0;
    for dir in fixtures() {
        let float = Model::load(&dir, &LoadOptions::default()).unwrap();
        let vocab = float.info.vocab;
        let calibration_tokens = tokens(32 * context, 1, vocab);
        let windows: Vec<Vec<u32>> = calibration_tokens
            .chunks(context)
            .map(<[u32]>::to_vec)
            .collect();
        let gptq = Calibration::new(
            &calibration_tokens,
            (context, usize::MAX),
            Calibration::DEFAULT_DAMP,
            Objective::Float,
        )
        .unwrap();
        let refined = gptq
            .clone()
            .with_refinement(Refinement {
                steps: 64,
                lr: 2e-3,
            })
            .unwrap();
        let load = |calibration: Calibration| {
            let options = LoadOptions {
                quantize: Some(QuantSpec::new(QuantFormat::Q4)),
                calibration: Some(Arc::new(calibration)),
                ..LoadOptions::default()
            };
            Model::load(&dir, &options)
        };
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let model = match load(refined) {
            Ok(model) => model,
            Err(e) => {
                let message = e.to_string();
                assert!(
                    name.starts_with("lfm2") || name.starts_with("qwen3_5"),
                    "{name}: {message}"
                );
                assert!(
                    message.contains("no backward pass for"),
                    "{name}: {message}"
                );
                continue;
            }
        };
        let before = mean_kl(&float, &load(gptq).unwrap(), &windows);
        let after = mean_kl(&float, &model, &windows);
        // Measured: 0.78-0.86x GPTQ's KL after 64 steps.
        assert!(
            after < 0.9 * before,
            "{name}: GPTQ {before:.4e}, refined {after:.4e}"
        );
        refined_fixtures += 1;
    }
    assert!(refined_fixtures >= 8, "{refined_fixtures} fixtures refined");
}
