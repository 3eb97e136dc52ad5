//! `forward_exact`, which speculative verification runs: a step over n
//! tokens gives, bit for bit, the logits and the state that n one-token
//! steps give, for every architecture fixture, float and quantized, and on
//! the trained checkpoint in `../shared`. (The fast path that
//! prefill takes differs in the last bits from n = 5 on here: that is what
//! makes the exact path necessary.)

mod common;

use common::{fixture, fixture_names};

use hayate_engine::{
    InferenceState, KvFormat, LoadOptions, Logits, Model, QuantSpec, StateOptions,
};
use hayate_kernels::QuantFormat;
use std::path::{Path, PathBuf};

fn fixture_dirs() -> Vec<PathBuf> {
    fixture_names().iter().map(|n| fixture(n)).collect()
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
            kv_page: 16,
            ..StateOptions::default()
        })
        .unwrap()
}

/// A draft tree of 13 tokens up to depth 6, branching at several depths.
const PARENTS: [usize; 13] = [0, 0, 0, 1, 1, 2, 3, 3, 5, 8, 9, 10, 4];

/// The tree's branch ending at `node`, root first.
fn branch(node: usize) -> Vec<usize> {
    let mut path = vec![node];
    while *path.last().unwrap() != 0 {
        path.push(PARENTS[*path.last().unwrap()]);
    }
    path.reverse();
    path
}

/// `forward_tree`: every node's logits equal those of one-token steps over
/// the prefix and its branch, and keeping a branch leaves the state that
/// those steps leave; prefixes that end inside a key tile and on its edge,
/// every KV cache format. Returns whether the model can branch at all.
fn check_tree(dir: &Path, options: &LoadOptions, label: &str) -> bool {
    let model = Model::load(dir, options).unwrap();
    if !model.can_branch() {
        return false;
    }
    let vocab = model.info.vocab;
    let tree = tokens(PARENTS.len(), vocab, 4);
    let after = tokens(3, vocab, 5);
    for kv_cache in [KvFormat::F32, KvFormat::Bf16, KvFormat::Q8] {
        let fresh = || {
            model
                .new_state_with(&StateOptions {
                    context: Some(160),
                    prefill_chunk: 32,
                    rollback: 20,
                    kv_cache,
                    // Trees span pages, and their branches move across them.
                    kv_page: 16,
                })
                .unwrap()
        };
        for prefix_len in [70, 64] {
            let prefix = tokens(prefix_len, vocab, 1);
            let mut s = fresh();
            model.forward(&mut s, &prefix, Logits::None).unwrap();
            let mut got = Vec::new();
            model
                .forward_tree(&mut s, &tree, &PARENTS, &mut got)
                .unwrap();
            let what = format!("{label} {kv_cache:?} {dir:?} after {prefix_len}");
            for node in 0..tree.len() {
                let mut one = fresh();
                model.forward(&mut one, &prefix, Logits::None).unwrap();
                let mut want = &[][..];
                for &i in &branch(node) {
                    want = model.forward(&mut one, &[tree[i]], Logits::Last).unwrap();
                }
                assert!(
                    bits(&got[node * vocab..(node + 1) * vocab]) == bits(want),
                    "{what}: node {node} differs from one-token steps over its branch"
                );
            }
            // Keep the deepest branch (it skips over siblings' positions).
            let path = branch(11);
            s.keep_branch(tree.len(), &path).unwrap();
            assert_eq!(s.len(), prefix_len + path.len());
            let mut one = fresh();
            model.forward(&mut one, &prefix, Logits::None).unwrap();
            for &i in &path {
                model.forward(&mut one, &[tree[i]], Logits::Last).unwrap();
            }
            for &t in &after {
                let want = model
                    .forward(&mut one, &[t], Logits::Last)
                    .unwrap()
                    .to_vec();
                let next = model.forward(&mut s, &[t], Logits::Last).unwrap();
                assert!(
                    bits(next) == bits(&want),
                    "{what}: state after keeping a branch"
                );
            }
        }
    }
    true
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
fn tree_passes_equal_one_token_steps_over_each_branch() {
    let mut branching = 0;
    for dir in fixture_dirs() {
        for (options, label) in [
            (LoadOptions::default(), "float"),
            (quantized(QuantFormat::Q4), "q4"),
        ] {
            branching += usize::from(check_tree(&dir, &options, label));
        }
    }
    // Llama, Qwen3 and Gemma 3 (sliding windows) at least, float and q4.
    assert!(branching >= 6, "only {branching} fixture runs could branch");
}

#[test]
fn a_model_with_recurrent_layers_refuses_a_tree() {
    for dir in fixture_dirs() {
        let model = Model::load(&dir, &LoadOptions::default()).unwrap();
        if model.can_branch() {
            continue;
        }
        let mut s = state(&model);
        model.forward(&mut s, &[1, 2, 3], Logits::None).unwrap();
        let err = model
            .forward_tree(&mut s, &[4, 5, 6], &[0, 0, 0], &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("cannot branch"), "{err}");
        assert_eq!(s.len(), 3, "a refused tree leaves the state");
    }
}

#[test]
fn exact_steps_equal_one_token_steps_on_the_trained_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/pystd-qwen3-7m");
    check(&dir, &LoadOptions::default(), "bf16");
    check(&dir, &quantized(QuantFormat::Q4), "q4");
    assert!(check_tree(&dir, &LoadOptions::default(), "bf16"));
}
