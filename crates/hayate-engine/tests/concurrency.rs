//! One model shared by several threads: each runs its own sequence through
//! `Model::forward` at the same time as the others, and every result must
//! equal the one the sequence gives when it runs alone.

use hayate_engine::quantize::DEFAULT_SEED;
use hayate_engine::{EmbeddingFormat, LoadOptions, Logits, Model, QuantSpec};
use hayate_kernels::QuantFormat;
use std::path::{Path, PathBuf};

const THREADS: usize = 4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn shared_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

/// Sequence `i`: a different length and content per caller.
fn tokens(i: usize, vocab: usize) -> Vec<u32> {
    (0..20 + 13 * i)
        .map(|t| ((t * 31 + i * 97 + 5) % vocab) as u32)
        .collect()
}

/// Prefill logits at every position, then 6 greedy decode steps' logits:
/// everything a caller sees.
fn run_sequence(model: &Model, prompt: &[u32]) -> Vec<f32> {
    let mut state = model.new_state(Some(128)).unwrap();
    let mut seen = Vec::new();
    model
        .forward(&mut state, prompt, Logits::All(&mut seen))
        .unwrap();
    let vocab = model.info.vocab;
    let mut last = seen[seen.len() - vocab..].to_vec();
    for _ in 0..6 {
        let next = hayate_engine::sampler::argmax(&last);
        last = model
            .forward(&mut state, &[next], Logits::Last)
            .unwrap()
            .to_vec();
        seen.extend_from_slice(&last);
    }
    seen
}

fn check(dir: &Path, options: &LoadOptions) {
    let model = Model::load(dir, options).unwrap();
    assert!(
        model.n_threads() >= 2 || num_cores() < 2,
        "the pool is used"
    );
    let vocab = model.info.vocab;
    let alone: Vec<Vec<f32>> = (0..THREADS)
        .map(|i| run_sequence(&model, &tokens(i, vocab)))
        .collect();
    for round in 0..3 {
        let together: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|i| {
                    let model = &model;
                    scope.spawn(move || run_sequence(model, &tokens(i, vocab)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.len(), b.len());
            // Bit-identical: the kernels split work by thread index only.
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dir:?} round {round}: sequence {i} differs when run alongside others"
            );
        }
    }
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn concurrent_forward_on_every_layer_type_equals_running_alone() {
    for name in [
        "qwen3_5-text-gdn",
        "gemma3-text-sliding",
        "lfm2-conv-attn",
        "qwen3-gqa-qknorm",
    ] {
        check(&fixture(name), &LoadOptions::default());
    }
}

#[test]
fn concurrent_forward_on_a_quantized_model_equals_running_alone() {
    let options = LoadOptions {
        quantize: Some(QuantSpec {
            format: QuantFormat::Q4,
            group_size: 32,
            rotation: true,
            seed: DEFAULT_SEED,
            embeddings: EmbeddingFormat::Q8,
        }),
        ..LoadOptions::default()
    };
    check(&shared_model("pystd-qwen3-7m"), &options);
}

#[test]
fn a_state_runs_only_on_the_model_that_made_it() {
    let dir = fixture("qwen3-gqa-qknorm");
    let a = Model::load(&dir, &LoadOptions::default()).unwrap();
    let b = Model::load(&dir, &LoadOptions::default()).unwrap();
    let mut state = a.new_state(Some(16)).unwrap();
    let err = b.forward(&mut state, &[1, 2, 3], Logits::Last).unwrap_err();
    assert!(err.to_string().contains("another model"), "{err}");
    assert!(a.forward(&mut state, &[1, 2, 3], Logits::Last).is_ok());
}
