//! Rolling back the last k tokens and re-feeding them reproduces the logits
//! exactly, for every layer type (full and sliding-window attention, gated
//! attention, Gated DeltaNet, short convolution), as speculative decoding
//! needs: a rejected draft is replaced and the state must be as if it had
//! never been seen.

mod common;

use common::{fixture_names, fixtures};

use hayate_engine::{InferenceState, LoadOptions, Logits, Model, StateOptions};
use std::path::Path;

/// Deterministic token ids below `vocab`.
fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104729 + 13) % vocab) as u32)
        .collect()
}

fn feed(model: &Model, state: &mut InferenceState, ids: &[u32], one_by_one: bool) -> Vec<f32> {
    let mut out = Vec::new();
    if one_by_one {
        for &id in ids {
            out.extend_from_slice(model.forward(state, &[id], Logits::Last).unwrap());
        }
    } else {
        let mut all = Vec::new();
        model.forward(state, ids, Logits::All(&mut all)).unwrap();
        out = all;
    }
    out
}

/// States whose sliding-window rings are small enough to wrap within the
/// test's sequence.
fn small_state(model: &Model) -> InferenceState {
    model
        .new_state_with(&StateOptions {
            prefill_chunk: 16,
            kv_page: 16,
            ..StateOptions::default()
        })
        .unwrap()
}

fn check(dir: &Path) {
    let model = Model::load(dir, &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab;
    // A prefix longer than the fixtures' sliding windows and than one
    // DeltaNet chunk, so rings have wrapped before rolling back.
    let prefix = tokens(75, vocab, 1);
    for one_by_one in [false, true] {
        for k in [1, 3, 8] {
            let accepted = tokens(k, vocab, 2);
            let rejected = tokens(k, vocab, 3);
            // What the model gives without any rollback.
            let mut fresh = small_state(&model);
            feed(&model, &mut fresh, &prefix, false);
            let want = feed(&model, &mut fresh, &accepted, one_by_one);
            // Feed a rejected draft, roll it back, feed the accepted one.
            let mut state = small_state(&model);
            feed(&model, &mut state, &prefix, false);
            feed(&model, &mut state, &rejected, one_by_one);
            state.truncate(prefix.len()).unwrap();
            assert_eq!(state.len(), prefix.len());
            let got = feed(&model, &mut state, &accepted, one_by_one);
            assert!(
                got == want,
                "{dir:?} k={k} one_by_one={one_by_one}: logits differ after rollback"
            );
            // Roll the accepted tokens back too and feed them again.
            state.truncate(prefix.len()).unwrap();
            let again = feed(&model, &mut state, &accepted, one_by_one);
            assert!(again == want, "{dir:?} k={k}: second rollback differs");
            // The continuation after the rollback matches as well.
            let next = tokens(4, vocab, 4);
            let want_next = feed(&model, &mut fresh, &next, true);
            let got_next = feed(&model, &mut state, &next, true);
            assert!(got_next == want_next, "{dir:?} k={k}: continuation differs");
        }
    }
    // Rolling back further than the state keeps is refused when layers
    // have bounded state, and always allowed for plain attention.
    let options = StateOptions {
        rollback: 4,
        ..StateOptions::default()
    };
    let mut state = model.new_state_with(&options).unwrap();
    feed(&model, &mut state, &prefix, false);
    match state.max_rollback() {
        Some(r) => {
            assert_eq!(r, 4);
            assert!(!state.can_truncate(prefix.len() - 5));
            assert!(state.truncate(prefix.len() - 5).is_err());
            assert_eq!(state.len(), prefix.len());
            state.truncate(prefix.len() - 4).unwrap();
        }
        None => state.truncate(1).unwrap(),
    }
    state.clear();
    assert!(state.is_empty());
    let mut fresh = model.new_state_with(&options).unwrap();
    let a = feed(&model, &mut state, &prefix[..10], false);
    let b = feed(&model, &mut fresh, &prefix[..10], false);
    assert!(a == b, "{dir:?}: cleared state differs from a fresh one");
}

#[test]
fn rollback_and_refeed_reproduce_the_logits_for_every_fixture() {
    let names = fixture_names();
    for name in &names {
        check(&fixtures().join(name));
    }
}
